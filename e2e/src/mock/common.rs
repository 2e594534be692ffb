//! Pieces every provider uses: the deterministic answer, token counts, request parsing
//! helpers, response building, stream framing with faults, clocks and key fingerprints.

use std::borrow::Cow;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::http::header::{CONTENT_TYPE, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{self, BoxStream};
use serde::{Deserialize, Serialize};

use super::faults::{Behavior, Fault};
use super::limits::{Admission, KeyState, Outcome};
use super::{Provider, Shared};

/// Prefix of every answer.
const ANSWER_PREFIX: &str = "mock answer to: ";
/// How many characters of the prompt the answer repeats.
const ANSWER_PROMPT_CHARS: usize = 40;

/// The answer the mock gives to `prompt` (the text of the last user message):
/// `"mock answer to: "` followed by the prompt's first 40 characters.
pub fn answer_for(prompt: &str) -> String {
    let end = prompt
        .char_indices()
        .nth(ANSWER_PROMPT_CHARS)
        .map_or(prompt.len(), |(i, _)| i);
    let mut answer = String::with_capacity(ANSWER_PREFIX.len() + end);
    answer.push_str(ANSWER_PREFIX);
    answer.push_str(&prompt[..end]);
    answer
}

/// Tokens the mock charges for `text`: one per four characters, rounded up.
pub fn token_count(text: &str) -> u32 {
    tokens_for_chars(text.chars().count())
}

pub(super) fn tokens_for_chars(chars: usize) -> u32 {
    u32::try_from(chars.div_ceil(4)).unwrap_or(u32::MAX)
}

/// A short, stable, non-reversible tag for a key, safe to log (`key:1a2b3c4d`).
pub fn fingerprint(key: &str) -> String {
    // FNV-1a: stable across runs and Rust versions, unlike `DefaultHasher`.
    let hash = key.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("key:{hash:08x}")
}

/// The answer to one request, cut at the first of the caller's stop sequences it contains
/// (which, as the real APIs do, is not part of the answer) and to the caller's token budget.
#[derive(Debug)]
pub(super) struct Answer {
    pub text: String,
    pub tokens: u32,
    /// Cut short by `max_tokens` (finish reason `length` / `max_tokens` / `MAX_TOKENS`).
    pub truncated: bool,
    /// The stop sequence that ended the answer (Anthropic: `stop_reason: "stop_sequence"`).
    pub stop_sequence: Option<String>,
}

impl Answer {
    pub(super) fn new(prompt: &str, max_tokens: Option<u32>, stop: &[String]) -> Self {
        let mut text = answer_for(prompt);
        // The earliest match ends the answer; an empty sequence matches nothing.
        let stopped = stop
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s.as_str()).map(|at| (at, s)))
            .min_by_key(|(at, _)| *at);
        let mut stop_sequence = None;
        if let Some((at, sequence)) = stopped {
            text.truncate(at);
            stop_sequence = Some(sequence.clone());
        }
        let mut tokens = token_count(&text);
        let mut truncated = false;
        if let Some(max) = max_tokens.filter(|&max| max < tokens) {
            let chars = usize::try_from(max).unwrap_or(usize::MAX).saturating_mul(4);
            let end = text
                .char_indices()
                .nth(chars)
                .map_or(text.len(), |(i, _)| i);
            text.truncate(end);
            tokens = max;
            truncated = true;
            // The budget ran out before the stop sequence was reached.
            stop_sequence = None;
        }
        Self {
            text,
            tokens,
            truncated,
            stop_sequence,
        }
    }

    /// The pieces a stream sends: words with their trailing space, concatenating to `text`.
    pub(super) fn pieces(&self) -> impl Iterator<Item = &str> {
        self.text.split_inclusive(' ')
    }
}

/// Message content as OpenAI and Anthropic send it: a string or a list of typed parts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum Content {
    Text(String),
    Parts(Vec<Part>),
}

/// One content part; only `text` matters to the mock (images and tools are ignored).
#[derive(Debug, Deserialize)]
pub(super) struct Part {
    #[serde(default)]
    pub text: Option<String>,
}

impl Content {
    pub(super) fn text(&self) -> Cow<'_, str> {
        match self {
            Self::Text(text) => Cow::Borrowed(text),
            Self::Parts(parts) => join_parts(parts),
        }
    }
}

/// OpenAI's `stop`: one sequence or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum StopField {
    One(String),
    Many(Vec<String>),
}

impl StopField {
    pub(super) fn to_vec(&self) -> Vec<String> {
        match self {
            Self::One(one) => vec![one.clone()],
            Self::Many(many) => many.clone(),
        }
    }
}

/// The text of a list of parts, joined with newlines.
pub(super) fn join_parts(parts: &[Part]) -> Cow<'_, str> {
    let mut texts = parts.iter().filter_map(|p| p.text.as_deref());
    match (texts.next(), texts.next()) {
        (None, _) => Cow::Borrowed(""),
        (Some(only), None) => Cow::Borrowed(only),
        (Some(first), Some(second)) => {
            let mut all = format!("{first}\n{second}");
            for text in texts {
                all.push('\n');
                all.push_str(text);
            }
            Cow::Owned(all)
        }
    }
}

/// The prompt of a conversation: the last user message's text and the prompt's token count.
#[derive(Debug, Default)]
pub(super) struct Prompt {
    pub last_user: String,
    pub chars: usize,
}

impl Prompt {
    /// Adds one message; `is_user` marks the messages the answer may quote.
    pub(super) fn add(&mut self, text: &str, is_user: bool) {
        self.chars += text.chars().count();
        if is_user {
            text.clone_into(&mut self.last_user);
        }
    }

    pub(super) fn tokens(&self) -> u32 {
        tokens_for_chars(self.chars).max(1)
    }
}

/// Seconds since the Unix epoch.
pub(super) fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// RFC 3339 UTC time, with microseconds when `fraction` (`2024-05-01T12:00:00.123456Z`).
pub(super) fn rfc3339(time: SystemTime, fraction: bool) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3_600,
        rem % 3_600 / 60,
        rem % 60
    );
    if fraction {
        let _ = write!(out, ".{:06}", since.subsec_micros());
    }
    out.push('Z');
    out
}

/// Whole seconds for `retry-after`, rounded up, at least 1.
pub(super) fn retry_after_secs(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

/// A response with `body` and a content type.
pub(super) fn bytes_response(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Body>,
) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON response; serialization of the mock's own types cannot fail, but if it did the
/// caller gets a 500 rather than a panic.
pub(super) fn json_response<T: Serialize>(status: StatusCode, body: &T) -> Response {
    match serde_json::to_vec(body) {
        Ok(bytes) => bytes_response(status, "application/json", bytes),
        Err(err) => bytes_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("mock: cannot serialize response: {err}"),
        ),
    }
}

/// Serializes a stream event's payload (see [`json_response`] about failures).
pub(super) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec())
}

/// Sets a header from a string the mock built itself (always valid; skipped if not).
pub(super) fn set_header(headers: &mut HeaderMap, name: HeaderName, value: &str) {
    if let Ok(value) = HeaderValue::from_str(value) {
        headers.insert(name, value);
    }
}

/// Adds `retry-after` to a 429.
pub(super) fn with_retry_after(mut response: Response, after: Duration) -> Response {
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs(after)));
    response
}

/// The key a provider request carried, from a header.
pub(super) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// How a provider words its errors and rate-limit headers.
pub(super) trait Dialect {
    /// The provider, for counters.
    const PROVIDER: Provider;
    /// The error for an injected `error-<code>` status.
    fn status_error(code: u16) -> Response;
    /// The provider's "overloaded" error.
    fn overloaded() -> Response;
    /// A 429 (without `retry-after`, which the caller adds) for a key with `limit`.
    fn rate_limited(limit: Option<u32>, retry_after: Duration, model: &str) -> Response;
    /// Rate-limit headers on answers (none by default).
    fn limit_headers(_admission: Admission, _headers: &mut HeaderMap) {}
}

/// Everything between a well-formed request and its answer: the limiter's 429, the delay,
/// and error faults. `None` means answer normally (stream faults are applied later).
pub(super) async fn preflight<D: Dialect>(
    call: &Call<'_>,
    model: &str,
    stream: bool,
) -> Option<Response> {
    if let Admission::Limited { limit, retry_after } = call.admission {
        let mut response = D::rate_limited(Some(limit), retry_after, model);
        D::limit_headers(call.admission, response.headers_mut());
        return Some(with_retry_after(response, retry_after));
    }
    if let Some(delay) = call.behavior.delay
        && !call.shared.pause(delay).await
    {
        return Some(D::status_error(503));
    }
    match call.behavior.fault {
        Some(Fault::RateLimited | Fault::Status(429)) => {
            let retry_after = FAULT_RETRY_AFTER;
            let response = D::rate_limited(call.state.limit(), retry_after, model);
            Some(with_retry_after(response, retry_after))
        }
        Some(Fault::Status(code)) => Some(D::status_error(code)),
        Some(Fault::Overloaded) => Some(D::overloaded()),
        Some(Fault::Stall) if !stream => {
            call.shared.shutdown.cancelled().await;
            Some(D::status_error(503))
        }
        _ => None,
    }
}

/// `retry-after` of the `ratelimited` fault.
const FAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

/// Whether a key is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum KeyCheck {
    Missing,
    Invalid,
    Valid,
}

/// How one call goes once the request is known to be well formed.
#[derive(Debug)]
pub(super) struct Call<'a> {
    pub shared: &'a Arc<Shared>,
    pub state: &'a KeyState,
    pub behavior: Behavior,
    pub admission: Admission,
}

impl Shared {
    pub(super) fn check_key(&self, key: Option<&str>) -> KeyCheck {
        match key {
            None | Some("") if self.config.allow_missing_key => KeyCheck::Valid,
            None | Some("") => KeyCheck::Missing,
            Some(key) if key.contains("invalid") => KeyCheck::Invalid,
            Some(key) => match &self.config.valid_keys {
                Some(valid) if !valid.contains(key) => KeyCheck::Invalid,
                _ => KeyCheck::Valid,
            },
        }
    }

    /// Records a request refused before the limiter (bad key, bad request) and returns
    /// `response`.
    pub(super) fn refused(
        &self,
        provider: Provider,
        state: &KeyState,
        key: &str,
        outcome: Outcome,
        response: Response,
    ) -> Response {
        self.keys.arrive(state, false);
        state.record(outcome);
        self.log(provider, key, "-", response.status());
        response
    }

    /// Records a well-formed request: reads its behaviour and asks the limiter for a slot.
    pub(super) fn admit<'a>(
        self: &'a Arc<Self>,
        provider: Provider,
        state: &'a KeyState,
        model: &str,
    ) -> Call<'a> {
        let behavior = Behavior::from_model(model).with_global(self.faults.get(provider));
        // The `ratelimited` fault refuses without using budget, like a real 429.
        let admit = behavior.fault != Some(Fault::RateLimited);
        let admission = self.keys.arrive(state, admit);
        Call {
            shared: self,
            state,
            behavior,
            admission,
        }
    }

    /// Counts the outcome of a request from its status, and logs it when asked to.
    pub(super) fn finish(
        &self,
        provider: Provider,
        state: &KeyState,
        key: &str,
        model: &str,
        status: StatusCode,
    ) {
        let outcome = match status.as_u16() {
            200..=299 => Outcome::Ok,
            429 => Outcome::RateLimited,
            400..=499 => Outcome::ClientError,
            _ => Outcome::ServerError,
        };
        state.record(outcome);
        self.log(provider, key, model, status);
    }

    pub(super) fn log(&self, provider: Provider, key: &str, model: &str, status: StatusCode) {
        if self.config.log_requests {
            tracing::info!(
                %provider,
                key = %fingerprint(key),
                model,
                status = status.as_u16(),
                "mock request"
            );
        }
    }

    /// Waits `delay` unless the mock shuts down first (then returns false).
    pub(super) async fn pause(&self, delay: Duration) -> bool {
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.shutdown.cancelled() => false,
        }
    }
}

/// How a stream's events are put on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Framing {
    /// `event: name\ndata: json\n\n` (`event:` only when named).
    Sse,
    /// `data: json\r\n\r\n`, as Gemini sends it.
    SseCrlf,
    /// One JSON object per line.
    Ndjson,
    /// A JSON array streamed element by element (Gemini without `alt=sse`).
    JsonArray,
}

impl Framing {
    const fn content_type(self) -> &'static str {
        match self {
            Self::Sse => "text/event-stream; charset=utf-8",
            Self::SseCrlf => "text/event-stream",
            Self::Ndjson => "application/x-ndjson",
            Self::JsonArray => "application/json; charset=UTF-8",
        }
    }

    fn frame(self, index: usize, last: bool, event: &Event) -> Bytes {
        let mut out = Vec::with_capacity(event.data.len() + 32);
        match self {
            Self::Sse | Self::SseCrlf => {
                if let Some(name) = event.name {
                    out.extend_from_slice(b"event: ");
                    out.extend_from_slice(name.as_bytes());
                    out.push(b'\n');
                }
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(&event.data);
                out.extend_from_slice(if self == Self::Sse {
                    b"\n\n"
                } else {
                    b"\r\n\r\n"
                });
            }
            Self::Ndjson => {
                out.extend_from_slice(&event.data);
                out.push(b'\n');
            }
            Self::JsonArray => {
                out.push(if index == 0 { b'[' } else { b',' });
                out.extend_from_slice(&event.data);
                if last {
                    out.push(b']');
                } else {
                    out.extend_from_slice(b"\r\n");
                }
            }
        }
        Bytes::from(out)
    }
}

/// One stream event before framing.
#[derive(Debug)]
pub(super) struct Event {
    pub name: Option<&'static str>,
    pub data: Vec<u8>,
}

impl Event {
    pub(super) fn data(data: Vec<u8>) -> Self {
        Self { name: None, data }
    }

    pub(super) fn named(name: &'static str, data: Vec<u8>) -> Self {
        Self {
            name: Some(name),
            data,
        }
    }
}

/// A 200 streaming response made of `events`, with the call's stream fault applied.
/// `first_text` is the index of the first event carrying answer text (where `stall` stops).
pub(super) fn stream_response(
    call: &Call<'_>,
    framing: Framing,
    mut events: Vec<Event>,
    first_text: usize,
) -> Response {
    let total = events.len();
    let keep = match call.behavior.fault {
        Some(Fault::Stall) => (first_text + 1).min(total),
        // Half-way, which always leaves the terminal event out.
        Some(Fault::Truncate) => total / 2,
        // All but the terminal event, then the connection is aborted.
        Some(Fault::Abort) => total.saturating_sub(1),
        _ => total,
    };
    if call.behavior.fault == Some(Fault::Malformed)
        && let Some(event) = events.get_mut(first_text)
    {
        // Cut one event's JSON in half, keeping the framing valid.
        event.data.truncate(event.data.len() / 2);
    }
    let chunks: Vec<Bytes> = events
        .iter()
        .take(keep)
        .enumerate()
        .map(|(i, e)| framing.frame(i, i + 1 == total, e))
        .collect();
    let interval = call.shared.config.chunk_interval;
    let mut body: BoxStream<'static, Result<Bytes, std::io::Error>> = if interval.is_zero() {
        // One write for the whole stream: a fast model, and half the cost of a frame per
        // event. Clients must split events themselves anyway, as on any real connection.
        let whole: Vec<u8> = chunks.concat();
        stream::iter([Ok(Bytes::from(whole))]).boxed()
    } else {
        stream::iter(chunks)
            .then(move |chunk| async move {
                tokio::time::sleep(interval).await;
                Ok(chunk)
            })
            .boxed()
    };
    if call.behavior.fault == Some(Fault::Abort) {
        body = body
            .chain(stream::once(async {
                // Let hyper flush what was sent before the abort.
                tokio::task::yield_now().await;
                Err(std::io::Error::other("mock: connection aborted at the end"))
            }))
            .boxed();
    }
    if call.behavior.fault == Some(Fault::Stall) {
        // Hold the connection open, silent, until the client leaves or the mock stops.
        let stop = call.shared.shutdown.clone().cancelled_owned();
        let left = ClientLeft(Arc::clone(call.shared));
        body = body
            .chain(
                stream::once(async move {
                    stop.await;
                    drop(left);
                })
                .filter_map(|()| async { None }),
            )
            .boxed();
    }
    bytes_response(
        StatusCode::OK,
        framing.content_type(),
        Body::from_stream(body),
    )
}

/// Dropped with a stalled stream's body: counts the stream abandoned unless the mock is
/// stopping (then the mock ended it).
struct ClientLeft(Arc<Shared>);

impl Drop for ClientLeft {
    fn drop(&mut self) {
        if !self.0.shutdown.is_cancelled() {
            self.0
                .abandoned
                .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        }
    }
}

/// A 200 non-streaming response, with the call's body fault (`truncate`, `malformed`)
/// applied. `stall` is handled before, by never answering.
pub(super) fn body_response(call: &Call<'_>, body: Vec<u8>) -> Response {
    match call.behavior.fault {
        Some(Fault::Malformed) => {
            let mut body = body;
            body.truncate(body.len() / 2);
            bytes_response(StatusCode::OK, "application/json", body)
        }
        Some(Fault::Truncate | Fault::Abort) => {
            // Send half the body, then fail it: the connection is aborted mid-response.
            let body = Bytes::from(body);
            let cut = body.slice(..body.len() / 2);
            let stream = stream::iter([Ok(cut)]).chain(stream::once(async {
                // Let hyper flush the headers and the first half before the abort.
                tokio::task::yield_now().await;
                Err(std::io::Error::other("mock: truncated response"))
            }));
            bytes_response(
                StatusCode::OK,
                "application/json",
                Body::from_stream(stream),
            )
        }
        _ => bytes_response(StatusCode::OK, "application/json", body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_quotes_forty_chars() {
        assert_eq!(answer_for("hi"), "mock answer to: hi");
        let long = "é".repeat(50);
        assert_eq!(
            answer_for(&long),
            format!("mock answer to: {}", "é".repeat(40))
        );
    }

    #[test]
    fn tokens_round_up() {
        assert_eq!(token_count(""), 0);
        assert_eq!(token_count("abcd"), 1);
        assert_eq!(token_count("abcde"), 2);
    }

    #[test]
    fn max_tokens_cuts_the_answer() {
        let answer = Answer::new("hello there", Some(2), &[]);
        assert_eq!(answer.text, "mock ans");
        assert!(answer.truncated);
        assert_eq!(answer.tokens, 2);
        let pieces: String = answer.pieces().collect();
        assert_eq!(pieces, answer.text);
    }

    #[test]
    fn the_first_stop_sequence_ends_the_answer_and_is_left_out() {
        let stop = ["there".to_owned(), "to:".to_owned(), "absent".to_owned()];
        let answer = Answer::new("hello there", None, &stop);
        assert_eq!(answer.text, "mock answer ");
        assert_eq!(answer.stop_sequence.as_deref(), Some("to:"));
        assert_eq!(answer.tokens, token_count("mock answer "));
        assert!(!answer.truncated);
        // A budget that runs out first wins, and no sequence is reported.
        let answer = Answer::new("hello there", Some(1), &stop);
        assert_eq!((answer.text.as_str(), answer.truncated), ("mock", true));
        assert_eq!(answer.stop_sequence, None);
        let answer = Answer::new("hello there", None, &["absent".to_owned()]);
        assert_eq!(answer.text, "mock answer to: hello there");
        assert_eq!(answer.stop_sequence, None);
    }

    #[test]
    fn rfc3339_formats_utc() {
        let t = UNIX_EPOCH + Duration::from_secs(1_714_564_800) + Duration::from_micros(7);
        assert_eq!(rfc3339(t, false), "2024-05-01T12:00:00Z");
        assert_eq!(rfc3339(t, true), "2024-05-01T12:00:00.000007Z");
        assert_eq!(rfc3339(UNIX_EPOCH, false), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(200)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
        assert_eq!(retry_after_secs(Duration::from_millis(2_001)), 3);
    }

    #[test]
    fn fingerprints_hide_keys() {
        let fp = fingerprint("sk-secret-value");
        assert!(fp.starts_with("key:") && !fp.contains("secret"));
        assert_eq!(fp, fingerprint("sk-secret-value"));
    }
}
