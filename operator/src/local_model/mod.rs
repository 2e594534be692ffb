//! LocalModelDeployment controller: applies the Deployment, Service and shared weights claim
//! (or each replica's own, see [`build`]) that [`build`] makes from the spec (all owned by
//! the resource, so that deleting it deletes them;
//! spec changes change the pod template, which the Deployment rolls out) and writes status from
//! the Deployment's: replicas, ready replicas, the pods' selector, the Service endpoint, and
//! the conditions `Ready` (a replica serves), `Progressing` (a rollout or scale-up is under
//! way, pods pulling the model included) and `Degraded` (the Deployment reports a replica
//! failure or a rollout past its deadline, or an owned object was refused).

pub mod build;

use crate::autoscale::{self, Decision, Demand};
use crate::conditions::{self, AUTOSCALING_ACTIVE, DEGRADED, PROGRESSING, READY, condition};
use crate::context::{Context, FIELD_MANAGER, object_key};
use crate::error::{Error, Result};
use floodgate_crds::Condition;
use floodgate_crds::local_model::{LocalModelDeployment, LocalModelDeploymentStatus};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Service};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, ResourceExt};
use std::sync::Arc;
use std::time::Duration;

/// How often a LocalModelDeployment is looked at again when nothing it watches changes.
pub const RESYNC: Duration = Duration::from_secs(300);

/// Reconciles one LocalModelDeployment.
pub async fn reconcile(lmd: Arc<LocalModelDeployment>, ctx: Arc<Context>) -> Result<Action> {
    let ns = lmd
        .namespace()
        .ok_or_else(|| Error::NoNamespace(object_key(lmd.as_ref())))?;
    // Owned: `lmd` is replaced below when the autoscaler changes its replicas.
    let old_status = lmd.status.clone();
    let old = old_status.as_ref();
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    let now = conditions::now();
    if let Some(why) = build::invalid_name(&lmd) {
        let status = refused_status(&lmd, old, "InvalidName", why, &now);
        ctx.write_status(
            lmd.as_ref(),
            old,
            &status,
            old_conditions,
            &status.conditions,
        )
        .await?;
        // Names cannot change: nothing to retry until the resource is replaced.
        return Ok(Action::await_change());
    }
    let read = read_demand(&lmd, &ctx, &ns).await;
    let autoscaling = autoscaling_condition(&lmd, &read);
    let demand = match read {
        DemandRead::Read(demand) => Some(demand),
        DemandRead::Unconfigured | DemandRead::Failed(_) => None,
    };
    let scaled = match demand.as_ref() {
        Some(demand) => autoscale(&lmd, &ctx, &ns, demand).await?,
        None => None,
    };
    // The Deployment follows the new count now; the scale's own change event reconciles again.
    let lmd = match &scaled {
        Some((to, _)) => {
            let mut scaled_lmd = (*lmd).clone();
            scaled_lmd.spec.replicas = Some(*to);
            Arc::new(scaled_lmd)
        }
        None => lmd,
    };
    match apply_children(&lmd, &ctx, &ns).await {
        Ok((deployment, claim)) => {
            let mut status = compute_status(&lmd, old, &deployment, claim.as_ref(), &now);
            add_condition(&mut status, old_conditions, autoscaling, &lmd, &now);
            if let Some(d) = demand {
                status.queue_depth = d.queued;
                status.in_flight = d.in_flight;
                status.latency_p95_ms = d.latency_p95_ms;
            }
            if let Some((_, reason)) = scaled {
                status.last_scale_time = Some(now.clone());
                status.last_scale_reason = Some(reason);
            }
            ctx.write_status(
                lmd.as_ref(),
                old,
                &status,
                old_conditions,
                &status.conditions,
            )
            .await?;
            ctx.succeeded(lmd.as_ref());
            Ok(Action::requeue(refresh_every(ctx.demand.is_configured())))
        }
        Err(e) => {
            let mut status = refused_status(&lmd, old, "ApplyFailed", e.to_string(), &now);
            add_condition(&mut status, old_conditions, autoscaling, &lmd, &now);
            if let Err(write) = ctx
                .write_status(
                    lmd.as_ref(),
                    old,
                    &status,
                    old_conditions,
                    &status.conditions,
                )
                .await
            {
                tracing::warn!(object = %object_key(lmd.as_ref()), error = %write, "cannot write status");
            }
            Err(e)
        }
    }
}

/// What reading a model's demand gave.
#[derive(Debug)]
enum DemandRead {
    /// No demand source (no `--redis-url`).
    Unconfigured,
    /// The source failed; why.
    Failed(String),
    /// The figures.
    Read(Demand),
}

/// The gateway's demand for `lmd`, when a demand source is configured and answers (a failure
/// is logged: the replicas stay as they are). The exported demand series (an HPA's signal)
/// follow: set from a read that some gateway replica reports on, removed otherwise, so that
/// an HPA never acts on a zero that means "nobody knows" or on a figure gone stale.
async fn read_demand(lmd: &LocalModelDeployment, ctx: &Context, ns: &str) -> DemandRead {
    let name = lmd.name_any();
    let read = match ctx.demand.read(ns, &name).await {
        None => DemandRead::Unconfigured,
        Some(Ok(demand)) => DemandRead::Read(demand),
        Some(Err(e)) => {
            tracing::warn!(object = %object_key(lmd), error = %e, "cannot read demand; replicas unchanged");
            DemandRead::Failed(e.to_string())
        }
    };
    match &read {
        DemandRead::Read(demand) if demand.reporters > 0 => {
            ctx.metrics.set_demand(ns, &name, demand);
        }
        _ => ctx.metrics.remove_demand(ns, &name),
    }
    read
}

/// The `AutoscalingActive` condition of a model that asks for autoscaling: whether the
/// operator can act on it, and if not why (no demand source, the source failing, no gateway
/// publishing demand for it). `None` for a model without `spec.autoscaling`.
fn autoscaling_condition(lmd: &LocalModelDeployment, read: &DemandRead) -> Option<Condition> {
    lmd.spec.autoscaling.as_ref()?;
    let replicas = build::desired_replicas(&lmd.spec);
    Some(match read {
        DemandRead::Unconfigured => condition(
            AUTOSCALING_ACTIVE,
            false,
            "NoDemandSource",
            format!(
                "the operator has no --redis-url, so it cannot read the gateway's demand: replicas stay at {replicas}"
            ),
        ),
        DemandRead::Failed(why) => condition(
            AUTOSCALING_ACTIVE,
            false,
            "DemandUnreadable",
            format!("cannot read the gateway's demand ({why}): replicas stay at {replicas}"),
        ),
        DemandRead::Read(d) if d.reporters == 0 => condition(
            AUTOSCALING_ACTIVE,
            false,
            "NoDemandReported",
            format!(
                "no gateway replica publishes demand for this model (is it routed to, and do the proxies run with --redis?): replicas stay at {replicas}"
            ),
        ),
        DemandRead::Read(d) => condition(
            AUTOSCALING_ACTIVE,
            true,
            "DemandRead",
            format!("{} gateway replicas publish demand", d.reporters),
        ),
    })
}

/// Adds `extra` (if any) to the conditions of `status`, merged with `old` like the others.
fn add_condition(
    status: &mut LocalModelDeploymentStatus,
    old: &[Condition],
    extra: Option<Condition>,
    lmd: &LocalModelDeployment,
    now: &str,
) {
    if let Some(c) = extra {
        let merged = conditions::merge(old, vec![c], lmd.metadata.generation, now);
        status.conditions.extend(merged);
    }
}

/// Applies the autoscaling policy of `lmd` (if it has one) to `demand`: on a change, writes
/// the new count through the scale subresource, publishes an Event and returns the count and
/// why.
async fn autoscale(
    lmd: &LocalModelDeployment,
    ctx: &Context,
    ns: &str,
    demand: &Demand,
) -> Result<Option<(i32, String)>> {
    let Some(policy) = &lmd.spec.autoscaling else {
        return Ok(None);
    };
    let key = object_key(lmd);
    let old = lmd.status.as_ref();
    let current = build::desired_replicas(&lmd.spec);
    let ready = old.map_or(0, |s| s.ready_replicas);
    let since = ctx
        .autoscaler
        .since_change(&key, old.and_then(|s| s.last_scale_time.as_deref()));
    let parallel = lmd
        .spec
        .ollama
        .num_parallel
        .unwrap_or(autoscale::DEFAULT_NUM_PARALLEL);
    let (to, reason) = match autoscale::decide(current, ready, parallel, policy, demand, since) {
        Decision::Hold(why) => {
            tracing::debug!(object = %key, replicas = current, why, "replicas held");
            return Ok(None);
        }
        Decision::Scale { to, reason } => (to, reason),
    };
    let api: Api<LocalModelDeployment> = Api::namespaced(ctx.client.clone(), ns);
    let patch = serde_json::json!({"spec": {"replicas": to}});
    api.patch_scale(
        &lmd.name_any(),
        &PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        },
        &Patch::Merge(&patch),
    )
    .await?;
    ctx.autoscaler.changed(&key);
    tracing::info!(object = %key, from = current, to, reason, "scaled");
    let event = if to > current {
        "ScaledUp"
    } else {
        "ScaledDown"
    };
    ctx.event(lmd, EventType::Normal, event, reason.clone())
        .await;
    Ok(Some((to, reason)))
}

/// Applies the shared claim (if any), the Service and the Deployment; returns the Deployment
/// as the API server holds it after the apply, and the claim that keeps pods waiting if no
/// replica is ready: the shared claim, or a replica's own Pending one.
async fn apply_children(
    lmd: &LocalModelDeployment,
    ctx: &Context,
    ns: &str,
) -> Result<(Deployment, Option<PersistentVolumeClaim>)> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), ns);
    let mut claim = match build::pvc(lmd) {
        Some(pvc) => Some(
            claims
                .patch(&build::pvc_name(lmd), &params, &Patch::Apply(&pvc))
                .await?,
        ),
        None => None,
    };
    let services: Api<Service> = Api::namespaced(ctx.client.clone(), ns);
    services
        .patch(
            &lmd.name_any(),
            &params,
            &Patch::Apply(&build::service(lmd)),
        )
        .await?;
    let deployments: Api<Deployment> = Api::namespaced(ctx.client.clone(), ns);
    let deployment = deployments
        .patch(
            &lmd.name_any(),
            &params,
            &Patch::Apply(&build::deployment(lmd)),
        )
        .await?;
    let none_ready = deployment
        .status
        .as_ref()
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0)
        == 0;
    if build::claim_per_replica(&lmd.spec) && none_ready && build::desired_replicas(&lmd.spec) > 0 {
        // Only then does a Pending claim explain anything: one list, of this model's claims.
        let listed = claims
            .list(&ListParams::default().labels(&build::selector_string(lmd)))
            .await?;
        claim = listed
            .items
            .into_iter()
            .find(|c| pending_claim(Some(c)).is_some());
    }
    Ok((deployment, claim))
}

/// The status of `lmd` given its Deployment and weights claim as last seen.
pub fn compute_status(
    lmd: &LocalModelDeployment,
    old: Option<&LocalModelDeploymentStatus>,
    deployment: &Deployment,
    claim: Option<&PersistentVolumeClaim>,
    now: &str,
) -> LocalModelDeploymentStatus {
    let desired = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let st = deployment.status.clone().unwrap_or_default();
    let replicas = st.replicas.unwrap_or(0);
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let available = st.available_replicas.unwrap_or(0);
    let observed = st.observed_generation.is_some()
        && st.observed_generation >= deployment.metadata.generation;
    let deployment_condition = |type_: &str| {
        st.conditions
            .iter()
            .flatten()
            .find(|c| c.type_ == type_)
            .cloned()
    };
    let endpoint = build::endpoint(lmd);

    let complete = observed && updated == desired && replicas == desired && available == desired;
    let progressing = if complete {
        condition(
            PROGRESSING,
            false,
            "RolloutComplete",
            format!("{desired} replicas up to date and available"),
        )
    } else {
        condition(
            PROGRESSING,
            true,
            "RollingOut",
            format!(
                "{updated}/{desired} replicas updated, {ready} ready; new pods pull {} before they turn ready",
                lmd.spec.model
            ),
        )
    };
    let failure = deployment_condition("ReplicaFailure").filter(|c| c.status == "True");
    let stuck = deployment_condition("Progressing")
        .filter(|c| c.status == "False" && c.reason.as_deref() == Some("ProgressDeadlineExceeded"));
    let degraded = match (failure, stuck) {
        (Some(c), _) => condition(
            DEGRADED,
            true,
            "ReplicaFailure",
            c.message.unwrap_or_default(),
        ),
        (None, Some(c)) => condition(
            DEGRADED,
            true,
            "ProgressDeadlineExceeded",
            c.message.unwrap_or_default(),
        ),
        (None, None) => condition(DEGRADED, false, "AsExpected", ""),
    };
    let ready_condition = if desired == 0 {
        condition(READY, false, "ScaledToZero", "0 replicas requested")
    } else if ready > 0 {
        condition(
            READY,
            true,
            "ReplicasReady",
            format!("{ready}/{desired} replicas ready at {endpoint}"),
        )
    } else if let Some(name) = pending_claim(claim) {
        // Pods wait for their volume: say so rather than leave "not ready" unexplained.
        condition(
            READY,
            false,
            "ClaimPending",
            format!(
                "0/{desired} replicas ready: PersistentVolumeClaim {name:?} is Pending (no volume bound yet: \
                 check its storageClassName and the cluster's provisioner)"
            ),
        )
    } else {
        condition(
            READY,
            false,
            "ReplicasNotReady",
            format!("0/{desired} replicas ready"),
        )
    };
    status_with(
        lmd,
        old,
        vec![ready_condition, progressing, degraded],
        now,
        LocalModelDeploymentStatus {
            replicas,
            ready_replicas: ready,
            selector: Some(build::selector_string(lmd)),
            endpoint: Some(endpoint),
            ..LocalModelDeploymentStatus::default()
        },
    )
}

/// The name of `claim` when it is still Pending.
fn pending_claim(claim: Option<&PersistentVolumeClaim>) -> Option<String> {
    let claim = claim?;
    let phase = claim.status.as_ref().and_then(|s| s.phase.as_deref());
    (phase == Some("Pending")).then(|| claim.metadata.name.clone().unwrap_or_default())
}

/// When a LocalModelDeployment is reconciled again: with a demand source, every
/// [`autoscale::DEMAND_REFRESH`] whether the operator scales it or an HPA does (the exported
/// demand gauge is the HPA's signal, and must be as fresh); without one, at the resync.
fn refresh_every(demand_configured: bool) -> std::time::Duration {
    if demand_configured {
        autoscale::DEMAND_REFRESH
    } else {
        RESYNC
    }
}

/// The status when the owned objects could not be applied (`reason`, `message`): not ready,
/// degraded, the replica counts of the last status kept.
pub fn refused_status(
    lmd: &LocalModelDeployment,
    old: Option<&LocalModelDeploymentStatus>,
    reason: &str,
    message: String,
    now: &str,
) -> LocalModelDeploymentStatus {
    let fresh = vec![
        condition(READY, false, reason, message.clone()),
        condition(PROGRESSING, false, reason, ""),
        condition(DEGRADED, true, reason, message),
    ];
    status_with(lmd, old, fresh, now, old.cloned().unwrap_or_default())
}

fn status_with(
    lmd: &LocalModelDeployment,
    old: Option<&LocalModelDeploymentStatus>,
    fresh: Vec<Condition>,
    now: &str,
    base: LocalModelDeploymentStatus,
) -> LocalModelDeploymentStatus {
    let generation = lmd.metadata.generation;
    let old_conditions = old.map(|s| s.conditions.as_slice()).unwrap_or_default();
    LocalModelDeploymentStatus {
        observed_generation: generation,
        conditions: conditions::merge(old_conditions, fresh, generation, now),
        queue_depth: old.map_or(0, |o| o.queue_depth),
        in_flight: old.map_or(0, |o| o.in_flight),
        latency_p95_ms: old.map_or(0, |o| o.latency_p95_ms),
        last_scale_time: old.and_then(|o| o.last_scale_time.clone()),
        last_scale_reason: old.and_then(|o| o.last_scale_reason.clone()),
        ..base
    }
}

#[cfg(test)]
mod api_tests;
#[cfg(test)]
mod tests;
