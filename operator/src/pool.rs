//! AIProviderPool controller: resolves every key's Secret reference and writes capacity, key
//! counts and conditions. Secrets are watched, so a pool turns Ready as soon as the Secret it
//! was missing is created or fixed.
//!
//! Conditions: `SecretsFound` (every referenced Secret exists), `KeysReady` (every key resolves
//! to a non-empty value), `Degraded` (some keys do not, but some capacity remains), `Ready`
//! (all keys resolve) and `UsageTracked` (the live figures, `usedRpm` and the circuits, were
//! read on this pass; when not, they are cleared to 0 and `unknown` rather than left at what
//! an earlier pass saw, and the condition names why). Messages name the Secret and key at
//! fault, never a value.

use crate::conditions::{
    self, DEGRADED, KEYS_READY, READY, SECRETS_FOUND, USAGE_TRACKED, condition,
};
use crate::context::{Context, object_key};
use crate::error::{Error, Result};
use crate::secrets::{Resolution, SecretIndex, describe_unresolved};
use crate::usage::{PoolCircuits, ProviderUsage};
use floodgate_crds::SecretKeyRef;
use floodgate_crds::pool::{
    AIProviderPool, AIProviderPoolSpec, AIProviderPoolStatus, ProviderStatus,
};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use std::sync::Arc;
use std::time::Duration;

/// How often a pool is looked at again when nothing it watches changes.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a pool's live usage is refreshed when Redis or the gateway's metrics are
/// configured.
pub const USAGE_REFRESH: Duration = Duration::from_secs(15);

/// `UsageTracked`'s reason when the gateway metrics selector matches no pod.
pub const NO_GATEWAY_PODS: &str = "NoGatewayPods";
/// `UsageTracked`'s reason when the selector's pods are none of them Ready.
pub const NO_READY_GATEWAY_PODS: &str = "NoReadyGatewayPods";

/// What reading a pool's live figures gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Live {
    /// No source to read them from (no `--redis-url`, no gateway metrics).
    Unconfigured,
    /// The source failed: the `UsageTracked` reason, and why.
    Failed {
        /// `UsageUnreadable`, or [`NO_GATEWAY_PODS`] / [`NO_READY_GATEWAY_PODS`] when there
        /// was no gateway replica to scrape.
        reason: &'static str,
        /// The error, as it reads.
        why: String,
    },
    /// Requests of the last minute and circuits, per provider.
    Read(ProviderUsage, PoolCircuits),
}

impl Live {
    /// A read that failed with `error`, with the `UsageTracked` reason it gives.
    pub fn failed(error: &Error) -> Self {
        let reason = match error {
            Error::NoGatewayPods { .. } => NO_GATEWAY_PODS,
            Error::NoReadyGatewayPods { .. } => NO_READY_GATEWAY_PODS,
            _ => "UsageUnreadable",
        };
        Live::Failed {
            reason,
            why: error.to_string(),
        }
    }
}

/// Reconciles one pool: reads the Secrets it names and writes its status.
pub async fn reconcile(pool: Arc<AIProviderPool>, ctx: Arc<Context>) -> Result<Action> {
    let ns = pool
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object_key(pool.as_ref())))?;
    let secrets = SecretIndex::load(&ctx.client, &ns, secret_names(&pool.spec)).await?;
    let read = match (&ctx.usage, &ctx.gateway) {
        (Some(reader), _) => Some(read_live(reader, &pool).await),
        (None, Some(scraper)) => Some(scraper.pool_live(&pool.name_any(), &pool.spec).await),
        (None, None) => None,
    };
    let live = match read {
        None => Live::Unconfigured,
        Some(Ok((usage, circuits))) => Live::Read(usage, circuits),
        Some(Err(e)) => {
            tracing::warn!(object = %object_key(pool.as_ref()), error = %e, "cannot read live usage");
            Live::failed(&e)
        }
    };
    let old = pool.status.as_ref();
    let status = compute_status(
        &pool.spec,
        pool.metadata.generation,
        old,
        &secrets,
        &live,
        &conditions::now(),
    );
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.write_status(
        pool.as_ref(),
        old,
        &status,
        old_conditions,
        &status.conditions,
    )
    .await?;
    ctx.succeeded(pool.as_ref());
    Ok(Action::requeue(
        if ctx.usage.is_some() || ctx.gateway.is_some() {
            USAGE_REFRESH
        } else {
            RESYNC
        },
    ))
}

/// The live usage and circuits of `pool`, as the gateway's replicas share them in Redis
/// (without Redis: [`crate::gateway::Scraper::pool_live`]).
async fn read_live(
    reader: &crate::usage::UsageReader,
    pool: &AIProviderPool,
) -> Result<(ProviderUsage, PoolCircuits)> {
    let usage = reader.pool_usage(&pool.name_any(), &pool.spec).await?;
    let circuits = reader.pool_circuits(&pool.name_any()).await?;
    Ok((usage, circuits))
}

/// Sets each provider's circuit from what the gateway's replicas report: the worst state and
/// how many see it open; `unknown` for a provider no replica reports. `openCircuits` counts
/// the providers open somewhere, unset when no provider is reported.
pub fn apply_circuits(status: &mut AIProviderPoolStatus, circuits: &PoolCircuits) {
    let mut reported_any = false;
    let mut open = 0;
    for p in &mut status.providers {
        let reported = circuits.get(&p.name);
        reported_any |= reported.is_some();
        p.circuit = reported.map_or("unknown", |c| c.worst).to_owned();
        p.circuit_replicas = reported.map_or(0, |c| c.replicas);
        p.circuit_open_replicas = reported.map_or(0, |c| c.open);
        open += u32::from(p.circuit == "open");
    }
    status.open_circuits = reported_any.then_some(open);
}

/// The names of the Secrets `spec` references.
pub fn secret_names(spec: &AIProviderPoolSpec) -> impl Iterator<Item = String> + '_ {
    key_refs(spec).map(|(_, r)| r.name.clone())
}

/// Every key reference of `spec` with `provider/key-name`, the key's display name defaulting
/// to `<provider>-<index>` as the gateway names it.
fn key_refs(spec: &AIProviderPoolSpec) -> impl Iterator<Item = (String, &SecretKeyRef)> {
    spec.providers.iter().flat_map(|p| {
        p.keys.iter().enumerate().map(move |(i, k)| {
            let name = k.name.clone().unwrap_or_else(|| format!("{}-{i}", p.name));
            (format!("{}/{name}", p.name), &k.secret_ref)
        })
    })
}

/// The pools in `store` that the Secret `namespace/name` may change.
pub fn pools_using_secret(
    store: &Store<AIProviderPool>,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<AIProviderPool>> {
    store
        .state()
        .iter()
        .filter(|p| p.namespace().as_deref() == namespace)
        .filter(|p| secret_names(&p.spec).any(|s| s == name))
        .map(|p| ObjectRef::from_obj(p.as_ref()))
        .collect()
}

/// The status of a pool of `spec` at `generation`, given the Secrets that exist and the live
/// figures; figures not read on this pass are 0 and circuits `unknown`, never an earlier
/// pass's, with `UsageTracked` saying why.
pub fn compute_status(
    spec: &AIProviderPoolSpec,
    generation: Option<i64>,
    old: Option<&AIProviderPoolStatus>,
    secrets: &SecretIndex,
    live: &Live,
    now: &str,
) -> AIProviderPoolStatus {
    let usage = match live {
        Live::Read(usage, _) => Some(usage),
        Live::Unconfigured | Live::Failed { .. } => None,
    };
    let mut providers = Vec::new();
    let (mut ready_keys, mut total_keys, mut capacity_rpm) = (0u32, 0u32, 0u64);
    for p in &spec.providers {
        let ready: Vec<_> = p
            .keys
            .iter()
            .filter(|k| secrets.resolve(&k.secret_ref) == Resolution::Found)
            .collect();
        let provider_ready = u32::try_from(ready.len()).unwrap_or(u32::MAX);
        let provider_total = u32::try_from(p.keys.len()).unwrap_or(u32::MAX);
        capacity_rpm += ready.iter().map(|k| u64::from(k.rpm)).sum::<u64>();
        if p.keys.is_empty() {
            // A keyless self-hosted server: its own limit, if it has one, is its capacity.
            capacity_rpm += p.rpm.map_or(0, u64::from);
        }
        ready_keys += provider_ready;
        total_keys += provider_total;
        providers.push(ProviderStatus {
            name: p.name.clone(),
            circuit: "unknown".to_owned(),
            circuit_replicas: 0,
            circuit_open_replicas: 0,
            ready_keys: provider_ready,
            total_keys: provider_total,
            used_rpm: usage.and_then(|u| u.get(&p.name).copied()).unwrap_or(0),
        });
    }

    let missing_secrets: Vec<_> = key_refs(spec)
        .filter(|(_, r)| secrets.resolve(r) == Resolution::SecretNotFound)
        .collect();
    let secrets_found = if missing_secrets.is_empty() {
        condition(
            SECRETS_FOUND,
            true,
            "AllSecretsFound",
            "every referenced Secret exists",
        )
    } else {
        let text =
            describe_unresolved(secrets, missing_secrets.iter().cloned()).unwrap_or_default();
        condition(SECRETS_FOUND, false, "SecretNotFound", text)
    };
    let unresolved = describe_unresolved(secrets, key_refs(spec));
    let summary = format!("{ready_keys}/{total_keys} keys ready, {capacity_rpm} RPM");
    let (keys_ready, ready, degraded) = match &unresolved {
        None => (
            condition(KEYS_READY, true, "AllKeysReady", summary.clone()),
            condition(READY, true, "AllKeysReady", summary),
            condition(DEGRADED, false, "AllKeysReady", ""),
        ),
        Some(text) => {
            let reason = if missing_secrets.is_empty() {
                "KeyNotFound"
            } else {
                "SecretNotFound"
            };
            let message = format!("{summary}: {text}");
            (
                condition(KEYS_READY, false, reason, message.clone()),
                condition(READY, false, reason, message.clone()),
                if capacity_rpm > 0 {
                    condition(DEGRADED, true, reason, message)
                } else {
                    condition(DEGRADED, false, "NoCapacity", "no key is usable")
                },
            )
        }
    };
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let mut status = AIProviderPoolStatus {
        observed_generation: generation,
        conditions: conditions::merge(
            old_conditions,
            vec![
                ready,
                secrets_found,
                keys_ready,
                degraded,
                usage_tracked(live),
            ],
            generation,
            now,
        ),
        provider_count: u32::try_from(spec.providers.len()).unwrap_or(u32::MAX),
        ready_keys,
        total_keys,
        keys: Some(format!("{ready_keys}/{total_keys}")),
        capacity_rpm,
        used_rpm: usage.map_or(0, |u| u.values().sum()),
        open_circuits: None,
        providers,
    };
    if let Live::Read(_, circuits) = live {
        apply_circuits(&mut status, circuits);
    }
    status
}

/// The `UsageTracked` condition after reading `live`.
fn usage_tracked(live: &Live) -> floodgate_crds::Condition {
    match live {
        Live::Unconfigured => condition(
            USAGE_TRACKED,
            false,
            "NoUsageSource",
            "the operator has neither --redis-url nor --gateway-metrics-selector: usedRpm and the circuits are not read",
        ),
        Live::Failed { reason, why } => {
            let hint = match *reason {
                NO_GATEWAY_PODS => {
                    ": check --gateway-metrics-selector and that the gateway runs there"
                }
                NO_READY_GATEWAY_PODS => ": the gateway is not serving",
                _ => "",
            };
            condition(
                USAGE_TRACKED,
                false,
                reason,
                format!(
                    "cannot read the gateway's figures ({why}){hint}; usedRpm shows 0 and circuits unknown until a read succeeds"
                ),
            )
        }
        Live::Read(..) => condition(
            USAGE_TRACKED,
            true,
            "UsageRead",
            "requests of the last minute and circuits, over every gateway replica",
        ),
    }
}

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod tests;
