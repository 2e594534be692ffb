//! Request parameters beyond the conversation, for the adapters that are not OpenAI
//! compatible: each one is mapped to the provider's equivalent or refused with a 400 that
//! names it — never dropped, never changed. (OpenAI-compatible upstreams get every field
//! as sent, `extra` included.)
//!
//! | OpenAI field | Anthropic | Gemini | Ollama |
//! |---|---|---|---|
//! | `temperature` | `temperature`, 0..=1 else refused | `temperature`, 0..=2 else refused | `options.temperature`, >= 0 else refused |
//! | `top_p` | `top_p`, 0..=1 | `topP`, 0..=1 | `options.top_p`, 0..=1 |
//! | `max_completion_tokens` / `max_tokens` | `max_tokens` (4096 when unset) | `maxOutputTokens` | `options.num_predict` |
//! | `stop` | `stop_sequences` | `stopSequences` | `options.stop` |
//! | `n` > 1 | refused | refused | refused |
//! | `user` | `metadata.user_id` | not sent (*) | not sent (*) |
//! | `top_k` | `top_k` | `topK` | `options.top_k` |
//! | `seed` | refused | `seed` (32-bit) | `options.seed` |
//! | `frequency_penalty`, `presence_penalty` | refused (0 accepted) | `frequencyPenalty`, `presencePenalty` | `options.frequency_penalty`, `options.presence_penalty` |
//! | `response_format` `json_object` | refused | `responseMimeType: application/json` | `format: "json"` |
//! | `response_format` `json_schema` | refused | `responseMimeType` + `responseJsonSchema` | `format: <schema>` |
//! | `logprobs`, `top_logprobs` | refused | `responseLogprobs`, `logprobs`; answer's `logprobsResult` -> `choices[].logprobs` | refused |
//! | `parallel_tool_calls: false` | `tool_choice.disable_parallel_tool_use` | refused | refused |
//! | `service_tier` | `auto` -> `auto`, `default`/`standard_only` -> `standard_only`, others refused | `auto`/`default` accepted, others refused | as Gemini |
//! | `reasoning_effort` | refused | refused | refused |
//! | `metadata`, `store: true`, `logit_bias`, `audio`, `modalities` other than text, `prediction`, `web_search_options`, `verbosity`, `functions`, anything else | refused | refused | refused |
//!
//! A `null` value, and a value that asks for what the provider does anyway (`logprobs:
//! false`, `store: false`, `parallel_tool_calls: true`, penalties of 0, `logit_bias: {}`,
//! `metadata: {}`, `response_format: {"type": "text"}`, `modalities: ["text"]`), is accepted
//! and not sent: dropping it changes nothing.
//!
//! (*) `user` is an end-user id for the provider's abuse monitoring; it does not change the
//! answer, and Gemini and Ollama have no field for it.
//!
//! What the Anthropic door carries beyond OpenAI's shape (all targets, OpenAI-compatible
//! ones included, since OpenAI's shape has no place for it):
//!
//! | Anthropic input | Anthropic | Gemini | Ollama | OpenAI-compatible |
//! |---|---|---|---|---|
//! | `cache_control` (system, content blocks, tools, top level) | sent where the caller put it | accepted, not sent (**) | accepted, not sent (**) | accepted, not sent (**) |
//! | `tool_result.is_error: true` | `is_error: true` | `functionResponse.response: {"error": ...}` | content prefixed `Error: ` | content prefixed `Error: ` |
//! | `anthropic-beta` header | sent as received | [`PORTABLE_BETAS`] accepted, others refused by name | as Gemini | as Gemini |
//! | `stop_reason: "stop_sequence"` (answer) | reported with the matched `stop_sequence` | `end_turn` (Gemini does not say) | `end_turn` | `end_turn` (`finish_reason: "stop"` does not say) |
//!
//! (**) A cache breakpoint marks a prefix Anthropic may cache and bill at a lower price; it
//! never changes the answer. OpenAI and Gemini cache prompt prefixes on their own, Ollama
//! keeps its own context cache, and none has a per-block marker, so not sending it changes
//! nothing but cost. An OpenAI-compatible upstream would reject the unknown key.
//!
//! Not yet held to this rule (parts of modelled fields, still not sent to these targets):
//! `tools[].function.strict`, `image_url.detail` and a message's `name`. Refusing them
//! would turn away common agent SDK requests (which set `strict: true` by default), so the
//! choice is left open rather than made here.

use std::ops::RangeInclusive;

use serde_json::Value;

use super::error::{ProviderError, Result};
use super::types::ChatRequest;

/// The betas of Anthropic's `anthropic-beta` header that targets other than Anthropic
/// accept (and do not send, having no such header): each changes only cost, latency or
/// how finely a stream is cut, or acts only with a field this gateway refuses anyway, so an
/// answer without it is the answer the caller asked for. Any other beta (`context-1m-*`,
/// `output-128k-*`, `computer-use-*`, `code-execution-*`, `files-api-*`, `mcp-client-*`,
/// `context-management-*`, ..., and every beta this list does not know) changes what the
/// request may hold or what the answer is, which only Anthropic can honour: it is refused
/// with a 400 naming it.
///
/// | beta | why another target may ignore it |
/// |---|---|
/// | `prompt-caching-2024-07-31` | cache breakpoints: a cost hint (GA now) |
/// | `extended-cache-ttl-2025-04-11` | 1-hour cache entries: a cost hint |
/// | `token-counting-2024-11-01` | `count_tokens`, which the gateway answers itself |
/// | `token-efficient-tools-2025-02-19` | fewer output tokens for tool calls, same answer shape |
/// | `fine-grained-tool-streaming-2025-05-14` | tool input streamed unbuffered; without it, whole and valid |
/// | `interleaved-thinking-2025-05-14` | acts only with `thinking`, which the Messages door refuses |
pub const PORTABLE_BETAS: &[&str] = &[
    "prompt-caching-2024-07-31",
    "extended-cache-ttl-2025-04-11",
    "token-counting-2024-11-01",
    "token-efficient-tools-2025-02-19",
    "fine-grained-tool-streaming-2025-05-14",
    "interleaved-thinking-2025-05-14",
];

/// Refuses, naming it, the first beta of `req.anthropic_beta` that a target other than
/// Anthropic cannot honour (see [`PORTABLE_BETAS`]).
pub(crate) fn check_betas(req: &ChatRequest, provider: &str) -> Result<()> {
    match req
        .anthropic_beta
        .iter()
        .find(|beta| !PORTABLE_BETAS.contains(&beta.as_str()))
    {
        Some(beta) => Err(ProviderError::unsupported(format!(
            "`anthropic-beta: {beta}` is not supported by {provider} targets"
        ))),
        None => Ok(()),
    }
}

/// A 400 naming a field the target cannot honour.
pub(crate) fn unsupported_field(field: &str, provider: &str) -> ProviderError {
    ProviderError::unsupported(format!("`{field}` is not supported by {provider} targets"))
}

/// A 400 naming a field whose value the target cannot take.
pub(crate) fn invalid_field(field: &str, provider: &str, expected: &str) -> ProviderError {
    ProviderError::unsupported(format!(
        "`{field}` must be {expected} for {provider} targets"
    ))
}

/// Whether `value` asks for nothing the provider would not do anyway, so that not sending
/// it changes nothing.
pub(crate) fn is_neutral(field: &str, value: &Value) -> bool {
    match (field, value) {
        (_, Value::Null) => true,
        ("logprobs" | "store", Value::Bool(false)) => true,
        ("parallel_tool_calls", Value::Bool(true)) => true,
        ("frequency_penalty" | "presence_penalty", Value::Number(n)) => n.as_f64() == Some(0.0),
        ("logit_bias" | "metadata", Value::Object(map)) => map.is_empty(),
        ("response_format", Value::Object(map)) => {
            map.len() == 1 && map.get("type").and_then(Value::as_str) == Some("text")
        }
        ("modalities", Value::Array(items)) => {
            items.iter().all(|m| m.as_str() == Some("text")) && !items.is_empty()
        }
        _ => false,
    }
}

/// Fails unless `value`, when set, lies in `range`.
pub(crate) fn check_range(
    field: &str,
    value: Option<f64>,
    range: RangeInclusive<f64>,
    provider: &str,
) -> Result<()> {
    match value {
        Some(v) if !range.contains(&v) => Err(invalid_field(
            field,
            provider,
            &format!("between {} and {}", range.start(), range.end()),
        )),
        _ => Ok(()),
    }
}

/// A non-negative integer that fits `u32`.
pub(crate) fn as_u32(field: &str, value: &Value, provider: &str) -> Result<u32> {
    value
        .as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| invalid_field(field, provider, "a non-negative integer"))
}

/// An integer.
pub(crate) fn as_i64(field: &str, value: &Value, provider: &str) -> Result<i64> {
    value
        .as_i64()
        .ok_or_else(|| invalid_field(field, provider, "an integer"))
}

/// A number.
pub(crate) fn as_f64(field: &str, value: &Value, provider: &str) -> Result<f64> {
    value
        .as_f64()
        .ok_or_else(|| invalid_field(field, provider, "a number"))
}

/// A boolean.
pub(crate) fn as_bool(field: &str, value: &Value, provider: &str) -> Result<bool> {
    value
        .as_bool()
        .ok_or_else(|| invalid_field(field, provider, "a boolean"))
}

/// `response_format`, read.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum ResponseFormat<'a> {
    /// `{"type": "text"}`: the default.
    Text,
    /// `{"type": "json_object"}`: any JSON object.
    JsonObject,
    /// `{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    JsonSchema {
        /// The JSON Schema the answer must follow.
        schema: &'a Value,
    },
}

/// Reads `response_format`. `json_schema.description` is refused: it steers the model, and
/// no target has a place for it.
pub(crate) fn response_format<'a>(value: &'a Value, provider: &str) -> Result<ResponseFormat<'a>> {
    let kind = value.get("type").and_then(Value::as_str);
    match kind {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => {
            let spec = value
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    invalid_field("response_format.json_schema", provider, "an object")
                })?;
            if spec.get("description").is_some_and(|d| !d.is_null()) {
                return Err(unsupported_field(
                    "response_format.json_schema.description",
                    provider,
                ));
            }
            let schema = spec
                .get("schema")
                .filter(|s| s.is_object())
                .ok_or_else(|| {
                    invalid_field("response_format.json_schema.schema", provider, "an object")
                })?;
            Ok(ResponseFormat::JsonSchema { schema })
        }
        _ => Err(invalid_field(
            "response_format.type",
            provider,
            "`text`, `json_object` or `json_schema`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn neutral_values_only() {
        assert!(is_neutral("seed", &Value::Null));
        assert!(is_neutral("logprobs", &json!(false)));
        assert!(!is_neutral("logprobs", &json!(true)));
        assert!(is_neutral("presence_penalty", &json!(0)));
        assert!(!is_neutral("presence_penalty", &json!(0.1)));
        assert!(is_neutral("response_format", &json!({"type": "text"})));
        assert!(!is_neutral(
            "response_format",
            &json!({"type": "json_object"})
        ));
        assert!(is_neutral("modalities", &json!(["text"])));
        assert!(!is_neutral("modalities", &json!(["text", "audio"])));
        assert!(!is_neutral("metadata", &json!({"k": "v"})));
        assert!(!is_neutral("seed", &json!(0)));
    }

    #[test]
    fn only_portable_betas_reach_targets_other_than_anthropic() {
        use crate::providers::Adapter;
        let mut req: ChatRequest = serde_json::from_value(
            json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]}),
        )
        .unwrap();
        req.anthropic_beta = PORTABLE_BETAS.iter().map(|b| (*b).to_owned()).collect();
        for adapter in [Adapter::OpenAi, Adapter::Gemini, Adapter::Ollama] {
            let built = adapter.build_request("http://u", None, "m", &req, false);
            let built = built.unwrap_or_else(|e| panic!("{adapter:?}: {e}"));
            assert!(built.headers.get("anthropic-beta").is_none(), "{adapter:?}");
        }
        for beta in [
            "context-1m-2025-08-07",
            "computer-use-2025-01-24",
            "no-such-beta",
        ] {
            req.anthropic_beta = vec![PORTABLE_BETAS[0].to_owned(), beta.to_owned()];
            for adapter in [Adapter::OpenAi, Adapter::Gemini, Adapter::Ollama] {
                match adapter.build_request("http://u", None, "m", &req, false) {
                    Err(ProviderError::BadRequest {
                        status: 400,
                        message,
                    }) => assert!(
                        message.contains(&format!("`anthropic-beta: {beta}`")),
                        "{message}"
                    ),
                    other => panic!("{adapter:?} with {beta}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn response_formats() {
        let schema = json!({"type": "object"});
        let format = json!({"type": "json_schema", "json_schema": {"name": "x", "strict": true, "schema": schema}});
        assert_eq!(
            response_format(&format, "G").unwrap(),
            ResponseFormat::JsonSchema { schema: &schema }
        );
        let described = json!({"type": "json_schema",
            "json_schema": {"name": "x", "description": "d", "schema": schema}});
        let err = response_format(&described, "G").unwrap_err();
        assert!(
            err.to_string()
                .contains("`response_format.json_schema.description`"),
            "{err}"
        );
        let err = response_format(&json!({"type": "yaml"}), "G").unwrap_err();
        assert!(matches!(err, ProviderError::BadRequest { status: 400, .. }));
    }
}
