//! The demand for local models that this replica publishes for the operator's autoscaler:
//! per LocalModelDeployment, requests waiting for it, requests being answered by it, the
//! p95 of its answer times over the last [`LATENCY_WINDOW`], and the requests that spilled
//! over to the next target because it was saturated, over the same window (demand it could
//! not take: without them a model that spills looks idle to the autoscaler). Written to Redis about every
//! second under a short TTL ([`floodgate_crds::redis_keys::ReplicaKeys::demand`]), so that the operator
//! sums the live replicas' figures and a replica that stops stops counting.
//!
//! The request path reports through guards, so that a cancelled request cannot leave a count
//! behind: `board.cell(ns, name).queued()` when a request starts waiting for the model,
//! [`Queued::start`] when it is sent to it, [`InFlight::finish`] with its answer time when the
//! answer ends (dropping either guard just takes the request out of the count).

use crate::secret::SecretString;
use floodgate_crds::redis_keys::{
    CACHE_FIELDS, DEMAND_TTL_MS, QUEUE_MISSED, QUEUE_OLDEST, QUEUE_WAITING, QUEUE_WAITS,
    QUEUE_WITHIN, ReplicaKeys,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How far back the published p95 latency looks.
pub const LATENCY_WINDOW: Duration = Duration::from_secs(30);
/// The most answer times kept per model for the p95 (the newest).
pub const MAX_SAMPLES: usize = 2048;
/// How often the figures are published.
pub const PUBLISH_INTERVAL: Duration = Duration::from_secs(1);

/// Replaces one replica's figures of one resource (a model's demand, a TierQueue's queue
/// figures, a CachePolicy's cache figures) and refreshes the resource's replica index, on
/// Redis's clock. KEYS[1] the index, KEYS[2] the replica's hash (same hash tag); ARGV: TTL
/// (ms), replica id, then field, value pairs.
const PUBLISH: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[2], 'at', now, unpack(ARGV, 3))
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - ttl)
redis.call('PEXPIRE', KEYS[1], ttl)
return now
";

/// One tier's queue on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierFigures {
    /// The tier's name.
    pub name: String,
    /// Its requests waiting.
    pub waiting: u64,
    /// How long its longest-waiting request has waited (ms); 0 with none.
    pub oldest_wait_ms: u64,
    /// Its outcomes over the last five minutes: wait target attainment and waits.
    pub recent: crate::route::tiers::SloFigures,
}

/// The queue figures of the TierQueue `namespace/name` on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueFigures {
    /// The TierQueue's namespace.
    pub namespace: String,
    /// The TierQueue's name.
    pub name: String,
    /// Per tier.
    pub tiers: Vec<TierFigures>,
}

/// Where the publisher reads the queue figures of the TierQueue served now.
pub type QueueSource = Arc<dyn Fn() -> Option<QueueFigures> + Send + Sync>;

/// The cache figures of the CachePolicy `namespace/name` on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CacheFigures {
    /// The CachePolicy's namespace.
    pub namespace: String,
    /// The CachePolicy's name.
    pub name: String,
    /// Lookups over the last hour answered by the exact, semantic, template and dedup
    /// layers, and missed.
    pub counts: [u64; 5],
    /// Entries held in memory.
    pub entries: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Where the publisher reads the cache figures of the CachePolicy served now.
pub type CacheSource = Arc<dyn Fn() -> Option<CacheFigures> + Send + Sync>;

/// One pool's circuit states on this replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolCircuits {
    /// The pool's name.
    pub pool: String,
    /// Per provider, its name and its breaker's state (`closed`, `half-open` or `open`).
    pub providers: Vec<(String, &'static str)>,
}

/// Where the publisher reads the circuit states of the pools served now.
pub type CircuitSource = Arc<dyn Fn() -> Vec<PoolCircuits> + Send + Sync>;

/// Every local model this replica has reported demand for.
#[derive(Debug, Default)]
pub struct DemandBoard {
    cells: Mutex<BTreeMap<(String, String), Arc<DemandCell>>>,
}

impl DemandBoard {
    /// The cell of LocalModelDeployment `namespace/name`, made on first use.
    pub fn cell(&self, namespace: &str, name: &str) -> Arc<DemandCell> {
        let mut cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        cells
            .entry((namespace.to_owned(), name.to_owned()))
            .or_default()
            .clone()
    }

    /// Every model's figures now: `(namespace, name, figures)`.
    pub fn snapshot(&self) -> Vec<(String, String, Figures)> {
        let cells: Vec<_> = {
            let cells = self.cells.lock().unwrap_or_else(|p| p.into_inner());
            cells
                .iter()
                .map(|((ns, name), c)| (ns.clone(), name.clone(), c.clone()))
                .collect()
        };
        cells
            .into_iter()
            .map(|(ns, name, c)| (ns, name, c.figures()))
            .collect()
    }
}

/// One model's demand on this replica.
#[derive(Debug, Default)]
pub struct DemandCell {
    queued: AtomicU64,
    in_flight: AtomicU64,
    latencies: Mutex<VecDeque<(Instant, u64)>>,
    spills: Mutex<VecDeque<Instant>>,
}

/// One model's figures on this replica at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Figures {
    /// Requests waiting for the model.
    pub queued: u64,
    /// Requests the model is answering.
    pub in_flight: u64,
    /// p95 of the answer times of the last [`LATENCY_WINDOW`] (ms); 0 with none.
    pub latency_p95_ms: u64,
    /// Requests that spilled over to another target in the last [`LATENCY_WINDOW`].
    pub spilled: u64,
}

impl DemandCell {
    /// A request starts waiting for this model; counted until the guard is started or dropped.
    pub fn queued(self: &Arc<Self>) -> Queued {
        self.queued.fetch_add(1, Ordering::Relaxed);
        Queued { cell: self.clone() }
    }

    /// Records an answer time (also done by [`InFlight::finish`]).
    pub fn record_latency(&self, latency: Duration) {
        let ms = u64::try_from(latency.as_millis()).unwrap_or(u64::MAX);
        let mut samples = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() == MAX_SAMPLES {
            samples.pop_front();
        }
        samples.push_back((Instant::now(), ms));
    }

    /// A request spilled over to the next target instead of waiting for this model.
    pub fn spilled(&self) {
        let mut spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
        if spills.len() == MAX_SAMPLES {
            spills.pop_front();
        }
        spills.push_back(Instant::now());
    }

    /// The figures now; forgets answer times and spills older than [`LATENCY_WINDOW`].
    pub fn figures(&self) -> Figures {
        let now = Instant::now();
        let spilled = {
            let mut spills = self.spills.lock().unwrap_or_else(|p| p.into_inner());
            while spills
                .front()
                .is_some_and(|at| now.duration_since(*at) > LATENCY_WINDOW)
            {
                spills.pop_front();
            }
            u64::try_from(spills.len()).unwrap_or(u64::MAX)
        };
        let mut samples = self.latencies.lock().unwrap_or_else(|p| p.into_inner());
        while samples
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > LATENCY_WINDOW)
        {
            samples.pop_front();
        }
        let mut ms: Vec<u64> = samples.iter().map(|(_, ms)| *ms).collect();
        drop(samples);
        ms.sort_unstable();
        // Nearest rank: the smallest value with at least 95% of the samples at or below it.
        let latency_p95_ms = match ms.len() {
            0 => 0,
            n => ms[(n * 95).div_ceil(100) - 1],
        };
        Figures {
            queued: self.queued.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            latency_p95_ms,
            spilled,
        }
    }
}

/// A request waiting for a model.
#[derive(Debug)]
pub struct Queued {
    cell: Arc<DemandCell>,
}

impl Queued {
    /// The request is sent to the model: no longer waiting, now in flight.
    pub fn start(self) -> InFlight {
        let cell = self.cell.clone();
        cell.in_flight.fetch_add(1, Ordering::Relaxed);
        drop(self);
        InFlight {
            cell,
            started: Instant::now(),
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.cell.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request a model is answering.
#[derive(Debug)]
pub struct InFlight {
    cell: Arc<DemandCell>,
    started: Instant,
}

impl InFlight {
    /// The answer ended: records its time since [`Queued::start`].
    pub fn finish(self) {
        self.cell.record_latency(self.started.elapsed());
    }

    /// The answer ended after `latency` (when the caller measures it itself).
    pub fn finish_after(self, latency: Duration) {
        self.cell.record_latency(latency);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.cell.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Publishes a board's figures to Redis.
pub struct Publisher {
    board: Arc<DemandBoard>,
    queues: Option<QueueSource>,
    caches: Option<CacheSource>,
    circuits: Option<CircuitSource>,
    client: redis::Client,
    replica: String,
    script: redis::Script,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The client holds the URL, which may carry a password.
        f.debug_struct("Publisher")
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher of `board` to the Redis at `url` as replica `replica` (unique per proxy
    /// process, e.g. the pod name); does not connect yet.
    pub fn new(
        board: Arc<DemandBoard>,
        url: &SecretString,
        replica: impl Into<String>,
    ) -> Result<Self, redis::RedisError> {
        Ok(Self {
            board,
            queues: None,
            caches: None,
            circuits: None,
            client: redis::Client::open(url.expose())?,
            replica: replica.into(),
            script: redis::Script::new(PUBLISH),
        })
    }

    /// Also publishes the queue figures `source` gives (the TierQueue served now).
    pub fn with_queues(mut self, source: QueueSource) -> Self {
        self.queues = Some(source);
        self
    }

    /// Also publishes the cache figures `source` gives (the CachePolicy served now).
    pub fn with_caches(mut self, source: CacheSource) -> Self {
        self.caches = Some(source);
        self
    }

    /// Also publishes the circuit states `source` gives (the pools served now).
    pub fn with_circuits(mut self, source: CircuitSource) -> Self {
        self.circuits = Some(source);
        self
    }

    /// Publishes every model's figures once.
    pub async fn publish_once(&self, conn: &mut ConnectionManager) -> redis::RedisResult<()> {
        for (ns, name, f) in self.board.snapshot() {
            let fields = [
                ("queued", f.queued),
                ("inFlight", f.in_flight),
                ("latencyP95Ms", f.latency_p95_ms),
                ("spilled", f.spilled),
            ];
            self.publish(conn, &ReplicaKeys::demand(&ns, &name), fields)
                .await?;
        }
        if let Some(q) = self.queues.as_ref().and_then(|source| source()) {
            let fields = q.tiers.iter().flat_map(|t| {
                let waits = t.recent.waits.map(|n| n.to_string()).join(",");
                [
                    (format!("{QUEUE_WAITING}{}", t.name), t.waiting.to_string()),
                    (
                        format!("{QUEUE_OLDEST}{}", t.name),
                        t.oldest_wait_ms.to_string(),
                    ),
                    (
                        format!("{QUEUE_WITHIN}{}", t.name),
                        t.recent.within.to_string(),
                    ),
                    (
                        format!("{QUEUE_MISSED}{}", t.name),
                        t.recent.missed.to_string(),
                    ),
                    (format!("{QUEUE_WAITS}{}", t.name), waits),
                ]
            });
            self.publish(conn, &ReplicaKeys::queue(&q.namespace, &q.name), fields)
                .await?;
        }
        if let Some(c) = self.caches.as_ref().and_then(|source| source()) {
            let values = c.counts.iter().chain([&c.entries, &c.bytes]);
            let fields = CACHE_FIELDS.into_iter().zip(values);
            self.publish(conn, &ReplicaKeys::cache(&c.namespace, &c.name), fields)
                .await?;
        }
        for pool in self
            .circuits
            .as_ref()
            .map(|source| source())
            .unwrap_or_default()
        {
            let fields = pool
                .providers
                .iter()
                .map(|(provider, state)| (provider, *state));
            self.publish(conn, &ReplicaKeys::circuit(&pool.pool), fields)
                .await?;
        }
        Ok(())
    }

    /// Replaces this replica's hash under `keys` with `fields` (and `at`), and refreshes the
    /// index of replicas.
    async fn publish<F, V>(
        &self,
        conn: &mut ConnectionManager,
        keys: &ReplicaKeys,
        fields: impl IntoIterator<Item = (F, V)>,
    ) -> redis::RedisResult<()>
    where
        F: redis::ToRedisArgs,
        V: redis::ToRedisArgs,
    {
        let mut call = self.script.key(&keys.replicas);
        call.key(keys.replica(&self.replica))
            .arg(DEMAND_TTL_MS)
            .arg(&self.replica);
        for (field, value) in fields {
            call.arg(field).arg(value);
        }
        let _: u64 = call.invoke_async(conn).await?;
        Ok(())
    }

    /// Publishes every [`PUBLISH_INTERVAL`] until `shutdown`; a failure is logged (at most
    /// once until a publication succeeds again) and retried on the next tick.
    pub async fn run(self, shutdown: CancellationToken) {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(0);
        let mut conn = match ConnectionManager::new_lazy_with_config(self.client.clone(), config) {
            Ok(conn) => conn,
            Err(e) => {
                tracing::warn!(error = %e, "demand publisher cannot use Redis: local-model demand is not published");
                return;
            }
        };
        let mut tick = tokio::time::interval(PUBLISH_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.publish_once(&mut conn).await {
                Ok(()) if failing => {
                    failing = false;
                    tracing::info!("local-model demand published again");
                }
                Ok(()) => {}
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot publish local-model demand; retrying every second");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn guards_count_waiting_and_answering_and_give_back_on_drop() {
        let board = DemandBoard::default();
        let cell = board.cell("models", "llama");
        let a = cell.queued();
        let b = cell.queued();
        let c = cell.queued();
        assert_eq!((cell.figures().queued, cell.figures().in_flight), (3, 0));
        let a = a.start();
        drop(b); // the caller hung up while waiting
        assert_eq!((cell.figures().queued, cell.figures().in_flight), (1, 1));
        tokio::time::advance(Duration::from_millis(1500)).await;
        a.finish();
        let c = c.start();
        drop(c); // hung up while answered: out of the count, no answer time
        let f = cell.figures();
        assert_eq!((f.queued, f.in_flight, f.latency_p95_ms), (0, 0, 1500));
        assert_eq!(f.spilled, 0);
        // The same cell for the same model.
        assert!(Arc::ptr_eq(&cell, &board.cell("models", "llama")));
        assert_eq!(board.snapshot().len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn p95_is_the_nearest_rank_over_the_last_30_seconds_exactly() {
        let cell = Arc::new(DemandCell::default());
        for ms in 1..=100 {
            cell.record_latency(Duration::from_millis(ms));
        }
        assert_eq!(cell.figures().latency_p95_ms, 95);
        tokio::time::advance(Duration::from_secs(10)).await;
        cell.record_latency(Duration::from_millis(7));
        // At exactly 30 s the first hundred still count; 1 ms later only the newest does.
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(cell.figures().latency_p95_ms, 95);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cell.figures().latency_p95_ms, 7);
        tokio::time::advance(LATENCY_WINDOW).await;
        assert_eq!(cell.figures().latency_p95_ms, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn spills_count_for_30_seconds_exactly() {
        let cell = Arc::new(DemandCell::default());
        cell.spilled();
        cell.spilled();
        tokio::time::advance(Duration::from_secs(10)).await;
        cell.spilled();
        assert_eq!(cell.figures().spilled, 3);
        tokio::time::advance(Duration::from_secs(20)).await;
        assert_eq!(cell.figures().spilled, 3);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(cell.figures().spilled, 1);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(cell.figures().spilled, 0);
    }
}
