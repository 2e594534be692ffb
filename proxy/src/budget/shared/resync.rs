//! Keeping Redis's budgets whole: the epochs of the keys, the re-writing of this replica's
//! record into them, and the monitor that checks Redis whether or not requests ask (see the
//! parent module's doc for the guarantees).

use super::record::{Recorded, Seeds};
use super::{PROBE_BACKOFF, RedisBudgets, Registered, SEEDS_PER_CALL, SharedError, millis};
use floodgate_crds::redis_keys::KeyBudgetKeys;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, Weak};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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
            self.opts.reseed_grace
        } else {
            Duration::ZERO
        };
        let candidate = format!("{:016x}-{}", self.replica, self.next_seq());
        let (epoch, wait) = self
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
            entry.epoch = Some(epoch);
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
    /// barrier by `extend`; returns its id and the wait until admissions resume.
    async fn join(
        &self,
        keys: &KeyBudgetKeys,
        candidate: &str,
        barrier: Duration,
        extend: Duration,
    ) -> Result<(String, Duration), SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.epoch_script.prepare_invoke();
        call.key(&keys.epoch)
            .arg(candidate)
            .arg(millis(barrier))
            .arg(millis(extend))
            .arg(millis(self.epoch_ttl()));
        let (id, wait): (String, i64) = self.bounded(call.invoke_async(&mut conn)).await?;
        let wait = Duration::from_millis(u64::try_from(wait).map_err(|_| SharedError::Reply)?);
        Ok((id, wait))
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
        let info: Option<String> = match self
            .bounded(redis::cmd("INFO").arg("server").query_async(&mut conn))
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
        let answers: Vec<redis::Value> = self.bounded(pipe.query_async(&mut conn)).await?;
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
            let () = self.bounded(refresh.query_async(&mut conn)).await?;
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
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        self.degraded.store(false, Ordering::Release);
        // Whatever a restart during the outage lost is re-written now: the next check must not
        // take the new `run_id` for another restart (a second barrier for nothing).
        *self.run_id.lock().unwrap_or_else(PoisonError::into_inner) = None;
        let result = self.rewrite_after_outage().await;
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

    /// [`RedisBudgets::recover`]'s writes, once admissions ask Redis again.
    async fn rewrite_after_outage(self: &Arc<Self>) -> Result<(), SharedError> {
        let mut conn = self.conn()?;
        let mut intact = false;
        for (k, known) in self.registered() {
            let Some(known) = known else { continue };
            let found: Option<String> = self
                .bounded(
                    redis::cmd("HGET")
                        .arg(&k.epoch)
                        .arg("id")
                        .query_async(&mut conn),
                )
                .await?;
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
        // Budgets that survived lack the other replicas' outage until they re-write it, which
        // each does within a probe of Redis's return: the local share applies for as long as
        // a barrier would (not a whole window, which made a short blip cost one). Budgets
        // re-created behind a barrier do not need it.
        let until = if intact {
            self.millis_since_start(Instant::now())
                .saturating_add(millis(self.opts.reseed_grace.min(self.window)))
        } else {
            0
        };
        self.local_until_ms.store(until, Ordering::Release);
        // A request's call that failed during the re-write began a new outage (admissions
        // asked Redis again from the start of it): its local share stands until the monitor
        // finds Redis again, whichever of the two stores came last.
        if self.degraded.load(Ordering::Acquire) {
            self.local_until_ms.store(u64::MAX, Ordering::Release);
        }
        Ok(())
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

    const CHECK: Duration = Duration::from_millis(250);

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
