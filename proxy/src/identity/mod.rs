//! Stage 1 of the request path: who is calling. From the headers alone, before the body is
//! read, a caller is matched to a [`Tenant`](floodgate_crds::Tenant) by its client key
//! (`Authorization: Bearer <key>` or `x-api-key: <key>`), or, with
//! `--trust-tenant-header` (sidecar mode), by `x-floodgate-tenant: <tenant>` from the local
//! application.
//!
//! The gateway keeps only the SHA-256 digest of each client key ([`KeyDigest`]); a presented
//! key is hashed, looked up by the digest's first bytes and compared whole in constant time.
//! Keys are never logged, echoed or kept. A configuration without any Tenant is *open*: every
//! caller is served without a key, as before tenants existed ([`OPEN_MODE`]).
//!
//! The table of callers is rebuilt when the configuration serving changes (a new `Arc`); a
//! tenant's budgets and requests in flight ([`TenantState`]) carry over by name, so a reload
//! or a key rotation never resets its windows. Its limits are enforced by [`limits`].

pub mod limits;

use crate::budget::{Budgets, KeyBudget, Limits, Signal, UseCounter};
use crate::config::{Config, TenantConfig};
use crate::secret::KeyDigest;
use arc_swap::ArcSwap;
use axum::http::{HeaderMap, header};
use std::collections::HashMap;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

pub use limits::{Refusal, Slot};

/// The start-up line of a gateway with no Tenant.
pub const OPEN_MODE: &str =
    "no Tenant configured: the gateway is open, every caller is served without a client key";

/// Header a trusted local application names its tenant in (with `--trust-tenant-header`).
pub const TENANT_HEADER: &str = "x-floodgate-tenant";

/// Who a request comes from: its tenant, with what the later stages need.
#[derive(Debug)]
pub struct Caller {
    /// The tenant's configuration (name, tier, limits, allowed models).
    pub tenant: Arc<TenantConfig>,
    /// Its windows and requests in flight, kept across reloads.
    pub state: Arc<TenantState>,
}

impl Caller {
    /// `<namespace>/<name>` in cluster mode, `<name>` standalone.
    pub fn name(&self) -> &Arc<str> {
        &self.tenant.name
    }

    /// Its tier name (the TierQueue's default tier when it names none), if any.
    pub fn tier(&self) -> Option<&Arc<str>> {
        self.tenant.tier.as_ref()
    }

    /// Whether it may call `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.tenant
            .models
            .as_ref()
            .is_none_or(|allowed| allowed.contains(model))
    }
}

/// A tenant's use, kept across configuration reloads.
#[derive(Debug)]
pub struct TenantState {
    /// Requests and tokens per window, when it has an rpm or tpm limit.
    pub budget: Option<Arc<KeyBudget>>,
    /// Where its requests are counted for its status when no rpm window records them (no
    /// rpm limit) and budgets are shared through Redis.
    pub uses: Option<UseCounter>,
    /// Requests of this tenant being answered now (on this replica).
    pub in_flight: AtomicU32,
    /// What its budget pulses when it may have room again.
    pub signal: Arc<Signal>,
}

/// Why a caller was not identified: 401 in the door's format. Never holds the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unidentified {
    /// No `Authorization: Bearer` nor `x-api-key` header.
    #[error("no client API key: send it as `Authorization: Bearer <key>` or `x-api-key: <key>`")]
    Missing,
    /// A key no tenant has (unknown, mistyped or revoked).
    #[error("the client API key is not valid")]
    Unknown,
    /// A header that cannot hold a key (not visible ASCII, or `Authorization` of another
    /// scheme).
    #[error(
        "the client API key header is malformed: send `Authorization: Bearer <key>` or `x-api-key: <key>`"
    )]
    Malformed,
    /// `x-floodgate-tenant` names no tenant.
    #[error("the tenant named in `x-floodgate-tenant` is not configured")]
    UnknownTenant,
}

/// What a request presented.
#[derive(Debug, PartialEq, Eq)]
pub enum Presented<'a> {
    /// A client key.
    Key(&'a str),
    /// A tenant name from the trusted header.
    Tenant(&'a str),
}

/// The credential of `headers`: the trusted tenant header when `trust_tenant_header` and it
/// is present, else `Authorization: Bearer <key>`, else `x-api-key: <key>`. `Ok(None)`: none.
pub fn presented(
    headers: &HeaderMap,
    trust_tenant_header: bool,
) -> Result<Option<Presented<'_>>, Unidentified> {
    if trust_tenant_header && let Some(v) = headers.get(TENANT_HEADER) {
        let name = v.to_str().map_err(|_| Unidentified::UnknownTenant)?.trim();
        return Ok(Some(Presented::Tenant(name)));
    }
    if let Some(v) = headers.get(header::AUTHORIZATION) {
        let v = v.to_str().map_err(|_| Unidentified::Malformed)?.trim();
        if v.eq_ignore_ascii_case("bearer") {
            return Err(Unidentified::Missing);
        }
        let (scheme, key) = v.split_once(' ').ok_or(Unidentified::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Unidentified::Malformed);
        }
        let key = key.trim();
        return if key.is_empty() {
            Err(Unidentified::Missing)
        } else {
            Ok(Some(Presented::Key(key)))
        };
    }
    if let Some(v) = headers.get("x-api-key") {
        let key = v.to_str().map_err(|_| Unidentified::Malformed)?.trim();
        return if key.is_empty() {
            Err(Unidentified::Missing)
        } else {
            Ok(Some(Presented::Key(key)))
        };
    }
    Ok(None)
}

/// The callers of one configuration.
#[derive(Debug, Default)]
struct Table {
    /// The configuration it was built from (kept, so its address is not reused).
    config: Option<Arc<Config>>,
    /// Digest bucket -> (full digest, caller).
    by_key: HashMap<u64, Vec<(KeyDigest, Arc<Caller>)>>,
    /// Tenant name -> caller.
    by_name: HashMap<Arc<str>, Arc<Caller>>,
}

impl Table {
    fn is_open(&self) -> bool {
        self.by_name.is_empty()
    }

    fn by_key(&self, key: &str) -> Option<&Arc<Caller>> {
        let digest = KeyDigest::of(key);
        // Every candidate of the bucket is compared, whichever matches.
        let mut found = None;
        for (d, caller) in self.by_key.get(&digest.bucket())? {
            if d.matches(&digest) {
                found = Some(caller);
            }
        }
        found
    }
}

/// The identity stage: the callers of the configuration serving now, and every tenant's
/// state.
#[derive(Debug)]
pub struct Identity {
    trust_tenant_header: bool,
    table: ArcSwap<Table>,
    states: Mutex<HashMap<Arc<str>, Arc<TenantState>>>,
    /// Pulsed when a tenant's budget may have room again (its own, not the keys').
    signal: Arc<Signal>,
}

impl Identity {
    /// The stage; `trust_tenant_header` accepts `x-floodgate-tenant` instead of a key.
    pub fn new(trust_tenant_header: bool) -> Self {
        Self {
            trust_tenant_header,
            table: ArcSwap::from_pointee(Table::default()),
            states: Mutex::default(),
            signal: Arc::default(),
        }
    }

    /// Whether `x-floodgate-tenant` is trusted.
    pub fn trusts_tenant_header(&self) -> bool {
        self.trust_tenant_header
    }

    /// The signal tenant budgets pulse.
    pub fn signal(&self) -> &Arc<Signal> {
        &self.signal
    }

    /// Identifies the caller of `headers` under `config`: `Ok(None)` when the gateway is
    /// open (no Tenant configured).
    pub fn identify(
        &self,
        config: &Arc<Config>,
        budgets: &Budgets,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<Caller>>, Unidentified> {
        // The common case takes no reference count: the table of this configuration exists.
        let current = self.table.load();
        let rebuilt;
        let table: &Table = if built_from(&current, config) {
            &current
        } else {
            rebuilt = self.table_for(config, budgets);
            &rebuilt
        };
        if table.is_open() {
            return Ok(None);
        }
        match presented(headers, self.trust_tenant_header)? {
            None => Err(Unidentified::Missing),
            Some(Presented::Key(key)) => table
                .by_key(key)
                .cloned()
                .map(Some)
                .ok_or(Unidentified::Unknown),
            Some(Presented::Tenant(name)) => table
                .by_name
                .get(name)
                .cloned()
                .map(Some)
                .ok_or(Unidentified::UnknownTenant),
        }
    }

    /// The caller of tenant `name` under `config`, if configured: a job runs as the tenant
    /// that queued it.
    pub fn tenant(
        &self,
        config: &Arc<Config>,
        budgets: &Budgets,
        name: &str,
    ) -> Option<Arc<Caller>> {
        let current = self.table.load_full();
        let table = if built_from(&current, config) {
            current
        } else {
            self.table_for(config, budgets)
        };
        table.by_name.get(name).cloned()
    }

    /// The table of `config`, built on first use after a change.
    fn table_for(&self, config: &Arc<Config>, budgets: &Budgets) -> Arc<Table> {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        // Another request may have built it meanwhile.
        let table = self.table.load_full();
        if built_from(&table, config) {
            return table;
        }
        let built = Arc::new(self.build(config, budgets, &mut states));
        self.table.store(built.clone());
        built
    }

    fn build(
        &self,
        config: &Arc<Config>,
        budgets: &Budgets,
        states: &mut HashMap<Arc<str>, Arc<TenantState>>,
    ) -> Table {
        states.retain(|name, _| config.tenants.iter().any(|t| &t.name == name));
        let mut table = Table {
            config: Some(config.clone()),
            ..Table::default()
        };
        for tenant in &config.tenants {
            let state = self.state(tenant, budgets, states);
            let caller = Arc::new(Caller {
                tenant: tenant.clone(),
                state,
            });
            for key in &tenant.keys {
                table
                    .by_key
                    .entry(key.digest.bucket())
                    .or_default()
                    .push((key.digest, caller.clone()));
            }
            table.by_name.insert(tenant.name.clone(), caller);
        }
        table
    }

    /// The state of `tenant`: the one it had, its budget brought to its limits now.
    fn state(
        &self,
        tenant: &TenantConfig,
        budgets: &Budgets,
        states: &mut HashMap<Arc<str>, Arc<TenantState>>,
    ) -> Arc<TenantState> {
        let limits = Limits {
            rpm: tenant.limits.rpm.map(|n| n.get()),
            tpm: tenant.limits.tpm.map(|n| n.get()),
        };
        let limited = limits.rpm.is_some() || limits.tpm.is_some();
        let uses = limits
            .rpm
            .is_none()
            .then(|| budgets.tenant_use(&tenant.name))
            .flatten();
        if let Some(state) = states.get(&tenant.name)
            && state.uses.is_some() == uses.is_some()
        {
            match (&state.budget, limited) {
                (Some(budget), true) => {
                    budget.update(limits, budgets.window());
                    return state.clone();
                }
                (None, false) => return state.clone(),
                // Limits added or removed: a new state; requests in flight keep the old one.
                _ => {}
            }
        }
        let state = Arc::new(TenantState {
            uses,
            budget: limited.then(|| budgets.tenant(&tenant.name, limits, self.signal.clone())),
            in_flight: AtomicU32::new(0),
            signal: self.signal.clone(),
        });
        states.insert(tenant.name.clone(), state.clone());
        state
    }
}

/// Whether `table` was built from `config` (the same `Arc`; the table keeps it alive, so its
/// address cannot be reused by another configuration).
fn built_from(table: &Table, config: &Arc<Config>) -> bool {
    table
        .config
        .as_ref()
        .is_some_and(|c| Arc::ptr_eq(c, config))
}

#[cfg(test)]
mod tests;
