//! OpenAI `POST /v1/embeddings`, also spoken by OpenAI-compatible servers (vLLM, llama.cpp,
//! Ollama's `/v1`). The internal type is this format: the request passes through with the model
//! renamed and every field the gateway does not model left as it came.

use bytes::Bytes;
use http::{Method, header};
use serde::Serialize;
use serde_json::{Map, Value};

use super::{EmbeddingInput, EmbeddingsRequest, EmbeddingsResponse, EncodingFormat};
use crate::providers::error::{ProviderError, Result};
use crate::providers::{UpstreamRequest, endpoint, json_headers, secret_header};

/// Request body, borrowing the caller's request.
#[derive(Debug, Serialize)]
struct Request<'a> {
    model: &'a str,
    input: &'a EmbeddingInput,
    #[serde(skip_serializing_if = "Option::is_none")]
    encoding_format: Option<EncodingFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    dimensions: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a str>,
    #[serde(flatten)]
    extra: &'a Map<String, Value>,
}

/// `POST {base}/v1/embeddings` with the model renamed.
pub(crate) fn build_request(
    base_url: &str,
    api_key: Option<&str>,
    upstream_model: &str,
    req: &EmbeddingsRequest,
) -> Result<UpstreamRequest> {
    let body = Request {
        model: upstream_model,
        input: &req.input,
        // Passed on as asked: base64 is a quarter the bytes, and an upstream that ignores it
        // and sends floats is converted afterwards.
        encoding_format: req.encoding_format,
        dimensions: req.dimensions,
        user: req.user.as_deref(),
        extra: &req.extra,
    };
    let body = serde_json::to_vec(&body)
        .map_err(|e| ProviderError::unsupported(format!("request not serialisable: {e}")))?;
    let mut headers = json_headers();
    if let Some(key) = api_key {
        headers.insert(
            header::AUTHORIZATION,
            secret_header(&format!("Bearer {key}"))?,
        );
    }
    Ok(UpstreamRequest {
        method: Method::POST,
        url: endpoint(base_url, "v1", "embeddings"),
        headers,
        body: Bytes::from(body),
    })
}

/// Parses a `list` of embeddings, renaming the model to the one the caller asked for.
pub(crate) fn parse_response(
    body: &[u8],
    model_for_caller: &str,
    req: &EmbeddingsRequest,
) -> Result<EmbeddingsResponse> {
    let mut response: EmbeddingsResponse = serde_json::from_slice(body)
        .map_err(|e| ProviderError::malformed("OpenAI embeddings list", &e))?;
    model_for_caller.clone_into(&mut response.model);
    response.finish(req)
}
