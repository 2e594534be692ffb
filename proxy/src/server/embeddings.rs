//! `POST /v1/embeddings`: the OpenAI embeddings door. Vectors come back in the caller's
//! `encoding_format` whatever the upstream sent (see `providers::embed`).

use super::AppState;
use super::door::{self, Outcome};
use super::error::ApiError;
use crate::metrics;
use crate::pipeline::{self, Door, RequestCtx};
use crate::providers::{EmbeddingsRequest, ProviderError};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::time::Instant;
use tracing::Span;

/// `POST /v1/embeddings`: runs the chain for one embeddings request and renders its answer.
pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (state, headers) = (&state, &headers);
    door::serve(
        state,
        Door::OpenAiEmbeddings,
        "embeddings",
        headers,
        |mut ctx, span| async move {
            let response = handle(state, &mut ctx, body, span).await;
            (response, ctx)
        },
    )
    .await
}

async fn handle(state: &AppState, ctx: &mut RequestCtx, body: Body, span: Span) -> Response {
    let parse_started = Instant::now();
    let req = match parse(state, body).await {
        Ok(req) => req,
        Err(e) => return failed(e, Outcome::new(span, ctx, None)),
    };
    metrics::stages()
        .parse
        .observe(parse_started.elapsed().as_secs_f64());
    let view = state.dispatcher.view();
    let result = pipeline::embeddings(&state.dispatcher, &view, ctx, &req).await;
    let outcome = Outcome::new(span, ctx, Some(req.model));
    match result {
        Ok(reply) => {
            outcome.record("ok");
            axum::Json(reply.body).into_response()
        }
        Err(e) => failed(door::stage_error(e), outcome),
    }
}

/// Reads and checks the body: a body that is not an embeddings request, or one no provider
/// would take (no input, an empty one, too many), is a 400 naming the field.
async fn parse(state: &AppState, body: Body) -> Result<EmbeddingsRequest, ApiError> {
    let bytes = door::read_body(body, state.body_limit, state.body_timeout).await?;
    let req: EmbeddingsRequest = serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not a valid embeddings request: {e}"),
        )
    })?;
    req.validate().map_err(|e| {
        let message = match e {
            ProviderError::BadRequest { message, .. } => message,
            other => other.to_string(),
        };
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            "invalid_request",
            message,
        )
    })?;
    Ok(req)
}

fn failed(error: ApiError, outcome: Outcome) -> Response {
    outcome.with_status(error.status).record(error.code);
    error.into_response()
}
