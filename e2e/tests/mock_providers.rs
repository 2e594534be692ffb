//! The mock providers, driven over HTTP with reqwest: wire shapes, rate limits, keys, faults
//! and counters. One conformance suite runs against every provider (see `conformance!`).

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use floodgate_e2e::mock::{Counts, Fault, MockConfig, MockProviders, Provider, answer_for};
use futures::StreamExt;
use reqwest::header::HeaderMap;
use reqwest::{Client, RequestBuilder, StatusCode};
use serde_json::{Value, json};

const KEY: &str = "test-key-1";
const PROMPT: &str = "What is the capital of France, and why is it Paris?";

/// A started mock and a client for it.
struct Harness {
    mock: MockProviders,
    client: Client,
}

/// What came back: status, headers and the whole body.
struct Reply {
    status: u16,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    fn text(&self) -> String {
        String::from_utf8(self.body.to_vec()).unwrap()
    }

    fn header(&self, name: &str) -> &str {
        self.headers[name].to_str().unwrap()
    }
}

async fn send(request: RequestBuilder) -> Reply {
    let response = request.send().await.unwrap();
    let (status, headers) = (response.status().as_u16(), response.headers().clone());
    let body = response.bytes().await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
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

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.mock.base_url())
    }

    /// A chat call in `provider`'s own format with `KEY`.
    async fn call(&self, provider: Provider, model: &str, stream: bool) -> Reply {
        self.call_with(provider, KEY, model, stream).await
    }

    async fn call_with(&self, provider: Provider, key: &str, model: &str, stream: bool) -> Reply {
        send(chat(&self.client, &self.mock, provider, key, model, stream)).await
    }

    async fn post(&self, path: &str, body: Value) -> Reply {
        send(self.client.post(self.url(path)).json(&body)).await
    }

    async fn get(&self, path: &str) -> Reply {
        send(self.client.get(self.url(path))).await
    }
}

/// A chat request in `provider`'s own format.
fn chat(
    client: &Client,
    mock: &MockProviders,
    provider: Provider,
    key: &str,
    model: &str,
    stream: bool,
) -> RequestBuilder {
    let base = mock.base_url();
    let messages = json!([{"role": "user", "content": PROMPT}]);
    match provider {
        Provider::OpenAi => client
            .post(format!("{base}/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": model, "messages": messages, "stream": stream})),
        Provider::Anthropic => client
            .post(format!("{base}/v1/messages"))
            .header("x-api-key", key)
            .header("anthropic-version", "2023-06-01")
            .json(&json!({"model": model, "max_tokens": 1024, "messages": messages, "stream": stream})),
        Provider::Gemini => {
            let action = if stream {
                "streamGenerateContent?alt=sse"
            } else {
                "generateContent"
            };
            client
                .post(format!("{base}/v1beta/models/{model}:{action}"))
                .header("x-goog-api-key", key)
                .json(&json!({"contents": [{"role": "user", "parts": [{"text": PROMPT}]}]}))
        }
        Provider::Ollama => client
            .post(format!("{base}/api/chat"))
            .json(&json!({"model": model, "messages": messages, "stream": stream})),
    }
}

/// The answer text of a non-streaming response body.
fn text_of(provider: Provider, body: &Value) -> String {
    let text = match provider {
        Provider::OpenAi => &body["choices"][0]["message"]["content"],
        Provider::Anthropic => &body["content"][0]["text"],
        Provider::Gemini => &body["candidates"][0]["content"]["parts"][0]["text"],
        Provider::Ollama => &body["message"]["content"],
    };
    text.as_str().unwrap().to_owned()
}

/// A stream's events as (event name, data), in order.
fn events(provider: Provider, raw: &str) -> Vec<(Option<String>, String)> {
    if provider == Provider::Ollama {
        return raw
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| (None, l.to_owned()))
            .collect();
    }
    let separator = if provider == Provider::Gemini {
        "\r\n\r\n"
    } else {
        "\n\n"
    };
    raw.split(separator)
        .filter(|block| !block.trim().is_empty())
        .map(|block| {
            let mut name = None;
            let mut data = String::new();
            for line in block.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_owned());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data.push_str(d);
                }
            }
            (name, data)
        })
        .collect()
}

/// The text a stream carries, and whether it ended with its terminal event.
fn stream_text(provider: Provider, raw: &str) -> (String, bool) {
    let mut text = String::new();
    let mut terminated = false;
    for (name, data) in events(provider, raw) {
        if data == "[DONE]" {
            terminated = true;
            continue;
        }
        let event: Value = serde_json::from_str(&data).unwrap();
        let piece = match provider {
            Provider::OpenAi => &event["choices"][0]["delta"]["content"],
            Provider::Anthropic => {
                terminated |= name.as_deref() == Some("message_stop");
                &event["delta"]["text"]
            }
            Provider::Gemini => {
                terminated |= event["candidates"][0]["finishReason"] == "STOP";
                &event["candidates"][0]["content"]["parts"][0]["text"]
            }
            Provider::Ollama => {
                terminated |= event["done"] == true;
                &event["message"]["content"]
            }
        };
        text.push_str(piece.as_str().unwrap_or_default());
    }
    (text, terminated)
}

/// The error `type`/`status` string of an error body, to check it is the provider's own.
fn error_kind(provider: Provider, body: &Value) -> String {
    let kind = match provider {
        Provider::OpenAi => &body["error"]["type"],
        Provider::Anthropic => {
            assert_eq!(body["type"], "error");
            &body["error"]["type"]
        }
        Provider::Gemini => &body["error"]["status"],
        Provider::Ollama => &body["error"],
    };
    kind.as_str().unwrap().to_owned()
}

/// Ollama requests carry no key, so the mock counts them under `""`.
fn key_for(provider: Provider) -> &'static str {
    if provider == Provider::Ollama {
        ""
    } else {
        KEY
    }
}

/// Expected completion tokens for `PROMPT` (one per four characters).
fn answer_tokens() -> u64 {
    answer_for(PROMPT).len().div_ceil(4) as u64
}

mod conformance {
    use super::*;

    pub async fn answers(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.call(provider, "m-1", false).await;
        assert_eq!(reply.status, 200);
        assert_eq!(text_of(provider, &reply.json()), answer_for(PROMPT));
        assert_eq!(h.mock.counts().requests(provider, key_for(provider)), 1);
    }

    pub async fn streams(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.call(provider, "m-1", true).await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            stream_text(provider, &reply.text()),
            (answer_for(PROMPT), true)
        );
    }

    pub async fn status_faults(provider: Provider) {
        let h = Harness::default().await;
        for (model, status) in [
            ("m-error-500", 500),
            ("m-error-503", 503),
            ("m-error-404", 404),
        ] {
            for stream in [false, true] {
                let reply = h.call(provider, model, stream).await;
                assert_eq!(reply.status, status, "{model} stream={stream}");
                assert!(!error_kind(provider, &reply.json()).is_empty());
            }
        }
        let counts = h.mock.counts();
        let key = counts.get(provider, key_for(provider)).unwrap();
        assert_eq!((key.server_errors, key.client_errors), (4, 2));
    }

    pub async fn ratelimited_model(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.call(provider, "m-ratelimited", false).await;
        assert_eq!(reply.status, 429);
        assert_eq!(reply.header("retry-after"), "1");
        let counts = h.mock.counts();
        assert_eq!(
            counts
                .get(provider, key_for(provider))
                .unwrap()
                .rate_limited,
            1
        );
    }

    pub async fn malformed(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.call(provider, "m-malformed", false).await;
        assert_eq!(reply.status, 200);
        assert!(serde_json::from_slice::<Value>(&reply.body).is_err());

        let raw = h.call(provider, "m-malformed", true).await.text();
        let bad = events(provider, &raw)
            .into_iter()
            .filter(|(_, data)| data != "[DONE]")
            .filter(|(_, data)| serde_json::from_str::<Value>(data).is_err())
            .count();
        assert_eq!(bad, 1, "exactly one invalid event in {raw:?}");
    }

    pub async fn truncate(provider: Provider) {
        let h = Harness::default().await;
        let reply = h.call(provider, "m-truncate", true).await;
        assert_eq!(reply.status, 200);
        let (text, terminated) = stream_text(provider, &reply.text());
        assert!(!terminated, "no terminal event in {:?}", reply.text());
        assert!(answer_for(PROMPT).starts_with(&text) && text.len() < answer_for(PROMPT).len());

        // Non-streaming: headers arrive, then the body is cut and the connection aborted.
        let request = chat(&h.client, &h.mock, provider, KEY, "m-truncate", false);
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(response.bytes().await.is_err());
    }

    pub async fn stall(provider: Provider) {
        let h = Harness::default().await;
        let request = chat(&h.client, &h.mock, provider, KEY, "m-stall", true);
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut body = response.bytes_stream();
        let mut received = body.next().await.unwrap().unwrap().to_vec();
        // Absence can only be shown by waiting a little: nothing more arrives.
        loop {
            match tokio::time::timeout(Duration::from_millis(150), body.next()).await {
                Ok(Some(chunk)) => received.extend_from_slice(&chunk.unwrap()),
                Ok(None) => panic!("a stalled stream must not end"),
                Err(_elapsed) => break,
            }
        }
        let (text, terminated) = stream_text(provider, &String::from_utf8(received).unwrap());
        assert!(!terminated && !text.is_empty() && answer_for(PROMPT).starts_with(&text));
        // Shutting down ends stalled streams instead of hanging.
        let shutdown = tokio::time::timeout(Duration::from_secs(5), h.mock.shutdown());
        shutdown.await.unwrap().unwrap();
    }

    pub async fn slow(provider: Provider) {
        let h = Harness::default().await;
        let started = Instant::now();
        assert_eq!(h.call(provider, "m-slow-120", false).await.status, 200);
        assert!(started.elapsed() >= Duration::from_millis(120));
    }

    pub async fn global_fault(provider: Provider) {
        let h = Harness::default().await;
        h.mock.set_fault(provider, Fault::Status(500));
        assert_eq!(h.call(provider, "m", false).await.status, 500);
        let other = Provider::ALL.into_iter().find(|p| *p != provider).unwrap();
        assert_eq!(h.call(other, "m", false).await.status, 200);
        h.mock.clear_fault(provider);
        assert_eq!(h.call(provider, "m", false).await.status, 200);
    }
}

/// The conformance suite for one provider: one line per provider.
macro_rules! conformance {
    ($name:ident, $provider:expr) => {
        mod $name {
            use super::*;

            #[tokio::test]
            async fn answers_deterministically() {
                conformance::answers($provider).await;
            }
            #[tokio::test]
            async fn streams_the_same_answer_with_terminal_event() {
                conformance::streams($provider).await;
            }
            #[tokio::test]
            async fn model_error_codes_use_provider_bodies() {
                conformance::status_faults($provider).await;
            }
            #[tokio::test]
            async fn ratelimited_model_answers_429_with_retry_after() {
                conformance::ratelimited_model($provider).await;
            }
            #[tokio::test]
            async fn malformed_model_sends_invalid_json() {
                conformance::malformed($provider).await;
            }
            #[tokio::test]
            async fn truncate_model_cuts_streams_and_bodies() {
                conformance::truncate($provider).await;
            }
            #[tokio::test]
            async fn stall_model_sends_first_chunk_then_nothing() {
                conformance::stall($provider).await;
            }
            #[tokio::test]
            async fn slow_model_delays_headers() {
                conformance::slow($provider).await;
            }
            #[tokio::test]
            async fn global_fault_applies_to_one_provider_until_cleared() {
                conformance::global_fault($provider).await;
            }
        }
    };
}

conformance!(openai, Provider::OpenAi);
conformance!(anthropic, Provider::Anthropic);
conformance!(gemini, Provider::Gemini);
conformance!(ollama, Provider::Ollama);

// ---- Provider-specific shapes ----

#[tokio::test]
async fn openai_completion_has_usage_and_rate_limit_headers() {
    let h = Harness::start(MockConfig::default().with_rpm(KEY, 5)).await;
    let reply = h.call(Provider::OpenAi, "gpt-4o", false).await;
    assert_eq!(reply.header("x-ratelimit-limit-requests"), "5");
    assert_eq!(reply.header("x-ratelimit-remaining-requests"), "4");
    assert!(reply.header("x-ratelimit-reset-requests").ends_with('s'));
    assert!(reply.headers.contains_key("x-request-id"));
    let body = reply.json();
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "gpt-4o");
    assert_eq!(body["choices"][0]["message"]["role"], "assistant");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    let usage = &body["usage"];
    assert_eq!(usage["completion_tokens"], answer_tokens());
    assert_eq!(usage["prompt_tokens"], PROMPT.len().div_ceil(4) as u64);
    let prompt = usage["prompt_tokens"].as_u64().unwrap();
    assert_eq!(usage["total_tokens"], prompt + answer_tokens());
}

#[tokio::test]
async fn openai_stream_honours_include_usage() {
    let h = Harness::default().await;
    let messages = json!([
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": PROMPT}]}
    ]);
    let request = json!({
        "model": "gpt-4o", "messages": messages, "stream": true,
        "stream_options": {"include_usage": true}
    });
    let reply = send(
        h.client
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&request),
    )
    .await;
    assert!(
        reply
            .header("content-type")
            .starts_with("text/event-stream")
    );
    let events = events(Provider::OpenAi, &reply.text());
    assert_eq!(events.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let (last, rest) = chunks.split_last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"]["completion_tokens"], answer_tokens());
    assert!(
        rest.iter()
            .all(|c| c["usage"].is_null() && c["object"] == "chat.completion.chunk")
    );
    assert_eq!(rest[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(rest.last().unwrap()["choices"][0]["finish_reason"], "stop");

    // Without include_usage there is no usage field at all.
    let reply = h.call(Provider::OpenAi, "gpt-4o", true).await;
    assert!(!reply.text().contains("usage"));
}

#[tokio::test]
async fn openai_max_tokens_cuts_with_length() {
    let h = Harness::default().await;
    let request = json!({"model": "gpt-4o", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]});
    let body = send(
        h.client
            .post(h.url("/v1/chat/completions"))
            .bearer_auth(KEY)
            .json(&request),
    )
    .await
    .json();
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["completion_tokens"], 2);
}

#[tokio::test]
async fn listing_endpoints() {
    let h = Harness::default().await;
    // OpenAI lists models only for a key, as it serves chat.
    assert_eq!(h.get("/v1/models").await.status, 401);
    let models = send(h.client.get(h.url("/v1/models")).bearer_auth("sk-any"))
        .await
        .json();
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["object"], "model");
    let tags = h.get("/api/tags").await.json();
    assert_eq!(tags["models"][0]["name"], "llama3.1:8b");
    assert_eq!(tags["models"][0]["details"]["format"], "gguf");
}

#[tokio::test]
async fn anthropic_message_and_rate_limit_headers() {
    let h = Harness::start(MockConfig::default().with_rpm(KEY, 20)).await;
    let reply = h.call(Provider::Anthropic, "claude-sonnet-4", false).await;
    assert_eq!(reply.header("anthropic-ratelimit-requests-limit"), "20");
    assert_eq!(reply.header("anthropic-ratelimit-requests-remaining"), "19");
    let reset = reply.header("anthropic-ratelimit-requests-reset");
    assert!(
        reset.len() == 20 && reset.ends_with('Z') && reset.as_bytes()[10] == b'T',
        "{reset}"
    );
    assert!(reply.header("request-id").starts_with("req_"));
    let body = reply.json();
    assert_eq!(body["type"], "message");
    assert_eq!(body["role"], "assistant");
    assert_eq!(body["content"][0]["type"], "text");
    assert_eq!(body["stop_reason"], "end_turn");
    assert!(body["stop_sequence"].is_null());
    assert_eq!(body["usage"]["output_tokens"], answer_tokens());
    assert!(body["id"].as_str().unwrap().starts_with("msg_"));
}

#[tokio::test]
async fn anthropic_stream_follows_the_documented_event_order() {
    let h = Harness::default().await;
    let raw = h
        .call(Provider::Anthropic, "claude-sonnet-4", true)
        .await
        .text();
    let events = events(Provider::Anthropic, &raw);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_deref().unwrap()).collect();
    let deltas = answer_for(PROMPT).split_inclusive(' ').count();
    let mut expected = vec!["message_start", "content_block_start", "ping"];
    expected.extend(std::iter::repeat_n("content_block_delta", deltas));
    expected.extend(["content_block_stop", "message_delta", "message_stop"]);
    assert_eq!(names, expected);
    let data: Vec<Value> = events
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    for (event, name) in data.iter().zip(&names) {
        assert_eq!(event["type"], *name, "type matches the event name");
    }
    assert_eq!(data[0]["message"]["content"], json!([]));
    assert!(
        data[0]["message"]["usage"]["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    let message_delta = &data[data.len() - 2];
    assert_eq!(message_delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(message_delta["usage"]["output_tokens"], answer_tokens());
}

#[tokio::test]
async fn anthropic_requires_version_header_and_max_tokens() {
    let h = Harness::default().await;
    let messages = json!([{"role": "user", "content": "hi"}]);
    let post = |body: Value| {
        h.client
            .post(h.url("/v1/messages"))
            .header("x-api-key", KEY)
            .json(&body)
    };
    let no_version = send(post(
        json!({"model": "c", "max_tokens": 10, "messages": messages}),
    ))
    .await;
    let no_max = send(
        post(json!({"model": "c", "messages": messages})).header("anthropic-version", "2023-06-01"),
    )
    .await;
    for reply in [no_version, no_max] {
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json()["error"]["type"], "invalid_request_error");
    }
    assert_eq!(
        h.mock
            .counts()
            .get(Provider::Anthropic, KEY)
            .unwrap()
            .client_errors,
        2
    );
}

#[tokio::test]
async fn anthropic_honours_stop_sequences_as_the_api_does() {
    let h = Harness::default().await;
    let body = |stream: bool| {
        json!({"model": "claude-sonnet-4", "max_tokens": 1024, "stream": stream,
               "stop_sequences": ["nowhere", "capital"],
               "messages": [{"role": "user", "content": PROMPT}]})
    };
    let request = |stream| {
        h.client
            .post(h.url("/v1/messages"))
            .header("x-api-key", KEY)
            .header("anthropic-version", "2023-06-01")
            .json(&body(stream))
    };
    let whole = send(request(false)).await.json();
    assert_eq!(whole["content"][0]["text"], "mock answer to: What is the ");
    assert_eq!(whole["stop_reason"], "stop_sequence");
    assert_eq!(whole["stop_sequence"], "capital");

    let raw = send(request(true)).await.text();
    let data: Vec<Value> = events(Provider::Anthropic, &raw)
        .iter()
        .map(|(_, d)| serde_json::from_str(d).unwrap())
        .collect();
    let text: String = data
        .iter()
        .filter_map(|e| e["delta"]["text"].as_str())
        .collect();
    assert_eq!(text, "mock answer to: What is the ");
    let message_delta = &data[data.len() - 2];
    assert_eq!(
        message_delta["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "capital"})
    );
}

#[tokio::test]
async fn anthropic_overloaded_model_answers_529() {
    let h = Harness::default().await;
    let reply = h
        .call(Provider::Anthropic, "claude-overloaded-529", true)
        .await;
    assert_eq!(reply.status, 529);
    assert_eq!(reply.json()["error"]["type"], "overloaded_error");
}

#[tokio::test]
async fn gemini_shapes_query_key_and_sse_framing() {
    let h = Harness::default().await;
    let request = json!({"contents": [{"parts": [{"text": PROMPT}]}], "generationConfig": {"maxOutputTokens": 100}});
    let body = h
        .post(
            &format!("/v1beta/models/gemini-2.0-flash:generateContent?key={KEY}"),
            request.clone(),
        )
        .await
        .json();
    let candidate = &body["candidates"][0];
    assert_eq!(candidate["content"]["role"], "model");
    assert_eq!(candidate["finishReason"], "STOP");
    assert_eq!(candidate["index"], 0);
    let usage = &body["usageMetadata"];
    assert_eq!(usage["candidatesTokenCount"], answer_tokens());
    let prompt = usage["promptTokenCount"].as_u64().unwrap();
    assert_eq!(usage["totalTokenCount"], prompt + answer_tokens());
    assert_eq!(body["modelVersion"], "gemini-2.0-flash");
    assert_eq!(h.mock.counts().requests(Provider::Gemini, KEY), 1);

    let raw = h
        .call(Provider::Gemini, "gemini-2.0-flash", true)
        .await
        .text();
    assert!(
        raw.starts_with("data: {") && raw.ends_with("}\r\n\r\n"),
        "CRLF framing like Google"
    );
    let events = events(Provider::Gemini, &raw);
    let first: Value = serde_json::from_str(&events[0].1).unwrap();
    assert!(first["candidates"][0]["finishReason"].is_null());
    let last: Value = serde_json::from_str(&events.last().unwrap().1).unwrap();
    assert_eq!(
        last["usageMetadata"]["candidatesTokenCount"],
        answer_tokens()
    );

    // Without alt=sse the stream is one JSON array.
    let path = format!("/v1beta/models/gemini-2.0-flash:streamGenerateContent?key={KEY}");
    let array = h.post(&path, request).await.json();
    assert_eq!(array.as_array().unwrap().len(), events.len());
}

#[tokio::test]
async fn ollama_streams_ndjson_by_default() {
    let h = Harness::default().await;
    let request =
        json!({"model": "llama3.1:8b", "messages": [{"role": "user", "content": PROMPT}]});
    let reply = h.post("/api/chat", request).await;
    assert_eq!(reply.header("content-type"), "application/x-ndjson");
    let last: Value = serde_json::from_str(reply.text().lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["done"], &last["done_reason"]),
        (&json!(true), &json!("stop"))
    );
    assert_eq!(last["eval_count"], answer_tokens());
    assert!(last["total_duration"].as_u64().is_some());

    let body = h.call(Provider::Ollama, "llama3.1:8b", false).await.json();
    assert_eq!(body["done"], true);
    assert_eq!(body["message"]["role"], "assistant");
    assert_eq!(body["prompt_eval_count"], PROMPT.len().div_ceil(4) as u64);
    assert!(body["created_at"].as_str().unwrap().ends_with('Z'));
}

// ---- Keys and rate limits ----

#[tokio::test]
async fn invalid_and_unknown_keys_get_each_providers_auth_error() {
    let h = Harness::start(MockConfig::default().with_valid_keys([KEY, "sk-invalid-listed"])).await;
    let cases = [
        (Provider::OpenAi, 401, "/error/code", "invalid_api_key"),
        (
            Provider::Anthropic,
            401,
            "/error/type",
            "authentication_error",
        ),
        (
            Provider::Gemini,
            400,
            "/error/details/0/reason",
            "API_KEY_INVALID",
        ),
    ];
    for key in ["sk-invalid-listed", "not-listed"] {
        for (provider, status, pointer, expected) in cases {
            let reply = h.call_with(provider, key, "m", false).await;
            assert_eq!(reply.status, status, "{provider} {key}");
            let body = reply.json();
            assert_eq!(
                body.pointer(pointer).unwrap(),
                expected,
                "{provider}: {body}"
            );
            assert!(!reply.text().contains(key), "the key is never echoed whole");
        }
    }
    assert_eq!(
        h.call_with(Provider::Gemini, "", "m", false).await.status,
        403
    );
    assert_eq!(
        h.call_with(Provider::OpenAi, "", "m", false).await.status,
        401
    );
    let counts = h.mock.counts();
    assert_eq!(
        counts
            .get(Provider::OpenAi, "not-listed")
            .unwrap()
            .unauthorized,
        1
    );
    assert_eq!(counts.get(Provider::Gemini, "").unwrap().unauthorized, 1);
}

#[tokio::test]
async fn with_missing_key_allowed_keyless_calls_are_answered_and_given_keys_still_checked() {
    let h = Harness::start(MockConfig::default().with_missing_key_allowed(true)).await;
    for provider in [Provider::OpenAi, Provider::Anthropic, Provider::Gemini] {
        assert_eq!(
            h.call_with(provider, "", "m", false).await.status,
            200,
            "{provider}"
        );
        // A key that is given is still checked.
        assert_eq!(
            h.call_with(provider, "sk-invalid", "m", false).await.status,
            if provider == Provider::Gemini {
                400
            } else {
                401
            },
            "{provider}"
        );
    }
    assert_eq!(h.mock.counts().get(Provider::OpenAi, "").unwrap().ok, 1);
}

#[tokio::test]
async fn keys_over_their_rpm_get_429_with_retry_after_and_provider_body() {
    let h = Harness::start(MockConfig::default().with_rpm(KEY, 2)).await;
    let cases = [
        (Provider::OpenAi, "/error/code", "rate_limit_exceeded"),
        (Provider::Anthropic, "/error/type", "rate_limit_error"),
        (Provider::Gemini, "/error/status", "RESOURCE_EXHAUSTED"),
    ];
    for (provider, pointer, expected) in cases {
        for _ in 0..2 {
            assert_eq!(h.call(provider, "m", false).await.status, 200);
        }
        let limited = h.call(provider, "m", false).await;
        assert_eq!(limited.status, 429, "{provider}");
        let retry_after: u64 = limited.header("retry-after").parse().unwrap();
        assert!((1..=60).contains(&retry_after));
        let body = limited.json();
        assert_eq!(
            body.pointer(pointer).unwrap(),
            expected,
            "{provider}: {body}"
        );
    }
    // Another key is not affected; the limited key was seen 3 times in one window.
    assert_eq!(
        h.call_with(Provider::OpenAi, "other-key", "m", false)
            .await
            .status,
        200
    );
    let counts = h.mock.counts();
    let key = counts.get(Provider::OpenAi, KEY).unwrap();
    assert_eq!((key.ok, key.rate_limited, key.max_in_window), (2, 1, 3));
    assert_eq!(
        counts.over_limit().count(),
        3,
        "all three providers saw KEY over its limit"
    );
}

#[tokio::test]
async fn a_short_window_frees_the_key_once_it_slides() {
    let window = Duration::from_millis(200);
    let h = Harness::start(
        MockConfig::default()
            .with_default_rpm(1)
            .with_window(window),
    )
    .await;
    let first = Instant::now();
    assert_eq!(h.call(Provider::Anthropic, "m", false).await.status, 200);
    // Poll until the key is admitted again: that must not happen before the window slid.
    let deadline = first + Duration::from_secs(10);
    let mut refused = 0;
    loop {
        let status = h.call(Provider::Anthropic, "m", false).await.status;
        if status == 200 {
            break;
        }
        assert_eq!(status, 429);
        refused += 1;
        assert!(Instant::now() < deadline, "key never freed");
    }
    assert!(first.elapsed() >= window && refused > 0);
    let counts = h.mock.counts();
    let key = counts.get(Provider::Anthropic, KEY).unwrap();
    assert_eq!((key.ok, key.rate_limited), (2, refused));
    assert!(key.exceeded_limit(), "the refused polls count as seen");
    assert_eq!(key.timestamps_us.len() as u64, key.requests.min(1024));
}

// ---- Admin endpoints ----

#[tokio::test]
async fn counts_faults_and_reset_over_http() {
    let h = Harness::start(MockConfig::default().with_rpm(KEY, 10)).await;
    for provider in Provider::ALL {
        h.call(provider, "m", false).await;
    }
    let counts: Counts = serde_json::from_slice(&h.get("/_mock/counts").await.body).unwrap();
    assert_eq!(counts, h.mock.counts());
    assert_eq!(counts.total(), 4);
    assert_eq!(counts.get(Provider::OpenAi, KEY).unwrap().limit, Some(10));
    assert_eq!(counts.get(Provider::Ollama, "").unwrap().limit, None);
    assert_eq!(counts.over_limit().count(), 0);

    let set = |fault: Value| {
        h.post(
            "/_mock/faults",
            json!({"provider": "openai", "fault": fault}),
        )
    };
    assert_eq!(set(json!("error-503")).await.status, 204);
    assert_eq!(set(json!("bogus")).await.status, 400);
    let faults = h.get("/_mock/faults").await.json();
    assert_eq!(
        faults,
        json!({"openai": "error-503", "anthropic": null, "gemini": null, "ollama": null})
    );
    assert_eq!(h.call(Provider::OpenAi, "m", false).await.status, 503);
    let clear = h
        .post("/_mock/faults", json!({"provider": "all", "fault": null}))
        .await;
    assert_eq!(clear.status, 204);
    assert_eq!(h.call(Provider::OpenAi, "m", false).await.status, 200);

    assert_eq!(h.post("/_mock/reset", json!({})).await.status, 204);
    assert_eq!(h.mock.counts().total(), 0);
}
