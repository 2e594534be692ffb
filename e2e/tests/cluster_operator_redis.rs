//! The operator in-process against the real control plane and a real redis-server that the
//! proxy's own code writes: a Tenant's status and `kubectl get tenants` show the requests and
//! tokens its limits counted; a LocalModelDeployment scales up when the demand the proxies
//! publish for it rises over its threshold, says why in status and an Event, and scales back
//! down after its cooldown when the demand is gone; a TierQueue shows what waits on the
//! proxies per tier and class; a CachePolicy shows the hit ratios the proxies counted; a pool
//! shows each provider's circuit, the worst the proxies report, and on how many it is open.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

#[path = "support/operator.rs"]
mod operator;

use floodgate_crds::redis_keys::{KeyBudgetKeys, tenant_use_key};
use floodgate_crds::{ConditionStatus, LocalModelDeployment, Tenant};
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::redis::RedisServer;
use floodgate_proxy::budget::{Limits, RedisBudgets, SharedOptions};
use floodgate_proxy::demand::{DemandBoard, Publisher};
use floodgate_proxy::secret::SecretString;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Event, Secret};
use kube::api::ListParams;
use kube::{Api, Client};
use operator::{WAIT, apply, setup, table_row, wait_until};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn is_true(conditions: &[floodgate_crds::Condition], type_: &str) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == type_ && c.status == ConditionStatus::True)
}

/// The notes of the Events about `name` with `reason`, once there is one.
async fn event_notes(client: &Client, ns: &str, name: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    wait_for(&format!("a {reason} Event about {name}"), WAIT, || async {
        let notes: Vec<String> = events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.involved_object.name.as_deref() == Some(name))
            .filter(|e| e.reason.as_deref() == Some(reason))
            .map(|e| e.message.unwrap_or_default())
            .collect();
        Ok((!notes.is_empty()).then_some(notes))
    })
    .await
    .unwrap()
}

/// The publisher of proxy replica `replica` writing to `redis`, with no local-model demand.
fn replica_publisher(redis: &RedisServer, replica: &str) -> Publisher {
    Publisher::new(
        Arc::new(DemandBoard::default()),
        &SecretString::new(redis.url()),
        replica,
    )
    .unwrap()
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_tenants_status_and_columns_show_what_its_limits_counted() {
    let redis = RedisServer::start().await.unwrap();
    let (cluster, ns, client, _operator) = setup("operator-tenant", Some(redis.url())).await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    apply(
        &secrets,
        "acme-keys",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "acme-keys"}, "stringData": {"main": "fg-test-main"}}),
    )
    .await;
    // What the proxies' identity stage records for this tenant's limits: 3 requests, 40
    // tokens each, through the proxy's own shared budgets.
    let mut options = SharedOptions::new(SecretString::new(redis.url()));
    options.timeout = Duration::from_secs(2);
    let budgets = Arc::new(RedisBudgets::new(options, Duration::from_secs(60)).unwrap());
    let keys = Arc::new(KeyBudgetKeys::tenant(&format!("{}/acme", ns.name())));
    let limits = Limits {
        rpm: Some(100),
        tpm: Some(10_000),
    };
    for i in 0..3 {
        budgets
            .acquire(&keys, limits, 40, &format!("acme-{i}"))
            .await
            .unwrap();
    }
    let tenants: Api<Tenant> = Api::namespaced(client.clone(), ns.name());
    apply(&tenants, "acme", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "acme"},
        "spec": {"tier": "pro", "keys": [{"name": "main", "secretRef": {"name": "acme-keys", "key": "main"}}],
                 "limits": {"rpm": 100, "tpm": 10000}}
    }))
    .await;
    let tenant = wait_until(&tenants, "acme", "Tenant usage in status", |t| {
        t.status
            .as_ref()
            .is_some_and(|s| s.used_rpm == 3 && is_true(&s.conditions, "Ready"))
    })
    .await;
    let status = tenant.status.unwrap();
    assert_eq!(status.used_tpm, 120);
    assert!(is_true(&status.conditions, "UsageTracked"));
    assert!(status.last_seen.is_some());
    assert_eq!(status.observed_generation, tenant.metadata.generation);

    let out = cluster
        .kubectl(["get", "tenants", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let row = out.stdout.lines().find(|l| l.starts_with("acme")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // NAME TIER RPM-LIMIT USED-RPM TPM-LIMIT USED-TPM LAST-SEEN READY AGE
    assert_eq!(
        (&cells[1..6], cells[7]),
        (&["pro", "100", "3", "10000", "120"][..], "True"),
        "{}",
        out.stdout
    );

    // A tenant without limits: no window records its requests, so the proxies count them
    // per minute for its status (what the identity stage does on each admission).
    let use_key = tenant_use_key(&format!("{}/open", ns.name()));
    for _ in 0..4 {
        budgets.count_use(&use_key).await.unwrap();
    }
    apply(&tenants, "open", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": "open"},
        "spec": {"tier": "pro", "keys": [{"name": "main", "secretRef": {"name": "acme-keys", "key": "main"}}]}
    }))
    .await;
    let open = wait_until(
        &tenants,
        "open",
        "an unlimited tenant's use in status",
        |t| {
            t.status
                .as_ref()
                .is_some_and(|s| s.used_rpm == 4 && s.last_seen.is_some())
        },
    )
    .await;
    let status = open.status.unwrap();
    assert!(
        is_true(&status.conditions, "UsageTracked"),
        "{:?}",
        status.conditions
    );
    assert_eq!(status.used_tpm, 0);
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn rising_demand_raises_a_local_models_replicas_and_says_why() {
    let redis = RedisServer::start().await.unwrap();
    let (_cluster, ns, client, _operator) = setup("operator-scale", Some(redis.url())).await;
    // A proxy replica's demand publisher, as the gateway runs it.
    let board = Arc::new(DemandBoard::default());
    let cell = board.cell(ns.name(), "llama");
    let publishing = CancellationToken::new();
    let _stop_publishing = publishing.clone().drop_guard();
    let publisher = Publisher::new(board.clone(), &SecretString::new(redis.url()), "proxy-0");
    tokio::spawn(publisher.unwrap().run(publishing));

    let lmds: Api<LocalModelDeployment> = Api::namespaced(client.clone(), ns.name());
    apply(&lmds, "llama", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "LocalModelDeployment", "metadata": {"name": "llama"},
        "spec": {"model": "llama3.1:8b", "classes": ["simple"],
                 "resources": {"gpu": 0, "memory": "1Gi"},
                 "autoscaling": {"minReplicas": 1, "maxReplicas": 2, "queueDepth": 5,
                                 "cooldownSeconds": 1}}
    }))
    .await;
    wait_until(&lmds, "llama", "1 replica ready", |l| {
        l.status.as_ref().is_some_and(|s| s.ready_replicas == 1)
    })
    .await;

    // 12 requests wait for the model: over 5 per replica.
    let waiting: Vec<_> = (0..12).map(|_| cell.queued()).collect();
    let raised = Instant::now();
    let lmd = wait_until(&lmds, "llama", "2 replicas ready", |l| {
        l.spec.replicas == Some(2) && l.status.as_ref().is_some_and(|s| s.ready_replicas == 2)
    })
    .await;
    eprintln!(
        "2 replicas ready {:?} after the demand rose",
        raised.elapsed()
    );
    let status = lmd.status.unwrap();
    assert_eq!(
        status.last_scale_reason.as_deref(),
        Some("scaled up 1 -> 2: 12 requests waiting, over 5 per replica x 1")
    );
    assert!(status.last_scale_time.is_some());
    let notes = event_notes(&client, ns.name(), "llama", "ScaledUp").await;
    assert!(notes[0].contains("12 requests waiting"), "{notes:?}");
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), ns.name());
    let deployment = deployments.get("llama").await.unwrap();
    assert_eq!(deployment.spec.unwrap().replicas, Some(2));
    // The queue is shown while it lasts; at maxReplicas it scales no further.
    wait_until(&lmds, "llama", "queue depth in status", |l| {
        l.status.as_ref().is_some_and(|s| s.queue_depth == 12)
    })
    .await;

    // The demand is gone: back to 1 after the cooldown.
    drop(waiting);
    let lmd = wait_until(&lmds, "llama", "scaled back down to 1", |l| {
        l.spec.replicas == Some(1)
            && l.status.as_ref().is_some_and(|s| {
                s.last_scale_reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with("scaled down"))
            })
    })
    .await;
    let reason = lmd.status.unwrap().last_scale_reason.unwrap_or_default();
    assert!(
        reason.starts_with("scaled down 2 -> 1: 0 requests waiting"),
        "{reason}"
    );
    event_notes(&client, ns.name(), "llama", "ScaledDown").await;
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_tier_queues_status_shows_what_waits_on_the_proxies() {
    use floodgate_crds::TierQueue;
    use floodgate_proxy::demand::{QueueFigures, TierFigures};
    use floodgate_proxy::route::tiers::SloFigures;
    let redis = RedisServer::start().await.unwrap();
    let (cluster, ns, client, _operator) = setup("operator-queues", Some(redis.url())).await;
    // A proxy replica's publisher, with 4 pro requests waiting, the oldest for 2.5 s.
    let namespace = ns.name().to_owned();
    let figures = move || {
        Some(QueueFigures {
            namespace: namespace.clone(),
            name: "tiers".into(),
            tiers: vec![TierFigures {
                name: "pro".into(),
                waiting: 4,
                oldest_wait_ms: 2500,
                // 199 of 200 within the target, the 95th percentile within 100 ms.
                recent: SloFigures {
                    within: 199,
                    missed: 1,
                    waits: std::array::from_fn(|i| {
                        [150, 30, 15, 4, 0, 1].get(i).copied().unwrap_or(0)
                    }),
                },
            }],
        })
    };
    let publishing = CancellationToken::new();
    let _stop_publishing = publishing.clone().drop_guard();
    let publisher = replica_publisher(&redis, "proxy-0").with_queues(Arc::new(figures));
    tokio::spawn(publisher.run(publishing));

    let tqs: Api<TierQueue> = Api::namespaced(client.clone(), ns.name());
    apply(&tqs, "tiers", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "TierQueue", "metadata": {"name": "tiers"},
        "spec": {"tiers": [{"name": "pro", "class": "standard", "maxWaitMs": 30000},
                           {"name": "free", "class": "batch", "maxWaitMs": 600000,
                            "batch": {"size": 10, "intervalSeconds": 60}}]}
    }))
    .await;
    let tq = wait_until(&tqs, "tiers", "queue figures in status", |t| {
        t.status.as_ref().is_some_and(|s| s.queued == 4)
    })
    .await;
    let status = tq.status.unwrap();
    assert_eq!(status.oldest_wait_ms, 2500);
    let pro = &status.tiers[0];
    assert_eq!(
        (
            pro.recent_requests,
            pro.within_target,
            pro.slo_attainment_percent.as_deref(),
            pro.p95_wait_ms
        ),
        (200, 199, Some("99.5"), Some(100))
    );
    let classes: Vec<_> = status
        .classes
        .iter()
        .map(|c| (c.class.as_str(), c.queued))
        .collect();
    assert_eq!(classes, [("standard", 4), ("batch", 0)]);
    let out = cluster
        .kubectl(["get", "tierqueues", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let row = out.stdout.lines().find(|l| l.starts_with("tiers")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // NAME TIERS QUEUED OLDEST-WAIT-MS DEAD-LETTERS READY AGE
    assert_eq!(&cells[1..4], ["2", "4", "2500"], "{}", out.stdout);
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_cache_policys_status_shows_the_hit_ratios_the_proxies_publish() {
    use floodgate_crds::CachePolicy;
    use floodgate_proxy::demand::CacheFigures;
    let redis = RedisServer::start().await.unwrap();
    let (cluster, ns, client, _operator) = setup("operator-cache", Some(redis.url())).await;
    // Two proxy replicas' publishers: over the last hour, exact / semantic / template /
    // dedup / miss lookups, and what each holds in memory.
    let publishing = CancellationToken::new();
    let _stop_publishing = publishing.clone().drop_guard();
    for (replica, counts, entries) in [
        ("proxy-0", [20, 5, 0, 10, 25], 300),
        ("proxy-1", [10, 5, 5, 0, 20], 200),
    ] {
        let namespace = ns.name().to_owned();
        let figures = move || {
            Some(CacheFigures {
                namespace: namespace.clone(),
                name: "cache".into(),
                counts,
                entries,
                bytes: entries * 1000,
            })
        };
        let publisher = replica_publisher(&redis, replica).with_caches(Arc::new(figures));
        tokio::spawn(publisher.run(publishing.clone()));
    }
    let cps: Api<CachePolicy> = Api::namespaced(client.clone(), ns.name());
    apply(&cps, "cache", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "CachePolicy", "metadata": {"name": "cache"},
        "spec": {"exact": {"ttlSeconds": 3600}, "semantic": {"ttlSeconds": 3600, "threshold": 0.95},
                 "dedup": {"windowSeconds": 5}}
    }))
    .await;
    let cp = wait_until(&cps, "cache", "cache figures in status", |c| {
        c.status.as_ref().is_some_and(|s| s.lookups == 100)
    })
    .await;
    let status = cp.status.unwrap();
    assert_eq!(status.hit_ratio.as_deref(), Some("0.55"));
    let r = status.hit_ratios.unwrap();
    assert_eq!(
        [r.exact, r.semantic, r.template, r.dedup],
        ["0.30", "0.10", "0.05", "0.10"]
    );
    // Memory backend: each replica's own answers, summed.
    assert_eq!(
        (status.entries, status.bytes, status.replicas),
        (500, 500_000, 2)
    );
    let out = cluster
        .kubectl(["get", "cachepolicies", "-n", ns.name()])
        .await
        .unwrap()
        .ok()
        .unwrap();
    let row = out.stdout.lines().find(|l| l.starts_with("cache")).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    // NAME EXACT-TTL SEMANTIC BACKEND HIT-RATIO SEMANTIC-HITS DEDUP-HITS ENTRIES BYTES READY AGE
    assert_eq!(
        &cells[1..10],
        [
            "3600", "0.95", "memory", "0.55", "0.10", "0.10", "500", "500000", "True"
        ],
        "{}",
        out.stdout
    );
}

#[tokio::test]
#[ignore = "needs a Kubernetes API server: `make e2e` (see e2e/src/cluster.rs)"]
async fn a_pools_status_shows_each_providers_circuit_over_the_proxies() {
    use floodgate_crds::AIProviderPool;
    use floodgate_proxy::demand::PoolCircuits;
    let redis = RedisServer::start().await.unwrap();
    let (cluster, ns, client, _operator) = setup("operator-circuits", Some(redis.url())).await;
    // Two proxy replicas' publishers: gpt4's circuit open on one, claude's closed on both.
    let publishing = CancellationToken::new();
    let _stop_publishing = publishing.clone().drop_guard();
    for (replica, gpt4) in [("proxy-0", "open"), ("proxy-1", "closed")] {
        let circuits = move || {
            vec![PoolCircuits {
                pool: "premium".into(),
                providers: vec![("claude".into(), "closed"), ("gpt4".into(), gpt4)],
            }]
        };
        let publisher = replica_publisher(&redis, replica).with_circuits(Arc::new(circuits));
        tokio::spawn(publisher.run(publishing.clone()));
    }
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns.name());
    apply(
        &secrets,
        "keys",
        json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "keys"}, "stringData": {"claude": "sk-a", "gpt4": "sk-b"}}),
    )
    .await;
    let pools: Api<AIProviderPool> = Api::namespaced(client.clone(), ns.name());
    apply(&pools, "premium", json!({
        "apiVersion": "floodgate.dev/v1alpha1", "kind": "AIProviderPool", "metadata": {"name": "premium"},
        "spec": {"providers": [
            {"name": "claude", "type": "anthropic", "models": [{"name": "claude-sonnet-4"}],
             "keys": [{"secretRef": {"name": "keys", "key": "claude"}, "rpm": 20}]},
            {"name": "gpt4", "type": "openai", "models": [{"name": "gpt-4o"}],
             "keys": [{"secretRef": {"name": "keys", "key": "gpt4"}, "rpm": 200}]}]}
    }))
    .await;
    // The first pass may come before the first publication: the next one (15 s) reads it.
    let pool = wait_until(&pools, "premium", "circuits in status", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.providers.iter().all(|p| p.circuit_replicas == 2))
    })
    .await;
    let providers: Vec<_> = pool
        .status
        .unwrap()
        .providers
        .into_iter()
        .map(|p| (p.name, p.circuit, p.circuit_open_replicas))
        .collect();
    assert_eq!(
        providers,
        [
            ("claude".to_owned(), "closed".to_owned(), 0),
            ("gpt4".to_owned(), "open".to_owned(), 1)
        ]
    );
    let out = cluster
        .kubectl([
            "get",
            "aiproviderpools",
            "premium",
            "-n",
            ns.name(),
            "-o",
            "jsonpath={.status.providers[?(@.name==\"gpt4\")].circuit}",
        ])
        .await
        .unwrap()
        .ok()
        .unwrap();
    assert_eq!(out.stdout, "open");
    let (cells, table) = table_row(cluster, "aiproviderpools", ns.name(), "premium").await;
    // NAME PROVIDERS KEYS CAPACITY-RPM USED-RPM OPEN-CIRCUITS READY AGE
    assert_eq!(
        cells[1..7],
        ["2", "2/2", "220", "0", "1", "True"],
        "{table}"
    );
}
