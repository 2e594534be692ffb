//! The Messages door: request translation and refusals, the `message` answer, the event
//! stream, the error format, and `count_tokens` through the router.

use super::error::{error_response, error_type};
use super::request::{MessagesRequest, Purpose};
use super::response::{OutputBlock, to_message};
use super::stream::encode;
use crate::providers::ProviderError;
use crate::providers::stream::ChunkBuilder;
use crate::providers::types::{
    ChatChunk, ChatRequest, ChatResponse, ContentPart, FinishReason, FunctionCall, MessageContent,
    Role, Stop, ToolCall, ToolChoice, ToolChoiceMode, Usage,
};
use crate::server::error::ApiError;
use axum::http::StatusCode;
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::time::Duration;

fn translate(body: Value) -> Result<ChatRequest, ApiError> {
    let req: MessagesRequest = serde_json::from_value(body).unwrap();
    req.into_chat(Purpose::Create)
}

/// A minimal valid request with `extra` merged into it.
fn body(extra: Value) -> Value {
    let mut body = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The 400 for `body`; its message must name `field`.
fn refused(body: Value, field: &str) -> String {
    let e = translate(body).unwrap_err();
    assert_eq!(e.status, StatusCode::BAD_REQUEST, "{}", e.message);
    assert!(
        e.message.contains(field),
        "{:?} does not name {field}",
        e.message
    );
    e.message
}

#[test]
fn a_full_request_translates_to_the_internal_shape() {
    let req = translate(json!({
        "model": "claude-sonnet-4",
        "max_tokens": 256,
        "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBOR"}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}}
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "cats"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": true,
                 "content": [{"type": "text", "text": "timeout"}]},
                {"type": "text", "text": "Try again?"}
            ]}
        ],
        "stop_sequences": ["END"],
        "stream": true,
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "u-42"},
        "tools": [{"name": "lookup", "description": "Looks up", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
    }))
    .unwrap();
    let roles: Vec<Role> = req.messages.iter().map(|m| m.role).collect();
    assert_eq!(
        roles,
        [
            Role::System,
            Role::User,
            Role::Assistant,
            Role::Tool,
            Role::User
        ]
    );
    assert_eq!(req.messages[0].text(), "Be brief.Be kind.");
    let Some(MessageContent::Parts(parts)) = &req.messages[1].content else {
        panic!("user content is not parts: {:?}", req.messages[1].content);
    };
    let urls: Vec<&str> = parts
        .iter()
        .filter_map(|p| match p {
            ContentPart::ImageUrl { image_url, .. } => Some(image_url.url.as_str()),
            ContentPart::Text { .. } => None,
        })
        .collect();
    assert_eq!(
        urls,
        ["data:image/png;base64,iVBOR", "https://example.com/a.jpg"]
    );
    let assistant = &req.messages[2];
    assert_eq!(assistant.text(), "Let me look.");
    let call = &assistant.tool_calls.as_ref().unwrap()[0];
    assert_eq!(
        (call.id.as_str(), call.function.name.as_str()),
        ("toolu_1", "lookup")
    );
    let arguments: Value = serde_json::from_str(&call.function.arguments).unwrap();
    assert_eq!(arguments, json!({"q": "cats"}));
    let tool = &req.messages[3];
    assert_eq!(tool.tool_call_id.as_deref(), Some("toolu_1"));
    // `is_error` is a flag on the tool message, not a prefix of its text.
    assert!(tool.tool_error);
    assert_eq!(tool.text(), "timeout");
    assert_eq!(req.messages[4].text(), "Try again?");

    assert_eq!(req.max_tokens, Some(256));
    assert_eq!(req.stop, Some(Stop::Many(vec!["END".to_owned()])));
    assert!(req.stream && req.include_usage());
    assert_eq!((req.temperature, req.top_p), (Some(0.5), Some(0.9)));
    assert_eq!(req.extra["top_k"], json!(40));
    assert_eq!(req.extra["parallel_tool_calls"], json!(false));
    assert_eq!(req.user.as_deref(), Some("u-42"));
    let tools = req.tools.unwrap();
    assert_eq!(tools[0].function.name, "lookup");
    assert_eq!(
        tools[0].function.parameters,
        Some(json!({"type": "object"}))
    );
    assert_eq!(
        req.tool_choice,
        Some(ToolChoice::Mode(ToolChoiceMode::Required))
    );
}

/// What the door translates, the Anthropic adapter sends upstream: a request that only
/// passes through the internal shape comes out as it came in.
#[test]
fn a_request_survives_the_round_trip_to_an_anthropic_upstream() {
    let sent = json!({
        "model": "claude-sonnet-4",
        "max_tokens": 64,
        "system": "Be brief.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18C"}
            ]}
        ],
        "top_k": 5,
        "stop_sequences": ["END"],
        "tools": [{"name": "weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": true}
    });
    let req = translate(sent.clone()).unwrap();
    let upstream = crate::providers::Adapter::Anthropic
        .build_request("http://upstream", Some("k"), "claude-sonnet-4", &req, false)
        .unwrap();
    let body: Value = serde_json::from_slice(&upstream.body).unwrap();
    for field in [
        "model",
        "max_tokens",
        "system",
        "top_k",
        "stop_sequences",
        "tool_choice",
    ] {
        assert_eq!(body[field], sent[field], "{field}: {body}");
    }
    assert_eq!(
        body["messages"][1]["content"],
        sent["messages"][1]["content"]
    );
    assert_eq!(body["messages"][2]["content"][0]["tool_use_id"], "toolu_1");
    assert_eq!(body["messages"][2]["content"][0]["content"], "18C");
    assert_eq!(body["tools"][0]["input_schema"], json!({"type": "object"}));
}

#[test]
fn tool_choices_map_to_their_openai_equivalents() {
    let choice = |c: Value| translate(body(json!({"tool_choice": c}))).unwrap();
    let auto = choice(json!({"type": "auto"}));
    assert_eq!(
        auto.tool_choice,
        Some(ToolChoice::Mode(ToolChoiceMode::Auto))
    );
    assert!(auto.extra.is_empty(), "{:?}", auto.extra);
    let none = choice(json!({"type": "none"}));
    assert_eq!(
        none.tool_choice,
        Some(ToolChoice::Mode(ToolChoiceMode::None))
    );
    let named = choice(json!({"type": "tool", "name": "lookup"}));
    let Some(ToolChoice::Named(named)) = named.tool_choice else {
        panic!("not a named choice");
    };
    assert_eq!(named.function.name, "lookup");
    refused(
        body(json!({"tool_choice": {"type": "tool"}})),
        "tool_choice.name",
    );
}

#[test]
fn a_plain_request_is_not_streamed_and_carries_no_extras() {
    let req = translate(body(json!({}))).unwrap();
    assert!(!req.stream);
    assert_eq!(req.stream_options, None);
    assert!(req.extra.is_empty());
    assert_eq!(req.messages.len(), 1);
    assert_eq!(req.messages[0].role, Role::User);
}

#[test]
fn max_tokens_is_required_to_create_but_not_to_count() {
    let mut without = body(json!({}));
    without.as_object_mut().unwrap().remove("max_tokens");
    refused(without.clone(), "`max_tokens`");
    let req: MessagesRequest = serde_json::from_value(without).unwrap();
    assert!(req.into_chat(Purpose::CountTokens).is_ok());
    refused(body(json!({"max_tokens": 0})), "`max_tokens`");
}

#[test]
fn untranslatable_fields_are_refused_by_name() {
    let thinking = json!({"type": "enabled", "budget_tokens": 2000});
    let message = refused(body(json!({"thinking": thinking})), "`thinking`");
    assert!(
        message.contains("not supported by this gateway"),
        "{message}"
    );
    refused(body(json!({"mcp_servers": []})), "`mcp_servers`");
    refused(body(json!({"no_such_field": 1})), "`no_such_field`");
    refused(
        body(json!({"metadata": {"user_id": "u", "tier": "x"}})),
        "metadata.tier",
    );
    let choice = json!({"type": "auto", "strict": true});
    refused(body(json!({"tool_choice": choice})), "tool_choice.strict");
    let search = json!([{"type": "web_search_20250305", "name": "web_search"}]);
    refused(body(json!({"tools": search})), "web_search_20250305");
    let cached = json!([{"name": "t", "input_schema": {}, "cache_control": {"type": "forever"}}]);
    refused(body(json!({"tools": cached})), "`tools[0].cache_control`");
    let ttl = json!({"type": "ephemeral", "ttl": "5m", "scope": "org"});
    refused(body(json!({"cache_control": ttl})), "`cache_control`");
    refused(
        body(json!({"tools": [{"name": "t"}]})),
        "tools[0].input_schema",
    );
}

#[test]
fn untranslatable_blocks_are_refused_by_path() {
    let user = |content: Value| body(json!({"messages": [{"role": "user", "content": content}]}));
    let cached = json!([{"type": "text", "text": "x", "cache_control": "ephemeral"}]);
    refused(user(cached), "`messages[0].content[0].cache_control`");
    let result = json!([{"type": "tool_result", "tool_use_id": "t", "content": "x",
        "cache_control": {"type": "persistent"}}]);
    refused(user(result), "`messages[0].content[0].cache_control`");
    let document = json!([{"type": "document", "source": {"type": "text", "data": "x"}}]);
    let message = refused(user(document), "`document`");
    assert!(message.contains("messages[0].content[0]"), "{message}");
    let file = json!([{"type": "image", "source": {"type": "file", "file_id": "f"}}]);
    refused(user(file), "`file`");
    let broken = json!([{"type": "text"}]);
    refused(user(broken), "`text`");
    let misplaced = json!([{"type": "tool_use", "id": "t", "name": "n", "input": {}}]);
    refused(user(misplaced), "messages[0].content[0]");
    let thinking = json!([{"type": "thinking", "thinking": "hmm", "signature": "s"}]);
    let history = json!([
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": thinking}
    ]);
    refused(body(json!({"messages": history})), "`thinking`");
    let image = json!({"type": "image", "source": {"type": "url", "url": "https://x/y.png"}});
    let result = json!([{"type": "tool_result", "tool_use_id": "t", "content": [image]}]);
    refused(user(result), "messages[0].content[0].content[0]");
    let system = json!([{"type": "text", "text": "s", "citations": [{"type": "x"}]}]);
    refused(body(json!({"system": system})), "system[0].citations");
}

#[test]
fn harmless_fields_are_accepted() {
    let req = translate(body(
        json!({"thinking": {"type": "disabled"}, "container": null}),
    ));
    assert!(req.is_ok(), "{:?}", req.err());
}

#[test]
fn out_of_range_and_empty_requests_are_refused() {
    refused(body(json!({"temperature": 1.5})), "`temperature`");
    refused(body(json!({"messages": []})), "`messages`");
}

fn answer(content: Option<&str>, calls: Vec<ToolCall>, reason: FinishReason) -> ChatResponse {
    crate::providers::completion(
        "chatcmpl-1".to_owned(),
        "gpt-4o-mini",
        content.unwrap_or_default().to_owned(),
        calls,
        reason,
        Usage::new(12, 34),
    )
}

fn call(id: &str, arguments: &str) -> ToolCall {
    ToolCall {
        id: id.to_owned(),
        kind: "function".to_owned(),
        function: FunctionCall {
            name: "lookup".to_owned(),
            arguments: arguments.to_owned(),
        },
        cache_control: None,
    }
}

#[test]
fn a_complete_answer_becomes_a_message() {
    let response = answer(
        Some("Looking."),
        vec![call("call_1", r#"{"q":"cats"}"#)],
        FinishReason::ToolCalls,
    );
    let message = to_message(response, "smart".to_owned()).unwrap();
    let json = serde_json::to_value(&message).unwrap();
    assert!(json["id"].as_str().unwrap().starts_with("msg_"), "{json}");
    assert_eq!(json["type"], "message");
    assert_eq!(json["role"], "assistant");
    assert_eq!(json["model"], "smart");
    assert_eq!(json["stop_reason"], "tool_use");
    assert_eq!(json["stop_sequence"], Value::Null);
    assert_eq!(
        json["usage"],
        json!({"input_tokens": 12, "output_tokens": 34})
    );
    assert_eq!(
        message.content,
        [
            OutputBlock::Text {
                text: "Looking.".to_owned()
            },
            OutputBlock::ToolUse {
                id: "call_1".to_owned(),
                name: "lookup".to_owned(),
                input: json!({"q": "cats"}),
            },
        ]
    );
}

#[test]
fn finish_reasons_map_to_stop_reasons() {
    for (reason, expected) in [
        (FinishReason::Stop, "end_turn"),
        (FinishReason::Length, "max_tokens"),
        (FinishReason::ToolCalls, "tool_use"),
        (FinishReason::ContentFilter, "refusal"),
    ] {
        let message = to_message(answer(Some("x"), vec![], reason), "m".to_owned()).unwrap();
        assert_eq!(message.stop_reason, Some(expected), "{reason:?}");
    }
    let mut refusal = answer(None, vec![], FinishReason::Stop);
    refusal.choices[0].message.refusal = Some("I can't help with that.".to_owned());
    let message = to_message(refusal, "m".to_owned()).unwrap();
    assert_eq!(message.stop_reason, Some("refusal"));
    assert_eq!(message.content.len(), 1);
}

#[test]
fn tool_arguments_that_are_not_an_object_are_a_bad_gateway() {
    let response = answer(None, vec![call("c", "[1, 2]")], FinishReason::ToolCalls);
    let e = to_message(response, "m".to_owned()).unwrap_err();
    assert_eq!(e.status, StatusCode::BAD_GATEWAY);
    let mut empty = answer(Some("x"), vec![], FinishReason::Stop);
    empty.choices.clear();
    assert!(to_message(empty, "m".to_owned()).is_err());
}

/// The events `chunks` encode to, as (event name, data) pairs.
async fn events(chunks: Vec<Result<ChatChunk, ProviderError>>) -> Vec<(String, Value)> {
    let bytes: Vec<u8> = encode(futures::stream::iter(chunks), "smart".to_owned(), 7)
        .collect::<Vec<_>>()
        .await
        .concat();
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.ends_with("\n\n"), "{text:?}");
    text.split_terminator("\n\n")
        .map(|frame| {
            let (event, data) = frame.split_once('\n').unwrap();
            let event = event.strip_prefix("event: ").unwrap();
            let data: Value = serde_json::from_str(data.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(data["type"], event, "{frame}");
            (event.to_owned(), data)
        })
        .collect()
}

fn names(events: &[(String, Value)]) -> Vec<&str> {
    events.iter().map(|(name, _)| name.as_str()).collect()
}

fn ok(chunks: Vec<ChatChunk>) -> Vec<Result<ChatChunk, ProviderError>> {
    chunks.into_iter().map(Ok).collect()
}

#[tokio::test]
async fn a_text_stream_has_anthropics_event_sequence() {
    let mut b = ChunkBuilder::new("gpt-4o-mini", true);
    let mut chunks = vec![b.opening(), b.text("Hel"), b.text("lo")];
    b.usage = Some(Usage::new(11, 2));
    chunks.extend(b.close(FinishReason::Stop));
    let events = events(ok(chunks)).await;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let start = &events[0].1["message"];
    assert!(start["id"].as_str().unwrap().starts_with("msg_"));
    assert_eq!(start["model"], "smart");
    assert_eq!(start["content"], json!([]));
    assert_eq!(start["stop_reason"], Value::Null);
    assert_eq!(start["usage"]["input_tokens"], 7);
    assert_eq!(
        events[1].1["content_block"],
        json!({"type": "text", "text": ""})
    );
    let text: String = events
        .iter()
        .filter(|(name, _)| name == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap())
        .collect();
    assert_eq!(text, "Hello");
    let delta = &events[6].1;
    assert_eq!(delta["delta"]["stop_reason"], "end_turn");
    assert_eq!(
        delta["usage"],
        json!({"input_tokens": 11, "output_tokens": 2})
    );
}

#[tokio::test]
async fn tool_calls_stream_as_one_block_each_after_the_text() {
    let mut b = ChunkBuilder::new("m", true);
    let mut chunks = vec![b.opening(), b.text("Checking.")];
    chunks.push(b.tool_call_start("call_a".into(), "lookup".into(), String::new()));
    chunks.push(b.tool_arguments(0, r#"{"q":"#));
    chunks.push(b.tool_arguments(0, r#""cats"}"#));
    chunks.push(b.tool_call_start("call_b".into(), "lookup".into(), "{}".into()));
    b.usage = Some(Usage::new(5, 9));
    chunks.extend(b.close(FinishReason::ToolCalls));
    let events = events(ok(chunks)).await;
    assert_eq!(
        names(&events),
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_delta",
            "content_block_stop",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
        ]
    );
    let block = |i: usize| &events[i].1;
    assert_eq!(block(4)["index"], 0);
    assert_eq!(
        block(5)["content_block"],
        json!({"type": "tool_use", "id": "call_a", "name": "lookup", "input": {}})
    );
    assert_eq!(block(5)["index"], 1);
    let partial: String = [6, 7]
        .iter()
        .map(|&i| block(i)["delta"]["partial_json"].as_str().unwrap())
        .collect();
    assert_eq!(block(6)["delta"]["type"], "input_json_delta");
    assert_eq!(
        serde_json::from_str::<Value>(&partial).unwrap(),
        json!({"q": "cats"})
    );
    assert_eq!(block(8)["index"], 1);
    assert_eq!(block(9)["index"], 2);
    assert_eq!(block(9)["content_block"]["id"], "call_b");
    assert_eq!(block(12)["delta"]["stop_reason"], "tool_use");
    assert_eq!(block(12)["usage"]["output_tokens"], 9);
}

#[tokio::test]
async fn an_upstream_failure_mid_stream_is_an_error_event() {
    let mut b = ChunkBuilder::new("m", true);
    let mut chunks = ok(vec![b.opening(), b.text("Hal")]);
    chunks.push(Err(ProviderError::Overloaded {
        status: 529,
        retry_after: None,
        message: "busy".into(),
    }));
    chunks.push(Ok(b.text("never sent")));
    let seen = events(chunks).await;
    let (last, data) = seen.last().unwrap();
    assert_eq!(last, "error");
    assert_eq!(data["error"]["type"], "overloaded_error");
    assert!(!names(&seen).contains(&"message_stop"));
    assert_eq!(
        names(&seen)
            .iter()
            .filter(|n| **n == "content_block_delta")
            .count(),
        1
    );

    let broken = events(vec![Err(ProviderError::Truncated)]).await;
    assert_eq!(names(&broken), ["error"]);
    assert_eq!(broken[0].1["error"]["type"], "api_error");
}

#[tokio::test]
async fn a_stream_without_a_finish_reason_ends_in_an_error() {
    let mut b = ChunkBuilder::new("m", true);
    let events = events(ok(vec![b.opening(), b.text("Hal")])).await;
    let (last, data) = events.last().unwrap();
    assert_eq!(last, "error");
    assert_eq!(data["error"]["type"], "api_error");
    assert!(!names(&events).contains(&"message_stop"));
}

#[tokio::test]
async fn a_stream_without_a_usage_chunk_still_stops_cleanly() {
    let mut b = ChunkBuilder::new("m", false);
    let mut chunks = vec![b.opening(), b.text("Hi")];
    chunks.extend(b.close(FinishReason::Length));
    let events = events(ok(chunks)).await;
    assert_eq!(names(&events).last(), Some(&"message_stop"));
    let delta = &events[events.len() - 2].1;
    assert_eq!(delta["delta"]["stop_reason"], "max_tokens");
    assert_eq!(delta["usage"]["input_tokens"], 7);
}

#[tokio::test]
async fn interleaved_tool_call_fragments_are_an_error_not_a_wrong_answer() {
    let mut b = ChunkBuilder::new("m", true);
    let chunks = vec![
        b.opening(),
        b.tool_call_start("a".into(), "f".into(), "{".into()),
        b.tool_call_start("b".into(), "g".into(), "{".into()),
        b.tool_arguments(0, "}"),
    ];
    let events = events(ok(chunks)).await;
    assert_eq!(names(&events).last(), Some(&"error"));
}

#[test]
fn errors_map_to_anthropic_types_by_status() {
    for (status, code, expected) in [
        (400, "invalid_request", "invalid_request_error"),
        (401, "x", "authentication_error"),
        (403, "x", "permission_error"),
        (404, "model_not_found", "not_found_error"),
        (413, "request_too_large", "request_too_large"),
        (422, "x", "invalid_request_error"),
        (429, "rate_limit_exceeded", "rate_limit_error"),
        (500, "internal_error", "api_error"),
        (502, "server_error", "api_error"),
        (503, "overloaded", "overloaded_error"),
        (503, "no_upstream_available", "api_error"),
        (504, "timeout", "api_error"),
        (529, "overloaded", "overloaded_error"),
    ] {
        let e = ApiError::new(StatusCode::from_u16(status).unwrap(), "t", code, "m");
        assert_eq!(error_type(&e), expected, "{status} {code}");
    }
}

#[tokio::test]
async fn error_responses_keep_status_and_retry_after() {
    let e = ApiError::new(StatusCode::TOO_MANY_REQUESTS, "t", "c", "slow down")
        .with_retry_after(Duration::from_millis(2500));
    let response = error_response(&e);
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "3");
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 16)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(
        body,
        json!({"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}})
    );
}

mod routes {
    use super::*;
    use crate::server::tests::state;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt as _;

    async fn post(path: &str, body: Value) -> (StatusCode, Value) {
        // The example's demo tenant: with Tenants configured every door wants a key.
        let request = Request::post(path)
            .header("content-type", "application/json")
            .header("x-api-key", "sk-demo-pro")
            .body(Body::from(body.to_string()))
            .unwrap();
        let response = crate::server::router(state())
            .oneshot(request)
            .await
            .unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, serde_json::from_slice(&bytes).unwrap())
    }

    #[tokio::test]
    async fn count_tokens_estimates_the_translated_prompt() {
        let short = json!({"model": "smart", "messages": [{"role": "user", "content": "hi"}]});
        let (status, small) = post("/v1/messages/count_tokens", short).await;
        assert_eq!(status, StatusCode::OK, "{small}");
        let long = json!({
            "model": "smart",
            "system": "You are terse.",
            "messages": [{"role": "user", "content": "hi ".repeat(400)}]
        });
        let (_, large) = post("/v1/messages/count_tokens", long).await;
        let (small, large) = (
            small["input_tokens"].as_u64(),
            large["input_tokens"].as_u64(),
        );
        assert!(
            small.unwrap() > 0 && large.unwrap() > small.unwrap() + 200,
            "{small:?} {large:?}"
        );
    }

    #[tokio::test]
    async fn count_tokens_answers_in_anthropics_error_format() {
        let unknown = json!({"model": "no-such", "messages": [{"role": "user", "content": "hi"}]});
        let (status, body) = post("/v1/messages/count_tokens", unknown).await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(body["type"], "error");
        assert_eq!(body["error"]["type"], "not_found_error");

        let thinking = json!({
            "model": "smart",
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "hi"}]
        });
        let (status, body) = post("/v1/messages/count_tokens", thinking).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"]["type"], "invalid_request_error");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`thinking`"),
            "{body}"
        );

        let (status, body) = post("/v1/messages/count_tokens", json!({"model": "smart"})).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("messages"),
            "{body}"
        );
    }
}

mod errors;
mod fidelity;
