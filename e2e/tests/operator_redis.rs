//! The operator's live usage reader against a real redis-server, written by the proxy's own
//! shared budgets: what the proxies count against a key's limit is what a pool's `usedRpm`
//! reports, per provider, keyless providers included, other pools excluded.

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
