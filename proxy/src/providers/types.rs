//! The internal chat type: the OpenAI chat-completions shape, because that is Floodgate's
//! front door. Requests arrive in this shape, every adapter translates from it, and every
//! adapter's answer is translated back into it.
//!
//! A few fields carry what the Anthropic Messages door receives and OpenAI's shape cannot
//! say: prompt-cache breakpoints ([`CacheControl`] on content parts, tool calls, tool
//! results, tools and the request), the `anthropic-beta` header
//! ([`ChatRequest::anthropic_beta`]), a failed tool call ([`ChatMessage::tool_error`]) and
//! the stop sequence that ended an answer ([`Choice::stop_sequence`]). They are
//! `#[serde(skip)]`: never read from an OpenAI caller's JSON (whose unknown keys are
//! ignored, as before) and never written to an OpenAI-compatible upstream, which would
//! reject keys it does not know. Each adapter maps or refuses them (see
//! [`params`](super::params)).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

mod answer_de;
mod de;
mod wire;

/// A chat-completions request (`POST /v1/chat/completions`). Deserialized by hand (`de.rs`),
/// without the buffering `flatten` would cost; the field attributes below are for
/// serialization.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChatRequest {
    /// Model (or alias) the caller asked for.
    pub model: String,
    /// The conversation so far.
    pub messages: Vec<ChatMessage>,
    /// Legacy cap on generated tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Cap on generated tokens (newer name, preferred over `max_tokens`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    /// Sampling temperature (OpenAI range 0..=2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Nucleus sampling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Stop sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Tools the model may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    /// Whether and which tool the model must call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    /// Stream the answer as server-sent events (`null` reads as `false`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    /// Streaming options (`include_usage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// End-user identifier supplied by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Number of choices to generate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    /// Fields Floodgate does not model; passed through untouched to OpenAI-compatible upstreams.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// Anthropic's top-level `cache_control` (automatic prompt caching): a cost hint that
    /// Anthropic upstreams get and others do not need (see [`CacheControl`]).
    #[serde(skip)]
    pub cache_control: Option<CacheControl>,
    /// The betas of the caller's `anthropic-beta` header, in order. Anthropic upstreams get
    /// them as sent; the other adapters accept only the betas that change nothing they
    /// could not honour ([`params::PORTABLE_BETAS`](super::params::PORTABLE_BETAS)).
    #[serde(skip)]
    pub anthropic_beta: Vec<String>,
}

impl ChatRequest {
    /// The caller's cap on generated tokens, from `max_completion_tokens` or `max_tokens`.
    pub fn max_output_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

    /// Whether the caller asked for a final usage chunk (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options.is_some_and(|o| o.include_usage)
    }
}

/// One message of the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Text, or an array of parts; absent on assistant messages that only call tools.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tool calls made by an assistant message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` message answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// On a `tool` message: a prompt-cache breakpoint on the tool result as a whole
    /// (Anthropic's `cache_control` on a `tool_result` block).
    #[serde(skip)]
    pub cache_control: Option<CacheControl>,
    /// On a `tool` message: the tool call failed (Anthropic's `is_error`). Anthropic
    /// upstreams get `is_error: true`, Gemini an `error` response; OpenAI's shape has no
    /// such flag, so OpenAI-compatible and Ollama upstreams get the text prefixed with
    /// `Error: ` ([`ChatMessage::tool_result_text`]).
    #[serde(skip)]
    pub tool_error: bool,
}

/// What a failed tool call's result is prefixed with for targets that have no error flag.
pub const TOOL_ERROR_PREFIX: &str = "Error: ";

impl ChatMessage {
    /// A message with `content` and nothing else.
    pub fn new(role: Role, content: Option<MessageContent>) -> Self {
        ChatMessage {
            role,
            content,
            name: None,
            tool_calls: None,
            tool_call_id: None,
            cache_control: None,
            tool_error: false,
        }
    }

    /// The message's text parts, concatenated (images are skipped).
    pub fn text(&self) -> String {
        self.content
            .as_ref()
            .map(MessageContent::text)
            .unwrap_or_default()
    }

    /// A tool result's text for targets without an error flag: [`text`](Self::text),
    /// prefixed with [`TOOL_ERROR_PREFIX`] when the call failed.
    pub fn tool_result_text(&self) -> String {
        let text = self.text();
        if self.tool_error {
            format!("{TOOL_ERROR_PREFIX}{text}")
        } else {
            text
        }
    }

    /// This message as targets without an error flag must see it: a failed tool call's
    /// content prefixed with [`TOOL_ERROR_PREFIX`] (in its first text part, or as a new
    /// first part), the flag cleared.
    pub fn with_error_prefix(&self) -> ChatMessage {
        let mut message = self.clone();
        if !message.tool_error {
            return message;
        }
        message.tool_error = false;
        message.content = Some(match message.content.take() {
            None => MessageContent::Text(TOOL_ERROR_PREFIX.to_owned()),
            Some(MessageContent::Text(text)) => {
                MessageContent::Text(format!("{TOOL_ERROR_PREFIX}{text}"))
            }
            Some(MessageContent::Parts(mut parts)) => {
                match parts.first_mut() {
                    Some(ContentPart::Text { text, .. }) => text.insert_str(0, TOOL_ERROR_PREFIX),
                    _ => parts.insert(0, ContentPart::text(TOOL_ERROR_PREFIX)),
                }
                MessageContent::Parts(parts)
            }
        });
        message
    }
}

/// Author of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions from the application.
    System,
    /// Instructions from the developer (newer name for `system`).
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// The result of a tool call.
    Tool,
}

/// Message content: a plain string or an array of typed parts (deserialized by hand, in
/// `de.rs`, without trying each variant in turn).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    /// Plain text.
    Text(String),
    /// Typed parts (text and images).
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text parts, concatenated in order.
    pub fn text(&self) -> String {
        match self {
            MessageContent::Text(text) => text.clone(),
            MessageContent::Parts(parts) => parts
                .iter()
                .filter_map(|p| match p {
                    ContentPart::Text { text, .. } => Some(text.as_str()),
                    ContentPart::ImageUrl { .. } => None,
                })
                .collect(),
        }
    }

    /// The content as parts (a plain string becomes one text part).
    pub fn parts(&self) -> Vec<ContentPart> {
        match self {
            MessageContent::Text(text) => vec![ContentPart::text(text.clone())],
            MessageContent::Parts(parts) => parts.clone(),
        }
    }
}

/// One typed part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// A piece of text.
    Text {
        /// The text.
        text: String,
        /// A prompt-cache breakpoint after this part (Anthropic door only).
        #[serde(skip)]
        cache_control: Option<CacheControl>,
    },
    /// An image, by URL or `data:` URL.
    ImageUrl {
        /// Where the image is.
        image_url: ImageUrl,
        /// A prompt-cache breakpoint after this part (Anthropic door only).
        #[serde(skip)]
        cache_control: Option<CacheControl>,
    },
}

impl ContentPart {
    /// A text part without a cache breakpoint.
    pub fn text(text: impl Into<String>) -> Self {
        ContentPart::Text {
            text: text.into(),
            cache_control: None,
        }
    }

    /// The part's cache breakpoint, if any.
    pub fn cache_control(&self) -> Option<&CacheControl> {
        match self {
            ContentPart::Text { cache_control, .. }
            | ContentPart::ImageUrl { cache_control, .. } => cache_control.as_ref(),
        }
    }
}

/// A prompt-cache breakpoint: Anthropic's `cache_control`, `{"type": "ephemeral", "ttl":
/// "5m" | "1h"}`. It marks the end of a prefix Anthropic may cache and read back at a lower
/// price; it does not change the answer. Anthropic upstreams get it exactly where the
/// caller put it; other targets cache (or not) on their own terms, so for them it is
/// accepted and not sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheControl {
    /// Always `ephemeral`, the one kind Anthropic documents.
    #[serde(rename = "type")]
    pub kind: CacheKind,
    /// How long the entry lives (`5m`, the default, or `1h`); passed as sent, for Anthropic
    /// to validate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
}

/// The kinds of [`CacheControl`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheKind {
    /// A cache entry that expires after its TTL.
    Ephemeral,
}

/// An image reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// `https://...` or `data:<mime>;base64,<data>`.
    pub url: String,
    /// Requested detail level (`low`, `high`, `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A tool call made by the model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// Identifier the tool result refers back to.
    pub id: String,
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function and its JSON-encoded arguments.
    pub function: FunctionCall,
    /// A prompt-cache breakpoint after this call (Anthropic's `cache_control` on a
    /// `tool_use` block; Anthropic door only).
    #[serde(skip)]
    pub cache_control: Option<CacheControl>,
}

/// A function invocation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments as a JSON-encoded string.
    #[serde(default)]
    pub arguments: String,
}

/// A tool the model may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function's declaration.
    pub function: FunctionDef,
    /// A prompt-cache breakpoint after this tool's definition (Anthropic door only).
    #[serde(skip)]
    pub cache_control: Option<CacheControl>,
}

/// A function declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDef {
    /// Function name.
    pub name: String,
    /// What the function does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments object.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    /// Strict schema adherence (OpenAI only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode, or one named function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ToolChoice {
    /// `"none"`, `"auto"` or `"required"`.
    Mode(ToolChoiceMode),
    /// `{"type": "function", "function": {"name": ...}}`.
    Named(NamedToolChoice),
}

/// The modes of `tool_choice`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// Never call a tool.
    None,
    /// The model decides.
    Auto,
    /// Call at least one tool.
    Required,
}

/// A `tool_choice` that forces one function.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NamedToolChoice {
    /// Always `function`.
    #[serde(rename = "type", default = "function_type")]
    pub kind: String,
    /// The function to call.
    pub function: FunctionName,
}

/// A function named by a `tool_choice`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionName {
    /// Function name.
    pub name: String,
}

/// `stop`: one sequence or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// A single stop sequence.
    One(String),
    /// Several stop sequences.
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with empty `choices` and the request's `usage`.
    #[serde(default)]
    pub include_usage: bool,
    /// OpenAI pads stream chunks with an `obfuscation` field unless this is `false`; passed
    /// to OpenAI-compatible upstreams as the caller set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_obfuscation: Option<bool>,
}

/// Token counts of one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt (cached prompt tokens included).
    #[serde(default)]
    pub prompt_tokens: u32,
    /// Tokens generated (reasoning tokens included).
    #[serde(default)]
    pub completion_tokens: u32,
    /// Their sum.
    #[serde(default)]
    pub total_tokens: u32,
}

impl Usage {
    /// Usage from prompt and completion counts, with the total computed.
    pub const fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// Why the model stopped.
///
/// A stop sequence reads as `Stop`, as OpenAI reports it; which sequence matched, when the
/// upstream says so (Anthropic does, OpenAI-format upstreams do not), travels beside it in
/// [`Choice::stop_sequence`] / [`ChunkChoice::stop_sequence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// Natural end or a stop sequence.
    Stop,
    /// The token cap was reached.
    Length,
    /// The model called tools.
    ToolCalls,
    /// Content was withheld by a safety filter.
    ContentFilter,
    /// Deprecated `function_call` (OpenAI legacy).
    FunctionCall,
}

impl FinishReason {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::FunctionCall => "function_call",
        }
    }

    /// Parses a wire name; names OpenAI-compatible servers invent map to `Stop`.
    pub fn from_wire(name: &str) -> Self {
        match name {
            "length" => FinishReason::Length,
            "tool_calls" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            "function_call" => FinishReason::FunctionCall,
            _ => FinishReason::Stop,
        }
    }
}

impl Serialize for FinishReason {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for FinishReason {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Ok(FinishReason::from_wire(&name))
    }
}

/// A complete answer (`object: "chat.completion"`).
///
/// Fields the gateway does not model (`service_tier`, ...) are kept in `extra`, and keys of
/// `usage` beyond the three counts (`prompt_tokens_details`, ...) in `usage_details`, so an
/// OpenAI-compatible upstream's answer reaches the caller whole. `usage_details` is written
/// back inside `usage` (see `wire`), which keeps [`Usage`] `Copy`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "wire::ChatResponseWire")]
pub struct ChatResponse {
    /// Completion identifier.
    pub id: String,
    /// Always `chat.completion`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    /// Model name shown to the caller.
    pub model: String,
    /// The generated choices.
    pub choices: Vec<Choice>,
    /// Token counts.
    pub usage: Option<Usage>,
    /// Keys of the upstream's `usage` object beyond the counts (`prompt_tokens_details`,
    /// `completion_tokens_details`, ...); serialised inside `usage`.
    pub usage_details: Map<String, Value>,
    /// Backend fingerprint (OpenAI).
    pub system_fingerprint: Option<String>,
    /// Top-level fields the gateway does not model (`service_tier`, ...).
    pub extra: Map<String, Value>,
}

/// One choice of a complete answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Choice {
    /// Position among the choices.
    #[serde(default)]
    pub index: u32,
    /// The generated message.
    pub message: ResponseMessage,
    /// Why generation stopped.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    /// Token log probabilities (`logprobs: true`); `null` reads as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    /// Fields the gateway does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// With `finish_reason: stop`: the stop sequence that ended the answer, when the
    /// upstream said which (not part of OpenAI's shape, so never serialised).
    #[serde(skip)]
    pub stop_sequence: Option<String>,
}

/// The assistant message of a complete answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResponseMessage {
    /// Always `assistant`.
    pub role: Role,
    /// Generated text (`null` when the model only called tools).
    #[serde(default)]
    pub content: Option<String>,
    /// Tool calls made by the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// Refusal text (OpenAI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Fields the gateway does not model (`annotations`, `audio`, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One streamed chunk (`object: "chat.completion.chunk"`). Unmodelled fields are kept as in
/// [`ChatResponse`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(from = "wire::ChatChunkWire")]
pub struct ChatChunk {
    /// Completion identifier, the same on every chunk.
    pub id: String,
    /// Always `chat.completion.chunk`.
    pub object: String,
    /// Unix seconds, the same on every chunk.
    pub created: u64,
    /// Model name shown to the caller.
    pub model: String,
    /// Deltas; empty on the final usage chunk.
    pub choices: Vec<ChunkChoice>,
    /// Token counts; only on the final usage chunk.
    pub usage: Option<Usage>,
    /// Keys of `usage` beyond the counts; serialised inside `usage`.
    pub usage_details: Map<String, Value>,
    /// Backend fingerprint (OpenAI).
    pub system_fingerprint: Option<String>,
    /// Top-level fields the gateway does not model (`service_tier`, ...).
    pub extra: Map<String, Value>,
}

/// One choice's delta within a chunk.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChunkChoice {
    /// Position among the choices.
    #[serde(default)]
    pub index: u32,
    /// What this chunk adds.
    #[serde(default)]
    pub delta: Delta,
    /// Set on the last chunk of the choice.
    #[serde(default)]
    pub finish_reason: Option<FinishReason>,
    /// Token log probabilities of this chunk's tokens; `null` reads as absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
    /// Fields the gateway does not model.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
    /// With `finish_reason: stop`: the stop sequence that ended the answer, as in
    /// [`Choice::stop_sequence`].
    #[serde(skip)]
    pub stop_sequence: Option<String>,
}

/// What a chunk adds to the message.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Delta {
    /// `assistant` on the first chunk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    /// More text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Tool-call fragments.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
    /// Refusal text (OpenAI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Fields the gateway does not model (`reasoning_content` of some compatible servers, ...).
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A fragment of a tool call: the first carries id and name, later ones more arguments.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which tool call of the message this fragment belongs to.
    pub index: u32,
    /// Call identifier (first fragment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first fragment only).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name and/or argument text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

/// Name and argument fragments of a streamed function call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    /// Function name (first fragment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// More JSON argument text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// Seconds since the Unix epoch, for `created`.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A fresh identifier with `prefix`, for providers that do not name their completions or
/// tool calls. Unique within the process (a counter) and unlikely to collide across
/// replicas (the clock); not a secret.
pub(crate) fn new_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    // Low 48 bits of the clock are plenty to tell replicas apart.
    format!("{prefix}{:012x}{n:06x}", nanos & 0xffff_ffff_ffff)
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn function_type() -> String {
    "function".to_owned()
}

pub(crate) fn completion_object() -> String {
    "chat.completion".to_owned()
}

pub(crate) fn chunk_object() -> String {
    "chat.completion.chunk".to_owned()
}
