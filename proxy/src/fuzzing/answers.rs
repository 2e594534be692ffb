//! The answer types as `#[derive(Deserialize)]` with `flatten` reads them: the reference the
//! hand-written visitors in `types/answer_de.rs` must match, for a whole answer and a chunk.

use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value};

use crate::providers::Usage;
use crate::providers::types::{
    ChatChunk, ChatResponse, Choice, ChunkChoice, Delta, FinishReason, ResponseMessage, Role,
    ToolCall, ToolCallDelta,
};

/// Reads `null` as the type's default, as the derived request and answers did.
pub(super) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A field whose default depends on the answer's kind: `null` is an error, as for a string.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<String>, D::Error> {
    String::deserialize(deserializer).map(Some)
}

/// `data` read as a whole answer and as a chunk, by hand and derived: both accept the same
/// inputs, with the same result.
pub(super) fn hand_written_readers_agree(data: &[u8]) {
    let answer = serde_json::from_slice::<ChatResponse>(data);
    let derived = serde_json::from_slice::<DerivedAnswer<DerivedChoice>>(data);
    agree(&answer, &derived, "chat.completion");
    if let (Ok(answer), Ok(derived)) = (answer, derived) {
        assert_eq!(answer, derived.into_response());
    }
    let chunk = serde_json::from_slice::<ChatChunk>(data);
    let derived = serde_json::from_slice::<DerivedAnswer<DerivedChunkChoice>>(data);
    agree(&chunk, &derived, "chat.completion.chunk");
    if let (Ok(chunk), Ok(derived)) = (chunk, derived) {
        assert_eq!(chunk, derived.into_chunk());
    }
}

fn agree<A, B>(hand: &serde_json::Result<A>, derived: &serde_json::Result<B>, what: &str) {
    assert_eq!(
        hand.is_ok(),
        derived.is_ok(),
        "hand-written and derived Deserialize of a {what} disagree: {:?} vs {:?}",
        hand.as_ref().err(),
        derived.as_ref().err()
    );
}

fn completion() -> String {
    "chat.completion".into()
}

fn chunk() -> String {
    "chat.completion.chunk".into()
}

#[derive(Deserialize)]
#[serde(bound(deserialize = "C: Deserialize<'de>"))]
struct DerivedAnswer<C> {
    #[serde(default)]
    id: String,
    #[serde(default, deserialize_with = "present")]
    object: Option<String>,
    #[serde(default)]
    created: u64,
    #[serde(default)]
    model: String,
    #[serde(default, deserialize_with = "null_as_default")]
    choices: Vec<C>,
    #[serde(default)]
    usage: Option<DerivedUsage>,
    #[serde(default)]
    system_fingerprint: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct DerivedUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: u32,
    #[serde(flatten)]
    details: Map<String, Value>,
}

impl DerivedUsage {
    fn split(usage: Option<Self>) -> (Option<Usage>, Map<String, Value>) {
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
}

impl DerivedAnswer<DerivedChoice> {
    fn into_response(self) -> ChatResponse {
        let (usage, usage_details) = DerivedUsage::split(self.usage);
        ChatResponse {
            id: self.id,
            object: self.object.unwrap_or_else(completion),
            created: self.created,
            model: self.model,
            choices: self.choices.into_iter().map(Choice::from).collect(),
            usage,
            usage_details,
            system_fingerprint: self.system_fingerprint,
            extra: self.extra,
        }
    }
}

impl DerivedAnswer<DerivedChunkChoice> {
    fn into_chunk(self) -> ChatChunk {
        let (usage, usage_details) = DerivedUsage::split(self.usage);
        ChatChunk {
            id: self.id,
            object: self.object.unwrap_or_else(chunk),
            created: self.created,
            model: self.model,
            choices: self.choices.into_iter().map(ChunkChoice::from).collect(),
            usage,
            usage_details,
            system_fingerprint: self.system_fingerprint,
            extra: self.extra,
        }
    }
}

#[derive(Deserialize)]
struct DerivedChoice {
    #[serde(default)]
    index: u32,
    message: DerivedMessage,
    #[serde(default)]
    finish_reason: Option<FinishReason>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl From<DerivedChoice> for Choice {
    fn from(d: DerivedChoice) -> Self {
        Choice {
            index: d.index,
            message: ResponseMessage {
                role: d.message.role,
                content: d.message.content,
                tool_calls: d.message.tool_calls,
                refusal: d.message.refusal,
                extra: d.message.extra,
            },
            finish_reason: d.finish_reason,
            logprobs: d.logprobs,
            extra: d.extra,
            stop_sequence: None,
        }
    }
}

#[derive(Deserialize)]
struct DerivedMessage {
    role: Role,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCall>>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

#[derive(Deserialize)]
struct DerivedChunkChoice {
    #[serde(default)]
    index: u32,
    #[serde(default)]
    delta: DerivedDelta,
    #[serde(default)]
    finish_reason: Option<FinishReason>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}

impl From<DerivedChunkChoice> for ChunkChoice {
    fn from(d: DerivedChunkChoice) -> Self {
        ChunkChoice {
            index: d.index,
            delta: Delta {
                role: d.delta.role,
                content: d.delta.content,
                tool_calls: d.delta.tool_calls,
                refusal: d.delta.refusal,
                extra: d.delta.extra,
            },
            finish_reason: d.finish_reason,
            logprobs: d.logprobs,
            extra: d.extra,
            stop_sequence: None,
        }
    }
}

#[derive(Default, Deserialize)]
struct DerivedDelta {
    #[serde(default)]
    role: Option<Role>,
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(flatten)]
    extra: Map<String, Value>,
}
