//! What every reconciler shares: the client, the Event recorder, the operator's settings, and
//! the failure counts behind the error policy's exponential backoff. Also the two writes every
//! reconciler makes the same way: status by server-side apply, and Events on transitions.

use crate::autoscale::DemandSource;
use crate::conditions::{self, DEGRADED, PROGRESSING, READY};
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::usage::UsageReader;
use floodgate_crds::{Condition, ConditionStatus};
use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The field manager of everything the operator applies (children and status).
pub const FIELD_MANAGER: &str = "floodgate-operator";
/// The first retry after a failed reconcile; each further failure doubles it.
pub const BACKOFF_BASE: Duration = Duration::from_secs(1);
/// The longest wait between retries of a failing object.
pub const BACKOFF_MAX: Duration = Duration::from_secs(300);

/// Settings of one operator process.
#[derive(Clone, Default)]
pub struct Config {
    /// Watch only this namespace; every namespace when `None`.
    pub namespace: Option<String>,
    /// The instance reported in Events (`reportingInstance`), usually the pod name.
    pub instance: Option<String>,
    /// The Redis the gateway shares budgets in, for pools' live usage; none: usage not read.
    /// May carry a password, so [`Debug`] does not print it.
    pub redis_url: Option<String>,
    /// Without Redis, where the gateway's replicas serve `/metrics`: pools' usage and
    /// circuits are scraped from there ([`crate::gateway`]). Unused with a Redis URL.
    pub gateway_metrics: Option<crate::gateway::Targets>,
}

impl Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("namespace", &self.namespace)
            .field("instance", &self.instance)
            .field("redis_url", &self.redis_url.as_ref().map(|_| "***"))
            .field("gateway_metrics", &self.gateway_metrics)
            .finish()
    }
}

/// Shared by every reconcile of every controller.
pub struct Context {
    /// The API client.
    pub client: Client,
    /// The operator's settings.
    pub config: Config,
    /// Live usage from the gateway's Redis, when configured.
    pub usage: Option<Arc<UsageReader>>,
    /// Without Redis, pools' live figures scraped from the gateway's replicas, when configured.
    pub gateway: Option<Arc<crate::gateway::Scraper>>,
    /// Where local models' demand is read (the same Redis, when configured).
    pub demand: DemandSource,
    /// The operator's metrics.
    pub metrics: Arc<Metrics>,
    /// When each LocalModelDeployment last changed scale.
    pub autoscaler: crate::autoscale::Autoscaler,
    recorder: Recorder,
    /// Consecutive failures per object (`kind/namespace/name`), reset by a success.
    failures: Mutex<HashMap<String, u32>>,
}

impl Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Context {
    /// A context for `client` with `config`; fails on a Redis URL that does not parse.
    pub fn new(client: Client, config: Config, metrics: Arc<Metrics>) -> Result<Arc<Self>> {
        let usage = config
            .redis_url
            .as_deref()
            .map(UsageReader::new)
            .transpose()?
            .map(Arc::new);
        let demand = match &usage {
            Some(reader) => DemandSource::Redis(reader.clone()),
            None => DemandSource::Unconfigured,
        };
        let gateway = match (&usage, &config.gateway_metrics) {
            (None, Some(targets)) => Some(Arc::new(crate::gateway::Scraper::new(
                client.clone(),
                targets.clone(),
            ))),
            _ => None,
        };
        Ok(Self::build(client, config, metrics, usage, gateway, demand))
    }

    /// A context that reads local models' demand from `demand` instead of Redis (and no
    /// usage): the autoscaler driven without a gateway, as the reconciler tests do.
    pub fn with_demand(
        client: Client,
        config: Config,
        metrics: Arc<Metrics>,
        demand: DemandSource,
    ) -> Arc<Self> {
        Self::build(client, config, metrics, None, None, demand)
    }

    fn build(
        client: Client,
        config: Config,
        metrics: Arc<Metrics>,
        usage: Option<Arc<UsageReader>>,
        gateway: Option<Arc<crate::gateway::Scraper>>,
        demand: DemandSource,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: config.instance.clone(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            config,
            usage,
            gateway,
            demand,
            metrics,
            autoscaler: crate::autoscale::Autoscaler::default(),
            failures: Mutex::default(),
        })
    }

    /// An `Api` for `K` in the namespace the operator watches, or in all.
    pub fn watched_api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match &self.config.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    /// Counts a failure of `obj` and returns how long to wait before the next try.
    pub fn failed<K: Resource<DynamicType = ()>>(&self, obj: &K) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(object_key(obj)).or_insert(0);
        *n = n.saturating_add(1);
        backoff_delay(*n)
    }

    /// Forgets the failures of `obj` after a successful reconcile.
    pub fn succeeded<K: Resource<DynamicType = ()>>(&self, obj: &K) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&object_key(obj));
    }

    /// Forgets what this process keeps per object of kind `K` (failure counts; for local
    /// models, the last scale change and the demand series) for every object of that kind
    /// that `exists` (given namespace and name) says is gone.
    pub fn forget_deleted<K: Resource<DynamicType = ()>>(
        &self,
        exists: impl Fn(&str, &str) -> bool,
    ) {
        let prefix = format!("{}/", K::kind(&()));
        let kept = |key: &str| {
            key.strip_prefix(&prefix)
                .and_then(|rest| rest.split_once('/'))
                .is_none_or(|(namespace, name)| exists(namespace, name))
        };
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|key, _| kept(key));
        if K::kind(&()) == "LocalModelDeployment" {
            self.autoscaler.retain(kept);
            self.metrics.retain_demand(&exists);
        }
    }

    /// Publishes an Event about `obj`; a failure to publish is logged, never fatal.
    pub async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        self.publish(obj, type_, reason, "Reconcile", note).await;
    }

    /// Publishes an Event for `action`. The recorder folds Events of the same object, type,
    /// reason and action into one series (keeping the first note), so the action tells apart
    /// what would otherwise merge: a condition's transition carries the condition's type.
    async fn publish<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.to_owned(),
            note: Some(truncate(note, 1000)),
            action: action.to_owned(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, &obj.object_ref(&())).await {
            tracing::warn!(object = %object_key(obj), reason, error = %e, "cannot publish an Event");
        }
    }

    /// Writes `status` to `obj` by server-side apply, unless `obj` already carries it, and
    /// publishes an Event for each transition of Ready, Degraded or Progressing.
    pub async fn write_status<K, S>(
        &self,
        obj: &K,
        old: Option<&S>,
        status: &S,
        old_conditions: &[Condition],
        new_conditions: &[Condition],
    ) -> Result<()>
    where
        K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + DeserializeOwned
            + Debug,
        S: Serialize + PartialEq,
    {
        if old == Some(status) {
            return Ok(());
        }
        let ns = obj
            .namespace()
            .ok_or_else(|| Error::NoNamespace(object_key(obj)))?;
        let api: Api<K> = Api::namespaced(self.client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": K::api_version(&()),
            "kind": K::kind(&()),
            "status": status,
        });
        api.patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
        for c in conditions::transitions(old_conditions, new_conditions) {
            if let Some(type_) = event_type(c) {
                let note = format!("{} is {:?}: {}", c.type_, c.status, c.message);
                self.publish(obj, type_, &c.reason, &c.type_, note).await;
            }
        }
        Ok(())
    }
}

/// The error policy of every controller: log, count, and retry with exponential backoff.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    let delay = ctx.failed(obj.as_ref());
    tracing::warn!(
        object = %object_key(obj.as_ref()),
        error = %error,
        kind = error.metric_label(),
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// How long to wait after the `failures`-th consecutive failure: 1 s, 2 s, 4 s ... 300 s.
pub fn backoff_delay(failures: u32) -> Duration {
    let exponent = failures.saturating_sub(1).min(16);
    BACKOFF_BASE
        .saturating_mul(1u32 << exponent)
        .min(BACKOFF_MAX)
}

/// `Kind/namespace/name`, for logs and the failure counts.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.meta().namespace.as_deref().unwrap_or_default(),
        obj.meta().name.as_deref().unwrap_or_default()
    )
}

/// Which transitions are announced, and how: a resource turning unready or degraded is a
/// Warning; turning ready, recovering, or starting a rollout is Normal.
fn event_type(c: &Condition) -> Option<EventType> {
    let is_true = c.status == ConditionStatus::True;
    match c.type_.as_str() {
        READY if is_true => Some(EventType::Normal),
        READY => Some(EventType::Warning),
        DEGRADED if is_true => Some(EventType::Warning),
        PROGRESSING if is_true => Some(EventType::Normal),
        _ => None,
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, with an ellipsis when cut.
pub fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max.saturating_sub(3);
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_one_second_up_to_five_minutes() {
        let secs: Vec<u64> = (1..=10).map(|n| backoff_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoff_delay(0), Duration::from_secs(1));
        assert_eq!(backoff_delay(u32::MAX), BACKOFF_MAX);
    }

    fn model(namespace: &str, name: &str) -> floodgate_crds::LocalModelDeployment {
        let spec = serde_json::from_value(
            serde_json::json!({"model": "llama3.1:8b", "classes": ["simple"]}),
        )
        .unwrap_or_else(|e| panic!("a model spec: {e}"));
        let mut lmd = floodgate_crds::LocalModelDeployment::new(name, spec);
        lmd.metadata.namespace = Some(namespace.to_owned());
        lmd
    }

    #[tokio::test]
    async fn what_is_kept_per_object_is_forgotten_when_the_object_is_deleted() {
        let (ctx, _api) = crate::fixtures::context(crate::autoscale::DemandSource::Unconfigured);
        let (gone, kept) = (model("ai", "gone"), model("ai", "kept"));
        let mut pool = floodgate_crds::AIProviderPool::new(
            "gone",
            serde_json::from_value(serde_json::json!({"providers": []}))
                .unwrap_or_else(|e| panic!("a pool spec: {e}")),
        );
        pool.metadata.namespace = Some("ai".into());
        for obj in [&gone, &kept] {
            ctx.failed(obj);
            ctx.autoscaler.changed(&object_key(obj));
            ctx.metrics
                .set_demand("ai", &obj.name_any(), &crate::autoscale::Demand::default());
        }
        ctx.failed(&pool);
        ctx.forget_deleted::<floodgate_crds::LocalModelDeployment>(|ns, name| {
            ns == "ai" && name == "kept"
        });
        // The deleted model starts afresh; the kept one and the other kind's namesake do not.
        assert_eq!(ctx.failed(&gone), Duration::from_secs(1));
        assert_eq!(ctx.failed(&kept), Duration::from_secs(2));
        assert_eq!(ctx.failed(&pool), Duration::from_secs(2));
        assert!(
            ctx.autoscaler
                .since_change(&object_key(&gone), None)
                .is_none()
        );
        assert!(
            ctx.autoscaler
                .since_change(&object_key(&kept), None)
                .is_some()
        );
        let text = ctx.metrics.encode();
        assert!(!text.contains(r#"name="gone""#), "{text}");
        assert!(text.contains(r#"name="kept""#), "{text}");
    }

    #[test]
    fn truncate_cuts_at_a_character_boundary() {
        assert_eq!(truncate("short".into(), 10), "short");
        let cut = truncate("ééééé".into(), 6);
        assert!(cut.len() <= 6 && cut.ends_with("..."), "{cut}");
    }

    #[test]
    fn unready_and_degraded_are_warnings() {
        let c = |t, s| conditions::condition(t, s, "R", "");
        assert_eq!(event_type(&c(READY, false)), Some(EventType::Warning));
        assert_eq!(event_type(&c(READY, true)), Some(EventType::Normal));
        assert_eq!(event_type(&c(DEGRADED, true)), Some(EventType::Warning));
        assert_eq!(event_type(&c(DEGRADED, false)), None);
        assert_eq!(event_type(&c(PROGRESSING, true)), Some(EventType::Normal));
    }
}
