//! The request path against the mock providers: every wire format, streaming, the key pool
//! that never exceeds a rate limit, fallbacks, breakers, bad keys, live limit changes, and
//! OpenAI-style errors for bad input.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders, Provider};
use floodgate_proxy::route::Dispatcher;
use serde_json::{Value, json};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// A pool with `providers` (YAML list items) and placeholder secrets for every key used.
fn manifests(providers: &str, extra_spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  a: key-a\n  b: key-b\n  c: key-c\n  bad: key-invalid\n{}\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n{extra_spec}  providers:\n{providers}",
        (0..10)
            .map(|i| format!("  k{i}: key-{i}\n"))
            .collect::<String>()
    )
}

fn all_formats(base: &str) -> String {
    manifests(
        &format!(
            "  - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
             \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n\
             \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-2.5-flash}}], keys: [{{secretRef: {{name: keys, key: c}}, rpm: 1000}}]}}\n\
             \x20 - {{name: local, type: ollama, baseUrl: \"{base}\", models: [{{name: \"llama3.1:8b\"}}]}}\n"
        ),
        "",
    )
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn chat(gw: &Gateway, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&body)
        .send()
        .await
        .unwrap()
}

fn ask(model: &str, text: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": text}
    ]})
}

/// The `data:` payloads of an SSE body.
fn events(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|e| e.strip_prefix("data: "))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_wire_format_answers_whole_and_streamed() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(&all_formats(&mock.base_url()), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    for (model, provider) in [
        ("gpt-4o", "openai"),
        ("claude-sonnet-4", "claude"),
        ("gemini-2.5-flash", "gemini"),
        ("llama3.1:8b", "local"),
    ] {
        let r = chat(&gw, ask(model, "what is the capital of France?", false)).await;
        assert_eq!(r.status(), 200, "{model}");
        assert_eq!(r.headers()["x-floodgate-provider"], provider);
        assert_eq!(r.headers()["x-floodgate-attempts"], "1");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], model);
        assert_eq!(
            body["choices"][0]["message"]["content"],
            "mock answer to: what is the capital of France?",
            "{model}"
        );
        assert_eq!(body["choices"][0]["finish_reason"], "stop", "{model}");
        assert!(
            body["usage"]["total_tokens"].as_u64().unwrap() > 0,
            "{model}: {body}"
        );

        let r = chat(&gw, ask(model, "stream me", true)).await;
        assert_eq!(r.status(), 200, "{model}");
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let text = r.text().await.unwrap();
        let data = events(&text);
        assert_eq!(
            data.last().map(String::as_str),
            Some("[DONE]"),
            "{model}: {text}"
        );
        let content: String = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .filter_map(|c| {
                c["choices"][0]["delta"]["content"]
                    .as_str()
                    .map(str::to_owned)
            })
            .collect();
        assert_eq!(content, "mock answer to: stream me", "{model}");
    }
    let counts = mock.counts();
    for p in Provider::ALL {
        assert_eq!(counts.provider_total(p), 2, "{p}");
    }
}

#[tokio::test]
async fn usage_is_streamed_when_asked() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(&all_formats(&mock.base_url()), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    for model in ["gpt-4o", "claude-sonnet-4"] {
        let mut body = ask(model, "count me", true);
        body["stream_options"] = json!({"include_usage": true});
        let text = chat(&gw, body).await.text().await.unwrap();
        let data = events(&text);
        let last: Value = serde_json::from_str(&data[data.len() - 2]).unwrap();
        assert!(
            last["usage"]["completion_tokens"].as_u64().unwrap() > 0,
            "{model}: {text}"
        );
        assert_eq!(last["choices"], json!([]), "{model}");
    }
}

#[tokio::test]
async fn a_failing_provider_is_cut_off_and_traffic_moves_on() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let base = mock.base_url();
    let providers = format!(
        "  - {{name: broken, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-error-500, alias: smart}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: healthy, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4, alias: smart}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n"
    );
    let spec = "  fallback: [broken, healthy]\n  circuitBreaker: {failureThreshold: 3, openSeconds: 600}\n";
    let gw = Gateway::start(&manifests(&providers, spec), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    for i in 0..10 {
        let r = chat(&gw, ask("smart", &format!("q{i}"), i % 2 == 1)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-floodgate-provider"], "healthy");
        assert!(
            r.headers().get("x-floodgate-key").is_none(),
            "the key inventory stays private unless the gateway is told to name keys"
        );
        let _ = r.bytes().await;
    }
    let counts = mock.counts();
    assert_eq!(
        counts.provider_total(Provider::OpenAi),
        3,
        "the breaker opened after the threshold"
    );
    assert_eq!(counts.provider_total(Provider::Anthropic), 10);
}

#[tokio::test]
async fn a_key_refused_with_401_is_taken_out() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let providers = format!(
        "  - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}], keys: [{{name: revoked, secretRef: {{name: keys, key: bad}}, rpm: 1000}}, {{name: good, secretRef: {{name: keys, key: a}}, rpm: 10}}]}}\n",
        mock.base_url()
    );
    // The revoked key has more budget, so least-loaded tries it first.
    let gw = Gateway::start_naming_keys(
        &manifests(&providers, ""),
        Dispatcher::new(MIN, Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        let r = chat(&gw, ask("gpt-4o", &format!("q{i}"), false)).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-floodgate-key"], "good");
    }
    let counts = mock.counts();
    assert_eq!(
        counts.requests(Provider::OpenAi, "key-invalid"),
        1,
        "tried once, then out"
    );
    assert_eq!(counts.requests(Provider::OpenAi, "key-a"), 5);
}

#[tokio::test]
async fn a_config_change_lowers_a_limit_live() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let pool = |rpm: u32| {
        manifests(
            &format!(
                "  - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}], keys: [{{name: only, secretRef: {{name: keys, key: a}}, rpm: {rpm}}}]}}\n",
                mock.base_url()
            ),
            "",
        )
    };
    let gw = Gateway::start(&pool(100), MIN, Duration::from_millis(50))
        .await
        .unwrap();
    for _ in 0..3 {
        assert_eq!(chat(&gw, ask("gpt-4o", "hi", false)).await.status(), 200);
    }
    gw.reconfigure(&pool(4)).unwrap();
    // Three requests already count against the new limit of four.
    assert_eq!(chat(&gw, ask("gpt-4o", "hi", false)).await.status(), 200);
    let r = chat(&gw, ask("gpt-4o", "hi", false)).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(
        mock.counts().total(),
        4,
        "the refused request never went upstream"
    );
}

#[tokio::test]
async fn a_stream_that_stalls_after_the_first_byte_ends_with_an_error_event() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let providers = format!(
        "  - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-stall}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        mock.base_url()
    );
    let spec = "  timeouts: {streamIdleSeconds: 1}\n";
    let gw = Gateway::start(&manifests(&providers, spec), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    let r = chat(&gw, ask("gpt-stall", "hello", true)).await;
    assert_eq!(r.status(), 200);
    let text = r.text().await.unwrap();
    let data = events(&text);
    assert!(
        !data.iter().any(|d| d == "[DONE]"),
        "a stalled stream must not look complete: {text}"
    );
    let last: Value = serde_json::from_str(data.last().unwrap()).unwrap();
    assert_eq!(last["error"]["type"], "upstream_error", "{text}");
}

#[tokio::test]
async fn a_stream_falls_over_before_the_first_byte() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let base = mock.base_url();
    let providers = format!(
        "  - {{name: broken, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-error-503, alias: smart}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: gemini, type: gemini, baseUrl: \"{base}\", models: [{{name: gemini-2.5-flash, alias: smart}}], keys: [{{secretRef: {{name: keys, key: c}}, rpm: 1000}}]}}\n"
    );
    let gw = Gateway::start(&manifests(&providers, ""), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    let r = chat(&gw, ask("smart", "hello", true)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-floodgate-provider"], "gemini");
    assert_eq!(r.headers()["x-floodgate-attempts"], "2");
    assert_eq!(
        events(&r.text().await.unwrap()).last().map(String::as_str),
        Some("[DONE]")
    );
}

#[tokio::test]
async fn bad_input_gets_openai_style_errors() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(&all_formats(&mock.base_url()), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    let url = format!("{}/v1/chat/completions", gw.url());
    let c = client();
    let r = c
        .post(&url)
        .body("{not json")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "invalid_json"
    );
    let r = chat(&gw, ask("no-such-model", "hi", false)).await;
    assert_eq!(r.status(), 404);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "model_not_found"
    );
    let r = chat(&gw, json!({"model": "gpt-4o", "messages": []})).await;
    assert_eq!(r.status(), 400);
    let huge = "x".repeat(5 << 20);
    let r = chat(&gw, ask("gpt-4o", &huge, false)).await;
    assert_eq!(r.status(), 413);
    assert_eq!(
        r.json::<Value>().await.unwrap()["error"]["code"],
        "request_too_large"
    );
    let r = chat(&gw, ask("gpt-error-400", "hi", false)).await;
    assert_eq!(r.status(), 404, "unknown to the gateway");
    assert_eq!(mock.counts().total(), 0, "nothing bad went upstream");
}

/// The gateway's `/metrics` text.
async fn scrape(gw: &Gateway) -> String {
    let r = client()
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The value of the first sample of `name` whose labels contain every `(key, value)`.
fn sample(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

#[tokio::test]
async fn metrics_count_requests_tokens_cost_and_upstream_latency() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let providers = format!(
        "  - {{name: priced, type: anthropic, baseUrl: \"{}\", models: [{{name: claude-metrics-test, inputPer1M: 3.0, outputPer1M: 15.0}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        mock.base_url()
    );
    let gw = Gateway::start(&manifests(&providers, ""), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    let before = scrape(&gw).await;
    let ok = [
        ("provider", "priced"),
        ("model", "claude-metrics-test"),
        ("outcome", "ok"),
    ];
    for stream in [false, true] {
        let r = chat(&gw, ask("claude-metrics-test", "price this please", stream)).await;
        assert_eq!(r.status(), 200);
        let _ = r.bytes().await;
    }
    let after = scrape(&gw).await;
    let delta = |name: &str, labels: &[(&str, &str)]| {
        sample(&after, name, labels) - sample(&before, name, labels)
    };
    assert_eq!(delta("floodgate_requests_total", &ok), 2.0, "{after}");
    let tokens = [
        ("gen_ai_request_model", "claude-metrics-test"),
        ("gen_ai_token_type", "output"),
    ];
    let output = delta("floodgate_tokens_total", &tokens);
    assert!(output > 0.0, "{after}");
    let input = delta(
        "floodgate_tokens_total",
        &[
            ("gen_ai_request_model", "claude-metrics-test"),
            ("gen_ai_token_type", "input"),
        ],
    );
    let cost = delta(
        "floodgate_cost_usd_total",
        &[("gen_ai_request_model", "claude-metrics-test")],
    );
    let expected = (input * 3.0 + output * 15.0) / 1e6;
    assert!((cost - expected).abs() < 1e-12, "cost {cost} != {expected}");
    assert_eq!(
        delta(
            "floodgate_upstream_duration_seconds_count",
            &[("provider", "priced"), ("outcome", "ok")]
        ),
        2.0
    );
    assert!(
        sample(
            &after,
            "floodgate_proxy_stage_seconds_count",
            &[("stage", "total_overhead")]
        ) >= 2.0
    );
    assert!(after.contains("gen_ai_server_time_to_first_token_seconds"));
    let _ = chat(&gw, ask("not-configured", "hi", false)).await;
    let last = scrape(&gw).await;
    assert!(
        sample(
            &last,
            "floodgate_requests_total",
            &[("model", "unknown"), ("outcome", "model_not_found")]
        ) >= 1.0
    );
    assert!(
        !last.contains("not-configured"),
        "unconfigured model names never become labels"
    );
    assert!(!last.contains("key-a"), "secrets never appear in metrics");
}

#[tokio::test]
async fn metrics_show_key_utilisation_failed_keys_and_open_circuits() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let base = mock.base_url();
    let providers = format!(
        "  - {{name: gauged, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-gauge-error-500, alias: gauge}}], keys: [{{name: gauge-key, secretRef: {{name: keys, key: a}}, rpm: 4}}, {{name: gauge-revoked, secretRef: {{name: keys, key: bad}}, rpm: 4}}]}}\n\
         \x20 - {{name: gauge-backup, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4, alias: gauge}}], keys: [{{name: backup-key, secretRef: {{name: keys, key: b}}, rpm: 4}}]}}\n"
    );
    let spec = "  circuitBreaker: {failureThreshold: 1, openSeconds: 600}\n  maxAttempts: 3\n";
    let gw = Gateway::start(&manifests(&providers, spec), MIN, Duration::from_secs(5))
        .await
        .unwrap();
    // First attempt: the revoked key (401, taken out) or the good key (500, circuit opens);
    // either way the request ends on the backup provider.
    for _ in 0..2 {
        let r = chat(&gw, ask("gauge", "hi", false)).await;
        assert_eq!(r.status(), 200);
    }
    let text = scrape(&gw).await;
    assert_eq!(
        sample(&text, "floodgate_circuit_state", &[("provider", "gauged")]),
        2.0,
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "floodgate_circuit_state",
            &[("provider", "gauge-backup")]
        ),
        0.0
    );
    assert_eq!(
        sample(
            &text,
            "floodgate_key_budget_utilization",
            &[("key", "backup-key")]
        ),
        0.5,
        "{text}"
    );
}

#[tokio::test]
async fn metrics_time_the_limiter_and_the_queue() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let providers = format!(
        "  - {{name: queued, type: openai, baseUrl: \"{}\", models: [{{name: gpt-queue-test}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1}}]}}\n",
        mock.base_url()
    );
    // One request per 400 ms window: the second request waits for the first one's slot.
    let window = Duration::from_millis(400);
    let gw = Gateway::start(&manifests(&providers, ""), window, Duration::from_secs(5))
        .await
        .unwrap();
    let count = |text: &str, stage: &str| {
        sample(
            text,
            "floodgate_proxy_stage_seconds_count",
            &[("stage", stage)],
        )
    };
    let sum = |text: &str, stage: &str| {
        sample(
            text,
            "floodgate_proxy_stage_seconds_sum",
            &[("stage", stage)],
        )
    };
    let before = scrape(&gw).await;
    for _ in 0..2 {
        let r = chat(&gw, ask("gpt-queue-test", "wait your turn", false)).await;
        assert_eq!(r.status(), 200);
    }
    let after = scrape(&gw).await;
    // At least one pick per request (a wake-up may pick again).
    assert!(
        count(&after, "limiter") - count(&before, "limiter") >= 2.0,
        "{after}"
    );
    // The second request waited, for most of a window.
    assert!(
        count(&after, "queue") - count(&before, "queue") >= 1.0,
        "{after}"
    );
    let waited = sum(&after, "queue") - sum(&before, "queue");
    assert!(waited >= 0.2, "queued {waited} s: {after}");
}

#[tokio::test]
async fn a_target_that_refuses_a_field_costs_no_budget_and_the_next_one_serves() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let base = mock.base_url();
    let providers = format!(
        "  - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4, alias: smart}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 2}}]}}\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o, alias: smart}}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n"
    );
    let gw = Gateway::start(
        &manifests(&providers, "  fallback: [claude, openai]\n"),
        MIN,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    for i in 0..3 {
        // Anthropic takes temperatures up to 1: refused there before anything is sent.
        let mut body = ask("smart", &format!("q{i}"), false);
        body["temperature"] = json!(1.5);
        let r = chat(&gw, body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-floodgate-provider"], "openai");
        assert_eq!(r.headers()["x-floodgate-attempts"], "1");
    }
    let view = gw.dispatcher.view();
    let claude = view
        .runtime
        .providers
        .iter()
        .find(|p| &*p.name == "claude")
        .unwrap();
    let used = claude.keys[0].budget.used(tokio::time::Instant::now());
    assert_eq!(used, 0, "no slot spent on requests never sent");
    assert_eq!(mock.counts().provider_total(Provider::Anthropic), 0);
    // Only Claude: the refusal is the answer, a 400 naming the field.
    let mut body = ask("claude-sonnet-4", "q", false);
    body["temperature"] = json!(1.5);
    let r = chat(&gw, body).await;
    assert_eq!(r.status(), 400);
    let error: Value = r.json().await.unwrap();
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("temperature"),
        "{error}"
    );
}
