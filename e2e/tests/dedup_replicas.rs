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
