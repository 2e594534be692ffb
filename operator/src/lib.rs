//! Floodgate operator: a controller per Floodgate resource, each writing true status.
//!
//! | resource | controller | watches | writes |
//! |---|---|---|---|
//! | AIProviderPool | [`pool`] | pools, Secrets | status: keys, capacity, SecretsFound/KeysReady/Degraded/Ready |
//! | TierQueue | [`tier_queue`] | tier queues, Secrets | status: tier count, waiting per tier and class, oldest wait, SecretsFound/Ready |
//! | CachePolicy | [`cache_policy`] | cache policies | status: Ready; with Redis, hit ratios (overall and per layer), lookups, entries, bytes |
//! | LocalModelDeployment | [`local_model`] | models, owned Deployments/Services/PVCs | Deployment, Service, PVC; replicas (autoscaling, by the scale subresource); status |
//! | Tenant | [`tenant`] | tenants, Secrets | status: use of the window, last seen, SecretsFound/KeysReady/Degraded/UsageTracked/Ready |
//!
//! Every reconciler has the same shape: `reconcile(obj, ctx) -> Result<Action>`, the shared
//! [`context::error_policy`] (exponential backoff per object), status by server-side apply with
//! the field manager [`context::FIELD_MANAGER`] and only when it changed, and Events on
//! transitions of Ready, Degraded and Progressing.

pub mod autoscale;
pub mod cache_policy;
pub mod conditions;
pub mod context;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod leader;
pub mod local_model;
pub mod metrics;
pub mod pool;
pub mod secrets;
pub mod tenant;
pub mod tier_queue;
pub mod usage;
pub mod webhook;

pub use context::{Config, Context};
pub use error::{Error, Result};
pub use metrics::Metrics;

use floodgate_crds::{AIProviderPool, CachePolicy, LocalModelDeployment, Tenant, TierQueue};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Secret, Service};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Runs every controller until `shutdown` is cancelled, then lets the reconciles in flight
/// finish and returns. Fails at once on bad settings (a Redis URL that does not parse).
pub async fn run(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    let ctx = Context::new(client, config, metrics)?;
    tracing::info!(namespace = ?ctx.config.namespace, "floodgate-operator starting its controllers");
    ctx.metrics.set_leader(true);
    if !ctx.demand.is_configured() {
        tracing::warn!(
            "no Redis configured (--redis-url): pools' usedRpm, tenants' use and local models' demand are not read, \
             so LocalModelDeployment autoscaling is not acted on (replicas follow spec.replicas, else minReplicas); \
             each LocalModelDeployment with spec.autoscaling says so in its AutoscalingActive condition"
        );
    }
    tracing::info!(
        "not acted on yet: TierQueue dead letters and p95 waits, CachePolicy hit ratio, pool circuit states"
    );
    futures::join!(
        run_pools(ctx.clone(), shutdown.clone()),
        run_tier_queues(ctx.clone(), shutdown.clone()),
        run_cache_policies(ctx.clone(), shutdown.clone()),
        run_local_models(ctx.clone(), shutdown.clone()),
        run_tenants(ctx.clone(), shutdown.clone()),
    );
    tracing::info!("floodgate-operator stopped");
    Ok(())
}

/// Runs the controllers only while this replica holds the Lease of `lock`: waits for it, runs
/// until `shutdown` (then releases the Lease) or until the Lease is lost (then returns
/// [`Error::LeaseLost`], and the process should exit so that it restarts as a follower).
pub async fn run_leader_elected(
    client: Client,
    config: Config,
    lock: leader::LeaseLock,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<()> {
    metrics.set_leader(false);
    if !lock.acquire(&shutdown).await {
        return Ok(());
    }
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
        let result = run(client, config, metrics.clone(), stop_controllers.clone()).await;
        metrics.set_leader(false);
        stop_renewing.cancel();
        stop_controllers.cancel();
        result
    };
    let (result, (), ()) = futures::join!(controllers, lock.hold(&stop_renewing, &lost), stopper);
    result?;
    if lost.is_cancelled() {
        return Err(Error::LeaseLost);
    }
    if let Err(e) = lock.release().await {
        tracing::warn!(error = %e, "cannot release the Lease; another replica takes it when it expires");
    }
    Ok(())
}

async fn run_pools(ctx: Arc<Context>, shutdown: CancellationToken) {
    let controller = Controller::new(
        ctx.watched_api::<AIProviderPool>(),
        watcher::Config::default(),
    );
    let store = controller.store();
    let controller = controller.watches(
        ctx.watched_api::<Secret>(),
        watcher::Config::default(),
        move |secret| {
            pool::pools_using_secret(&store, secret.namespace().as_deref(), &secret.name_any())
        },
    );
    drive(controller, pool::reconcile, ctx, shutdown).await;
}

async fn run_tier_queues(ctx: Arc<Context>, shutdown: CancellationToken) {
    let controller = Controller::new(ctx.watched_api::<TierQueue>(), watcher::Config::default());
    let store = controller.store();
    let controller = controller.watches(
        ctx.watched_api::<Secret>(),
        watcher::Config::default(),
        move |secret| {
            tier_queue::using_secret(&store, secret.namespace().as_deref(), &secret.name_any())
        },
    );
    drive(controller, tier_queue::reconcile, ctx, shutdown).await;
}

async fn run_tenants(ctx: Arc<Context>, shutdown: CancellationToken) {
    let controller = Controller::new(ctx.watched_api::<Tenant>(), watcher::Config::default());
    let store = controller.store();
    let controller = controller.watches(
        ctx.watched_api::<Secret>(),
        watcher::Config::default(),
        move |secret| {
            tenant::using_secret(&store, secret.namespace().as_deref(), &secret.name_any())
        },
    );
    drive(controller, tenant::reconcile, ctx, shutdown).await;
}

async fn run_cache_policies(ctx: Arc<Context>, shutdown: CancellationToken) {
    let controller = Controller::new(ctx.watched_api::<CachePolicy>(), watcher::Config::default());
    drive(controller, cache_policy::reconcile, ctx, shutdown).await;
}

async fn run_local_models(ctx: Arc<Context>, shutdown: CancellationToken) {
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
    drive(controller, local_model::reconcile, ctx, shutdown).await;
}

/// Runs `controller` with `reconcile` and the shared error policy until `shutdown`.
async fn drive<K, F, Fut>(
    controller: Controller<K>,
    reconcile: F,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
) where
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
    let measured = move |obj: Arc<K>, ctx: Arc<Context>| {
        let started = std::time::Instant::now();
        let pending = reconcile(obj, ctx.clone());
        async move {
            let result = pending.await;
            let error = result.as_ref().err().map(Error::metric_label);
            ctx.metrics.observe(&K::kind(&()), error, started.elapsed());
            result
        }
    };
    controller
        .graceful_shutdown_on(shutdown.cancelled_owned())
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
}

fn object_name<K: Resource<DynamicType = ()>>(object: &ObjectRef<K>) -> String {
    format!(
        "{}/{}",
        object.namespace.as_deref().unwrap_or_default(),
        object.name
    )
}
