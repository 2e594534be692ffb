//! Anthropic: `POST /v1/messages` with `x-api-key` and a required `anthropic-version`;
//! `stop_sequences` honoured as the API does (the answer ends before the first one it
//! contains, with `stop_reason: "stop_sequence"` and the sequence in `stop_sequence`);
//! message objects or the documented SSE sequence (`message_start`, `content_block_start`,
//! `ping`, `content_block_delta`…, `content_block_stop`, `message_delta`, `message_stop`),
//! `anthropic-ratelimit-requests-*` headers and Anthropic's error bodies.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::common::{
    self, Answer, Call, Content, Dialect, Event, Framing, KeyCheck, Prompt, json_response,
    set_header, to_json,
};
use super::limits::{Admission, Outcome};
use super::{Provider, Shared};

#[derive(Debug, Deserialize)]
struct MessagesRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    system: Option<Content>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    stop_sequences: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: Content,
}

#[derive(Debug, Serialize)]
struct ErrorBody<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    error: ErrorDetail<'a>,
    request_id: &'a str,
}

#[derive(Debug, Serialize)]
struct ErrorDetail<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    message: &'a str,
}

#[derive(Debug, Serialize)]
struct MessageObject<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    role: &'static str,
    model: &'a str,
    content: Vec<TextBlock<'a>>,
    stop_reason: Option<&'static str>,
    stop_sequence: Option<&'a str>,
    usage: Usage,
}

#[derive(Debug, Serialize)]
struct TextBlock<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Debug, Clone, Copy, Serialize)]
struct Usage {
    input_tokens: u32,
    cache_creation_input_tokens: u32,
    cache_read_input_tokens: u32,
    output_tokens: u32,
    service_tier: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum StreamEvent<'a> {
    MessageStart {
        message: MessageObject<'a>,
    },
    ContentBlockStart {
        index: u32,
        content_block: TextBlock<'a>,
    },
    Ping,
    ContentBlockDelta {
        index: u32,
        delta: TextDelta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: StopDelta<'a>,
        usage: OutputUsage,
    },
    MessageStop,
}

#[derive(Debug, Serialize)]
struct TextDelta<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    text: &'a str,
}

#[derive(Debug, Serialize)]
struct StopDelta<'a> {
    stop_reason: &'static str,
    stop_sequence: Option<&'a str>,
}

#[derive(Debug, Serialize)]
struct OutputUsage {
    output_tokens: u32,
}

/// Anthropic's error wording.
struct Anthropic;

impl Dialect for Anthropic {
    const PROVIDER: Provider = Provider::Anthropic;

    fn status_error(code: u16) -> Response {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let (kind, message) = match code {
            400 => (
                "invalid_request_error",
                "Invalid request (injected by the mock).",
            ),
            401 => ("authentication_error", "invalid x-api-key"),
            402 => ("billing_error", "Your credit balance is too low."),
            403 => (
                "permission_error",
                "Your API key does not have permission to use the specified resource.",
            ),
            404 => (
                "not_found_error",
                "The requested resource could not be found.",
            ),
            413 => (
                "request_too_large",
                "Request exceeds the maximum allowed number of bytes.",
            ),
            500 => ("api_error", "Internal server error"),
            504 => ("timeout_error", "Request timed out."),
            529 => ("overloaded_error", "Overloaded"),
            _ if code < 500 => (
                "invalid_request_error",
                "Request refused (injected by the mock).",
            ),
            _ => ("api_error", "Internal server error"),
        };
        error(status, kind, message)
    }

    fn overloaded() -> Response {
        Self::status_error(529)
    }

    fn rate_limited(limit: Option<u32>, _retry_after: Duration, _model: &str) -> Response {
        let message = format!(
            "This request would exceed the rate limit for your organization (mock) of {} \
             requests per minute. For details, refer to: \
             https://docs.claude.com/en/api/rate-limits. You can see the response headers for \
             current usage. Please reduce the prompt length or the maximum tokens requested, \
             or try again later.",
            limit.unwrap_or(0)
        );
        error(StatusCode::TOO_MANY_REQUESTS, "rate_limit_error", &message)
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
            HeaderName::from_static("anthropic-ratelimit-requests-limit"),
            limit.into(),
        );
        headers.insert(
            HeaderName::from_static("anthropic-ratelimit-requests-remaining"),
            remaining.into(),
        );
        // Whole seconds, rounded up, as Anthropic sends them.
        let at = SystemTime::now() + Duration::from_secs(common::retry_after_secs(reset));
        set_header(
            headers,
            HeaderName::from_static("anthropic-ratelimit-requests-reset"),
            &common::rfc3339(at, false),
        );
    }
}

fn error(status: StatusCode, kind: &str, message: &str) -> Response {
    let request_id = request_id();
    let body = ErrorBody {
        kind: "error",
        error: ErrorDetail { kind, message },
        request_id: &request_id,
    };
    let mut response = json_response(status, &body);
    set_header(
        response.headers_mut(),
        HeaderName::from_static("request-id"),
        &request_id,
    );
    response
}

fn request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("req_mock{:016x}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// `POST /v1/messages`.
pub(super) async fn messages(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = common::header_str(&headers, "x-api-key").unwrap_or("");
    let state = shared.keys.entry(Anthropic::PROVIDER, key);
    let refuse =
        |outcome, response| shared.refused(Anthropic::PROVIDER, &state, key, outcome, response);
    let auth_error = match shared.check_key(Some(key)) {
        KeyCheck::Missing => Some("x-api-key header is required"),
        KeyCheck::Invalid => Some("invalid x-api-key"),
        KeyCheck::Valid => None,
    };
    if let Some(message) = auth_error {
        let response = error(StatusCode::UNAUTHORIZED, "authentication_error", message);
        return refuse(Outcome::Unauthorized, response);
    }
    if common::header_str(&headers, "anthropic-version").is_none_or(str::is_empty) {
        let response = invalid_request("anthropic-version: header is required");
        return refuse(Outcome::ClientError, response);
    }
    let request = match parse(&body) {
        Ok(request) => request,
        Err(message) => return refuse(Outcome::ClientError, invalid_request(&message)),
    };
    let model = request.model.as_deref().unwrap_or_default();
    let call = shared.admit(Anthropic::PROVIDER, &state, model);
    let response = respond(&call, &request, model).await;
    shared.finish(Anthropic::PROVIDER, &state, key, model, response.status());
    response
}

fn invalid_request(message: &str) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_request_error", message)
}

/// Parses the body; a refusal is the message of a 400 `invalid_request_error`.
fn parse(body: &[u8]) -> Result<MessagesRequest, String> {
    let request: MessagesRequest =
        serde_json::from_slice(body).map_err(|err| format!("invalid request body: {err}"))?;
    let refusal = if request.model.as_deref().is_none_or(str::is_empty) {
        Some("model: Field required")
    } else if request.max_tokens.is_none() {
        Some("max_tokens: Field required")
    } else if request.max_tokens == Some(0) {
        Some("max_tokens: Input should be greater than or equal to 1")
    } else if request.messages.is_empty() {
        Some("messages: at least one message is required")
    } else {
        None
    };
    match refusal {
        Some(message) => Err(message.to_owned()),
        None => Ok(request),
    }
}

async fn respond(call: &Call<'_>, request: &MessagesRequest, model: &str) -> Response {
    let stream = request.stream.unwrap_or(false);
    if let Some(response) = common::preflight::<Anthropic>(call, model, stream).await {
        return response;
    }
    let mut prompt = Prompt::default();
    if let Some(system) = &request.system {
        prompt.add(&system.text(), false);
    }
    for message in &request.messages {
        prompt.add(&message.content.text(), message.role == "user");
    }
    let answer = Answer::new(
        &prompt.last_user,
        request.max_tokens,
        &request.stop_sequences,
    );
    let id = format!("msg_mock{:016x}", call.shared.next_id());
    let stop_reason = if answer.truncated {
        "max_tokens"
    } else if answer.stop_sequence.is_some() {
        "stop_sequence"
    } else {
        "end_turn"
    };
    let stop_sequence = answer.stop_sequence.as_deref();
    let usage = Usage {
        input_tokens: prompt.tokens(),
        cache_creation_input_tokens: 0,
        cache_read_input_tokens: 0,
        output_tokens: answer.tokens,
        service_tier: "standard",
    };
    let message = |content, stop_reason, stop_sequence, usage| MessageObject {
        id: &id,
        kind: "message",
        role: "assistant",
        model,
        content,
        stop_reason,
        stop_sequence,
        usage,
    };
    let mut response = if stream {
        // message_start reports the input tokens and one output token, like the real API.
        let start = message(
            Vec::new(),
            None,
            None,
            Usage {
                output_tokens: 1,
                ..usage
            },
        );
        let events = stream_events(start, &answer, stop_reason);
        // message_start, content_block_start, ping, then the first text delta.
        common::stream_response(call, Framing::Sse, events, 3)
    } else {
        let text = vec![TextBlock {
            kind: "text",
            text: &answer.text,
        }];
        let message = message(text, Some(stop_reason), stop_sequence, usage);
        common::body_response(call, to_json(&message))
    };
    let headers = response.headers_mut();
    set_header(
        headers,
        HeaderName::from_static("request-id"),
        &request_id(),
    );
    Anthropic::limit_headers(call.admission, headers);
    response
}

fn stream_events(
    start: MessageObject<'_>,
    answer: &Answer,
    stop_reason: &'static str,
) -> Vec<Event> {
    let event = |name: &'static str, event: &StreamEvent<'_>| Event::named(name, to_json(event));
    let mut events = vec![
        event(
            "message_start",
            &StreamEvent::MessageStart { message: start },
        ),
        event(
            "content_block_start",
            &StreamEvent::ContentBlockStart {
                index: 0,
                content_block: TextBlock {
                    kind: "text",
                    text: "",
                },
            },
        ),
        event("ping", &StreamEvent::Ping),
    ];
    for piece in answer.pieces() {
        events.push(event(
            "content_block_delta",
            &StreamEvent::ContentBlockDelta {
                index: 0,
                delta: TextDelta {
                    kind: "text_delta",
                    text: piece,
                },
            },
        ));
    }
    events.push(event(
        "content_block_stop",
        &StreamEvent::ContentBlockStop { index: 0 },
    ));
    events.push(event(
        "message_delta",
        &StreamEvent::MessageDelta {
            delta: StopDelta {
                stop_reason,
                stop_sequence: answer.stop_sequence.as_deref(),
            },
            usage: OutputUsage {
                output_tokens: answer.tokens,
            },
        },
    ));
    events.push(event("message_stop", &StreamEvent::MessageStop));
    events
}
