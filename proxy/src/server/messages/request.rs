//! The Anthropic Messages request (`POST /v1/messages`, `POST /v1/messages/count_tokens`) as
//! the Messages API documents it, and its translation into the internal [`ChatRequest`].
//!
//! Nothing is dropped silently: every object keeps the fields it does not model in a
//! flattened map, and [`MessagesRequest::into_chat`] refuses any that is not empty with a 400
//! naming the field by its path (`messages[1].content[0].cache_control`). Block and tool
//! types this door cannot translate (`document`, `thinking`, server tools, ...) are refused
//! the same way. Fields with no internal equivalent that a provider may still honour go
//! into [`ChatRequest::extra`] under their own name (`top_k`), for the provider adapters to
//! pass, map or refuse.

use std::fmt::{self, Display};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::invalid_request;
use crate::providers::types::{
    ChatMessage, ChatRequest, ContentPart, FunctionCall, FunctionDef, FunctionName, ImageUrl,
    MessageContent, NamedToolChoice, Role, Stop, StreamOptions, Tool, ToolCall, ToolChoice,
    ToolChoiceMode,
};
use crate::server::error::ApiError;

/// Fields not modelled by this door, by name (empty when the caller sent only known ones).
type Unmodelled = Map<String, Value>;

/// A Messages request body. `count_tokens` takes the same shape without `max_tokens`.
#[derive(Debug, Clone, Deserialize)]
pub struct MessagesRequest {
    /// Model (or alias) the caller asked for.
    pub model: String,
    /// Cap on generated tokens; required by `create`, optional for `count_tokens`.
    #[serde(default)]
    pub max_tokens: Option<u32>,
    /// The conversation: alternating user and assistant turns.
    pub messages: Vec<InputMessage>,
    /// System prompt, as a string or text blocks.
    #[serde(default)]
    pub system: Option<SystemPrompt>,
    /// Sequences that end generation.
    #[serde(default)]
    pub stop_sequences: Option<Vec<String>>,
    /// Stream the answer as Anthropic server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Sampling temperature, 0..=1.
    #[serde(default)]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default)]
    pub top_p: Option<f64>,
    /// Sample from the top K options only (no internal field: sent as `extra["top_k"]`).
    #[serde(default)]
    pub top_k: Option<u32>,
    /// Request metadata (`user_id`).
    #[serde(default)]
    pub metadata: Option<Metadata>,
    /// Client tools the model may call.
    #[serde(default)]
    pub tools: Option<Vec<ToolDef>>,
    /// Whether and which tool the model must call.
    #[serde(default)]
    pub tool_choice: Option<AnthropicToolChoice>,
    /// Everything else (`thinking`, `mcp_servers`, `container`, ...): refused when present.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// `metadata`.
#[derive(Debug, Clone, Deserialize)]
pub struct Metadata {
    /// An opaque end-user identifier (becomes the internal `user`).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// `system`: a string or an array of text blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SystemPrompt {
    /// Plain text.
    Text(String),
    /// Text blocks (any other block type is refused).
    Blocks(Vec<InputBlock>),
}

/// One turn of the conversation.
#[derive(Debug, Clone, Deserialize)]
pub struct InputMessage {
    /// `user` or `assistant`.
    pub role: InputRole,
    /// A string or content blocks.
    pub content: InputContent,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// Who wrote a turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputRole {
    /// The end user (also carries tool results).
    User,
    /// The model (text and tool calls).
    Assistant,
}

/// A turn's content: a string or content blocks.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum InputContent {
    /// Plain text.
    Text(String),
    /// Typed blocks.
    Blocks(Vec<InputBlock>),
}

/// A content block of a request, by its `type`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputBlock {
    /// `{"type": "text", "text": ...}`.
    Text(TextBlock),
    /// `{"type": "image", "source": ...}`.
    Image(ImageBlock),
    /// A tool call the assistant made.
    ToolUse(ToolUseBlock),
    /// The answer to a tool call, sent by the user.
    ToolResult(ToolResultBlock),
    /// Any other block (`document`, `thinking`, ...), or a known one that did not parse;
    /// kept whole, `type` included, so that the refusal can name it.
    #[serde(untagged)]
    Other(Unmodelled),
}

/// A text block.
#[derive(Debug, Clone, Deserialize)]
pub struct TextBlock {
    /// The text.
    pub text: String,
    /// `cache_control`, `citations`, ...: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// An image block.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageBlock {
    /// Where the image is.
    pub source: ImageSource,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// An image's source.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    /// Inline base64 data.
    Base64 {
        /// `image/png`, `image/jpeg`, ...
        media_type: String,
        /// The base64 data.
        data: String,
    },
    /// An image on the web.
    Url {
        /// Its URL.
        url: String,
    },
    /// `file` (Files API) and source types added later: refused.
    #[serde(untagged)]
    Other(Unmodelled),
}

/// A `tool_use` block in an assistant turn.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolUseBlock {
    /// Call identifier, referred to by the matching `tool_result`.
    pub id: String,
    /// Tool name.
    pub name: String,
    /// Arguments object.
    #[serde(default)]
    pub input: Value,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// A `tool_result` block in a user turn.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolResultBlock {
    /// The call it answers.
    pub tool_use_id: String,
    /// The result: a string or text blocks (absent means empty).
    #[serde(default)]
    pub content: Option<InputContent>,
    /// Whether the tool failed.
    #[serde(default)]
    pub is_error: Option<bool>,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// A client tool declaration.
#[derive(Debug, Clone, Deserialize)]
pub struct ToolDef {
    /// `custom` or absent for client tools; server tools (`web_search_20250305`, ...) are
    /// refused.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    /// Tool name.
    pub name: String,
    /// What it does.
    #[serde(default)]
    pub description: Option<String>,
    /// JSON Schema of its input; required for client tools.
    #[serde(default)]
    pub input_schema: Option<Value>,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// `tool_choice`.
#[derive(Debug, Clone, Deserialize)]
pub struct AnthropicToolChoice {
    /// `auto`, `any`, `tool` or `none`.
    #[serde(rename = "type")]
    pub kind: ToolChoiceKind,
    /// The tool to call, for `tool`.
    #[serde(default)]
    pub name: Option<String>,
    /// At most one tool call per turn.
    #[serde(default)]
    pub disable_parallel_tool_use: Option<bool>,
    /// Anything else: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// The kinds of `tool_choice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceKind {
    /// The model decides.
    Auto,
    /// The model must call some tool.
    Any,
    /// The model must call the named tool.
    Tool,
    /// The model must not call tools.
    None,
}

/// Whether `max_tokens` must be present: `create` requires it, `count_tokens` does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// `POST /v1/messages`.
    Create,
    /// `POST /v1/messages/count_tokens`.
    CountTokens,
}

impl MessagesRequest {
    /// Translates into the internal request, or refuses with a 400 naming the first field
    /// that is missing, invalid or not translatable.
    pub fn into_chat(self, purpose: Purpose) -> Result<ChatRequest, ApiError> {
        refuse_top_level(&self.unmodelled)?;
        if purpose == Purpose::Create {
            match self.max_tokens {
                None => return Err(invalid_request("`max_tokens` is required")),
                Some(0) => return Err(invalid_request("`max_tokens` must be at least 1")),
                Some(_) => {}
            }
        }
        if self.messages.is_empty() {
            return Err(invalid_request(
                "`messages` must contain at least one message",
            ));
        }
        if let Some(t) = self.temperature.filter(|t| !(0.0..=1.0).contains(t)) {
            return Err(invalid_request(format!(
                "`temperature` must be between 0 and 1, not {t}"
            )));
        }
        let mut messages = Vec::with_capacity(self.messages.len() + 1);
        if let Some(system) = self.system {
            messages.extend(system_message(system)?);
        }
        for (i, message) in self.messages.into_iter().enumerate() {
            translate_message(message, Path::Message(i), &mut messages)?;
        }
        let mut extra = Map::new();
        if let Some(top_k) = self.top_k {
            extra.insert("top_k".to_owned(), Value::from(top_k));
        }
        let stream = self.stream.unwrap_or(false);
        Ok(ChatRequest {
            model: self.model,
            messages,
            max_tokens: self.max_tokens,
            max_completion_tokens: None,
            temperature: self.temperature,
            top_p: self.top_p,
            stop: self
                .stop_sequences
                .filter(|s| !s.is_empty())
                .map(Stop::Many),
            tools: self.tools.map(translate_tools).transpose()?,
            tool_choice: translate_tool_choice(self.tool_choice, &mut extra)?,
            stream,
            // The final usage chunk carries the counts `message_delta` reports.
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
                ..StreamOptions::default()
            }),
            user: self.metadata.map(translate_metadata).transpose()?.flatten(),
            n: None,
            extra,
        })
    }
}

/// Where a value sits in the request, for refusals; formatted only when one is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
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
}

impl Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
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
fn refuse_top_level(unmodelled: &Unmodelled) -> Result<(), ApiError> {
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

/// Refuses the first non-null field of `unmodelled`, named by `path.field`.
fn refuse_unmodelled(path: impl Display, unmodelled: &Unmodelled) -> Result<(), ApiError> {
    match unmodelled.iter().find(|(_, value)| !value.is_null()) {
        Some((name, _)) => Err(invalid_request(format!(
            "`{path}.{name}` is not supported by this gateway"
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

fn system_message(system: SystemPrompt) -> Result<Option<ChatMessage>, ApiError> {
    let content = match system {
        SystemPrompt::Text(text) if text.is_empty() => return Ok(None),
        SystemPrompt::Text(text) => MessageContent::Text(text),
        SystemPrompt::Blocks(blocks) => {
            let mut parts = Vec::with_capacity(blocks.len());
            for (i, block) in blocks.into_iter().enumerate() {
                parts.push(ContentPart::Text {
                    text: text_only(Path::System(i), block)?,
                });
            }
            if parts.is_empty() {
                return Ok(None);
            }
            MessageContent::Parts(parts)
        }
    };
    Ok(Some(message(Role::System, Some(content))))
}

/// The text of a block that may only be text (system prompts, tool results).
fn text_only(path: Path, block: InputBlock) -> Result<String, ApiError> {
    match block {
        InputBlock::Text(text) => {
            refuse_unmodelled(path, &text.unmodelled)?;
            Ok(text.text)
        }
        InputBlock::Other(other) => Err(refuse_block(path, other)),
        InputBlock::Image(_) | InputBlock::ToolUse(_) | InputBlock::ToolResult(_) => Err(
            invalid_request(format!("`{path}` must be a text block here")),
        ),
    }
}

fn translate_message(
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
            out.push(message_text(role, text));
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
            InputBlock::Text(text) => {
                refuse_unmodelled(path, &text.unmodelled)?;
                parts.push(ContentPart::Text { text: text.text });
            }
            InputBlock::Image(image) => parts.push(image_part(image, path)?),
            InputBlock::ToolResult(result) => {
                if !parts.is_empty() {
                    let content = MessageContent::Parts(std::mem::take(&mut parts));
                    out.push(message(Role::User, Some(content)));
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
        out.push(message(Role::User, Some(MessageContent::Parts(parts))));
    }
    Ok(())
}

/// An assistant turn: its text blocks concatenated, its `tool_use` blocks as tool calls.
fn assistant_blocks(blocks: Vec<InputBlock>, path: Path) -> Result<ChatMessage, ApiError> {
    let mut text = String::new();
    let mut calls = Vec::new();
    for (j, block) in blocks.into_iter().enumerate() {
        let path = path.content(j);
        match block {
            InputBlock::Text(block) => {
                refuse_unmodelled(path, &block.unmodelled)?;
                text.push_str(&block.text);
            }
            InputBlock::ToolUse(call) => {
                refuse_unmodelled(path, &call.unmodelled)?;
                let arguments = match call.input {
                    Value::Null => "{}".to_owned(),
                    input @ Value::Object(_) => input.to_string(),
                    _ => {
                        return Err(invalid_request(format!("`{path}.input` must be an object")));
                    }
                };
                calls.push(ToolCall {
                    id: call.id,
                    kind: "function".to_owned(),
                    function: FunctionCall {
                        name: call.name,
                        arguments,
                    },
                });
            }
            InputBlock::Image(_) | InputBlock::ToolResult(_) => {
                return Err(invalid_request(format!(
                    "`{path}`: assistant turns may hold only `text` and `tool_use` blocks"
                )));
            }
            InputBlock::Other(other) => return Err(refuse_block(path, other)),
        }
    }
    let content = (!text.is_empty() || calls.is_empty()).then_some(MessageContent::Text(text));
    Ok(ChatMessage {
        tool_calls: (!calls.is_empty()).then_some(calls),
        ..message(Role::Assistant, content)
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
    })
}

/// A `tool` message. The internal shape has no error flag, so a failed call's result is
/// prefixed with `Error: `: the model is told the call failed, as `is_error` asks.
fn tool_message(result: ToolResultBlock, path: Path) -> Result<ChatMessage, ApiError> {
    refuse_unmodelled(path, &result.unmodelled)?;
    let mut text = match result.content {
        None => String::new(),
        Some(InputContent::Text(text)) => text,
        Some(InputContent::Blocks(blocks)) => {
            let mut text = String::new();
            for (k, block) in blocks.into_iter().enumerate() {
                text.push_str(&text_only(path.content(k), block)?);
            }
            text
        }
    };
    if result.is_error == Some(true) {
        text.insert_str(0, "Error: ");
    }
    Ok(ChatMessage {
        tool_call_id: Some(result.tool_use_id),
        ..message(Role::Tool, Some(MessageContent::Text(text)))
    })
}

fn translate_tools(tools: Vec<ToolDef>) -> Result<Vec<Tool>, ApiError> {
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
            })
        })
        .collect()
}

fn translate_tool_choice(
    choice: Option<AnthropicToolChoice>,
    extra: &mut Map<String, Value>,
) -> Result<Option<ToolChoice>, ApiError> {
    let Some(choice) = choice else {
        return Ok(None);
    };
    refuse_unmodelled("tool_choice", &choice.unmodelled)?;
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

fn translate_metadata(metadata: Metadata) -> Result<Option<String>, ApiError> {
    refuse_unmodelled("metadata", &metadata.unmodelled)?;
    Ok(metadata.user_id)
}

fn message(role: Role, content: Option<MessageContent>) -> ChatMessage {
    ChatMessage {
        role,
        content,
        name: None,
        tool_calls: None,
        tool_call_id: None,
    }
}

fn message_text(role: Role, text: String) -> ChatMessage {
    message(role, Some(MessageContent::Text(text)))
}
