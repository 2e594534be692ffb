//! The dispatcher's live state for `/metrics`: each key's share of budget in use, keys the
//! provider refused, and each provider's circuit; and the circuits for the operator's pool
//! status (published to Redis by [`crate::demand::Publisher`]).

use super::Dispatcher;
use super::breaker::Circuit;
use crate::metrics::{self, KeyLabels, ProviderLabels};
use tokio::time::Instant;

impl Dispatcher {
    /// Each pool's providers and their circuit states now, pools in configuration order.
    pub fn circuit_figures(&self) -> Vec<crate::demand::PoolCircuits> {
        let view = self.view();
        let now = Instant::now();
        let mut pools: Vec<crate::demand::PoolCircuits> = Vec::new();
        for p in &view.runtime.providers {
            let state = (p.name.to_string(), p.breaker.circuit(now).as_str());
            match pools.iter_mut().find(|c| c.pool == p.pool) {
                Some(pool) => pool.providers.push(state),
                None => pools.push(crate::demand::PoolCircuits {
                    pool: p.pool.clone(),
                    providers: vec![state],
                }),
            }
        }
        pools
    }

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
