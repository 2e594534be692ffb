//! The exact cache, templates and in-flight deduplication through the gateway, against the
//! mock providers: hits in every door and mode, what is never stored, tenant isolation,
//! Redis shared by two replicas and read by a new one, and 100 concurrent requests.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

mod cache_support;

use cache_support::{TENANTS, WAIT, WINDOW, client, events, post, redis_dispatcher};
use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders, answer_for};
use floodgate_e2e::redis::RedisServer;
use serde_json::{Value, json};
use std::time::Duration;

fn pool(mock: &MockProviders) -> String {
    cache_support::pool(
        mock,
        "{name: gpt-4o, alias: smart, inputPer1M: 2.5, outputPer1M: 10}, {name: gpt-truncate}, {name: gpt-abort}, {name: gpt-slow-600}",
    )
}

fn policy(backend: &str) -> String {
    format!(
        "---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: cache}}\nspec:\n\
         \x20 backend: {backend}\n\
         \x20 exact: {{ttlSeconds: 3600}}\n\
         \x20 dedup: {{windowSeconds: 5}}\n\
         \x20 templates:\n\
         \x20   ttlSeconds: 60\n\
         \x20   items:\n\
         \x20   - {{name: hours, pattern: 'what are your opening hours in (?P<city>\\w+)\\??', response: 'Our {{{{city}}}} office is open 9-17.'}}\n"
    )
}

async fn gateway(yaml: &str) -> Gateway {
    Gateway::start(yaml, WINDOW, WAIT).await.unwrap()
}

fn chat(model: &str, prompt: &str, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 50,
           "messages": [{"role": "user", "content": prompt}]})
}

#[tokio::test]
async fn an_answer_is_served_again_in_any_door_and_mode() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory"))).await;
    let url = gw.url();
    let prompt = "what is the capital of France";
    // Streamed first: stored at its clean end.
    let first = post(
        &url,
        "/v1/chat/completions",
        &chat("gpt-4o", prompt, true),
        &[],
    )
    .await;
    assert_eq!(
        (first.cache.as_str(), first.text.as_str()),
        ("miss", &*answer_for(prompt))
    );
    let whole = post(
        &url,
        "/v1/chat/completions",
        &chat("gpt-4o", prompt, false),
        &[],
    )
    .await;
    assert_eq!(
        (whole.cache.as_str(), whole.text.as_str()),
        ("exact", &*answer_for(prompt))
    );
    // Only a semantic hit says how similar the prompts were.
    assert_eq!(whole.similarity, None);
    // The alias routes to the same model: the same entry.
    let alias = post(
        &url,
        "/v1/chat/completions",
        &chat("smart", prompt, false),
        &[],
    )
    .await;
    assert_eq!(alias.cache, "exact");
    // Anthropic's door, streamed and whole.
    let anthropic = [("anthropic-version", "2023-06-01")];
    let streamed = post(
        &url,
        "/v1/messages",
        &chat("gpt-4o", prompt, true),
        &anthropic,
    )
    .await;
    assert_eq!(
        (streamed.cache.as_str(), streamed.text.as_str()),
        ("exact", &*answer_for(prompt))
    );
    let whole = post(
        &url,
        "/v1/messages",
        &chat("gpt-4o", prompt, false),
        &anthropic,
    )
    .await;
    assert_eq!(
        (whole.cache.as_str(), whole.text.as_str()),
        ("exact", &*answer_for(prompt))
    );
    assert_eq!(mock.counts().total(), 1);
    // A different parameter is a different answer.
    let mut other = chat("gpt-4o", prompt, false);
    other["temperature"] = json!(0.3);
    assert_eq!(
        post(&url, "/v1/chat/completions", &other, &[]).await.cache,
        "miss"
    );
    assert_eq!(mock.counts().total(), 2);
    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("floodgate_cache_requests_total{result=\"exact\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("floodgate_cache_saved_usd_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn no_cache_skips_the_lookup_and_no_store_the_store() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory"))).await;
    let url = gw.url();
    let path = "/v1/chat/completions";
    let body = chat("gpt-4o", "tell me a joke", false);
    let got = post(&url, path, &body, &[("cache-control", "no-store")]).await;
    assert_eq!(got.cache, "miss");
    assert_eq!(post(&url, path, &body, &[]).await.cache, "miss");
    assert_eq!(
        post(&url, path, &body, &[("cache-control", "no-cache")])
            .await
            .cache,
        "bypass"
    );
    assert_eq!(post(&url, path, &body, &[]).await.cache, "exact");
    assert_eq!(mock.counts().total(), 3);
}

#[tokio::test]
async fn a_broken_stream_is_never_stored() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory"))).await;
    let body = chat("gpt-truncate", "hello", true);
    for _ in 0..2 {
        let response = client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        let raw = response.text().await.unwrap();
        assert!(!raw.contains("[DONE]"), "{raw}");
    }
    assert_eq!(mock.counts().total(), 2);
}

/// A stream whose connection breaks after its finish reason (the answer looks whole, but
/// the stream never ended cleanly) is not stored either: with dedup on (the flight's
/// driver sees the error) and off (the store's tee does); the next request is a miss.
#[tokio::test]
async fn a_stream_broken_after_its_finish_reason_is_never_stored() {
    let exact_only = "---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: cache}\nspec:\n\
                      \x20 exact: {ttlSeconds: 3600}\n";
    for (dedup, policy) in [(true, policy("memory")), (false, exact_only.to_owned())] {
        let mock = MockProviders::start(MockConfig::default()).await.unwrap();
        let gw = gateway(&(pool(&mock) + &policy)).await;
        let body = chat("gpt-abort", "hello", true);
        let mut seen = Vec::new();
        for _ in 0..2 {
            let response = client()
                .post(format!("{}/v1/chat/completions", gw.url()))
                .json(&body)
                .send()
                .await
                .unwrap();
            seen.push(
                response
                    .headers()
                    .get("x-floodgate-cache")
                    .map(|v| v.to_str().unwrap().to_owned()),
            );
            let raw = response.text().await.unwrap_or_default();
            assert!(!raw.contains("[DONE]"), "dedup {dedup}: {raw}");
            // The finish reason did reach the caller: only the end was lost.
            assert!(
                raw.contains("\"finish_reason\":\"stop\""),
                "dedup {dedup}: {raw}"
            );
        }
        let miss = Some("miss".to_owned());
        assert_eq!(seen, [miss.clone(), miss], "dedup {dedup}");
        assert_eq!(mock.counts().total(), 2, "dedup {dedup}");
    }
}

#[tokio::test]
async fn one_tenant_never_receives_anothers_answer() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory") + TENANTS)).await;
    let (url, path) = (gw.url(), "/v1/chat/completions");
    let body = chat("gpt-4o", "our secret plan", false);
    let acme = [("authorization", "Bearer sk-acme")];
    let globex = [("authorization", "Bearer sk-globex")];
    assert_eq!(post(&url, path, &body, &acme).await.cache, "miss");
    assert_eq!(post(&url, path, &body, &globex).await.cache, "miss");
    assert_eq!(post(&url, path, &body, &acme).await.cache, "exact");
    assert_eq!(post(&url, path, &body, &globex).await.cache, "exact");
    assert_eq!(mock.counts().total(), 2);
}

/// `modelScopes`: a model (here the alias `smart`) whose entries every tenant shares,
/// while the same model asked for by its own name stays per tenant.
#[tokio::test]
async fn a_model_scoped_global_is_shared_by_tenants_and_only_it() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let policy = policy("memory").replace(
        "  backend: memory\n",
        "  backend: memory\n  modelScopes: [{model: smart, scope: global}]\n",
    );
    let gw = gateway(&(pool(&mock) + &policy + TENANTS)).await;
    let (url, path) = (gw.url(), "/v1/chat/completions");
    let acme = [("authorization", "Bearer sk-acme")];
    let globex = [("authorization", "Bearer sk-globex")];
    let smart = chat("smart", "a public question", false);
    assert_eq!(post(&url, path, &smart, &acme).await.cache, "miss");
    assert_eq!(post(&url, path, &smart, &globex).await.cache, "exact");
    let own = chat("gpt-4o", "a private question", false);
    assert_eq!(post(&url, path, &own, &acme).await.cache, "miss");
    assert_eq!(post(&url, path, &own, &globex).await.cache, "miss");
    assert_eq!(mock.counts().total(), 3);
}

#[tokio::test]
async fn a_template_answers_without_a_provider_call() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory"))).await;
    let body = chat("gpt-4o", "What are your opening hours in Lyon?", false);
    let got = post(&gw.url(), "/v1/chat/completions", &body, &[]).await;
    // The pattern is case-sensitive: "What" does not match "what".
    assert_eq!(got.cache, "miss");
    let body = chat("gpt-4o", "what are your opening hours in Lyon?", true);
    let got = post(&gw.url(), "/v1/chat/completions", &body, &[]).await;
    assert_eq!(got.cache, "template");
    assert_eq!(got.text, "Our Lyon office is open 9-17.");
    assert_eq!(mock.counts().total(), 1);
}

/// 100 identical requests at once, half streaming: one provider call, and every caller
/// gets the whole answer (streams end cleanly).
#[tokio::test]
async fn a_hundred_identical_requests_make_one_provider_call() {
    let mock =
        MockProviders::start(MockConfig::default().with_chunk_interval(Duration::from_millis(20)))
            .await
            .unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory"))).await;
    let url = gw.url();
    let prompt = "summarise the history of the Roman empire";
    let calls = (0..100).map(|i| {
        let url = url.clone();
        async move {
            let body = chat("gpt-slow-600", prompt, i % 2 == 0);
            post(&url, "/v1/chat/completions", &body, &[]).await
        }
    });
    let got = futures::future::join_all(calls).await;
    assert_eq!(mock.counts().total(), 1);
    let expected = answer_for(prompt);
    for g in &got {
        assert_eq!(g.text, expected);
        assert!(
            ["miss", "dedup", "exact", ""].contains(&g.cache.as_str()),
            "{g:?}"
        );
    }
    assert!(got.iter().filter(|g| g.cache == "miss").count() <= 1);
    assert!(got.iter().any(|g| g.cache == "dedup"));
}

/// 100 requests at once that differ in one word or in one parameter: each is its own.
#[tokio::test]
async fn a_hundred_different_requests_each_get_their_own_answer() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = gateway(&(pool(&mock) + &policy("memory"))).await;
    let url = gw.url();
    let calls = (0..100).map(|i| {
        let url = url.clone();
        async move {
            let (prompt, mut body) = if i < 50 {
                let prompt = format!("how many legs has animal {i}");
                (prompt.clone(), chat("gpt-slow-600", &prompt, i % 2 == 0))
            } else {
                let prompt = "how many legs has a spider".to_owned();
                (prompt.clone(), chat("gpt-slow-600", &prompt, i % 2 == 0))
            };
            if i >= 50 {
                body["max_tokens"] = json!(i);
            }
            (prompt, post(&url, "/v1/chat/completions", &body, &[]).await)
        }
    });
    let got = futures::future::join_all(calls).await;
    for (prompt, g) in &got {
        assert_eq!(g.text, answer_for(prompt));
        // A stream that waited over a second sent its headers before the cache decided.
        assert!(g.cache == "miss" || g.cache.is_empty(), "{g:?}");
    }
    assert_eq!(mock.counts().total(), 100);
}

/// Two replicas share answers through Redis, and a replica started later finds them.
#[tokio::test]
async fn replicas_share_answers_through_redis() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let yaml = pool(&mock) + &policy("redis");
    let a = Gateway::start_with(&yaml, redis_dispatcher(&redis))
        .await
        .unwrap();
    let b = Gateway::start_with(&yaml, redis_dispatcher(&redis))
        .await
        .unwrap();
    let (path, body) = (
        "/v1/chat/completions",
        chat("gpt-4o", "shared answer", false),
    );
    assert_eq!(post(&a.url(), path, &body, &[]).await.cache, "miss");
    // The store is written in the background: B finds it once it is there.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let got = post(&b.url(), path, &body, &[("cache-control", "no-store")]).await;
        if got.cache == "exact" {
            assert_eq!(got.text, answer_for("shared answer"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "B never saw A's answer: {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let calls = mock.counts().total();
    let c = Gateway::start_with(&yaml, redis_dispatcher(&redis))
        .await
        .unwrap();
    assert_eq!(post(&c.url(), path, &body, &[]).await.cache, "exact");
    assert_eq!(mock.counts().total(), calls);
}

/// With a cache shared by every tenant (`scope: global`), an answer is still never served
/// to a request that the RoutingPolicy sends elsewhere: here acme's requests go to another
/// pool's model, so globex's same prompt is a miss, not acme's answer.
#[tokio::test]
async fn a_shared_cache_keeps_answers_apart_when_routing_rules_differ() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let cheap = format!(
        "---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: cheap}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: down, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o-mini}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 100000}}]}}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: RoutingPolicy\nmetadata: {{name: routes}}\nspec:\n\
         \x20 rules:\n\
         \x20 - {{name: acme-cheap, match: {{tenants: [acme]}}, targets: [{{pool: cheap, model: gpt-4o-mini}}]}}\n",
        mock.base_url()
    );
    let shared = policy("memory").replace(
        "  backend: memory\n",
        "  backend: memory\n  scope: global\n",
    );
    let gw = gateway(&(pool(&mock) + &shared + TENANTS + &cheap)).await;
    let (url, path) = (gw.url(), "/v1/chat/completions");
    let body = chat("gpt-4o", "the same question", false);
    let acme = [("authorization", "Bearer sk-acme")];
    let globex = [("authorization", "Bearer sk-globex")];
    assert_eq!(post(&url, path, &body, &acme).await.cache, "miss");
    assert_eq!(post(&url, path, &body, &globex).await.cache, "miss");
    // Each is then a hit of its own answer.
    assert_eq!(post(&url, path, &body, &acme).await.cache, "exact");
    assert_eq!(post(&url, path, &body, &globex).await.cache, "exact");
    assert_eq!(mock.counts().total(), 2);
}

/// Without dedup, a streamed miss is stored with its usage (asked of the provider by the
/// gateway), so a later whole hit reports usage; the streaming caller, who did not ask for
/// usage, never sees it.
#[tokio::test]
async fn a_streamed_miss_is_stored_with_its_usage_the_caller_did_not_ask_for() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let no_dedup = policy("memory").replace("  dedup: {windowSeconds: 5}\n", "");
    assert!(!no_dedup.contains("dedup"), "{no_dedup}");
    let gw = gateway(&(pool(&mock) + &no_dedup)).await;
    let url = format!("{}/v1/chat/completions", gw.url());
    let streamed = client()
        .post(&url)
        .json(&chat("gpt-4o", "count the usage", true))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.headers()["x-floodgate-cache"], "miss");
    let raw = streamed.text().await.unwrap();
    for event in events(&raw).filter(|e| *e != "[DONE]") {
        let chunk: Value = serde_json::from_str(event).unwrap();
        assert!(
            chunk.get("usage").is_none_or(Value::is_null),
            "usage the caller did not ask for: {event}"
        );
    }
    let whole = client()
        .post(&url)
        .json(&chat("gpt-4o", "count the usage", false))
        .send()
        .await
        .unwrap();
    assert_eq!(whole.headers()["x-floodgate-cache"], "exact");
    let body: Value = whole.json().await.unwrap();
    assert!(
        body["usage"]["total_tokens"]
            .as_u64()
            .is_some_and(|t| t > 0),
        "{body}"
    );
    assert_eq!(mock.counts().total(), 1);
}

/// With the Redis backend an expired answer is kept `staleSeconds` past its TTL, for the
/// degradation chain alone: a replica that never saw it serves it, marked stale, when every
/// target fails, and no replica serves it as a fresh hit.
#[tokio::test]
async fn redis_keeps_an_expired_answer_for_stale_answers_only() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let policy = "---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {name: cache}\nspec:\n\
                  \x20 backend: redis\n\
                  \x20 exact: {ttlSeconds: 1, staleSeconds: 3600}\n";
    let yaml = pool(&mock) + policy;
    let replica = || async {
        Gateway::start_with(&yaml, redis_dispatcher(&redis))
            .await
            .unwrap()
    };
    let (a, b, c) = (replica().await, replica().await, replica().await);
    let (path, body) = (
        "/v1/chat/completions",
        chat("gpt-4o", "kept for bad days", false),
    );
    assert_eq!(post(&a.url(), path, &body, &[]).await.cache, "miss");
    // The store is written in the background; then its 1 s TTL passes on Redis's clock:
    // Redis keeps it 3,601 s, so it is expired once less than 3,600 s are left. Both waited
    // for in Redis itself (a hit polled through B could miss a 1 s freshness on a busy
    // machine).
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let name = loop {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("floodgate:cache:exact:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        if let Some(name) = keys.into_iter().next() {
            break name;
        }
        assert!(std::time::Instant::now() < deadline, "never stored");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    loop {
        let left: i64 = redis::cmd("PTTL")
            .arg(&name)
            .query_async(&mut conn)
            .await
            .unwrap();
        if left < 3_600_000 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never expired: {left} ms left"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Expired: B (nothing in memory) does not take it for a hit.
    assert_eq!(
        post(&b.url(), path, &body, &[("cache-control", "no-store")])
            .await
            .cache,
        "miss"
    );
    // Every target fails: B answers with the expired entry, marked stale.
    mock.set_fault(
        floodgate_e2e::mock::Provider::OpenAi,
        floodgate_e2e::mock::Fault::Status(503),
    );
    let got = post(&b.url(), path, &body, &[]).await;
    assert_eq!(got.cache, "stale");
    assert_eq!(got.text, answer_for("kept for bad days"));
    let calls = mock.counts().total();
    // Healthy again: C (no flight of it, nothing in memory) does not take it for a hit.
    mock.clear_faults();
    let got = post(&c.url(), path, &body, &[]).await;
    assert_eq!(got.cache, "miss");
    assert_eq!(mock.counts().total(), calls + 1);
}

/// With the Redis backend `maxBytes` bounds what the policy holds in Redis, whatever the
/// replicas that store: past it, a store evicts the entries soonest to expire (of one TTL,
/// the oldest), and the ledger in Redis counts exactly what is there.
#[tokio::test]
async fn max_bytes_bounds_what_redis_holds() {
    const MAX: usize = 2048;
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let bounded = policy("redis")
        .replace("  dedup: {windowSeconds: 5}\n", "")
        .replace(
            "  backend: redis\n",
            &format!("  backend: redis\n  maxBytes: {MAX}\n"),
        );
    let yaml = pool(&mock) + &bounded;
    let replicas = [
        Gateway::start_with(&yaml, redis_dispatcher(&redis))
            .await
            .unwrap(),
        Gateway::start_with(&yaml, redis_dispatcher(&redis))
            .await
            .unwrap(),
    ];
    let path = "/v1/chat/completions";
    let ask = |i: usize| chat("gpt-4o", &format!("question number {i}"), false);
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let [ledger, _, total] = floodgate_proxy::cache::redis::ledger_keys("/cache");
    const ASKED: usize = 16;
    let mut newest = String::new();
    for i in 0..ASKED {
        let url = replicas[i % 2].url();
        assert_eq!(post(&url, path, &ask(i), &[]).await.cache, "miss");
        // Stored in the background: there once the ledger's newest entry is another.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let last: Vec<String> = redis::cmd("ZRANGE")
                .arg(&ledger)
                .arg(-1)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            if let Some(name) = last.first()
                && *name != newest
            {
                newest.clone_from(name);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{i} never stored");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let names: Vec<String> = redis::cmd("KEYS")
        .arg("floodgate:cache:exact:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut held = 0;
    for name in &names {
        let len: usize = redis::cmd("STRLEN")
            .arg(name)
            .query_async(&mut conn)
            .await
            .unwrap();
        held += len + name.len();
    }
    assert!(
        held <= MAX && names.len() < ASKED,
        "{} entries, {held} bytes",
        names.len()
    );
    let counted: usize = redis::cmd("GET")
        .arg(&total)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, held);
    // The newest answer is there; the first was evicted.
    let last = post(&replicas[0].url(), path, &ask(ASKED - 1), &[]).await;
    assert_eq!(last.cache, "exact");
    let calls = mock.counts().total();
    let first = post(&replicas[1].url(), path, &ask(0), &[]).await;
    assert_eq!(
        (first.cache.as_str(), first.text),
        ("miss", answer_for("question number 0"))
    );
    assert_eq!(mock.counts().total(), calls + 1);
}
