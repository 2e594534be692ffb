//! Deterministic embeddings for every provider's embeddings endpoint: the vector of a text is a
//! hash of the text expanded to the asked number of dimensions and L2-normalised, so the same
//! text always gets the same vector and a test can compute what it should receive
//! ([`embedding_for`]). Each provider's handler (`openai.rs`, `gemini.rs`, `ollama.rs`) parses
//! its own wire shape and uses these helpers.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::Provider;
use super::common::token_count;

/// Vector length of `text-embedding-3-small`, the mock's OpenAI default.
pub const OPENAI_DIMENSIONS: usize = 1536;
/// Vector length of `gemini-embedding-001`, the mock's Gemini default.
pub const GEMINI_DIMENSIONS: usize = 3072;
/// Vector length of `nomic-embed-text`, the mock's Ollama default.
pub const OLLAMA_DIMENSIONS: usize = 768;

/// Context length of the mock's Ollama embedding models, in tokens: a longer input is refused
/// when the caller sends `"truncate": false` (and cut otherwise, as Ollama does).
pub const OLLAMA_CONTEXT_TOKENS: u32 = 2048;

/// The vector length a provider returns when the request does not set one.
pub const fn default_dimensions(provider: Provider) -> usize {
    match provider {
        Provider::OpenAi | Provider::Anthropic => OPENAI_DIMENSIONS,
        Provider::Gemini => GEMINI_DIMENSIONS,
        Provider::Ollama => OLLAMA_DIMENSIONS,
    }
}

/// The mock's embedding of `text`: `dimensions` values from a generator seeded with a hash of
/// the text, scaled to unit length. Shortening a vector (`dimensions`) gives a prefix of the
/// longer one, renormalised, as models trained for shortening do.
pub fn embedding_for(text: &str, dimensions: usize) -> Vec<f32> {
    // FNV-1a 64 seeds SplitMix64: stable across runs and Rust versions.
    let mut state = text.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut values: Vec<f32> = (0..dimensions)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            // The top 24 bits, exactly representable in an f32, mapped to [-1, 1).
            let unit = (z >> 40) as f32 / (1u32 << 24) as f32;
            unit * 2.0 - 1.0
        })
        .collect();
    let norm = values.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        values.iter_mut().for_each(|v| *v /= norm);
    }
    values
}

/// The text a token-id input is embedded as (the mock has no tokenizer).
pub(super) fn tokens_key(tokens: &[u32]) -> String {
    let ids: Vec<String> = tokens.iter().map(u32::to_string).collect();
    format!("tokens:{}", ids.join(","))
}

/// Tokens the mock charges for one text input: as for chat, at least one.
pub(super) fn text_tokens(text: &str) -> u32 {
    token_count(text).max(1)
}

/// Base64 of the values' little-endian `f32` bytes, as OpenAI sends `encoding_format: base64`.
pub(super) fn base64_of(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_are_deterministic_unit_length_and_distinct() {
        let a = embedding_for("hello", 64);
        assert_eq!(a, embedding_for("hello", 64));
        assert_ne!(a, embedding_for("hello!", 64));
        let norm: f32 = a.iter().map(|v| v * v).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-5, "{norm}");
    }

    #[test]
    fn shorter_vectors_are_renormalised_prefixes() {
        let long = embedding_for("hello", 64);
        let short = embedding_for("hello", 8);
        let scale = long[0] / short[0];
        for (l, s) in long.iter().zip(&short) {
            assert!((l - s * scale).abs() < 1e-5);
        }
    }

    #[test]
    fn base64_is_little_endian_f32() {
        assert_eq!(base64_of(&[1.0]), "AACAPw==");
    }
}
