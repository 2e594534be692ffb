//! In-flight deduplication across two `floodgate-proxy` processes sharing a real
//! redis-server: 100 identical requests at once, half streaming, half on each replica,
//! make one provider call, and every caller receives the whole answer.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_e2e::mock::{MockConfig, MockProviders, answer_for};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use serde_json::{Value, json};
use std::ffi::OsStr;
use std::time::Duration;

fn config_dir(mock: &MockProviders) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: up, type: openai, baseUrl: \"{}\", models: [{{name: gpt-slow-1500}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 100000}}]}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: cache}}\nspec:\n\
         \x20 backend: redis\n  exact: {{ttlSeconds: 3600}}\n  dedup: {{windowSeconds: 5}}\n",
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
    let body = json!({"model": "gpt-slow-1500", "stream": stream, "max_tokens": 50,
                      "messages": [{"role": "user", "content": prompt}]});
    let response = reqwest::Client::new()
        .post(url)
        .timeout(Duration::from_secs(30))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let raw = response.text().await.unwrap();
    if !stream {
        let v: Value = serde_json::from_str(&raw).unwrap();
        return v["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    assert!(raw.contains("data: [DONE]"), "{raw}");
    raw.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

#[tokio::test]
async fn a_hundred_identical_requests_on_two_replicas_make_one_provider_call() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().await.unwrap();
    let mock =
        MockProviders::start(MockConfig::default().with_chunk_interval(Duration::from_millis(30)))
            .await
            .unwrap();
    let dir = config_dir(&mock);
    let (a, b) = tokio::join!(replica(&dir, &redis), replica(&dir, &redis));
    let prompt = "explain how tides work";
    let urls = [a.url("/v1/chat/completions"), b.url("/v1/chat/completions")];
    let calls = (0..100).map(|i| ask(urls[i % 2].clone(), prompt, (i / 2) % 2 == 0));
    let answers = futures::future::join_all(calls).await;
    assert_eq!(mock.counts().total(), 1);
    for answer in answers {
        assert_eq!(answer, answer_for(prompt));
    }
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
