//! Headers to callers, and a tenant's limits at the exact edges of its window.

use super::*;
use crate::budget::{Budgets, MINUTE};
use crate::config::{ClientKeyConfig, TenantLimits};
use axum::http::HeaderValue;
use std::num::NonZeroU32;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

fn tenant(name: &str, key: &str, limits: TenantLimits) -> Arc<TenantConfig> {
    Arc::new(TenantConfig {
        name: Arc::from(name),
        tier: Some(Arc::from("pro")),
        keys: vec![ClientKeyConfig {
            name: Arc::from("main"),
            digest: KeyDigest::of(key),
        }],
        limits,
        models: None,
    })
}

fn config(tenants: Vec<Arc<TenantConfig>>) -> Arc<Config> {
    Arc::new(Config {
        tenants,
        ..Config::default()
    })
}

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

fn budgets() -> Budgets {
    Budgets::new(MINUTE, Arc::default())
}

fn rpm(n: u32) -> TenantLimits {
    TenantLimits {
        rpm: NonZeroU32::new(n),
        ..TenantLimits::default()
    }
}

#[test]
fn the_key_is_read_from_bearer_or_x_api_key() {
    let h = headers(&[("authorization", "Bearer sk-a")]);
    assert_eq!(presented(&h, false), Ok(Some(Presented::Key("sk-a"))));
    let h = headers(&[("authorization", "bearer   sk-a ")]);
    assert_eq!(presented(&h, false), Ok(Some(Presented::Key("sk-a"))));
    let h = headers(&[("x-api-key", "sk-b")]);
    assert_eq!(presented(&h, false), Ok(Some(Presented::Key("sk-b"))));
    // Authorization wins over x-api-key.
    let h = headers(&[("authorization", "Bearer sk-a"), ("x-api-key", "sk-b")]);
    assert_eq!(presented(&h, false), Ok(Some(Presented::Key("sk-a"))));
    assert_eq!(presented(&HeaderMap::new(), false), Ok(None));
}

#[test]
fn malformed_and_empty_headers_are_refused() {
    let h = headers(&[("authorization", "Basic dXNlcjpwdw==")]);
    assert_eq!(presented(&h, false), Err(Unidentified::Malformed));
    let h = headers(&[("authorization", "sk-a")]);
    assert_eq!(presented(&h, false), Err(Unidentified::Malformed));
    let h = headers(&[("authorization", "Bearer ")]);
    assert_eq!(presented(&h, false), Err(Unidentified::Missing));
    let h = headers(&[("x-api-key", "")]);
    assert_eq!(presented(&h, false), Err(Unidentified::Missing));
    let mut h = HeaderMap::new();
    h.insert("x-api-key", HeaderValue::from_bytes(b"sk-\xff").unwrap());
    assert_eq!(presented(&h, false), Err(Unidentified::Malformed));
}

#[test]
fn the_tenant_header_counts_only_when_trusted() {
    let h = headers(&[("x-floodgate-tenant", "acme"), ("x-api-key", "sk-b")]);
    assert_eq!(presented(&h, true), Ok(Some(Presented::Tenant("acme"))));
    assert_eq!(presented(&h, false), Ok(Some(Presented::Key("sk-b"))));
    let h = headers(&[("x-floodgate-tenant", "acme")]);
    assert_eq!(presented(&h, false), Ok(None));
}

#[test]
fn callers_are_found_by_key_and_strangers_refused() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let config = config(vec![
        tenant("acme", "sk-acme", TenantLimits::default()),
        tenant("globex", "sk-globex", TenantLimits::default()),
    ]);
    let who = |pairs: &[(&'static str, &str)]| {
        identity
            .identify(&config, &budgets, &headers(pairs))
            .map(|c| c.map(|c| c.name().to_string()))
    };
    assert_eq!(
        who(&[("authorization", "Bearer sk-globex")]),
        Ok(Some("globex".into()))
    );
    assert_eq!(who(&[("x-api-key", "sk-acme")]), Ok(Some("acme".into())));
    assert_eq!(
        who(&[("x-api-key", "sk-acme2")]),
        Err(Unidentified::Unknown)
    );
    assert_eq!(who(&[]), Err(Unidentified::Missing));
    // Not trusted: the header names nobody, and no key is missing its due.
    assert_eq!(
        who(&[("x-floodgate-tenant", "acme")]),
        Err(Unidentified::Missing)
    );
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    assert_eq!(caller.tier().map(|t| &**t), Some("pro"));
}

#[test]
fn a_trusted_tenant_header_names_the_tenant() {
    let identity = Identity::new(true);
    let budgets = budgets();
    let config = config(vec![tenant("acme", "sk-acme", TenantLimits::default())]);
    let h = headers(&[("x-floodgate-tenant", "acme")]);
    let caller = identity.identify(&config, &budgets, &h).unwrap().unwrap();
    assert_eq!(&**caller.name(), "acme");
    let h = headers(&[("x-floodgate-tenant", "nobody")]);
    assert_eq!(
        identity.identify(&config, &budgets, &h).err(),
        Some(Unidentified::UnknownTenant)
    );
    // Without the header a key still works.
    let h = headers(&[("x-api-key", "sk-acme")]);
    assert!(identity.identify(&config, &budgets, &h).unwrap().is_some());
}

#[test]
fn without_tenants_the_gateway_is_open() {
    let identity = Identity::new(false);
    let open = config(Vec::new());
    assert_eq!(
        identity
            .identify(&open, &budgets(), &HeaderMap::new())
            .map(|c| c.is_none()),
        Ok(true)
    );
}

#[test]
fn a_new_configuration_rotates_keys_and_keeps_the_tenants_state() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let before = config(vec![tenant("acme", "sk-old", rpm(10))]);
    let old = headers(&[("x-api-key", "sk-old")]);
    let new = headers(&[("x-api-key", "sk-new")]);
    let first = identity.identify(&before, &budgets, &old).unwrap().unwrap();
    let after = config(vec![tenant("acme", "sk-new", rpm(10))]);
    assert_eq!(
        identity.identify(&after, &budgets, &old).err(),
        Some(Unidentified::Unknown)
    );
    let second = identity.identify(&after, &budgets, &new).unwrap().unwrap();
    assert!(Arc::ptr_eq(&first.state, &second.state));
}

#[tokio::test(start_paused = true)]
async fn rpm_refuses_until_the_oldest_request_leaves_the_window() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let config = config(vec![tenant("acme", "sk-acme", rpm(2))]);
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    let t0 = Instant::now();
    drop(limits::admit(&caller, "m", 0, far).await.unwrap());
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(limits::admit(&caller, "m", 0, far).await.unwrap());
    tokio::time::advance(Duration::from_secs(5)).await;
    // Full: the first request leaves the window at t0 + 60 s, 45 s from now.
    let refused = limits::admit(&caller, "m", 0, far).await.unwrap_err();
    assert!(
        matches!(&refused, Refusal::RateLimited { retry_after, .. } if *retry_after == Duration::from_secs(45)),
        "{refused:?}"
    );
    tokio::time::advance(t0 + MINUTE - Duration::from_millis(1) - Instant::now()).await;
    assert!(
        limits::admit(&caller, "m", 0, far).await.is_err(),
        "1 ms early"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        limits::admit(&caller, "m", 0, far).await.is_ok(),
        "at t0 + 60 s"
    );
    // And then full again until the second leaves, at t0 + 70 s.
    let refused = limits::admit(&caller, "m", 0, far).await.unwrap_err();
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(10)));
}

#[tokio::test(start_paused = true)]
async fn tpm_is_settled_with_the_real_usage() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let limits = TenantLimits {
        tpm: NonZeroU32::new(1000),
        ..TenantLimits::default()
    };
    let config = config(vec![tenant("acme", "sk-acme", limits)]);
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    let slot = limits::admit(&caller, "m", 900, far).await.unwrap();
    assert!(limits::admit(&caller, "m", 200, far).await.is_err());
    // It used 100 of the 900 reserved: room for 900 more.
    slot.settle(100);
    drop(slot);
    let second = limits::admit(&caller, "m", 900, far).await;
    assert!(second.is_ok(), "{second:?}");
    let refused = limits::admit(&caller, "m", 1, far).await.unwrap_err();
    assert_eq!(refused.retry_after(), Some(MINUTE));
}

#[tokio::test]
async fn concurrent_requests_hold_their_place_until_dropped() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let limits = TenantLimits {
        concurrent: NonZeroU32::new(2),
        ..TenantLimits::default()
    };
    let config = config(vec![tenant("acme", "sk-acme", limits)]);
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    let a = limits::admit(&caller, "m", 0, far).await.unwrap();
    let b = limits::admit(&caller, "m", 0, far).await.unwrap();
    let refused = limits::admit(&caller, "m", 0, far).await.unwrap_err();
    assert!(matches!(refused, Refusal::Concurrency { limit: 2, .. }));
    drop(a);
    let c = limits::admit(&caller, "m", 0, far).await.unwrap();
    drop((b, c));
    assert_eq!(caller.state.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn only_allowed_models_are_admitted() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let mut t = (*tenant("acme", "sk-acme", TenantLimits::default())).clone();
    t.models = Some(["fast".to_owned()].into_iter().collect());
    let config = config(vec![Arc::new(t)]);
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    assert!(limits::admit(&caller, "fast", 0, far).await.is_ok());
    assert_eq!(
        limits::admit(&caller, "smart", 0, far).await.unwrap_err(),
        Refusal::ModelNotAllowed("smart".into())
    );
    assert_eq!(caller.state.in_flight.load(Ordering::SeqCst), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_counts_from_its_admission_not_its_answer() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let config = config(vec![tenant("acme", "sk-acme", rpm(1))]);
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    let slow = limits::admit(&caller, "m", 0, far).await.unwrap();
    // A long answer: 10 s.
    tokio::time::advance(Duration::from_secs(10)).await;
    drop(slow);
    let refused = limits::admit(&caller, "m", 0, far).await.unwrap_err();
    assert_eq!(refused.retry_after(), Some(Duration::from_secs(50)));
    tokio::time::advance(Duration::from_secs(50)).await;
    assert!(limits::admit(&caller, "m", 0, far).await.is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_refunded_request_gives_back_its_place_and_tokens() {
    let identity = Identity::new(false);
    let budgets = budgets();
    let limits = TenantLimits {
        rpm: NonZeroU32::new(2),
        tpm: NonZeroU32::new(1000),
        ..TenantLimits::default()
    };
    let config = config(vec![tenant("acme", "sk-acme", limits)]);
    let caller = identity
        .identify(&config, &budgets, &headers(&[("x-api-key", "sk-acme")]))
        .unwrap()
        .unwrap();
    let far = Instant::now() + Duration::from_secs(3600);
    let kept = limits::admit(&caller, "m", 100, far).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    // The gateway refuses the second request (no key in time): it is given back.
    let refused = limits::admit(&caller, "m", 800, far).await.unwrap();
    tokio::time::advance(Duration::from_secs(5)).await;
    refused.refund();
    drop(refused);
    // Both its request and its 800 tokens are free again at once: 1 request and 900 tokens.
    let again = limits::admit(&caller, "m", 900, far).await;
    assert!(again.is_ok(), "{again:?}");
    // And the window is full again (2 requests); the oldest, `kept`, leaves at 60 s.
    let full = limits::admit(&caller, "m", 0, far).await.unwrap_err();
    assert_eq!(full.retry_after(), Some(Duration::from_secs(50)));
    drop(kept);
}
