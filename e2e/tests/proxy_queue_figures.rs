//! What the real gateway shares in Redis for the operator's TierQueue status: the binary
//! (`ProxyProcess`) with `--redis`, a pool whose one key allows 1 request a minute, and a
//! TierQueue; a request that waits for the key is seen by the operator's reader as waiting
//! in its tier, with its wait growing, until it leaves; the request admitted before it is
//! counted within the tier's wait target.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_crds::redis_keys::WAIT_BUCKETS_MS;
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use floodgate_operator::usage::UsageReader;
use serde_json::json;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

fn config(mock: &MockProviders) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  a: sk-provider-e2e\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}], \
         keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1}}]}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n  tiers:\n\
         \x20 - {{name: pro, class: standard, maxWaitMs: 120000}}\n",
        mock.base_url()
    )
}

#[tokio::test]
async fn a_request_waiting_in_the_gateway_is_seen_in_its_tier_by_the_operator() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), config(&mock)).unwrap();
    let url = redis.url();
    let proxy = ProxyProcess::start(
        ["--config", dir.path().to_str().unwrap(), "--redis", &url],
        &[],
    )
    .await
    .unwrap();
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]});
    let http = reqwest::Client::new();
    let first = http
        .post(proxy.url("/v1/chat/completions"))
        .json(&chat)
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);

    // The key's request of the minute is spent: the next one waits in tier pro.
    let waiting = tokio::spawn(
        http.post(proxy.url("/v1/chat/completions"))
            .json(&chat)
            .send(),
    );
    // A file-mode TierQueue has no namespace.
    let reader = UsageReader::new(&url).unwrap();
    let pro = || async {
        let usage = reader.queue_usage("", "tiers").await.unwrap();
        usage.get("pro").cloned().unwrap_or_default()
    };
    let seen = wait_for("the waiting request in Redis", WAIT, || async {
        let pro = pro().await;
        Ok((pro.waiting == 1 && pro.oldest_wait_ms >= 1000).then_some(pro))
    })
    .await
    .unwrap();
    assert_eq!(seen.waiting, 1);

    // The caller gives up: the tier is empty again. What stays is the recent outcome: the
    // first request, admitted at once, within the tier's target, in the first wait bucket
    // (the one that left is neither admitted nor refused by the queue).
    waiting.abort();
    let after = wait_for("the tier empty again", WAIT, || async {
        let pro = pro().await;
        Ok((pro.waiting == 0 && pro.oldest_wait_ms == 0).then_some(pro))
    })
    .await
    .unwrap();
    let mut first_bucket = vec![0; after.waits.len().max(1)];
    first_bucket[0] = 1;
    assert_eq!(
        (after.within, after.missed, &after.waits),
        (1, 0, &first_bucket)
    );
    assert_eq!(after.waits.len(), WAIT_BUCKETS_MS.len() + 1);
    proxy.stop().await.unwrap();
}
