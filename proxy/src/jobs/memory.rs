//! The in-memory job store (standalone). Same semantics as Redis within one process: jobs in
//! order, retries after their delay, dead letters with retention. A restart loses every
//! job, pending or finished: run with `--redis` for work that must survive one.

use super::batch::{KEEP, batch_key, lines_key};
use super::store::{
    BatchState, Claim, Created, JobStore, Notice, Notifier, Outcome, Phase, Result, Step, Submitted,
};
use super::{Channel, Delivery, Job, Policy, Status};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Jobs kept in this process.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Pulsed when a job becomes ready.
    ready: Notify,
}

#[derive(Debug, Default)]
struct Inner {
    jobs: HashMap<String, Stored>,
    /// Queued ids in order, with their seq.
    queue: VecDeque<(u64, String)>,
    /// Retries: when each is due.
    delayed: Vec<(Instant, String)>,
    /// Dead letters: id and when it died.
    dead: Vec<(String, Instant)>,
    /// Notifications of jobs' outcomes being told, or told: job id -> where it stands.
    notices: HashMap<String, Told>,
    /// Jobs held by a worker: id -> the seq of the entry held (a job queued again since has
    /// a newer one, and the older claim is no longer its holder's).
    claimed: HashMap<String, u64>,
    /// Jobs not over yet per (tier, tenant).
    pending: HashMap<(String, String), u64>,
    /// Batches running ([`JobStore::create_batch`]) until they are closed.
    batches: HashMap<String, Run>,
    /// Batch API files and batches: value and when it is forgotten.
    kv: HashMap<String, (String, Instant)>,
    next_seq: u64,
    /// Seq of the last job handed to a worker.
    delivered: u64,
}

/// How long the holder of a batch (ending it, cancelling its lines) has before
/// [`JobStore::due_batches`] lists the batch again for someone else.
pub const LEASE: Duration = Duration::from_secs(30);

/// A running batch.
#[derive(Debug)]
struct Run {
    state: BatchState,
    /// The end of its completion window.
    deadline: Instant,
    /// When [`JobStore::due_batches`] lists it.
    due: Instant,
}

/// Where one job's notification stands (for its current round).
#[derive(Debug, Default)]
struct Told {
    /// The round (the job's re-drives) it is about.
    round: u32,
    /// Who holds the lease (token) and until when.
    holder: Option<(String, Instant)>,
    /// The channels whose delivery is recorded.
    webhook: bool,
    email: bool,
    /// Every channel wanted is recorded.
    done: bool,
}

impl Told {
    /// Whether `notifier` holds this lease (its round, its token; lapsed or not, as long as
    /// nobody took it over).
    fn held_by(&self, notifier: &Notifier) -> bool {
        !self.done
            && self.round == notifier.round
            && self
                .holder
                .as_ref()
                .is_some_and(|(token, _)| *token == notifier.token)
    }
}

#[derive(Debug)]
struct Stored {
    job: Job,
    /// When a finished job is forgotten.
    expires: Option<Instant>,
}

impl Inner {
    fn enqueue(&mut self, id: &str) -> u64 {
        self.next_seq += 1;
        let seq = self.next_seq;
        self.queue.push_back((seq, id.to_owned()));
        seq
    }

    fn promote_due(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.delayed.len() {
            if self.delayed[i].0 <= now {
                let (_, id) = self.delayed.swap_remove(i);
                let seq = self.enqueue(&id);
                if let Some(s) = self.jobs.get_mut(&id) {
                    s.job.seq = seq;
                }
            } else {
                i += 1;
            }
        }
    }

    fn pending_up(&mut self, job: &Job) {
        *self.pending.entry(job.pending_key()).or_default() += 1;
    }

    fn pending_down(&mut self, job: &Job) {
        let key = job.pending_key();
        if let Some(n) = self.pending.get_mut(&key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pending.remove(&key);
            }
        }
    }

    /// Counts `job`, over now, in its batch if that still runs: one line fewer left, one more
    /// completed or failed; the last line over makes the batch due once the lease of the
    /// worker that ends it has passed (it ends it at once unless it dies).
    fn line_over(&mut self, job: &Job, now: Instant) {
        let Some(run) = job.batch.as_ref().and_then(|b| self.batches.get_mut(b)) else {
            return;
        };
        let s = &mut run.state;
        s.left = s.left.saturating_sub(1);
        if job.status == Status::Completed {
            s.completed += 1;
        } else {
            s.failed += 1;
        }
        if s.left == 0 && matches!(s.phase, Phase::InProgress | Phase::Cancelling) {
            run.due = now + LEASE;
        }
    }

    /// Forgets jobs past their TTL, and with them their dead letters and notification
    /// marks.
    fn forget_expired(&mut self, now: Instant) {
        self.jobs.retain(|_, s| s.expires.is_none_or(|e| e > now));
        let jobs = &self.jobs;
        self.notices.retain(|id, _| jobs.contains_key(id));
        self.dead.retain(|(id, _)| jobs.contains_key(id));
    }

    /// The notification of `notifier`'s job in its round, if the job is kept and still in
    /// that round.
    fn notice(&mut self, notifier: &Notifier) -> std::result::Result<&mut Told, Notice> {
        let job = self.jobs.get(&notifier.job).ok_or(Notice::Done)?;
        if job.job.redrives != notifier.round {
            return Err(Notice::Stale);
        }
        let told = self.notices.entry(notifier.job.clone()).or_default();
        if told.round != notifier.round {
            *told = Told {
                round: notifier.round,
                ..Told::default()
            };
        }
        Ok(told)
    }
}

impl Inner {
    /// Whether `claim` is still its holder's: the job's latest entry, not acknowledged.
    fn holds(&self, claim: &Claim) -> bool {
        let seq = claim.entry.parse::<u64>().ok();
        seq.is_some() && self.claimed.get(&claim.job.id).copied() == seq
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many notification marks are kept (bounded by the jobs kept).
    #[cfg(test)]
    pub(crate) fn reported_marks(&self) -> usize {
        self.lock().notices.len()
    }

    /// How many dead letters are kept, unread.
    #[cfg(test)]
    pub(crate) fn dead_kept(&self) -> usize {
        self.lock().dead.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl JobStore for MemoryStore {
    async fn submit(&self, mut job: Job, bound: u64) -> Result<Submitted> {
        let ahead = {
            let mut inner = self.lock();
            inner.forget_expired(Instant::now());
            // Counted and queued under one lock: concurrent submissions never pass the bound.
            let pending = inner.pending.get(&job.pending_key()).copied().unwrap_or(0);
            if bound > 0 && pending >= bound {
                return Ok(Submitted::Full { pending });
            }
            job.seq = inner.enqueue(&job.id);
            let ahead = job.seq.saturating_sub(inner.delivered + 1);
            inner.pending_up(&job);
            inner.jobs.insert(
                job.id.clone(),
                Stored {
                    job: job.clone(),
                    expires: None,
                },
            );
            ahead
        };
        self.ready.notify_one();
        Ok(Submitted::Queued {
            job: Box::new(job),
            ahead,
        })
    }

    async fn get(&self, id: &str) -> Result<Option<Job>> {
        let now = Instant::now();
        Ok(self
            .lock()
            .jobs
            .get(id)
            .filter(|s| s.expires.is_none_or(|e| e > now))
            .map(|s| s.job.clone()))
    }

    async fn position(&self, job: &Job) -> Result<u64> {
        let inner = self.lock();
        Ok(job.seq.saturating_sub(inner.delivered + 1))
    }

    async fn claim(&self, consumer: &str, wait: Duration) -> Result<Option<Claim>> {
        let until = Instant::now() + wait;
        loop {
            let notified = self.ready.notified();
            let next_due = {
                let mut inner = self.lock();
                inner.promote_due(Instant::now());
                while let Some((seq, id)) = inner.queue.pop_front() {
                    inner.delivered = inner.delivered.max(seq);
                    let Some(stored) = inner.jobs.get(&id) else {
                        continue;
                    };
                    // Over already; but a job cancelled while queued is handed over once so
                    // that its caller is told.
                    if stored.job.status.is_terminal() && stored.job.status != Status::Cancelled {
                        continue;
                    }
                    let job = stored.job.clone();
                    inner.claimed.insert(id, seq);
                    return Ok(Some(Claim {
                        job,
                        entry: seq.to_string(),
                        consumer: consumer.to_owned(),
                    }));
                }
                inner.delayed.iter().map(|(at, _)| *at).min()
            };
            let now = Instant::now();
            if now >= until {
                return Ok(None);
            }
            let wake = next_due.map_or(until, |due| due.min(until));
            tokio::select! {
                () = notified => {}
                () = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn keep(&self, claim: &Claim) -> Result<bool> {
        Ok(self.lock().holds(claim))
    }

    async fn save(&self, claim: &Claim, job: &Job, step: Step, policy: &Policy) -> Result<bool> {
        let now = Instant::now();
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let owned = inner.holds(claim);
            let Some(stored) = inner.jobs.get_mut(&job.id) else {
                return Ok(false);
            };
            // Over already (cancelled, or finished by a holder whose claim this one
            // outlived): never reopened. Nor written by a holder whose job was queued again
            // (re-driven) since its claim.
            if stored.job.status.is_terminal() || !owned {
                return Ok(false);
            }
            // The deliveries are the notifications' own (recorded by `record_notice`).
            let deliveries = std::mem::take(&mut stored.job.deliveries);
            stored.job = job.clone();
            stored.job.deliveries = deliveries;
            match step {
                Step::Start => {}
                Step::Retry { delay } => {
                    inner.claimed.remove(&job.id);
                    inner.delayed.push((now + delay, job.id.clone()));
                }
                Step::Finish => {
                    let kept = policy.kept(job);
                    stored.expires = Some(now + kept);
                    if job.dead_letter {
                        // Trimmed as it grows, not only when listed.
                        inner.dead.retain(|(_, at)| *at + policy.retention > now);
                        inner.dead.push((job.id.clone(), now));
                    }
                    inner.pending_down(job);
                    inner.line_over(job, now);
                }
            }
        }
        if matches!(step, Step::Retry { .. }) {
            self.ready.notify_one();
        }
        Ok(true)
    }

    async fn ack(&self, claim: &Claim) -> Result<()> {
        let mut inner = self.lock();
        if inner.holds(claim) {
            inner.claimed.remove(&claim.job.id);
        }
        Ok(())
    }

    async fn cancel(&self, id: &str) -> Result<Option<Job>> {
        let mut inner = self.lock();
        let Some(stored) = inner.jobs.get_mut(id) else {
            return Ok(None);
        };
        let over = stored.job.status.is_terminal();
        if !over {
            stored.job.status = Status::Cancelled;
            stored.job.finished_ms = Some(super::now_ms());
            stored.job.next_attempt_ms = None;
            stored.expires = Some(Instant::now() + super::CANCELLED_KEPT);
        }
        let job = stored.job.clone();
        if !over {
            inner.pending_down(&job);
            inner.line_over(&job, Instant::now());
        }
        // A job waiting for its retry goes back to the queue, cancelled, for a worker to tell
        // its caller.
        let waiting = inner.delayed.len();
        inner.delayed.retain(|(_, d)| d != id);
        if inner.delayed.len() < waiting {
            let seq = inner.enqueue(id);
            if let Some(stored) = inner.jobs.get_mut(id) {
                stored.job.seq = seq;
            }
            drop(inner);
            self.ready.notify_one();
        }
        Ok(Some(job))
    }

    async fn begin_notice(&self, notifier: &Notifier, lease: Duration) -> Result<Notice> {
        let now = Instant::now();
        let mut inner = self.lock();
        let told = match inner.notice(notifier) {
            Ok(told) => told,
            Err(found) => return Ok(found),
        };
        if told.done {
            return Ok(Notice::Done);
        }
        if let Some((token, until)) = &told.holder
            && *token != notifier.token
            && *until > now
        {
            return Ok(Notice::Busy);
        }
        told.holder = Some((notifier.token.clone(), now + lease));
        Ok(Notice::Granted {
            webhook: told.webhook,
            email: told.email,
        })
    }

    async fn renew_notice(&self, notifier: &Notifier, lease: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.notice(notifier) {
            Ok(told) if told.held_by(notifier) => {
                told.holder = Some((notifier.token.clone(), now + lease));
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn record_notice(
        &self,
        notifier: &Notifier,
        channel: Channel,
        tries: &[Delivery],
        wanted: &[Channel],
    ) -> Result<bool> {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let told = match inner.notice(notifier) {
            Ok(told) if told.held_by(notifier) => told,
            _ => return Ok(false),
        };
        match channel {
            Channel::Webhook => told.webhook = true,
            Channel::Email => told.email = true,
        }
        let (webhook, email) = (told.webhook, told.email);
        if wanted.iter().all(|c| match c {
            Channel::Webhook => webhook,
            Channel::Email => email,
        }) {
            told.done = true;
            told.holder = None;
        }
        if let Some(stored) = inner.jobs.get_mut(&notifier.job) {
            stored.job.deliveries.extend_from_slice(tries);
        }
        Ok(true)
    }

    async fn dead_letters(&self, retention: Duration) -> Result<Vec<Job>> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.dead.retain(|(_, at)| *at + retention > now);
        let ids: Vec<String> = inner.dead.iter().map(|(id, _)| id.clone()).collect();
        Ok(ids
            .iter()
            .filter_map(|id| inner.jobs.get(id).map(|s| s.job.clone()))
            .collect())
    }

    async fn redrive(&self, id: Option<&str>) -> Result<u64> {
        let mut n = 0;
        {
            let mut inner = self.lock();
            let dead = std::mem::take(&mut inner.dead);
            for (dead_id, at) in dead {
                if id.is_some_and(|id| id != dead_id) {
                    inner.dead.push((dead_id, at));
                    continue;
                }
                let seq = inner.enqueue(&dead_id);
                inner.notices.remove(&dead_id);
                if let Some(stored) = inner.jobs.get_mut(&dead_id) {
                    stored.job.reset();
                    stored.job.seq = seq;
                    stored.expires = None;
                    let job = stored.job.clone();
                    inner.pending_up(&job);
                    // A failed line of a running batch runs again.
                    if let Some(run) = job.batch.as_ref().and_then(|b| inner.batches.get_mut(b)) {
                        run.state.left += 1;
                        run.state.failed = run.state.failed.saturating_sub(1);
                    }
                    n += 1;
                }
            }
        }
        if n > 0 {
            self.ready.notify_waiters();
            self.ready.notify_one();
        }
        Ok(n)
    }

    async fn purge(&self) -> Result<u64> {
        let mut inner = self.lock();
        let n = inner.dead.len() as u64;
        inner.dead.clear();
        Ok(n)
    }

    async fn pending(&self) -> Result<Vec<((String, String), u64)>> {
        Ok(self
            .lock()
            .pending
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect())
    }

    async fn pending_for(&self, tier: &str, tenant: &str) -> Result<u64> {
        let key = (tier.to_owned(), tenant.to_owned());
        Ok(self.lock().pending.get(&key).copied().unwrap_or(0))
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
        let now = Instant::now();
        let queued = {
            let mut inner = self.lock();
            inner.forget_expired(now);
            if let Some(first) = jobs.first() {
                let pending = inner.pending.get(&first.pending_key()).copied();
                let pending = pending.unwrap_or(0);
                if bound > 0 && pending + jobs.len() as u64 > bound {
                    return Ok(Created::Full { pending });
                }
            }
            // The record outlives the window, so the batch can still be ended at its end.
            let until = now + window + KEEP;
            inner.kv.insert(batch_key(id), (record, until));
            inner.kv.insert(lines_key(id), (lines, until));
            let total = jobs.len() as u64;
            let state = BatchState {
                phase: Phase::InProgress,
                total,
                left: total,
                completed: 0,
                failed: 0,
                cancelling_at: None,
                finalizing_at: None,
                owned: false,
            };
            let deadline = now + window;
            inner.batches.insert(
                id.to_owned(),
                Run {
                    state,
                    deadline,
                    due: deadline,
                },
            );
            let queued: Vec<Job> = jobs
                .into_iter()
                .map(|mut job| {
                    job.seq = inner.enqueue(&job.id);
                    inner.pending_up(&job);
                    let stored = Stored {
                        job: job.clone(),
                        expires: None,
                    };
                    inner.jobs.insert(job.id.clone(), stored);
                    job
                })
                .collect();
            queued
        };
        self.ready.notify_waiters();
        self.ready.notify_one();
        Ok(Created::Queued(queued))
    }

    async fn batch(&self, id: &str) -> Result<Option<(String, Option<BatchState>)>> {
        let now = Instant::now();
        let inner = self.lock();
        let Some((record, _)) = inner.kv.get(&batch_key(id)).filter(|(_, t)| *t > now) else {
            return Ok(None);
        };
        Ok(Some((
            record.clone(),
            inner.batches.get(id).map(|r| r.state),
        )))
    }

    async fn cancel_batch(&self, id: &str, at: u64) -> Result<Option<BatchState>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(run) = inner.batches.get_mut(id) else {
            return Ok(None);
        };
        if run.state.phase == Phase::InProgress {
            run.state.phase = Phase::Cancelling;
            run.state.cancelling_at = Some(at);
            run.due = now + LEASE;
        }
        Ok(Some(run.state))
    }

    async fn end_batch(&self, id: &str, at: u64) -> Result<Option<BatchState>> {
        let now = Instant::now();
        let mut inner = self.lock();
        let Some(run) = inner.batches.get_mut(id) else {
            return Ok(None);
        };
        let outcome = match run.state.phase {
            Phase::Finalizing(_) => None,
            Phase::Cancelling if run.state.left > 0 => None,
            Phase::Cancelling => Some(Outcome::Cancelled),
            Phase::InProgress if run.state.left == 0 => Some(Outcome::Completed),
            Phase::InProgress if now >= run.deadline => Some(Outcome::Expired),
            Phase::InProgress => {
                // Not due before its window ends (again, after a re-drive made it run).
                run.due = run.deadline;
                return Ok(Some(run.state));
            }
        };
        let owned = match outcome {
            Some(outcome) => {
                run.state.phase = Phase::Finalizing(outcome);
                run.state.finalizing_at = Some(at);
                true
            }
            // Someone holds it until the lease is over.
            None => run.due <= now,
        };
        if owned {
            run.due = now + LEASE;
        }
        Ok(Some(BatchState { owned, ..run.state }))
    }

    async fn close_batch(&self, id: &str, record: String) -> Result<bool> {
        let mut inner = self.lock();
        let finalizing = inner
            .batches
            .get(id)
            .is_some_and(|r| matches!(r.state.phase, Phase::Finalizing(_)));
        if !finalizing {
            return Ok(false);
        }
        inner.batches.remove(id);
        inner
            .kv
            .insert(batch_key(id), (record, Instant::now() + KEEP));
        Ok(true)
    }

    async fn due_batches(&self) -> Result<Vec<String>> {
        let now = Instant::now();
        Ok(self
            .lock()
            .batches
            .iter()
            .filter(|(_, r)| r.due <= now)
            .map(|(id, _)| id.clone())
            .collect())
    }

    async fn put(&self, key: &str, value: String, ttl: Duration) -> Result<()> {
        let now = Instant::now();
        let mut inner = self.lock();
        inner.kv.retain(|_, (_, until)| *until > now);
        inner.kv.insert(key.to_owned(), (value, now + ttl));
        Ok(())
    }

    async fn fetch(&self, key: &str) -> Result<Option<String>> {
        let now = Instant::now();
        Ok(self
            .lock()
            .kv
            .get(key)
            .filter(|(_, until)| *until > now)
            .map(|(v, _)| v.clone()))
    }
}
