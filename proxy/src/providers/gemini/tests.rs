//! Gemini specifics; the shared behaviour is in the conformance suite.

use std::time::{Duration, UNIX_EPOCH};

use http::HeaderMap;
use serde_json::json;

use crate::providers::tests::{assert_refused, body_json, build_with, request};
use crate::providers::{Adapter, FinishReason, ProviderError};

const BASE: &str = "https://generativelanguage.googleapis.com";

#[test]
fn translates_roles_system_config_and_tools() {
    let req = request(json!({
        "model": "smart",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}
            ]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}
            }]},
            {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18}"},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
        ],
        "tools": [{"type": "function", "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": false}
        }}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "max_tokens": 256,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END", "STOP"]
    }));
    let built = Adapter::Gemini
        .build_request(BASE, Some("k"), "models/gemini-2.5-flash", &req, false)
        .unwrap();
    assert_eq!(
        built.url,
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
    );
    assert_eq!(
        body_json(&built),
        json!({
            "contents": [
                {"role": "user", "parts": [
                    {"text": "Weather in Paris?"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}}
                ]},
                {"role": "model", "parts": [
                    {"text": "Checking."},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"temp": 18}}},
                    {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}
                ]}
            ],
            "systemInstruction": {"parts": [{"text": "Be brief."}]},
            "tools": [{"functionDeclarations": [{
                "name": "get_weather",
                "parametersJsonSchema": {"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": false}
            }]}],
            "toolConfig": {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}},
            "generationConfig": {"maxOutputTokens": 256, "temperature": 0.2, "topP": 0.9, "stopSequences": ["END", "STOP"]}
        })
    );
}

#[test]
fn minimal_request_has_no_empty_sections() {
    let req = request(json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}));
    let built = Adapter::Gemini
        .build_request(BASE, None, "gemini-2.5-flash", &req, true)
        .unwrap();
    assert_eq!(
        body_json(&built),
        json!({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]})
    );
}

#[test]
fn refuses_what_gemini_cannot_do() {
    let remote_image = request(
        json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://img.example/cat.png"}}]}]}),
    );
    let orphan_result = request(json!({"model": "m", "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "tool", "tool_call_id": "nope", "content": "x"}]}));
    for req in [remote_image, orphan_result] {
        let err = Adapter::Gemini
            .build_request(BASE, None, "m", &req, false)
            .unwrap_err();
        assert!(matches!(err, ProviderError::BadRequest { .. }), "{err:?}");
    }
}

#[test]
fn finish_reasons_and_blocked_prompts() {
    let answer = |reason: &str| {
        let body = json!({"candidates": [{"content": {"parts": [{"text": "x"}], "role": "model"},
                          "finishReason": reason, "index": 0}]});
        let response = Adapter::Gemini
            .parse_response(body.to_string().as_bytes(), "smart")
            .unwrap();
        response.choices[0].finish_reason
    };
    assert_eq!(answer("MAX_TOKENS"), Some(FinishReason::Length));
    assert_eq!(answer("SAFETY"), Some(FinishReason::ContentFilter));
    assert_eq!(answer("STOP"), Some(FinishReason::Stop));

    let blocked = br#"{"promptFeedback": {"blockReason": "SAFETY"}, "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}}"#;
    let response = Adapter::Gemini.parse_response(blocked, "smart").unwrap();
    assert_eq!(
        response.choices[0].finish_reason,
        Some(FinishReason::ContentFilter)
    );
    assert_eq!(response.usage.unwrap().prompt_tokens, 7);
}

#[test]
fn thoughts_are_not_answer_text_but_count_as_output() {
    let stream = concat!(
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"planning...\", \"thought\": true}],\"role\": \"model\"},\"index\": 0}]}\n\n",
        "data: {\"candidates\": [{\"content\": {\"parts\": [{\"text\": \"Answer.\"}],\"role\": \"model\"},\"finishReason\": \"STOP\",\"index\": 0}],",
        "\"usageMetadata\": {\"promptTokenCount\": 5,\"candidatesTokenCount\": 2,\"thoughtsTokenCount\": 30,\"totalTokenCount\": 37}}\n\n",
    );
    let mut decoder = Adapter::Gemini.stream_decoder("smart", false);
    let mut chunks = decoder.feed(stream.as_bytes()).unwrap();
    chunks.extend(decoder.finish().unwrap());
    let text: String = chunks
        .iter()
        .filter_map(|c| c.choices[0].delta.content.clone())
        .collect();
    assert_eq!(text, "Answer.");
    let usage = decoder.usage().unwrap();
    assert_eq!(
        (
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.total_tokens
        ),
        (5, 32, 37)
    );
}

#[test]
fn error_piece_midstream_is_classified() {
    let stream = b"data: {\"error\": {\"code\": 503, \"message\": \"The model is overloaded.\", \"status\": \"UNAVAILABLE\"}}\n\n";
    let mut decoder = Adapter::Gemini.stream_decoder("smart", false);
    let err = decoder.feed(stream).unwrap_err();
    assert!(
        matches!(err, ProviderError::Overloaded { status: 503, .. }),
        "{err:?}"
    );
}

#[test]
fn retry_delay_in_the_body_is_the_cooldown() {
    let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let body = include_bytes!("../testdata/gemini_error_429.json");
    let err = Adapter::Gemini.classify_at(429, &HeaderMap::new(), body, now);
    assert!(matches!(err, ProviderError::RateLimited { .. }), "{err:?}");
    assert_eq!(err.cools_key(), Some(Duration::from_secs(34)));

    let body = include_bytes!("../testdata/gemini_error_401.json");
    let err = Adapter::Gemini.classify_at(401, &HeaderMap::new(), body, now);
    assert!(matches!(err, ProviderError::Unauthorized { .. }), "{err:?}");
}

#[test]
fn maps_sampling_format_and_logprobs_into_generation_config() {
    let schema =
        json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]});
    let body = build_with(
        Adapter::Gemini,
        json!({"top_k": 40, "seed": -7, "frequency_penalty": 0.5, "presence_penalty": -0.25,
               "logprobs": true, "top_logprobs": 2, "service_tier": "auto",
               "response_format": {"type": "json_schema",
                   "json_schema": {"name": "city", "strict": true, "schema": schema}}}),
    )
    .unwrap();
    assert_eq!(
        body["generationConfig"],
        json!({"topK": 40, "seed": -7, "frequencyPenalty": 0.5, "presencePenalty": -0.25,
               "responseLogprobs": true, "logprobs": 2,
               "responseMimeType": "application/json", "responseJsonSchema": schema})
    );
    let body = build_with(
        Adapter::Gemini,
        json!({"response_format": {"type": "json_object"}}),
    )
    .unwrap();
    assert_eq!(
        body["generationConfig"],
        json!({"responseMimeType": "application/json"})
    );
}

#[test]
fn temperature_range_is_gemini_s() {
    let body = build_with(Adapter::Gemini, json!({"temperature": 2.0})).unwrap();
    assert_eq!(body["generationConfig"]["temperature"], 2.0);
    assert_refused(
        Adapter::Gemini,
        &[("temperature", json!(2.5)), ("top_p", json!(1.01))],
    );
}

#[test]
fn refuses_each_field_it_cannot_map_by_name() {
    assert_refused(
        Adapter::Gemini,
        &[
            ("seed", json!(1_u64 << 40)),
            ("top_logprobs", json!(2)),
            ("parallel_tool_calls", json!(false)),
            ("logit_bias", json!({"50256": -100})),
            ("metadata", json!({"team": "a"})),
            ("store", json!(true)),
            ("reasoning_effort", json!("high")),
            ("service_tier", json!("priority")),
            ("web_search_options", json!({})),
        ],
    );
    let described = json!({"type": "json_schema",
        "json_schema": {"name": "x", "description": "A city", "schema": {"type": "object"}}});
    assert_refused(Adapter::Gemini, &[("response_format", described)]);
}

#[test]
fn logprobs_come_back_in_openai_shape() {
    let openai: serde_json::Value =
        serde_json::from_slice(include_bytes!("../testdata/openai_logprobs_response.json"))
            .unwrap();
    let expected = &openai["choices"][0]["logprobs"];

    let body = include_bytes!("../testdata/gemini_logprobs_response.json");
    let response = Adapter::Gemini.parse_response(body, "smart").unwrap();
    assert_eq!(response.choices[0].logprobs.as_ref(), Some(expected));

    let stream = include_bytes!("../testdata/gemini_logprobs_stream.sse");
    let mut decoder = Adapter::Gemini.stream_decoder("smart", false);
    let mut chunks = decoder.feed(stream).unwrap();
    chunks.extend(decoder.finish().unwrap());
    let tokens: Vec<serde_json::Value> = chunks
        .iter()
        .filter_map(|c| c.choices[0].logprobs.as_ref())
        .flat_map(|l| l["content"].as_array().unwrap().clone())
        .collect();
    assert_eq!(&tokens, expected["content"].as_array().unwrap());
    // Each piece's steps ride on the chunk with its text.
    let with_text = chunks
        .iter()
        .filter(|c| c.choices[0].delta.content.is_some() && c.choices[0].logprobs.is_some());
    assert_eq!(with_text.count(), 2);
}
