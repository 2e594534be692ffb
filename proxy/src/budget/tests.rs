//! Key budgets without Redis, and with a Redis that cannot be reached (the fallback to local
//! shares). Shared budgets against a real Redis are tested in e2e/tests/proxy_redis.rs.

use super::*;
use crate::secret::SecretString;
use std::num::NonZeroU32;

fn id(key: &str) -> KeyId {
    KeyId {
        pool: "pool".into(),
        provider: "openai".into(),
        key: key.into(),
    }
}

fn rpm(n: u32) -> Limits {
    Limits {
        rpm: Some(n),
        tpm: None,
    }
}

/// Shared budgets on a port where nothing listens: every call fails at once.
fn unreachable(replicas: u32) -> Budgets {
    let mut opts = SharedOptions::new(SecretString::new("redis://127.0.0.1:1"));
    opts.replicas_hint = NonZeroU32::new(replicas).unwrap();
    Budgets::shared(MINUTE, opts, Arc::default()).unwrap()
}

async fn admitted(key: &Arc<KeyBudget>, tries: usize) -> Vec<Permit> {
    let mut permits = Vec::new();
    for _ in 0..tries {
        if let Ok(p) = key.acquire(Instant::now(), 1).await {
            permits.push(p);
        }
    }
    permits
}

#[tokio::test(start_paused = true)]
async fn local_budgets_admit_up_to_the_limit() {
    let budgets = Budgets::new(MINUTE, Arc::default());
    let key = budgets.key(&id("k0"), rpm(3));
    let permits = admitted(&key, 5).await;
    assert_eq!(permits.len(), 3);
    assert!(!budgets.redis_degraded());
    let t0 = Instant::now();
    drop(permits);
    // Answered now: the slots free one window later, not before.
    assert_eq!(
        key.availability(t0, 1),
        Err(Unavailable::Until(t0 + MINUTE))
    );
}

#[tokio::test]
async fn an_unreachable_redis_degrades_to_the_local_share() {
    let budgets = unreachable(2);
    assert!(!budgets.redis_degraded(), "not degraded before any call");
    let key = budgets.key(&id("k0"), rpm(10));
    // The first call finds Redis down; from then on, half of 10 per replica.
    let permits = admitted(&key, 8).await;
    assert_eq!(permits.len(), 5);
    assert!(budgets.redis_degraded());
    // Another key of the same replica: its own share, without asking Redis again.
    let other = budgets.key(&id("k1"), rpm(7));
    assert_eq!(admitted(&other, 8).await.len(), 3);
}

#[tokio::test]
async fn the_local_share_is_at_least_one_request() {
    let budgets = unreachable(4);
    let key = budgets.key(&id("k0"), rpm(2));
    assert_eq!(admitted(&key, 3).await.len(), 1);
}

#[tokio::test]
async fn requests_made_before_the_outage_count_against_the_share() {
    let budgets = unreachable(2);
    let key = budgets.key(&id("k0"), rpm(10));
    // A first request degrades the backend; it took one slot of the share of 5.
    let first = admitted(&key, 1).await;
    assert_eq!(first.len(), 1);
    assert_eq!(admitted(&key, 10).await.len(), 4);
}

#[tokio::test]
async fn keys_without_limits_never_ask_redis() {
    let budgets = unreachable(2);
    let key = budgets.key(
        &id("ollama"),
        Limits {
            rpm: None,
            tpm: None,
        },
    );
    assert_eq!(admitted(&key, 20).await.len(), 20);
    assert!(!budgets.redis_degraded());
}

#[tokio::test]
async fn a_degraded_token_budget_is_shared_too() {
    let budgets = unreachable(2);
    let key = budgets.key(
        &id("k0"),
        Limits {
            rpm: None,
            tpm: Some(1000),
        },
    );
    let a = key.acquire(Instant::now(), 400).await;
    assert!(a.is_ok());
    assert!(budgets.redis_degraded());
    // 400 + 400 > 500, this replica's half of 1000.
    assert!(key.acquire(Instant::now(), 400).await.is_err());
    assert!(key.acquire(Instant::now(), 100).await.is_ok());
}

#[test]
fn the_redis_url_is_never_printed() {
    let opts = SharedOptions::new(SecretString::new("redis://:hunter2@10.0.0.1:6379"));
    assert!(!format!("{opts:?}").contains("hunter2"));
    let bad = SharedOptions::new(SecretString::new("nope://:hunter2@x"));
    let err = Budgets::shared(MINUTE, bad, Arc::default()).unwrap_err();
    assert!(matches!(err, SharedError::Url));
    assert!(!err.to_string().contains("hunter2"));
}

/// The monitor checks Redis every `check_interval` whether or not requests ask: an
/// unreachable Redis shows as degraded one check (and one call timeout) after start-up.
#[tokio::test(start_paused = true)]
async fn an_unreachable_redis_is_found_without_any_request() {
    let budgets = unreachable(2);
    let opts = budgets.backend().unwrap().options().clone();
    let _key = budgets.key(&id("k0"), rpm(10));
    tokio::time::sleep(opts.check_interval - Duration::from_millis(1)).await;
    assert!(!budgets.redis_degraded(), "not before the first check");
    tokio::time::sleep(opts.timeout + Duration::from_millis(2)).await;
    assert!(budgets.redis_degraded(), "found by the first check");
}
