//! Google Gemini API (`POST /v1beta/models/{model}:generateContent`, and
//! `:streamGenerateContent?alt=sse` for streams).
//!
//! Roles are `user` and `model`; system text goes to `systemInstruction`; tool calls are
//! `functionCall` parts and tool results `functionResponse` parts, matched by function name
//! (Gemini has no call ids, so the name is looked up from the assistant's earlier call).
//! Parameters are mapped or refused as the table in [`super::params`] says: `top_k`, `seed`,
//! the penalties, `response_format` and `logprobs` go into `generationConfig` (and an
//! answer's `logprobsResult` comes back as OpenAI `logprobs`).
//!
//! From the Anthropic door: cache breakpoints are accepted and not sent (a cost hint; Gemini
//! caches prefixes on its own and has no per-part marker), a failed tool call's result goes
//! as `functionResponse.response: {"error": ...}` (Gemini's key for error details), and
//! `anthropic-beta` is held to [`PORTABLE_BETAS`](super::params::PORTABLE_BETAS). Gemini's
//! `STOP` does not say whether a stop sequence matched, so none is reported.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;
use http::HeaderMap;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use self::logprobs::LogprobsResult;
use super::error::{ProviderError, Result, UpstreamError, body_excerpt};
use super::params::{
    ResponseFormat, as_bool, as_f64, as_i64, as_u32, check_betas, check_range, invalid_field,
    is_neutral, response_format, unsupported_field,
};
use super::ratelimit;
use super::sse::{SseEvent, SseParser};
use super::stream::ChunkBuilder;
use super::types::{
    ChatChunk, ChatMessage, ChatRequest, ChatResponse, ContentPart, Delta, FinishReason,
    FunctionCall, Role, ToolCall, ToolChoice, ToolChoiceMode, Usage, new_id,
};
use super::{
    completion, endpoint, parse_arguments, parse_data_url, reject_multiple_choices, tool_call_names,
};

mod logprobs;

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentRequest<'a> {
    contents: Vec<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Content>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tools: Option<Vec<GeminiTool<'a>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_config: Option<GenerationConfig<'a>>,
}

#[derive(Debug, Serialize)]
struct Content {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    parts: Vec<Part>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
enum Part {
    Text(String),
    InlineData(Blob),
    FunctionCall(FunctionCallPart),
    FunctionResponse(FunctionResponsePart),
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Blob {
    mime_type: String,
    data: String,
}

#[derive(Debug, Serialize)]
struct FunctionCallPart {
    name: String,
    args: Value,
}

#[derive(Debug, Serialize)]
struct FunctionResponsePart {
    name: String,
    response: Value,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GeminiTool<'a> {
    function_declarations: Vec<FunctionDeclaration<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    /// Full JSON Schema (unlike `parameters`, which takes an OpenAPI subset).
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a Value>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig<'a> {
    function_calling_config: FunctionCallingConfig<'a>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct FunctionCallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_function_names: Option<Vec<&'a str>>,
}

#[derive(Debug, Default, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stop_sequences: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    /// Full JSON Schema (unlike `responseSchema`, which takes an OpenAPI subset).
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_logprobs: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<u32>,
}

/// Name for error messages.
const PROVIDER: &str = "Gemini";

/// `GenerateContentResponse`: the whole answer, or one piece of a stream.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateContentResponse {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
    #[serde(default)]
    response_id: Option<String>,
    /// Set when a stream fails midway.
    #[serde(default)]
    error: Option<ApiError>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    index: u32,
    /// Present when `responseLogprobs` was asked for.
    #[serde(default)]
    logprobs_result: Option<LogprobsResult>,
}

#[derive(Debug, Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<ResponsePart>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ResponsePart {
    #[serde(default)]
    text: Option<String>,
    /// Thought summaries are not part of the answer.
    #[serde(default)]
    thought: bool,
    #[serde(default)]
    function_call: Option<FunctionCallData>,
}

#[derive(Debug, Deserialize)]
struct FunctionCallData {
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default)]
    block_reason: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u32,
    #[serde(default)]
    candidates_token_count: u32,
    #[serde(default)]
    thoughts_token_count: u32,
    #[serde(default)]
    total_token_count: Option<u32>,
}

impl UsageMetadata {
    /// Thinking tokens are billed as output, so they count as completion tokens.
    fn to_usage(&self) -> Usage {
        let completion = self
            .candidates_token_count
            .saturating_add(self.thoughts_token_count);
        let mut usage = Usage::new(self.prompt_token_count, completion);
        if let Some(total) = self.total_token_count {
            usage.total_tokens = total.max(usage.total_tokens);
        }
        usage
    }
}

/// `{"error": {"code", "message", "status", "details"}}`.
#[derive(Debug, Deserialize)]
struct ErrorResponse {
    error: ApiError,
}

#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    code: u16,
    #[serde(default)]
    message: String,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    details: Vec<Map<String, Value>>,
}

impl ApiError {
    fn into_upstream(self, status: u16) -> UpstreamError {
        let reason = |wanted: &str| {
            self.details
                .iter()
                .any(|d| d.get("reason").and_then(Value::as_str) == Some(wanted))
        };
        // Gemini answers an invalid key with 400 INVALID_ARGUMENT; the reason tells.
        let kind = if reason("API_KEY_INVALID") || reason("API_KEY_EXPIRED") {
            Some("invalid_api_key".to_owned())
        } else {
            self.status.clone()
        };
        let retry_after = self
            .details
            .iter()
            .filter_map(|d| d.get("retryDelay").and_then(Value::as_str))
            .find_map(ratelimit::parse_go_duration);
        UpstreamError {
            status,
            kind,
            message: self.message,
            retry_after,
        }
    }
}

/// `POST {base}/v1beta/models/{model}:generateContent` (or `:streamGenerateContent?alt=sse`).
pub(crate) fn build_body(_upstream_model: &str, req: &ChatRequest, _stream: bool) -> Result<Bytes> {
    reject_multiple_choices(req, PROVIDER)?;
    check_betas(req, PROVIDER)?;
    check_range("temperature", req.temperature, 0.0..=2.0, PROVIDER)?;
    check_range("top_p", req.top_p, 0.0..=1.0, PROVIDER)?;
    let mut generation_config = GenerationConfig {
        max_output_tokens: req.max_output_tokens(),
        temperature: req.temperature,
        top_p: req.top_p,
        stop_sequences: req.stop.as_ref().map(|s| s.to_vec()),
        ..GenerationConfig::default()
    };
    read_extras(req, &mut generation_config)?;
    let (system_instruction, contents) = convert_messages(&req.messages)?;
    let body = GenerateContentRequest {
        contents,
        system_instruction,
        tools: req.tools.as_ref().map(|tools| {
            vec![GeminiTool {
                function_declarations: tools
                    .iter()
                    .map(|t| FunctionDeclaration {
                        name: &t.function.name,
                        description: t.function.description.as_deref(),
                        parameters_json_schema: t.function.parameters.as_ref(),
                    })
                    .collect(),
            }]
        }),
        tool_config: req.tool_choice.as_ref().map(tool_config),
        generation_config: (generation_config != GenerationConfig::default())
            .then_some(generation_config),
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    Ok(Bytes::from(body))
}

/// `{base}/v1beta/models/{model}:generateContent`, or `:streamGenerateContent?alt=sse`.
pub(crate) fn url(base_url: &str, upstream_model: &str, stream: bool) -> String {
    let model = upstream_model.trim_start_matches("models/");
    let method = if stream {
        "streamGenerateContent?alt=sse"
    } else {
        "generateContent"
    };
    endpoint(base_url, "v1beta", &format!("models/{model}:{method}"))
}

/// Maps each of `req.extra` into `config`, or refuses it (see [`super::params`]).
fn read_extras<'a>(req: &'a ChatRequest, config: &mut GenerationConfig<'a>) -> Result<()> {
    let mut top_logprobs = None;
    for (field, value) in &req.extra {
        match field.as_str() {
            _ if value.is_null() => {}
            "top_k" => config.top_k = Some(as_u32(field, value, PROVIDER)?),
            "seed" => {
                let seed = as_i64(field, value, PROVIDER)?;
                let seed = i32::try_from(seed)
                    .map_err(|_| invalid_field(field, PROVIDER, "a 32-bit integer"))?;
                config.seed = Some(seed);
            }
            "frequency_penalty" => {
                config.frequency_penalty = Some(as_f64(field, value, PROVIDER)?);
            }
            "presence_penalty" => config.presence_penalty = Some(as_f64(field, value, PROVIDER)?),
            "response_format" => match response_format(value, PROVIDER)? {
                ResponseFormat::Text => {}
                ResponseFormat::JsonObject => config.response_mime_type = Some(JSON_MIME),
                ResponseFormat::JsonSchema { schema } => {
                    config.response_mime_type = Some(JSON_MIME);
                    config.response_json_schema = Some(schema);
                }
            },
            "logprobs" => {
                if as_bool(field, value, PROVIDER)? {
                    config.response_logprobs = Some(true);
                }
            }
            "top_logprobs" => top_logprobs = Some(as_u32(field, value, PROVIDER)?),
            "service_tier" if matches!(value.as_str(), Some("auto" | "default")) => {}
            "service_tier" => return Err(invalid_field(field, PROVIDER, "`auto` or `default`")),
            _ if is_neutral(field, value) => {}
            _ => return Err(unsupported_field(field, PROVIDER)),
        }
    }
    if let Some(n) = top_logprobs {
        if config.response_logprobs != Some(true) {
            return Err(invalid_field(
                "top_logprobs",
                PROVIDER,
                "used with `logprobs: true`",
            ));
        }
        config.logprobs = Some(n);
    }
    Ok(())
}

const JSON_MIME: &str = "application/json";

fn convert_messages(messages: &[ChatMessage]) -> Result<(Option<Content>, Vec<Content>)> {
    let names = tool_call_names(messages);
    let mut system = Vec::new();
    let mut out: Vec<Content> = Vec::with_capacity(messages.len());
    for message in messages {
        let (role, parts) = match message.role {
            Role::System | Role::Developer => {
                let text = message.text();
                if !text.is_empty() {
                    system.push(Part::Text(text));
                }
                continue;
            }
            Role::User => ("user", user_parts(message)?),
            Role::Assistant => ("model", model_parts(message)?),
            Role::Tool => ("user", vec![function_response(message, &names)?]),
        };
        if parts.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if last.role == Some(role) => last.parts.extend(parts),
            _ => out.push(Content {
                role: Some(role),
                parts,
            }),
        }
    }
    if out.is_empty() {
        return Err(ProviderError::unsupported(
            "at least one user or assistant message is required",
        ));
    }
    let system = (!system.is_empty()).then_some(Content {
        role: None,
        parts: system,
    });
    Ok((system, out))
}

fn user_parts(message: &ChatMessage) -> Result<Vec<Part>> {
    let Some(content) = &message.content else {
        return Ok(Vec::new());
    };
    let mut parts = Vec::new();
    for part in content.parts() {
        match part {
            ContentPart::Text { text, .. } if text.is_empty() => {}
            ContentPart::Text { text, .. } => parts.push(Part::Text(text)),
            ContentPart::ImageUrl { image_url, .. } => {
                let (mime_type, data) = parse_data_url(&image_url.url).ok_or_else(|| {
                    ProviderError::unsupported("Gemini takes images only as data: URLs")
                })?;
                parts.push(Part::InlineData(Blob {
                    mime_type: mime_type.to_owned(),
                    data: data.to_owned(),
                }));
            }
        }
    }
    Ok(parts)
}

fn model_parts(message: &ChatMessage) -> Result<Vec<Part>> {
    let mut parts = Vec::new();
    let text = message.text();
    if !text.is_empty() {
        parts.push(Part::Text(text));
    }
    for call in message.tool_calls.iter().flatten() {
        parts.push(Part::FunctionCall(FunctionCallPart {
            name: call.function.name.clone(),
            args: parse_arguments(&call.function.arguments)?,
        }));
    }
    Ok(parts)
}

fn function_response(message: &ChatMessage, names: &HashMap<&str, &str>) -> Result<Part> {
    let name = message
        .tool_call_id
        .as_deref()
        .and_then(|id| names.get(id))
        .ok_or_else(|| {
            ProviderError::unsupported("tool message does not answer an earlier tool call")
        })?;
    // `response` must be an object: a JSON object result goes as is, anything else wrapped.
    // A failed call's result goes under `error`, the key Gemini reads as error details.
    let text = message.text();
    let response = match serde_json::from_str::<Value>(&text) {
        _ if message.tool_error => serde_json::json!({ "error": text }),
        Ok(Value::Object(object)) => Value::Object(object),
        _ => serde_json::json!({ "result": text }),
    };
    Ok(Part::FunctionResponse(FunctionResponsePart {
        name: (*name).to_owned(),
        response,
    }))
}

fn tool_config(choice: &ToolChoice) -> ToolConfig<'_> {
    let (mode, allowed_function_names) = match choice {
        ToolChoice::Mode(ToolChoiceMode::None) => ("NONE", None),
        ToolChoice::Mode(ToolChoiceMode::Auto) => ("AUTO", None),
        ToolChoice::Mode(ToolChoiceMode::Required) => ("ANY", None),
        ToolChoice::Named(named) => ("ANY", Some(vec![named.function.name.as_str()])),
    };
    ToolConfig {
        function_calling_config: FunctionCallingConfig {
            mode,
            allowed_function_names,
        },
    }
}

/// Maps `finishReason` to an OpenAI finish reason.
fn finish_reason(reason: &str) -> FinishReason {
    match reason {
        "MAX_TOKENS" => FinishReason::Length,
        "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" | "IMAGE_SAFETY" => {
            FinishReason::ContentFilter
        }
        _ => FinishReason::Stop, // STOP, OTHER, MALFORMED_FUNCTION_CALL, ...
    }
}

/// Parses a `GenerateContentResponse` into a `chat.completion`.
pub(crate) fn parse_response(body: &[u8], model_for_caller: &str) -> Result<ChatResponse> {
    let response: GenerateContentResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("Gemini GenerateContentResponse", &e))?;
    if let Some(error) = response.error {
        let status = error.code;
        return Err(error.into_upstream(status).classify());
    }
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut finish = None;
    let mut logprobs = None;
    if let Some(candidate) = response.candidates.into_iter().find(|c| c.index == 0) {
        logprobs = candidate
            .logprobs_result
            .as_ref()
            .and_then(LogprobsResult::to_openai);
        for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
            match (part.text, part.function_call) {
                (_, Some(call)) => calls.push(ToolCall {
                    id: call.id.unwrap_or_else(|| new_id("call_")),
                    kind: "function".to_owned(),
                    function: FunctionCall {
                        name: call.name,
                        arguments: call
                            .args
                            .unwrap_or_else(|| Value::Object(Map::new()))
                            .to_string(),
                    },
                    cache_control: None,
                }),
                (Some(t), None) if !part.thought => text.push_str(&t),
                _ => {}
            }
        }
        finish = candidate.finish_reason.as_deref().map(finish_reason);
    } else if response
        .prompt_feedback
        .and_then(|f| f.block_reason)
        .is_some()
    {
        finish = Some(FinishReason::ContentFilter);
    }
    let finish = match finish.unwrap_or(FinishReason::Stop) {
        FinishReason::Stop if !calls.is_empty() => FinishReason::ToolCalls,
        other => other,
    };
    let usage = response
        .usage_metadata
        .map(|u| u.to_usage())
        .unwrap_or_default();
    let id = response.response_id.unwrap_or_else(|| new_id("chatcmpl-"));
    let mut completion = completion(id, model_for_caller, text, calls, finish, usage);
    if let Some(choice) = completion.choices.first_mut() {
        choice.logprobs = logprobs;
    }
    Ok(completion)
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
    if let Some(retry_after) = ratelimit::retry_after(headers, now) {
        error.retry_after = Some(retry_after);
    }
    error.classify()
}

/// Decodes a Gemini SSE stream. Gemini has no end-of-stream event: the stream is complete
/// when its last piece carried a `finishReason`, so the closing chunks are emitted by
/// `finish`, once the body has ended.
#[derive(Debug)]
pub(crate) struct Decoder {
    sse: SseParser,
    pub(super) builder: ChunkBuilder,
    finish: Option<FinishReason>,
    id_set: bool,
}

impl Decoder {
    pub fn new(model_for_caller: &str, include_usage: bool) -> Self {
        Decoder {
            sse: SseParser::new(),
            builder: ChunkBuilder::new(model_for_caller, include_usage),
            finish: None,
            id_set: false,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ChatChunk>> {
        let events = self.sse.feed(bytes)?;
        self.events(events)
    }

    pub fn finish(&mut self) -> Result<Vec<ChatChunk>> {
        let events = self.sse.finish();
        let mut out = self.events(events)?;
        match self.finish {
            Some(reason) if !self.builder.done => {
                out.extend(self.builder.close(reason));
                Ok(out)
            }
            Some(_) => Ok(out),
            None => Err(ProviderError::Truncated),
        }
    }

    fn events(&mut self, events: Vec<SseEvent>) -> Result<Vec<ChatChunk>> {
        let mut out = Vec::new();
        for event in events {
            let piece: GenerateContentResponse = serde_json::from_str(&event.data)
                .map_err(|e| ProviderError::malformed("Gemini stream piece", &e))?;
            self.piece(piece, &mut out)?;
        }
        Ok(out)
    }

    fn piece(&mut self, piece: GenerateContentResponse, out: &mut Vec<ChatChunk>) -> Result<()> {
        if let Some(error) = piece.error {
            let status = if error.code == 0 { 500 } else { error.code };
            return Err(error.into_upstream(status).classify());
        }
        let b = &mut self.builder;
        if !self.id_set {
            self.id_set = true;
            if let Some(id) = piece.response_id {
                b.id = id;
            }
        }
        if let Some(usage) = &piece.usage_metadata {
            b.usage = Some(usage.to_usage());
        }
        for candidate in piece.candidates.into_iter().filter(|c| c.index == 0) {
            let first = out.len();
            let logprobs = candidate
                .logprobs_result
                .as_ref()
                .and_then(LogprobsResult::to_openai);
            for part in candidate.content.map(|c| c.parts).unwrap_or_default() {
                match (part.text, part.function_call) {
                    (_, Some(call)) => {
                        let id = call.id.unwrap_or_else(|| new_id("call_"));
                        let args = call.args.unwrap_or_else(|| Value::Object(Map::new()));
                        out.push(b.tool_call_start(id, call.name, args.to_string()));
                    }
                    (Some(text), None) if !part.thought && !text.is_empty() => {
                        out.push(b.text(&text));
                    }
                    _ => {}
                }
            }
            if let Some(logprobs) = logprobs {
                // The piece's tokens go with its first chunk (an empty one if it had none).
                if out.len() == first {
                    out.push(b.chunk(Delta::default(), None));
                }
                if let Some(choice) = out[first].choices.first_mut() {
                    choice.logprobs = Some(logprobs);
                }
            }
            if let Some(reason) = candidate.finish_reason.as_deref() {
                self.finish = Some(finish_reason(reason));
            }
        }
        if piece.prompt_feedback.and_then(|f| f.block_reason).is_some() {
            self.finish = Some(FinishReason::ContentFilter);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
