//! The translation of a Messages request's parts into the internal shape, refusing by its
//! path whatever cannot be translated.

use std::fmt::{self, Display};

use serde_json::{Map, Value};

use super::super::error::invalid_request;
use super::{
    AnthropicToolChoice, ImageBlock, ImageSource, InputBlock, InputContent, InputMessage,
    InputRole, Metadata, SystemPrompt, TextBlock, ToolChoiceKind, ToolDef, ToolResultBlock,
    ToolUseBlock, Unmodelled,
};
use crate::providers::types::{
    CacheControl, ChatMessage, ContentPart, FunctionCall, FunctionDef, FunctionName, ImageUrl,
    MessageContent, NamedToolChoice, Role, Tool, ToolCall, ToolChoice, ToolChoiceMode,
};
use crate::server::error::ApiError;

/// Where a value sits in the request, for refusals; formatted only when one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Path {
    /// The request itself (its fields are named alone: `cache_control`).
    Top,
    /// `system[i]`.
    System(usize),
    /// `messages[i]`.
    Message(usize),
    /// `messages[i].content[j]`.
    Block(usize, usize),
    /// `messages[i].content[j].content[k]` (inside a `tool_result`).
    Nested(usize, usize, usize),
    /// `tools[i]`.
    Tool(usize),
}

impl Path {
    /// The `j`th element of this value's `content`.
    fn content(self, j: usize) -> Path {
        match self {
            Path::Message(i) => Path::Block(i, j),
            Path::Block(i, k) => Path::Nested(i, k, j),
            other => other,
        }
    }

    /// `path.field`, or `field` alone at the top.
    fn field(self, name: &str) -> String {
        match self {
            Path::Top => name.to_owned(),
            other => format!("{other}.{name}"),
        }
    }
}

impl Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Path::Top => Ok(()),
            Path::System(i) => write!(f, "system[{i}]"),
            Path::Message(i) => write!(f, "messages[{i}]"),
            Path::Block(i, j) => write!(f, "messages[{i}].content[{j}]"),
            Path::Nested(i, j, k) => write!(f, "messages[{i}].content[{j}].content[{k}]"),
            Path::Tool(i) => write!(f, "tools[{i}]"),
        }
    }
}

/// Top-level fields this door does not model. `thinking: {"type": "disabled"}` asks for
/// what every answer here is, so it is accepted; `null` says nothing and is ignored.
pub(super) fn refuse_top_level(unmodelled: &Unmodelled) -> Result<(), ApiError> {
    let refused: Vec<&str> = unmodelled
        .iter()
        .filter(|(name, value)| {
            let disabled_thinking = name.as_str() == "thinking"
                && value.get("type").and_then(Value::as_str) == Some("disabled");
            !value.is_null() && !disabled_thinking
        })
        .map(|(name, _)| name.as_str())
        .collect();
    match refused.as_slice() {
        [] => Ok(()),
        [one] => Err(invalid_request(format!(
            "`{one}` is not supported by this gateway"
        ))),
        many => Err(invalid_request(format!(
            "`{}` are not supported by this gateway",
            many.join("`, `")
        ))),
    }
}

/// The `cache_control` at `path`: `null` or absent is none, anything but
/// `{"type": "ephemeral"}` with an optional string `ttl` is refused by its path.
pub(super) fn cache_control(
    path: Path,
    value: Option<Value>,
) -> Result<Option<CacheControl>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(value) => serde_json::from_value(value).map(Some).map_err(|e| {
            invalid_request(format!(
                "`{}` must be {{\"type\": \"ephemeral\"}} with an optional `ttl`: {e}",
                path.field("cache_control")
            ))
        }),
    }
}

/// Refuses the first non-null field of `unmodelled`, named by `path.field`.
fn refuse_unmodelled(path: Path, unmodelled: &Unmodelled) -> Result<(), ApiError> {
    match unmodelled.iter().find(|(_, value)| !value.is_null()) {
        Some((name, _)) => Err(invalid_request(format!(
            "`{}` is not supported by this gateway",
            path.field(name)
        ))),
        None => Ok(()),
    }
}

/// A block that is not one of the four this door translates, or a known one that failed to
/// parse (then the parse error is reported).
fn refuse_block(path: Path, block: Unmodelled) -> ApiError {
    let kind = block
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let parse = |result: Result<(), serde_json::Error>| match result {
        Err(e) => invalid_request(format!("`{path}` is not a valid `{kind}` block: {e}")),
        Ok(()) => invalid_request(format!("`{path}` could not be read")),
    };
    let value = Value::Object(block);
    match kind.as_str() {
        "text" => parse(serde_json::from_value::<TextBlock>(value).map(drop)),
        "image" => parse(serde_json::from_value::<ImageBlock>(value).map(drop)),
        "tool_use" => parse(serde_json::from_value::<ToolUseBlock>(value).map(drop)),
        "tool_result" => parse(serde_json::from_value::<ToolResultBlock>(value).map(drop)),
        "" => invalid_request(format!("`{path}.type` is required")),
        other => invalid_request(format!(
            "`{path}`: `{other}` content blocks are not supported by this gateway"
        )),
    }
}

pub(super) fn system_message(system: SystemPrompt) -> Result<Option<ChatMessage>, ApiError> {
    let content = match system {
        SystemPrompt::Text(text) if text.is_empty() => return Ok(None),
        SystemPrompt::Text(text) => MessageContent::Text(text),
        SystemPrompt::Blocks(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.into_iter().enumerate() {
                parts.push(text_part(Path::System(i), block)?);
            }
            if parts.is_empty() {
                return Ok(None);
            }
            MessageContent::Parts(parts)
        }
    };
    Ok(Some(ChatMessage::new(Role::System, Some(content))))
}

/// A block that may only be text (system prompts, tool results), with its breakpoint.
fn text_part(path: Path, block: InputBlock) -> Result<ContentPart, ApiError> {
    match block {
        InputBlock::Text(text) => text_block(path, text),
        InputBlock::Other(other) => Err(refuse_block(path, other)),
        InputBlock::Image(_) | InputBlock::ToolUse(_) | InputBlock::ToolResult(_) => Err(
            invalid_request(format!("`{path}` must be a text block here")),
        ),
    }
}

fn text_block(path: Path, block: TextBlock) -> Result<ContentPart, ApiError> {
    refuse_unmodelled(path, &block.unmodelled)?;
    Ok(ContentPart::Text {
        text: block.text,
        cache_control: cache_control(path, block.cache_control)?,
    })
}

pub(super) fn translate_message(
    message: InputMessage,
    path: Path,
    out: &mut Vec<ChatMessage>,
) -> Result<(), ApiError> {
    refuse_unmodelled(path, &message.unmodelled)?;
    let blocks = match message.content {
        InputContent::Text(text) => {
            let role = match message.role {
                InputRole::User => Role::User,
                InputRole::Assistant => Role::Assistant,
            };
            out.push(ChatMessage::new(role, Some(MessageContent::Text(text))));
            return Ok(());
        }
        InputContent::Blocks(blocks) => blocks,
    };
    match message.role {
        InputRole::User => user_blocks(blocks, path, out),
        InputRole::Assistant => {
            out.push(assistant_blocks(blocks, path)?);
            Ok(())
        }
    }
}

/// A user turn's blocks, in order: text and images become user messages, each
/// `tool_result` a `tool` message between them.
fn user_blocks(
    blocks: Vec<InputBlock>,
    path: Path,
    out: &mut Vec<ChatMessage>,
) -> Result<(), ApiError> {
    let mut parts = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        let path = path.content(j);
        match block {
            InputBlock::Text(text) => parts.push(text_block(path, text)?),
            InputBlock::Image(image) => parts.push(image_part(image, path)?),
            InputBlock::ToolResult(result) => {
                if !parts.is_empty() {
                    let content = MessageContent::Parts(std::mem::take(&mut parts));
                    out.push(ChatMessage::new(Role::User, Some(content)));
                }
                out.push(tool_message(result, path)?);
            }
            InputBlock::ToolUse(_) => {
                return Err(invalid_request(format!(
                    "`{path}`: `tool_use` blocks belong in assistant turns"
                )));
            }
            InputBlock::Other(other) => return Err(refuse_block(path, other)),
        }
    }
    if !parts.is_empty() {
        let content = MessageContent::Parts(parts);
        out.push(ChatMessage::new(Role::User, Some(content)));
    }
    Ok(())
}

/// An assistant turn: its text blocks concatenated (kept as parts when one carries a
/// breakpoint, so that it stays on its block), its `tool_use` blocks as tool calls.
fn assistant_blocks(blocks: Vec<InputBlock>, path: Path) -> Result<ChatMessage, ApiError> {
    let mut parts = Vec::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        let path = path.content(j);
        match block {
            InputBlock::Text(block) => parts.push(text_block(path, block)?),
            InputBlock::ToolUse(call) => calls.push(tool_call(call, path)?),
            InputBlock::Image(_) | InputBlock::ToolResult(_) => {
                return Err(invalid_request(format!(
                    "`{path}`: assistant turns may hold only `text` and `tool_use` blocks"
                )));
            }
            InputBlock::Other(other) => return Err(refuse_block(path, other)),
        }
    }
    let content = if parts.iter().any(|p| p.cache_control().is_some()) {
        Some(MessageContent::Parts(parts))
    } else {
        let text = MessageContent::Parts(parts).text();
        (!text.is_empty() || calls.is_empty()).then_some(MessageContent::Text(text))
    };
    Ok(ChatMessage {
        tool_calls: (!calls.is_empty()).then_some(calls),
        ..ChatMessage::new(Role::Assistant, content)
    })
}

fn tool_call(call: ToolUseBlock, path: Path) -> Result<ToolCall, ApiError> {
    refuse_unmodelled(path, &call.unmodelled)?;
    let arguments = match call.input {
        Value::Null => "{}".to_owned(),
        input @ Value::Object(_) => input.to_string(),
        _ => {
            return Err(invalid_request(format!("`{path}.input` must be an object")));
        }
    };
    Ok(ToolCall {
        id: call.id,
        kind: "function".to_owned(),
        function: FunctionCall {
            name: call.name,
            arguments,
        },
        cache_control: cache_control(path, call.cache_control)?,
    })
}

fn image_part(image: ImageBlock, path: Path) -> Result<ContentPart, ApiError> {
    refuse_unmodelled(path, &image.unmodelled)?;
    let url = match image.source {
        ImageSource::Base64 { media_type, data } => format!("data:{media_type};base64,{data}"),
        ImageSource::Url { url } => url,
        ImageSource::Other(source) => {
            let kind = source
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or_default();
            return Err(invalid_request(format!(
                "`{path}.source`: `{kind}` image sources are not supported by this gateway \
                 (use `base64` or `url`)"
            )));
        }
    };
    Ok(ContentPart::ImageUrl {
        image_url: ImageUrl { url, detail: None },
        cache_control: cache_control(path, image.cache_control)?,
    })
}

/// A `tool` message: `is_error` becomes [`ChatMessage::tool_error`] (each adapter says it
/// in its provider's terms), a breakpoint on the block [`ChatMessage::cache_control`].
/// Text blocks are concatenated, unless one carries a breakpoint: then they stay parts.
fn tool_message(result: ToolResultBlock, path: Path) -> Result<ChatMessage, ApiError> {
    refuse_unmodelled(path, &result.unmodelled)?;
    let content = match result.content {
        None => MessageContent::Text(String::new()),
        Some(InputContent::Text(text)) => MessageContent::Text(text),
        Some(InputContent::Blocks(blocks)) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (k, block) in blocks.into_iter().enumerate() {
                parts.push(text_part(path.content(k), block)?);
            }
            if parts.iter().any(|p| p.cache_control().is_some()) {
                MessageContent::Parts(parts)
            } else {
                MessageContent::Text(MessageContent::Parts(parts).text())
            }
        }
    };
    Ok(ChatMessage {
        tool_call_id: Some(result.tool_use_id),
        cache_control: cache_control(path, result.cache_control)?,
        tool_error: result.is_error == Some(true),
        ..ChatMessage::new(Role::Tool, Some(content))
    })
}

pub(super) fn translate_tools(tools: Vec<ToolDef>) -> Result<Vec<Tool>, ApiError> {
    tools
        .into_iter()
        .enumerate()
        .map(|(i, tool)| {
            let path = Path::Tool(i);
            if let Some(kind) = tool.kind.as_deref().filter(|k| *k != "custom") {
                return Err(invalid_request(format!(
                    "`{path}`: `{kind}` tools (server tools) are not supported by this gateway"
                )));
            }
            refuse_unmodelled(path, &tool.unmodelled)?;
            let Some(schema) = tool.input_schema else {
                return Err(invalid_request(format!(
                    "`{path}.input_schema` is required"
                )));
            };
            Ok(Tool {
                kind: "function".to_owned(),
                function: FunctionDef {
                    name: tool.name,
                    description: tool.description,
                    parameters: Some(schema),
                    strict: None,
                },
                cache_control: cache_control(path, tool.cache_control)?,
            })
        })
        .collect()
}

pub(super) fn translate_tool_choice(
    choice: Option<AnthropicToolChoice>,
    extra: &mut Map<String, Value>,
) -> Result<Option<ToolChoice>, ApiError> {
    let Some(choice) = choice else {
        return Ok(None);
    };
    if let Some((name, _)) = choice.unmodelled.iter().find(|(_, v)| !v.is_null()) {
        return Err(invalid_request(format!(
            "`tool_choice.{name}` is not supported by this gateway"
        )));
    }
    if choice.disable_parallel_tool_use == Some(true) {
        extra.insert("parallel_tool_calls".to_owned(), Value::Bool(false));
    }
    let translated = match (choice.kind, choice.name) {
        (ToolChoiceKind::Auto, None) => ToolChoice::Mode(ToolChoiceMode::Auto),
        (ToolChoiceKind::Any, None) => ToolChoice::Mode(ToolChoiceMode::Required),
        (ToolChoiceKind::None, None) => ToolChoice::Mode(ToolChoiceMode::None),
        (ToolChoiceKind::Tool, Some(name)) => ToolChoice::Named(NamedToolChoice {
            kind: "function".to_owned(),
            function: FunctionName { name },
        }),
        (ToolChoiceKind::Tool, None) => {
            return Err(invalid_request("`tool_choice.name` is required for `tool`"));
        }
        (_, Some(_)) => {
            return Err(invalid_request(
                "`tool_choice.name` is allowed only with `\"type\": \"tool\"`",
            ));
        }
    };
    Ok(Some(translated))
}

pub(super) fn translate_metadata(metadata: Metadata) -> Result<Option<String>, ApiError> {
    if let Some((name, _)) = metadata.unmodelled.iter().find(|(_, v)| !v.is_null()) {
        return Err(invalid_request(format!(
            "`metadata.{name}` is not supported by this gateway"
        )));
    }
    Ok(metadata.user_id)
}
