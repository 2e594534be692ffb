//! OpenAI `POST /v1/embeddings`: floats or base64 (`encoding_format`), `dimensions` up to the
//! model's own length (refused by `text-embedding-ada-002`), usage in `prompt_tokens`, and
//! OpenAI's 400 bodies for a bad `input`, `encoding_format` or `dimensions`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, HeaderName};
use axum::response::Response;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::super::Shared;
use super::super::common::{self, Call, Dialect, set_header, to_json};
use super::super::embed::{self, OPENAI_DIMENSIONS};
use super::super::limits::Outcome;
use super::{OpenAi, bearer_key, invalid_request, key_error};

/// OpenAI's answer to an `input` of the wrong shape, an empty one, or too many items.
const INVALID_INPUT: &str = "'$.input' is invalid. Please check the API reference: \
    https://platform.openai.com/docs/api-reference.";

/// Most inputs one embeddings request may hold.
const MAX_EMBEDDING_INPUTS: usize = 2048;

#[derive(Debug, Deserialize)]
struct EmbeddingsRequest {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    input: Option<Value>,
    #[serde(default)]
    encoding_format: Option<String>,
    #[serde(default)]
    dimensions: Option<i64>,
}

/// A well-formed embeddings request: each input as (what its vector derives from, tokens).
#[derive(Debug)]
struct Embeddings {
    model: String,
    inputs: Vec<(String, u32)>,
    base64: bool,
    dimensions: usize,
}

#[derive(Debug, Serialize)]
struct EmbeddingList<'a> {
    object: &'static str,
    data: Vec<EmbeddingObject>,
    model: &'a str,
    usage: EmbeddingUsage,
}

#[derive(Debug, Serialize)]
struct EmbeddingObject {
    object: &'static str,
    index: usize,
    embedding: EmbeddingValue,
}

#[derive(Debug, Serialize)]
#[serde(untagged)]
enum EmbeddingValue {
    Float(Vec<f32>),
    Base64(String),
}

#[derive(Debug, Serialize)]
struct EmbeddingUsage {
    prompt_tokens: u32,
    total_tokens: u32,
}

/// `POST /v1/embeddings`.
pub(in crate::mock) async fn embeddings(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let key = bearer_key(&headers);
    let state = shared.keys.entry(OpenAi::PROVIDER, key);
    let refuse =
        |outcome, response| shared.refused(OpenAi::PROVIDER, &state, key, outcome, response);
    if let Some(response) = key_error(&shared, key) {
        return refuse(Outcome::Unauthorized, response);
    }
    let request = match parse_embeddings(&body) {
        Ok(request) => request,
        Err((message, param)) => {
            return refuse(Outcome::ClientError, invalid_request(&message, param));
        }
    };
    let call = shared.admit(OpenAi::PROVIDER, &state, &request.model);
    let response = embed_respond(&call, &request).await;
    shared.finish(
        OpenAi::PROVIDER,
        &state,
        key,
        &request.model,
        response.status(),
    );
    response
}

/// Parses and checks an embeddings body as OpenAI does; a refusal is `(message, param)`.
fn parse_embeddings(body: &[u8]) -> Result<Embeddings, (String, Option<&'static str>)> {
    let request: EmbeddingsRequest = serde_json::from_slice(body).map_err(|err| {
        (
            format!("We could not parse the JSON body of your request. ({err})"),
            None,
        )
    })?;
    let model = request.model.filter(|m| !m.is_empty());
    let model = model.ok_or_else(|| ("you must provide a model parameter".to_owned(), None))?;
    let inputs = request
        .input
        .as_ref()
        .and_then(embedding_inputs)
        .ok_or_else(|| (INVALID_INPUT.to_owned(), None))?;
    let base64 = match request.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            let message =
                format!("'{other}' is not one of ['float', 'base64'] - 'encoding_format'");
            return Err((message, Some("encoding_format")));
        }
    };
    let native = if model.contains("3-large") {
        3072
    } else {
        OPENAI_DIMENSIONS
    };
    let dimensions = match request.dimensions {
        None => native,
        Some(_) if model.contains("ada-002") => {
            return Err((
                "This model does not support specifying dimensions.".to_owned(),
                None,
            ));
        }
        Some(d) if d < 1 => {
            let message = format!(
                "Invalid 'dimensions': integer below minimum value. Expected a value >= 1, but \
                 got {d} instead."
            );
            return Err((message, Some("dimensions")));
        }
        Some(d) => match usize::try_from(d) {
            Ok(d) if d <= native => d,
            _ => {
                let message = format!(
                    "Invalid 'dimensions': integer above maximum value. Expected a value <= \
                     {native}, but got {d} instead."
                );
                return Err((message, Some("dimensions")));
            }
        },
    };
    Ok(Embeddings {
        model,
        inputs,
        base64,
        dimensions,
    })
}

/// `input` as a string, strings, token ids or token-id arrays, none of them empty and at most
/// 2048; `None` for anything else.
fn embedding_inputs(input: &Value) -> Option<Vec<(String, u32)>> {
    let text = |v: &Value| {
        v.as_str()
            .filter(|t| !t.is_empty())
            .map(|t| (t.to_owned(), embed::text_tokens(t)))
    };
    let tokens = |v: &Value| {
        let ids: Option<Vec<u32>> = v
            .as_array()?
            .iter()
            .map(|id| id.as_u64().and_then(|id| u32::try_from(id).ok()))
            .collect();
        let ids = ids.filter(|ids| !ids.is_empty())?;
        let count = u32::try_from(ids.len()).ok()?;
        Some((embed::tokens_key(&ids), count))
    };
    let items = match input {
        Value::String(_) => vec![text(input)?],
        Value::Array(items) if items.is_empty() || items.len() > MAX_EMBEDDING_INPUTS => {
            return None;
        }
        Value::Array(items) => match &items[0] {
            Value::String(_) => items.iter().map(text).collect::<Option<_>>()?,
            Value::Number(_) => vec![tokens(input)?],
            Value::Array(_) => items.iter().map(tokens).collect::<Option<_>>()?,
            _ => return None,
        },
        _ => return None,
    };
    Some(items)
}

async fn embed_respond(call: &Call<'_>, request: &Embeddings) -> Response {
    if let Some(response) = common::preflight::<OpenAi>(call, &request.model, false).await {
        return response;
    }
    let data = request
        .inputs
        .iter()
        .enumerate()
        .map(|(index, (text, _))| {
            let vector = embed::embedding_for(text, request.dimensions);
            let embedding = if request.base64 {
                EmbeddingValue::Base64(embed::base64_of(&vector))
            } else {
                EmbeddingValue::Float(vector)
            };
            EmbeddingObject {
                object: "embedding",
                index,
                embedding,
            }
        })
        .collect();
    let tokens = request.inputs.iter().map(|(_, tokens)| tokens).sum();
    let list = EmbeddingList {
        object: "list",
        data,
        model: &request.model,
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    };
    let mut response = common::body_response(call, to_json(&list));
    let headers = response.headers_mut();
    set_header(
        headers,
        HeaderName::from_static("x-request-id"),
        &format!("req_embd{:016x}", call.shared.next_id()),
    );
    OpenAi::limit_headers(call.admission, headers);
    response
}
