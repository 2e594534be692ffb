//! A complete internal answer ([`ChatResponse`]) as an Anthropic `message`.

use serde::Serialize;
use serde_json::Value;

use crate::providers::types::{ChatResponse, FinishReason, ToolCall, new_id};
use crate::server::error::ApiError;

/// A `message` object, as `POST /v1/messages` answers it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Message {
    /// `msg_...`.
    pub id: String,
    /// Always `message`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Always `assistant`.
    pub role: &'static str,
    /// The model the caller asked for (whichever provider answered).
    pub model: String,
    /// Text and `tool_use` blocks.
    pub content: Vec<OutputBlock>,
    /// `end_turn`, `stop_sequence`, `max_tokens`, `tool_use` or `refusal` (`null` in
    /// `message_start`).
    pub stop_reason: Option<&'static str>,
    /// Which stop sequence ended the answer, when the upstream said so (Anthropic does;
    /// OpenAI-format, Gemini and Ollama upstreams do not, and their answers read
    /// `end_turn`).
    pub stop_sequence: Option<String>,
    /// Token counts.
    pub usage: MessageUsage,
}

/// A content block of an answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputBlock {
    /// Generated text.
    Text {
        /// The text.
        text: String,
    },
    /// A tool call.
    ToolUse {
        /// Call identifier.
        id: String,
        /// Tool name.
        name: String,
        /// Arguments object.
        input: Value,
    },
}

/// `usage` of a `message`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct MessageUsage {
    /// Prompt tokens.
    pub input_tokens: u32,
    /// Generated tokens.
    pub output_tokens: u32,
}

/// Anthropic's `stop_reason` for an internal finish reason and the stop sequence that
/// matched, if the upstream said which: `stop_sequence` then, else `end_turn` for `stop`
/// (an OpenAI-format `finish_reason: "stop"` does not tell a stop sequence from the end of
/// the turn, so none is inferred).
pub fn stop_reason(reason: FinishReason, stop_sequence: Option<&str>) -> &'static str {
    match reason {
        FinishReason::Stop if stop_sequence.is_some() => "stop_sequence",
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ToolCalls | FinishReason::FunctionCall => "tool_use",
        FinishReason::ContentFilter => "refusal",
    }
}

/// A message id: the upstream's when it is one (`msg_...`), else the upstream id prefixed,
/// else a fresh one.
pub fn message_id(upstream: &str) -> String {
    if upstream.starts_with("msg_") {
        upstream.to_owned()
    } else if upstream.is_empty() {
        new_id("msg_")
    } else {
        format!("msg_{upstream}")
    }
}

/// Translates a complete answer. `model` is the model the caller asked for. Fails (502) when
/// the answer has no choice, or a tool call whose arguments are not a JSON object: Anthropic
/// callers read `input` as one.
pub fn to_message(response: ChatResponse, model: String) -> Result<Message, ApiError> {
    let usage = response.usage.unwrap_or_default();
    let Some(choice) = response.choices.into_iter().next() else {
        return Err(bad_upstream("the upstream answer has no choices"));
    };
    let answer = choice.message;
    let refused = answer.refusal.is_some();
    let mut content = Vec::new();
    for text in [answer.content, answer.refusal].into_iter().flatten() {
        if !text.is_empty() {
            content.push(OutputBlock::Text { text });
        }
    }
    for call in answer.tool_calls.into_iter().flatten() {
        content.push(tool_use(call)?);
    }
    let stop_sequence = choice
        .stop_sequence
        .filter(|_| choice.finish_reason == Some(FinishReason::Stop) && !refused);
    let reason = match choice.finish_reason {
        _ if refused => "refusal",
        Some(reason) => stop_reason(reason, stop_sequence.as_deref()),
        None => "end_turn",
    };
    Ok(Message {
        id: message_id(&response.id),
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason: Some(reason),
        stop_sequence,
        usage: MessageUsage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        },
    })
}

fn tool_use(call: ToolCall) -> Result<OutputBlock, ApiError> {
    let input = if call.function.arguments.trim().is_empty() {
        Value::Object(serde_json::Map::new())
    } else {
        match serde_json::from_str(&call.function.arguments) {
            Ok(value @ Value::Object(_)) => value,
            _ => {
                return Err(bad_upstream(format!(
                    "the upstream called tool `{}` with arguments that are not a JSON object",
                    call.function.name
                )));
            }
        }
    };
    Ok(OutputBlock::ToolUse {
        id: call.id,
        name: call.function.name,
        input,
    })
}

fn bad_upstream(message: impl Into<String>) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::BAD_GATEWAY,
        "upstream_error",
        "malformed",
        message,
    )
}
