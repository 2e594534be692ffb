//! The internal chunk stream re-encoded as Anthropic's server-sent events:
//!
//! ```text
//! message_start                      message with empty content, estimated input tokens
//! content_block_start  (index 0)     then `ping`, once
//! content_block_delta  ...           text_delta, or input_json_delta for a tool call
//! content_block_stop                 before the next block opens
//! ... one block per text run and per tool call ...
//! message_delta                      stop_reason (and stop_sequence), usage from the final
//!                                    usage chunk
//! message_stop
//! ```
//!
//! An `Err` item (the upstream broke mid-stream) becomes an `error` event, and so does a
//! stream that ends without a finish reason: a cut-off answer never ends in `message_stop`.

use bytes::Bytes;
use futures::{Stream, StreamExt as _, future, stream};
use serde::Serialize;
use serde_json::Map;

use super::error::{ErrorBody, stream_error_type};
use super::response::{Message, MessageUsage, message_id, stop_reason};
use crate::providers::ProviderError;
use crate::providers::types::{ChatChunk, ChunkChoice, FinishReason, ToolCallDelta, Usage, new_id};

/// Encodes `chunks` as Anthropic events for a caller that asked for `model`;
/// `input_tokens` (an estimate) goes in `message_start`, the upstream's count in
/// `message_delta`. Each item is every event one chunk produced. The upstream stream is
/// polled to its end even after `message_stop` or an error, so it finishes on its own terms.
pub fn encode(
    chunks: impl Stream<Item = Result<ChatChunk, ProviderError>> + Send + 'static,
    model: String,
    input_tokens: u32,
) -> impl Stream<Item = Bytes> + Send + 'static {
    let encoder = Encoder::new(model, input_tokens);
    chunks
        .map(Some)
        .chain(stream::once(future::ready(None)))
        .scan(encoder, |encoder, item| {
            future::ready(Some(encoder.step(item)))
        })
        .filter_map(|bytes| future::ready((!bytes.is_empty()).then_some(bytes)))
}

/// One event's data, tagged by its `type` (which is also the SSE event name).
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    MessageStart {
        message: &'a Message,
    },
    ContentBlockStart {
        index: u32,
        content_block: BlockStart<'a>,
    },
    Ping,
    ContentBlockDelta {
        index: u32,
        delta: BlockDelta<'a>,
    },
    ContentBlockStop {
        index: u32,
    },
    MessageDelta {
        delta: MessageDeltaBody,
        usage: MessageUsage,
    },
    MessageStop,
}

impl Event<'_> {
    fn name(&self) -> &'static str {
        match self {
            Event::MessageStart { .. } => "message_start",
            Event::ContentBlockStart { .. } => "content_block_start",
            Event::Ping => "ping",
            Event::ContentBlockDelta { .. } => "content_block_delta",
            Event::ContentBlockStop { .. } => "content_block_stop",
            Event::MessageDelta { .. } => "message_delta",
            Event::MessageStop => "message_stop",
        }
    }
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockStart<'a> {
    Text {
        text: &'a str,
    },
    ToolUse {
        id: &'a str,
        name: &'a str,
        input: Map<String, serde_json::Value>,
    },
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum BlockDelta<'a> {
    TextDelta { text: &'a str },
    InputJsonDelta { partial_json: &'a str },
}

#[derive(Debug, Serialize)]
struct MessageDeltaBody {
    stop_reason: &'static str,
    stop_sequence: Option<String>,
}

/// An error event to end the stream with: Anthropic error type and message.
type Failure = (&'static str, String);

/// The content block being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    Text {
        index: u32,
    },
    /// `call` is the internal tool-call index.
    Tool {
        index: u32,
        call: u32,
    },
}

impl Open {
    fn index(self) -> u32 {
        match self {
            Open::Text { index } | Open::Tool { index, .. } => index,
        }
    }
}

/// The state of one encoded stream.
#[derive(Debug)]
struct Encoder {
    model: String,
    input_tokens: u32,
    started: bool,
    pinged: bool,
    next_index: u32,
    open: Option<Open>,
    /// Internal indices of the tool calls whose blocks are closed.
    closed_calls: Vec<u32>,
    finish: Option<FinishReason>,
    /// The stop sequence that ended the answer, when the upstream said which.
    stop_sequence: Option<String>,
    refused: bool,
    usage: Option<Usage>,
    /// `message_stop` or `error` was written; nothing more is.
    done: bool,
}

impl Encoder {
    fn new(model: String, input_tokens: u32) -> Self {
        Encoder {
            model,
            input_tokens,
            started: false,
            pinged: false,
            next_index: 0,
            open: None,
            closed_calls: Vec::new(),
            finish: None,
            stop_sequence: None,
            refused: false,
            usage: None,
            done: false,
        }
    }

    /// The events for one upstream item; `None` is the end of the upstream stream.
    fn step(&mut self, item: Option<Result<ChatChunk, ProviderError>>) -> Bytes {
        let mut out = Vec::new();
        if self.done {
            return Bytes::new();
        }
        let failure = match item {
            Some(Ok(chunk)) => self.chunk(chunk, &mut out).err(),
            Some(Err(e)) => Some((stream_error_type(&e), e.to_string())),
            None if self.finish.is_some() => {
                self.stop(&mut out);
                None
            }
            None => Some((
                "api_error",
                "the upstream stream ended before the answer was complete".to_owned(),
            )),
        };
        if let Some((kind, message)) = failure {
            write(&mut out, "error", &ErrorBody::new(kind, &message));
            self.done = true;
        }
        Bytes::from(out)
    }

    fn chunk(&mut self, chunk: ChatChunk, out: &mut Vec<u8>) -> Result<(), Failure> {
        if !self.started {
            self.start(&chunk.id, out);
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
        // The request never asks for `n > 1`: choice 0 is the answer.
        for choice in chunk.choices.into_iter().filter(|c| c.index == 0) {
            self.choice(choice, out)?;
        }
        if self.finish.is_some() && chunk.usage.is_some() {
            self.stop(out);
        }
        Ok(())
    }

    fn choice(&mut self, choice: ChunkChoice, out: &mut Vec<u8>) -> Result<(), Failure> {
        let delta = choice.delta;
        if let Some(text) = delta.content.as_deref().filter(|t| !t.is_empty()) {
            self.text(text, out);
        }
        if let Some(text) = delta.refusal.as_deref().filter(|t| !t.is_empty()) {
            self.refused = true;
            self.text(text, out);
        }
        for call in delta.tool_calls.into_iter().flatten() {
            self.tool(call, out)?;
        }
        if let Some(reason) = choice.finish_reason {
            self.finish = Some(reason);
            self.stop_sequence = choice.stop_sequence;
            self.close(out);
        }
        Ok(())
    }

    fn start(&mut self, upstream_id: &str, out: &mut Vec<u8>) {
        self.started = true;
        let message = Message {
            id: message_id(upstream_id),
            kind: "message",
            role: "assistant",
            model: std::mem::take(&mut self.model),
            content: Vec::new(),
            stop_reason: None,
            stop_sequence: None,
            usage: MessageUsage {
                input_tokens: self.input_tokens,
                output_tokens: 0,
            },
        };
        write_event(out, &Event::MessageStart { message: &message });
    }

    fn text(&mut self, text: &str, out: &mut Vec<u8>) {
        let index = match self.open {
            Some(Open::Text { index }) => index,
            _ => {
                let index = self.open_block(out, BlockStart::Text { text: "" });
                self.open = Some(Open::Text { index });
                index
            }
        };
        let delta = BlockDelta::TextDelta { text };
        write_event(out, &Event::ContentBlockDelta { index, delta });
    }

    fn tool(&mut self, call: ToolCallDelta, out: &mut Vec<u8>) -> Result<(), Failure> {
        let ToolCallDelta {
            index: call_index,
            id,
            function,
            ..
        } = call;
        let (name, arguments) = function.map_or((None, None), |f| (f.name, f.arguments));
        let index = match self.open {
            Some(Open::Tool { index, call }) if call == call_index => index,
            _ if self.closed_calls.contains(&call_index) => {
                return Err((
                    "api_error",
                    "the upstream interleaved the arguments of two tool calls".to_owned(),
                ));
            }
            _ => {
                let id = id.unwrap_or_else(|| new_id("toolu_"));
                let start = BlockStart::ToolUse {
                    id: &id,
                    name: name.as_deref().unwrap_or_default(),
                    input: Map::new(),
                };
                let index = self.open_block(out, start);
                self.open = Some(Open::Tool {
                    index,
                    call: call_index,
                });
                index
            }
        };
        if let Some(partial_json) = arguments.as_deref().filter(|a| !a.is_empty()) {
            let delta = BlockDelta::InputJsonDelta { partial_json };
            write_event(out, &Event::ContentBlockDelta { index, delta });
        }
        Ok(())
    }

    /// Closes the open block, then starts a new one; the first block is followed by `ping`.
    fn open_block(&mut self, out: &mut Vec<u8>, content_block: BlockStart<'_>) -> u32 {
        self.close(out);
        let index = self.next_index;
        self.next_index += 1;
        write_event(
            out,
            &Event::ContentBlockStart {
                index,
                content_block,
            },
        );
        if !self.pinged {
            self.pinged = true;
            write_event(out, &Event::Ping);
        }
        index
    }

    fn close(&mut self, out: &mut Vec<u8>) {
        if let Some(open) = self.open.take() {
            if let Open::Tool { call, .. } = open {
                self.closed_calls.push(call);
            }
            write_event(
                out,
                &Event::ContentBlockStop {
                    index: open.index(),
                },
            );
        }
    }

    /// `message_delta` and `message_stop`.
    fn stop(&mut self, out: &mut Vec<u8>) {
        self.close(out);
        let stop_sequence = self
            .stop_sequence
            .take()
            .filter(|_| self.finish == Some(FinishReason::Stop) && !self.refused);
        let reason = match self.finish {
            _ if self.refused => "refusal",
            Some(reason) => stop_reason(reason, stop_sequence.as_deref()),
            None => "end_turn",
        };
        let usage = match self.usage {
            Some(u) => MessageUsage {
                input_tokens: u.prompt_tokens,
                output_tokens: u.completion_tokens,
            },
            None => MessageUsage {
                input_tokens: self.input_tokens,
                output_tokens: 0,
            },
        };
        let delta = MessageDeltaBody {
            stop_reason: reason,
            stop_sequence,
        };
        write_event(out, &Event::MessageDelta { delta, usage });
        write_event(out, &Event::MessageStop);
        self.done = true;
    }
}

fn write_event(out: &mut Vec<u8>, event: &Event<'_>) {
    write(out, event.name(), event);
}

/// `event: <name>\ndata: <json>\n\n`.
fn write(out: &mut Vec<u8>, name: &str, data: &impl Serialize) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // Plain structs of strings and numbers: serialising them into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, data).is_err() {
        out.extend_from_slice(b"{}");
    }
    out.extend_from_slice(b"\n\n");
}
