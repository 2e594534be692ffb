//! The LocalModelDeployment reconciler against a scripted API server ([`crate::fixtures`]):
//! the claim, Service and Deployment it applies, the scale it writes on the demand it reads,
//! and the status and Events that record both.

use super::*;
use crate::autoscale::DemandSource;
use crate::fixtures::{self, ApiServer, condition, field};
use http::Method;
use serde_json::{Value, json};

const BASE: &str = "/apis/floodgate.dev/v1alpha1/namespaces/models/localmodeldeployments/llama";

/// LocalModelDeployment `models/llama` at generation 2 with `extra` merged into its spec.
fn lmd(extra: Value) -> LocalModelDeployment {
    let mut spec =
        json!({"model": "llama3.1:8b", "classes": ["simple"], "ollama": {"numParallel": 2}});
    if let (Some(spec), Some(extra)) = (spec.as_object_mut(), extra.as_object()) {
        spec.extend(extra.clone());
    }
    let mut lmd = LocalModelDeployment::new("llama", serde_json::from_value(spec).unwrap());
    lmd.metadata.namespace = Some("models".into());
    lmd.metadata.generation = Some(2);
    lmd.metadata.uid = Some("3f1c-uid".into());
    lmd
}

/// `lmd` autoscaled between 1 and 8 (queue 10 per replica, 2 s latency, 300 s cooldown),
/// at `replicas` with all of them ready.
fn autoscaled(replicas: i32) -> LocalModelDeployment {
    let mut lmd = lmd(json!({
        "replicas": replicas,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "queueDepth": 10, "latencyMs": 2000,
                        "cooldownSeconds": 300}
    }));
    lmd.status = Some(LocalModelDeploymentStatus {
        replicas,
        ready_replicas: replicas,
        ..LocalModelDeploymentStatus::default()
    });
    lmd
}

fn demand(queued: u64, in_flight: u64, reporters: u32) -> DemandSource {
    DemandSource::fixed([(
        "models/llama".to_owned(),
        autoscale::Demand {
            queued,
            in_flight,
            latency_p95_ms: 300,
            spilled: 0,
            reporters,
        },
    )])
}

/// Takes the Service and Deployment applies (and the shared claim's first when `claim`),
/// answers the Deployment with `ready` of its replicas ready, and returns the Deployment
/// applied.
async fn expect_children(api: &mut ApiServer, claim: bool, ready: i32) -> Value {
    if claim {
        let pvc = api
            .expect_apply("/api/v1/namespaces/models/persistentvolumeclaims/llama-models")
            .await;
        assert_eq!(pvc.body["spec"]["resources"]["requests"]["storage"], "50Gi");
        assert_eq!(
            pvc.body["metadata"]["ownerReferences"][0]["uid"],
            "3f1c-uid"
        );
        let mut bound = pvc.body.clone();
        bound["status"] = json!({"phase": "Bound"});
        pvc.ok(&bound);
    }
    let service = api
        .expect_apply("/api/v1/namespaces/models/services/llama")
        .await;
    assert_eq!(service.body["spec"]["ports"][0]["port"], 11434);
    assert_eq!(
        service.body["metadata"]["ownerReferences"][0]["kind"],
        "LocalModelDeployment"
    );
    service.echo();
    let call = api
        .expect_apply("/apis/apps/v1/namespaces/models/deployments/llama")
        .await;
    let applied = call.body.clone();
    let replicas = applied["spec"]["replicas"].as_i64().unwrap_or(1);
    let mut answer = applied.clone();
    answer["metadata"]["generation"] = json!(1);
    answer["status"] = json!({
        "observedGeneration": 1, "replicas": replicas, "updatedReplicas": replicas,
        "readyReplicas": ready, "availableReplicas": ready
    });
    call.ok(&answer);
    applied
}

/// Takes the status apply, answers it and returns it.
async fn expect_status(api: &mut ApiServer, lmd: &LocalModelDeployment) -> Value {
    let call = api.expect_apply(&format!("{BASE}/status")).await;
    let patch = call.body.clone();
    assert_eq!(field(&patch, "kind"), "LocalModelDeployment");
    let mut answer = lmd.clone();
    answer.status = Some(serde_json::from_value(patch["status"].clone()).unwrap());
    call.ok(&serde_json::to_value(answer).unwrap());
    patch
}

/// Takes the scale write, which must set `to` replicas, and answers it.
async fn expect_scale(api: &mut ApiServer, to: i32) {
    let call = api.expect(Method::PATCH, &format!("{BASE}/scale")).await;
    assert_eq!(call.content_type, "application/merge-patch+json");
    assert_eq!(call.body, json!({"spec": {"replicas": to}}));
    call.ok(&json!({
        "apiVersion": "autoscaling/v1", "kind": "Scale",
        "metadata": {"name": "llama", "namespace": "models"},
        "spec": {"replicas": to}, "status": {"replicas": to}
    }));
}

#[tokio::test(start_paused = true)]
async fn a_model_gets_its_claim_service_and_gpu_deployment_then_a_ready_status() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let model = lmd(json!({
        "replicas": 2, "storage": {"size": "50Gi"}, "resources": {"gpu": 1, "memory": "16Gi"}
    }));
    let script = {
        let model = model.clone();
        async move {
            // ReadWriteOnce: no shared claim, each pod gets its own from the template.
            let d = expect_children(&mut api, false, 1).await;
            assert_eq!(d["spec"]["replicas"], 2);
            let pod = &d["spec"]["template"]["spec"];
            let template = &pod["volumes"][0]["ephemeral"]["volumeClaimTemplate"];
            assert_eq!(template["spec"]["resources"]["requests"]["storage"], "50Gi");
            assert_eq!(template["spec"]["accessModes"], json!(["ReadWriteOnce"]));
            assert_eq!(
                template["metadata"]["labels"]["floodgate.dev/local-model"],
                "llama"
            );
            let ollama = &pod["containers"][0];
            assert_eq!(ollama["resources"]["limits"]["nvidia.com/gpu"], "1");
            assert!(
                ollama["env"]
                    .as_array()
                    .unwrap()
                    .contains(&json!({"name": "OLLAMA_NUM_PARALLEL", "value": "2"}))
            );
            assert_eq!(ollama["readinessProbe"]["httpGet"]["path"], "/api/tags");
            let pull = &pod["initContainers"][0];
            assert!(
                pull["env"]
                    .as_array()
                    .unwrap()
                    .contains(&json!({"name": "FLOODGATE_MODEL", "value": "llama3.1:8b"}))
            );
            assert_eq!(d["metadata"]["ownerReferences"][0]["controller"], true);

            let patch = expect_status(&mut api, &model).await;
            let s = &patch["status"];
            assert_eq!(s["observedGeneration"], 2);
            assert_eq!(
                (s["replicas"].clone(), s["readyReplicas"].clone()),
                (json!(2), json!(1))
            );
            assert_eq!(s["endpoint"], "http://llama.models.svc:11434");
            assert_eq!(s["selector"], "floodgate.dev/local-model=llama");
            assert_eq!(condition(&patch, READY)["status"], "True");
            assert_eq!(condition(&patch, PROGRESSING)["status"], "True");
            // Not autoscaled: no autoscaling condition.
            assert_eq!(condition(&patch, AUTOSCALING_ACTIVE), &Value::Null);
            assert_eq!(
                api.expect_events("models", 2).await,
                [
                    ("Normal".into(), "ReplicasReady".into()),
                    ("Normal".into(), "RollingOut".into())
                ]
            );
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(model), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(RESYNC));
}

/// Reconciles `model` without a demand source while `script` plays the API server (it gets
/// the server and the model, and hands the server back when done).
async fn reconciled<F, Fut>(model: LocalModelDeployment, script: F) -> Result<Action>
where
    F: FnOnce(ApiServer, LocalModelDeployment) -> Fut,
    Fut: std::future::Future<Output = ApiServer> + Send + 'static,
{
    let (ctx, api) = fixtures::context(DemandSource::Unconfigured);
    let played = script(api, model.clone());
    fixtures::run(reconcile(Arc::new(model), ctx), played).await
}

#[tokio::test(start_paused = true)]
async fn a_shared_claim_is_applied_and_owned_with_read_write_many() {
    let model = lmd(json!({"storage": {"size": "50Gi", "accessMode": "ReadWriteMany"}}));
    reconciled(model, async |mut api, model| {
        let d = expect_children(&mut api, true, 1).await;
        let volume = &d["spec"]["template"]["spec"]["volumes"][0];
        assert_eq!(volume["persistentVolumeClaim"]["claimName"], "llama-models");
        expect_status(&mut api, &model).await;
        api.expect_events("models", 1).await;
        api
    })
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_replicas_pending_claim_is_named_while_none_is_ready() {
    let model = lmd(json!({"replicas": 2, "storage": {"size": "50Gi"}}));
    reconciled(model, async |mut api, model| {
        expect_children(&mut api, false, 0).await;
        let list = api
            .expect(Method::GET, "/api/v1/namespaces/models/persistentvolumeclaims")
            .await;
        assert!(
            list.query
                .contains("labelSelector=floodgate.dev%2Flocal-model%3Dllama"),
            "{}",
            list.query
        );
        let claim = |name: &str, phase: &str| {
            json!({"metadata": {"name": name, "namespace": "models"}, "status": {"phase": phase}})
        };
        list.ok(&json!({
            "apiVersion": "v1", "kind": "PersistentVolumeClaimList", "metadata": {},
            "items": [claim("llama-6f7c-a-models", "Bound"),
                      claim("llama-6f7c-b-models", "Pending")]
        }));
        let patch = expect_status(&mut api, &model).await;
        let ready = condition(&patch, READY);
        assert_eq!(ready["reason"], "ClaimPending");
        assert!(
            field(ready, "message").contains(r#""llama-6f7c-b-models" is Pending"#),
            "{ready}"
        );
        api.expect_events("models", 2).await;
        api
    })
    .await
    .unwrap();
}

#[tokio::test(start_paused = true)]
async fn demand_over_the_queue_threshold_doubles_the_replicas_and_records_why() {
    let (ctx, mut api) = fixtures::context(demand(21, 2, 2));
    let model = autoscaled(2);
    let script = {
        let model = model.clone();
        async move {
            expect_scale(&mut api, 4).await;
            let event = api.expect_event("models").await;
            assert_eq!(
                (field(&event, "type"), field(&event, "reason")),
                ("Normal".into(), "ScaledUp".into())
            );
            let why = "scaled up 2 -> 4: 21 requests waiting, over 10 per replica x 2";
            assert_eq!(field(&event, "note"), why);
            // The Deployment follows at once.
            let d = expect_children(&mut api, false, 2).await;
            assert_eq!(d["spec"]["replicas"], 4);
            let patch = expect_status(&mut api, &model).await;
            let s = &patch["status"];
            assert_eq!(s["lastScaleReason"], why);
            assert!(!field(s, "lastScaleTime").is_empty());
            assert_eq!(
                (s["queueDepth"].clone(), s["inFlight"].clone()),
                (json!(21), json!(2))
            );
            let active = condition(&patch, AUTOSCALING_ACTIVE);
            assert_eq!(
                (active["status"].clone(), active["reason"].clone()),
                (json!("True"), json!("DemandRead"))
            );
            api.expect_events("models", 2).await;
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(model), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(autoscale::DEMAND_REFRESH));
}

#[tokio::test(start_paused = true)]
async fn with_no_gateway_reporting_the_replicas_hold_and_the_condition_says_why() {
    let (ctx, mut api) = fixtures::context(demand(0, 0, 0));
    let model = autoscaled(4);
    let script = {
        let model = model.clone();
        async move {
            // No scale write: straight to the children, at the 4 replicas it has.
            let d = expect_children(&mut api, false, 4).await;
            assert_eq!(d["spec"]["replicas"], 4);
            let patch = expect_status(&mut api, &model).await;
            assert_eq!(patch["status"].get("lastScaleReason"), None);
            let active = condition(&patch, AUTOSCALING_ACTIVE);
            assert_eq!(
                (active["status"].clone(), active["reason"].clone()),
                (json!("False"), json!("NoDemandReported"))
            );
            assert!(
                field(active, "message").contains("replicas stay at 4"),
                "{active}"
            );
            api.expect_events("models", 1).await;
            api
        }
    };
    fixtures::run(reconcile(Arc::new(model), ctx), script)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn low_demand_halves_the_replicas_but_not_under_the_answers_in_flight() {
    // 4 replicas of 2 parallel: 4 in flight fit the 2 left, so it halves.
    let (ctx, mut api) = fixtures::context(demand(0, 4, 1));
    let model = autoscaled(4);
    let script = {
        let model = model.clone();
        async move {
            expect_scale(&mut api, 2).await;
            let event = api.expect_event("models").await;
            assert_eq!(field(&event, "reason"), "ScaledDown");
            assert!(
                field(&event, "note").starts_with("scaled down 4 -> 2: 0 requests waiting"),
                "{event}"
            );
            let d = expect_children(&mut api, false, 2).await;
            assert_eq!(d["spec"]["replicas"], 2);
            let patch = expect_status(&mut api, &model).await;
            assert!(field(&patch["status"], "lastScaleReason").starts_with("scaled down 4 -> 2"));
            api.expect_events("models", 1).await;
            api
        }
    };
    fixtures::run(reconcile(Arc::new(model), ctx), script)
        .await
        .unwrap();

    // 5 in flight do not fit 2 x 2: held, no scale write.
    let (ctx, mut api) = fixtures::context(demand(0, 5, 1));
    let model = autoscaled(4);
    let script = {
        let model = model.clone();
        async move {
            let d = expect_children(&mut api, false, 4).await;
            assert_eq!(d["spec"]["replicas"], 4);
            let patch = expect_status(&mut api, &model).await;
            assert_eq!(patch["status"]["inFlight"], 5);
            api.expect_events("models", 1).await;
            api
        }
    };
    fixtures::run(reconcile(Arc::new(model), ctx), script)
        .await
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn without_a_demand_source_a_model_that_asks_for_autoscaling_says_it_is_not_acted_on() {
    let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
    let model = autoscaled(2);
    let script = {
        let model = model.clone();
        async move {
            expect_children(&mut api, false, 2).await;
            let patch = expect_status(&mut api, &model).await;
            let active = condition(&patch, AUTOSCALING_ACTIVE);
            assert_eq!(
                (active["status"].clone(), active["reason"].clone()),
                (json!("False"), json!("NoDemandSource"))
            );
            assert!(field(active, "message").contains("--redis-url"), "{active}");
            api.expect_events("models", 1).await;
            api
        }
    };
    let action = fixtures::run(reconcile(Arc::new(model), ctx), script).await;
    assert_eq!(action.unwrap(), Action::requeue(RESYNC));
}
