//! The HTTP front doors (OpenAI-compatible API, Anthropic Messages API), health, readiness
//! and metrics.
//!
//! Three routers: the public one ([`router`]: the doors, `/healthz` and `/readyz`), the
//! admin one ([`admin_router`]: `/metrics`, and the probes again), served on a listener of
//! its own (`--admin-listen`) that is never the public one, and the probe one
//! ([`probe_router`]: the probes only, `--probe-listen`). Every admin or debug endpoint
//! belongs to the admin router: the public listener answers 404 for anything not an API path
//! or a probe.
//!
//! Layers, outermost first:
//! 1. catch-panic: a panic becomes a 500 with an OpenAI error body (the Anthropic door's
//!    routes catch their own first and answer in Anthropic's format,
//!    [`messages::guarded`]);
//! 2. set request id: a request without `x-request-id` gets a generated one (in its headers);
//! 3. propagate request id: the response echoes the request's `x-request-id`, unless the
//!    handler set its own (a door that replaced an unusable id);
//! 4. sensitive headers: `Authorization` and the API-key headers are redacted from traces;
//! 5. trace: one span per request.
//!
//! Each door (`chat` and `embeddings` for OpenAI, `messages` for Anthropic) builds the request's [`RequestCtx`](crate::pipeline::RequestCtx)
//! from the headers, reads and parses the body (its size bounded by [`AppState::body_limit`],
//! answered in the door's error format, which a generic body-limit layer could not do), runs
//! the [`pipeline`](crate::pipeline) and renders its typed answer.

mod admin;
pub(crate) mod batches;
mod chat;
pub mod conn;
pub mod door;
mod embeddings;
pub mod error;
pub(crate) mod jobs;
pub mod messages;
mod models;
pub mod waiting;
pub mod workers;

use crate::identity::Identity;
use crate::pipeline::ctx::{REQUEST_ID_HEADER, RequestId};
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
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::sensitive_headers::SetSensitiveRequestHeadersLayer;
use tower_http::trace::TraceLayer;

/// State shared by all handlers.
#[derive(Debug, Clone)]
pub struct AppState {
    /// Whether the gateway accepts traffic (config loaded; false while draining).
    pub ready: Arc<AtomicBool>,
    /// Routes requests to providers; holds the configuration serving now.
    pub dispatcher: Arc<Dispatcher>,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Longest a door waits for the whole request body, from when it starts reading; then it
    /// answers 408.
    pub body_timeout: std::time::Duration,
    /// Whether answers name the key used (`x-floodgate-key`). Off by default: the header
    /// tells any caller the key inventory; turn it on for debugging only.
    pub expose_key: bool,
    /// Stage 1: who calls (client keys of the configured tenants).
    pub identity: Arc<Identity>,
    /// Async jobs (`/v1/jobs`, the dead letters); `None`: not enabled (404).
    pub jobs: Option<Arc<crate::jobs::Jobs>>,
    /// Stages 4, 5 and 8: cached answers and requests in flight.
    pub cache: Arc<crate::cache::Cache>,
    /// What the admin endpoints beyond metrics and probes require (`--admin-token`): the
    /// capacity report. `None`: they answer 403.
    pub admin_token: Option<crate::secret::SecretString>,
}

/// Default largest request body: 4 MiB.
pub const DEFAULT_BODY_LIMIT: usize = 4 << 20;

/// Default longest wait for a whole request body: 30 s (4 MiB at about 1.1 Mbit/s).
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl AppState {
    /// State with the default body limit and timeout, no key header, and no trusted tenant
    /// header.
    /// The cache shares answers through the dispatcher's Redis when its budgets are
    /// shared.
    pub fn new(ready: Arc<AtomicBool>, dispatcher: Arc<Dispatcher>) -> Self {
        let redis = dispatcher.budgets().backend().map(|b| b.options().clone());
        Self {
            cache: Arc::new(crate::cache::Cache::new(redis.as_ref())),
            ready,
            dispatcher,
            body_limit: DEFAULT_BODY_LIMIT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            expose_key: false,
            identity: Arc::new(Identity::new(false)),
            jobs: None,
            admin_token: None,
        }
    }
}

/// Request ids for requests that come without one.
#[derive(Debug, Clone, Copy, Default)]
struct MakeId;

impl tower_http::request_id::MakeRequestId for MakeId {
    fn make_request_id<B>(
        &mut self,
        _: &axum::http::Request<B>,
    ) -> Option<tower_http::request_id::RequestId> {
        let id = RequestId::generate();
        Some(tower_http::request_id::RequestId::new(
            id.header_value().clone(),
        ))
    }
}

/// The gateway's router with its layers.
pub fn router(state: AppState) -> Router {
    let sensitive = [
        header::AUTHORIZATION,
        header::HeaderName::from_static("x-api-key"),
        header::HeaderName::from_static("x-goog-api-key"),
    ];
    let request_id = header::HeaderName::from_static(REQUEST_ID_HEADER);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/v1/models", get(models::list))
        .route("/v1/chat/completions", post(chat::completions))
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/jobs", post(jobs::create))
        .route("/v1/jobs/{id}", get(jobs::get).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(jobs::events))
        .route("/v1/files", post(batches::upload))
        .route("/v1/files/{id}", get(batches::file))
        .route("/v1/files/{id}/content", get(batches::content))
        .route("/v1/batches", post(batches::create))
        .route("/v1/batches/{id}", get(batches::get))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/v1/messages", messages::guarded(post(messages::create)))
        .route(
            "/v1/messages/count_tokens",
            messages::guarded(post(messages::count_tokens)),
        )
        .fallback(not_found)
        .with_state(state)
        .layer(
            ServiceBuilder::new()
                .layer(CatchPanicLayer::custom(|_| {
                    ApiError::internal("internal error").into_response()
                }))
                .layer(SetRequestIdLayer::new(request_id.clone(), MakeId))
                .layer(PropagateRequestIdLayer::new(request_id))
                .layer(SetSensitiveRequestHeadersLayer::new(sensitive))
                .layer(TraceLayer::new_for_http()),
        )
}

/// The admin router: `/metrics`, the capacity report (`/admin/capacity`) and the jobs' dead
/// letters (`/admin/jobs/dead-letters`), both behind the admin token ([`admin::check`]), and
/// the probes, for a listener that only the operator's network reaches (`--admin-listen`).
/// Everything else is 404.
pub fn admin_router(state: AppState) -> Router {
    admin_routes()
        .into_iter()
        .fold(Router::new(), |router, (path, route)| {
            router.route(path, route)
        })
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// The admin listener's own routes (the probes aside): one list, so that a test checks that
/// the public router serves none of them, those added later included.
fn admin_routes() -> Vec<(&'static str, axum::routing::MethodRouter<AppState>)> {
    vec![
        ("/metrics", get(metrics)),
        ("/admin/capacity", get(admin::capacity)),
        (
            "/admin/jobs/dead-letters",
            get(jobs::dead_letters).delete(jobs::purge),
        ),
        ("/admin/jobs/dead-letters/redrive", post(jobs::redrive_all)),
        ("/admin/jobs/dead-letters/{id}", get(jobs::dead_letter)),
        (
            "/admin/jobs/dead-letters/{id}/redrive",
            post(jobs::redrive_one),
        ),
    ]
}

/// The probe router: `/healthz` (liveness) and `/readyz` (readiness) and nothing else, for a
/// listener the kubelet reaches on the pod's IP (`--probe-listen`) when the gateway itself
/// listens on loopback only, as the injected sidecar does. Everything else is a bare 404: the
/// doors, `/metrics` and the admin API are never served there.
pub fn probe_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .fallback(|| async { StatusCode::NOT_FOUND })
        .with_state(state)
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

/// 404 in the format of the door whose path was asked for: Anthropic's below
/// `/v1/messages`, OpenAI's everywhere else.
async fn not_found(uri: axum::http::Uri) -> axum::response::Response {
    let path = uri.path();
    if messages::owns(path) {
        return messages::not_found(path);
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "unknown_url",
        format!("Unknown request URL: {path}"),
    )
    .into_response()
}

#[cfg(test)]
mod tests;
