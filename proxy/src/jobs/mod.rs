//! Durable async work: a caller hands a chat request over (`POST /v1/jobs`), gets an id at
//! once, and is told when the answer is ready (webhook, or the job's event stream).
//!
//! - [`store`]: where jobs live. One trait ([`JobStore`]) with two backends behind an enum
//!   ([`Store`]): [`memory`] (standalone; a restart loses pending work) and [`redis`] (Redis
//!   Streams with a consumer group: a job claimed by a replica that dies is reclaimed by
//!   another after the visibility timeout).
//! - [`worker`]: each replica's workers claim jobs and run them through
//!   [`pipeline::chat`](crate::pipeline::chat) in the tenant's tier, retry failures with
//!   exponential backoff ([`retry`], from the TierQueue's `retry`), and dead-letter a job
//!   whose attempts are spent.
//! - [`webhook`]: the signed notification sent when a job completes or finally fails;
//!   [`email`]: the same news by email (SMTP with STARTTLS).
//!
//! Work is done at least once; its outcome is written before its queue entry is
//! acknowledged. Each outcome is one *notification* ([`Job::notice_id`]: the job id and its
//! re-drive count), sent by whoever holds its lease ([`store::Notifier`], renewed while it
//! sends; a holder presumed dead is replaced once the lease lapses). A channel whose delivery
//! was recorded (a 2xx, a mail accepted, or its tries spent) is never sent again; the lease
//! is fenced by its holder's token, so a stale holder cannot renew or record over the one
//! that replaced it, and stops sending at its next renewal. Delivery is *at least once* per
//! notification: one that reached the receiver but whose end was not recorded is sent again
//! with the same id (`floodgate-webhook-id`, `Message-ID`), by which receivers must drop it.
//! That happens when its holder is killed with a try in flight, shuts down gracefully
//! (SIGTERM gives up the notifications in flight unrecorded), stalls or loses Redis past the
//! lease (it learns so only at its next renewal, and may send one more try meanwhile), or
//! when a try times out (10 s) and is retried. `docs/architecture.md` (Async jobs) lists them.

pub mod address;
pub mod batch;
pub mod email;
pub mod memory;
pub mod metrics;
pub mod redis;
pub mod retry;
pub mod store;
pub mod webhook;
pub mod worker;

pub use store::{
    BatchState, Claim, Created, JobStore, Outcome, Phase, Step, Store, StoreError, Submitted,
};

use crate::config::Config;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long a cancelled job stays readable (`GET /v1/jobs/{id}`) before it is forgotten.
pub const CANCELLED_KEPT: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// Where a job stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Waiting for a worker.
    Queued,
    /// A worker runs it now.
    Running,
    /// An attempt failed; it waits for its next attempt.
    Retrying,
    /// Answered; the answer is in `result`.
    Completed,
    /// Finally failed (attempts spent, or a failure no retry can mend); in the dead letters.
    Failed,
    /// Cancelled by its caller.
    Cancelled,
}

impl Status {
    /// Whether the job is over.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }

    /// The name used in the API and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Retrying => "retrying",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Whom to tell when the job is over.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Notify {
    /// URL the outcome is POSTed to, signed (`webhook` module). Needs a tier with webhook
    /// settings (their signing secret signs it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
    /// Address told by email ([`email`]). Needs a tier with email settings (their SMTP
    /// server sends it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
}

/// Why an attempt or the job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// A low-cardinality code (the door's error code, e.g. `upstream_server_error`).
    pub code: String,
    /// What happened, for people.
    pub message: String,
}

/// One attempt of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1 for the first.
    pub attempt: u32,
    /// Unix milliseconds it started.
    pub started_ms: u64,
    /// Unix milliseconds it ended.
    pub ended_ms: u64,
    /// Why it failed; absent when it succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Provider that answered, when one did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
}

/// How a caller is notified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channel {
    /// A signed POST ([`webhook`]).
    #[default]
    Webhook,
    /// An email over SMTP ([`email`]).
    Email,
}

impl Channel {
    /// Its name (in delivery records and the store).
    pub fn as_str(self) -> &'static str {
        match self {
            Channel::Webhook => "webhook",
            Channel::Email => "email",
        }
    }
}

/// One notification try (webhook or email).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// Unix milliseconds it was sent.
    pub at_ms: u64,
    /// Which channel (jobs stored before email existed have webhook deliveries only).
    #[serde(default)]
    pub channel: Channel,
    /// `delivered`; a webhook's `http_<status>`, an email's `smtp_<code>`; or `error` (no
    /// answer).
    pub outcome: String,
}

/// A job: the request, who asked, where it stands and what came of it. Stored whole (as
/// JSON) by both backends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// `job_<hex>`.
    pub id: String,
    /// Always `job`.
    pub object: String,
    /// The tenant that asked; `None` when the gateway is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The tier it runs in.
    pub tier: String,
    /// The chat completion request (OpenAI format), run without streaming.
    pub request: Value,
    /// Whom to tell.
    #[serde(default)]
    pub notify: Notify,
    /// The caller's own key-value pairs, returned as given.
    #[serde(default)]
    pub metadata: serde_json::Map<String, Value>,
    /// Where it stands.
    pub status: Status,
    /// Attempts made.
    pub attempts: u32,
    /// Attempts allowed (TierQueue `retry.maxAttempts` when it was queued).
    pub max_attempts: u32,
    /// Every attempt, oldest first.
    #[serde(default)]
    pub history: Vec<AttemptRecord>,
    /// The chat completion, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// The last failure, once failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
    /// Whether it is in the dead letters.
    #[serde(default)]
    pub dead_letter: bool,
    /// Unix milliseconds it was accepted.
    pub created_ms: u64,
    /// Unix milliseconds its last attempt started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    /// Unix milliseconds it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_ms: Option<u64>,
    /// Unix milliseconds of its next attempt, while retrying.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_ms: Option<u64>,
    /// Notification tries (webhook and email), oldest first.
    #[serde(default)]
    pub deliveries: Vec<Delivery>,
    /// Its place in the queue's order (set by the store when queued).
    #[serde(default)]
    pub seq: u64,
    /// Times it waited for capacity (no key with budget in time, its tenant's own limits)
    /// without spending an attempt; at most [`MAX_DEFERRALS`].
    #[serde(default)]
    pub deferrals: u32,
    /// The batch this job is a line of (Batch API), whose files are built when its last
    /// line is over.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Times it was re-driven from the dead letters: each run to an end is notified under
    /// its own id ([`Job::notice_id`]).
    #[serde(default)]
    pub redrives: u32,
}

/// The most times a job waits for capacity without spending an attempt: at most a minute
/// each, about a day in all; after that a refusal for capacity counts as an attempt.
pub const MAX_DEFERRALS: u32 = 1440;

impl Job {
    /// A new queued job.
    pub fn new(tenant: Option<String>, tier: String, request: Value, max_attempts: u32) -> Self {
        Job {
            id: new_id(),
            object: "job".to_owned(),
            tenant,
            tier,
            request,
            notify: Notify::default(),
            metadata: serde_json::Map::new(),
            status: Status::Queued,
            attempts: 0,
            max_attempts: max_attempts.max(1),
            history: Vec::new(),
            result: None,
            error: None,
            dead_letter: false,
            created_ms: now_ms(),
            started_ms: None,
            finished_ms: None,
            next_attempt_ms: None,
            deliveries: Vec::new(),
            deferrals: 0,
            seq: 0,
            batch: None,
            redrives: 0,
        }
    }

    /// The id of the notification of this job's current outcome: `<job id>.<re-drives>`
    /// (`job_….0` for the first; a re-driven job's next outcome is `.1`, and so on). The
    /// webhook sends it as `floodgate-webhook-id` and the email's `Message-ID` is made from
    /// it, the same on every try and on a re-send by another replica: a receiver drops a
    /// notification whose id it has seen.
    pub fn notice_id(&self) -> String {
        format!("{}.{}", self.id, self.redrives)
    }

    /// Its (tier, tenant) pair, as the pending counts key it (the tenant `""` when the
    /// gateway is open).
    pub fn pending_key(&self) -> (String, String) {
        (self.tier.clone(), self.tenant.clone().unwrap_or_default())
    }

    /// Whether `tenant` may see this job (the same tenant; any caller when the gateway is
    /// open and the job has none).
    pub fn visible_to(&self, tenant: Option<&str>) -> bool {
        self.tenant.as_deref() == tenant
    }

    /// Back to the queue with its attempts reset (a re-drive from the dead letters); its next
    /// outcome is a new notification.
    pub fn reset(&mut self) {
        self.redrives += 1;
        self.status = Status::Queued;
        self.attempts = 0;
        self.dead_letter = false;
        self.error = None;
        self.result = None;
        self.finished_ms = None;
        self.next_attempt_ms = None;
        self.started_ms = None;
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh job id, unique across replicas: `job_` + 16 random bytes in hex.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // No system randomness: time and a counter still make ids unique in this process.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        bytes[..8].copy_from_slice(&now_ms().to_be_bytes());
        bytes[8..].copy_from_slice(&n.to_be_bytes());
    }
    format!("job_{}", hex(&bytes))
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// What the jobs subsystem reads from the TierQueue, resolved per job.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Retries.
    pub retry: retry::Backoff,
    /// Whether a finally failed job is kept in the dead letters.
    pub dead_letters: bool,
    /// How long dead letters are kept.
    pub retention: Duration,
    /// How long a finished job is kept for retrieval.
    pub result_ttl: Duration,
}

impl Policy {
    /// How long `job`, finished, is kept: its result TTL; a dead letter for the dead letters'
    /// retention when longer; a batch line until its batch's files are built, which is at most
    /// the batch's completion window (bounded by [`batch::KEEP`]) after it was queued.
    pub fn kept(&self, job: &Job) -> Duration {
        let mut kept = self.result_ttl;
        if job.dead_letter {
            kept = kept.max(self.retention);
        }
        if job.batch.is_some() {
            kept = kept.max(batch::KEEP);
        }
        kept
    }

    /// The policy of `tier` under `config` (defaults without a TierQueue).
    pub fn of(config: &Config, tier: &str) -> Policy {
        let tq = config.tier_queue.as_ref().map(|tq| &tq.spec);
        let retry = tq.map(|s| s.retry.clone()).unwrap_or_default();
        let dead = tq.map(|s| s.dead_letter.clone()).unwrap_or_default();
        let ttl = tq
            .and_then(|s| s.tiers.iter().find(|t| t.name == tier))
            .and_then(|t| t.async_.as_ref())
            .map_or(86_400, |a| a.result_ttl_seconds);
        Policy {
            retry: retry::Backoff::from_policy(&retry),
            dead_letters: dead.enabled,
            retention: Duration::from_secs(u64::from(dead.retention_seconds)),
            result_ttl: Duration::from_secs(u64::from(ttl)),
        }
    }
}

/// The jobs subsystem of one replica: the store, and what the door and the workers share.
#[derive(Debug)]
pub struct Jobs {
    /// Where jobs live.
    pub store: Store,
    /// Workers on this replica (for the estimated start).
    pub workers: usize,
    /// Whether a job's own webhook may point at internal addresses ([`address`];
    /// `--job-webhook-private-addresses`).
    pub allow_internal_webhooks: bool,
    /// The most jobs one tenant may have pending (not over) in its tier; 0: no bound
    /// (`--job-max-pending-per-tenant`).
    pub max_pending_per_tenant: u64,
    /// The bearer token the admin listener's dead-letter endpoints require
    /// (`--admin-token`); without one they refuse everyone.
    pub admin_token: Option<crate::secret::SecretString>,
    /// Mean run time of this replica's attempts, in milliseconds (for the estimated start).
    mean_run_ms: AtomicU64,
}

impl Jobs {
    /// The subsystem over `store` with `workers` workers; jobs' webhooks may point at
    /// internal addresses when `allow_internal_webhooks`.
    pub fn new(store: Store, workers: usize, allow_internal_webhooks: bool) -> Arc<Self> {
        Self::bounded(store, workers, allow_internal_webhooks, 0, None)
    }

    /// [`Jobs::new`], each tenant allowed at most `max_pending_per_tenant` pending jobs
    /// (0: no bound), the dead letters administered with `admin_token`.
    pub fn bounded(
        store: Store,
        workers: usize,
        allow_internal_webhooks: bool,
        max_pending_per_tenant: u64,
        admin_token: Option<crate::secret::SecretString>,
    ) -> Arc<Self> {
        Arc::new(Jobs {
            store,
            workers: workers.max(1),
            allow_internal_webhooks,
            max_pending_per_tenant,
            admin_token,
            mean_run_ms: AtomicU64::new(1000),
        })
    }

    /// Records an attempt that ran `took` (an exponentially weighted mean).
    pub fn ran(&self, took: Duration) {
        let ms = took.as_millis() as u64;
        let _ = self
            .mean_run_ms
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some((m * 7 + ms) / 8)
            });
    }

    /// When a job with `ahead` jobs before it may start, in Unix milliseconds.
    pub fn estimated_start(&self, ahead: u64) -> u64 {
        let per = self.mean_run_ms.load(Ordering::Relaxed);
        now_ms() + ahead * per / self.workers as u64
    }
}

#[cfg(test)]
mod tests;
