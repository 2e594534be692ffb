//! The RoutingPolicy reconciler against a scripted API server ([`crate::fixtures`]).

use super::*;
use crate::autoscale::DemandSource;
use crate::conditions::{READY, TARGETS_FOUND};
use crate::fixtures::{self, ApiServer, condition, field};
use http::Method;
use serde_json::{Value, json};

const STATUS: &str = "/apis/floodgate.dev/v1alpha1/namespaces/ai/routingpolicies/routing/status";
const POOLS: &str = "/apis/floodgate.dev/v1alpha1/namespaces/ai/aiproviderpools";
const MODELS: &str = "/apis/floodgate.dev/v1alpha1/namespaces/ai/localmodeldeployments";

/// Rules sending simple prompts to the local model `llama` then the pool `premium`, and
/// everything else to `premium` (also the premium pool).
fn policy(local: bool) -> RoutingPolicy {
    let mut rules = vec![json!({"name": "rest", "targets": [{"pool": "premium"}]})];
    if local {
        rules.insert(
            0,
            json!({"name": "local-first", "match": {"classes": ["simple"]},
            "targets": [{"localModel": "llama"}, {"pool": "premium"}]}),
        );
    }
    let spec = serde_json::from_value(json!({"rules": rules, "premiumPool": "premium"})).unwrap();
    let mut rp = RoutingPolicy::new("routing", spec);
    rp.metadata.namespace = Some("ai".into());
    rp.metadata.generation = Some(3);
    rp
}

/// Answers a metadata list of `path` with objects named `names`.
async fn expect_list(api: &mut ApiServer, path: &str, names: &[&str]) {
    let call = api.expect(Method::GET, path).await;
    let items: Vec<Value> = names
        .iter()
        .map(|n| {
            json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata",
                         "metadata": {"name": n, "namespace": "ai"}})
        })
        .collect();
    call.ok(
        &json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadataList",
                    "metadata": {}, "items": items}),
    );
}

/// Takes the status apply, answers it with `rp` carrying that status, and returns both.
async fn expect_status(api: &mut ApiServer, rp: &RoutingPolicy) -> (Value, RoutingPolicy) {
    let call = api.expect_apply(STATUS).await;
    let patch = call.body.clone();
    let mut answer = rp.clone();
    answer.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
    call.ok(&serde_json::to_value(&answer).unwrap());
    (patch, answer)
}

#[tokio::test(start_paused = true)]
async fn a_missing_local_model_is_named_then_its_creation_makes_the_policy_ready() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let rp = policy(true);
    let (tx, rx) = tokio::sync::oneshot::channel();
    let script = {
        let rp = rp.clone();
        async move {
            expect_list(&mut api, POOLS, &["premium", "other"]).await;
            expect_list(&mut api, MODELS, &["mistral"]).await;
            let (patch, answer) = expect_status(&mut api, &rp).await;
            assert_eq!(patch["status"]["observedGeneration"], 3);
            assert_eq!(patch["status"]["ruleCount"], 2);
            for type_ in [READY, TARGETS_FOUND] {
                let c = condition(&patch, type_);
                assert_eq!(c["status"], "False", "{type_}: {c}");
                assert_eq!(c["reason"], "TargetNotFound");
                assert_eq!(
                    field(c, "message"),
                    r#"LocalModelDeployment "llama" not found (rule local-first)"#
                );
                assert_eq!(c["observedGeneration"], 3);
            }
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Warning".into(), "TargetNotFound".into())]
            );
            let _ = tx.send(answer);
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(rp), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(RESYNC));

    // The model is created: Ready, a Normal Event, the transition time moved.
    let broken = rx.await.unwrap();
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let script = {
        let broken = broken.clone();
        async move {
            expect_list(&mut api, POOLS, &["premium"]).await;
            expect_list(&mut api, MODELS, &["llama"]).await;
            let (patch, _) = expect_status(&mut api, &broken).await;
            assert_eq!(condition(&patch, READY)["status"], "True");
            assert_eq!(
                condition(&patch, TARGETS_FOUND)["reason"],
                "AllTargetsFound"
            );
            assert_eq!(
                api.expect_events("ai", 1).await,
                [("Normal".into(), "AllTargetsFound".into())]
            );
            api
        }
    };
    fixtures::run(reconcile(Arc::new(broken), ctx), script)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_missing_pool_is_named_with_every_place_that_names_it() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let rp = policy(false);
    // Only pools are named: the local models are not listed.
    let script = {
        let rp = rp.clone();
        async move {
            expect_list(&mut api, POOLS, &[]).await;
            let (patch, _) = expect_status(&mut api, &rp).await;
            assert_eq!(
                field(condition(&patch, READY), "message"),
                r#"AIProviderPool "premium" not found (rule rest, premiumPool)"#
            );
            api.expect_events("ai", 1).await;
            api
        }
    };
    fixtures::run(reconcile(Arc::new(rp), ctx), script)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn an_unchanged_policy_is_not_written_again() {
    let mut rp = policy(true);
    let mut existing = BTreeSet::new();
    existing.insert((TargetKind::Pool, "premium".to_owned()));
    existing.insert((TargetKind::LocalModel, "llama".to_owned()));
    rp.status = Some(compute_status(
        &rp.spec,
        Some(3),
        None,
        &existing,
        "2026-01-01T00:00:00Z",
    ));
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let script = async move {
        expect_list(&mut api, POOLS, &["premium"]).await;
        expect_list(&mut api, MODELS, &["llama"]).await;
        api
    };
    fixtures::run(reconcile(Arc::new(rp), ctx), script)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_failed_list_is_an_error_for_the_backoff() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let rp = policy(false);
    let script = async move {
        let call = api.expect(Method::GET, POOLS).await;
        call.answer(
            http::StatusCode::FORBIDDEN,
            &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "forbidden", "reason": "Forbidden", "code": 403}),
        );
        api
    };
    let result = fixtures::run(reconcile(Arc::new(rp.clone()), ctx.clone()), script).await;
    let error = result.unwrap_err();
    assert_eq!(error.metric_label(), "kube_api");
    let delays: Vec<_> = (0..3)
        .map(|_| crate::context::error_policy(Arc::new(rp.clone()), &error, ctx.clone()))
        .collect();
    assert_eq!(
        delays,
        [1, 2, 4].map(|s| Action::requeue(Duration::from_secs(s)))
    );
}
