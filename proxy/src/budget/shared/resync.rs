//! Keeping Redis's budgets whole: the epochs of the keys, the re-writing of this replica's
//! record into them, and the monitor that checks Redis whether or not requests ask (see the
//! parent module's doc for the guarantees).

use super::record::{Recorded, Seeds};
use super::{PROBE_BACKOFF, RedisBudgets, Registered, SEEDS_PER_CALL, SharedError, millis};
use floodgate_crds::redis_keys::{BUDGET_REWRITES, KeyBudgetKeys};
use redis::aio::ConnectionManager;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How often the monitor checks while a hold waits for the other replicas' marks (at most
/// its check interval).
const HOLD_POLL: Duration = Duration::from_millis(50);
/// A replica's mark older than this is removed: the replica is long gone.
const MARK_KEPT: Duration = Duration::from_secs(3600);
/// How long the marks live after the last one.
const MARKS_TTL: Duration = Duration::from_secs(24 * 3600);
/// Epochs read per round trip when Redis comes back.
const EPOCHS_PER_CALL: usize = 1000;

/// The replicas' re-write marks ([`BUDGET_REWRITES`]) as this replica last read them.
#[derive(Debug, Default)]
pub(crate) struct Peers {
    /// Replica id -> its mark (Unix ms of Redis `TIME`).
    marks: HashMap<u64, u64>,
    /// When they were read (the start of the check that read them, Redis `TIME`).
    read_at: u64,
}

/// A wait for every replica's re-write, after this replica found a budget lost or Redis
/// back from an outage.
///
/// A replica marks, at the end of each check that succeeded whole, the instant the check
/// began. A check that began after a loss found it (each lost epoch, or the new `run_id`)
/// and re-wrote its record, or had done so earlier; and a replica checks only when its own
/// re-write after an outage is over (the monitor runs one at a time). So a mark at or after
/// `since` says that replica has re-written whatever Redis lacked at `since`.
#[derive(Debug)]
pub(crate) struct Hold {
    /// Redis `TIME` (ms) of the latest loss or return of Redis this replica found.
    since: u64,
    /// The replicas that must mark (this one included): those whose mark was recent when
    /// this replica last read them, before the loss or outage.
    expected: Vec<u64>,
    /// The bound ([`SharedOptions::rewrite_bound`](super::SharedOptions::rewrite_bound)).
    until: Instant,
    /// The local share applies until the hold ends (an outage that left budgets intact).
    local: bool,
    /// Barriers of lost budgets to lift when it ends: their keys and epoch id.
    barriers: Vec<(Arc<KeyBudgetKeys>, String)>,
}

/// What the monitor does next, and after how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Redis answers: check it again after the check interval.
    Check(Duration),
    /// Redis is unreachable: probe it after this pause.
    Probe(Duration),
}

impl Next {
    /// After a check or probe that ended `ok` (or not), given the last pause: checks at the
    /// interval while Redis answers; probes backing off from 50 ms to 250 ms while it does
    /// not.
    pub(crate) fn after(self, ok: bool, check_interval: Duration) -> Next {
        match (ok, self) {
            (true, _) => Next::Check(check_interval),
            (false, Next::Check(_)) => Next::Probe(PROBE_BACKOFF.0),
            (false, Next::Probe(pause)) => Next::Probe((pause * 2).min(PROBE_BACKOFF.1)),
        }
    }

    fn pause(self) -> Duration {
        match self {
            Next::Check(d) | Next::Probe(d) => d,
        }
    }
}

impl RedisBudgets {
    /// Registers a shared key's record, for re-writing into Redis when it lost the budget.
    pub(crate) fn register(
        self: &Arc<Self>,
        keys: &Arc<KeyBudgetKeys>,
        record: Weak<dyn Recorded>,
    ) {
        let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        registry.retain(|_, r| r.record.as_ref().is_none_or(|w| w.strong_count() > 0));
        registry
            .entry(keys.epoch.clone())
            .and_modify(|r| r.record = Some(record.clone()))
            .or_insert_with(|| Registered {
                keys: keys.clone(),
                epoch: None,
                record: Some(record),
            });
        drop(registry);
        self.start_monitor();
    }

    /// The epoch this replica admits on for `keys`, if it joined one.
    pub(super) fn known_epoch(&self, keys: &KeyBudgetKeys) -> Option<String> {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        registry.get(&keys.epoch).and_then(|r| r.epoch.clone())
    }

    fn record_of(&self, keys: &KeyBudgetKeys) -> Option<Arc<dyn Recorded>> {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        registry
            .get(&keys.epoch)
            .and_then(|r| r.record.as_ref())
            .and_then(Weak::upgrade)
    }

    /// Every registered key with the epoch this replica knows.
    fn registered(&self) -> Vec<(Arc<KeyBudgetKeys>, Option<String>)> {
        let registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
        registry
            .values()
            .map(|r| (r.keys.clone(), r.epoch.clone()))
            .collect()
    }

    /// Joins the current epoch of `keys` and re-writes this replica's record into it, unless
    /// the epoch this replica knows is no longer `seen` (another call did it meanwhile).
    /// `extend`: the epoch may have survived a loss (a `run_id` change): hold its admissions
    /// back for the barrier too.
    pub(super) async fn resync(
        &self,
        keys: &Arc<KeyBudgetKeys>,
        seen: Option<String>,
        extend: bool,
    ) -> Result<(), SharedError> {
        let _one_at_a_time = self.resyncing.lock().await;
        let known = self.known_epoch(keys);
        if known != seen {
            return Ok(());
        }
        let record = self.record_of(keys);
        let now = Instant::now();
        let seeds = record.as_ref().map(|r| r.seeds(now)).unwrap_or_default();
        let has_seeds = !seeds.requests.is_empty() || !seeds.tokens.is_empty();
        // A replica that admitted on this key before, or holds requests a provider may still
        // count, is re-finding a budget that was lost: the others must have time to re-write
        // theirs. A replica new to the key (no epoch known, nothing recorded) joining a
        // missing epoch is most likely the first user of a fresh Redis.
        let lost = known.is_some() || has_seeds;
        let barrier = if lost || extend {
            self.opts.rewrite_bound
        } else {
            Duration::ZERO
        };
        let candidate = format!("{:016x}-{}", self.replica, self.next_seq());
        let (epoch, wait, found_at) = self
            .join(
                keys,
                &candidate,
                barrier,
                if extend { barrier } else { Duration::ZERO },
            )
            .await?;
        if known.is_some() || extend {
            self.losses.fetch_add(1, Ordering::Relaxed);
            crate::metrics::global().budget_losses.inc();
            tracing::warn!(
                created = epoch == candidate,
                barrier_ms = millis(wait),
                requests = seeds.requests.len(),
                reservations = seeds.tokens.len(),
                "Redis lost a shared rate budget (restart, failover or flush): re-writing this replica's requests into it"
            );
        }
        self.seed(keys, &seeds).await?;
        {
            let mut registry = self.registry.lock().unwrap_or_else(PoisonError::into_inner);
            let entry = registry
                .entry(keys.epoch.clone())
                .or_insert_with(|| Registered {
                    keys: keys.clone(),
                    epoch: None,
                    record: None,
                });
            entry.epoch = Some(epoch.clone());
        }
        if lost || extend {
            // The barrier ends once every replica re-wrote its record (or at its bound).
            self.hold(found_at, Some((keys.clone(), epoch)), false);
        }
        // Waiters were told the barrier's end, or an instant from before the loss.
        self.pulse();
        // Requests answered while they were being written as in flight: write the answer.
        if let Some(record) = record {
            let in_flight: Vec<u64> = seeds
                .requests
                .iter()
                .filter(|(_, in_flight, _)| *in_flight)
                .map(|(m, _, _)| *m)
                .collect();
            for member in record.answered_among(&in_flight) {
                self.complete(keys, &self.member(member)).await?;
            }
        }
        Ok(())
    }

    /// Creates (with `barrier`) or joins the epoch of `keys`, extending an existing one's
    /// barrier by `extend`; returns its id, the wait until admissions resume and Redis's
    /// time (Unix ms).
    async fn join(
        &self,
        keys: &KeyBudgetKeys,
        candidate: &str,
        barrier: Duration,
        extend: Duration,
    ) -> Result<(String, Duration, u64), SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.epoch_script.prepare_invoke();
        call.key(&keys.epoch)
            .arg(candidate)
            .arg(millis(barrier))
            .arg(millis(extend))
            .arg(millis(self.epoch_ttl()));
        let (id, wait, now): (String, i64, u64) =
            self.bounded(call.invoke_async(&mut conn)).await?;
        let wait = Duration::from_millis(u64::try_from(wait).map_err(|_| SharedError::Reply)?);
        Ok((id, wait, now))
    }

    /// Writes `seeds` into the budget of `keys`, a few hundred per call.
    async fn seed(&self, keys: &KeyBudgetKeys, seeds: &Seeds) -> Result<(), SharedError> {
        let (mut requests, mut tokens) = (seeds.requests.as_slice(), seeds.tokens.as_slice());
        while !requests.is_empty() || !tokens.is_empty() {
            let (r, rest) = requests.split_at(requests.len().min(SEEDS_PER_CALL));
            requests = rest;
            let (t, rest) = tokens.split_at(tokens.len().min(SEEDS_PER_CALL - r.len()));
            tokens = rest;
            let mut call = self.seed.prepare_invoke();
            call.key(&keys.requests)
                .key(&keys.tokens)
                .key(&keys.token_amounts)
                .arg(millis(self.window))
                .arg(millis(self.opts.in_flight_ttl))
                .arg(r.len());
            for &(member, in_flight, age) in r {
                call.arg(self.member(member))
                    .arg(if in_flight { "f" } else { "a" })
                    .arg(millis(age));
            }
            for &(member, age, amount) in t {
                call.arg(self.member(member)).arg(millis(age)).arg(amount);
            }
            let mut conn = self.conn()?;
            let _: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
        }
        Ok(())
    }

    /// One check while Redis answers: the server's `run_id` (when `INFO` is allowed), and
    /// every key's epoch. A budget
    /// found lost is re-synced here, so that a replica that makes no request still re-writes
    /// its record within the barrier.
    async fn check(&self) -> Result<(), SharedError> {
        let mut conn = self.conn()?;
        let started = self.redis_now(&mut conn).await?;
        self.check_budgets(&mut conn).await?;
        self.mark(&mut conn, started).await?;
        let ended = self.hold_ended(Instant::now());
        if let Some((hold, missing)) = ended {
            self.end_hold(&mut conn, hold, missing).await?;
        }
        Ok(())
    }

    /// Redis's clock, Unix ms.
    async fn redis_now(&self, conn: &mut ConnectionManager) -> Result<u64, SharedError> {
        let (secs, micros): (u64, u64) = self.bounded(redis::cmd("TIME").query_async(conn)).await?;
        Ok(secs.saturating_mul(1000).saturating_add(micros / 1000))
    }

    /// [`RedisBudgets::check`]'s look at the server and the epochs, re-writing what was lost.
    async fn check_budgets(&self, conn: &mut ConnectionManager) -> Result<(), SharedError> {
        let info: Option<String> = match self
            .bounded(redis::cmd("INFO").arg("server").query_async(conn))
            .await
        {
            Ok(info) => Some(info),
            // Redis answered, with an error: not an outage. Without `INFO` a restart that
            // kept the epochs (persistence, a failover) goes unseen; a lost budget is still
            // found by its epoch.
            Err(SharedError::Redis(e)) if is_server_error(&e) => {
                if !self.info_refused.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "Redis refused INFO: a restart that keeps the budgets' epochs will not be detected (grant +info to the gateway's Redis user)"
                    );
                }
                None
            }
            Err(e) => return Err(e),
        };
        let run_id = info.as_deref().and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("run_id:"))
                .map(|id| id.trim().to_owned())
        });
        let restarted = {
            let mut last = self.run_id.lock().unwrap_or_else(PoisonError::into_inner);
            let restarted = last.is_some() && run_id.is_some() && *last != run_id;
            if run_id.is_some() {
                *last = run_id;
            }
            restarted
        };
        self.registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, r| r.record.as_ref().is_none_or(|w| w.strong_count() > 0));
        let keys: Vec<_> = self
            .registered()
            .into_iter()
            .filter(|(_, epoch)| epoch.is_some())
            .collect();
        if keys.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (k, _) in &keys {
            pipe.hget(&k.epoch, "id").pttl(&k.epoch);
        }
        let answers: Vec<redis::Value> = self.bounded(pipe.query_async(conn)).await?;
        let mut answers = answers.into_iter();
        let ttl = millis(self.epoch_ttl());
        let mut refresh = redis::pipe();
        let mut lost = Vec::new();
        for (k, known) in keys {
            let (Some(found), Some(left)) = (answers.next(), answers.next()) else {
                return Err(SharedError::Reply);
            };
            let found: Option<String> =
                redis::from_redis_value(found).map_err(|_| SharedError::Reply)?;
            let left: i64 = redis::from_redis_value(left).map_err(|_| SharedError::Reply)?;
            // An epoch lives a day after the key's last admission: a key idle that long
            // while this replica still uses it keeps its epoch, rather than being taken for
            // a lost budget (a barrier, a warning and a loss for nothing).
            if found.is_some() && found == known && left >= 0 && left.unsigned_abs() < ttl / 2 {
                refresh.pexpire(&k.epoch, i64::try_from(ttl).unwrap_or(i64::MAX));
            }
            lost.push((k, known, found));
        }
        if !refresh.is_empty() {
            let () = self.bounded(refresh.query_async(conn)).await?;
        }
        for (k, known, found) in lost {
            if found != known {
                self.resync(&k, known, false).await?;
            } else if restarted {
                // The epoch survived a restart (persistence) or a failover: what was written
                // since the last snapshot, or not yet replicated, may be missing.
                self.resync(&k, known, true).await?;
            }
        }
        Ok(())
    }

    /// Marks this replica's checks done up to `started` (unless a call failed meanwhile: then
    /// it may hold requests Redis lacks) and reads every replica's mark.
    async fn mark(&self, conn: &mut ConnectionManager, started: u64) -> Result<(), SharedError> {
        if self.degraded() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.hset(BUDGET_REWRITES, self.replica_name(), started)
            .ignore()
            .pexpire(
                BUDGET_REWRITES,
                i64::try_from(millis(MARKS_TTL)).unwrap_or(i64::MAX),
            )
            .ignore()
            .hgetall(BUDGET_REWRITES);
        let (marks,): (HashMap<String, u64>,) = self.bounded(pipe.query_async(conn)).await?;
        let mut read = HashMap::with_capacity(marks.len());
        let mut stale = Vec::new();
        for (field, mark) in marks {
            if mark.saturating_add(millis(MARK_KEPT)) < started {
                stale.push(field);
            } else if let Ok(id) = u64::from_str_radix(&field, 16) {
                read.insert(id, mark);
            }
        }
        *self.peers.lock().unwrap_or_else(PoisonError::into_inner) = Peers {
            marks: read,
            read_at: started,
        };
        if !stale.is_empty() {
            let _: i64 = self
                .bounded(
                    redis::cmd("HDEL")
                        .arg(BUDGET_REWRITES)
                        .arg(&stale)
                        .query_async(conn),
                )
                .await?;
        }
        Ok(())
    }

    /// The replicas whose mark was recent at the last read (a few checks old at most), and
    /// this one: those whose re-writes a hold waits for.
    fn live_replicas(&self) -> Vec<u64> {
        let recent = millis(4 * self.opts.check_interval + 2 * self.opts.timeout);
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut live: Vec<u64> = peers
            .marks
            .iter()
            .filter(|&(_, &mark)| mark.saturating_add(recent) >= peers.read_at)
            .map(|(&id, _)| id)
            .collect();
        if !live.contains(&self.replica) {
            live.push(self.replica);
        }
        live
    }

    /// Begins, or extends, the wait for every live replica's re-write of what Redis lacked at
    /// `since` (Redis time, ms): with the barrier of a lost budget's new epoch to lift at its
    /// end, or (`local`) the local share to end then.
    pub(super) fn hold(
        &self,
        since: u64,
        barrier: Option<(Arc<KeyBudgetKeys>, String)>,
        local: bool,
    ) {
        let expected = self.live_replicas();
        let until = Instant::now() + self.opts.rewrite_bound;
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        let h = hold.get_or_insert_with(|| Hold {
            since,
            expected: Vec::new(),
            until,
            local: false,
            barriers: Vec::new(),
        });
        h.since = h.since.max(since);
        h.until = h.until.max(until);
        h.local |= local;
        for id in expected {
            if !h.expected.contains(&id) {
                h.expected.push(id);
            }
        }
        h.barriers.extend(barrier);
    }

    /// Whether a hold is waiting.
    fn holding(&self) -> bool {
        self.hold
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The hold, taken once every replica it waits for has marked since it began or its
    /// bound has passed at `now`, with how many replicas had not marked.
    fn hold_ended(&self, now: Instant) -> Option<(Hold, usize)> {
        let peers = self.peers.lock().unwrap_or_else(PoisonError::into_inner);
        let mut hold = self.hold.lock().unwrap_or_else(PoisonError::into_inner);
        let h = hold.as_ref()?;
        let missing = h
            .expected
            .iter()
            .filter(|id| peers.marks.get(id).is_none_or(|&mark| mark < h.since))
            .count();
        if missing > 0 && now < h.until {
            return None;
        }
        hold.take().map(|h| (h, missing))
    }

    /// Ends `hold`: the barriers it waited on are lifted, the local share ends if it held,
    /// and whoever waits looks again.
    async fn end_hold(
        &self,
        conn: &mut ConnectionManager,
        hold: Hold,
        missing: usize,
    ) -> Result<(), SharedError> {
        if missing > 0 {
            tracing::warn!(
                replicas = missing,
                bound_ms = millis(self.opts.rewrite_bound),
                "replicas did not mark their re-write of the shared rate budgets in time: admitting without them (their requests count again once they re-write)"
            );
        }
        if hold.local {
            self.end_local_share();
        }
        for (keys, epoch) in &hold.barriers {
            let mut call = self.lift.prepare_invoke();
            call.key(&keys.epoch).arg(epoch);
            let _: i64 = self.bounded(call.invoke_async(conn)).await?;
        }
        // Requests told to wait for a barrier's bound, or for the local share, look again.
        let records: Vec<Arc<dyn Recorded>> = self
            .registry
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter_map(|r| r.record.as_ref().and_then(Weak::upgrade))
            .collect();
        for record in records {
            record.forget_wait();
        }
        self.pulse();
        Ok(())
    }

    /// One probe while Redis is unreachable. When it answers: admissions go back to Redis
    /// at once, then every key's record is re-written (the requests admitted meanwhile on
    /// the local share included), budgets that were lost get a new epoch, and the answers
    /// kept meanwhile are written.
    ///
    /// The order matters. A request admitted on the local share after its key's record was
    /// re-written would be in no replica's count in Redis, so the replica stops admitting
    /// locally before it re-writes: an admission from then on asks Redis, which for a lost
    /// budget means re-writing the record first (`resync`, one at a time with this one). The
    /// local share still applies meanwhile (the budgets may have survived without this
    /// replica's outage in them), and for `reseed_grace` after if they did.
    async fn recover(self: &Arc<Self>) -> Result<(), SharedError> {
        let mut conn = self.conn()?;
        let back = self.redis_now(&mut conn).await?;
        // The local share keeps applying through the re-write (and the hold after it), even
        // if an `end_local_share` raced this outage's first failed call and reset it.
        self.local_until_ms.store(u64::MAX, Ordering::Release);
        self.degraded.store(false, Ordering::Release);
        // Whatever a restart during the outage lost is re-written now: the next check must not
        // take the new `run_id` for another restart (a second barrier for nothing).
        *self.run_id.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let result = self.rewrite_after_outage(back).await;
        if let Err(e) = &result {
            self.failed(e);
            return result.map(|_| ());
        }
        if self.degraded.load(Ordering::Acquire) {
            // A new outage began during the re-write; the next probe ends it.
            return Ok(());
        }
        self.changes.send_replace(false);
        // Waiters slept until the local share's instant: Redis may have room sooner.
        self.pulse();
        tracing::info!("shared rate budgets: Redis is back");
        Ok(())
    }

    /// [`RedisBudgets::recover`]'s writes, once admissions ask Redis again (Redis answered
    /// at `back`, its time in ms).
    async fn rewrite_after_outage(self: &Arc<Self>, back: u64) -> Result<(), SharedError> {
        let mut conn = self.conn()?;
        let mut intact = false;
        let keys: Vec<_> = self
            .registered()
            .into_iter()
            .filter_map(|(k, known)| known.map(|known| (k, known)))
            .collect();
        // The keys' epochs a thousand per round trip, not one each; no call holds Redis (or
        // outlasts the call timeout) long.
        let mut found: Vec<Option<String>> = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(EPOCHS_PER_CALL) {
            let mut pipe = redis::pipe();
            for (k, _) in chunk {
                pipe.hget(&k.epoch, "id");
            }
            let answers: Vec<Option<String>> = self.bounded(pipe.query_async(&mut conn)).await?;
            found.extend(answers);
        }
        if found.len() != keys.len() {
            return Err(SharedError::Reply);
        }
        for ((k, known), found) in keys.into_iter().zip(found) {
            if found.as_deref() == Some(known.as_str()) {
                // The budget survived: add what was admitted during the outage.
                intact = true;
                if let Some(record) = self.record_of(&k) {
                    self.seed(&k, &record.seeds(Instant::now())).await?;
                }
            } else {
                self.resync(&k, Some(known), false).await?;
            }
        }
        // The answers kept meanwhile, taken at once: answers made from now on are written as
        // they come. One that fails is kept for the next recovery.
        let pending =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        let mut pending = pending.into_iter();
        while let Some((keys, member)) = pending.next() {
            if let Err(e) = self.complete(&keys, &member).await {
                self.remember(keys, member);
                for (keys, member) in pending {
                    self.remember(keys, member);
                }
                return Err(e);
            }
        }
        self.rewritten(intact, back);
        Ok(())
    }

    /// The end of the re-write after an outage, Redis back at `back` (ms). Budgets that
    /// survived (`intact`) lack the other replicas' outage until they re-write it: the local
    /// share keeps applying until every replica seen before has marked its re-write, or the
    /// bound (not a whole window, which made a short blip cost one; not a fixed second,
    /// which a slow re-write outlasts). Budgets re-created behind a barrier do not need it.
    pub(crate) fn rewritten(&self, intact: bool, back: u64) {
        if intact {
            self.hold(back, None, true);
        } else {
            // A request's call that failed during the re-write began a new outage
            // (admissions asked Redis again from the start of it): it keeps its local share.
            self.end_local_share();
        }
    }

    /// Starts the monitor once, if a runtime is at hand.
    pub(super) fn start_monitor(self: &Arc<Self>) {
        if !self.can_spawn() || self.monitoring.swap(true, Ordering::AcqRel) {
            return;
        }
        self.spawn(monitor(
            Arc::downgrade(self),
            self.wake.clone(),
            self.cancel.clone(),
        ));
    }
}

/// Checks Redis every check interval while it answers, and probes it while it does not.
/// Holds the backend only while checking, so that dropping it ends the monitor.
async fn monitor(this: Weak<RedisBudgets>, wake: Arc<Notify>, cancel: CancellationToken) {
    let Some(interval) = this.upgrade().map(|t| t.opts.check_interval) else {
        return;
    };
    let mut next = Next::Check(interval);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(next.pause()) => {}
            // A call failed: probe soon.
            () = wake.notified() => {}
        }
        let Some(this) = this.upgrade() else { return };
        let ok = if this.degraded() {
            if matches!(next, Next::Check(_)) {
                next = Next::Probe(PROBE_BACKOFF.0);
            }
            match this.recover().await {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!(reason = e.metric_label(), "Redis still unreachable");
                    false
                }
            }
        } else {
            match this.check().await {
                Ok(()) => true,
                Err(e) => {
                    this.failed(&e);
                    false
                }
            }
        };
        next = next.after(ok, interval);
        if matches!(next, Next::Check(_)) && this.holding() {
            // The replicas' marks end the hold: look again soon.
            next = Next::Check(interval.min(HOLD_POLL));
        }
    }
}

/// Redis refused the command itself: the user may not run it (an ACL without it), or the
/// server does not know it (renamed or disabled). Other errors (busy, loading, a broken
/// connection) are outages as before.
fn is_server_error(e: &redis::RedisError) -> bool {
    let refused = e.code() == Some("NOPERM")
        || e.to_string()
            .to_ascii_lowercase()
            .contains("unknown command");
    refused && !(e.is_io_error() || e.is_connection_dropped() || e.is_timeout())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budgets, KeyId, Limits, SharedOptions};
    use crate::secret::SecretString;

    const CHECK: Duration = Duration::from_millis(250);

    /// Shared budgets on a port where nothing listens (every call fails at once), with one
    /// key of 10 requests a minute shared by 2 replicas (a local share of 5).
    fn unreachable() -> (Budgets, Arc<crate::budget::KeyBudget>) {
        let opts = SharedOptions::new(SecretString::new("redis://127.0.0.1:1"));
        let budgets = Budgets::shared(Duration::from_secs(60), opts, Arc::default()).unwrap();
        let id = KeyId {
            pool: "pool".into(),
            provider: "openai".into(),
            key: "k0".into(),
        };
        let key = budgets.key(
            &id,
            Limits {
                rpm: Some(10),
                tpm: None,
            },
        );
        (budgets, key)
    }

    /// Recovery stops local admissions before it re-writes the records, so a request's call
    /// that fails during the re-write begins a new outage (`u64::MAX`, degraded). The end of
    /// the re-write used to store "no local share" over it: a degraded replica then admitted
    /// a key's whole limit. The failure is injected where it happened, between the re-write's
    /// start and its end.
    #[tokio::test]
    async fn a_call_that_fails_during_the_rewrite_keeps_its_local_share() {
        let (budgets, key) = unreachable();
        let backend = budgets.backend().unwrap().clone();
        let timeout = SharedError::Timeout(backend.opts.timeout);
        backend.failed(&timeout);
        // Redis answered a probe: admissions ask it again while the records are re-written.
        backend.degraded.store(false, Ordering::Release);
        // A request's call fails meanwhile.
        backend.failed(&timeout);
        // The re-write ends; its budgets were all lost (re-created behind barriers).
        backend.rewritten(false, 0);
        assert!(backend.degraded());
        let mut admitted = Vec::new();
        for _ in 0..10 {
            if let Ok(permit) = key.acquire(Instant::now(), 1).await {
                admitted.push(permit);
            }
        }
        assert_eq!(
            admitted.len(),
            5,
            "degraded: this replica's share of 10, not all"
        );
    }

    /// `failed` (a request's task) stores `u64::MAX` and then sets `degraded`;
    /// `end_local_share` (the monitor, at the end of a re-write or a hold) stores 0. When the
    /// monitor's store lands between the two, the replica is degraded with no local-share
    /// instant: it used to admit the key's whole limit for the rest of the outage (the
    /// recovery that would reset it fails while Redis is down).
    #[tokio::test]
    async fn a_degraded_replica_serves_its_share_even_when_the_instant_was_reset() {
        let (budgets, key) = unreachable();
        let backend = budgets.backend().unwrap().clone();
        backend.failed(&SharedError::Timeout(backend.opts.timeout));
        backend.end_local_share();
        assert!(backend.degraded());
        assert_eq!(backend.local_until_ms.load(Ordering::Acquire), 0);
        let mut admitted = Vec::new();
        for _ in 0..10 {
            if let Ok(permit) = key.acquire(Instant::now(), 1).await {
                admitted.push(permit);
            }
        }
        assert_eq!(admitted.len(), 5, "degraded: this replica's share of 10");
    }

    /// A hold ends when every replica it waits for has marked since it began, and at its
    /// bound without them, not a millisecond before.
    #[tokio::test(start_paused = true)]
    async fn a_hold_ends_with_every_replicas_mark_or_at_its_bound() {
        let (budgets, _key) = unreachable();
        let backend = budgets.backend().unwrap().clone();
        let (me, other) = (backend.replica, backend.replica ^ 1);
        // Both replicas marked shortly before the outage.
        *backend.peers.lock().unwrap() = Peers {
            marks: HashMap::from([(me, 1_000), (other, 900)]),
            read_at: 1_000,
        };
        let begun = Instant::now();
        backend.hold(2_000, None, true);
        let bound = backend.opts.rewrite_bound;
        // This replica marked since; the other has not.
        backend.peers.lock().unwrap().marks.insert(me, 2_000);
        assert!(backend.hold_ended(begun).is_none());
        let just_before = begun + bound - Duration::from_millis(1);
        assert!(backend.hold_ended(just_before).is_none());
        // The other marks, from a check begun before the hold: not enough.
        backend.peers.lock().unwrap().marks.insert(other, 1_999);
        assert!(backend.hold_ended(just_before).is_none());
        backend.peers.lock().unwrap().marks.insert(other, 2_000);
        let (hold, missing) = backend.hold_ended(just_before).unwrap();
        assert_eq!(missing, 0);
        assert!(hold.local);
        assert!(backend.hold_ended(just_before).is_none(), "taken once");
        // Without the other's mark, the bound ends it.
        backend.hold(3_000, None, true);
        let at = Instant::now() + bound;
        assert!(backend.hold_ended(at - Duration::from_millis(1)).is_none());
        let (_, missing) = backend.hold_ended(at).unwrap();
        assert_eq!(missing, 2, "neither marked since 3000");
    }

    /// A replica whose last mark was older than a few checks when the marks were read (it
    /// had stopped) is not waited for.
    #[test]
    fn a_hold_waits_only_for_replicas_seen_recently() {
        let (budgets, _key) = unreachable();
        let backend = budgets.backend().unwrap().clone();
        let me = backend.replica;
        let recent = millis(4 * backend.opts.check_interval + 2 * backend.opts.timeout);
        *backend.peers.lock().unwrap() = Peers {
            marks: HashMap::from([(1, 10_000 - recent), (2, 10_000 - recent - 1)]),
            read_at: 10_000,
        };
        let mut live = backend.live_replicas();
        live.sort_unstable();
        let mut expected = vec![1, me];
        expected.sort_unstable();
        assert_eq!(live, expected);
    }

    #[test]
    fn the_monitor_checks_at_the_interval_and_backs_off_to_250_ms_while_down() {
        let mut next = Next::Check(CHECK);
        let mut pauses = Vec::new();
        for _ in 0..6 {
            next = next.after(false, CHECK);
            pauses.push(next.pause().as_millis());
        }
        assert_eq!(pauses, [50, 100, 200, 250, 250, 250]);
        assert_eq!(next.after(true, CHECK), Next::Check(CHECK));
    }
}
