//! What comes back from providers: answers, error bodies, streams and rate-limit headers.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, HeaderName, HeaderValue};

use super::{Rng, random_pieces};
use crate::providers::embed::{
    EmbeddingInput, EncodingFormat, Vector, decode_base64, encode_base64,
};
use crate::providers::ratelimit::{
    anthropic_headers, openai_headers, parse_go_duration, parse_http_date, parse_rfc3339,
    retry_after_only,
};
use crate::providers::sse::{NdjsonSplitter, SseEvent, SseParser};
use crate::providers::types::ChatChunk;
use crate::providers::{Adapter, EmbeddingsRequest, ProviderError, RateLimitInfo, Usage};

const MODEL: &str = "fuzz-model";

/// A fixed clock (2023-11-14), so that what a target computes depends on its input only.
fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Statuses the adapters classify differently.
const STATUSES: [u16; 14] = [
    400, 401, 402, 403, 404, 408, 413, 422, 429, 500, 502, 503, 504, 529,
];

/// A non-streamed body in every provider's format: a chat answer, an embeddings answer (for
/// a request of one to four inputs in either encoding) and an error body with a status and
/// `retry-after` picked from the input. Error messages must carry no provider key; vectors
/// must convert between floats and base64 without changing a bit.
pub fn provider_response(data: &[u8]) {
    super::answers::hand_written_readers_agree(data);
    let mut rng = Rng::from_data(data);
    for adapter in Adapter::ALL {
        let _ = adapter.parse_response(data, MODEL);

        let status = STATUSES[rng.below(STATUSES.len())];
        let mut headers = HeaderMap::new();
        if rng.below(2) == 0 {
            headers.insert("retry-after", HeaderValue::from(rng.below(120)));
        }
        let error = adapter.classify_at(status, &headers, data, now());
        assert_no_key(&error.to_string());

        let req = embeddings_request(&mut rng);
        if let Ok(response) = adapter.parse_embeddings_response(data, MODEL, &req) {
            assert!(response.data.len() == req.input.len(), "vector count");
            for item in response.data {
                assert_converts(item.embedding);
            }
        }
    }
}

fn embeddings_request(rng: &mut Rng) -> EmbeddingsRequest {
    let inputs = 1 + rng.below(4);
    EmbeddingsRequest {
        model: MODEL.to_owned(),
        input: if inputs == 1 {
            EmbeddingInput::Text("a".to_owned())
        } else {
            EmbeddingInput::Texts(vec!["a".to_owned(); inputs])
        },
        encoding_format: [
            None,
            Some(EncodingFormat::Float),
            Some(EncodingFormat::Base64),
        ][rng.below(3)],
        dimensions: None,
        user: None,
        extra: serde_json::Map::new(),
    }
}

/// Floats -> base64 -> floats gives the same bits; base64 -> floats -> base64 the same text
/// (when it is canonical, as the encoder writes it).
fn assert_converts(vector: Vector) {
    match vector {
        Vector::Float(values) => {
            let back = decode_base64(&encode_base64(&values)).unwrap_or_default();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&back), bits(&values), "float vector changed in base64");
        }
        Vector::Base64(text) => {
            if let Ok(values) = decode_base64(&text) {
                let again = encode_base64(&values);
                assert_eq!(decode_base64(&again).ok(), Some(values));
            }
        }
    }
}

/// No word of `message` looks like a provider key (`sk-...`, `AIza...`): error messages
/// reach logs and callers.
fn assert_no_key(message: &str) {
    for word in message.split_whitespace() {
        let word = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        let keyish = ["sk-", "sk_", "AIza", "ya29."]
            .iter()
            .any(|p| word.starts_with(p))
            && word.len() > 8;
        assert!(
            !keyish,
            "a key-like word reached an error message: {message:?}"
        );
    }
}

/// A streamed body through every provider's decoder, fed whole, in random pieces and byte by
/// byte: the chunks, the usage and how the stream ended must not depend on where the body
/// was split. When a piece fails, the chunks of that piece are lost with it, so then only the
/// error must agree and one run's chunks be a prefix of the other's.
pub fn provider_stream(data: &[u8]) {
    let mut rng = Rng::from_data(data);
    let pieces = random_pieces(data, &mut rng);
    let bytes: Vec<&[u8]> = data.chunks(1).collect();
    for adapter in Adapter::ALL {
        let include_usage = rng.below(2) == 0;
        let whole = Decoded::run(adapter, include_usage, &[data]);
        for split in [&pieces, &bytes] {
            let split = Decoded::run(adapter, include_usage, split);
            whole.assert_same(&split, adapter);
        }
    }
}

/// What a decoder made of a stream, with the parts that differ between runs by design
/// (fresh ids, the clock) normalised.
#[derive(Debug)]
struct Decoded {
    chunks: Vec<ChatChunk>,
    end: Result<(), ProviderError>,
    usage: Option<Usage>,
    complete: bool,
}

impl Decoded {
    fn run(adapter: Adapter, include_usage: bool, pieces: &[&[u8]]) -> Decoded {
        let mut decoder = adapter.stream_decoder(MODEL, include_usage);
        let mut chunks = Vec::new();
        let mut end = Ok(());
        for piece in pieces {
            match decoder.feed(piece) {
                Ok(more) => chunks.extend(more),
                Err(e) => {
                    end = Err(e);
                    break;
                }
            }
        }
        if end.is_ok() {
            match decoder.finish() {
                Ok(more) => chunks.extend(more),
                Err(e) => end = Err(e),
            }
        }
        normalise(&mut chunks);
        Decoded {
            chunks,
            end,
            usage: decoder.usage(),
            complete: decoder.is_complete(),
        }
    }

    fn assert_same(&self, other: &Decoded, adapter: Adapter) {
        let name = adapter.as_str();
        assert_eq!(self.end, other.end, "{name}: the stream ended differently");
        if self.end.is_ok() {
            assert_eq!(self.chunks, other.chunks, "{name}: different chunks");
            assert_eq!(self.usage, other.usage, "{name}: different usage");
            assert_eq!(self.complete, other.complete, "{name}: different end");
        } else {
            let n = self.chunks.len().min(other.chunks.len());
            assert_eq!(
                self.chunks[..n],
                other.chunks[..n],
                "{name}: different chunks"
            );
        }
    }
}

/// Blanks the completion id and `created`, and renames tool-call ids by order of first
/// appearance: adapters mint fresh ones when the provider sends none.
fn normalise(chunks: &mut [ChatChunk]) {
    let mut ids: HashMap<String, String> = HashMap::new();
    for chunk in chunks {
        chunk.id.clear();
        chunk.created = 0;
        let calls = chunk
            .choices
            .iter_mut()
            .flat_map(|c| c.delta.tool_calls.iter_mut().flatten());
        for call in calls {
            if let Some(id) = call.id.as_mut() {
                let next = format!("call-{}", ids.len());
                *id = ids.entry(std::mem::take(id)).or_insert(next).clone();
            }
        }
    }
}

/// The framing under the decoders: SSE events and NDJSON lines are the same however the
/// bytes are split, an event's data holds no carriage return, and no line holds a line feed
/// or is blank.
pub fn stream_framing(data: &[u8]) {
    let mut rng = Rng::from_data(data);
    let pieces = random_pieces(data, &mut rng);
    let bytes: Vec<&[u8]> = data.chunks(1).collect();

    let whole = sse_events(&[data]);
    for event in &whole {
        assert!(!event.data.contains('\r'), "a carriage return in data");
    }
    assert_eq!(whole, sse_events(&pieces), "SSE events depend on splits");
    assert_eq!(whole, sse_events(&bytes), "SSE events depend on splits");

    let whole = ndjson_lines(&[data]);
    for line in &whole {
        assert!(!line.contains(&b'\n'), "a line feed in a line");
        assert!(!line.iter().all(u8::is_ascii_whitespace), "a blank line");
    }
    assert_eq!(
        whole,
        ndjson_lines(&pieces),
        "NDJSON lines depend on splits"
    );
    assert_eq!(whole, ndjson_lines(&bytes), "NDJSON lines depend on splits");
}

fn sse_events(pieces: &[&[u8]]) -> Vec<SseEvent> {
    let mut parser = SseParser::new();
    let mut events = Vec::new();
    for piece in pieces {
        // Only an event over 16 MiB fails, far beyond any fuzz input.
        events.extend(parser.feed(piece).unwrap_or_default());
    }
    events.extend(parser.finish());
    events
}

fn ndjson_lines(pieces: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut splitter = NdjsonSplitter::new();
    let mut lines = Vec::new();
    for piece in pieces {
        lines.extend(splitter.feed(piece).unwrap_or_default());
    }
    lines.extend(splitter.finish());
    lines
}

/// Response headers, one `name: value` per line, through every adapter's rate-limit reader,
/// and each line's value through the time parsers. Every reader takes `retry-after` the
/// same way; the wait hint is one of the values read; an HTTP date and the same instant
/// written in RFC 3339 parse to the same time.
pub fn ratelimit_headers(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut headers = HeaderMap::new();
    for line in text.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.trim().as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
        let value = value.trim();
        let _ = parse_go_duration(value);
        let _ = parse_rfc3339(value);
        if let Some(instant) = parse_http_date(value) {
            assert_same_in_rfc3339(value, instant);
        }
    }
    let infos = [
        openai_headers(&headers, now()),
        anthropic_headers(&headers, now()),
    ];
    let retry_after = retry_after_only(&headers, now()).retry_after;
    for info in infos {
        assert_eq!(
            info.retry_after, retry_after,
            "retry-after read differently"
        );
        assert_hint_is_read(&info);
    }
    for adapter in Adapter::ALL {
        let _ = adapter.rate_limit_info(&headers, now());
    }
}

fn assert_hint_is_read(info: &RateLimitInfo) {
    let hint = info.wait_hint();
    assert!(
        hint.is_none()
            || [info.retry_after, info.requests_reset, info.tokens_reset].contains(&hint),
        "a wait hint that was not read: {info:?}"
    );
}

/// `value` parsed as an IMF-fixdate to `instant`; the same fields written as RFC 3339
/// must give the same instant.
fn assert_same_in_rfc3339(value: &str, instant: SystemTime) {
    let words: Vec<&str> = value.split_ascii_whitespace().collect();
    let (Some(day), Some(month), Some(year), Some(clock)) =
        (words.get(1), words.get(2), words.get(3), words.get(4))
    else {
        return;
    };
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (Ok(day), Some(month), Ok(year)) = (
        day.parse::<u32>(),
        months.iter().position(|m| m == month),
        year.parse::<u64>(),
    ) else {
        return;
    };
    let hms: Vec<u32> = clock.split(':').filter_map(|p| p.parse().ok()).collect();
    let [h, m, s] = hms[..] else { return };
    let rfc = format!("{year:04}-{:02}-{day:02}T{h:02}:{m:02}:{s:02}Z", month + 1);
    assert_eq!(
        parse_rfc3339(&rfc),
        Some(instant),
        "{value:?} and {rfc:?} parse differently"
    );
}
