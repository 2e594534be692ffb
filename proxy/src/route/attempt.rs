//! The attempt loop of one request: pick a key with budget behind a closed circuit, or wait
//! in the route's queue until one frees up; after a failed attempt, move on to the next key
//! or provider. Shared by every operation that spends key budget (chat, embeddings): the
//! caller makes the upstream call with the [`Lease`] it is given and reports failures back.
//!
//! ```text
//! let mut attempts = Attempts::new(dispatcher, runtime, route, demand, deadline);
//! loop {
//!     let lease = attempts.next().await?;          // waits, or gives up with a RouteError
//!     match call(lease.provider, lease.key, lease.permit).await {
//!         Ok(answer) => return Ok(answer),
//!         Err(error) => attempts.failed(lease.target_index, error)?,   // next, or give up
//!     }
//! }
//! ```

use super::breaker::{Admit, Probe};
use super::runtime::{KeyRt, ProviderRt, Route, Runtime, Target};
use super::tiers::TierRt;
use super::wait::{Entry, Ticket};
use super::{Dispatcher, RouteError};
use crate::budget::pace::{Hold, Pace};
use crate::budget::{Permit, Unavailable};
use crate::metrics;
use crate::providers::types::ChatRequest;
use crate::providers::{Adapter, ProviderError, estimate_prompt_tokens};
use floodgate_crds::Strategy;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::time::Instant;

/// Output tokens reserved when the caller sets no cap and the adapter sends none either:
/// an estimate, settled with the real usage afterwards.
pub const DEFAULT_OUTPUT_RESERVATION: u64 = 1024;

/// The tokens a request reserves on a key: its prompt, and the output cap each wire format
/// actually sends upstream (Anthropic requires one, so it sends its default when the caller
/// set none).
#[derive(Debug, Clone, Copy)]
pub struct Demand {
    prompt: u64,
    output: [u64; 4],
}

impl Demand {
    /// The demand of a chat request.
    pub fn chat(req: &ChatRequest) -> Self {
        let output = Adapter::ALL.map(|a| {
            a.max_output_tokens_sent(req)
                .map_or(DEFAULT_OUTPUT_RESERVATION, u64::from)
        });
        Self {
            prompt: u64::from(estimate_prompt_tokens(req)),
            output,
        }
    }

    /// A demand of `prompt` tokens and no output (embeddings).
    pub fn input_only(prompt: u64) -> Self {
        Self {
            prompt,
            output: [0; 4],
        }
    }

    /// Tokens to reserve on a key of a provider speaking `adapter`.
    pub fn tokens(&self, adapter: Adapter) -> u64 {
        self.prompt + self.output[adapter.index()]
    }

    /// The most tokens it may reserve on any key: its cost in the fairness between tenants.
    pub fn most_tokens(&self) -> u64 {
        self.prompt + self.output.iter().copied().max().unwrap_or(0)
    }
}

/// Who asks: the request's tier and tenant, which decide its place in the queue.
#[derive(Debug, Clone)]
pub struct Asker {
    /// The tier.
    pub tier: Arc<TierRt>,
    /// The tenant; one shared name for callers without one.
    pub tenant: Arc<str>,
    /// Where it stands while it waits, for a streaming caller's progress comments.
    pub progress: Option<Arc<super::wait::Progress>>,
    /// The hash of its long shared prompt prefix, if it has one: the key that served the
    /// prefix last is preferred ([`crate::routing::affinity`]).
    pub affinity: Option<u64>,
    /// Where a streamed answer's usage is reported when it ends ([`super::UsageReport`]).
    pub report: Option<super::UsageReport>,
    /// When the request runs on a step of a routing chain that is not the last: the instant
    /// by which the target must begin answering (response headers, and a stream's first
    /// chunk), else the attempt ends with [`ProviderError::StepDeadline`] and the chain
    /// moves on ([`crate::routing`]). `None`: the pool's `requestSeconds` alone bounds it.
    pub answer_by: Option<Instant>,
}

/// The tenant name of callers the gateway does not identify.
pub const ANONYMOUS: &str = "";

/// A key granted to one attempt.
#[derive(Debug)]
pub struct Lease<'a> {
    /// The provider to call.
    pub provider: &'a ProviderRt,
    /// The key to call it with.
    pub key: &'a KeyRt,
    /// The model at that provider.
    pub target: &'a Target,
    /// Which target of the route (for [`Attempts::failed`]).
    pub target_index: usize,
    /// The admission on the key: settle it with the real usage, or drop it.
    pub permit: Permit,
    /// The half-open probe this attempt is, if it is one: hold it until the attempt's
    /// verdict is recorded; dropped earlier (the caller hung up), it gives the probe back.
    pub probe: Option<Probe>,
}

/// When the route could serve again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// At this instant, at the latest (something may free up earlier and pulse).
    At(Instant),
    /// When something happens (a probe ends, an answer comes); no known instant.
    Event,
    /// Never: every key failed or every target was skipped.
    Never,
}

/// The attempts of one request on one route.
#[derive(Debug)]
pub struct Attempts<'a> {
    dispatcher: &'a Dispatcher,
    runtime: &'a Runtime,
    route: &'a Route,
    demand: Demand,
    deadline: Instant,
    asker: Asker,
    /// When the attempts began (about when the request arrived).
    started: Instant,
    /// How long the request waited in the queue (zero on the fast path).
    waited: Duration,
    /// Targets not to try again (their provider failed in a way that opens circuits).
    skipped: u64,
    made: u32,
    /// Whether a key was ever granted (a retry does not queue again).
    admitted: bool,
    /// Whether it waited in the queue: its admission is paced ([`crate::budget::pace`]).
    paced: bool,
    /// Whether the first admission (or refusal) was counted on the tier's metrics.
    admitted_once_recorded: bool,
    /// Why the queue refused, for the metric.
    refusal: &'static str,
    /// Times this request looked for a key (for tests: a waiter must not poll).
    looks: u32,
    last_error: Option<ProviderError>,
}

impl<'a> Attempts<'a> {
    /// The attempts of a request of `demand` by `asker` on `route`, waiting until `deadline`
    /// at most.
    pub fn new(
        dispatcher: &'a Dispatcher,
        runtime: &'a Runtime,
        route: &'a Route,
        demand: Demand,
        deadline: Instant,
        asker: Asker,
    ) -> Self {
        Self {
            dispatcher,
            runtime,
            route,
            demand,
            deadline,
            asker,
            started: Instant::now(),
            waited: Duration::ZERO,
            skipped: 0,
            made: 0,
            admitted: false,
            paced: false,
            admitted_once_recorded: false,
            refusal: "wait_limit",
            looks: 0,
            last_error: None,
        }
    }

    /// Times this request has looked for a key with budget.
    pub fn looks(&self) -> u32 {
        self.looks
    }

    /// Upstream attempts made so far.
    pub fn made(&self) -> u32 {
        self.made
    }

    /// How long the request waited in the queue for its first key.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// The request's tier.
    pub fn tier(&self) -> &Arc<TierRt> {
        &self.asker.tier
    }

    /// Leaves target `target_index` out of this request's attempts: its provider cannot serve
    /// this request at all (no embeddings API, an input it cannot take), so no budget is spent
    /// on it and no wait counts on it. A target past the 64th cannot be left out; a call to it
    /// fails like any refused request instead.
    pub fn skip(&mut self, target_index: usize) {
        if target_index < 64 {
            self.skipped |= 1 << target_index;
        }
    }

    /// An attempt failed with `error`: `Ok` to try again, or the error to answer with.
    pub fn failed(&mut self, target_index: usize, error: ProviderError) -> Result<(), RouteError> {
        let lease = &self.route.targets[target_index];
        let provider = &self.runtime.providers[lease.provider];
        tracing::warn!(provider = %provider.name, reason = error.metric_label(), "upstream attempt failed");
        if !error.retryable() || self.made >= self.route.max_attempts {
            return Err(RouteError::Upstream {
                error,
                attempts: self.made,
            });
        }
        if error.opens_circuit() && target_index < 64 {
            self.skipped |= 1 << target_index;
        }
        self.last_error = Some(error);
        Ok(())
    }

    /// The target of an attempt refused the request before anything was sent (a field it
    /// cannot take): the attempt does not count, the target is not tried again, and if no
    /// other target is left the refusal is the answer. Cancel the lease's permit first, so
    /// that no budget is spent.
    pub fn refused(&mut self, target_index: usize, error: ProviderError) -> Result<(), RouteError> {
        self.made = self.made.saturating_sub(1);
        if target_index < 64 {
            self.skipped |= 1 << target_index;
        }
        let left = self
            .route
            .targets
            .iter()
            .enumerate()
            .any(|(i, _)| i >= 64 || self.skipped & (1 << i) == 0);
        if !left {
            return Err(RouteError::Upstream {
                error,
                attempts: self.made,
            });
        }
        self.last_error.get_or_insert(error);
        Ok(())
    }

    /// The next key to try: at once when one has budget and nobody waits ahead, else after
    /// waiting in the route's queue. Gives up at the deadline, when the queue is full, or when
    /// no key ever will have budget.
    pub async fn next(&mut self) -> Result<Lease<'a>, RouteError> {
        let result = self.next_inner().await;
        if !self.admitted_once_recorded {
            match &result {
                Ok(_) => {
                    self.admitted_once_recorded = true;
                    self.asker.tier.admitted(self.waited);
                }
                Err(RouteError::Saturated { .. }) => {
                    self.asker.tier.state.refused(self.refusal);
                }
                Err(RouteError::Unavailable { .. }) => {
                    self.asker.tier.state.refused("unavailable");
                }
                Err(_) => {}
            }
        }
        result
    }

    async fn next_inner(&mut self) -> Result<Lease<'a>, RouteError> {
        let m = metrics::stages();
        // A retry after a failed attempt has waited its turn already. Batch work queues to
        // be gathered into batches, on routes with a request limit: a local model's has
        // none, and a batch request there holds one of its concurrency slots
        // (`routing::local`) while it would gather, idling it.
        let batch = self.asker.tier.batch.is_some() && self.rate_limited();
        if self.admitted || (self.route.queue.is_empty() && !batch) {
            let now = Instant::now();
            let picked = self.pick(now).await;
            m.limiter.observe(now.elapsed().as_secs_f64());
            if let Some(lease) = picked {
                return Ok(lease);
            }
            if self.admitted {
                self.give_up_unless_worth_waiting(now)?;
            } else if let Err(e) = self.give_up_unless_worth_waiting(now) {
                // The class may only be held back by its headroom: then it waits in line
                // like anyone else, in case budget frees up before its deadline.
                if !self.class_blocked(now) {
                    return Err(e);
                }
            }
        } else if !batch {
            // Others wait ahead: if this request's turn cannot come before its deadline, it
            // is told so now rather than at the deadline.
            let now = Instant::now();
            if let Some(turn) = self.turn(now)
                && now + turn > self.deadline
            {
                return Err(RouteError::Saturated { retry_after: turn });
            }
        }
        let queued = Instant::now();
        let entry = Entry {
            tier: self.asker.tier.clone(),
            tenant: self.asker.tenant.clone(),
            deadline: self.deadline,
            tokens: self.demand.most_tokens(),
        };
        let ticket = match self.route.queue.join(&entry, queued) {
            Ok(ticket) => {
                self.paced = true;
                ticket
            }
            Err(_) => {
                self.refusal = "queue_full";
                return Err(self.queue_full());
            }
        };
        if let Some(progress) = &self.asker.progress {
            let slot = self
                .dispatcher
                .budgets()
                .window()
                .div_f64(self.route_rpm().max(1) as f64);
            progress.joined(self.route.queue.clone(), &ticket, slot);
        }
        let lease = self.wait_in_line(&ticket).await;
        if let Some(progress) = &self.asker.progress {
            progress.left();
        }
        self.waited = queued.elapsed();
        m.queue.observe(self.waited.as_secs_f64());
        if lease.is_ok() {
            ticket.admitted();
        }
        lease
    }

    /// Waits for this request's turn, then for budget, until the deadline. Stands back
    /// when another request should go first, or when its class may not take the budget
    /// that is free.
    async fn wait_in_line(&mut self, ticket: &Ticket<'_>) -> Result<Lease<'a>, RouteError> {
        let deadline = self.deadline;
        let signal = self.dispatcher.budgets().signal().clone();
        loop {
            // Not the head: wait to become it, acting on this request's own timers.
            while !ticket.is_head() {
                let wake = ticket.wake_at().map_or(deadline, |at| at.min(deadline));
                tokio::select! {
                    () = ticket.changed() => {}
                    () = tokio::time::sleep_until(wake) => {
                        let now = Instant::now();
                        if now >= deadline {
                            return Err(self.saturated_in_line(now));
                        }
                        ticket.tick(now);
                    }
                }
            }
            // The head: only this request looks for budget on this route now.
            loop {
                let mut registration = signal.register();
                let now = Instant::now();
                if let Some(lease) = self.pick(now).await {
                    return Ok(lease);
                }
                if self.class_blocked(now) {
                    // Budget is free, but not for this class: let the others go, and look
                    // again when a slot could have expired.
                    ticket.hold_tier(now, now + self.recheck());
                    break;
                }
                self.pace_stalled(now);
                let wake = self.give_up_unless_worth_waiting(now)?;
                let until = match wake {
                    Wake::At(at) => at.min(deadline),
                    Wake::Event | Wake::Never => deadline,
                };
                tokio::select! {
                    () = registration.pulsed() => {}
                    () = tokio::time::sleep_until(until) => {}
                    () = ticket.changed() => {
                        if !ticket.is_head() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Whether a key could take this request now but its class may not: the class's
    /// headroom, or off-peak deferral of batch work while the route is busy. A key that is
    /// full, or that pacing holds back (which holds every paced class alike), does not count:
    /// standing back would only hand the turn to a tier that cannot take it either.
    fn class_blocked(&self, now: Instant) -> bool {
        let deferred = !self.off_peak(now);
        if self.headroom(now) <= 0.0 && !deferred {
            return false;
        }
        self.live_targets().any(|(_, t)| {
            let p = &self.runtime.providers[t.provider];
            let tokens = self.demand.tokens(p.adapter);
            p.keys.iter().any(|k| {
                k.budget.availability(now, tokens).is_ok()
                    && self.pace_ready(k, now).is_ok()
                    && (deferred || !self.class_allows(k, now))
            })
        })
    }

    /// How long a class held back waits before it looks again: about one slot of the
    /// route's rate (when the oldest request of a full window may expire), within
    /// [50 ms, 1 s].
    fn recheck(&self) -> Duration {
        let window = self.dispatcher.budgets().window();
        let rpm = self.route_rpm().max(1);
        window
            .div_f64(rpm as f64)
            .clamp(Duration::from_millis(50), Duration::from_secs(1))
    }

    /// One paced admission per this interval on `key`: its window over its request limit
    /// (`None` for a key without one).
    fn pace_interval(&self, key: &KeyRt) -> Option<Duration> {
        let rpm = key.budget.rpm()?;
        Some(self.dispatcher.budgets().window() / rpm.max(1))
    }

    /// How far ahead of its pace a key admits paced requests: one slot of its rate, at most
    /// a sixtieth of the window (1 s of a minute). The window pays a burst back one window
    /// later as a stretch with nothing free ([`crate::budget::pace`]), so it is kept small.
    fn pace_tolerance(&self, interval: Duration) -> Duration {
        (self.dispatcher.budgets().window() / 60).min(interval)
    }

    /// The pace of this request's admission on `key`: none for a request that did not wait
    /// or a key without a request limit; checked for the classes below priority, only
    /// counted for the priority class ([`Attempts::pace_ready`]).
    fn pace(&self, key: &KeyRt) -> Option<Pace> {
        if !self.paced {
            return None;
        }
        let interval = self.pace_interval(key)?;
        Some(Pace {
            interval,
            tolerance: self.pace_tolerance(interval),
            check: self.asker.tier.class != floodgate_crds::QueueClass::Priority,
        })
    }

    /// When a paced request may take from `key`: `Ok` now, or the instant. Requests that
    /// did not wait are not paced, nor is the priority class; a burst of one slot of the
    /// key's rate (at most a sixtieth of the window) of paced admissions may go at once.
    fn pace_ready(&self, key: &KeyRt, now: Instant) -> Result<(), Instant> {
        // The priority class is never held back by pacing (its admissions still count on
        // the pace, so the classes below get what is left of the sustainable rate). With
        // shared budgets the pace is Redis's; the replica's pacer holds when Redis said the
        // next paced admission may come.
        match self.pace(key) {
            Some(pace) if pace.check => key.budget.pace.ready(now, pace.tolerance),
            _ => Ok(()),
        }
    }

    /// The head found no key it could take: the keys whose window is full (or cooling down)
    /// save no pacing credit meanwhile ([`crate::budget::pace::Pacer::stalled`]).
    fn pace_stalled(&self, now: Instant) {
        if !self.paced {
            return;
        }
        for (_, t) in self.live_targets() {
            let p = &self.runtime.providers[t.provider];
            let tokens = self.demand.tokens(p.adapter);
            for k in &p.keys {
                if let Some(interval) = self.pace_interval(k)
                    && matches!(
                        k.budget.availability(now, tokens),
                        Err(Unavailable::Until(_))
                    )
                {
                    k.budget.pace.stalled(now, self.pace_tolerance(interval));
                }
            }
        }
    }

    /// Whether this request's class may take from `key` now: more than its headroom is
    /// free (with 20%, the class stops while 80% of the window is used or more, and leaves
    /// the last 20% to the classes above it).
    fn class_allows(&self, key: &KeyRt, now: Instant) -> bool {
        let headroom = self.headroom(now);
        headroom <= 0.0
            || key.budget.rpm().is_none()
            || key.budget.remaining_fraction(now) > headroom + 1e-9
    }

    /// The most requests `key`'s window may hold for this request's class to take one more
    /// (`None`: up to the limit): the class leaves its headroom to the classes above, decided
    /// inside the key's admission (in Redis with shared budgets), so that it holds across
    /// replicas. The same rule as [`Attempts::class_allows`].
    fn class_cap(&self, key: &KeyRt, now: Instant) -> Option<u32> {
        let headroom = self.headroom(now);
        if headroom <= 0.0 {
            return None;
        }
        let rpm = key.budget.rpm()?;
        let cap = (f64::from(rpm) * (1.0 - headroom) - 1e-9).ceil().max(0.0);
        Some(cap as u32)
    }

    /// The share of a key's window this request's class leaves to the classes above: its
    /// tier's headroom, relaxed once it has waited half its limit (never removed: under
    /// sustained saturation most lower-class admissions come after half their wait, and the
    /// reserve is for exactly that load). Relaxed, every lower class keeps the same reserve
    /// (half the smallest headroom), so they share the rest by weight and none starves.
    fn headroom(&self, now: Instant) -> f64 {
        let tier = &self.asker.tier;
        if self.held_long_enough(now) {
            tier.relaxed_headroom
        } else {
            tier.headroom
        }
    }

    /// Whether the request has spent half its wait limit: from then on off-peak deferral no
    /// longer holds it back and its class's headroom is relaxed ([`Attempts::headroom`]), so
    /// that no class starves and it can be answered before its limit.
    fn held_long_enough(&self, now: Instant) -> bool {
        // From when the request started waiting, by its tier's limit: a caller that asks
        // for a shorter wait (`x-floodgate-max-wait-ms`) does not skip its class's hold.
        now >= self.started + self.asker.tier.max_wait / 2
    }

    /// Whether batch work may start now: the route's keys are at most the off-peak share
    /// used, or the request has been deferred for half its wait limit already.
    fn off_peak(&self, now: Instant) -> bool {
        let tier = &self.asker.tier;
        let Some(batch) = tier.batch else {
            return true;
        };
        if self.held_long_enough(now) {
            return true;
        }
        let (mut free, mut n) = (0.0, 0u32);
        for (_, t) in self.live_targets() {
            // A key without a request limit has no window to be busy in.
            for k in self.runtime.providers[t.provider]
                .keys
                .iter()
                .filter(|k| k.budget.rpm().is_some())
            {
                free += k.budget.remaining_fraction(now);
                n += 1;
            }
        }
        n == 0 || 1.0 - free / f64::from(n) <= batch.off_peak
    }

    /// When budget could free up, or the error to answer with now if not before the
    /// deadline.
    fn give_up_unless_worth_waiting(&self, now: Instant) -> Result<Wake, RouteError> {
        let wake = self.earliest(now);
        match wake {
            Wake::At(at) if at <= self.deadline => Ok(wake),
            Wake::Event if now < self.deadline => Ok(wake),
            Wake::At(at) if self.last_error.is_none() => Err(RouteError::Saturated {
                retry_after: at - now,
            }),
            Wake::Event if self.last_error.is_none() => Err(self.saturated(now, 0)),
            Wake::Never if self.last_error.is_none() => Err(RouteError::Unavailable {
                retry_after: self.circuit_wait(now),
            }),
            _ => Err(self.upstream_error()),
        }
    }

    fn upstream_error(&self) -> RouteError {
        match &self.last_error {
            Some(error) => RouteError::Upstream {
                error: error.clone(),
                attempts: self.made,
            },
            None => RouteError::Unavailable { retry_after: None },
        }
    }

    /// 429 at the deadline for a request with `ahead` requests before it in the queue: retry
    /// when they could be through, one slot of the route's rate each after the earliest key
    /// frees (one second when no instant is known).
    fn saturated(&self, now: Instant, ahead: usize) -> RouteError {
        if self.last_error.is_some() {
            return self.upstream_error();
        }
        let retry_after = self
            .turn_after(now, ahead, 1.0)
            .unwrap_or(Duration::from_secs(1));
        RouteError::Saturated { retry_after }
    }

    /// 429 at the deadline for a request still waiting in the queue: retry when a request
    /// joining then would be served, that is when those that go before a newcomer of its
    /// tier could be through ([`Attempts::turn`], this request not counted: it leaves). A
    /// retry at that time is admitted if nothing that goes first arrives meanwhile.
    fn saturated_in_line(&self, now: Instant) -> RouteError {
        if self.last_error.is_some() {
            return self.upstream_error();
        }
        let (ahead, share) = self.route.queue.outlook(&self.asker.tier, now);
        let retry_after = self
            .turn_after(now, ahead.saturating_sub(1), share)
            .unwrap_or(Duration::from_secs(1));
        RouteError::Saturated { retry_after }
    }

    /// When a request joining the queue now could be served: the earliest slot, then one
    /// slot per request that goes before it in its class (its tier's, and the class's other
    /// tiers' due before it), at its class's share of the route's rate (the weighted fair
    /// share of the class's tiers among the tiers waiting). `None` when no instant is known.
    fn turn(&self, now: Instant) -> Option<Duration> {
        let (ahead, share) = self.route.queue.outlook(&self.asker.tier, now);
        self.turn_after(now, ahead, share)
    }

    /// When a request with `ahead` requests before it could be served, its tier having
    /// `share` of the route's rate.
    fn turn_after(&self, now: Instant, ahead: usize, share: f64) -> Option<Duration> {
        let Wake::At(at) = self.earliest(now) else {
            return None;
        };
        let window = self.dispatcher.budgets().window();
        let rpm = self.route_rpm().max(1) as f64;
        // Whole slots: the class has its share of them, rounded to whole dispatches.
        let slots = (ahead as f64 / share.max(1e-6) - 1e-9).ceil().max(0.0) / rpm;
        Some(at.saturating_duration_since(now) + window.mul_f64(slots))
    }

    /// 429 for a full queue: the requests ahead take the route's next slots, so retry when
    /// they could be through.
    fn queue_full(&self) -> RouteError {
        if self.last_error.is_some() {
            // A retry after a provider's error: that error is the answer.
            return self.upstream_error();
        }
        let retry_after = self
            .turn(Instant::now())
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1));
        RouteError::Saturated { retry_after }
    }

    /// Whether a key of the route's live targets has a request limit.
    fn rate_limited(&self) -> bool {
        self.live_targets()
            .flat_map(|(_, t)| &self.runtime.providers[t.provider].keys)
            .any(|k| k.budget.rpm().is_some())
    }

    fn route_rpm(&self) -> u64 {
        self.live_targets()
            .flat_map(|(_, t)| &self.runtime.providers[t.provider].keys)
            .map(|k| u64::from(k.budget.rpm().unwrap_or(u32::MAX)))
            .sum()
    }

    fn live_targets(&self) -> impl Iterator<Item = (usize, &'a Target)> + '_ {
        let skipped = self.skipped;
        self.route
            .targets
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i >= 64 || skipped & (1 << i) == 0)
    }

    /// The first target (in route order, or weighted) with a key that has budget now, and a
    /// permit on that key. Never waits with local budgets; with shared budgets each key tried
    /// costs one Redis round trip (bounded by its timeout).
    async fn pick(&mut self, now: Instant) -> Option<Lease<'a>> {
        self.looks += 1;
        if !self.admitted && !self.off_peak(now) {
            return None;
        }
        let targets = &self.route.targets;
        let n = targets.len();
        let start = self
            .affine_target(now)
            .unwrap_or_else(|| self.start_offset());
        for step in 0..n {
            let ti = (start + step) % n;
            if ti < 64 && self.skipped & (1 << ti) != 0 {
                continue;
            }
            let target = &targets[ti];
            let provider = &self.runtime.providers[target.provider];
            let tokens = self.demand.tokens(provider.adapter);
            if let Some((key, permit, probe)) = self.pick_key(provider, now, tokens).await {
                self.made += 1;
                self.admitted = true;
                return Some(Lease {
                    provider,
                    key,
                    target,
                    target_index: ti,
                    permit,
                    probe,
                });
            }
        }
        None
    }

    /// A key of `provider` with budget for `tokens`, by the pool's strategy, and its permit.
    /// Each key's lock is taken once to score it and once more to admit the chosen one.
    async fn pick_key(
        &self,
        provider: &'a ProviderRt,
        now: Instant,
        tokens: u64,
    ) -> Option<(&'a KeyRt, Permit, Option<Probe>)> {
        let keys = &provider.keys;
        let n = keys.len();
        // Keys tried and refused in this pick (Redis may refuse what the local view allowed).
        let mut tried = 0u64;
        let rotate = match provider.strategy {
            Strategy::RoundRobin => self.dispatcher.rr.fetch_add(1, Ordering::Relaxed) % n.max(1),
            _ => 0,
        };
        // The key that served this prompt's prefix last, while it can take it: the
        // provider's prompt cache is per key.
        let affine = self.affine_key(provider, now, tokens);
        loop {
            let best = match (affine.filter(|&i| tried & (1 << i) == 0), provider.strategy) {
                (Some(i), _) => Some(i),
                (None, strategy) => match strategy {
                    Strategy::RoundRobin => (0..n)
                        .map(|i| (rotate + i) % n)
                        .filter(|&i| i >= 64 || tried & (1 << i) == 0)
                        .find(|&i| {
                            keys[i].budget.availability(now, tokens).is_ok()
                                && self.class_allows(&keys[i], now)
                                && self.pace_ready(&keys[i], now).is_ok()
                        }),
                    Strategy::LeastLoaded | Strategy::Weighted | Strategy::Cheapest => (0..n)
                        .filter(|&i| i >= 64 || tried & (1 << i) == 0)
                        .filter(|&i| self.class_allows(&keys[i], now))
                        .filter(|&i| self.pace_ready(&keys[i], now).is_ok())
                        .filter_map(|i| keys[i].budget.score(now, tokens).map(|s| (i, s)))
                        .max_by(|a, b| a.1.total_cmp(&b.1).then(b.0.cmp(&a.0)))
                        .map(|(i, _)| i),
                },
            }?;
            let probe = match provider.breaker.admit(now) {
                Admit::Denied => return None,
                Admit::Closed => None,
                Admit::Probe(probe) => Some(probe),
            };
            // If the caller goes away while Redis answers, the probe guard gives it back.
            let hold = Hold {
                cap: self.class_cap(&keys[best], now),
                pace: self.pace(&keys[best]),
            };
            match keys[best].budget.acquire_held(now, tokens, hold).await {
                Ok(permit) => return Some((&keys[best], permit, probe)),
                Err(_) => {
                    drop(probe);
                    if best >= 64 {
                        return None;
                    }
                    tried |= 1 << best;
                }
            }
        }
    }

    /// The index of the key of `provider` that served this request's prompt prefix last, if
    /// it has budget for `tokens` now and the request's class may take it.
    fn affine_key(&self, provider: &ProviderRt, now: Instant, tokens: u64) -> Option<usize> {
        let hash = self.asker.affinity?;
        let name = self
            .dispatcher
            .routing()
            .affinity
            .preferred(hash, &provider.name)?;
        let i = provider.keys.iter().position(|k| k.name == name)?;
        let key = &provider.keys[i];
        (i < 64
            && key.budget.availability(now, tokens).is_ok()
            && self.class_allows(key, now)
            && self.pace_ready(key, now).is_ok())
        .then_some(i)
    }

    /// The target of the provider that served this prompt's prefix last, when its key could
    /// take the request now: the attempt starts there, whatever the pool's order or weights.
    fn affine_target(&self, now: Instant) -> Option<usize> {
        let hash = self.asker.affinity?;
        let name = self.dispatcher.routing().affinity.provider(hash)?;
        (0..self.route.targets.len()).find(|&i| {
            let provider = &self.runtime.providers[self.route.targets[i].provider];
            (i >= 64 || self.skipped & (1 << i) == 0)
                && provider.name == name
                && self
                    .affine_key(provider, now, self.demand.tokens(provider.adapter))
                    .is_some()
        })
    }

    /// Where to start in the route: the first target, except under the weighted strategy,
    /// which rotates through targets in proportion to their providers' weights.
    fn start_offset(&self) -> usize {
        let targets = &self.route.targets;
        let providers = &self.runtime.providers;
        let weighted = targets
            .first()
            .is_some_and(|t| providers[t.provider].strategy == Strategy::Weighted);
        if !weighted || targets.len() < 2 {
            return 0;
        }
        let weight = |t: &Target| providers[t.provider].weight;
        let total: u32 = targets.iter().map(weight).sum();
        let rr = self.dispatcher.rr.fetch_add(1, Ordering::Relaxed);
        let mut tick = (rr % total.max(1) as usize) as u32;
        for (i, t) in targets.iter().enumerate() {
            let w = weight(t);
            if tick < w {
                return i;
            }
            tick -= w;
        }
        0
    }

    /// When a key of a usable provider could take the request.
    fn earliest(&self, now: Instant) -> Wake {
        let mut at: Option<Instant> = None;
        let mut event = false;
        for (_, target) in self.live_targets() {
            let p = &self.runtime.providers[target.provider];
            let tokens = self.demand.tokens(p.adapter);
            // The circuit: open until an instant, or half-open with its probe out.
            let circuit = match p.breaker.wake(now) {
                CircuitWake::Now => None,
                CircuitWake::At(t) => Some(t),
                CircuitWake::ProbeOut => {
                    event = true;
                    continue;
                }
            };
            for k in &p.keys {
                let free = match k.budget.availability(now, tokens) {
                    Ok(()) => now,
                    Err(Unavailable::Until(t)) => t,
                    Err(Unavailable::Pending) => {
                        event = true;
                        continue;
                    }
                    Err(Unavailable::Failed) => continue,
                };
                let free = match self.pace_ready(k, now) {
                    Ok(()) => free,
                    Err(at) => free.max(at),
                };
                let free = circuit.map_or(free, |c| c.max(free));
                at = Some(at.map_or(free, |a| a.min(free)));
            }
        }
        match at {
            // A key looked free but was refused in the same instant (a race with another
            // request, or Redis disagreeing): look again on the next pulse, or in a moment.
            Some(t) if t <= now => Wake::At(now + Duration::from_millis(1)),
            Some(t) => Wake::At(t),
            None if event => Wake::Event,
            None => Wake::Never,
        }
    }

    fn circuit_wait(&self, now: Instant) -> Option<Duration> {
        self.route
            .targets
            .iter()
            .filter_map(|t| self.runtime.providers[t.provider].breaker.open_until(now))
            .min()
            .map(|at| at - now)
    }
}

pub(super) use super::breaker::Wake as CircuitWake;
