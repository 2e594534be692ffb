//! The mock providers' embeddings endpoints, driven over HTTP with reqwest: wire shapes,
//! deterministic vectors, `dimensions`, each provider's errors, and the same per-key rate
//! limits and counters as chat. One suite runs against every provider that has embeddings
//! (see `conformance!`); `mock_providers.rs` covers chat.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use floodgate_e2e::mock::{
    MockConfig, MockProviders, OLLAMA_CONTEXT_TOKENS, Provider, default_dimensions, embedding_for,
};
use reqwest::{Client, RequestBuilder};
use serde_json::{Value, json};

const KEY: &str = "test-key-1";
const TEXTS: [&str; 2] = ["The food was delicious.", "The waiter was friendly."];

/// A started mock and a client for it.
struct Harness {
    mock: MockProviders,
    client: Client,
}

/// What came back: status and the body as JSON.
struct Reply {
    status: u16,
    retry_after: Option<String>,
    body: Value,
}

impl Harness {
    async fn start(config: MockConfig) -> Self {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mock = MockProviders::start(config).await.unwrap();
        Self {
            mock,
            client: Client::new(),
        }
    }

    async fn default() -> Self {
        Self::start(MockConfig::default()).await
    }

    fn post(&self, path: &str) -> RequestBuilder {
        self.client.post(format!("{}{path}", self.mock.base_url()))
    }

    /// Embeds `TEXTS` in `provider`'s own format (Gemini: `batchEmbedContents`).
    async fn embed(&self, provider: Provider, model: &str, dimensions: Option<u32>) -> Reply {
        self.embed_with(provider, KEY, model, dimensions).await
    }

    async fn embed_with(
        &self,
        provider: Provider,
        key: &str,
        model: &str,
        dimensions: Option<u32>,
    ) -> Reply {
        let request = match provider {
            Provider::OpenAi => self.post("/v1/embeddings").bearer_auth(key).json(
                &json!({"model": model, "input": TEXTS, "dimensions": dimensions}).without_nulls(),
            ),
            Provider::Gemini => {
                let requests: Vec<Value> = TEXTS
                    .iter()
                    .map(|text| {
                        json!({"model": format!("models/{model}"), "content": {"parts": [{"text": text}]},
                            "outputDimensionality": dimensions})
                        .without_nulls()
                    })
                    .collect();
                self.post(&format!("/v1beta/models/{model}:batchEmbedContents"))
                    .header("x-goog-api-key", key)
                    .json(&json!({ "requests": requests }))
            }
            Provider::Ollama => self.post("/api/embed").json(
                &json!({"model": model, "input": TEXTS, "dimensions": dimensions}).without_nulls(),
            ),
            Provider::Anthropic => unreachable!("Anthropic has no embeddings API"),
        };
        send(request).await
    }
}

async fn send(request: RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.json().await.unwrap();
    Reply {
        status,
        retry_after,
        body,
    }
}

trait WithoutNulls {
    fn without_nulls(self) -> Self;
}

impl WithoutNulls for Value {
    /// Drops `null` members, so an unset option is absent rather than `null`.
    fn without_nulls(mut self) -> Self {
        if let Some(object) = self.as_object_mut() {
            object.retain(|_, v| !v.is_null());
        }
        self
    }
}

/// Ollama requests carry no key, so the mock counts them under `""`.
fn key_for(provider: Provider) -> &'static str {
    if provider == Provider::Ollama {
        ""
    } else {
        KEY
    }
}

fn floats(value: &Value) -> Vec<f32> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

/// The vectors of a response in `provider`'s format.
fn vectors(provider: Provider, body: &Value) -> Vec<Vec<f32>> {
    match provider {
        Provider::OpenAi => body["data"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, item)| {
                assert_eq!(
                    (item["object"].as_str(), item["index"].as_u64()),
                    (Some("embedding"), Some(i as u64))
                );
                floats(&item["embedding"])
            })
            .collect(),
        Provider::Gemini => body["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| floats(&e["values"]))
            .collect(),
        Provider::Ollama => body["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect(),
        Provider::Anthropic => unreachable!(),
    }
}

fn assert_close(actual: &[f32], expected: &[f32]) {
    assert_eq!(actual.len(), expected.len());
    for (a, e) in actual.iter().zip(expected) {
        assert!((a - e).abs() < 1e-6, "{a} != {e}");
    }
}

mod conformance {
    use super::*;

    pub async fn embeds_deterministically(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.embed(provider, "embed-1", None).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let got = vectors(provider, &reply.body);
        assert_eq!(got.len(), TEXTS.len());
        for (vector, text) in got.iter().zip(TEXTS) {
            assert_close(vector, &embedding_for(text, default_dimensions(provider)));
        }
        let counts = h.mock.counts();
        let key = counts.get(provider, key_for(provider)).unwrap();
        assert_eq!((key.requests, key.ok), (1, 1));
    }

    pub async fn honours_dimensions(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.embed(provider, "embed-1", Some(256)).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        for (vector, text) in vectors(provider, &reply.body).iter().zip(TEXTS) {
            assert_close(vector, &embedding_for(text, 256));
            let norm: f32 = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-4, "{norm}");
        }
        let too_long = u32::try_from(default_dimensions(provider)).unwrap() + 1;
        assert_eq!(
            h.embed(provider, "embed-1", Some(too_long)).await.status,
            400
        );
        let counts = h.mock.counts();
        assert_eq!(
            counts
                .get(provider, key_for(provider))
                .unwrap()
                .client_errors,
            1
        );
    }

    pub async fn model_faults(provider: Provider) {
        let h = Harness::default().await;
        let failed = h.embed(provider, "embed-error-500", None).await;
        assert_eq!(failed.status, 500);
        assert!(failed.body["error"].is_object() || failed.body["error"].is_string());
        let limited = h.embed(provider, "embed-ratelimited", None).await;
        assert_eq!(limited.status, 429);
        assert_eq!(limited.retry_after.as_deref(), Some("1"));
        let counts = h.mock.counts();
        let key = counts.get(provider, key_for(provider)).unwrap();
        assert_eq!((key.server_errors, key.rate_limited), (1, 1));
    }
}

/// The embeddings suite for one provider: one line per provider.
macro_rules! conformance {
    ($name:ident, $provider:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn embeds_each_input_deterministically() {
                conformance::embeds_deterministically($provider).await;
            }
            #[tokio::test]
            async fn honours_dimensions_up_to_the_models_length() {
                conformance::honours_dimensions($provider).await;
            }
            #[tokio::test]
            async fn model_faults_apply_to_embeddings() {
                conformance::model_faults($provider).await;
            }
        }
    };
}

conformance!(openai, Provider::OpenAi);
conformance!(gemini, Provider::Gemini);
conformance!(ollama, Provider::Ollama);

#[tokio::test]
async fn embeddings_share_each_keys_rate_limit_with_chat() {
    let h = Harness::start(MockConfig::default().with_rpm(KEY, 2)).await;
    let chat = h
        .post("/v1/chat/completions")
        .bearer_auth(KEY)
        .json(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}));
    assert_eq!(send(chat).await.status, 200);
    assert_eq!(h.embed(Provider::OpenAi, "embed", None).await.status, 200);
    let limited = h.embed(Provider::OpenAi, "embed", None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["code"], "rate_limit_exceeded");
    assert!(limited.retry_after.is_some());

    for _ in 0..2 {
        assert_eq!(h.embed(Provider::Gemini, "embed", None).await.status, 200);
    }
    let limited = h.embed(Provider::Gemini, "embed", None).await;
    assert_eq!(limited.status, 429);
    assert_eq!(limited.body["error"]["status"], "RESOURCE_EXHAUSTED");

    let counts = h.mock.counts();
    let key = counts.get(Provider::OpenAi, KEY).unwrap();
    assert_eq!((key.ok, key.rate_limited, key.max_in_window), (2, 1, 3));
    assert_eq!(counts.over_limit().count(), 2);
}

#[tokio::test]
async fn openai_base64_is_the_floats_little_endian() {
    let h = Harness::default().await;
    let body = json!({"model": "text-embedding-3-small", "input": "hello", "encoding_format": "base64",
        "dimensions": 8});
    let reply = send(h.post("/v1/embeddings").bearer_auth(KEY).json(&body)).await;
    assert_eq!(reply.status, 200);
    let bytes = BASE64
        .decode(reply.body["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, embedding_for("hello", 8));
    assert_eq!(reply.body["object"], "list");
    assert_eq!(reply.body["model"], "text-embedding-3-small");
    // ceil(5 / 4) tokens.
    assert_eq!(
        reply.body["usage"],
        json!({"prompt_tokens": 2, "total_tokens": 2})
    );
}

#[tokio::test]
async fn openai_takes_token_ids() {
    let h = Harness::default().await;
    let body = json!({"model": "text-embedding-3-small", "input": [[1, 2, 3], [4]]});
    let reply = send(h.post("/v1/embeddings").bearer_auth(KEY).json(&body)).await;
    assert_eq!(reply.status, 200);
    assert_eq!(vectors(Provider::OpenAi, &reply.body).len(), 2);
    assert_eq!(reply.body["usage"]["prompt_tokens"], 4);
}

#[tokio::test]
async fn openai_refuses_bad_fields_with_their_param() {
    let h = Harness::default().await;
    let cases = [
        (json!({"model": "e", "input": ""}), None),
        (json!({"model": "e", "input": []}), None),
        (json!({"model": "e", "input": ["a", 1]}), None),
        (
            json!({"model": "e", "input": "a", "encoding_format": "hex"}),
            Some("encoding_format"),
        ),
        (
            json!({"model": "e", "input": "a", "dimensions": 0}),
            Some("dimensions"),
        ),
        (
            json!({"model": "text-embedding-ada-002", "input": "a", "dimensions": 8}),
            None,
        ),
        (json!({"input": "a"}), None),
    ];
    for (body, param) in cases {
        let reply = send(h.post("/v1/embeddings").bearer_auth(KEY).json(&body)).await;
        assert_eq!(reply.status, 400, "{body}");
        assert_eq!(reply.body["error"]["type"], "invalid_request_error");
        assert_eq!(reply.body["error"]["param"].as_str(), param, "{body}");
    }
    let anonymous = send(
        h.post("/v1/embeddings")
            .json(&json!({"model": "e", "input": "a"})),
    )
    .await;
    assert_eq!(anonymous.status, 401);
    let counts = h.mock.counts();
    assert_eq!(counts.get(Provider::OpenAi, KEY).unwrap().client_errors, 7);
    assert_eq!(counts.get(Provider::OpenAi, "").unwrap().unauthorized, 1);
}

#[tokio::test]
async fn gemini_embed_content_and_batch_rules() {
    let h = Harness::default().await;
    let single = h
        .post("/v1beta/models/gemini-embedding-001:embedContent")
        .header("x-goog-api-key", KEY)
        .json(&json!({"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 8}));
    let reply = send(single).await;
    assert_eq!(reply.status, 200);
    assert_close(
        &floats(&reply.body["embedding"]["values"]),
        &embedding_for("hello", 8),
    );
    assert!(
        reply.body.get("usageMetadata").is_none(),
        "Gemini reports no usage"
    );

    let batch = |requests: Vec<Value>| {
        h.post("/v1beta/models/gemini-embedding-001:batchEmbedContents")
            .header("x-goog-api-key", KEY)
            .json(&json!({ "requests": requests }))
    };
    let item = |model: &str| json!({"model": model, "content": {"parts": [{"text": "x"}]}});
    for requests in [
        vec![item("models/other-model")],
        vec![],
        vec![item("models/gemini-embedding-001"); 101],
        vec![json!({"model": "models/gemini-embedding-001"})],
    ] {
        let reply = send(batch(requests)).await;
        assert_eq!(reply.status, 400);
        assert_eq!(reply.body["error"]["status"], "INVALID_ARGUMENT");
    }
    let full = send(batch(vec![item("models/gemini-embedding-001"); 100])).await;
    assert_eq!(full.status, 200);
    assert_eq!(full.body["embeddings"].as_array().unwrap().len(), 100);

    let refused = h
        .embed_with(
            Provider::Gemini,
            "key-invalid",
            "gemini-embedding-001",
            None,
        )
        .await;
    assert_eq!(refused.status, 400);
    assert_eq!(
        refused.body["error"]["details"][0]["reason"],
        "API_KEY_INVALID"
    );
}

#[tokio::test]
async fn ollama_counts_tokens_and_refuses_long_input_without_truncation() {
    let h = Harness::default().await;
    let reply = h.embed(Provider::Ollama, "nomic-embed-text", None).await;
    let tokens: u64 = TEXTS.iter().map(|t| t.len().div_ceil(4) as u64).sum();
    assert_eq!(reply.body["prompt_eval_count"], tokens);
    assert_eq!(reply.body["model"], "nomic-embed-text");

    let long = "x".repeat(OLLAMA_CONTEXT_TOKENS as usize * 4 + 4);
    let strict = json!({"model": "nomic-embed-text", "input": [long], "truncate": false});
    let refused = send(h.post("/api/embed").json(&strict)).await;
    assert_eq!(refused.status, 400);
    assert!(refused.body["error"].is_string());
    let cut = send(
        h.post("/api/embed")
            .json(&json!({"model": "nomic-embed-text", "input": long})),
    )
    .await;
    assert_eq!(cut.status, 200);
    assert_eq!(cut.body["prompt_eval_count"], OLLAMA_CONTEXT_TOKENS);

    let empty = send(
        h.post("/api/embed")
            .json(&json!({"model": "nomic-embed-text", "input": ""})),
    )
    .await;
    assert_eq!(
        (empty.status, empty.body["embeddings"].clone()),
        (200, json!([]))
    );
    let wrong = send(
        h.post("/api/embed")
            .json(&json!({"model": "nomic-embed-text", "input": 7})),
    )
    .await;
    assert_eq!(wrong.status, 400);
    let tags = send(h.client.get(format!("{}/api/tags", h.mock.base_url()))).await;
    let names: Vec<&str> = tags.body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert!(names.contains(&"nomic-embed-text:latest"), "{names:?}");
}
