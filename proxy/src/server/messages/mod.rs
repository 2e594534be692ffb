//! The Anthropic Messages front door: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, so the official `anthropic` SDKs work with a base-URL
//! change.
//!
//! A request is read in Anthropic's shape ([`request`]), translated into the internal chat
//! request and routed over the same pools as the OpenAI door, to any provider. The answer is
//! rendered back in Anthropic's shape: a `message` ([`response`]) or Anthropic's event
//! stream ([`stream`]); errors in Anthropic's format ([`error`]), also for a wrong method,
//! an unknown path below `/v1/messages` (the router's fallback) and a panic ([`guarded`]).
//!
//! The `anthropic-beta` header's betas ride on the internal request
//! ([`ChatRequest::anthropic_beta`]): Anthropic upstreams get them as sent, other targets
//! accept only the betas that change nothing they could not honour and refuse the rest by
//! name ([`PORTABLE_BETAS`](crate::providers::params::PORTABLE_BETAS)).

pub mod error;
pub mod request;
pub mod response;
pub mod stream;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use futures::{Stream, StreamExt as _};
use serde::Serialize;
use std::any::Any;
use std::convert::Infallible;
use std::time::Instant;
use tower_http::catch_panic::CatchPanicLayer;
use tracing::{Instrument as _, Span};

use super::AppState;
use super::door::{self, Outcome, Tracked};
use super::error::ApiError;
use super::waiting;
use crate::metrics;
use crate::pipeline::{self, Door, RequestCtx};
use crate::providers::types::{ChatChunk, ChatRequest};
use crate::providers::{ProviderError, estimate_prompt_tokens};
use crate::route::wait::Progress;
use crate::route::{Reply, ReplyBody};
use bytes::Bytes;
use error::{error_response, invalid_request};
use futures::stream::BoxStream;
use request::{MessagesRequest, Purpose};
use std::sync::Arc;

/// `POST /v1/messages`: a `message`, or Anthropic's event stream when `stream` is true.
/// The same stages as the OpenAI door; only parsing and rendering differ.
pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let (state, headers) = (&state, &headers);
    door::serve(
        state,
        Door::AnthropicMessages,
        "chat",
        headers,
        |mut ctx, span| async move {
            let response = handle(state, &mut ctx, headers, body, span).await;
            (response, ctx)
        },
    )
    .await
}

async fn handle(
    state: &AppState,
    ctx: &mut RequestCtx,
    headers: &HeaderMap,
    body: Body,
    span: Span,
) -> Response {
    let parse_started = Instant::now();
    let parsed = async {
        let betas = anthropic_betas(headers)?;
        let mut req = read_request(state, body, Purpose::Create).await?;
        req.anthropic_beta = betas;
        Ok::<_, ApiError>(req)
    };
    let req = match parsed.await {
        Ok(req) => req,
        Err(e) => return failed(&e, Outcome::new(span, ctx, None)),
    };
    metrics::stages()
        .parse
        .observe(parse_started.elapsed().as_secs_f64());
    // Before the request moves on: `message_start` reports it until the upstream's count.
    let input_tokens = estimate_prompt_tokens(&req);
    let view = state.dispatcher.view();
    if !req.stream {
        let result = pipeline::chat(&state.dispatcher, &view, ctx, &req).await;
        // Past its wait limit, or when every target and degradation step failed, a caller
        // that prefers it gets a job instead, as at the OpenAI door (server::jobs).
        if result.as_ref().is_err_and(crate::routing::degradable)
            && super::jobs::prefers_async(headers)
            && let Some(mut response) = super::jobs::defer(state, ctx, &req).await
        {
            if response.status() == StatusCode::ACCEPTED {
                crate::routing::handed_over(ctx);
                crate::routing::headers(response.headers_mut(), ctx);
            }
            Outcome::new(span, ctx, Some(req.model))
                .with_status(response.status())
                .record("deferred");
            return response;
        }
        let outcome = Outcome::new(span, ctx, Some(req.model.clone()));
        return render(result, outcome, req.model, input_tokens);
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
        let outcome = Outcome::new(late_span, &run, Some(model.clone()));
        late_events(result, outcome, model, input_tokens)
    };
    match waiting::stream_while_waiting(pending, progress, finish, hung_up).await {
        Ok((result, run, model)) => {
            *ctx = run;
            let outcome = Outcome::new(span, ctx, Some(model.clone()));
            render(result, outcome, model, input_tokens)
        }
        Err(started) => started,
    }
}

type Finished = (Result<Reply, pipeline::Error>, RequestCtx, String);

fn render(
    result: Result<Reply, pipeline::Error>,
    outcome: Outcome,
    model: String,
    input_tokens: u32,
) -> Response {
    match result {
        Ok(reply) => match reply.body {
            ReplyBody::Complete(answer) => match response::to_message(answer, model) {
                Ok(message) => {
                    outcome.record("ok");
                    Json(message).into_response()
                }
                Err(e) => failed(&e, outcome),
            },
            // Anthropic's stream must end with a stop reason: one that never came is an
            // error, rendered as such and counted as such.
            ReplyBody::Stream(chunks) => {
                let chunks = door::RequireFinish::new(chunks);
                sse(Tracked::new(chunks, outcome), model, input_tokens)
            }
        },
        Err(e) => failed(&door::stage_error(e), outcome),
    }
}

/// The events of a stream that started while the request waited: the answer's events, or
/// the refusal as one `error` event (the status, 200, is already sent).
fn late_events(
    result: Result<Reply, pipeline::Error>,
    outcome: Outcome,
    model: String,
    input_tokens: u32,
) -> BoxStream<'static, Bytes> {
    let refusal = match result.map(|reply| reply.body) {
        Ok(ReplyBody::Stream(chunks)) => {
            let chunks = Tracked::new(door::RequireFinish::new(chunks), outcome);
            return stream::encode(chunks, model, input_tokens).boxed();
        }
        Ok(ReplyBody::Complete(_)) => {
            ApiError::internal("a whole answer came for a streamed request")
        }
        Err(e) => door::stage_error(e),
    };
    outcome.with_status(refusal.status).record(refusal.code);
    let event = error::sse_event(&refusal);
    futures::stream::once(async move { event }).boxed()
}

fn failed(error: &ApiError, outcome: Outcome) -> Response {
    outcome.with_status(error.status).record(error.code);
    error_response(error)
}

/// The typed stream as Anthropic's events ([`stream::encode`]).
fn sse<S>(chunks: Tracked<S>, model: String, input_tokens: u32) -> Response
where
    S: Stream<Item = Result<ChatChunk, ProviderError>> + Unpin + Send + 'static,
{
    let events = stream::encode(chunks, model, input_tokens).map(Ok::<_, Infallible>);
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The answer of `count_tokens`.
#[derive(Debug, Serialize)]
struct TokenCount {
    input_tokens: u32,
}

/// `POST /v1/messages/count_tokens`: `{"input_tokens": N}`.
///
/// N is the gateway's **estimate** ([`estimate_prompt_tokens`], about four bytes a token),
/// not a provider's tokenizer count: the model may be answered by any provider of its pool,
/// each counting differently. The model must be one this gateway serves (404 otherwise).
pub async fn count_tokens(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        // Identity as on every door: no estimate for a caller without a valid key.
        let config = state.dispatcher.config();
        let caller = state
            .identity
            .identify(&config, state.dispatcher.budgets(), &headers)
            .map_err(door::unauthenticated)?;
        let req = read_request(&state, body, Purpose::CountTokens).await?;
        if !state
            .dispatcher
            .view()
            .runtime
            .routes
            .contains_key(&req.model)
        {
            return Err(unknown_model(&req.model));
        }
        if let Some(caller) = &caller
            && !caller.may_use(&req.model)
        {
            let refused = crate::identity::Refusal::ModelNotAllowed(req.model.clone());
            return Err(door::refusal(&refused));
        }
        let input_tokens = estimate_prompt_tokens(&req);
        Ok(Json(TokenCount { input_tokens }).into_response())
    }
    .await;
    result.unwrap_or_else(|e| error_response(&e))
}

/// Reads and translates the body, refusing what cannot be translated.
async fn read_request(
    state: &AppState,
    body: Body,
    purpose: Purpose,
) -> Result<ChatRequest, ApiError> {
    let bytes = door::read_body(body, state.body_limit, state.body_timeout).await?;
    let req: MessagesRequest = serde_json::from_slice(&bytes).map_err(|e| {
        invalid_request(format!(
            "the request body is not a valid Messages request: {e}"
        ))
    })?;
    req.into_chat(purpose)
}

/// The betas of the `anthropic-beta` header(s): comma-separated names, in order, empty
/// ones skipped. A value that is not visible ASCII is refused, naming the header.
pub fn anthropic_betas(headers: &HeaderMap) -> Result<Vec<String>, ApiError> {
    let mut betas = Vec::new();
    for value in headers.get_all("anthropic-beta") {
        let value = value.to_str().map_err(|_| {
            invalid_request("the `anthropic-beta` header must be comma-separated ASCII names")
        })?;
        betas.extend(
            value
                .split(',')
                .map(str::trim)
                .filter(|b| !b.is_empty())
                .map(str::to_owned),
        );
    }
    Ok(betas)
}

/// A route of this door, answering in Anthropic's error format when the method is not
/// `POST` (405, with `allow: POST`) and when its handler panics (500).
pub fn guarded<S>(route: MethodRouter<S>) -> MethodRouter<S>
where
    S: Clone + Send + Sync + 'static,
{
    route
        .fallback(method_not_allowed)
        .layer(CatchPanicLayer::custom(panicked))
}

async fn method_not_allowed(method: Method) -> Response {
    let error = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "invalid_request_error",
        "method_not_allowed",
        format!("`{method}` is not allowed here; use `POST`"),
    );
    let mut response = error_response(&error);
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static("POST"));
    response
}

/// A panic in this door's handler: a 500 `api_error` that says nothing of the panic.
fn panicked(_: Box<dyn Any + Send + 'static>) -> Response {
    error_response(&ApiError::internal("internal error"))
}

/// Whether `path` belongs to this door (so that its errors are in Anthropic's format).
pub fn owns(path: &str) -> bool {
    path.strip_prefix("/v1/messages")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The 404 for an unknown path below `/v1/messages` (`/v1/messages/batches`, not built).
pub fn not_found(path: &str) -> Response {
    error_response(&ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Unknown request URL: {path}"),
    ))
}

fn unknown_model(model: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "model_not_found",
        format!("the model `{model}` does not exist or is not served by this gateway"),
    )
}

#[cfg(test)]
mod tests;
