//! The Anthropic Messages door on the request path, with raw HTTP: a stream the upstream
//! breaks half-way ends in Anthropic's `error` event, upstream and routing failures come back
//! in Anthropic's error format with their status, and an untranslatable field is refused
//! before any provider is called.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use serde_json::{Value, json};
use std::time::Duration;

/// One OpenAI and one Anthropic provider on the mock; the model names choose mock faults.
fn manifests(base: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}, {{name: gpt-truncate}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-overloaded-529}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n"
    )
}

async fn start() -> (MockProviders, Gateway) {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &manifests(&mock.base_url()),
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    (mock, gw)
}

async fn post(gw: &Gateway, body: Value) -> reqwest::Response {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
        .post(format!("{}/v1/messages", gw.url()))
        .header("anthropic-version", "2023-06-01")
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn ask(model: &str, stream: bool) -> Value {
    json!({
        "model": model,
        "max_tokens": 100,
        "stream": stream,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}]
    })
}

/// The event names of an Anthropic SSE body, and the data of the last event.
fn events(body: &str) -> (Vec<String>, Value) {
    let mut names = Vec::new();
    let mut last = Value::Null;
    for frame in body.split_terminator("\n\n") {
        let (event, data) = frame.split_once('\n').unwrap();
        names.push(event.strip_prefix("event: ").unwrap().to_owned());
        last = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
    }
    (names, last)
}

#[tokio::test]
async fn a_stream_the_upstream_breaks_ends_in_an_error_event() {
    let (_mock, gw) = start().await;
    let response = post(&gw, ask("gpt-truncate", true)).await;
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    assert_eq!(response.headers()["x-floodgate-provider"], "openai");
    let (names, last) = events(&response.text().await.unwrap());
    assert_eq!(
        names.first().map(String::as_str),
        Some("message_start"),
        "{names:?}"
    );
    assert!(
        names.iter().any(|n| n == "content_block_delta"),
        "{names:?}"
    );
    assert_eq!(names.last().map(String::as_str), Some("error"), "{names:?}");
    assert!(!names.iter().any(|n| n == "message_stop"), "{names:?}");
    assert_eq!(last["error"]["type"], "api_error");
    // The request is counted when its stream ends, with the reason it broke.
    let metrics = reqwest::get(format!("{}/metrics", gw.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let counted = metrics.lines().any(|l| {
        l.starts_with("floodgate_requests_total")
            && l.contains("model=\"gpt-truncate\"")
            && l.contains("outcome=\"truncated\"")
    });
    assert!(counted, "{metrics}");
}

#[tokio::test]
async fn a_whole_stream_ends_in_message_stop_with_usage() {
    let (_mock, gw) = start().await;
    let response = post(&gw, ask("gpt-4o", true)).await;
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    let (names, _) = events(&body);
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{names:?}"
    );
    let delta = body
        .split_terminator("\n\n")
        .find_map(|f| f.strip_prefix("event: message_delta\ndata: "))
        .unwrap();
    let delta: Value = serde_json::from_str(delta).unwrap();
    assert!(
        delta["usage"]["output_tokens"].as_u64().unwrap() > 0,
        "{delta}"
    );
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
}

#[tokio::test]
async fn failures_come_back_in_anthropics_error_format() {
    let (_mock, gw) = start().await;
    let response = post(&gw, ask("no-such-model", false)).await;
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "not_found_error");

    let response = post(&gw, ask("claude-overloaded-529", false)).await;
    assert_eq!(response.status(), 503);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "overloaded_error", "{body}");
}

#[tokio::test]
async fn an_untranslatable_field_is_refused_before_any_provider_is_called() {
    let (mock, gw) = start().await;
    let mut body = ask("gpt-4o", false);
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 1024});
    let response = post(&gw, body).await;
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("`thinking`"), "{message}");
    assert_eq!(mock.counts().total(), 0);
}
