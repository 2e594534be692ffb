//! Budgets shared by every replica through Redis (`--redis URL`), so that N proxies together
//! never exceed a key's limits.
//!
//! Each admission is one atomic Lua script (`shared/acquire.lua`, sent by EVALSHA and loaded
//! once per server) on Redis's own clock: a request is a member of the key's request log,
//! counted while in flight and for one window after its answer, exactly like the local
//! [`RequestWindow`](super::window::RequestWindow). The answer (`complete.lua`) and the token
//! settlement (`settle.lua`) are written after the fact, off the request's path. The key
//! layout lives in [`floodgate_crds::redis_keys`], for the operator to read.
//!
//! Every replica keeps its own record of what it admitted on each shared key
//! ([`record::Record`]), and a monitor on the Redis runtime checks Redis every
//! [`SharedOptions::check_interval`], whether or not requests ask:
//!
//! - **Redis unreachable** (an error, or no answer within [`SharedOptions::timeout`]): the
//!   replica says so once in the log and in [`RedisBudgets::degraded`], and serves on a local
//!   share of each budget, `limit / replicas_hint` (see [`SharedOptions::replicas_hint`]),
//!   counting the requests it made itself before the failure. The monitor probes again, backing
//!   off from 50 ms to 250 ms; when Redis answers, the replica re-writes its record into it
//!   (requests admitted during the outage included) and shared budgets resume. If the budgets
//!   survived, the local share still applies as well until every other replica has
//!   re-written its own outage (the hold, below). In the outage's first window a replica also
//!   holds no more of a key than it held when the outage began, requests and tokens alike
//!   (see `key.rs`).
//! - **Redis lost the budgets** (a restart without persistence, a failover to a replica that
//!   had not caught up, a flush): every key's budget carries an epoch (`epoch.lua`), and the
//!   admission script admits only on the epoch the replica knows. A missing or different epoch
//!   is found atomically by the first admission that meets it, or by the monitor within one
//!   check interval. The first replica to find it creates a new epoch whose admissions wait
//!   behind a barrier; every replica re-writes its record into the new epoch (`seed.lua`) when
//!   it finds the change, and once all have (the hold, below) the barrier is lifted
//!   (`lift.lua`) and Redis counts every live replica's requests of the window again. A
//!   change of the server's `run_id` (a restart that restored an older snapshot, a failover)
//!   is treated the same way, except that the epoch survived: the replicas extend its barrier
//!   and re-write their records.
//! - **The hold**: each replica marks in Redis, after every check that succeeded whole, the
//!   instant that check began ([`floodgate_crds::redis_keys::BUDGET_REWRITES`]); such a check
//!   re-wrote whatever Redis had lost by then. After a loss or an outage, a replica waits
//!   until every replica whose mark was recent before it has marked since (checking every
//!   50 ms meanwhile), however long their re-writes take (many keys, a slow link), and at
//!   most [`SharedOptions::rewrite_bound`] for a replica that never does (stopped, or cut off).
//!
//! Re-writing is idempotent (members keep the names they were admitted with), so a false
//! alarm costs one barrier, never a double count.

use super::Limits;
use super::pace::Hold;
use crate::secret::SecretString;
use floodgate_crds::redis_keys::KeyBudgetKeys;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{HashMap, VecDeque};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub(crate) mod record;
mod resync;

use record::Recorded;

const ACQUIRE: &str = include_str!("shared/acquire.lua");
const COUNT_USE: &str = include_str!("shared/count.lua");
const COMPLETE: &str = include_str!("shared/complete.lua");
const SETTLE: &str = include_str!("shared/settle.lua");
const EPOCH: &str = include_str!("shared/epoch.lua");
const SEED: &str = include_str!("shared/seed.lua");
const REFUND: &str = include_str!("shared/refund.lua");
const LIFT: &str = include_str!("shared/lift.lua");

/// First and longest pause between two probes of an unreachable Redis. The longest is well
/// under the default [`SharedOptions::reseed_grace`], so that every replica finds a Redis that
/// came back empty, and re-writes its record, before admissions resume.
pub const PROBE_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(50), Duration::from_millis(250));
/// How long a budget's epoch lives after its last admission, or after the monitor of a
/// replica that uses the key last renewed it (when less than half of it was left): an idle
/// key is not taken for a lost one while a replica uses it, and an abandoned one goes.
const EPOCH_TTL: Duration = Duration::from_secs(24 * 3600);
/// Requests re-written per script call, so that no call holds Redis long.
const SEEDS_PER_CALL: usize = 300;
/// Answers kept for writing once Redis is back; beyond this the oldest are dropped (their
/// requests then count until the in-flight TTL).
const MAX_PENDING: usize = 10_000;

/// How to reach Redis and how to behave without it.
#[derive(Clone)]
pub struct SharedOptions {
    /// `redis://[user:password@]host:port[/db]`; secret, since it may hold a password.
    pub url: SecretString,
    /// How many replicas share the keys. While Redis is unreachable each replica serves at
    /// most `limit / replicas_hint` (at least 1) of every key, so that together they stay
    /// within the limit. Set it to the most replicas that may run (the autoscaler's maximum):
    /// too low risks upstream 429s during an outage, too high only slows the outage down.
    pub replicas_hint: NonZeroU32,
    /// Longest wait for Redis, per call (connect, or a script's answer). A request never waits
    /// longer than this for Redis; after it the replica serves on its local share.
    pub timeout: Duration,
    /// A request not answered this long after admission counts as answered then, so that the
    /// slots of a crashed replica free up.
    pub in_flight_ttl: Duration,
    /// How soon to ask again when only requests in flight (on any replica) fill the window.
    pub poll: Duration,
    /// How often the monitor checks Redis while it answers: that it is reachable (so that
    /// [`RedisBudgets::degraded`] is true within this long of an outage, requests or not),
    /// and that it still holds the budgets (each key's epoch, and the server's `run_id`).
    pub check_interval: Duration,
    /// How long after an outage began a request admitted through Redis before it may still
    /// be on its way to the provider: the outage's first window is one window plus this
    /// (see [`RedisBudgets::outage`]).
    pub reseed_grace: Duration,
    /// The longest a replica waits for the others' re-writes after a loss or an outage (the
    /// barrier of a lost budget, the local share after an outage that left the budgets
    /// intact). The wait ends as soon as every replica seen shortly before has marked its
    /// re-write done (see [`floodgate_crds::redis_keys::BUDGET_REWRITES`]); the bound only
    /// applies to a replica that never does (stopped, or cut off from Redis longer), which
    /// is then not counted until it re-writes.
    pub rewrite_bound: Duration,
    /// The runtime that runs every Redis call and background write (and so holds the
    /// connection's tasks). It must outlive whatever serves requests: the binary passes a
    /// runtime on a thread of its own, so that a worker thread that stops first takes no
    /// connection and no pending write with it, and no other work (configuration watches)
    /// delays an admission. `None`: the caller's runtime.
    pub runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for SharedOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedOptions")
            .field("url", &self.url)
            .field("replicas_hint", &self.replicas_hint)
            .field("timeout", &self.timeout)
            .field("in_flight_ttl", &self.in_flight_ttl)
            .field("poll", &self.poll)
            .field("check_interval", &self.check_interval)
            .field("reseed_grace", &self.reseed_grace)
            .field("rewrite_bound", &self.rewrite_bound)
            .field("runtime", &self.runtime.as_ref().map(|_| "dedicated"))
            .finish()
    }
}

impl SharedOptions {
    /// Defaults for `url`: 2 replicas, 100 ms timeout, 10 min in-flight TTL, 20 ms poll,
    /// a check every 250 ms, 1 s of grace for requests on their way when an outage begins,
    /// and at most 5 s of waiting for the other replicas' re-writes.
    pub fn new(url: SecretString) -> Self {
        Self {
            url,
            replicas_hint: NonZeroU32::MIN.saturating_add(1),
            timeout: Duration::from_millis(100),
            in_flight_ttl: Duration::from_secs(600),
            poll: Duration::from_millis(20),
            check_interval: Duration::from_millis(250),
            reseed_grace: Duration::from_secs(1),
            rewrite_bound: Duration::from_secs(5),
            runtime: None,
        }
    }
}

/// Why a call to Redis failed.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// The URL does not parse (never echoed: it may hold a password).
    #[error("the Redis URL is not valid (expected redis://[user:password@]host:port[/db])")]
    Url,
    /// No answer in time.
    #[error("Redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The script answered something it never answers.
    #[error("unexpected answer from the budget script")]
    Reply,
    /// The runtime given for Redis calls has stopped (the process is shutting down).
    #[error("the runtime for Redis calls has stopped")]
    Stopped,
}

impl SharedError {
    /// A low-cardinality label for logs and metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            SharedError::Url => "url",
            SharedError::Timeout(_) => "timeout",
            SharedError::Redis(e) if e.is_io_error() => "connection",
            SharedError::Redis(_) => "redis_error",
            SharedError::Reply => "reply",
            SharedError::Stopped => "stopped",
        }
    }
}

/// The shared budget's decision on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Admitted: `used` requests are now in the window (this one included), and a further
    /// request fits in `next_free` (zero: now).
    Admitted {
        /// Requests in the window, every replica's.
        used: u32,
        /// Until a further request could be admitted.
        next_free: Duration,
    },
    /// Refused: `used` requests fill the window (or the class cap); one more fits in `wait`.
    Refused {
        /// Requests in the window, every replica's.
        used: u32,
        /// Until one could be admitted.
        wait: Duration,
        /// Whether the class cap refused and no limit did: the key has room for the classes
        /// above.
        class_only: bool,
        /// Whether the key's pace alone refused ([`super::pace`]): the key has room for
        /// requests that are not paced, and the pace admits one in `wait`.
        paced: bool,
    },
}

/// The connection to Redis, the scripts and the replica's view of Redis's health. One per
/// dispatcher; every shared key budget holds it.
pub struct RedisBudgets {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    acquire: redis::Script,
    count_use: redis::Script,
    complete: redis::Script,
    settle: redis::Script,
    refund: redis::Script,
    epoch_script: redis::Script,
    seed: redis::Script,
    lift: redis::Script,
    opts: SharedOptions,
    window: Duration,
    /// Origin of `local_until_ms`.
    started: Instant,
    degraded: AtomicBool,
    /// Every change of `degraded`, for whoever waits on one.
    changes: tokio::sync::watch::Sender<bool>,
    /// Milliseconds since `started` until which the local share applies: `u64::MAX` while
    /// degraded, and after a recovery that found the budgets intact until every replica
    /// re-wrote its outage (the hold), else 0.
    local_until_ms: AtomicU64,
    /// The outage in progress or the last one, for [`RedisBudgets::outage`].
    outage: Mutex<Option<Outage>>,
    /// Redis answered at least once since start-up: an outage then follows admissions made
    /// through it, which the first window of the outage must account for.
    reached: AtomicBool,
    replica: u64,
    seq: AtomicU64,
    pending: Mutex<VecDeque<(Arc<KeyBudgetKeys>, String)>>,
    /// Every shared key this replica uses (by its epoch key): the epoch it admits on, and its
    /// record of its own requests.
    registry: Mutex<HashMap<String, Registered>>,
    /// Re-writes run one at a time.
    resyncing: tokio::sync::Mutex<()>,
    /// The server's `run_id` when last checked.
    run_id: Mutex<Option<String>>,
    /// Redis refused `INFO` (an ACL user without it, a renamed command): restarts are then
    /// found by the epochs alone. Said once in the log.
    info_refused: AtomicBool,
    /// Budgets found lost (epochs that vanished or changed, and `run_id` changes).
    losses: AtomicU64,
    /// The replicas' re-write marks as this replica last read them.
    peers: Mutex<resync::Peers>,
    /// The wait for every replica's re-write after a loss or an outage, while it lasts.
    hold: Mutex<Option<resync::Hold>>,
    monitoring: AtomicBool,
    /// Wakes the monitor at once (a call failed).
    wake: Arc<tokio::sync::Notify>,
    /// Pulsed when Redis is back or a lost budget was re-written, so that requests waiting
    /// on a local share's (or a stale answer's) instant look again.
    signal: OnceLock<Arc<super::Signal>>,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

/// An outage of Redis as this replica saw it: its number (a key snapshots its own use once
/// per outage) and the end of its first phase, in which other replicas' requests admitted
/// through Redis before it may still be in the provider's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outage {
    /// Counts outages since start-up, from 1.
    pub number: u64,
    /// One window after the replica found Redis unreachable, plus [`SharedOptions::reseed_grace`]
    /// for requests admitted just before it and still on their way to the provider.
    pub first_window_ends: Instant,
}

/// A shared key as the backend knows it.
struct Registered {
    keys: Arc<KeyBudgetKeys>,
    /// The epoch this replica admits on; `None` before the first admission.
    epoch: Option<String>,
    record: Option<Weak<dyn Recorded>>,
}

impl std::fmt::Debug for RedisBudgets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBudgets")
            .field("opts", &self.opts)
            .field("window", &self.window)
            .field("degraded", &self.degraded())
            .finish_non_exhaustive()
    }
}

impl Drop for RedisBudgets {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl RedisBudgets {
    /// A backend for budgets of `window`; connects lazily, on first use.
    pub fn new(opts: SharedOptions, window: Duration) -> Result<Self, SharedError> {
        let client = redis::Client::open(opts.url.expose()).map_err(|_| SharedError::Url)?;
        Ok(Self {
            client,
            conn: OnceLock::new(),
            acquire: redis::Script::new(ACQUIRE),
            count_use: redis::Script::new(COUNT_USE),
            complete: redis::Script::new(COMPLETE),
            settle: redis::Script::new(SETTLE),
            refund: redis::Script::new(REFUND),
            epoch_script: redis::Script::new(EPOCH),
            seed: redis::Script::new(SEED),
            lift: redis::Script::new(LIFT),
            window,
            started: Instant::now(),
            degraded: AtomicBool::new(false),
            changes: tokio::sync::watch::Sender::new(false),
            local_until_ms: AtomicU64::new(0),
            outage: Mutex::default(),
            reached: AtomicBool::new(false),
            replica: replica_id(),
            seq: AtomicU64::new(0),
            pending: Mutex::default(),
            registry: Mutex::default(),
            resyncing: tokio::sync::Mutex::new(()),
            run_id: Mutex::default(),
            info_refused: AtomicBool::new(false),
            losses: AtomicU64::new(0),
            peers: Mutex::default(),
            hold: Mutex::default(),
            monitoring: AtomicBool::new(false),
            wake: Arc::default(),
            signal: OnceLock::new(),
            tasks: TaskTracker::new(),
            cancel: CancellationToken::new(),
            opts,
        })
    }

    /// Pulses `signal` whenever Redis is back or a lost budget was re-written.
    pub(crate) fn set_signal(&self, signal: Arc<super::Signal>) {
        let _ = self.signal.set(signal);
    }

    fn pulse(&self) {
        if let Some(signal) = self.signal.get() {
            signal.pulse();
        }
    }

    /// This replica's id in Redis: the prefix of its request members, and its field in
    /// [`floodgate_crds::redis_keys::BUDGET_REWRITES`].
    pub fn replica_name(&self) -> String {
        format!("{:016x}", self.replica)
    }

    /// The options it was built with.
    pub fn options(&self) -> &SharedOptions {
        &self.opts
    }

    /// Whether Redis is unreachable and budgets are local shares. Cheap (one atomic load).
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Acquire)
    }

    /// Follows [`RedisBudgets::degraded`]: a receiver that sees every change.
    pub fn watch_degraded(&self) -> tokio::sync::watch::Receiver<bool> {
        self.changes.subscribe()
    }

    /// How many times this replica found that Redis had lost a budget (an epoch gone or
    /// changed) or restarted (`run_id` changed), and re-wrote its record.
    pub fn losses(&self) -> u64 {
        self.losses.load(Ordering::Relaxed)
    }

    /// The local share of `limit` when it applies at `now` (while degraded, and after an
    /// outage until every replica re-wrote its own), else `None`.
    ///
    /// Degraded alone decides first: `local_until_ms` is written by the monitor (the end of
    /// a re-write or a hold) and by any request's failed call (a new outage) without a lock,
    /// so a degraded replica with `local_until_ms` reset to 0 by a store that lost that race
    /// must still serve on its share, never on the key's whole limit.
    pub(crate) fn local_share(&self, now: Instant, limit: u64) -> Option<u64> {
        let applies = self.degraded()
            || self.millis_since_start(now) < self.local_until_ms.load(Ordering::Acquire);
        applies.then(|| (limit / u64::from(self.opts.replicas_hint.get())).max(1))
    }

    /// The outage whose first window holds at `now`, if Redis had answered before it (a
    /// replica that never reached Redis knows nothing of the others' use; see
    /// [`KeyBudget`](super::KeyBudget)'s local share).
    pub(crate) fn outage(&self, now: Instant) -> Option<Outage> {
        let outage = *self.outage.lock().unwrap_or_else(|p| p.into_inner());
        outage.filter(|o| now < o.first_window_ends)
    }

    fn millis_since_start(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.started).as_millis()).unwrap_or(u64::MAX)
    }

    /// A request id unique across replicas.
    pub fn next_member(&self) -> String {
        self.member(self.next_seq())
    }

    /// The next request sequence of this replica; [`RedisBudgets::member`] names it.
    pub(crate) fn next_seq(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::Relaxed)
    }

    /// The member name of this replica's request `seq`, unique across replicas.
    pub(crate) fn member(&self, seq: u64) -> String {
        format!("{:016x}-{seq:x}", self.replica)
    }

    fn conn(&self) -> Result<ConnectionManager, SharedError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        // One attempt per call: a dead Redis fails fast, and the next call tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.opts.timeout))
            .set_response_timeout(Some(self.opts.timeout))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.conn.get_or_init(|| conn).clone())
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, SharedError> {
        match tokio::time::timeout(self.opts.timeout, call).await {
            Ok(Ok(answer)) => {
                self.reached.store(true, Ordering::Relaxed);
                Ok(answer)
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(SharedError::Timeout(self.opts.timeout)),
        }
    }

    /// Runs the admission script for `member` on the key `keys` under `limits`, on the epoch
    /// this replica knows (joined first if it knows none). When Redis lost the budget, the
    /// replica re-writes its record (see the module doc) and asks once more, which answers
    /// with the barrier's wait.
    pub async fn acquire(
        self: &Arc<Self>,
        keys: &Arc<KeyBudgetKeys>,
        limits: Limits,
        tokens: u64,
        member: &str,
    ) -> Result<Admission, SharedError> {
        self.acquire_held(keys, limits, tokens, member, Hold::default())
            .await
    }

    /// [`RedisBudgets::acquire`] for a queue class that may only take a request while fewer
    /// than `cap` requests are in the key's window (`None`: up to the limit), decided in the
    /// same atomic admission.
    pub async fn acquire_capped(
        self: &Arc<Self>,
        keys: &Arc<KeyBudgetKeys>,
        limits: Limits,
        tokens: u64,
        member: &str,
        cap: Option<u32>,
    ) -> Result<Admission, SharedError> {
        let hold = Hold { cap, pace: None };
        self.acquire_held(keys, limits, tokens, member, hold).await
    }

    /// [`RedisBudgets::acquire`] held back by a queue class's cap and the key's shared pace
    /// as `hold` says, decided in the same atomic admission.
    pub async fn acquire_held(
        self: &Arc<Self>,
        keys: &Arc<KeyBudgetKeys>,
        limits: Limits,
        tokens: u64,
        member: &str,
        hold: Hold,
    ) -> Result<Admission, SharedError> {
        self.start_monitor();
        for _ in 0..2 {
            let epoch = match self.known_epoch(keys) {
                Some(epoch) => epoch,
                None => {
                    self.resync(keys, None, false).await?;
                    self.known_epoch(keys).ok_or(SharedError::Reply)?
                }
            };
            match self
                .admit(keys, limits, tokens, member, &epoch, hold)
                .await?
            {
                Some(admission) => return Ok(admission),
                None => self.resync(keys, Some(epoch), false).await?,
            }
        }
        // Lost again at once (flushed twice in a row): ask again soon.
        Ok(Admission::Refused {
            used: 0,
            wait: self.opts.poll,
            class_only: false,
            paced: false,
        })
    }

    /// One admission script on `epoch`; `None` if Redis does not hold that epoch.
    async fn admit(
        &self,
        keys: &KeyBudgetKeys,
        limits: Limits,
        tokens: u64,
        member: &str,
        epoch: &str,
        hold: Hold,
    ) -> Result<Option<Admission>, SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.acquire.prepare_invoke();
        let (mode, interval, tolerance) = match hold.pace {
            None => (0, 0.0, 0.0),
            Some(p) => (
                if p.check { 1 } else { 2 },
                p.interval.as_secs_f64() * 1000.0,
                p.tolerance.as_secs_f64() * 1000.0,
            ),
        };
        call.key(&keys.requests)
            .key(&keys.tokens)
            .key(&keys.token_amounts)
            .key(&keys.epoch)
            .key(&keys.pace)
            .arg(limits.rpm.map_or(-1, i64::from))
            .arg(limits.tpm.map_or(-1, i64::from))
            .arg(millis(self.window))
            .arg(millis(self.opts.in_flight_ttl))
            .arg(member)
            .arg(tokens)
            .arg(millis(self.opts.poll))
            .arg(epoch)
            .arg(millis(self.epoch_ttl()))
            .arg(hold.cap.map_or(-1, i64::from))
            .arg(mode)
            .arg(format!("{interval:.3}"))
            .arg(format!("{tolerance:.3}"));
        let (admitted, used, wait, held): (i64, i64, i64, i64) =
            self.bounded(call.invoke_async(&mut conn)).await?;
        let used = u32::try_from(used).map_err(|_| SharedError::Reply)?;
        let wait = Duration::from_millis(u64::try_from(wait).map_err(|_| SharedError::Reply)?);
        match admitted {
            1 => Ok(Some(Admission::Admitted {
                used,
                next_free: wait,
            })),
            0 => Ok(Some(Admission::Refused {
                used,
                wait,
                class_only: held == 1,
                paced: held == 2,
            })),
            -1 => Ok(None),
            _ => Err(SharedError::Reply),
        }
    }

    /// How long an epoch lives after an admission: a day, and at least as long as the
    /// request log.
    fn epoch_ttl(&self) -> Duration {
        EPOCH_TTL.max(self.opts.in_flight_ttl + 2 * self.window)
    }

    /// [`RedisBudgets::acquire`] on the runtime for Redis calls, if one was given.
    pub async fn acquire_on_runtime(
        self: &Arc<Self>,
        keys: &Arc<KeyBudgetKeys>,
        limits: Limits,
        tokens: u64,
        member: &str,
        hold: Hold,
    ) -> Result<Admission, SharedError> {
        let Some(runtime) = &self.opts.runtime else {
            return self.acquire_held(keys, limits, tokens, member, hold).await;
        };
        let (this, keys, member) = (self.clone(), keys.clone(), member.to_owned());
        runtime
            .spawn(async move {
                this.acquire_held(&keys, limits, tokens, &member, hold)
                    .await
            })
            .await
            .unwrap_or(Err(SharedError::Stopped))
    }

    /// Whether background writes can run: a runtime was given, or the caller is on one.
    fn can_spawn(&self) -> bool {
        self.opts.runtime.is_some() || tokio::runtime::Handle::try_current().is_ok()
    }

    /// Runs `task` in the background on the runtime for Redis calls, tracked for `drain`.
    /// Call only when [`RedisBudgets::can_spawn`].
    fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match &self.opts.runtime {
            Some(runtime) => drop(self.tasks.spawn_on(task, runtime)),
            None => drop(self.tasks.spawn(task)),
        }
    }

    /// Records that `member` was answered now; `false` if it was not in flight.
    pub async fn complete(&self, keys: &KeyBudgetKeys, member: &str) -> Result<bool, SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.complete.prepare_invoke();
        call.key(&keys.requests)
            .arg(member)
            .arg(millis(self.window));
        let changed: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
        Ok(changed == 1)
    }

    /// Settles `member`'s token reservation at `tokens`; `false` if it left the window.
    pub async fn settle(
        &self,
        keys: &KeyBudgetKeys,
        member: &str,
        tokens: u64,
    ) -> Result<bool, SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.settle.prepare_invoke();
        call.key(&keys.token_amounts).arg(member).arg(tokens);
        let changed: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
        Ok(changed == 1)
    }

    /// Takes `member` out of the window and gives its tokens back; `false` if it had left.
    pub async fn refund(&self, keys: &KeyBudgetKeys, member: &str) -> Result<bool, SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.refund.prepare_invoke();
        call.key(&keys.requests)
            .key(&keys.tokens)
            .key(&keys.token_amounts)
            .arg(member);
        let changed: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
        Ok(changed == 1)
    }

    /// Refunds `member` in the background (dropped if Redis is unreachable: it keeps
    /// counting, which errs on the safe side).
    pub(crate) fn refund_later(self: &Arc<Self>, keys: &Arc<KeyBudgetKeys>, member: String) {
        if self.degraded() || !self.can_spawn() {
            return;
        }
        let (this, keys) = (self.clone(), keys.clone());
        self.spawn(async move {
            if let Err(e) = this.refund(&keys, &member).await {
                this.failed(&e);
            }
        });
    }

    /// Counts a request of a tenant without an rpm limit under `key` (its use hash, see
    /// [`floodgate_crds::redis_keys::tenant_use_key`]) in the background, for its status:
    /// one script call, off the request's path; dropped while Redis is unreachable.
    pub(crate) fn count_use_later(self: &Arc<Self>, key: &Arc<str>) {
        if self.degraded() || !self.can_spawn() {
            return;
        }
        let (this, key) = (self.clone(), key.clone());
        self.spawn(async move {
            if let Err(e) = this.count_use(&key).await {
                this.failed(&e);
            }
        });
    }

    /// Counts one request of a tenant without an rpm limit under `key` (its use hash, see
    /// [`floodgate_crds::redis_keys::tenant_use_key`]); the requests counted in the current
    /// minute.
    pub async fn count_use(&self, key: &str) -> Result<u64, SharedError> {
        let mut conn = self.conn()?;
        let mut call = self.count_use.prepare_invoke();
        call.key(key);
        let counted: i64 = self.bounded(call.invoke_async(&mut conn)).await?;
        u64::try_from(counted).map_err(|_| SharedError::Reply)
    }

    /// Writes `member`'s answer in the background; kept for later if Redis is unreachable.
    pub(crate) fn complete_later(self: &Arc<Self>, keys: &Arc<KeyBudgetKeys>, member: String) {
        if self.degraded() || !self.can_spawn() {
            self.remember(keys.clone(), member);
            return;
        }
        let (this, keys) = (self.clone(), keys.clone());
        self.spawn(async move {
            if let Err(e) = this.complete(&keys, &member).await {
                this.failed(&e);
                this.remember(keys, member);
            }
        });
    }

    /// Settles `member`'s tokens in the background (dropped if Redis is unreachable: the
    /// estimate stands, which errs on the safe side).
    pub(crate) fn settle_later(
        self: &Arc<Self>,
        keys: &Arc<KeyBudgetKeys>,
        member: String,
        tokens: u64,
    ) {
        if self.degraded() || !self.can_spawn() {
            return;
        }
        let (this, keys) = (self.clone(), keys.clone());
        self.spawn(async move {
            if let Err(e) = this.settle(&keys, &member, tokens).await {
                this.failed(&e);
            }
        });
    }

    /// A request's admission may or may not have reached Redis: mark it answered once Redis
    /// is back, so that it does not hold a slot until the in-flight TTL.
    pub(crate) fn forget_later(&self, keys: &Arc<KeyBudgetKeys>, member: String) {
        self.remember(keys.clone(), member);
    }

    fn remember(&self, keys: Arc<KeyBudgetKeys>, member: String) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.len() >= MAX_PENDING {
            pending.pop_front();
        }
        pending.push_back((keys, member));
    }

    /// The local share stops applying (the re-writes after an outage are done). A call that
    /// failed meanwhile began a new outage: `degraded` keeps its local share whatever this
    /// store overwrote (see [`RedisBudgets::local_share`]), and the recovery that ends that
    /// outage sets `local_until_ms` again before it clears `degraded`.
    pub(crate) fn end_local_share(&self) {
        self.local_until_ms.store(0, Ordering::Release);
    }

    /// A call failed: budgets turn local until the monitor finds Redis again.
    pub(crate) fn failed(self: &Arc<Self>, error: &SharedError) {
        self.local_until_ms.store(u64::MAX, Ordering::Release);
        if self.degraded.swap(true, Ordering::AcqRel) {
            return;
        }
        if self.reached.load(Ordering::Relaxed) {
            let mut outage = self.outage.lock().unwrap_or_else(|p| p.into_inner());
            let number = outage.map_or(1, |o| o.number + 1);
            *outage = Some(Outage {
                number,
                first_window_ends: Instant::now() + self.window + self.opts.reseed_grace,
            });
        }
        self.changes.send_replace(true);
        tracing::error!(
            reason = error.metric_label(),
            %error,
            replicas_hint = self.opts.replicas_hint.get(),
            "shared rate budgets unavailable: serving on this replica's local share of each key until Redis is back"
        );
        self.start_monitor();
        self.wake.notify_one();
    }

    /// Waits for the background writes (answers, settlements) to finish, for shutdown.
    pub async fn drain(&self) {
        self.tasks.close();
        self.cancel.cancel();
        self.tasks.wait().await;
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A random id for this replica's request ids (no RNG dependency: the std hasher is seeded
/// randomly per process).
fn replica_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}
