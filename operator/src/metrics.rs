//! The operator's Prometheus metrics: reconciles by kind and result, their durations, errors by
//! class, and whether this replica leads. Labels are kinds and `&'static str` classes, never
//! an object's name, except the local models' demand (one series per LocalModelDeployment and
//! signal, for an HPA through a metrics adapter: few objects, and the name is the point).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Duration;

/// Labels of a finished reconcile.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    /// The resource kind, e.g. `AIProviderPool`.
    pub kind: String,
    /// `ok` or `error`.
    pub result: &'static str,
}

/// Labels of a failed reconcile.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// The resource kind.
    pub kind: String,
    /// [`crate::Error::metric_label`].
    pub error: &'static str,
}

/// Labels naming a kind.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The resource kind.
    pub kind: String,
}

/// Labels of one local model's demand figure.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DemandLabels {
    /// The LocalModelDeployment's namespace.
    pub namespace: String,
    /// Its name.
    pub name: String,
    /// `queued`, `in_flight` or `latency_p95_ms`.
    pub signal: &'static str,
}

/// The `signal` label values of the demand series, in [`Metrics::set_demand`]'s order.
const DEMAND_SIGNALS: [&str; 4] = ["queued", "in_flight", "latency_p95_ms", "spilled"];

/// Every metric of one operator process.
pub struct Metrics {
    registry: Registry,
    reconciles: Family<ReconcileLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    durations: Family<KindLabels, Histogram, fn() -> Histogram>,
    leader: Gauge,
    demand: Family<DemandLabels, Gauge>,
    /// The `(namespace, name)` of every model with demand series, to remove them when it goes.
    demand_models: std::sync::Mutex<std::collections::BTreeSet<(String, String)>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    // 1 ms .. 30 s: a reconcile is a few API calls.
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let reconciles = Family::<ReconcileLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let durations = Family::<KindLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        let leader = Gauge::default();
        registry.register(
            "floodgate_operator_reconciles",
            "Reconciles by kind and result",
            reconciles.clone(),
        );
        registry.register(
            "floodgate_operator_reconcile_errors",
            "Failed reconciles by kind and error class",
            errors.clone(),
        );
        registry.register(
            "floodgate_operator_reconcile_seconds",
            "Time per reconcile by kind",
            durations.clone(),
        );
        registry.register(
            "floodgate_operator_leader",
            "1 while this replica runs the controllers (holds the Lease, or runs without election)",
            leader.clone(),
        );
        let demand = Family::<DemandLabels, Gauge>::default();
        registry.register(
            "floodgate_operator_local_model_demand",
            "The gateway's demand for each local model, summed over its replicas (requests queued and in flight; the slowest replica's p95 answer time in ms), as read from Redis; absent while no gateway replica reports the model or the read fails",
            demand.clone(),
        );
        Self {
            registry,
            reconciles,
            errors,
            durations,
            leader,
            demand,
            demand_models: std::sync::Mutex::default(),
        }
    }
}

impl Metrics {
    /// Records one reconcile of `kind` that took `elapsed`, failed with `error` if any.
    pub fn observe(&self, kind: &str, error: Option<&'static str>, elapsed: Duration) {
        let result = if error.is_some() { "error" } else { "ok" };
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind: kind.to_owned(),
                result,
            })
            .inc();
        if let Some(error) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    kind: kind.to_owned(),
                    error,
                })
                .inc();
        }
        self.durations
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// Sets whether this replica leads.
    pub fn set_leader(&self, leading: bool) {
        self.leader.set(i64::from(leading));
    }

    /// Records the demand read for local model `namespace/name`.
    pub fn set_demand(&self, namespace: &str, name: &str, demand: &crate::autoscale::Demand) {
        self.demand_models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert((namespace.to_owned(), name.to_owned()));
        let values = [
            demand.queued,
            demand.in_flight,
            demand.latency_p95_ms,
            demand.spilled,
        ];
        for (signal, value) in DEMAND_SIGNALS.into_iter().zip(values) {
            self.demand
                .get_or_create(&DemandLabels {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    signal,
                })
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
    }

    /// Removes the demand series of every local model `keep` rejects (given namespace and name):
    /// those deleted.
    pub fn retain_demand(&self, keep: impl Fn(&str, &str) -> bool) {
        let mut models = self.demand_models.lock().unwrap_or_else(|p| p.into_inner());
        models.retain(|(namespace, name)| {
            if keep(namespace, name) {
                return true;
            }
            self.remove_demand_series(namespace, name);
            false
        });
    }

    /// Removes the demand series of local model `namespace/name`: its demand is unknown (no
    /// gateway replica reports it, or it could not be read). An HPA then finds no metric and
    /// holds the replicas, where a stale or zero figure would scale a busy model down.
    pub fn remove_demand(&self, namespace: &str, name: &str) {
        let mut models = self.demand_models.lock().unwrap_or_else(|p| p.into_inner());
        if models.remove(&(namespace.to_owned(), name.to_owned())) {
            self.remove_demand_series(namespace, name);
        }
    }

    fn remove_demand_series(&self, namespace: &str, name: &str) {
        for signal in DEMAND_SIGNALS {
            self.demand.remove(&DemandLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                signal,
            });
        }
    }

    /// Reconciles of `kind` with `result` so far.
    pub fn reconciles(&self, kind: &str, result: &'static str) -> u64 {
        self.reconciles
            .get_or_create(&ReconcileLabels {
                kind: kind.to_owned(),
                result,
            })
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconciles_errors_and_durations_are_exposed_by_kind() {
        let m = Metrics::default();
        m.observe("AIProviderPool", None, Duration::from_millis(3));
        m.observe(
            "AIProviderPool",
            Some("kube_api"),
            Duration::from_millis(40),
        );
        m.set_leader(true);
        m.set_demand(
            "models",
            "llama",
            &crate::autoscale::Demand {
                queued: 12,
                in_flight: 3,
                latency_p95_ms: 2500,
                spilled: 4,
                reporters: 2,
            },
        );
        assert_eq!(m.reconciles("AIProviderPool", "ok"), 1);
        assert_eq!(m.reconciles("AIProviderPool", "error"), 1);
        let text = m.encode();
        for line in [
            r#"floodgate_operator_reconciles_total{kind="AIProviderPool",result="ok"} 1"#,
            r#"floodgate_operator_reconcile_errors_total{kind="AIProviderPool",error="kube_api"} 1"#,
            r#"floodgate_operator_reconcile_seconds_count{kind="AIProviderPool"} 2"#,
            r#"floodgate_operator_reconcile_seconds_bucket{le="0.005",kind="AIProviderPool"} 1"#,
            "floodgate_operator_leader 1",
            r#"floodgate_operator_local_model_demand{namespace="models",name="llama",signal="queued"} 12"#,
            r#"floodgate_operator_local_model_demand{namespace="models",name="llama",signal="latency_p95_ms"} 2500"#,
            r#"floodgate_operator_local_model_demand{namespace="models",name="llama",signal="spilled"} 4"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from:\n{text}"
            );
        }
    }
}
