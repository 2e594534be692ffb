//! The Redis key layout shared by the proxies (which write it) and the operator (which reads it
//! for status). This module is the only place that spells these keys; it does no I/O.
//!
//! Every key starts with [`PREFIX`] and names a key of a pool by pool name, provider name and
//! the key's *secret reference* `<secret>/<key>` (a keyless provider: its own name again),
//! never by the secret itself and not by its display name, which defaults to a position in
//! the list (reordering keys must not hand one secret's window to another). Pool, provider
//! and Secret names are Kubernetes names (`[a-z0-9.-]`) and Secret keys `[-._a-zA-Z0-9]`, so
//! the `:` separators are unambiguous. The part in braces is a Redis Cluster hash tag: the
//! keys of one provider key share a slot, so one script may touch them all.
//!
//! Per provider key (`{ID}` = `{pool:provider:key}`, braces included):
//!
//! | key | type | content |
//! |---|---|---|
//! | `floodgate:budget:{ID}:req` | sorted set | the request log: one member per request (`<replica>-<seq>`), scored in Unix milliseconds of Redis `TIME`. An admitted request is scored `admitted + in-flight TTL` until it is answered, then re-scored with the answer time (never later). A member counts against the limit while its score is greater than `now - window`: in flight, or answered within the last window. |
//! | `floodgate:budget:{ID}:tok` | sorted set | token reservations: member as above, scored with the reservation time. |
//! | `floodgate:budget:{ID}:tok:n` | hash | token amounts: member -> tokens (the estimate, then the real count once settled), and the field `sum` holding their total. |
//! | `floodgate:budget:{ID}:epoch` | hash | the budget's epoch: `id`, a random id written by the first proxy to find the hash missing, and `ready`, Unix milliseconds of Redis `TIME` before which nothing is admitted (the proxies are re-writing what they admitted). A proxy admits only on the epoch it knows: a missing or different `id` means Redis lost the budget (a restart without persistence, a failover, a flush). |
//! | `floodgate:budget:{ID}:pace` | string | the key's shared pace: Unix milliseconds (fractional) of Redis `TIME` at which its next paced admission (a request that waited for budget) is due; read and written only by admissions of such requests, and expiring a window after that time. |
//!
//! Shared by every key: `floodgate:budget:rewritten` ([`BUDGET_REWRITES`]), a hash of each
//! replica's last re-write mark.
//!
//! Expiry: the request log lives `in-flight TTL + window` after its last admission and two
//! windows after its last answer once nothing is in flight; the token keys two windows after
//! the last reservation. Idle keys therefore disappear on their own. The epoch lives a day
//! after the last admission (at least the request log's life), so that an idle key is not
//! mistaken for a lost one.
//!
//! So the number of requests a key has used in the current window, as the proxies count it,
//! is `ZCOUNT floodgate:budget:{ID}:req (<now_ms - window_ms> +inf`.
//!
//! A tenant's own limits (rpm, tpm) use the same keys and scripts under
//! [`TENANT_PREFIX`], named by the tenant (`<namespace>/<name>` in cluster mode, `<name>`
//! standalone): `floodgate:tenant:{<tenant>}:req`, `:tok`, `:tok:n` and `:epoch`. A tenant's
//! request counts from its admission (it is marked answered at once), so `ZCOUNT` of its `:req`
//! is the requests it started in the current window.
//!
//! A tenant without an rpm limit has no request log; its requests are counted for its status
//! instead in `floodgate:tenant:{<tenant>}:use` ([`tenant_use_key`]), a hash with one field per
//! minute of Unix time (`<unix ms / 60000>`: the requests admitted in that minute, by Redis
//! `TIME`; only the current and the previous minute are kept) and `last` ([`TENANT_USE_LAST`]:
//! Unix milliseconds of its latest request). It expires a day after the last request.
//!
//! **Demand for local models** (the autoscaling signal; contract in `docs/architecture.md`).
//! Per LocalModelDeployment (`{M}` = `{<namespace>/<name>}`, braces included), every proxy
//! replica publishes about every second:
//!
//! | key | type | content |
//! |---|---|---|
//! | `floodgate:demand:{M}:replicas` | sorted set | the replicas publishing for this model: member = replica id, score = Unix ms (Redis `TIME`) of its last publication. An index only: members whose own hash expired are ignored by readers and removed by the next publication. |
//! | `floodgate:demand:{M}:r:<replica>` | hash | that replica's figures now: `queued` (requests waiting for the model), `inFlight` (requests it is answering), `latencyP95Ms` (p95 of the model's answer times over the last 30 s on that replica, 0 with none), `spilled` (requests that spilled over to the next target instead of waiting for the model, over the last 30 s; absent from older proxies), `at` (Unix ms, Redis `TIME`). Expires [`DEMAND_TTL_MS`] after its last publication, so a replica that stops publishing stops counting. |
//!
//! A model's demand is the sum of `queued`, of `inFlight` and of `spilled`, and the largest
//! `latencyP95Ms`, over the hashes that exist.
//!
//! **Queue figures of a TierQueue** (its status: requests waiting per tier, the oldest wait).
//! Per TierQueue (`{Q}` = `{<namespace>/<name>}`), every proxy replica serving it publishes
//! with its demand, under the same TTL:
//!
//! | key | type | content |
//! |---|---|---|
//! | `floodgate:queue:{Q}:replicas` | sorted set | as for demand: the replicas publishing. |
//! | `floodgate:queue:{Q}:r:<replica>` | hash | per tier `waiting:<tier>` (requests of the tier waiting on that replica) and `oldestWaitMs:<tier>` (how long its longest-waiting one has waited, 0 with none); over the replica's last [`SLO_WINDOW_SECONDS`] (in [`SLO_SLOT_SECONDS`] steps), `within:<tier>` (requests admitted within the tier's wait target), `missed:<tier>` (admitted later, or refused for time or room) and `waits:<tier>` (the admitted requests' waits as counts per [`WAIT_BUCKETS_MS`] bucket, comma-separated, one more count for longer waits); and `at`. Replaced whole at each publication. |
//!
//! A tier's figures are the sum of `waiting`, `within`, `missed` and of each `waits` bucket,
//! and the largest `oldestWaitMs`, over the hashes that exist. Its SLO attainment is
//! `within / (within + missed)`; its p95 wait is the upper bound of the bucket holding the
//! 95th percentile of the summed counts.
//!
//! **Cache figures of a CachePolicy** (its status: hit ratios, entries, bytes). Per
//! CachePolicy (`{C}` = `{<namespace>/<name>}`), every proxy replica serving it publishes
//! with its demand, under the same TTL:
//!
//! | key | type | content |
//! |---|---|---|
//! | `floodgate:cachestats:{C}:replicas` | sorted set | as for demand: the replicas publishing. |
//! | `floodgate:cachestats:{C}:r:<replica>` | hash | [`CACHE_FIELDS`]: `exact`, `semantic`, `template`, `dedup` (lookups each layer answered on that replica over the last hour), `miss` (lookups none answered), `entries` and `bytes` (what the replica holds in memory: answers with the memory backend, the semantic index with Redis), and `at`. Replaced whole at each publication. |
//!
//! **Circuit states of a pool** (its status: each provider's circuit). Per AIProviderPool
//! (`{P}` = `{<pool>}`, by name as its budget keys are), every proxy replica serving it
//! publishes with its demand, under the same TTL:
//!
//! | key | type | content |
//! |---|---|---|
//! | `floodgate:circuit:{P}:replicas` | sorted set | as for demand: the replicas publishing. |
//! | `floodgate:circuit:{P}:r:<replica>` | hash | one field per provider of the pool: its breaker's state on that replica, `closed`, `half-open` or `open` ([`CIRCUIT_STATES`]); and `at`. Replaced whole at each publication. |
//!
//! A provider's circuit is the worst state over the hashes that exist (`open` over
//! `half-open` over `closed`), with the number of replicas that report it `open`.
//!
//! **Monthly spending** (RoutingPolicy `budgets`), per budgeted tenant or pool and calendar
//! month (UTC), written by every proxy replica with `INCRBYFLOAT` as answers are costed:
//!
//! | key | type | content |
//! |---|---|---|
//! | `floodgate:cost:{<scope>:<name>}:<yyyy>-<mm>` ([`cost_spend`]) | string | USD spent, a decimal. `scope` is `tenant` (`<namespace>/<name>` in a cluster) or `pool`. Expires about a month after the month it counts ends. |

/// Prefix of every circuit-state key.
pub const CIRCUIT_PREFIX: &str = "floodgate:circuit:";

/// The states a replica publishes for a provider's breaker, best first.
pub const CIRCUIT_STATES: [&str; 3] = ["closed", "half-open", "open"];

/// The sorted set of the replicas publishing circuit states for pool `pool`.
pub fn circuit_replicas_key(pool: &str) -> String {
    format!("{CIRCUIT_PREFIX}{{{pool}}}:replicas")
}

/// The hash of replica `replica`'s circuit states for pool `pool`.
pub fn circuit_replica_key(pool: &str, replica: &str) -> String {
    format!("{CIRCUIT_PREFIX}{{{pool}}}:r:{replica}")
}

/// Prefix of every monthly-spending key.
pub const COST_PREFIX: &str = "floodgate:cost:";

/// The USD spent by `name` (`scope` `tenant` or `pool`) in month `month` (1-12) of `year`.
pub fn cost_spend(scope: &str, name: &str, year: u32, month: u32) -> String {
    format!("{COST_PREFIX}{{{scope}:{name}}}:{year:04}-{month:02}")
}

/// Prefix of every cache-figures key.
pub const CACHE_PREFIX: &str = "floodgate:cachestats:";

/// Fields of a replica's cache-figures hash: lookups answered by each layer and missed over
/// the last hour, then what it holds.
pub const CACHE_FIELDS: [&str; 7] = [
    "exact", "semantic", "template", "dedup", "miss", "entries", "bytes",
];

/// Prefix of every queue-figures key.
pub const QUEUE_PREFIX: &str = "floodgate:queue:";

/// Prefix of a tier's waiting count in a replica's queue hash: `waiting:<tier>`.
pub const QUEUE_WAITING: &str = "waiting:";

/// Prefix of a tier's oldest wait (ms) in a replica's queue hash: `oldestWaitMs:<tier>`.
pub const QUEUE_OLDEST: &str = "oldestWaitMs:";

/// Prefix of a tier's requests within its wait target: `within:<tier>`.
pub const QUEUE_WITHIN: &str = "within:";

/// Prefix of a tier's requests that missed its wait target: `missed:<tier>`.
pub const QUEUE_MISSED: &str = "missed:";

/// Prefix of a tier's wait histogram: `waits:<tier>`.
pub const QUEUE_WAITS: &str = "waits:";

/// How far back a replica's SLO counts and wait histogram look.
pub const SLO_WINDOW_SECONDS: u64 = 300;

/// The step in which that window moves.
pub const SLO_SLOT_SECONDS: u64 = 30;

/// Upper bounds (ms, inclusive) of the wait histogram's buckets; a last bucket holds longer
/// waits.
pub const WAIT_BUCKETS_MS: [u64; 13] = [
    10, 50, 100, 250, 500, 1_000, 2_000, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
];

/// The wait (ms) under which `percentile` (0-100) of the requests counted in `buckets` (one
/// count per [`WAIT_BUCKETS_MS`] bound, then the longer ones) waited: the upper bound of the
/// bucket that holds it; `None` with no request counted, and for the last, unbounded bucket.
pub fn wait_percentile_ms(buckets: &[u64], percentile: u64) -> Option<u64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    // The rank of the percentile's request, counted from 1.
    let rank = (total * percentile).div_ceil(100).max(1);
    let mut seen = 0;
    for (i, count) in buckets.iter().enumerate() {
        seen += count;
        if seen >= rank {
            return WAIT_BUCKETS_MS.get(i).copied();
        }
    }
    None
}

/// Prefix of every shared-budget key.
pub const PREFIX: &str = "floodgate:budget:";

/// Hash of every proxy replica's re-write mark: field = replica id (`<replica>` of the
/// members, 16 hex digits), value = Unix ms (Redis `TIME`) at which the replica began its
/// last check of the budgets that ended with nothing left to re-write. A mark at or after an
/// instant says that whatever Redis had lost by then (a restart, a flush, an outage's
/// admissions) that replica has re-written; the proxies end a lost budget's barrier, or the
/// local share after an outage, once every replica seen shortly before has marked so.
/// Lives a day after the last mark; a field older than an hour is removed by the next mark.
pub const BUDGET_REWRITES: &str = "floodgate:budget:rewritten";

/// Prefix of every tenant's shared-budget key.
pub const TENANT_PREFIX: &str = "floodgate:tenant:";

/// Prefix of every demand key.
pub const DEMAND_PREFIX: &str = "floodgate:demand:";

/// How long a replica's demand figures count after its last publication (ms).
pub const DEMAND_TTL_MS: u64 = 5_000;

/// The Redis keys under which every gateway replica publishes its figures of one resource
/// about every second: a local model's demand, a TierQueue's queue figures or a CachePolicy's
/// cache figures (the layouts above). The same two keys for each, under [`DEMAND_TTL_MS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaKeys {
    /// Sorted set of the replicas publishing, scored by their last publication.
    pub replicas: String,
    /// Prefix of each replica's hash: `<this><replica id>`.
    pub replica_prefix: String,
}

impl ReplicaKeys {
    /// The keys of the resource `namespace/name` whose figures live under `prefix`.
    fn new(prefix: &str, namespace: &str, name: &str) -> Self {
        let id = format!("{prefix}{{{namespace}/{name}}}");
        Self {
            replicas: format!("{id}:replicas"),
            replica_prefix: format!("{id}:r:"),
        }
    }

    /// The demand keys of LocalModelDeployment `namespace/name`.
    pub fn demand(namespace: &str, name: &str) -> Self {
        Self::new(DEMAND_PREFIX, namespace, name)
    }

    /// The queue-figures keys of TierQueue `namespace/name`.
    pub fn queue(namespace: &str, name: &str) -> Self {
        Self::new(QUEUE_PREFIX, namespace, name)
    }

    /// The cache-figures keys of CachePolicy `namespace/name`.
    pub fn cache(namespace: &str, name: &str) -> Self {
        Self::new(CACHE_PREFIX, namespace, name)
    }

    /// The circuit-state keys of pool `pool` ([`circuit_replicas_key`],
    /// [`circuit_replica_key`]).
    pub fn circuit(pool: &str) -> Self {
        Self {
            replicas: circuit_replicas_key(pool),
            replica_prefix: format!("{CIRCUIT_PREFIX}{{{pool}}}:r:"),
        }
    }

    /// The hash of replica `replica`.
    pub fn replica(&self, replica: &str) -> String {
        format!("{}{replica}", self.replica_prefix)
    }
}

/// The Redis keys of one provider key's shared budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBudgetKeys {
    /// Sorted set of requests (in flight or answered within the window).
    pub requests: String,
    /// Sorted set of token reservations by time.
    pub tokens: String,
    /// Hash of token amounts per reservation, plus their `sum`.
    pub token_amounts: String,
    /// Hash of the budget's epoch (`id`, `ready`).
    pub epoch: String,
    /// The key's shared pace: the theoretical arrival time of its next paced admission (ms
    /// on Redis's clock), for requests that waited.
    pub pace: String,
}

impl KeyBudgetKeys {
    /// The keys of the budget of key `key` (its secret reference `<secret>/<key>`) of
    /// provider `provider` in pool `pool`; never the secret.
    pub fn new(pool: &str, provider: &str, key: &str) -> Self {
        let id = format!("{PREFIX}{{{pool}:{provider}:{key}}}");
        Self {
            requests: format!("{id}:req"),
            tokens: format!("{id}:tok"),
            token_amounts: format!("{id}:tok:n"),
            epoch: format!("{id}:epoch"),
            pace: format!("{id}:pace"),
        }
    }

    /// The keys of the budget of tenant `tenant` (`<namespace>/<name>`, or `<name>`).
    pub fn tenant(tenant: &str) -> Self {
        let id = format!("{TENANT_PREFIX}{{{tenant}}}");
        Self {
            requests: format!("{id}:req"),
            tokens: format!("{id}:tok"),
            token_amounts: format!("{id}:tok:n"),
            epoch: format!("{id}:epoch"),
            pace: format!("{id}:pace"),
        }
    }

    /// `SCAN` pattern matching the request logs of every key of `pool`.
    pub fn requests_pattern(pool: &str) -> String {
        format!("{PREFIX}{{{pool}:*}}:req")
    }
}

/// The hash counting the requests of tenant `tenant` (`<namespace>/<name>`, or `<name>`)
/// per minute, for a tenant without an rpm limit (see the module's layout).
pub fn tenant_use_key(tenant: &str) -> String {
    format!("{TENANT_PREFIX}{{{tenant}}}:use")
}

/// The field of [`tenant_use_key`] holding the Unix milliseconds of the latest request.
pub const TENANT_USE_LAST: &str = "last";

/// The length of a minute field of [`tenant_use_key`], in milliseconds.
pub const TENANT_USE_MINUTE_MS: u64 = 60_000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        let k = KeyBudgetKeys::new("premium", "claude", "key1");
        assert_eq!(k.requests, "floodgate:budget:{premium:claude:key1}:req");
        assert_eq!(k.tokens, "floodgate:budget:{premium:claude:key1}:tok");
        assert_eq!(
            k.token_amounts,
            "floodgate:budget:{premium:claude:key1}:tok:n"
        );
        assert_eq!(k.epoch, "floodgate:budget:{premium:claude:key1}:epoch");
        assert_eq!(k.pace, "floodgate:budget:{premium:claude:key1}:pace");
        assert_eq!(
            KeyBudgetKeys::requests_pattern("premium"),
            "floodgate:budget:{premium:*}:req"
        );
        let t = KeyBudgetKeys::tenant("team-a/acme");
        assert_eq!(t.requests, "floodgate:tenant:{team-a/acme}:req");
        assert_eq!(t.token_amounts, "floodgate:tenant:{team-a/acme}:tok:n");
        assert_eq!(t.epoch, "floodgate:tenant:{team-a/acme}:epoch");
        assert_eq!(
            tenant_use_key("team-a/acme"),
            "floodgate:tenant:{team-a/acme}:use"
        );
        let d = ReplicaKeys::demand("models", "llama");
        assert_eq!(d.replicas, "floodgate:demand:{models/llama}:replicas");
        assert_eq!(d.replica("r1"), "floodgate:demand:{models/llama}:r:r1");
        let q = ReplicaKeys::queue("ai", "tiers");
        assert_eq!(q.replica_prefix, "floodgate:queue:{ai/tiers}:r:");
        assert_eq!(q.replicas, "floodgate:queue:{ai/tiers}:replicas");
        let c = ReplicaKeys::cache("ai", "cache");
        assert_eq!(c.replica("r1"), "floodgate:cachestats:{ai/cache}:r:r1");
        assert_eq!(q.replica("r1"), "floodgate:queue:{ai/tiers}:r:r1");
        assert_eq!(
            circuit_replicas_key("premium"),
            "floodgate:circuit:{premium}:replicas"
        );
        assert_eq!(
            circuit_replica_key("premium", "r1"),
            "floodgate:circuit:{premium}:r:r1"
        );
        assert_eq!(
            cost_spend("tenant", "ai/acme", 2026, 3),
            "floodgate:cost:{tenant:ai/acme}:2026-03"
        );
    }

    #[test]
    fn a_wait_percentile_is_the_bound_of_the_bucket_that_holds_it() {
        let mut b = [0u64; WAIT_BUCKETS_MS.len() + 1];
        assert_eq!(wait_percentile_ms(&b, 95), None);
        // 95 requests within 10 ms, 5 within 1 s: the 95th is the last of the first bucket.
        b[0] = 95;
        b[5] = 5;
        assert_eq!(wait_percentile_ms(&b, 95), Some(10));
        // One more slow one moves the 95th request (rank 96 of 101) into the slow bucket.
        b[5] = 6;
        assert_eq!(wait_percentile_ms(&b, 95), Some(1_000));
        // Past the last bound there is no bound to give.
        let mut long = [0u64; WAIT_BUCKETS_MS.len() + 1];
        long[WAIT_BUCKETS_MS.len()] = 1;
        assert_eq!(wait_percentile_ms(&long, 95), None);
    }
}
