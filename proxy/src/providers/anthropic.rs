//! Anthropic Messages API (`POST /v1/messages`, `anthropic-version: 2023-06-01`).
//!
//! System and developer messages become the top-level `system`; tool results become user
//! `tool_result` blocks; consecutive messages of one role are merged, as the API expects
//! alternating turns. Parameters are mapped or refused as the table in [`super::params`]
//! says: `top_k`, `service_tier` and `parallel_tool_calls` have equivalents; a
//! `temperature` above Anthropic's 1 is refused rather than clamped.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{ProviderError, Result, UpstreamError, body_excerpt};
use super::params::{as_bool, as_u32, check_range, invalid_field, is_neutral, unsupported_field};
use super::ratelimit;
use super::sse::{SseEvent, SseParser};
use super::stream::ChunkBuilder;
use super::types::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, ContentPart, FinishReason, FunctionCall,
    Role, ToolCall, ToolChoice, ToolChoiceMode, Usage,
};
use super::{
    UpstreamRequest, completion, endpoint, json_headers, parse_arguments, parse_data_url,
    reject_multiple_choices, secret_header,
};

/// The API version this module speaks.
pub const API_VERSION: &str = "2023-06-01";

/// `max_tokens` is required by the Messages API; used when the caller set no cap.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<Message>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<ToolDef<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<AnthropicToolChoice<'a>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    metadata: Option<Metadata<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    service_tier: Option<&'static str>,
}

/// What the request's unmodelled fields (`req.extra`) become at Anthropic.
#[derive(Debug, Default)]
struct Extras {
    top_k: Option<u32>,
    service_tier: Option<&'static str>,
    disable_parallel_tool_use: bool,
}

/// Name for error messages.
const PROVIDER: &str = "Anthropic";

#[derive(Debug, Serialize)]
struct Message {
    role: MessageRole,
    content: Vec<Block>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum MessageRole {
    User,
    Assistant,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Serialize)]
struct ToolDef<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    input_schema: Value,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum AnthropicToolChoice<'a> {
    Auto {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    Any {
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    Tool {
        name: &'a str,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        disable_parallel_tool_use: bool,
    },
    None,
}

#[derive(Debug, Serialize)]
struct Metadata<'a> {
    user_id: &'a str,
}

/// A `message` object (non-streaming answer, and the skeleton in `message_start`).
#[derive(Debug, Deserialize)]
struct MessagesResponse {
    id: String,
    #[serde(default)]
    content: Vec<ResponseBlock>,
    #[serde(default)]
    stop_reason: Option<String>,
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

/// `POST {base}/v1/messages`.
pub(crate) fn build_request(
    base_url: &str,
    api_key: Option<&str>,
    upstream_model: &str,
    req: &ChatRequest,
    stream: bool,
) -> Result<UpstreamRequest> {
    reject_multiple_choices(req, PROVIDER)?;
    // OpenAI allows 0..=2, Anthropic 0..=1: a higher value is refused, not clamped.
    check_range("temperature", req.temperature, 0.0..=1.0, PROVIDER)?;
    check_range("top_p", req.top_p, 0.0..=1.0, PROVIDER)?;
    let extras = read_extras(req)?;
    let (system, messages) = convert_messages(&req.messages)?;
    let body = MessagesRequest {
        model: upstream_model,
        max_tokens: max_tokens(req),
        messages,
        system,
        stop_sequences: req.stop.as_ref().map(|s| s.to_vec()),
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: extras.top_k,
        tools: convert_tools(req),
        tool_choice: convert_tool_choice(req, extras.disable_parallel_tool_use),
        stream,
        metadata: req.user.as_deref().map(|user_id| Metadata { user_id }),
        service_tier: extras.service_tier,
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    let mut headers = json_headers();
    headers.insert("anthropic-version", HeaderValue::from_static(API_VERSION));
    if let Some(key) = api_key {
        headers.insert("x-api-key", secret_header(key)?);
    }
    Ok(UpstreamRequest {
        method: Method::POST,
        url: endpoint(base_url, "v1", "messages"),
        headers,
        body: Bytes::from(body),
    })
}

/// The `max_tokens` sent for `req`: the caller's cap, or [`DEFAULT_MAX_TOKENS`] since the
/// Messages API requires one.
pub(crate) fn max_tokens(req: &ChatRequest) -> u32 {
    req.max_output_tokens().unwrap_or(DEFAULT_MAX_TOKENS)
}

/// Maps or refuses each of `req.extra` (see [`super::params`]).
fn read_extras(req: &ChatRequest) -> Result<Extras> {
    let mut out = Extras::default();
    for (field, value) in &req.extra {
        match field.as_str() {
            _ if value.is_null() => {}
            "top_k" => out.top_k = Some(as_u32(field, value, PROVIDER)?),
            "parallel_tool_calls" => {
                out.disable_parallel_tool_use = !as_bool(field, value, PROVIDER)?;
            }
            "service_tier" => {
                out.service_tier = Some(match value.as_str() {
                    Some("auto") => "auto",
                    Some("default" | "standard_only") => "standard_only",
                    _ => {
                        return Err(invalid_field(
                            field,
                            PROVIDER,
                            "`auto`, `default` or `standard_only`",
                        ));
                    }
                });
            }
            _ if is_neutral(field, value) => {}
            _ => return Err(unsupported_field(field, PROVIDER)),
        }
    }
    Ok(out)
}

fn convert_messages(messages: &[ChatMessage]) -> Result<(Option<String>, Vec<Message>)> {
    let mut system = Vec::new();
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    for message in messages {
        let (role, blocks) = match message.role {
            Role::System | Role::Developer => {
                let text = message.text();
                if !text.is_empty() {
                    system.push(text);
                }
                continue;
            }
            Role::User => (MessageRole::User, user_blocks(message)?),
            Role::Assistant => (MessageRole::Assistant, assistant_blocks(message)?),
            Role::Tool => {
                let tool_use_id = message.tool_call_id.clone().ok_or_else(|| {
                    ProviderError::unsupported("tool message without tool_call_id")
                })?;
                let content = message.text();
                (
                    MessageRole::User,
                    vec![Block::ToolResult {
                        tool_use_id,
                        content,
                    }],
                )
            }
        };
        if blocks.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.role == role => last.content.extend(blocks),
            _ => out.push(Message {
                role,
                content: blocks,
            }),
        }
    }
    if out.is_empty() {
        return Err(ProviderError::unsupported(
            "at least one user or assistant message is required",
        ));
    }
    let system = (!system.is_empty()).then(|| system.join("\n\n"));
    Ok((system, out))
}

fn user_blocks(message: &ChatMessage) -> Result<Vec<Block>> {
    let Some(content) = &message.content else {
        return Ok(Vec::new());
    };
    let mut blocks = Vec::new();
    for part in content.parts() {
        match part {
            ContentPart::Text { text } if text.is_empty() => {}
            ContentPart::Text { text } => blocks.push(Block::Text { text }),
            ContentPart::ImageUrl { image_url } => {
                let source = match parse_data_url(&image_url.url) {
                    Some((media_type, data)) => ImageSource::Base64 {
                        media_type: media_type.to_owned(),
                        data: data.to_owned(),
                    },
                    None => ImageSource::Url { url: image_url.url },
                };
                blocks.push(Block::Image { source });
            }
        }
    }
    Ok(blocks)
}

fn assistant_blocks(message: &ChatMessage) -> Result<Vec<Block>> {
    let mut blocks = Vec::new();
    let text = message.text();
    if !text.is_empty() {
        blocks.push(Block::Text { text });
    }
    for call in message.tool_calls.iter().flatten() {
        blocks.push(Block::ToolUse {
            id: call.id.clone(),
            name: call.function.name.clone(),
            input: parse_arguments(&call.function.arguments)?,
        });
    }
    Ok(blocks)
}

fn convert_tools(req: &ChatRequest) -> Option<Vec<ToolDef<'_>>> {
    let tools = req.tools.as_ref()?;
    Some(
        tools
            .iter()
            .map(|tool| ToolDef {
                name: &tool.function.name,
                description: tool.function.description.as_deref(),
                input_schema: tool
                    .function
                    .parameters
                    .clone()
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
            })
            .collect(),
    )
}

fn convert_tool_choice(
    req: &ChatRequest,
    disable_parallel_tool_use: bool,
) -> Option<AnthropicToolChoice<'_>> {
    match &req.tool_choice {
        Some(ToolChoice::Mode(ToolChoiceMode::None)) => Some(AnthropicToolChoice::None),
        Some(ToolChoice::Mode(ToolChoiceMode::Required)) => Some(AnthropicToolChoice::Any {
            disable_parallel_tool_use,
        }),
        Some(ToolChoice::Named(named)) => Some(AnthropicToolChoice::Tool {
            name: &named.function.name,
            disable_parallel_tool_use,
        }),
        Some(ToolChoice::Mode(ToolChoiceMode::Auto)) => Some(AnthropicToolChoice::Auto {
            disable_parallel_tool_use,
        }),
        None if disable_parallel_tool_use && req.tools.is_some() => {
            Some(AnthropicToolChoice::Auto {
                disable_parallel_tool_use,
            })
        }
        None => None,
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
            }),
            ResponseBlock::Other => {}
        }
    }
    Ok(completion(
        response.id,
        model_for_caller,
        text,
        calls,
        finish_reason(response.stop_reason.as_deref()),
        response.usage.to_usage(),
    ))
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
}

impl Decoder {
    pub fn new(model_for_caller: &str, include_usage: bool) -> Self {
        Decoder {
            sse: SseParser::new(),
            builder: ChunkBuilder::new(model_for_caller, include_usage),
            tool_blocks: HashMap::new(),
            stop_reason: None,
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
                let reason = finish_reason(self.stop_reason.as_deref());
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
