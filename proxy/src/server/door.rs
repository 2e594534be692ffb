//! What every front door shares: the request span, reading the body, the response headers
//! that say what happened, route errors as [`ApiError`]s, and recording a request's outcome
//! when it truly ends — for a stream, when the stream ends, so a stream broken half-way is
//! not counted `ok`.

use super::AppState;
use super::error::ApiError;
use crate::identity::{Refusal, Unidentified};
use crate::metrics::{self, RequestLabels};
use crate::pipeline::{
    self, Door, RequestCtx,
    ctx::{MAX_WAIT_HEADER, REQUEST_ID_HEADER},
};
use crate::providers::{ChatChunk, ProviderError};
use crate::route::RouteError;
use crate::telemetry;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse as _, Response};
use bytes::Bytes;
use futures::Stream;
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

/// Response header: the provider that answered.
pub const PROVIDER: &str = "x-floodgate-provider";
/// Response header: the key used (only when the gateway is told to expose it).
pub const KEY: &str = "x-floodgate-key";
/// Response header: upstream attempts made.
pub const ATTEMPTS: &str = "x-floodgate-attempts";
/// Response header: the caller's tier.
pub const TIER: &str = "x-floodgate-tier";
/// Response header: milliseconds the request waited in the queue for budget.
pub const QUEUE_MS: &str = "x-floodgate-queue-ms";

/// The request span (OpenTelemetry GenAI and HTTP server attributes; see `telemetry` for
/// the cost when off).
pub fn request_span(ctx: &RequestCtx, operation: &'static str) -> Span {
    tracing::info_span!(
        target: telemetry::TARGET,
        "chat",
        otel.kind = "server",
        otel.status_code = Empty,
        gen_ai.operation.name = operation,
        gen_ai.request.model = Empty,
        http.request.method = "POST",
        http.route = ctx.door.route(),
        http.response.status_code = Empty,
        error.type = Empty,
        floodgate.provider = Empty,
        floodgate.attempts = Empty,
        floodgate.request_id = ctx.id.as_str(),
    )
}

/// Runs one request of a door: builds its context from `headers` and identifies its caller
/// (stage 1, before the body is read: a request without a valid client key is answered 401
/// in the door's format here), runs `handle` in the request span with the upstream time
/// counted apart, then records the proxy's own time and sets the decision headers.
/// `handle` parses, runs the pipeline and renders; it gives the context back.
pub async fn serve<F, Fut>(
    state: &AppState,
    door: Door,
    operation: &'static str,
    headers: &HeaderMap,
    handle: F,
) -> Response
where
    F: FnOnce(RequestCtx, Span) -> Fut,
    Fut: Future<Output = (Response, RequestCtx)>,
{
    let started = std::time::Instant::now();
    let mut ctx = RequestCtx::new(door, headers, state.dispatcher.max_wait());
    let span = request_span(&ctx, operation);
    let request_span = span.clone();
    metrics::UPSTREAM_TIME
        .scope(Cell::new(Duration::ZERO), async move {
            let auth_started = std::time::Instant::now();
            let config = state.dispatcher.config();
            let identified = state
                .identity
                .identify(&config, state.dispatcher.budgets(), headers);
            drop(config);
            metrics::stages()
                .auth
                .observe(auth_started.elapsed().as_secs_f64());
            let (mut response, ctx) = match identified {
                Ok(caller) if ctx.max_wait_invalid => {
                    ctx.caller = caller;
                    let error = ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_request_error",
                        "invalid_header",
                        format!(
                            "the header {MAX_WAIT_HEADER} must be a whole number of milliseconds"
                        ),
                    );
                    Outcome::new(request_span, &ctx, None)
                        .with_status(error.status)
                        .record(error.code);
                    (render(door, &error), ctx)
                }
                Ok(caller) => {
                    ctx.caller = caller;
                    ctx.cache.cache = Some(state.cache.clone());
                    // Dropped armed if the caller hangs up before its response is ready
                    // (the server then drops this future): counted `client_closed`.
                    let tier = ctx
                        .caller
                        .as_ref()
                        .and_then(|c| c.tier().cloned())
                        .unwrap_or_else(|| ctx.tier.clone());
                    let hung_up = HangUp {
                        armed: Some((request_span.clone(), tier)),
                    };
                    let done = handle(ctx, request_span).await;
                    hung_up.disarm();
                    done
                }
                Err(e) => {
                    let error = unauthenticated(e);
                    Outcome::new(request_span, &ctx, None)
                        .with_status(error.status)
                        .record(error.code);
                    (render(door, &error), ctx)
                }
            };
            let upstream = metrics::UPSTREAM_TIME
                .try_with(Cell::get)
                .unwrap_or_default();
            metrics::stages()
                .total_overhead
                .observe(started.elapsed().saturating_sub(upstream).as_secs_f64());
            decision_headers(response.headers_mut(), &ctx, state.expose_key);
            response
        })
        .instrument(span)
        .await
}

/// Records [`CLIENT_CLOSED`] for a request dropped before its response was ready, on its
/// span and with its tier (the model is not known yet: `unknown`).
struct HangUp {
    armed: Option<(Span, std::sync::Arc<str>)>,
}

impl HangUp {
    fn disarm(mut self) {
        self.armed = None;
    }
}

impl Drop for HangUp {
    fn drop(&mut self) {
        if let Some((span, tier)) = self.armed.take() {
            Outcome {
                span,
                tier,
                model: None,
                provider: None,
                attempts: None,
                ok: None,
                // As nginx logs a client that closed the connection first.
                status: StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            }
            .record(CLIENT_CLOSED);
        }
    }
}

/// A caller that is not identified: 401 `invalid_api_key`, saying why without echoing what
/// it sent.
pub fn unauthenticated(e: Unidentified) -> ApiError {
    ApiError::new(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        "invalid_api_key",
        e.to_string(),
    )
}

/// `error` in the format of `door`.
pub fn render(door: Door, error: &ApiError) -> Response {
    match door {
        Door::AnthropicMessages => super::messages::error::error_response(error),
        Door::OpenAiChat | Door::OpenAiEmbeddings => error.clone().into_response(),
    }
}

/// Reads the whole body, up to `limit` bytes, within `timeout` (a client that sends it too
/// slowly is answered 408 and its connection closed).
pub async fn read_body(body: Body, limit: usize, timeout: Duration) -> Result<Bytes, ApiError> {
    match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(_)) => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "request_too_large",
            format!("the request body is larger than the gateway's limit of {limit} bytes"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "invalid_request_error",
            "request_timeout",
            format!(
                "the request body did not arrive within the gateway's limit of {} ms",
                timeout.as_millis()
            ),
        )),
    }
}

/// Sets the headers that tell the caller what happened: request id, provider, attempts,
/// and the key's name if `expose_key`.
pub fn decision_headers(headers: &mut HeaderMap, ctx: &RequestCtx, expose_key: bool) {
    headers.insert(
        HeaderName::from_static(REQUEST_ID_HEADER),
        ctx.id.header_value().clone(),
    );
    if let Ok(v) = HeaderValue::from_str(&ctx.tier) {
        headers.insert(HeaderName::from_static(TIER), v);
    }
    if let Some(outcome) = ctx.cache.outcome {
        headers.insert(
            HeaderName::from_static(crate::cache::CACHE_HEADER),
            HeaderValue::from_static(outcome.as_str()),
        );
    }
    if let Some(similarity) = ctx.cache.similarity
        && let Ok(v) = HeaderValue::from_str(&format!("{similarity:.3}"))
    {
        headers.insert(HeaderName::from_static(crate::cache::SIMILARITY_HEADER), v);
    }
    if let Some(queued) = ctx.queued {
        headers.insert(
            HeaderName::from_static(QUEUE_MS),
            HeaderValue::from(queued.as_millis() as u64),
        );
    }
    crate::routing::headers(headers, ctx);
    let Some(route) = &ctx.route else { return };
    if let Ok(v) = HeaderValue::from_str(&route.provider) {
        headers.insert(HeaderName::from_static(PROVIDER), v);
    }
    if expose_key && let Ok(v) = HeaderValue::from_str(&route.key) {
        headers.insert(HeaderName::from_static(KEY), v);
    }
    headers.insert(
        HeaderName::from_static(ATTEMPTS),
        HeaderValue::from(route.attempts),
    );
}

/// A pipeline error as the OpenAI-shaped [`ApiError`] every door starts from.
pub fn stage_error(e: pipeline::Error) -> ApiError {
    match e {
        pipeline::Error::Route(e) => route_error(e),
        pipeline::Error::Refused(e) => refusal(&e),
        pipeline::Error::OverBudget(e) => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "budget_exceeded",
            e.to_string(),
        )
        .with_retry_after(e.retry_after),
    }
}

/// A tenant's refusal: 403 for a model it may not use (as OpenAI answers a project without
/// access to a model), 429 with `retry-after` past its limits.
pub fn refusal(e: &Refusal) -> ApiError {
    let error = match e {
        Refusal::ModelNotAllowed(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            e.metric_label(),
            e.to_string(),
        ),
        Refusal::RateLimited { .. } | Refusal::Concurrency { .. } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            e.metric_label(),
            e.to_string(),
        ),
    };
    match e.retry_after() {
        Some(after) => error.with_retry_after(after),
        None => error,
    }
}

/// A route error as the OpenAI-shaped [`ApiError`] every door starts from.
pub fn route_error(e: RouteError) -> ApiError {
    let message = e.to_string();
    let code = e.metric_label();
    match e {
        RouteError::UnknownModel(_) => ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            code,
            message,
        ),
        RouteError::Saturated { retry_after } => ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            code,
            message,
        )
        .with_retry_after(retry_after),
        RouteError::Unavailable { retry_after } => {
            let e = ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream_error",
                code,
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
    let message = match error {
        // The upstream's text about the gateway's own key (some providers quote its tail) is
        // the operator's business, not the caller's: it is logged, not relayed.
        ProviderError::Unauthorized { status, .. } => format!(
            "the provider refused the gateway's API key (status {status}); \
             the operator has been told (after {attempts} attempt(s))"
        ),
        _ => format!("{error} (after {attempts} attempt(s))"),
    };
    let e = ApiError::new(status, kind, error.metric_label(), message);
    match error.retry_after() {
        Some(d) => e.with_retry_after(d),
        // A provider failing without saying when: the end of the degradation chain still
        // tells the caller when to come back.
        None if status.is_server_error() => {
            e.with_retry_after(crate::routing::UNAVAILABLE_RETRY_AFTER)
        }
        None => e,
    }
}

/// A request's outcome, recorded once: on the request counter and on its span.
#[derive(Debug)]
pub struct Outcome {
    span: Span,
    tier: std::sync::Arc<str>,
    model: Option<String>,
    provider: Option<std::sync::Arc<str>>,
    attempts: Option<u32>,
    ok: Option<prometheus_client::metrics::counter::Counter>,
    status: StatusCode,
}

impl Outcome {
    /// The outcome of the request of `ctx` asking for `model`, traced on `span`.
    pub fn new(span: Span, ctx: &RequestCtx, model: Option<String>) -> Self {
        Self {
            span,
            tier: ctx.tier.clone(),
            model,
            provider: ctx.route.as_ref().map(|r| r.provider.clone()),
            attempts: ctx.route.as_ref().map(|r| r.attempts),
            ok: ctx.route.as_ref().map(|r| r.ok.clone()),
            status: StatusCode::OK,
        }
    }

    /// With the status of the response the caller got.
    #[must_use]
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// Records `outcome` (`ok`, or an error's metric label).
    pub fn record(self, outcome: &'static str) {
        if !self.span.is_disabled() {
            self.trace(outcome);
        }
        if outcome == "ok"
            && let Some(ok) = &self.ok
        {
            // Resolved when the configuration was applied: no labels built per request.
            ok.inc();
            return;
        }
        let provider = self.provider.as_deref().unwrap_or("none");
        let labels = RequestLabels {
            tier: self.tier.to_string(),
            provider: provider.to_owned(),
            model: match self.model {
                Some(m) if outcome != "model_not_found" => m,
                _ => "unknown".to_owned(),
            },
            outcome: outcome.to_owned(),
        };
        metrics::global().requests.get_or_create(&labels).inc();
    }

    fn trace(&self, outcome: &'static str) {
        let span = &self.span;
        span.record("http.response.status_code", i64::from(self.status.as_u16()));
        if self.status.is_server_error() || (outcome != "ok" && self.status.is_success()) {
            span.record("otel.status_code", "ERROR");
        }
        if outcome != "ok" {
            span.record("error.type", outcome);
        }
        if let Some(model) = &self.model {
            span.record("gen_ai.request.model", model.as_str());
        }
        if let Some(provider) = &self.provider {
            span.record("floodgate.provider", &**provider);
        }
        if let Some(attempts) = self.attempts {
            span.record("floodgate.attempts", i64::from(attempts));
        }
    }
}

/// The outcome label of a stream the caller stopped reading before its end.
pub const CLIENT_CLOSED: &str = "client_closed";

/// A typed stream that records its request's [`Outcome`] when it ends: `ok` after a clean
/// end, the error's label after an error item, [`CLIENT_CLOSED`] if dropped before its end.
pub struct Tracked<S> {
    inner: S,
    outcome: Option<Outcome>,
}

impl<S> Tracked<S> {
    /// Tracks `inner`.
    pub fn new(inner: S, outcome: Outcome) -> Self {
        Self {
            inner,
            outcome: Some(outcome),
        }
    }
}

impl<S> std::fmt::Debug for Tracked<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracked").finish_non_exhaustive()
    }
}

impl<S> Stream for Tracked<S>
where
    S: Stream<Item = Result<ChatChunk, ProviderError>> + Unpin,
{
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = Pin::new(&mut self.inner).poll_next(cx);
        match &item {
            Poll::Ready(None) => {
                if let Some(o) = self.outcome.take() {
                    o.record("ok");
                }
            }
            Poll::Ready(Some(Err(e))) => {
                if let Some(o) = self.outcome.take() {
                    o.record(e.metric_label());
                }
            }
            _ => {}
        }
        item
    }
}

impl<S> Drop for Tracked<S> {
    fn drop(&mut self) {
        if let Some(o) = self.outcome.take() {
            o.record(CLIENT_CLOSED);
        }
    }
}

/// A typed stream that may end cleanly only after a choice finished: an upstream stream that
/// ends without any `finish_reason` ends here with [`ProviderError::Truncated`] instead, so
/// that the door renders an error and [`Tracked`] counts it as one. For doors whose format
/// has no way to end without a reason (Anthropic's `message_delta` carries `stop_reason`).
#[derive(Debug)]
pub struct RequireFinish<S> {
    inner: S,
    finished: bool,
    done: bool,
}

impl<S> RequireFinish<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            finished: false,
            done: false,
        }
    }
}

impl<S> Stream for RequireFinish<S>
where
    S: Stream<Item = Result<ChatChunk, ProviderError>> + Unpin,
{
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = match Pin::new(&mut self.inner).poll_next(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(item) => item,
        };
        match &item {
            Some(Ok(chunk)) => {
                if chunk.choices.iter().any(|c| c.finish_reason.is_some()) {
                    self.finished = true;
                }
            }
            Some(Err(_)) => self.done = true,
            None => {
                self.done = true;
                if !self.finished {
                    return Poll::Ready(Some(Err(ProviderError::Truncated)));
                }
            }
        }
        Poll::Ready(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt as _;

    fn chunk(finish: Option<&str>) -> Result<ChatChunk, ProviderError> {
        Ok(serde_json::from_value(serde_json::json!({
            "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": finish}]
        }))
        .unwrap())
    }

    #[tokio::test]
    async fn a_stream_without_a_finish_reason_ends_in_an_error() {
        let cut = futures::stream::iter(vec![chunk(None), chunk(None)]);
        let items: Vec<_> = RequireFinish::new(cut).collect().await;
        assert_eq!(items.len(), 3);
        assert!(matches!(items[2], Err(ProviderError::Truncated)));
        let whole = futures::stream::iter(vec![chunk(None), chunk(Some("stop"))]);
        let items: Vec<_> = RequireFinish::new(whole).collect().await;
        assert_eq!(items.len(), 2);
        assert!(items.iter().all(Result::is_ok));
    }
}
