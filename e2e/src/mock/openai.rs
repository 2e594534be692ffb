//! OpenAI: `POST /v1/chat/completions` (JSON or SSE ending in `data: [DONE]`),
//! `POST /v1/embeddings` and `GET /v1/models`, with `x-ratelimit-*-requests` headers and OpenAI's error bodies.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::common::{
    self, Answer, Call, Content, Dialect, Event, Framing, KeyCheck, Prompt, bytes_response,
    json_response, set_header, to_json,
};
use super::limits::{Admission, Outcome};
use super::{Provider, Shared};

mod embeddings;

pub(super) use embeddings::embeddings;

const MISSING_KEY: &str = "You didn't provide an API key. You need to provide your API key in an \
    Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the \
    password field (with blank username) if you're accessing the API from your browser and are \
    prompted for a username and password. You can obtain an API key from \
    https://platform.openai.com/account/api-keys.";

const MODELS: &[&str] = &[
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
    "text-embedding-ada-002",
];

/// `GET /v1/models`, serialized once.
static MODEL_LIST: LazyLock<Bytes> = LazyLock::new(|| {
    let data: Vec<_> = MODELS
        .iter()
        .map(|id| {
            serde_json::json!({"id": id, "object": "model", "created": 1_715_367_049, "owned_by": "system"})
        })
        .collect();
    Bytes::from(to_json(
        &serde_json::json!({"object": "list", "data": data}),
    ))
});

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stop: Option<common::StopField>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    param: Option<&'a str>,
    code: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: Usage,
    service_tier: &'static str,
    system_fingerprint: &'static str,
}

#[derive(Debug, Serialize)]
struct Choice<'a> {
    index: u32,
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    finish_reason: &'static str,
}

#[derive(Debug, Serialize)]
struct AssistantMessage<'a> {
    role: &'static str,
    content: &'a str,
    refusal: Option<&'a str>,
    annotations: [(); 0],
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    prompt_tokens_details: PromptDetails,
    completion_tokens_details: CompletionDetails,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct PromptDetails {
    cached_tokens: u32,
    audio_tokens: u32,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct CompletionDetails {
    reasoning_tokens: u32,
    audio_tokens: u32,
    accepted_prediction_tokens: u32,
    rejected_prediction_tokens: u32,
}

#[derive(Debug, Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    service_tier: &'static str,
    system_fingerprint: &'static str,
    choices: Vec<ChunkChoice<'a>>,
    /// Absent without `include_usage`; `null` on every chunk but the last with it.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<Usage>>,
}

#[derive(Debug, Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Debug, Default, Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<Option<&'a str>>,
}

/// OpenAI's error wording.
struct OpenAi;

impl Dialect for OpenAi {
    const PROVIDER: Provider = Provider::OpenAi;

    fn status_error(code: u16) -> Response {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (message, kind, code) = match code {
            400 => (
                "Invalid request (injected by the mock).",
                "invalid_request_error",
                None,
            ),
            401 => (
                "Incorrect API key provided.",
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            403 => (
                "You are not allowed to sample from this model",
                "invalid_request_error",
                None,
            ),
            404 => (
                "The model does not exist or you do not have access to it.",
                "invalid_request_error",
                Some("model_not_found"),
            ),
            500 => (
                "The server had an error while processing your request. Sorry about that!",
                "server_error",
                None,
            ),
            502 => ("Bad gateway.", "server_error", None),
            503 => (
                "The engine is currently overloaded, please try again later.",
                "server_error",
                None,
            ),
            _ if code < 500 => (
                "Request refused (injected by the mock).",
                "invalid_request_error",
                None,
            ),
            _ => (
                "The server had an error processing your request.",
                "server_error",
                None,
            ),
        };
        error(status, message, kind, code)
    }

    fn overloaded() -> Response {
        Self::status_error(503)
    }

    fn rate_limited(limit: Option<u32>, retry_after: Duration, model: &str) -> Response {
        let limit = limit.unwrap_or(0);
        let message = format!(
            "Rate limit reached for {model} in organization org-mock on requests per min (RPM): \
             Limit {limit}, Used {limit}, Requested 1. Please try again in {:.3}s. Visit \
             https://platform.openai.com/account/rate-limits to learn more.",
            retry_after.as_secs_f64()
        );
        error(
            StatusCode::TOO_MANY_REQUESTS,
            &message,
            "requests",
            Some("rate_limit_exceeded"),
        )
    }

    fn limit_headers(admission: Admission, headers: &mut HeaderMap) {
        let (limit, remaining, reset) = match admission {
            Admission::Admitted {
                limit,
                remaining,
                reset,
            } => (limit, remaining, reset),
            Admission::Limited { limit, retry_after } => (limit, 0, retry_after),
            Admission::Unchecked | Admission::Unlimited => return,
        };
        headers.insert(
            HeaderName::from_static("x-ratelimit-limit-requests"),
            limit.into(),
        );
        headers.insert(
            HeaderName::from_static("x-ratelimit-remaining-requests"),
            remaining.into(),
        );
        set_header(
            headers,
            HeaderName::from_static("x-ratelimit-reset-requests"),
            &go_duration(reset),
        );
    }
}

fn error(status: StatusCode, message: &str, kind: &str, code: Option<&str>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind,
            param: None,
            code,
        },
    };
    json_response(status, &body)
}

/// `GET /v1/models`.
pub(super) async fn models(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    // As OpenAI answers it: the key is checked, and a provider-wide injected status applies
    // (what a health probe sees of an unwell provider).
    if let Some(response) = key_error(&shared, bearer_key(&headers)) {
        return response;
    }
    if let Some(super::Fault::Status(code)) = shared.faults.get(OpenAi::PROVIDER) {
        return OpenAi::status_error(code);
    }
    bytes_response(StatusCode::OK, "application/json", MODEL_LIST.clone())
}

/// `POST /v1/chat/completions`.
pub(super) async fn chat(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = bearer_key(&headers);
    let state = shared.keys.entry(OpenAi::PROVIDER, key);
    let refuse =
        |outcome, response| shared.refused(OpenAi::PROVIDER, &state, key, outcome, response);
    if let Some(response) = key_error(&shared, key) {
        return refuse(Outcome::Unauthorized, response);
    }
    let request = match parse(&body) {
        Ok(request) => request,
        Err((message, param)) => {
            return refuse(Outcome::ClientError, invalid_request(&message, param));
        }
    };
    let model = request.model.as_deref().unwrap_or_default();
    let call = shared.admit(OpenAi::PROVIDER, &state, model);
    let response = respond(&call, &request, model).await;
    shared.finish(OpenAi::PROVIDER, &state, key, model, response.status());
    response
}

/// The key of `Authorization: Bearer <key>` (`""` when absent).
pub(super) fn bearer_key(headers: &HeaderMap) -> &str {
    common::header_str(headers, "authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("")
        .trim()
}

/// OpenAI's 401 for a missing or refused key; `None` for a valid one.
fn key_error(shared: &Shared, key: &str) -> Option<Response> {
    match shared.check_key(Some(key)) {
        KeyCheck::Missing => Some(error(
            StatusCode::UNAUTHORIZED,
            MISSING_KEY,
            "invalid_request_error",
            None,
        )),
        KeyCheck::Invalid => {
            let message = format!(
                "Incorrect API key provided: {}. You can find your API key at \
                 https://platform.openai.com/account/api-keys.",
                mask(key)
            );
            Some(error(
                StatusCode::UNAUTHORIZED,
                &message,
                "invalid_request_error",
                Some("invalid_api_key"),
            ))
        }
        KeyCheck::Valid => None,
    }
}

/// A 400 `invalid_request_error` naming `param`.
fn invalid_request(message: &str, param: Option<&str>) -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            message,
            kind: "invalid_request_error",
            param,
            code: None,
        },
    };
    json_response(StatusCode::BAD_REQUEST, &body)
}

/// Parses the body; a refusal is `(message, param)` for a 400 `invalid_request_error`.
fn parse(body: &[u8]) -> Result<ChatRequest, (String, Option<&'static str>)> {
    let request: ChatRequest = serde_json::from_slice(body).map_err(|err| {
        let message = format!(
            "We could not parse the JSON body of your request. (HINT: This likely means \
             you aren't using your HTTP library correctly. The OpenAI API expects a JSON \
             payload, but what was sent was not valid JSON.) ({err})"
        );
        (message, None)
    })?;
    if request.model.as_deref().is_none_or(str::is_empty) {
        return Err(("you must provide a model parameter".to_owned(), None));
    }
    if request.messages.is_empty() {
        return Err(("[] is too short - 'messages'".to_owned(), Some("messages")));
    }
    Ok(request)
}

async fn respond(call: &Call<'_>, request: &ChatRequest, model: &str) -> Response {
    let stream = request.stream.unwrap_or(false);
    if let Some(response) = common::preflight::<OpenAi>(call, model, stream).await {
        return response;
    }
    let mut prompt = Prompt::default();
    for message in &request.messages {
        if let Some(content) = &message.content {
            prompt.add(&content.text(), message.role == "user");
        }
    }
    // A stop sequence ends the answer with `finish_reason: "stop"`, which does not say so.
    let stop = request.stop.as_ref().map(common::StopField::to_vec);
    let answer = Answer::new(
        &prompt.last_user,
        request.max_completion_tokens.or(request.max_tokens),
        stop.as_deref().unwrap_or_default(),
    );
    let usage = Usage {
        prompt_tokens: prompt.tokens(),
        completion_tokens: answer.tokens,
        total_tokens: prompt.tokens() + answer.tokens,
        prompt_tokens_details: PromptDetails::default(),
        completion_tokens_details: CompletionDetails::default(),
    };
    let id = format!("chatcmpl-mock{:016x}", call.shared.next_id());
    let finish_reason = if answer.truncated { "length" } else { "stop" };
    let created = common::unix_secs();
    let mut response = if stream {
        let include_usage = request
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage);
        let ids = Ids {
            id: &id,
            model,
            created,
        };
        let events = stream_events(&ids, &answer, finish_reason, include_usage.then_some(usage));
        common::stream_response(call, Framing::Sse, events, 1)
    } else {
        let completion = Completion {
            id: &id,
            object: "chat.completion",
            created,
            model,
            choices: [Choice {
                index: 0,
                message: AssistantMessage {
                    role: "assistant",
                    content: &answer.text,
                    refusal: None,
                    annotations: [],
                },
                logprobs: None,
                finish_reason,
            }],
            usage,
            service_tier: "default",
            system_fingerprint: "fp_mock",
        };
        common::body_response(call, to_json(&completion))
    };
    let headers = response.headers_mut();
    set_header(
        headers,
        HeaderName::from_static("x-request-id"),
        &format!("req_{id}"),
    );
    OpenAi::limit_headers(call.admission, headers);
    response
}

struct Ids<'a> {
    id: &'a str,
    model: &'a str,
    created: u64,
}

/// Role chunk, one chunk per piece, the finish chunk, the usage chunk (if asked), `[DONE]`.
fn stream_events(
    ids: &Ids<'_>,
    answer: &Answer,
    finish_reason: &'static str,
    usage: Option<Usage>,
) -> Vec<Event> {
    let with_usage = usage.is_some();
    let chunk = |delta: Delta<'_>, finish: Option<&'static str>| {
        let chunk = Chunk {
            id: ids.id,
            object: "chat.completion.chunk",
            created: ids.created,
            model: ids.model,
            service_tier: "default",
            system_fingerprint: "fp_mock",
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                logprobs: None,
                finish_reason: finish,
            }],
            usage: with_usage.then_some(None),
        };
        Event::data(to_json(&chunk))
    };
    let mut events = vec![chunk(
        Delta {
            role: Some("assistant"),
            content: Some(""),
            refusal: Some(None),
        },
        None,
    )];
    for piece in answer.pieces() {
        events.push(chunk(
            Delta {
                content: Some(piece),
                ..Delta::default()
            },
            None,
        ));
    }
    events.push(chunk(Delta::default(), Some(finish_reason)));
    if let Some(usage) = usage {
        let last = Chunk {
            id: ids.id,
            object: "chat.completion.chunk",
            created: ids.created,
            model: ids.model,
            service_tier: "default",
            system_fingerprint: "fp_mock",
            choices: Vec::new(),
            usage: Some(Some(usage)),
        };
        events.push(Event::data(to_json(&last)));
    }
    events.push(Event::data(b"[DONE]".to_vec()));
    events
}

/// OpenAI shows a key as its first 3 and last 4 characters.
fn mask(key: &str) -> String {
    let chars: Vec<char> = key.chars().collect();
    if chars.len() <= 8 {
        return "****".to_owned();
    }
    let head: String = chars[..3].iter().collect();
    let tail: String = chars[chars.len() - 4..].iter().collect();
    format!("{head}*****{tail}")
}

/// Durations as OpenAI writes them in `x-ratelimit-reset-requests`: `120ms`, `1.5s`, `6m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let secs = d.as_secs_f64();
    if secs < 60.0 {
        return format!("{}s", trim_float(secs));
    }
    let minutes = d.as_secs() / 60;
    let rest = d.saturating_sub(Duration::from_secs(minutes * 60));
    format!("{minutes}m{}s", trim_float(rest.as_secs_f64()))
}

fn trim_float(value: f64) -> String {
    let text = format!("{value:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_durations_look_like_openai() {
        assert_eq!(go_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(go_duration(Duration::from_millis(1_500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(20)), "20s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
    }

    #[test]
    fn keys_are_masked() {
        assert_eq!(mask("sk-abcdefghijkl"), "sk-*****ijkl");
        assert_eq!(mask("short"), "****");
    }
}
