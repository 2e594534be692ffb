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
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::AppState;
use super::error::ApiError;
use crate::providers::estimate_prompt_tokens;
use crate::providers::types::ChatRequest;
use error::{error_response, invalid_request};
use request::{MessagesRequest, Purpose};

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
