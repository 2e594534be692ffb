//! What the cache did over the last hour, for its CachePolicy's status: lookups answered by
//! each layer and missed, counted per minute (the operator reads every replica's figures
//! through Redis, [`crate::demand::Publisher`], and writes the hit ratios).

use super::Outcome;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// How far back the figures look.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// Minutes in [`WINDOW`].
const MINUTES: usize = 60;

/// Lookups by layer: exact, semantic, template, dedup, miss.
pub type Counts = [u64; 5];

fn slot_of(outcome: Outcome) -> Option<usize> {
    match outcome {
        Outcome::Exact => Some(0),
        Outcome::Semantic => Some(1),
        Outcome::Template => Some(2),
        Outcome::Dedup => Some(3),
        Outcome::Miss => Some(4),
        // Not a lookup (bypass), or not a cache layer's answer (stale: the degradation
        // chain's, counted by the route's figures).
        Outcome::Bypass | Outcome::Stale => None,
    }
}

/// Lookups per minute over the last hour.
#[derive(Debug)]
pub struct Window {
    origin: Instant,
    /// Per minute since `origin` modulo [`MINUTES`]: (the minute, its counts).
    minutes: Mutex<[(u64, Counts); MINUTES]>,
}

impl Default for Window {
    fn default() -> Self {
        Self {
            origin: Instant::now(),
            minutes: Mutex::new([(u64::MAX, [0; 5]); MINUTES]),
        }
    }
}

impl Window {
    fn minute(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / 60
    }

    /// Counts a request's `outcome` at `now`.
    pub fn record(&self, outcome: Outcome, now: Instant) {
        let Some(i) = slot_of(outcome) else { return };
        let minute = self.minute(now);
        let mut minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut minutes[(minute % MINUTES as u64) as usize];
        if slot.0 != minute {
            *slot = (minute, [0; 5]);
        }
        slot.1[i] += 1;
    }

    /// The counts of the last hour at `now`: this minute and the 59 before it.
    pub fn totals(&self, now: Instant) -> Counts {
        let minute = self.minute(now);
        let minutes = self.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let mut total = [0; 5];
        for (m, counts) in minutes.iter() {
            if *m <= minute && minute - *m < MINUTES as u64 {
                total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
            }
        }
        total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn lookups_count_for_the_hour_of_their_minute_exactly() {
        let w = Window::default();
        w.record(Outcome::Exact, Instant::now());
        w.record(Outcome::Semantic, Instant::now());
        w.record(Outcome::Bypass, Instant::now());
        w.record(Outcome::Stale, Instant::now());
        tokio::time::advance(Duration::from_secs(59)).await;
        w.record(Outcome::Miss, Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        // Minute 1.
        w.record(Outcome::Dedup, Instant::now());
        w.record(Outcome::Template, Instant::now());
        assert_eq!(w.totals(Instant::now()), [1, 1, 1, 1, 1]);
        // Minute 59 still counts minute 0; minute 60 does not.
        tokio::time::advance(Duration::from_secs(58 * 60 + 59)).await;
        assert_eq!(w.totals(Instant::now()), [1, 1, 1, 1, 1]);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(w.totals(Instant::now()), [0, 0, 1, 1, 0]);
        // Minute 60 reuses minute 0's place: the old counts are not added to the new.
        w.record(Outcome::Exact, Instant::now());
        assert_eq!(w.totals(Instant::now()), [1, 0, 1, 1, 0]);
        tokio::time::advance(WINDOW).await;
        assert_eq!(w.totals(Instant::now()), [0; 5]);
    }
}
