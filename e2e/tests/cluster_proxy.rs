//! The proxy in cluster mode against a real API server: the binary (`--cluster`) serves the
//! models of the applied pools, follows `kubectl patch` and `kubectl delete` within seconds,
//! becomes ready only once a configuration resolves, and never logs a secret; the library's
//! watcher, run in-process, applies a key's new RPM and a rotated Secret, and keeps the last
//! good configuration when a change does not resolve.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

mod support;

use arc_swap::ArcSwap;
use floodgate_e2e::cluster::{Cluster, TestNamespace, wait_for};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_proxy::config::Config;
use floodgate_proxy::config::cluster::{ClusterWatcher, initial_config};
use floodgate_proxy::config::load::load_config;
use floodgate_proxy::config::secrets::SecretSources;
use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use support::{get, model_ids};
use tokio_util::sync::CancellationToken;

/// How soon a change must reach the proxy ("within a few seconds").
const PICKUP: Duration = Duration::from_secs(5);
/// Generous bound for waits that are not the subject of a test.
const SLOW: Duration = Duration::from_secs(30);
/// Every placeholder key of the example starts so.
const EXAMPLE_SECRET_PREFIX: &str = "replace-me-";

async fn setup(test: &str) -> (&'static Cluster, TestNamespace) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace(test).await.unwrap();
    (cluster, ns)
}

async fn apply_example(cluster: &Cluster, ns: &TestNamespace) {
    let dir = cluster.repo_root().join("examples/scaling-500rpm");
    cluster
        .kubectl(["apply", "-n", ns.name(), "-f", dir.to_str().unwrap()])
        .await
        .unwrap()
        .ok()
        .unwrap();
}

async fn kubectl_ok(cluster: &Cluster, args: &[&str]) {
    cluster.kubectl(args).await.unwrap().ok().unwrap();
}

async fn start_proxy(cluster: &Cluster, ns: &TestNamespace) -> ProxyProcess {
    ProxyProcess::start(
        ["--cluster", "--namespace", ns.name()],
        &[
            ("KUBECONFIG", cluster.kubeconfig().as_os_str()),
            // Debug for our own code: no level of it may print a secret.
            ("RUST_LOG", OsStr::new("info,floodgate_proxy=debug")),
        ],
    )
    .await
    .unwrap()
}

/// Waits until `/v1/models` satisfies `done`; returns how long that took.
async fn until_models(
    proxy: &ProxyProcess,
    what: &str,
    done: impl Fn(&BTreeSet<String>) -> bool,
) -> Duration {
    let start = Instant::now();
    wait_for(what, SLOW, || async {
        Ok(done(&model_ids(proxy).await).then_some(()))
    })
    .await
    .unwrap();
    start.elapsed()
}

/// Asserts that a change made at `start` was applied within [`PICKUP`]; prints how soon
/// (`--nocapture` shows it).
fn assert_picked_up(what: &str, start: Instant) {
    let took = start.elapsed();
    eprintln!("{what}: applied after {took:?}");
    assert!(took < PICKUP, "{what}: applied only after {took:?}");
}

fn assert_no_secret_in(log: &[String], secrets: &[&str]) {
    for line in log {
        for secret in secrets {
            assert!(
                !line.contains(secret),
                "a secret value reached the log: {line}"
            );
        }
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_proxy_in_cluster_mode_serves_the_applied_pools_and_follows_changes() {
    let (cluster, ns) = setup("proxy-models").await;
    apply_example(cluster, &ns).await;
    let proxy = start_proxy(cluster, &ns).await;
    wait_for("the proxy to be ready", SLOW, || async {
        Ok((get(&proxy, "/readyz").await.0 == 200).then_some(()))
    })
    .await
    .unwrap();

    // The same models as the standalone proxy loading the same manifests from disk.
    let dir = cluster.repo_root().join("examples/scaling-500rpm");
    let (standalone, _) = load_config(&[dir], SecretSources::default()).unwrap();
    let expected: BTreeSet<String> = standalone.models().into_iter().map(|m| m.id).collect();
    assert!(
        expected.contains("claude-sonnet-4") && expected.contains("local-code"),
        "{expected:?}"
    );
    assert_eq!(model_ids(&proxy).await, expected);

    let start = Instant::now();
    kubectl_ok(
        cluster,
        &[
            "patch", "aiproviderpool", "premium", "-n", ns.name(), "--type=json", "-p",
            r#"[{"op":"add","path":"/spec/providers/0/models/-","value":{"name":"claude-opus-4","alias":"smartest"}}]"#,
        ],
    )
    .await;
    until_models(&proxy, "the patched-in model", |ids| {
        ids.contains("claude-opus-4") && ids.contains("smartest")
    })
    .await;
    assert_picked_up("a model added with kubectl patch, on /v1/models", start);

    let start = Instant::now();
    kubectl_ok(
        cluster,
        &["delete", "aiproviderpool", "local", "-n", ns.name()],
    )
    .await;
    until_models(&proxy, "the deleted pool's models to go", |ids| {
        !ids.contains("local-code")
    })
    .await;
    assert_picked_up("a pool deleted with kubectl delete, on /v1/models", start);
    assert!(model_ids(&proxy).await.contains("claude-opus-4"));

    let log = proxy.log();
    assert!(
        log.iter()
            .any(|l| l.contains("first configuration applied")),
        "{log:#?}"
    );
    assert_no_secret_in(&log, &[EXAMPLE_SECRET_PREFIX]);
    proxy.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_proxy_is_ready_only_once_its_configuration_resolves() {
    let (cluster, ns) = setup("proxy-ready").await;
    // A pool whose key's Secret does not exist yet.
    let pool = serde_json::json!({
        "apiVersion": "floodgate.dev/v1alpha1",
        "kind": "AIProviderPool",
        "metadata": {"name": "late"},
        "spec": {"providers": [{"name": "gpt", "type": "openai", "models": [{"name": "gpt-4o"}],
                 "keys": [{"secretRef": {"name": "late-keys", "key": "key1"}, "rpm": 10}]}]}
    });
    cluster
        .kubectl_stdin(["apply", "-n", ns.name(), "-f", "-"], &pool.to_string())
        .await
        .unwrap()
        .ok()
        .unwrap();
    let proxy = start_proxy(cluster, &ns).await;
    proxy.wait_for_log("does not resolve", SLOW).await.unwrap();
    assert_eq!(
        get(&proxy, "/readyz").await.0,
        503,
        "ready without a configuration"
    );
    assert!(model_ids(&proxy).await.is_empty());

    let secret = "sk-late-0123456789";
    let start = Instant::now();
    kubectl_ok(
        cluster,
        &[
            "create",
            "secret",
            "generic",
            "late-keys",
            "-n",
            ns.name(),
            &format!("--from-literal=key1={secret}"),
        ],
    )
    .await;
    wait_for("the proxy to be ready", SLOW, || async {
        Ok((get(&proxy, "/readyz").await.0 == 200).then_some(()))
    })
    .await
    .unwrap();
    assert_picked_up("the missing Secret created, on /readyz", start);
    assert_eq!(
        model_ids(&proxy).await,
        BTreeSet::from(["gpt-4o".to_owned()])
    );
    assert_no_secret_in(&proxy.log(), &[secret]);
    proxy.stop().await.unwrap();
}

/// The rpm and secret of the key named `key` in the shared configuration.
fn key(config: &Config, key: &str) -> Option<(u32, String)> {
    config
        .pools
        .iter()
        .flat_map(|p| &p.providers)
        .flat_map(|p| &p.keys)
        .find(|k| k.name == key)
        .map(|k| (k.rpm.get(), k.secret.expose().to_owned()))
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_cluster_watcher_applies_a_patched_key_rpm_and_a_rotated_secret() {
    let (cluster, ns) = setup("watcher").await;
    apply_example(cluster, &ns).await;
    let shared = Arc::new(ArcSwap::from_pointee(initial_config()));
    let ready = Arc::new(AtomicBool::new(false));
    let cancel = CancellationToken::new();
    let watcher = ClusterWatcher::new(
        cluster.client().await.unwrap(),
        ns.name(),
        SecretSources::default(),
    );
    let stats = watcher.stats();
    let task = tokio::spawn(watcher.run(shared.clone(), ready.clone(), cancel.clone()));

    wait_for("the first sync", SLOW, || async {
        Ok(ready.load(Ordering::Acquire).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(
        key(&shared.load(), "claude-1"),
        Some((20, "replace-me-claude-1".to_owned()))
    );
    let capacity: u32 = shared
        .load()
        .pools
        .iter()
        .flat_map(|p| &p.providers)
        .flat_map(|p| &p.keys)
        .map(|k| k.rpm.get())
        .sum();
    assert_eq!(capacity, 760);

    // A key's RPM, changed with kubectl patch.
    let start = Instant::now();
    kubectl_ok(
        cluster,
        &[
            "patch",
            "aiproviderpool",
            "premium",
            "-n",
            ns.name(),
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/providers/0/keys/0/rpm","value":35}]"#,
        ],
    )
    .await;
    wait_for("rpm 35", SLOW, || async {
        Ok((key(&shared.load(), "claude-1").map(|k| k.0) == Some(35)).then_some(()))
    })
    .await
    .unwrap();
    assert_picked_up(
        "a key's rpm changed with kubectl patch, in the SharedConfig",
        start,
    );

    // A rotated key.
    let start = Instant::now();
    kubectl_ok(
        cluster,
        &[
            "patch",
            "secret",
            "claude-keys",
            "-n",
            ns.name(),
            "--type=merge",
            "-p",
            r#"{"stringData":{"key1":"rotated-1"}}"#,
        ],
    )
    .await;
    wait_for("the rotated key", SLOW, || async {
        Ok(
            (key(&shared.load(), "claude-1").map(|k| k.1) == Some("rotated-1".to_owned()))
                .then_some(()),
        )
    })
    .await
    .unwrap();
    assert_picked_up("a rotated Secret value, in the SharedConfig", start);

    // A change that does not resolve (a Secret that does not exist) is refused; the last good
    // configuration keeps serving.
    let applied = stats.applied.load(Ordering::Relaxed);
    kubectl_ok(
        cluster,
        &[
            "patch",
            "aiproviderpool",
            "premium",
            "-n",
            ns.name(),
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/providers/0/keys/0/secretRef/name","value":"missing"},
                {"op":"replace","path":"/spec/providers/0/keys/0/rpm","value":1}]"#,
        ],
    )
    .await;
    wait_for("the refusal", SLOW, || async {
        Ok((stats.rejected.load(Ordering::Relaxed) > 0).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(stats.applied.load(Ordering::Relaxed), applied);
    assert_eq!(
        key(&shared.load(), "claude-1"),
        Some((35, "rotated-1".to_owned()))
    );
    assert!(ready.load(Ordering::Acquire));

    cancel.cancel();
    tokio::time::timeout(SLOW, task).await.unwrap().unwrap();
}

/// POSTs a chat for `gpt-4o` with the client key `key`; the status.
async fn chat_with_key(proxy: &ProxyProcess, key: &str) -> u16 {
    reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .header("x-api-key", key)
        .json(&serde_json::json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_proxy_in_cluster_mode_identifies_tenants_and_rotates_a_patched_client_key() {
    let (cluster, ns) = setup("proxy-tenants").await;
    let mock =
        floodgate_e2e::mock::MockProviders::start(floodgate_e2e::mock::MockConfig::default())
            .await
            .unwrap();
    let (first, second) = ("sk-cluster-client-first", "sk-cluster-client-second");
    let manifests = format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: provider-keys}}
stringData: {{openai: sk-cluster-provider}}
---
apiVersion: v1
kind: Secret
metadata: {{name: client-keys}}
stringData: {{acme: {first}}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: pool}}
spec:
  providers:
  - {{name: openai, type: openai, baseUrl: "{}", models: [{{name: gpt-4o}}],
     keys: [{{secretRef: {{name: provider-keys, key: openai}}, rpm: 100}}]}}
---
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {{name: tiers}}
spec:
  tiers: [{{name: pro, class: priority, maxWaitMs: 2000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: acme}}
spec:
  tier: pro
  keys: [{{name: main, secretRef: {{name: client-keys, key: acme}}}}]
  limits: {{rpm: 50}}
"#,
        mock.base_url()
    );
    cluster
        .kubectl_stdin(["apply", "-n", ns.name(), "-f", "-"], &manifests)
        .await
        .unwrap()
        .ok()
        .unwrap();
    let proxy = start_proxy(cluster, &ns).await;
    wait_for("the proxy to be ready", SLOW, || async {
        Ok((get(&proxy, "/readyz").await.0 == 200).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(chat_with_key(&proxy, first).await, 200);
    assert_eq!(chat_with_key(&proxy, second).await, 401);

    let start = Instant::now();
    kubectl_ok(
        cluster,
        &[
            "patch",
            "secret",
            "client-keys",
            "-n",
            ns.name(),
            "-p",
            &format!(r#"{{"stringData":{{"acme":"{second}"}}}}"#),
        ],
    )
    .await;
    wait_for("the old client key refused", SLOW, || async {
        Ok((chat_with_key(&proxy, first).await == 401).then_some(()))
    })
    .await
    .unwrap();
    assert_picked_up("a rotated client key, at the door", start);
    assert_eq!(chat_with_key(&proxy, second).await, 200);

    // kubectl get shows the tier and the rpm limit.
    let out = cluster
        .kubectl(["get", "tenants", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let header = out.stdout.lines().next().unwrap_or_default().to_owned();
    for column in ["NAME", "TIER", "RPM LIMIT", "USED RPM", "AGE"] {
        assert!(header.contains(column), "{}", out.stdout);
    }
    let row = out.stdout.lines().nth(1).unwrap_or_default();
    assert!(
        row.starts_with("acme") && row.contains("pro") && row.contains("50"),
        "{}",
        out.stdout
    );
    assert_no_secret_in(&proxy.log(), &[first, second, "sk-cluster-provider"]);
    proxy.stop().await.unwrap();
}
