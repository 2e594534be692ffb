//! Circuit breaker of a provider: after `failure_threshold` consecutive failures (5xx,
//! timeouts, broken connections) the provider is skipped for `open` seconds, then one
//! half-open probe decides whether it is closed again.

use crate::budget::Signal;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// `probe`: the id of the probe out, if one is.
    HalfOpen {
        probe: Option<u64>,
    },
}

/// The circuit state, for metrics and status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Traffic flows.
    Closed,
    /// Traffic is cut off.
    Open,
    /// One probe is allowed through.
    HalfOpen,
}

impl Circuit {
    /// Label for metrics and status.
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::HalfOpen => "half-open",
        }
    }
}

/// When a request waiting on this provider could go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Now, as far as the circuit is concerned.
    Now,
    /// The circuit is open until then.
    At(Instant),
    /// Half-open with the probe out: when the probe ends (the breaker pulses its signal).
    ProbeOut,
}

/// A half-open probe granted by [`Breaker::admit`]. If the attempt ends without a verdict
/// (its caller hung up, or no key had budget after all), dropping it gives the probe back,
/// so the circuit is never stuck half-open with a probe nobody will finish.
#[derive(Debug)]
pub struct Probe {
    breaker: Arc<Breaker>,
    id: u64,
}

impl Drop for Probe {
    fn drop(&mut self) {
        self.breaker.give_back(self.id);
    }
}

/// What [`Breaker::admit`] decided.
#[derive(Debug)]
pub enum Admit {
    /// The circuit is closed.
    Closed,
    /// Half-open: this request is the probe.
    Probe(Probe),
    /// Open, or half-open with a probe out.
    Denied,
}

/// A provider's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: AtomicU32,
    open_ms: AtomicU64,
    next_probe: AtomicU64,
    state: Mutex<State>,
    /// Pulsed when a half-open probe ends, for requests waiting on it.
    signal: Arc<Signal>,
}

impl Breaker {
    /// A closed breaker that pulses `signal` when a probe ends.
    pub fn new(threshold: u32, open_for: Duration, signal: Arc<Signal>) -> Self {
        Self {
            threshold: AtomicU32::new(threshold.max(1)),
            open_ms: AtomicU64::new(millis(open_for)),
            next_probe: AtomicU64::new(0),
            state: Mutex::new(State::Closed { failures: 0 }),
            signal,
        }
    }

    /// When a request could go to the provider, as far as the circuit is concerned.
    pub fn wake(&self, now: Instant) -> Wake {
        match *self.lock() {
            State::Open { until } if until > now => Wake::At(until),
            State::HalfOpen { probe: Some(_) } => Wake::ProbeOut,
            _ => Wake::Now,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies new settings, keeping the state.
    pub fn configure(&self, threshold: u32, open_for: Duration) {
        self.threshold.store(threshold.max(1), Ordering::Relaxed);
        self.open_ms.store(millis(open_for), Ordering::Relaxed);
    }

    fn open_for(&self) -> Duration {
        Duration::from_millis(self.open_ms.load(Ordering::Relaxed))
    }

    /// Whether a request may go to the provider now; in half-open, only the first caller
    /// gets through (the probe). Tests use it; requests use [`Breaker::admit`], whose probe
    /// is given back if the attempt is abandoned.
    pub fn allow(&self, now: Instant) -> bool {
        match self.take(now) {
            Some(None) => true,
            // A probe taken without a guard stays out until a verdict.
            Some(Some(_)) => true,
            None => false,
        }
    }

    /// Admits a request now: through a closed circuit, as the half-open probe (with a guard
    /// that gives the probe back if dropped before a verdict), or not at all.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Admit {
        match self.take(now) {
            Some(None) => Admit::Closed,
            Some(Some(id)) => Admit::Probe(Probe {
                breaker: self.clone(),
                id,
            }),
            None => Admit::Denied,
        }
    }

    /// `Some(None)`: closed; `Some(Some(id))`: probe `id` taken; `None`: denied.
    fn take(&self, now: Instant) -> Option<Option<u64>> {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => Some(None),
            State::Open { until } if now < until => None,
            State::HalfOpen { probe: Some(_) } => None,
            State::Open { .. } | State::HalfOpen { probe: None } => {
                let id = self.next_probe.fetch_add(1, Ordering::Relaxed);
                *s = State::HalfOpen { probe: Some(id) };
                Some(Some(id))
            }
        }
    }

    /// Probe `id` ends without a verdict: if it is still the probe out, another may go.
    fn give_back(&self, id: u64) {
        let mut s = self.lock();
        if *s == (State::HalfOpen { probe: Some(id) }) {
            *s = State::HalfOpen { probe: None };
            drop(s);
            self.signal.pulse();
        }
    }

    /// When the breaker lets a request through again, if it is open now.
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        match *self.lock() {
            State::Open { until } if until > now => Some(until),
            _ => None,
        }
    }

    /// A call succeeded. Returns whether that closed an open or half-open circuit (its
    /// probe, or a call sent before it opened that was answered after).
    pub fn success(&self) -> bool {
        let previous = std::mem::replace(&mut *self.lock(), State::Closed { failures: 0 });
        let closed = !matches!(previous, State::Closed { .. });
        if closed {
            // Requests waiting for the probe or the open period may go now.
            self.signal.pulse();
        }
        closed
    }

    /// A call failed in a way that counts against the provider. Returns whether that opened
    /// a closed circuit (a failed probe re-opens one that was open already).
    pub fn failure(&self, now: Instant) -> bool {
        let threshold = self.threshold.load(Ordering::Relaxed);
        let until = now + self.open_for();
        let mut s = self.lock();
        let probe = matches!(*s, State::HalfOpen { probe: Some(_) });
        let was_closed = matches!(*s, State::Closed { .. });
        *s = match *s {
            State::Closed { failures } if failures + 1 >= threshold => State::Open { until },
            State::Closed { failures } => State::Closed {
                failures: failures + 1,
            },
            State::HalfOpen { .. } | State::Open { .. } => State::Open { until },
        };
        let opened = was_closed && matches!(*s, State::Open { .. });
        drop(s);
        if probe {
            // Waiters on the probe now wait for the new open period instead.
            self.signal.pulse();
        }
        opened
    }

    /// An open circuit lets the next request through as its probe now, before its open
    /// period ends (a health check found the provider answering): the probe's verdict, on
    /// live traffic, closes or re-opens it. Returns whether it was open.
    pub fn half_open(&self) -> bool {
        let mut s = self.lock();
        if !matches!(*s, State::Open { .. }) {
            return false;
        }
        *s = State::HalfOpen { probe: None };
        drop(s);
        self.signal.pulse();
        true
    }

    /// A call ended in a way that says nothing about the provider's health (a 429, a bad
    /// key, the caller's fault): a half-open probe slot is given back.
    pub fn neutral(&self) {
        let mut s = self.lock();
        if let State::HalfOpen { probe: Some(_) } = *s {
            *s = State::HalfOpen { probe: None };
            drop(s);
            self.signal.pulse();
        }
    }

    /// The current state.
    pub fn circuit(&self, now: Instant) -> Circuit {
        match *self.lock() {
            State::Closed { .. } => Circuit::Closed,
            State::Open { until } if now >= until => Circuit::HalfOpen,
            State::Open { .. } => Circuit::Open,
            State::HalfOpen { .. } => Circuit::HalfOpen,
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_threshold_and_probes_after_the_open_period() {
        let b = Breaker::new(3, Duration::from_secs(60), Arc::default());
        let t0 = Instant::now();
        for _ in 0..2 {
            assert!(!b.failure(t0));
        }
        assert!(b.allow(t0), "two failures of three keep it closed");
        assert!(b.failure(t0), "the third opens it (and says so, once)");
        assert_eq!(b.circuit(t0), Circuit::Open);
        assert!(!b.allow(t0 + Duration::from_secs(59)));
        let t1 = t0 + Duration::from_secs(60);
        assert!(b.allow(t1), "the probe");
        assert!(!b.allow(t1), "only one probe at a time");
        assert!(
            !b.failure(t1),
            "a failed probe re-opens it, not a new opening"
        );
        assert!(
            !b.allow(t1 + Duration::from_secs(1)),
            "a failed probe reopens it"
        );
        let t2 = t1 + Duration::from_secs(60);
        assert!(b.allow(t2));
        assert!(b.success(), "the probe's success closes it");
        assert!(!b.success(), "closed already");
        assert_eq!(b.circuit(t2), Circuit::Closed);
        assert!(b.allow(t2) && b.allow(t2));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_probe_is_given_back() {
        let b = Arc::new(Breaker::new(1, Duration::from_secs(10), Arc::default()));
        let t0 = Instant::now();
        b.failure(t0);
        let t1 = t0 + Duration::from_secs(10);
        let probe = b.admit(t1);
        assert!(matches!(probe, Admit::Probe(_)));
        assert!(matches!(b.admit(t1), Admit::Denied), "one probe at a time");
        // Its caller hung up: no verdict, and the next request may probe.
        drop(probe);
        let second = b.admit(t1);
        assert!(matches!(second, Admit::Probe(_)));
        // A stale guard never frees someone else's probe.
        b.success();
        assert_eq!(b.circuit(t1), Circuit::Closed);
        drop(second);
        assert!(matches!(b.admit(t1), Admit::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1), Arc::default());
        let t0 = Instant::now();
        b.failure(t0);
        assert!(!b.success(), "it was closed");
        b.failure(t0);
        assert_eq!(b.circuit(t0), Circuit::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_success_closes_an_open_circuit_and_says_so() {
        let b = Breaker::new(1, Duration::from_secs(60), Arc::default());
        let t0 = Instant::now();
        assert!(b.failure(t0));
        // A call sent before the circuit opened is answered now.
        assert!(b.success(), "closing an open circuit is reported");
        assert_eq!(b.circuit(t0), Circuit::Closed);
    }
}
