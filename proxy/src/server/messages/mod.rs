//! The Anthropic Messages front door: `POST /v1/messages` and
//! `POST /v1/messages/count_tokens`, so the official `anthropic` SDKs work with a base-URL
//! change.
//!
//! A request is read in Anthropic's shape ([`request`]), translated into the internal chat
//! request and routed over the same pools as the OpenAI door, to any provider. The answer is
//! rendered back in Anthropic's shape: a `message` ([`response`]) or Anthropic's event
//! stream ([`stream`]); errors in Anthropic's format ([`error`]).

pub mod error;
pub mod request;
pub mod response;
pub mod stream;

use axum::Json;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{Stream, StreamExt as _, future};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use crate::providers::types::{ChatChunk, ChatRequest};
use crate::providers::{Adapter, ProviderError, estimate_prompt_tokens};
use crate::route::{Reply, ReplyBody};
use error::{error_response, invalid_request};
use request::{MessagesRequest, Purpose};

/// `POST /v1/messages`: a `message`, or Anthropic's event stream when `stream` is true.
pub async fn create(State(state): State<AppState>, body: Body) -> Response {
    let result = async {
        let req = read_request(&state, body, Purpose::Create).await?;
        let model = req.model.clone();
        let input_tokens = estimate_prompt_tokens(&req);
        let config = state.config.load_full();
        let reply = state
            .dispatcher
            .chat(&config, req)
            .await
            .map_err(super::chat::route_error)?;
        respond(reply, model, input_tokens)
    }
    .await;
    result.unwrap_or_else(|e| error_response(&e))
}

fn respond(reply: Reply, model: String, input_tokens: u32) -> Result<Response, ApiError> {
    let mut response = match reply.body {
        ReplyBody::Complete(answer) => Json(response::to_message(answer, model)?).into_response(),
        ReplyBody::Stream(events) => {
            let chunks = typed_chunks(events, &model);
            let mut r = Response::new(Body::from_stream(
                stream::encode(chunks, model, input_tokens).map(Ok::<_, std::convert::Infallible>),
            ));
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            r
        }
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&reply.provider) {
        h.insert("x-floodgate-provider", v);
    }
    h.insert("x-floodgate-attempts", HeaderValue::from(reply.attempts));
    Ok(response)
}

/// Interim, until `route` returns typed chunks: the dispatcher's OpenAI SSE bytes decoded
/// back into chunks (its error event becomes the `Err` item, a missing `[DONE]` `Truncated`).
fn typed_chunks(
    events: BoxStream<'static, Bytes>,
    model: &str,
) -> impl Stream<Item = Result<ChatChunk, ProviderError>> + Send + 'static {
    let decoder = Adapter::OpenAi.stream_decoder(model, true);
    events
        .map(Some)
        .chain(futures::stream::once(future::ready(None)))
        .scan(decoder, |decoder, bytes| {
            let decoded = match bytes {
                Some(bytes) => decoder.feed(&bytes),
                None => decoder.finish(),
            };
            let items: Vec<_> = match decoded {
                Ok(chunks) => chunks.into_iter().map(Ok).collect(),
                Err(e) => vec![Err(e)],
            };
            future::ready(Some(futures::stream::iter(items)))
        })
        .flatten()
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
pub async fn count_tokens(State(state): State<AppState>, body: Body) -> Response {
    let result = async {
        let req = read_request(&state, body, Purpose::CountTokens).await?;
        let config = state.config.load();
        if !config.models().iter().any(|m| m.id == req.model) {
            return Err(unknown_model(&req.model));
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
    let bytes = axum::body::to_bytes(body, state.body_limit)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "request_too_large",
                format!(
                    "the request body is larger than the gateway's limit of {} bytes",
                    state.body_limit
                ),
            )
        })?;
    let req: MessagesRequest = serde_json::from_slice(&bytes).map_err(|e| {
        invalid_request(format!(
            "the request body is not a valid Messages request: {e}"
        ))
    })?;
    req.into_chat(purpose)
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
