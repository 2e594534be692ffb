//! `POST /v1/embeddings` through the gateway against the mock providers: every provider with
//! embeddings, the caller's encoding whatever the upstream sends, refusals that cost no
//! upstream call and no budget, targets left out for what they cannot take, the same key
//! budgets as chat, and fallback.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{
    Fault, MockConfig, MockProviders, Provider, default_dimensions, embedding_for,
};
use serde_json::{Value, json};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);
const TEXTS: [&str; 2] = ["first text to embed", "second text to embed"];

/// A pool of `providers` (YAML list items) with keys `a`..`d`, and `extra_spec` before them.
fn manifests(providers: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b, c: key-c, d: key-d}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n{extra_spec}  providers:\n{providers}"
    )
}

/// One provider of each type, an embedding model on each that has embeddings.
fn every_type(base: &str, claude_rpm: u32) -> String {
    manifests(
        &format!(
            "  - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: text-embedding-3-small}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
             \x20 - {{name: vllm, type: openai-compatible, baseUrl: \"{base}/v1\", models: [{{name: bge-m3}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n\
             \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-embedding-001}}], keys: [{{secretRef: {{name: keys, key: c}}, rpm: 1000}}]}}\n\
             \x20 - {{name: local, type: ollama, baseUrl: \"{base}\", models: [{{name: nomic-embed-text}}]}}\n\
             \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4}}], keys: [{{secretRef: {{name: keys, key: d}}, rpm: {claude_rpm}}}]}}\n"
        ),
        "",
    )
}

async fn post(gw: &Gateway, path: &str, body: &Value) -> reqwest::Response {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
        .post(format!("{}{path}", gw.url()))
        .json(body)
        .send()
        .await
        .unwrap()
}

async fn embed(gw: &Gateway, body: Value) -> reqwest::Response {
    post(gw, "/v1/embeddings", &body).await
}

fn floats(value: &Value) -> Vec<f32> {
    let values = value.as_array().unwrap();
    values.iter().map(|v| v.as_f64().unwrap() as f32).collect()
}

fn assert_close(actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len());
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() < 1e-6, "{a} != {e}");
    }
}

fn unpack(base64: &Value) -> Vec<f32> {
    let bytes = BASE64.decode(base64.as_str().unwrap()).unwrap();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

#[tokio::test]
async fn every_provider_with_embeddings_answers_in_openai_shape() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &every_type(&mock.base_url(), 1000),
        MIN,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    for (model, provider, mocked) in [
        ("text-embedding-3-small", "openai", Provider::OpenAi),
        ("bge-m3", "vllm", Provider::OpenAi),
        ("gemini-embedding-001", "gemini", Provider::Gemini),
        ("nomic-embed-text", "local", Provider::Ollama),
    ] {
        let dims = default_dimensions(mocked);
        let r = embed(&gw, json!({"model": model, "input": TEXTS})).await;
        assert_eq!(r.status(), 200, "{model}");
        assert_eq!(r.headers()["x-floodgate-provider"], provider);
        assert!(r.headers().contains_key("x-request-id"));
        let body: Value = r.json().await.unwrap();
        assert_eq!(
            (body["object"].as_str(), body["model"].as_str()),
            (Some("list"), Some(model))
        );
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), TEXTS.len(), "{model}");
        for (i, (item, text)) in data.iter().zip(TEXTS).enumerate() {
            assert_eq!(
                (item["object"].as_str(), item["index"].as_u64()),
                (Some("embedding"), Some(i as u64))
            );
            assert_close(&floats(&item["embedding"]), &embedding_for(text, dims));
        }
        let usage = &body["usage"];
        assert!(
            usage["prompt_tokens"].as_u64().unwrap() > 0,
            "{model}: {usage}"
        );
        assert_eq!(usage["prompt_tokens"], usage["total_tokens"]);

        // base64 on request: passed on to OpenAI-compatible upstreams, made by the gateway for
        // the others; the same vectors either way.
        let r = embed(&gw, json!({"model": model, "input": TEXTS[0], "encoding_format": "base64", "dimensions": 32})).await;
        assert_eq!(r.status(), 200, "{model}");
        let body: Value = r.json().await.unwrap();
        assert_close(
            &unpack(&body["data"][0]["embedding"]),
            &embedding_for(TEXTS[0], 32),
        );
    }
    let counts = mock.counts();
    assert_eq!(counts.requests(Provider::OpenAi, "key-a"), 2);
    assert_eq!(counts.requests(Provider::OpenAi, "key-b"), 2);
    assert_eq!(counts.provider_total(Provider::Gemini), 2);
    assert_eq!(counts.provider_total(Provider::Ollama), 2);
}

#[tokio::test]
async fn refusals_cost_no_upstream_call_and_no_budget() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    // Claude's key takes one request a minute: a refusal that spent it would leave none.
    let gw = Gateway::start(
        &every_type(&mock.base_url(), 1),
        MIN,
        Duration::from_millis(50),
    )
    .await
    .unwrap();
    let cases = [
        (
            json!({"model": "claude-sonnet-4", "input": "x"}),
            400,
            "claude-sonnet-4",
        ),
        (
            json!({"model": "gemini-embedding-001", "input": [[1, 2]]}),
            400,
            "`input`",
        ),
        (
            json!({"model": "nomic-embed-text", "input": [1, 2]}),
            400,
            "`input`",
        ),
        (
            json!({"model": "gemini-embedding-001", "input": "x", "task_type": "q"}),
            400,
            "`task_type`",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": []}),
            400,
            "`input`",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": ["a", 1]}),
            400,
            "`input`",
        ),
        (
            json!({"model": "text-embedding-3-small", "input": "a", "encoding_format": "hex"}),
            400,
            "`encoding_format`",
        ),
        (
            json!({"model": "no-such-model", "input": "x"}),
            404,
            "no-such-model",
        ),
    ];
    for (body, status, named) in cases {
        let r = embed(&gw, body.clone()).await;
        assert_eq!(r.status(), status, "{body}");
        let error: Value = r.json().await.unwrap();
        let kind = error["error"]["type"].as_str().unwrap();
        assert_eq!(kind, "invalid_request_error", "{body}: {error}");
        // The message naming the field or model is the feature here.
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(named), "{body}: {message}");
    }
    assert_eq!(mock.counts().total(), 0, "no refusal reached a provider");
    let chat = json!({"model": "claude-sonnet-4", "messages": [{"role": "user", "content": "hi"}]});
    let r = post(&gw, "/v1/chat/completions", &chat).await;
    assert_eq!(
        r.status(),
        200,
        "the refused embeddings spent none of Claude's budget"
    );
}

#[tokio::test]
async fn a_route_leaves_out_targets_that_cannot_take_the_input() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let base = mock.base_url();
    let yaml = manifests(
        &format!(
            "  - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: embed-1, alias: embed}}], keys: [{{secretRef: {{name: keys, key: c}}, rpm: 1000}}]}}\n\
             \x20 - {{name: vllm, type: openai-compatible, baseUrl: \"{base}\", models: [{{name: embed-1, alias: embed}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n"
        ),
        "  fallback: [gemini, vllm]\n",
    );
    let gw = Gateway::start(&yaml, MIN, Duration::from_secs(5))
        .await
        .unwrap();
    let text = embed(&gw, json!({"model": "embed", "input": "x"})).await;
    assert_eq!(text.status(), 200);
    assert_eq!(text.headers()["x-floodgate-provider"], "gemini");
    let tokens = embed(&gw, json!({"model": "embed", "input": [[7, 8, 9]]})).await;
    assert_eq!(tokens.status(), 200);
    assert_eq!(tokens.headers()["x-floodgate-provider"], "vllm");
    assert_eq!(tokens.headers()["x-floodgate-attempts"], "1");
    let counts = mock.counts();
    assert_eq!(
        (
            counts.provider_total(Provider::Gemini),
            counts.provider_total(Provider::OpenAi)
        ),
        (1, 1)
    );
}

#[tokio::test]
async fn embeddings_spend_the_same_key_budget_as_chat() {
    let mock = MockProviders::start(MockConfig::default().with_rpm("key-a", 2))
        .await
        .unwrap();
    let base = mock.base_url();
    let yaml = manifests(
        &format!(
            "  - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}, {{name: text-embedding-3-small}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 2}}]}}\n"
        ),
        "",
    );
    let gw = Gateway::start(&yaml, MIN, Duration::from_millis(50))
        .await
        .unwrap();
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    assert_eq!(post(&gw, "/v1/chat/completions", &chat).await.status(), 200);
    let one = json!({"model": "text-embedding-3-small", "input": "x"});
    assert_eq!(embed(&gw, one.clone()).await.status(), 200);
    let limited = embed(&gw, one).await;
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    let error: Value = limited.json().await.unwrap();
    assert_eq!(error["error"]["code"], "rate_limit_exceeded");
    let counts = mock.counts();
    assert_eq!(counts.requests(Provider::OpenAi, "key-a"), 2);
    assert_eq!(counts.over_limit().count(), 0);
}

#[tokio::test]
async fn a_failing_provider_falls_over_to_the_next() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let base = mock.base_url();
    let yaml = manifests(
        &format!(
            "  - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: embed-1, alias: embed}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
             \x20 - {{name: local, type: ollama, baseUrl: \"{base}\", models: [{{name: embed-1, alias: embed}}]}}\n"
        ),
        "  fallback: [openai, local]\n",
    );
    let gw = Gateway::start(&yaml, MIN, Duration::from_secs(5))
        .await
        .unwrap();
    mock.set_fault(Provider::OpenAi, Fault::Status(500));
    let r = embed(
        &gw,
        json!({"model": "embed", "input": TEXTS, "encoding_format": "base64"}),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-floodgate-provider"], "local");
    assert_eq!(r.headers()["x-floodgate-attempts"], "2");
    let body: Value = r.json().await.unwrap();
    let dims = default_dimensions(Provider::Ollama);
    assert_close(
        &unpack(&body["data"][1]["embedding"]),
        &embedding_for(TEXTS[1], dims),
    );

    // A refusal by the upstream itself (a bad request) is answered, not retried elsewhere.
    mock.clear_faults();
    mock.set_fault(Provider::OpenAi, Fault::Status(400));
    let r = embed(&gw, json!({"model": "embed", "input": "x"})).await;
    assert_eq!(r.status(), 400);
    let counts = mock.counts();
    assert_eq!(counts.provider_total(Provider::OpenAi), 2);
    assert_eq!(counts.provider_total(Provider::Ollama), 1);
}
