//! `POST /v1/chat/completions`: OpenAI-compatible, non-streaming and streaming.

use super::AppState;
use super::error::ApiError;
use crate::metrics::{self, RequestLabels};
use crate::providers::ProviderError;
use crate::providers::types::ChatRequest;
use crate::route::{Reply, ReplyBody, RouteError};
use crate::telemetry;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use std::cell::Cell;
use std::time::{Duration, Instant};
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

/// Response headers that tell the caller what happened.
const PROVIDER: &str = "x-floodgate-provider";
const KEY: &str = "x-floodgate-key";
const ATTEMPTS: &str = "x-floodgate-attempts";

pub(super) async fn completions(State(state): State<AppState>, body: Body) -> Response {
    let started = Instant::now();
    let upstream = Cell::new(Duration::ZERO);
    // OpenTelemetry GenAI and HTTP server attributes; see `telemetry` for the cost when off.
    let span = tracing::info_span!(
        target: telemetry::TARGET,
        "chat",
        otel.kind = "server",
        otel.status_code = Empty,
        gen_ai.operation.name = "chat",
        gen_ai.request.model = Empty,
        http.request.method = "POST",
        http.route = "/v1/chat/completions",
        http.response.status_code = Empty,
        error.type = Empty,
        floodgate.provider = Empty,
        floodgate.attempts = Empty,
    );
    let request_span = span.clone();
    metrics::UPSTREAM_TIME
        .scope(upstream, async move {
            let mut model = None;
            let result = handle(state, body, &mut model).await;
            let upstream = metrics::UPSTREAM_TIME
                .try_with(Cell::get)
                .unwrap_or_default();
            let m = metrics::global();
            m.stage("total_overhead", started.elapsed().saturating_sub(upstream));
            let (response, outcome) = match result {
                Ok(response) => (response, "ok"),
                Err(error) => {
                    let code = error.code;
                    (error.into_response(), code)
                }
            };
            let provider = response
                .headers()
                .get(PROVIDER)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("none");
            if !request_span.is_disabled() {
                record_request(&request_span, &response, model.as_deref(), outcome);
            }
            let labels = RequestLabels {
                tier: "default".to_owned(),
                provider: provider.to_owned(),
                model: match model {
                    Some(m) if outcome != "model_not_found" => m,
                    _ => "unknown".to_owned(),
                },
                outcome: outcome.to_owned(),
            };
            m.requests.get_or_create(&labels).inc();
            response
        })
        .instrument(span)
        .await
}

/// The request span's outcome attributes, read from the response the caller gets.
fn record_request(span: &Span, response: &Response, model: Option<&str>, outcome: &str) {
    let status = response.status();
    span.record("http.response.status_code", i64::from(status.as_u16()));
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    if outcome != "ok" {
        span.record("error.type", outcome);
    }
    if let Some(model) = model {
        span.record("gen_ai.request.model", model);
    }
    let headers = response.headers();
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(provider) = header(PROVIDER) {
        span.record("floodgate.provider", provider);
    }
    if let Some(attempts) = header(ATTEMPTS).and_then(|a| a.parse::<u32>().ok()) {
        span.record("floodgate.attempts", i64::from(attempts));
    }
}

async fn handle(
    state: AppState,
    body: Body,
    model: &mut Option<String>,
) -> Result<Response, ApiError> {
    let parse_started = Instant::now();
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
    metrics::global().stage("parse", parse_started.elapsed());
    let config = state.config.load_full();
    // Kept for the metric label only if the model turns out to be configured.
    *model = Some(req.model.clone());
    let reply = state
        .dispatcher
        .chat(&config, req)
        .await
        .map_err(route_error)?;
    Ok(respond(reply))
}

fn respond(reply: Reply) -> Response {
    let mut response = match reply.body {
        ReplyBody::Complete(answer) => axum::Json(answer).into_response(),
        ReplyBody::Stream(events) => {
            let mut r = Response::new(Body::from_stream(
                events.map(Ok::<_, std::convert::Infallible>),
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
        h.insert(PROVIDER, v);
    }
    if let Ok(v) = HeaderValue::from_str(&reply.key) {
        h.insert(KEY, v);
    }
    h.insert(ATTEMPTS, HeaderValue::from(reply.attempts));
    response
}

use futures::StreamExt as _;

/// The error the caller gets when routing failed (rendered by each door in its format).
pub(super) fn route_error(e: RouteError) -> ApiError {
    let message = e.to_string();
    match e {
        RouteError::UnknownModel(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "model_not_found",
            message,
        ),
        RouteError::Saturated { retry_after } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "rate_limit_exceeded",
            message,
        )
        .with_retry_after(retry_after),
        RouteError::Unavailable { retry_after } => {
            let e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                "no_upstream_available",
                message,
            );
            match retry_after {
                Some(d) => e.with_retry_after(d),
                None => e,
            }
        }
        RouteError::Upstream { error, attempts } => {
            // The error body carries no attempts header; the request span still wants them.
            Span::current().record("floodgate.attempts", i64::from(attempts));
            upstream_error(&error, attempts)
        }
    }
}

fn upstream_error(error: &ProviderError, attempts: u32) -> ApiError {
    let status = StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::BAD_GATEWAY);
    let kind = match error {
        ProviderError::BadRequest { .. } => "invalid_request_error",
        ProviderError::RateLimited { .. } => "rate_limit_error",
        _ => "upstream_error",
    };
    let message = format!("{error} (after {attempts} attempt(s))");
    let e = ApiError::new(status, kind, error.metric_label(), message);
    match error.retry_after() {
        Some(d) => e.with_retry_after(d),
        None => e,
    }
}
