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
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
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

/// A provider's circuit breaker.
#[derive(Debug)]
pub struct Breaker {
    threshold: AtomicU32,
    open_ms: AtomicU64,
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
            state: Mutex::new(State::Closed { failures: 0 }),
            signal,
        }
    }

    /// When a request could go to the provider, as far as the circuit is concerned.
    pub fn wake(&self, now: Instant) -> Wake {
        match *self.lock() {
            State::Open { until } if until > now => Wake::At(until),
            State::HalfOpen { probing: true } => Wake::ProbeOut,
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
    /// gets through (the probe).
    pub fn allow(&self, now: Instant) -> bool {
        let mut s = self.lock();
        match *s {
            State::Closed { .. } => true,
            State::Open { until } if now >= until => {
                *s = State::HalfOpen { probing: true };
                true
            }
            State::Open { .. } => false,
            State::HalfOpen { probing: false } => {
                *s = State::HalfOpen { probing: true };
                true
            }
            State::HalfOpen { probing: true } => false,
        }
    }

    /// When the breaker lets a request through again, if it is open now.
    pub fn open_until(&self, now: Instant) -> Option<Instant> {
        match *self.lock() {
            State::Open { until } if until > now => Some(until),
            _ => None,
        }
    }

    /// A call succeeded.
    pub fn success(&self) {
        let previous = std::mem::replace(&mut *self.lock(), State::Closed { failures: 0 });
        if previous == (State::HalfOpen { probing: true }) {
            self.signal.pulse();
        }
    }

    /// A call failed in a way that counts against the provider.
    pub fn failure(&self, now: Instant) {
        let threshold = self.threshold.load(Ordering::Relaxed);
        let until = now + self.open_for();
        let mut s = self.lock();
        let probe = *s == State::HalfOpen { probing: true };
        *s = match *s {
            State::Closed { failures } if failures + 1 >= threshold => State::Open { until },
            State::Closed { failures } => State::Closed {
                failures: failures + 1,
            },
            State::HalfOpen { .. } | State::Open { .. } => State::Open { until },
        };
        drop(s);
        if probe {
            // Waiters on the probe now wait for the new open period instead.
            self.signal.pulse();
        }
    }

    /// A call ended in a way that says nothing about the provider's health (a 429, a bad
    /// key, the caller's fault): a half-open probe slot is given back.
    pub fn neutral(&self) {
        let mut s = self.lock();
        if let State::HalfOpen { probing: true } = *s {
            *s = State::HalfOpen { probing: false };
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
            b.failure(t0);
        }
        assert!(b.allow(t0), "two failures of three keep it closed");
        b.failure(t0);
        assert_eq!(b.circuit(t0), Circuit::Open);
        assert!(!b.allow(t0 + Duration::from_secs(59)));
        let t1 = t0 + Duration::from_secs(60);
        assert!(b.allow(t1), "the probe");
        assert!(!b.allow(t1), "only one probe at a time");
        b.failure(t1);
        assert!(
            !b.allow(t1 + Duration::from_secs(1)),
            "a failed probe reopens it"
        );
        let t2 = t1 + Duration::from_secs(60);
        assert!(b.allow(t2));
        b.success();
        assert_eq!(b.circuit(t2), Circuit::Closed);
        assert!(b.allow(t2) && b.allow(t2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_resets_the_count() {
        let b = Breaker::new(2, Duration::from_secs(1), Arc::default());
        let t0 = Instant::now();
        b.failure(t0);
        b.success();
        b.failure(t0);
        assert_eq!(b.circuit(t0), Circuit::Closed);
    }
}
