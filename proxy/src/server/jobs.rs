//! The jobs API (`crate::jobs`): on the public router, a tenant's own jobs; on the admin
//! router, the dead letters.
//!
//! | method | path | what |
//! |--------|------|------|
//! | POST | `/v1/jobs` | `{"request": <chat request>, "notify"?: {"webhook"?, "email"?}, "metadata"?: {}}` -> 202 `{id, object, status, position, estimated_start}` and `Location` |
//! | GET | `/v1/jobs/{id}` | the job: status, attempts, history, result or error |
//! | GET | `/v1/jobs/{id}/events` | Server-Sent Events: `queued`, `position`, `started`, `retrying`, `completed`, `failed`, `cancelled` |
//! | DELETE | `/v1/jobs/{id}` | cancels it |
//! | GET | `/admin/jobs/dead-letters` (admin) | dead letters, oldest first |
//! | GET | `/admin/jobs/dead-letters/{id}` (admin) | one, with its last error and history |
//! | POST | `/admin/jobs/dead-letters/{id}/redrive` (admin) | back to the queue, attempts reset |
//! | POST | `/admin/jobs/dead-letters/redrive` (admin) | every one |
//! | DELETE | `/admin/jobs/dead-letters` (admin) | purges them |
//!
//! A caller is identified as at every door (client key; 401 otherwise) and sees only its
//! tenant's jobs: another tenant's id is answered 404, as an unknown one. The admin
//! endpoints are served on the admin listener only, and each needs
//! `Authorization: Bearer <--admin-token>` (401 without it or with another; 403 to everyone
//! when no token is set): a tenant's key reaches none of them.
//!
//! The event stream reads the job from the store every [`EVENTS_EVERY`], so it follows a
//! job run by any replica; it ends after the job's last event.

use super::AppState;
use super::door;
use super::error::ApiError;
use crate::jobs::{Job, JobStore as _, Jobs, Notify, Policy, Status, Submitted};
use crate::providers::types::ChatRequest;
use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::sync::Arc;
use std::time::Duration;

/// How often a job's event stream looks at the job.
pub const EVENTS_EVERY: Duration = Duration::from_millis(200);

/// The body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NewJob {
    /// The chat request, as given.
    pub(crate) request: Value,
    /// Who to tell when it ends.
    #[serde(default)]
    pub(crate) notify: Notify,
    /// The caller's own fields, kept on the job.
    #[serde(default)]
    pub(crate) metadata: serde_json::Map<String, Value>,
}

/// The body of `POST /v1/jobs`: the job and its chat request, or the 400 saying what is
/// wrong.
pub(crate) fn parse_job(bytes: &[u8]) -> Result<(NewJob, ChatRequest), ApiError> {
    let new: NewJob = serde_json::from_slice(bytes).map_err(|e| {
        bad_request(
            "invalid_json",
            format!("the request body is not a valid job: {e}"),
        )
    })?;
    let req: ChatRequest = serde_json::from_value(new.request.clone()).map_err(|e| {
        bad_request(
            "invalid_request",
            format!("`request` is not a valid chat completion request: {e}"),
        )
    })?;
    Ok((new, req))
}

fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_request_error",
        code,
        message,
    )
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        "job_not_found",
        format!("no job {id}"),
    )
}

fn store_error(e: crate::jobs::StoreError) -> ApiError {
    tracing::warn!(error = %e, "job store failed");
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "server_error",
        "job_store_unavailable",
        "the job store is unavailable; retry shortly",
    )
    .with_retry_after(Duration::from_secs(1))
}

fn jobs_of(state: &AppState) -> Result<&Arc<Jobs>, ApiError> {
    state.jobs.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            "jobs_disabled",
            "async jobs are not enabled on this gateway",
        )
    })
}

/// The caller's tenant name (`None` when the gateway is open), or 401.
fn tenant_of(state: &AppState, headers: &HeaderMap) -> Result<Option<Arc<str>>, ApiError> {
    let config = state.dispatcher.config();
    let caller = state
        .identity
        .identify(&config, state.dispatcher.budgets(), headers)
        .map_err(door::unauthenticated)?;
    Ok(caller.map(|c| c.name().clone()))
}

/// `POST /v1/jobs`.
pub(super) async fn create(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    match create_job(&state, &headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

async fn create_job(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let jobs = jobs_of(state)?;
    let config = state.dispatcher.config();
    let caller = state
        .identity
        .identify(&config, state.dispatcher.budgets(), headers)
        .map_err(door::unauthenticated)?;
    let bytes = door::read_body(body, state.body_limit, state.body_timeout).await?;
    let (new, req) = parse_job(&bytes)?;
    let tier = {
        let view = state.dispatcher.view();
        view.runtime
            .tiers
            .get(caller.as_ref().and_then(|c| c.tier()).map(|t| &**t))
            .name
            .to_string()
    };
    let (job, ahead) = accept(jobs, &config, caller.as_deref(), tier, req, new).await?;
    Ok(accepted(jobs, &job, ahead))
}

/// Validates and queues a job of `caller` in `tier`: the job, and how many queued jobs are
/// before it.
async fn accept(
    jobs: &Jobs,
    config: &crate::config::Config,
    caller: Option<&crate::identity::Caller>,
    tier: String,
    req: ChatRequest,
    new: NewJob,
) -> Result<(Job, u64), ApiError> {
    if req.messages.is_empty() {
        return Err(bad_request(
            "invalid_request",
            "`request.messages` must contain at least one message",
        ));
    }
    if !config.models().iter().any(|m| m.id == req.model) {
        return Err(door::route_error(crate::route::RouteError::UnknownModel(
            req.model.clone(),
        )));
    }
    if let Some(c) = caller
        && !c.may_use(&req.model)
    {
        return Err(door::refusal(&crate::identity::Refusal::ModelNotAllowed(
            req.model.clone(),
        )));
    }
    if let Some(address) = &new.notify.email {
        if !crate::jobs::email::valid_address(address) {
            return Err(bad_request(
                "invalid_email",
                "`notify.email` must be one email address (user@domain)",
            ));
        }
        if !config.email.contains_key(&tier) {
            return Err(bad_request(
                "email_not_configured",
                format!(
                    "tier {tier} has no email settings (TierQueue tiers[].async.email), whose SMTP server sends the notification"
                ),
            ));
        }
    }
    let max_attempts = Policy::of(config, &tier).retry.max_attempts;
    if let Some(url) = &new.notify.webhook {
        crate::jobs::address::check(url, jobs.allow_internal_webhooks)
            .map_err(|why| bad_request("invalid_webhook", format!("`notify.webhook` {why}")))?;
        if !crate::jobs::worker::tier_has_webhook(config, &tier) {
            return Err(bad_request(
                "webhook_not_configured",
                format!(
                    "tier {tier} has no webhook settings (TierQueue tiers[].async.webhook), whose secret signs the delivery"
                ),
            ));
        }
    }
    let mut job = Job::new(
        caller.map(|c| c.name().to_string()),
        tier.clone(),
        new.request,
        max_attempts,
    );
    job.notify = new.notify;
    job.metadata = new.metadata;
    // A tenant's pending jobs are bounded in its tier; the store counts and queues in one
    // step (one round trip to Redis, which also brings the job's position).
    let bound = if caller.is_some() {
        jobs.max_pending_per_tenant
    } else {
        0
    };
    match jobs.store.submit(job, bound).await.map_err(store_error)? {
        Submitted::Queued { job, ahead } => {
            crate::jobs::metrics::get().state("queued");
            Ok((*job, ahead))
        }
        Submitted::Full { pending } => {
            // About when one of them ends, at this replica's pace.
            let next = jobs
                .estimated_start(1)
                .saturating_sub(crate::jobs::now_ms());
            Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "too_many_pending_jobs",
                format!(
                    "{pending} jobs of yours are pending in tier {tier}, the most allowed (--job-max-pending-per-tenant): retry when some are over"
                ),
            )
            .with_retry_after(Duration::from_millis(next.clamp(1000, 3_600_000))))
        }
    }
}

/// 202 with the job's place (`position`: queued jobs before it) and `Location`.
fn accepted(jobs: &Jobs, job: &Job, position: u64) -> Response {
    let body = json!({
        "id": job.id,
        "object": "job",
        "status": job.status,
        "position": position,
        "estimated_start": jobs.estimated_start(position) / 1000,
    });
    let mut response = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/jobs/{}", job.id)) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    response
}

/// Queues `req` of the caller in `ctx` as a job: for a synchronous request sent with
/// `Prefer: respond-async` that could not be answered within its wait limit, at either chat
/// door (the job's result is a chat completion, `GET /v1/jobs/{id}`). Only for a tier that
/// allows it (TierQueue `tiers[].async`); `None` otherwise, and the door answers the error.
pub(super) async fn defer(
    state: &AppState,
    ctx: &crate::pipeline::RequestCtx,
    req: &ChatRequest,
) -> Option<Response> {
    let jobs = state.jobs.as_ref()?;
    let config = state.dispatcher.config();
    let tier_allows = config
        .tier_queue
        .as_ref()
        .and_then(|tq| tq.spec.tiers.iter().find(|t| *t.name == *ctx.tier))
        .is_some_and(|t| t.async_.is_some());
    if !tier_allows {
        return None;
    }
    let request = serde_json::to_value(req).ok()?;
    let new = NewJob {
        request,
        notify: Notify::default(),
        metadata: serde_json::Map::new(),
    };
    match accept(
        jobs,
        &config,
        ctx.caller.as_deref(),
        ctx.tier.to_string(),
        req.clone(),
        new,
    )
    .await
    {
        Ok((job, ahead)) => Some(accepted(jobs, &job, ahead)),
        // In the format of the door the request came in by.
        Err(e) => Some(super::door::render(ctx.door, &e)),
    }
}

/// Whether the request asks for an async answer (`Prefer: respond-async`, RFC 7240).
pub(super) fn prefers_async(headers: &HeaderMap) -> bool {
    headers.get_all("prefer").iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',')
                .any(|p| p.trim().eq_ignore_ascii_case("respond-async"))
        })
    })
}

/// The caller's job `id`, or 404.
async fn own_job(state: &AppState, headers: &HeaderMap, id: &str) -> Result<Job, ApiError> {
    let jobs = jobs_of(state)?;
    let tenant = tenant_of(state, headers)?;
    let job = jobs.store.get(id).await.map_err(store_error)?;
    job.filter(|j| j.visible_to(tenant.as_deref()))
        .ok_or_else(|| not_found(id))
}

async fn shown(jobs: &Jobs, job: Job) -> Value {
    let position = if job.status == Status::Queued {
        jobs.store.position(&job).await.ok()
    } else {
        None
    };
    let mut v = serde_json::to_value(&job).unwrap_or_default();
    if let (Some(p), Some(obj)) = (position, v.as_object_mut()) {
        obj.insert("position".to_owned(), json!(p));
        obj.insert(
            "estimated_start".to_owned(),
            json!(jobs.estimated_start(p) / 1000),
        );
    }
    v
}

/// `GET /v1/jobs/{id}`.
pub(super) async fn get(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    match own_job(&state, &headers, &id).await {
        Ok(job) => match &state.jobs {
            Some(jobs) => Json(shown(jobs, job).await).into_response(),
            None => not_found(&id).into_response(),
        },
        Err(e) => e.into_response(),
    }
}

/// `DELETE /v1/jobs/{id}`.
pub(super) async fn cancel(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        own_job(&state, &headers, &id).await?;
        let jobs = jobs_of(&state)?;
        let job = jobs.store.cancel(&id).await.map_err(store_error)?;
        let job = job.ok_or_else(|| not_found(&id))?;
        if job.status == Status::Cancelled {
            crate::jobs::metrics::get().state("cancelled");
        }
        Ok::<_, ApiError>(Json(job).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// What the event stream last told.
struct Seen {
    status: Option<Status>,
    position: Option<u64>,
    attempts: u32,
    done: bool,
}

/// `GET /v1/jobs/{id}/events`.
pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = own_job(&state, &headers, &id).await {
        return e.into_response();
    }
    let Some(jobs) = state.jobs.clone() else {
        return not_found(&id).into_response();
    };
    let seen = Seen {
        status: None,
        position: None,
        attempts: 0,
        done: false,
    };
    let stream = futures::stream::unfold((seen, true), move |(mut seen, first)| {
        let jobs = jobs.clone();
        let id = id.clone();
        async move {
            if seen.done {
                return None;
            }
            let mut wait = !first;
            loop {
                if wait {
                    tokio::time::sleep(EVENTS_EVERY).await;
                }
                wait = true;
                let job = match jobs.store.get(&id).await {
                    Ok(Some(job)) => job,
                    Ok(None) => {
                        seen.done = true;
                        let gone = bytes::Bytes::from(sse("gone", &json!({"id": id})));
                        return Some((Ok::<_, std::convert::Infallible>(gone), (seen, false)));
                    }
                    Err(_) => continue,
                };
                if let Some(events) = next_events(&jobs, &mut seen, &job).await {
                    return Some((Ok(events), (seen, false)));
                }
            }
        }
    });
    let mut response = Response::new(Body::from_stream(stream));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// The events `job` calls for since `seen`, if any.
async fn next_events(jobs: &Jobs, seen: &mut Seen, job: &Job) -> Option<bytes::Bytes> {
    let mut out = Vec::new();
    if seen.status.is_none() {
        out.extend_from_slice(&sse("queued", &json!({"id": job.id, "status": job.status})));
    }
    if job.status == Status::Queued {
        let position = jobs.store.position(job).await.ok();
        if position.is_some() && position != seen.position {
            seen.position = position;
            let p = position.unwrap_or(0);
            out.extend_from_slice(&sse(
                "position",
                &json!({"id": job.id, "position": p, "estimated_start": jobs.estimated_start(p) / 1000}),
            ));
        }
    }
    if job.attempts > seen.attempts {
        // Started since last looked (a short attempt may already be over).
        for attempt in seen.attempts + 1..=job.attempts {
            out.extend_from_slice(&sse("started", &json!({"id": job.id, "attempt": attempt})));
        }
        seen.attempts = job.attempts;
    }
    if job.status == Status::Retrying && seen.status != Some(Status::Retrying) {
        out.extend_from_slice(&sse(
            "retrying",
            &json!({"id": job.id, "attempts": job.attempts, "error": job.error, "next_attempt_ms": job.next_attempt_ms}),
        ));
    }
    if job.status.is_terminal() {
        out.extend_from_slice(&sse(
            job.status.as_str(),
            &serde_json::to_value(job).unwrap_or_default(),
        ));
        seen.done = true;
    }
    seen.status = Some(job.status);
    (!out.is_empty()).then(|| bytes::Bytes::from(out))
}

fn sse(event: &str, data: &Value) -> Vec<u8> {
    format!("event: {event}\ndata: {data}\n\n").into_bytes()
}

/// The jobs subsystem for an admin caller: `Authorization: Bearer <--admin-token>`
/// ([`super::admin::check`]).
fn admin<'a>(state: &'a AppState, headers: &HeaderMap) -> Result<&'a Arc<Jobs>, ApiError> {
    let jobs = jobs_of(state)?;
    super::admin::check(
        jobs.admin_token.as_ref(),
        headers,
        "the dead-letter endpoints",
    )?;
    Ok(jobs)
}

/// `GET /admin/jobs/dead-letters`.
pub(super) async fn dead_letters(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let result = async {
        let jobs = admin(&state, &headers)?;
        let retention = Policy::of(&state.dispatcher.config(), "").retention;
        let dead = jobs
            .store
            .dead_letters(retention)
            .await
            .map_err(store_error)?;
        Ok::<_, ApiError>(Json(json!({"object": "list", "data": dead})).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /admin/jobs/dead-letters/{id}`.
pub(super) async fn dead_letter(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let result = async {
        let jobs = admin(&state, &headers)?;
        let retention = Policy::of(&state.dispatcher.config(), "").retention;
        let dead = jobs
            .store
            .dead_letters(retention)
            .await
            .map_err(store_error)?;
        let job = dead
            .into_iter()
            .find(|j| j.id == id)
            .ok_or_else(|| not_found(&id))?;
        Ok::<_, ApiError>(Json(job).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /admin/jobs/dead-letters/{id}/redrive`.
pub(super) async fn redrive_one(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    redrive(&state, &headers, Some(&id)).await
}

/// `POST /admin/jobs/dead-letters/redrive`.
pub(super) async fn redrive_all(State(state): State<AppState>, headers: HeaderMap) -> Response {
    redrive(&state, &headers, None).await
}

async fn redrive(state: &AppState, headers: &HeaderMap, id: Option<&str>) -> Response {
    let result = async {
        let jobs = admin(state, headers)?;
        let n = jobs.store.redrive(id).await.map_err(store_error)?;
        if let Some(id) = id
            && n == 0
        {
            return Err(not_found(id));
        }
        let m = crate::jobs::metrics::get();
        for _ in 0..n {
            m.state("redriven");
        }
        tracing::info!(redriven = n, "dead letters re-driven");
        Ok::<_, ApiError>(Json(json!({"redriven": n})).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}

/// `DELETE /admin/jobs/dead-letters`.
pub(super) async fn purge(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let result = async {
        let jobs = admin(&state, &headers)?;
        let n = jobs.store.purge().await.map_err(store_error)?;
        tracing::info!(purged = n, "dead letters purged");
        Ok::<_, ApiError>(Json(json!({"purged": n})).into_response())
    };
    result.await.unwrap_or_else(IntoResponse::into_response)
}
