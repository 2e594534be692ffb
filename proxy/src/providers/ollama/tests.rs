//! Ollama specifics; the shared behaviour is in the conformance suite.

use std::time::{Duration, UNIX_EPOCH};

use http::HeaderMap;
use serde_json::json;

use crate::providers::tests::{assert_refused, body_json, build_with, request};
use crate::providers::{Adapter, FinishReason, ProviderError};

const BASE: &str = "http://ollama:11434";

#[test]
fn translates_messages_options_and_tools() {
    let req = request(json!({
        "model": "local",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}
            ]},
            {"role": "assistant", "content": "", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{\"q\":\"pig\"}"}
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a farm animal"}
        ],
        "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
        "max_completion_tokens": 64,
        "temperature": 0.0,
        "stop": "END"
    }));
    let built = Adapter::Ollama
        .build_request(BASE, None, "llama3.2", &req, false)
        .unwrap();
    assert_eq!(built.url, "http://ollama:11434/api/chat");
    assert!(built.headers.get("authorization").is_none());
    assert_eq!(
        body_json(&built),
        json!({
            "model": "llama3.2",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "What is this?", "images": ["iVBORw0K"]},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"function": {"name": "lookup", "arguments": {"q": "pig"}}}
                ]},
                {"role": "tool", "content": "a farm animal", "tool_name": "lookup"}
            ],
            "stream": false,
            "options": {"num_predict": 64, "temperature": 0.0, "stop": ["END"]},
            "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
        })
    );
}

#[test]
fn tool_choice_none_withholds_the_tools() {
    let req = request(json!({
        "model": "m", "messages": [{"role": "user", "content": "Hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"
    }));
    let body = body_json(
        &Adapter::Ollama
            .build_request(BASE, None, "m", &req, true)
            .unwrap(),
    );
    assert_eq!(
        body,
        json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "stream": true})
    );
}

#[test]
fn refuses_remote_images() {
    let req = request(
        json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}}]}]}),
    );
    let err = Adapter::Ollama
        .build_request(BASE, None, "m", &req, false)
        .unwrap_err();
    assert!(matches!(err, ProviderError::BadRequest { .. }), "{err:?}");
}

#[test]
fn length_and_error_lines() {
    let body = br#"{"model":"m","message":{"role":"assistant","content":"Once upon"},"done":true,"done_reason":"length","prompt_eval_count":3,"eval_count":2}"#;
    let response = Adapter::Ollama.parse_response(body, "smart").unwrap();
    assert_eq!(
        response.choices[0].finish_reason,
        Some(FinishReason::Length)
    );

    let stream = b"{\"model\":\"m\",\"message\":{\"role\":\"assistant\",\"content\":\"Hi\"},\"done\":false}\n{\"error\":\"an error was encountered while running the model: unexpected EOF\"}\n";
    let mut decoder = Adapter::Ollama.stream_decoder("smart", false);
    let err = decoder.feed(stream).unwrap_err();
    assert!(matches!(err, ProviderError::ServerError { .. }), "{err:?}");
}

#[test]
fn missing_model_is_a_bad_request() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let body = include_bytes!("../testdata/ollama_error_404.json");
    let err = Adapter::Ollama.classify_at(404, &HeaderMap::new(), body, now);
    match err {
        ProviderError::BadRequest { status, message } => {
            assert_eq!(status, 404);
            assert!(message.contains("not found"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn maps_sampling_into_options_and_response_format_into_format() {
    let body = build_with(
        Adapter::Ollama,
        json!({"top_k": 40, "seed": 42, "frequency_penalty": 0.5, "presence_penalty": 1.5,
               "temperature": 1.2, "response_format": {"type": "json_object"}}),
    )
    .unwrap();
    assert_eq!(
        body["options"],
        json!({"top_k": 40, "seed": 42, "frequency_penalty": 0.5, "presence_penalty": 1.5,
               "temperature": 1.2})
    );
    assert_eq!(body["format"], "json");

    let schema = json!({"type": "object", "properties": {"age": {"type": "integer"}}});
    let body = build_with(
        Adapter::Ollama,
        json!({"response_format": {"type": "json_schema",
               "json_schema": {"name": "person", "schema": schema}}}),
    )
    .unwrap();
    assert_eq!(body["format"], schema);
    assert!(body.get("options").is_none());
}

#[test]
fn refuses_each_field_it_cannot_map_by_name() {
    assert_refused(
        Adapter::Ollama,
        &[
            ("temperature", json!(-1.0)),
            ("top_p", json!(2)),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(3)),
            ("parallel_tool_calls", json!(false)),
            ("logit_bias", json!({"1": 1})),
            ("metadata", json!({"team": "a"})),
            ("store", json!(true)),
            ("reasoning_effort", json!("medium")),
            ("service_tier", json!("flex")),
            ("seed", json!("forty-two")),
        ],
    );
}
