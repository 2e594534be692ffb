//! Shutdown of the `floodgate-proxy` binary: on SIGTERM every worker thread stops accepting,
//! the requests already in flight (on any worker) still get their whole answers, the shared
//! budgets in Redis learn that each was answered, and the process exits cleanly.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_crds::redis_keys::KeyBudgetKeys;
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use std::time::Duration;
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(20);
/// The mock's `slow-<ms>` fault: each answer takes this long.
const SLOW_MODEL: &str = "slow-1500";
const IN_FLIGHT: usize = 8;

/// A config directory with one OpenAI pool on the mock serving `model`.
fn config_dir(mock: &MockProviders, model: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let manifests = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  a: sk-shutdown-test\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: {model}}}], keys: [{{name: primary, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        mock.base_url()
    );
    std::fs::write(dir.path().join("pool.yaml"), manifests).unwrap();
    dir
}

async fn slow_chat(url: String, model: &'static str) -> (u16, String) {
    // A connection per request: they spread over the workers.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = client
        .post(url)
        .json(&serde_json::json!({
            "model": model,
            "messages": [{"role": "user", "content": "still there?"}],
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

/// Starts the proxy on `dir` (plus `extra` arguments) and sends `count` chats for `model`;
/// returns once all have reached the mock, so they are in flight at the proxy.
async fn in_flight(
    mock: &MockProviders,
    dir: &tempfile::TempDir,
    extra: &[&str],
    model: &'static str,
    count: usize,
) -> (ProxyProcess, Vec<JoinHandle<(u16, String)>>) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = vec![
        "--config",
        dir.path().to_str().unwrap(),
        "--watch-interval-ms",
        "0",
    ];
    args.extend_from_slice(extra);
    let proxy = ProxyProcess::start(args, &[]).await.unwrap();
    let url = proxy.url("/v1/chat/completions");
    let calls = (0..count)
        .map(|_| tokio::spawn(slow_chat(url.clone(), model)))
        .collect();
    wait_for("every request at the mock", WAIT, || async {
        let seen: u64 = mock.counts().keys.iter().map(|k| k.requests).sum();
        Ok((seen == count as u64).then_some(()))
    })
    .await
    .unwrap();
    (proxy, calls)
}

#[tokio::test]
async fn sigterm_drains_the_requests_in_flight_on_every_worker() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, SLOW_MODEL);
    let (proxy, calls) = in_flight(&mock, &dir, &["--workers", "3"], SLOW_MODEL, IN_FLIGHT).await;
    assert!(
        proxy
            .log()
            .iter()
            .any(|line| line.contains("\"workers\":3")),
        "{:?}",
        proxy.log()
    );
    let addr = proxy.addr();

    let status = proxy.terminate(WAIT).await.unwrap();
    assert!(status.success(), "{status}");
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("chat.completion"), "{body}");
    }
    // Stopped: nothing listens any more.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn with_redis_every_answer_in_flight_at_sigterm_reaches_the_shared_budget() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, SLOW_MODEL);
    let url = redis.url();
    let extra = ["--workers", "3", "--redis", url.as_str()];
    let (proxy, calls) = in_flight(&mock, &dir, &extra, SLOW_MODEL, IN_FLIGHT).await;

    let status = proxy.terminate(WAIT).await.unwrap();
    assert!(status.success(), "{status}");
    for call in calls {
        let (status, body) = call.await.unwrap();
        assert_eq!(status, 200, "{body}");
    }
    // Each admitted request is in the key's request log. In flight it is scored ten minutes
    // ahead (the in-flight TTL); answered, with its answer time. A write lost at shutdown
    // leaves it ahead, holding a slot of every replica for ten minutes.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let keys = KeyBudgetKeys::new("pool", "openai", "keys/a");
    let log: Vec<(String, f64)> = redis::cmd("ZRANGE")
        .arg(&keys.requests)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query_async(&mut c)
        .await
        .unwrap();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
    let now_ms = (secs * 1000 + micros / 1000) as f64;
    assert_eq!(log.len(), IN_FLIGHT, "{log:?}");
    for (member, score) in &log {
        assert!(
            *score <= now_ms,
            "{member} still in flight: {score} > {now_ms}"
        );
    }
}

#[tokio::test]
async fn a_second_sigterm_exits_without_waiting_for_the_drain() {
    // Far longer than the test waits: only the second signal can end it in time.
    const SLOWER: &str = "slow-30000";
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, SLOWER);
    let (proxy, mut calls) = in_flight(&mock, &dir, &[], SLOWER, 1).await;
    let call = calls.remove(0);
    proxy.send_sigterm().await.unwrap();
    proxy
        .wait_for_log("a second signal stops at once", WAIT)
        .await
        .unwrap();
    proxy.send_sigterm().await.unwrap();
    let status = proxy.wait_exit(WAIT).await.unwrap();
    assert_eq!(status.code(), Some(130), "{status}");
    // Stopped before the upstream answered: the request in flight got no answer.
    assert!(call.await.is_err(), "the request was answered");
}
