//! Tenant controller: resolves every client key's Secret reference and writes the tenant's use
//! of the current window from what the proxies share in Redis: requests (`usedRpm`), tokens
//! (`usedTpm`) and when it was last seen. Secrets are watched, so a tenant turns Ready as soon
//! as the Secret of its key is created or fixed.
//!
//! Conditions: `SecretsFound`, `KeysReady` (every key resolves to a non-empty value),
//! `Degraded` (some keys do not, but one still works), `Ready` (every key works), and
//! `UsageTracked`: whether the proxies share this tenant's requests and tokens at all. With
//! `limits.rpm` its requests are its rpm window's (exact); without, the proxies count them per
//! minute for this status and `usedRpm` is an estimate of the last 60 s. Tokens are recorded
//! only to enforce `limits.tpm`; the condition says when `usedTpm` is not tracked rather than
//! let a zero pass for idleness.

use crate::conditions::{self, DEGRADED, KEYS_READY, READY, SECRETS_FOUND, condition};
use crate::context::{Context, object_key};
use crate::error::{Error, Result};
use crate::secrets::{Resolution, SecretIndex, describe_unresolved};
use crate::usage::TenantUsage;
use floodgate_crds::SecretKeyRef;
use floodgate_crds::tenant::{Tenant, TenantSpec, TenantStatus};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use std::sync::Arc;
use std::time::Duration;

/// Whether the proxies share this tenant's use, so that `usedRpm`/`usedTpm` mean something.
pub use crate::conditions::USAGE_TRACKED;
/// How often a tenant is looked at again when nothing it watches changes.
pub const RESYNC: Duration = Duration::from_secs(300);
/// How often a tenant's use is refreshed when Redis is configured.
pub const USAGE_REFRESH: Duration = Duration::from_secs(15);

/// Reconciles one tenant: reads the Secrets of its keys and its use, writes its status.
pub async fn reconcile(tenant: Arc<Tenant>, ctx: Arc<Context>) -> Result<Action> {
    let ns = tenant
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object_key(tenant.as_ref())))?;
    let names = tenant.spec.keys.iter().map(|k| k.secret_ref.name.clone());
    let secrets = SecretIndex::load(&ctx.client, &ns, names).await?;
    let usage = match &ctx.usage {
        // The proxies name a tenant `<namespace>/<name>` in cluster mode.
        Some(reader) => match reader
            .tenant_usage(&format!("{ns}/{}", tenant.name_any()))
            .await
        {
            Ok(usage) => Some(usage),
            Err(e) => {
                tracing::warn!(object = %object_key(tenant.as_ref()), error = %e, "cannot read tenant usage");
                None
            }
        },
        None => None,
    };
    let old = tenant.status.as_ref();
    let status = compute_status(
        &tenant.spec,
        tenant.metadata.generation,
        old,
        &secrets,
        usage.as_ref(),
        ctx.usage.is_some(),
        &conditions::now(),
    );
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.write_status(
        tenant.as_ref(),
        old,
        &status,
        old_conditions,
        &status.conditions,
    )
    .await?;
    ctx.succeeded(tenant.as_ref());
    Ok(Action::requeue(if ctx.usage.is_some() {
        USAGE_REFRESH
    } else {
        RESYNC
    }))
}

/// Every key reference of `spec` with the key's name.
fn key_refs(spec: &TenantSpec) -> impl Iterator<Item = (String, &SecretKeyRef)> {
    spec.keys
        .iter()
        .map(|k| (format!("key {}", k.name), &k.secret_ref))
}

/// The tenants in `store` that the Secret `namespace/name` may change.
pub fn using_secret(
    store: &Store<Tenant>,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<Tenant>> {
    store
        .state()
        .iter()
        .filter(|t| t.namespace().as_deref() == namespace)
        .filter(|t| t.spec.keys.iter().any(|k| k.secret_ref.name == name))
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The status of a tenant of `spec` at `generation`, given the Secrets that exist and its use
/// (`None`: not read, the figures of `old` stay); `redis` says whether use is read at all.
pub fn compute_status(
    spec: &TenantSpec,
    generation: Option<i64>,
    old: Option<&TenantStatus>,
    secrets: &SecretIndex,
    usage: Option<&TenantUsage>,
    redis: bool,
    now: &str,
) -> TenantStatus {
    let total = spec.keys.len();
    let ready = spec
        .keys
        .iter()
        .filter(|k| secrets.resolve(&k.secret_ref) == Resolution::Found)
        .count();
    let missing_secret =
        key_refs(spec).any(|(_, r)| secrets.resolve(r) == Resolution::SecretNotFound);
    let summary = format!("{ready}/{total} client keys ready");
    let mut fresh = match describe_unresolved(secrets, key_refs(spec)) {
        None => vec![
            condition(READY, true, "AllKeysReady", summary.clone()),
            condition(
                SECRETS_FOUND,
                true,
                "AllSecretsFound",
                "every referenced Secret exists",
            ),
            condition(KEYS_READY, true, "AllKeysReady", summary),
            condition(DEGRADED, false, "AllKeysReady", ""),
        ],
        Some(text) => {
            let reason = if missing_secret {
                "SecretNotFound"
            } else {
                "KeyNotFound"
            };
            let message = format!("{summary}: {text}");
            vec![
                condition(READY, false, reason, message.clone()),
                if missing_secret {
                    condition(SECRETS_FOUND, false, "SecretNotFound", text)
                } else {
                    condition(
                        SECRETS_FOUND,
                        true,
                        "AllSecretsFound",
                        "every referenced Secret exists",
                    )
                },
                condition(KEYS_READY, false, reason, message.clone()),
                if ready > 0 {
                    condition(DEGRADED, true, reason, message)
                } else {
                    condition(DEGRADED, false, "NoUsableKey", "no client key is usable")
                },
            ]
        }
    };
    fresh.push(usage_tracked(spec, redis));
    let limits = spec.limits.clone().unwrap_or_default();
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    TenantStatus {
        observed_generation: generation,
        conditions: conditions::merge(old_conditions, fresh, generation, now),
        used_rpm: match usage {
            Some(u) if limits.rpm.is_some() => u.requests,
            Some(u) => u.counted,
            None => old.map_or(0, |o| o.used_rpm),
        },
        used_tpm: match usage {
            Some(u) if limits.tpm.is_some() => u.tokens,
            Some(_) => 0,
            None => old.map_or(0, |o| o.used_tpm),
        },
        // The newest sighting wins: Redis forgets a tenant two windows after its last request.
        last_seen: usage
            .and_then(|u| u.last_seen_ms)
            .and_then(rfc3339_ms)
            .into_iter()
            .chain(old.and_then(|o| o.last_seen.clone()))
            .max(),
    }
}

/// The `UsageTracked` condition of a tenant of `spec`.
fn usage_tracked(spec: &TenantSpec, redis: bool) -> floodgate_crds::Condition {
    let limits = spec.limits.clone().unwrap_or_default();
    match (redis, limits.rpm.is_some(), limits.tpm.is_some()) {
        (false, _, _) => condition(
            USAGE_TRACKED,
            false,
            "NoRedis",
            "the operator has no --redis-url: usedRpm, usedTpm and lastSeen are not read",
        ),
        (true, true, true) => condition(
            USAGE_TRACKED,
            true,
            "LimitsShared",
            "requests and tokens of the current minute, over every gateway replica",
        ),
        (true, true, false) => condition(
            USAGE_TRACKED,
            true,
            "RequestsOnly",
            "requests of the current minute over every gateway replica; usedTpm is not tracked \
             (the gateway records a tenant's tokens only when it has limits.tpm)",
        ),
        (true, false, true) => condition(
            USAGE_TRACKED,
            true,
            "RequestsCounted",
            "tokens of the current minute over every gateway replica; requests counted per \
             minute over every replica (no limits.rpm: usedRpm estimates the last 60 s)",
        ),
        (true, false, false) => condition(
            USAGE_TRACKED,
            true,
            "RequestsCounted",
            "requests counted per minute over every gateway replica (no limits.rpm: usedRpm \
             estimates the last 60 s); usedTpm is not tracked (the gateway records a tenant's \
             tokens only when it has limits.tpm)",
        ),
    }
}

/// Unix milliseconds as RFC 3339 with seconds, as Kubernetes writes times.
fn rfc3339_ms(ms: u64) -> Option<String> {
    let ms = i64::try_from(ms).ok()?;
    let t = k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok()?;
    Some(t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::is_true;
    use floodgate_crds::ConditionStatus;

    fn spec(limits: serde_json::Value) -> TenantSpec {
        serde_json::from_value(serde_json::json!({
            "tier": "pro",
            "keys": [
                {"name": "main", "secretRef": {"name": "acme-keys", "key": "main"}},
                {"name": "next", "secretRef": {"name": "acme-keys", "key": "next"}}
            ],
            "limits": limits
        }))
        .unwrap()
    }

    fn secrets(keys: &[&str]) -> SecretIndex {
        let mut index = SecretIndex::default();
        index.insert("acme-keys", keys.iter().map(|k| (*k).to_owned()));
        index
    }

    fn get<'a>(s: &'a TenantStatus, type_: &str) -> &'a floodgate_crds::Condition {
        s.conditions.iter().find(|c| c.type_ == type_).unwrap()
    }

    #[test]
    fn usage_from_redis_fills_the_columns_and_last_seen() {
        let usage = TenantUsage {
            requests: 7,
            tokens: 1234,
            counted: 0,
            last_seen_ms: Some(1_764_500_000_000),
        };
        let s = compute_status(
            &spec(serde_json::json!({"rpm": 60, "tpm": 100000})),
            Some(3),
            None,
            &secrets(&["main", "next"]),
            Some(&usage),
            true,
            "t1",
        );
        assert_eq!((s.used_rpm, s.used_tpm), (7, 1234));
        assert_eq!(s.last_seen.as_deref(), Some("2025-11-30T10:53:20Z"));
        assert_eq!(s.observed_generation, Some(3));
        for t in [READY, SECRETS_FOUND, KEYS_READY, USAGE_TRACKED] {
            assert!(is_true(&s.conditions, t), "{t}: {:?}", s.conditions);
        }
        assert!(!is_true(&s.conditions, DEGRADED));

        // Redis forgot the tenant (idle for two windows): zero use, the last sighting stays.
        let idle = compute_status(
            &spec(serde_json::json!({"rpm": 60, "tpm": 100000})),
            Some(3),
            Some(&s),
            &secrets(&["main", "next"]),
            Some(&TenantUsage::default()),
            true,
            "t2",
        );
        assert_eq!((idle.used_rpm, idle.used_tpm), (0, 0));
        assert_eq!(idle.last_seen, s.last_seen);
        // Redis unreachable: the last figures stay.
        let unread = compute_status(
            &spec(serde_json::json!({"rpm": 60, "tpm": 100000})),
            Some(3),
            Some(&s),
            &secrets(&["main", "next"]),
            None,
            true,
            "t2",
        );
        assert_eq!((unread.used_rpm, unread.used_tpm), (7, 1234));
    }

    #[test]
    fn an_untracked_figure_is_said_so_not_passed_off_as_idle() {
        let usage = TenantUsage {
            requests: 0,
            tokens: 50,
            counted: 4,
            last_seen_ms: None,
        };
        let tokens_only = compute_status(
            &spec(serde_json::json!({"tpm": 1000})),
            None,
            None,
            &secrets(&["main", "next"]),
            Some(&usage),
            true,
            "t1",
        );
        assert_eq!(get(&tokens_only, USAGE_TRACKED).reason, "RequestsCounted");
        assert_eq!((tokens_only.used_rpm, tokens_only.used_tpm), (4, 50));
        let none = compute_status(
            &spec(serde_json::Value::Null),
            None,
            None,
            &secrets(&["main", "next"]),
            Some(&usage),
            true,
            "t1",
        );
        // Without limits its requests are counted per minute; its tokens are not tracked.
        let tracked = get(&none, USAGE_TRACKED);
        assert_eq!(
            (tracked.status, tracked.reason.as_str()),
            (ConditionStatus::True, "RequestsCounted")
        );
        assert_eq!((none.used_rpm, none.used_tpm), (4, 0));
        let no_redis = compute_status(
            &spec(serde_json::json!({"rpm": 5})),
            None,
            None,
            &secrets(&["main", "next"]),
            None,
            false,
            "t1",
        );
        assert_eq!(get(&no_redis, USAGE_TRACKED).reason, "NoRedis");
    }

    #[test]
    fn a_missing_key_is_named_and_the_tenant_degraded_until_fixed() {
        let s = compute_status(
            &spec(serde_json::Value::Null),
            Some(1),
            None,
            &secrets(&["main"]),
            None,
            false,
            "t1",
        );
        let ready = get(&s, READY);
        assert_eq!(
            (ready.status, ready.reason.as_str()),
            (ConditionStatus::False, "KeyNotFound")
        );
        assert!(
            ready
                .message
                .contains(r#"Secret "acme-keys" has no key "next" or it is empty (key next)"#),
            "{}",
            ready.message
        );
        assert!(is_true(&s.conditions, DEGRADED) && is_true(&s.conditions, SECRETS_FOUND));

        let gone = compute_status(
            &spec(serde_json::Value::Null),
            Some(1),
            Some(&s),
            &SecretIndex::default(),
            None,
            false,
            "t2",
        );
        assert_eq!(get(&gone, READY).reason, "SecretNotFound");
        assert!(!is_true(&gone.conditions, SECRETS_FOUND) && !is_true(&gone.conditions, DEGRADED));

        let fixed = compute_status(
            &spec(serde_json::Value::Null),
            Some(1),
            Some(&gone),
            &secrets(&["main", "next"]),
            None,
            false,
            "t3",
        );
        assert!(is_true(&fixed.conditions, READY));
        assert_eq!(get(&fixed, READY).last_transition_time, "t3");
    }
}
