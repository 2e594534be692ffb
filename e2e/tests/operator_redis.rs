//! The operator's live usage reader against a real redis-server, written by the proxy's own
//! shared budgets: what the proxies count against a key's limit is what a pool's `usedRpm`
//! reports, per provider, keyless providers included, other pools excluded; and the circuit
//! states the proxies publish are summed per provider. Without Redis, the same figures
//! scraped from a real proxy process's `/metrics` (`floodgate_operator::gateway`).

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_crds::AIProviderPoolSpec;
use floodgate_crds::redis_keys::KeyBudgetKeys;
use floodgate_e2e::redis::RedisServer;
use floodgate_operator::usage::UsageReader;
use floodgate_proxy::budget::{Limits, RedisBudgets, SharedOptions};
use floodgate_proxy::secret::SecretString;
use std::time::Duration;

fn spec() -> AIProviderPoolSpec {
    serde_json::from_value(serde_json::json!({"providers": [
        {"name": "claude", "type": "anthropic", "models": [{"name": "claude-sonnet-4"}], "keys": [
            {"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20},
            {"secretRef": {"name": "claude-keys", "key": "key2"}, "rpm": 20}]},
        {"name": "local", "type": "ollama", "models": [{"name": "llama3.1:8b"}], "rpm": 100},
        {"name": "idle", "type": "openai", "models": [{"name": "gpt-4o"}], "keys": [
            {"secretRef": {"name": "openai-keys", "key": "key1"}, "rpm": 20}]}
    ]}))
    .unwrap()
}

#[tokio::test]
async fn used_rpm_is_what_the_proxies_count_per_provider() {
    let redis = RedisServer::start().await.unwrap();
    let mut options = SharedOptions::new(SecretString::new(redis.url()));
    options.timeout = Duration::from_secs(2);
    let budgets = std::sync::Arc::new(RedisBudgets::new(options, Duration::from_secs(60)).unwrap());
    let limits = Limits {
        rpm: Some(100),
        tpm: None,
    };
    let admit = async |pool: &str, provider: &str, id: &str, n: usize| {
        for i in 0..n {
            let keys = std::sync::Arc::new(KeyBudgetKeys::new(pool, provider, id));
            budgets
                .acquire(&keys, limits, 0, &format!("{provider}-{id}-{i}"))
                .await
                .unwrap();
        }
    };
    admit("premium", "claude", "claude-keys/key1", 2).await;
    admit("premium", "claude", "claude-keys/key2", 3).await;
    admit("premium", "local", "local", 4).await;
    // Another pool with the same provider and key names is not this pool's usage.
    admit("other", "claude", "claude-keys/key1", 7).await;
    // Answered requests still count within the minute.
    budgets
        .complete(
            &KeyBudgetKeys::new("premium", "claude", "claude-keys/key1"),
            "claude-claude-keys/key1-0",
        )
        .await
        .unwrap();

    let reader = UsageReader::new(&redis.url()).unwrap();
    let usage = reader.pool_usage("premium", &spec()).await.unwrap();
    assert_eq!(usage.get("claude"), Some(&5));
    assert_eq!(usage.get("local"), Some(&4));
    assert_eq!(usage.get("idle"), Some(&0));
    assert_eq!(usage.len(), 3);
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_not_zero_usage() {
    let mut redis = RedisServer::start().await.unwrap();
    let url = redis.url();
    redis.kill().await.unwrap();
    let reader = UsageReader::new(&url).unwrap();
    assert!(matches!(
        reader.pool_usage("premium", &spec()).await,
        Err(floodgate_operator::Error::Redis(_))
    ));
}

#[tokio::test]
async fn tenant_usage_is_what_its_own_limits_count() {
    let redis = RedisServer::start().await.unwrap();
    let mut options = SharedOptions::new(SecretString::new(redis.url()));
    options.timeout = Duration::from_secs(2);
    let budgets = std::sync::Arc::new(RedisBudgets::new(options, Duration::from_secs(60)).unwrap());
    let limits = Limits {
        rpm: Some(100),
        tpm: Some(100_000),
    };
    let keys = std::sync::Arc::new(KeyBudgetKeys::tenant("team-a/acme"));
    for (i, tokens) in [120u64, 30, 50].into_iter().enumerate() {
        budgets
            .acquire(&keys, limits, tokens, &format!("acme-{i}"))
            .await
            .unwrap();
    }
    // Another tenant of the same name in another namespace is not this one.
    let other = std::sync::Arc::new(KeyBudgetKeys::tenant("team-b/acme"));
    budgets
        .acquire(&other, limits, 999, "other-0")
        .await
        .unwrap();

    let reader = UsageReader::new(&redis.url()).unwrap();
    let before = now_ms();
    let usage = reader.tenant_usage("team-a/acme").await.unwrap();
    assert_eq!((usage.requests, usage.tokens), (3, 200));
    let seen = usage.last_seen_ms.unwrap();
    // Redis's clock and ours are the same machine's: seen at the admissions, not later.
    assert!(
        seen <= before + 5 && seen + 10_000 >= before,
        "{seen} vs {before}"
    );

    let unseen = reader.tenant_usage("team-a/nobody").await.unwrap();
    assert_eq!(unseen, floodgate_operator::usage::TenantUsage::default());
}

/// Expires `key` at once, as if its replica had stopped publishing a TTL ago.
async fn expire_now(conn: &mut redis::aio::ConnectionManager, key: String) {
    let _: () = redis::cmd("PEXPIRE")
        .arg(key)
        .arg(1)
        .query_async(conn)
        .await
        .unwrap();
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

#[tokio::test]
async fn demand_is_summed_over_the_replicas_that_still_publish() {
    use floodgate_proxy::demand::{DemandBoard, Publisher};
    let redis = RedisServer::start().await.unwrap();
    let url = SecretString::new(redis.url());
    let a = std::sync::Arc::new(DemandBoard::default());
    let b = std::sync::Arc::new(DemandBoard::default());
    let cell_a = a.cell("models", "llama");
    let waiting_a: Vec<_> = (0..3).map(|_| cell_a.queued()).collect();
    let answering_a = cell_a.queued().start();
    let cell_b = b.cell("models", "llama");
    let waiting_b: Vec<_> = (0..4).map(|_| cell_b.queued()).collect();
    cell_b.record_latency(Duration::from_millis(2500));
    // Requests that spilled over to another target count, summed too.
    cell_a.spilled();
    cell_b.spilled();
    cell_b.spilled();
    // Another model's demand is not this one's.
    let _elsewhere = b.cell("models", "qwen").queued();

    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let pub_a = Publisher::new(a.clone(), &url, "proxy-a").unwrap();
    let pub_b = Publisher::new(b.clone(), &url, "proxy-b").unwrap();
    pub_a.publish_once(&mut conn).await.unwrap();
    pub_b.publish_once(&mut conn).await.unwrap();

    let reader = UsageReader::new(&redis.url()).unwrap();
    let demand = reader.demand("models", "llama").await.unwrap();
    assert_eq!(
        (
            demand.queued,
            demand.in_flight,
            demand.latency_p95_ms,
            demand.spilled,
            demand.reporters
        ),
        (7, 1, 2500, 3, 2)
    );
    assert_eq!(reader.demand("models", "qwen").await.unwrap().queued, 1);
    assert_eq!(
        reader.demand("models", "none").await.unwrap(),
        floodgate_operator::autoscale::Demand::default()
    );

    // Replica b stops publishing: its figures stop counting when they expire.
    drop(waiting_a);
    drop(answering_a);
    drop(waiting_b);
    pub_a.publish_once(&mut conn).await.unwrap();
    let ttl: i64 = redis::cmd("PTTL")
        .arg(floodgate_crds::redis_keys::ReplicaKeys::demand("models", "llama").replica("proxy-b"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        ttl > 0 && ttl <= floodgate_crds::redis_keys::DEMAND_TTL_MS as i64,
        "{ttl}"
    );
    expire_now(
        &mut conn,
        floodgate_crds::redis_keys::ReplicaKeys::demand("models", "llama").replica("proxy-b"),
    )
    .await;
    let expired = floodgate_e2e::cluster::wait_for(
        "proxy-b's figures to expire",
        Duration::from_secs(5),
        || {
            let reader = &reader;
            async move {
                let d = reader.demand("models", "llama").await.unwrap();
                Ok((d.reporters == 1).then_some(d))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (expired.queued, expired.in_flight, expired.latency_p95_ms),
        (0, 0, 0)
    );
}

#[tokio::test]
async fn queue_figures_are_summed_over_the_replicas_per_tier() {
    use floodgate_proxy::demand::{DemandBoard, Publisher, QueueFigures, TierFigures};
    use floodgate_proxy::route::tiers::SloFigures;
    let redis = RedisServer::start().await.unwrap();
    let url = SecretString::new(redis.url());
    let figures = |pro: (u64, u64), free: (u64, u64)| {
        let tier = |name: &str, (waiting, oldest_wait_ms): (u64, u64)| TierFigures {
            name: name.into(),
            waiting,
            oldest_wait_ms,
            recent: SloFigures {
                within: waiting * 10,
                missed: waiting,
                waits: std::array::from_fn(|i| if i == 1 { waiting * 11 } else { 0 }),
            },
        };
        QueueFigures {
            namespace: "ai".into(),
            name: "tiers".into(),
            tiers: vec![tier("pro", pro), tier("free", free)],
        }
    };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let board = std::sync::Arc::new(DemandBoard::default());
    let a = Publisher::new(board.clone(), &url, "proxy-a")
        .unwrap()
        .with_queues(std::sync::Arc::new(move || {
            Some(figures((3, 1200), (0, 0)))
        }));
    let b = Publisher::new(board, &url, "proxy-b")
        .unwrap()
        .with_queues(std::sync::Arc::new(move || {
            Some(figures((2, 4000), (7, 900)))
        }));
    a.publish_once(&mut conn).await.unwrap();
    b.publish_once(&mut conn).await.unwrap();

    let reader = UsageReader::new(&redis.url()).unwrap();
    let usage = reader.queue_usage("ai", "tiers").await.unwrap();
    let seen: Vec<_> = usage
        .iter()
        .map(|(tier, u)| (tier.as_str(), u.waiting, u.oldest_wait_ms))
        .collect();
    assert_eq!(seen, [("free", 7, 900), ("pro", 5, 4000)]);
    // Outcomes and wait buckets are summed too.
    let recent: Vec<_> = usage
        .iter()
        .map(|(tier, u)| (tier.as_str(), u.within, u.missed, u.waits[1]))
        .collect();
    assert_eq!(recent, [("free", 70, 7, 77), ("pro", 50, 5, 55)]);
    assert!(reader.queue_usage("ai", "other").await.unwrap().is_empty());
}

#[tokio::test]
async fn circuits_are_the_worst_over_the_replicas_that_still_publish() {
    use floodgate_proxy::demand::{DemandBoard, PoolCircuits, Publisher};
    let redis = RedisServer::start().await.unwrap();
    let url = SecretString::new(redis.url());
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = redis::aio::ConnectionManager::new(client).await.unwrap();
    let publisher = |replica: &str, claude: &'static str, gpt4: &'static str| {
        Publisher::new(std::sync::Arc::new(DemandBoard::default()), &url, replica)
            .unwrap()
            .with_circuits(std::sync::Arc::new(move || {
                vec![
                    PoolCircuits {
                        pool: "premium".into(),
                        providers: vec![("claude".into(), claude), ("gpt4".into(), gpt4)],
                    },
                    // Another pool's circuits are not this pool's.
                    PoolCircuits {
                        pool: "other".into(),
                        providers: vec![("claude".into(), "open")],
                    },
                ]
            }))
    };
    publisher("proxy-a", "closed", "open")
        .publish_once(&mut conn)
        .await
        .unwrap();
    publisher("proxy-b", "half-open", "open")
        .publish_once(&mut conn)
        .await
        .unwrap();
    publisher("proxy-c", "closed", "closed")
        .publish_once(&mut conn)
        .await
        .unwrap();

    let reader = UsageReader::new(&redis.url()).unwrap();
    let seen = |circuits: floodgate_operator::usage::PoolCircuits| -> Vec<_> {
        circuits
            .into_iter()
            .map(|(p, c)| (p, c.worst, c.replicas, c.open))
            .collect()
    };
    assert_eq!(
        seen(reader.pool_circuits("premium").await.unwrap()),
        [
            ("claude".to_owned(), "half-open", 3, 0),
            ("gpt4".to_owned(), "open", 3, 2)
        ]
    );
    assert!(reader.pool_circuits("idle").await.unwrap().is_empty());

    // Replica b stops publishing: once its hash expires, only a and c count.
    expire_now(
        &mut conn,
        floodgate_crds::redis_keys::circuit_replica_key("premium", "proxy-b"),
    )
    .await;
    let circuits = floodgate_e2e::cluster::wait_for(
        "proxy-b's circuits to expire",
        Duration::from_secs(5),
        || {
            let reader = &reader;
            async move {
                let c = reader.pool_circuits("premium").await.unwrap();
                Ok((c.get("claude").is_some_and(|c| c.replicas == 2)).then_some(c))
            }
        },
    )
    .await
    .unwrap();
    assert_eq!(
        seen(circuits),
        [
            ("claude".to_owned(), "closed", 2, 0),
            ("gpt4".to_owned(), "open", 2, 1)
        ]
    );
}

/// Without Redis: a real proxy answers 3 requests on a key of 60 RPM and fails one on a
/// provider whose circuit opens at the first failure; its `/metrics`, scraped as the operator
/// scrapes the gateway's pods, give 3 requests in the minute for `openai`, and `broken` open
/// on the one replica.
#[tokio::test]
async fn without_redis_usage_and_circuits_are_scraped_from_the_gateways_metrics() {
    use floodgate_e2e::mock::{MockConfig, MockProviders};
    use floodgate_e2e::proxy::ProxyProcess;
    use floodgate_operator::gateway::{Scraper, Targets};
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let pool = serde_json::json!({
        "circuitBreaker": {"failureThreshold": 1, "openSeconds": 600},
        "providers": [
            {"name": "openai", "type": "openai", "baseUrl": mock.base_url(),
             "models": [{"name": "gpt-4o"}],
             "keys": [{"name": "primary", "secretRef": {"name": "keys", "key": "a"}, "rpm": 60}]},
            {"name": "broken", "type": "openai", "baseUrl": mock.base_url(),
             "models": [{"name": "gpt-4o-error-500"}],
             "keys": [{"secretRef": {"name": "keys", "key": "b"}, "rpm": 60}]}
        ]
    });
    let dir = tempfile::tempdir().unwrap();
    let manifests = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: sk-a, b: sk-b}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: premium}}\nspec: {pool}\n"
    );
    std::fs::write(dir.path().join("pool.yaml"), manifests).unwrap();
    let proxy = ProxyProcess::start(
        [
            "--config".to_owned(),
            dir.path().display().to_string(),
            "--watch-interval-ms".to_owned(),
            "0".to_owned(),
        ],
        &[],
    )
    .await
    .unwrap();
    let http = reqwest::Client::new();
    let chat = async |model: &str| {
        http.post(proxy.url("/v1/chat/completions"))
            .json(&serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .await
            .unwrap()
            .status()
    };
    for _ in 0..3 {
        assert_eq!(chat("gpt-4o").await, 200);
    }
    assert!(chat("gpt-4o-error-500").await.is_server_error());

    let spec: AIProviderPoolSpec = serde_json::from_value(pool).unwrap();
    let client =
        kube::Client::try_from(kube::Config::new("http://127.0.0.1:1".parse().unwrap())).unwrap();
    let scraper = Scraper::new(client, Targets::Urls(vec![proxy.admin_url("")]));
    let (usage, circuits) = scraper.pool_live("premium", &spec).await.unwrap();
    assert_eq!(usage.get("openai"), Some(&3), "{usage:?}");
    assert_eq!(usage.get("broken"), Some(&1), "{usage:?}");
    let (openai, broken) = (circuits["openai"], circuits["broken"]);
    assert_eq!(
        (openai.worst, openai.replicas, openai.open),
        ("closed", 1, 0)
    );
    assert_eq!((broken.worst, broken.replicas, broken.open), ("open", 1, 1));
    // Another pool's name reads nothing.
    let (other, circuits) = scraper.pool_live("other", &spec).await.unwrap();
    assert_eq!(other.values().sum::<u64>(), 0);
    assert!(circuits.is_empty());
}
