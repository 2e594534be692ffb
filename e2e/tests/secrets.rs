//! Secrets and access: a full scenario through the `floodgate-proxy` binary (answers from
//! three providers, a stream, a key the provider refuses with 401, upstream 500s, a caller
//! key on every request, a configuration reload that rotates a key, traces exported, logs at
//! `debug`), after which no log line, no metric and no exported span holds a key's value.
//! Admin endpoints are served only on the admin listener.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use axum::routing::post;
use bytes::Bytes;
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const OPENAI: &str = "sk-secret-openai-5b1f0c77d2";
const ROTATED: &str = "sk-secret-rotated-9e4a12c3b8";
const REVOKED: &str = "sk-secret-revoked-3c8d51e0aa";
const ANTHROPIC: &str = "sk-ant-secret-anthropic-71f2d9";
const GEMINI: &str = "AIzaSecretGemini0b3e6f9a2d4c";
/// What a caller sends as its own key (no identity stage yet: it must still never show).
const CLIENT: &str = "sk-client-secret-c4d7e2a91f";
const SECRETS: [&str; 6] = [OPENAI, ROTATED, REVOKED, ANTHROPIC, GEMINI, CLIENT];
const WAIT: Duration = Duration::from_secs(20);

fn manifests(base: &str, openai_key: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  openai: {openai_key}\n  revoked: {REVOKED}\n  anthropic: {ANTHROPIC}\n  gemini: {GEMINI}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}, {{name: gpt-4o-error-500}}], keys: [{{name: main, secretRef: {{name: keys, key: openai}}, rpm: 1000}}]}}\n\
         \x20 - {{name: revoked, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o-revoked}}], keys: [{{name: old, secretRef: {{name: keys, key: revoked}}, rpm: 1000}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4}}], keys: [{{name: c, secretRef: {{name: keys, key: anthropic}}, rpm: 1000}}]}}\n\
         \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-2.5-flash}}], keys: [{{name: g, secretRef: {{name: keys, key: gemini}}, rpm: 1000}}]}}\n"
    )
}

/// A trace collector: every `POST /v1/traces` body.
async fn collector() -> (Arc<Mutex<Vec<Bytes>>>, String) {
    let posts = Arc::new(Mutex::new(Vec::new()));
    let app = axum::Router::new().route(
        "/v1/traces",
        post({
            let posts = posts.clone();
            move |body: Bytes| async move {
                posts.lock().unwrap().push(body);
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (posts, url)
}

/// One chat as an OpenAI caller with its own key; the status.
async fn chat(proxy: &ProxyProcess, model: &str, stream: bool) -> u16 {
    let response = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(CLIENT)
        .json(&serde_json::json!({"model": model, "stream": stream,
            "messages": [{"role": "user", "content": "hello"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let _ = response.text().await.unwrap();
    status
}

fn leaks(what: &str, text: &[u8]) -> Vec<String> {
    SECRETS
        .iter()
        .filter(|s| text.windows(s.len()).any(|w| w == s.as_bytes()))
        .map(|s| format!("{s} in {what}"))
        .collect()
}

#[tokio::test]
async fn no_log_line_metric_or_span_holds_a_secret() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockProviders::start(
        MockConfig::default().with_valid_keys([OPENAI, ROTATED, ANTHROPIC, GEMINI]),
    )
    .await
    .unwrap();
    let (traces, otlp) = collector().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pool.yaml");
    std::fs::write(&file, manifests(&mock.base_url(), OPENAI)).unwrap();
    let proxy = ProxyProcess::start(
        [
            "--config",
            dir.path().to_str().unwrap(),
            "--watch-interval-ms",
            "100",
            "--otlp-endpoint",
            &otlp,
        ],
        &[
            ("RUST_LOG", OsStr::new("debug")),
            ("OTEL_BSP_SCHEDULE_DELAY", OsStr::new("100")),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new("")),
        ],
    )
    .await
    .unwrap();

    assert_eq!(chat(&proxy, "gpt-4o", false).await, 200);
    assert_eq!(chat(&proxy, "gpt-4o", true).await, 200);
    assert_eq!(chat(&proxy, "claude-sonnet-4", false).await, 200);
    assert_eq!(chat(&proxy, "gemini-2.5-flash", true).await, 200);
    assert_eq!(chat(&proxy, "gpt-4o-revoked", false).await, 502);
    assert_eq!(chat(&proxy, "gpt-4o-error-500", false).await, 502);
    let messages = reqwest::Client::new()
        .post(proxy.url("/v1/messages"))
        .header("x-api-key", CLIENT)
        .header("anthropic-version", "2023-06-01")
        .json(
            &serde_json::json!({"model": "claude-sonnet-4", "max_tokens": 64,
            "messages": [{"role": "user", "content": "hello"}]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(messages.status(), 200);
    // The key is rotated: the watcher applies the new Secret value.
    std::fs::write(&file, manifests(&mock.base_url(), ROTATED)).unwrap();
    proxy
        .wait_for_log("configuration change applied", WAIT)
        .await
        .unwrap();
    assert_eq!(chat(&proxy, "gpt-4o", false).await, 200);

    // The scenario happened as intended: a 401 from the provider, and both keys used.
    proxy
        .wait_for_log("the provider refused this key", WAIT)
        .await
        .unwrap();
    let counts = mock.counts();
    assert!(counts.requests(floodgate_e2e::mock::Provider::OpenAi, OPENAI) >= 2);
    assert_eq!(
        counts.requests(floodgate_e2e::mock::Provider::OpenAi, ROTATED),
        1
    );

    // Admin endpoints: on the admin listener only.
    let public = reqwest::get(proxy.url("/metrics")).await.unwrap();
    assert_eq!(public.status(), 404);
    let metrics = reqwest::get(proxy.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("outcome=\"unauthorized\""), "{metrics}");

    wait_for("spans at the collector", WAIT, || async {
        Ok((traces.lock().unwrap().len() > 1).then_some(()))
    })
    .await
    .unwrap();
    // The whole log, to the last line written while shutting down.
    let (status, log) = proxy.terminate_with_log(WAIT).await.unwrap();
    assert!(status.success());
    assert!(
        log.iter().any(|l| l.contains("shutting down")),
        "the log read ends before the shutdown"
    );
    assert!(log.len() > 20, "a debug log: {} lines", log.len());

    let mut found = leaks("/metrics", metrics.as_bytes());
    for line in &log {
        found.extend(leaks(&format!("log line {line}"), line.as_bytes()));
    }
    for body in traces.lock().unwrap().iter() {
        found.extend(leaks("an exported trace", body));
    }
    assert!(found.is_empty(), "{found:#?}");
}
