//! The Anthropic Messages request (`POST /v1/messages`, `POST /v1/messages/count_tokens`) as
//! the Messages API documents it, and its translation into the internal [`ChatRequest`].
//!
//! Nothing is dropped silently: every object keeps the fields it does not model in a
//! flattened map, and [`MessagesRequest::into_chat`] refuses any that is not empty with a 400
//! naming the field by its path (`messages[1].content[0].citations`). Block and tool
//! types this door cannot translate (`document`, `thinking`, server tools, ...) are refused
//! the same way. Fields with no internal equivalent that a provider may still honour go
//! into [`ChatRequest::extra`] under their own name (`top_k`), for the provider adapters to
//! pass, map or refuse.
//!
//! Prompt-cache breakpoints (`cache_control` on system blocks, text and image blocks,
//! `tool_use` and `tool_result` blocks, tool definitions and the request) are carried on the
//! internal request where the caller put them
//! ([`CacheControl`](crate::providers::types::CacheControl)); a malformed one is refused by
//! its path. `is_error` on a tool result becomes
//! [`ChatMessage::tool_error`](crate::providers::types::ChatMessage::tool_error). The
//! translation itself is in `translate`.

mod translate;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::invalid_request;
use crate::providers::types::{ChatRequest, Stop, StreamOptions};
use crate::server::error::ApiError;
use translate::{
    Path, cache_control, refuse_top_level, system_message, translate_message, translate_metadata,
    translate_tool_choice, translate_tools,
};

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
    /// Automatic prompt caching: a breakpoint on the last cacheable block.
    #[serde(default)]
    pub cache_control: Option<Value>,
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
    /// A prompt-cache breakpoint after this block.
    #[serde(default)]
    pub cache_control: Option<Value>,
    /// `citations`, ...: refused.
    #[serde(flatten)]
    pub unmodelled: Unmodelled,
}

/// An image block.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageBlock {
    /// Where the image is.
    pub source: ImageSource,
    /// A prompt-cache breakpoint after this block.
    #[serde(default)]
    pub cache_control: Option<Value>,
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
    /// A prompt-cache breakpoint after this block.
    #[serde(default)]
    pub cache_control: Option<Value>,
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
    /// A prompt-cache breakpoint after this block.
    #[serde(default)]
    pub cache_control: Option<Value>,
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
    /// A prompt-cache breakpoint after this tool's definition.
    #[serde(default)]
    pub cache_control: Option<Value>,
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
            cache_control: cache_control(Path::Top, self.cache_control)?,
            // The door adds the `anthropic-beta` header's betas.
            anthropic_beta: Vec::new(),
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
