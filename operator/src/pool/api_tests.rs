//! The pool reconciler against a scripted API server ([`crate::fixtures`]): the Secrets it
//! reads, the status it applies, the Events it publishes.

use super::*;
use crate::autoscale::DemandSource;
use crate::fixtures::{self, ApiServer, condition, field};
use serde_json::{Value, json};

const STATUS: &str = "/apis/floodgate.dev/v1alpha1/namespaces/ai/aiproviderpools/team/status";

/// Pool `ai/team` at `generation`: provider `claude` with keys `key1`, `key2` of Secret
/// `claude-keys`, 20 RPM each.
fn pool(generation: i64) -> AIProviderPool {
    let spec = serde_json::from_value(json!({
        "providers": [{"name": "claude", "type": "anthropic", "models": [{"name": "claude-sonnet-4"}],
            "keys": [{"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
                     {"secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 20}]}]
    }))
    .unwrap();
    let mut pool = AIProviderPool::new("team", spec);
    pool.metadata.namespace = Some("ai".into());
    pool.metadata.generation = Some(generation);
    pool
}

/// `pool` carrying the status of an applied status patch (what the API server answers).
fn with_status(pool: &AIProviderPool, patch: &Value) -> AIProviderPool {
    let mut pool = pool.clone();
    pool.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
    pool
}

/// Takes the status apply, checks its envelope, answers it and returns it.
async fn expect_status(api: &mut ApiServer, pool: &AIProviderPool) -> Value {
    let call = api.expect_apply(STATUS).await;
    let patch = call.body.clone();
    assert_eq!(
        (field(&patch, "apiVersion"), field(&patch, "kind")),
        ("floodgate.dev/v1alpha1".into(), "AIProviderPool".into())
    );
    call.ok(&serde_json::to_value(with_status(pool, &patch)).unwrap());
    patch
}

#[tokio::test(start_paused = true)]
async fn a_pool_whose_keys_all_resolve_is_applied_ready_with_its_capacity() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let p = pool(3);
    let script = {
        let p = p.clone();
        async move {
            api.expect_secret("ai", "claude-keys", Some(&["key1", "key2"]))
                .await;
            let patch = expect_status(&mut api, &p).await;
            let s = &patch["status"];
            assert_eq!(s["observedGeneration"], 3);
            assert_eq!(
                (s["readyKeys"].clone(), s["totalKeys"].clone()),
                (json!(2), json!(2))
            );
            assert_eq!(s["capacityRpm"], 40);
            assert_eq!(s["keys"], "2/2");
            for type_ in [READY, SECRETS_FOUND, KEYS_READY] {
                let c = condition(&patch, type_);
                assert_eq!(c["status"], "True", "{type_}: {c}");
                assert_eq!(c["observedGeneration"], 3, "{type_}");
                assert!(!field(c, "lastTransitionTime").is_empty(), "{type_}");
            }
            assert_eq!(condition(&patch, DEGRADED)["status"], "False");
            // Ready turning True is announced; Degraded False is not.
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Normal".into(), "AllKeysReady".into())]
            );
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(p), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(RESYNC));
}

#[tokio::test(start_paused = true)]
async fn a_missing_key_is_named_in_a_status_not_ready_and_a_warning_event() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let p = pool(1);
    let script = {
        let p = p.clone();
        async move {
            api.expect_secret("ai", "claude-keys", Some(&["key1"]))
                .await;
            let patch = expect_status(&mut api, &p).await;
            let ready = condition(&patch, READY);
            assert_eq!(
                (ready["status"].clone(), ready["reason"].clone()),
                (json!("False"), json!("KeyNotFound"))
            );
            let message = field(ready, "message");
            assert!(
                message.contains(
                    r#"Secret "claude-keys" has no key "key2" or it is empty (claude/claude-1)"#
                ),
                "{message}"
            );
            assert!(
                !message.contains("sk-test"),
                "a key's value leaked: {message}"
            );
            assert_eq!(condition(&patch, DEGRADED)["status"], "True");
            assert_eq!(condition(&patch, SECRETS_FOUND)["status"], "True");
            assert_eq!(patch["status"]["capacityRpm"], 20);
            assert_eq!(
                api.expect_events("ai", 2).await,
                [
                    ("Warning".into(), "KeyNotFound".into()),
                    ("Warning".into(), "KeyNotFound".into())
                ]
            );
            api
        }
    };
    fixtures::run(reconcile(Arc::new(p), ctx), script)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_missing_secret_is_named_and_secrets_found_is_false() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let p = pool(1);
    let script = {
        let p = p.clone();
        async move {
            api.expect_secret("ai", "claude-keys", None).await;
            let patch = expect_status(&mut api, &p).await;
            let found = condition(&patch, SECRETS_FOUND);
            assert_eq!(
                (found["status"].clone(), found["reason"].clone()),
                (json!("False"), json!("SecretNotFound"))
            );
            assert!(
                field(found, "message").contains(r#"Secret "claude-keys" not found"#),
                "{found}"
            );
            // No capacity left: not ready, and not "degraded" either.
            assert_eq!(condition(&patch, READY)["status"], "False");
            assert_eq!(condition(&patch, DEGRADED)["reason"], "NoCapacity");
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Warning".into(), "SecretNotFound".into())]
            );
            api
        }
    };
    fixtures::run(reconcile(Arc::new(p), ctx), script)
        .await
        .unwrap();
}

/// Runs one reconcile of `p` against Secret `claude-keys` holding `keys`, expecting a status
/// write followed by `events` Events, or (`None`) no write at all; returns the status patch.
async fn reconcile_once(
    p: &AIProviderPool,
    keys: &'static [&'static str],
    events: Option<usize>,
) -> Option<Value> {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let script = {
        let p = p.clone();
        async move {
            api.expect_secret("ai", "claude-keys", Some(keys)).await;
            let mut patch = None;
            if let Some(events) = events {
                patch = Some(expect_status(&mut api, &p).await);
                api.expect_events("ai", events).await;
            }
            let _ = tx.send(patch);
            api
        }
    };
    fixtures::run(reconcile(Arc::new(p.clone()), ctx), script)
        .await
        .unwrap();
    rx.await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn status_follows_the_generation_and_the_secret_and_an_unchanged_pass_writes_nothing() {
    // Broken at generation 1.
    let broken = reconcile_once(&pool(1), &["key1"], Some(2)).await.unwrap();
    let broken_pool = with_status(&pool(1), &broken);
    let broken_at = field(condition(&broken, READY), "lastTransitionTime");

    // The same world again: no status write, no Event (the script expects only the GET).
    assert_eq!(reconcile_once(&broken_pool, &["key1"], None).await, None);

    // A new generation, still broken: observedGeneration moves, the transition time does not,
    // and no Event (no condition changed status).
    let mut next = broken_pool.clone();
    next.metadata.generation = Some(2);
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let script = {
        let next = next.clone();
        async move {
            api.expect_secret("ai", "claude-keys", Some(&["key1"]))
                .await;
            let patch = expect_status(&mut api, &next).await;
            assert_eq!(patch["status"]["observedGeneration"], 2);
            let ready = condition(&patch, READY);
            assert_eq!(ready["observedGeneration"], 2);
            assert_eq!(field(ready, "lastTransitionTime"), broken_at);
            api
        }
    };
    fixtures::run(reconcile(Arc::new(next.clone()), ctx), script)
        .await
        .unwrap();

    // The Secret is fixed: Ready, with a Normal Event.
    let fixed = reconcile_once(&next, &["key1", "key2"], Some(1))
        .await
        .unwrap();
    assert_eq!(condition(&fixed, READY)["status"], "True");
    assert_eq!(condition(&fixed, KEYS_READY)["status"], "True");
}

/// A Redis URL nothing listens on: every read fails (connection refused).
async fn dead_redis() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    drop(listener);
    url
}

#[tokio::test(start_paused = true)]
async fn a_failed_usage_read_clears_the_figures_and_says_why_in_usage_tracked() {
    let (ctx, mut api) = fixtures::context_with_redis(&dead_redis().await);
    // What an earlier pass read: 17 requests, claude's circuit open on a replica.
    let mut p = pool(1);
    p.status = Some(serde_json::from_value(json!({
        "observedGeneration": 1, "providerCount": 1, "readyKeys": 2, "totalKeys": 2,
        "keys": "2/2", "capacityRpm": 40, "usedRpm": 17, "openCircuits": 1,
        "providers": [{"name": "claude", "circuit": "open", "circuitReplicas": 1,
                       "circuitOpenReplicas": 1, "readyKeys": 2, "totalKeys": 2, "usedRpm": 17}],
        "conditions": [
            {"type": "UsageTracked", "status": "True", "reason": "UsageRead", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z", "observedGeneration": 1}]
    }))
    .unwrap());
    let script = {
        let p = p.clone();
        async move {
            api.expect_secret("ai", "claude-keys", Some(&["key1", "key2"]))
                .await;
            let patch = expect_status(&mut api, &p).await;
            let s = &patch["status"];
            assert_eq!(s["usedRpm"], 0, "{s}");
            assert_eq!(s["openCircuits"], Value::Null, "{s}");
            let claude = &s["providers"][0];
            assert_eq!(
                (claude["usedRpm"].clone(), claude["circuit"].clone()),
                (json!(0), json!("unknown")),
                "{claude}"
            );
            let tracked = condition(&patch, USAGE_TRACKED);
            assert_eq!(
                (tracked["status"].clone(), tracked["reason"].clone()),
                (json!("False"), json!("UsageUnreadable"))
            );
            assert!(
                field(tracked, "message").contains("cannot read"),
                "{tracked}"
            );
            // Still Ready: its keys work whatever Redis does.
            assert_eq!(condition(&patch, READY)["status"], "True");
            api.expect_events("ai", 1).await;
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(p), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(USAGE_REFRESH));
}

#[tokio::test(start_paused = true)]
async fn a_gateway_selector_matching_no_pod_reads_as_untracked_naming_it_not_as_no_use() {
    let (ctx, mut api) = fixtures::context_with_gateway(crate::gateway::Targets::Pods {
        namespace: "floodgate".into(),
        selector: "app=wrong".into(),
        port: 9090,
    });
    let p = pool(1);
    let script = {
        let p = p.clone();
        async move {
            api.expect_secret("ai", "claude-keys", Some(&["key1", "key2"]))
                .await;
            api.expect(http::Method::GET, "/api/v1/namespaces/floodgate/pods")
                .await
                .ok(&json!({"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": []}));
            let patch = expect_status(&mut api, &p).await;
            assert_eq!(patch["status"]["usedRpm"], 0);
            let tracked = condition(&patch, USAGE_TRACKED);
            assert_eq!(
                (tracked["status"].clone(), tracked["reason"].clone()),
                (json!("False"), json!("NoGatewayPods"))
            );
            let message = field(tracked, "message");
            assert!(
                message.contains(r#"namespace "floodgate""#) && message.contains(r#""app=wrong""#),
                "{message}"
            );
            assert!(message.contains("--gateway-metrics-selector"), "{message}");
            api.expect_events("ai", 1).await;
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(p), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(USAGE_REFRESH));
}
