//! The Redis backend: answers by exact key with Redis's own TTL, shared by every replica.
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

    /// Stores `bytes` under `key` for `ttl`.
    pub async fn put(&self, key: &Key, bytes: Vec<u8>, ttl: Duration) -> Result<(), RedisError> {
        let mut conn = self.conn()?;
        let name = answer_key(key);
        let ms = ttl.as_millis().max(1) as u64;
        self.run(async move {
            redis::cmd("SET")
                .arg(name)
                .arg(bytes)
                .arg("PX")
                .arg(ms)
                .query_async::<()>(&mut conn)
                .await
        })
        .await
    }
}

/// Where a flight shared across replicas lives: its lease, its log of entries, and the
/// channel that says the log grew.
fn flight_keys(key: &Key) -> (String, String, String) {
    let hex = key.hex();
    (
        format!("floodgate:cache:flight:{hex}:lease"),
        format!("floodgate:cache:flight:{hex}:log"),
        format!("floodgate:cache:flight:{hex}"),
    )
}

impl RedisStore {
    /// Takes the lease on the flight of `key` for `ttl` if nobody holds it, and clears the
    /// log of an earlier flight. True: this replica leads.
    pub async fn lease(&self, key: &Key, ttl: Duration) -> Result<bool, RedisError> {
        let mut conn = self.conn()?;
        let (lease, log, _) = flight_keys(key);
        let ms = ttl.as_millis().max(1) as u64;
        self.run(async move {
            let taken: Option<String> = redis::cmd("SET")
                .arg(&lease)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut conn)
                .await?;
            if taken.is_some() {
                redis::cmd("DEL")
                    .arg(&log)
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            Ok(taken.is_some())
        })
        .await
    }

    /// Appends `entry` to the flight's log (kept `keep` after its last entry), renews the
    /// lease for `lease`, says so on the channel; `last` releases the lease.
    pub async fn publish(
        &self,
        key: &Key,
        entry: Vec<u8>,
        keep: Duration,
        lease: Duration,
        last: bool,
    ) -> Result<(), RedisError> {
        let mut conn = self.conn()?;
        let (lease_key, log, channel) = flight_keys(key);
        let (keep, lease) = (keep.as_millis().max(1) as u64, lease.as_millis() as u64);
        self.run(async move {
            let mut pipe = redis::pipe();
            pipe.cmd("RPUSH").arg(&log).arg(entry).ignore();
            pipe.cmd("PEXPIRE").arg(&log).arg(keep).ignore();
            if last {
                pipe.cmd("DEL").arg(&lease_key).ignore();
            } else {
                pipe.cmd("PEXPIRE").arg(&lease_key).arg(lease).ignore();
            }
            pipe.cmd("PUBLISH").arg(&channel).arg(1).ignore();
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    /// The flight's log from entry `from` on.
    pub async fn log(&self, key: &Key, from: usize) -> Result<Vec<Vec<u8>>, RedisError> {
        let mut conn = self.conn()?;
        let (_, log, _) = flight_keys(key);
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

    /// Whether someone holds the flight's lease.
    pub async fn leased(&self, key: &Key) -> Result<bool, RedisError> {
        let mut conn = self.conn()?;
        let (lease, _, _) = flight_keys(key);
        self.run(async move {
            redis::cmd("EXISTS")
                .arg(&lease)
                .query_async::<bool>(&mut conn)
                .await
        })
        .await
    }

    /// A subscription to the flight's channel (a message each time its log grows).
    pub async fn subscribe(&self, key: &Key) -> Result<redis::aio::PubSubStream, RedisError> {
        let (_, _, channel) = flight_keys(key);
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
