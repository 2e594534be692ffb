//! Gemini: `POST /v1beta/models/{model}:generateContent` and `:streamGenerateContent`
//! (`?alt=sse` for SSE framed with `\r\n\r\n` like Google's servers; a streamed JSON array
//! otherwise), and `:embedContent` / `:batchEmbedContents` (at most 100 requests, each naming
//! the model of the URL; no token usage in the answer, as Gemini sends none). Keys come from `x-goog-api-key` or `?key=`; errors use Google's
//! `{"error":{"code","message","status","details"}}` shape.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::common::{
    self, Answer, Call, Dialect, Event, Framing, KeyCheck, Part, Prompt, json_response, to_json,
};
use super::embed::{self, GEMINI_DIMENSIONS};
use super::limits::{KeyState, Outcome};
use super::{Provider, Shared};

/// Most requests one `batchEmbedContents` call may hold.
const MAX_EMBED_BATCH: usize = 100;

const API_KEY_INVALID: &str = "API key not valid. Please pass a valid API key.";
const UNREGISTERED: &str = "Method doesn't allow unregistered callers (callers without \
    established identity). Please use API Key or other form of API consumer identity to call \
    this API.";

/// `?key=` and `?alt=`.
#[derive(Debug, Deserialize)]
pub(super) struct GeminiQuery {
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    alt: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerateRequest {
    #[serde(default)]
    contents: Vec<Contents>,
    #[serde(default)]
    system_instruction: Option<Contents>,
    #[serde(default)]
    generation_config: Option<GenerationConfig>,
}

#[derive(Debug, Deserialize)]
struct Contents {
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig {
    #[serde(default)]
    max_output_tokens: Option<u32>,
    #[serde(default)]
    stop_sequences: Vec<String>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerateResponse<'a> {
    candidates: [Candidate<'a>; 1],
    usage_metadata: UsageMetadata,
    model_version: &'a str,
    response_id: &'a str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    content: CandidateContent<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    finish_reason: Option<&'static str>,
    index: u32,
}

#[derive(Debug, Serialize)]
struct CandidateContent<'a> {
    parts: [TextPart<'a>; 1],
    role: &'static str,
}

#[derive(Debug, Serialize)]
struct TextPart<'a> {
    text: &'a str,
}

#[derive(Debug, Clone, Copy, Serialize)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    prompt_token_count: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    candidates_token_count: Option<u32>,
    total_token_count: u32,
}

/// `EmbedContentRequest`: the body of `:embedContent`, and each of a batch's `requests`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct EmbedContentRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    content: Option<Contents>,
    #[serde(default)]
    output_dimensionality: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct BatchEmbedContentsRequest {
    #[serde(default)]
    requests: Vec<EmbedContentRequest>,
}

#[derive(Debug, Serialize)]
struct ContentEmbedding {
    values: Vec<f32>,
}

#[derive(Debug, Serialize)]
struct EmbedContentResponse {
    embedding: ContentEmbedding,
}

#[derive(Debug, Serialize)]
struct BatchEmbedContentsResponse {
    embeddings: Vec<ContentEmbedding>,
}

/// Gemini's error wording.
struct Gemini;

impl Dialect for Gemini {
    const PROVIDER: Provider = Provider::Gemini;

    fn status_error(code: u16) -> Response {
        let (status, message) = match code {
            400 => ("INVALID_ARGUMENT", "Request contains an invalid argument."),
            403 => ("PERMISSION_DENIED", "The caller does not have permission"),
            404 => ("NOT_FOUND", "Requested entity was not found."),
            500 => (
                "INTERNAL",
                "An internal error has occurred. Please retry or report in \
                 https://developers.generativeai.google/guide/troubleshooting",
            ),
            503 => (
                "UNAVAILABLE",
                "The model is overloaded. Please try again later.",
            ),
            504 => (
                "DEADLINE_EXCEEDED",
                "Deadline expired before operation could complete.",
            ),
            _ if code < 500 => (
                "FAILED_PRECONDITION",
                "Request refused (injected by the mock).",
            ),
            _ => ("INTERNAL", "An internal error has occurred."),
        };
        error(code, message, status, None)
    }

    fn overloaded() -> Response {
        Self::status_error(503)
    }

    fn rate_limited(_limit: Option<u32>, retry_after: Duration, model: &str) -> Response {
        let details = json!([
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel",
                    "quotaDimensions": {"location": "global", "model": model}
                }]
            },
            {
                "@type": "type.googleapis.com/google.rpc.RetryInfo",
                "retryDelay": format!("{}s", common::retry_after_secs(retry_after))
            }
        ]);
        error(
            429,
            "You exceeded your current quota, please check your plan and billing details. For \
             more information on this error, head to: \
             https://ai.google.dev/gemini-api/docs/rate-limits.",
            "RESOURCE_EXHAUSTED",
            Some(details),
        )
    }
}

fn error(code: u16, message: &str, status: &str, details: Option<serde_json::Value>) -> Response {
    let mut error = json!({"code": code, "message": message, "status": status});
    if let (Some(details), Some(object)) = (details, error.as_object_mut()) {
        object.insert("details".to_owned(), details);
    }
    let http = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(http, &json!({ "error": error }))
}

fn invalid_key() -> Response {
    let details = json!([
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"}
        },
        {
            "@type": "type.googleapis.com/google.rpc.LocalizedMessage",
            "locale": "en-US",
            "message": API_KEY_INVALID
        }
    ]);
    error(400, API_KEY_INVALID, "INVALID_ARGUMENT", Some(details))
}

/// `POST /v1beta/models/{model}:{action}`.
pub(super) async fn generate(
    State(shared): State<Arc<Shared>>,
    Path(target): Path<String>,
    Query(query): Query<GeminiQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = common::header_str(&headers, "x-goog-api-key")
        .or(query.key.as_deref())
        .unwrap_or("");
    let state = shared.keys.entry(Gemini::PROVIDER, key);
    let refuse =
        |outcome, response| shared.refused(Gemini::PROVIDER, &state, key, outcome, response);
    // Google answers 403 without a key and 400 API_KEY_INVALID with a bad one.
    match shared.check_key(Some(key)) {
        KeyCheck::Missing => {
            let response = error(403, UNREGISTERED, "PERMISSION_DENIED", None);
            return refuse(Outcome::Unauthorized, response);
        }
        KeyCheck::Invalid => return refuse(Outcome::Unauthorized, invalid_key()),
        KeyCheck::Valid => {}
    }
    let Some((model, action)) = target.rsplit_once(':') else {
        let message = format!("models/{target} is not found for API version v1beta");
        return refuse(
            Outcome::ClientError,
            error(404, &message, "NOT_FOUND", None),
        );
    };
    let framing = match (action, query.alt.as_deref()) {
        ("embedContent" | "batchEmbedContents", _) => {
            let batch = action == "batchEmbedContents";
            return embed(&shared, &state, key, model, batch, &body).await;
        }
        ("generateContent", _) => None,
        ("streamGenerateContent", Some("sse")) => Some(Framing::SseCrlf),
        ("streamGenerateContent", _) => Some(Framing::JsonArray),
        _ => {
            let message = format!("Method not found: {action}");
            return refuse(
                Outcome::ClientError,
                error(404, &message, "NOT_FOUND", None),
            );
        }
    };
    let request = match parse(&body) {
        Ok(request) => request,
        Err(message) => {
            let response = error(400, &message, "INVALID_ARGUMENT", None);
            return refuse(Outcome::ClientError, response);
        }
    };
    let call = shared.admit(Gemini::PROVIDER, &state, model);
    let response = respond(&call, &request, model, framing).await;
    shared.finish(Gemini::PROVIDER, &state, key, model, response.status());
    response
}

/// Parses the body; a refusal is the message of a 400 `INVALID_ARGUMENT`.
fn parse(body: &[u8]) -> Result<GenerateRequest, String> {
    let request: GenerateRequest = serde_json::from_slice(body)
        .map_err(|err| format!("Invalid JSON payload received. {err}"))?;
    if request.contents.is_empty() {
        return Err("* GenerateContentRequest.contents: contents is not specified\n".to_owned());
    }
    Ok(request)
}

async fn respond(
    call: &Call<'_>,
    request: &GenerateRequest,
    model: &str,
    framing: Option<Framing>,
) -> Response {
    if let Some(response) = common::preflight::<Gemini>(call, model, framing.is_some()).await {
        return response;
    }
    let mut prompt = Prompt::default();
    if let Some(system) = &request.system_instruction {
        prompt.add(&common::join_parts(&system.parts), false);
    }
    for contents in &request.contents {
        // Gemini's role is optional and defaults to the user.
        let is_user = contents.role.as_deref().is_none_or(|role| role == "user");
        prompt.add(&common::join_parts(&contents.parts), is_user);
    }
    let config = request.generation_config.as_ref();
    let max = config.and_then(|c| c.max_output_tokens);
    // A stop sequence ends the answer with `finishReason: "STOP"`, which does not say so.
    let stop = config.map_or(&[][..], |c| &c.stop_sequences);
    let answer = Answer::new(&prompt.last_user, max, stop);
    let finish_reason = if answer.truncated {
        "MAX_TOKENS"
    } else {
        "STOP"
    };
    let response_id = format!("mock{:016x}", call.shared.next_id());
    let usage = UsageMetadata {
        prompt_token_count: prompt.tokens(),
        candidates_token_count: Some(answer.tokens),
        total_token_count: prompt.tokens() + answer.tokens,
    };
    let chunk = |text, finish_reason, usage_metadata| GenerateResponse {
        candidates: [Candidate {
            content: CandidateContent {
                parts: [TextPart { text }],
                role: "model",
            },
            finish_reason,
            index: 0,
        }],
        usage_metadata,
        model_version: model,
        response_id: &response_id,
    };
    let Some(framing) = framing else {
        let body = chunk(answer.text.as_str(), Some(finish_reason), usage);
        return common::body_response(call, to_json(&body));
    };
    // Every chunk carries the prompt's usage; the last one adds the finish reason and the
    // candidates' count, as Gemini does.
    let partial = UsageMetadata {
        candidates_token_count: None,
        total_token_count: prompt.tokens(),
        ..usage
    };
    let mut pieces: Vec<&str> = answer.pieces().collect();
    if pieces.is_empty() {
        pieces.push("");
    }
    let events = pieces
        .iter()
        .enumerate()
        .map(|(i, piece)| {
            let last = i + 1 == pieces.len();
            let body = if last {
                chunk(piece, Some(finish_reason), usage)
            } else {
                chunk(piece, None, partial)
            };
            Event::data(to_json(&body))
        })
        .collect();
    common::stream_response(call, framing, events, 0)
}

/// `:embedContent` or `:batchEmbedContents`, after the key was accepted.
async fn embed(
    shared: &Arc<Shared>,
    state: &KeyState,
    key: &str,
    model: &str,
    batch: bool,
    body: &[u8],
) -> Response {
    let parsed = if batch {
        parse_batch(body, model)
    } else {
        parse_embed(body, model).map(|item| vec![item])
    };
    let items = match parsed {
        Ok(items) => items,
        Err(message) => {
            let response = error(400, &message, "INVALID_ARGUMENT", None);
            return shared.refused(Gemini::PROVIDER, state, key, Outcome::ClientError, response);
        }
    };
    let call = shared.admit(Gemini::PROVIDER, state, model);
    let response = embed_respond(&call, &items, model, batch).await;
    shared.finish(Gemini::PROVIDER, state, key, model, response.status());
    response
}

/// One input to embed: its text and the vector length asked for.
type EmbedItem = (String, usize);

fn parse_embed(body: &[u8], model: &str) -> Result<EmbedItem, String> {
    let request: EmbedContentRequest = serde_json::from_slice(body)
        .map_err(|err| format!("Invalid JSON payload received. {err}"))?;
    embed_item(request, model, "EmbedContentRequest", false)
}

fn parse_batch(body: &[u8], model: &str) -> Result<Vec<EmbedItem>, String> {
    let batch: BatchEmbedContentsRequest = serde_json::from_slice(body)
        .map_err(|err| format!("Invalid JSON payload received. {err}"))?;
    if batch.requests.is_empty() {
        return Err("* BatchEmbedContentsRequest.requests: requests is not specified\n".to_owned());
    }
    if batch.requests.len() > MAX_EMBED_BATCH {
        return Err(format!(
            "* BatchEmbedContentsRequest.requests: at most {MAX_EMBED_BATCH} requests can be in \
             one batch\n"
        ));
    }
    batch
        .requests
        .into_iter()
        .enumerate()
        .map(|(i, request)| {
            let name = format!("BatchEmbedContentsRequest.requests[{i}]");
            embed_item(request, model, &name, true)
        })
        .collect()
}

/// Checks one `EmbedContentRequest`: a batch's requests must each name the URL's model.
fn embed_item(
    request: EmbedContentRequest,
    model: &str,
    name: &str,
    model_required: bool,
) -> Result<EmbedItem, String> {
    match request.model.as_deref() {
        None if model_required => {
            return Err(format!("* {name}.model: model is not specified\n"));
        }
        Some(named) if named.trim_start_matches("models/") != model => {
            return Err(format!(
                "* {name}.model: model `{named}` does not match the model of the request URL, \
                 models/{model}\n"
            ));
        }
        _ => {}
    }
    let text = request
        .content
        .map(|c| common::join_parts(&c.parts).into_owned())
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("* {name}.content: content is not specified\n"))?;
    let dimensions = match request.output_dimensionality {
        None => GEMINI_DIMENSIONS,
        Some(d) => usize::try_from(d)
            .ok()
            .filter(|d| (1..=GEMINI_DIMENSIONS).contains(d))
            .ok_or_else(|| {
                format!(
                    "* {name}.output_dimensionality: must be between 1 and \
                     {GEMINI_DIMENSIONS}, got {d}\n"
                )
            })?,
    };
    Ok((text, dimensions))
}

async fn embed_respond(call: &Call<'_>, items: &[EmbedItem], model: &str, batch: bool) -> Response {
    if let Some(response) = common::preflight::<Gemini>(call, model, false).await {
        return response;
    }
    let mut embeddings: Vec<ContentEmbedding> = items
        .iter()
        .map(|(text, dimensions)| ContentEmbedding {
            values: embed::embedding_for(text, *dimensions),
        })
        .collect();
    let body = match (batch, embeddings.pop()) {
        (false, Some(embedding)) => to_json(&EmbedContentResponse { embedding }),
        (_, last) => {
            embeddings.extend(last);
            to_json(&BatchEmbedContentsResponse { embeddings })
        }
    };
    common::body_response(call, body)
}
