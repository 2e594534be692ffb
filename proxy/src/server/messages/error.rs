//! Errors in Anthropic's format: `{"type": "error", "error": {"type", "message"}}`.
//!
//! The gateway builds its errors as the OpenAI door's [`ApiError`]; this door renders the
//! same value with Anthropic's error types, keeping the status and `retry-after`, so the
//! official SDKs raise the exception class that matches (`NotFoundError`,
//! `RateLimitError`, `OverloadedError`, ...).

use axum::Json;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::providers::ProviderError;
use crate::server::error::ApiError;

/// The body of an error response, and the data of a stream's `error` event.
#[derive(Debug, Serialize)]
pub(super) struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    message: &'a str,
}

impl<'a> ErrorBody<'a> {
    pub(super) fn new(kind: &'static str, message: &'a str) -> Self {
        ErrorBody {
            kind: "error",
            error: ErrorDetail { kind, message },
        }
    }
}

/// A 400 `invalid_request_error` for a request this door cannot accept; `message` names the
/// field.
pub fn invalid_request(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        "invalid_request",
        message,
    )
}

/// Anthropic's error type for an error the gateway built: by status, except that a 503 the
/// upstream meant as "overloaded" stays `overloaded_error`.
pub fn error_type(e: &ApiError) -> &'static str {
    match e.status.as_u16() {
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        503 if e.code == "overloaded" => "overloaded_error",
        400..=499 => "invalid_request_error",
        _ => "api_error",
    }
}

/// Renders an error the gateway built in Anthropic's format, with the same status and
/// `retry-after`.
pub fn error_response(e: &ApiError) -> Response {
    let body = ErrorBody::new(error_type(e), &e.message);
    let mut response = (e.status, Json(body)).into_response();
    if let Some(after) = e.retry_after {
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, secs.max(1).into());
    }
    response
}

/// An error the gateway built as one Anthropic `error` event, for a stream whose status is
/// already sent.
pub fn sse_event(e: &ApiError) -> bytes::Bytes {
    let body = ErrorBody::new(error_type(e), &e.message);
    let json = serde_json::to_string(&body).unwrap_or_else(|_| "{}".to_owned());
    bytes::Bytes::from(format!("event: error\ndata: {json}\n\n"))
}

/// Anthropic's error type for a failure in the middle of a stream (the status is already
/// sent): `overloaded_error` when the provider is shedding load, `api_error` otherwise.
pub(super) fn stream_error_type(e: &ProviderError) -> &'static str {
    match e {
        ProviderError::Overloaded { .. } => "overloaded_error",
        _ => "api_error",
    }
}
