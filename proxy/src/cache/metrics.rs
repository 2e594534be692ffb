//! The cache's metrics, registered in the process's registry ([`crate::metrics`]).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;

/// Labels of a lookup's result.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `exact`, `template`, `dedup`, `miss` or `bypass`.
    pub result: &'static str,
}

/// Labels of a backend.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    /// `memory` or `redis`.
    pub backend: &'static str,
}

/// Labels of a store.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `stored`, `too_large`, `incomplete` or `error`.
    pub result: &'static str,
}

/// Labels of a semantic candidate the guard refused.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `number`, `negation`, `order` or `content`.
    pub reason: &'static str,
}

type FloatCounter = Counter<f64, AtomicU64>;

/// Every cache metric.
#[derive(Debug)]
pub struct CacheMetrics {
    /// Requests by what the cache did with them.
    pub requests: Family<ResultLabels, Counter>,
    /// Hits / (hits + misses), over the process's life.
    pub hit_ratio: Gauge<f64, AtomicU64>,
    /// Lookup time by backend.
    pub lookup_seconds: Family<BackendLabels, Histogram>,
    /// Entries in the memory backend; with Redis, the policy's entries there (its ledger,
    /// every replica's, as of this replica's last store).
    pub entries: Gauge,
    /// Bytes of those entries.
    pub bytes: Gauge,
    /// Entries evicted from the memory backend to stay within its bounds.
    pub evictions: Counter,
    /// Stores by result.
    pub stores: Family<StoreLabels, Counter>,
    /// Backend calls that failed (counted as misses or skipped stores).
    pub backend_errors: Family<BackendLabels, Counter>,
    /// Provider tokens not spent thanks to hits (the stored answer's usage).
    pub saved_tokens: Counter,
    /// USD not spent, at the pool's prices for the model.
    pub saved_usd: FloatCounter,
    /// Semantic candidates above the threshold that the guard refused, by reason.
    pub guard_refusals: Family<ReasonLabels, Counter>,
    /// Entries in the semantic index.
    pub semantic_entries: Gauge,
    /// Time to embed one batch of prompts.
    pub embed_seconds: Histogram,
    /// Prompts per embedded batch.
    pub embed_batch: Histogram,
    /// Bytes held by in-flight deduplication (chunks so far, answers kept for the window),
    /// charged to the memory backend's budget.
    pub flight_bytes: Gauge,
}

/// Records a batch of `n` prompts embedded in `took`.
pub fn embedded(n: usize, took: std::time::Duration) {
    let m = get();
    m.embed_seconds.observe(took.as_secs_f64());
    m.embed_batch.observe(n as f64);
}

fn lookup_histogram() -> Histogram {
    // 10 µs .. 1 s.
    Histogram::new([
        0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
        0.05, 0.1, 0.25, 1.0,
    ])
}

/// The cache's metrics.
pub fn get() -> &'static CacheMetrics {
    static METRICS: OnceLock<CacheMetrics> = OnceLock::new();
    METRICS.get_or_init(|| CacheMetrics {
        requests: Family::default(),
        hit_ratio: Gauge::default(),
        lookup_seconds: Family::new_with_constructor(lookup_histogram),
        entries: Gauge::default(),
        bytes: Gauge::default(),
        evictions: Counter::default(),
        stores: Family::default(),
        backend_errors: Family::default(),
        saved_tokens: Counter::default(),
        saved_usd: FloatCounter::default(),
        guard_refusals: Family::default(),
        semantic_entries: Gauge::default(),
        embed_seconds: lookup_histogram(),
        embed_batch: Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]),
        flight_bytes: Gauge::default(),
    })
}

/// Registers the cache's metrics in `registry`.
pub fn register(registry: &mut Registry) {
    let m = get();
    registry.register(
        "floodgate_cache_requests",
        "Chat requests by what the cache did: exact, semantic, template, dedup (hits), miss, bypass",
        m.requests.clone(),
    );
    registry.register(
        "floodgate_cache_hit_ratio",
        "Hits / (hits + misses) since the start",
        m.hit_ratio.clone(),
    );
    registry.register(
        "floodgate_cache_lookup_seconds",
        "Cache lookup time: exact by backend (memory, redis); semantic (embedding, index, guard and answer)",
        m.lookup_seconds.clone(),
    );
    registry.register(
        "floodgate_cache_entries",
        "Entries held: in the memory backend; with Redis, the policy's entries there (all replicas', as of this replica's last store)",
        m.entries.clone(),
    );
    registry.register(
        "floodgate_cache_bytes",
        "Bytes of those entries (as charged to maxBytes)",
        m.bytes.clone(),
    );
    registry.register(
        "floodgate_cache_flight_bytes",
        "Bytes held by in-flight deduplication (charged to the memory budget)",
        m.flight_bytes.clone(),
    );
    registry.register(
        "floodgate_cache_evictions",
        "Entries evicted from the memory backend (least recently used)",
        m.evictions.clone(),
    );
    registry.register(
        "floodgate_cache_stores",
        "Answers offered to the cache, by result",
        m.stores.clone(),
    );
    registry.register(
        "floodgate_cache_backend_errors",
        "Cache backend calls that failed",
        m.backend_errors.clone(),
    );
    registry.register(
        "floodgate_cache_saved_tokens",
        "Provider tokens not spent thanks to cache and dedup hits",
        m.saved_tokens.clone(),
    );
    registry.register(
        "floodgate_cache_semantic_refusals",
        "Semantic candidates above the threshold refused by the guard, by reason",
        m.guard_refusals.clone(),
    );
    registry.register(
        "floodgate_cache_semantic_entries",
        "Entries in the semantic index",
        m.semantic_entries.clone(),
    );
    registry.register(
        "floodgate_cache_embed_seconds",
        "Time to embed one batch of prompts (CPU, in-process)",
        m.embed_seconds.clone(),
    );
    registry.register(
        "floodgate_cache_embed_batch_size",
        "Prompts embedded together in one batch",
        m.embed_batch.clone(),
    );
    registry.register(
        "floodgate_cache_saved_usd",
        "US dollars not spent thanks to cache and dedup hits, at the pool's prices",
        m.saved_usd.clone(),
    );
}
