//! The in-memory job store (standalone). Same semantics as Redis within one process: jobs in
//! order, retries after their delay, dead letters with retention. A restart loses every
//! job, pending or finished: run with `--redis` for work that must survive one.

use super::store::{Claim, JobStore, Result, Step, Submitted};
use super::{Job, Policy, Status};
use std::collections::{HashMap, HashSet, VecDeque};
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
    /// Jobs whose caller has been (or is being) notified: id -> lease end (`None`: for good).
    reported: HashMap<String, Option<Instant>>,
    /// Jobs held by a worker.
    claimed: HashSet<String>,
    /// Jobs not over yet per (tier, tenant).
    pending: HashMap<(String, String), u64>,
    /// Lines of each batch not over yet ([`JobStore::open_batch`]).
    batches: HashMap<String, u64>,
    /// Batch API files and batches: value and when it is forgotten.
    kv: HashMap<String, (String, Instant)>,
    next_seq: u64,
    /// Seq of the last job handed to a worker.
    delivered: u64,
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

    /// Counts `job` down in its batch, if it is a line of one still counted.
    fn line_over(&mut self, job: &Job) {
        let Some(batch) = &job.batch else { return };
        if let Some(n) = self.batches.get_mut(batch) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.batches.remove(batch);
            }
        }
    }

    /// Forgets jobs past their TTL, and with them their dead letters and "reported" marks
    /// (a mark whose lease still runs is kept).
    fn forget_expired(&mut self, now: Instant) {
        self.jobs.retain(|_, s| s.expires.is_none_or(|e| e > now));
        let jobs = &self.jobs;
        self.reported
            .retain(|id, lease| jobs.contains_key(id) || lease.is_some_and(|until| until > now));
        self.dead.retain(|(id, _)| jobs.contains_key(id));
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many "reported" marks are kept (bounded by the jobs kept).
    #[cfg(test)]
    pub(crate) fn reported_marks(&self) -> usize {
        self.lock().reported.len()
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

    async fn claim(&self, _consumer: &str, wait: Duration) -> Result<Option<Claim>> {
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
                    inner.claimed.insert(id.clone());
                    return Ok(Some(Claim { job, entry: id }));
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

    async fn keep(&self, _claim: &Claim, _consumer: &str) -> Result<()> {
        Ok(())
    }

    async fn save(&self, _claim: &Claim, job: &Job, step: Step, policy: &Policy) -> Result<bool> {
        let now = Instant::now();
        {
            let mut guard = self.lock();
            let inner = &mut *guard;
            let Some(stored) = inner.jobs.get_mut(&job.id) else {
                return Ok(false);
            };
            // Over already (cancelled, or finished by a holder whose claim this one
            // outlived): never reopened.
            if stored.job.status.is_terminal() {
                return Ok(false);
            }
            stored.job = job.clone();
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
                        inner.dead.push((job.id.clone(), now));
                    }
                    inner.pending_down(job);
                    inner.line_over(job);
                }
            }
        }
        if matches!(step, Step::Retry { .. }) {
            self.ready.notify_one();
        }
        Ok(true)
    }

    async fn ack(&self, claim: &Claim) -> Result<()> {
        self.lock().claimed.remove(&claim.entry);
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
            inner.line_over(&job);
        }
        // A job waiting for its retry goes back to the queue, cancelled, for a worker to tell
        // its caller.
        let waiting = inner.delayed.len();
        inner.delayed.retain(|(_, d)| d != id);
        if inner.delayed.len() < waiting {
            inner.enqueue(id);
            drop(inner);
            self.ready.notify_one();
        }
        Ok(Some(job))
    }

    async fn begin_report(&self, id: &str, lease: Duration) -> Result<bool> {
        let now = Instant::now();
        let mut inner = self.lock();
        match inner.reported.get(id) {
            Some(None) => Ok(false),
            Some(Some(until)) if *until > now => Ok(false),
            _ => {
                inner.reported.insert(id.to_owned(), Some(now + lease));
                Ok(true)
            }
        }
    }

    async fn reported(&self, id: &str) -> Result<bool> {
        Ok(matches!(self.lock().reported.get(id), Some(None)))
    }

    async fn end_report(&self, job: &Job, _policy: &Policy) -> Result<()> {
        let mut inner = self.lock();
        inner.reported.insert(job.id.clone(), None);
        if let Some(stored) = inner.jobs.get_mut(&job.id) {
            stored.job.deliveries = job.deliveries.clone();
        }
        Ok(())
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
                inner.reported.remove(&dead_id);
                if let Some(stored) = inner.jobs.get_mut(&dead_id) {
                    stored.job.reset();
                    stored.job.seq = seq;
                    stored.expires = None;
                    let job = stored.job.clone();
                    inner.pending_up(&job);
                    if let Some(left) = job.batch.as_ref().and_then(|b| inner.batches.get_mut(b)) {
                        *left += 1;
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

    async fn open_batch(&self, id: &str, lines: u64) -> Result<()> {
        if lines > 0 {
            self.lock().batches.insert(id.to_owned(), lines);
        }
        Ok(())
    }

    async fn batch_left(&self, id: &str) -> Result<u64> {
        Ok(self.lock().batches.get(id).copied().unwrap_or(0))
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
