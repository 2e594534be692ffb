//! Ollama: `POST /api/chat` (streams NDJSON unless `"stream": false`, as Ollama does),
//! `POST /api/embed` and `GET /api/tags`. No keys and no rate limits; errors are
//! `{"error": "..."}`.

use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::common::{
    self, Answer, Call, Dialect, Event, Framing, Prompt, bytes_response, json_response, to_json,
};
use super::embed::{self, OLLAMA_CONTEXT_TOKENS, OLLAMA_DIMENSIONS};
use super::limits::Outcome;
use super::{Provider, Shared};

/// `GET /api/tags`, serialized once.
static TAGS: LazyLock<Bytes> = LazyLock::new(|| {
    let model = |name: &str, family: &str, size: u64, parameters: &str| {
        serde_json::json!({
            "name": name,
            "model": name,
            "modified_at": "2025-01-01T00:00:00.000000Z",
            "size": size,
            "digest": format!("{:064x}", size),
            "details": {
                "parent_model": "",
                "format": "gguf",
                "family": family,
                "families": [family],
                "parameter_size": parameters,
                "quantization_level": "Q4_K_M"
            }
        })
    };
    let models = [
        model("llama3.1:8b", "llama", 4_920_753_328, "8.0B"),
        model("mistral:7b", "llama", 4_113_301_824, "7.2B"),
        model("codellama:7b", "llama", 3_825_910_662, "7B"),
        model("nomic-embed-text:latest", "nomic-bert", 274_302_450, "137M"),
    ];
    Bytes::from(to_json(&serde_json::json!({ "models": models })))
});

#[derive(Debug, Deserialize)]
struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Vec<Message>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    options: Option<Options>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: String,
}

#[derive(Debug, Deserialize)]
struct Options {
    #[serde(default)]
    num_predict: Option<i64>,
    #[serde(default)]
    stop: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ChatChunk<'a> {
    model: &'a str,
    created_at: &'a str,
    message: ChunkMessage<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    done_reason: Option<&'static str>,
    done: bool,
    #[serde(flatten)]
    stats: Option<Stats>,
}

#[derive(Debug, Serialize)]
struct ChunkMessage<'a> {
    role: &'static str,
    content: &'a str,
}

/// Timings Ollama reports on its final object, in nanoseconds (fake but consistent).
#[derive(Debug, Clone, Copy, Serialize)]
struct Stats {
    total_duration: u64,
    load_duration: u64,
    prompt_eval_count: u32,
    prompt_eval_duration: u64,
    eval_count: u32,
    eval_duration: u64,
}

impl Stats {
    fn new(prompt_tokens: u32, output_tokens: u32) -> Self {
        let prompt_eval_duration = u64::from(prompt_tokens) * 200_000;
        let eval_duration = u64::from(output_tokens) * 10_000_000;
        let load_duration = 1_000_000;
        Self {
            total_duration: load_duration + prompt_eval_duration + eval_duration,
            load_duration,
            prompt_eval_count: prompt_tokens,
            prompt_eval_duration,
            eval_count: output_tokens,
            eval_duration,
        }
    }
}

#[derive(Debug, Deserialize)]
struct EmbedRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<serde_json::Value>,
    #[serde(default)]
    truncate: Option<bool>,
    #[serde(default)]
    dimensions: Option<i64>,
}

#[derive(Debug, Serialize)]
struct EmbedResponse<'a> {
    model: &'a str,
    embeddings: Vec<Vec<f32>>,
    total_duration: u64,
    load_duration: u64,
    prompt_eval_count: u32,
}

/// Ollama's error wording: `{"error": "..."}`.
struct Ollama;

impl Dialect for Ollama {
    const PROVIDER: Provider = Provider::Ollama;

    fn status_error(code: u16) -> Response {
        let message = match code {
            404 => "model not found, try pulling it first",
            503 => "server busy, please try again.  maximum pending requests exceeded",
            _ if code < 500 => "request refused (injected by the mock)",
            _ => "llama runner process has terminated: exit status 2",
        };
        error(
            StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message,
        )
    }

    fn overloaded() -> Response {
        Self::status_error(503)
    }

    fn rate_limited(_limit: Option<u32>, _retry_after: Duration, _model: &str) -> Response {
        error(StatusCode::TOO_MANY_REQUESTS, "too many requests")
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    json_response(status, &serde_json::json!({ "error": message }))
}

/// `GET /api/tags`.
pub(super) async fn tags() -> Response {
    bytes_response(
        StatusCode::OK,
        "application/json; charset=utf-8",
        TAGS.clone(),
    )
}

/// `POST /api/chat`.
pub(super) async fn chat(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let state = shared.keys.entry(Ollama::PROVIDER, "");
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            let response = error(
                StatusCode::BAD_REQUEST,
                &format!("invalid character: {err}"),
            );
            return shared.refused(Ollama::PROVIDER, &state, "", Outcome::ClientError, response);
        }
    };
    let Some(model) = request.model.as_deref().filter(|m| !m.is_empty()) else {
        let response = error(StatusCode::BAD_REQUEST, "model is required");
        return shared.refused(Ollama::PROVIDER, &state, "", Outcome::ClientError, response);
    };
    let call = shared.admit(Ollama::PROVIDER, &state, model);
    let response = respond(&call, &request, model).await;
    shared.finish(Ollama::PROVIDER, &state, "", model, response.status());
    response
}

async fn respond(call: &Call<'_>, request: &ChatRequest, model: &str) -> Response {
    // Ollama streams unless told not to.
    let stream = request.stream.unwrap_or(true);
    if let Some(response) = common::preflight::<Ollama>(call, model, stream).await {
        return response;
    }
    let mut prompt = Prompt::default();
    for message in &request.messages {
        prompt.add(&message.content, message.role == "user");
    }
    // A negative num_predict means "no limit".
    let max = request
        .options
        .as_ref()
        .and_then(|o| o.num_predict)
        .and_then(|n| u32::try_from(n).ok());
    // A stop sequence ends the answer with `done_reason: "stop"`, which does not say so.
    let stop = request.options.as_ref().map_or(&[][..], |o| &o.stop);
    let answer = Answer::new(&prompt.last_user, max, stop);
    let done_reason = if answer.truncated { "length" } else { "stop" };
    let stats = Stats::new(prompt.tokens(), answer.tokens);
    let created_at = common::rfc3339(SystemTime::now(), true);
    let chunk = |content, done_reason, stats: Option<Stats>| ChatChunk {
        model,
        created_at: &created_at,
        message: ChunkMessage {
            role: "assistant",
            content,
        },
        done_reason,
        done: stats.is_some(),
        stats,
    };
    if !stream {
        let body = chunk(answer.text.as_str(), Some(done_reason), Some(stats));
        return common::body_response(call, to_json(&body));
    }
    let mut events: Vec<Event> = answer
        .pieces()
        .map(|piece| Event::data(to_json(&chunk(piece, None, None))))
        .collect();
    events.push(Event::data(to_json(&chunk(
        "",
        Some(done_reason),
        Some(stats),
    ))));
    common::stream_response(call, Framing::Ndjson, events, 0)
}

/// `POST /api/embed`.
pub(super) async fn embed(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let state = shared.keys.entry(Ollama::PROVIDER, "");
    let refuse = |message: &str| {
        let response = error(StatusCode::BAD_REQUEST, message);
        shared.refused(Ollama::PROVIDER, &state, "", Outcome::ClientError, response)
    };
    let request: EmbedRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => return refuse(&format!("invalid character: {err}")),
    };
    let Some(model) = request.model.as_deref().filter(|m| !m.is_empty()) else {
        return refuse("model is required");
    };
    let texts = match embed_inputs(&request) {
        Ok(texts) => texts,
        Err(message) => return refuse(message),
    };
    // `0` is Ollama's "not set" (the field is `omitempty`).
    let dimensions = match request.dimensions {
        None | Some(0) => OLLAMA_DIMENSIONS,
        Some(d) => match usize::try_from(d) {
            Ok(d) if d <= OLLAMA_DIMENSIONS => d,
            _ => return refuse("invalid dimensions"),
        },
    };
    let call = shared.admit(Ollama::PROVIDER, &state, model);
    let response = embed_respond(&call, model, &texts, dimensions).await;
    shared.finish(Ollama::PROVIDER, &state, "", model, response.status());
    response
}

/// The texts of `input` (a string or a list of strings), each cut to the context unless
/// `truncate` is false, in which case a longer one is refused as Ollama refuses it.
fn embed_inputs(request: &EmbedRequest) -> Result<Vec<String>, &'static str> {
    use serde_json::Value;
    let texts: Vec<&str> = match &request.input {
        // Ollama answers an empty input with no embeddings.
        None => Vec::new(),
        Some(Value::String(text)) if text.is_empty() => Vec::new(),
        Some(Value::String(text)) => vec![text.as_str()],
        Some(Value::Array(items)) => items
            .iter()
            .map(Value::as_str)
            .collect::<Option<_>>()
            .ok_or("invalid input type")?,
        Some(_) => return Err("invalid input type"),
    };
    let context_chars = usize::try_from(OLLAMA_CONTEXT_TOKENS).unwrap_or(usize::MAX) * 4;
    texts
        .into_iter()
        .map(|text| {
            if embed::text_tokens(text) <= OLLAMA_CONTEXT_TOKENS {
                Ok(text.to_owned())
            } else if request.truncate == Some(false) {
                Err("input exceeds maximum context length")
            } else {
                Ok(text.chars().take(context_chars).collect())
            }
        })
        .collect()
}

async fn embed_respond(
    call: &Call<'_>,
    model: &str,
    texts: &[String],
    dimensions: usize,
) -> Response {
    if let Some(response) = common::preflight::<Ollama>(call, model, false).await {
        return response;
    }
    let tokens: u32 = texts.iter().map(|t| embed::text_tokens(t)).sum();
    let stats = Stats::new(tokens, 0);
    let body = EmbedResponse {
        model,
        embeddings: texts
            .iter()
            .map(|text| embed::embedding_for(text, dimensions))
            .collect(),
        total_duration: stats.total_duration,
        load_duration: stats.load_duration,
        prompt_eval_count: tokens,
    };
    common::body_response(call, to_json(&body))
}
