//! The OpenAI Batch API (`crate::jobs::batch`), as the official SDK's `client.files` and
//! `client.batches` call it: `POST /v1/files` (multipart, purpose `batch`, JSONL),
//! `GET /v1/files/{id}`, `GET /v1/files/{id}/content`, `POST /v1/batches`,
//! `GET /v1/batches/{id}`, `POST /v1/batches/{id}/cancel`. Files and batches are their
//! tenant's alone (another tenant's id is 404).

use super::AppState;
use super::door;
use super::error::ApiError;
use crate::jobs::batch::{self, Batch, FileObject, Line, StoredBatch, StoredFile, file_key};
use crate::jobs::{Job, JobStore as _, Jobs, Policy};
use crate::providers::types::ChatRequest;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use floodgate_crds::QueueClass;
use serde::Deserialize;
use std::sync::Arc;

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

fn missing(what: &str, id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "not_found",
        format!("no {what} {id}"),
    )
}

fn unavailable(e: crate::jobs::StoreError) -> ApiError {
    tracing::warn!(error = %e, "job store failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "job_store_unavailable",
        "the job store is unavailable; retry shortly",
    )
}

/// The jobs subsystem and the caller's tenant, or the error to answer.
fn caller(
    state: &AppState,
    headers: &HeaderMap,
) -> Result<(Arc<Jobs>, Option<Arc<crate::identity::Caller>>), ApiError> {
    let jobs = state.jobs.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "jobs_disabled",
            "the Batch API is not enabled on this gateway",
        )
    })?;
    let config = state.dispatcher.config();
    let caller = state
        .identity
        .identify(&config, state.dispatcher.budgets(), headers)
        .map_err(door::unauthenticated)?;
    Ok((jobs, caller))
}

fn tenant(caller: &Option<Arc<crate::identity::Caller>>) -> Option<String> {
    caller.as_ref().map(|c| c.name().to_string())
}

fn answer(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/files`.
pub(super) async fn upload(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(upload_file(&state, &headers, body).await)
}

async fn upload_file(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (jobs, caller) = caller(state, headers)?;
    let boundary = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.split(';')
                .find_map(|p| p.trim().strip_prefix("boundary="))
        })
        .map(|b| b.trim_matches('"').to_owned())
        .ok_or_else(|| bad("invalid_content_type", "expected multipart/form-data"))?;
    let bytes = door::read_body(body, state.body_limit, state.body_timeout).await?;
    let parts = multipart(&bytes, &boundary)
        .ok_or_else(|| bad("invalid_multipart", "the multipart body cannot be read"))?;
    let purpose = parts
        .iter()
        .find(|p| p.name == "purpose")
        .map(|p| String::from_utf8_lossy(p.data).into_owned());
    if purpose.as_deref() != Some("batch") {
        return Err(bad(
            "invalid_purpose",
            "only files with purpose `batch` are accepted",
        ));
    }
    let file = parts
        .iter()
        .find(|p| p.name == "file")
        .ok_or_else(|| bad("missing_file", "the `file` part is missing"))?;
    let content = std::str::from_utf8(file.data)
        .map_err(|_| bad("invalid_file", "the file is not UTF-8 JSONL"))?
        .to_owned();
    let stored = StoredFile {
        tenant: tenant(&caller),
        file: FileObject {
            id: batch::new_id("file-"),
            object: "file".to_owned(),
            bytes: file.data.len() as u64,
            created_at: crate::jobs::now_ms() / 1000,
            filename: file
                .filename
                .clone()
                .unwrap_or_else(|| "input.jsonl".to_owned()),
            purpose: "batch".to_owned(),
            status: "processed".to_owned(),
        },
        content,
    };
    batch::save_file(&jobs.store, &stored)
        .await
        .map_err(unavailable)?;
    Ok(Json(stored.file).into_response())
}

/// One part of a multipart body.
pub(crate) struct Part<'a> {
    /// Its `name` (`content-disposition`).
    pub(crate) name: String,
    /// Its `filename`, if given.
    pub(crate) filename: Option<String>,
    /// Its content.
    pub(crate) data: &'a [u8],
}

/// The parts of a `multipart/form-data` body with `boundary` (RFC 7578).
pub(crate) fn multipart<'a>(body: &'a [u8], boundary: &str) -> Option<Vec<Part<'a>>> {
    let delimiter = format!("--{boundary}");
    let finder = memchr::memmem::Finder::new(delimiter.as_bytes());
    let starts: Vec<usize> = finder.find_iter(body).collect();
    if starts.len() < 2 {
        return None;
    }
    let mut parts = Vec::new();
    for pair in starts.windows(2) {
        let part = body.get(pair[0] + delimiter.len()..pair[1])?;
        let part = part.strip_prefix(b"\r\n")?;
        let part = part.strip_suffix(b"\r\n")?;
        let split = memchr::memmem::find(part, b"\r\n\r\n")?;
        let head = std::str::from_utf8(&part[..split]).ok()?;
        let data = &part[split + 4..];
        let disposition = head
            .lines()
            .find(|l| l.to_ascii_lowercase().starts_with("content-disposition"))?;
        let param = |key: &str| {
            disposition.split(';').find_map(|p| {
                p.trim()
                    .strip_prefix(key)
                    .and_then(|v| v.strip_prefix('='))
                    .map(|v| v.trim_matches('"').to_owned())
            })
        };
        parts.push(Part {
            name: param("name")?,
            filename: param("filename"),
            data,
        });
    }
    Some(parts)
}

/// Line `n` (from 0) of a batch input file for `endpoint`: the line and its chat request, or
/// the 400 naming the line. Whether its model is served is the caller's to check.
pub(crate) fn parse_line(
    n: usize,
    text: &str,
    endpoint: &str,
) -> Result<(Line, ChatRequest), ApiError> {
    let line: Line = serde_json::from_str(text)
        .map_err(|e| bad("invalid_batch_line", format!("line {}: {e}", n + 1)))?;
    let req: ChatRequest = serde_json::from_value(line.body.clone())
        .map_err(|e| bad("invalid_batch_line", format!("line {}: body: {e}", n + 1)))?;
    if line.method != "POST" || line.url != endpoint {
        return Err(bad(
            "invalid_batch_line",
            format!("line {}: method and url must be POST {endpoint}", n + 1),
        ));
    }
    Ok((line, req))
}

async fn own_file(jobs: &Jobs, tenant: &Option<String>, id: &str) -> Result<StoredFile, ApiError> {
    let raw = jobs.store.fetch(&file_key(id)).await.map_err(unavailable)?;
    raw.and_then(|r| serde_json::from_str::<StoredFile>(&r).ok())
        .filter(|f| &f.tenant == tenant)
        .ok_or_else(|| missing("file", id))
}

/// `GET /v1/files/{id}`.
pub(super) async fn file(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (jobs, caller) = caller(&state, &headers)?;
            let f = own_file(&jobs, &tenant(&caller), &id).await?;
            Ok::<_, ApiError>(Json(f.file).into_response())
        }
        .await,
    )
}

/// `GET /v1/files/{id}/content`.
pub(super) async fn content(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (jobs, caller) = caller(&state, &headers)?;
            let f = own_file(&jobs, &tenant(&caller), &id).await?;
            Ok::<_, ApiError>(
                ([(header::CONTENT_TYPE, "application/jsonl")], f.content).into_response(),
            )
        }
        .await,
    )
}

/// The body of `POST /v1/batches`.
#[derive(Debug, Deserialize)]
struct NewBatch {
    input_file_id: String,
    endpoint: String,
    completion_window: String,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// `POST /v1/batches`.
pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    answer(create_batch(&state, &headers, body).await)
}

async fn create_batch(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (jobs, caller) = caller(state, headers)?;
    let bytes = door::read_body(body, state.body_limit, state.body_timeout).await?;
    let new: NewBatch = serde_json::from_slice(&bytes)
        .map_err(|e| bad("invalid_json", format!("not a valid batch request: {e}")))?;
    if new.endpoint != batch::ENDPOINT {
        return Err(bad(
            "unsupported_endpoint",
            "only `/v1/chat/completions` batches are supported",
        ));
    }
    let window = batch::parse_window(&new.completion_window).ok_or_else(|| {
        bad(
            "invalid_completion_window",
            "`completion_window` must be like `24h`",
        )
    })?;
    let owner = tenant(&caller);
    let input = own_file(&jobs, &owner, &new.input_file_id).await?;
    let config = state.dispatcher.config();
    // Lines run in a batch-class tier: the capacity the interactive tiers leave idle.
    let tier = {
        let view = state.dispatcher.view();
        let own = view
            .runtime
            .tiers
            .get(caller.as_ref().and_then(|c| c.tier()).map(|t| &**t));
        let batch_tier = view
            .runtime
            .tiers
            .iter()
            .find(|t| t.class == QueueClass::Batch);
        batch_tier.unwrap_or(own).name.to_string()
    };
    let max_attempts = Policy::of(&config, &tier).retry.max_attempts;
    let mut parsed = Vec::new();
    for (n, text) in input.content.lines().enumerate() {
        if text.trim().is_empty() {
            continue;
        }
        let (line, req) = parse_line(n, text, &new.endpoint)?;
        if !config.models().iter().any(|m| m.id == req.model)
            || caller.as_ref().is_some_and(|c| !c.may_use(&req.model))
        {
            return Err(bad(
                "invalid_batch_line",
                format!("line {}: model `{}` is not available", n + 1, req.model),
            ));
        }
        parsed.push(line);
    }
    if parsed.is_empty() {
        return Err(bad("empty_batch", "the input file has no lines"));
    }
    let id = batch::new_id("batch_");
    let queued: Vec<Job> = parsed
        .into_iter()
        .map(|line| {
            let mut job = Job::new(owner.clone(), tier.clone(), line.body, max_attempts);
            job.batch = Some(id.clone());
            job.metadata
                .insert("batch_id".to_owned(), id.clone().into());
            job.metadata
                .insert("custom_id".to_owned(), line.custom_id.into());
            job
        })
        .collect();
    let lines: Vec<(String, String)> = queued
        .iter()
        .map(|j| {
            let custom = j.metadata.get("custom_id").and_then(|v| v.as_str());
            (custom.unwrap_or_default().to_owned(), j.id.clone())
        })
        .collect();
    let stored = StoredBatch {
        tenant: owner,
        batch: Batch::new(
            id,
            new.input_file_id,
            new.completion_window,
            window,
            lines.len() as u64,
            new.metadata,
        ),
        lines,
        file_ids: Some((batch::new_id("file-"), batch::new_id("file-"))),
    };
    // The batch, its state and its lines in one store step: a failure leaves nothing behind.
    // Its lines count against the tenant's pending jobs like any job's.
    let n = queued.len() as u64;
    let created = stored.batch.clone();
    let bound = if caller.is_some() {
        jobs.max_pending_per_tenant
    } else {
        0
    };
    let made = batch::create(&jobs.store, stored, queued, window, bound)
        .await
        .map_err(unavailable)?;
    if let crate::jobs::Created::Full { pending } = made {
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "too_many_pending_jobs",
            format!(
                "{pending} jobs of yours are pending in tier {tier}; this batch's {n} lines would pass the most allowed, {bound} (--job-max-pending-per-tenant): retry when some are over, or split the batch"
            ),
        )
        .with_retry_after(std::time::Duration::from_secs(60)));
    }
    crate::jobs::metrics::get()
        .states
        .get_or_create(&crate::jobs::metrics::StateLabels { state: "queued" })
        .inc_by(n);
    Ok(Json(created).into_response())
}

/// Batch `id` as it stands ([`batch::view`]), if it is `tenant`'s.
async fn own_batch(
    jobs: &Jobs,
    tenant: &Option<String>,
    id: &str,
) -> Result<StoredBatch, ApiError> {
    batch::view(&jobs.store, id)
        .await
        .map_err(unavailable)?
        .filter(|b| &b.tenant == tenant)
        .ok_or_else(|| missing("batch", id))
}

/// `GET /v1/batches/{id}`.
pub(super) async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (jobs, caller) = caller(&state, &headers)?;
            let stored = own_batch(&jobs, &tenant(&caller), &id).await?;
            Ok::<_, ApiError>(Json(stored.batch).into_response())
        }
        .await,
    )
}

/// `POST /v1/batches/{id}/cancel`: the batch, cancelling (or cancelled once its lines are
/// over); 409 as OpenAI answers for a batch that has begun to end or has ended.
pub(super) async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    answer(
        async {
            let (jobs, caller) = caller(&state, &headers)?;
            let owner = tenant(&caller);
            own_batch(&jobs, &owner, &id).await?;
            if let Some(status) = batch::cancel(&jobs.store, &id).await.map_err(unavailable)? {
                return Ok(not_cancellable(&status));
            }
            let stored = own_batch(&jobs, &owner, &id).await?;
            Ok::<_, ApiError>(Json(stored.batch).into_response())
        }
        .await,
    )
}

/// OpenAI's answer to a cancel of a batch with `status` (ended or ending): 409, its error
/// with no code.
fn not_cancellable(status: &str) -> Response {
    let body = serde_json::json!({"error": {
        "message": format!("Cannot cancel a batch with status '{status}'."),
        "type": "invalid_request_error",
        "param": null,
        "code": null,
    }});
    (StatusCode::CONFLICT, Json(body)).into_response()
}
