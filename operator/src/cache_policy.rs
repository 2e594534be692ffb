//! CachePolicy controller: the API server has already checked the policy against its schema and
//! CEL rules, so the operator records that it saw this generation (`Ready`, reason `Valid`),
//! and, with Redis, the figures the gateway's replicas share
//! ([`floodgate_crds::redis_keys`]): the hit ratio over the last hour, overall and per layer
//! (exact, semantic, template, dedup), the lookups it counts, and the entries and bytes the
//! replicas hold.

use crate::conditions::{self, READY, condition};
use crate::context::{Context, object_key};
use crate::error::Result;
use crate::usage::CacheUsage;
use floodgate_crds::cache::{CacheBackend, CacheHitRatios, CachePolicy, CachePolicyStatus};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use std::sync::Arc;
use std::time::Duration;

/// How often a CachePolicy is looked at again (without Redis: nothing but its spec changes).
pub const RESYNC: Duration = Duration::from_secs(600);

/// Reconciles one CachePolicy.
pub async fn reconcile(cp: Arc<CachePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let figures = match &ctx.usage {
        Some(reader) => {
            let ns = cp.namespace().unwrap_or_default();
            match reader.cache_usage(&ns, &cp.name_any()).await {
                Ok(usage) => Some(usage),
                Err(e) => {
                    // Figures, not health: keep the last ones and say why in the log.
                    tracing::warn!(object = %object_key(cp.as_ref()), error = %e, "cannot read cache figures");
                    None
                }
            }
        }
        None => None,
    };
    let old = cp.status.as_ref();
    let mut status = compute_status(cp.metadata.generation, old, &conditions::now());
    if let Some(usage) = &figures {
        with_figures(&mut status, cp.spec.backend, usage);
    }
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.write_status(
        cp.as_ref(),
        old,
        &status,
        old_conditions,
        &status.conditions,
    )
    .await?;
    ctx.succeeded(cp.as_ref());
    Ok(Action::requeue(if ctx.usage.is_some() {
        crate::pool::USAGE_REFRESH
    } else {
        RESYNC
    }))
}

/// The status of a CachePolicy at `generation`.
pub fn compute_status(
    generation: Option<i64>,
    old: Option<&CachePolicyStatus>,
    now: &str,
) -> CachePolicyStatus {
    let fresh = vec![condition(
        READY,
        true,
        "Valid",
        "accepted by the API server's validation",
    )];
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    CachePolicyStatus {
        observed_generation: generation,
        conditions: conditions::merge(old_conditions, fresh, generation, now),
        ..old.cloned().unwrap_or_default()
    }
}

/// A ratio as status shows it: two decimals (`0.31`).
fn ratio(part: u64, whole: u64) -> String {
    format!("{:.2}", part as f64 / whole.max(1) as f64)
}

/// Fills `status` with the replicas' figures: hit ratios over the lookups of the last hour
/// (absent before the first), and what they hold. With the memory backend each replica holds
/// its own answers (summed); with Redis each holds a mirror of the same semantic index (the
/// largest is shown; answers kept in Redis itself are not counted).
pub fn with_figures(status: &mut CachePolicyStatus, backend: CacheBackend, usage: &CacheUsage) {
    let [exact, semantic, template, dedup, miss] = usage.counts;
    let lookups = exact + semantic + template + dedup + miss;
    status.lookups = lookups;
    status.replicas = usage.replicas;
    (status.hit_ratio, status.hit_ratios) = if lookups == 0 {
        (None, None)
    } else {
        (
            Some(ratio(lookups - miss, lookups)),
            Some(CacheHitRatios {
                exact: ratio(exact, lookups),
                semantic: ratio(semantic, lookups),
                template: ratio(template, lookups),
                dedup: ratio(dedup, lookups),
            }),
        )
    };
    (status.entries, status.bytes) = match backend {
        CacheBackend::Memory => (usage.entries.0, usage.bytes.0),
        CacheBackend::Redis => (usage.entries.1, usage.bytes.1),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_give_each_layers_share_of_the_lookups_and_what_the_replicas_hold() {
        let usage = CacheUsage {
            // exact, semantic, template, dedup, miss over two replicas.
            counts: [30, 10, 5, 15, 40],
            entries: (120, 70),
            bytes: (64_000, 40_000),
            replicas: 2,
        };
        let mut s = compute_status(Some(1), None, "t1");
        with_figures(&mut s, CacheBackend::Memory, &usage);
        assert_eq!(s.hit_ratio.as_deref(), Some("0.60"));
        let r = s.hit_ratios.clone().unwrap();
        assert_eq!(
            [r.exact, r.semantic, r.template, r.dedup],
            ["0.30", "0.10", "0.05", "0.15"]
        );
        assert_eq!((s.lookups, s.replicas), (100, 2));
        // Memory: each replica's own answers, summed.
        assert_eq!((s.entries, s.bytes), (120, 64_000));
        // Redis: each replica mirrors the same index; the largest is shown.
        with_figures(&mut s, CacheBackend::Redis, &usage);
        assert_eq!((s.entries, s.bytes), (70, 40_000));
        // No lookup in the last hour: no ratio, not 0.
        with_figures(&mut s, CacheBackend::Memory, &CacheUsage::default());
        assert_eq!((s.hit_ratio.clone(), s.hit_ratios.clone()), (None, None));
        assert_eq!((s.lookups, s.entries, s.replicas), (0, 0, 0));
        // The figures stay when the next pass cannot read them (status is built from the old).
        with_figures(&mut s, CacheBackend::Memory, &usage);
        let again = compute_status(Some(1), Some(&s), "t2");
        assert_eq!(again.hit_ratio.as_deref(), Some("0.60"));
    }
}
