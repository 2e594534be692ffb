//! TierQueue controller: checks the Secrets that async delivery names (webhook signing secret,
//! SMTP credentials and CA) and writes the tier count and conditions (`SecretsFound`, `Ready`), and,
//! with Redis, the live queue figures the gateway's replicas share: requests waiting per tier
//! and per class, the oldest wait, and per tier over the last five minutes its SLO attainment
//! (the share of requests within the tier's wait target) and p95 wait. Dead letters are not
//! read yet.

use crate::conditions::{self, READY, SECRETS_FOUND, condition};
use crate::context::{Context, object_key};
use crate::error::{Error, Result};
use crate::secrets::{SecretIndex, describe_unresolved};
use crate::usage::QueueUsage;
use floodgate_crds::SecretKeyRef;
use floodgate_crds::redis_keys::wait_percentile_ms;
use floodgate_crds::tier::{ClassStatus, TierQueue, TierQueueSpec, TierQueueStatus, TierStatus};
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
    let queues = match &ctx.usage {
        Some(reader) => match reader.queue_usage(&ns, &tq.name_any()).await {
            Ok(queues) => Some(queues),
            Err(e) => {
                // Figures, not health: keep the last ones and say why in the log.
                tracing::warn!(object = %object_key(tq.as_ref()), error = %e, "cannot read queue figures");
                None
            }
        },
        None => None,
    };
    let old = tq.status.as_ref();
    let mut status = compute_status(
        &tq.spec,
        tq.metadata.generation,
        old,
        &secrets,
        &conditions::now(),
    );
    if let Some(queues) = &queues {
        with_queues(&mut status, &tq.spec, queues);
    }
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
    Ok(Action::requeue(if ctx.usage.is_some() {
        crate::pool::USAGE_REFRESH
    } else {
        RESYNC
    }))
}

/// Fills `status` with the queue figures of `queues`: per tier of `spec` (a tier no replica
/// reports waits for nothing), per class, and over all.
pub fn with_queues(status: &mut TierQueueStatus, spec: &TierQueueSpec, queues: &QueueUsage) {
    status.tiers = spec
        .tiers
        .iter()
        .map(|t| {
            let q = queues.get(&t.name).cloned().unwrap_or_default();
            let recent = q.within + q.missed;
            TierStatus {
                name: t.name.clone(),
                queued: q.waiting,
                oldest_wait_ms: q.oldest_wait_ms,
                p95_wait_ms: wait_percentile_ms(&q.waits, 95),
                recent_requests: recent,
                within_target: q.within,
                slo_attainment_percent: (recent > 0).then(|| percent(q.within, recent)),
            }
        })
        .collect();
    let mut classes: Vec<ClassStatus> = Vec::new();
    for (t, s) in spec.tiers.iter().zip(&status.tiers) {
        match classes.iter_mut().find(|c| c.class == t.class) {
            Some(c) => {
                c.queued += s.queued;
                c.oldest_wait_ms = c.oldest_wait_ms.max(s.oldest_wait_ms);
            }
            None => classes.push(ClassStatus {
                class: t.class,
                queued: s.queued,
                oldest_wait_ms: s.oldest_wait_ms,
            }),
        }
    }
    status.queued = status.tiers.iter().map(|t| t.queued).sum();
    status.oldest_wait_ms = status
        .tiers
        .iter()
        .map(|t| t.oldest_wait_ms)
        .max()
        .unwrap_or(0);
    status.classes = classes;
}

/// `part` of `whole` (not 0) in percent with one decimal, rounded down so that a tier that
/// missed even one request of many never reads `100.0`.
fn percent(part: u64, whole: u64) -> String {
    let tenths = u128::from(part) * 1000 / u128::from(whole);
    format!("{}.{}", tenths / 10, tenths % 10)
}

/// Every Secret reference of `spec`, with `tier/what` naming whose it is.
fn secret_refs(spec: &TierQueueSpec) -> impl Iterator<Item = (String, &SecretKeyRef)> {
    spec.tiers.iter().flat_map(|t| {
        let delivery = t.async_.as_ref();
        let webhook = delivery
            .and_then(|d| d.webhook.as_ref())
            .and_then(|w| w.signing_secret_ref.as_ref())
            .map(|r| (format!("{}/webhook signing secret", t.name), r));
        let email = delivery.and_then(|d| d.email.as_ref());
        let credentials = email
            .and_then(|e| e.credentials_secret_ref.as_ref())
            .map(|r| (format!("{}/SMTP credentials", t.name), r));
        let ca = email
            .and_then(|e| e.ca_secret_ref.as_ref())
            .map(|r| (format!("{}/SMTP CA", t.name), r));
        webhook.into_iter().chain(credentials).chain(ca)
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
mod api_tests;
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

    #[test]
    fn attainment_is_rounded_down_to_a_tenth_of_a_percent() {
        assert_eq!(percent(1, 1), "100.0");
        assert_eq!(percent(9_999, 10_000), "99.9");
        assert_eq!(percent(0, 3), "0.0");
        assert_eq!(percent(2, 3), "66.6");
    }

    #[test]
    fn queue_figures_fill_tiers_classes_and_the_oldest_wait() {
        use crate::usage::TierQueueUsage;
        use floodgate_crds::QueueClass;
        let mut spec = spec();
        spec.tiers.push(
            serde_json::from_value(serde_json::json!(
                {"name": "team", "class": "standard", "maxWaitMs": 30000}
            ))
            .unwrap(),
        );
        let queues: QueueUsage = [
            (
                "pro".to_owned(),
                TierQueueUsage {
                    waiting: 3,
                    oldest_wait_ms: 1200,
                    // 199 of 200 within the target; the 190th fastest waited at most 100 ms.
                    within: 199,
                    missed: 1,
                    waits: vec![150, 30, 15, 4, 0, 1],
                },
            ),
            (
                "team".to_owned(),
                TierQueueUsage {
                    waiting: 2,
                    oldest_wait_ms: 4000,
                    ..TierQueueUsage::default()
                },
            ),
            // A tier the spec no longer lists is not shown.
            (
                "gone".to_owned(),
                TierQueueUsage {
                    waiting: 9,
                    oldest_wait_ms: 9000,
                    ..TierQueueUsage::default()
                },
            ),
        ]
        .into();
        let mut s = compute_status(&spec, Some(1), None, &SecretIndex::default(), "t1");
        with_queues(&mut s, &spec, &queues);
        assert_eq!((s.queued, s.oldest_wait_ms), (5, 4000));
        let tiers: Vec<_> = s
            .tiers
            .iter()
            .map(|t| (t.name.as_str(), t.queued, t.oldest_wait_ms))
            .collect();
        assert_eq!(tiers, [("pro", 3, 1200), ("free", 0, 0), ("team", 2, 4000)]);
        let slo: Vec<_> = s
            .tiers
            .iter()
            .map(|t| {
                let attainment = t.slo_attainment_percent.as_deref();
                (
                    t.recent_requests,
                    t.within_target,
                    attainment,
                    t.p95_wait_ms,
                )
            })
            .collect();
        // 199/200 is 99.5%; a tier without requests has no attainment and no p95.
        assert_eq!(
            slo,
            [
                (200, 199, Some("99.5"), Some(100)),
                (0, 0, None, None),
                (0, 0, None, None)
            ]
        );
        let classes: Vec<_> = s
            .classes
            .iter()
            .map(|c| (c.class, c.queued, c.oldest_wait_ms))
            .collect();
        assert_eq!(
            classes,
            [(QueueClass::Standard, 5, 4000), (QueueClass::Batch, 0, 0)]
        );
        // The figures stay when the next pass cannot read them (status is built from the old).
        let again = compute_status(&spec, Some(1), Some(&s), &SecretIndex::default(), "t2");
        assert_eq!((again.queued, again.tiers.len()), (5, 3));
    }
}
