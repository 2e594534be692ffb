//! Anthropic specifics; the shared behaviour is in the conformance suite.

use std::time::{Duration, UNIX_EPOCH};

use http::{HeaderMap, HeaderValue};
use serde_json::json;

use crate::providers::tests::{assert_refused, body_json, build_with, request};
use crate::providers::{Adapter, FinishReason, ProviderError};

fn build(value: serde_json::Value, stream: bool) -> serde_json::Value {
    let req = request(value);
    let built = Adapter::Anthropic
        .build_request(
            "https://api.anthropic.com",
            Some("k"),
            "claude-sonnet-4",
            &req,
            stream,
        )
        .unwrap();
    assert_eq!(built.headers["anthropic-version"], "2023-06-01");
    body_json(&built)
}

#[test]
fn lifts_system_merges_turns_and_maps_tools() {
    let body = build(
        json!({
            "model": "smart",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric units."}]},
                {"role": "user", "content": "Weather in Paris?"},
                {"role": "user", "content": [
                    {"type": "text", "text": "And this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}}
                ]},
                {"role": "assistant", "content": null, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
                }]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
                {"role": "user", "content": "Thanks"}
            ],
            "tools": [{"type": "function", "function": {
                "name": "get_weather", "description": "Current weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}
            }}],
            "tool_choice": "required",
            "parallel_tool_calls": false,
            "stop": "END",
            "temperature": 0.7,
            "top_k": 5,
            "service_tier": "default",
            "user": "u-42",
            "stream": true
        }),
        true,
    );
    assert_eq!(
        body,
        json!({
            "model": "claude-sonnet-4",
            "max_tokens": 4096,
            "system": "Be brief.\n\nUse metric units.",
            "messages": [
                {"role": "user", "content": [
                    {"type": "text", "text": "Weather in Paris?"},
                    {"type": "text", "text": "And this?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg", "data": "/9j/4AAQ"}}
                ]},
                {"role": "assistant", "content": [
                    {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}
                ]},
                {"role": "user", "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "18C"},
                    {"type": "text", "text": "Thanks"}
                ]}
            ],
            "stop_sequences": ["END"],
            "temperature": 0.7,
            "top_k": 5,
            "tools": [{
                "name": "get_weather", "description": "Current weather",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}
            }],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": true},
            "stream": true,
            "metadata": {"user_id": "u-42"},
            "service_tier": "standard_only"
        })
    );
}

#[test]
fn max_tokens_from_the_caller_or_the_default() {
    let messages = json!([{"role": "user", "content": "Hi"}]);
    let body = build(
        json!({"model": "m", "messages": messages, "max_completion_tokens": 50, "max_tokens": 99}),
        false,
    );
    assert_eq!(body["max_tokens"], 50);
    assert!(body.get("stream").is_none());
    let body = build(json!({"model": "m", "messages": messages}), false);
    assert_eq!(body["max_tokens"], 4096);
    assert!(body.get("system").is_none());
}

#[test]
fn tool_choice_modes() {
    let with = |choice: serde_json::Value| {
        let body = build(
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                   "tools": [{"type": "function", "function": {"name": "f"}}],
                   "tool_choice": choice}),
            false,
        );
        assert_eq!(
            body["tools"][0]["input_schema"],
            json!({"type": "object", "properties": {}})
        );
        body["tool_choice"].clone()
    };
    assert_eq!(with(json!("auto")), json!({"type": "auto"}));
    assert_eq!(with(json!("none")), json!({"type": "none"}));
    assert_eq!(
        with(json!({"type": "function", "function": {"name": "f"}})),
        json!({"type": "tool", "name": "f"})
    );
}

#[test]
fn refuses_what_anthropic_cannot_do() {
    let only_system =
        request(json!({"model": "m", "messages": [{"role": "system", "content": "x"}]}));
    let many =
        request(json!({"model": "m", "n": 2, "messages": [{"role": "user", "content": "x"}]}));
    let bad_args = request(
        json!({"model": "m", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1,2]"}}]}]}),
    );
    for req in [only_system, many, bad_args] {
        let err = Adapter::Anthropic
            .build_request("https://a", None, "m", &req, false)
            .unwrap_err();
        assert!(
            matches!(err, ProviderError::BadRequest { status: 400, .. }),
            "{err:?}"
        );
    }
}

#[test]
fn stream_keeps_ids_and_counts_cached_prompt_tokens() {
    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":10,\"cache_creation_input_tokens\":100,\"cache_read_input_tokens\":1000,\"output_tokens\":1}}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"max_tokens\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":7}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    let mut decoder = Adapter::Anthropic.stream_decoder("smart", false);
    let mut chunks = decoder.feed(stream.as_bytes()).unwrap();
    chunks.extend(decoder.finish().unwrap());
    assert!(chunks.iter().all(|c| c.id == "msg_1"));
    assert_eq!(
        chunks.last().unwrap().choices[0].finish_reason,
        Some(FinishReason::Length)
    );
    let usage = decoder.usage().unwrap();
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (1110, 7));

    let tool_stream = include_bytes!("../testdata/anthropic_tool_stream.sse");
    let mut decoder = Adapter::Anthropic.stream_decoder("smart", false);
    let chunks = decoder.feed(tool_stream).unwrap();
    let ids: Vec<_> = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .flat_map(|c| c.delta.tool_calls.iter().flatten())
        .filter_map(|t| t.id.as_deref())
        .collect();
    assert_eq!(ids, ["toolu_01T1x1fJ34qAmk2tNTrN7Up6"]);
    assert_eq!(chunks[0].id, "msg_014p7gG3wDgGV9EUtLvnow3U");
}

#[test]
fn error_event_midstream_is_classified() {
    // The documented example of an error event.
    let stream = b"event: error\ndata: {\"type\": \"error\", \"error\": {\"type\": \"overloaded_error\", \"message\": \"Overloaded\"}}\n\n";
    let mut decoder = Adapter::Anthropic.stream_decoder("smart", false);
    let err = decoder.feed(stream).unwrap_err();
    assert!(
        matches!(err, ProviderError::Overloaded { status: 529, .. }),
        "{err:?}"
    );
}

#[test]
fn recorded_overload_and_rate_limit_headers() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let body = include_bytes!("../testdata/anthropic_error_529.json");
    let err = Adapter::Anthropic.classify_at(529, &HeaderMap::new(), body, now);
    assert!(matches!(err, ProviderError::Overloaded { .. }), "{err:?}");
    assert_eq!(err.http_status(), 503);

    // Without retry-after, the reset of the exhausted budget is the wait.
    let mut headers = HeaderMap::new();
    headers.insert(
        "anthropic-ratelimit-requests-remaining",
        HeaderValue::from_static("0"),
    );
    headers.insert(
        "anthropic-ratelimit-requests-reset",
        HeaderValue::from_static("2023-11-14T22:13:40Z"), // now + 20 s
    );
    let body = include_bytes!("../testdata/anthropic_error_429.json");
    let err = Adapter::Anthropic.classify_at(429, &headers, body, now);
    assert_eq!(err.cools_key(), Some(Duration::from_secs(20)));
    let info = Adapter::Anthropic.rate_limit_info(&headers, now);
    assert_eq!(info.requests_remaining, Some(0));
    assert_eq!(info.requests_reset, Some(Duration::from_secs(20)));
}

#[test]
fn temperature_above_one_is_refused_not_clamped() {
    let err = build_with(Adapter::Anthropic, json!({"temperature": 1.5})).unwrap_err();
    match err {
        ProviderError::BadRequest {
            status: 400,
            message,
        } => {
            assert!(message.contains("`temperature`"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    let body = build_with(Adapter::Anthropic, json!({"temperature": 1.0})).unwrap();
    assert_eq!(body["temperature"], 1.0);
    assert_refused(
        Adapter::Anthropic,
        &[("temperature", json!(-0.1)), ("top_p", json!(1.5))],
    );
}

#[test]
fn maps_service_tiers_and_top_k() {
    let tier = |t: &str| build_with(Adapter::Anthropic, json!({"service_tier": t})).unwrap();
    assert_eq!(tier("auto")["service_tier"], "auto");
    assert_eq!(tier("default")["service_tier"], "standard_only");
    assert_eq!(tier("standard_only")["service_tier"], "standard_only");
    let body = build_with(Adapter::Anthropic, json!({"top_k": 40})).unwrap();
    assert_eq!(body["top_k"], 40);
}

#[test]
fn refuses_each_field_it_cannot_map_by_name() {
    assert_refused(
        Adapter::Anthropic,
        &[
            ("seed", json!(7)),
            ("response_format", json!({"type": "json_object"})),
            ("logprobs", json!(true)),
            ("top_logprobs", json!(2)),
            ("frequency_penalty", json!(0.5)),
            ("presence_penalty", json!(-0.5)),
            ("logit_bias", json!({"50256": -100})),
            ("metadata", json!({"team": "a"})),
            ("store", json!(true)),
            ("reasoning_effort", json!("low")),
            ("service_tier", json!("flex")),
            ("top_k", json!(-1)),
            ("modalities", json!(["text", "audio"])),
            ("prediction", json!({"type": "content", "content": "x"})),
        ],
    );
}

#[test]
fn neutral_values_change_nothing() {
    let plain = build_with(Adapter::Anthropic, json!({})).unwrap();
    let neutral = build_with(
        Adapter::Anthropic,
        json!({"logprobs": false, "store": false, "parallel_tool_calls": true,
               "frequency_penalty": 0, "presence_penalty": 0.0, "seed": null,
               "response_format": {"type": "text"}, "metadata": {}, "logit_bias": {}}),
    )
    .unwrap();
    assert_eq!(neutral, plain);
}

#[test]
fn a_stop_sequence_is_reported_with_the_sequence_that_matched() {
    let whole = |stop_reason: &str, sequence: &str| {
        let body = format!(
            r#"{{"id":"msg_1","type":"message","role":"assistant","model":"claude",
            "content":[{{"type":"text","text":"one two"}}],"stop_reason":"{stop_reason}",
            "stop_sequence":{sequence},"usage":{{"input_tokens":3,"output_tokens":2}}}}"#
        );
        let answer = Adapter::Anthropic
            .parse_response(body.as_bytes(), "smart")
            .unwrap();
        let choice = answer.choices.into_iter().next().unwrap();
        (choice.finish_reason, choice.stop_sequence)
    };
    assert_eq!(
        whole("stop_sequence", r#""three""#),
        (Some(FinishReason::Stop), Some("three".to_owned()))
    );
    assert_eq!(whole("end_turn", "null"), (Some(FinishReason::Stop), None));

    let stream = concat!(
        "event: message_start\n",
        "data: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"type\":\"message\",\"role\":\"assistant\",\"content\":[],\"model\":\"claude\",\"stop_reason\":null,\"stop_sequence\":null,\"usage\":{\"input_tokens\":3,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\n",
        "data: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: content_block_delta\n",
        "data: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"one two\"}}\n\n",
        "event: message_delta\n",
        "data: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"stop_sequence\",\"stop_sequence\":\"three\"},\"usage\":{\"output_tokens\":2}}\n\n",
        "event: message_stop\n",
        "data: {\"type\":\"message_stop\"}\n\n",
    );
    let mut decoder = Adapter::Anthropic.stream_decoder("smart", true);
    let mut chunks = decoder.feed(stream.as_bytes()).unwrap();
    chunks.extend(decoder.finish().unwrap());
    let finish = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .find(|c| c.finish_reason.is_some())
        .unwrap();
    assert_eq!(finish.finish_reason, Some(FinishReason::Stop));
    assert_eq!(finish.stop_sequence.as_deref(), Some("three"));
    // The OpenAI door renders it as OpenAI does: `stop`, and no stop_sequence key.
    let json = serde_json::to_value(finish).unwrap();
    assert_eq!(json["finish_reason"], "stop");
    assert!(json.get("stop_sequence").is_none(), "{json}");
}

#[test]
fn betas_are_forwarded_in_one_header_and_absent_without_any() {
    let mut req =
        request(json!({"model": "smart", "messages": [{"role": "user", "content": "Hi"}]}));
    let build = |req: &crate::providers::ChatRequest| {
        Adapter::Anthropic
            .build_request("https://api.anthropic.com", Some("k"), "c", req, false)
            .unwrap()
    };
    assert!(build(&req).headers.get("anthropic-beta").is_none());
    req.anthropic_beta = vec![
        "context-1m-2025-08-07".to_owned(),
        "no-such-beta-2099-01-01".to_owned(),
    ];
    assert_eq!(
        build(&req).headers["anthropic-beta"],
        "context-1m-2025-08-07,no-such-beta-2099-01-01"
    );
}
