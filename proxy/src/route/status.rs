//! The dispatcher's live state for `/metrics`: each key's share of budget in use, keys the
//! provider refused, and each provider's circuit.

use super::Dispatcher;
use super::breaker::Circuit;
use crate::metrics::{self, KeyLabels, ProviderLabels};
use tokio::time::Instant;

impl Dispatcher {
    /// Refreshes the scrape-time gauges from the current routing view; keys and providers that
    /// left the configuration disappear from them.
    pub fn refresh_metrics(&self) {
        let m = metrics::global();
        m.key_utilization.clear();
        m.key_failed.clear();
        m.circuit_state.clear();
        m.budget_degraded.set(i64::from(self.redis_degraded()));
        let view = self.view();
        let now = Instant::now();
        for p in &view.runtime.providers {
            let provider = ProviderLabels {
                pool: p.pool.clone(),
                provider: p.name.to_string(),
            };
            let circuit = match p.breaker.circuit(now) {
                Circuit::Closed => 0,
                Circuit::HalfOpen => 1,
                Circuit::Open => 2,
            };
            m.circuit_state.get_or_create(&provider).set(circuit);
            for k in &p.keys {
                let labels = KeyLabels {
                    pool: p.pool.clone(),
                    provider: p.name.to_string(),
                    key: k.name.to_string(),
                };
                m.key_utilization
                    .get_or_create(&labels)
                    .set(1.0 - k.budget.remaining_fraction(now));
                m.key_failed
                    .get_or_create(&labels)
                    .set(i64::from(k.budget.is_failed()));
            }
        }
    }
}
