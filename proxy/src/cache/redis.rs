//! The Redis backend: answers by exact key with Redis's own TTL, shared by every replica,
//! and bounded in bytes per CachePolicy by a ledger in Redis ([`Bound`], [`STORE`]).
//! It uses the connection settings of the shared budgets (`--redis`, [`SharedOptions`]): the
//! same URL, per-call timeout and runtime. Redis failing never fails a request: a lookup
//! that fails is a miss, a store that fails is skipped, both counted.

use super::key::Key;
use crate::budget::SharedOptions;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::OnceLock;
use std::time::Duration;

/// Where exact answers live in Redis.
pub fn answer_key(key: &Key) -> String {
    format!("floodgate:cache:exact:{}", key.hex())
}

/// Answers in Redis.
pub struct RedisStore {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    timeout: Duration,
    runtime: Option<tokio::runtime::Handle>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why Redis did not answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    /// The URL does not parse (never echoed: it may hold a password).
    #[error("the Redis URL is not valid")]
    Url,
    /// No answer within the timeout.
    #[error("Redis did not answer in time")]
    Timeout,
    /// Redis answered with an error, or the connection failed.
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The call's task was lost (the runtime is shutting down).
    #[error("the Redis runtime stopped")]
    Stopped,
}

impl RedisStore {
    /// A store on the Redis of `opts` (connects on first use). Cache calls may wait longer
    /// than an admission: at least 250 ms.
    pub fn new(opts: &SharedOptions) -> Result<Self, RedisError> {
        let client = redis::Client::open(opts.url.expose()).map_err(|_| RedisError::Url)?;
        Ok(Self {
            client,
            conn: OnceLock::new(),
            timeout: opts.timeout.max(Duration::from_millis(250)),
            runtime: opts.runtime.clone(),
        })
    }

    fn conn(&self) -> Result<ConnectionManager, RedisError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(0);
        let conn = ConnectionManager::new_lazy_with_config(self.client.clone(), config)?;
        Ok(self.conn.get_or_init(|| conn).clone())
    }

    /// Runs `call` on the Redis runtime, within the timeout.
    async fn run<T: Send + 'static>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>> + Send + 'static,
    ) -> Result<T, RedisError> {
        let timeout = self.timeout;
        let bounded = async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result.map_err(RedisError::from),
                Err(_) => Err(RedisError::Timeout),
            }
        };
        match &self.runtime {
            Some(rt) => rt.spawn(bounded).await.map_err(|_| RedisError::Stopped)?,
            None => bounded.await,
        }
    }

    /// The bytes stored under `key`, if any.
    pub async fn get(&self, key: &Key) -> Result<Option<Vec<u8>>, RedisError> {
        let mut conn = self.conn()?;
        let name = answer_key(key);
        self.run(async move {
            redis::cmd("GET")
                .arg(name)
                .query_async::<Option<Vec<u8>>>(&mut conn)
                .await
        })
        .await
    }

    /// The bytes stored under `key`, if any, with the time Redis keeps them still (`None`
    /// for an entry without an expiry): one round trip.
    pub async fn get_with_ttl(
        &self,
        key: &Key,
    ) -> Result<Option<(Vec<u8>, Option<Duration>)>, RedisError> {
        let mut conn = self.conn()?;
        let name = answer_key(key);
        let (bytes, left): (Option<Vec<u8>>, i64) = self
            .run(async move {
                redis::pipe()
                    .cmd("GET")
                    .arg(&name)
                    .cmd("PTTL")
                    .arg(&name)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        // PTTL: -1 without an expiry, -2 once gone (it expired between the two commands).
        let left = match left {
            -1 => None,
            ms => Some(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        };
        Ok(bytes.map(|b| (b, left)))
    }

    /// Stores `bytes` under `key` for `ttl`, within the policy's `bound`.
    pub async fn put(
        &self,
        key: &Key,
        bytes: Vec<u8>,
        ttl: Duration,
        bound: &Bound,
    ) -> Result<Stored, RedisError> {
        self.store(answer_key(key), bytes, ttl, bound, None).await
    }

    /// Runs [`STORE`]: `bytes` under `name` for `ttl`, charged to `bound`'s ledger (the
    /// entries soonest to expire evicted until it fits), and `added` (a key's hex) appended
    /// to [`SEMANTIC_ADDED`] when given.
    async fn store(
        &self,
        name: String,
        bytes: Vec<u8>,
        ttl: Duration,
        bound: &Bound,
        added: Option<String>,
    ) -> Result<Stored, RedisError> {
        let mut conn = self.conn()?;
        let ms = ttl.as_millis().max(1) as u64;
        let (keys, max) = (bound.keys.clone(), bound.max_bytes);
        let (stream, hex) = match added {
            Some(hex) => (SEMANTIC_ADDED, hex),
            None => ("", String::new()),
        };
        let (evicted, entries, held): (i64, u64, i64) = self
            .run(async move {
                let [ledger, sizes, total] = keys;
                redis::Script::new(STORE)
                    .key(name)
                    .key(ledger)
                    .key(sizes)
                    .key(total)
                    .arg(bytes)
                    .arg(ms)
                    .arg(max)
                    .arg(stream)
                    .arg(hex)
                    .arg(SEMANTIC_ADDED_LEN)
                    .invoke_async(&mut conn)
                    .await
            })
            .await?;
        Ok(Stored {
            kept: evicted >= 0,
            evicted: u64::try_from(evicted).unwrap_or(0),
            entries,
            bytes: u64::try_from(held).unwrap_or(0),
        })
    }
}

/// What a CachePolicy holds in Redis is bounded by its `maxBytes`, whatever the replicas:
/// every entry it stores (exact answers, semantic entries) is charged to the policy's
/// ledger in Redis, and a store that would pass the bound first evicts the entries soonest
/// to expire (for entries of one TTL, the oldest).
#[derive(Debug, Clone)]
pub struct Bound {
    /// The ledger's keys: [`ledger_keys`].
    keys: [String; 3],
    max_bytes: u64,
}

impl Bound {
    /// The bound of the policy `policy` (`<namespace>/<name>`): `max_bytes` in all.
    pub fn new(policy: &str, max_bytes: u64) -> Self {
        Self {
            keys: ledger_keys(policy),
            max_bytes,
        }
    }
}

/// The ledger of what the CachePolicy `policy` holds in Redis: a sorted set of the entries'
/// keys by expiry (ms, Redis's clock), a hash of the bytes charged for each, and their sum.
/// The policy is a hash tag: the three share one Cluster slot.
pub fn ledger_keys(policy: &str) -> [String; 3] {
    let base = format!("floodgate:cache:ledger:{{{policy}}}");
    [
        base.clone(),
        format!("{base}:sizes"),
        format!("{base}:bytes"),
    ]
}

/// What a store in Redis did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// Whether the entry was stored (not when it alone is over the bound).
    pub kept: bool,
    /// Entries evicted to make room.
    pub evicted: u64,
    /// Entries the policy holds in Redis after the store (its ledger's count).
    pub entries: u64,
    /// Bytes they are charged (the ledger's sum).
    pub bytes: u64,
}

/// Stores an entry within its policy's bound, in one step. The entries whose expiry passed
/// leave the ledger (Redis dropped them already; at most 256 a call), the entry's own
/// earlier charge too (a store over it); an entry larger than the whole bound is not
/// stored (-1); then the entries soonest to expire are deleted until the sum and the new
/// charge (the value's and the key's bytes) fit, the entry is written with its TTL and
/// charged, the ledger lives as long as its last entry, and a semantic entry is announced
/// on its stream. Returns the entries evicted (-1: not stored), and the entries and bytes
/// the ledger holds after. The evicted entries and the stream are not
/// among KEYS: the store runs on one Redis (its client is not a Cluster client).
/// KEYS: entry, ledger, sizes, total. ARGV: value, ttl ms, max bytes, stream ('' for none),
/// the stream's `k`, the stream's MAXLEN.
const STORE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function forget(name)
  local size = redis.call('HGET', KEYS[3], name)
  redis.call('HDEL', KEYS[3], name)
  redis.call('ZREM', KEYS[2], name)
  if size then
    redis.call('DECRBY', KEYS[4], size)
    return tonumber(size)
  end
  return 0
end
for _, name in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 256)) do
  forget(name)
end
forget(KEYS[1])
local charge = string.len(ARGV[1]) + string.len(KEYS[1])
local max = tonumber(ARGV[3])
if charge > max then
  redis.call('DEL', KEYS[1])
  return {-1, redis.call('HLEN', KEYS[3]), tonumber(redis.call('GET', KEYS[4]) or '0')}
end
local total = tonumber(redis.call('GET', KEYS[4]) or '0')
local evicted = 0
while total + charge > max do
  local first = redis.call('ZRANGE', KEYS[2], 0, 0)
  if #first == 0 then
    break
  end
  redis.call('DEL', first[1])
  total = total - forget(first[1])
  evicted = evicted + 1
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], string.format('%.0f', now + tonumber(ARGV[2])), KEYS[1])
redis.call('HSET', KEYS[3], KEYS[1], charge)
redis.call('INCRBY', KEYS[4], charge)
local last = redis.call('ZRANGE', KEYS[2], -1, -1, 'WITHSCORES')
for i = 2, 4 do
  redis.call('PEXPIREAT', KEYS[i], last[2])
end
if ARGV[4] ~= '' then
  redis.call('XADD', ARGV[4], 'MAXLEN', '~', ARGV[6], '*', 'k', ARGV[5])
end
return {evicted, redis.call('HLEN', KEYS[3]), tonumber(redis.call('GET', KEYS[4]) or '0')}
";

/// Where a flight shared across replicas lives: the lease of its key (holding the token of
/// the flight that leads now), and the flight's own log of entries and channel, named by its
/// token, so a follower never reads one flight's start and another's end. The key's hex is
/// a hash tag (`{...}`): in a Redis Cluster the lease and the logs share one slot (the
/// publish script touches both).
pub fn flight_keys(key: &Key, token: &str) -> (String, String, String) {
    let hex = key.hex();
    (
        format!("floodgate:cache:flight:{{{hex}}}:lease"),
        format!("floodgate:cache:flight:{{{hex}}}:log:{token}"),
        format!("floodgate:cache:flight:{{{hex}}}:{token}"),
    )
}

/// A new flight's token: 16 random hex digits.
pub fn flight_token() -> String {
    use std::fmt::Write as _;
    let mut bytes = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
        // No system randomness: the time and a counter still differ per flight.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes = (t ^ n.rotate_left(48)).to_le_bytes();
    }
    bytes.iter().fold(String::with_capacity(16), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// What an entry of a flight's log does to the flight's lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseAfter {
    /// Renewed for the lease's length: more entries come.
    Renew,
    /// Released: the flight ended without an answer to share (the next request leads).
    Release,
    /// Kept as long as the log (the dedup window): the answer ended cleanly, and a request
    /// on any replica within the window finds the lease taken and reads the answer from the
    /// log instead of calling the provider again.
    Keep,
}

/// Appends an entry to a flight's log, keeps the log, and, only while the lease is still
/// this flight's, renews it, releases it, or keeps it as long as the log; says so on the
/// channel.
/// KEYS: lease, log. ARGV: entry, keep ms, token, lease ms, after (renew/release/keep),
/// channel.
const PUBLISH: &str = r"
redis.call('RPUSH', KEYS[2], ARGV[1])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('GET', KEYS[1]) == ARGV[3] then
  if ARGV[5] == 'release' then
    redis.call('DEL', KEYS[1])
  elseif ARGV[5] == 'keep' then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
end
redis.call('PUBLISH', ARGV[6], 1)
return 1
";

impl RedisStore {
    /// Takes the lease on the flight of `key` for `ttl` with `token` if nobody holds it.
    /// True: this replica leads.
    pub async fn lease(&self, key: &Key, token: &str, ttl: Duration) -> Result<bool, RedisError> {
        let mut conn = self.conn()?;
        let (lease, _, _) = flight_keys(key, token);
        let (token, ms) = (token.to_owned(), ttl.as_millis().max(1) as u64);
        self.run(async move {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&lease)
                .arg(token)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut conn)
                .await?;
            Ok(taken.is_some())
        })
        .await
    }

    /// The token of the flight that holds the lease of `key`, if any.
    pub async fn lease_holder(&self, key: &Key) -> Result<Option<String>, RedisError> {
        let mut conn = self.conn()?;
        let (lease, _, _) = flight_keys(key, "");
        self.run(async move {
            redis::cmd("GET")
                .arg(&lease)
                .query_async::<Option<String>>(&mut conn)
                .await
        })
        .await
    }

    /// Appends `entry` to the flight's log (kept `keep` after its last entry), and, while
    /// the flight holds the lease, renews it for `lease`, releases it, or keeps it `keep`
    /// (`after`); says so on the channel.
    pub async fn publish(
        &self,
        (key, token): (&Key, &str),
        entry: Vec<u8>,
        keep: Duration,
        lease: Duration,
        after: LeaseAfter,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn()?;
        let (lease_key, log, channel) = flight_keys(key, token);
        let (keep, lease) = (
            keep.as_millis().max(1) as u64,
            lease.as_millis().max(1) as u64,
        );
        let token = token.to_owned();
        self.run(async move {
            redis::Script::new(PUBLISH)
                .key(lease_key)
                .key(log)
                .arg(entry)
                .arg(keep)
                .arg(token)
                .arg(lease)
                .arg(match after {
                    LeaseAfter::Renew => "renew",
                    LeaseAfter::Release => "release",
                    LeaseAfter::Keep => "keep",
                })
                .arg(channel)
                .invoke_async::<()>(&mut conn)
                .await
        })
        .await
    }

    /// The flight's log from entry `from` on.
    pub async fn log(
        &self,
        (key, token): (&Key, &str),
        from: usize,
    ) -> Result<Vec<Vec<u8>>, RedisError> {
        let mut conn = self.conn()?;
        let (_, log, _) = flight_keys(key, token);
        self.run(async move {
            redis::cmd("LRANGE")
                .arg(&log)
                .arg(from)
                .arg(-1)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// Whether the flight `token` still holds the lease of `key`.
    pub async fn leased(&self, (key, token): (&Key, &str)) -> Result<bool, RedisError> {
        Ok(self.lease_holder(key).await?.as_deref() == Some(token))
    }

    /// A subscription to the flight's channel (a message each time its log grows).
    pub async fn subscribe(
        &self,
        (key, token): (&Key, &str),
    ) -> Result<redis::aio::PubSubStream, RedisError> {
        let (_, _, channel) = flight_keys(key, token);
        let connect = async {
            let mut pubsub = self.client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub.into_on_message())
        };
        match tokio::time::timeout(self.timeout, connect).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(RedisError::Timeout),
        }
    }
}

/// Where a semantic entry lives: its partition, text, vector and answer.
pub fn semantic_key(key: &Key) -> String {
    format!("{SEMANTIC_PREFIX}{}", key.hex())
}

const SEMANTIC_PREFIX: &str = "floodgate:cache:semantic:e:";

/// The stream of semantic entries added (field `k`: the entry's key in hex), which every
/// replica follows.
pub const SEMANTIC_ADDED: &str = "floodgate:cache:semantic:added";

/// Additions kept in the stream (approximately): a replica that falls further behind
/// catches up by its start-up scan only.
const SEMANTIC_ADDED_LEN: u64 = 100_000;

/// A semantic entry as stored in Redis.
#[derive(Debug, Clone)]
pub struct SemanticEntry {
    /// Its key.
    pub key: Key,
    /// Its partition.
    pub partition: Key,
    /// The prompt's last user message.
    pub text: String,
    /// Its embedding.
    pub vector: Vec<f32>,
    /// Time left to live.
    pub ttl: Duration,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredSemantic {
    p: String,
    t: String,
    v: String,
    a: String,
}

fn key_of_hex(hex: &str) -> Option<Key> {
    if hex.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(Key(key))
}

/// The bytes of a stored semantic entry.
pub fn semantic_bytes(partition: &Key, text: &str, vector: &[f32], answer: &[u8]) -> Vec<u8> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let floats: Vec<u8> = vector.iter().flat_map(|f| f.to_le_bytes()).collect();
    serde_json::to_vec(&StoredSemantic {
        p: partition.hex(),
        t: text.to_owned(),
        v: b64.encode(floats),
        a: b64.encode(answer),
    })
    .unwrap_or_default()
}

/// A stored semantic entry read back: the entry (with `ttl`) and its answer's bytes.
fn parse_semantic(key: Key, bytes: &[u8], ttl: Duration) -> Option<(SemanticEntry, Vec<u8>)> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD;
    let s: StoredSemantic = serde_json::from_slice(bytes).ok()?;
    let floats = b64.decode(s.v).ok()?;
    let vector = floats
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let entry = SemanticEntry {
        key,
        partition: key_of_hex(&s.p)?,
        text: s.t,
        vector,
        ttl,
    };
    Some((entry, b64.decode(s.a).ok()?))
}

impl RedisStore {
    /// Stores a semantic entry for `ttl` within the policy's `bound` and announces it on
    /// [`SEMANTIC_ADDED`].
    pub async fn put_semantic(
        &self,
        key: &Key,
        bytes: Vec<u8>,
        ttl: Duration,
        bound: &Bound,
    ) -> Result<Stored, RedisError> {
        self.store(semantic_key(key), bytes, ttl, bound, Some(key.hex()))
            .await
    }

    /// The answer bytes of the semantic entry `key`, if it is there.
    pub async fn get_semantic(&self, key: &Key) -> Result<Option<Vec<u8>>, RedisError> {
        let mut conn = self.conn()?;
        let name = semantic_key(key);
        let bytes = self
            .run(async move {
                redis::cmd("GET")
                    .arg(name)
                    .query_async::<Option<Vec<u8>>>(&mut conn)
                    .await
            })
            .await?;
        Ok(bytes.and_then(|b| parse_semantic(*key, &b, Duration::ZERO).map(|(_, a)| a)))
    }

    /// The entries `keys` with their time left (those gone are skipped).
    async fn semantic_entries(&self, keys: Vec<Key>) -> Result<Vec<SemanticEntry>, RedisError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn()?;
        let names: Vec<String> = keys.iter().map(semantic_key).collect();
        let replies: Vec<(Option<Vec<u8>>, i64)> = self
            .run(async move {
                let mut pipe = redis::pipe();
                for name in &names {
                    pipe.cmd("GET").arg(name);
                    pipe.cmd("PTTL").arg(name);
                }
                let flat: Vec<redis::Value> = pipe.query_async(&mut conn).await?;
                let mut out = Vec::new();
                let mut it = flat.into_iter();
                while let (Some(v), Some(t)) = (it.next(), it.next()) {
                    let bytes: Option<Vec<u8>> = redis::from_redis_value(v).ok().flatten();
                    let ttl: i64 = redis::from_redis_value(t).unwrap_or(-2);
                    out.push((bytes, ttl));
                }
                Ok(out)
            })
            .await?;
        Ok(keys
            .into_iter()
            .zip(replies)
            .filter_map(|(key, (bytes, ttl))| {
                let ttl = Duration::from_millis(u64::try_from(ttl).ok().filter(|t| *t > 0)?);
                parse_semantic(key, &bytes?, ttl).map(|(e, _)| e)
            })
            .collect())
    }

    /// Every semantic entry in Redis (SCAN), for a replica's start.
    pub async fn semantic_scan(&self) -> Result<Vec<SemanticEntry>, RedisError> {
        let mut out = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let mut conn = self.conn()?;
            let pattern = format!("{SEMANTIC_PREFIX}*");
            let (next, names): (u64, Vec<String>) = self
                .run(async move {
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn)
                        .await
                })
                .await?;
            let keys = names
                .iter()
                .filter_map(|n| key_of_hex(n.strip_prefix(SEMANTIC_PREFIX)?))
                .collect();
            out.extend(self.semantic_entries(keys).await?);
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }

    /// The id of the last addition on [`SEMANTIC_ADDED`] (`0-0` when none).
    pub async fn semantic_added_tail(&self) -> Result<String, RedisError> {
        let mut conn = self.conn()?;
        let reply: redis::Value = self
            .run(async move {
                redis::cmd("XREVRANGE")
                    .arg(SEMANTIC_ADDED)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(stream_ids(&reply)
            .into_iter()
            .next()
            .map_or_else(|| "0-0".to_owned(), |(id, _)| id))
    }

    /// The entries added after `last`: the new last id and the entries.
    pub async fn semantic_added_since(
        &self,
        last: &str,
    ) -> Result<(String, Vec<SemanticEntry>), RedisError> {
        let mut conn = self.conn()?;
        let from = last.to_owned();
        let reply: redis::Value = self
            .run(async move {
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(SEMANTIC_ADDED)
                    .arg(from)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        // [[stream, [[id, [k, hex]], ...]]] (or a map in RESP3), or nil.
        let entries = match reply {
            redis::Value::Array(streams) => streams
                .into_iter()
                .filter_map(|s| match s {
                    redis::Value::Array(mut parts) if parts.len() == 2 => parts.pop(),
                    _ => None,
                })
                .map(|e| stream_ids(&e))
                .collect::<Vec<_>>()
                .concat(),
            _ => Vec::new(),
        };
        let next = entries
            .last()
            .map_or_else(|| last.to_owned(), |(id, _)| id.clone());
        let keys = entries
            .iter()
            .filter_map(|(_, hex)| key_of_hex(hex))
            .collect();
        Ok((next, self.semantic_entries(keys).await?))
    }
}

/// `[[id, [field, value, ...]], ...]` -> (id, value of `k`).
fn stream_ids(v: &redis::Value) -> Vec<(String, String)> {
    let redis::Value::Array(items) = v else {
        return Vec::new();
    };
    items
        .iter()
        .filter_map(|item| {
            let redis::Value::Array(pair) = item else {
                return None;
            };
            let id: String = redis::from_redis_value_ref(pair.first()?).ok()?;
            let fields: Vec<String> = redis::from_redis_value_ref(pair.get(1)?).ok()?;
            let k = fields.chunks_exact(2).find(|f| f[0] == "k")?[1].clone();
            Some((id, k))
        })
        .collect()
}
