//! Fuzz target bodies: one function per parser that reads bytes from outside the gateway,
//! each taking arbitrary bytes and panicking only when a property fails.
//!
//! The cargo-fuzz targets in `fuzz/` (nightly, libFuzzer, `make fuzz`) call these functions;
//! so does a stable smoke test (`tests.rs`, in `make test`) that replays the seeds, the
//! regression inputs kept in `fuzz/regressions/<target>/` and a few thousand deterministic
//! mutations of them. Built only for tests and with the `fuzzing` feature: the gateway
//! binary carries none of it.
//!
//! | Target | Parses | Checks besides "no panic" |
//! |--------|--------|---------------------------|
//! | `chat_request` | an OpenAI `/v1/chat/completions` body, then every adapter's translation | the hand-written `Deserialize` (`types/de.rs`) agrees with a derived one; a request round-trips through JSON; every built body is JSON |
//! | `messages_request` | an Anthropic `/v1/messages` body and its translation | the translated request round-trips; built bodies are JSON |
//! | `embeddings_request` | an OpenAI `/v1/embeddings` body, validation and every adapter's translation | a request round-trips; built bodies are JSON |
//! | `provider_response` | a 2xx chat or embeddings body, and an error body, in each provider's format | the hand-written answer and chunk `Deserialize` (`types/answer_de.rs`) agree with derived ones; base64 and float vectors convert into each other exactly |
//! | `provider_stream` | a streamed body (SSE, or NDJSON for Ollama) in each provider's format | the same chunks, usage and end whether fed whole, in pieces or byte by byte |
//! | `stream_framing` | SSE events and NDJSON lines | the same events and lines at any split |
//! | `ratelimit_headers` | `retry-after`, OpenAI's and Anthropic's rate-limit headers | an HTTP date and the same instant in RFC 3339 agree |
//! | `config_load` | a manifest file (multi-document YAML), validation and resolution | no secret value appears in an error or warning |
//! | `batch_upload` | a `/v1/files` multipart body and the JSONL lines of its file (`server::batches`) | every part lies inside the body; a body built around the input reads back as the parts sent; an accepted line's body reads back as the same request |
//! | `job_request` | a `/v1/jobs` body, its notification addresses and the job as the store keeps it | a webhook URL is judged the same once normalised, and the strict check never accepts what the lenient one refuses; the stored job round-trips |
//!
//! `messages_request` covers `/v1/messages/count_tokens` too (the same body, read for that
//! purpose, and the estimate the door answers with).

mod answers;
mod config;
mod jobs;
mod requests;
mod upstream;

pub use config::config_load;
pub use jobs::{batch_upload, job_request};
pub use requests::{chat_request, embeddings_request, messages_request};
pub use upstream::{provider_response, provider_stream, ratelimit_headers, stream_framing};

/// A fuzz target: its name and its body. Its seeds are the files under `fuzz/seeds/<name>/`:
/// hand-written, or a link to the providers' documented examples
/// (`proxy/src/providers/testdata`) or to the example manifests (`examples/`).
#[derive(Debug, Clone, Copy)]
pub struct Target {
    /// The name of the cargo-fuzz target and of its corpus and regression folders.
    pub name: &'static str,
    /// The body: panics only when a property fails.
    pub run: fn(&[u8]),
}

/// Every target, in the order `make fuzz` runs them.
pub const TARGETS: [Target; 10] = [
    Target {
        name: "chat_request",
        run: chat_request,
    },
    Target {
        name: "messages_request",
        run: messages_request,
    },
    Target {
        name: "embeddings_request",
        run: embeddings_request,
    },
    Target {
        name: "provider_response",
        run: provider_response,
    },
    Target {
        name: "provider_stream",
        run: provider_stream,
    },
    Target {
        name: "stream_framing",
        run: stream_framing,
    },
    Target {
        name: "ratelimit_headers",
        run: ratelimit_headers,
    },
    Target {
        name: "config_load",
        run: config_load,
    },
    Target {
        name: "batch_upload",
        run: batch_upload,
    },
    Target {
        name: "job_request",
        run: job_request,
    },
];

/// A small deterministic generator (xorshift64*), seeded from the input, so that a target
/// that needs choices beyond the input's bytes (split points, a status code) makes the same
/// ones every time it sees the same input: a crash reproduces from the input alone.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (any value; zero is remapped).
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    /// A generator seeded with a hash (FNV-1a) of `data`.
    pub fn from_data(data: &[u8]) -> Self {
        let hash = data.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        Rng::new(hash)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number in `0..n` (`0` when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            return 0;
        }
        // Modulo bias is irrelevant here: only coverage, not fairness, matters.
        (self.next_u64() % n as u64) as usize
    }
}

/// `data` cut into pieces of random sizes (1 to 64 bytes, some much longer), in order.
pub(crate) fn random_pieces<'a>(data: &'a [u8], rng: &mut Rng) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let size = if rng.below(8) == 0 {
            1 + rng.below(rest.len())
        } else {
            1 + rng.below(64)
        };
        let (piece, tail) = rest.split_at(size.min(rest.len()));
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

#[cfg(test)]
mod tests;
