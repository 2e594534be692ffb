//! The official OpenAI Python SDK against the proxy: a chat, a streamed chat with usage, the
//! model list and an unknown model, for an OpenAI model and for an alias served by Anthropic;
//! and embeddings (float, base64, the SDK's default, `dimensions`) from an OpenAI, an
//! OpenAI-compatible, a Gemini and an Ollama target, refused for an Anthropic one.
//! The SDK lives in a virtual environment made by `make python-venv` (a prerequisite of
//! `make unit` and `make test`); without it this test fails and says so.

#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders, Provider, default_dimensions};
use floodgate_e2e::python::run_script;
use std::time::Duration;

/// A tenant whose client key is the one the SDK check sends by default (`--api-key`): the
/// SDK's own way of sending its key must identify it, or every call is a 401.
const SDK_TENANT: &str = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: clients}\nstringData: {sdk: floodgate-sdk-check}\n---\n\
    apiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {name: sdk}\nspec:\n  keys: [{name: main, secretRef: {name: clients, key: sdk}}]\n";

fn manifests(base: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o-mini}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4, alias: smart}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n"
    )
}

/// A pool with an embedding model on every provider type that has embeddings.
fn embedding_manifests(base: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b, c: key-c, d: key-d}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: text-embedding-3-small}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: vllm, type: openai-compatible, baseUrl: \"{base}/v1\", models: [{{name: bge-m3}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n\
         \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-embedding-001}}], keys: [{{secretRef: {{name: keys, key: c}}, rpm: 1000}}]}}\n\
         \x20 - {{name: local, type: ollama, baseUrl: \"{base}\", models: [{{name: nomic-embed-text}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4, alias: smart}}], keys: [{{secretRef: {{name: keys, key: d}}, rpm: 1000}}]}}\n"
    )
}

/// Runs `openai_sdk_check.py` with `args` against `gateway_url`; returns its stdout.
async fn run_sdk_check(gateway_url: &str, args: &[&str]) -> String {
    let mut all = vec!["--base-url".to_owned(), format!("{gateway_url}/v1")];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let output = run_script("openai_sdk_check.py", &all, Duration::from_secs(120))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "the OpenAI SDK is missing from the venv: run `make python-venv`\n{stderr}"
    );
    assert!(
        output.status.success(),
        "the OpenAI SDK check failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    stdout
}

#[tokio::test]
async fn the_openai_python_sdk_chats_and_streams_through_the_proxy() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &(manifests(&mock.base_url()) + SDK_TENANT),
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let stdout = run_sdk_check(&gw.url(), &["--model", "gpt-4o-mini", "--model", "smart"]).await;
    // Each model: one chat and one streamed chat reached its provider; the unknown model none.
    let counts = mock.counts();
    assert_eq!(counts.provider_total(Provider::OpenAi), 2, "{stdout}");
    assert_eq!(counts.provider_total(Provider::Anthropic), 2, "{stdout}");
}

#[tokio::test]
async fn the_openai_python_sdk_embeds_through_the_proxy() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &(embedding_manifests(&mock.base_url()) + SDK_TENANT),
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let dims = |model: &str, provider| format!("{model}={}", default_dimensions(provider));
    let specs = [
        dims("text-embedding-3-small", Provider::OpenAi),
        dims("bge-m3", Provider::OpenAi),
        dims("gemini-embedding-001", Provider::Gemini),
        dims("nomic-embed-text", Provider::Ollama),
    ];
    let mut args = Vec::new();
    for spec in &specs {
        args.extend(["--embedding-model", spec.as_str()]);
    }
    args.extend(["--refused-embedding-model", "smart"]);
    let stdout = run_sdk_check(&gw.url(), &args).await;
    // Four calls per model (float, base64, default, shortened); none for the refused or unknown
    // model.
    let counts = mock.counts();
    assert_eq!(counts.requests(Provider::OpenAi, "key-a"), 4, "{stdout}");
    assert_eq!(counts.requests(Provider::OpenAi, "key-b"), 4, "{stdout}");
    assert_eq!(counts.provider_total(Provider::Gemini), 4, "{stdout}");
    assert_eq!(counts.provider_total(Provider::Ollama), 4, "{stdout}");
    assert_eq!(counts.provider_total(Provider::Anthropic), 0, "{stdout}");
}
