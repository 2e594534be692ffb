//! The provider conformance suite: written once, instantiated per provider from its recorded
//! examples (`testdata/`). A new provider is one `Fixtures` value and one `conformance!` line.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue, header};
use serde_json::{Value, json};

use super::types::{ChatChunk, Role};
use super::*;

const CALLER_MODEL: &str = "smart";
const BASE: &str = "https://upstream.example";
const KEY: &str = "k-secret-123";

/// What one provider's recorded examples must decode to.
struct Fixtures {
    /// URL of a non-streamed and of a streamed request for model `m` at [`BASE`].
    url: &'static str,
    stream_url: &'static str,
    /// Header carrying the key, and its value for [`KEY`].
    auth: (&'static str, &'static str),
    response: &'static [u8],
    response_text: &'static str,
    response_usage: Usage,
    tool_response: &'static [u8],
    tool_response_call: (&'static str, &'static str),
    stream: &'static [u8],
    stream_text: &'static str,
    stream_usage: Usage,
    tool_stream: &'static [u8],
    tool_stream_call: (&'static str, &'static str),
    /// Where the terminal event begins in `stream`: a stream cut there must not pass.
    terminal: &'static str,
    /// Recorded 429 body, and the status and body the provider sends for a bad key.
    rate_limited: &'static [u8],
    unauthorized: (u16, &'static [u8]),
    overloaded_status: u16,
    /// Whether fields Floodgate does not model reach the upstream as sent (OpenAI) rather
    /// than being refused.
    passes_extra: bool,
    /// JSON pointers to the output cap in a built body, the one the provider honours first.
    cap_at: &'static [&'static str],
}

macro_rules! fixture {
    ($file:literal) => {
        include_bytes!(concat!("testdata/", $file))
    };
}

const OPENAI: Fixtures = Fixtures {
    url: "https://upstream.example/v1/chat/completions",
    stream_url: "https://upstream.example/v1/chat/completions",
    auth: ("authorization", "Bearer k-secret-123"),
    response: fixture!("openai_response.json"),
    response_text: "Hello! How can I assist you today?",
    response_usage: Usage::new(19, 10),
    tool_response: br#"{"id":"chatcmpl-abc123","object":"chat.completion","created":1699896916,"model":"gpt-4o-mini","choices":[{"index":0,"message":{"role":"assistant","content":null,"tool_calls":[{"id":"call_abc123","type":"function","function":{"name":"get_weather","arguments":"{\n\"location\": \"Boston, MA\"\n}"}}]},"logprobs":null,"finish_reason":"tool_calls"}],"usage":{"prompt_tokens":82,"completion_tokens":17,"total_tokens":99}}"#,
    tool_response_call: ("get_weather", r#"{"location":"Boston, MA"}"#),
    stream: fixture!("openai_stream.sse"),
    stream_text: "Hello! How can I help?",
    stream_usage: Usage::new(9, 12),
    tool_stream: fixture!("openai_tool_stream.sse"),
    tool_stream_call: ("get_weather", r#"{"location":"Paris, France"}"#),
    terminal: "data: [DONE]",
    rate_limited: fixture!("openai_error_429.json"),
    unauthorized: (401, fixture!("openai_error_401.json")),
    overloaded_status: 503,
    passes_extra: true,
    cap_at: &["/max_completion_tokens", "/max_tokens"],
};

const ANTHROPIC: Fixtures = Fixtures {
    url: "https://upstream.example/v1/messages",
    stream_url: "https://upstream.example/v1/messages",
    auth: ("x-api-key", KEY),
    response: fixture!("anthropic_response.json"),
    response_text: "Hi! My name is Claude.",
    response_usage: Usage::new(2095, 503),
    tool_response: fixture!("anthropic_tool_response.json"),
    tool_response_call: (
        "get_weather",
        r#"{"location":"San Francisco, CA","unit":"celsius"}"#,
    ),
    stream: fixture!("anthropic_stream.sse"),
    stream_text: "Hello!",
    stream_usage: Usage::new(25, 15),
    tool_stream: fixture!("anthropic_tool_stream.sse"),
    tool_stream_call: (
        "get_weather",
        r#"{"location":"San Francisco, CA","unit":"fahrenheit"}"#,
    ),
    terminal: "event: message_stop",
    rate_limited: fixture!("anthropic_error_429.json"),
    unauthorized: (401, fixture!("anthropic_error_401.json")),
    overloaded_status: 529,
    passes_extra: false,
    cap_at: &["/max_tokens"],
};

const GEMINI: Fixtures = Fixtures {
    url: "https://upstream.example/v1beta/models/m:generateContent",
    stream_url: "https://upstream.example/v1beta/models/m:streamGenerateContent?alt=sse",
    auth: ("x-goog-api-key", KEY),
    response: fixture!("gemini_response.json"),
    response_text: "AI learns patterns from data to make predictions or decisions.\n",
    response_usage: Usage::new(8, 11),
    tool_response: fixture!("gemini_tool_response.json"),
    tool_response_call: (
        "get_weather",
        r#"{"location":"San Francisco, CA","unit":"celsius"}"#,
    ),
    stream: fixture!("gemini_stream.sse"),
    stream_text: "Hello there, how can I help?",
    stream_usage: Usage::new(4, 9),
    tool_stream: fixture!("gemini_tool_stream.sse"),
    tool_stream_call: ("get_weather", r#"{"location":"Paris, France"}"#),
    terminal: "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \" can I help?\"}]",
    rate_limited: fixture!("gemini_error_429.json"),
    unauthorized: (400, fixture!("gemini_error_400_key.json")),
    overloaded_status: 503,
    passes_extra: false,
    cap_at: &["/generationConfig/maxOutputTokens"],
};

const OLLAMA: Fixtures = Fixtures {
    url: "https://upstream.example/api/chat",
    stream_url: "https://upstream.example/api/chat",
    auth: ("authorization", "Bearer k-secret-123"),
    response: fixture!("ollama_response.json"),
    response_text: "Hello! How are you today?",
    response_usage: Usage::new(26, 298),
    tool_response: fixture!("ollama_tool_response.json"),
    tool_response_call: (
        "get_current_weather",
        r#"{"format":"celsius","location":"Paris, FR"}"#,
    ),
    stream: fixture!("ollama_stream.ndjson"),
    stream_text: "The sky is blue.",
    stream_usage: Usage::new(26, 282),
    tool_stream: fixture!("ollama_tool_stream.ndjson"),
    tool_stream_call: ("get_weather", r#"{"location":"Paris, France"}"#),
    terminal: "{\"model\":\"llama3.2\",\"created_at\":\"2023-08-04T19:22:45",
    rate_limited:
        br#"{"error":"server busy, please try again. maximum pending requests exceeded"}"#,
    unauthorized: (401, br#"{"error":"unauthorized"}"#),
    overloaded_status: 503,
    passes_extra: false,
    cap_at: &["/options/num_predict"],
};

macro_rules! conformance {
    ($($name:ident => $adapter:expr, $fixtures:expr;)+) => {$(
        mod $name {
            use super::*;

            #[test]
            fn parses_recorded_response() {
                check_response($adapter, &$fixtures);
            }

            #[test]
            fn parses_recorded_tool_response() {
                check_tool_response($adapter, &$fixtures);
            }

            #[test]
            fn rejects_malformed_bodies() {
                check_malformed($adapter);
            }

            #[test]
            fn stream_decodes_the_same_at_any_split() {
                check_stream_splits($adapter, &$fixtures);
            }

            #[test]
            fn stream_usage_chunk_only_when_asked() {
                check_usage_chunk($adapter, &$fixtures);
            }

            #[test]
            fn stream_assembles_tool_calls() {
                check_tool_stream($adapter, &$fixtures);
            }

            #[test]
            fn truncated_stream_is_an_error() {
                check_truncation($adapter, &$fixtures);
            }

            #[test]
            fn builds_requests() {
                check_request($adapter, &$fixtures);
            }

            #[test]
            fn reserves_the_output_cap_it_sends() {
                check_cap_sent($adapter, &$fixtures);
            }

            #[test]
            fn unmodelled_fields_pass_through_or_are_refused() {
                check_unmodelled($adapter, &$fixtures);
            }

            #[test]
            fn classifies_errors() {
                check_errors($adapter, &$fixtures);
            }
        }
    )+};
}

conformance! {
    openai => Adapter::OpenAi, OPENAI;
    anthropic => Adapter::Anthropic, ANTHROPIC;
    gemini => Adapter::Gemini, GEMINI;
    ollama => Adapter::Ollama, OLLAMA;
}

/// A request from its JSON form (what the server module parses).
pub(super) fn request(value: Value) -> ChatRequest {
    serde_json::from_value(value).unwrap()
}

/// The body `adapter` builds for a one-message request with `fields` added.
pub(super) fn build_with(adapter: Adapter, fields: Value) -> Result<Value> {
    let mut value = json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
    if let (Some(req), Value::Object(fields)) = (value.as_object_mut(), fields) {
        req.extend(fields);
    }
    adapter
        .build_request(BASE, None, "m", &request(value), false)
        .map(|built| body_json(&built))
}

/// Asserts that `adapter` refuses each `(field, value)` with a 400 whose message names the
/// field (`` `field` ``, or a part of it: `` `field.part` ``).
pub(super) fn assert_refused(adapter: Adapter, cases: &[(&str, Value)]) {
    for (field, value) in cases {
        let fields = json!({ *field: value });
        match build_with(adapter, fields) {
            Err(ProviderError::BadRequest {
                status: 400,
                message,
            }) => assert!(
                message.contains(&format!("`{field}`")) || message.contains(&format!("`{field}.")),
                "{field}: message does not name the field: {message}"
            ),
            other => panic!("{field} = {value}: expected a 400, got {other:?}"),
        }
    }
}

/// The body of a built request, as JSON.
pub(super) fn body_json(req: &UpstreamRequest) -> Value {
    serde_json::from_slice(&req.body).unwrap()
}

fn basic_request() -> ChatRequest {
    request(json!({
        "model": CALLER_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"}
        ],
        "max_tokens": 100,
        "temperature": 0.5
    }))
}

/// The body fed in pieces of `size` bytes (0: whole), then finished.
fn decode(adapter: Adapter, body: &[u8], size: usize, include_usage: bool) -> Vec<ChatChunk> {
    let mut decoder = adapter.stream_decoder(CALLER_MODEL, include_usage);
    let mut chunks = Vec::new();
    for piece in body.chunks(if size == 0 { body.len() } else { size }) {
        chunks.extend(decoder.feed(piece).unwrap());
    }
    chunks.extend(decoder.finish().unwrap());
    assert!(decoder.is_complete());
    chunks
}

/// Chunks with what legitimately differs between two decoders (clock, generated ids)
/// blanked, so that two decodings can be compared.
fn normalise(mut chunks: Vec<ChatChunk>) -> Vec<ChatChunk> {
    for chunk in &mut chunks {
        chunk.created = 0;
        chunk.id.clear();
        for choice in &mut chunk.choices {
            for call in choice.delta.tool_calls.iter_mut().flatten() {
                call.id = call.id.as_ref().map(|_| "<id>".to_owned());
            }
        }
    }
    chunks
}

/// A streamed answer put back together.
#[derive(Debug, Default)]
struct Assembled {
    text: String,
    /// (id, name, arguments) per tool call.
    calls: Vec<(String, String, String)>,
    finish: Vec<FinishReason>,
    usage: Option<Usage>,
}

fn assemble(chunks: &[ChatChunk]) -> Assembled {
    let mut out = Assembled::default();
    for chunk in chunks {
        if chunk.usage.is_some() {
            out.usage = chunk.usage;
        }
        for choice in &chunk.choices {
            out.text
                .push_str(choice.delta.content.as_deref().unwrap_or(""));
            for call in choice.delta.tool_calls.iter().flatten() {
                let i = call.index as usize;
                if out.calls.len() <= i {
                    out.calls.resize(i + 1, Default::default());
                }
                let function = call.function.clone().unwrap_or_default();
                let entry = &mut out.calls[i];
                if let Some(id) = &call.id {
                    entry.0.clone_from(id);
                }
                if let Some(name) = function.name {
                    entry.1 = name;
                }
                entry
                    .2
                    .push_str(function.arguments.as_deref().unwrap_or(""));
            }
            out.finish.extend(choice.finish_reason);
        }
    }
    out
}

/// What every stream must look like to an OpenAI client.
fn check_shape(chunks: &[ChatChunk], include_usage: bool) {
    let first = chunks.first().expect("at least one chunk");
    assert_eq!(
        first.choices[0].delta.role,
        Some(Role::Assistant),
        "role first"
    );
    for chunk in chunks {
        assert_eq!(chunk.model, CALLER_MODEL);
        assert_eq!(chunk.object, "chat.completion.chunk");
        assert_eq!(chunk.id, first.id);
        assert_eq!(chunk.created, first.created);
    }
    let (body, last) = if include_usage {
        let (last, body) = chunks.split_last().unwrap();
        assert!(
            last.choices.is_empty() && last.usage.is_some(),
            "usage chunk last"
        );
        (body, body.last().unwrap())
    } else {
        (chunks, chunks.last().unwrap())
    };
    assert!(
        body.iter()
            .all(|c| c.usage.is_none() && !c.choices.is_empty())
    );
    assert!(
        last.choices[0].finish_reason.is_some(),
        "finish reason last"
    );
    let finishes = body.iter().filter(|c| c.choices[0].finish_reason.is_some());
    assert_eq!(finishes.count(), 1);
}

fn check_response(adapter: Adapter, f: &Fixtures) {
    let response = adapter.parse_response(f.response, CALLER_MODEL).unwrap();
    assert_eq!(response.model, CALLER_MODEL);
    assert_eq!(response.object, "chat.completion");
    assert!(!response.id.is_empty());
    let choice = &response.choices[0];
    assert_eq!(choice.message.role, Role::Assistant);
    assert_eq!(choice.message.content.as_deref(), Some(f.response_text));
    assert_eq!(choice.finish_reason, Some(FinishReason::Stop));
    assert_eq!(response.usage, Some(f.response_usage));
    // The object serialises back into the OpenAI shape.
    let wire = serde_json::to_value(&response).unwrap();
    assert_eq!(wire["choices"][0]["finish_reason"], "stop");
    assert_eq!(wire["usage"]["total_tokens"], f.response_usage.total_tokens);
}

fn check_tool_response(adapter: Adapter, f: &Fixtures) {
    let response = adapter
        .parse_response(f.tool_response, CALLER_MODEL)
        .unwrap();
    let choice = &response.choices[0];
    assert_eq!(choice.finish_reason, Some(FinishReason::ToolCalls));
    let call = &choice.message.tool_calls.as_ref().unwrap()[0];
    assert!(!call.id.is_empty());
    assert_eq!(call.kind, "function");
    assert_eq!(call.function.name, f.tool_response_call.0);
    let args: Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(
        args,
        serde_json::from_str::<Value>(f.tool_response_call.1).unwrap()
    );
}

fn check_malformed(adapter: Adapter) {
    for body in [
        &b"<html>502 Bad Gateway</html>"[..],
        b"{\"choices\": 5",
        b"",
    ] {
        let err = adapter.parse_response(body, CALLER_MODEL).unwrap_err();
        assert!(matches!(err, ProviderError::Malformed(_)), "{err:?}");
    }
    let mut decoder = adapter.stream_decoder(CALLER_MODEL, false);
    let garbage = b"data: {not json\n\n{not json\n";
    let err = decoder.feed(garbage).unwrap_err();
    assert!(matches!(err, ProviderError::Malformed(_)), "{err:?}");
}

fn check_stream_splits(adapter: Adapter, f: &Fixtures) {
    let whole = decode(adapter, f.stream, 0, true);
    check_shape(&whole, true);
    let assembled = assemble(&whole);
    assert_eq!(assembled.text, f.stream_text);
    assert_eq!(assembled.finish, vec![FinishReason::Stop]);
    assert_eq!(assembled.usage, Some(f.stream_usage));
    let expected = normalise(whole);
    for size in [1, 2, 3, 7, 13, 64] {
        let chunks = normalise(decode(adapter, f.stream, size, true));
        assert_eq!(chunks, expected, "pieces of {size} bytes");
    }
    // Irregular splits from a fixed pseudo-random sequence.
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut decoder = adapter.stream_decoder(CALLER_MODEL, true);
    let (mut rest, mut chunks) = (f.stream, Vec::new());
    while !rest.is_empty() {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let n = ((seed >> 33) % 40 + 1).min(rest.len() as u64) as usize;
        chunks.extend(decoder.feed(&rest[..n]).unwrap());
        rest = &rest[n..];
    }
    chunks.extend(decoder.finish().unwrap());
    assert_eq!(normalise(chunks), expected, "irregular pieces");
}

fn check_usage_chunk(adapter: Adapter, f: &Fixtures) {
    let mut decoder = adapter.stream_decoder(CALLER_MODEL, false);
    let mut chunks = decoder.feed(f.stream).unwrap();
    chunks.extend(decoder.finish().unwrap());
    check_shape(&chunks, false);
    // Budgets are settled from the usage even when the caller did not ask to see it.
    assert_eq!(decoder.usage(), Some(f.stream_usage));
}

fn check_tool_stream(adapter: Adapter, f: &Fixtures) {
    let whole = decode(adapter, f.tool_stream, 0, true);
    check_shape(&whole, true);
    let assembled = assemble(&whole);
    assert_eq!(assembled.finish, vec![FinishReason::ToolCalls]);
    let [(id, name, args)] = assembled.calls.as_slice() else {
        panic!("one tool call expected: {:?}", assembled.calls);
    };
    assert!(!id.is_empty());
    assert_eq!(name, f.tool_stream_call.0);
    let args: Value = serde_json::from_str(args).unwrap();
    assert_eq!(
        args,
        serde_json::from_str::<Value>(f.tool_stream_call.1).unwrap()
    );
    let one_byte = normalise(decode(adapter, f.tool_stream, 1, true));
    assert_eq!(one_byte, normalise(whole));
}

fn check_truncation(adapter: Adapter, f: &Fixtures) {
    let text = std::str::from_utf8(f.stream).unwrap();
    let cut = text
        .rfind(f.terminal)
        .expect("terminal marker in the stream");
    for len in (0..=cut).rev().step_by(3).chain([cut, 0]) {
        let mut decoder = adapter.stream_decoder(CALLER_MODEL, true);
        let fed = decoder.feed(&f.stream[..len]);
        let result = fed.and_then(|_| decoder.finish());
        assert_eq!(result, Err(ProviderError::Truncated), "cut at byte {len}");
        assert!(!decoder.is_complete());
    }
}

fn check_request(adapter: Adapter, f: &Fixtures) {
    let req = basic_request();
    let built = adapter
        .build_request(BASE, Some(KEY), "m", &req, false)
        .unwrap();
    assert_eq!(built.method, http::Method::POST);
    assert_eq!(built.url, f.url);
    assert_eq!(built.headers[header::CONTENT_TYPE], "application/json");
    let auth = &built.headers[f.auth.0];
    assert_eq!(auth, f.auth.1);
    assert!(auth.is_sensitive(), "the key header is marked sensitive");
    assert!(
        !format!("{built:?}").contains(KEY),
        "the key never shows in Debug"
    );
    let body = body_json(&built);
    assert!(body.is_object());
    assert!(!body.to_string().contains(KEY));

    let streamed = adapter
        .build_request(BASE, Some(KEY), "m", &req, true)
        .unwrap();
    assert_eq!(streamed.url, f.stream_url);
    // A trailing slash on the base URL changes nothing.
    let slashed = adapter
        .build_request("https://upstream.example/", Some(KEY), "m", &req, true)
        .unwrap();
    assert_eq!(slashed.url, f.stream_url);

    let keyless = adapter.build_request(BASE, None, "m", &req, false).unwrap();
    assert!(keyless.headers.get(f.auth.0).is_none());

    let err = adapter
        .build_request(BASE, Some("bad\nkey"), "m", &req, false)
        .unwrap_err();
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err:?}");
    assert!(!err.to_string().contains("bad\nkey"));
}

/// A field nobody models either reaches the upstream untouched or is refused by name: it is
/// never dropped silently.
fn check_unmodelled(adapter: Adapter, f: &Fixtures) {
    let custom = json!({"x_floodgate_probe": {"a": [1, 2]}});
    if f.passes_extra {
        let body = build_with(adapter, custom).unwrap();
        assert_eq!(body["x_floodgate_probe"], json!({"a": [1, 2]}));
    } else {
        assert_refused(adapter, &[("x_floodgate_probe", json!({"a": [1, 2]}))]);
        // Nor is a field the target cannot honour, when sent with a neutral one.
        let err = build_with(
            adapter,
            json!({"store": false, "audio": {"voice": "alloy"}}),
        );
        assert!(
            matches!(err, Err(ProviderError::BadRequest { .. })),
            "{err:?}"
        );
    }
}

/// `max_output_tokens_sent` is what the built body holds, for every way of setting a cap.
fn check_cap_sent(adapter: Adapter, f: &Fixtures) {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let caps = [
        json!({}),
        json!({"max_tokens": 100}),
        json!({"max_completion_tokens": 50}),
        json!({"max_completion_tokens": 50, "max_tokens": 99}),
    ];
    for cap in caps {
        let mut value = json!({"model": "m", "messages": messages});
        value
            .as_object_mut()
            .unwrap()
            .extend(cap.as_object().unwrap().clone());
        let req = request(value);
        for stream in [false, true] {
            let body = body_json(
                &adapter
                    .build_request(BASE, None, "m", &req, stream)
                    .unwrap(),
            );
            let in_body = f
                .cap_at
                .iter()
                .find_map(|pointer| body.pointer(pointer))
                .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap());
            assert_eq!(
                adapter.max_output_tokens_sent(&req),
                in_body,
                "{cap} {body}"
            );
        }
    }
}

fn check_errors(adapter: Adapter, f: &Fixtures) {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let mut headers = HeaderMap::new();
    headers.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
    let err = adapter.classify_at(429, &headers, f.rate_limited, now);
    assert!(matches!(err, ProviderError::RateLimited { .. }), "{err:?}");
    assert_eq!(err.cools_key(), Some(Duration::from_secs(7)));
    assert!(err.retryable() && !err.opens_circuit() && !err.fails_key());
    assert_eq!(err.http_status(), 429);

    let (status, body) = f.unauthorized;
    let err = adapter.classify_at(status, &HeaderMap::new(), body, now);
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err:?}");
    assert!(err.fails_key() && err.retryable());
    assert_eq!(err.fault(), Fault::Upstream);
    assert!(
        !err.to_string().contains("abc123"),
        "no key fragment: {err}"
    );

    let err = adapter.classify_at(500, &HeaderMap::new(), b"<html>oops</html>", now);
    assert!(
        matches!(err, ProviderError::ServerError { status: 500, .. }),
        "{err:?}"
    );
    assert!(err.opens_circuit() && err.retryable());

    let err = adapter.classify_at(f.overloaded_status, &HeaderMap::new(), b"", now);
    assert!(matches!(err, ProviderError::Overloaded { .. }), "{err:?}");
    assert!(err.opens_circuit());

    let err = adapter.classify_at(400, &HeaderMap::new(), br#"{"error":"bad"}"#, now);
    assert!(
        matches!(err, ProviderError::BadRequest { status: 400, .. }),
        "{err:?}"
    );
    assert!(!err.retryable());
    assert_eq!(err.fault(), Fault::Downstream);

    assert_eq!(
        adapter.classify_at(504, &HeaderMap::new(), b"", now),
        ProviderError::Timeout
    );
}

#[test]
fn adapters_for_provider_types() {
    assert_eq!(Adapter::for_type(ProviderType::Openai), Adapter::OpenAi);
    assert_eq!(
        Adapter::for_type(ProviderType::OpenaiCompatible),
        Adapter::OpenAi
    );
    assert_eq!(
        Adapter::for_type(ProviderType::Anthropic),
        Adapter::Anthropic
    );
    assert_eq!(Adapter::for_type(ProviderType::Gemini), Adapter::Gemini);
    assert_eq!(Adapter::for_type(ProviderType::Ollama), Adapter::Ollama);
}

#[test]
fn endpoint_does_not_repeat_the_version() {
    assert_eq!(
        endpoint("http://vllm:8000/v1", "v1", "chat/completions"),
        "http://vllm:8000/v1/chat/completions"
    );
    assert_eq!(
        endpoint("http://vllm:8000/", "v1", "chat/completions"),
        "http://vllm:8000/v1/chat/completions"
    );
    assert_eq!(
        endpoint("https://proxy/anthropic/v1/", "v1", "messages"),
        "https://proxy/anthropic/v1/messages"
    );
}

#[test]
fn estimates_prompt_tokens() {
    let short = estimate_prompt_tokens(&basic_request());
    // 2 messages x 4 + 3 priming + ceil(14 bytes / 4).
    assert_eq!(short, 2 * 4 + 3 + 4);
    let long = request(json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "x".repeat(4000)},
            {"type": "image_url", "image_url": {"url": "https://img.example/a.png"}}
        ]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    }));
    let estimate = estimate_prompt_tokens(&long);
    assert!((1085..1110).contains(&estimate), "{estimate}");
}

fn chunk_of(text: &str) -> ChatChunk {
    serde_json::from_value(json!({
        "id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": null}]
    }))
    .unwrap()
}

/// A stream the caller left without the provider's count is settled at the estimate of its
/// output, by character class: Latin text about four characters a token (unchanged), CJK
/// text one token a character. A token per four bytes gave CJK three quarters of a token a
/// character, a quarter fewer than the providers count.
#[test]
fn output_is_estimated_by_character_class() {
    let latin = "The quick brown fox jumps over the lazy dog. ".repeat(10);
    assert_eq!(latin.len(), 450);
    assert_eq!(estimate_output_tokens(&chunk_of(&latin)), 113);
    for cjk in [
        "今天天气很好，我们去公园散步吧。",
        "東京は日本の首都です。",
        "안녕하세요, 반갑습니다.",
    ] {
        let text = cjk.repeat(20);
        let chars = text.chars().filter(|c| !c.is_ascii()).count() as u64;
        let ascii = text.chars().filter(char::is_ascii).count() as u64;
        let estimate = estimate_output_tokens(&chunk_of(&text));
        assert_eq!(estimate, chars + ascii.div_ceil(4), "{cjk}");
        assert!(
            estimate > (text.len() as u64).div_ceil(4),
            "{cjk}: no more than bytes/4"
        );
    }
    // Two-byte scripts keep about two characters a token.
    assert_eq!(estimate_output_tokens(&chunk_of("Привет")), 3);
    // The prompt is estimated the same way.
    let prompt = request(json!({
        "model": "m",
        "messages": [{"role": "user", "content": "你好世界".repeat(100)}]
    }));
    assert_eq!(estimate_prompt_tokens(&prompt), 4 + 3 + 400);
}
