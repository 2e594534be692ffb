//! Rate budgets of provider keys, shared by every request of this replica: an exact sliding
//! window of requests per key (never more than `rpm` in any window), token reservations that
//! are settled with the real usage, cool-downs after a 429, and keys failed by a 401/403.
//!
//! Budgets outlive configuration reloads: a key keeps its window when its limit changes, so a
//! lowered limit counts the requests already made.

pub mod window;

use crate::providers::RateLimitInfo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;
use window::{RequestWindow, TokenWindow};

/// The production window of provider rate limits.
pub const MINUTE: Duration = Duration::from_secs(60);

/// Identity of a key's budget: pool, provider and key name (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// Pool name.
    pub pool: String,
    /// Provider name.
    pub provider: String,
    /// Key display name.
    pub key: String,
}

/// Limits of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests per window; `None` for unlimited (a keyless self-hosted server).
    pub rpm: Option<u32>,
    /// Tokens per window.
    pub tpm: Option<u32>,
}

/// Why a key cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// Budget (or a cool-down) frees up at this instant.
    Until(Instant),
    /// The key was refused by the provider and stays out until the configuration changes.
    Failed,
}

#[derive(Debug)]
struct KeyState {
    requests: Option<RequestWindow>,
    tokens: Option<TokenWindow>,
    cooled_until: Option<Instant>,
    failed: bool,
    in_flight: u32,
}

/// The budget of one key.
#[derive(Debug)]
pub struct KeyBudget {
    state: Mutex<KeyState>,
}

/// A request admitted on a key: its token reservation is settled, and its in-flight slot
/// released, when the permit is settled or dropped.
#[derive(Debug)]
pub struct Permit {
    key: Arc<KeyBudget>,
    reservation: Option<(u64, u64)>,
    answered: bool,
    done: bool,
}

impl Permit {
    /// The provider has answered (response headers, or a failure): the request surely arrived
    /// by now, so its slot starts its one-window countdown.
    pub fn answered(&mut self) {
        if self.answered {
            return;
        }
        self.answered = true;
        let now = Instant::now();
        if let Some(w) = self.key.lock().requests.as_mut() {
            w.complete(now);
        }
    }

    /// Settles the token reservation with the real usage.
    pub fn settle(mut self, total_tokens: u64) {
        self.finish(Some(total_tokens));
    }

    fn finish(&mut self, actual: Option<u64>) {
        if self.done {
            return;
        }
        self.answered();
        self.done = true;
        let mut state = self.key.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if let (Some((id, _)), Some(actual), Some(tokens)) =
            (self.reservation, actual, state.tokens.as_mut())
        {
            tokens.settle(id, actual);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Unsettled (failed or abandoned): the estimate stands, which errs on the safe side.
        self.finish(None);
    }
}

impl KeyBudget {
    fn new(limits: Limits, window: Duration) -> Self {
        Self {
            state: Mutex::new(KeyState {
                requests: limits.rpm.map(|rpm| RequestWindow::new(rpm, window)),
                tokens: limits
                    .tpm
                    .map(|tpm| TokenWindow::new(u64::from(tpm), window)),
                cooled_until: None,
                failed: false,
                in_flight: 0,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, KeyState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, limits: Limits, window: Duration) {
        let mut s = self.lock();
        match (limits.rpm, s.requests.as_mut()) {
            (Some(rpm), Some(w)) => w.set_limit(rpm, window),
            (Some(rpm), None) => s.requests = Some(RequestWindow::new(rpm, window)),
            (None, _) => s.requests = None,
        }
        match (limits.tpm, s.tokens.as_mut()) {
            (Some(tpm), Some(w)) => w.set_limit(u64::from(tpm), window),
            (Some(tpm), None) => s.tokens = Some(TokenWindow::new(u64::from(tpm), window)),
            (None, _) => s.tokens = None,
        }
    }

    /// When this key could take a request of `tokens`: `Ok(())` if now.
    pub fn availability(&self, now: Instant, tokens: u64) -> Result<(), Unavailable> {
        let mut s = self.lock();
        s.availability(now, tokens)
    }

    /// Admits a request of `tokens` estimated tokens at `now`.
    pub fn try_acquire(self: &Arc<Self>, now: Instant, tokens: u64) -> Result<Permit, Unavailable> {
        let mut s = self.lock();
        s.availability(now, tokens)?;
        if let Some(w) = s.requests.as_mut() {
            w.try_acquire(now).map_err(Unavailable::Until)?;
        }
        let reservation = match s.tokens.as_mut() {
            Some(w) => Some((
                w.try_reserve(now, tokens).map_err(Unavailable::Until)?,
                tokens,
            )),
            None => None,
        };
        s.in_flight += 1;
        Ok(Permit {
            key: self.clone(),
            reservation,
            answered: false,
            done: false,
        })
    }

    /// Share of the request budget left, in `[0, 1]` (1 for unlimited keys).
    pub fn remaining_fraction(&self, now: Instant) -> f64 {
        let mut s = self.lock();
        let in_flight = s.in_flight;
        match s.requests.as_mut() {
            Some(w) => {
                let limit = f64::from(w.limit().max(1));
                (1.0 - f64::from(w.used(now)) / limit).max(0.0)
            }
            // Unlimited: prefer the key with the fewest requests in flight.
            None => 1.0 / (1.0 + f64::from(in_flight)),
        }
    }

    /// Requests made in the current window.
    pub fn used(&self, now: Instant) -> u32 {
        self.lock().requests.as_mut().map_or(0, |w| w.used(now))
    }

    /// Rests the key until `until` (a 429 from the provider).
    pub fn cool_until(&self, until: Instant) {
        let mut s = self.lock();
        s.cooled_until = Some(s.cooled_until.map_or(until, |c| c.max(until)));
    }

    /// Takes the key out until the configuration changes (a 401/403).
    pub fn fail(&self) {
        self.lock().failed = true;
    }

    /// Whether the key is failed.
    pub fn is_failed(&self) -> bool {
        self.lock().failed
    }

    /// Learns the provider's view of the budget from its rate-limit headers: when it says no
    /// requests are left, the key waits for the reset even if our own count disagrees.
    pub fn learn(&self, info: &RateLimitInfo, now: Instant) {
        if info.requests_remaining == Some(0)
            && let Some(reset) = info.requests_reset
        {
            let mut s = self.lock();
            if let Some(w) = s.requests.as_mut() {
                w.exhaust_until(now, now + reset);
            }
        }
    }
}

impl KeyState {
    fn availability(&mut self, now: Instant, tokens: u64) -> Result<(), Unavailable> {
        if self.failed {
            return Err(Unavailable::Failed);
        }
        let mut free = now;
        if let Some(c) = self.cooled_until {
            free = free.max(c);
        }
        if let Some(w) = self.requests.as_mut() {
            free = free.max(w.next_free(now));
        }
        if let Some(w) = self.tokens.as_mut() {
            free = free.max(w.next_free(now, tokens));
        }
        if free > now {
            Err(Unavailable::Until(free))
        } else {
            Ok(())
        }
    }
}

/// Every key budget of this replica.
#[derive(Debug)]
pub struct Budgets {
    window: Duration,
    keys: Mutex<HashMap<KeyId, Arc<KeyBudget>>>,
}

impl Budgets {
    /// Budgets over `window` (60 s in production; tests may shorten it).
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            keys: Mutex::default(),
        }
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The budget of `id`, created or updated to `limits`.
    pub fn key(&self, id: &KeyId, limits: Limits) -> Arc<KeyBudget> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keys.get(id) {
            k.update(limits, self.window);
            return k.clone();
        }
        let k = Arc::new(KeyBudget::new(limits, self.window));
        keys.insert(id.clone(), k.clone());
        k
    }

    /// A new configuration: keys it no longer has are forgotten, and keys failed by the
    /// provider get another chance (the operator may have fixed them).
    pub fn reconfigured(&self, live: &[KeyId]) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.retain(|id, _| live.contains(id));
        for k in keys.values() {
            k.lock().failed = false;
        }
    }
}
