//! Cluster mode: the configuration comes from the Kubernetes API server instead of files.
//!
//! [`ClusterWatcher`] keeps a reflector (a watch plus a local cache) of every AIProviderPool,
//! TierQueue, CachePolicy, LocalModelDeployment, Tenant and Secret in one namespace. Once all
//! six have
//! listed, and after every later change, it rebuilds [`Resources`] from the caches, validating
//! each object with [`floodgate_crds::validate::validate_object`] (the rules the API server ran
//! when the object was written; an object that fails them now, say after a rule was tightened,
//! is skipped with a log line), resolves them with secrets taken from the watched Secrets, and
//! swaps the result into the [`SharedConfig`]. A configuration that does not resolve (a key
//! naming a Secret that does not exist yet) is logged and the last good one keeps serving. The
//! gateway reports ready only after the first configuration was applied.
//!
//! Floodgate resources are watched untyped ([`DynamicObject`]): a typed watch fails its whole
//! list when one object does not deserialize, which would stall every update behind it.
//!
//! A Secret holding a tenant's client key is watched like the provider keys' Secrets: a
//! changed value rotates the key at the next rebuild (the old one is refused from then on).
//!
//! The service account needs `get`, `list` and `watch` on the five Floodgate resources and on
//! Secrets in the namespace. Secret values are never logged: not the objects, and not the
//! decoding errors of a Secret watch, which could quote them.

use super::secrets::SecretSources;
use super::watch::{ReloadStats, SharedConfig};
use super::{Config, ConfigErrors, Origin, Resources, Sourced};
use crate::secret::SecretString;
use floodgate_crds::validate::validate_object;
use floodgate_crds::{
    AIProviderPool, CachePolicy, Kind, LocalModelDeployment, RoutingPolicy, Tenant, TierQueue,
};
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::reflector::{self, Store, store::Writer};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_util::sync::CancellationToken;

/// A client for the API server: from `KUBECONFIG` / `~/.kube/config`, or the pod's service
/// account when running in a cluster.
pub async fn client() -> Result<Client, kube::Error> {
    // One crypto provider for the process (ring, the workspace's); installing it is a no-op
    // when another part of the process already did.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::try_default().await
}

/// The configuration served before the first sync: no pools, nothing ready.
pub fn initial_config() -> Config {
    Config {
        pools: Vec::new(),
        tier_queue: None,
        cache_policy: None,
        local_models: Vec::new(),
        tenants: Vec::new(),
        routing: Default::default(),
        webhook_secrets: Default::default(),
        email: Default::default(),
    }
}

/// Which watch an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Kind(Kind),
    Secrets,
}

impl Source {
    const ALL: [Source; 7] = [
        Source::Kind(Kind::AIProviderPool),
        Source::Kind(Kind::TierQueue),
        Source::Kind(Kind::CachePolicy),
        Source::Kind(Kind::LocalModelDeployment),
        Source::Kind(Kind::Tenant),
        Source::Kind(Kind::RoutingPolicy),
        Source::Secrets,
    ];

    fn index(self) -> usize {
        Source::ALL.iter().position(|s| *s == self).unwrap_or(0)
    }

    fn name(self) -> &'static str {
        match self {
            Source::Kind(kind) => kind.as_str(),
            Source::Secrets => "Secret",
        }
    }
}

/// What a watch event means for the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Change {
    /// A (re)list finished: the cache holds the full state.
    Synced,
    /// An object was added, changed or deleted.
    Changed,
    /// Part of a relist; the cache is swapped at its end ([`Change::Synced`]).
    Listing,
}

type Signals = BoxStream<'static, (Source, Result<Change, watcher::Error>)>;

/// The local caches of the watched objects.
#[derive(Debug, Clone)]
struct Stores {
    kinds: HashMap<Kind, Store<DynamicObject>>,
    secrets: Store<Secret>,
}

/// Watches the Floodgate resources and Secrets of one namespace and keeps the shared
/// configuration up to date.
pub struct ClusterWatcher {
    client: Client,
    namespace: String,
    secrets: SecretSources,
    stats: Arc<ReloadStats>,
}

impl Debug for ClusterWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // `kube::Client` has no Debug, and `secrets` holds plain environment values.
        f.debug_struct("ClusterWatcher")
            .field("namespace", &self.namespace)
            .finish_non_exhaustive()
    }
}

impl ClusterWatcher {
    /// A watcher of `namespace`. Keys resolve from `secrets` (environment and secrets
    /// directory, which take precedence, as in standalone mode) and then from the namespace's
    /// Secrets.
    pub fn new(client: Client, namespace: impl Into<String>, secrets: SecretSources) -> Self {
        Self {
            client,
            namespace: namespace.into(),
            secrets,
            stats: Arc::default(),
        }
    }

    /// Counters: configurations applied, and configurations refused because they did not
    /// resolve.
    pub fn stats(&self) -> Arc<ReloadStats> {
        self.stats.clone()
    }

    /// Runs until `cancel` fires: applies every change to `shared` once all watches have
    /// listed, and sets `ready` after the first configuration was applied.
    ///
    /// Validation (CEL rules included), resolution and the routing view's build run on the
    /// blocking pool, not on this task's runtime, which in the binary also carries every
    /// Redis admission.
    pub async fn run(
        self,
        shared: SharedConfig,
        ready: Arc<AtomicBool>,
        cancel: CancellationToken,
    ) {
        let (stores, mut signals) = self.watch_all();
        let this = Arc::new(self);
        let mut synced = [false; Source::ALL.len()];
        let mut dirty = false;
        let mut warned = HashSet::new();
        tracing::info!(namespace = %this.namespace, "watching the API server for configuration");
        loop {
            let next = tokio::select! {
                () = cancel.cancelled() => return,
                next = signals.next() => next,
            };
            let Some((source, change)) = next else { return };
            this.note(source, change, &mut synced, &mut dirty);
            // Take whatever else is already queued, so that a burst (the initial lists, a
            // `kubectl apply -f dir/`) becomes one rebuild.
            while let Some(Some((source, change))) = signals.next().now_or_never() {
                this.note(source, change, &mut synced, &mut dirty);
            }
            if dirty && synced.iter().all(|s| *s) {
                dirty = false;
                let (watcher, stores, shared, ready, cancel) = (
                    this.clone(),
                    stores.clone(),
                    shared.clone(),
                    ready.clone(),
                    cancel.clone(),
                );
                let mut seen = std::mem::take(&mut warned);
                let applied = tokio::task::spawn_blocking(move || {
                    watcher.apply(&stores, &shared, &ready, &cancel, &mut seen);
                    seen
                })
                .await;
                match applied {
                    Ok(seen) => warned = seen,
                    Err(e) => tracing::error!(error = %e, "applying the configuration failed"),
                }
            }
        }
    }

    fn note(
        &self,
        source: Source,
        change: Result<Change, watcher::Error>,
        synced: &mut [bool],
        dirty: &mut bool,
    ) {
        match change {
            Ok(Change::Synced) => {
                synced[source.index()] = true;
                *dirty = true;
            }
            Ok(Change::Changed) => *dirty = true,
            Ok(Change::Listing) => {}
            // The watch retries with backoff; the last good configuration keeps serving.
            Err(e) => tracing::warn!(
                namespace = %self.namespace,
                resource = source.name(),
                error = %describe(source, &e),
                "watch failed; retrying"
            ),
        }
    }

    fn apply(
        &self,
        stores: &Stores,
        shared: &SharedConfig,
        ready: &AtomicBool,
        cancel: &CancellationToken,
        warned: &mut HashSet<(Kind, String, String)>,
    ) {
        let mut resources = collect_resources(stores, warned);
        resources.namespace = Some(self.namespace.clone());
        let mut secrets = self.secrets.clone();
        secrets.manifests = secret_values(&stores.secrets.state());
        match Config::resolve(resources, &secrets) {
            Ok(config) => {
                let (pools, models) = (config.pools.len(), config.models().len());
                let tenants = config.tenants.len();
                shared.apply(config);
                self.stats.applied.fetch_add(1, Ordering::Relaxed);
                if !cancel.is_cancelled() && !ready.swap(true, Ordering::AcqRel) {
                    tracing::info!(namespace = %self.namespace, pools, models, tenants, "first configuration applied: ready");
                    if tenants == 0 {
                        tracing::info!(namespace = %self.namespace, "{}", crate::identity::OPEN_MODE);
                    }
                } else {
                    tracing::info!(namespace = %self.namespace, pools, models, tenants, "configuration change applied");
                }
            }
            Err(errors) => self.rejected(&errors),
        }
    }

    fn rejected(&self, errors: &ConfigErrors) {
        self.stats.rejected.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            namespace = %self.namespace,
            %errors,
            "configuration from the API server does not resolve; the previous configuration keeps serving"
        );
    }

    fn watch_all(&self) -> (Stores, Signals) {
        let mut kinds = HashMap::new();
        let mut streams = Vec::new();
        for kind in Kind::ALL {
            let resource = api_resource(kind);
            let api = Api::<DynamicObject>::namespaced_with(
                self.client.clone(),
                &self.namespace,
                &resource,
            );
            let writer = Writer::new(resource);
            kinds.insert(kind, writer.as_reader());
            streams.push(signals(Source::Kind(kind), writer, api));
        }
        let writer = Writer::<Secret>::default();
        let secrets = writer.as_reader();
        streams.push(signals(
            Source::Secrets,
            writer,
            Api::namespaced(self.client.clone(), &self.namespace),
        ));
        (
            Stores { kinds, secrets },
            futures::stream::select_all(streams).boxed(),
        )
    }
}

/// The API coordinates of a Floodgate kind.
fn api_resource(kind: Kind) -> ApiResource {
    match kind {
        Kind::AIProviderPool => ApiResource::erase::<AIProviderPool>(&()),
        Kind::TierQueue => ApiResource::erase::<TierQueue>(&()),
        Kind::CachePolicy => ApiResource::erase::<CachePolicy>(&()),
        Kind::LocalModelDeployment => ApiResource::erase::<LocalModelDeployment>(&()),
        Kind::Tenant => ApiResource::erase::<Tenant>(&()),
        Kind::RoutingPolicy => ApiResource::erase::<RoutingPolicy>(&()),
    }
}

/// A reflector of `api` feeding `writer`, as a stream of what its events mean.
fn signals<K>(source: Source, writer: Writer<K>, api: Api<K>) -> Signals
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
    K::DynamicType: Eq + Hash + Clone + Send + Sync,
{
    let events = watcher(api, watcher::Config::default()).default_backoff();
    reflector::reflector(writer, events)
        .map(move |event| {
            let change = event.map(|e| match e {
                watcher::Event::InitDone => Change::Synced,
                watcher::Event::Apply(_) | watcher::Event::Delete(_) => Change::Changed,
                watcher::Event::Init | watcher::Event::InitApply(_) => Change::Listing,
            });
            (source, change)
        })
        .boxed()
}

/// A watch error as it may be logged. Decoding errors of Secrets are withheld: serde quotes
/// the offending value, which would be secret data.
fn describe(source: Source, error: &watcher::Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cause {
        if source == Source::Secrets && e.is::<serde_json::Error>() {
            return "a Secret could not be decoded (details withheld: they could quote secret data)".to_owned();
        }
        cause = e.source();
    }
    error.to_string()
}

/// Validates every cached Floodgate object into [`Resources`], in name order. Invalid objects
/// are skipped and logged once per version (`warned`).
fn collect_resources(stores: &Stores, warned: &mut HashSet<(Kind, String, String)>) -> Resources {
    let mut resources = Resources::default();
    for kind in Kind::ALL {
        let Some(store) = stores.kinds.get(&kind) else {
            continue;
        };
        let objects = store.state();
        match kind {
            Kind::AIProviderPool => resources.pools = validated(kind, &objects, warned),
            Kind::TierQueue => resources.tier_queues = validated(kind, &objects, warned),
            Kind::CachePolicy => resources.cache_policies = validated(kind, &objects, warned),
            Kind::LocalModelDeployment => {
                resources.local_models = validated(kind, &objects, warned)
            }
            Kind::Tenant => resources.tenants = validated(kind, &objects, warned),
            Kind::RoutingPolicy => resources.routing_policies = validated(kind, &objects, warned),
        }
    }
    resources
}

/// The objects of `kind` that pass validation, sorted by name.
fn validated<T: DeserializeOwned>(
    kind: Kind,
    objects: &[Arc<DynamicObject>],
    warned: &mut HashSet<(Kind, String, String)>,
) -> Vec<Sourced<T>> {
    let mut sorted: Vec<&DynamicObject> = objects.iter().map(AsRef::as_ref).collect();
    sorted.sort_by_key(|o| o.name_any());
    let mut out = Vec::new();
    for object in sorted {
        let name = object.name_any();
        let result = serde_json::to_value(object)
            .map_err(|e| vec![floodgate_crds::validate::FieldError::new("", e.to_string())])
            .and_then(|value| validate_object::<T>(kind, &value));
        match result {
            Ok(resource) => out.push(Sourced {
                resource,
                origin: Some(Origin {
                    file: PathBuf::from("cluster"),
                    document: 0,
                }),
            }),
            Err(errors) => {
                let version = object.resource_version().unwrap_or_default();
                if warned.insert((kind, name.clone(), version)) {
                    let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
                    tracing::warn!(
                        resource = %format!("{kind}/{name}"),
                        errors = %errors.join("; "),
                        "invalid object skipped"
                    );
                }
            }
        }
    }
    out
}

/// Every `(secret, key)` value of the watched Secrets. Values that are not UTF-8 are left out
/// (an API key is text); a trailing newline, as `--from-file` leaves it, is dropped.
fn secret_values(secrets: &[Arc<Secret>]) -> HashMap<(String, String), SecretString> {
    let mut out = HashMap::new();
    for secret in secrets {
        let name = secret.name_any();
        for (key, value) in secret.data.iter().flatten() {
            if let Ok(text) = std::str::from_utf8(&value.0) {
                let text = text.trim_end_matches(['\n', '\r']);
                out.insert((name.clone(), key.clone()), SecretString::new(text));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
