//! `POST /v1/chat/completions`: the OpenAI door, non-streaming and streaming.

use super::AppState;
use super::door::{self, Outcome, Tracked};
use super::error::ApiError;
use super::waiting;
use crate::metrics;
use crate::pipeline::{self, Door, RequestCtx};
use crate::providers::types::{ChatRequest, ChatResponse};
use crate::providers::{ChatChunk, ProviderError};
use crate::route::wait::Progress;
use crate::route::{Reply, ReplyBody};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::Stream;
use futures::StreamExt as _;
use futures::stream::BoxStream;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tracing::{Instrument as _, Span};

pub(super) async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (state, headers) = (&state, &headers);
    door::serve(
        state,
        Door::OpenAiChat,
        "chat",
        headers,
        |mut ctx, span| async move {
            let response = handle(state, &mut ctx, body, headers, span).await;
            (response, ctx)
        },
    )
    .await
}

async fn handle(
    state: &AppState,
    ctx: &mut RequestCtx,
    body: Body,
    headers: &HeaderMap,
    span: Span,
) -> Response {
    let parse_started = Instant::now();
    let req = match parse(state, body).await {
        Ok(req) => req,
        Err(e) => return failed(e, Outcome::new(span, ctx, None)),
    };
    metrics::stages()
        .parse
        .observe(parse_started.elapsed().as_secs_f64());
    let view = state.dispatcher.view();
    if !req.stream {
        let result = pipeline::chat(&state.dispatcher, &view, ctx, &req).await;
        // Past its wait limit, or when every target and degradation step failed, a caller
        // that prefers it gets a job instead (server::jobs): the chain's last step.
        if result.as_ref().is_err_and(crate::routing::degradable)
            && super::jobs::prefers_async(headers)
            && let Some(mut response) = super::jobs::defer(state, ctx, &req).await
        {
            if response.status() == axum::http::StatusCode::ACCEPTED {
                crate::routing::handed_over(ctx);
                crate::routing::headers(response.headers_mut(), ctx);
            }
            Outcome::new(span, ctx, Some(req.model))
                .with_status(response.status())
                .record("deferred");
            return response;
        }
        let outcome = Outcome::new(span, ctx, Some(req.model));
        return render(result, outcome);
    }
    // A streaming caller that waits for budget is told where it stands (server::waiting).
    let progress = Arc::new(Progress::default());
    ctx.progress = Some(progress.clone());
    // The tier goes into the headers, which are sent before the answer if it waits.
    pipeline::queue_place(&view, ctx);
    let dispatcher = state.dispatcher.clone();
    let mut run = ctx.clone();
    // A caller that hangs up while it waits: its outcome, as a stream it stopped reading.
    let waited = Outcome::new(span.clone(), ctx, Some(req.model.clone()));
    let hung_up = move || waited.record(door::CLIENT_CLOSED);
    // Once the stream has started the pipeline runs in the body, polled by the connection:
    // still inside the request's span.
    let pending = async move {
        let result = pipeline::chat(&dispatcher, &view, &mut run, &req).await;
        (result, run, req.model)
    }
    .instrument(span.clone());
    let late_span = span.clone();
    let finish = move |(result, run, model): Finished| {
        let outcome = Outcome::new(late_span, &run, Some(model));
        late_events(result, outcome)
    };
    match waiting::stream_while_waiting(pending, progress, finish, hung_up).await {
        Ok((result, run, model)) => {
            *ctx = run;
            let outcome = Outcome::new(span, ctx, Some(model));
            render(result, outcome)
        }
        Err(started) => started,
    }
}

type Finished = (Result<Reply, pipeline::Error>, RequestCtx, String);

fn render(result: Result<Reply, pipeline::Error>, outcome: Outcome) -> Response {
    match result {
        Ok(reply) => match reply.body {
            ReplyBody::Complete(answer) => {
                outcome.record("ok");
                answer_response(&answer)
            }
            ReplyBody::Stream(chunks) => sse(Tracked::new(chunks, outcome)),
        },
        Err(e) => failed(door::stage_error(e), outcome),
    }
}

/// A whole answer as `application/json`, written into a buffer sized for it (axum's `Json`
/// starts at 128 bytes and regrows twice for a typical answer).
fn answer_response(answer: &ChatResponse) -> Response {
    let text: usize = answer
        .choices
        .iter()
        .map(|choice| choice.message.content.as_ref().map_or(0, String::len) + 128)
        .sum();
    let mut body = Vec::with_capacity(256 + text);
    match serde_json::to_writer(&mut body, answer) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => {
            ApiError::internal(format!("the answer could not be written: {e}")).into_response()
        }
    }
}

/// The events of a stream that started while the request waited: the answer's events, or
/// the refusal as one error event (the status, 200, is already sent).
fn late_events(
    result: Result<Reply, pipeline::Error>,
    outcome: Outcome,
) -> BoxStream<'static, Bytes> {
    match result.map(|reply| reply.body) {
        Ok(ReplyBody::Stream(chunks)) => OpenAiEvents {
            chunks: Tracked::new(chunks, outcome),
            done: false,
        }
        .map(|event| match event {
            Ok(bytes) => bytes,
            Err(never) => match never {},
        })
        .boxed(),
        Ok(ReplyBody::Complete(_)) => {
            let e = ApiError::internal("a whole answer came for a streamed request");
            outcome.with_status(e.status).record(e.code);
            futures::stream::once(async move { e.sse_event() }).boxed()
        }
        Err(e) => {
            let e = door::stage_error(e);
            outcome.with_status(e.status).record(e.code);
            futures::stream::once(async move { e.sse_event() }).boxed()
        }
    }
}

async fn parse(state: &AppState, body: Body) -> Result<ChatRequest, ApiError> {
    let bytes = door::read_body(body, state.body_limit, state.body_timeout).await?;
    let req: ChatRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not a valid chat completion request: {e}"),
        )
    })?;
    if req.messages.is_empty() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            "`messages` must contain at least one message",
        ));
    }
    Ok(req)
}

fn failed(error: ApiError, outcome: Outcome) -> Response {
    outcome.with_status(error.status).record(error.code);
    error.into_response()
}

/// The typed stream as OpenAI server-sent events: `data: <chunk>` per chunk, then
/// `data: [DONE]`; an upstream break becomes one `data: {"error": ...}` event and no
/// `[DONE]`, so no client mistakes a cut-off answer for a whole one.
fn sse<S>(chunks: Tracked<S>) -> Response
where
    S: Stream<Item = Result<ChatChunk, ProviderError>> + Unpin + Send + 'static,
{
    let events = OpenAiEvents {
        chunks,
        done: false,
    };
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

struct OpenAiEvents<S> {
    chunks: Tracked<S>,
    done: bool,
}

impl<S> Stream for OpenAiEvents<S>
where
    S: Stream<Item = Result<ChatChunk, ProviderError>> + Unpin,
{
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match Pin::new(&mut self.chunks).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        let bytes = match item {
            Some(Ok(chunk)) => sse_data(&chunk),
            Some(Err(error)) => {
                self.done = true;
                sse_error(&error)
            }
            None => {
                self.done = true;
                Bytes::from_static(b"data: [DONE]\n\n")
            }
        };
        Poll::Ready(Some(Ok(bytes)))
    }
}

fn sse_data(chunk: &ChatChunk) -> Bytes {
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(b"data: ");
    // A chunk always serializes; an empty object keeps the stream well-formed if not.
    if serde_json::to_writer(&mut out, chunk).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn sse_error(error: &ProviderError) -> Bytes {
    let body = serde_json::json!({
        "error": {
            "message": format!("the upstream stream was interrupted: {error}"),
            "type": "upstream_error",
            "code": error.metric_label(),
        }
    });
    Bytes::from(format!("data: {body}\n\n"))
}
