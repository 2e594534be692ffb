//! Tenants and client keys, through the real proxy: the binary (`ProxyProcess`) on a config
//! directory with Tenants, against the mock providers. Strangers get 401 in each door's own
//! format, a tenant's key works as `Authorization: Bearer` and as `x-api-key`, a Secret
//! change rotates a key live, a stream holds its tenant's concurrency slot until it ends,
//! the sidecar header counts only with its flag, and no key ever reaches the log. The rpm
//! window (a minute in the binary) is tested in-process on a 2 s window (`Gateway`), and
//! shared by two in-process replicas through a real redis-server.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_crds::redis_keys::KeyBudgetKeys;
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use floodgate_proxy::budget::SharedOptions;
use floodgate_proxy::route::{Dispatcher, DispatcherOptions};
use floodgate_proxy::secret::SecretString;
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(20);
const ACME_KEY: &str = "sk-e2e-acme-first";
const ACME_NEXT: &str = "sk-e2e-acme-second";
const GLOBEX_KEY: &str = "sk-e2e-globex";
const STRANGER: &str = "sk-e2e-stranger";

fn pool(mock: &MockProviders) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  a: sk-provider-e2e\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}, {{name: gpt-4o-mini}}, {{name: stall}}], keys: [{{name: primary, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        mock.base_url()
    )
}

fn clients(acme: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: clients}}\nstringData:\n  acme: {acme}\n  globex: {GLOBEX_KEY}\n"
    )
}

const TENANTS: &str = r#"
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: acme}
spec:
  keys: [{name: main, secretRef: {name: clients, key: acme}}]
  limits: {concurrent: 1}
  models: [gpt-4o, stall]
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: globex}
spec:
  keys: [{name: main, secretRef: {name: clients, key: globex}}]
"#;

/// A config directory: the pool, the client keys' Secret, and the tenants if `tenants`.
fn config_dir(mock: &MockProviders, tenants: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pool.yaml"), pool(mock)).unwrap();
    std::fs::write(dir.path().join("clients.yaml"), clients(ACME_KEY)).unwrap();
    if tenants {
        std::fs::write(dir.path().join("tenants.yaml"), TENANTS).unwrap();
    }
    dir
}

async fn start(dir: &tempfile::TempDir, extra: &[&str]) -> ProxyProcess {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = vec!["--config", dir.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    // Debug logging: whatever the proxy logs about a request, no key may be in it.
    let env: [(&str, &OsStr); 1] = [("RUST_LOG", OsStr::new("debug,hyper=info,h2=info"))];
    ProxyProcess::start(args, &env).await.unwrap()
}

fn chat(model: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

/// POSTs `body` to `path` with `headers`: the status, `retry-after` and the body as JSON (or
/// as a string when it is not).
async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut request = reqwest::Client::new().post(url).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, retry_after, body)
}

fn messages(model: &str) -> Value {
    json!({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
}

fn assert_no_key_in(log: &[String]) {
    for line in log {
        for key in [ACME_KEY, ACME_NEXT, GLOBEX_KEY, STRANGER, "sk-provider-e2e"] {
            assert!(!line.contains(key), "a key in the proxy's log: {line}");
        }
    }
}

#[tokio::test]
async fn strangers_get_401_in_each_doors_format_and_tenants_are_served() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, true);
    let proxy = start(&dir, &["--watch-interval-ms", "0"]).await;
    let chat_url = proxy.url("/v1/chat/completions");
    let messages_url = proxy.url("/v1/messages");
    let bearer = format!("Bearer {STRANGER}");
    let refused: [&[(&str, &str)]; 3] = [
        &[],
        &[("authorization", &bearer)],
        &[("x-api-key", STRANGER)],
    ];
    for headers in refused {
        let (status, _, body) = post(&chat_url, &chat("gpt-4o", false), headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        let (status, _, body) = post(&messages_url, &messages("gpt-4o"), headers).await;
        assert_eq!(status, 401, "{headers:?}: {body}");
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "authentication_error", "{body}");
        assert!(!body.to_string().contains(STRANGER), "{body}");
    }
    assert_eq!(
        mock.counts().total(),
        0,
        "a refused request reached the provider"
    );

    let bearer = format!("Bearer {ACME_KEY}");
    let (status, _, body) = post(
        &chat_url,
        &chat("gpt-4o", false),
        &[("authorization", &bearer)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(
        &chat_url,
        &chat("gpt-4o", false),
        &[("x-api-key", GLOBEX_KEY)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = post(
        &messages_url,
        &messages("gpt-4o"),
        &[("x-api-key", ACME_KEY)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["type"], "message", "{body}");

    // acme may use gpt-4o and stall only; globex every model.
    let (status, _, body) = post(
        &chat_url,
        &chat("gpt-4o-mini", false),
        &[("x-api-key", ACME_KEY)],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["code"], "model_not_allowed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("gpt-4o-mini"),
        "{body}"
    );
    let (status, _, body) = post(
        &messages_url,
        &messages("gpt-4o-mini"),
        &[("x-api-key", ACME_KEY)],
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
    let (status, _, body) = post(
        &chat_url,
        &chat("gpt-4o-mini", false),
        &[("x-api-key", GLOBEX_KEY)],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(mock.counts().total(), 4);
    // Refusals are counted by reason; keys never become labels.
    let metrics = reqwest::get(proxy.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"outcome="invalid_api_key""#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"outcome="model_not_allowed""#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"stage="auth""#), "{metrics}");
    assert_no_key_in(&[metrics]);
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("callers must send a tenant's client key")),
        "{:?}",
        proxy.log()
    );
    assert_no_key_in(&proxy.log());
}

#[tokio::test]
async fn without_tenants_the_gateway_stays_open_and_says_so() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, false);
    let proxy = start(&dir, &["--watch-interval-ms", "0"]).await;
    let (status, _, body) = post(
        &proxy.url("/v1/chat/completions"),
        &chat("gpt-4o", false),
        &[],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        proxy
            .log()
            .iter()
            .any(|l| l.contains("no Tenant configured: the gateway is open")),
        "{:?}",
        proxy.log()
    );
}

#[tokio::test]
async fn a_secret_change_rotates_the_key_live() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, true);
    let proxy = start(&dir, &["--watch-interval-ms", "50"]).await;
    let url = proxy.url("/v1/chat/completions");
    let (status, _, body) = post(&url, &chat("gpt-4o", false), &[("x-api-key", ACME_KEY)]).await;
    assert_eq!(status, 200, "{body}");
    let (status, _, _) = post(&url, &chat("gpt-4o", false), &[("x-api-key", ACME_NEXT)]).await;
    assert_eq!(status, 401, "the next key works before the rotation");

    std::fs::write(dir.path().join("clients.yaml"), clients(ACME_NEXT)).unwrap();
    wait_for("the old key refused", WAIT, || async {
        let (status, _, _) = post(&url, &chat("gpt-4o", false), &[("x-api-key", ACME_KEY)]).await;
        Ok((status == 401).then_some(()))
    })
    .await
    .unwrap();
    let (status, _, body) = post(&url, &chat("gpt-4o", false), &[("x-api-key", ACME_NEXT)]).await;
    assert_eq!(status, 200, "{body}");
    let bearer = format!("Bearer {ACME_NEXT}");
    let (status, _, body) = post(&url, &chat("gpt-4o", false), &[("authorization", &bearer)]).await;
    assert_eq!(status, 200, "{body}");
    // The other tenant's key was untouched.
    let (status, _, _) = post(&url, &chat("gpt-4o", false), &[("x-api-key", GLOBEX_KEY)]).await;
    assert_eq!(status, 200);
    assert_no_key_in(&proxy.log());
}

#[tokio::test]
async fn a_stream_holds_its_tenants_concurrency_slot_until_it_ends() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, true);
    let proxy = start(&dir, &["--watch-interval-ms", "0"]).await;
    let url = proxy.url("/v1/chat/completions");
    // `stall` streams a first chunk, then nothing until the caller goes away.
    let stream = reqwest::Client::new()
        .post(&url)
        .header("x-api-key", ACME_KEY)
        .json(&chat("stall", true))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    let (status, retry_after, body) =
        post(&url, &chat("gpt-4o", false), &[("x-api-key", ACME_KEY)]).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        body["error"]["code"], "tenant_concurrency_exceeded",
        "{body}"
    );
    assert!(retry_after.is_some());
    // Another tenant is not held back.
    let (status, _, _) = post(&url, &chat("gpt-4o", false), &[("x-api-key", GLOBEX_KEY)]).await;
    assert_eq!(status, 200);
    // The caller hangs up: the stream ends, and with it the slot.
    drop(stream);
    wait_for("acme's slot given back", WAIT, || async {
        let (status, _, _) = post(&url, &chat("gpt-4o", false), &[("x-api-key", ACME_KEY)]).await;
        Ok((status == 200).then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_tenant_header_is_trusted_only_with_the_flag() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, true);
    let plain = start(&dir, &["--watch-interval-ms", "0"]).await;
    let (status, _, _) = post(
        &plain.url("/v1/chat/completions"),
        &chat("gpt-4o", false),
        &[("x-floodgate-tenant", "globex")],
    )
    .await;
    assert_eq!(status, 401, "the header counted without the flag");

    let sidecar = start(&dir, &["--watch-interval-ms", "0", "--trust-tenant-header"]).await;
    let url = sidecar.url("/v1/chat/completions");
    let (status, _, body) = post(
        &url,
        &chat("gpt-4o", false),
        &[("x-floodgate-tenant", "globex")],
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // The named tenant's rules apply: acme may not use gpt-4o-mini.
    let (status, _, _) = post(
        &url,
        &chat("gpt-4o-mini", false),
        &[("x-floodgate-tenant", "acme")],
    )
    .await;
    assert_eq!(status, 403);
    let (status, _, _) = post(
        &url,
        &chat("gpt-4o", false),
        &[("x-floodgate-tenant", "initech")],
    )
    .await;
    assert_eq!(status, 401);
    // Keys still work beside it.
    let (status, _, _) = post(&url, &chat("gpt-4o", false), &[("x-api-key", GLOBEX_KEY)]).await;
    assert_eq!(status, 200);
}

/// rpm over a 2 s window, in-process (the binary's window is a minute): refused with a
/// `retry-after` of when the window frees, and a retry at that time is admitted.
#[tokio::test]
async fn rpm_refuses_with_an_honest_retry_after() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let tenant = r#"
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: acme}
spec:
  keys: [{name: main, secretRef: {name: clients, key: acme}}]
  limits: {rpm: 2}
"#;

    let yaml = format!("{}---\n{}---\n{tenant}", pool(&mock), clients(ACME_KEY));
    let window = Duration::from_secs(2);
    let gw = Gateway::start_with(
        &yaml,
        Dispatcher::new(window, Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    let url = format!("{}/v1/chat/completions", gw.url());
    let key = [("x-api-key", ACME_KEY)];
    for _ in 0..2 {
        let (status, _, body) = post(&url, &chat("gpt-4o", false), &key).await;
        assert_eq!(status, 200, "{body}");
    }
    let asked = Instant::now();
    let (status, retry_after, body) = post(&url, &chat("gpt-4o", false), &key).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(
        body["error"]["code"], "tenant_rate_limit_exceeded",
        "{body}"
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("2 requests"),
        "{body}"
    );
    let retry_after: u64 = retry_after.unwrap().parse().unwrap();
    assert!((1..=2).contains(&retry_after), "{retry_after}");
    // The window frees 2 s after the first request; retry-after (rounded up) is not earlier.
    tokio::time::sleep_until((asked + Duration::from_secs(retry_after)).into()).await;
    let (status, _, body) = post(&url, &chat("gpt-4o", false), &key).await;
    assert_eq!(status, 200, "a retry at retry-after was refused: {body}");
    assert_eq!(
        mock.counts().total(),
        3,
        "the refused request reached the provider"
    );
}

/// Two in-process replicas sharing `redis`, serving the pool with `tenant` (a Tenant
/// manifest), on a 30 s window: long enough that no request of a test leaves it.
async fn two_replicas(
    mock: &MockProviders,
    redis: &RedisServer,
    tenant: &str,
) -> (Gateway, Gateway) {
    let yaml = format!("{}---\n{}---\n{tenant}", pool(mock), clients(ACME_KEY));
    let mut shared = SharedOptions::new(SecretString::new(redis.url()));
    shared.timeout = Duration::from_secs(1);
    let replica = || {
        let opts = DispatcherOptions::new(Duration::from_secs(30), Duration::from_secs(5))
            .with_redis(shared.clone());
        Gateway::start_with(&yaml, Dispatcher::with_options(opts).unwrap())
    };
    (replica().await.unwrap(), replica().await.unwrap())
}

/// With `--redis` a tenant's rpm is shared by the replicas: two in-process gateways on one
/// redis-server admit 3 of its requests in a window between them, not 3 each, and the
/// window lives under the tenant's keys in Redis.
#[tokio::test]
async fn replicas_share_a_tenants_rpm_through_redis() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let tenant = r#"
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: acme}
spec:
  keys: [{name: main, secretRef: {name: clients, key: acme}}]
  limits: {rpm: 3}
"#;
    let (a, b) = two_replicas(&mock, &redis, tenant).await;
    let key = [("x-api-key", ACME_KEY)];
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let url = format!("{}/v1/chat/completions", gw.url());
        statuses.push(post(&url, &chat("gpt-4o", false), &key).await.0);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    let keys = KeyBudgetKeys::tenant("acme");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let logged: u64 = redis::cmd("ZCARD")
        .arg(&keys.requests)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(logged, 3, "{}", keys.requests);
    assert_eq!(mock.counts().total(), 3);
}

/// A tenant's tier is the request's tier (`x-floodgate-tier`); a tenant without one gets
/// the TierQueue's default.
#[tokio::test]
async fn the_tenants_tier_is_the_requests_tier() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let tiers = r#"
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {name: tiers}
spec:
  defaultTier: basic
  tiers:
  - {name: pro, class: priority, weight: 10, maxWaitMs: 2000}
  - {name: basic, class: standard, weight: 5, maxWaitMs: 5000}
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: acme}
spec:
  tier: pro
  keys: [{name: main, secretRef: {name: clients, key: acme}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: globex}
spec:
  keys: [{name: main, secretRef: {name: clients, key: globex}}]
"#;
    let yaml = format!("{}---\n{}---\n{tiers}", pool(&mock), clients(ACME_KEY));
    let gw = Gateway::start(&yaml, Duration::from_secs(60), Duration::from_secs(5))
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", gw.url());
    for (key, tier) in [(ACME_KEY, "pro"), (GLOBEX_KEY, "basic")] {
        let response = reqwest::Client::new()
            .post(&url)
            .header("x-api-key", key)
            .json(&chat("gpt-4o", false))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-floodgate-tier"], tier);
    }
}

/// A request the gateway refuses itself (here: a model no pool serves) does not spend the
/// tenant's rpm, on two replicas sharing it through Redis: the refund leaves the window.
#[tokio::test]
async fn refusals_by_the_gateway_do_not_spend_the_tenants_rpm() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let redis = RedisServer::start().await.unwrap();
    let tenant = r#"
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {name: acme}
spec:
  keys: [{name: main, secretRef: {name: clients, key: acme}}]
  limits: {rpm: 2, tpm: 1000}
"#;
    let (a, b) = two_replicas(&mock, &redis, tenant).await;
    let key = [("x-api-key", ACME_KEY)];
    let url = |i: usize| {
        let gw = if i.is_multiple_of(2) { &a } else { &b };
        format!("{}/v1/chat/completions", gw.url())
    };
    for i in 0..4 {
        let (status, _, body) = post(&url(i), &chat("no-such-model", false), &key).await;
        assert_eq!(status, 404, "{body}");
    }
    let keys = KeyBudgetKeys::tenant("acme");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut logged = u64::MAX;
    for _ in 0..100 {
        logged = redis::cmd("ZCARD")
            .arg(&keys.requests)
            .query_async(&mut conn)
            .await
            .unwrap();
        if logged == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(logged, 0, "refused requests still in {}", keys.requests);
    // On one replica: a request, a refusal that would fill the window (2 of 2 requests, 600
    // tokens of 1,000) and is refunded, then one more that needs both the request and the
    // tokens back; the other replica then finds the window full.
    let ask = |model: &str| {
        json!({"model": model, "max_tokens": 600,
               "messages": [{"role": "user", "content": "hi"}]})
    };
    let statuses = [
        post(&url(0), &chat("gpt-4o", false), &key).await.0,
        post(&url(0), &ask("no-such-model"), &key).await.0,
        post(&url(0), &ask("gpt-4o"), &key).await.0,
        post(&url(1), &chat("gpt-4o", false), &key).await.0,
    ];
    assert_eq!(
        statuses,
        [200, 404, 200, 429],
        "the refusal spent the tenant's request or tokens"
    );
}
