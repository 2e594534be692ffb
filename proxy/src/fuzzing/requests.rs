//! The front doors' request parsers, and every adapter's translation of what they accept.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::answers::null_as_default;
use crate::providers::types::{
    ChatMessage, ChatRequest, ContentPart, MessageContent, Role, Stop, StreamOptions, Tool,
    ToolCall, ToolChoice,
};
use crate::providers::{Adapter, EmbeddingsRequest, estimate_prompt_tokens};
use crate::server::messages::request::{MessagesRequest, Purpose};

const BASE_URL: &str = "http://127.0.0.1:9";
const KEY: &str = "sk-fuzz-0000";
const MODEL: &str = "fuzz-model";

/// `POST /v1/chat/completions`: the body as the door reads it, then what every adapter
/// builds from it. The hand-written `Deserialize` must accept exactly what the derived one
/// it replaced accepts, with the same result; what it reads must read back the same after
/// serialising.
pub fn chat_request(data: &[u8]) {
    let parsed = serde_json::from_slice::<ChatRequest>(data);
    let derived = serde_json::from_slice::<DerivedRequest>(data);
    assert_eq!(
        parsed.is_ok(),
        derived.is_ok(),
        "hand-written and derived Deserialize disagree: {:?} vs {:?}",
        parsed.as_ref().err(),
        derived.as_ref().err()
    );
    if let (Ok(req), Ok(derived)) = (&parsed, derived) {
        assert_eq!(*req, ChatRequest::from(derived));
    }
    let Ok(req) = parsed else { return };
    assert_round_trips(&req, "a chat request");
    // The door refuses an empty conversation before anything else sees it.
    if !req.messages.is_empty() {
        translate(&req);
    }
}

/// `POST /v1/messages` (and `count_tokens`): the Messages body, its translation into the
/// internal request, and what every adapter builds from that.
pub fn messages_request(data: &[u8]) {
    let Ok(req) = serde_json::from_slice::<MessagesRequest>(data) else {
        return;
    };
    for purpose in [Purpose::Create, Purpose::CountTokens] {
        if let Ok(chat) = req.clone().into_chat(purpose) {
            assert!(
                !chat.messages.is_empty(),
                "an empty conversation got through"
            );
            translate(&chat);
        }
    }
}

/// `POST /v1/embeddings`: the body, its validation, and every adapter's request. An
/// adapter's cheap check must refuse exactly what building its request refuses.
pub fn embeddings_request(data: &[u8]) {
    let Ok(req) = serde_json::from_slice::<EmbeddingsRequest>(data) else {
        return;
    };
    assert_round_trips(&req, "an embeddings request");
    if req.validate().is_err() {
        return;
    }
    let _ = req.estimate_tokens();
    for adapter in Adapter::ALL {
        let checked = adapter.check_embeddings(MODEL, &req);
        let built = adapter.build_embeddings_request(BASE_URL, Some(KEY), MODEL, &req);
        assert_eq!(
            checked.is_ok(),
            built.is_ok(),
            "{}: check_embeddings and build_embeddings_request disagree: {checked:?} vs {:?}",
            adapter.as_str(),
            built.as_ref().map(|_| ())
        );
        if let Ok(upstream) = built {
            assert_json(&upstream.body, adapter);
        }
    }
}

/// Serialising a parsed request and reading it back gives the same request. Numbers may
/// move by a rounding step: serde_json's default float parsing (no `float_roundtrip`) is
/// not always the closest, so a caller's 86-digit number can come back one step off.
pub(super) fn assert_round_trips<T: Serialize + DeserializeOwned>(value: &T, what: &str) {
    let before = serde_json::to_value(value).ok();
    let json = serde_json::to_vec(value).unwrap_or_default();
    let after = serde_json::from_slice::<T>(&json)
        .ok()
        .and_then(|again| serde_json::to_value(again).ok());
    let same = matches!((&before, &after), (Some(a), Some(b)) if same_json(a, b));
    assert!(same, "{what} does not round-trip: {before:?} vs {after:?}");
}

/// JSON equality with numbers equal to within a few rounding steps.
fn same_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            x == y
                || matches!((x.as_f64(), y.as_f64()), (Some(x), Some(y))
                    if (x - y).abs() <= 4.0 * f64::EPSILON * x.abs().max(y.abs()))
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same_json(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| same_json(v, w)))
        }
        _ => a == b,
    }
}

/// What the route stage does with an accepted request: estimate it, and build every
/// provider's body, streamed and not. Refusals are fine; a built body must be JSON.
fn translate(req: &ChatRequest) {
    let _ = estimate_prompt_tokens(req);
    for adapter in Adapter::ALL {
        let _ = adapter.max_output_tokens_sent(req);
        for stream in [false, true] {
            if let Ok(upstream) = adapter.build_request(BASE_URL, Some(KEY), MODEL, req, stream) {
                assert_json(&upstream.body, adapter);
            }
        }
    }
}

fn assert_json(body: &[u8], adapter: Adapter) {
    assert!(
        serde_json::from_slice::<Value>(body).is_ok(),
        "{} built a body that is not JSON",
        adapter.as_str()
    );
}

/// The chat request as `#[derive(Deserialize)]` reads it (`flatten` and `untagged`): the
/// reference the hand-written visitors in `types/de.rs` must match.
#[derive(Deserialize)]
struct DerivedRequest {
    model: String,
    messages: Vec<DerivedMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    tools: Option<Vec<Tool>>,
    #[serde(default)]
    tool_choice: Option<ToolChoice>,
    #[serde(default, deserialize_with = "null_as_default")]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct DerivedMessage {
    role: Role,
    #[serde(default)]
    content: Option<DerivedContent>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum DerivedContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl From<DerivedRequest> for ChatRequest {
    fn from(d: DerivedRequest) -> Self {
        ChatRequest {
            model: d.model,
            messages: d.messages.into_iter().map(ChatMessage::from).collect(),
            max_tokens: d.max_tokens,
            max_completion_tokens: d.max_completion_tokens,
            temperature: d.temperature,
            top_p: d.top_p,
            stop: d.stop,
            tools: d.tools,
            tool_choice: d.tool_choice,
            stream: d.stream,
            stream_options: d.stream_options,
            user: d.user,
            n: d.n,
            extra: d.extra,
            cache_control: None,
            anthropic_beta: Vec::new(),
        }
    }
}

impl From<DerivedMessage> for ChatMessage {
    fn from(d: DerivedMessage) -> Self {
        ChatMessage {
            role: d.role,
            content: d.content.map(|c| match c {
                DerivedContent::Text(text) => MessageContent::Text(text),
                DerivedContent::Parts(parts) => MessageContent::Parts(parts),
            }),
            name: d.name,
            tool_calls: d.tool_calls,
            tool_call_id: d.tool_call_id,
            cache_control: None,
            tool_error: false,
        }
    }
}
