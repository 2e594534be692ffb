//! One upstream call: build the provider's request, send it, and turn the answer into a
//! chat.completion, a stream of chunks ([`call`]) or an embeddings list ([`embed`]). The
//! outcome updates the key (cool-down after a 429, out after a 401/403, learned budget headers)
//! and the provider's breaker, whatever the operation.
//!
//! A stream is committed to the caller only once the first chunk has been decoded, so an
//! upstream that fails before that can still fall over to the next target. After that a stall
//! longer than the pool's `streamIdleSeconds`, or a broken upstream, ends the stream with an
//! explicit error event — never a silently truncated 200.

use super::ReplyBody;
use super::runtime::{KeyRt, ProviderRt, Target};
use crate::budget::{KeyBudget, Permit};
use crate::metrics::{self, TargetMetrics, UpstreamLabels};
use crate::providers::types::ChatRequest;
use crate::providers::{
    ChatChunk, ClosedWhen, EmbeddingsRequest, EmbeddingsResponse, ProviderError, StreamDecoder,
    Usage, estimate_output_tokens, estimate_prompt_tokens,
};
use crate::telemetry;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body_util::{BodyDataStream, BodyExt as _, Full};
use hyper::body::Incoming;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::{Instrument as _, Span};

mod connect;

use connect::connect_error;
pub(super) use connect::{Http, client};

type ByteStream = Pin<Box<dyn Stream<Item = Result<Bytes, hyper::Error>> + Send>>;

/// The upstream client of the calling thread for a connect timeout of `connect_ms`.
///
/// One per thread: a pooled connection is driven by a task on the runtime that opened it,
/// so a client shared by the gateway's single-threaded workers would hand each request to
/// another thread and back. One per distinct connect timeout (pools rarely differ). Built
/// on first use; it cannot fail then, since it was built the same way when the dispatcher
/// started (`Dispatcher::with_options`): if it did, the call fails as a connection error.
pub(super) fn thread_client(connect_ms: u32) -> Result<Http, ProviderError> {
    thread_local! {
        static CLIENTS: std::cell::RefCell<Vec<(u32, Http)>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    CLIENTS.with(|clients| {
        let mut clients = clients.borrow_mut();
        if let Some((_, c)) = clients.iter().find(|(ms, _)| *ms == connect_ms) {
            return Ok(c.clone());
        }
        let c = client(Duration::from_millis(u64::from(connect_ms)))
            .map_err(|e| ProviderError::Tls(format!("the TLS client could not be built: {e}")))?;
        clients.push((connect_ms, c.clone()));
        Ok(c)
    })
}

/// Calls `target` at `provider` with `key` for a chat and records the outcome on the key,
/// the breaker and the target's metrics.
#[expect(
    clippy::too_many_arguments,
    reason = "one attempt's inputs, from `Dispatcher::chat_on` alone"
)]
pub(super) async fn call(
    http: &Http,
    provider: &ProviderRt,
    key: &KeyRt,
    target: &Target,
    req: &ChatRequest,
    body: Bytes,
    permit: Permit,
    report: Option<&super::UsageReport>,
    answer_by: Option<Instant>,
) -> Result<ReplyBody, ProviderError> {
    let started = Instant::now();
    let send = send(
        http, provider, key, target, req, body, permit, report, answer_by,
    );
    let result = observed(provider, key, target, "chat", send).await;
    if req.stream && result.is_ok() {
        target.metrics.ttft.observe(started.elapsed().as_secs_f64());
    }
    result
}

/// Calls `target` at `provider` with `key` for embeddings and records the outcome as for
/// chat.
pub(super) async fn embed(
    http: &Http,
    provider: &ProviderRt,
    key: &KeyRt,
    target: &Target,
    req: &EmbeddingsRequest,
    permit: Permit,
) -> Result<EmbeddingsResponse, ProviderError> {
    let send = send_embeddings(http, provider, key, target, req, permit);
    observed(provider, key, target, "embeddings", send).await
}

/// Runs one attempt's `send` in its span, then records the outcome: upstream time and
/// metrics, and on the key (cool-down, failure) and the provider's breaker.
async fn observed<T>(
    provider: &ProviderRt,
    key: &KeyRt,
    target: &Target,
    operation: &'static str,
    send: impl Future<Output = Result<T, ProviderError>>,
) -> Result<T, ProviderError> {
    let started = Instant::now();
    let span = attempt_span(provider, key, &target.upstream_model, operation);
    let result = send.instrument(span.clone()).await;
    if let Err(e) = &result {
        record_error(&span, e);
    }
    let now = Instant::now();
    let elapsed = now - started;
    metrics::add_upstream_time(elapsed);
    match &result {
        Ok(_) => target.metrics.upstream_ok.observe(elapsed.as_secs_f64()),
        Err(e) => {
            metrics::global()
                .upstream_seconds
                .get_or_create(&UpstreamLabels {
                    provider: provider.name.to_string(),
                    outcome: e.metric_label().to_owned(),
                })
                .observe(elapsed.as_secs_f64());
        }
    }
    outcome(provider, key, result.as_ref().map(|_| ()), now);
    result
}

/// What an attempt's result says about the key and the provider.
fn outcome(provider: &ProviderRt, key: &KeyRt, result: Result<(), &ProviderError>, now: Instant) {
    match result {
        Ok(_) => {
            if provider.breaker.success() {
                tracing::info!(provider = %provider.name, "circuit closed: the provider answered its probe");
            }
        }
        Err(e) => {
            if let Some(rest) = e.cools_key() {
                key.budget.cool_until(now + rest);
            }
            if e.fails_key() {
                tracing::error!(provider = %provider.name, key = %key.name, reason = %e, "the provider refused this key; it is out until the configuration changes");
                match e {
                    ProviderError::Unauthorized { status: 401, .. } => {
                        key.budget.fail_unauthenticated();
                    }
                    _ => key.budget.fail(),
                }
            }
            if e.opens_circuit() {
                if provider.breaker.failure(now) {
                    tracing::warn!(
                        provider = %provider.name,
                        reason = e.metric_label(),
                        "circuit opened: the provider failed too many calls in a row; its keys are not used until a probe succeeds"
                    );
                }
            } else {
                provider.breaker.neutral();
            }
        }
    }
}

/// The span of one upstream attempt (OpenTelemetry GenAI client span); see `telemetry`.
///
/// Field values are evaluated only when the span is enabled; setting them here rather than
/// recording them later saves a dispatch each.
fn attempt_span(
    provider: &ProviderRt,
    key: &KeyRt,
    upstream_model: &str,
    operation: &'static str,
) -> Span {
    tracing::info_span!(
        target: telemetry::TARGET,
        "upstream",
        // GenAI span name `{operation} {model}`.
        otel.name = %format_args!("{operation} {upstream_model}"),
        otel.kind = "client",
        otel.status_code = Empty,
        gen_ai.operation.name = operation,
        gen_ai.provider.name = provider.provider_type,
        gen_ai.request.model = upstream_model,
        server.address = telemetry::host_of(&provider.base_url),
        floodgate.provider = &*provider.name,
        floodgate.key = &*key.name,
        error.type = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
    )
}

fn record_error(span: &Span, error: &ProviderError) {
    span.record("error.type", error.metric_label());
    span.record("otel.status_code", "ERROR");
}

#[expect(
    clippy::too_many_arguments,
    reason = "one attempt's inputs; `call` is the one caller"
)]
async fn send(
    http: &Http,
    provider: &ProviderRt,
    key: &KeyRt,
    target: &Target,
    req: &ChatRequest,
    body: Bytes,
    mut permit: Permit,
    report: Option<&super::UsageReport>,
    answer_by: Option<Instant>,
) -> Result<ReplyBody, ProviderError> {
    let adapter = provider.adapter;
    let url = target
        .url(req.stream)
        .as_ref()
        .map_err(|e| ProviderError::Connect(format!("the provider's URL is not valid: {e}")))?;
    let headers = key.headers.as_ref().map_err(Clone::clone)?;
    let started = Instant::now();
    // One timer for the whole exchange: response headers, and a whole answer's body. A
    // stream's length is unbounded (its idle time is bounded instead).
    let deadline = started + Duration::from_secs(u64::from(provider.timeouts.request_seconds));
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(expired);
    let mut request = http::Request::new(Full::new(body));
    *request.method_mut() = http::Method::POST;
    *request.uri_mut() = url.clone();
    *request.headers_mut() = headers.clone();
    adapter.add_request_headers(req, request.headers_mut())?;
    // A step of a routing chain that is not the last: the answer must begin by the step's
    // deadline (the response headers here, a stream's first chunk below).
    let cut = answer_by.filter(|at| *at < deadline);
    let exchanged = exchange(http, provider, key, request, &mut permit, expired.as_mut());
    let Some(response) = until_cut(cut, exchanged).await else {
        permit.answered();
        return Err(ProviderError::StepDeadline);
    };
    let response = response?;
    if !req.stream {
        let body = read_whole(response.into_body(), expired.as_mut()).await?;
        let parsed = adapter.parse_response(&body, &req.model)?;
        let usage = parsed.usage.unwrap_or_default();
        permit.settle(u64::from(usage.total_tokens));
        UsageRecord::new(target, started).record(usage);
        return Ok(ReplyBody::Complete(parsed));
    }
    let idle = Duration::from_secs(u64::from(provider.timeouts.stream_idle_seconds));
    let decoder = adapter.stream_decoder(&req.model, req.include_usage());
    let mut pump = Pump {
        upstream: Box::pin(BodyDataStream::new(response.into_body())),
        decoder,
        pending: VecDeque::new(),
        permit: Some(permit),
        prompt_estimate: u64::from(estimate_prompt_tokens(req)),
        output_estimate: 0,
        key: key.budget.clone(),
        idle,
        state: PumpState::Streaming,
        usage: UsageRecord::new(target, started),
        report: report.cloned(),
    };
    // Before anything reaches the caller, a failure is still an ordinary (retryable) error.
    let primed = until_cut(cut, pump.prime())
        .await
        .unwrap_or(Err(ProviderError::StepDeadline));
    if let Err(error) = primed {
        // An upstream error, not a caller who left: the whole estimate stands (the permit's
        // own drop), as after an error later in the stream.
        pump.state = PumpState::Done;
        return Err(error);
    }
    Ok(ReplyBody::Stream(Box::pin(pump.into_chunks())))
}

/// Runs `work` until `cut`, if there is one: `None` when the cut came first. Work done at
/// the very instant of the cut is kept.
async fn until_cut<T>(cut: Option<Instant>, work: impl Future<Output = T>) -> Option<T> {
    match cut {
        Some(cut) => tokio::time::timeout_at(cut, work).await.ok(),
        None => Some(work.await),
    }
}

/// Sends `request` and waits for the response headers (until `expired`), marks the permit
/// answered, learns the provider's budget headers, and classifies a non-2xx answer (its
/// body read until `expired` too).
async fn exchange(
    http: &Http,
    provider: &ProviderRt,
    key: &KeyRt,
    request: http::Request<Full<Bytes>>,
    permit: &mut Permit,
    mut expired: Pin<&mut tokio::time::Sleep>,
) -> Result<http::Response<Incoming>, ProviderError> {
    let sent = tokio::select! {
        sent = http.request(request) => sent,
        () = expired.as_mut() => {
            permit.answered();
            return Err(ProviderError::Timeout);
        }
    };
    permit.answered();
    let response = sent.map_err(|e| send_error(&e))?;
    let status = response.status();
    let info = provider
        .adapter
        .rate_limit_info(response.headers(), SystemTime::now());
    key.budget.learn(&info, Instant::now());
    if !status.is_success() {
        let (parts, body) = response.into_parts();
        let body = read_whole(body, expired).await.unwrap_or_default();
        return Err(provider
            .adapter
            .classify(status.as_u16(), &parts.headers, &body));
    }
    Ok(response)
}

/// A whole answer's body, read until `expired`.
async fn read_whole(
    body: Incoming,
    expired: Pin<&mut tokio::time::Sleep>,
) -> Result<Bytes, ProviderError> {
    tokio::select! {
        body = body.collect() => body
            .map(http_body_util::Collected::to_bytes)
            .map_err(|e| transport_error(&e, ClosedWhen::MidResponse)),
        () = expired => Err(ProviderError::Timeout),
    }
}

async fn send_embeddings(
    http: &Http,
    provider: &ProviderRt,
    key: &KeyRt,
    target: &Target,
    req: &EmbeddingsRequest,
    mut permit: Permit,
) -> Result<EmbeddingsResponse, ProviderError> {
    let secret = key.secret.as_ref().map(|s| s.expose());
    let up = provider.adapter.build_embeddings_request(
        &provider.base_url,
        secret,
        &target.upstream_model,
        req,
    )?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(u64::from(provider.timeouts.request_seconds));
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(expired);
    let uri = reqwest::Url::parse(&up.url)
        .ok()
        .and_then(|url| url.as_str().parse::<http::Uri>().ok())
        .ok_or_else(|| ProviderError::Connect("the provider's URL is not valid".to_owned()))?;
    let mut request = http::Request::new(Full::new(up.body));
    *request.method_mut() = up.method;
    *request.uri_mut() = uri;
    *request.headers_mut() = up.headers;
    let response = exchange(http, provider, key, request, &mut permit, expired.as_mut()).await?;
    let body = read_whole(response.into_body(), expired.as_mut()).await?;
    let parsed = provider
        .adapter
        .parse_embeddings_response(&body, &req.model, req)?;
    let tokens = parsed.usage.total_tokens;
    permit.settle(u64::from(tokens));
    UsageRecord::new(target, started).record(Usage::new(tokens, 0));
    Ok(parsed)
}

/// A failure of the client to get a response: opening the connection (TCP, TLS), or the
/// exchange on it.
fn send_error(e: &hyper_util::client::legacy::Error) -> ProviderError {
    if e.is_connect() {
        return connect_error(e);
    }
    transport_error(e, ClosedWhen::BeforeResponse)
}

/// A transport failure, classified by what failed: something that is not HTTP, a body that
/// does not decode, or a connection the upstream closed `when`.
fn transport_error(e: &(dyn std::error::Error + 'static), when: ClosedWhen) -> ProviderError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(h) = err.downcast_ref::<hyper::Error>() {
            if h.is_parse() || h.is_parse_status() || h.is_parse_too_large() {
                return ProviderError::Malformed(format!("not an HTTP response: {h}"));
            }
            if h.is_incomplete_message() || h.is_closed() || h.is_canceled() {
                return ProviderError::Closed(when);
            }
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
        {
            return ProviderError::Malformed(format!("the body could not be decoded: {io}"));
        }
        source = err.source();
    }
    ProviderError::Closed(when)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PumpState {
    Streaming,
    Finished,
    Done,
}

/// Pulls upstream bytes through the decoder and hands out chunks.
struct Pump {
    upstream: ByteStream,
    decoder: StreamDecoder,
    pending: VecDeque<ChatChunk>,
    permit: Option<Permit>,
    /// The gateway's estimate of the prompt, and of the output decoded so far: what the
    /// request used if the caller leaves before the provider said.
    prompt_estimate: u64,
    output_estimate: u64,
    key: Arc<KeyBudget>,
    idle: Duration,
    state: PumpState,
    usage: UsageRecord,
    /// Where the usage settled is reported for the stages after this one.
    report: Option<super::UsageReport>,
}

impl Drop for Pump {
    fn drop(&mut self) {
        // Dropped while streaming: the caller left. After an upstream error the permit's own
        // drop keeps the whole estimate (the safe side: the provider's count is unknown).
        if self.state == PumpState::Streaming {
            self.abandoned();
        }
    }
}

/// What is needed to record a request's usage once it is known.
struct UsageRecord {
    metrics: Arc<TargetMetrics>,
    started: Instant,
    /// The attempt's span (created in `send`'s caller), kept so a stream's usage and end are
    /// recorded on it.
    span: Span,
}

impl UsageRecord {
    fn new(target: &Target, started: Instant) -> Self {
        Self {
            metrics: target.metrics.clone(),
            started,
            span: Span::current(),
        }
    }

    fn record(&self, usage: Usage) {
        if !self.span.is_disabled() {
            // Entered so that the exported span of a stream ends now, with its last chunk.
            let _entered = self.span.enter();
            // All zero: the provider reported no usage.
            if usage.total_tokens > 0 {
                // As i64: the OpenTelemetry layer exports u64 fields as strings.
                let (input, output) = (usage.prompt_tokens, usage.completion_tokens);
                self.span
                    .record("gen_ai.usage.input_tokens", i64::from(input));
                self.span
                    .record("gen_ai.usage.output_tokens", i64::from(output));
            }
        }
        self.metrics.record_usage(
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
        );
        self.metrics
            .operation
            .observe(self.started.elapsed().as_secs_f64());
    }
}

impl Pump {
    /// Reads until the first chunk is decoded, or fails.
    async fn prime(&mut self) -> Result<(), ProviderError> {
        while self.pending.is_empty() {
            if !self.fill().await? {
                return Err(ProviderError::Truncated);
            }
        }
        Ok(())
    }

    /// Reads one upstream piece; `Ok(false)` once the stream is over.
    async fn fill(&mut self) -> Result<bool, ProviderError> {
        if self.state != PumpState::Streaming {
            return Ok(false);
        }
        match tokio::time::timeout(self.idle, self.upstream.next()).await {
            Err(_) => Err(ProviderError::Stalled { idle: self.idle }),
            Ok(Some(Ok(bytes))) => {
                let mut output = 0;
                self.pending.extend(
                    self.decoder
                        .feed(&bytes)?
                        .into_iter()
                        .inspect(|chunk| output += estimate_output_tokens(chunk)),
                );
                self.output_estimate += output;
                Ok(true)
            }
            Ok(Some(Err(e))) => Err(transport_error(&e, ClosedWhen::MidResponse)),
            Ok(None) => {
                self.pending.extend(self.decoder.finish()?);
                self.state = PumpState::Finished;
                self.settle();
                Ok(true)
            }
        }
    }

    fn settle(&mut self) {
        if let Some(permit) = self.permit.take() {
            let reported = self.decoder.usage();
            let usage = reported.unwrap_or_default();
            permit.settle(u64::from(usage.total_tokens));
            self.usage.record(usage);
            if let (Some(report), Some(usage)) = (&self.report, reported) {
                report.set(usage);
            }
        }
    }

    /// The caller went away mid-stream (the pump is dropped with the upstream response, which
    /// closes the upstream connection and so cancels the request): the reservation is
    /// settled at what was used, the provider's counts where it gave them, else the
    /// gateway's estimates of the prompt and of the output received. The request's slot
    /// stays counted for its window, as the provider counts it.
    fn abandoned(&mut self) {
        let Some(permit) = self.permit.take() else {
            return;
        };
        let reported = self.decoder.usage().unwrap_or_default();
        let prompt = match reported.prompt_tokens {
            0 => self.prompt_estimate,
            n => u64::from(n),
        };
        let output = u64::from(reported.completion_tokens).max(self.output_estimate);
        permit.settle(prompt + output);
        if let Some(report) = &self.report {
            report.set(crate::providers::types::Usage {
                prompt_tokens: u32::try_from(prompt).unwrap_or(u32::MAX),
                completion_tokens: u32::try_from(output).unwrap_or(u32::MAX),
                total_tokens: u32::try_from(prompt + output).unwrap_or(u32::MAX),
            });
        }
        self.usage.span.in_scope(|| {
            tracing::debug!(
                tokens = prompt + output,
                "the caller left mid-stream: upstream request cancelled, budget settled"
            );
        });
    }

    /// The typed stream: chunks in order, ending after the provider's terminal event, or
    /// with one `Err` if the upstream broke (then nothing follows).
    fn into_chunks(self) -> impl Stream<Item = Result<ChatChunk, ProviderError>> + Send {
        futures::stream::unfold(self, |mut pump| async move {
            loop {
                if let Some(chunk) = pump.pending.pop_front() {
                    return Some((Ok(chunk), pump));
                }
                if pump.state != PumpState::Streaming {
                    return None;
                }
                if let Err(error) = pump.fill().await {
                    // In the attempt's span: the warning joins it, and it ends now.
                    pump.usage.span.in_scope(|| {
                        record_error(&pump.usage.span, &error);
                        tracing::warn!(
                            reason = error.metric_label(),
                            "upstream stream broke after the first byte"
                        );
                    });
                    if error.cools_key().is_some() || error.fails_key() {
                        pump.key.cool_until(Instant::now() + Duration::from_secs(1));
                    }
                    pump.state = PumpState::Done;
                    return Some((Err(error), pump));
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::until_cut;
    use std::time::Duration;
    use tokio::time::Instant;

    /// A chain step's cut: work still pending at the cut is given up at that very instant;
    /// work done by it is kept; without a cut nothing is given up.
    #[tokio::test(start_paused = true)]
    async fn a_steps_cut_ends_the_wait_for_an_answer_exactly_at_its_deadline() {
        let t0 = Instant::now();
        let cut = t0 + Duration::from_millis(500);
        let never = until_cut(Some(cut), std::future::pending::<()>()).await;
        assert_eq!(never, None);
        assert_eq!(t0.elapsed(), Duration::from_millis(500));

        let t1 = Instant::now();
        let cut = t1 + Duration::from_millis(500);
        let on_time = until_cut(Some(cut), async {
            tokio::time::sleep_until(cut).await;
            7
        });
        assert_eq!(
            on_time.await,
            Some(7),
            "an answer at the cut itself is kept"
        );

        let t2 = Instant::now();
        let late = until_cut(None, async {
            tokio::time::sleep(Duration::from_secs(120)).await;
            8
        });
        assert_eq!(late.await, Some(8));
        assert_eq!(t2.elapsed(), Duration::from_secs(120));
    }
}
