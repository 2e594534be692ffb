//! Exponential backoff from the TierQueue's `retry`: attempts in all (the first included),
//! the delay before the first retry, doubling each time up to the longest delay.

use floodgate_crds::tier::RetryPolicy;
use std::time::Duration;

/// The retry schedule of a job or a webhook delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Attempts in all, the first included (at least 1).
    pub max_attempts: u32,
    /// Delay after the first failed attempt.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Backoff {
    /// The schedule a TierQueue's `retry` describes.
    pub fn from_policy(p: &RetryPolicy) -> Self {
        Backoff {
            max_attempts: p.max_attempts.max(1),
            initial: Duration::from_secs(u64::from(p.initial_backoff_seconds)),
            max: Duration::from_secs(u64::from(p.max_backoff_seconds)),
        }
    }

    /// The delay before the next attempt after `failed` attempts have failed, or `None` when
    /// they are spent: `initial * 2^(failed-1)`, at most `max`.
    pub fn after(&self, failed: u32) -> Option<Duration> {
        if failed == 0 {
            return Some(Duration::ZERO);
        }
        if failed >= self.max_attempts {
            return None;
        }
        let doubling = 2u32.saturating_pow((failed - 1).min(31));
        Some(self.initial.saturating_mul(doubling).min(self.max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backoff() -> Backoff {
        Backoff {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
        }
    }

    #[test]
    fn doubles_up_to_the_longest_delay_then_stops_at_the_last_attempt() {
        let b = backoff();
        let delays: Vec<_> = (1..=5).map(|n| b.after(n)).collect();
        assert_eq!(
            delays,
            vec![
                Some(Duration::from_secs(1)),
                Some(Duration::from_secs(2)),
                Some(Duration::from_secs(4)),
                Some(Duration::from_secs(5)),
                None
            ]
        );
    }

    #[test]
    fn one_attempt_means_no_retry() {
        let b = Backoff {
            max_attempts: 1,
            ..backoff()
        };
        assert_eq!(b.after(1), None);
    }

    #[test]
    fn from_the_tierqueue_defaults() {
        let b = Backoff::from_policy(&RetryPolicy::default());
        assert_eq!(b.max_attempts, 3);
        assert_eq!(b.after(1), Some(Duration::from_secs(1)));
        assert_eq!(b.after(2), Some(Duration::from_secs(2)));
        assert_eq!(b.after(3), None);
    }
}
