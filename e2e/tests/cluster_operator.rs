//! The operator in-process against a real kube-apiserver, kube-controller-manager (garbage
//! collector, PV binder, ReplicaSets), kube-scheduler and kwok: a pool whose Secret lacks a key
//! says which and is not Ready, then turns Ready when the Secret is fixed; a
//! LocalModelDeployment gets a Deployment with its GPU request and a Service, its kwok pod
//! turns Ready on the GPU pool with a claim of its own bound by the cluster's default class, a
//! spec change rolls out, and deleting it deletes what it owns; the 500 RPM example's models
//! all run Ready; TierQueue and CachePolicy get status. Each test runs its own operator,
//! watching only its namespace.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

#[path = "support/operator.rs"]
mod operator;

use floodgate_crds::{
    AIProviderPool, CachePolicy, ConditionStatus, LocalModelDeployment, TierQueue,
};
use floodgate_e2e::cluster::{Cluster, wait_for};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, PersistentVolumeClaim, Pod, Secret, Service};
use kube::api::{DeleteParams, ListParams};
use kube::{Api, Client};
use operator::{Operator, WAIT, apply, setup, table_row, wait_until};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// The garbage collector learns of a new custom resource kind on its 30 s discovery resync:
/// on a cluster whose CRDs were just installed, owned objects go up to about 40 s after
/// their owner (measured 40 s on a fresh cluster).
const GC_WAIT: Duration = Duration::from_secs(120);

fn condition<'a>(
    conditions: &'a [floodgate_crds::Condition],
    type_: &str,
) -> Option<&'a floodgate_crds::Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

fn pool_manifest() -> serde_json::Value {
    json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "AIProviderPool",
        "metadata": {"name": "premium"},
        "spec": {"providers": [{"name": "claude", "type": "anthropic",
            "models": [{"name": "claude-sonnet-4"}],
            "keys": [
                {"name": "claude-1", "secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
                {"name": "claude-2", "secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 30}]}]}
    })
}

fn secret_manifest(keys: &[&str]) -> serde_json::Value {
    let data: serde_json::Map<String, serde_json::Value> = keys
        .iter()
        .map(|k| ((*k).to_owned(), json!(format!("sk-test-{k}"))))
        .collect();
    json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "claude-keys"}, "stringData": data})
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_pool_names_its_missing_key_and_turns_ready_when_the_secret_is_fixed() {
    let (cluster, ns, client, operator) = setup("operator-pool", None).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    let pools: Api<AIProviderPool> = Api::namespaced(client.clone(), ns.name());
    apply(&secrets, "claude-keys", secret_manifest(&["key1"])).await;
    let created = apply(&pools, "premium", pool_manifest()).await;

    let pool = wait_until(&pools, "premium", "pool status naming key2", |p| {
        p.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::False)
        })
    })
    .await;
    let status = pool.status.unwrap();
    assert_eq!(status.observed_generation, created.metadata.generation);
    assert_eq!(
        (status.ready_keys, status.total_keys, status.capacity_rpm),
        (1, 2, 20)
    );
    let ready = condition(&status.conditions, "Ready").unwrap();
    assert_eq!(ready.reason, "KeyNotFound");
    assert!(
        ready
            .message
            .contains(r#"Secret "claude-keys" has no key "key2""#)
            && ready.message.contains("claude/claude-2"),
        "{}",
        ready.message
    );
    assert!(
        !ready.message.contains("sk-test"),
        "a secret value leaked into status"
    );
    let keys_ready = condition(&status.conditions, "KeysReady").unwrap();
    assert_eq!(keys_ready.status, ConditionStatus::False);
    assert_eq!(
        condition(&status.conditions, "SecretsFound")
            .unwrap()
            .status,
        ConditionStatus::True
    );

    // The transition to not-Ready was announced as a Warning Event on the pool.
    let events: Api<Event> = Api::namespaced(client.clone(), ns.name());
    wait_for("a KeyNotFound Event", WAIT, || async {
        let list = events.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|e| {
                e.reason.as_deref() == Some("KeyNotFound")
                    && e.type_.as_deref() == Some("Warning")
                    && e.involved_object.name.as_deref() == Some("premium")
            })
            .then_some(()))
    })
    .await
    .unwrap();

    // Fixing the Secret is enough: the operator watches Secrets.
    let fixed_at = Instant::now();
    apply(&secrets, "claude-keys", secret_manifest(&["key1", "key2"])).await;
    let pool = wait_until(&pools, "premium", "pool Ready after the fix", |p| {
        p.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    eprintln!(
        "pool Ready {:?} after the Secret was fixed",
        fixed_at.elapsed()
    );
    let status = pool.status.unwrap();
    assert_eq!(
        (status.ready_keys, status.total_keys, status.capacity_rpm),
        (2, 2, 50)
    );
    assert_eq!(status.keys.as_deref(), Some("2/2"));
    // Every pass was counted, none failed. The status is written before the pass ends and
    // is counted, so the count may trail the Ready condition by a moment.
    wait_for("two counted reconciles", WAIT, || async {
        Ok((operator.metrics.reconciles("AIProviderPool", "ok") >= 2).then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(operator.metrics.reconciles("AIProviderPool", "error"), 0);

    let (cells, table) = table_row(cluster, "aiproviderpools", ns.name(), "premium").await;
    // NAME PROVIDERS KEYS CAPACITY-RPM USED-RPM OPEN-CIRCUITS (blank: no Redis) READY AGE
    assert_eq!(cells[1..6], ["1", "2/2", "50", "0", "True"], "{table}");
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn tier_queues_and_cache_policies_get_status() {
    let (cluster, ns, client, _operator) = setup("operator-status", None).await;
    let tiers: Api<TierQueue> = Api::namespaced(client.clone(), ns.name());
    let caches: Api<CachePolicy> = Api::namespaced(client.clone(), ns.name());
    apply(&tiers, "tiers", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "TierQueue", "metadata": {"name": "tiers"},
        "spec": {"tiers": [
            {"name": "pro", "class": "standard", "maxWaitMs": 30000},
            {"name": "free", "class": "standard", "maxWaitMs": 60000,
             "async": {"notify": ["webhook"], "webhook": {"url": "https://example.com/hook",
                "signingSecretRef": {"name": "hooks", "key": "signing"}}}}]}
    }))
    .await;
    apply(&caches, "cache", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "CachePolicy", "metadata": {"name": "cache"},
        "spec": {"exact": {"ttlSeconds": 60}}
    }))
    .await;
    let tq = wait_until(
        &tiers,
        "tiers",
        "TierQueue naming its missing Secret",
        |t| {
            t.status.as_ref().is_some_and(|s| {
                condition(&s.conditions, "SecretsFound")
                    .is_some_and(|c| c.status == ConditionStatus::False)
            })
        },
    )
    .await;
    let status = tq.status.unwrap();
    assert_eq!(status.tier_count, 2);
    let message = &condition(&status.conditions, "Ready").unwrap().message;
    assert!(message.contains(r#"Secret "hooks" not found"#), "{message}");

    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    apply(
        &secrets,
        "hooks",
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hooks"},
        "stringData": {"signing": "s3cret"}}),
    )
    .await;
    wait_until(&tiers, "tiers", "TierQueue Ready", |t| {
        t.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    let cp = wait_until(&caches, "cache", "CachePolicy Ready", |c| {
        c.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    assert_eq!(
        cp.status.unwrap().observed_generation,
        cp.metadata.generation
    );

    let out = cluster
        .kubectl(["get", "tierqueues", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let row = out.stdout.lines().find(|l| l.starts_with("tiers")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // NAME TIERS QUEUED OLDEST-WAIT-MS DEAD-LETTERS READY AGE
    assert_eq!((cells[1], cells[5]), ("2", "True"), "{}", out.stdout);
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_local_model_runs_ollama_on_a_gpu_node_and_its_objects_go_with_it() {
    let (cluster, ns, client, _operator) = setup("operator-lmd", None).await;
    let started = Instant::now();
    let lmds: Api<LocalModelDeployment> = Api::namespaced(client.clone(), ns.name());
    apply(&lmds, "llama", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "LocalModelDeployment", "metadata": {"name": "llama"},
        "spec": {"model": "llama3.1:8b", "classes": ["simple"], "replicas": 1,
                 "resources": {"gpu": 1, "memory": "1Gi"},
                 "storage": {"size": "1Gi"},
                 "nodeSelector": {"nvidia.com/gpu.present": "true"},
                 "ollama": {"numParallel": 4}}
    }))
    .await;

    let lmd = wait_until(&lmds, "llama", "LocalModelDeployment Ready", |l| {
        l.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    eprintln!(
        "LocalModelDeployment Ready {:?} after it was applied",
        started.elapsed()
    );
    let status = lmd.status.unwrap();
    assert_eq!((status.replicas, status.ready_replicas), (1, 1));
    assert_eq!(
        status.endpoint,
        Some(format!("http://llama.{}.svc:11434", ns.name()))
    );
    assert_eq!(
        status.selector.as_deref(),
        Some("floodgate.dev/local-model=llama")
    );

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let deployment = deployments.get("llama").await.unwrap();
    let pod = deployment
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .clone()
        .unwrap();
    let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
    assert_eq!(limits["nvidia.com/gpu"].0, "1");
    assert_eq!(pod.init_containers.unwrap()[0].name, "pull-model");
    let owner = &deployment.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("LocalModelDeployment", lmd.metadata.uid.as_deref().unwrap())
    );
    // The pod was scheduled onto a node of the (tainted) GPU pool.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    let listed = pods
        .list(&ListParams::default().labels("floodgate.dev/local-model=llama"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    let pod_name = listed.items[0].metadata.name.clone().unwrap();
    let node = listed.items[0].spec.as_ref().unwrap().node_name.clone();
    assert!(
        node.as_deref()
            .is_some_and(|n| n.starts_with("kwok-gpu-node-")),
        "{node:?}"
    );
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    assert_eq!(
        services
            .get("llama")
            .await
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()[0]
            .port,
        11434
    );
    // The pod's own weights claim, made by the controller manager, bound by the provisioner.
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns.name());
    let claim = claims.get(&format!("{pod_name}-models")).await.unwrap();
    assert_eq!(claim.status.unwrap().phase.as_deref(), Some("Bound"));
    assert_eq!(
        claim.metadata.owner_references.unwrap()[0].kind,
        "Pod",
        "the claim goes with its pod"
    );

    // `kubectl get localmodeldeployments` prints the model and the status the operator wrote.
    let out = cluster
        .kubectl(["get", "localmodeldeployments", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let mut lines = out.stdout.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .split("  ")
        .map(str::trim)
        .filter(|c| !c.is_empty())
        .collect();
    assert_eq!(
        header,
        [
            "NAME",
            "MODEL",
            "REPLICAS",
            "READY REPLICAS",
            "QUEUE",
            "READY",
            "AGE"
        ],
        "{}",
        out.stdout
    );
    let row: Vec<&str> = lines
        .find(|l| l.starts_with("llama "))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(
        row[..6],
        ["llama", "llama3.1:8b", "1", "1", "0", "True"],
        "{}",
        out.stdout
    );

    // A spec change rolls out: the pod template follows it.
    apply(&lmds, "llama", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "LocalModelDeployment", "metadata": {"name": "llama"},
        "spec": {"model": "llama3.1:8b", "classes": ["simple"], "replicas": 1,
                 "resources": {"gpu": 1, "memory": "1Gi"},
                 "storage": {"size": "1Gi"},
                 "nodeSelector": {"nvidia.com/gpu.present": "true"},
                 "ollama": {"numParallel": 8}}
    }))
    .await;
    wait_until(
        &deployments,
        "llama",
        "OLLAMA_NUM_PARALLEL=8 in the pod template",
        |d| {
            d.spec
                .as_ref()
                .and_then(|s| s.template.spec.as_ref())
                .is_some_and(|p| {
                    p.containers[0]
                        .env
                        .iter()
                        .flatten()
                        .any(|e| e.name == "OLLAMA_NUM_PARALLEL" && e.value.as_deref() == Some("8"))
                })
        },
    )
    .await;
    wait_until(&lmds, "llama", "status of generation 2", |l| {
        l.status.as_ref().is_some_and(|s| {
            s.observed_generation == l.metadata.generation && s.observed_generation == Some(2)
        })
    })
    .await;

    // Deleting the resource deletes what it owns (the controller manager's garbage collector),
    // and the pods' claims with their pods. A claim may stay Terminating until its pod is gone
    // (pvc-protection; kwok honours the pod's 30 s grace period): marked for deletion is
    // enough here.
    let deleted_at = Instant::now();
    lmds.delete("llama", &DeleteParams::background())
        .await
        .unwrap();
    wait_for(
        "the owned Deployment, Service and claims to go",
        GC_WAIT,
        || async {
            let claims_going = claims
                .list(&ListParams::default().labels("floodgate.dev/local-model=llama"))
                .await?
                .items
                .iter()
                .all(|c| c.metadata.deletion_timestamp.is_some());
            let gone = claims_going
                && deployments.get_opt("llama").await?.is_none()
                && services.get_opt("llama").await?.is_none();
            Ok(gone.then_some(()))
        },
    )
    .await
    .unwrap();
    eprintln!(
        "owned objects gone {:?} after the delete",
        deleted_at.elapsed()
    );
}

/// Fails at once, saying why, on a cluster without `gpus` GPUs or a default StorageClass
/// (one started by an `e2e/cluster.sh` older than its GPU pool), where the pods would only
/// stay Pending until a timeout.
async fn assert_gpu_pool_and_storage(client: &Client, gpus: i64) {
    use k8s_openapi::api::core::v1::Node;
    use k8s_openapi::api::storage::v1::StorageClass;
    let classes: Api<StorageClass> = Api::all(client.clone());
    let default_class = classes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .any(|c| {
            c.metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get("storageclass.kubernetes.io/is-default-class"))
                .is_some_and(|v| v == "true")
        });
    let nodes: Api<Node> = Api::all(client.clone());
    let offered: i64 = nodes
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .filter_map(|n| {
            n.status
                .as_ref()?
                .allocatable
                .as_ref()?
                .get("nvidia.com/gpu")
        })
        .map(|q| q.0.parse::<i64>().unwrap_or(0))
        .sum();
    assert!(
        default_class && offered >= gpus,
        "the cluster offers {offered} GPUs (need {gpus}) and {} default StorageClass: it predates \
         e2e/cluster.sh's GPU pool and storage class; restart it (`make cluster-down cluster-up`)",
        if default_class { "a" } else { "no" }
    );
}

/// The `reportingInstance` of the Events in `ns` about object `name`, once there is one.
async fn event_reporters(client: &Client, ns: &str, name: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("an Event about {name}"), WAIT, || async {
        let reporters: Vec<String> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .map(|e| e.reporting_instance.unwrap_or_default())
            .collect();
        Ok((!reporters.is_empty()).then_some(reporters))
    })
    .await
    .unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_second_replica_waits_for_the_lease_and_takes_over_when_the_first_stops() {
    use floodgate_operator::leader::{LeaseLock, RETRY_EVERY};
    use k8s_openapi::api::coordination::v1::Lease;

    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace("operator-lease").await.unwrap();
    let client = cluster.client().await.unwrap();
    let replica = |id: &str| {
        let stop = CancellationToken::new();
        let config = floodgate_operator::Config {
            namespace: Some(ns.name().to_owned()),
            instance: Some(id.to_owned()),
            redis_url: None,
            gateway_metrics: None,
        };
        let lock = LeaseLock::new(client.clone(), ns.name(), "floodgate-operator", id);
        let task = tokio::spawn(floodgate_operator::run_leader_elected(
            client.clone(),
            config,
            lock,
            Arc::new(floodgate_operator::Metrics::default()),
            stop.clone(),
        ));
        (stop, task)
    };
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let held_by = |id: &'static str| {
        move |l: &Lease| l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some(id)
    };
    let pools: Api<AIProviderPool> = Api::namespaced(client.clone(), ns.name());
    let has_status = |p: &AIProviderPool| p.status.is_some();

    let (stop_a, a) = replica("replica-a");
    wait_until(
        &leases,
        "floodgate-operator",
        "replica-a to lead",
        held_by("replica-a"),
    )
    .await;
    let (stop_b, b) = replica("replica-b");
    let mut pool = pool_manifest();
    pool["metadata"]["name"] = json!("first");
    apply(&pools, "first", pool.clone()).await;
    wait_until(&pools, "first", "status of pool first", has_status).await;
    // Nothing to wait for: the follower must do nothing over several of its retries.
    tokio::time::sleep(RETRY_EVERY * 3).await;
    let lease = leases.get("floodgate-operator").await.unwrap();
    assert!(held_by("replica-a")(&lease), "{lease:?}");
    assert!(!b.is_finished());
    let reporters = event_reporters(&client, ns.name(), "first").await;
    assert!(reporters.iter().all(|r| r == "replica-a"), "{reporters:?}");

    // A graceful stop releases the Lease: the follower takes over within a retry or two.
    let stopped_at = Instant::now();
    stop_a.cancel();
    a.await.unwrap().unwrap();
    wait_until(
        &leases,
        "floodgate-operator",
        "replica-b to lead",
        held_by("replica-b"),
    )
    .await;
    eprintln!(
        "replica-b leads {:?} after replica-a stopped",
        stopped_at.elapsed()
    );
    pool["metadata"]["name"] = json!("second");
    apply(&pools, "second", pool).await;
    wait_until(&pools, "second", "status of pool second", has_status).await;
    let reporters = event_reporters(&client, ns.name(), "second").await;
    assert!(reporters.iter().all(|r| r == "replica-b"), "{reporters:?}");
    stop_b.cancel();
    b.await.unwrap().unwrap();
}

/// A client authenticated as ServiceAccount `sa` of `ns` (a token from the TokenRequest API).
async fn client_as(cluster: &Cluster, ns: &str, sa: &str) -> Client {
    let out = cluster
        .kubectl(["create", "token", sa, "-n", ns, "--duration=10m"])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let kubeconfig = kube::config::Kubeconfig::read_from(cluster.kubeconfig()).unwrap();
    let mut config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    config.auth_info = kube::config::AuthInfo {
        token: Some(out.stdout.trim().to_owned().into()),
        ..Default::default()
    };
    Client::try_from(config).unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_charts_operator_role_is_enough_for_every_controller_and_no_more() {
    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace("operator-rbac").await.unwrap();
    // The operator's ServiceAccount, Role and RoleBinding as the chart renders them.
    let home = tempfile::tempdir().unwrap();
    let mut helm = tokio::process::Command::new(cluster.bin_dir().join("helm"));
    for var in ["HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"] {
        helm.env(var, home.path());
    }
    let chart = cluster.repo_root().join("charts/floodgate");
    let rendered = helm
        .args(["template", "fg", &chart.to_string_lossy(), "-n", ns.name()])
        .args(["--show-only", "templates/operator-serviceaccount.yaml"])
        .args(["--show-only", "templates/operator-role.yaml"])
        .args(["--show-only", "templates/operator-rolebinding.yaml"])
        .output()
        .await
        .unwrap();
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    cluster
        .kubectl_stdin(
            ["apply", "-n", ns.name(), "-f", "-"],
            &String::from_utf8_lossy(&rendered.stdout),
        )
        .await
        .unwrap()
        .ok()
        .unwrap();

    let admin = cluster.client().await.unwrap();
    let operator = client_as(cluster, ns.name(), "fg-floodgate-operator").await;
    let stop = CancellationToken::new();
    let _stop_on_drop = Operator::guard(stop.clone());
    let config = floodgate_operator::Config {
        namespace: Some(ns.name().to_owned()),
        instance: Some("rbac".to_owned()),
        redis_url: None,
        gateway_metrics: None,
    };
    let lock = floodgate_operator::leader::LeaseLock::new(
        operator.clone(),
        ns.name(),
        "floodgate-operator",
        "rbac",
    );
    let task = tokio::spawn(floodgate_operator::run_leader_elected(
        operator,
        config,
        lock,
        Arc::new(floodgate_operator::Metrics::default()),
        stop.clone(),
    ));

    // As that ServiceAccount: the Lease, a pool's status and Event, a model's children.
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns.name());
    let pools: Api<AIProviderPool> = Api::namespaced(admin.clone(), ns.name());
    let lmds: Api<LocalModelDeployment> = Api::namespaced(admin.clone(), ns.name());
    let tenants: Api<floodgate_crds::Tenant> = Api::namespaced(admin.clone(), ns.name());
    apply(&secrets, "claude-keys", secret_manifest(&["key1", "key2"])).await;
    apply(&tenants, "acme", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme"},
        "spec": {"keys": [{"name": "main", "secretRef": {"name": "claude-keys", "key": "key1"}}]}
    }))
    .await;
    apply(&pools, "premium", pool_manifest()).await;
    apply(&lmds, "llama", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "LocalModelDeployment", "metadata": {"name": "llama"},
        "spec": {"model": "llama3.1:8b", "classes": ["simple"], "resources": {"gpu": 1}}
    }))
    .await;
    wait_until(&pools, "premium", "pool Ready", |p| {
        p.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    wait_until(&lmds, "llama", "model with an endpoint", |l| {
        l.status
            .as_ref()
            .is_some_and(|s| s.endpoint.is_some() && s.observed_generation == l.metadata.generation)
    })
    .await;
    wait_until(&tenants, "acme", "tenant Ready", |t| {
        t.status.as_ref().is_some_and(|s| {
            condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
        })
    })
    .await;
    // A RoutingPolicy naming a pool that does not exist says so, and turns Ready once it does.
    let policies: Api<floodgate_crds::RoutingPolicy> = Api::namespaced(admin.clone(), ns.name());
    let policy = |pool: &str| {
        json!({
            "apiVersion": "floodgate.dev/v1alpha1", "kind": "RoutingPolicy",
            "metadata": {"name": "routing"},
            "spec": {"rules": [{"name": "local-first", "match": {"classes": ["simple"]},
                                "targets": [{"localModel": "llama"}, {"pool": pool}]}]}
        })
    };
    apply(&policies, "routing", policy("elsewhere")).await;
    let missing = wait_until(
        &policies,
        "routing",
        "policy naming its missing pool",
        |p| {
            p.status.as_ref().is_some_and(|s| {
                condition(&s.conditions, "TargetsFound")
                    .is_some_and(|c| c.status == ConditionStatus::False)
            })
        },
    )
    .await;
    let found = condition(&missing.status.unwrap().conditions, "TargetsFound")
        .unwrap()
        .clone();
    assert_eq!(
        found.message,
        r#"AIProviderPool "elsewhere" not found (rule local-first)"#
    );
    let mut elsewhere = pool_manifest();
    elsewhere["metadata"]["name"] = json!("elsewhere");
    apply(&pools, "elsewhere", elsewhere).await;
    let ready = wait_until(
        &policies,
        "routing",
        "policy Ready once its pool exists",
        |p| {
            p.status.as_ref().is_some_and(|s| {
                condition(&s.conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
            })
        },
    )
    .await;
    assert_eq!(ready.status.unwrap().rule_count, 1);
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns.name());
    assert!(deployments.get_opt("llama").await.unwrap().is_some());
    assert!(
        !event_reporters(&admin, ns.name(), "premium")
            .await
            .is_empty()
    );
    assert!(!task.is_finished(), "the operator stopped: {task:?}");

    // And no more than that: nothing outside the namespace, no writes to Secrets or pods.
    let sa = format!(
        "--as=system:serviceaccount:{}:fg-floodgate-operator",
        ns.name()
    );
    for (verb, resource, namespace, allowed) in [
        ("watch", "secrets", ns.name(), true),
        ("patch", "deployments.apps", ns.name(), true),
        (
            "patch",
            "localmodeldeployments.floodgate.dev",
            ns.name(),
            false,
        ),
        ("list", "secrets", "default", false),
        ("create", "secrets", ns.name(), false),
        ("delete", "deployments.apps", ns.name(), false),
        ("create", "pods", ns.name(), false),
        // The gateway's pods, found to scrape their metrics without Redis.
        ("list", "pods", ns.name(), true),
        ("list", "pods", "default", false),
        ("patch", "aiproviderpools.floodgate.dev", ns.name(), false),
    ] {
        let out = cluster
            .kubectl(["auth", "can-i", verb, resource, "-n", namespace, &sa])
            .await
            .unwrap();
        let answer = out.stdout.trim();
        assert_eq!(
            answer == "yes",
            allowed,
            "{verb} {resource} in {namespace}: {answer} {}",
            out.stderr
        );
    }
    // Autoscaling writes replicas through the scale subresource, and only there.
    let out = cluster
        .kubectl([
            "auth",
            "can-i",
            "patch",
            "localmodeldeployments.floodgate.dev",
            "--subresource=scale",
            "-n",
            ns.name(),
            &sa,
        ])
        .await
        .unwrap();
    assert_eq!(out.stdout.trim(), "yes", "{}", out.stderr);
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn the_500rpm_example_applied_under_the_operator_gets_its_objects_and_status() {
    let (cluster, ns, client, _operator) = setup("operator-example", None).await;
    assert_gpu_pool_and_storage(&client, 6).await;
    let example = cluster.repo_root().join("examples/scaling-500rpm");
    cluster
        .kubectl(["apply", "-n", ns.name(), "-f", example.to_str().unwrap()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let ready = |conditions: &[floodgate_crds::Condition]| {
        condition(conditions, "Ready").is_some_and(|c| c.status == ConditionStatus::True)
    };

    // The pools: every key of the example's Secrets resolves; 3x20 + 5x60 + 2x200 RPM.
    let pools: Api<AIProviderPool> = Api::namespaced(client.clone(), ns.name());
    let premium = wait_until(&pools, "premium", "pool premium Ready", |p| {
        p.status.as_ref().is_some_and(|s| ready(&s.conditions))
    })
    .await
    .status
    .unwrap();
    assert_eq!(
        (premium.ready_keys, premium.total_keys, premium.capacity_rpm),
        (10, 10, 760)
    );
    wait_until(&pools, "local", "pool local with status", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.observed_generation == p.metadata.generation)
    })
    .await;
    let tiers: Api<TierQueue> = Api::namespaced(client.clone(), ns.name());
    let tq = wait_until(&tiers, "tiers", "TierQueue Ready", |t| {
        t.status.as_ref().is_some_and(|s| ready(&s.conditions))
    })
    .await;
    assert_eq!(tq.status.unwrap().tier_count, 4);
    let caches: Api<CachePolicy> = Api::namespaced(client.clone(), ns.name());
    wait_until(&caches, "default", "CachePolicy Ready", |c| {
        c.status.as_ref().is_some_and(|s| ready(&s.conditions))
    })
    .await;
    // Every pool the routing rules name exists.
    let policies: Api<floodgate_crds::RoutingPolicy> = Api::namespaced(client.clone(), ns.name());
    let hybrid = wait_until(&policies, "hybrid", "RoutingPolicy Ready", |p| {
        p.status.as_ref().is_some_and(|s| ready(&s.conditions))
    })
    .await
    .status
    .unwrap();
    assert_eq!(hybrid.rule_count, 4);
    assert_eq!(
        condition(&hybrid.conditions, "TargetsFound").map(|c| c.status),
        Some(ConditionStatus::True)
    );

    // Each local model: minReplicas GPU replicas, a Service; without a demand source the
    // autoscaler says so rather than pretending to scale.
    let lmds: Api<LocalModelDeployment> = Api::namespaced(client.clone(), ns.name());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let services: Api<Service> = Api::namespaced(client.clone(), ns.name());
    let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), ns.name());
    for (name, model) in [
        ("llama", "llama3.1:8b"),
        ("mistral", "mistral:7b"),
        ("codellama", "codellama:13b"),
    ] {
        let lmd = wait_until(&lmds, name, "model status with an endpoint", |l| {
            l.status.as_ref().is_some_and(|s| {
                s.endpoint.is_some() && s.observed_generation == l.metadata.generation
            })
        })
        .await;
        let status = lmd.status.unwrap();
        assert_eq!(
            status.endpoint,
            Some(format!("http://{name}.{}.svc:11434", ns.name()))
        );
        let autoscaling = condition(&status.conditions, "AutoscalingActive").unwrap();
        assert_eq!(
            (autoscaling.status, autoscaling.reason.as_str()),
            (ConditionStatus::False, "NoDemandSource"),
            "{name}"
        );
        let deployment = deployments.get(name).await.unwrap();
        let spec = deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(2), "{name}: minReplicas");
        let pod = spec.template.spec.unwrap();
        let limits = pod.containers[0].resources.clone().unwrap().limits.unwrap();
        assert_eq!(limits["nvidia.com/gpu"].0, "1", "{name}");
        let pull = &pod.init_containers.unwrap()[0];
        assert!(
            pull.env
                .iter()
                .flatten()
                .any(|e| e.name == "FLOODGATE_MODEL" && e.value.as_deref() == Some(model)),
            "{name}: the init step pulls {model}"
        );
        assert!(services.get_opt(name).await.unwrap().is_some(), "{name}");
    }

    // And they run: every model's two kwok pods Ready on the GPU pool, each on a 50Gi claim of
    // its own that the cluster's default class bound; the models' status says so.
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns.name());
    for name in ["llama", "mistral", "codellama"] {
        let lmd = wait_until(&lmds, name, "model Ready with 2 ready replicas", |l| {
            l.status
                .as_ref()
                .is_some_and(|s| s.ready_replicas == 2 && ready(&s.conditions))
        })
        .await;
        assert_eq!(lmd.status.unwrap().replicas, 2, "{name}");
        let selector = format!("floodgate.dev/local-model={name}");
        let listed = pods
            .list(&ListParams::default().labels(&selector))
            .await
            .unwrap()
            .items;
        let running: Vec<&Pod> = listed
            .iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .collect();
        assert_eq!(running.len(), 2, "{name}: {listed:#?}");
        for pod in running {
            let pod_name = pod.metadata.name.clone().unwrap();
            let status = pod.status.clone().unwrap();
            assert!(
                status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "Ready" && c.status == "True"),
                "{pod_name}: {status:#?}"
            );
            let node = pod.spec.as_ref().unwrap().node_name.clone().unwrap();
            assert!(node.starts_with("kwok-gpu-node-"), "{pod_name} on {node}");
            let claim = claims.get(&format!("{pod_name}-models")).await.unwrap();
            assert_eq!(
                claim.status.as_ref().unwrap().phase.as_deref(),
                Some("Bound"),
                "{pod_name}"
            );
            let requested = claim.spec.unwrap().resources.unwrap().requests.unwrap();
            assert_eq!(requested["storage"].0, "50Gi", "{pod_name}");
        }
    }
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_leader_whose_lease_is_taken_stops_its_controllers_at_its_next_renewal() {
    use floodgate_operator::leader::{CALL_TIMEOUT, LeaseLock, RETRY_EVERY};
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;

    let cluster = Cluster::get().await.unwrap();
    cluster.install_crds().await.unwrap();
    let ns = cluster.namespace("operator-lease-lost").await.unwrap();
    let client = cluster.client().await.unwrap();
    let stop = CancellationToken::new();
    let _stop_on_drop = Operator::guard(stop.clone());
    let config = floodgate_operator::Config {
        namespace: Some(ns.name().to_owned()),
        instance: Some("replica-a".to_owned()),
        redis_url: None,
        gateway_metrics: None,
    };
    let lock = LeaseLock::new(client.clone(), ns.name(), "floodgate-operator", "replica-a");
    let task = tokio::spawn(floodgate_operator::run_leader_elected(
        client.clone(),
        config,
        lock,
        Arc::new(floodgate_operator::Metrics::default()),
        stop.clone(),
    ));
    let leases: Api<Lease> = Api::namespaced(client.clone(), ns.name());
    let mut lease = wait_until(&leases, "floodgate-operator", "replica-a to lead", |l| {
        l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) == Some("replica-a")
    })
    .await;
    // Another replica takes the Lease (as after replica-a was cut off for a lease duration).
    let spec = lease.spec.get_or_insert_with(Default::default);
    spec.holder_identity = Some("replica-z".to_owned());
    spec.renew_time = Some(MicroTime(k8s_openapi::jiff::Timestamp::now()));
    leases
        .replace("floodgate-operator", &Default::default(), &lease)
        .await
        .unwrap();
    // At its next renewal replica-a sees it, aborts its reconciles, stops its controllers and
    // returns: it never writes the Lease back.
    let ended = tokio::time::timeout(RETRY_EVERY + CALL_TIMEOUT * 2, task)
        .await
        .expect("replica-a kept leading after losing its Lease")
        .unwrap();
    assert!(
        matches!(ended, Err(floodgate_operator::Error::LeaseLost)),
        "{ended:?}"
    );
    let lease = leases.get("floodgate-operator").await.unwrap();
    assert_eq!(
        lease.spec.unwrap().holder_identity.as_deref(),
        Some("replica-z")
    );
}

/// HPA mode: `examples/local-model-hpa/` (a LocalModelDeployment without `spec.autoscaling`
/// and an autoscaling/v2 HPA targeting it) applied under the operator. The controller
/// manager's HPA controller reads the model through its scale subresource (the CRD's
/// `specReplicasPath` and `labelSelectorPath`) and raises it from 1 to `minReplicas` 2 by
/// writing `/scale`; the operator then gives its Deployment 2 replicas. The External metric
/// itself is not served here (no metrics adapter in the e2e cluster): the HPA says so in
/// `ScalingActive`, and scaling on demand beyond `minReplicas` is untested.
#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn an_hpa_raises_a_local_model_to_min_replicas_through_its_scale_subresource() {
    let (cluster, ns, client, _operator) = setup("operator-hpa", None).await;
    let example = cluster.repo_root().join("examples/local-model-hpa");
    cluster
        .kubectl(["apply", "-n", ns.name(), "-f", example.to_str().unwrap()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let lmds: Api<LocalModelDeployment> = Api::namespaced(client.clone(), ns.name());
    // The HPA controller syncs every 15 s.
    let started = Instant::now();
    let lmd = wait_until(&lmds, "llama", "the HPA to set 2 replicas", |l| {
        l.spec.replicas == Some(2)
    })
    .await;
    eprintln!(
        "the HPA raised the model to 2 after {:?}",
        started.elapsed()
    );
    // Through the scale subresource, by the controller manager.
    let writers: Vec<(String, Option<String>)> = lmd
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|f| (f.manager.clone().unwrap_or_default(), f.subresource.clone()))
        .collect();
    assert!(
        writers
            .iter()
            .any(|(m, sub)| m.starts_with("kube-controller-manager")
                && sub.as_deref() == Some("scale")),
        "{writers:?}"
    );
    // The operator follows: the Deployment wants 2.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    wait_until(&deployments, "llama", "the Deployment at 2 replicas", |d| {
        d.spec.as_ref().and_then(|s| s.replicas) == Some(2)
    })
    .await;
    // What the HPA says of the metric it could not read (shown, not asserted: a cluster with
    // an adapter reads it).
    let hpa = cluster
        .kubectl([
            "get",
            "hpa",
            "llama",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.status.conditions}",
        ])
        .await
        .unwrap()
        .ok()
        .unwrap();
    eprintln!("HPA conditions: {}", hpa.stdout);
    assert!(hpa.stdout.contains("AbleToScale"), "{}", hpa.stdout);
}
