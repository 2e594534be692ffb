//! The Messages request an Anthropic upstream gets, built from the internal request.
//!
//! Besides the conversation and the parameters of [`super::super::params`], three things
//! the Anthropic door received travel back out as they came in:
//! - prompt-cache breakpoints (`cache_control`) on system blocks, content blocks
//!   (text, image, `tool_use`, `tool_result`), tool definitions and the request itself;
//! - `is_error` on a tool result;
//! - the betas of the `anthropic-beta` header.
//!
//! The system prompt goes as a string unless one of its parts carries a breakpoint; then it
//! goes as text blocks, one per part, so the breakpoint sits where the caller put it.

use bytes::Bytes;
use http::HeaderValue;
use serde::Serialize;
use serde_json::Value;

use super::super::error::{ProviderError, Result};
use super::super::params::{
    as_bool, as_u32, check_range, invalid_field, is_neutral, unsupported_field,
};
use super::super::types::{
    CacheControl, ChatMessage, ChatRequest, ContentPart, MessageContent, Role, ToolChoice,
    ToolChoiceMode,
};
use super::super::{parse_arguments, parse_data_url, reject_multiple_choices};
use super::{DEFAULT_MAX_TOKENS, PROVIDER};

#[derive(Debug, Serialize)]
struct MessagesRequest<'a> {
    model: &'a str,
    max_tokens: u32,
    messages: Vec<Message<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<System<'a>>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a CacheControl>,
}

/// What the request's unmodelled fields (`req.extra`) become at Anthropic.
#[derive(Debug, Default)]
struct Extras {
    top_k: Option<u32>,
    service_tier: Option<&'static str>,
    disable_parallel_tool_use: bool,
}

/// `system`: a string, or text blocks when a breakpoint must sit between them.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum System<'a> {
    Text(String),
    Blocks(Vec<TextBlock<'a>>),
}

#[derive(Debug, Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a CacheControl>,
}

#[derive(Debug, Serialize)]
struct Message<'a> {
    role: MessageRole,
    content: Vec<Block<'a>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum MessageRole {
    User,
    Assistant,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block<'a> {
    Text {
        text: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<&'a CacheControl>,
    },
    Image {
        source: ImageSource,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<&'a CacheControl>,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Value,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<&'a CacheControl>,
    },
    ToolResult {
        tool_use_id: &'a str,
        content: ToolResultContent<'a>,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        cache_control: Option<&'a CacheControl>,
    },
}

/// A tool result's content: a string, or text blocks when one of them carries a breakpoint.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum ToolResultContent<'a> {
    Text(String),
    Blocks(Vec<TextBlock<'a>>),
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
    #[serde(skip_serializing_if = "Option::is_none")]
    cache_control: Option<&'a CacheControl>,
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

/// `POST {base}/v1/messages`.
pub(crate) fn build_body(upstream_model: &str, req: &ChatRequest, stream: bool) -> Result<Bytes> {
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
        cache_control: req.cache_control.as_ref(),
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    Ok(Bytes::from(body))
}

/// The `anthropic-beta` header of `req`, if the caller asked for betas: the one header of
/// an Anthropic call that depends on the request rather than on the key.
pub(crate) fn beta_header(req: &ChatRequest) -> Result<Option<HeaderValue>> {
    if req.anthropic_beta.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&req.anthropic_beta.join(","))
        .map(Some)
        .map_err(|_| ProviderError::unsupported("`anthropic-beta` is not a valid header"))
}

/// The `max_tokens` sent for `req`: the caller's cap, or [`DEFAULT_MAX_TOKENS`] since the
/// Messages API requires one.
pub(crate) fn max_tokens(req: &ChatRequest) -> u32 {
    req.max_output_tokens().unwrap_or(DEFAULT_MAX_TOKENS)
}

/// Maps or refuses each of `req.extra` (see [`super::super::params`]).
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

type Converted<'a> = (Option<System<'a>>, Vec<Message<'a>>);

fn convert_messages(messages: &[ChatMessage]) -> Result<Converted<'_>> {
    let mut out: Vec<Message<'_>> = Vec::with_capacity(messages.len());
    for message in messages {
        let (role, blocks) = match message.role {
            Role::System | Role::Developer => continue,
            Role::User => (MessageRole::User, user_blocks(message)?),
            Role::Assistant => (MessageRole::Assistant, assistant_blocks(message)?),
            Role::Tool => (MessageRole::User, vec![tool_result(message)?]),
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
    Ok((system(messages), out))
}

/// The system and developer messages: joined into one string, or text blocks (one per
/// part) when a part carries a cache breakpoint.
fn system(messages: &[ChatMessage]) -> Option<System<'_>> {
    let system = || {
        messages
            .iter()
            .filter(|m| matches!(m.role, Role::System | Role::Developer))
    };
    let cached = system().any(|m| match &m.content {
        Some(MessageContent::Parts(parts)) => parts.iter().any(|p| p.cache_control().is_some()),
        _ => false,
    });
    if !cached {
        let texts: Vec<String> = system()
            .map(ChatMessage::text)
            .filter(|t| !t.is_empty())
            .collect();
        return (!texts.is_empty()).then(|| System::Text(texts.join("\n\n")));
    }
    let mut blocks = Vec::new();
    for message in system() {
        match &message.content {
            Some(MessageContent::Text(text)) if !text.is_empty() => {
                blocks.push(text_block(text, None))
            }
            Some(MessageContent::Parts(parts)) => {
                for part in parts {
                    if let ContentPart::Text {
                        text,
                        cache_control,
                    } = part
                    {
                        blocks.push(text_block(text, cache_control.as_ref()));
                    }
                }
            }
            _ => {}
        }
    }
    Some(System::Blocks(blocks))
}

fn text_block<'a>(text: &'a str, cache_control: Option<&'a CacheControl>) -> TextBlock<'a> {
    TextBlock {
        kind: "text",
        text,
        cache_control,
    }
}

fn user_blocks(message: &ChatMessage) -> Result<Vec<Block<'_>>> {
    let parts = match &message.content {
        None => return Ok(Vec::new()),
        Some(MessageContent::Text(text)) if text.is_empty() => return Ok(Vec::new()),
        Some(MessageContent::Text(text)) => {
            return Ok(vec![Block::Text {
                text: text.clone(),
                cache_control: None,
            }]);
        }
        Some(MessageContent::Parts(parts)) => parts,
    };
    let mut blocks = Vec::with_capacity(parts.len());
    for part in parts {
        match part {
            // An empty text part says nothing, unless it marks a breakpoint: then it goes,
            // and Anthropic says what it thinks of it.
            ContentPart::Text {
                text,
                cache_control: None,
            } if text.is_empty() => {}
            ContentPart::Text {
                text,
                cache_control,
            } => blocks.push(Block::Text {
                text: text.clone(),
                cache_control: cache_control.as_ref(),
            }),
            ContentPart::ImageUrl {
                image_url,
                cache_control,
            } => {
                let source = match parse_data_url(&image_url.url) {
                    Some((media_type, data)) => ImageSource::Base64 {
                        media_type: media_type.to_owned(),
                        data: data.to_owned(),
                    },
                    None => ImageSource::Url {
                        url: image_url.url.clone(),
                    },
                };
                blocks.push(Block::Image {
                    source,
                    cache_control: cache_control.as_ref(),
                });
            }
        }
    }
    Ok(blocks)
}

/// An assistant turn: its text as one block (one per part when a part carries a
/// breakpoint, so that it stays on its part), then its tool calls.
fn assistant_blocks(message: &ChatMessage) -> Result<Vec<Block<'_>>> {
    let mut blocks = Vec::new();
    match &message.content {
        Some(MessageContent::Parts(parts)) if parts.iter().any(|p| p.cache_control().is_some()) => {
            for part in parts {
                if let ContentPart::Text {
                    text,
                    cache_control,
                } = part
                    && (!text.is_empty() || cache_control.is_some())
                {
                    blocks.push(Block::Text {
                        text: text.clone(),
                        cache_control: cache_control.as_ref(),
                    });
                }
            }
        }
        _ => {
            let text = message.text();
            if !text.is_empty() {
                blocks.push(Block::Text {
                    text,
                    cache_control: None,
                });
            }
        }
    }
    for call in message.tool_calls.iter().flatten() {
        blocks.push(Block::ToolUse {
            id: &call.id,
            name: &call.function.name,
            input: parse_arguments(&call.function.arguments)?,
            cache_control: call.cache_control.as_ref(),
        });
    }
    Ok(blocks)
}

/// A `tool` message as a `tool_result` block, with `is_error` and its breakpoints.
fn tool_result(message: &ChatMessage) -> Result<Block<'_>> {
    let tool_use_id = message
        .tool_call_id
        .as_deref()
        .ok_or_else(|| ProviderError::unsupported("tool message without tool_call_id"))?;
    let cached_parts = match &message.content {
        Some(MessageContent::Parts(parts)) if parts.iter().any(|p| p.cache_control().is_some()) => {
            Some(parts)
        }
        _ => None,
    };
    let content = match cached_parts {
        Some(parts) => ToolResultContent::Blocks(
            parts
                .iter()
                .filter_map(|part| match part {
                    ContentPart::Text {
                        text,
                        cache_control,
                    } => Some(text_block(text, cache_control.as_ref())),
                    ContentPart::ImageUrl { .. } => None,
                })
                .collect(),
        ),
        None => ToolResultContent::Text(message.text()),
    };
    Ok(Block::ToolResult {
        tool_use_id,
        content,
        is_error: message.tool_error,
        cache_control: message.cache_control.as_ref(),
    })
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
                cache_control: tool.cache_control.as_ref(),
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
