//! Hybrid routing against the mock providers: prompt classes and the rule that routes them
//! (`x-floodgate-class`, `x-floodgate-route`), a local model behind the Ollama API, spill-over
//! of paid tiers on the local queue and latency while batch tiers wait, cross-pool fallback,
//! cost against known prices, and budget refusal.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{Fault, MockConfig, MockProviders, Provider};
use serde_json::{Value, json};
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

/// Knobs of the test configuration.
struct Setup {
    /// The local model's tag at the Ollama mock (`slow-<ms>` makes it slow).
    local_model: &'static str,
    /// `ollama.numParallel` of the LocalModelDeployment (one replica).
    parallel: u32,
    /// `autoscaling.queueDepth`.
    queue_depth: u32,
    /// `autoscaling.latencyMs`.
    latency_ms: u32,
    /// The first pool of the `fallback` rule's chain serves this model.
    broken_model: &'static str,
    /// `budgets:` of the RoutingPolicy, as YAML lines under it.
    budgets: &'static str,
    /// The batch tier `free`'s `maxWaitMs`.
    free_wait_ms: u32,
    /// Manifests appended (e.g. a CachePolicy), each starting with `---`.
    extra: &'static str,
}

impl Default for Setup {
    fn default() -> Self {
        Self {
            local_model: "llama3.1:8b",
            parallel: 4,
            queue_depth: 100,
            latency_ms: 60_000,
            broken_model: "error-503",
            budgets: "",
            free_wait_ms: 20_000,
            extra: "",
        }
    }
}

fn manifests(base: &str, s: &Setup) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{a: key-a, b: key-b}}
---
apiVersion: v1
kind: Secret
metadata: {{name: clients}}
stringData: {{acme: client-acme, freeco: client-free}}
---
apiVersion: floodgate.dev/v1alpha1
kind: LocalModelDeployment
metadata:
  name: llama
  annotations: {{floodgate.dev/endpoint: "{base}"}}
spec:
  model: "llama3.1:8b"
  classes: [simple]
  replicas: 1
  ollama: {{numParallel: {parallel}}}
  autoscaling: {{minReplicas: 1, maxReplicas: 2, queueDepth: {queue_depth}, latencyMs: {latency_ms}}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: local}}
spec:
  providers:
  - {{name: llama, type: ollama, localModel: llama, models: [{{name: "{local_model}"}}]}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: premium}}
spec:
  providers:
  - name: openai
    type: openai
    baseUrl: "{base}"
    models: [{{name: gpt-4o, alias: smart, inputPer1M: 2.5, outputPer1M: 10}}]
    keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: broken}}
spec:
  providers:
  - name: claude
    type: anthropic
    baseUrl: "{base}"
    models: [{{name: "{broken_model}", alias: sturdy, inputPer1M: 3, outputPer1M: 15}}]
    keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {{name: tiers}}
spec:
  defaultTier: pro
  tiers:
  - {{name: pro, class: standard, maxWaitMs: 10000, async: {{}}}}
  - {{name: free, class: batch, maxWaitMs: {free_wait_ms}, batch: {{size: 1, intervalSeconds: 1}}}}
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: acme}}
spec:
  tier: pro
  keys: [{{name: main, secretRef: {{name: clients, key: acme}}}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: freeco}}
spec:
  tier: free
  keys: [{{name: main, secretRef: {{name: clients, key: freeco}}}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: RoutingPolicy
metadata: {{name: routes}}
spec:
  premiumPool: premium
  rules:
  - name: fallback
    match: {{models: [sturdy]}}
    targets: [{{pool: broken}}, {{pool: premium, model: smart}}]
  - name: simple-local
    match: {{classes: [simple]}}
    targets: [{{localModel: llama}}, {{pool: premium, model: smart}}]
  - name: code-premium
    match: {{classes: [code], tiers: [pro]}}
    targets: [{{pool: premium}}]
  - name: complex-local-only
    match: {{classes: [complex], tiers: [free]}}
    targets: [{{localModel: llama}}]
  - name: medium-local
    match: {{classes: [medium], tiers: [free]}}
    targets: [{{localModel: llama}}, {{pool: premium, model: smart}}]
  budgets:
{budgets}{extra}"#,
        extra = s.extra,
        parallel = s.parallel,
        queue_depth = s.queue_depth,
        latency_ms = s.latency_ms,
        local_model = s.local_model,
        broken_model = s.broken_model,
        free_wait_ms = s.free_wait_ms,
        budgets = if s.budgets.is_empty() {
            "    alertAt: 0.8\n"
        } else {
            s.budgets
        },
    )
}

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn chat(gw: &Gateway, key: &str, model: &str, text: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": text}]}))
        .send()
        .await
        .unwrap()
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map_or("", |v| v.to_str().unwrap_or(""))
}

/// The admin token of the gateways of these tests (`--admin-token`).
const ADMIN_TOKEN: &str = "admin-secret";

async fn start(s: &Setup) -> (MockProviders, Gateway) {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start_configured(
        &manifests(&mock.base_url(), s),
        floodgate_proxy::route::Dispatcher::new(MIN, Duration::from_secs(10)).unwrap(),
        |state| {
            state.admin_token = Some(floodgate_proxy::secret::SecretString::new(ADMIN_TOKEN));
        },
    )
    .await
    .unwrap();
    (mock, gw)
}

/// A gateway on `setup` whose doors may hand requests to jobs (kept in memory).
async fn with_jobs(mock: &MockProviders, setup: &Setup) -> Gateway {
    Gateway::start_configured(
        &manifests(&mock.base_url(), setup),
        floodgate_proxy::route::Dispatcher::new(MIN, Duration::from_secs(10)).unwrap(),
        |state| {
            state.jobs = Some(floodgate_proxy::jobs::Jobs::new(
                floodgate_proxy::jobs::Store::Memory(
                    floodgate_proxy::jobs::memory::MemoryStore::new(),
                ),
                1,
                false,
            ));
        },
    )
    .await
    .unwrap()
}

const LONG_PROSE: &str = "Tell me about the history of the city of Lyon, its food, its rivers \
                          and the people who lived there in the middle ages, at some length.";

#[tokio::test]
async fn classes_route_by_rule_to_the_local_model_and_premium() {
    let (mock, gw) = start(&Setup::default()).await;
    // Simple -> the local model over the Ollama API.
    let r = chat(&gw, "client-acme", "smart", "What is 2+2?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-class"), "simple");
    assert_eq!(header(&r, "x-floodgate-route"), "simple-local");
    assert_eq!(header(&r, "x-floodgate-provider"), "llama");
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    // The local model has no price: it costs nothing.
    assert_eq!(header(&r, "x-floodgate-cost-usd"), "0.00000000");
    assert_eq!(mock.counts().provider_total(Provider::Ollama), 1);

    // Code from a pro tenant -> the premium pool by rule.
    let r = chat(
        &gw,
        "client-acme",
        "smart",
        "```\nfn main() {}\n```\nwhat does it do",
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-class"), "code");
    assert_eq!(header(&r, "x-floodgate-route"), "code-premium");
    assert_eq!(header(&r, "x-floodgate-provider"), "openai");

    // Medium matches no rule -> by model name; cost at gpt-4o's prices (2.5 / 10 per 1M).
    let r = chat(&gw, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-class"), "medium");
    assert_eq!(header(&r, "x-floodgate-route"), "by-model");
    let cost: f64 = header(&r, "x-floodgate-cost-usd").parse().unwrap();
    let body: Value = r.json().await.unwrap();
    let input = body["usage"]["prompt_tokens"].as_f64().unwrap();
    let output = body["usage"]["completion_tokens"].as_f64().unwrap();
    let expected = (input * 2.5 + output * 10.0) / 1e6;
    assert!(expected > 0.0);
    assert!((cost - expected).abs() < 1e-8, "{cost} vs {expected}");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 2);
    assert_eq!(mock.counts().provider_total(Provider::Ollama), 1);

    // The Anthropic door classifies and routes the same way.
    let r = client()
        .post(format!("{}/v1/messages", gw.url()))
        .header("x-api-key", "client-acme")
        .header("anthropic-version", "2023-06-01")
        .json(&json!({"model": "smart", "max_tokens": 64,
                      "messages": [{"role": "user", "content": "What is 3+3?"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-class"), "simple");
    assert_eq!(header(&r, "x-floodgate-route"), "simple-local");
    assert_eq!(header(&r, "x-floodgate-provider"), "llama");
    assert_eq!(mock.counts().provider_total(Provider::Ollama), 2);

    // Code from a free tenant matches no rule (code-premium is for pro).
    let r = chat(&gw, "client-free", "smart", "def f(x):\n  return x").await;
    assert_eq!(header(&r, "x-floodgate-class"), "code");
    assert_eq!(header(&r, "x-floodgate-route"), "by-model");

    // The metrics name the classes, rules, steps and savings.
    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("floodgate_requests_classified_total{class=\"simple\"}"));
    assert!(metrics.contains(
        "floodgate_routing_requests_total{rule=\"simple-local\",target=\"local:llama\"}"
    ));
    assert!(metrics.contains("floodgate_cost_savings_usd_total{tenant=\"acme\"}"));
    assert!(metrics.contains("floodgate_local_model_in_flight{local_model=\"default/llama\"}"));

    // The capacity report needs the admin token: none, or a tenant's key, is refused.
    let capacity = format!("{}/admin/capacity", gw.admin_url());
    let r = client().get(&capacity).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = client()
        .get(&capacity)
        .bearer_auth("client-acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    // With it: 2 of 5 answers came from the local model.
    let r = client()
        .get(&capacity)
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["requests"], 5);
    assert_eq!(report["local_share"], 0.4);
    assert_eq!(report["raw_rpm"]["total"], 2000, "{report}");
    assert_eq!(report["raw_rpm"]["pools"]["premium"], 1000);
    // No cache in this configuration: nothing answered by it or by dedup.
    assert_eq!(report["cache_share"], 0.0);
    assert_eq!(report["dedup_share"], 0.0);
    let effective = report["effective_rpm"].as_f64().unwrap();
    assert!((effective - 2000.0 / 0.6).abs() < 1e-6, "{report}");
}

#[tokio::test]
async fn a_failing_pool_falls_over_to_the_next_pool_of_the_chain() {
    let (mock, gw) = start(&Setup::default()).await;
    let r = chat(&gw, "client-acme", "sturdy", LONG_PROSE).await;
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    assert_eq!(header(&r, "x-floodgate-route"), "fallback");
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(chain.starts_with("pool:broken="), "{chain}");
    assert!(chain.ends_with(",pool:premium=ok"), "{chain}");
    assert_eq!(header(&r, "x-floodgate-provider"), "openai");
    assert!(mock.counts().provider_total(Provider::Anthropic) >= 1);
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
}

/// A step that is not the last must begin answering by its deadline: a first pool that
/// hangs (answers after 5 s) costs the step's share of a 1 s wait, then the next pool
/// answers; the request is not held for the pool's `requestSeconds`.
/// A local model served over the OpenAI-compatible API (vLLM, or Ollama's `/v1`): the
/// LocalModelDeployment's endpoint with the OpenAI wire format, no key.
#[tokio::test]
async fn a_local_model_answers_over_the_openai_compatible_api() {
    let mock = MockProviders::start(MockConfig {
        allow_missing_key: true,
        ..MockConfig::default()
    })
    .await
    .unwrap();
    let yaml = manifests(&mock.base_url(), &Setup::default()).replace(
        "{name: llama, type: ollama, localModel: llama",
        "{name: llama, type: openai-compatible, localModel: llama",
    );
    assert!(yaml.contains("type: openai-compatible"));
    let gw = Gateway::start(&yaml, MIN, Duration::from_secs(10))
        .await
        .unwrap();
    let r = chat(&gw, "client-acme", "smart", "What is 2+2?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    assert_eq!(header(&r, "x-floodgate-provider"), "llama");
    let counts = mock.counts();
    assert_eq!(counts.provider_total(Provider::Ollama), 0);
    assert_eq!(counts.provider_total(Provider::OpenAi), 1);
}

#[tokio::test]
async fn a_hung_pool_costs_only_its_steps_share_of_the_wait() {
    let (mock, gw) = start(&Setup {
        broken_model: "slow-5000",
        ..Setup::default()
    })
    .await;
    let started = std::time::Instant::now();
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth("client-acme")
        .header("x-floodgate-max-wait-ms", "1000")
        .json(&json!({"model": "sturdy", "messages": [{"role": "user", "content": LONG_PROSE}]}))
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "pool:broken=step_deadline,pool:premium=ok"
    );
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(took >= Duration::from_millis(500), "took {took:?}");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
}

#[tokio::test]
async fn without_a_healthy_pool_left_the_last_error_is_the_answer() {
    let (_mock, gw) = start(&Setup {
        broken_model: "error-400",
        ..Setup::default()
    })
    .await;
    // A 400 is the request's fault: no other pool is tried.
    let r = chat(&gw, "client-acme", "sturdy", LONG_PROSE).await;
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-floodgate-chain"), "pool:broken=bad_request");
    assert_eq!(header(&r, "x-floodgate-route"), "fallback");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paid_tiers_spill_over_when_the_local_queue_is_full_and_batch_tiers_wait() {
    let (mock, gw) = start(&Setup {
        local_model: "slow-800",
        parallel: 1,
        queue_depth: 1,
        ..Setup::default()
    })
    .await;
    let gw = std::sync::Arc::new(gw);
    // One call in flight, one waiting: the local queue is at its threshold, not past it
    // (as the operator's scale-up reads it), and a paid request still queues.
    let first = tokio::spawn({
        let gw = gw.clone();
        async move { chat(&gw, "client-acme", "smart", "hi one").await }
    });
    wait_for(&gw, |d| d.in_flight == 1).await;
    let second = tokio::spawn({
        let gw = gw.clone();
        async move { chat(&gw, "client-acme", "smart", "hi two").await }
    });
    wait_for(&gw, |d| d.queue_depth == 1).await;
    let third = tokio::spawn({
        let gw = gw.clone();
        async move { chat(&gw, "client-acme", "smart", "hi two and a half").await }
    });
    // Two waiting: past the threshold of one.
    wait_for(&gw, |d| d.queue_depth == 2).await;
    // A paid tier spills over to premium at once.
    let r = chat(&gw, "client-acme", "smart", "hi three").await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "local:llama=spill_queue,pool:premium=ok"
    );
    assert_eq!(header(&r, "x-floodgate-provider"), "openai");
    // A batch tier waits for the local model instead.
    let r = chat(&gw, "client-free", "smart", "hi four").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    for task in [first, second, third] {
        let r = task.await.unwrap();
        assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    }
    assert_eq!(mock.counts().provider_total(Provider::Ollama), 4);
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_tier_waits_for_the_local_model_past_its_steps_share_of_the_wait() {
    // free waits up to 4 s; its chain (local, then premium) would give the local step an
    // equal share, 2 s. The local model answers one call at a time, in 1.5 s each.
    let (mock, gw) = start(&Setup {
        local_model: "slow-1500",
        parallel: 1,
        free_wait_ms: 4000,
        ..Setup::default()
    })
    .await;
    let gw = std::sync::Arc::new(gw);
    let mut ahead = Vec::new();
    for i in 0..2u64 {
        ahead.push(tokio::spawn({
            let gw = gw.clone();
            async move { chat(&gw, "client-free", "smart", &format!("hi {i}")).await }
        }));
        wait_for(&gw, move |d| d.in_flight + d.queue_depth == i + 1).await;
    }
    // Two calls ahead: its slot comes after about 3 s, past the 2 s share, within the 4 s.
    let r = chat(&gw, "client-free", "smart", "hi last").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    for task in ahead {
        assert_eq!(task.await.unwrap().status(), 200);
    }
    assert_eq!(
        mock.counts().provider_total(Provider::OpenAi),
        0,
        "a batch tier spilled"
    );
}

#[tokio::test]
async fn paid_tiers_spill_over_when_local_latency_passes_the_threshold() {
    let (mock, gw) = start(&Setup {
        local_model: "slow-300",
        latency_ms: 200,
        ..Setup::default()
    })
    .await;
    let r = chat(&gw, "client-acme", "smart", "hi").await;
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    // Its 300 ms passed the 200 ms threshold: the next paid request spills over.
    let r = chat(&gw, "client-acme", "smart", "hi again").await;
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "local:llama=spill_latency,pool:premium=ok"
    );
    assert_eq!(mock.counts().provider_total(Provider::Ollama), 1);
}

/// A 400 from the local model is the request's fault: the model answered, and the next
/// paid request is still sent to it (counted as a failure, it would pass the latency
/// threshold and every paid tier would spill).
#[tokio::test]
async fn a_callers_bad_request_does_not_count_as_the_local_model_failing() {
    let (mock, gw) = start(&Setup::default()).await;
    mock.set_fault(Provider::Ollama, Fault::Status(400));
    let r = chat(&gw, "client-acme", "smart", "What is 2+2?").await;
    assert_eq!(r.status(), 400);
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=bad_request");
    mock.clear_fault(Provider::Ollama);
    let r = chat(&gw, "client-acme", "smart", "What is 3+3?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-chain"), "local:llama=ok");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 0);
}

#[tokio::test]
async fn a_failing_local_call_counts_as_latency_for_spill_over() {
    // The local model fails after 300 ms (a 503 from Ollama): the failure is observed as a
    // 300 ms call, past the 200 ms threshold, so the next paid request spills at once.
    let (mock, gw) = start(&Setup {
        local_model: "slow-300-error-503",
        latency_ms: 200,
        ..Setup::default()
    })
    .await;
    let r = chat(&gw, "client-acme", "smart", "hi").await;
    assert_eq!(r.status(), 200);
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(
        chain.starts_with("local:llama=") && chain.ends_with(",pool:premium=ok"),
        "{chain}"
    );
    let ollama = mock.counts().provider_total(Provider::Ollama);
    let r = chat(&gw, "client-acme", "smart", "hi again").await;
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "local:llama=spill_latency,pool:premium=ok"
    );
    assert_eq!(mock.counts().provider_total(Provider::Ollama), ollama);
}

#[tokio::test]
async fn a_local_model_is_not_sent_classes_it_does_not_take() {
    // llama takes `classes: [simple]`; the rule `medium-local` would send it medium prompts.
    let (mock, gw) = start(&Setup::default()).await;
    let r = chat(&gw, "client-free", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-class"), "medium");
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "local:llama=class_not_served,pool:premium=ok"
    );
    assert_eq!(mock.counts().provider_total(Provider::Ollama), 0);
}

#[tokio::test]
async fn a_rule_without_a_usable_target_answers_503_with_retry_after() {
    // The rule's only target is skipped (a class its local model does not take): nothing
    // was tried, and the caller is told when to come back.
    let (_mock, gw) = start(&Setup::default()).await;
    let r = chat(&gw, "client-free", "smart", "First plan it, then build it.").await;
    assert_eq!(r.status(), 503);
    assert_eq!(header(&r, "x-floodgate-route"), "complex-local-only");
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "local:llama=class_not_served"
    );
    assert_eq!(header(&r, "retry-after"), "10");
}

#[tokio::test]
async fn requests_no_rule_matches_keep_the_pools_budgets() {
    // A medium prompt of the pro tier matches no rule: routed by model to premium, whose
    // budget its first answer spends.
    let (mock, gw) = start(&Setup {
        budgets: "    alertAt: 0.5\n    pools: [{name: premium, monthlyUSD: 0.000001}]\n",
        ..Setup::default()
    })
    .await;
    let r = chat(&gw, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-route"), "by-model");
    let r = chat(&gw, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
}

#[tokio::test]
async fn requests_no_rule_matches_are_answered_by_a_pool_with_budget_left() {
    // gpt-4o is served by two pools (premium's OpenAI, broken's Claude), each with a budget
    // its first answer spends; a medium prompt of the pro tier matches no rule.
    let (mock, gw) = start(&Setup {
        budgets: "    alertAt: 0.5\n    pools: [{name: premium, monthlyUSD: 0.000001}, {name: broken, monthlyUSD: 0.000001}]\n",
        broken_model: "gpt-4o",
        ..Setup::default()
    })
    .await;
    let first = chat(&gw, "client-acme", "gpt-4o", LONG_PROSE).await;
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "x-floodgate-route"), "by-model");
    let first = header(&first, "x-floodgate-provider").to_owned();
    // The pool that answered is spent: the other one answers, and is charged.
    let second = chat(&gw, "client-acme", "gpt-4o", LONG_PROSE).await;
    assert_eq!(second.status(), 200);
    let second = header(&second, "x-floodgate-provider").to_owned();
    assert_ne!(first, second, "a spent pool answered again");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
    assert_eq!(mock.counts().provider_total(Provider::Anthropic), 1);
    // Both are spent now: refused without a call.
    let r = chat(&gw, "client-acme", "gpt-4o", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
    assert_eq!(mock.counts().provider_total(Provider::Anthropic), 1);
}

#[tokio::test]
async fn a_spent_tenant_budget_is_refused_with_429_and_a_spent_pool_is_skipped() {
    let (mock, gw) = start(&Setup {
        budgets: "    alertAt: 0.5\n    tenants: [{name: acme, monthlyUSD: 0.000001}]\n    pools: [{name: broken, monthlyUSD: 0.000001}]\n",
        broken_model: "claude-sonnet-4",
        ..Setup::default()
    })
    .await;
    // freeco has no budget; its first call spends the broken pool's budget.
    let r = chat(&gw, "client-free", "sturdy", LONG_PROSE).await;
    assert_eq!(header(&r, "x-floodgate-chain"), "pool:broken=ok");
    let r = chat(&gw, "client-free", "sturdy", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        header(&r, "x-floodgate-chain"),
        "pool:broken=over_budget,pool:premium=ok"
    );
    // acme's first request spends more than its budget; the next is refused.
    let r = chat(&gw, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    let r = chat(&gw, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 2);
    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("floodgate_cost_budget_alert{scope=\"tenant\",name=\"acme\"} 1"));
}

/// A replica of the gateway sharing budgets (and monthly spending) through `redis`.
async fn shared_replica(yaml: &str, redis: &floodgate_e2e::redis::RedisServer) -> Gateway {
    let shared = floodgate_proxy::budget::SharedOptions::new(
        floodgate_proxy::secret::SecretString::new(redis.url()),
    );
    let opts = floodgate_proxy::route::DispatcherOptions::new(MIN, Duration::from_secs(10))
        .with_redis(shared);
    let dispatcher = floodgate_proxy::route::Dispatcher::with_options(opts).unwrap();
    Gateway::start_with(yaml, dispatcher).await.unwrap()
}

/// With Redis the month's spending is one total for every replica: what one replica spent
/// is refused by the others, and by a replica started later (a restart, a rollout).
#[tokio::test]
async fn replicas_on_one_redis_share_a_monthly_budget() {
    let redis = floodgate_e2e::redis::RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let yaml = manifests(
        &mock.base_url(),
        &Setup {
            budgets: "    tenants: [{name: acme, monthlyUSD: 0.000001}]\n",
            ..Setup::default()
        },
    );
    let a = shared_replica(&yaml, &redis).await;
    let b = shared_replica(&yaml, &redis).await;
    // A's answer spends more than acme's budget.
    let r = chat(&a, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    // B has served acme nothing: it refuses by the total A wrote.
    let r = chat(&b, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    let r = chat(&a, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    let c = shared_replica(&yaml, &redis).await;
    let r = chat(&c, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    // Other tenants are not held to acme's budget (freeco's prompt, which the local model
    // does not take, goes to premium too).
    let r = chat(&b, "client-free", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 200);
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 2);
}

#[tokio::test]
async fn a_stream_without_usage_still_spends_the_tenants_budget() {
    let (mock, gw) = start(&Setup {
        budgets: "    tenants: [{name: acme, monthlyUSD: 0.000001}]\n",
        ..Setup::default()
    })
    .await;
    // Streamed, without `stream_options.include_usage`: the caller sees no usage, but the
    // provider's count (asked for by the gateway) is what the request costs.
    let r = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth("client-acme")
        .json(&json!({"model": "smart", "stream": true,
                      "messages": [{"role": "user", "content": LONG_PROSE}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert!(
        !body.contains("\"usage\":{"),
        "usage shown to a caller who did not ask: {body}"
    );
    let r = chat(&gw, "client-acme", "smart", LONG_PROSE).await;
    assert_eq!(r.status(), 429);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "budget_exceeded");
    assert_eq!(mock.counts().provider_total(Provider::OpenAi), 1);
}

async fn wait_for(
    gw: &Gateway,
    cond: impl Fn(&floodgate_proxy::routing::local::LocalDemand) -> bool,
) {
    for _ in 0..500 {
        let demand = gw.dispatcher.routing().gates.demand();
        if demand.iter().any(&cond) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let demand = gw.dispatcher.routing().gates.demand();
    assert!(
        demand.iter().any(&cond),
        "the local model's demand never reached the condition: {demand:?}"
    );
}

fn health_pool(base: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: p}}\nspec:\n\
         \x20 healthCheck: {{intervalSeconds: 5}}\n\
         \x20 circuitBreaker: {{failureThreshold: 1, openSeconds: 3600}}\n  maxAttempts: 1\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], \
         keys: [{{name: a, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n"
    )
}

#[tokio::test]
async fn a_health_probe_closes_an_open_circuit_and_restores_a_refused_key() {
    use floodgate_e2e::mock::Fault;
    use floodgate_proxy::route::breaker::Circuit;
    use floodgate_proxy::routing::health;
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(&health_pool(&mock.base_url()), MIN, Duration::from_secs(2))
        .await
        .unwrap();
    let ask = || async { chat(&gw, "", "gpt-4o", "hi").await.status() };
    let http = client();
    // A 503 opens the circuit for an hour; the provider is well again, but unused.
    mock.set_fault(Provider::OpenAi, Fault::Status(503));
    assert_eq!(ask().await, 503);
    mock.clear_fault(Provider::OpenAi);
    assert_ne!(ask().await, 200);
    // While it is down the probe fails and the circuit stays open.
    mock.set_fault(Provider::OpenAi, Fault::Status(500));
    let round = health::probe_once(&gw.dispatcher.view(), &http).await;
    assert_eq!((round.probed, round.circuits_half_opened), (1, 0));
    assert_ne!(ask().await, 200);
    mock.clear_fault(Provider::OpenAi);
    let round = health::probe_once(&gw.dispatcher.view(), &http).await;
    assert_eq!((round.probed, round.circuits_half_opened), (1, 1));
    // A listing that answers does not prove chat calls: half-open, and the next live
    // request, as its probe, closes it.
    let circuit = || {
        gw.dispatcher.view().runtime.providers[0]
            .breaker
            .circuit(tokio::time::Instant::now())
    };
    assert_eq!(circuit(), Circuit::HalfOpen);
    assert_eq!(ask().await, 200);
    assert_eq!(circuit(), Circuit::Closed);
    // A 401 takes the key out; a probe that the provider answers puts it back.
    mock.set_fault(Provider::OpenAi, Fault::Status(401));
    assert_eq!(ask().await, 502);
    mock.clear_fault(Provider::OpenAi);
    assert_ne!(ask().await, 200);
    let round = health::probe_once(&gw.dispatcher.view(), &http).await;
    assert_eq!(round.keys_restored, 1);
    assert_eq!(ask().await, 200);
    // Nothing left to probe.
    assert_eq!(
        health::probe_once(&gw.dispatcher.view(), &http)
            .await
            .probed,
        0
    );
    // A 403 (no access) takes the key out for good: a listing cannot prove it, so it is
    // neither probed nor put back.
    mock.set_fault(Provider::OpenAi, Fault::Status(403));
    assert_ne!(ask().await, 200);
    mock.clear_fault(Provider::OpenAi);
    let round = health::probe_once(&gw.dispatcher.view(), &http).await;
    assert_eq!((round.probed, round.keys_restored), (0, 0));
    assert_ne!(ask().await, 200);
}

#[tokio::test]
async fn an_open_circuit_is_probed_with_a_key_that_is_not_refused() {
    use floodgate_proxy::routing::health;
    // The mock accepts key-b only: key-a is refused.
    let mock = MockProviders::start(MockConfig::default().with_valid_keys(["key-b"]))
        .await
        .unwrap();
    let yaml = health_pool(&mock.base_url())
        .replace("stringData: {a: key-a}", "stringData: {a: key-a, b: key-b}")
        .replace(
            "keys: [{name: a, secretRef: {name: keys, key: a}, rpm: 1000}]",
            "keys: [{name: a, secretRef: {name: keys, key: a}, rpm: 1000}, {name: b, secretRef: {name: keys, key: b}, rpm: 1000}]",
        );
    let gw = Gateway::start(&yaml, MIN, Duration::from_secs(2))
        .await
        .unwrap();
    let view = gw.dispatcher.view();
    let provider = &view.runtime.providers[0];
    assert_eq!(provider.keys.len(), 2);
    // Key a (the first) is out after a 401, and the circuit is open.
    provider.keys[0].budget.fail_unauthenticated();
    provider.breaker.failure(tokio::time::Instant::now());
    let round = health::probe_once(&view, &client()).await;
    // Key a's own probe fails; the circuit's goes with key b and answers.
    assert_eq!(round.probed, 2);
    assert_eq!((round.circuits_half_opened, round.keys_restored), (1, 0));
    assert_eq!(chat(&gw, "", "gpt-4o", "hi").await.status(), 200);
}

fn three_keys(base: &str, rpm: u32) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b, c: key-c}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: p}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], keys: [\
         {{name: a, secretRef: {{name: keys, key: a}}, rpm: {rpm}}}, \
         {{name: b, secretRef: {{name: keys, key: b}}, rpm: {rpm}}}, \
         {{name: c, secretRef: {{name: keys, key: c}}, rpm: {rpm}}}]}}\n"
    )
}

async fn with_prefix(gw: &Gateway, prefix: &str, question: &str) -> reqwest::Response {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .json(&json!({"model": "gpt-4o", "messages": [
            {"role": "system", "content": prefix},
            {"role": "user", "content": question}
        ]}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn requests_sharing_a_long_prefix_land_on_the_key_that_served_it() {
    use floodgate_proxy::route::Dispatcher;
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start_naming_keys(
        &three_keys(&mock.base_url(), 1000),
        Dispatcher::new(MIN, Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    // Five system prompts of ~5,000 characters, each asked 10 different questions,
    // interleaved: least-loaded alone spreads each prefix over the three keys (five is
    // prime to three, so no prefix keeps a key by chance).
    let prefixes: Vec<String> = (0..5)
        .map(|i| {
            format!(
                "You are assistant {i}. {}",
                "Follow the house style. ".repeat(220)
            )
        })
        .collect();
    let mut first: Vec<Option<String>> = vec![None; prefixes.len()];
    let (mut affine, mut repeated) = (0u32, 0u32);
    for round in 0..10 {
        for (i, prefix) in prefixes.iter().enumerate() {
            let r = with_prefix(&gw, prefix, &format!("question {round}")).await;
            assert_eq!(r.status(), 200);
            let key = header(&r, "x-floodgate-key").to_owned();
            match &first[i] {
                None => first[i] = Some(key),
                Some(k) => {
                    repeated += 1;
                    affine += u32::from(*k == key);
                }
            }
        }
    }
    let share = f64::from(affine) / f64::from(repeated);
    println!("affine share: {affine}/{repeated} = {share:.2}");
    assert_eq!(affine, repeated, "every repeat landed on its prefix's key");
}

/// A pool of three providers, one key each, taking turns (`strategy: weighted`).
fn three_providers(base: &str) -> String {
    let provider = |name: &str| {
        format!(
            "\x20 - {{name: {name}, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], \
             keys: [{{name: {name}-key, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n"
        )
    };
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: p}}\nspec:\n\
         \x20 strategy: weighted\n  providers:\n{}{}{}",
        provider("one"),
        provider("two"),
        provider("three")
    )
}

/// Affinity holds across a pool's providers: the provider that served a prefix is tried
/// first for its repeats, although the pool's strategy takes the providers in turn.
#[tokio::test]
async fn a_prefix_stays_with_its_provider_in_a_pool_of_several() {
    use floodgate_proxy::route::Dispatcher;
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start_naming_keys(
        &three_providers(&mock.base_url()),
        Dispatcher::new(MIN, Duration::from_secs(5)).unwrap(),
    )
    .await
    .unwrap();
    // Five prefixes, interleaved: turns alone would move each prefix (five is prime to
    // three providers).
    let prefixes: Vec<String> = (0..5)
        .map(|i| format!("You are assistant {i}. {}", "Keep it short. ".repeat(300)))
        .collect();
    let mut first: Vec<Option<String>> = vec![None; prefixes.len()];
    let (mut affine, mut repeated) = (0u32, 0u32);
    for round in 0..6 {
        for (i, prefix) in prefixes.iter().enumerate() {
            let r = with_prefix(&gw, prefix, &format!("question {round}")).await;
            assert_eq!(r.status(), 200);
            let served = format!(
                "{}/{}",
                header(&r, "x-floodgate-provider"),
                header(&r, "x-floodgate-key")
            );
            match &first[i] {
                None => first[i] = Some(served),
                Some(s) => {
                    repeated += 1;
                    affine += u32::from(*s == served);
                }
            }
        }
    }
    println!("affine share across providers: {affine}/{repeated}");
    assert_eq!(
        affine, repeated,
        "every repeat landed on its prefix's provider and key"
    );
    let providers: std::collections::BTreeSet<&String> = first.iter().flatten().collect();
    assert!(
        providers.len() > 1,
        "the pool took the providers in turn: {providers:?}"
    );
}

#[tokio::test]
async fn a_busy_affine_key_gives_way_to_another() {
    use floodgate_proxy::route::Dispatcher;
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start_naming_keys(
        &three_keys(&mock.base_url(), 2),
        Dispatcher::new(MIN, Duration::from_secs(1)).unwrap(),
    )
    .await
    .unwrap();
    let prefix = "Follow the house style. ".repeat(220);
    let r = with_prefix(&gw, &prefix, "one").await;
    let affine = header(&r, "x-floodgate-key").to_owned();
    let r = with_prefix(&gw, &prefix, "two").await;
    assert_eq!(header(&r, "x-floodgate-key"), affine);
    // Its 2 RPM are spent: the next request takes another key at once, and that key
    // becomes the prefix's.
    let r = with_prefix(&gw, &prefix, "three").await;
    assert_eq!(r.status(), 200);
    let other = header(&r, "x-floodgate-key").to_owned();
    assert_ne!(other, affine);
    let r = with_prefix(&gw, &prefix, "four").await;
    assert_eq!(header(&r, "x-floodgate-key"), other);
}

/// A cache whose entries expire after 1 s and are kept an hour for stale answers, and a
/// template that answers questions about "status" only when everything else failed.
const DEGRADED_CACHE: &str = r#"---
apiVersion: floodgate.dev/v1alpha1
kind: CachePolicy
metadata: {name: cache}
spec:
  exact: {ttlSeconds: 1, staleSeconds: 3600}
  templates:
    ttlSeconds: 60
    items:
    - {name: busy, pattern: "(?is).*status.*", response: "We are very busy; see the status page.", when: degraded}
"#;

#[tokio::test]
async fn each_step_of_the_degradation_chain_answers_when_the_steps_above_it_fail() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let setup = Setup {
        broken_model: "claude-sonnet-4",
        extra: DEGRADED_CACHE,
        ..Setup::default()
    };
    let gw = with_jobs(&mock, &setup).await;
    let ask = |text: &'static str, prefer: bool| {
        let mut r = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth("client-acme")
            .json(&json!({"model": "sturdy", "messages": [{"role": "user", "content": text}]}));
        if prefer {
            r = r.header("prefer", "respond-async");
        }
        r.send()
    };
    // Healthy: the first pool answers, and its answer is stored.
    let r = ask("Where is my parcel?", false).await.unwrap();
    assert_eq!(header(&r, "x-floodgate-chain"), "pool:broken=ok");
    // The entry's 1 s TTL is on the gateway's real clock: look it up (storing nothing, so
    // the expired entry stays the one stale answer) until it is no longer a hit.
    let mut expired = false;
    for _ in 0..200 {
        let r = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth("client-acme")
            .header("cache-control", "no-store")
            .json(&json!({"model": "sturdy", "messages": [{"role": "user", "content": "Where is my parcel?"}]}))
            .send()
            .await
            .unwrap();
        if header(&r, "x-floodgate-cache") != "exact" {
            expired = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(expired, "the entry never expired");

    // 1. The first pool fails: the next pool answers.
    mock.set_fault(Provider::Anthropic, Fault::Status(503));
    let r = ask("And my invoice?", false).await.unwrap();
    assert_eq!(r.status(), 200);
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(chain.ends_with(",pool:premium=ok"), "{chain}");

    // 2. Every pool fails: the expired answer, marked stale.
    mock.set_fault(Provider::OpenAi, Fault::Status(503));
    let r = ask("Where is my parcel?", false).await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    assert_eq!(header(&r, "x-floodgate-cache"), "stale");
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(
        chain.starts_with("pool:broken=") && chain.ends_with(",stale=ok"),
        "{chain}"
    );
    let body: Value = r.json().await.unwrap();
    assert!(body["choices"][0]["message"]["content"].is_string());

    // 3. No stale answer for this one: the degraded template.
    let r = ask("What is the status of my refund?", false)
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-cache"), "template");
    assert!(header(&r, "x-floodgate-chain").ends_with(",template=ok"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["choices"][0]["message"]["content"],
        "We are very busy; see the status page."
    );

    // 4. No template matches: a caller that prefers it gets a job.
    let r = ask("Can I change my address?", true).await.unwrap();
    assert_eq!(r.status(), 202);
    assert!(header(&r, "location").starts_with("/v1/jobs/job_"));
    assert!(header(&r, "x-floodgate-chain").ends_with(",job=queued"));

    // 5. Otherwise the last error, with the time to come back.
    let r = ask("Can I change my address?", false).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"), "{:?}", r.headers());
    assert_eq!(header(&r, "x-floodgate-cache"), "miss");
}

/// A chain over every layer above the degradation steps: two keys and two providers in the
/// first pool, a second pool, then a local model.
fn layered(base: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{bad: key-invalid, good: key-good}}
---
apiVersion: v1
kind: Secret
metadata: {{name: clients}}
stringData: {{acme: client-acme}}
---
apiVersion: floodgate.dev/v1alpha1
kind: LocalModelDeployment
metadata:
  name: llama
  annotations: {{floodgate.dev/endpoint: "{base}"}}
spec: {{model: "llama3.1:8b", classes: [simple], replicas: 1}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: local}}
spec:
  providers:
  - {{name: llama, type: ollama, localModel: llama, models: [{{name: "llama3.1:8b"}}]}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: first}}
spec:
  providers:
  - name: claude
    type: anthropic
    baseUrl: "{base}"
    models: [{{name: claude-sonnet-4, alias: sturdy}}]
    keys: [{{name: bad, secretRef: {{name: keys, key: bad}}, rpm: 1000}}, {{name: good, secretRef: {{name: keys, key: good}}, rpm: 1000}}]
  - name: openai
    type: openai
    baseUrl: "{base}"
    models: [{{name: gpt-4o, alias: sturdy}}]
    keys: [{{secretRef: {{name: keys, key: good}}, rpm: 1000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: second}}
spec:
  providers:
  - name: gemini
    type: gemini
    baseUrl: "{base}"
    models: [{{name: gemini-2.5-flash, alias: sturdy}}]
    keys: [{{secretRef: {{name: keys, key: good}}, rpm: 1000}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: acme}}
spec:
  keys: [{{name: main, secretRef: {{name: clients, key: acme}}}}]
---
apiVersion: floodgate.dev/v1alpha1
kind: RoutingPolicy
metadata: {{name: routes}}
spec:
  rules:
  - name: layered
    match: {{models: [sturdy]}}
    targets: [{{pool: first}}, {{pool: second}}, {{localModel: llama}}]
"#
    )
}

/// The layers above the degradation steps, failed one by one: the next key (a refused key,
/// then the good one: two attempts), the next provider of the pool, the next pool, then
/// the local model.
#[tokio::test]
async fn the_chain_goes_from_key_to_provider_to_pool_to_the_local_model() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start_naming_keys(
        &layered(&mock.base_url()),
        floodgate_proxy::route::Dispatcher::new(MIN, Duration::from_secs(10)).unwrap(),
    )
    .await
    .unwrap();
    let ask = |text: &'static str| chat(&gw, "client-acme", "sturdy", text);
    // The first key is refused (401): the next key of the same provider answers.
    let r = ask("Where is my parcel?").await;
    assert_eq!(r.status(), 200, "{:?}", r.headers());
    assert_eq!(header(&r, "x-floodgate-provider"), "claude");
    assert_eq!(header(&r, "x-floodgate-key"), "good");
    assert_eq!(header(&r, "x-floodgate-attempts"), "2");
    assert_eq!(header(&r, "x-floodgate-chain"), "pool:first=ok");
    // The provider fails: the next provider of the pool.
    mock.set_fault(Provider::Anthropic, Fault::Status(503));
    let r = ask("And my invoice?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-provider"), "openai");
    assert_eq!(header(&r, "x-floodgate-chain"), "pool:first=ok");
    // The whole pool fails: the next pool.
    mock.set_fault(Provider::OpenAi, Fault::Status(503));
    let r = ask("Where is my refund?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-provider"), "gemini");
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(
        chain.starts_with("pool:first=") && chain.ends_with(",pool:second=ok"),
        "{chain}"
    );
    // Every pool fails: the local model.
    mock.set_fault(Provider::Gemini, Fault::Status(503));
    let r = ask("Can I change my address?").await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "x-floodgate-provider"), "llama");
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(chain.ends_with(",local:llama=ok"), "{chain}");
    assert_eq!(chain.matches("pool:").count(), 2, "{chain}");
}

/// The Anthropic door hands a request to a job as the OpenAI door does: past every target
/// and degradation step, for a caller sending `Prefer: respond-async`; without it, the
/// last error in Anthropic's format.
#[tokio::test]
async fn the_anthropic_door_hands_a_failed_request_to_a_job_when_the_caller_prefers_one() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let setup = Setup {
        broken_model: "claude-sonnet-4",
        ..Setup::default()
    };
    let gw = with_jobs(&mock, &setup).await;
    mock.set_fault(Provider::Anthropic, Fault::Status(503));
    mock.set_fault(Provider::OpenAi, Fault::Status(503));
    let ask = |prefer: bool| {
        let mut r = client()
            .post(format!("{}/v1/messages", gw.url()))
            .header("x-api-key", "client-acme")
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": "sturdy", "max_tokens": 64,
                          "messages": [{"role": "user", "content": LONG_PROSE}]}));
        if prefer {
            r = r.header("prefer", "respond-async");
        }
        r.send()
    };
    let r = ask(true).await.unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.headers());
    let location = header(&r, "location").to_owned();
    assert!(location.starts_with("/v1/jobs/job_"), "{location}");
    let chain = header(&r, "x-floodgate-chain").to_owned();
    assert!(
        chain.starts_with("pool:broken=") && chain.ends_with(",job=queued"),
        "{chain}"
    );
    let job: Value = r.json().await.unwrap();
    assert_eq!(job["object"], "job");
    // The job is the caller's, at the place the door gave.
    let got = client()
        .get(format!("{}{location}", gw.url()))
        .header("x-api-key", "client-acme")
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);
    let got: Value = got.json().await.unwrap();
    assert_eq!(got["id"], job["id"]);
    // Without the preference: the last error, in Anthropic's shape.
    let r = ask(false).await.unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["type"], "error", "{body}");
}

/// Only a tier with asynchronous delivery (`tiers[].async`, here `pro`) may have a failed
/// request handed to a job: `free` has none, and its caller gets the error.
#[tokio::test]
async fn a_tier_without_async_delivery_gets_the_error_not_a_job() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let setup = Setup {
        broken_model: "claude-sonnet-4",
        ..Setup::default()
    };
    let gw = with_jobs(&mock, &setup).await;
    mock.set_fault(Provider::Anthropic, Fault::Status(503));
    mock.set_fault(Provider::OpenAi, Fault::Status(503));
    let ask = |key: &'static str| {
        client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .bearer_auth(key)
            .header("prefer", "respond-async")
            .json(
                &json!({"model": "sturdy", "messages": [{"role": "user", "content": LONG_PROSE}]}),
            )
            .send()
    };
    let r = ask("client-free").await.unwrap();
    assert_eq!(r.status(), 503, "{:?}", r.headers());
    assert!(r.headers().contains_key("retry-after"));
    assert!(!header(&r, "x-floodgate-chain").contains("job="));
    // The same failure for a tier that allows jobs: handed over.
    let r = ask("client-acme").await.unwrap();
    assert_eq!(r.status(), 202, "{:?}", r.headers());
}
