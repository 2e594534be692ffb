//! What the operator's cluster tests share (`#[path = "support/operator.rs"] mod operator;`):
//! an in-process operator watching a fresh namespace, server-side apply of a manifest, and a
//! wait for an object to reach a state that shows the object on timeout.

use floodgate_e2e::cluster::{Cluster, TestNamespace, wait_for};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long a test waits for the operator or the controller manager to act.
pub const WAIT: Duration = Duration::from_secs(60);

/// The operator of one test; stopped when dropped.
pub struct Operator {
    shutdown: CancellationToken,
    /// Its metrics, to count its reconciles.
    pub metrics: Arc<floodgate_operator::Metrics>,
}

impl Operator {
    /// A guard that stops the operator of `shutdown` when dropped.
    pub fn guard(shutdown: CancellationToken) -> Self {
        Self {
            shutdown,
            metrics: Arc::default(),
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The cluster with the CRDs installed, a fresh namespace for `test`, a client, and an
/// operator watching only that namespace (reading `redis_url` for live figures when given).
pub async fn setup(
    test: &str,
    redis_url: Option<String>,
) -> (&'static Cluster, TestNamespace, Client, Operator) {
    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace(test).await.unwrap();
    let client = cluster.client().await.unwrap();
    let operator = Operator::guard(CancellationToken::new());
    let config = floodgate_operator::Config {
        namespace: Some(ns.name().to_owned()),
        instance: Some(format!("e2e-{test}")),
        redis_url,
        gateway_metrics: None,
    };
    tokio::spawn(floodgate_operator::run(
        client.clone(),
        config,
        operator.metrics.clone(),
        operator.shutdown.clone(),
    ));
    (cluster, ns, client, operator)
}

/// The cells of object `name`'s row in `kubectl get <resource> -n <ns>` (a blank cell is
/// no cell), and the whole table for messages.
pub async fn table_row(
    cluster: &Cluster,
    resource: &str,
    ns: &str,
    name: &str,
) -> (Vec<String>, String) {
    let out = cluster
        .kubectl(["get", resource, "-n", ns])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let row = out
        .stdout
        .lines()
        .find(|l| l.split_whitespace().next() == Some(name))
        .unwrap_or_else(|| panic!("no row {name}:\n{}", out.stdout));
    let cells = row.split_whitespace().map(str::to_owned).collect();
    (cells, out.stdout)
}

/// Applies `manifest` as object `name` (server-side, field manager `floodgate-e2e`).
pub async fn apply<K: kube::Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug>(
    api: &Api<K>,
    name: &str,
    manifest: serde_json::Value,
) -> K {
    api.patch(
        name,
        &PatchParams::apply("floodgate-e2e").force(),
        &Patch::Apply(&manifest),
    )
    .await
    .unwrap()
}

/// Waits until `check` holds for object `name`, returning it; on timeout fails showing the
/// object as last seen.
pub async fn wait_until<K, F>(api: &Api<K>, name: &str, what: &str, check: F) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + Debug,
    F: Fn(&K) -> bool,
{
    let last = std::sync::Mutex::new(None);
    let found = wait_for(what, WAIT, || async {
        let obj = api.get_opt(name).await?;
        let done = obj.as_ref().is_some_and(&check);
        *last.lock().unwrap() = obj.clone();
        Ok(if done { obj } else { None })
    })
    .await;
    found.unwrap_or_else(|e| panic!("{e}; last seen: {:#?}", last.lock().unwrap()))
}
