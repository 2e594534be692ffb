//! Floodgate operator: a controller per Floodgate resource, each writing true status.
//!
//! | resource | controller | watches | writes |
//! |---|---|---|---|
//! | AIProviderPool | [`pool`] | pools, Secrets | status: keys, capacity, usage and circuits (Redis, else [`gateway`] metrics), SecretsFound/KeysReady/Degraded/UsageTracked/Ready |
//! | TierQueue | [`tier_queue`] | tier queues, Secrets | status: tier count, waiting per tier and class, oldest wait, SecretsFound/Ready |
//! | CachePolicy | [`cache_policy`] | cache policies | status: Ready; with Redis, hit ratios (overall and per layer), lookups, entries, bytes |
//! | LocalModelDeployment | [`local_model`] | models, owned Deployments/Services/PVCs | Deployment, Service, PVC; replicas (autoscaling, by the scale subresource); status |
//! | RoutingPolicy | [`routing_policy`] | policies, pools, local models | status: rule count, TargetsFound/Ready |
//! | Tenant | [`tenant`] | tenants, Secrets | status: use of the window, last seen, SecretsFound/KeysReady/Degraded/UsageTracked/Ready |
//!
//! Every reconciler has the same shape: `reconcile(obj, ctx) -> Result<Action>`, the shared
//! [`context::error_policy`] (exponential backoff per object), status by server-side apply with
//! the field manager [`context::FIELD_MANAGER`] and only when it changed, and Events on
//! transitions of Ready, Degraded and Progressing. Each reconcile runs in a span
//! ([`telemetry`]), exported over OTLP with `--otlp-endpoint`.

pub mod autoscale;
pub mod cache_policy;
pub mod conditions;
pub mod context;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod gateway;
pub mod health;
pub mod leader;
pub mod local_model;
pub mod metrics;
pub mod pool;
pub mod routing_policy;
pub mod secrets;
pub mod telemetry;
pub mod tenant;
pub mod tier_queue;
pub mod usage;
pub mod webhook;

pub use context::{Config, Context};
pub use error::{Error, Result};
pub use metrics::Metrics;

use floodgate_crds::{
    AIProviderPool, CachePolicy, LocalModelDeployment, RoutingPolicy, Tenant, TierQueue,
};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Runs every controller until `shutdown` is cancelled, then lets the reconciles in flight
/// finish and returns. Fails at once on bad settings (a Redis URL that does not parse).
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    run_fenced(client, config, metrics, shutdown, CancellationToken::new()).await
}

/// [`run`], whose reconciles are aborted at once when `lost` is cancelled (the Lease lost), so
/// that none in flight makes a request after it.
async fn run_fenced(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    lost: CancellationToken,
) -> Result<()> {
    let ctx = Context::new(client, config, metrics)?;
    tracing::info!(namespace = ?ctx.config.namespace, "floodgate-operator starting its controllers");
    ctx.metrics.set_leader(true);
    if !ctx.demand.is_configured() {
        let pools = if ctx.gateway.is_some() {
            "pools' usedRpm and circuits are scraped from the gateway replicas' /metrics, but "
        } else {
            "pools' usedRpm and circuits, "
        };
        tracing::warn!(
            "no Redis configured (--redis-url): {pools}tenants' use, TierQueue and CachePolicy figures and local models' demand are not read, \
             so LocalModelDeployment autoscaling is not acted on (replicas follow spec.replicas, else minReplicas); \
             each LocalModelDeployment with spec.autoscaling says so in its AutoscalingActive condition"
        );
    }
    tracing::info!("not acted on yet: TierQueue dead letters");
    let stop = Stop { shutdown, lost };
    futures::join!(
        run_pools(ctx.clone(), stop.clone()),
        run_tier_queues(ctx.clone(), stop.clone()),
        run_cache_policies(ctx.clone(), stop.clone()),
        run_local_models(ctx.clone(), stop.clone()),
        run_tenants(ctx.clone(), stop.clone()),
        run_routing_policies(ctx.clone(), stop.clone()),
    );
    tracing::info!("floodgate-operator stopped");
    Ok(())
}

/// Runs the controllers only while this replica holds the Lease of `lock`: waits for it, runs
/// until `shutdown` (then lets the reconciles in flight finish and releases the Lease) or until
/// the Lease is lost, taken by another replica or not renewed within
/// [`leader::RENEW_DEADLINE`] (then aborts the reconciles in flight, returns
/// [`Error::LeaseLost`], and the process should exit so that it restarts as a follower).
pub async fn run_leader_elected(
    client: Client,
    config: Config,
    lock: leader::LeaseLock,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    metrics.set_leader(false);
    let Some(since) = lock.acquire(&shutdown).await else {
        return Ok(());
    };
    let lost = CancellationToken::new();
    let stop_renewing = CancellationToken::new();
    let stop_controllers = CancellationToken::new();
    let stopper = async {
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = lost.cancelled() => {}
            // The controllers ended on their own (a bad setting).
            () = stop_controllers.cancelled() => {}
        }
        stop_controllers.cancel();
    };
    let controllers = async {
        let result = run_fenced(
            client,
            config,
            metrics.clone(),
            stop_controllers.clone(),
            lost.clone(),
        )
        .await;
        metrics.set_leader(false);
        stop_renewing.cancel();
        stop_controllers.cancel();
        result
    };
    let (result, (), ()) = futures::join!(
        controllers,
        lock.hold(since, &stop_renewing, &lost),
        stopper
    );
    result?;
    if lost.is_cancelled() {
        return Err(Error::LeaseLost);
    }
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "cannot release the Lease; another replica takes it when it expires");
    }
    Ok(())
}

// Secrets are watched as metadata only (`Api<PartialObjectMeta<Secret>>`): a controller maps a
// Secret to the resources naming it by name, and reads the keys it needs when it reconciles;
// a cache of whole Secrets would hold every value of the namespace, once per controller.

async fn run_pools(ctx: Arc<Context>, stop: Stop) {
    let controller = Controller::new(
        ctx.watched_api::<AIProviderPool>(),
        watcher::Config::default(),
    );
    let store = controller.store();
    let controller = controller.watches(
        ctx.watched_api::<PartialObjectMeta<Secret>>(),
        watcher::Config::default(),
        move |secret| {
            pool::pools_using_secret(&store, secret.namespace().as_deref(), &secret.name_any())
        },
    );
    drive(controller, pool::reconcile, ctx, stop).await;
}

async fn run_tier_queues(ctx: Arc<Context>, stop: Stop) {
    let controller = Controller::new(ctx.watched_api::<TierQueue>(), watcher::Config::default());
    let store = controller.store();
    let controller = controller.watches(
        ctx.watched_api::<PartialObjectMeta<Secret>>(),
        watcher::Config::default(),
        move |secret| {
            tier_queue::using_secret(&store, secret.namespace().as_deref(), &secret.name_any())
        },
    );
    drive(controller, tier_queue::reconcile, ctx, stop).await;
}

async fn run_tenants(ctx: Arc<Context>, stop: Stop) {
    let controller = Controller::new(ctx.watched_api::<Tenant>(), watcher::Config::default());
    let store = controller.store();
    let controller = controller.watches(
        ctx.watched_api::<PartialObjectMeta<Secret>>(),
        watcher::Config::default(),
        move |secret| {
            tenant::using_secret(&store, secret.namespace().as_deref(), &secret.name_any())
        },
    );
    drive(controller, tenant::reconcile, ctx, stop).await;
}

async fn run_routing_policies(ctx: Arc<Context>, stop: Stop) {
    use routing_policy::{TargetKind, naming};
    let controller = Controller::new(
        ctx.watched_api::<RoutingPolicy>(),
        watcher::Config::default(),
    );
    let (pools, models) = (controller.store(), controller.store());
    let controller = controller
        .watches(
            ctx.watched_api::<AIProviderPool>(),
            watcher::Config::default(),
            move |pool| {
                naming(
                    &pools,
                    TargetKind::Pool,
                    pool.namespace().as_deref(),
                    &pool.name_any(),
                )
            },
        )
        .watches(
            ctx.watched_api::<LocalModelDeployment>(),
            watcher::Config::default(),
            move |model| {
                naming(
                    &models,
                    TargetKind::LocalModel,
                    model.namespace().as_deref(),
                    &model.name_any(),
                )
            },
        );
    drive(controller, routing_policy::reconcile, ctx, stop).await;
}

async fn run_cache_policies(ctx: Arc<Context>, stop: Stop) {
    let controller = Controller::new(ctx.watched_api::<CachePolicy>(), watcher::Config::default());
    drive(controller, cache_policy::reconcile, ctx, stop).await;
}

async fn run_local_models(ctx: Arc<Context>, stop: Stop) {
    // Only the objects this operator made: never a watch over every Deployment of the cluster.
    let owned = watcher::Config::default().labels(&format!(
        "app.kubernetes.io/managed-by={}",
        local_model::build::MANAGED_BY
    ));
    let controller = Controller::new(
        ctx.watched_api::<LocalModelDeployment>(),
        watcher::Config::default(),
    )
    .owns(ctx.watched_api::<Deployment>(), owned.clone())
    .owns(ctx.watched_api::<Service>(), owned.clone())
    .owns(ctx.watched_api::<PersistentVolumeClaim>(), owned);
    drive(controller, local_model::reconcile, ctx, stop).await;
}

/// When the controllers stop: `shutdown` lets the reconciles in flight finish; `lost` (the
/// leader Lease lost) aborts them.
#[derive(Debug, Clone)]
struct Stop {
    shutdown: CancellationToken,
    lost: CancellationToken,
}

/// Runs `controller` with `reconcile` and the shared error policy until `stop`.
async fn drive<K, F, Fut>(controller: Controller<K>, reconcile: F, ctx: Arc<Context>, stop: Stop)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + Debug
        + Send
        + Sync
        + 'static,
    F: FnMut(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>> + Send + 'static,
{
    let kind = K::kind(&());
    let mut reconcile = reconcile;
    let lost = stop.lost.clone();
    let measured = move |obj: Arc<K>, ctx: Arc<Context>| {
        let pending = reconcile(obj.clone(), ctx.clone());
        telemetry::traced(obj.as_ref(), pending, ctx, lost.clone())
    };
    let store = controller.store();
    let sweeper = tokio::spawn(sweep_deleted(store, ctx.clone(), stop.clone()));
    controller
        .graceful_shutdown_on(stop.shutdown.cancelled_owned())
        .run(measured, context::error_policy, ctx)
        .for_each(|result| {
            let kind = kind.clone();
            async move {
                match result {
                    Ok((object, _)) => {
                        tracing::debug!(%kind, object = %object_name(&object), "reconciled")
                    }
                    // A watch that fails (a missing CRD, a forbidden watch) leaves the
                    // controller idle: said at warn. Reconcile errors are logged by the error
                    // policy.
                    Err(kube::runtime::controller::Error::QueueError(e)) => {
                        tracing::warn!(%kind, error = %e, "watch failed; retrying")
                    }
                    Err(e) => tracing::debug!(%kind, error = %e, "controller event"),
                }
            }
        })
        .await;
    sweeper.abort();
}

/// How often what the process keeps per object is checked against the objects that exist.
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Every [`SWEEP_EVERY`] once `store` has its first list, until `stop`: forgets what `ctx`
/// keeps for objects of kind `K` that are gone from `store` (deleted), so that failure counts,
/// scale times and demand series do not pile up over the operator's life.
async fn sweep_deleted<K>(store: Store<K>, ctx: Arc<Context>, stop: Stop)
where
    K: Resource<DynamicType = ()> + Clone + 'static,
{
    let (shutdown, lost) = (stop.shutdown.cancelled_owned(), stop.lost.cancelled_owned());
    let stopped = async move {
        tokio::select! {
            () = shutdown => {}
            () = lost => {}
        }
    };
    tokio::pin!(stopped);
    tokio::select! {
        () = &mut stopped => return,
        ready = store.wait_until_ready() => if ready.is_err() { return },
    }
    loop {
        tokio::select! {
            () = &mut stopped => return,
            () = tokio::time::sleep(SWEEP_EVERY) => {}
        }
        let present: std::collections::HashSet<(String, String)> = store
            .state()
            .iter()
            .map(|o| (o.namespace().unwrap_or_default(), o.name_any()))
            .collect();
        ctx.forget_deleted::<K>(|namespace, name| {
            present.contains(&(namespace.to_owned(), name.to_owned()))
        });
    }
}

fn object_name<K: Resource<DynamicType = ()>>(object: &ObjectRef<K>) -> String {
    format!(
        "{}/{}",
        object.namespace.as_deref().unwrap_or_default(),
        object.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::runtime::reflector::store::Writer;

    fn model(name: &str) -> LocalModelDeployment {
        let spec = serde_json::from_value(
            serde_json::json!({"model": "llama3.1:8b", "classes": ["simple"]}),
        )
        .unwrap_or_else(|e| panic!("a model spec: {e}"));
        let mut lmd = LocalModelDeployment::new(name, spec);
        lmd.metadata.namespace = Some("ai".to_owned());
        lmd
    }

    #[tokio::test(start_paused = true)]
    async fn a_deleted_objects_failures_are_forgotten_at_the_next_sweep() {
        let (ctx, _api) = fixtures::context(autoscale::DemandSource::Unconfigured);
        let mut writer = Writer::<LocalModelDeployment>::default();
        let (kept, gone) = (model("kept"), model("gone"));
        writer.apply_watcher_event(&watcher::Event::Init);
        writer.apply_watcher_event(&watcher::Event::InitApply(kept.clone()));
        writer.apply_watcher_event(&watcher::Event::InitApply(gone.clone()));
        writer.apply_watcher_event(&watcher::Event::InitDone);
        let stop = Stop {
            shutdown: CancellationToken::new(),
            lost: CancellationToken::new(),
        };
        let sweeper = tokio::spawn(sweep_deleted(writer.as_reader(), ctx.clone(), stop.clone()));
        for obj in [&kept, &gone] {
            ctx.failed(obj);
        }
        writer.apply_watcher_event(&watcher::Event::Delete(gone.clone()));
        // Not before the sweep...
        tokio::time::sleep(SWEEP_EVERY - Duration::from_millis(1)).await;
        assert_eq!(ctx.failed(&gone), Duration::from_secs(2));
        // ...and at it.
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(ctx.failed(&gone), Duration::from_secs(1));
        assert_eq!(ctx.failed(&kept), Duration::from_secs(2));
        stop.shutdown.cancel();
        sweeper.await.unwrap_or_else(|e| panic!("the sweeper: {e}"));
    }
}
