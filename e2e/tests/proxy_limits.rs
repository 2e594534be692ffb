//! The key pool under load: 1,000 requests against keys with small limits produce no upstream
//! 429 and no key over its limit in any window, as the mock provider counted them. In a file
//! of its own so that no sibling test competes for the two cores while it runs.

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use serde_json::json;
use std::time::Duration;

fn manifests(keys: usize, rpm: u32, base: &str) -> String {
    let secrets: String = (0..keys).map(|i| format!("  k{i}: key-{i}\n")).collect();
    let refs: String = (0..keys)
        .map(|i| format!("{{name: k{i}, secretRef: {{name: keys, key: k{i}}}, rpm: {rpm}}}, "))
        .collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n{secrets}---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], keys: [{refs}]}}\n"
    )
}

fn ask(text: &str) -> serde_json::Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": text}]})
}

/// 1,000 requests over 20 keys of 10 requests per 2 s window, the proxy's window exactly the
/// provider's: no margin. The proxy holds a request's slot from dispatch until its answer
/// and one window after, and the provider counts it at arrival, which lies in between; so no
/// arrival pattern can put 11 requests into one of the provider's windows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_never_exceed_any_key_limit() {
    let window = Duration::from_secs(2);
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let gw = Gateway::start(
        &manifests(20, 10, &mock.base_url()),
        window,
        Duration::from_secs(60),
    )
    .await
    .unwrap();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());
    let statuses = futures::future::join_all((0..1000).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(&url)
                .json(&ask(&format!("q{i}")))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    }))
    .await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "not all 200: {:?}",
        statuses.iter().filter(|&&s| s != 200).collect::<Vec<_>>()
    );
    let counts = mock.counts();
    let refused: Vec<_> = counts
        .keys
        .iter()
        .filter(|k| k.requests != k.ok)
        .map(|k| {
            (
                k.key.clone(),
                k.requests,
                k.ok,
                k.rate_limited,
                k.max_in_window,
            )
        })
        .collect();
    assert!(
        refused.is_empty(),
        "(key, requests, ok, 429s, max in a window): {refused:?}"
    );
    assert_eq!(counts.total(), 1000);
    let limited: u64 = counts.keys.iter().map(|k| k.rate_limited).sum();
    assert_eq!(limited, 0, "upstream 429s");
    let over: Vec<_> = counts
        .over_limit()
        .map(|k| (k.key.clone(), k.max_in_window))
        .collect();
    assert!(
        over.is_empty(),
        "keys over their limit in some window: {over:?}"
    );
    // Least-loaded spreads the load: every key was used about equally.
    for k in &counts.keys {
        assert!((40..=60).contains(&k.requests), "{}: {}", k.key, k.requests);
    }
}
