//! The JSON form of [`ChatResponse`] and [`ChatChunk`]: their `usage_details` travel inside
//! the `usage` object, beside the counts, so that [`Usage`] itself can stay `Copy` (budgets
//! copy it on every request) while an upstream's `prompt_tokens_details` and the like reach
//! the caller untouched.
//!
//! Deserialising goes through an owned mirror read by hand (`answer_de`; `From`, a move per
//! field); serialising through a borrowed one (no copies). Empty maps allocate nothing.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use super::answer_de::{AnswerWire, UsageWire, answer};
use super::{ChatChunk, ChatResponse, Choice, ChunkChoice, Usage, chunk_object, completion_object};

/// `usage` as it is written.
#[derive(Serialize)]
struct UsageRef<'a> {
    #[serde(flatten)]
    counts: &'a Usage,
    #[serde(flatten)]
    details: &'a Map<String, Value>,
}

/// Splits a read `usage` into the counts and the rest.
fn split_usage(usage: Option<UsageWire>) -> (Option<Usage>, Map<String, Value>) {
    match usage {
        Some(u) => (
            Some(Usage {
                prompt_tokens: u.prompt_tokens,
                completion_tokens: u.completion_tokens,
                total_tokens: u.total_tokens,
            }),
            u.details,
        ),
        None => (None, Map::new()),
    }
}

/// A `chat.completion` as it is read (by hand: `answer_de`).
pub(super) struct ChatResponseWire(AnswerWire<Choice>);

impl<'de> Deserialize<'de> for ChatResponseWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        answer(deserializer, completion_object).map(Self)
    }
}

impl From<ChatResponseWire> for ChatResponse {
    fn from(ChatResponseWire(w): ChatResponseWire) -> Self {
        let (usage, usage_details) = split_usage(w.usage);
        ChatResponse {
            id: w.id,
            object: w.object,
            created: w.created,
            model: w.model,
            choices: w.choices,
            usage,
            usage_details,
            system_fingerprint: w.system_fingerprint,
            extra: w.extra,
        }
    }
}

/// A `chat.completion` as it is written.
#[derive(Serialize)]
struct ChatResponseRef<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    model: &'a str,
    choices: &'a [Choice],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

impl Serialize for ChatResponse {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ChatResponseRef {
            id: &self.id,
            object: &self.object,
            created: self.created,
            model: &self.model,
            choices: &self.choices,
            usage: self.usage.as_ref().map(|counts| UsageRef {
                counts,
                details: &self.usage_details,
            }),
            system_fingerprint: self.system_fingerprint.as_deref(),
            extra: &self.extra,
        }
        .serialize(serializer)
    }
}

/// A `chat.completion.chunk` as it is read (by hand: `answer_de`).
pub(super) struct ChatChunkWire(AnswerWire<ChunkChoice>);

impl<'de> Deserialize<'de> for ChatChunkWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        answer(deserializer, chunk_object).map(Self)
    }
}

impl From<ChatChunkWire> for ChatChunk {
    fn from(ChatChunkWire(w): ChatChunkWire) -> Self {
        let (usage, usage_details) = split_usage(w.usage);
        ChatChunk {
            id: w.id,
            object: w.object,
            created: w.created,
            model: w.model,
            choices: w.choices,
            usage,
            usage_details,
            system_fingerprint: w.system_fingerprint,
            extra: w.extra,
        }
    }
}

/// A `chat.completion.chunk` as it is written.
#[derive(Serialize)]
struct ChatChunkRef<'a> {
    id: &'a str,
    object: &'a str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageRef<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

impl Serialize for ChatChunk {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ChatChunkRef {
            id: &self.id,
            object: &self.object,
            created: self.created,
            model: &self.model,
            choices: &self.choices,
            usage: self.usage.as_ref().map(|counts| UsageRef {
                counts,
                details: &self.usage_details,
            }),
            system_fingerprint: self.system_fingerprint.as_deref(),
            extra: &self.extra,
        }
        .serialize(serializer)
    }
}
