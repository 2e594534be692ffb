//! Tiers through the whole proxy: the tier and queue headers, and the progress comments a
//! streaming caller sees while it waits for budget.

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use serde_json::json;
use std::time::{Duration, Instant};

/// One key of 1 request per `window` on the mock, and a TierQueue whose default tier is
/// `basic` (standard, waits up to 10 s, no headroom).
fn manifests(base: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{k: key-0}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], \
         keys: [{{name: k, secretRef: {{name: keys, key: k}}, rpm: 1}}]}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n\
         \x20 defaultTier: basic\n  classHeadroom: {{priority: 0, standard: 0, batch: 0}}\n  tiers:\n\
         \x20 - {{name: basic, class: standard, maxWaitMs: 10000}}\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streaming_caller_that_waits_sees_where_it_stands_then_its_answer() {
    let window = Duration::from_secs(3);
    let mock = MockProviders::start(MockConfig::default().with_window(window))
        .await
        .unwrap();
    let gw = Gateway::start(
        &manifests(&mock.base_url()),
        window,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let ask = |stream: bool| {
        json!({"model": "gpt-4o", "stream": stream,
               "messages": [{"role": "user", "content": "hello"}]})
    };

    // The key's one slot: answered at once, in tier basic, without waiting.
    let first = client.post(&url).json(&ask(false)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(first.headers()["x-floodgate-tier"], "basic");
    assert_eq!(first.headers()["x-floodgate-queue-ms"], "0");
    first.bytes().await.unwrap();

    // The next waits for the slot (about 3 s): its stream starts after 1 s with progress
    // comments, then the answer's events follow.
    let started = Instant::now();
    let second = client.post(&url).json(&ask(true)).send().await.unwrap();
    let headers_after = started.elapsed();
    assert_eq!(second.status(), 200);
    assert_eq!(second.headers()["x-floodgate-tier"], "basic");
    assert!(
        headers_after >= Duration::from_millis(900) && headers_after < window,
        "the stream starts after a second of waiting, before the slot frees: {headers_after:?}"
    );
    let body = String::from_utf8(second.bytes().await.unwrap().to_vec()).unwrap();
    let comments: Vec<&str> = body
        .lines()
        .filter(|l| l.starts_with(": floodgate"))
        .collect();
    assert!(!comments.is_empty(), "{body}");
    assert!(
        comments[0].starts_with(": floodgate queued position=0 eta_ms="),
        "{comments:?}"
    );
    let first_data = body.find("data: ").expect("answer events follow");
    assert!(body.rfind(": floodgate").unwrap() < first_data, "{body}");
    assert!(body.trim_end().ends_with("data: [DONE]"), "{body}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it waited for the slot"
    );

    // A waited non-streaming answer says how long it waited.
    let third = client.post(&url).json(&ask(false)).send().await.unwrap();
    assert_eq!(third.status(), 200);
    let queued: u64 = third.headers()["x-floodgate-queue-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(queued >= 1000, "waited {queued} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_streaming_caller_that_waits_sees_comments_before_message_start() {
    let window = Duration::from_secs(3);
    let mock = MockProviders::start(MockConfig::default().with_window(window))
        .await
        .unwrap();
    let gw = Gateway::start(
        &manifests(&mock.base_url()),
        window,
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/messages", gw.url());
    let ask = |stream: bool| {
        json!({"model": "gpt-4o", "max_tokens": 16, "stream": stream,
               "messages": [{"role": "user", "content": "hello"}]})
    };
    let first = client.post(&url).json(&ask(false)).send().await.unwrap();
    assert_eq!(first.status(), 200);
    first.bytes().await.unwrap();
    let second = client.post(&url).json(&ask(true)).send().await.unwrap();
    assert_eq!(second.status(), 200);
    let body = String::from_utf8(second.bytes().await.unwrap().to_vec()).unwrap();
    let comment = body
        .find(": floodgate queued position=")
        .expect("a progress comment");
    let start = body
        .find("event: message_start")
        .expect("the answer's events");
    assert!(comment < start, "{body}");
    assert!(body.contains("event: message_stop"), "{body}");
}
