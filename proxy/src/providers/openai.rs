//! OpenAI chat completions, also spoken by OpenAI-compatible servers (vLLM, llama.cpp).
//! Our internal type *is* this format, so translation is mostly renaming the model and
//! insisting on usage in streams.
//!
//! What only the Anthropic door carries is never serialised (see [`super::types`]): cache
//! breakpoints are not sent (a cost hint), a failed tool call's result is prefixed with
//! `Error: ` (OpenAI has no error flag), and `anthropic-beta` is held to
//! [`PORTABLE_BETAS`](super::params::PORTABLE_BETAS).

use std::borrow::Cow;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{ProviderError, Result, UpstreamError, body_excerpt};
use super::params::check_betas;
use super::ratelimit;
use super::sse::{SseEvent, SseParser};
use super::types::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, Stop, StreamOptions, Tool, ToolChoice, Usage,
};

/// Name for error messages.
const PROVIDER: &str = "OpenAI-compatible";

/// The messages as sent: borrowed, unless a failed tool call's result must be prefixed.
fn messages(messages: &[ChatMessage]) -> Cow<'_, [ChatMessage]> {
    if messages.iter().any(|m| m.tool_error) {
        Cow::Owned(
            messages
                .iter()
                .map(ChatMessage::with_error_prefix)
                .collect(),
        )
    } else {
        Cow::Borrowed(messages)
    }
}

/// Request body of `POST /v1/chat/completions`, borrowing the caller's request.
#[derive(Debug, Serialize)]
struct Request<'a> {
    model: &'a str,
    messages: Cow<'a, [ChatMessage]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<&'a Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [Tool]>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<&'a ToolChoice>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<u32>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// Error body: `{"error": {"message", "type", "param", "code"}}`; vLLM and some other
/// compatible servers send the fields at the top level instead.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum ErrorResponse {
    Nested { error: ApiError },
    Flat(ApiError),
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    /// A string at OpenAI, a number at vLLM.
    #[serde(default)]
    code: Option<Value>,
}

impl ApiError {
    /// The most specific machine-readable name: `code` when it is a string, else `type`.
    fn kind(&self) -> Option<String> {
        match &self.code {
            Some(Value::String(code)) => Some(code.clone()),
            _ => self.kind.clone(),
        }
    }
}

/// `POST {base}/v1/chat/completions` with the model renamed; streams always ask for usage.
pub(crate) fn build_body(upstream_model: &str, req: &ChatRequest, stream: bool) -> Result<Bytes> {
    check_betas(req, PROVIDER)?;
    let body = Request {
        model: upstream_model,
        messages: messages(&req.messages),
        max_tokens: req.max_tokens,
        max_completion_tokens: req.max_completion_tokens,
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop.as_ref(),
        tools: req.tools.as_deref(),
        tool_choice: req.tool_choice.as_ref(),
        stream,
        // Usage settles token budgets, so it is requested whatever the caller asked;
        // the decoder drops the usage chunk again for callers that did not ask.
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
            include_obfuscation: req.stream_options.and_then(|o| o.include_obfuscation),
        }),
        user: req.user.as_deref(),
        n: req.n,
        extra: &req.extra,
    };
    let mut out = Vec::with_capacity(super::encoded_size_hint(req));
    serde_json::to_writer(&mut out, &body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    Ok(Bytes::from(out))
}

/// Parses a `chat.completion`, renaming the model to the one the caller asked for.
pub(crate) fn parse_response(body: &[u8], model_for_caller: &str) -> Result<ChatResponse> {
    let mut response: ChatResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("OpenAI chat.completion", &e))?;
    if response.choices.is_empty() {
        return Err(embedded_error(body).unwrap_or_else(|| {
            ProviderError::Malformed("chat.completion without choices".into())
        }));
    }
    response.model = model_for_caller.to_owned();
    Ok(response)
}

/// Classifies an error response.
pub(crate) fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> ProviderError {
    let (message, kind) = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(ErrorResponse::Nested { error } | ErrorResponse::Flat(error)) => {
            let kind = error.kind();
            (error.message, kind)
        }
        Err(_) => (body_excerpt(body), None),
    };
    let retry_after = ratelimit::openai_headers(headers, now).wait_hint();
    UpstreamError {
        status,
        kind,
        message,
        retry_after,
    }
    .classify()
}

/// An error object where an answer was expected (a 200 body, or a stream event).
fn embedded_error(body: &[u8]) -> Option<ProviderError> {
    let error = match serde_json::from_slice::<ErrorResponse>(body).ok()? {
        ErrorResponse::Nested { error } => error,
        ErrorResponse::Flat(_) => return None,
    };
    let status = match &error.code {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u16::try_from(n).ok()),
        _ => None,
    };
    let kind = error.kind();
    Some(
        UpstreamError {
            status: status.unwrap_or(500),
            kind,
            message: error.message,
            retry_after: None,
        }
        .classify(),
    )
}

/// Decodes an OpenAI SSE stream: chunks pass through with the model renamed; `data: [DONE]`
/// is the terminal event.
#[derive(Debug)]
pub(crate) struct Decoder {
    sse: SseParser,
    model: String,
    include_usage: bool,
    usage: Option<Usage>,
    done: bool,
}

impl Decoder {
    pub fn new(model_for_caller: &str, include_usage: bool) -> Self {
        Decoder {
            sse: SseParser::new(),
            model: model_for_caller.to_owned(),
            include_usage,
            usage: None,
            done: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ChatChunk>> {
        let events = self.sse.feed(bytes)?;
        self.events(events)
    }

    pub fn finish(&mut self) -> Result<Vec<ChatChunk>> {
        let events = self.sse.finish();
        let out = self.events(events)?;
        if self.done {
            Ok(out)
        } else {
            Err(ProviderError::Truncated)
        }
    }

    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    pub fn is_complete(&self) -> bool {
        self.done
    }

    fn events(&mut self, events: Vec<SseEvent>) -> Result<Vec<ChatChunk>> {
        let mut out = Vec::with_capacity(events.len());
        for event in events {
            if self.done {
                break;
            }
            let data = event.data.trim();
            if data == "[DONE]" {
                self.done = true;
                break;
            }
            let mut chunk: ChatChunk = serde_json::from_str(data)
                .map_err(|e| ProviderError::malformed("OpenAI chat.completion.chunk", &e))?;
            if chunk.id.is_empty() && chunk.choices.is_empty() && chunk.usage.is_none() {
                return Err(embedded_error(data.as_bytes()).unwrap_or_else(|| {
                    ProviderError::Malformed("empty chat.completion.chunk".into())
                }));
            }
            if chunk.usage.is_some() {
                self.usage = chunk.usage;
            }
            if !self.include_usage {
                chunk.usage = None;
                chunk.usage_details.clear();
                if chunk.choices.is_empty() {
                    continue; // the usage-only chunk the caller did not ask for
                }
            }
            chunk.model.clone_from(&self.model);
            out.push(chunk);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
