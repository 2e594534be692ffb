//! The HTTP front doors: OpenAI-compatible API, Anthropic Messages API, health and readiness.
//!
//! Layers, outermost first: catch-panic (a panic becomes a 500 with an OpenAI error body),
//! trace (one span per request), sensitive headers (Authorization and API-key headers are
//! redacted from traces). Handlers read the shared [`Config`](crate::config::Config) from
//! [`AppState`].

mod chat;
pub mod error;
pub mod messages;
mod models;
pub mod workers;

use crate::config::watch::SharedConfig;
use crate::route::Dispatcher;
use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use error::ApiError;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tower::ServiceBuilder;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

/// State shared by all handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// The current configuration.
    pub config: SharedConfig,
    /// Whether the gateway accepts traffic (config loaded; false while draining).
    pub ready: Arc<AtomicBool>,
    /// Routes requests to providers.
    pub dispatcher: Arc<Dispatcher>,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
}

/// Default largest request body: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

impl AppState {
    /// State with the default body limit.
    pub fn new(config: SharedConfig, ready: Arc<AtomicBool>, dispatcher: Arc<Dispatcher>) -> Self {
        Self {
            config,
            ready,
            dispatcher,
            body_limit: DEFAULT_BODY_LIMIT,
        }
    }
}

/// The gateway's router with its layers.
pub fn router(state: AppState) -> Router {
    let sensitive = [
        header::AUTHORIZATION,
        header::HeaderName::from_static("x-api-key"),
        header::HeaderName::from_static("x-goog-api-key"),
    ];
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models", get(models::list))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/messages", post(messages::create))
        .route("/v1/messages/count_tokens", post(messages::count_tokens))
        .route("/metrics", get(metrics))
        .fallback(not_found)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::internal("internal error").into_response()
                }))
                .layer(SetSensitiveRequestHeadersLayer::new(sensitive))
                .layer(TraceLayer::new_for_http()),
        )
}

async fn metrics(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    state.dispatcher.refresh_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::global().encode(),
    )
}

async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(axum::extract::State(state): axum::extract::State<AppState>) -> impl IntoResponse {
    if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Unknown request URL: {}", uri.path()),
    )
}

#[cfg(test)]
mod tests;
