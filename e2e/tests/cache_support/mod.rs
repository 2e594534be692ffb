//! What the cache tests share (`mod cache_support;` in cache_exact.rs and cache_semantic.rs):
//! the pool and tenants they configure, a Redis-backed dispatcher, and a caller that posts a
//! chat request and reads what the cache did and the answer's text in either door and mode.

use floodgate_e2e::mock::MockProviders;
use floodgate_e2e::redis::RedisServer;
use floodgate_proxy::budget::SharedOptions;
use floodgate_proxy::route::{Dispatcher, DispatcherOptions};
use floodgate_proxy::secret::SecretString;
use serde_json::Value;
use std::time::Duration;

pub const WINDOW: Duration = Duration::from_secs(60);
pub const WAIT: Duration = Duration::from_secs(10);

/// Two tenants, `acme` (key `sk-acme`) and `globex` (key `sk-globex`).
pub const TENANTS: &str = "---\napiVersion: v1\nkind: Secret\nmetadata: {name: clients}\nstringData: {acme: sk-acme, globex: sk-globex}\n\
---\napiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {name: acme}\nspec:\n  keys: [{name: main, secretRef: {name: clients, key: acme}}]\n\
---\napiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {name: globex}\nspec:\n  keys: [{name: main, secretRef: {name: clients, key: globex}}]\n";

pub fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A pool `pool` with one OpenAI provider on the mock serving `models` (a YAML flow list's
/// items: `{name: gpt-4o}, {name: gpt-4o-mini}`).
pub fn pool(mock: &MockProviders, models: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: up, type: openai, baseUrl: \"{}\", models: [{models}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 100000}}]}}\n",
        mock.base_url()
    )
}

/// A dispatcher whose shared state (and cache backend `redis`) is `redis`.
pub fn redis_dispatcher(redis: &RedisServer) -> Dispatcher {
    let opts = DispatcherOptions::new(WINDOW, WAIT)
        .with_redis(SharedOptions::new(SecretString::new(redis.url())));
    Dispatcher::with_options(opts).unwrap()
}

/// What a caller got: the cache header, the similarity header (semantic hits), and the
/// answer's text (from a whole answer, or the stream's deltas; a stream must end cleanly).
#[derive(Debug)]
pub struct Got {
    pub cache: String,
    pub similarity: Option<f32>,
    pub text: String,
}

/// Posts `body` to `path` (`/v1/chat/completions` or `/v1/messages`) with `headers`; the
/// answer must be a success.
pub async fn post(url: &str, path: &str, body: &Value, headers: &[(&str, &str)]) -> Got {
    let mut request = client().post(format!("{url}{path}")).json(body);
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let cache = header("x-floodgate-cache").unwrap_or_default();
    let similarity = header("x-floodgate-cache-similarity").map(|s| s.parse().unwrap());
    let raw = response.text().await.unwrap();
    assert!(status.is_success(), "{status}: {raw}");
    let stream = body["stream"].as_bool().unwrap_or(false);
    let text = match (path, stream) {
        (_, false) => {
            let v: Value = serde_json::from_str(&raw).unwrap();
            v["choices"][0]["message"]["content"]
                .as_str()
                .or_else(|| v["content"][0]["text"].as_str())
                .unwrap()
                .to_owned()
        }
        ("/v1/chat/completions", true) => openai_text(&raw),
        (_, true) => anthropic_text(&raw),
    };
    Got {
        cache,
        similarity,
        text,
    }
}

/// The data of a stream's server-sent events.
pub fn events(raw: &str) -> impl Iterator<Item = &str> {
    raw.lines().filter_map(|l| l.strip_prefix("data: "))
}

fn openai_text(raw: &str) -> String {
    assert!(
        raw.contains("data: [DONE]"),
        "the stream did not end cleanly: {raw}"
    );
    events(raw)
        .filter(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect()
}

fn anthropic_text(raw: &str) -> String {
    assert!(
        raw.contains("message_stop"),
        "the stream did not end cleanly: {raw}"
    );
    events(raw)
        .map(|d| serde_json::from_str::<Value>(d).unwrap())
        .filter_map(|v| v["delta"]["text"].as_str().map(str::to_owned))
        .collect()
}
