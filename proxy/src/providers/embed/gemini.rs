//! Gemini `POST /v1beta/models/{model}:batchEmbedContents`: one `EmbedContentRequest` per
//! input, each naming the same model; `dimensions` becomes `outputDimensionality`. The key goes
//! in `x-goog-api-key`. The answer is `{"embeddings": [{"values": [...]}]}` in input order.

use bytes::Bytes;
use http::Method;
use serde::{Deserialize, Serialize};

use super::{EmbeddingsRequest, EmbeddingsResponse, EmbeddingsUsage};
use crate::providers::error::{ProviderError, Result};
use crate::providers::{UpstreamRequest, endpoint, json_headers, secret_header};

/// Most requests Gemini takes in one batch.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, Serialize)]
struct BatchEmbedContentsRequest<'a> {
    requests: Vec<EmbedContentRequest<'a>>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EmbedContentRequest<'a> {
    /// `models/{model}`, the same as in the URL (Gemini refuses a batch that mixes models).
    model: &'a str,
    content: Content<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dimensionality: Option<u32>,
}

#[derive(Debug, Serialize)]
struct Content<'a> {
    parts: [Part<'a>; 1],
}

#[derive(Debug, Serialize)]
struct Part<'a> {
    text: &'a str,
}

#[derive(Debug, Deserialize)]
struct BatchEmbedContentsResponse {
    #[serde(default)]
    embeddings: Vec<ContentEmbedding>,
}

#[derive(Debug, Deserialize)]
struct ContentEmbedding {
    values: Vec<f32>,
}

/// Refuses token ids, more than [`MAX_BATCH`] inputs and unmodelled fields, each with a 400
/// naming the field. `user` has no Gemini counterpart and does not change the vectors, so it
/// is not sent (as for chat).
pub(crate) fn check(req: &EmbeddingsRequest) -> Result<()> {
    req.refuse_extra("Gemini")?;
    let texts = req.input.texts("Gemini")?;
    if texts.len() > MAX_BATCH {
        return Err(ProviderError::unsupported(format!(
            "`input` holds {} items; Gemini targets embed at most {MAX_BATCH} per request",
            texts.len()
        )));
    }
    Ok(())
}

/// `POST {base}/v1beta/models/{model}:batchEmbedContents`, after [`check`].
pub(crate) fn build_request(
    base_url: &str,
    api_key: Option<&str>,
    upstream_model: &str,
    req: &EmbeddingsRequest,
) -> Result<UpstreamRequest> {
    check(req)?;
    let texts = req.input.texts("Gemini")?;
    let model = upstream_model.trim_start_matches("models/");
    let qualified = format!("models/{model}");
    let body = BatchEmbedContentsRequest {
        requests: texts
            .into_iter()
            .map(|text| EmbedContentRequest {
                model: &qualified,
                content: Content {
                    parts: [Part { text }],
                },
                output_dimensionality: req.dimensions,
            })
            .collect(),
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    let mut headers = json_headers();
    if let Some(key) = api_key {
        headers.insert("x-goog-api-key", secret_header(key)?);
    }
    Ok(UpstreamRequest {
        method: Method::POST,
        url: endpoint(
            base_url,
            "v1beta",
            &format!("{qualified}:batchEmbedContents"),
        ),
        headers,
        body: Bytes::from(body),
    })
}

/// Parses `{"embeddings": [{"values"}]}`.
pub(crate) fn parse_response(
    body: &[u8],
    model_for_caller: &str,
    req: &EmbeddingsRequest,
) -> Result<EmbeddingsResponse> {
    let response: BatchEmbedContentsResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("Gemini BatchEmbedContentsResponse", &e))?;
    let vectors = response.embeddings.into_iter().map(|e| e.values).collect();
    // Gemini reports no token usage for embeddings: the usage is the gateway's estimate
    // (the same one that reserved the budget), so budgets settle on what was reserved.
    let usage = EmbeddingsUsage::new(req.estimate_tokens());
    EmbeddingsResponse::from_vectors(model_for_caller, vectors, usage).finish(req)
}
