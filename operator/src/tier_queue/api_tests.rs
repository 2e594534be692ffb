//! The TierQueue reconciler against a scripted API server ([`crate::fixtures`]).

use super::*;
use crate::autoscale::DemandSource;
use crate::fixtures::{self, condition, field};
use serde_json::json;

const STATUS: &str = "/apis/floodgate.dev/v1alpha1/namespaces/ai/tierqueues/tiers/status";

fn tier_queue() -> TierQueue {
    let spec = serde_json::from_value(json!({"tiers": [
        {"name": "pro", "class": "standard", "maxWaitMs": 30000},
        {"name": "free", "class": "batch", "maxWaitMs": 600000,
         "batch": {"size": 10, "intervalSeconds": 60},
         "async": {"notify": ["webhook"], "webhook": {"url": "https://example.com/hook",
            "signingSecretRef": {"name": "hooks", "key": "signing"}}}}
    ]}))
    .unwrap();
    let mut tq = TierQueue::new("tiers", spec);
    tq.metadata.namespace = Some("ai".into());
    tq.metadata.generation = Some(4);
    tq
}

#[tokio::test(start_paused = true)]
async fn a_missing_signing_secret_is_named_in_status_and_a_warning_event_then_fixed() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let tq = tier_queue();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let script = {
        let tq = tq.clone();
        async move {
            api.expect_secret("ai", "hooks", None).await;
            let call = api.expect_apply(STATUS).await;
            let patch = call.body.clone();
            let mut answer = tq.clone();
            answer.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
            call.ok(&serde_json::to_value(&answer).unwrap());
            assert_eq!(patch["status"]["observedGeneration"], 4);
            assert_eq!(patch["status"]["tierCount"], 2);
            let ready = condition(&patch, READY);
            assert_eq!(ready["status"], "False");
            assert!(
                field(ready, "message")
                    .contains(r#"Secret "hooks" not found (free/webhook signing secret)"#),
                "{ready}"
            );
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Warning".into(), "SecretNotFound".into())]
            );
            let _ = tx.send(answer);
            api
        }
    };
    fixtures::run(reconcile(Arc::new(tq), ctx.clone()), script)
        .await
        .unwrap();

    // The Secret appears: Ready, a Normal Event.
    let broken = rx.await.unwrap();
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let script = {
        let broken = broken.clone();
        async move {
            api.expect_secret("ai", "hooks", Some(&["signing"])).await;
            let call = api.expect_apply(STATUS).await;
            assert_eq!(condition(&call.body, READY)["status"], "True");
            assert_eq!(condition(&call.body, SECRETS_FOUND)["status"], "True");
            call.ok(&serde_json::to_value(&broken).unwrap());
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Normal".into(), "Valid".into())]
            );
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(broken), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(RESYNC));
}

#[tokio::test(start_paused = true)]
async fn a_missing_smtp_ca_key_is_named_in_status_though_the_credentials_exist() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let spec = serde_json::from_value(json!({"tiers": [
        {"name": "free", "class": "batch", "maxWaitMs": 600000,
         "batch": {"size": 10, "intervalSeconds": 60},
         "async": {"notify": ["email"], "email": {"from": "gw@example.com",
            "smtpServer": "smtp.example.com:587",
            "credentialsSecretRef": {"name": "smtp", "key": "login"},
            "caSecretRef": {"name": "smtp", "key": "ca"}}}}
    ]}))
    .unwrap();
    let mut tq = TierQueue::new("tiers", spec);
    tq.metadata.namespace = Some("ai".into());
    tq.metadata.generation = Some(1);
    let script = {
        let tq = tq.clone();
        async move {
            // The Secret has the login but not the CA the server's certificate needs.
            api.expect_secret("ai", "smtp", Some(&["login"])).await;
            let call = api.expect_apply(STATUS).await;
            let patch = call.body.clone();
            call.ok(&serde_json::to_value(&tq).unwrap());
            for name in [READY, SECRETS_FOUND] {
                let c = condition(&patch, name);
                assert_eq!(c["status"], "False", "{c}");
                assert_eq!(
                    field(c, "message"),
                    r#"Secret "smtp" has no key "ca" or it is empty (free/SMTP CA)"#
                );
            }
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Warning".into(), "SecretNotFound".into())]
            );
            api
        }
    };
    fixtures::run(reconcile(Arc::new(tq), ctx), script)
        .await
        .unwrap();
}
