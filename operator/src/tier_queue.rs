//! TierQueue controller: checks the Secrets that async delivery names (webhook signing secret,
//! SMTP credentials) and writes the tier count and conditions (`SecretsFound`, `Ready`).
//! Live queue figures (`queued`, `deadLetters`, per-tier waits) are not read yet.

use crate::conditions::{self, READY, SECRETS_FOUND, condition};
use crate::context::{Context, object_key};
use crate::error::{Error, Result};
use crate::secrets::{SecretIndex, describe_unresolved};
use floodgate_crds::SecretKeyRef;
use floodgate_crds::tier::{TierQueue, TierQueueSpec, TierQueueStatus};
use kube::ResourceExt;
use kube::runtime::controller::Action;
use kube::runtime::reflector::{ObjectRef, Store};
use std::sync::Arc;
use std::time::Duration;

/// How often a TierQueue is looked at again when nothing it watches changes.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one TierQueue.
pub async fn reconcile(tq: Arc<TierQueue>, ctx: Arc<Context>) -> Result<Action> {
    let ns = tq
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object_key(tq.as_ref())))?;
    let names = secret_refs(&tq.spec).map(|(_, r)| r.name.clone());
    let secrets = SecretIndex::load(&ctx.client, &ns, names).await?;
    let old = tq.status.as_ref();
    let status = compute_status(
        &tq.spec,
        tq.metadata.generation,
        old,
        &secrets,
        &conditions::now(),
    );
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    ctx.write_status(
        tq.as_ref(),
        old,
        &status,
        old_conditions,
        &status.conditions,
    )
    .await?;
    ctx.succeeded(tq.as_ref());
    Ok(Action::requeue(RESYNC))
}

/// Every Secret reference of `spec`, with `tier/what` naming whose it is.
fn secret_refs(spec: &TierQueueSpec) -> impl Iterator<Item = (String, &SecretKeyRef)> {
    spec.tiers.iter().flat_map(|t| {
        let delivery = t.async_.as_ref();
        let webhook = delivery
            .and_then(|d| d.webhook.as_ref())
            .and_then(|w| w.signing_secret_ref.as_ref())
            .map(|r| (format!("{}/webhook signing secret", t.name), r));
        let email = delivery
            .and_then(|d| d.email.as_ref())
            .and_then(|e| e.credentials_secret_ref.as_ref())
            .map(|r| (format!("{}/SMTP credentials", t.name), r));
        webhook.into_iter().chain(email)
    })
}

/// The TierQueues in `store` that the Secret `namespace/name` may change.
pub fn using_secret(
    store: &Store<TierQueue>,
    namespace: Option<&str>,
    name: &str,
) -> Vec<ObjectRef<TierQueue>> {
    store
        .state()
        .iter()
        .filter(|t| t.namespace().as_deref() == namespace)
        .filter(|t| secret_refs(&t.spec).any(|(_, r)| r.name == name))
        .map(|t| ObjectRef::from_obj(t.as_ref()))
        .collect()
}

/// The status of a TierQueue of `spec` at `generation`, given the Secrets that exist.
pub fn compute_status(
    spec: &TierQueueSpec,
    generation: Option<i64>,
    old: Option<&TierQueueStatus>,
    secrets: &SecretIndex,
    now: &str,
) -> TierQueueStatus {
    let tiers = spec.tiers.len();
    let fresh = match describe_unresolved(secrets, secret_refs(spec)) {
        None => vec![
            condition(READY, true, "Valid", format!("{tiers} tiers")),
            condition(
                SECRETS_FOUND,
                true,
                "AllSecretsFound",
                "every referenced Secret key exists",
            ),
        ],
        Some(text) => vec![
            condition(READY, false, "SecretNotFound", text.clone()),
            condition(SECRETS_FOUND, false, "SecretNotFound", text),
        ],
    };
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    TierQueueStatus {
        observed_generation: generation,
        conditions: conditions::merge(old_conditions, fresh, generation, now),
        tier_count: u32::try_from(tiers).unwrap_or(u32::MAX),
        ..old.cloned().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conditions::is_true;

    fn spec() -> TierQueueSpec {
        serde_json::from_value(serde_json::json!({
            "tiers": [
                {"name": "pro", "class": "standard", "maxWaitMs": 30000},
                {"name": "free", "class": "batch", "maxWaitMs": 600000,
                 "batch": {"size": 10, "intervalSeconds": 60},
                 "async": {"notify": ["webhook"], "webhook": {"url": "https://example.com/hook",
                    "signingSecretRef": {"name": "hooks", "key": "signing"}}}}
            ]
        }))
        .unwrap()
    }

    #[test]
    fn a_missing_signing_secret_is_named_until_it_exists() {
        let s = compute_status(&spec(), Some(2), None, &SecretIndex::default(), "t1");
        assert_eq!(s.tier_count, 2);
        assert!(!is_true(&s.conditions, READY));
        let message = &s.conditions[0].message;
        assert!(
            message.contains(r#"Secret "hooks" not found (free/webhook signing secret)"#),
            "{message}"
        );

        let mut secrets = SecretIndex::default();
        secrets.insert("hooks", ["signing".to_owned()]);
        let fixed = compute_status(&spec(), Some(2), Some(&s), &secrets, "t2");
        assert!(is_true(&fixed.conditions, READY) && is_true(&fixed.conditions, SECRETS_FOUND));
        assert_eq!(fixed.observed_generation, Some(2));
    }
}
