//! Anthropic Messages API (`POST /v1/messages`, `anthropic-version: 2023-06-01`).
//!
//! System and developer messages become the top-level `system`; tool results become user
//! `tool_result` blocks; consecutive messages of one role are merged, as the API expects
//! alternating turns. Parameters are mapped or refused as the table in [`super::params`]
//! says: `top_k`, `service_tier` and `parallel_tool_calls` have equivalents; a
//! `temperature` above Anthropic's 1 is refused rather than clamped. What the Anthropic
//! door received and OpenAI's shape cannot say (cache breakpoints, `is_error`, the
//! `anthropic-beta` header) goes back out as it came in (see `anthropic/request.rs`).
//!
//! Answers: `stop_reason: "stop_sequence"` becomes finish reason `stop` with the matched
//! sequence in `stop_sequence`, so the Anthropic door can report it.

mod request;

use std::collections::HashMap;
use std::time::SystemTime;

use http::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use super::completion;
use super::error::{ProviderError, Result, UpstreamError, body_excerpt};
use super::ratelimit;
use super::sse::{SseEvent, SseParser};
use super::stream::ChunkBuilder;
use super::types::{ChatChunk, ChatResponse, FinishReason, FunctionCall, ToolCall, Usage};

pub(crate) use request::{beta_header, build_body, max_tokens};

/// The API version this module speaks.
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` is required by the Messages API; used when the caller set no cap.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Name for error messages.
const PROVIDER: &str = "Anthropic";

/// A `message` object (non-streaming answer, and the skeleton in `message_start`).
#[derive(Debug, Deserialize)]
struct MessagesResponse {
    id: String,
    #[serde(default)]
    content: Vec<ResponseBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
    /// Which of the request's stop sequences matched (with `stop_reason: "stop_sequence"`).
    #[serde(default)]
    stop_sequence: Option<String>,
    #[serde(default)]
    usage: AnthropicUsage,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ResponseBlock {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[serde(default)]
        input: Value,
    },
    /// `thinking`, `server_tool_use`, `web_search_tool_result`, ...: not forwarded.
    #[serde(other)]
    Other,
}

#[derive(Debug, Default, Deserialize)]
struct AnthropicUsage {
    #[serde(default)]
    input_tokens: Option<u32>,
    #[serde(default)]
    output_tokens: Option<u32>,
    #[serde(default)]
    cache_creation_input_tokens: Option<u32>,
    #[serde(default)]
    cache_read_input_tokens: Option<u32>,
}

impl AnthropicUsage {
    /// Prompt tokens as OpenAI counts them: cached ones included.
    fn prompt_tokens(&self) -> Option<u32> {
        let input = self.input_tokens?;
        let cached = self.cache_creation_input_tokens.unwrap_or(0)
            + self.cache_read_input_tokens.unwrap_or(0);
        Some(input.saturating_add(cached))
    }

    fn to_usage(&self) -> Usage {
        Usage::new(
            self.prompt_tokens().unwrap_or(0),
            self.output_tokens.unwrap_or(0),
        )
    }
}

/// Stream events, by their `type`.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent {
    MessageStart {
        message: MessagesResponse,
    },
    ContentBlockStart {
        index: u32,
        content_block: ResponseBlock,
    },
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<AnthropicUsage>,
    },
    MessageStop,
    Error {
        error: ApiError,
    },
    /// `ping`, `content_block_stop`, and event types added later.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    /// `thinking_delta`, `signature_delta`, `citations_delta`.
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct MessageDeltaBody {
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    stop_sequence: Option<String>,
}

/// `{"type": "error", "error": {"type", "message"}}`.
#[derive(Debug, Deserialize)]
struct ErrorResponse {
    error: ApiError,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    message: String,
}

impl ApiError {
    /// The HTTP status Anthropic documents for each error type (used for stream errors,
    /// which arrive on a 200 response).
    fn status(&self) -> u16 {
        match self.kind.as_str() {
            "invalid_request_error" => 400,
            "authentication_error" => 401,
            "billing_error" => 402,
            "permission_error" => 403,
            "not_found_error" => 404,
            "request_too_large" => 413,
            "rate_limit_error" => 429,
            "overloaded_error" => 529,
            _ => 500,
        }
    }

    fn into_upstream(self, status: u16) -> UpstreamError {
        let kind = if self.kind == "billing_error" {
            "insufficient_quota".to_owned()
        } else {
            self.kind
        };
        UpstreamError {
            status,
            kind: Some(kind),
            message: self.message,
            retry_after: None,
        }
    }
}

/// Parses a `message` into a `chat.completion`.
pub(crate) fn parse_response(body: &[u8], model_for_caller: &str) -> Result<ChatResponse> {
    let response: MessagesResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("Anthropic message", &e))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in response.content {
        match block {
            ResponseBlock::Text { text: t } => text.push_str(&t),
            ResponseBlock::ToolUse { id, name, input } => calls.push(ToolCall {
                id,
                kind: "function".to_owned(),
                function: FunctionCall {
                    name,
                    arguments: input.to_string(),
                },
                cache_control: None,
            }),
            ResponseBlock::Other => {}
        }
    }
    let stop_reason = response.stop_reason.as_deref();
    let mut answer = completion(
        response.id,
        model_for_caller,
        text,
        calls,
        finish_reason(stop_reason),
        response.usage.to_usage(),
    );
    if let Some(choice) = answer.choices.first_mut() {
        choice.stop_sequence = matched_sequence(stop_reason, response.stop_sequence);
    }
    Ok(answer)
}

/// The stop sequence that ended the answer, when `stop_reason` says one did.
fn matched_sequence(stop_reason: Option<&str>, sequence: Option<String>) -> Option<String> {
    sequence.filter(|_| stop_reason == Some("stop_sequence"))
}

/// Maps `stop_reason` to an OpenAI finish reason.
fn finish_reason(stop_reason: Option<&str>) -> FinishReason {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => FinishReason::Length,
        Some("tool_use") => FinishReason::ToolCalls,
        Some("refusal") => FinishReason::ContentFilter,
        _ => FinishReason::Stop, // end_turn, stop_sequence, pause_turn
    }
}

/// Classifies an error response.
pub(crate) fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> ProviderError {
    let mut error = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(parsed) => parsed.error.into_upstream(status),
        Err(_) => UpstreamError {
            status,
            message: body_excerpt(body),
            ..UpstreamError::default()
        },
    };
    error.retry_after = ratelimit::anthropic_headers(headers, now).wait_hint();
    error.classify()
}

/// Decodes an Anthropic SSE stream; `message_stop` is the terminal event.
#[derive(Debug)]
pub(crate) struct Decoder {
    sse: SseParser,
    pub(super) builder: ChunkBuilder,
    /// Anthropic content-block index -> OpenAI tool-call index.
    tool_blocks: HashMap<u32, u32>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
}

impl Decoder {
    pub fn new(model_for_caller: &str, include_usage: bool) -> Self {
        Decoder {
            sse: SseParser::new(),
            builder: ChunkBuilder::new(model_for_caller, include_usage),
            tool_blocks: HashMap::new(),
            stop_reason: None,
            stop_sequence: None,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ChatChunk>> {
        let events = self.sse.feed(bytes)?;
        self.events(events)
    }

    pub fn finish(&mut self) -> Result<Vec<ChatChunk>> {
        let events = self.sse.finish();
        let out = self.events(events)?;
        if self.builder.done {
            Ok(out)
        } else {
            Err(ProviderError::Truncated)
        }
    }

    fn events(&mut self, events: Vec<SseEvent>) -> Result<Vec<ChatChunk>> {
        let mut out = Vec::new();
        for event in events {
            if self.builder.done {
                break;
            }
            let event: StreamEvent = serde_json::from_str(&event.data)
                .map_err(|e| ProviderError::malformed("Anthropic stream event", &e))?;
            self.event(event, &mut out)?;
        }
        Ok(out)
    }

    fn event(&mut self, event: StreamEvent, out: &mut Vec<ChatChunk>) -> Result<()> {
        let b = &mut self.builder;
        match event {
            StreamEvent::MessageStart { message } => {
                b.id = message.id;
                b.usage = Some(message.usage.to_usage());
                out.push(b.opening());
            }
            StreamEvent::ContentBlockStart {
                index,
                content_block,
            } => match content_block {
                ResponseBlock::ToolUse { id, name, .. } => {
                    // The block opens with `input: {}`; the arguments follow as deltas.
                    self.tool_blocks.insert(index, b.tool_calls);
                    out.push(b.tool_call_start(id, name, String::new()));
                }
                ResponseBlock::Text { text } if !text.is_empty() => out.push(b.text(&text)),
                ResponseBlock::Text { .. } | ResponseBlock::Other => {}
            },
            StreamEvent::ContentBlockDelta { index, delta } => match delta {
                BlockDelta::TextDelta { text } if !text.is_empty() => out.push(b.text(&text)),
                BlockDelta::InputJsonDelta { partial_json } if !partial_json.is_empty() => {
                    if let Some(&call) = self.tool_blocks.get(&index) {
                        out.push(b.tool_arguments(call, &partial_json));
                    }
                }
                _ => {}
            },
            StreamEvent::MessageDelta { delta, usage } => {
                if delta.stop_reason.is_some() {
                    self.stop_reason = delta.stop_reason;
                    self.stop_sequence = delta.stop_sequence;
                }
                if let Some(usage) = usage {
                    // Counts in message_delta are cumulative.
                    let current = b.usage.unwrap_or_default();
                    let prompt = usage.prompt_tokens().unwrap_or(current.prompt_tokens);
                    let completion = usage.output_tokens.unwrap_or(current.completion_tokens);
                    b.usage = Some(Usage::new(prompt, completion));
                }
            }
            StreamEvent::MessageStop => {
                let stop_reason = self.stop_reason.as_deref();
                let reason = finish_reason(stop_reason);
                b.stop_sequence = matched_sequence(stop_reason, self.stop_sequence.take());
                out.extend(b.close(reason));
            }
            StreamEvent::Error { error } => {
                let status = error.status();
                return Err(error.into_upstream(status).classify());
            }
            StreamEvent::Other => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
