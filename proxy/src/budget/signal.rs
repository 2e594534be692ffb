//! The wake-up for requests waiting for budget: whatever may free a slot on a key some request
//! was refused on (an answer, a settled reservation, an answer from Redis), a breaker's probe
//! ending, or a reconfiguration pulses it, and every request at the head of a wait queue looks
//! again. A key pulses only after it told a request "not now", so answers on keys with room
//! wake nobody; a pulse with nobody waiting costs one atomic load.

use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::sync::Notify;
use tokio::sync::futures::Notified;

/// A broadcast "something changed" for waiters.
#[derive(Debug, Default)]
pub struct Signal {
    notify: Notify,
    waiting: AtomicUsize,
}

impl Signal {
    /// Wakes every registered waiter, if there is one.
    pub fn pulse(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.notify.notify_waiters();
        }
    }

    /// Registers a waiter. Register *before* checking the condition, then await the
    /// returned future: a pulse between the check and the await is not lost.
    pub fn register(&self) -> Registration<'_> {
        self.waiting.fetch_add(1, Ordering::SeqCst);
        let mut notified = Box::pin(self.notify.notified());
        notified.as_mut().enable();
        Registration {
            signal: self,
            notified,
        }
    }

    /// Waiters registered now (for tests and metrics).
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// A registered waiter; await [`Registration::pulsed`].
#[derive(Debug)]
pub struct Registration<'a> {
    signal: &'a Signal,
    notified: std::pin::Pin<Box<Notified<'a>>>,
}

impl Registration<'_> {
    /// Resolves at the next pulse after registration.
    pub async fn pulsed(&mut self) {
        self.notified.as_mut().await;
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.signal.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pulse_between_registration_and_await_is_not_lost() {
        let signal = Signal::default();
        let mut registration = signal.register();
        signal.pulse();
        tokio::time::timeout(std::time::Duration::from_secs(5), registration.pulsed())
            .await
            .expect("the pulse before the await wakes the waiter");
        drop(registration);
        assert_eq!(signal.waiting(), 0);
    }
}
