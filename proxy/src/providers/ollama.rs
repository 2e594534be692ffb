//! Ollama native chat API (`POST /api/chat`), for self-hosted models. Streams are
//! newline-delimited JSON; the last object has `"done": true` and the token counts.
//! Parameters are mapped or refused as the table in [`super::params`] says: `top_k`, `seed`
//! and the penalties go into `options`, `response_format` becomes `format`.
//!
//! From the Anthropic door: cache breakpoints are accepted and not sent (a cost hint; Ollama
//! keeps its own context cache), a failed tool call's result is prefixed with `Error: `
//! (Ollama has no error flag), and `anthropic-beta` is held to
//! [`PORTABLE_BETAS`](super::params::PORTABLE_BETAS). `done_reason: "stop"` does not say
//! whether a stop sequence matched, so none is reported.

use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::error::{ProviderError, Result, UpstreamError, body_excerpt};
use super::params::{
    ResponseFormat, as_f64, as_i64, as_u32, check_betas, check_range, invalid_field, is_neutral,
    response_format, unsupported_field,
};
use super::ratelimit;
use super::sse::NdjsonSplitter;
use super::stream::ChunkBuilder;
use super::types::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, ContentPart, FinishReason, FunctionCall,
    Role, Tool, ToolCall, ToolChoice, ToolChoiceMode, Usage, new_id,
};
use super::{
    completion, parse_arguments, parse_data_url, reject_multiple_choices, tool_call_names,
};

#[derive(Debug, Serialize)]
struct OllamaChatRequest<'a> {
    model: &'a str,
    messages: Vec<OllamaMessage>,
    /// Always sent: Ollama streams unless told otherwise.
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    options: Option<Options>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<Format<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<&'a [Tool]>,
}

/// `format`: `"json"`, or a JSON Schema the answer must follow.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Format<'a> {
    Json(&'static str),
    Schema(&'a Value),
}

/// Name for error messages.
const PROVIDER: &str = "Ollama";

#[derive(Debug, Serialize)]
struct OllamaMessage {
    role: &'static str,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    images: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<OllamaToolCall>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<String>,
}

#[derive(Debug, Serialize)]
struct OllamaToolCall {
    function: OllamaFunction,
}

#[derive(Debug, Serialize)]
struct OllamaFunction {
    name: String,
    /// An object, not a JSON string as in OpenAI.
    arguments: Value,
}

#[derive(Debug, Default, PartialEq, Serialize)]
struct Options {
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
}

/// A whole answer, or one line of a stream.
#[derive(Debug, Deserialize)]
struct OllamaChatResponse {
    #[serde(default)]
    message: Option<ResponseMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: Option<u32>,
    #[serde(default)]
    eval_count: Option<u32>,
    /// Set on failure (`{"error": "..."}`), also midway through a stream.
    #[serde(default)]
    error: Option<String>,
}

impl OllamaChatResponse {
    fn usage(&self) -> Option<Usage> {
        (self.prompt_eval_count.is_some() || self.eval_count.is_some()).then(|| {
            Usage::new(
                self.prompt_eval_count.unwrap_or(0),
                self.eval_count.unwrap_or(0),
            )
        })
    }

    fn finish_reason(&self) -> FinishReason {
        match self.done_reason.as_deref() {
            Some("length") => FinishReason::Length,
            _ => FinishReason::Stop,
        }
    }
}

#[derive(Debug, Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Option<Vec<ResponseToolCall>>,
}

#[derive(Debug, Deserialize)]
struct ResponseToolCall {
    #[serde(default)]
    id: Option<String>,
    function: ResponseFunction,
}

#[derive(Debug, Deserialize)]
struct ResponseFunction {
    name: String,
    #[serde(default)]
    arguments: Option<Value>,
}

impl ResponseToolCall {
    fn into_tool_call(self) -> ToolCall {
        ToolCall {
            id: self.id.unwrap_or_else(|| new_id("call_")),
            kind: "function".to_owned(),
            function: FunctionCall {
                name: self.function.name,
                arguments: self
                    .function
                    .arguments
                    .unwrap_or_else(|| Value::Object(Map::new()))
                    .to_string(),
            },
            cache_control: None,
        }
    }
}

/// `{"error": "..."}`.
#[derive(Debug, Deserialize)]
struct ErrorResponse {
    error: String,
}

/// `POST {base}/api/chat`.
pub(crate) fn build_body(upstream_model: &str, req: &ChatRequest, stream: bool) -> Result<Bytes> {
    reject_multiple_choices(req, PROVIDER)?;
    check_betas(req, PROVIDER)?;
    // Ollama documents no upper bound for temperature; a negative one is meaningless.
    if req.temperature.is_some_and(|t| t < 0.0) {
        return Err(invalid_field("temperature", PROVIDER, "at least 0"));
    }
    check_range("top_p", req.top_p, 0.0..=1.0, PROVIDER)?;
    let mut options = Options {
        num_predict: req.max_output_tokens(),
        temperature: req.temperature,
        top_p: req.top_p,
        stop: req.stop.as_ref().map(|s| s.to_vec()),
        ..Options::default()
    };
    let format = read_extras(req, &mut options)?;
    // Ollama has no tool_choice; "none" is honoured by not offering the tools.
    let tools_off = matches!(
        req.tool_choice,
        Some(ToolChoice::Mode(ToolChoiceMode::None))
    );
    let body = OllamaChatRequest {
        model: upstream_model,
        messages: convert_messages(&req.messages)?,
        stream,
        options: (options != Options::default()).then_some(options),
        format,
        tools: req.tools.as_deref().filter(|_| !tools_off),
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    Ok(Bytes::from(body))
}

/// Maps each of `req.extra` into `options` or the returned `format`, or refuses it (see
/// [`super::params`]).
fn read_extras<'a>(req: &'a ChatRequest, options: &mut Options) -> Result<Option<Format<'a>>> {
    let mut format = None;
    for (field, value) in &req.extra {
        match field.as_str() {
            _ if value.is_null() => {}
            "top_k" => options.top_k = Some(as_u32(field, value, PROVIDER)?),
            "seed" => options.seed = Some(as_i64(field, value, PROVIDER)?),
            "frequency_penalty" => {
                options.frequency_penalty = Some(as_f64(field, value, PROVIDER)?);
            }
            "presence_penalty" => options.presence_penalty = Some(as_f64(field, value, PROVIDER)?),
            "response_format" => {
                format = match response_format(value, PROVIDER)? {
                    ResponseFormat::Text => None,
                    ResponseFormat::JsonObject => Some(Format::Json("json")),
                    ResponseFormat::JsonSchema { schema } => Some(Format::Schema(schema)),
                };
            }
            "service_tier" if matches!(value.as_str(), Some("auto" | "default")) => {}
            "service_tier" => return Err(invalid_field(field, PROVIDER, "`auto` or `default`")),
            _ if is_neutral(field, value) => {}
            _ => return Err(unsupported_field(field, PROVIDER)),
        }
    }
    Ok(format)
}

fn convert_messages(messages: &[ChatMessage]) -> Result<Vec<OllamaMessage>> {
    let names = tool_call_names(messages);
    messages
        .iter()
        .map(|message| {
            let role = match message.role {
                Role::System | Role::Developer => "system",
                Role::User => "user",
                Role::Assistant => "assistant",
                Role::Tool => "tool",
            };
            let tool_calls = message
                .tool_calls
                .as_ref()
                .map(|calls| {
                    calls
                        .iter()
                        .map(|call| {
                            Ok(OllamaToolCall {
                                function: OllamaFunction {
                                    name: call.function.name.clone(),
                                    arguments: parse_arguments(&call.function.arguments)?,
                                },
                            })
                        })
                        .collect::<Result<Vec<_>>>()
                })
                .transpose()?;
            let tool_name = message
                .tool_call_id
                .as_deref()
                .and_then(|id| names.get(id))
                .map(|name| (*name).to_owned());
            Ok(OllamaMessage {
                role,
                // Ollama has no error flag for a tool result: the text says so.
                content: message.tool_result_text(),
                images: images(message)?,
                tool_calls,
                tool_name,
            })
        })
        .collect()
}

/// Base64 image data of a message's `image_url` parts (Ollama takes no URLs).
fn images(message: &ChatMessage) -> Result<Option<Vec<String>>> {
    let Some(content) = &message.content else {
        return Ok(None);
    };
    let mut images = Vec::new();
    for part in content.parts() {
        if let ContentPart::ImageUrl { image_url, .. } = part {
            let (_, data) = parse_data_url(&image_url.url).ok_or_else(|| {
                ProviderError::unsupported("Ollama takes images only as data: URLs")
            })?;
            images.push(data.to_owned());
        }
    }
    Ok((!images.is_empty()).then_some(images))
}

/// Parses a non-streamed `/api/chat` answer into a `chat.completion`.
pub(crate) fn parse_response(body: &[u8], model_for_caller: &str) -> Result<ChatResponse> {
    let response: OllamaChatResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("Ollama chat response", &e))?;
    if let Some(error) = response.error {
        return Err(stream_error(error));
    }
    let finish = response.finish_reason();
    let usage = response.usage().unwrap_or_default();
    let (text, calls) = match response.message {
        Some(message) => (
            message.content,
            message
                .tool_calls
                .unwrap_or_default()
                .into_iter()
                .map(ResponseToolCall::into_tool_call)
                .collect(),
        ),
        None => (String::new(), Vec::new()),
    };
    let finish = match finish {
        FinishReason::Stop if !calls.is_empty() => FinishReason::ToolCalls,
        other => other,
    };
    Ok(completion(
        new_id("chatcmpl-"),
        model_for_caller,
        text,
        calls,
        finish,
        usage,
    ))
}

/// Classifies an error response.
pub(crate) fn classify(
    status: u16,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> ProviderError {
    let message = match serde_json::from_slice::<ErrorResponse>(body) {
        Ok(parsed) => parsed.error,
        Err(_) => body_excerpt(body),
    };
    UpstreamError {
        status,
        kind: None,
        message,
        retry_after: ratelimit::retry_after(headers, now),
    }
    .classify()
}

/// An error reported inside a 200 answer: the model failed while generating.
fn stream_error(message: String) -> ProviderError {
    UpstreamError {
        status: 500,
        message,
        ..UpstreamError::default()
    }
    .classify()
}

/// Decodes an Ollama NDJSON stream; the object with `"done": true` is the terminal event.
#[derive(Debug)]
pub(crate) struct Decoder {
    lines: NdjsonSplitter,
    pub(super) builder: ChunkBuilder,
}

impl Decoder {
    pub fn new(model_for_caller: &str, include_usage: bool) -> Self {
        Decoder {
            lines: NdjsonSplitter::new(),
            builder: ChunkBuilder::new(model_for_caller, include_usage),
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ChatChunk>> {
        let lines = self.lines.feed(bytes)?;
        let mut out = Vec::new();
        for line in lines {
            self.line(&line, &mut out)?;
        }
        Ok(out)
    }

    pub fn finish(&mut self) -> Result<Vec<ChatChunk>> {
        let mut out = Vec::new();
        if let Some(line) = self.lines.finish() {
            // A last line without its newline parses only if it happens to be whole.
            match self.line(&line, &mut out) {
                Err(ProviderError::Malformed(_)) => return Err(ProviderError::Truncated),
                other => other?,
            }
        }
        if self.builder.done {
            Ok(out)
        } else {
            Err(ProviderError::Truncated)
        }
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<ChatChunk>) -> Result<()> {
        if self.builder.done {
            return Ok(());
        }
        let piece: OllamaChatResponse = serde_json::from_slice(line)
            .map_err(|e| ProviderError::malformed("Ollama stream line", &e))?;
        if let Some(error) = piece.error {
            return Err(stream_error(error));
        }
        let b = &mut self.builder;
        if let Some(message) = &piece.message {
            if !message.content.is_empty() {
                out.push(b.text(&message.content));
            }
            for call in message.tool_calls.iter().flatten() {
                let id = call.id.clone().unwrap_or_else(|| new_id("call_"));
                let args = call
                    .function
                    .arguments
                    .clone()
                    .unwrap_or_else(|| Value::Object(Map::new()));
                out.push(b.tool_call_start(id, call.function.name.clone(), args.to_string()));
            }
        }
        if piece.done {
            if let Some(usage) = piece.usage() {
                b.usage = Some(usage);
            }
            out.extend(b.close(piece.finish_reason()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
