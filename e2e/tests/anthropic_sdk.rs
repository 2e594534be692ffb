//! The official Anthropic Python SDK against the proxy's Messages door: token counting, a
//! message, a streamed message with usage, a cached system prompt with a stop sequence
//! (reported as `stop_sequence` only where the upstream says which matched: Anthropic's),
//! `anthropic-beta` headers, and an unknown model, for one model of each wire format (OpenAI,
//! Anthropic, Gemini, Ollama), so every provider adapter's answers are rendered in
//! Anthropic's shape. The SDK lives in the virtual environment `make python-venv`
//! makes; without it this test fails and says so.

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders, Provider};
use floodgate_e2e::python::run_script;
use std::time::Duration;

/// One pool, one provider of each wire format, all on the mock.
/// A tenant whose client key is the one the SDK check sends by default (`--api-key`): the
/// SDK's own way of sending its key must identify it, or every call is a 401.
const SDK_TENANT: &str = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: clients}\nstringData: {sdk: floodgate-sdk-check}\n---\n\
    apiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {name: sdk}\nspec:\n  keys: [{name: main, secretRef: {name: clients, key: sdk}}]\n";

fn manifests(base: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b, c: key-c}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o-mini}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n\
         \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-2.5-flash}}], keys: [{{secretRef: {{name: keys, key: c}}, rpm: 1000}}]}}\n\
         \x20 - {{name: local, type: ollama, baseUrl: \"{base}\", models: [{{name: \"llama3.1:8b\"}}]}}\n"
    )
}

#[tokio::test]
async fn the_anthropic_python_sdk_talks_to_every_wire_format_through_the_proxy() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &(manifests(&mock.base_url()) + SDK_TENANT),
        Duration::from_secs(60),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let models = [
        "claude-sonnet-4",
        "gpt-4o-mini",
        "gemini-2.5-flash",
        "llama3.1:8b",
    ];
    let mut args = vec![
        "--base-url".to_owned(),
        gw.url(),
        "--reports-stop-sequence".to_owned(),
        "claude-sonnet-4".to_owned(),
    ];
    for model in models {
        args.extend(["--model".to_owned(), model.to_owned()]);
    }
    let output = run_script("anthropic_sdk_check.py", &args, Duration::from_secs(120))
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !stderr.contains("ModuleNotFoundError"),
        "the Anthropic SDK is missing from the venv: run `make python-venv`\n{stderr}"
    );
    assert!(
        output.status.success(),
        "the Anthropic SDK check failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
    // Each model: a message, a streamed one, a stopped one and its stream, one with a
    // portable beta reached its provider; the unknown beta reached Anthropic's only (the
    // others refused it before calling out); token counting and the unknown model reached
    // none.
    let counts = mock.counts();
    for (provider, calls) in [
        (Provider::OpenAi, 5),
        (Provider::Anthropic, 6),
        (Provider::Gemini, 5),
        (Provider::Ollama, 5),
    ] {
        assert_eq!(
            counts.provider_total(provider),
            calls,
            "{provider:?}\n{stdout}"
        );
    }
}
