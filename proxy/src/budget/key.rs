//! The budget of one key and the permit of one request on it.
//!
//! Locally (no Redis) a key is its own windows behind a mutex, as exact as the provider. With
//! shared budgets the windows still record this replica's own requests (the fallback counts
//! them when Redis fails), but admission is Redis's: a small hint of Redis's last answer
//! (requests used, blocked until when, admissions being asked) keeps the replica from asking
//! when the answer is known to be no, and from asking all at once when a slot frees up.

use super::pace::Hold;
use super::shared::record::{Record, Recorded, Seeds};
use super::shared::{Admission, RedisBudgets};
use super::window::{RequestWindow, TokenWindow};
use super::{Limits, Signal, Unavailable};
use crate::providers::RateLimitInfo;
use floodgate_crds::redis_keys::KeyBudgetKeys;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug)]
pub(super) struct SharedKey {
    pub(super) backend: Arc<RedisBudgets>,
    pub(super) keys: Arc<KeyBudgetKeys>,
}

/// The replica's view of a key's shared budget, from Redis's last answer.
#[derive(Debug, Default)]
struct Hint {
    /// Requests in the window, every replica's.
    used: u32,
    /// Redis said no further request fits before this.
    blocked_until: Option<Instant>,
    /// This replica's requests asking Redis now.
    asking: u32,
    /// `used` holds until then (one window after the answer).
    heard_until: Option<Instant>,
}

#[derive(Debug)]
struct KeyState {
    limits: Limits,
    requests: Option<RequestWindow>,
    tokens: Option<TokenWindow>,
    cooled_until: Option<Instant>,
    failed: bool,
    /// The key was refused as unauthenticated (401): a health probe that the provider
    /// answers with it proves it again. A 403 or a spent quota is not proven by a listing.
    restorable: bool,
    in_flight: u32,
    hint: Hint,
    /// A request was told "not now" since the last pulse: the next change that may make
    /// room pulses the signal (and clears this). Nobody waits on a key never found full, so
    /// its answers wake nobody.
    blocked: bool,
    /// With shared budgets: this replica's own requests, for re-writing into Redis.
    record: Option<Record>,
    /// The outage of Redis this key last saw (its number), and the requests and tokens this
    /// replica held on the key when it began: its caps for the outage's first window.
    held_at_outage: Option<Held>,
}

/// What a replica held on a key when an outage of Redis began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Held {
    /// The outage's number.
    outage: u64,
    /// Requests in its window (its own count).
    requests: u32,
    /// Tokens in its window.
    tokens: u64,
}

/// The budget of one key.
#[derive(Debug)]
pub struct KeyBudget {
    state: Mutex<KeyState>,
    shared: Option<SharedKey>,
    /// Pulsed when an answer, a settlement or an answer from Redis may have made room.
    signal: Arc<Signal>,
    /// Paces the admissions of requests that waited ([`super::pace`]).
    pub pace: super::pace::Pacer,
}

/// A request admitted on a key: its token reservation is settled, and its in-flight slot
/// released, when the permit is settled or dropped.
#[derive(Debug)]
pub struct Permit {
    key: Arc<KeyBudget>,
    reservation: Option<(u64, u64)>,
    /// Its sequence in the shared budget (its member name there), with shared budgets.
    member: Option<u64>,
    answered: bool,
    /// When it was answered ([`Permit::answered`]): where it sits in the request window.
    answered_at: Option<Instant>,
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
        self.answered_at = Some(now);
        let blocked = {
            let mut s = self.key.lock();
            if let Some(w) = s.requests.as_mut() {
                w.complete(now);
            }
            if let (Some(r), Some(m)) = (s.record.as_mut(), self.member) {
                r.answered(m, now);
            }
            std::mem::take(&mut s.blocked)
        };
        if blocked {
            // The slot's release instant is known now: waiters recompute it.
            self.key.signal.pulse();
        }
        if let Some(shared) = &self.key.shared {
            // The member is kept: to settle its tokens, or to refund it.
            if let Some(member) = self.member {
                shared
                    .backend
                    .complete_later(&shared.keys, shared.backend.member(member));
            }
        }
    }

    /// Settles the token reservation with the real usage.
    pub fn settle(mut self, total_tokens: u64) {
        self.finish(Some(total_tokens));
    }

    /// The request was never sent (refused before its first byte, e.g. a field the target
    /// cannot take): its in-flight slot and its token reservation are released without
    /// counting against the window. With shared budgets Redis already admitted it, so there
    /// it counts as answered now (one window, the safe side).
    pub fn cancel(mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.answered = true;
        let mut state = self.key.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(w) = state.requests.as_mut() {
            w.cancel();
        }
        if let (Some((id, _)), Some(tokens)) = (self.reservation, state.tokens.as_mut()) {
            tokens.settle(id, 0);
        }
        if let (Some(r), Some(m)) = (state.record.as_mut(), self.member) {
            r.cancel(m);
        }
        let blocked = std::mem::take(&mut state.blocked);
        drop(state);
        if let (Some(shared), Some(member)) = (&self.key.shared, self.member.take()) {
            shared
                .backend
                .complete_later(&shared.keys, shared.backend.member(member));
        }
        if blocked {
            self.key.signal.pulse();
        }
    }

    /// The gateway refused the request after this admission, before anything was sent for
    /// it (a tenant's request that no provider key could take): it leaves the window as if
    /// never admitted, answered or not, and its token reservation is given back. With shared
    /// budgets the refund is written to Redis in the background (if Redis cannot be reached
    /// the request keeps counting, the safe side).
    pub fn refund(mut self) {
        if self.done {
            return;
        }
        self.done = true;
        self.answered = true;
        let mut state = self.key.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        if let Some(w) = state.requests.as_mut() {
            match self.answered_at {
                Some(at) => w.refund(at),
                None => w.cancel(),
            }
        }
        if let (Some((id, _)), Some(tokens)) = (self.reservation, state.tokens.as_mut()) {
            tokens.settle(id, 0);
        }
        if let (Some(r), Some(m)) = (state.record.as_mut(), self.member) {
            r.refund(m);
        }
        if self.key.shared.is_some() {
            // What Redis last said counted this request (and may have named the instant the
            // window frees because of it): this replica knows better now. Other replicas
            // learn of the room at their next answer from Redis.
            state.hint.used = state.hint.used.saturating_sub(1);
            state.hint.blocked_until = None;
        }
        state.blocked = false;
        drop(state);
        if let (Some(shared), Some(member)) = (&self.key.shared, self.member.take()) {
            shared
                .backend
                .refund_later(&shared.keys, shared.backend.member(member));
        }
        // Room was made: whoever waits for this key looks again.
        self.key.signal.pulse();
    }

    fn finish(&mut self, actual: Option<u64>) {
        if self.done {
            return;
        }
        self.answered();
        self.done = true;
        let mut state = self.key.lock();
        state.in_flight = state.in_flight.saturating_sub(1);
        let (Some((id, _)), Some(actual)) = (self.reservation, actual) else {
            return;
        };
        if let Some(tokens) = state.tokens.as_mut() {
            tokens.settle(id, actual);
        }
        if let (Some(r), Some(m)) = (state.record.as_mut(), self.member) {
            r.settle(m, actual);
        }
        let blocked = std::mem::take(&mut state.blocked);
        drop(state);
        if blocked {
            // Fewer tokens than reserved may make room at once.
            self.key.signal.pulse();
        }
        if let (Some(shared), Some(member)) = (&self.key.shared, self.member.take()) {
            shared
                .backend
                .settle_later(&shared.keys, shared.backend.member(member), actual);
        }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        // Unsettled (failed or abandoned): the estimate stands, which errs on the safe side.
        self.finish(None);
    }
}

/// A request asking Redis. However the asking ends it gives back its place among the
/// requests asking; if it ends without an answer (the caller went away meanwhile), the
/// admission may have happened, so the member is marked answered.
struct Asking<'a> {
    key: &'a KeyBudget,
    shared: &'a SharedKey,
    member: Option<u64>,
}

impl Asking<'_> {
    /// The answer came: the member is the caller's now.
    fn answered(mut self) -> u64 {
        self.member.take().unwrap_or_default()
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut s = self.key.lock();
        s.hint.asking = s.hint.asking.saturating_sub(1);
        let blocked = std::mem::take(&mut s.blocked);
        drop(s);
        if blocked {
            self.key.signal.pulse();
        }
        if let Some(member) = self.member.take() {
            let member = self.shared.backend.member(member);
            self.shared
                .backend
                .complete_later(&self.shared.keys, member);
        }
    }
}

impl KeyBudget {
    pub(super) fn new(
        limits: Limits,
        window: Duration,
        shared: Option<SharedKey>,
        signal: Arc<Signal>,
    ) -> Self {
        Self {
            state: Mutex::new(KeyState {
                limits,
                requests: limits.rpm.map(|rpm| RequestWindow::new(rpm, window)),
                tokens: limits
                    .tpm
                    .map(|tpm| TokenWindow::new(u64::from(tpm), window)),
                cooled_until: None,
                failed: false,
                restorable: false,
                in_flight: 0,
                hint: Hint::default(),
                blocked: false,
                record: shared.as_ref().map(|_| Record::new(window)),
                held_at_outage: None,
            }),
            shared,
            signal,
            pace: super::pace::Pacer::default(),
        }
    }

    /// The request limit per window; `None` for unlimited.
    pub fn rpm(&self) -> Option<u32> {
        self.lock().limits.rpm
    }

    /// With one lock: whether the key could take `tokens` now and, if so, the share of its
    /// request budget left ([`KeyBudget::remaining_fraction`]), to rank keys.
    pub fn score(&self, now: Instant, tokens: u64) -> Option<f64> {
        let mut s = self.lock();
        let backend = self.shared.as_ref().map(|sh| &*sh.backend);
        s.local_availability(now, tokens, backend).ok()?;
        if self.sharing(&s).is_some() {
            s.hint_availability(now).ok()?;
        }
        Some(self.fraction_locked(&mut s, now))
    }

    fn lock(&self) -> MutexGuard<'_, KeyState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// New limits over `window`; the requests and tokens already counted keep counting.
    pub fn update(&self, limits: Limits, window: Duration) {
        let mut s = self.lock();
        let raised = limits.rpm > s.limits.rpm || limits.tpm > s.limits.tpm;
        if raised {
            // More room than Redis said when it had less: ask again.
            s.hint.blocked_until = None;
        }
        s.limits = limits;
        if let Some(r) = s.record.as_mut() {
            r.set_window(window);
        }
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

    pub(super) fn clear_failed(&self) {
        self.lock().failed = false;
    }

    /// The shared budget, unless Redis is down or the key has no limit to share.
    fn sharing(&self, s: &KeyState) -> Option<&SharedKey> {
        self.shared.as_ref().filter(|shared| {
            !shared.backend.degraded() && (s.limits.rpm.is_some() || s.limits.tpm.is_some())
        })
    }

    /// When this key could take a request of `tokens`: `Ok(())` if now.
    pub fn availability(&self, now: Instant, tokens: u64) -> Result<(), Unavailable> {
        let mut s = self.lock();
        let backend = self.shared.as_ref().map(|sh| &*sh.backend);
        s.local_availability(now, tokens, backend)?;
        if self.sharing(&s).is_some() {
            s.hint_availability(now)?;
        }
        Ok(())
    }

    /// Admits a request of `tokens` estimated tokens at `now`: at once from the local windows,
    /// or, with shared budgets, by asking Redis (at most [`SharedOptions::timeout`]; on
    /// failure the local share decides).
    ///
    /// [`SharedOptions::timeout`]: super::SharedOptions::timeout
    pub async fn acquire(
        self: &Arc<Self>,
        now: Instant,
        tokens: u64,
    ) -> Result<Permit, Unavailable> {
        self.acquire_held(now, tokens, Hold::default()).await
    }

    /// [`KeyBudget::acquire`] held back as `hold` says: a queue class that may only take a
    /// request while fewer than `hold.cap` requests are in the window, and the key's pace for
    /// a request that waited. From the local window and [`KeyBudget::pace`], or inside
    /// Redis's atomic admission with shared budgets (the pace shared by every replica). A
    /// refusal by the cap or the pace alone does not mark the key full for the others. While
    /// Redis is unreachable the cap is not applied (the local share already holds every class
    /// back) and the pace is this replica's.
    pub async fn acquire_held(
        self: &Arc<Self>,
        now: Instant,
        tokens: u64,
        hold: Hold,
    ) -> Result<Permit, Unavailable> {
        let Some(shared) = &self.shared else {
            // The local path: one lock, no allocation.
            let mut s = self.lock();
            s.local_availability(now, tokens, None)?;
            if let (Some(cap), Some(w)) = (hold.cap, s.requests.as_mut())
                && cap < w.limit()
            {
                let free = w.next_free_within(now, cap);
                if free > now {
                    return Err(Unavailable::Until(free));
                }
            }
            self.local_pace(now, hold)?;
            return Ok(self.admit_paced(&mut s, now, tokens, None, hold));
        };
        let seq = shared.backend.next_seq();
        let limits = {
            let mut s = self.lock();
            s.local_availability(now, tokens, Some(&shared.backend))?;
            if self.sharing(&s).is_none() {
                // Redis is unreachable: the local share decides, and the record keeps the
                // request for Redis's return. A key without limits has nothing to share.
                self.local_pace(now, hold)?;
                let limited = s.limits.rpm.is_some() || s.limits.tpm.is_some();
                return Ok(self.admit_paced(&mut s, now, tokens, limited.then_some(seq), hold));
            }
            s.hint_availability(now)?;
            s.hint.asking += 1;
            s.limits
        };
        let asking = Asking {
            key: self,
            shared,
            member: Some(seq),
        };
        let member = shared.backend.member(seq);
        let answer = shared
            .backend
            .acquire_on_runtime(&shared.keys, limits, tokens, &member, hold)
            .await;
        let member = asking.answered();
        let now = Instant::now();
        match answer {
            Ok(Admission::Admitted { used, next_free }) => {
                let mut s = self.lock();
                let permit = self.admit_paced(&mut s, now, tokens, Some(member), hold);
                s.heard(now, used, (!next_free.is_zero()).then(|| now + next_free));
                Ok(permit)
            }
            Ok(Admission::Refused {
                used,
                wait,
                class_only,
                paced,
            }) => {
                let mut s = self.lock();
                // Refused by the class cap or the pace alone: the classes above, and requests
                // that are not paced, may still find room, so the key is not marked full.
                let blocked = (!class_only && !paced).then_some(now + wait);
                s.heard(now, used, blocked);
                drop(s);
                if let (true, Some(pace)) = (paced, hold.pace) {
                    // Paced requests of this replica wait for that instant, asking nobody.
                    self.pace.hold_until(now + wait, pace.tolerance);
                }
                Err(Unavailable::Until(now + wait))
            }
            Err(error) => {
                shared.backend.failed(&error);
                shared
                    .backend
                    .forget_later(&shared.keys, shared.backend.member(member));
                let mut s = self.lock();
                s.local_availability(now, tokens, Some(&shared.backend))?;
                // Under the same member: if Redis did admit it, re-writing it counts it once.
                Ok(self.admit_paced(&mut s, now, tokens, Some(member), hold))
            }
        }
    }

    /// This replica's pace, for a paced request that the pace may hold back.
    fn local_pace(&self, now: Instant, hold: Hold) -> Result<(), Unavailable> {
        match hold.pace {
            Some(pace) if pace.check => self
                .pace
                .ready(now, pace.tolerance)
                .map_err(Unavailable::Until),
            _ => Ok(()),
        }
    }

    /// [`KeyBudget::admit`], counting a paced request on this replica's pace.
    fn admit_paced(
        self: &Arc<Self>,
        s: &mut KeyState,
        now: Instant,
        tokens: u64,
        member: Option<u64>,
        hold: Hold,
    ) -> Permit {
        if let Some(pace) = hold.pace {
            self.pace.admitted(now, pace.interval);
        }
        self.admit(s, now, tokens, member)
    }

    /// Records an admitted request in the local windows.
    fn admit(
        self: &Arc<Self>,
        s: &mut KeyState,
        now: Instant,
        tokens: u64,
        member: Option<u64>,
    ) -> Permit {
        if let Some(w) = s.requests.as_mut() {
            w.admit();
        }
        let reservation = s.tokens.as_mut().map(|w| (w.reserve(now, tokens), tokens));
        if let (Some(r), Some(m)) = (s.record.as_mut(), member) {
            r.admit(m, now, reservation.map(|(_, t)| t));
        }
        s.in_flight += 1;
        Permit {
            key: self.clone(),
            reservation,
            member,
            answered: false,
            answered_at: None,
            done: false,
        }
    }

    /// Share of the request budget left, in `[0, 1]` (1 for unlimited keys). With shared
    /// budgets, of every replica's use as Redis last reported it.
    pub fn remaining_fraction(&self, now: Instant) -> f64 {
        let mut s = self.lock();
        self.fraction_locked(&mut s, now)
    }

    fn fraction_locked(&self, s: &mut KeyState, now: Instant) -> f64 {
        if let (Some(_), Some(rpm)) = (self.sharing(s), s.limits.rpm) {
            let used = s.shared_used(now).saturating_add(s.hint.asking);
            return (1.0 - f64::from(used) / f64::from(rpm.max(1))).max(0.0);
        }
        let in_flight = s.in_flight;
        let share = self.shared.as_ref().map(|sh| &*sh.backend);
        match s.requests.as_mut() {
            Some(w) => {
                let limit = local_limit(share, now, w.limit());
                (1.0 - f64::from(w.used(now)) / f64::from(limit.max(1))).max(0.0)
            }
            // Unlimited: prefer the key with the fewest requests in flight.
            None => 1.0 / (1.0 + f64::from(in_flight)),
        }
    }

    /// Requests made in the current window: every replica's as Redis last reported them
    /// with shared budgets, else this replica's.
    pub fn used(&self, now: Instant) -> u32 {
        let mut s = self.lock();
        if self.sharing(&s).is_some() {
            return s.shared_used(now);
        }
        s.requests.as_mut().map_or(0, |w| w.used(now))
    }

    /// Rests the key until `until` (a 429 from the provider).
    pub fn cool_until(&self, until: Instant) {
        let mut s = self.lock();
        s.cooled_until = Some(s.cooled_until.map_or(until, |c| c.max(until)));
    }

    /// Takes the key out until the configuration changes (a 403, a spent quota).
    pub fn fail(&self) {
        let mut s = self.lock();
        s.failed = true;
        s.restorable = false;
    }

    /// Takes the key out after a 401, until the configuration changes or a health probe
    /// with it succeeds ([`KeyBudget::is_restorable`]).
    pub fn fail_unauthenticated(&self) {
        let mut s = self.lock();
        s.failed = true;
        s.restorable = true;
    }

    /// Whether the key is out after a 401, which a successful probe may undo.
    pub fn is_restorable(&self) -> bool {
        let s = self.lock();
        s.failed && s.restorable
    }

    /// Puts a failed key back: a health probe with it succeeded.
    pub fn restore(&self) {
        self.lock().failed = false;
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

impl Recorded for KeyBudget {
    fn seeds(&self, now: Instant) -> Seeds {
        let mut s = self.lock();
        let (requests, tokens) = (s.limits.rpm.is_some(), s.limits.tpm.is_some());
        s.record
            .as_mut()
            .map(|r| r.seeds(now, requests, tokens))
            .unwrap_or_default()
    }

    fn forget_wait(&self) {
        self.lock().hint.blocked_until = None;
    }

    fn answered_among(&self, members: &[u64]) -> Vec<u64> {
        let s = self.lock();
        let Some(r) = s.record.as_ref() else {
            return Vec::new();
        };
        members
            .iter()
            .copied()
            .filter(|&m| !r.in_flight(m))
            .collect()
    }
}

/// The limit the local window enforces: the whole of it, or the replica's share while shared
/// budgets are degraded (and for a window after).
fn local_limit(shared: Option<&RedisBudgets>, now: Instant, limit: u32) -> u32 {
    shared
        .and_then(|b| b.local_share(now, u64::from(limit)))
        .map_or(limit, |share| u32::try_from(share).unwrap_or(limit))
}

impl KeyState {
    /// Records Redis's answer at `now`: `used` requests in the window, room again at
    /// `blocked_until` (`None`: now).
    fn heard(&mut self, now: Instant, used: u32, blocked_until: Option<Instant>) {
        let window = self
            .requests
            .as_ref()
            .map_or(Duration::ZERO, |w| w.window());
        self.hint.used = used;
        self.hint.blocked_until = blocked_until;
        self.hint.heard_until = Some(now + window);
    }

    /// Every replica's requests in the window as Redis last said, while that answer is less
    /// than a window old; this replica's own after that.
    fn shared_used(&mut self, now: Instant) -> u32 {
        match self.hint.heard_until {
            Some(until) if until > now => self.hint.used,
            _ => self.requests.as_mut().map_or(0, |w| w.used(now)),
        }
    }

    /// Failed, cooled, and the local windows (whole, or the replica's share of them).
    fn local_availability(
        &mut self,
        now: Instant,
        tokens: u64,
        shared: Option<&RedisBudgets>,
    ) -> Result<(), Unavailable> {
        if self.failed {
            return Err(Unavailable::Failed);
        }
        let mut free = now;
        if let Some(c) = self.cooled_until {
            free = free.max(c);
        }
        let outage = shared.and_then(|b| b.outage(now));
        let held = outage.map(|o| self.held_at(o.number, now));
        if let Some(w) = self.requests.as_mut() {
            let limit = w.limit();
            match shared.and_then(|b| b.local_share(now, u64::from(limit))) {
                None => free = free.max(w.next_free(now)),
                Some(share) => {
                    // Redis is (or was just) out: this replica's share of the key, and in the
                    // outage's first window no more than it held when the outage began.
                    let share = u32::try_from(share).unwrap_or(limit);
                    match (outage, held) {
                        (Some(outage), Some(held)) => {
                            // Every replica's requests still counted when Redis was lost were
                            // admitted by Redis while the window held at most the limit, so
                            // together they never exceed it; the other replicas' part of them
                            // is not known here (Redis's last answer may be stale). Holding
                            // at most what it held then keeps the sum within the limit
                            // whoever held what. Once they have left the provider's window,
                            // the shares alone add up to at most the limit.
                            let cap = share.min(held.requests);
                            let at = match cap {
                                0 => outage.first_window_ends,
                                _ => w.next_free_within(now, cap).min(outage.first_window_ends),
                            };
                            free = free.max(at);
                        }
                        _ => free = free.max(w.next_free_within(now, share)),
                    }
                }
            }
        }
        if let (Some(w), Some(tpm)) = (self.tokens.as_mut(), self.limits.tpm) {
            match shared.and_then(|b| b.local_share(now, u64::from(tpm))) {
                None => free = free.max(w.next_free_within(now, tokens, u64::from(tpm))),
                Some(share) => match (outage, held) {
                    (Some(outage), Some(held)) => {
                        // The same rule for tokens: the reservations counted when Redis was
                        // lost were admitted by Redis within the limit, so a replica that
                        // keeps at most the tokens it held then keeps the sum within it. A
                        // request larger than that waits for the first window's end (the
                        // rule that a request larger than the limit fits an empty window
                        // would break the sum here).
                        let cap = share.min(held.tokens);
                        let at = if tokens > cap {
                            outage.first_window_ends
                        } else {
                            w.next_free_within(now, tokens, cap)
                                .min(outage.first_window_ends)
                        };
                        free = free.max(at);
                    }
                    _ => free = free.max(w.next_free_within(now, tokens, share)),
                },
            }
        }
        if free > now {
            self.blocked = true;
            Err(Unavailable::Until(free))
        } else {
            Ok(())
        }
    }

    /// What this replica held on the key when outage `outage` began: counted the first
    /// time the outage is seen on this key (nothing was admitted on it since, or this would
    /// have run), kept for the rest of it. Its own counts: the provider's word that the key
    /// is spent says nothing of what this replica held.
    fn held_at(&mut self, outage: u64, now: Instant) -> Held {
        if let Some(held) = self.held_at_outage.filter(|h| h.outage == outage) {
            return held;
        }
        let held = Held {
            outage,
            requests: self.requests.as_mut().map_or(0, |w| w.counted(now)),
            tokens: self.tokens.as_mut().map_or(0, |w| w.used(now)),
        };
        self.held_at_outage = Some(held);
        held
    }

    /// What Redis last said, and how many of this replica's requests are asking it now.
    fn hint_availability(&mut self, now: Instant) -> Result<(), Unavailable> {
        if let Some(until) = self.hint.blocked_until
            && until > now
        {
            self.blocked = true;
            return Err(Unavailable::Until(until));
        }
        let used = self.shared_used(now);
        let room = self
            .limits
            .rpm
            .map_or(u32::MAX, |rpm| rpm.saturating_sub(used).max(1));
        if self.hint.asking >= room {
            // Their answers pulse the signal when they come.
            self.blocked = true;
            return Err(Unavailable::Pending);
        }
        Ok(())
    }
}
