//! Prometheus metrics at `/metrics`.
//!
//! Names follow `floodgate_<subsystem>_<thing>_{total,seconds}` and, for model usage, the
//! OpenTelemetry GenAI semantic conventions (`gen_ai_client_token_usage`,
//! `gen_ai_client_operation_duration_seconds`, `gen_ai_server_time_to_first_token_seconds`
//! with `gen_ai_*` attributes as labels). Labels are low-cardinality: pool, provider and key
//! *names* from the configuration, the requested model as configured, outcome classes, never a
//! user, a prompt or a secret. One registry per process ([`global`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// Labels of a finished request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Customer tier (`default` without a TierQueue).
    pub tier: String,
    /// Provider that answered, or `none`.
    pub provider: String,
    /// Model or alias as requested (configured names only; `unknown` otherwise).
    pub model: String,
    /// `ok` or an error class (`rate_limited`, `server_error`, `model_not_found`, ...).
    pub outcome: String,
}

/// Labels of an upstream call.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Provider name.
    pub provider: String,
    /// `ok` or the error class.
    pub outcome: String,
}

/// OpenTelemetry GenAI labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GenAiLabels {
    /// `gen_ai.provider.name`: the provider type (`openai`, `anthropic`, ...).
    pub gen_ai_provider_name: String,
    /// `gen_ai.request.model`: the upstream model id.
    pub gen_ai_request_model: String,
}

/// OpenTelemetry GenAI token labels.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    /// `gen_ai.provider.name`.
    pub gen_ai_provider_name: String,
    /// `gen_ai.request.model`.
    pub gen_ai_request_model: String,
    /// `gen_ai.token.type`: `input` or `output`.
    pub gen_ai_token_type: String,
}

/// Labels of a key.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// Pool name.
    pub pool: String,
    /// Provider name.
    pub provider: String,
    /// Key display name.
    pub key: String,
}

/// Labels of a provider.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProviderLabels {
    /// Pool name.
    pub pool: String,
    /// Provider name.
    pub provider: String,
}

/// Labels of a proxy stage.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// `parse` (reading and decoding the body), `limiter` (choosing a key and taking its
    /// budget, once per attempt; a Redis round trip with shared budgets), `queue` (each wait
    /// for budget) or `total_overhead` (the request's whole time less its upstream calls).
    pub stage: &'static str,
}

/// Labels of a listener's connections.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    /// `public` (`--listen`: the API) or `admin` (`--admin-listen`: metrics and probes).
    pub listener: &'static str,
}

/// Labels of a client connection the gateway closed.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// `public` or `admin`, as in [`ListenerLabels`].
    pub listener: &'static str,
    /// `header_timeout` (a request head did not arrive whole in time), `idle_timeout`
    /// (a keep-alive connection waited too long for its next request) or `send_timeout`
    /// (the client left a ready part of its response untaken too long).
    pub reason: &'static str,
}

/// Labels of a tier's queue.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabels {
    /// Tier name.
    pub tier: String,
    /// Its queue class: `priority`, `standard` or `batch`.
    pub class: &'static str,
}

/// Labels of a tier's wait-target attainment.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SloLabels {
    /// Tier name.
    pub tier: String,
    /// `true` if the request waited at most the tier's target.
    pub within: &'static str,
}

/// Labels of a request refused by the queue.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// Tier name.
    pub tier: String,
    /// Its queue class.
    pub class: &'static str,
    /// `wait_limit` (its wait limit passed, or would pass before its turn), `queue_full`
    /// (the tier's or the route's queue is full), `unavailable` (no key can ever serve).
    pub reason: &'static str,
}

type FloatCounter = Counter<f64, AtomicU64>;

/// Every metric of the proxy.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests by tier, provider, model and outcome.
    pub requests: Family<RequestLabels, Counter>,
    /// Upstream call latency (to the whole answer, or to the first chunk of a stream).
    pub upstream_seconds: Family<UpstreamLabels, Histogram>,
    /// GenAI operation duration.
    pub operation_seconds: Family<GenAiLabels, Histogram>,
    /// GenAI time to first token of streams.
    pub ttft_seconds: Family<GenAiLabels, Histogram>,
    /// GenAI token usage per request.
    pub token_usage: Family<TokenLabels, Histogram>,
    /// Tokens in total.
    pub tokens: Family<TokenLabels, Counter>,
    /// Cost in USD, from the prices in the pool.
    pub cost_usd: Family<GenAiLabels, FloatCounter>,
    /// The proxy's own time per stage.
    pub stage_seconds: Family<StageLabels, Histogram>,
    /// Share of each key's request budget in use (0..1), refreshed at scrape.
    pub key_utilization: Family<KeyLabels, Gauge<f64, AtomicU64>>,
    /// 1 when the provider refused the key (401/403) and it is out.
    pub key_failed: Family<KeyLabels, Gauge>,
    /// Circuit state per provider: 0 closed, 1 half-open, 2 open; refreshed at scrape.
    pub circuit_state: Family<ProviderLabels, Gauge>,
    /// 1 while shared budgets in Redis are unreachable and local shares apply.
    pub budget_degraded: Gauge,
    /// Client connections open now, by listener.
    pub server_connections: Family<ListenerLabels, Gauge>,
    /// Client connections closed at accept because the connection cap was reached, by
    /// listener.
    pub server_connections_refused: Family<ListenerLabels, Counter>,
    /// Client connections the gateway closed for a time bound, by reason.
    pub server_connections_closed: Family<CloseLabels, Counter>,
    /// Requests waiting for budget, by tier and class.
    pub queue_depth: Family<TierLabels, Gauge>,
    /// Wait for budget of admitted requests, by tier and class.
    pub queue_wait: Family<TierLabels, Histogram>,
    /// Requests refused by the queue, by tier, class and reason.
    pub queue_refusals: Family<RefusalLabels, Counter>,
    /// Admitted requests within (or past) their tier's wait target.
    pub queue_slo: Family<SloLabels, Counter>,
    /// Shared budgets this replica found lost in Redis (an epoch gone or changed, or the
    /// server's `run_id` changed) and re-wrote its requests into.
    pub budget_losses: Counter,
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~100 s.
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
    ])
}

fn token_histogram() -> Histogram {
    // The GenAI conventions' advised buckets.
    Histogram::new([
        1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0,
        4194304.0, 16777216.0, 67108864.0,
    ])
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            requests: Family::default(),
            upstream_seconds: Family::new_with_constructor(latency_histogram),
            operation_seconds: Family::new_with_constructor(latency_histogram),
            ttft_seconds: Family::new_with_constructor(latency_histogram),
            token_usage: Family::new_with_constructor(token_histogram),
            tokens: Family::default(),
            cost_usd: Family::default(),
            stage_seconds: Family::new_with_constructor(latency_histogram),
            key_utilization: Family::default(),
            key_failed: Family::default(),
            circuit_state: Family::default(),
            budget_degraded: Gauge::default(),
            server_connections: Family::default(),
            server_connections_refused: Family::default(),
            server_connections_closed: Family::default(),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(latency_histogram),
            queue_refusals: Family::default(),
            queue_slo: Family::default(),
            budget_losses: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "floodgate_requests",
            "Requests by tier, provider, model and outcome",
            m.requests.clone(),
        );
        registry.register(
            "floodgate_upstream_duration_seconds",
            "Upstream latency: whole answer, or first chunk of a stream",
            m.upstream_seconds.clone(),
        );
        registry.register(
            "gen_ai_client_operation_duration_seconds",
            "GenAI operation duration",
            m.operation_seconds.clone(),
        );
        registry.register(
            "gen_ai_server_time_to_first_token_seconds",
            "Time to the first streamed token",
            m.ttft_seconds.clone(),
        );
        registry.register(
            "gen_ai_client_token_usage",
            "Tokens used per request",
            m.token_usage.clone(),
        );
        registry.register("floodgate_tokens", "Tokens used", m.tokens.clone());
        registry.register(
            "floodgate_cost_usd",
            "Cost in US dollars at the pool's prices",
            m.cost_usd.clone(),
        );
        registry.register(
            "floodgate_proxy_stage_seconds",
            "The proxy's own time per stage",
            m.stage_seconds.clone(),
        );
        registry.register(
            "floodgate_queue_depth",
            "Requests waiting for budget, by tier and class",
            m.queue_depth.clone(),
        );
        registry.register(
            "floodgate_queue_wait_seconds",
            "Wait for budget of admitted requests (0 when none was needed), by tier and class",
            m.queue_wait.clone(),
        );
        registry.register(
            "floodgate_queue_refusals",
            "Requests refused by the queue, by tier, class and reason",
            m.queue_refusals.clone(),
        );
        registry.register(
            "floodgate_queue_slo",
            "Admitted requests within (within=true) or past their tier's wait target",
            m.queue_slo.clone(),
        );
        registry.register(
            "floodgate_key_budget_utilization",
            "Share of the key's request budget in use",
            m.key_utilization.clone(),
        );
        registry.register(
            "floodgate_key_failed",
            "1 when the provider refused the key",
            m.key_failed.clone(),
        );
        registry.register(
            "floodgate_circuit_state",
            "0 closed, 1 half-open, 2 open",
            m.circuit_state.clone(),
        );
        registry.register(
            "floodgate_budget_backend_degraded",
            "1 while Redis budgets are unreachable and each replica serves a local share",
            m.budget_degraded.clone(),
        );
        registry.register(
            "floodgate_server_connections",
            "Client connections open, by listener",
            m.server_connections.clone(),
        );
        registry.register(
            "floodgate_server_connections_refused",
            "Client connections closed at accept because the listener's connection cap was reached",
            m.server_connections_refused.clone(),
        );
        registry.register(
            "floodgate_server_connections_closed",
            "Client connections closed by the gateway for a time bound, by reason",
            m.server_connections_closed.clone(),
        );
        registry.register(
            "floodgate_budget_backend_losses",
            "Shared budgets found lost in Redis (restart, failover, flush) and re-written",
            m.budget_losses.clone(),
        );
        crate::routing::metrics::register(&mut registry);
        crate::jobs::metrics::register(&mut registry);
        crate::cache::metrics::register(&mut registry);
        Metrics { registry, ..m }
    }

    /// Records a stage's duration.
    pub fn stage(&self, stage: &'static str, d: Duration) {
        self.stage_seconds
            .get_or_create(&StageLabels { stage })
            .observe(d.as_secs_f64());
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// The process's metrics.
pub fn global() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

tokio::task_local! {
    /// Time spent waiting on upstreams by the current request, so that the proxy's own
    /// overhead (total minus upstream) can be recorded.
    pub static UPSTREAM_TIME: std::cell::Cell<Duration>;
}

/// Adds upstream time to the current request's account (no-op outside a request scope).
pub fn add_upstream_time(d: Duration) {
    let _ = UPSTREAM_TIME.try_with(|t| t.set(t.get() + d));
}

/// Records a finished request's token usage and cost.
/// The metric handles of one target (provider and upstream model), resolved once when a
/// configuration is applied, so that a request records its upstream time, usage and cost
/// without building label strings or looking up label sets.
#[derive(Debug, Clone)]
pub struct TargetMetrics {
    /// `floodgate_upstream_duration_seconds{provider, outcome="ok"}`.
    pub upstream_ok: Histogram,
    /// `gen_ai_server_time_to_first_token_seconds`.
    pub ttft: Histogram,
    /// `gen_ai_client_operation_duration_seconds`.
    pub operation: Histogram,
    input_usage: Histogram,
    output_usage: Histogram,
    input_tokens: Counter,
    output_tokens: Counter,
    cost: FloatCounter,
    /// USD per million (input, output) tokens.
    price: (f64, f64),
}

impl TargetMetrics {
    /// The handles of provider `provider` (of type `provider_type`) serving `model` at
    /// `price` USD per million (input, output) tokens.
    pub fn new(provider: &str, provider_type: &str, model: &str, price: (f64, f64)) -> Self {
        let m = global();
        let gen_ai = GenAiLabels {
            gen_ai_provider_name: provider_type.to_owned(),
            gen_ai_request_model: model.to_owned(),
        };
        let tokens = |kind: &str| TokenLabels {
            gen_ai_provider_name: provider_type.to_owned(),
            gen_ai_request_model: model.to_owned(),
            gen_ai_token_type: kind.to_owned(),
        };
        // One statement per handle: a `get_or_create` guard lives to the end of its
        // statement, and a second lookup in the same family while it lives would deadlock
        // when it has to insert.
        let upstream_ok = m
            .upstream_seconds
            .get_or_create(&UpstreamLabels {
                provider: provider.to_owned(),
                outcome: "ok".to_owned(),
            })
            .clone();
        let ttft = m.ttft_seconds.get_or_create(&gen_ai).clone();
        let operation = m.operation_seconds.get_or_create(&gen_ai).clone();
        let input_usage = m.token_usage.get_or_create(&tokens("input")).clone();
        let output_usage = m.token_usage.get_or_create(&tokens("output")).clone();
        let input_tokens = m.tokens.get_or_create(&tokens("input")).clone();
        let output_tokens = m.tokens.get_or_create(&tokens("output")).clone();
        let cost = m.cost_usd.get_or_create(&gen_ai).clone();
        Self {
            upstream_ok,
            ttft,
            operation,
            input_usage,
            output_usage,
            input_tokens,
            output_tokens,
            cost,
            price,
        }
    }

    /// Records a request's token usage and its cost.
    pub fn record_usage(&self, input: u64, output: u64) {
        self.input_usage.observe(input as f64);
        self.output_usage.observe(output as f64);
        self.input_tokens.inc_by(input);
        self.output_tokens.inc_by(output);
        let cost = (input as f64 * self.price.0 + output as f64 * self.price.1) / 1_000_000.0;
        self.cost.inc_by(cost);
    }
}

/// The counter of requests of `tier` for `model` served by `provider` (outcome `ok`).
pub fn ok_requests(tier: &str, model: &str, provider: &str) -> Counter {
    global()
        .requests
        .get_or_create(&RequestLabels {
            tier: tier.to_owned(),
            provider: provider.to_owned(),
            model: model.to_owned(),
            outcome: "ok".to_owned(),
        })
        .clone()
}

/// The proxy's own time per stage, by stage, resolved once.
#[derive(Debug)]
pub struct Stages {
    /// Identifying the caller (hashing its client key, finding its tenant).
    pub auth: Histogram,
    /// Reading and parsing the request.
    pub parse: Histogram,
    /// Choosing a key.
    pub limiter: Histogram,
    /// Waiting for budget.
    pub queue: Histogram,
    /// Everything but the upstream's time.
    pub total_overhead: Histogram,
}

/// The stage histograms.
pub fn stages() -> &'static Stages {
    static STAGES: OnceLock<Stages> = OnceLock::new();
    STAGES.get_or_init(|| {
        let m = global();
        let h = |stage| {
            m.stage_seconds
                .get_or_create(&StageLabels { stage })
                .clone()
        };
        Stages {
            auth: h("auth"),
            parse: h("parse"),
            limiter: h("limiter"),
            queue: h("queue"),
            total_overhead: h("total_overhead"),
        }
    })
}

/// Records usage by label lookup; for targets, [`TargetMetrics::record_usage`] is cheaper.
pub fn record_usage(provider_type: &str, model: &str, price: (f64, f64), input: u64, output: u64) {
    let m = global();
    for (kind, n) in [("input", input), ("output", output)] {
        let labels = TokenLabels {
            gen_ai_provider_name: provider_type.to_owned(),
            gen_ai_request_model: model.to_owned(),
            gen_ai_token_type: kind.to_owned(),
        };
        m.token_usage.get_or_create(&labels).observe(n as f64);
        m.tokens.get_or_create(&labels).inc_by(n);
    }
    let cost = (input as f64 * price.0 + output as f64 * price.1) / 1_000_000.0;
    let labels = GenAiLabels {
        gen_ai_provider_name: provider_type.to_owned(),
        gen_ai_request_model: model.to_owned(),
    };
    m.cost_usd.get_or_create(&labels).inc_by(cost);
}
