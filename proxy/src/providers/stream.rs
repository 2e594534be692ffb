//! Streaming answers: one decoder per provider behind [`StreamDecoder`], and the
//! `ChunkBuilder` they share to emit OpenAI `chat.completion.chunk`s.

use serde_json::Map;

use super::error::ProviderError;
use super::types::{
    ChatChunk, ChunkChoice, Delta, FinishReason, FunctionCallDelta, Role, ToolCallDelta, Usage,
    chunk_object, new_id, unix_now,
};
use super::{anthropic, gemini, ollama, openai};

/// Turns an upstream stream, fed as raw bytes in pieces of any size, into OpenAI chunks.
///
/// Call [`feed`](Self::feed) for every piece of the body and [`finish`](Self::finish) at its
/// end: `finish` fails with [`ProviderError::Truncated`] when the provider's terminal event
/// never came, so a cut-off answer is never passed off as complete.
#[derive(Debug)]
pub struct StreamDecoder {
    inner: Decoder,
}

#[derive(Debug)]
enum Decoder {
    OpenAi(openai::Decoder),
    Anthropic(anthropic::Decoder),
    Gemini(gemini::Decoder),
    Ollama(ollama::Decoder),
}

impl StreamDecoder {
    pub(crate) fn openai(decoder: openai::Decoder) -> Self {
        StreamDecoder {
            inner: Decoder::OpenAi(decoder),
        }
    }

    pub(crate) fn anthropic(decoder: anthropic::Decoder) -> Self {
        StreamDecoder {
            inner: Decoder::Anthropic(decoder),
        }
    }

    pub(crate) fn gemini(decoder: gemini::Decoder) -> Self {
        StreamDecoder {
            inner: Decoder::Gemini(decoder),
        }
    }

    pub(crate) fn ollama(decoder: ollama::Decoder) -> Self {
        StreamDecoder {
            inner: Decoder::Ollama(decoder),
        }
    }

    /// Feeds the next piece of the upstream body; returns the chunks it completes.
    /// An error event from the provider comes back as its classified error.
    pub fn feed(&mut self, bytes: &[u8]) -> Result<Vec<ChatChunk>, ProviderError> {
        match &mut self.inner {
            Decoder::OpenAi(d) => d.feed(bytes),
            Decoder::Anthropic(d) => d.feed(bytes),
            Decoder::Gemini(d) => d.feed(bytes),
            Decoder::Ollama(d) => d.feed(bytes),
        }
    }

    /// Ends the stream; returns any last chunks, or `Truncated` if the provider's terminal
    /// event was missing.
    pub fn finish(&mut self) -> Result<Vec<ChatChunk>, ProviderError> {
        match &mut self.inner {
            Decoder::OpenAi(d) => d.finish(),
            Decoder::Anthropic(d) => d.finish(),
            Decoder::Gemini(d) => d.finish(),
            Decoder::Ollama(d) => d.finish(),
        }
    }

    /// Token counts reported so far (complete once the stream finished), for settling
    /// budgets — available whether or not the caller asked for a usage chunk.
    pub fn usage(&self) -> Option<Usage> {
        match &self.inner {
            Decoder::OpenAi(d) => d.usage(),
            Decoder::Anthropic(d) => d.builder.usage,
            Decoder::Gemini(d) => d.builder.usage,
            Decoder::Ollama(d) => d.builder.usage,
        }
    }

    /// Whether the provider's terminal event has been seen. Gemini has none (its stream
    /// simply ends after a piece with `finishReason`), so a Gemini stream is complete only
    /// once [`finish`](Self::finish) has succeeded.
    pub fn is_complete(&self) -> bool {
        match &self.inner {
            Decoder::OpenAi(d) => d.is_complete(),
            Decoder::Anthropic(d) => d.builder.done,
            Decoder::Gemini(d) => d.builder.done,
            Decoder::Ollama(d) => d.builder.done,
        }
    }
}

/// Builds the chunks of one streamed answer: same id, model and `created` on each, the
/// assistant role on the first, and the usage chunk at the end when the caller asked for it.
#[derive(Debug)]
pub(crate) struct ChunkBuilder {
    pub id: String,
    pub model: String,
    pub created: u64,
    pub include_usage: bool,
    pub usage: Option<Usage>,
    /// The terminal event was seen; later events are ignored.
    pub done: bool,
    role_sent: bool,
    /// Tool calls started so far (their OpenAI `index` is the count before them).
    pub tool_calls: u32,
    /// The stop sequence that ended the answer, when the provider said which; put on the
    /// finish chunk by [`close`](Self::close).
    pub stop_sequence: Option<String>,
}

impl ChunkBuilder {
    pub fn new(model: &str, include_usage: bool) -> Self {
        ChunkBuilder {
            id: new_id("chatcmpl-"),
            model: model.to_owned(),
            created: unix_now(),
            include_usage,
            usage: None,
            done: false,
            role_sent: false,
            tool_calls: 0,
            stop_sequence: None,
        }
    }

    /// A chunk for choice 0; the first one carries `role: assistant`.
    pub fn chunk(&mut self, mut delta: Delta, finish_reason: Option<FinishReason>) -> ChatChunk {
        if !self.role_sent {
            delta.role = Some(Role::Assistant);
            self.role_sent = true;
        }
        ChatChunk {
            id: self.id.clone(),
            object: chunk_object(),
            created: self.created,
            model: self.model.clone(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason,
                logprobs: None,
                extra: Map::new(),
                stop_sequence: None,
            }],
            usage: None,
            usage_details: Map::new(),
            system_fingerprint: None,
            extra: Map::new(),
        }
    }

    /// The opening chunk: role and empty content, as OpenAI sends it.
    pub fn opening(&mut self) -> ChatChunk {
        self.chunk(
            Delta {
                content: Some(String::new()),
                ..Delta::default()
            },
            None,
        )
    }

    pub fn text(&mut self, text: &str) -> ChatChunk {
        self.chunk(
            Delta {
                content: Some(text.to_owned()),
                ..Delta::default()
            },
            None,
        )
    }

    /// Starts a tool call; returns its index and the chunk naming it.
    pub fn tool_call_start(&mut self, id: String, name: String, arguments: String) -> ChatChunk {
        let index = self.tool_calls;
        self.tool_calls += 1;
        let call = ToolCallDelta {
            index,
            id: Some(id),
            kind: Some("function".to_owned()),
            function: Some(FunctionCallDelta {
                name: Some(name),
                arguments: Some(arguments),
            }),
        };
        self.tool_delta(call)
    }

    /// More argument text for the tool call at `index`.
    pub fn tool_arguments(&mut self, index: u32, arguments: &str) -> ChatChunk {
        self.tool_delta(ToolCallDelta {
            index,
            id: None,
            kind: None,
            function: Some(FunctionCallDelta {
                name: None,
                arguments: Some(arguments.to_owned()),
            }),
        })
    }

    fn tool_delta(&mut self, call: ToolCallDelta) -> ChatChunk {
        self.chunk(
            Delta {
                tool_calls: Some(vec![call]),
                ..Delta::default()
            },
            None,
        )
    }

    /// The closing chunks: finish reason, then usage when asked for. Marks the stream done.
    pub fn close(&mut self, reason: FinishReason) -> Vec<ChatChunk> {
        self.done = true;
        let reason = if self.tool_calls > 0 && reason == FinishReason::Stop {
            // Gemini and Ollama say STOP after calling tools; callers expect `tool_calls`.
            FinishReason::ToolCalls
        } else {
            reason
        };
        let mut finish = self.chunk(Delta::default(), Some(reason));
        if reason == FinishReason::Stop
            && let Some(choice) = finish.choices.first_mut()
        {
            choice.stop_sequence = self.stop_sequence.take();
        }
        let mut out = vec![finish];
        if self.include_usage {
            out.push(ChatChunk {
                id: self.id.clone(),
                object: chunk_object(),
                created: self.created,
                model: self.model.clone(),
                choices: Vec::new(),
                usage: Some(self.usage.unwrap_or_default()),
                usage_details: Map::new(),
                system_fingerprint: None,
                extra: Map::new(),
            });
        }
        out
    }
}
