//! Hand-written `Deserialize` for the two request types the front door parses on every
//! request. The derived forms buffer: `#[serde(flatten)]` on [`ChatRequest::extra`] makes
//! serde collect the whole object into an intermediate tree before filling the fields, and
//! an `#[serde(untagged)]` [`MessageContent`] buffers each message's content to try its
//! variants in turn. These visitors read each field once, straight into place, with the same
//! results and the same errors for missing or repeated fields.

use super::{ChatRequest, MessageContent};
use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::fmt;

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }

            fn visit_str<E: de::Error>(self, text: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text.to_owned()))
            }

            fn visit_string<E: de::Error>(self, text: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(text))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MessageContent, A::Error> {
                let parts = Deserialize::deserialize(de::value::SeqAccessDeserializer::new(seq))?;
                Ok(MessageContent::Parts(parts))
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

/// A key of a chat request: one of the modelled fields, or another kept in `extra`.
enum Field {
    Model,
    Messages,
    MaxTokens,
    MaxCompletionTokens,
    Temperature,
    TopP,
    Stop,
    Tools,
    ToolChoice,
    Stream,
    StreamOptions,
    User,
    N,
    Other(String),
}

impl<'de> Deserialize<'de> for Field {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldVisitor;

        impl Visitor<'_> for FieldVisitor {
            type Value = Field;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }

            fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
                Ok(match name {
                    "model" => Field::Model,
                    "messages" => Field::Messages,
                    "max_tokens" => Field::MaxTokens,
                    "max_completion_tokens" => Field::MaxCompletionTokens,
                    "temperature" => Field::Temperature,
                    "top_p" => Field::TopP,
                    "stop" => Field::Stop,
                    "tools" => Field::Tools,
                    "tool_choice" => Field::ToolChoice,
                    "stream" => Field::Stream,
                    "stream_options" => Field::StreamOptions,
                    "user" => Field::User,
                    "n" => Field::N,
                    other => Field::Other(other.to_owned()),
                })
            }
        }

        deserializer.deserialize_identifier(FieldVisitor)
    }
}

/// Sets `slot` from the map's next value, refusing a field given twice.
pub(super) fn once<'de, A, T>(
    map: &mut A,
    slot: &mut Option<T>,
    name: &'static str,
) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de>,
{
    if slot.is_some() {
        return Err(de::Error::duplicate_field(name));
    }
    *slot = Some(map.next_value()?);
    Ok(())
}

/// Like [`once`] for an optional field: `null` reads as absent.
pub(super) fn once_opt<'de, A, T>(
    map: &mut A,
    slot: &mut Option<Option<T>>,
    name: &'static str,
) -> Result<(), A::Error>
where
    A: MapAccess<'de>,
    T: Deserialize<'de>,
{
    once(map, slot, name)
}

impl<'de> Deserialize<'de> for ChatRequest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(RequestVisitor)
    }
}

struct RequestVisitor;

impl<'de> Visitor<'de> for RequestVisitor {
    type Value = ChatRequest;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a chat completion request object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ChatRequest, A::Error> {
        let mut model = None;
        let mut messages = None;
        let (mut max_tokens, mut max_completion_tokens) = (None, None);
        let (mut temperature, mut top_p, mut stop) = (None, None, None);
        let (mut tools, mut tool_choice) = (None, None);
        let (mut stream, mut stream_options) = (None, None);
        let (mut user, mut n) = (None, None);
        let mut extra = Map::new();
        while let Some(field) = map.next_key::<Field>()? {
            match field {
                Field::Model => once(&mut map, &mut model, "model")?,
                Field::Messages => once(&mut map, &mut messages, "messages")?,
                Field::MaxTokens => once_opt(&mut map, &mut max_tokens, "max_tokens")?,
                Field::MaxCompletionTokens => once_opt(
                    &mut map,
                    &mut max_completion_tokens,
                    "max_completion_tokens",
                )?,
                Field::Temperature => once_opt(&mut map, &mut temperature, "temperature")?,
                Field::TopP => once_opt(&mut map, &mut top_p, "top_p")?,
                Field::Stop => once_opt(&mut map, &mut stop, "stop")?,
                Field::Tools => once_opt(&mut map, &mut tools, "tools")?,
                Field::ToolChoice => once_opt(&mut map, &mut tool_choice, "tool_choice")?,
                Field::Stream => once_opt(&mut map, &mut stream, "stream")?,
                Field::StreamOptions => {
                    once_opt(&mut map, &mut stream_options, "stream_options")?;
                }
                Field::User => once_opt(&mut map, &mut user, "user")?,
                Field::N => once_opt(&mut map, &mut n, "n")?,
                Field::Other(name) => {
                    let value: Value = map.next_value()?;
                    extra.insert(name, value);
                }
            }
        }
        Ok(ChatRequest {
            model: model.ok_or_else(|| de::Error::missing_field("model"))?,
            messages: messages.ok_or_else(|| de::Error::missing_field("messages"))?,
            max_tokens: max_tokens.flatten(),
            max_completion_tokens: max_completion_tokens.flatten(),
            temperature: temperature.flatten(),
            top_p: top_p.flatten(),
            stop: stop.flatten(),
            tools: tools.flatten(),
            tool_choice: tool_choice.flatten(),
            stream: stream.flatten().unwrap_or(false),
            stream_options: stream_options.flatten(),
            user: user.flatten(),
            n: n.flatten(),
            extra,
            cache_control: None,
            anthropic_beta: Vec::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::*;

    #[test]
    fn fields_land_in_place_and_the_rest_in_extra() {
        let req: ChatRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","content":"hi"},
                {"role":"user","content":[{"type":"text","text":"a"}]}],
                "temperature":null,"stream":null,"max_tokens":5,"seed":7,"logprobs":true}"#,
        )
        .unwrap();
        assert_eq!(req.model, "m");
        assert_eq!(
            req.messages[0].content,
            Some(MessageContent::Text("hi".into()))
        );
        assert!(matches!(
            req.messages[1].content,
            Some(MessageContent::Parts(_))
        ));
        assert_eq!(req.temperature, None);
        assert!(!req.stream);
        assert_eq!(req.max_tokens, Some(5));
        assert_eq!(req.extra["seed"], 7);
        assert_eq!(req.extra["logprobs"], true);
        assert_eq!(req.extra.len(), 2);
        // Round trip: what is serialized reads back the same.
        let again: ChatRequest =
            serde_json::from_slice(&serde_json::to_vec(&req).unwrap()).unwrap();
        assert_eq!(again, req);
    }

    #[test]
    fn missing_repeated_and_mistyped_fields_are_errors_that_name_them() {
        let err = |json: &str| {
            serde_json::from_str::<ChatRequest>(json)
                .unwrap_err()
                .to_string()
        };
        assert!(err(r#"{"messages":[]}"#).contains("missing field `model`"));
        assert!(err(r#"{"model":"m"}"#).contains("missing field `messages`"));
        assert!(
            err(r#"{"model":"m","model":"n","messages":[]}"#).contains("duplicate field `model`")
        );
        assert!(err(r#"{"model":"m","messages":[],"temperature":"hot"}"#).contains("invalid type"));
        assert!(
            err(r#"{"model":"m","messages":[{"role":"user","content":5}]}"#)
                .contains("a string or an array of content parts")
        );
        assert!(err(r#"[1]"#).contains("a chat completion request object"));
    }
}
