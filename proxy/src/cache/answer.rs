//! A stored answer: the whole response, kept as typed data so that it replays in any door's
//! format, whole or as a stream; assembled from a stream's chunks when the answer streamed.

use crate::providers::stream::ChunkBuilder;
use crate::providers::types::{
    ChatChunk, ChatResponse, Choice, FinishReason, FunctionCall, ResponseMessage, Role, ToolCall,
    Usage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// A whole answer, as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    /// The response in the internal (OpenAI) shape.
    pub response: ChatResponse,
}

/// The stored form: OpenAI's JSON, plus what that shape does not say (the stop sequence
/// that ended each choice).
#[derive(Serialize, Deserialize)]
struct Stored {
    response: Value,
    #[serde(default)]
    stops: Vec<Option<String>>,
    /// Milliseconds the backend keeps the entry past its TTL, for stale answers (Redis:
    /// its expiry is the TTL plus this, so the entry is fresh while more than this is left).
    #[serde(default, skip_serializing_if = "is_zero")]
    kept_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl Answer {
    /// The answer as bytes for a backend.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.to_bytes_kept(std::time::Duration::ZERO)
    }

    /// The answer as bytes for a backend that keeps it `kept` past its TTL (stale answers);
    /// [`Answer::from_bytes_kept`] gives the grace back.
    pub fn to_bytes_kept(&self, kept: std::time::Duration) -> Vec<u8> {
        let stored = Stored {
            kept_ms: u64::try_from(kept.as_millis()).unwrap_or(u64::MAX),
            response: serde_json::to_value(&self.response).unwrap_or(Value::Null),
            stops: self
                .response
                .choices
                .iter()
                .map(|c| c.stop_sequence.clone())
                .collect(),
        };
        serde_json::to_vec(&stored).unwrap_or_default()
    }

    /// An answer read back from a backend; `None` if the bytes are not one.
    pub fn from_bytes(bytes: &[u8]) -> Option<Self> {
        Self::from_bytes_kept(bytes).map(|(answer, _)| answer)
    }

    /// The answer of `bytes`, and how long its backend keeps it past its TTL (zero for
    /// bytes written without one).
    pub fn from_bytes_kept(bytes: &[u8]) -> Option<(Self, std::time::Duration)> {
        let stored: Stored = serde_json::from_slice(bytes).ok()?;
        let mut response: ChatResponse = serde_json::from_value(stored.response).ok()?;
        for (choice, stop) in response.choices.iter_mut().zip(stored.stops) {
            choice.stop_sequence = stop;
        }
        let kept = std::time::Duration::from_millis(stored.kept_ms);
        Some((Answer { response }, kept))
    }

    /// Whether the answer is complete: every choice finished for a reason.
    pub fn is_complete(&self) -> bool {
        !self.response.choices.is_empty()
            && self
                .response
                .choices
                .iter()
                .all(|c| c.finish_reason.is_some())
    }

    /// The answer for a caller who asked for `model`, with a fresh id.
    pub fn for_caller(&self, model: &str) -> ChatResponse {
        let mut response = self.response.clone();
        response.id = crate::providers::types::new_id("chatcmpl-");
        response.model = model.to_owned();
        response
    }

    /// The answer as the chunks of a stream for a caller who asked for `model`, with the
    /// usage chunk when `include_usage`. Choice 0 only: a stream of `n > 1` choices is not
    /// replayed (such answers are not stored, see [`cacheable`](super::cacheable)).
    pub fn chunks(&self, model: &str, include_usage: bool) -> Vec<ChatChunk> {
        let mut b = ChunkBuilder::new(model, include_usage);
        b.usage = self.response.usage;
        let Some(choice) = self.response.choices.first() else {
            return b.close(FinishReason::Stop);
        };
        let mut out = vec![b.opening()];
        if let Some(text) = &choice.message.content
            && !text.is_empty()
        {
            out.push(b.text(text));
        }
        for call in choice.message.tool_calls.iter().flatten() {
            out.push(b.tool_call_start(
                call.id.clone(),
                call.function.name.clone(),
                call.function.arguments.clone(),
            ));
        }
        b.stop_sequence = choice.stop_sequence.clone();
        out.extend(b.close(choice.finish_reason.unwrap_or(FinishReason::Stop)));
        out
    }
}

/// Builds a whole answer from a stream's chunks, as they pass.
#[derive(Debug, Default)]
pub struct Assembler {
    head: Option<(String, u64, String, Option<String>)>,
    choices: Vec<Choice>,
    usage: Option<Usage>,
    usage_details: Map<String, Value>,
}

impl Assembler {
    /// Takes the next chunk into the answer.
    pub fn push(&mut self, chunk: &ChatChunk) {
        if self.head.is_none() {
            self.head = Some((
                chunk.id.clone(),
                chunk.created,
                chunk.model.clone(),
                chunk.system_fingerprint.clone(),
            ));
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
            self.usage_details = chunk.usage_details.clone();
        }
        for c in &chunk.choices {
            let at = c.index as usize;
            while self.choices.len() <= at {
                self.choices.push(empty_choice(self.choices.len() as u32));
            }
            let Some(choice) = self.choices.get_mut(at) else {
                continue;
            };
            let message = &mut choice.message;
            if let Some(text) = &c.delta.content {
                message.content.get_or_insert_default().push_str(text);
            }
            if let Some(refusal) = &c.delta.refusal {
                message.refusal.get_or_insert_default().push_str(refusal);
            }
            for call in c.delta.tool_calls.iter().flatten() {
                let calls = message.tool_calls.get_or_insert_default();
                let i = call.index as usize;
                while calls.len() <= i {
                    calls.push(ToolCall {
                        id: String::new(),
                        kind: "function".to_owned(),
                        function: FunctionCall {
                            name: String::new(),
                            arguments: String::new(),
                        },
                        cache_control: None,
                    });
                }
                if let Some(slot) = calls.get_mut(i) {
                    if let Some(id) = &call.id {
                        slot.id.clone_from(id);
                    }
                    if let Some(f) = &call.function {
                        if let Some(name) = &f.name {
                            slot.function.name.push_str(name);
                        }
                        if let Some(args) = &f.arguments {
                            slot.function.arguments.push_str(args);
                        }
                    }
                }
            }
            if c.finish_reason.is_some() {
                choice.finish_reason = c.finish_reason;
                choice.stop_sequence.clone_from(&c.stop_sequence);
            }
        }
    }

    /// The whole answer; `None` if no chunk came.
    pub fn finish(self) -> Option<Answer> {
        let (id, created, model, system_fingerprint) = self.head?;
        Some(Answer {
            response: ChatResponse {
                id,
                object: crate::providers::types::completion_object(),
                created,
                model,
                choices: self.choices,
                usage: self.usage,
                usage_details: self.usage_details,
                system_fingerprint,
                extra: Map::new(),
            },
        })
    }
}

fn empty_choice(index: u32) -> Choice {
    Choice {
        index,
        message: ResponseMessage {
            role: Role::Assistant,
            content: None,
            tool_calls: None,
            refusal: None,
            extra: Map::new(),
        },
        finish_reason: None,
        logprobs: None,
        extra: Map::new(),
        stop_sequence: None,
    }
}
