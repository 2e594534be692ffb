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

/// `value` without the object keys whose value is `null`: `"logprobs": null` and an absent
/// `logprobs` mean the same to an OpenAI client.
fn without_nulls(value: serde_json::Value) -> serde_json::Value {
    match value {
        serde_json::Value::Object(map) => map
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| (k, without_nulls(v)))
            .collect(),
        serde_json::Value::Array(items) => items.into_iter().map(without_nulls).collect(),
        other => other,
    }
}

#[test]
fn response_fields_pass_through() {
    let body = include_bytes!("../testdata/openai_logprobs_response.json");
    let response = Adapter::OpenAi.parse_response(body, "smart").unwrap();
    assert_eq!(response.extra["service_tier"], "default");
    assert_eq!(
        response.system_fingerprint.as_deref(),
        Some("fp_44709d6fcb")
    );
    assert!(
        response
            .usage_details
            .contains_key("completion_tokens_details")
    );
    assert_eq!(response.usage.unwrap().total_tokens, 11);
    assert!(response.choices[0].logprobs.is_some());
    assert!(
        response.choices[0]
            .message
            .extra
            .contains_key("annotations")
    );

    let mut expected: serde_json::Value = serde_json::from_slice(body).unwrap();
    expected["model"] = json!("smart");
    let rendered = serde_json::to_value(&response).unwrap();
    assert_eq!(without_nulls(rendered), without_nulls(expected));
}

#[test]
fn stream_fields_pass_through() {
    let body = include_bytes!("../testdata/openai_logprobs_stream.sse");
    let expected: Vec<serde_json::Value> = std::str::from_utf8(body)
        .unwrap()
        .lines()
        .filter_map(|line| line.strip_prefix("data: {"))
        .map(|rest| {
            let mut chunk: serde_json::Value = serde_json::from_str(&format!("{{{rest}")).unwrap();
            chunk["model"] = json!("smart");
            without_nulls(chunk)
        })
        .collect();
    for split in [0, 7] {
        let mut decoder = Adapter::OpenAi.stream_decoder("smart", true);
        let mut chunks = Vec::new();
        for piece in body.chunks(if split == 0 { body.len() } else { split }) {
            chunks.extend(decoder.feed(piece).unwrap());
        }
        chunks.extend(decoder.finish().unwrap());
        let rendered: Vec<_> = chunks
            .iter()
            .map(|c| without_nulls(serde_json::to_value(c).unwrap()))
            .collect();
        assert_eq!(rendered, expected);
        assert_eq!(decoder.usage().unwrap().total_tokens, 11);
    }

    // Without include_usage the usage chunk, details and all, is not sent.
    let mut decoder = Adapter::OpenAi.stream_decoder("smart", false);
    let mut chunks = decoder.feed(body).unwrap();
    chunks.extend(decoder.finish().unwrap());
    assert_eq!(chunks.len(), expected.len() - 1);
    assert!(
        chunks
            .iter()
            .all(|c| c.usage.is_none() && c.usage_details.is_empty())
    );
    let content_chunk = serde_json::to_value(&chunks[1]).unwrap();
    assert_eq!(without_nulls(content_chunk), expected[1], "logprobs kept");
}

#[test]
fn stream_options_keep_include_obfuscation() {
    let mut value = caller_request();
    value["stream"] = json!(true);
    value["stream_options"] = json!({"include_usage": false, "include_obfuscation": false});
    let req = request(value);
    let built = Adapter::OpenAi
        .build_request("https://api.openai.com", None, "m", &req, true)
        .unwrap();
    assert_eq!(
        body_json(&built)["stream_options"],
        json!({"include_usage": true, "include_obfuscation": false})
    );
}
