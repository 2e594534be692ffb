//! Live usage of pools, read from the Redis in which the gateway's replicas share their rate
//! budgets (layout: [`floodgate_crds::redis_keys`]). A key's use is the number of requests in
//! its request log scored within the last minute by Redis' own clock: in flight, or answered
//! within the minute, over every replica, exactly as the proxies count against the limit.
//!
//! Each replica also publishes its breakers' states per pool; a provider's circuit is the
//! worst over the replicas whose figures have not expired ([`sum_circuits`]).

use crate::error::Result;
use floodgate_crds::pool::{AIProviderPoolSpec, Provider};
use floodgate_crds::redis_keys::{
    CIRCUIT_STATES, KeyBudgetKeys, ReplicaKeys, TENANT_USE_LAST, TENANT_USE_MINUTE_MS,
    tenant_use_key,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

/// The window `usedRpm` counts over.
pub const WINDOW_MS: u64 = 60_000;

/// How long a connection or a reply may take: a dead Redis must not hold up a reconcile.
pub const TIMEOUT: Duration = Duration::from_secs(2);

/// Requests in the last minute per provider name.
pub type ProviderUsage = BTreeMap<String, u64>;

/// Reads usage from one Redis; connects on first use and reconnects after failures.
pub struct UsageReader {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
}

impl std::fmt::Debug for UsageReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: never printed.
        f.debug_struct("UsageReader").finish_non_exhaustive()
    }
}

impl UsageReader {
    /// A reader for the Redis at `url` (`redis://host:port[/db]`); does not connect yet.
    pub fn new(url: &str) -> Result<Self> {
        Ok(Self {
            client: redis::Client::open(url)?,
            conn: OnceLock::new(),
        })
    }

    pub(crate) fn connection(&self) -> Result<ConnectionManager> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        // One attempt per call, bounded: the next reconcile tries again.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(TIMEOUT))
            .set_response_timeout(Some(TIMEOUT))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.conn.get_or_init(|| conn).clone())
    }

    /// The hashes of the gateway replicas publishing under `keys` (a model's demand, a
    /// TierQueue's or a CachePolicy's figures) whose figures have not expired: an expired
    /// hash reads as empty, that replica stopped publishing.
    pub(crate) async fn replica_hashes(
        &self,
        keys: &ReplicaKeys,
    ) -> Result<Vec<BTreeMap<String, String>>> {
        let mut conn = self.connection()?;
        let replicas: Vec<String> = redis::cmd("ZRANGE")
            .arg(&keys.replicas)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        if replicas.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for r in &replicas {
            pipe.cmd("HGETALL").arg(keys.replica(r));
        }
        let hashes: Vec<BTreeMap<String, String>> = pipe.query_async(&mut conn).await?;
        Ok(hashes.into_iter().filter(|h| !h.is_empty()).collect())
    }

    /// Requests of the last minute per provider of pool `pool`, over all its keys.
    pub async fn pool_usage(&self, pool: &str, spec: &AIProviderPoolSpec) -> Result<ProviderUsage> {
        let mut conn = self.connection()?;
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let since = format!("({}", now_ms.saturating_sub(WINDOW_MS));
        let mut pipe = redis::pipe();
        let mut owners = Vec::new();
        for provider in &spec.providers {
            for id in budget_ids(provider) {
                let keys = KeyBudgetKeys::new(pool, &provider.name, &id);
                pipe.cmd("ZCOUNT")
                    .arg(keys.requests)
                    .arg(&since)
                    .arg("+inf");
                owners.push(provider.name.as_str());
            }
        }
        let counts: Vec<u64> = if owners.is_empty() {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await?
        };
        let mut usage: ProviderUsage = spec.providers.iter().map(|p| (p.name.clone(), 0)).collect();
        for (owner, count) in owners.into_iter().zip(counts) {
            *usage.entry(owner.to_owned()).or_default() += count;
        }
        Ok(usage)
    }
}

/// One provider's circuit over the gateway replicas that report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CircuitUsage {
    /// The worst state reported (one of [`CIRCUIT_STATES`]).
    pub worst: &'static str,
    /// Replicas reporting it.
    pub replicas: u32,
    /// Replicas reporting it open.
    pub open: u32,
}

/// Circuits of a pool per provider name.
pub type PoolCircuits = BTreeMap<String, CircuitUsage>;

/// Sums replicas' circuit hashes (provider -> state; `at` and states this version does not
/// know are skipped): per provider, the worst state and how many replicas report it open.
pub fn sum_circuits(hashes: impl IntoIterator<Item = BTreeMap<String, String>>) -> PoolCircuits {
    let rank_of = |state: &str| CIRCUIT_STATES.iter().position(|s| *s == state);
    let mut circuits = PoolCircuits::new();
    for (provider, state) in hashes.into_iter().flatten() {
        let Some(rank) = rank_of(&state) else {
            continue;
        };
        let c = circuits.entry(provider).or_insert(CircuitUsage {
            worst: CIRCUIT_STATES[0],
            replicas: 0,
            open: 0,
        });
        c.replicas += 1;
        if rank == CIRCUIT_STATES.len() - 1 {
            c.open += 1;
        }
        if rank_of(c.worst) < Some(rank) {
            c.worst = CIRCUIT_STATES[rank];
        }
    }
    circuits
}

impl UsageReader {
    /// The circuits of pool `pool`'s providers over the replicas whose figures have not
    /// expired (layout: [`floodgate_crds::redis_keys`]).
    pub async fn pool_circuits(&self, pool: &str) -> Result<PoolCircuits> {
        let hashes = self.replica_hashes(&ReplicaKeys::circuit(pool)).await?;
        Ok(sum_circuits(hashes))
    }
}

/// Members of a sorted set with their scores.
type Scored = Vec<(String, f64)>;

/// What a tenant used in the current window, over every gateway replica, as its own limits
/// count it (see [`floodgate_crds::redis_keys`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TenantUsage {
    /// Requests started in the window: counted only for a tenant with an rpm limit.
    pub requests: u64,
    /// Tokens reserved in the window (settled to the real counts when answers report them):
    /// counted only for a tenant with a tpm limit.
    pub tokens: u64,
    /// Requests of about the last minute from the per-minute count the proxies keep for a
    /// tenant without an rpm limit: the current minute's, and the previous minute's in
    /// proportion to the part of it the last 60 s still cover ([`sliding_count`]).
    pub counted: u64,
    /// Unix milliseconds of its latest request or reservation still in Redis.
    pub last_seen_ms: Option<u64>,
}

/// Requests in the 60 s before `now_ms` estimated from per-minute counts: all of the current
/// minute's (`current`), and of the previous minute's (`previous`) the share that falls
/// within the last 60 s, as if spread evenly over it (rounded to the nearest).
pub fn sliding_count(now_ms: u64, current: u64, previous: u64) -> u64 {
    let into = now_ms % TENANT_USE_MINUTE_MS;
    let left = TENANT_USE_MINUTE_MS - into;
    current + (previous * left + TENANT_USE_MINUTE_MS / 2) / TENANT_USE_MINUTE_MS
}

impl UsageReader {
    /// The current window's use of tenant `tenant` (`<namespace>/<name>`). A tenant the
    /// proxies have not seen within two windows (a day, for one without an rpm limit) reads
    /// as zero with no last-seen time.
    pub async fn tenant_usage(&self, tenant: &str) -> Result<TenantUsage> {
        let mut conn = self.connection()?;
        let keys = KeyBudgetKeys::tenant(tenant);
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await?;
        let now_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let since = format!("({}", now_ms.saturating_sub(WINDOW_MS));
        let minute = now_ms / TENANT_USE_MINUTE_MS;
        type Counted = (Option<u64>, Option<u64>, Option<u64>);
        let (requests, newest_request, reservations, newest_reservation, counted): (
            u64,
            Scored,
            Vec<String>,
            Scored,
            Counted,
        ) = redis::pipe()
            .cmd("ZCOUNT")
            .arg(&keys.requests)
            .arg(&since)
            .arg("+inf")
            .cmd("ZRANGE")
            .arg(&keys.requests)
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("ZRANGEBYSCORE")
            .arg(&keys.tokens)
            .arg(&since)
            .arg("+inf")
            .cmd("ZRANGE")
            .arg(&keys.tokens)
            .arg(-1)
            .arg(-1)
            .arg("WITHSCORES")
            .cmd("HMGET")
            .arg(tenant_use_key(tenant))
            .arg(minute)
            .arg(minute.saturating_sub(1))
            .arg(TENANT_USE_LAST)
            .query_async(&mut conn)
            .await?;
        let (current, previous, counted_last) = counted;
        let tokens = if reservations.is_empty() {
            0
        } else {
            let amounts: Vec<Option<u64>> = redis::cmd("HMGET")
                .arg(&keys.token_amounts)
                .arg(&reservations)
                .query_async(&mut conn)
                .await?;
            amounts.into_iter().flatten().sum()
        };
        // A request in flight is scored later than now (admission + TTL): seen now.
        let last_seen_ms = newest_request
            .iter()
            .chain(&newest_reservation)
            .map(|(_, score)| (*score as u64).min(now_ms))
            .chain(counted_last)
            .max();
        Ok(TenantUsage {
            requests,
            tokens,
            counted: sliding_count(now_ms, current.unwrap_or(0), previous.unwrap_or(0)),
            last_seen_ms,
        })
    }
}

/// The budget ids of a provider's keys: each key's secret reference `<secret>/<key>`, or the
/// provider's own name for a keyless provider (as the proxies name them).
pub fn budget_ids(provider: &Provider) -> Vec<String> {
    if provider.keys.is_empty() {
        vec![provider.name.clone()]
    } else {
        provider
            .keys
            .iter()
            .map(|k| format!("{}/{}", k.secret_ref.name, k.secret_ref.key))
            .collect()
    }
}

/// One tier's queue over every gateway replica.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TierQueueUsage {
    /// Requests waiting.
    pub waiting: u64,
    /// How long the longest-waiting has waited (ms).
    pub oldest_wait_ms: u64,
    /// Requests admitted within the tier's wait target over the replicas' recent window.
    pub within: u64,
    /// Requests admitted later or refused for time or room over that window.
    pub missed: u64,
    /// The admitted requests' waits per bucket of
    /// [`floodgate_crds::redis_keys::WAIT_BUCKETS_MS`], then the longer ones.
    pub waits: Vec<u64>,
}

/// A TierQueue's queues per tier name, over the replicas whose figures have not expired.
pub type QueueUsage = BTreeMap<String, TierQueueUsage>;

impl UsageReader {
    /// The queue figures of TierQueue `namespace/name` (layout: [`floodgate_crds::redis_keys`]):
    /// per tier, the sum of the replicas' waiting counts and the largest oldest wait.
    pub async fn queue_usage(&self, namespace: &str, name: &str) -> Result<QueueUsage> {
        use floodgate_crds::redis_keys::{
            QUEUE_MISSED, QUEUE_OLDEST, QUEUE_WAITING, QUEUE_WAITS, QUEUE_WITHIN,
        };
        let hashes = self
            .replica_hashes(&ReplicaKeys::queue(namespace, name))
            .await?;
        let mut usage = QueueUsage::new();
        // A field that does not parse (another version's) counts as nothing.
        let number = |v: &str| v.parse::<u64>().unwrap_or(0);
        for (field, value) in hashes.into_iter().flatten() {
            if let Some(tier) = field.strip_prefix(QUEUE_WAITING) {
                usage.entry(tier.to_owned()).or_default().waiting += number(&value);
            } else if let Some(tier) = field.strip_prefix(QUEUE_OLDEST) {
                let t = usage.entry(tier.to_owned()).or_default();
                t.oldest_wait_ms = t.oldest_wait_ms.max(number(&value));
            } else if let Some(tier) = field.strip_prefix(QUEUE_WITHIN) {
                usage.entry(tier.to_owned()).or_default().within += number(&value);
            } else if let Some(tier) = field.strip_prefix(QUEUE_MISSED) {
                usage.entry(tier.to_owned()).or_default().missed += number(&value);
            } else if let Some(tier) = field.strip_prefix(QUEUE_WAITS) {
                let t = usage.entry(tier.to_owned()).or_default();
                for (i, count) in value.split(',').enumerate() {
                    if t.waits.len() <= i {
                        t.waits.resize(i + 1, 0);
                    }
                    t.waits[i] += number(count);
                }
            }
        }
        Ok(usage)
    }
}

/// One CachePolicy's figures over every gateway replica (the last hour's lookups).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheUsage {
    /// Lookups answered by the exact, semantic, template and dedup layers, and missed:
    /// summed over replicas.
    pub counts: [u64; 5],
    /// Entries held in memory: summed over replicas, and the largest replica's.
    pub entries: (u64, u64),
    /// Their bytes: summed over replicas, and the largest replica's.
    pub bytes: (u64, u64),
    /// Replicas whose figures have not expired.
    pub replicas: u32,
}

impl UsageReader {
    /// The cache figures of CachePolicy `namespace/name` (layout:
    /// [`floodgate_crds::redis_keys`]) over the replicas whose figures have not expired.
    pub async fn cache_usage(&self, namespace: &str, name: &str) -> Result<CacheUsage> {
        use floodgate_crds::redis_keys::CACHE_FIELDS;
        let hashes = self
            .replica_hashes(&ReplicaKeys::cache(namespace, name))
            .await?;
        let mut usage = CacheUsage::default();
        for hash in &hashes {
            usage.replicas += 1;
            // A field absent or not a number (another version's) counts as nothing.
            let field = |f: &str| hash.get(f).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            for (count, f) in usage.counts.iter_mut().zip(CACHE_FIELDS) {
                *count += field(f);
            }
            let (entries, bytes) = (field(CACHE_FIELDS[5]), field(CACHE_FIELDS[6]));
            usage.entries = (usage.entries.0 + entries, usage.entries.1.max(entries));
            usage.bytes = (usage.bytes.0 + bytes, usage.bytes.1.max(bytes));
        }
        Ok(usage)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(fields: &[(&str, &str)]) -> BTreeMap<String, String> {
        fields
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_previous_minute_counts_for_the_part_the_last_60_s_still_cover() {
        let minute = TENANT_USE_MINUTE_MS;
        // At the start of a minute all of the previous one counts; at its end none.
        assert_eq!(sliding_count(10 * minute, 3, 60), 63);
        assert_eq!(sliding_count(10 * minute + minute / 4, 3, 60), 48);
        assert_eq!(sliding_count(11 * minute - 1, 3, 60), 3);
        assert_eq!(sliding_count(10 * minute + 1, 0, 0), 0);
    }

    #[test]
    fn a_circuit_is_the_worst_over_the_replicas_with_how_many_see_it_open() {
        let circuits = sum_circuits([
            hash(&[
                ("claude", "closed"),
                ("gpt4", "open"),
                ("at", "1700000000000"),
            ]),
            hash(&[("claude", "half-open"), ("gpt4", "open")]),
            hash(&[
                ("claude", "closed"),
                ("gpt4", "closed"),
                ("gemini", "later-state"),
            ]),
            // An expired replica's hash reads as empty.
            BTreeMap::new(),
        ]);
        let seen: Vec<_> = circuits
            .iter()
            .map(|(p, c)| (p.as_str(), c.worst, c.replicas, c.open))
            .collect();
        assert_eq!(
            seen,
            [("claude", "half-open", 3, 0), ("gpt4", "open", 3, 2)]
        );
        assert!(sum_circuits([]).is_empty());
    }
}
