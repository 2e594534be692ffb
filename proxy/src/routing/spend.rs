//! Monthly spending shared by the gateway replicas through Redis (`--redis`): one float per
//! budgeted tenant or pool and month ([`floodgate_crds::redis_keys::cost_spend`]), raised
//! with `INCRBYFLOAT` by every answer's cost and read before each budgeted request. It
//! survives restarts and rollouts, and N replicas together spend one budget, not N.
//!
//! Redis failing never fails a request: a read that fails leaves the replica on the last
//! total it knew plus what it spent since (its [`super::cost::Ledger`]'s own figures); a
//! write that fails is lost from the shared total. After a failure Redis is left alone for
//! [`BACKOFF`], so an outage costs a request at most one timeout per second.

use crate::budget::SharedOptions;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long Redis is left alone after a failed call.
pub const BACKOFF: Duration = Duration::from_secs(1);

/// How long a month's total is kept after its last write: the rest of the month and about
/// one more, so last month's figure can still be looked at.
pub fn keep_for(seconds_left_in_month: u64) -> u64 {
    seconds_left_in_month + 32 * 86_400
}

/// The spending of this month in Redis.
pub struct SharedSpend {
    client: redis::Client,
    conn: OnceLock<ConnectionManager>,
    timeout: Duration,
    runtime: Option<tokio::runtime::Handle>,
    /// Unix milliseconds before which Redis is not asked (after a failure).
    resting_until: AtomicU64,
}

impl std::fmt::Debug for SharedSpend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSpend")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Why Redis gave no figure.
#[derive(Debug, thiserror::Error)]
pub enum SpendError {
    /// Resting after a failure ([`BACKOFF`]).
    #[error("Redis is resting after a failure")]
    Resting,
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

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl SharedSpend {
    /// Spending on the Redis of `opts` (connects on first use); `None` when its URL does not
    /// parse (the shared budgets refuse it at start-up already).
    pub fn new(opts: &SharedOptions) -> Option<Self> {
        let client = redis::Client::open(opts.url.expose()).ok()?;
        Some(Self {
            client,
            conn: OnceLock::new(),
            timeout: opts.timeout.max(Duration::from_millis(250)),
            runtime: opts.runtime.clone(),
            resting_until: AtomicU64::new(0),
        })
    }

    fn conn(&self) -> Result<ConnectionManager, SpendError> {
        if unix_ms() < self.resting_until.load(Ordering::Relaxed) {
            return Err(SpendError::Resting);
        }
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

    /// Runs `call` on the Redis runtime within the timeout; a failure rests Redis.
    async fn run<T: Send + 'static>(
        &self,
        call: impl Future<Output = redis::RedisResult<T>> + Send + 'static,
    ) -> Result<T, SpendError> {
        let timeout = self.timeout;
        let bounded = async move {
            match tokio::time::timeout(timeout, call).await {
                Ok(result) => result.map_err(SpendError::from),
                Err(_) => Err(SpendError::Timeout),
            }
        };
        let result = match &self.runtime {
            Some(rt) => rt.spawn(bounded).await.unwrap_or(Err(SpendError::Stopped)),
            None => bounded.await,
        };
        if let Err(e) = &result {
            tracing::warn!(error = %e, "monthly spending: Redis failed; counting on this replica's figures for now");
            let until = unix_ms() + u64::try_from(BACKOFF.as_millis()).unwrap_or(1000);
            self.resting_until.store(until, Ordering::Relaxed);
        }
        result
    }

    /// The totals spent under `keys` (0 for a key not written yet), in one round trip.
    pub async fn totals(&self, keys: Vec<String>) -> Result<Vec<f64>, SpendError> {
        let mut conn = self.conn()?;
        let values: Vec<Option<String>> = self
            .run(async move {
                redis::cmd("MGET")
                    .arg(keys)
                    .query_async::<Vec<Option<String>>>(&mut conn)
                    .await
            })
            .await?;
        Ok(values.into_iter().map(|v| parse(v.as_deref())).collect())
    }

    /// Adds each `(key, usd)`, keeping each key `keep` seconds; the new totals, in one round
    /// trip.
    pub async fn add(&self, adds: Vec<(String, f64)>, keep: u64) -> Result<Vec<f64>, SpendError> {
        let mut conn = self.conn()?;
        let values: Vec<String> = self
            .run(async move {
                let mut pipe = redis::pipe();
                for (key, usd) in &adds {
                    pipe.cmd("INCRBYFLOAT").arg(key).arg(*usd);
                    pipe.cmd("EXPIRE").arg(key).arg(keep).ignore();
                }
                pipe.query_async::<Vec<String>>(&mut conn).await
            })
            .await?;
        Ok(values.iter().map(|v| parse(Some(v))).collect())
    }
}

/// A total as Redis holds it (a decimal string); 0 when missing or unreadable.
fn parse(value: Option<&str>) -> f64 {
    value
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|v| v.is_finite())
        .unwrap_or(0.0)
}
