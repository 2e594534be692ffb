//! The semantic cache through the gateway, against the mock providers (whose answer names
//! the prompt it answers, so a hit is told from a fresh answer): a paraphrase served with
//! its similarity, never across tenants or models, the guard's traps refused, the
//! multi-turn rule, TTL expiry, and Redis shared by two replicas and read by a new one.
//!
//! The embedding model must be installed (`make model`; FLOODGATE_EMBEDDING_MODEL_DIR or
//! ~/.cache/floodgate/models/all-MiniLM-L6-v2): without it these tests fail, saying so.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

mod cache_support;

use cache_support::{Got, TENANTS, WAIT, WINDOW, client, redis_dispatcher};
use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders, answer_for};
use floodgate_e2e::redis::RedisServer;
use floodgate_proxy::cache::Cache;
use floodgate_proxy::route::Dispatcher;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn pool(mock: &MockProviders) -> String {
    cache_support::pool(mock, "{name: gpt-4o}, {name: gpt-4o-mini}")
}

/// A CachePolicy with the semantic layer only (no exact entries, no dedup), so every hit
/// here is the semantic layer's.
fn policy(backend: &str, threshold: f64, ttl: u32) -> String {
    format!(
        "---\napiVersion: floodgate.dev/v1alpha1\nkind: CachePolicy\nmetadata: {{name: cache}}\nspec:\n\
         \x20 backend: {backend}\n\
         \x20 semantic: {{ttlSeconds: {ttl}, threshold: {threshold}}}\n"
    )
}

/// A gateway on `yaml` (with `dispatcher`) whose embedding model is loaded.
async fn gateway(yaml: &str, dispatcher: Dispatcher) -> (Gateway, Arc<Cache>) {
    let mut cache = None;
    let gw = Gateway::start_configured(yaml, dispatcher, |state| {
        cache = Some(state.cache.clone());
    })
    .await
    .unwrap();
    let cache = cache.unwrap();
    cache.prepare(&gw.dispatcher.config());
    wait_for("the embedding model to load (run `make model`)", || {
        cache.semantic().ready()
    })
    .await;
    (gw, cache)
}

fn dispatcher() -> Dispatcher {
    Dispatcher::new(WINDOW, WAIT).unwrap()
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn chat(model: &str, messages: Value, stream: bool) -> Value {
    json!({"model": model, "stream": stream, "max_tokens": 50, "messages": messages})
}

fn ask(prompt: &str) -> Value {
    chat(
        "gpt-4o",
        json!([{"role": "user", "content": prompt}]),
        false,
    )
}

/// Posts a chat request to the OpenAI door.
async fn post(url: &str, body: &Value, headers: &[(&str, &str)]) -> Got {
    cache_support::post(url, "/v1/chat/completions", body, headers).await
}

/// A miss, stored: waits until the store (in the background) is in the index.
async fn store(url: &str, cache: &Cache, body: &Value, headers: &[(&str, &str)]) {
    let before = cache.semantic().index().len();
    assert_eq!(post(url, body, headers).await.cache, "miss");
    wait_for("the semantic entry to be stored", || {
        cache.semantic().index().len() > before
    })
    .await;
}

const ORIGINAL: &str = "How do I report a missed bin collection?";
const PARAPHRASE: &str = "how do I report a missed bin collection please";

#[tokio::test]
async fn a_paraphrase_is_answered_from_the_semantic_cache() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (gw, cache) = gateway(&(pool(&mock) + &policy("memory", 0.95, 3600)), dispatcher()).await;
    let url = gw.url();
    store(&url, &cache, &ask(ORIGINAL), &[]).await;
    let got = post(&url, &ask(PARAPHRASE), &[]).await;
    assert_eq!(got.cache, "semantic", "{got:?}");
    assert_eq!(got.text, answer_for(ORIGINAL));
    let similarity = got.similarity.unwrap();
    assert!((0.95..1.0).contains(&similarity), "{similarity}");
    // Streamed too, replayed from the stored answer.
    let mut streamed = ask(PARAPHRASE);
    streamed["stream"] = json!(true);
    let got = post(&url, &streamed, &[]).await;
    assert_eq!(
        (got.cache.as_str(), got.text),
        ("semantic", answer_for(ORIGINAL))
    );
    assert_eq!(mock.counts().total(), 1);
    // Something else altogether is a miss.
    assert_eq!(
        post(&url, &ask("What is the capital of France?"), &[])
            .await
            .cache,
        "miss"
    );
    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("floodgate_cache_requests_total{result=\"semantic\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("floodgate_cache_lookup_seconds_count{backend=\"semantic\"}"),
        "{metrics}"
    );
}

#[tokio::test]
async fn no_semantic_hit_across_tenants_or_models() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (gw, cache) = gateway(
        &(pool(&mock) + &policy("memory", 0.95, 3600) + TENANTS),
        dispatcher(),
    )
    .await;
    let url = gw.url();
    let acme = [("authorization", "Bearer sk-acme")];
    let globex = [("authorization", "Bearer sk-globex")];
    store(&url, &cache, &ask(ORIGINAL), &acme).await;
    assert_eq!(post(&url, &ask(PARAPHRASE), &acme).await.cache, "semantic");
    let got = post(&url, &ask(PARAPHRASE), &globex).await;
    assert_eq!(
        (got.cache.as_str(), got.text),
        ("miss", answer_for(PARAPHRASE))
    );
    let mut mini = ask(PARAPHRASE);
    mini["model"] = json!("gpt-4o-mini");
    assert_eq!(post(&url, &mini, &acme).await.cache, "miss");
    // Another system prompt is another partition too.
    let system = chat(
        "gpt-4o",
        json!([{"role": "system", "content": "Answer in French."}, {"role": "user", "content": PARAPHRASE}]),
        false,
    );
    assert_eq!(post(&url, &system, &acme).await.cache, "miss");
    assert_eq!(mock.counts().total(), 4);
}

/// Traps score high with the model alone (each at or above this test's threshold, 0.8, so
/// each would be a hit without the guard); the guard refuses every one, for its reason.
#[tokio::test]
async fn the_guard_refuses_negations_swaps_and_numbers() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (gw, cache) = gateway(&(pool(&mock) + &policy("memory", 0.8, 3600)), dispatcher()).await;
    let url = gw.url();
    let traps = [
        (
            "How do I enable two-factor authentication?",
            "How do I disable two-factor authentication?",
            "negation",
        ),
        (
            "Cancel my subscription",
            "Don't cancel my subscription",
            "negation",
        ),
        (
            "How do I convert a Word document to PDF?",
            "How do I convert a PDF to a Word document?",
            "order",
        ),
        (
            "How much is the Pro plan for 5 users?",
            "How much is the Pro plan for 50 users?",
            "number",
        ),
    ];
    let vocab = cache.semantic().vocab().unwrap();
    // Real words a slip apart (review finding): refused by the guard; how close the model
    // puts them, for the record (far below the threshold, as it happens).
    for (a, b) in [
        (
            "What is a casual relationship?",
            "What is a causal relationship?",
        ),
        ("Easy desert recipes", "Easy dessert recipes"),
        (
            "When was marital law declared?",
            "When was martial law declared?",
        ),
    ] {
        let (x, y) = (
            cache.semantic().embed(a).await.unwrap(),
            cache.semantic().embed(b).await.unwrap(),
        );
        let similarity = floodgate_proxy::cache::semantic::embed::cosine(&x, &y);
        eprintln!("{a:?} / {b:?}: cosine {similarity:.4}");
        assert!(floodgate_proxy::cache::semantic::guard::check(a, b, &vocab).is_err());
    }
    for (cached, trap, reason) in traps {
        // The model alone would serve it: similar enough.
        let (a, b) = (
            cache.semantic().embed(cached).await.unwrap(),
            cache.semantic().embed(trap).await.unwrap(),
        );
        let similarity = floodgate_proxy::cache::semantic::embed::cosine(&a, &b);
        eprintln!("{cached:?} / {trap:?}: cosine {similarity:.4}");
        assert!(similarity >= 0.8, "{trap}: {similarity}");
        // The guard refuses it, for this reason.
        let refused = floodgate_proxy::cache::semantic::guard::check(cached, trap, &vocab);
        assert_eq!(refused.map_err(|r| r.as_str()), Err(reason), "{trap}");
        store(&url, &cache, &ask(cached), &[]).await;
        let got = post(&url, &ask(trap), &[]).await;
        assert_eq!(
            (got.cache.as_str(), got.text),
            ("miss", answer_for(trap)),
            "{trap}"
        );
    }
    assert_eq!(mock.counts().total(), 2 * traps.len() as u64);
}

/// Earlier turns must match exactly; then the last message may be a paraphrase.
#[tokio::test]
async fn multi_turn_hits_need_the_same_earlier_turns() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (gw, cache) = gateway(&(pool(&mock) + &policy("memory", 0.95, 3600)), dispatcher()).await;
    let url = gw.url();
    let turns = |first: &str, last: &str| {
        chat(
            "gpt-4o",
            json!([
                {"role": "user", "content": first},
                {"role": "assistant", "content": "Sure, which council area?"},
                {"role": "user", "content": last}
            ]),
            false,
        )
    };
    store(&url, &cache, &turns("I live in Leeds.", ORIGINAL), &[]).await;
    let got = post(&url, &turns("I live in Leeds.", PARAPHRASE), &[]).await;
    assert_eq!(got.cache, "semantic");
    let got = post(&url, &turns("I live in York.", PARAPHRASE), &[]).await;
    assert_eq!(got.cache, "miss");
    // The single-turn question is not the conversation's.
    assert_eq!(post(&url, &ask(PARAPHRASE), &[]).await.cache, "miss");
    assert_eq!(mock.counts().total(), 3);
}

/// A hit within the TTL (of 1 s), a miss past it. The hit is checked on an entry stored
/// less than 900 ms before; on a machine so busy that the check came later, the test tries
/// again in a fresh partition (another tenant or model), at most four times, and fails if
/// no try was timely: it never passes without having seen the hit.
#[tokio::test]
async fn semantic_entries_expire_at_their_ttl() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (gw, cache) = gateway(
        &(pool(&mock) + &policy("memory", 0.95, 1) + TENANTS),
        dispatcher(),
    )
    .await;
    let url = gw.url();
    let mut timely = false;
    'tries: for tenant in ["Bearer sk-acme", "Bearer sk-globex"] {
        for model in ["gpt-4o", "gpt-4o-mini"] {
            let auth = [("authorization", tenant)];
            let ask =
                |prompt: &str| chat(model, json!([{"role": "user", "content": prompt}]), false);
            let asked = Instant::now();
            store(&url, &cache, &ask(ORIGINAL), &auth).await;
            // The entry's TTL started when it was stored: after `asked`, before now.
            let stored = Instant::now();
            let auth_no_store = [auth[0], ("cache-control", "no-store")];
            let got = post(&url, &ask(PARAPHRASE), &auth_no_store).await;
            if asked.elapsed() >= Duration::from_millis(900) {
                eprintln!("{tenant} {model}: the hit was checked too late; trying again");
                continue;
            }
            assert_eq!(got.cache, "semantic");
            timely = true;
            // Past the TTL of 1 s.
            tokio::time::sleep(
                Duration::from_secs(1).saturating_sub(stored.elapsed()) + Duration::from_millis(20),
            )
            .await;
            let got = post(&url, &ask(PARAPHRASE), &auth).await;
            assert_eq!(
                (got.cache.as_str(), got.text),
                ("miss", answer_for(PARAPHRASE))
            );
            break 'tries;
        }
    }
    assert!(timely, "no try checked the hit within the TTL");
}

/// Two replicas share semantic entries through Redis (the second follows the first's
/// additions), and a replica started later builds its index from Redis.
#[tokio::test]
async fn replicas_share_semantic_entries_through_redis() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let yaml = pool(&mock) + &policy("redis", 0.95, 3600);
    let (a, cache_a) = gateway(&yaml, redis_dispatcher(&redis)).await;
    let (b, cache_b) = gateway(&yaml, redis_dispatcher(&redis)).await;
    store(&a.url(), &cache_a, &ask(ORIGINAL), &[]).await;
    wait_for("B to follow A's entry", || {
        cache_b.semantic().index().len() == 1
    })
    .await;
    let got = post(&b.url(), &ask(PARAPHRASE), &[]).await;
    assert_eq!(
        (got.cache.as_str(), got.text),
        ("semantic", answer_for(ORIGINAL))
    );
    // A replica started now warms its index from Redis.
    let (c, cache_c) = gateway(&yaml, redis_dispatcher(&redis)).await;
    wait_for("C to read the entries in Redis", || {
        cache_c.semantic().index().len() == 1
    })
    .await;
    let got = post(&c.url(), &ask(PARAPHRASE), &[]).await;
    assert_eq!(
        (got.cache.as_str(), got.text),
        ("semantic", answer_for(ORIGINAL))
    );
    assert_eq!(mock.counts().total(), 1);
}
