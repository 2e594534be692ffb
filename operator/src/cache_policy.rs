//! CachePolicy controller: the API server has already checked the policy against its schema and
//! CEL rules, so the operator records that it saw this generation (`Ready`, reason `Valid`).
//! Live figures (`entries`, `hitRatio`) are not read yet.

use crate::conditions::{self, READY, condition};
use crate::context::Context;
use crate::error::Result;
use floodgate_crds::cache::{CachePolicy, CachePolicyStatus};
use kube::runtime::controller::Action;
use std::sync::Arc;
use std::time::Duration;

/// How often a CachePolicy is looked at again.
pub const RESYNC: Duration = Duration::from_secs(600);

/// Reconciles one CachePolicy.
pub async fn reconcile(cp: Arc<CachePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let old = cp.status.as_ref();
    let status = compute_status(cp.metadata.generation, old, &conditions::now());
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
    Ok(Action::requeue(RESYNC))
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
