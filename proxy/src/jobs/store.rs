//! Where jobs live: one trait, two backends (in memory, Redis Streams), dispatched over an
//! enum.
//!
//! The contract both keep:
//! - [`JobStore::submit`] records a job and queues it, unless its tenant already has its
//!   bound of pending jobs in its tier: the count and the queueing are one atomic step (one
//!   Lua script in Redis, one lock in memory), so concurrent submissions never pass the
//!   bound. A queued job is claimed by exactly one
//!   worker at a time ([`JobStore::claim`]), in the order queued, retries when their delay is
//!   over.
//! - A claim is held until acknowledged ([`JobStore::ack`]). In Redis a claim not kept alive
//!   ([`JobStore::keep`]) for the visibility timeout is taken by another replica, so a job
//!   held by a replica that died is run again (at least once). `keep`, `save` and `ack`
//!   act only for the claim's holder: one whose claim was taken over (or whose job was
//!   queued again since) changes nothing.
//! - Every change of a claimed job is written with [`JobStore::save`] before the claim is
//!   acknowledged. `save` refuses (returns `false`) once the job is over (cancelled, or
//!   finished by another holder), or when the claim is no longer the caller's.
//! - A job's outcome is told under a lease ([`JobStore::begin_notice`]), one per *round*
//!   (the outcome since the job's last re-drive): one holder at a time, renewed while it
//!   sends ([`JobStore::renew_notice`]); each channel's delivery is recorded as it ends
//!   ([`JobStore::record_notice`]) and never sent again. The lease is fenced by its holder's
//!   token and the round: a holder whose lease lapsed, or whose job was re-driven, can
//!   neither renew nor record. A holder that dies mid-delivery is replaced once the lease
//!   lapses, and the new holder sends only the channels not recorded.
//! - A Batch API batch is created whole or not at all ([`JobStore::create_batch`]). Its
//!   state (phase and counts) changes in the same atomic step as the line that ends, is
//!   cancelled or re-driven; its phase moves only forward (in progress, cancelling,
//!   finalizing, ended), each move a compare-and-set, so a cancel never lands on a batch
//!   that has begun to end. A batch due for a look (window passed, lines over, work of a
//!   holder presumed dead) is listed by [`JobStore::due_batches`] without anyone reading it.

use super::memory::MemoryStore;
use super::redis::RedisStore;
use super::{Job, Policy};
use std::future::Future;
use std::time::Duration;

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis failed or is unreachable.
    #[error("the job store (Redis) failed: {0}")]
    Redis(#[from] ::redis::RedisError),
    /// A stored job could not be read back.
    #[error("a stored job is corrupt: {0}")]
    Corrupt(#[from] serde_json::Error),
}

/// A store result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What [`JobStore::submit`] did.
#[derive(Debug, Clone)]
pub enum Submitted {
    /// Queued.
    Queued {
        /// The job, with its place in the order (`seq`).
        job: Box<Job>,
        /// How many queued jobs are before it.
        ahead: u64,
    },
    /// Refused: its (tier, tenant) pair has `pending` jobs pending, at least the bound.
    Full {
        /// The pair's pending jobs.
        pending: u64,
    },
}

impl Submitted {
    /// The job queued; `None` when refused.
    pub fn queued(self) -> Option<Job> {
        match self {
            Submitted::Queued { job, .. } => Some(*job),
            Submitted::Full { .. } => None,
        }
    }
}

/// What [`JobStore::create_batch`] did.
#[derive(Debug, Clone)]
pub enum Created {
    /// Recorded, its lines queued: the jobs as queued.
    Queued(Vec<Job>),
    /// Refused: its lines would take its (tier, tenant) pair past the bound, with `pending`
    /// jobs pending already.
    Full {
        /// The pair's pending jobs.
        pending: u64,
    },
}

impl Created {
    /// The lines queued; `None` when refused.
    pub fn queued(self) -> Option<Vec<Job>> {
        match self {
            Created::Queued(jobs) => Some(jobs),
            Created::Full { .. } => None,
        }
    }
}

/// A job claimed by a worker.
#[derive(Debug, Clone)]
pub struct Claim {
    /// The job as stored when claimed.
    pub job: Job,
    /// The queue entry held (a stream entry id in Redis; the entry's seq in memory).
    pub entry: String,
    /// Who holds it (the worker's consumer name in Redis).
    pub consumer: String,
}

/// A notifier's hold on one notification: a job's outcome in one round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notifier {
    /// The job.
    pub job: String,
    /// The job's re-drives when its outcome was read ([`Job::redrives`]): a re-drive starts
    /// a new round, and the holder of an older one can no longer record.
    pub round: u32,
    /// This holder's token (random): the lease is its holder's alone.
    pub token: String,
}

impl Notifier {
    /// A fresh holder for `job`'s current outcome.
    pub fn new(job: &Job) -> Self {
        Notifier {
            job: job.id.clone(),
            round: job.redrives,
            token: super::new_id(),
        }
    }
}

/// What [`JobStore::begin_notice`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// The lease is the caller's; the channels already recorded (by a holder that died
    /// before it finished) are not sent again.
    Granted {
        /// The webhook's delivery is recorded.
        webhook: bool,
        /// The email's delivery is recorded.
        email: bool,
    },
    /// Another holder's lease runs: it may be sending now.
    Busy,
    /// Told for good (every channel recorded), or the job is gone.
    Done,
    /// The job was re-driven since this outcome: its notification is not this one.
    Stale,
}

/// What [`JobStore::save`] writes besides the job.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Step {
    /// An attempt starts (the job stays claimed).
    Start,
    /// An attempt failed: queue it again after `delay` and release the claim.
    Retry {
        /// How long until the next attempt.
        delay: Duration,
    },
    /// The job is over (completed, failed, or cancelled); a failed job with
    /// `dead_letter` set goes to the dead letters. The claim is kept until the caller is
    /// notified and [`JobStore::ack`] is called.
    Finish,
}

/// Where a running batch stands ([`BatchState::phase`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Its lines run.
    InProgress,
    /// Cancelled by its caller; its lines are being cancelled.
    Cancelling,
    /// Over: its files are being built; it ends with this outcome.
    Finalizing(Outcome),
}

/// How a batch ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every line over (answered or failed).
    Completed,
    /// Its completion window passed first; the lines not over were cancelled.
    Expired,
    /// Cancelled by its caller.
    Cancelled,
}

impl Phase {
    /// The batch status shown for it (OpenAI's names).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::InProgress => "in_progress",
            Phase::Cancelling => "cancelling",
            Phase::Finalizing(_) => "finalizing",
        }
    }

    /// The phase stored as `status` (and `outcome` when finalizing).
    pub fn parse(status: &str, outcome: Option<&str>) -> Option<Phase> {
        Some(match status {
            "in_progress" => Phase::InProgress,
            "cancelling" => Phase::Cancelling,
            "finalizing" => Phase::Finalizing(Outcome::parse(outcome?)?),
            _ => return None,
        })
    }
}

impl Outcome {
    /// The final status (OpenAI's names).
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Expired => "expired",
            Outcome::Cancelled => "cancelled",
        }
    }

    /// The outcome named `s`.
    pub fn parse(s: &str) -> Option<Outcome> {
        Some(match s {
            "completed" => Outcome::Completed,
            "expired" => Outcome::Expired,
            "cancelled" => Outcome::Cancelled,
            _ => return None,
        })
    }
}

/// A running batch's state, kept by the store beside its record and changed by the same
/// atomic steps that change its lines: reads of a running batch come from it, whatever its
/// size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchState {
    /// Where it stands.
    pub phase: Phase,
    /// Lines in all.
    pub total: u64,
    /// Lines not over yet.
    pub left: u64,
    /// Lines answered.
    pub completed: u64,
    /// Lines failed or cancelled.
    pub failed: u64,
    /// Unix seconds it was cancelled.
    pub cancelling_at: Option<u64>,
    /// Unix seconds it began to end.
    pub finalizing_at: Option<u64>,
    /// Whether the caller of [`JobStore::end_batch`] holds the batch's lease (always `false`
    /// from other calls).
    pub owned: bool,
}

/// The operations of a job store.
pub trait JobStore: Send + Sync {
    /// Records `job` and queues it, unless `bound` > 0 and its (tier, tenant) pair has
    /// `bound` jobs pending already: the count and the queueing are one atomic step.
    fn submit(&self, job: Job, bound: u64) -> impl Future<Output = Result<Submitted>> + Send;

    /// The job `id`, if known (finished jobs are kept for their result TTL).
    fn get(&self, id: &str) -> impl Future<Output = Result<Option<Job>>> + Send;

    /// How many queued jobs are before `job` (for a queued job).
    fn position(&self, job: &Job) -> impl Future<Output = Result<u64>> + Send;

    /// The next job for `consumer`, waiting at most `wait` for one; reclaims jobs whose
    /// claim expired (Redis).
    fn claim(
        &self,
        consumer: &str,
        wait: Duration,
    ) -> impl Future<Output = Result<Option<Claim>>> + Send;

    /// Keeps `claim` alive (resets its visibility timeout); `false` when it is no longer the
    /// caller's (taken over, or acknowledged).
    fn keep(&self, claim: &Claim) -> impl Future<Output = Result<bool>> + Send;

    /// Writes `job` (claimed as `claim`) and does what `step` says; `false` if the job is
    /// over already (cancelled, or finished by another holder) or the claim is no longer
    /// the caller's: nothing written.
    fn save(
        &self,
        claim: &Claim,
        job: &Job,
        step: Step,
        policy: &Policy,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Releases `claim` for good, if it is still the caller's (a claim taken over is left to
    /// its new holder).
    fn ack(&self, claim: &Claim) -> impl Future<Output = Result<()>> + Send;

    /// Cancels job `id` if it has not finished; the job as it is now.
    fn cancel(&self, id: &str) -> impl Future<Output = Result<Option<Job>>> + Send;

    /// Takes the lease on `notifier`'s notification for `lease`, unless another holder's
    /// lease runs, it was told for good, or its round is over (the job re-driven since).
    fn begin_notice(
        &self,
        notifier: &Notifier,
        lease: Duration,
    ) -> impl Future<Output = Result<Notice>> + Send;

    /// Extends `notifier`'s lease by `lease` from now; `false` when it is no longer its
    /// holder's (taken over after it lapsed, or the job re-driven): the holder stops sending.
    fn renew_notice(
        &self,
        notifier: &Notifier,
        lease: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Records `tries`, the delivery of `channel` (ended: delivered, or its tries spent), if
    /// `notifier` still holds the lease; once every channel of `wanted` is recorded, the
    /// notification is told for good and the lease released. `false` (nothing recorded)
    /// when the lease is no longer the holder's.
    fn record_notice(
        &self,
        notifier: &Notifier,
        channel: super::Channel,
        tries: &[super::Delivery],
        wanted: &[super::Channel],
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Dead letters kept less than `retention`, oldest first (older ones are dropped).
    fn dead_letters(&self, retention: Duration) -> impl Future<Output = Result<Vec<Job>>> + Send;

    /// Sends dead letter `id` (every one when `None`) back to the queue with its attempts
    /// reset; how many went.
    fn redrive(&self, id: Option<&str>) -> impl Future<Output = Result<u64>> + Send;

    /// Drops every dead letter (the jobs stay readable, failed, until their TTL); how many.
    fn purge(&self) -> impl Future<Output = Result<u64>> + Send;

    /// Jobs not over yet (queued, running, waiting for a retry) per (tier, tenant); the
    /// tenant is `""` when the gateway is open. Counted as jobs are queued, re-driven,
    /// finished and cancelled.
    fn pending(&self) -> impl Future<Output = Result<Vec<((String, String), u64)>>> + Send;

    /// The pending count of one (tier, tenant) pair.
    fn pending_for(&self, tier: &str, tenant: &str) -> impl Future<Output = Result<u64>> + Send;

    /// Records batch `id` and queues its lines, all or nothing (one script in Redis, one lock
    /// in memory): its description `record` and its lines' list `lines` (kept for
    /// [`super::batch::KEEP`]), its state (every line left, in progress; due for
    /// [`JobStore::due_batches`] when `window` has passed) and `jobs`, its lines (of one tier
    /// and tenant), queued as [`JobStore::submit`] queues them. Refused whole when `bound` >
    /// 0 and the lines would take their (tier, tenant) pair's pending jobs past it (the count
    /// and the queueing in the same atomic step).
    fn create_batch(
        &self,
        id: &str,
        record: String,
        lines: String,
        jobs: Vec<Job>,
        window: Duration,
        bound: u64,
    ) -> impl Future<Output = Result<Created>> + Send;

    /// Batch `id`'s record and, while it runs, its state: one read whatever its size.
    /// `None` when unknown; a state of `None` once it has ended (the record is final).
    fn batch(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<(String, Option<BatchState>)>>> + Send;

    /// Moves batch `id` from in progress to cancelling (at `at`, Unix seconds), atomically: a
    /// batch that has begun to end (finalizing) or ended is left as it is. Its state after;
    /// `None` once ended. The caller then cancels its lines ([`super::batch::cancel`]).
    fn cancel_batch(
        &self,
        id: &str,
        at: u64,
    ) -> impl Future<Output = Result<Option<BatchState>>> + Send;

    /// Decides, atomically, whether batch `id` ends now (at `at`, Unix seconds): every line
    /// over (completed, or cancelled after a cancel) or its window passed with lines left
    /// (expired) moves it to finalizing with that outcome. Its state after; `None` once ended.
    /// `owned` in the state says the caller holds the batch's lease (the visibility timeout
    /// in Redis) to finish the work the state asks for (build the files, or cancel the lines
    /// of a cancelling batch); a caller that dies leaves it to [`JobStore::due_batches`] once
    /// the lease is over.
    fn end_batch(
        &self,
        id: &str,
        at: u64,
    ) -> impl Future<Output = Result<Option<BatchState>>> + Send;

    /// Stores `record`, batch `id`'s final description, and forgets its state, if it is still
    /// finalizing; whether it was (else someone else closed it).
    fn close_batch(&self, id: &str, record: String) -> impl Future<Output = Result<bool>> + Send;

    /// Batches due for a look ([`JobStore::end_batch`]): past their window, with every line
    /// over and nobody ending them, cancelling, or finalizing, each for longer than the
    /// lease.
    fn due_batches(&self) -> impl Future<Output = Result<Vec<String>>> + Send;

    /// Stores `value` under `key` for `ttl` (Batch API files and batches).
    fn put(
        &self,
        key: &str,
        value: String,
        ttl: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The value under `key`, if kept.
    fn fetch(&self, key: &str) -> impl Future<Output = Result<Option<String>>> + Send;
}

/// The configured backend.
#[derive(Debug)]
pub enum Store {
    /// In this process (standalone).
    Memory(MemoryStore),
    /// In Redis Streams (cluster).
    Redis(RedisStore),
}

macro_rules! each {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            Store::Memory($s) => $e,
            Store::Redis($s) => $e,
        }
    };
}

impl JobStore for Store {
    async fn submit(&self, job: Job, bound: u64) -> Result<Submitted> {
        each!(self, s => s.submit(job, bound).await)
    }
    async fn get(&self, id: &str) -> Result<Option<Job>> {
        each!(self, s => s.get(id).await)
    }
    async fn position(&self, job: &Job) -> Result<u64> {
        each!(self, s => s.position(job).await)
    }
    async fn claim(&self, consumer: &str, wait: Duration) -> Result<Option<Claim>> {
        each!(self, s => s.claim(consumer, wait).await)
    }
    async fn keep(&self, claim: &Claim) -> Result<bool> {
        each!(self, s => s.keep(claim).await)
    }
    async fn save(&self, claim: &Claim, job: &Job, step: Step, policy: &Policy) -> Result<bool> {
        each!(self, s => s.save(claim, job, step, policy).await)
    }
    async fn ack(&self, claim: &Claim) -> Result<()> {
        each!(self, s => s.ack(claim).await)
    }
    async fn cancel(&self, id: &str) -> Result<Option<Job>> {
        each!(self, s => s.cancel(id).await)
    }
    async fn begin_notice(&self, notifier: &Notifier, lease: Duration) -> Result<Notice> {
        each!(self, s => s.begin_notice(notifier, lease).await)
    }
    async fn renew_notice(&self, notifier: &Notifier, lease: Duration) -> Result<bool> {
        each!(self, s => s.renew_notice(notifier, lease).await)
    }
    async fn record_notice(
        &self,
        notifier: &Notifier,
        channel: super::Channel,
        tries: &[super::Delivery],
        wanted: &[super::Channel],
    ) -> Result<bool> {
        each!(self, s => s.record_notice(notifier, channel, tries, wanted).await)
    }
    async fn dead_letters(&self, retention: Duration) -> Result<Vec<Job>> {
        each!(self, s => s.dead_letters(retention).await)
    }
    async fn redrive(&self, id: Option<&str>) -> Result<u64> {
        each!(self, s => s.redrive(id).await)
    }
    async fn purge(&self) -> Result<u64> {
        each!(self, s => s.purge().await)
    }
    async fn pending(&self) -> Result<Vec<((String, String), u64)>> {
        each!(self, s => s.pending().await)
    }
    async fn pending_for(&self, tier: &str, tenant: &str) -> Result<u64> {
        each!(self, s => s.pending_for(tier, tenant).await)
    }
    async fn create_batch(
        &self,
        id: &str,
        record: String,
        lines: String,
        jobs: Vec<Job>,
        window: Duration,
        bound: u64,
    ) -> Result<Created> {
        each!(self, s => s.create_batch(id, record, lines, jobs, window, bound).await)
    }
    async fn batch(&self, id: &str) -> Result<Option<(String, Option<BatchState>)>> {
        each!(self, s => s.batch(id).await)
    }
    async fn cancel_batch(&self, id: &str, at: u64) -> Result<Option<BatchState>> {
        each!(self, s => s.cancel_batch(id, at).await)
    }
    async fn end_batch(&self, id: &str, at: u64) -> Result<Option<BatchState>> {
        each!(self, s => s.end_batch(id, at).await)
    }
    async fn close_batch(&self, id: &str, record: String) -> Result<bool> {
        each!(self, s => s.close_batch(id, record).await)
    }
    async fn due_batches(&self) -> Result<Vec<String>> {
        each!(self, s => s.due_batches().await)
    }
    async fn put(&self, key: &str, value: String, ttl: Duration) -> Result<()> {
        each!(self, s => s.put(key, value, ttl).await)
    }
    async fn fetch(&self, key: &str) -> Result<Option<String>> {
        each!(self, s => s.fetch(key).await)
    }
}
