//! What the door carries beyond OpenAI's shape: cache breakpoints, `is_error`, the
//! `anthropic-beta` header and the stop sequence that ended an answer, from the caller to
//! each kind of upstream and back.

use super::{answer, events, ok, translate};
use crate::providers::Adapter;
use crate::providers::stream::ChunkBuilder;
use crate::providers::types::{CacheControl, CacheKind, ChatRequest, FinishReason};
use crate::server::messages::anthropic_betas;
use crate::server::messages::response::to_message;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use serde_json::{Value, json};

/// A conversation with a breakpoint in every place Anthropic allows one, and a failed
/// tool call.
fn cached_request() -> Value {
    let ephemeral = json!({"type": "ephemeral"});
    let hour = json!({"type": "ephemeral", "ttl": "1h"});
    json!({
        "model": "claude-sonnet-4",
        "max_tokens": 64,
        "cache_control": ephemeral,
        "system": [
            {"type": "text", "text": "You are a weather bot."},
            {"type": "text", "text": "Long stable instructions.", "cache_control": hour}
        ],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?", "cache_control": ephemeral},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"},
                 "cache_control": ephemeral}
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking.", "cache_control": ephemeral},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"},
                 "cache_control": ephemeral}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "service down",
                 "is_error": true, "cache_control": ephemeral}
            ]}
        ],
        "tools": [
            {"name": "clock", "input_schema": {"type": "object"}},
            {"name": "weather", "input_schema": {"type": "object"}, "cache_control": ephemeral}
        ]
    })
}

fn upstream_body(adapter: Adapter, req: &ChatRequest) -> Value {
    let built = adapter
        .build_request("http://upstream", Some("k"), "m", req, false)
        .unwrap_or_else(|e| panic!("{adapter:?}: {e}"));
    serde_json::from_slice(&built.body).unwrap()
}

#[test]
fn cache_breakpoints_and_is_error_reach_an_anthropic_upstream_as_sent() {
    let sent = cached_request();
    let req = translate(sent.clone()).unwrap();
    let ephemeral = Some(CacheControl {
        kind: CacheKind::Ephemeral,
        ttl: None,
    });
    assert_eq!(req.cache_control, ephemeral);
    assert!(req.messages[3].tool_error && req.messages[3].text() == "service down");

    let body = upstream_body(Adapter::Anthropic, &req);
    for field in ["system", "messages", "tools", "cache_control"] {
        assert_eq!(body[field], sent[field], "{field}: {body}");
    }
}

#[test]
fn a_system_prompt_without_breakpoints_still_goes_as_one_string() {
    let sent = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 64,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "t", "content": [
                {"type": "text", "text": "a"},
                {"type": "text", "text": "b", "cache_control": {"type": "ephemeral"}}
            ]}
        ]}]
    });
    let body = upstream_body(Adapter::Anthropic, &translate(sent.clone()).unwrap());
    assert_eq!(body["system"], "Be brief.Be kind.");
    assert!(body.get("cache_control").is_none(), "{body}");
    // A breakpoint inside a tool result keeps its blocks apart.
    assert_eq!(
        body["messages"][0]["content"][0]["content"],
        sent["messages"][0]["content"][0]["content"]
    );
}

#[test]
fn other_targets_get_no_breakpoints_and_say_a_tool_failed_their_own_way() {
    let req = translate(cached_request()).unwrap();
    for adapter in [Adapter::OpenAi, Adapter::Gemini, Adapter::Ollama] {
        let body = upstream_body(adapter, &req);
        let text = body.to_string();
        for key in ["cache_control", "is_error", "tool_error"] {
            assert!(!text.contains(key), "{adapter:?} sent {key}: {text}");
        }
    }
    let openai = upstream_body(Adapter::OpenAi, &req);
    let tool = &openai["messages"][3];
    assert_eq!(
        (tool["role"].as_str(), tool["content"].as_str()),
        (Some("tool"), Some("Error: service down"))
    );
    // The assistant's text went as parts (one carried a breakpoint): OpenAI takes those.
    assert_eq!(
        openai["messages"][2]["content"],
        json!([{"type": "text", "text": "Checking."}])
    );
    let gemini = upstream_body(Adapter::Gemini, &req);
    let response = &gemini["contents"][2]["parts"][0]["functionResponse"]["response"];
    assert_eq!(response, &json!({"error": "service down"}));
    let ollama = upstream_body(Adapter::Ollama, &req);
    assert_eq!(ollama["messages"][3]["content"], "Error: service down");
}

/// The OpenAI door reads its body into the same type: a key it does not model in a message
/// part (`cache_control` included) is ignored, as before, and reaches no upstream.
#[test]
fn an_openai_callers_unknown_part_keys_are_ignored_as_before() {
    let req: ChatRequest = serde_json::from_value(json!({
        "model": "m",
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}, "shade": 1}
        ]}],
        "tools": [{"type": "function", "function": {"name": "t"}, "cache_control": {"type": "ephemeral"}}]
    }))
    .unwrap();
    assert!(
        req.messages[0].content.as_ref().unwrap().parts()[0]
            .cache_control()
            .is_none()
    );
    assert!(req.tools.as_ref().unwrap()[0].cache_control.is_none());
    for adapter in [Adapter::OpenAi, Adapter::Anthropic] {
        let text = upstream_body(adapter, &req).to_string();
        assert!(
            !text.contains("cache_control") && !text.contains("shade"),
            "{adapter:?}: {text}"
        );
    }
}

#[test]
fn betas_are_read_from_every_header_line_in_order() {
    let mut headers = HeaderMap::new();
    headers.append(
        "anthropic-beta",
        HeaderValue::from_static("prompt-caching-2024-07-31, token-efficient-tools-2025-02-19"),
    );
    headers.append(
        "anthropic-beta",
        HeaderValue::from_static(" ,context-1m-2025-08-07"),
    );
    assert_eq!(
        anthropic_betas(&headers).unwrap(),
        [
            "prompt-caching-2024-07-31",
            "token-efficient-tools-2025-02-19",
            "context-1m-2025-08-07"
        ]
    );
    assert!(anthropic_betas(&HeaderMap::new()).unwrap().is_empty());
    let mut bad = HeaderMap::new();
    bad.insert(
        "anthropic-beta",
        HeaderValue::from_bytes("caf\u{e9}".as_bytes()).unwrap(),
    );
    let e = anthropic_betas(&bad).unwrap_err();
    assert_eq!(e.status, StatusCode::BAD_REQUEST);
    assert!(e.message.contains("`anthropic-beta`"), "{}", e.message);
}

#[test]
fn a_known_stop_sequence_is_reported_and_an_unknown_one_is_end_turn() {
    let mut stopped = answer(Some("one two"), Vec::new(), FinishReason::Stop);
    stopped.choices[0].stop_sequence = Some("three".to_owned());
    let message = serde_json::to_value(to_message(stopped, "smart".to_owned()).unwrap()).unwrap();
    assert_eq!(
        (&message["stop_reason"], &message["stop_sequence"]),
        (&json!("stop_sequence"), &json!("three"))
    );
    // An OpenAI-format `stop` cannot tell: end_turn, and no sequence is invented.
    let plain = answer(Some("one two"), Vec::new(), FinishReason::Stop);
    let message = serde_json::to_value(to_message(plain, "smart".to_owned()).unwrap()).unwrap();
    assert_eq!(
        (&message["stop_reason"], &message["stop_sequence"]),
        (&json!("end_turn"), &Value::Null)
    );
}

#[tokio::test]
async fn a_streamed_stop_sequence_is_in_message_delta() {
    let mut b = ChunkBuilder::new("smart", true);
    let opening = b.opening();
    let text = b.text("one two");
    b.stop_sequence = Some("three".to_owned());
    let mut chunks = vec![opening, text];
    chunks.extend(b.close(FinishReason::Stop));
    let sent = events(ok(chunks)).await;
    let (_, delta) = sent
        .iter()
        .find(|(name, _)| name == "message_delta")
        .unwrap();
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "stop_sequence", "stop_sequence": "three"})
    );

    let mut b = ChunkBuilder::new("smart", true);
    let mut chunks = vec![b.opening(), b.text("one two")];
    chunks.extend(b.close(FinishReason::Stop));
    let sent = events(ok(chunks)).await;
    let (_, delta) = sent
        .iter()
        .find(|(name, _)| name == "message_delta")
        .unwrap();
    assert_eq!(
        delta["delta"],
        json!({"stop_reason": "end_turn", "stop_sequence": null})
    );
}
