//! Per-(provider, key) counters and sliding-window rate limits.
//!
//! Each key keeps two logs of request times within the window: every request *seen* (to
//! record the busiest window, [`KeyCounts::max_in_window`]) and every request *admitted* (the
//! limiter; refused requests do not use budget, as with the real services). Memory per key is
//! bounded by the traffic of one window.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::{MockConfig, Provider};

/// A snapshot of what the mock has received, per (provider, key).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// The rate-limit window length, in milliseconds.
    pub window_ms: u64,
    /// One entry per (provider, key) seen, sorted by provider then key.
    pub keys: Vec<KeyCounts>,
}

/// Counters for one key of one provider (Ollama's key is always `""`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyCounts {
    /// The provider called.
    pub provider: Provider,
    /// The key the caller sent (`""` when none).
    pub key: String,
    /// The key's requests-per-window limit, if any.
    pub limit: Option<u32>,
    /// Every request received with this key.
    pub requests: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Refused with 429 (over the limit, or the `ratelimited` fault).
    pub rate_limited: u64,
    /// Refused as a missing, unknown or invalid key.
    pub unauthorized: u64,
    /// Other 4xx answers (bad request, missing header…).
    pub client_errors: u64,
    /// 5xx answers (injected faults).
    pub server_errors: u64,
    /// The most requests received (refused ones included) in any window.
    pub max_in_window: u32,
    /// Arrival times of the most recent requests, in microseconds since the mock started.
    pub timestamps_us: Vec<u64>,
}

impl KeyCounts {
    /// Whether the key ever received more requests in one window than its limit.
    pub fn exceeded_limit(&self) -> bool {
        self.limit.is_some_and(|limit| self.max_in_window > limit)
    }
}

impl Counts {
    /// The counters of one key, if it was used.
    pub fn get(&self, provider: Provider, key: &str) -> Option<&KeyCounts> {
        self.keys
            .iter()
            .find(|k| k.provider == provider && k.key == key)
    }

    /// Requests received by one key (0 if never used).
    pub fn requests(&self, provider: Provider, key: &str) -> u64 {
        self.get(provider, key).map_or(0, |k| k.requests)
    }

    /// Requests received by one provider, all keys together.
    pub fn provider_total(&self, provider: Provider) -> u64 {
        self.keys
            .iter()
            .filter(|k| k.provider == provider)
            .map(|k| k.requests)
            .sum()
    }

    /// Requests received by the whole mock.
    pub fn total(&self) -> u64 {
        self.keys.iter().map(|k| k.requests).sum()
    }

    /// Keys that received more requests than their limit in some window.
    pub fn over_limit(&self) -> impl Iterator<Item = &KeyCounts> {
        self.keys.iter().filter(|k| k.exceeded_limit())
    }
}

/// How a request ended, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Outcome {
    Ok,
    RateLimited,
    Unauthorized,
    ClientError,
    ServerError,
}

/// The limiter's decision for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Admission {
    /// Not checked (refused earlier, or the `ratelimited` fault).
    Unchecked,
    /// No limit for this key.
    Unlimited,
    /// Within budget. `reset` is when the oldest counted request leaves the window.
    Admitted {
        limit: u32,
        remaining: u32,
        reset: Duration,
    },
    /// Over budget: a slot frees in `retry_after`.
    Limited { limit: u32, retry_after: Duration },
}

/// All keys, one map per provider. Lookups of known keys take a read lock only.
#[derive(Debug)]
pub(super) struct KeyTable {
    shards: [RwLock<HashMap<Box<str>, Arc<KeyState>>>; 4],
    rpm_per_key: HashMap<String, u32>,
    default_rpm: Option<u32>,
    window: Duration,
    history: usize,
    epoch: Instant,
}

impl KeyTable {
    pub(super) fn new(config: &MockConfig) -> Self {
        Self {
            shards: Default::default(),
            rpm_per_key: config.rpm_per_key.clone(),
            default_rpm: config.default_rpm,
            window: config.window,
            history: config.history_per_key,
            epoch: Instant::now(),
        }
    }

    /// The state of `key`, created on first use.
    pub(super) fn entry(&self, provider: Provider, key: &str) -> Arc<KeyState> {
        let shard = &self.shards[provider.index()];
        if let Some(state) = shard
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return Arc::clone(state);
        }
        let limit = self.limit_for(provider, key);
        let mut map = shard.write().unwrap_or_else(PoisonError::into_inner);
        Arc::clone(
            map.entry(key.into())
                .or_insert_with(|| Arc::new(KeyState::new(limit))),
        )
    }

    fn limit_for(&self, provider: Provider, key: &str) -> Option<u32> {
        // Ollama has no keys and no rate limits.
        if provider == Provider::Ollama {
            return None;
        }
        self.rpm_per_key.get(key).copied().or(self.default_rpm)
    }

    /// Records the arrival of a request and, when `admit`, asks the limiter for a slot.
    pub(super) fn arrive(&self, state: &KeyState, admit: bool) -> Admission {
        let now = self.now_ns();
        let window = duration_ns(self.window);
        state.requests.fetch_add(1, Ordering::Relaxed);
        let mut log = state.log.lock().unwrap_or_else(PoisonError::into_inner);
        log.see(now, window, self.history);
        if !admit {
            return Admission::Unchecked;
        }
        match state.limit {
            None => Admission::Unlimited,
            Some(limit) => log.admit(now, window, limit),
        }
    }

    /// Forgets every key.
    pub(super) fn reset(&self) {
        for shard in &self.shards {
            shard
                .write()
                .unwrap_or_else(PoisonError::into_inner)
                .clear();
        }
    }

    /// Copies every counter out.
    pub(super) fn snapshot(&self) -> Counts {
        let mut keys = Vec::new();
        for provider in Provider::ALL {
            let shard = self.shards[provider.index()]
                .read()
                .unwrap_or_else(PoisonError::into_inner);
            keys.extend(shard.iter().map(|(key, state)| state.counts(provider, key)));
        }
        keys.sort_by(|a, b| (a.provider, &a.key).cmp(&(b.provider, &b.key)));
        Counts {
            window_ms: u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX),
            keys,
        }
    }

    fn now_ns(&self) -> u64 {
        duration_ns(self.epoch.elapsed())
    }

    /// Microseconds since the mock started.
    pub(super) fn now_us(&self) -> u64 {
        self.now_ns() / 1_000
    }
}

/// Counters and windows of one key.
#[derive(Debug)]
pub(super) struct KeyState {
    limit: Option<u32>,
    requests: AtomicU64,
    ok: AtomicU64,
    rate_limited: AtomicU64,
    unauthorized: AtomicU64,
    client_errors: AtomicU64,
    server_errors: AtomicU64,
    log: Mutex<WindowLog>,
}

impl KeyState {
    fn new(limit: Option<u32>) -> Self {
        Self {
            limit,
            requests: AtomicU64::new(0),
            ok: AtomicU64::new(0),
            rate_limited: AtomicU64::new(0),
            unauthorized: AtomicU64::new(0),
            client_errors: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
            log: Mutex::new(WindowLog::default()),
        }
    }

    /// Counts how a request ended.
    pub(super) fn record(&self, outcome: Outcome) {
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::RateLimited => &self.rate_limited,
            Outcome::Unauthorized => &self.unauthorized,
            Outcome::ClientError => &self.client_errors,
            Outcome::ServerError => &self.server_errors,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// The key's limit, for error messages.
    pub(super) fn limit(&self) -> Option<u32> {
        self.limit
    }

    fn counts(&self, provider: Provider, key: &str) -> KeyCounts {
        let log = self.log.lock().unwrap_or_else(PoisonError::into_inner);
        KeyCounts {
            provider,
            key: key.to_owned(),
            limit: self.limit,
            requests: self.requests.load(Ordering::Relaxed),
            ok: self.ok.load(Ordering::Relaxed),
            rate_limited: self.rate_limited.load(Ordering::Relaxed),
            unauthorized: self.unauthorized.load(Ordering::Relaxed),
            client_errors: self.client_errors.load(Ordering::Relaxed),
            server_errors: self.server_errors.load(Ordering::Relaxed),
            max_in_window: log.max_seen,
            timestamps_us: log.history.iter().map(|ns| ns / 1_000).collect(),
        }
    }
}

/// Request times (ns since the mock started) within the current window.
#[derive(Debug, Default)]
struct WindowLog {
    seen: VecDeque<u64>,
    admitted: VecDeque<u64>,
    max_seen: u32,
    history: VecDeque<u64>,
}

impl WindowLog {
    fn see(&mut self, now: u64, window: u64, history: usize) {
        prune(&mut self.seen, now, window);
        self.seen.push_back(now);
        // The busiest window ends at some arrival, so checking at each arrival finds it.
        let in_window = u32::try_from(self.seen.len()).unwrap_or(u32::MAX);
        self.max_seen = self.max_seen.max(in_window);
        if history > 0 {
            if self.history.len() == history {
                self.history.pop_front();
            }
            self.history.push_back(now);
        }
    }

    fn admit(&mut self, now: u64, window: u64, limit: u32) -> Admission {
        prune(&mut self.admitted, now, window);
        let used = u32::try_from(self.admitted.len()).unwrap_or(u32::MAX);
        let until_oldest_expires = |log: &VecDeque<u64>| {
            let oldest = log.front().copied().unwrap_or(now);
            Duration::from_nanos((oldest + window).saturating_sub(now))
        };
        if used >= limit {
            return Admission::Limited {
                limit,
                retry_after: until_oldest_expires(&self.admitted),
            };
        }
        self.admitted.push_back(now);
        Admission::Admitted {
            limit,
            remaining: limit - used - 1,
            reset: until_oldest_expires(&self.admitted),
        }
    }
}

/// Drops times at or before `now - window`: the window is `(now - window, now]`.
fn prune(log: &mut VecDeque<u64>, now: u64, window: u64) {
    let Some(cutoff) = now.checked_sub(window) else {
        return;
    };
    while log.front().is_some_and(|&t| t <= cutoff) {
        log.pop_front();
    }
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: u64 = 1_000;

    #[test]
    fn limiter_refuses_over_limit_and_frees_slots_as_the_window_slides() {
        let mut log = WindowLog::default();
        assert!(matches!(
            log.admit(10, W, 2),
            Admission::Admitted { remaining: 1, .. }
        ));
        assert!(matches!(
            log.admit(20, W, 2),
            Admission::Admitted { remaining: 0, .. }
        ));
        let Admission::Limited { retry_after, .. } = log.admit(500, W, 2) else {
            panic!("third request must be limited");
        };
        assert_eq!(retry_after, Duration::from_nanos(510));
        // At 1010 the request at 10 has left the window (10 + 1000 <= 1010).
        assert!(matches!(log.admit(1_010, W, 2), Admission::Admitted { .. }));
        assert!(matches!(log.admit(1_011, W, 2), Admission::Limited { .. }));
    }

    #[test]
    fn zero_limit_refuses_everything() {
        let mut log = WindowLog::default();
        assert!(matches!(log.admit(5, W, 0), Admission::Limited { .. }));
    }

    #[test]
    fn busiest_window_is_recorded() {
        let mut log = WindowLog::default();
        for t in [1, 2, 3, 1_500, 1_600, 1_700, 1_800, 5_000] {
            log.see(t, W, 4);
        }
        assert_eq!(log.max_seen, 4);
        assert_eq!(log.history, [1_600, 1_700, 1_800, 5_000]);
    }
}
