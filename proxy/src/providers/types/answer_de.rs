//! Hand-written `Deserialize` for the answer types read from every upstream response: a
//! whole answer ([`ChatResponse`], through [`ChatResponseWire`]) with its [`Choice`]s and
//! their [`ResponseMessage`], and a streamed chunk ([`ChatChunk`]) with its
//! [`ChunkChoice`]s and their [`Delta`]. Each keeps the fields it does not model in `extra`;
//! derived with `#[serde(flatten)]`, serde would first buffer each object into an
//! intermediate tree (and the answer's choices and message again inside it) before filling
//! the fields. These visitors read each field once, straight into place, with the same
//! defaults and the same errors for missing or repeated fields as the derived forms. Keys
//! are borrowed from the input where it has no escapes, so a known key allocates nothing.
//!
//! [`ChatResponseWire`]: super::wire::ChatResponseWire

use super::de::{once, once_opt};
use super::{Choice, ChunkChoice, Delta, ResponseMessage};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

/// An object's key, borrowed from the input when it can be.
pub(super) struct Key<'de>(pub(super) Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_borrowed_str<E: de::Error>(self, name: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(name)))
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name.to_owned())))
            }

            fn visit_string<E: de::Error>(self, name: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(name)))
            }
        }

        deserializer.deserialize_str(KeyVisitor)
    }
}

/// Puts the map's next value into `extra` under `key` (a field the gateway does not model).
pub(super) fn keep<'de, A: MapAccess<'de>>(
    map: &mut A,
    extra: &mut Map<String, Value>,
    key: Cow<'de, str>,
) -> Result<(), A::Error> {
    let value: Value = map.next_value()?;
    extra.insert(key.into_owned(), value);
    Ok(())
}

/// `usage` as it is read: the three counts (absent: 0), and every other key.
#[derive(Debug, Default)]
pub(super) struct UsageWire {
    pub(super) prompt_tokens: u32,
    pub(super) completion_tokens: u32,
    pub(super) total_tokens: u32,
    pub(super) details: Map<String, Value>,
}

impl<'de> Deserialize<'de> for UsageWire {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct UsageVisitor;

        impl<'de> Visitor<'de> for UsageVisitor {
            type Value = UsageWire;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a usage object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UsageWire, A::Error> {
                let (mut prompt, mut completion, mut total) = (None, None, None);
                let mut details = Map::new();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        "prompt_tokens" => once(&mut map, &mut prompt, "prompt_tokens")?,
                        "completion_tokens" => {
                            once(&mut map, &mut completion, "completion_tokens")?;
                        }
                        "total_tokens" => once(&mut map, &mut total, "total_tokens")?,
                        _ => keep(&mut map, &mut details, key)?,
                    }
                }
                Ok(UsageWire {
                    prompt_tokens: prompt.unwrap_or_default(),
                    completion_tokens: completion.unwrap_or_default(),
                    total_tokens: total.unwrap_or_default(),
                    details,
                })
            }
        }

        deserializer.deserialize_map(UsageVisitor)
    }
}

/// The fields of a `chat.completion` or a `chat.completion.chunk` as read, `C` being the
/// choice type of each.
#[derive(Debug)]
pub(super) struct AnswerWire<C> {
    pub(super) id: String,
    pub(super) object: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) choices: Vec<C>,
    pub(super) usage: Option<UsageWire>,
    pub(super) system_fingerprint: Option<String>,
    pub(super) extra: Map<String, Value>,
}

/// Reads an [`AnswerWire`]; `object` is the default of a missing `object` field.
pub(super) fn answer<'de, D, C>(
    deserializer: D,
    object: fn() -> String,
) -> Result<AnswerWire<C>, D::Error>
where
    D: Deserializer<'de>,
    C: Deserialize<'de>,
{
    struct AnswerVisitor<C> {
        object: fn() -> String,
        choice: PhantomData<C>,
    }

    impl<'de, C: Deserialize<'de>> Visitor<'de> for AnswerVisitor<C> {
        type Value = AnswerWire<C>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a chat completion object")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnswerWire<C>, A::Error> {
            let (mut id, mut object, mut created, mut model) = (None, None, None, None);
            let (mut choices, mut usage, mut fingerprint) = (None, None, None);
            let mut extra = Map::new();
            while let Some(Key(key)) = map.next_key()? {
                match &*key {
                    "id" => once(&mut map, &mut id, "id")?,
                    "object" => once(&mut map, &mut object, "object")?,
                    "created" => once(&mut map, &mut created, "created")?,
                    "model" => once(&mut map, &mut model, "model")?,
                    "choices" => once_opt(&mut map, &mut choices, "choices")?,
                    "usage" => once_opt(&mut map, &mut usage, "usage")?,
                    "system_fingerprint" => {
                        once_opt(&mut map, &mut fingerprint, "system_fingerprint")?;
                    }
                    _ => keep(&mut map, &mut extra, key)?,
                }
            }
            Ok(AnswerWire {
                id: id.unwrap_or_default(),
                object: object.unwrap_or_else(self.object),
                created: created.unwrap_or_default(),
                model: model.unwrap_or_default(),
                // Some OpenAI-compatible servers send `"choices": null` on the final usage
                // chunk.
                choices: choices.flatten().unwrap_or_default(),
                usage: usage.flatten(),
                system_fingerprint: fingerprint.flatten(),
                extra,
            })
        }
    }

    deserializer.deserialize_map(AnswerVisitor {
        object,
        choice: PhantomData,
    })
}

impl<'de> Deserialize<'de> for Choice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor;

        impl<'de> Visitor<'de> for ChoiceVisitor {
            type Value = Choice;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a choice object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Choice, A::Error> {
                let (mut index, mut message, mut finish, mut logprobs) = (None, None, None, None);
                let mut extra = Map::new();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        "index" => once(&mut map, &mut index, "index")?,
                        "message" => once(&mut map, &mut message, "message")?,
                        "finish_reason" => once(&mut map, &mut finish, "finish_reason")?,
                        "logprobs" => once(&mut map, &mut logprobs, "logprobs")?,
                        _ => keep(&mut map, &mut extra, key)?,
                    }
                }
                Ok(Choice {
                    index: index.unwrap_or_default(),
                    message: message.ok_or_else(|| de::Error::missing_field("message"))?,
                    finish_reason: finish.flatten(),
                    logprobs: logprobs.flatten(),
                    extra,
                    stop_sequence: None,
                })
            }
        }

        deserializer.deserialize_map(ChoiceVisitor)
    }
}

impl<'de> Deserialize<'de> for ResponseMessage {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MessageVisitor;

        impl<'de> Visitor<'de> for MessageVisitor {
            type Value = ResponseMessage;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an assistant message object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ResponseMessage, A::Error> {
                let (mut role, mut content, mut tool_calls, mut refusal) = (None, None, None, None);
                let mut extra = Map::new();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        "role" => once(&mut map, &mut role, "role")?,
                        "content" => once(&mut map, &mut content, "content")?,
                        "tool_calls" => once(&mut map, &mut tool_calls, "tool_calls")?,
                        "refusal" => once(&mut map, &mut refusal, "refusal")?,
                        _ => keep(&mut map, &mut extra, key)?,
                    }
                }
                Ok(ResponseMessage {
                    role: role.ok_or_else(|| de::Error::missing_field("role"))?,
                    content: content.flatten(),
                    tool_calls: tool_calls.flatten(),
                    refusal: refusal.flatten(),
                    extra,
                })
            }
        }

        deserializer.deserialize_map(MessageVisitor)
    }
}

impl<'de> Deserialize<'de> for ChunkChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ChunkChoiceVisitor;

        impl<'de> Visitor<'de> for ChunkChoiceVisitor {
            type Value = ChunkChoice;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a chunk choice object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChunkChoice, A::Error> {
                let (mut index, mut delta, mut finish, mut logprobs) = (None, None, None, None);
                let mut extra = Map::new();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        "index" => once(&mut map, &mut index, "index")?,
                        "delta" => once(&mut map, &mut delta, "delta")?,
                        "finish_reason" => once(&mut map, &mut finish, "finish_reason")?,
                        "logprobs" => once(&mut map, &mut logprobs, "logprobs")?,
                        _ => keep(&mut map, &mut extra, key)?,
                    }
                }
                Ok(ChunkChoice {
                    index: index.unwrap_or_default(),
                    delta: delta.unwrap_or_default(),
                    finish_reason: finish.flatten(),
                    logprobs: logprobs.flatten(),
                    extra,
                    stop_sequence: None,
                })
            }
        }

        deserializer.deserialize_map(ChunkChoiceVisitor)
    }
}

impl<'de> Deserialize<'de> for Delta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct DeltaVisitor;

        impl<'de> Visitor<'de> for DeltaVisitor {
            type Value = Delta;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a delta object")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Delta, A::Error> {
                let (mut role, mut content, mut tool_calls, mut refusal) = (None, None, None, None);
                let mut extra = Map::new();
                while let Some(Key(key)) = map.next_key()? {
                    match &*key {
                        "role" => once(&mut map, &mut role, "role")?,
                        "content" => once(&mut map, &mut content, "content")?,
                        "tool_calls" => once(&mut map, &mut tool_calls, "tool_calls")?,
                        "refusal" => once(&mut map, &mut refusal, "refusal")?,
                        _ => keep(&mut map, &mut extra, key)?,
                    }
                }
                Ok(Delta {
                    role: role.flatten(),
                    content: content.flatten(),
                    tool_calls: tool_calls.flatten(),
                    refusal: refusal.flatten(),
                    extra,
                })
            }
        }

        deserializer.deserialize_map(DeltaVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;
    use serde_json::json;

    #[test]
    fn an_answer_reads_into_place_and_writes_back_whole() {
        let wire = json!({
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 7,
            "model": "gpt-4o-mini",
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "hi",
                    "annotations": [],
                    "x\u{00e9}": 1
                },
                "finish_reason": "length",
                "logprobs": null,
                "content_filter_results": {"hate": {"filtered": false}}
            }],
            "usage": {
                "prompt_tokens": 3,
                "completion_tokens": 1,
                "total_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 0}
            },
            "system_fingerprint": "fp_1",
            "service_tier": "default"
        });
        let answer: ChatResponse = serde_json::from_value(wire.clone()).unwrap();
        assert_eq!(answer.id, "chatcmpl-1");
        assert_eq!(answer.choices[0].finish_reason, Some(FinishReason::Length));
        assert_eq!(answer.choices[0].message.content.as_deref(), Some("hi"));
        assert!(answer.choices[0].message.extra.contains_key("annotations"));
        assert!(
            answer.choices[0]
                .extra
                .contains_key("content_filter_results")
        );
        assert_eq!(answer.usage.map(|u| u.total_tokens), Some(4));
        assert!(answer.usage_details.contains_key("prompt_tokens_details"));
        assert_eq!(answer.extra.get("service_tier"), Some(&json!("default")));
        // Read from bytes (borrowed keys) and from a string with escaped keys (owned keys).
        let bytes = serde_json::to_vec(&wire).unwrap();
        let from_bytes: ChatResponse = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(from_bytes, answer);
        let escaped = String::from_utf8(bytes)
            .unwrap()
            .replace("\"service_tier\"", "\"service\\u005ftier\"");
        let from_escaped: ChatResponse = serde_json::from_str(&escaped).unwrap();
        assert_eq!(from_escaped, answer);
        // What was read is written back unchanged (`logprobs: null` reads as absent).
        let mut expected = wire;
        expected["choices"][0]
            .as_object_mut()
            .unwrap()
            .remove("logprobs");
        assert_eq!(serde_json::to_value(&answer).unwrap(), expected);
    }

    #[test]
    fn an_answer_takes_the_defaults_of_missing_and_null_fields() {
        let answer: ChatResponse = serde_json::from_str(r#"{"choices": null}"#).unwrap();
        assert_eq!(answer.object, "chat.completion");
        assert_eq!((answer.id.as_str(), answer.created), ("", 0));
        assert!(answer.choices.is_empty() && answer.usage.is_none());
        let chunk: ChatChunk = serde_json::from_str(r#"{"usage": null}"#).unwrap();
        assert_eq!(chunk.object, "chat.completion.chunk");
        assert!(chunk.usage.is_none());
        let usage: ChatResponse =
            serde_json::from_str(r#"{"usage": {"total_tokens": 5}}"#).unwrap();
        assert_eq!(
            usage.usage.map(|u| (u.prompt_tokens, u.total_tokens)),
            Some((0, 5))
        );
    }

    #[test]
    fn missing_repeated_and_mistyped_fields_are_errors_that_name_them() {
        let error = |text: &str| {
            serde_json::from_str::<ChatResponse>(text)
                .unwrap_err()
                .to_string()
        };
        assert!(error(r#"{"choices": [{"index": 0}]}"#).contains("missing field `message`"));
        assert!(
            error(r#"{"choices": [{"message": {"content": "x"}}]}"#)
                .contains("missing field `role`")
        );
        assert!(error(r#"{"id": "a", "id": "b"}"#).contains("duplicate field `id`"));
        assert!(error(r#"{"created": "soon"}"#).contains("invalid type"));
        assert!(
            error(r#"{"choices": [{"message": {"role": "poet"}}]}"#).contains("unknown variant")
        );
    }

    #[test]
    fn a_chunk_reads_its_deltas_into_place_and_keeps_the_rest() {
        let chunk: ChatChunk = serde_json::from_str(
            r#"{"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": "he",
                "reasoning_content": "because"}, "finish_reason": null, "x": true}],
                "obfuscation": "abc"}"#,
        )
        .unwrap();
        let choice = &chunk.choices[0];
        assert_eq!(choice.delta.role, Some(Role::Assistant));
        assert_eq!(choice.delta.content.as_deref(), Some("he"));
        assert_eq!(
            choice.delta.extra.get("reasoning_content"),
            Some(&json!("because"))
        );
        assert_eq!(choice.extra.get("x"), Some(&json!(true)));
        assert!(choice.finish_reason.is_none());
        assert_eq!(chunk.extra.get("obfuscation"), Some(&json!("abc")));
        let no_delta: ChatChunk = serde_json::from_str(r#"{"choices": [{"index": 1}]}"#).unwrap();
        assert_eq!(no_delta.choices[0].delta, Delta::default());
    }
}
