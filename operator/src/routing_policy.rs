//! RoutingPolicy controller: checks that every target the policy names exists in its
//! namespace (the pools of its rules and `premiumPool`, the LocalModelDeployments of its
//! rules) and writes the rule count and conditions. Pools and LocalModelDeployments are
//! watched, so a policy turns Ready as soon as the target it was missing is created, and
//! unready when one it names is deleted.
//!
//! Conditions: `TargetsFound` (every named target exists; the message names each missing one
//! and where it is named) and `Ready` (the same: a rule whose target is missing cannot route).
//! The gateway skips a missing target and tries the rule's next one, so a policy that is not
//! Ready still serves, with less than it says.

use crate::conditions::{self, READY, TARGETS_FOUND, condition};
use crate::context::{Context, object_key};
use crate::error::{Error, Result};
use floodgate_crds::routing::{RoutingPolicy, RoutingPolicySpec, RoutingPolicyStatus};
use floodgate_crds::{AIProviderPool, LocalModelDeployment};
use kube::api::ListParams;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, ResourceExt};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// How often a RoutingPolicy is looked at again when nothing it watches changes.
pub const RESYNC: Duration = Duration::from_secs(300);

/// The kinds a policy's targets are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TargetKind {
    /// An AIProviderPool.
    Pool,
    /// A LocalModelDeployment.
    LocalModel,
}

impl TargetKind {
    fn as_str(self) -> &'static str {
        match self {
            TargetKind::Pool => "AIProviderPool",
            TargetKind::LocalModel => "LocalModelDeployment",
        }
    }
}

/// Every target `spec` names, with where it is named (`rule <name>`, `premiumPool`), in a
/// stable order.
pub fn targets(spec: &RoutingPolicySpec) -> BTreeMap<(TargetKind, String), Vec<String>> {
    let mut named: BTreeMap<(TargetKind, String), Vec<String>> = BTreeMap::new();
    for rule in &spec.rules {
        for t in &rule.targets {
            let target = match (&t.pool, &t.local_model) {
                (Some(pool), _) => (TargetKind::Pool, pool.clone()),
                (None, Some(model)) => (TargetKind::LocalModel, model.clone()),
                (None, None) => continue,
            };
            let at = named.entry(target).or_default();
            let place = format!("rule {}", rule.name);
            if !at.contains(&place) {
                at.push(place);
            }
        }
    }
    if let Some(pool) = &spec.premium_pool {
        named
            .entry((TargetKind::Pool, pool.clone()))
            .or_default()
            .push("premiumPool".to_owned());
    }
    named
}

/// Reconciles one RoutingPolicy: lists the pools and local models of its namespace (only the
/// kinds it names) and writes its status.
pub async fn reconcile(rp: Arc<RoutingPolicy>, ctx: Arc<Context>) -> Result<Action> {
    let ns = rp
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object_key(rp.as_ref())))?;
    let named = targets(&rp.spec);
    let mut existing = BTreeSet::new();
    if named.keys().any(|(k, _)| *k == TargetKind::Pool) {
        let api: Api<AIProviderPool> = Api::namespaced(ctx.client.clone(), &ns);
        for p in api.list_metadata(&ListParams::default()).await? {
            existing.insert((TargetKind::Pool, p.name_any()));
        }
    }
    if named.keys().any(|(k, _)| *k == TargetKind::LocalModel) {
        let api: Api<LocalModelDeployment> = Api::namespaced(ctx.client.clone(), &ns);
        for m in api.list_metadata(&ListParams::default()).await? {
            existing.insert((TargetKind::LocalModel, m.name_any()));
        }
    }
    let old = rp.status.as_ref();
    let status = compute_status(
        &rp.spec,
        rp.metadata.generation,
        old,
        &existing,
        &conditions::now(),
    );
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.write_status(
        rp.as_ref(),
        old,
        &status,
        old_conditions,
        &status.conditions,
    )
    .await?;
    ctx.succeeded(rp.as_ref());
    Ok(Action::requeue(RESYNC))
}

/// The status of a policy of `spec` at `generation`, given the targets that exist.
pub fn compute_status(
    spec: &RoutingPolicySpec,
    generation: Option<i64>,
    old: Option<&RoutingPolicyStatus>,
    existing: &BTreeSet<(TargetKind, String)>,
    now: &str,
) -> RoutingPolicyStatus {
    let named = targets(spec);
    let missing: Vec<String> = named
        .iter()
        .filter(|(target, _)| !existing.contains(*target))
        .map(|((kind, name), at)| {
            format!("{} {name:?} not found ({})", kind.as_str(), at.join(", "))
        })
        .collect();
    let rules = spec.rules.len();
    let fresh = if missing.is_empty() {
        let message = format!("{rules} rules; all {} named targets exist", named.len());
        vec![
            condition(READY, true, "AllTargetsFound", message.clone()),
            condition(TARGETS_FOUND, true, "AllTargetsFound", message),
        ]
    } else {
        let message = missing.join("; ");
        vec![
            condition(READY, false, "TargetNotFound", message.clone()),
            condition(TARGETS_FOUND, false, "TargetNotFound", message),
        ]
    };
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    RoutingPolicyStatus {
        observed_generation: generation,
        conditions: conditions::merge(old_conditions, fresh, generation, now),
        rule_count: u32::try_from(rules).unwrap_or(u32::MAX),
    }
}

/// The policies in `store` that a change of the `kind` named `namespace/name` may change.
pub fn naming(
    store: &Store<RoutingPolicy>,
    kind: TargetKind,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<RoutingPolicy>> {
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == namespace)
        .filter(|p| targets(&p.spec).contains_key(&(kind, name.to_owned())))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

#[cfg(test)]
mod api_tests;
