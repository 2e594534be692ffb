//! OpenAI specifics; the shared behaviour is in the conformance suite.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use serde_json::json;

use crate::providers::tests::{body_json, request};
use crate::providers::types::ChatRequest;
use crate::providers::{Adapter, ProviderError};

fn caller_request() -> serde_json::Value {
    json!({
        "model": "smart",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"},
                {"type": "image_url", "image_url": {"url": "https://img.example/a.png", "detail": "low"}}]},
            {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "ok"}
        ],
        "max_completion_tokens": 10,
        "stop": ["a", "b"],
        "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "strict": true, "parameters": {"type": "object"}}}],
        "response_format": {"type": "json_object"},
        "seed": 7,
        "n": 2,
        "user": "u-1"
    })
}

#[test]
fn request_round_trips_with_unknown_fields() {
    let value = caller_request();
    let req: ChatRequest = request(value.clone());
    assert_eq!(req.extra.len(), 2, "response_format and seed kept aside");
    assert_eq!(serde_json::to_value(&req).unwrap(), value);
}

#[test]
fn passes_the_request_through_with_the_upstream_model() {
    let req = request(caller_request());
    let built = Adapter::OpenAi
        .build_request(
            "https://api.openai.com",
            Some("sk-x"),
            "gpt-4o-mini",
            &req,
            false,
        )
        .unwrap();
    let mut expected = caller_request();
    expected["model"] = json!("gpt-4o-mini");
    assert_eq!(body_json(&built), expected);
}

#[test]
fn streams_always_ask_for_usage() {
    let mut value = caller_request();
    value["stream"] = json!(true);
    value["stream_options"] = json!({"include_usage": false});
    let req = request(value);
    assert!(!req.include_usage());
    let built = Adapter::OpenAi
        .build_request(
            "http://vllm:8000/v1",
            None,
            "meta-llama/Llama-3.1-8B",
            &req,
            true,
        )
        .unwrap();
    assert_eq!(built.url, "http://vllm:8000/v1/chat/completions");
    assert!(
        built.headers.get("authorization").is_none(),
        "vLLM without a key"
    );
    let body = body_json(&built);
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));

    // Not streaming upstream: neither field is sent (OpenAI rejects stream_options alone).
    let built = Adapter::OpenAi
        .build_request("http://vllm:8000/v1", None, "m", &req, false)
        .unwrap();
    let body = body_json(&built);
    assert!(body.get("stream").is_none() && body.get("stream_options").is_none());
}

#[test]
fn quota_and_reset_headers() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let quota = br#"{"error": {"message": "You exceeded your current quota, please check your plan and billing details.", "type": "insufficient_quota", "param": null, "code": "insufficient_quota"}}"#;
    let err = Adapter::OpenAi.classify_at(429, &HeaderMap::new(), quota, now);
    assert!(
        matches!(err, ProviderError::QuotaExhausted { .. }),
        "{err:?}"
    );
    assert!(err.fails_key() && err.cools_key().is_none());

    let mut headers = HeaderMap::new();
    headers.insert(
        "x-ratelimit-remaining-requests",
        HeaderValue::from_static("0"),
    );
    headers.insert(
        "x-ratelimit-reset-requests",
        HeaderValue::from_static("1m30s"),
    );
    let body = include_bytes!("../testdata/openai_error_429.json");
    let err = Adapter::OpenAi.classify_at(429, &headers, body, now);
    assert_eq!(err.cools_key(), Some(Duration::from_secs(90)));
}

#[test]
fn compatible_servers_flat_errors_and_stream_errors() {
    let now = UNIX_EPOCH;
    let vllm = br#"{"object":"error","message":"The model `x` does not exist.","type":"NotFoundError","param":null,"code":404}"#;
    match Adapter::OpenAi.classify_at(404, &HeaderMap::new(), vllm, now) {
        ProviderError::BadRequest {
            status: 404,
            message,
        } => assert!(message.contains("does not exist")),
        other => panic!("{other:?}"),
    }

    let stream = b"data: {\"error\": {\"message\": \"The server had an error while processing your request.\", \"type\": \"server_error\", \"param\": null, \"code\": null}}\n\n";
    let mut decoder = Adapter::OpenAi.stream_decoder("smart", false);
    let err = decoder.feed(stream).unwrap_err();
    assert!(matches!(err, ProviderError::ServerError { .. }), "{err:?}");
}

#[test]
fn response_with_an_error_instead_of_choices() {
    let body = br#"{"error": {"message": "overloaded", "type": "server_error", "code": null}}"#;
    let err = Adapter::OpenAi.parse_response(body, "smart").unwrap_err();
    assert!(matches!(err, ProviderError::ServerError { .. }), "{err:?}");
}
