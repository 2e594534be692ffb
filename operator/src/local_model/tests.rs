use super::*;
use crate::conditions::is_true;
use k8s_openapi::api::apps::v1::{DeploymentCondition, DeploymentSpec, DeploymentStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

fn lmd() -> LocalModelDeployment {
    let spec =
        serde_json::from_value(serde_json::json!({"model": "llama3.1:8b", "classes": ["simple"]}))
            .unwrap();
    let mut lmd = LocalModelDeployment::new("llama", spec);
    lmd.metadata.namespace = Some("models".into());
    lmd.metadata.generation = Some(2);
    lmd
}

/// A Deployment at generation 5 wanting `desired` replicas, observed at `observed`, with
/// `(replicas, updated, ready, available)`.
fn deployment(desired: i32, observed: i64, counts: (i32, i32, i32, i32)) -> Deployment {
    Deployment {
        metadata: ObjectMeta {
            generation: Some(5),
            ..ObjectMeta::default()
        },
        spec: Some(DeploymentSpec {
            replicas: Some(desired),
            ..DeploymentSpec::default()
        }),
        status: Some(DeploymentStatus {
            observed_generation: Some(observed),
            replicas: Some(counts.0),
            updated_replicas: Some(counts.1),
            ready_replicas: Some(counts.2),
            available_replicas: Some(counts.3),
            ..DeploymentStatus::default()
        }),
    }
}

#[test]
fn a_new_deployment_is_progressing_and_not_ready_until_a_pod_is() {
    let s = compute_status(&lmd(), None, &deployment(2, 5, (2, 2, 0, 0)), None, "t1");
    assert!(!is_true(&s.conditions, READY));
    assert!(is_true(&s.conditions, PROGRESSING));
    assert!(!is_true(&s.conditions, DEGRADED));
    assert_eq!(s.observed_generation, Some(2));
    assert_eq!(s.endpoint.as_deref(), Some("http://llama.models.svc:11434"));
    assert_eq!(
        s.selector.as_deref(),
        Some("floodgate.dev/local-model=llama")
    );

    let s = compute_status(
        &lmd(),
        Some(&s),
        &deployment(2, 5, (2, 2, 1, 1)),
        None,
        "t2",
    );
    assert!(is_true(&s.conditions, READY) && is_true(&s.conditions, PROGRESSING));
    let s = compute_status(
        &lmd(),
        Some(&s),
        &deployment(2, 5, (2, 2, 2, 2)),
        None,
        "t3",
    );
    assert!(is_true(&s.conditions, READY) && !is_true(&s.conditions, PROGRESSING));
    assert_eq!((s.replicas, s.ready_replicas), (2, 2));
}

#[test]
fn a_deployment_not_yet_observed_is_still_progressing() {
    let s = compute_status(&lmd(), None, &deployment(2, 4, (2, 2, 2, 2)), None, "t1");
    assert!(is_true(&s.conditions, PROGRESSING));
}

#[test]
fn a_stuck_rollout_or_a_replica_failure_is_degraded() {
    let mut d = deployment(2, 5, (1, 1, 0, 0));
    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "Progressing".into(),
        status: "False".into(),
        reason: Some("ProgressDeadlineExceeded".into()),
        message: Some("ReplicaSet \"llama-1\" has timed out progressing.".into()),
        ..DeploymentCondition::default()
    }]);
    let s = compute_status(&lmd(), None, &d, None, "t1");
    let degraded = s.conditions.iter().find(|c| c.type_ == DEGRADED).unwrap();
    assert_eq!(degraded.reason, "ProgressDeadlineExceeded");
    assert!(is_true(&s.conditions, DEGRADED));

    d.status.as_mut().unwrap().conditions = Some(vec![DeploymentCondition {
        type_: "ReplicaFailure".into(),
        status: "True".into(),
        message: Some("exceeded quota".into()),
        ..DeploymentCondition::default()
    }]);
    let s = compute_status(&lmd(), None, &d, None, "t1");
    assert_eq!(
        s.conditions
            .iter()
            .find(|c| c.type_ == DEGRADED)
            .unwrap()
            .reason,
        "ReplicaFailure"
    );
}

#[test]
fn scaled_to_zero_is_not_ready() {
    let s = compute_status(&lmd(), None, &deployment(0, 5, (0, 0, 0, 0)), None, "t1");
    let ready = s.conditions.iter().find(|c| c.type_ == READY).unwrap();
    assert_eq!(ready.reason, "ScaledToZero");
    assert!(!is_true(&s.conditions, PROGRESSING));
}

#[test]
fn a_refused_apply_is_degraded_and_keeps_the_last_counts() {
    let ok = compute_status(&lmd(), None, &deployment(2, 5, (2, 2, 2, 2)), None, "t1");
    let s = refused_status(
        &lmd(),
        Some(&ok),
        "ApplyFailed",
        "PVC is immutable".into(),
        "t2",
    );
    assert_eq!((s.replicas, s.ready_replicas), (2, 2));
    assert!(!is_true(&s.conditions, READY) && is_true(&s.conditions, DEGRADED));
    assert_eq!(s.conditions[0].message, "PVC is immutable");
    // A second identical pass computes the same status, so nothing is written.
    assert_eq!(
        refused_status(
            &lmd(),
            Some(&s),
            "ApplyFailed",
            "PVC is immutable".into(),
            "t3"
        ),
        s
    );
}

#[test]
fn a_pending_claim_is_named_as_the_reason_pods_are_not_ready() {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, PersistentVolumeClaimStatus};
    let mut claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("llama-models".into()),
            ..ObjectMeta::default()
        },
        status: Some(PersistentVolumeClaimStatus {
            phase: Some("Pending".into()),
            ..PersistentVolumeClaimStatus::default()
        }),
        ..PersistentVolumeClaim::default()
    };
    let d = deployment(2, 5, (2, 2, 0, 0));
    let s = compute_status(&lmd(), None, &d, Some(&claim), "t1");
    let ready = s.conditions.iter().find(|c| c.type_ == READY).unwrap();
    assert_eq!(ready.reason, "ClaimPending");
    assert!(
        ready.message.contains(r#""llama-models" is Pending"#),
        "{}",
        ready.message
    );

    claim.status.as_mut().unwrap().phase = Some("Bound".into());
    let s = compute_status(&lmd(), None, &d, Some(&claim), "t1");
    assert_eq!(s.conditions[0].reason, "ReplicasNotReady");
}

/// HPA mode's signal, the exported demand series: set from a read that gateway replicas
/// report on, and gone (not 0, not the last figure) when none does or the read fails, so an
/// HPA holds rather than scales a busy model down. Refreshed with a demand source every
/// [`autoscale::DEMAND_REFRESH`], with `spec.autoscaling` or without.
#[tokio::test(start_paused = true)]
async fn the_exported_demand_is_dropped_when_no_gateway_reports_it_or_the_read_fails() {
    use crate::autoscale::{Demand, DemandSource};
    let series = |ctx: &Context| {
        ctx.metrics
            .encode()
            .lines()
            .filter(|l| l.starts_with("floodgate_operator_local_model_demand{"))
            .map(str::to_owned)
            .collect::<std::collections::BTreeSet<_>>()
    };
    let busy = Demand {
        queued: 40,
        in_flight: 8,
        latency_p95_ms: 900,
        spilled: 0,
        reporters: 2,
    };
    let (ctx, _api) =
        crate::fixtures::context(DemandSource::fixed([("models/llama".to_owned(), busy)]));
    let model = lmd();
    read_demand(&model, &ctx, "models").await;
    let set = series(&ctx);
    assert!(
        set.iter()
            .any(|l| l.contains(r#"signal="queued""#) && l.ends_with(" 40")),
        "{set:?}"
    );
    // The gateways stop reporting the model (they restarted, or stopped routing to it).
    ctx.demand.set("models", "llama", Demand::default());
    read_demand(&model, &ctx, "models").await;
    assert!(series(&ctx).is_empty(), "{:?}", series(&ctx));
    ctx.demand.set("models", "llama", busy);
    read_demand(&model, &ctx, "models").await;
    assert_eq!(series(&ctx), set);
    assert_eq!(
        refresh_every(ctx.demand.is_configured()),
        autoscale::DEMAND_REFRESH
    );

    // Redis gone: the figures are unknown, not frozen at the last read.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("redis://{}", listener.local_addr().unwrap());
    drop(listener);
    let (ctx, _api) = crate::fixtures::context_with_redis(&dead);
    ctx.metrics.set_demand("models", "llama", &busy);
    assert!(matches!(
        read_demand(&model, &ctx, "models").await,
        DemandRead::Failed(_)
    ));
    assert!(series(&ctx).is_empty(), "{:?}", series(&ctx));
    assert_eq!(refresh_every(false), RESYNC);
}
