//! Ollama `POST /api/embed`: `{"model", "input": [...], "truncate": false, "dimensions"?}` ->
//! `{"model", "embeddings": [[...]], "prompt_eval_count"}`.

use bytes::Bytes;
use http::{Method, header};
use serde::{Deserialize, Serialize};

use super::{EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage};
use crate::providers::error::{ProviderError, Result};
use crate::providers::{UpstreamRequest, endpoint, json_headers, secret_header};

#[derive(Debug, Serialize)]
struct EmbedRequest<'a> {
    model: &'a str,
    /// Always a list, so that the answer has one vector per input whatever the caller sent.
    input: Vec<&'a str>,
    /// Ollama cuts inputs longer than the model's context by default; OpenAI refuses them.
    /// The gateway asks for the refusal: a silently shortened input would be a changed request.
    truncate: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct EmbedResponse {
    #[serde(default)]
    embeddings: Vec<Vec<f32>>,
    #[serde(default)]
    prompt_eval_count: Option<u32>,
}

/// Refuses token ids and unmodelled fields with a 400 naming the field. `user` has no Ollama
/// counterpart and does not change the vectors, so it is not sent (as for chat).
pub(crate) fn check(req: &EmbeddingsRequest) -> Result<()> {
    req.refuse_extra("Ollama")?;
    req.input.texts("Ollama").map(drop)
}

/// `POST {base}/api/embed`, after [`check`].
pub(crate) fn build_request(
    base_url: &str,
    api_key: Option<&str>,
    upstream_model: &str,
    req: &EmbeddingsRequest,
) -> Result<UpstreamRequest> {
    check(req)?;
    let body = EmbedRequest {
        model: upstream_model,
        input: req.input.texts("Ollama")?,
        truncate: false,
        dimensions: req.dimensions,
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    let mut headers = json_headers();
    // Ollama itself has no auth; a key is for a proxy in front of it.
    if let Some(key) = api_key {
        headers.insert(
            header::AUTHORIZATION,
            secret_header(&format!("Bearer {key}"))?,
        );
    }
    Ok(UpstreamRequest {
        method: Method::POST,
        url: endpoint(base_url, "api", "embed"),
        headers,
        body: Bytes::from(body),
    })
}

/// Parses `{"embeddings", "prompt_eval_count"}`; without a count, usage is estimated.
pub(crate) fn parse_response(
    body: &[u8],
    model_for_caller: &str,
    req: &EmbeddingsRequest,
) -> Result<EmbeddingsResponse> {
    let response: EmbedResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("Ollama embed response", &e))?;
    let tokens = response
        .prompt_eval_count
        .unwrap_or_else(|| req.estimate_tokens());
    let usage = EmbeddingsUsage::new(tokens);
    EmbeddingsResponse::from_vectors(model_for_caller, response.embeddings, usage).finish(req)
}
