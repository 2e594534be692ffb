//! Rate budgets of provider keys, shared by every request of this replica: an exact sliding
//! window of requests per key (never more than `rpm` in any window), token reservations that
//! are settled with the real usage, cool-downs after a 429, and keys failed by a 401/403.
//!
//! With `--redis` the request and token windows are shared by every replica through Redis
//! ([`shared`]), so that N replicas together stay within each key's limits; cool-downs,
//! failed keys and learned rate-limit headers stay per replica.
//!
//! Budgets outlive configuration reloads: a key keeps its window when its limit changes, so a
//! lowered limit counts the requests already made.

mod key;
pub mod pace;
pub mod shared;
pub mod signal;
pub mod window;

pub use key::{KeyBudget, Permit};
pub use shared::{RedisBudgets, SharedError, SharedOptions};
pub use signal::Signal;

use floodgate_crds::redis_keys::KeyBudgetKeys;
use key::SharedKey;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The production window of provider rate limits.
pub const MINUTE: Duration = Duration::from_secs(60);

/// Identity of a key's budget: pool, provider and the key's secret reference
/// (`<secret>/<key>`; the provider's name for a keyless provider). Never the secret itself,
/// and not the display name, which defaults to a position in the list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyId {
    /// Pool name.
    pub pool: String,
    /// Provider name.
    pub provider: String,
    /// The key's secret reference.
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
    /// Budget (or a cool-down) frees up at this instant at the latest.
    Until(Instant),
    /// Other requests of this replica are asking the shared budget for the last room: known
    /// when they have their answers (the key pulses its signal then).
    Pending,
    /// The key was refused by the provider and stays out until the configuration changes.
    Failed,
}

/// Counts a tenant's requests in Redis for its status ([`Budgets::tenant_use`]).
#[derive(Debug, Clone)]
pub struct UseCounter {
    backend: Arc<RedisBudgets>,
    key: Arc<str>,
}

impl UseCounter {
    /// Counts one request, in the background.
    pub fn count(&self) {
        self.backend.count_use_later(&self.key);
    }
}

/// Every key budget of this replica.
#[derive(Debug)]
pub struct Budgets {
    window: Duration,
    keys: Mutex<HashMap<KeyId, Arc<KeyBudget>>>,
    shared: Option<Arc<RedisBudgets>>,
    signal: Arc<Signal>,
}

impl Budgets {
    /// Budgets over `window` (60 s in production; tests may shorten it), in this process;
    /// whatever may free budget pulses `signal`.
    pub fn new(window: Duration, signal: Arc<Signal>) -> Self {
        Self {
            window,
            keys: Mutex::default(),
            shared: None,
            signal,
        }
    }

    /// Budgets over `window` shared through Redis with every replica built the same way.
    /// Connects on first use; an unreachable Redis degrades to local shares, not an error.
    pub fn shared(
        window: Duration,
        opts: SharedOptions,
        signal: Arc<Signal>,
    ) -> Result<Self, SharedError> {
        let backend = Arc::new(RedisBudgets::new(opts, window)?);
        backend.set_signal(signal.clone());
        Ok(Self {
            shared: Some(backend),
            ..Self::new(window, signal)
        })
    }

    /// The signal pulsed when budget may have freed up.
    pub fn signal(&self) -> &Arc<Signal> {
        &self.signal
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// The Redis backend, with shared budgets.
    pub fn backend(&self) -> Option<&Arc<RedisBudgets>> {
        self.shared.as_ref()
    }

    /// Whether budgets are meant to be shared but Redis is unreachable, so each key runs on
    /// this replica's local share. Cheap: one atomic load.
    pub fn redis_degraded(&self) -> bool {
        self.shared.as_ref().is_some_and(|s| s.degraded())
    }

    /// The budget of `id`, created or updated to `limits`.
    pub fn key(&self, id: &KeyId, limits: Limits) -> Arc<KeyBudget> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = keys.get(id) {
            k.update(limits, self.window);
            return k.clone();
        }
        let shared = self.shared.as_ref().map(|backend| SharedKey {
            backend: backend.clone(),
            keys: Arc::new(KeyBudgetKeys::new(&id.pool, &id.provider, &id.key)),
        });
        let k = Arc::new(KeyBudget::new(
            limits,
            self.window,
            shared,
            self.signal.clone(),
        ));
        if let Some(backend) = &self.shared {
            let keys = Arc::new(KeyBudgetKeys::new(&id.pool, &id.provider, &id.key));
            let record: Arc<dyn shared::record::Recorded> = k.clone();
            backend.register(&keys, Arc::downgrade(&record));
        }
        keys.insert(id.clone(), k.clone());
        k
    }

    /// A budget for a tenant's own limits (`tenant`: `<namespace>/<name>` or `<name>`),
    /// over the same window as the keys and shared through Redis like them when budgets are
    /// (keys [`KeyBudgetKeys::tenant`]). Not kept here: the identity stage keeps it across
    /// reloads, and `signal` is its own (tenants never wait on the keys' signal).
    pub fn tenant(&self, tenant: &str, limits: Limits, signal: Arc<Signal>) -> Arc<KeyBudget> {
        let shared = self.shared.as_ref().map(|backend| SharedKey {
            backend: backend.clone(),
            keys: Arc::new(KeyBudgetKeys::tenant(tenant)),
        });
        let registration = shared.as_ref().map(|s| (s.backend.clone(), s.keys.clone()));
        let budget = Arc::new(KeyBudget::new(limits, self.window, shared, signal));
        if let Some((backend, keys)) = registration {
            // Re-written into Redis like a provider key's when Redis loses it.
            let record: Arc<dyn shared::record::Recorded> = budget.clone();
            backend.register(&keys, Arc::downgrade(&record));
        }
        budget
    }

    /// Where the requests of tenant `tenant` (named as for [`Budgets::tenant`]) are counted
    /// for its status when it has no rpm limit (no window records them): `None` without
    /// shared budgets, whose Redis the operator reads.
    pub fn tenant_use(&self, tenant: &str) -> Option<UseCounter> {
        let backend = self.shared.as_ref()?.clone();
        Some(UseCounter {
            backend,
            key: Arc::from(floodgate_crds::redis_keys::tenant_use_key(tenant)),
        })
    }

    /// A new configuration: keys it no longer has are forgotten, and keys failed by the
    /// provider get another chance (the operator may have fixed them).
    pub fn reconfigured(&self, live: &[KeyId]) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        keys.retain(|id, _| live.contains(id));
        for k in keys.values() {
            k.clear_failed();
        }
        drop(keys);
        self.signal.pulse();
    }

    /// Waits for pending writes to Redis (answers, settlements); call once serving stopped.
    pub async fn drain(&self) {
        if let Some(shared) = &self.shared {
            shared.drain().await;
        }
    }
}

#[cfg(test)]
mod tests;
