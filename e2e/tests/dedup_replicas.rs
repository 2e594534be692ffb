//! In-flight deduplication across two `floodgate-proxy` processes sharing a real
//! redis-server: 100 identical requests at once, half streaming, half on each replica,
//! make one provider call, and every caller receives the whole answer; an answer that just
//! ended on one replica is followed, not asked for again, on the other; and the cache's
//! entries gauge counts what Redis holds.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_e2e::mock::{MockConfig, MockProviders, answer_for};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::time::Duration;

/// The CachePolicy of the 100-request test: exact answers and dedup, in Redis.
const EXACT_AND_DEDUP: &str = "exact: {ttlSeconds: 3600}\n  dedup: {windowSeconds: 5}";

/// A pool serving `gpt-slow-1500` and `gpt-4o` on the mock, and a CachePolicy with the
/// Redis backend and `spec` (YAML lines under `spec:`, indented by two).
fn config_dir(mock: &MockProviders, spec: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: up, type: openai, baseUrl: \"{}\", models: [{{name: gpt-slow-1500}}, {{name: gpt-4o}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 100000}}]}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: cache}}\nspec:\n\
         \x20 backend: redis\n  {spec}\n",
        mock.base_url()
    );
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    dir
}

async fn replica(dir: &tempfile::TempDir, redis: &RedisServer) -> ProxyProcess {
    let args = [
        "--config",
        dir.path().to_str().unwrap(),
        "--redis",
        &redis.url(),
    ];
    let env: [(&str, &OsStr); 1] = [("RUST_LOG", OsStr::new("info"))];
    ProxyProcess::start(args, &env).await.unwrap()
}

/// The answer's text: the whole answer's, or the stream's deltas (which must end cleanly).
async fn ask(url: String, prompt: &str, stream: bool) -> String {
    ask_model(url, "gpt-slow-1500", prompt, stream).await.1
}

/// What the cache did (`x-floodgate-cache`) and the answer's text, from `model`.
async fn ask_model(url: String, model: &str, prompt: &str, stream: bool) -> (String, String) {
    let body = json!({"model": model, "stream": stream, "max_tokens": 50,
                      "messages": [{"role": "user", "content": prompt}]});
    let response = reqwest::Client::new()
        .post(url)
        .timeout(Duration::from_secs(30))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let cache = response
        .headers()
        .get("x-floodgate-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let raw = response.text().await.unwrap();
    if !stream {
        let v: Value = serde_json::from_str(&raw).unwrap();
        let text = v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
        return (cache, text);
    }
    assert!(raw.contains("data: [DONE]"), "{raw}");
    let text = raw
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    (cache, text)
}

/// The value of the metric `name` (a plain gauge or counter) on `replica`'s admin port; 0
/// when it is not there yet.
async fn metric(replica: &ProxyProcess, name: &str) -> u64 {
    let text = reqwest::get(replica.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

#[tokio::test]
async fn a_hundred_identical_requests_on_two_replicas_make_one_provider_call() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().await.unwrap();
    let mock =
        MockProviders::start(MockConfig::default().with_chunk_interval(Duration::from_millis(30)))
            .await
            .unwrap();
    let dir = config_dir(&mock, EXACT_AND_DEDUP);
    let (a, b) = tokio::join!(replica(&dir, &redis), replica(&dir, &redis));
    let prompt = "explain how tides work";
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let calls = (0..100).map(|i| ask(urls[i % 2].clone(), prompt, (i / 2) % 2 == 0));
    let answers = futures::future::join_all(calls).await;
    assert_eq!(mock.counts().total(), 1);
    for answer in answers {
        assert_eq!(answer, answer_for(prompt));
    }
    // The 99 followers (whole or streamed, on either replica) each count what they saved:
    // one answer's tokens each, as the exact hit below counts on A.
    const SAVED: &str = "floodgate_cache_saved_tokens_total";
    let followers = metric(&a, SAVED).await + metric(&b, SAVED).await;
    let before = metric(&a, SAVED).await;
    ask(urls[0].clone(), prompt, false).await;
    let one = metric(&a, SAVED).await - before;
    assert!(one > 0);
    assert_eq!(followers, 99 * one);
}

/// A finished answer is kept for the dedup window on every replica: B asking 200 ms after
/// A's answer ended (no exact cache to find it in) follows A's flight in Redis and is
/// answered from its log; one provider call, whole and streamed.
#[tokio::test]
async fn an_answer_that_just_ended_on_one_replica_is_not_asked_for_again_on_another() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, "dedup: {windowSeconds: 5}");
    let (a, b) = tokio::join!(replica(&dir, &redis), replica(&dir, &redis));
    let mut saved_before = 0;
    for (i, stream) in [false, true].into_iter().enumerate() {
        let prompt = format!("explain how tides work, take {i}");
        let (cache, text) =
            ask_model(a.url("/v1/chat/completions"), "gpt-4o", &prompt, stream).await;
        assert_eq!((cache.as_str(), &*text), ("miss", &*answer_for(&prompt)));
        // A's answer has ended (its caller read it to the end).
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (cache, text) =
            ask_model(b.url("/v1/chat/completions"), "gpt-4o", &prompt, stream).await;
        assert_eq!(
            (cache.as_str(), &*text),
            ("dedup", &*answer_for(&prompt)),
            "stream {stream}"
        );
        assert_eq!(mock.counts().total(), i as u64 + 1, "stream {stream}");
        // B counts what it saved, streamed too.
        let saved = metric(&b, "floodgate_cache_saved_tokens_total").await;
        assert!(saved > saved_before, "stream {stream}: {saved}");
        saved_before = saved;
    }
}

/// `floodgate_cache_entries` and `floodgate_cache_bytes` with the Redis backend: what the
/// policy holds in Redis (every replica's entries), not 0.
#[tokio::test]
async fn with_redis_the_entries_gauge_counts_what_redis_holds() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = config_dir(&mock, "exact: {ttlSeconds: 3600}");
    let (a, b) = tokio::join!(replica(&dir, &redis), replica(&dir, &redis));
    /// Waits until `replica`'s entries gauge reads `entries` (stores are written in the
    /// background); then its bytes gauge.
    async fn wait_for(replica: &ProxyProcess, entries: u64) -> u64 {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let held = metric(replica, "floodgate_cache_entries").await;
            if held == entries {
                return metric(replica, "floodgate_cache_bytes").await;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "entries {held}, not {entries}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for prompt in ["first question", "second question"] {
        ask_model(a.url("/v1/chat/completions"), "gpt-4o", prompt, false).await;
    }
    let bytes_a = wait_for(&a, 2).await;
    assert!(bytes_a > 0);
    // B's store sees A's entries too.
    ask_model(
        b.url("/v1/chat/completions"),
        "gpt-4o",
        "third question",
        false,
    )
    .await;
    let bytes_b = wait_for(&b, 3).await;
    assert!(bytes_b > bytes_a, "{bytes_b} after {bytes_a}");
}

/// A follower reads only its own flight: when the leader's lease lapses mid-answer (a
/// leader stalled past it) and another replica leads the same key anew, the follower gets
/// an error after the chunks it had, never the new flight's chunks appended to the old
/// flight's start.
#[tokio::test]
async fn a_follower_never_mixes_two_flights_answers() {
    use floodgate_proxy::cache::answer::Answer;
    use floodgate_proxy::cache::flight::Meta;
    use floodgate_proxy::cache::key::Key;
    use floodgate_proxy::cache::redis::{RedisStore, flight_keys, flight_token};
    use floodgate_proxy::cache::shared::{LEASE, Mirror, follow};
    use floodgate_proxy::providers::{ChatChunk, ProviderError};
    use futures::StreamExt as _;
    use std::sync::Arc;

    let redis = RedisServer::start().await.unwrap();
    let opts = floodgate_proxy::budget::SharedOptions::new(
        floodgate_proxy::secret::SecretString::new(redis.url()),
    );
    let store = Arc::new(RedisStore::new(&opts).unwrap());
    let tasks = tokio_util::task::TaskTracker::new();
    let key = Key([42; 32]);
    let keep = Duration::from_secs(5);
    let meta = |p: &str| Meta {
        provider: Arc::from(p),
        key: Arc::from("k"),
    };
    // Flight A: its meta and first chunk, then it stalls.
    let first = flight_token();
    assert!(store.lease(&key, &first, LEASE).await.unwrap());
    let a = Mirror::start(store.clone(), (key, first.clone()), keep, &tasks);
    a.meta(&meta("a"));
    let (tx, rx) = futures::channel::mpsc::unbounded::<Result<ChatChunk, ProviderError>>();
    let mut a_stream = a.tee(Box::pin(rx));
    let answer_a = Answer::text("m", "alpha beta gamma".into()).chunks("m", false);
    tx.unbounded_send(Ok(answer_a[0].clone())).unwrap();
    assert!(a_stream.next().await.is_some());
    let (got_meta, mut follower) = follow(store.clone(), key).await.unwrap();
    assert_eq!(&*got_meta.provider, "a");
    assert_eq!(follower.next().await.unwrap().unwrap(), answer_a[0]);
    // A's lease lapses (as its expiry would); flight B leads the key and finishes.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let (lease, _, _) = flight_keys(&key, &first);
    let () = redis::cmd("DEL")
        .arg(&lease)
        .query_async(&mut c)
        .await
        .unwrap();
    let second = flight_token();
    assert!(store.lease(&key, &second, LEASE).await.unwrap());
    let b = Mirror::start(store.clone(), (key, second.clone()), keep, &tasks);
    b.meta(&meta("b"));
    let answer_b = Answer::text("m", "one two three four five".into()).chunks("m", false);
    b.whole(&answer_b);
    // Let B's entries (its meta, chunks and end) land before the follower looks again.
    let (_, log_b, _) = flight_keys(&key, &second);
    loop {
        let len: usize = redis::cmd("LLEN")
            .arg(&log_b)
            .query_async(&mut c)
            .await
            .unwrap();
        if len == answer_b.len() + 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(10), follower.collect::<Vec<_>>())
        .await
        .unwrap();
    assert!(
        rest.iter()
            .all(|r| r.as_ref().map_or(true, |c| !answer_b.contains(c))),
        "the follower read the other flight: {rest:?}"
    );
    assert!(
        matches!(rest.last(), Some(Err(_))),
        "the lapsed flight ends in an error: {rest:?}"
    );
    drop(tx);
}
