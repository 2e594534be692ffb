//! The routing stage's metrics, registered in the process's registry
//! ([`crate::metrics::global`]) by [`register`].

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Labels of a classified request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabels {
    /// `simple`, `medium`, `complex` or `code`.
    pub class: &'static str,
}

/// Labels of a routed request.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The rule's name, or `by-model`.
    pub rule: String,
    /// The step that answered (`pool:<name>`, `local:<name>`), or `none`.
    pub target: String,
}

/// Labels of a step of the degradation chain.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The step (`pool:<name>`, `local:<name>`).
    pub target: String,
    /// `ok`, `spill_queue`, `spill_latency`, `over_budget`, `timeout`, or the route error's
    /// class (`rate_limit_exceeded`, `no_upstream_available`, `server_error`, ...).
    pub outcome: String,
}

/// Labels of a local model's demand.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LocalLabels {
    /// `<namespace>/<name>` of the LocalModelDeployment.
    pub local_model: String,
}

/// Labels of a cost.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CostLabels {
    /// Tenant name (`` for callers without one).
    pub tenant: String,
    /// Provider name.
    pub provider: String,
    /// Model as requested.
    pub model: String,
}

/// Labels of a budget.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BudgetLabels {
    /// `tenant` or `pool`.
    pub scope: &'static str,
    /// Its name.
    pub name: String,
}

/// Labels of a tenant's totals.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TenantLabels {
    /// Tenant name.
    pub tenant: String,
}

/// Labels of a health probe.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    /// Pool name.
    pub pool: String,
    /// Provider name.
    pub provider: String,
    /// `ok` or `failed`.
    pub outcome: &'static str,
}

/// The routing stage's metrics.
#[derive(Debug)]
pub struct RoutingMetrics {
    /// `floodgate_requests_classified_total{class}`.
    pub classified: Family<ClassLabels, Counter>,
    /// `floodgate_routing_requests_total{rule, target}`.
    pub routed: Family<RouteLabels, Counter>,
    /// `floodgate_routing_steps_total{target, outcome}`: every step taken in a chain.
    pub steps: Family<StepLabels, Counter>,
    /// `floodgate_local_model_queue_depth{local_model}`.
    pub local_queue_depth: Family<LocalLabels, Gauge>,
    /// `floodgate_local_model_in_flight{local_model}`.
    pub local_in_flight: Family<LocalLabels, Gauge>,
    /// `floodgate_local_model_latency_ms{local_model}`: recent mean latency.
    pub local_latency_ms: Family<LocalLabels, Gauge>,
    /// `floodgate_local_model_duration_seconds{local_model}`.
    pub local_seconds: Family<LocalLabels, Histogram>,
    /// `floodgate_request_cost_usd_total{tenant, provider, model}`.
    pub cost: Family<CostLabels, FloatCounter>,
    /// `floodgate_cost_premium_equivalent_usd_total{tenant}`: the same usage at the premium
    /// pool's prices.
    pub premium_equivalent: Family<TenantLabels, FloatCounter>,
    /// `floodgate_cost_savings_usd_total{tenant}`: premium equivalent less the cost.
    pub savings: Family<TenantLabels, FloatCounter>,
    /// `floodgate_cost_budget_spent_usd{scope, name}`: spent this month.
    pub budget_spent: Family<BudgetLabels, FloatGauge>,
    /// `floodgate_cost_budget_alert{scope, name}`: 1 once spending passed `alertAt`.
    pub budget_alert: Family<BudgetLabels, Gauge>,
    /// `floodgate_cost_budget_refusals_total{scope, name}`.
    pub budget_refusals: Family<BudgetLabels, Counter>,
    /// `floodgate_health_probes_total{pool, provider, outcome}`.
    pub health_probes: Family<ProbeLabels, Counter>,
}

fn seconds() -> Histogram {
    Histogram::new([
        0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// The routing metrics of the process.
pub fn routing_metrics() -> &'static RoutingMetrics {
    static M: OnceLock<RoutingMetrics> = OnceLock::new();
    M.get_or_init(|| RoutingMetrics {
        classified: Family::default(),
        routed: Family::default(),
        steps: Family::default(),
        local_queue_depth: Family::default(),
        local_in_flight: Family::default(),
        local_latency_ms: Family::default(),
        local_seconds: Family::new_with_constructor(seconds),
        cost: Family::default(),
        premium_equivalent: Family::default(),
        savings: Family::default(),
        budget_spent: Family::default(),
        budget_alert: Family::default(),
        budget_refusals: Family::default(),
        health_probes: Family::default(),
    })
}

/// Registers the routing metrics in `registry`.
pub fn register(registry: &mut Registry) {
    let m = routing_metrics();
    registry.register(
        "floodgate_requests_classified",
        "Chat requests by prompt class",
        m.classified.clone(),
    );
    registry.register(
        "floodgate_routing_requests",
        "Requests by routing rule and the target that answered",
        m.routed.clone(),
    );
    registry.register(
        "floodgate_routing_steps",
        "Steps of the degradation chain taken, by target and outcome",
        m.steps.clone(),
    );
    registry.register(
        "floodgate_local_model_queue_depth",
        "Requests waiting for a local model's concurrency slot",
        m.local_queue_depth.clone(),
    );
    registry.register(
        "floodgate_local_model_in_flight",
        "Calls in flight to a local model",
        m.local_in_flight.clone(),
    );
    registry.register(
        "floodgate_local_model_latency_ms",
        "Recent mean latency of a local model (to the answer, or a stream's head)",
        m.local_latency_ms.clone(),
    );
    registry.register(
        "floodgate_local_model_duration_seconds",
        "Latency of calls to a local model",
        m.local_seconds.clone(),
    );
    registry.register(
        "floodgate_request_cost_usd",
        "Cost of requests at the pool's prices, by tenant, provider and model",
        m.cost.clone(),
    );
    registry.register(
        "floodgate_cost_premium_equivalent_usd",
        "What the same usage would have cost at the premium pool's prices",
        m.premium_equivalent.clone(),
    );
    registry.register(
        "floodgate_cost_savings_usd",
        "Premium-equivalent cost less the actual cost",
        m.savings.clone(),
    );
    registry.register(
        "floodgate_cost_budget_spent_usd",
        "Spent this calendar month (UTC), by budget",
        m.budget_spent.clone(),
    );
    registry.register(
        "floodgate_cost_budget_alert",
        "1 once a budget's spending passed its alert threshold this month",
        m.budget_alert.clone(),
    );
    registry.register(
        "floodgate_health_probes",
        "Active health probes of providers with an open circuit or a refused key, by outcome",
        m.health_probes.clone(),
    );
    registry.register(
        "floodgate_cost_budget_refusals",
        "Requests refused because a monthly budget was spent",
        m.budget_refusals.clone(),
    );
}
