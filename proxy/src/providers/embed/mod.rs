//! Embeddings: the internal type is OpenAI's `POST /v1/embeddings` shape (the gateway's front
//! door), and one file per wire format translates to and from it:
//!
//! - [`openai`] for OpenAI and OpenAI-compatible servers: the request passes through, renamed;
//! - [`gemini`] for `models/{model}:batchEmbedContents`, one request per input;
//! - [`ollama`] for `/api/embed`.
//!
//! Anthropic has no embeddings API ([`crate::providers::Adapter::offers_embeddings`]).
//! Whatever the upstream sends, the caller gets the `encoding_format` it asked for: floats are
//! packed into base64 (little-endian `f32`, as OpenAI does) when the upstream cannot, and
//! base64 is unpacked into floats when an upstream sent it unasked.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use super::error::{ProviderError, Result};

pub(crate) mod gemini;
pub(crate) mod ollama;
pub(crate) mod openai;

/// Most inputs one request may carry (OpenAI's documented limit).
pub const MAX_INPUTS: usize = 2048;

/// An embeddings request (`POST /v1/embeddings`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsRequest {
    /// Model (or alias) the caller asked for.
    pub model: String,
    /// What to embed.
    pub input: EmbeddingInput,
    /// How vectors are returned; `None` means floats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding_format: Option<EncodingFormat>,
    /// Length of the vectors, for models that can shorten them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dimensions: Option<u32>,
    /// End-user identifier supplied by the caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Fields Floodgate does not model; passed through untouched to OpenAI-compatible upstreams
    /// and refused, by name, by the others.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// `input`: a string, an array of strings, an array of token ids, or an array of token-id
/// arrays. Token ids only make sense to the model's own tokenizer, so only OpenAI-compatible
/// upstreams take them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    Text(String),
    /// Several texts.
    Texts(Vec<String>),
    /// One text as token ids.
    Tokens(Vec<u32>),
    /// Several texts as token ids.
    TokenArrays(Vec<Vec<u32>>),
}

/// `encoding_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EncodingFormat {
    /// JSON arrays of numbers.
    Float,
    /// Base64 of the vector's little-endian `f32` bytes.
    Base64,
}

/// An embeddings response: `{"object":"list","data":[...],"model","usage"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsResponse {
    /// Always `"list"`.
    pub object: String,
    /// One embedding per input, in input order.
    pub data: Vec<Embedding>,
    /// The model the caller asked for.
    pub model: String,
    /// Tokens read. Zero when an OpenAI-compatible upstream did not say (then estimated).
    #[serde(default)]
    pub usage: EmbeddingsUsage,
    /// Fields Floodgate does not model, passed through from OpenAI-compatible upstreams.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// One vector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embedding {
    /// Always `"embedding"`.
    pub object: String,
    /// Position of its input in the request.
    pub index: u32,
    /// The vector.
    pub embedding: Vector,
}

/// A vector as floats or as base64.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Vector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

/// `usage` of an embeddings response (no completion tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingsUsage {
    /// Tokens read.
    #[serde(default)]
    pub prompt_tokens: u32,
    /// The same number: embeddings generate nothing.
    #[serde(default)]
    pub total_tokens: u32,
}

impl EmbeddingsUsage {
    /// Usage of `tokens` input tokens.
    pub const fn new(tokens: u32) -> Self {
        EmbeddingsUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        }
    }
}

impl<'de> Deserialize<'de> for EmbeddingInput {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Text(String),
            Texts(Vec<String>),
            Tokens(Vec<u32>),
            TokenArrays(Vec<Vec<u32>>),
        }
        // serde's own message for an untagged enum names neither the field nor the shapes.
        let raw = Raw::deserialize(deserializer).map_err(|_| {
            D::Error::custom(
                "`input` must be a string, an array of strings, an array of token ids or an \
                 array of token-id arrays",
            )
        })?;
        Ok(match raw {
            Raw::Text(text) => EmbeddingInput::Text(text),
            Raw::Texts(texts) => EmbeddingInput::Texts(texts),
            Raw::Tokens(tokens) => EmbeddingInput::Tokens(tokens),
            Raw::TokenArrays(arrays) => EmbeddingInput::TokenArrays(arrays),
        })
    }
}

impl<'de> Deserialize<'de> for EncodingFormat {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match String::deserialize(deserializer)?.as_str() {
            "float" => Ok(EncodingFormat::Float),
            "base64" => Ok(EncodingFormat::Base64),
            other => Err(D::Error::custom(format!(
                "`encoding_format` must be `float` or `base64`, not `{other}`"
            ))),
        }
    }
}

impl EmbeddingInput {
    /// How many vectors the input asks for.
    pub fn len(&self) -> usize {
        match self {
            EmbeddingInput::Text(_) | EmbeddingInput::Tokens(_) => 1,
            EmbeddingInput::Texts(texts) => texts.len(),
            EmbeddingInput::TokenArrays(arrays) => arrays.len(),
        }
    }

    /// Whether the input asks for no vector at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The texts, or a 400 naming `input` for `provider`, which cannot take token ids.
    pub fn texts(&self, provider: &str) -> Result<Vec<&str>> {
        match self {
            EmbeddingInput::Text(text) => Ok(vec![text.as_str()]),
            EmbeddingInput::Texts(texts) => Ok(texts.iter().map(String::as_str).collect()),
            EmbeddingInput::Tokens(_) | EmbeddingInput::TokenArrays(_) => {
                Err(ProviderError::unsupported(format!(
                    "`input` as token ids is not supported by {provider} targets: send text"
                )))
            }
        }
    }
}

impl EmbeddingsRequest {
    /// Checks what every provider would refuse, so that no upstream call is spent on it:
    /// a missing model, no input, an empty input, too many inputs, `dimensions: 0`.
    pub fn validate(&self) -> Result<()> {
        let invalid = |message: &str| Err(ProviderError::unsupported(message));
        if self.model.is_empty() {
            return invalid("`model` is required");
        }
        if self.input.is_empty() {
            return invalid("`input` must not be empty");
        }
        if self.input.len() > MAX_INPUTS {
            return Err(ProviderError::unsupported(format!(
                "`input` holds {} items; at most {MAX_INPUTS} are allowed",
                self.input.len()
            )));
        }
        let empty_item = match &self.input {
            EmbeddingInput::Text(text) => text.is_empty(),
            EmbeddingInput::Texts(texts) => texts.iter().any(String::is_empty),
            EmbeddingInput::Tokens(tokens) => tokens.is_empty(),
            EmbeddingInput::TokenArrays(arrays) => arrays.iter().any(Vec::is_empty),
        };
        if empty_item {
            return invalid("`input` must not contain an empty string or token array");
        }
        if self.dimensions == Some(0) {
            return invalid("`dimensions` must be at least 1");
        }
        Ok(())
    }

    /// A cheap estimate of the input's tokens, **for reserving budget** and for upstreams
    /// that report no usage: one per four bytes of text (at least one per input), or the
    /// token ids counted.
    pub fn estimate_tokens(&self) -> u32 {
        let text = |t: &String| t.len().div_ceil(4).max(1);
        let tokens: usize = match &self.input {
            EmbeddingInput::Text(t) => text(t),
            EmbeddingInput::Texts(texts) => texts.iter().map(text).sum(),
            EmbeddingInput::Tokens(ids) => ids.len(),
            EmbeddingInput::TokenArrays(arrays) => arrays.iter().map(Vec::len).sum(),
        };
        u32::try_from(tokens).unwrap_or(u32::MAX)
    }

    /// The format the caller gets (floats unless it asked for base64).
    pub fn format(&self) -> EncodingFormat {
        self.encoding_format.unwrap_or(EncodingFormat::Float)
    }

    /// Refuses fields the gateway does not model, for upstreams that cannot take them.
    pub(crate) fn refuse_extra(&self, provider: &str) -> Result<()> {
        match self.extra.keys().next() {
            Some(field) => Err(ProviderError::unsupported(format!(
                "`{field}` is not supported by {provider} embedding targets"
            ))),
            None => Ok(()),
        }
    }
}

impl EmbeddingsResponse {
    /// A `list` of float vectors in input order.
    pub(crate) fn from_vectors(
        model: &str,
        vectors: Vec<Vec<f32>>,
        usage: EmbeddingsUsage,
    ) -> Self {
        let data = vectors
            .into_iter()
            .zip(0..)
            .map(|(vector, index)| Embedding {
                object: "embedding".to_owned(),
                index,
                embedding: Vector::Float(vector),
            })
            .collect();
        EmbeddingsResponse {
            object: "list".to_owned(),
            data,
            model: model.to_owned(),
            usage,
            extra: Map::new(),
        }
    }

    /// Checks that one vector came back per input, then converts every vector to `format`.
    pub(crate) fn finish(mut self, req: &EmbeddingsRequest) -> Result<Self> {
        if self.data.len() != req.input.len() {
            return Err(ProviderError::Malformed(format!(
                "{} embeddings for {} inputs",
                self.data.len(),
                req.input.len()
            )));
        }
        if self.usage.total_tokens == 0 {
            self.usage = EmbeddingsUsage::new(req.estimate_tokens());
        }
        let format = req.format();
        for item in &mut self.data {
            item.embedding.convert(format)?;
        }
        Ok(self)
    }
}

impl Vector {
    /// Re-encodes the vector in `format`; base64 that is not whole `f32`s is `Malformed`.
    pub fn convert(&mut self, format: EncodingFormat) -> Result<()> {
        match (format, &*self) {
            (EncodingFormat::Base64, Vector::Float(values)) => {
                *self = Vector::Base64(encode_base64(values));
            }
            (EncodingFormat::Float, Vector::Base64(text)) => {
                *self = Vector::Float(decode_base64(text)?);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Base64 of the values' little-endian `f32` bytes, as OpenAI encodes vectors.
pub fn encode_base64(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    BASE64.encode(bytes)
}

/// The inverse of [`encode_base64`].
pub fn decode_base64(text: &str) -> Result<Vec<f32>> {
    let bytes = BASE64
        .decode(text)
        .map_err(|e| ProviderError::Malformed(format!("embedding is not base64: {e}")))?;
    if bytes.len() % 4 != 0 {
        return Err(ProviderError::Malformed(
            "base64 embedding is not a whole number of f32 values".into(),
        ));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect())
}

#[cfg(test)]
mod tests;
