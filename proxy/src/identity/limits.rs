//! A tenant's own limits, enforced before its request queues for a provider key: the models
//! it may call (403), requests and tokens per window (429 with a `retry-after` of when its
//! window frees), and requests answered at once (429).
//!
//! Requests and tokens use the key budgets' windows ([`KeyBudget`]): an exact sliding window,
//! shared through Redis with the other replicas when budgets are. A tenant's request counts
//! from its admission for one window (it is marked answered at once), so `retry-after` is the
//! instant its oldest request in the window leaves it: a retry then is admitted. Tokens are
//! reserved at the estimate (the prompt's, plus the caller's `max_tokens` when it set one)
//! and settled with the real usage when the answer reports it: a whole answer always, a
//! stream when its caller asked for usage (`stream_options.include_usage`); another stream at
//! the prompt's estimate plus the output it streamed (`pipeline::Held`). A request the
//! gateway refused itself is refunded ([`Slot::refund`]). Requests in flight are counted per replica: a [`Slot`] holds its place
//! until the answer, a stream included, is finished (or the caller hangs up).

use super::{Caller, TenantState};
use crate::budget::{Permit, Unavailable};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// Why a tenant's request is refused before it queues.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The tenant may not call this model (403).
    #[error("this client key may not use the model `{0}`")]
    ModelNotAllowed(String),
    /// Over its requests or tokens per window (429).
    #[error("tenant {tenant} is over its limit of {what}; retry after {} s", crate::route::whole_seconds(*retry_after))]
    RateLimited {
        /// The tenant's name.
        tenant: Arc<str>,
        /// Which limit, e.g. `60 requests per minute`.
        what: String,
        /// When its window frees.
        retry_after: Duration,
    },
    /// Already as many requests being answered as it may have (429).
    #[error(
        "tenant {tenant} already has {limit} request(s) in progress, its limit; retry when one finishes"
    )]
    Concurrency {
        /// The tenant's name.
        tenant: Arc<str>,
        /// Its concurrency limit.
        limit: u32,
    },
}

impl Refusal {
    /// A low-cardinality label for metrics and logs (and the error's `code`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Refusal::ModelNotAllowed(_) => "model_not_allowed",
            Refusal::RateLimited { .. } => "tenant_rate_limit_exceeded",
            Refusal::Concurrency { .. } => "tenant_concurrency_exceeded",
        }
    }

    /// `retry-after` for a 429: when the window frees; for the concurrency limit, one
    /// second (it frees when an answer ends, which no one can tell in advance).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Refusal::ModelNotAllowed(_) => None,
            Refusal::RateLimited { retry_after, .. } => Some(*retry_after),
            Refusal::Concurrency { .. } => Some(Duration::from_secs(1)),
        }
    }
}

/// A tenant's admitted request: its place among the tenant's requests in flight, given back
/// when the slot is dropped, and its request and token reservation in the tenant's window,
/// which stay (settled by [`Slot::settle`], else at the estimate) unless [`Slot::refund`]
/// gives them back.
#[derive(Debug)]
pub struct Slot {
    state: Arc<TenantState>,
    counted: bool,
    permit: Mutex<Option<Permit>>,
}

impl Slot {
    /// Settles the token reservation with the real usage (once; later calls do nothing).
    pub fn settle(&self, total_tokens: u64) {
        let permit = self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(permit) = permit {
            permit.settle(total_tokens);
        }
    }
}

impl Slot {
    /// The gateway refused the request after the tenant admitted it, without a provider
    /// call (no key had budget in time, none could serve, no such model): the tenant's
    /// request and tokens are given back, so a refusal the tenant did not cause does not
    /// spend its own limits.
    pub fn refund(&self) {
        let permit = self.permit.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(permit) = permit {
            permit.refund();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.counted {
            self.state.in_flight.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Admits a request of `caller` for `model` with `tokens` estimated tokens, or says why not.
/// With shared budgets it may ask Redis (bounded by the shared budget's timeout, and by
/// `deadline` when other requests of this replica are asking for the tenant's last room).
pub async fn admit(
    caller: &Caller,
    model: &str,
    tokens: u64,
    deadline: Instant,
) -> Result<Slot, Refusal> {
    if !caller.may_use(model) {
        return Err(Refusal::ModelNotAllowed(model.to_owned()));
    }
    let state = &caller.state;
    let mut slot = Slot {
        state: state.clone(),
        counted: false,
        permit: Mutex::new(None),
    };
    // Counted before the check: two requests racing for the last place cannot both win.
    let before = state.in_flight.fetch_add(1, Ordering::AcqRel);
    slot.counted = true;
    if let Some(limit) = caller.tenant.limits.concurrent
        && before >= limit.get()
    {
        return Err(Refusal::Concurrency {
            tenant: caller.name().clone(),
            limit: limit.get(),
        });
    }
    if let Some(budget) = &state.budget {
        let mut permit = acquire(caller, budget, tokens, deadline).await?;
        // The request counts from now for one window: its retry-after is exact.
        permit.answered();
        slot.permit = Mutex::new(Some(permit));
    }
    if let Some(uses) = &state.uses {
        // No rpm window records it: counted for the tenant's status instead.
        uses.count();
    }
    Ok(slot)
}

async fn acquire(
    caller: &Caller,
    budget: &Arc<crate::budget::KeyBudget>,
    tokens: u64,
    deadline: Instant,
) -> Result<Permit, Refusal> {
    loop {
        let mut registration = caller.state.signal.register();
        let now = Instant::now();
        match budget.acquire(now, tokens).await {
            Ok(permit) => return Ok(permit),
            Err(Unavailable::Until(at)) => {
                let retry_after = at.saturating_duration_since(now);
                return Err(rate_limited(caller, budget, tokens, retry_after));
            }
            // Other requests of this replica are asking Redis for the tenant's last room:
            // their answers pulse the signal.
            Err(Unavailable::Pending) => {
                if tokio::time::timeout_at(deadline, registration.pulsed())
                    .await
                    .is_err()
                {
                    return Err(rate_limited(caller, budget, tokens, Duration::ZERO));
                }
            }
            Err(Unavailable::Failed) => {
                return Err(rate_limited(caller, budget, tokens, Duration::ZERO));
            }
        }
    }
}

fn rate_limited(
    caller: &Caller,
    budget: &crate::budget::KeyBudget,
    tokens: u64,
    retry_after: Duration,
) -> Refusal {
    let limits = caller.tenant.limits;
    let requests_full = limits
        .rpm
        .is_some_and(|rpm| budget.used(Instant::now()) >= rpm.get());
    let what = match (limits.rpm, limits.tpm) {
        (Some(rpm), _) if requests_full => format!("{rpm} requests per minute"),
        (_, Some(tpm)) => format!("{tpm} tokens per minute (this request: about {tokens})"),
        (Some(rpm), None) => format!("{rpm} requests per minute"),
        (None, None) => "its limits".to_owned(),
    };
    Refusal::RateLimited {
        tenant: caller.name().clone(),
        what,
        retry_after,
    }
}
