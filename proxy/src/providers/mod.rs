//! Provider adapters: each provider's wire format, translated to and from one internal chat
//! type (the OpenAI chat-completions shape, [`types`]). Pure translation, no I/O: `route`
//! makes the calls.
//!
//! The route module drives one upstream call like this:
//!
//! 1. [`Adapter::for_type`] picks the adapter of the provider's `type`;
//! 2. [`Adapter::build_request`] gives method, URL, headers (the key marked sensitive) and body;
//! 3. on a 2xx, [`Adapter::parse_response`] — or, streaming, [`Adapter::stream_decoder`] fed
//!    with the body's bytes — gives OpenAI-shaped output and the usage that settles budgets;
//! 4. otherwise [`Adapter::classify`] turns status, headers and body into a
//!    [`ProviderError`] that says whether to retry, cool or fail the key, or open the circuit;
//! 5. on every response, [`Adapter::rate_limit_info`] reads the provider's budget headers.
//!
//! Embeddings ([`embed`]) take the same steps with [`Adapter::build_embeddings_request`] and
//! [`Adapter::parse_embeddings_response`]; errors are classified by the same `classify`.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use floodgate_crds::ProviderType;
use http::{HeaderMap, HeaderValue, Method, header};
use serde_json::{Map, Value};

pub mod anthropic;
pub mod embed;
pub mod error;
pub mod gemini;
pub mod ollama;
pub mod openai;
pub mod params;
pub mod ratelimit;
pub mod sse;
pub mod stream;
pub mod types;

pub use embed::{EmbeddingsRequest, EmbeddingsResponse};
pub use error::{ClosedWhen, Fault, ProviderError, Result};
pub use ratelimit::RateLimitInfo;
pub use stream::StreamDecoder;
pub use types::{ChatChunk, ChatRequest, ChatResponse, FinishReason, Usage};

use types::{ChatMessage, Choice, ResponseMessage, Role, ToolCall};

/// A provider's wire format. Dispatch is a `match`, not a trait object: one adapter runs per
/// upstream call on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Adapter {
    /// OpenAI chat completions, and OpenAI-compatible servers (vLLM, llama.cpp).
    OpenAi,
    /// Anthropic Messages.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
    /// Ollama `/api/chat`.
    Ollama,
}

/// An HTTP request for the route module to send.
#[derive(Debug, Clone)]
pub struct UpstreamRequest {
    /// Always `POST` today.
    pub method: Method,
    /// Full URL.
    pub url: String,
    /// Headers; the one holding the API key is marked sensitive
    /// ([`HeaderValue::is_sensitive`]), so it is redacted from `Debug` and HPACK-indexed never.
    pub headers: HeaderMap,
    /// JSON body.
    pub body: Bytes,
}

impl Adapter {
    /// Every wire format, in [`Adapter::index`] order.
    pub const ALL: [Adapter; 4] = [
        Adapter::OpenAi,
        Adapter::Anthropic,
        Adapter::Gemini,
        Adapter::Ollama,
    ];

    /// Position in [`Adapter::ALL`], for tables indexed by wire format.
    pub const fn index(self) -> usize {
        match self {
            Adapter::OpenAi => 0,
            Adapter::Anthropic => 1,
            Adapter::Gemini => 2,
            Adapter::Ollama => 3,
        }
    }

    /// The adapter for a provider type; OpenAI-compatible servers speak OpenAI (without an
    /// auth header when no key is configured).
    pub fn for_type(provider_type: ProviderType) -> Self {
        match provider_type {
            ProviderType::Openai | ProviderType::OpenaiCompatible => Adapter::OpenAi,
            ProviderType::Anthropic => Adapter::Anthropic,
            ProviderType::Gemini => Adapter::Gemini,
            ProviderType::Ollama => Adapter::Ollama,
        }
    }

    /// Name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Adapter::OpenAi => "openai",
            Adapter::Anthropic => "anthropic",
            Adapter::Gemini => "gemini",
            Adapter::Ollama => "ollama",
        }
    }

    /// Translates `req` into the provider's request for `upstream_model`. `stream` decides
    /// the upstream mode (the caller's `req.stream` is not consulted, so `route` may stream
    /// upstream for a non-streaming caller or the other way round).
    ///
    /// Fails with `BadRequest` when the request uses something this provider cannot do, and
    /// with `Unauthorized` when the key is not a valid header value. The same as
    /// [`Adapter::url`], [`Adapter::headers`] and [`Adapter::build_body`] together; `route`
    /// builds the first two once per configuration and only the body per request.
    pub fn build_request(
        &self,
        base_url: &str,
        api_key: Option<&str>,
        upstream_model: &str,
        req: &ChatRequest,
        stream: bool,
    ) -> Result<UpstreamRequest> {
        let mut headers = self.headers(api_key)?;
        self.add_request_headers(req, &mut headers)?;
        Ok(UpstreamRequest {
            method: Method::POST,
            url: self.url(base_url, upstream_model, stream),
            headers,
            body: self.build_body(upstream_model, req, stream)?,
        })
    }

    /// Adds the headers that depend on the request rather than the key: Anthropic's
    /// `anthropic-beta` when the caller asked for betas.
    pub fn add_request_headers(&self, req: &ChatRequest, headers: &mut HeaderMap) -> Result<()> {
        if *self == Adapter::Anthropic
            && let Some(betas) = anthropic::beta_header(req)?
        {
            headers.insert("anthropic-beta", betas);
        }
        Ok(())
    }

    /// The chat endpoint for `upstream_model`, streamed or not.
    pub fn url(&self, base_url: &str, upstream_model: &str, stream: bool) -> String {
        match self {
            Adapter::OpenAi => endpoint(base_url, "v1", "chat/completions"),
            Adapter::Anthropic => endpoint(base_url, "v1", "messages"),
            Adapter::Gemini => gemini::url(base_url, upstream_model, stream),
            Adapter::Ollama => endpoint(base_url, "api", "chat"),
        }
    }

    /// The request headers of a call with `api_key`: content type, the API version where the
    /// provider wants one, and the key (marked sensitive) in the provider's header. Ollama
    /// itself has no auth; a key there is for a proxy in front of it.
    pub fn headers(&self, api_key: Option<&str>) -> Result<HeaderMap> {
        let mut headers = json_headers();
        if *self == Adapter::Anthropic {
            headers.insert(
                "anthropic-version",
                HeaderValue::from_static(anthropic::API_VERSION),
            );
        }
        let Some(key) = api_key else {
            return Ok(headers);
        };
        match self {
            Adapter::OpenAi | Adapter::Ollama => {
                headers.insert(
                    header::AUTHORIZATION,
                    secret_header(&format!("Bearer {key}"))?,
                );
            }
            Adapter::Anthropic => {
                headers.insert("x-api-key", secret_header(key)?);
            }
            Adapter::Gemini => {
                headers.insert("x-goog-api-key", secret_header(key)?);
            }
        }
        Ok(headers)
    }

    /// The JSON body of a chat call to `upstream_model` (see [`Adapter::build_request`]).
    pub fn build_body(
        &self,
        upstream_model: &str,
        req: &ChatRequest,
        stream: bool,
    ) -> Result<Bytes> {
        match self {
            Adapter::OpenAi => openai::build_body(upstream_model, req, stream),
            Adapter::Anthropic => anthropic::build_body(upstream_model, req, stream),
            Adapter::Gemini => gemini::build_body(upstream_model, req, stream),
            Adapter::Ollama => ollama::build_body(upstream_model, req, stream),
        }
    }

    /// The cap on generated tokens that [`build_request`](Self::build_request) sends
    /// upstream for `req`, which is what a token budget must reserve for the answer.
    /// `None` when no cap is sent and the provider's own limit applies.
    ///
    /// Anthropic requires a cap, so it is the caller's or
    /// [`anthropic::DEFAULT_MAX_TOKENS`]; the others send the caller's cap if there is one
    /// (`max_completion_tokens`, else `max_tokens`: OpenAI-compatible servers get both as
    /// sent and honour the newer one, as vLLM does).
    pub fn max_output_tokens_sent(&self, req: &ChatRequest) -> Option<u32> {
        match self {
            Adapter::Anthropic => Some(anthropic::max_tokens(req)),
            Adapter::OpenAi | Adapter::Gemini | Adapter::Ollama => req.max_output_tokens(),
        }
    }

    /// Parses a 2xx non-streamed body into a `chat.completion` whose `model` is
    /// `model_for_caller`. A body that is not the provider's format is `Malformed`.
    pub fn parse_response(&self, body: &[u8], model_for_caller: &str) -> Result<ChatResponse> {
        match self {
            Adapter::OpenAi => openai::parse_response(body, model_for_caller),
            Adapter::Anthropic => anthropic::parse_response(body, model_for_caller),
            Adapter::Gemini => gemini::parse_response(body, model_for_caller),
            Adapter::Ollama => ollama::parse_response(body, model_for_caller),
        }
    }

    /// A decoder for a 2xx streamed body. `include_usage` is the caller's
    /// `stream_options.include_usage` ([`ChatRequest::include_usage`]): whether to end with a
    /// usage chunk. Usage is tracked for budgets either way ([`StreamDecoder::usage`]).
    pub fn stream_decoder(&self, model_for_caller: &str, include_usage: bool) -> StreamDecoder {
        match self {
            Adapter::OpenAi => {
                StreamDecoder::openai(openai::Decoder::new(model_for_caller, include_usage))
            }
            Adapter::Anthropic => {
                StreamDecoder::anthropic(anthropic::Decoder::new(model_for_caller, include_usage))
            }
            Adapter::Gemini => {
                StreamDecoder::gemini(gemini::Decoder::new(model_for_caller, include_usage))
            }
            Adapter::Ollama => {
                StreamDecoder::ollama(ollama::Decoder::new(model_for_caller, include_usage))
            }
        }
    }

    /// Whether the provider has an embeddings API (Anthropic has none).
    pub fn offers_embeddings(self) -> bool {
        !matches!(self, Adapter::Anthropic)
    }

    /// Whether this provider can take `req` for `upstream_model`, without building anything:
    /// the refusals of [`build_embeddings_request`](Self::build_embeddings_request) (no
    /// embeddings API, token ids, too many inputs, unmodelled fields), each a `BadRequest`
    /// naming the field. Lets `route` leave such a target out before spending budget on it.
    pub fn check_embeddings(self, upstream_model: &str, req: &EmbeddingsRequest) -> Result<()> {
        match self {
            Adapter::OpenAi => Ok(()),
            Adapter::Gemini => embed::gemini::check(req),
            Adapter::Ollama => embed::ollama::check(req),
            Adapter::Anthropic => Err(no_embeddings(upstream_model)),
        }
    }

    /// Translates an embeddings request into the provider's request for `upstream_model`.
    ///
    /// Fails with `BadRequest` when the provider has no embeddings API or cannot take what
    /// the request holds (the message names the field), and with `Unauthorized` when the key
    /// is not a valid header value.
    pub fn build_embeddings_request(
        &self,
        base_url: &str,
        api_key: Option<&str>,
        upstream_model: &str,
        req: &EmbeddingsRequest,
    ) -> Result<UpstreamRequest> {
        match self {
            Adapter::OpenAi => embed::openai::build_request(base_url, api_key, upstream_model, req),
            Adapter::Gemini => embed::gemini::build_request(base_url, api_key, upstream_model, req),
            Adapter::Ollama => embed::ollama::build_request(base_url, api_key, upstream_model, req),
            Adapter::Anthropic => Err(no_embeddings(upstream_model)),
        }
    }

    /// Parses a 2xx embeddings body into OpenAI's `list` shape whose `model` is
    /// `model_for_caller`, with vectors in the caller's `encoding_format`. A body that is not
    /// the provider's format, or that holds a vector count other than the inputs', is
    /// `Malformed`.
    pub fn parse_embeddings_response(
        &self,
        body: &[u8],
        model_for_caller: &str,
        req: &EmbeddingsRequest,
    ) -> Result<EmbeddingsResponse> {
        match self {
            Adapter::OpenAi => embed::openai::parse_response(body, model_for_caller, req),
            Adapter::Gemini => embed::gemini::parse_response(body, model_for_caller, req),
            Adapter::Ollama => embed::ollama::parse_response(body, model_for_caller, req),
            Adapter::Anthropic => Err(ProviderError::Malformed(
                "Anthropic has no embeddings API".into(),
            )),
        }
    }

    /// Classifies a non-2xx response, reading `retry-after` and the provider's error JSON.
    pub fn classify(&self, status: u16, headers: &HeaderMap, body: &[u8]) -> ProviderError {
        self.classify_at(status, headers, body, SystemTime::now())
    }

    /// [`classify`](Self::classify) with an explicit clock (for `retry-after` dates).
    pub fn classify_at(
        &self,
        status: u16,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> ProviderError {
        match self {
            Adapter::OpenAi => openai::classify(status, headers, body, now),
            Adapter::Anthropic => anthropic::classify(status, headers, body, now),
            Adapter::Gemini => gemini::classify(status, headers, body, now),
            Adapter::Ollama => ollama::classify(status, headers, body, now),
        }
    }

    /// Reads the provider's rate-limit headers; `now` turns reset instants into waits.
    pub fn rate_limit_info(&self, headers: &HeaderMap, now: SystemTime) -> RateLimitInfo {
        match self {
            Adapter::OpenAi => ratelimit::openai_headers(headers, now),
            Adapter::Anthropic => ratelimit::anthropic_headers(headers, now),
            Adapter::Gemini | Adapter::Ollama => ratelimit::retry_after_only(headers, now),
        }
    }
}

/// The refusal of an embeddings request routed to a provider without an embeddings API.
fn no_embeddings(upstream_model: &str) -> ProviderError {
    ProviderError::unsupported(format!(
        "the model `{upstream_model}` is served by an Anthropic target, and Anthropic has no \
         embeddings API"
    ))
}

/// Per-message overhead of chat formatting (role markers), in tokens.
const TOKENS_PER_MESSAGE: u32 = 4;
/// Tokens priming the assistant's reply.
const TOKENS_PER_REPLY: u32 = 3;
/// Rough cost of one image (OpenAI's low-detail price; high detail costs more).
const TOKENS_PER_IMAGE: u32 = 85;

/// Quarters of a token that `text` costs, by character class (a stand-in for the
/// providers' tokenisers, which are not at hand): ASCII about four characters a token, the
/// two-byte scripts (accented Latin, Greek, Cyrillic, Hebrew, Arabic) about two, the
/// three-byte ones (Chinese, Japanese, Korean, Thai, Indic scripts) about one, and the rest
/// (emoji, rare ideographs) about two tokens a character. Counted from each character's
/// leading UTF-8 byte, so ASCII-only text costs exactly its length. A quarter-byte count of
/// bytes (the earlier estimate) gave CJK text three quarters of a token a character: about
/// a quarter too few.
pub fn text_quarter_tokens(text: &str) -> u64 {
    text.bytes()
        .map(|b| match b {
            0x00..=0x7f => 1,
            // Continuation bytes: the leading byte counted the character.
            0x80..=0xbf => 0,
            0xc0..=0xdf => 2,
            0xe0..=0xef => 4,
            _ => 8,
        })
        .sum()
}

/// Whole tokens of `quarters` quarter tokens, rounded up.
fn text_tokens(quarters: u64) -> u64 {
    quarters.div_ceil(4)
}

/// Tokens of output a chunk carries, estimated as prompts are (by character class, at
/// least one per chunk with text): for settling a stream whose usage is not known.
pub fn estimate_output_tokens(chunk: &ChatChunk) -> u64 {
    let quarters: u64 = chunk
        .choices
        .iter()
        .map(|c| {
            let d = &c.delta;
            let text = d.content.as_deref().map_or(0, text_quarter_tokens)
                + d.refusal.as_deref().map_or(0, text_quarter_tokens);
            let tools: u64 = d
                .tool_calls
                .iter()
                .flatten()
                .filter_map(|t| t.function.as_ref())
                .map(|f| {
                    f.name.as_deref().map_or(0, text_quarter_tokens)
                        + f.arguments.as_deref().map_or(0, text_quarter_tokens)
                })
                .sum();
            text + tools
        })
        .sum();
    text_tokens(quarters)
}

/// A cheap estimate of the prompt's tokens, **for reserving budget only**: settle with the
/// provider's reported [`Usage`]. Text by character class ([`text_quarter_tokens`]: about
/// four ASCII characters a token, one CJK character a token), plus per-message overhead,
/// tool definitions and a flat cost per image.
pub fn estimate_prompt_tokens(req: &ChatRequest) -> u32 {
    let mut quarters: u64 = 0;
    let mut tokens = TOKENS_PER_REPLY;
    for message in &req.messages {
        tokens = tokens.saturating_add(TOKENS_PER_MESSAGE);
        match &message.content {
            Some(types::MessageContent::Text(text)) => quarters += text_quarter_tokens(text),
            Some(types::MessageContent::Parts(parts)) => {
                for part in parts {
                    match part {
                        types::ContentPart::Text { text, .. } => {
                            quarters += text_quarter_tokens(text);
                        }
                        types::ContentPart::ImageUrl { .. } => {
                            tokens = tokens.saturating_add(TOKENS_PER_IMAGE);
                        }
                    }
                }
            }
            None => {}
        }
        for call in message.tool_calls.iter().flatten() {
            quarters += text_quarter_tokens(&call.function.name)
                + text_quarter_tokens(&call.function.arguments);
        }
    }
    for tool in req.tools.iter().flatten() {
        quarters += text_quarter_tokens(&tool.function.name);
        quarters += tool
            .function
            .description
            .as_deref()
            .map_or(0, text_quarter_tokens);
        // A JSON schema is mostly ASCII: its length.
        let schema = tool.function.parameters.as_ref().map_or(0, json_len);
        quarters += u64::try_from(schema).unwrap_or(u64::MAX);
    }
    let text = u32::try_from(text_tokens(quarters)).unwrap_or(u32::MAX);
    tokens.saturating_add(text)
}

/// Approximate serialised length of a JSON value, without serialising it.
fn json_len(value: &Value) -> usize {
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) => 5,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => items.iter().map(json_len).sum::<usize>() + items.len() + 2,
        Value::Object(map) => {
            map.iter()
                .map(|(k, v)| k.len() + 4 + json_len(v))
                .sum::<usize>()
                + 2
        }
    }
}

/// `{base}/{version}/{path}`; a base URL that already ends in `/{version}` (a common way to
/// configure vLLM: `http://host:8000/v1`) is not given it twice.
/// About the size of `req` written as JSON: the first capacity of the buffer an adapter
/// encodes it into, so that a typical request is written without regrowing the buffer.
pub(crate) fn encoded_size_hint(req: &ChatRequest) -> usize {
    let text: usize = req
        .messages
        .iter()
        .map(|message| {
            let content = match &message.content {
                Some(types::MessageContent::Text(text)) => text.len(),
                Some(types::MessageContent::Parts(parts)) => parts
                    .iter()
                    .map(|part| match part {
                        types::ContentPart::Text { text, .. } => text.len(),
                        types::ContentPart::ImageUrl { image_url, .. } => image_url.url.len(),
                    })
                    .sum(),
                None => 0,
            };
            content + 64
        })
        .sum();
    256 + text + req.tools.as_ref().map_or(0, |tools| tools.len() * 256)
}

pub(crate) fn endpoint(base_url: &str, version: &str, path: &str) -> String {
    let base = base_url.trim_end_matches('/');
    let versioned = base
        .rsplit_once('/')
        .is_some_and(|(_, last)| last == version);
    if versioned {
        format!("{base}/{path}")
    } else {
        format!("{base}/{version}/{path}")
    }
}

/// `content-type: application/json`.
pub(crate) fn json_headers() -> HeaderMap {
    let mut headers = HeaderMap::with_capacity(4);
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers
}

/// A header value holding a secret, marked sensitive. The value is never echoed in errors.
pub(crate) fn secret_header(value: &str) -> Result<HeaderValue> {
    let mut value = HeaderValue::from_str(value).map_err(|_| ProviderError::Unauthorized {
        status: 0,
        message: "API key contains characters not allowed in an HTTP header".into(),
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Splits `data:<mime>;base64,<data>` into mime type and base64 data.
pub(crate) fn parse_data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let mime = meta.strip_suffix(";base64")?;
    Some((if mime.is_empty() { "image/png" } else { mime }, data))
}

/// Parses a tool call's JSON-encoded arguments into the object other providers want.
pub(crate) fn parse_arguments(arguments: &str) -> Result<Value> {
    if arguments.trim().is_empty() {
        return Ok(Value::Object(serde_json::Map::new()));
    }
    match serde_json::from_str(arguments) {
        Ok(value @ Value::Object(_)) => Ok(value),
        _ => Err(ProviderError::unsupported(
            "tool call arguments must be a JSON object",
        )),
    }
}

/// Tool-call id -> function name, for providers whose tool results name the function.
pub(crate) fn tool_call_names(messages: &[ChatMessage]) -> HashMap<&str, &str> {
    messages
        .iter()
        .filter(|m| m.role == Role::Assistant)
        .flat_map(|m| m.tool_calls.iter().flatten())
        .map(|call| (call.id.as_str(), call.function.name.as_str()))
        .collect()
}

/// Refuses `n > 1` for providers that return one choice: fewer choices than asked for would
/// be a silent wrong answer.
pub(crate) fn reject_multiple_choices(req: &ChatRequest, provider: &str) -> Result<()> {
    match req.n {
        Some(n) if n > 1 => Err(ProviderError::unsupported(format!(
            "n > 1 is not supported by {provider} targets"
        ))),
        _ => Ok(()),
    }
}

/// A one-choice `chat.completion`. Content is `null` when the model only called tools,
/// as OpenAI sends it.
pub(crate) fn completion(
    id: String,
    model: &str,
    text: String,
    tool_calls: Vec<ToolCall>,
    finish_reason: FinishReason,
    usage: Usage,
) -> ChatResponse {
    let content = (!text.is_empty() || tool_calls.is_empty()).then_some(text);
    ChatResponse {
        id,
        object: "chat.completion".to_owned(),
        created: types::unix_now(),
        model: model.to_owned(),
        choices: vec![Choice {
            index: 0,
            message: ResponseMessage {
                role: Role::Assistant,
                content,
                tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
                refusal: None,
                extra: Map::new(),
            },
            finish_reason: Some(finish_reason),
            logprobs: None,
            extra: Map::new(),
            stop_sequence: None,
        }],
        usage: Some(usage),
        usage_details: Map::new(),
        system_fingerprint: None,
        extra: Map::new(),
    }
}

#[cfg(test)]
mod tests;
