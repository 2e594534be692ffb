//! The exact key: a SHA-256 digest of everything that changes an answer, written in one
//! canonical form so that the same meaning gives the same key whatever the door or the bytes.
//!
//! In the key: the scope (a tenant, or the whole gateway when the policy shares), the
//! resolved model (the upstream models the name routes to, so an alias and its model share),
//! the messages (roles, with `developer` read as `system`; text, with a content array of text
//! parts read as its concatenation; images; tool calls and results; names), temperature,
//! top_p, the output cap (`max_tokens` or `max_completion_tokens`), stop sequences, tools and
//! tool choice, `n`, every field the gateway does not model (`response_format`, `seed`,
//! `top_k`, ...) except those that never change the answer ([`IGNORED_EXTRA`]), and the
//! `anthropic-beta` list.
//!
//! Not in the key: `stream` and `stream_options` (an answer replays either way), `user`,
//! prompt-cache breakpoints (`cache_control`: cost, never the answer), and the door.

use crate::providers::types::{
    ChatMessage, ChatRequest, ContentPart, MessageContent, Role, Stop, Tool, ToolChoice,
};
use serde_json::{Value, json};
use std::fmt;

/// Fields of `extra` that do not change the answer.
pub const IGNORED_EXTRA: &[&str] = &["metadata", "store", "service_tier", "user", "stream"];

/// An exact key: the SHA-256 of the request's canonical form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(pub [u8; 32]);

impl Key {
    /// The key in lowercase hex (Redis keys, logs).
    pub fn hex(&self) -> String {
        use std::fmt::Write as _;
        self.0.iter().fold(String::with_capacity(64), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
    }
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Key({}..)", &self.hex()[..12])
    }
}

/// The exact key of `req` in `scope` for the resolved `model`.
pub fn exact(scope: &str, model: &str, req: &ChatRequest) -> Key {
    let mut out = Vec::with_capacity(512);
    canonical(&meaning(scope, model, req), &mut out);
    let digest = ring::digest::digest(&ring::digest::SHA256, &out);
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    Key(key)
}

/// The request's meaning as one JSON value.
fn meaning(scope: &str, model: &str, req: &ChatRequest) -> Value {
    let extra: serde_json::Map<String, Value> = req
        .extra
        .iter()
        .filter(|(k, _)| !IGNORED_EXTRA.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut betas = req.anthropic_beta.clone();
    betas.sort();
    json!({
        "v": 1,
        "scope": scope,
        "model": model,
        "messages": req.messages.iter().map(message).collect::<Vec<_>>(),
        "temperature": req.temperature,
        "top_p": req.top_p,
        "max_tokens": req.max_output_tokens(),
        "stop": stop(req.stop.as_ref()),
        "tools": req.tools.as_deref().map(tools),
        "tool_choice": req.tool_choice.as_ref().map(tool_choice),
        "n": req.n.unwrap_or(1),
        "extra": extra,
        "betas": betas,
    })
}

/// A message in canonical form.
pub fn message(m: &ChatMessage) -> Value {
    let role = match m.role {
        Role::System | Role::Developer => "system",
        Role::User => "user",
        Role::Assistant => "assistant",
        Role::Tool => "tool",
    };
    json!({
        "role": role,
        "content": m.content.as_ref().map(content),
        "name": m.name,
        "tool_calls": m.tool_calls.as_ref().map(|calls| calls
            .iter()
            .map(|c| json!([c.id, c.kind, c.function.name, c.function.arguments]))
            .collect::<Vec<_>>()),
        "tool_call_id": m.tool_call_id,
        "tool_error": m.tool_error,
    })
}

/// Content: all-text parts read as one string, so `"hi"` and `[{"type":"text","text":"hi"}]`
/// (the Anthropic door's usual shape) are the same.
fn content(c: &MessageContent) -> Value {
    match c {
        MessageContent::Text(text) => Value::String(text.clone()),
        MessageContent::Parts(parts) => {
            if parts.iter().all(|p| matches!(p, ContentPart::Text { .. })) {
                return Value::String(c.text());
            }
            Value::Array(
                parts
                    .iter()
                    .map(|p| match p {
                        ContentPart::Text { text, .. } => json!({"text": text}),
                        ContentPart::ImageUrl { image_url, .. } => {
                            json!({"image": image_url.url, "detail": image_url.detail})
                        }
                    })
                    .collect(),
            )
        }
    }
}

fn stop(s: Option<&Stop>) -> Value {
    serde_json::to_value(s).unwrap_or(Value::Null)
}

fn tools(tools: &[Tool]) -> Value {
    Value::Array(
        tools
            .iter()
            .map(|t| {
                json!([
                    t.kind,
                    t.function.name,
                    t.function.description,
                    t.function.parameters,
                    t.function.strict
                ])
            })
            .collect(),
    )
}

fn tool_choice(c: &ToolChoice) -> Value {
    serde_json::to_value(c).unwrap_or(Value::Null)
}

/// Writes `v` with object keys sorted and no whitespace: the same value, the same bytes,
/// whatever order its keys came in.
pub fn canonical(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push(b'{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(&Value::String(k.clone()), out);
                out.push(b':');
                if let Some(v) = map.get(k) {
                    canonical(v, out);
                }
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                canonical(item, out);
            }
            out.push(b']');
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}
