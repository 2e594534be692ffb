//! Pacing of a key's admissions under contention.
//!
//! An exact sliding window alone, under sustained overload, hands out its slots in the
//! pattern they were taken one window earlier: a window filled in a burst frees up in a burst
//! and then frees nothing for the rest of the window, so waiting requests see long stretches
//! of no capacity, again every window. Requests that had to wait for budget are therefore
//! paced: a key admits them at most at its sustainable rate (one per `window / rpm`, a
//! generic cell rate algorithm with a tolerance), which turns the slots of the next windows
//! into a steady supply. Requests that find budget at once (nobody waiting) are not paced: an
//! idle gateway still serves a burst up to the key's limit at once.
//!
//! The window pays back any burst of paced admissions one window later, as a stretch with
//! nothing free (its slots come back in the pattern they were taken in), and that stretch
//! lets the pacer save up the credit for the same burst again: one burst in the first window
//! came back at the end of every window (in the tier bench, a second with nothing free at 59 s,
//! 119 s and 179 s). So the tolerance is kept to about one slot of the key's rate, and while
//! the key's window is full no credit is saved ([`Pacer::stalled`]).

//!
//! With budgets shared through Redis the pace is shared too: its theoretical arrival time is
//! kept per key in Redis and checked and advanced by the same admission script
//! (`shared/acquire.lua`), so that N replicas together pace a key at its rate, not N times it.
//! Each replica's [`Pacer`] then only remembers when Redis said the next paced admission may
//! come (and paces alone while Redis is unreachable).

use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

/// What holds a request back on a key beyond the key's limits, decided in the same
/// admission as the limits (in Redis with shared budgets).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Hold {
    /// Admit only while fewer than this many requests are in the key's window (a lower
    /// queue class leaves the rest to the classes above); `None`: up to the limit.
    pub cap: Option<u32>,
    /// The key's pace, for a request that waited; `None`: not paced (nothing is read).
    pub pace: Option<Pace>,
}

/// A paced admission's terms.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    /// One paced admission per this interval (the key's window over its request limit).
    pub interval: Duration,
    /// How far ahead of its pace the key admits.
    pub tolerance: Duration,
    /// Whether the pace may refuse the request (the classes below priority); otherwise the
    /// admission only counts on it.
    pub check: bool,
}

/// A key's pacer: the theoretical arrival time of its next paced admission.
#[derive(Debug, Default)]
pub struct Pacer {
    tat: Mutex<Option<Instant>>,
}

impl Pacer {
    /// When a paced admission may happen, at one per `interval` with `tolerance` of early
    /// admissions (a burst of about `tolerance / interval`): `Ok` if now.
    pub fn ready(&self, now: Instant, tolerance: Duration) -> Result<(), Instant> {
        match *self.tat.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tat) if tat > now + tolerance => Err(tat - tolerance),
            _ => Ok(()),
        }
    }

    /// The key's window is full (or cooling down) at `now` while paced requests wait for it:
    /// no credit beyond what `tolerance` allows at once is saved meanwhile, so when slots come
    /// back the paced requests take one per interval, not a burst.
    pub fn stalled(&self, now: Instant, tolerance: Duration) {
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let full = now + tolerance;
        *tat = Some(tat.map_or(full, |t| t.max(full)));
    }

    /// The shared pace said no paced admission before `at`: [`Pacer::ready`] with
    /// `tolerance` answers `at` until then.
    pub fn hold_until(&self, at: Instant, tolerance: Duration) {
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        let held = at + tolerance;
        *tat = Some(tat.map_or(held, |t| t.max(held)));
    }

    /// Records a paced admission at `now`.
    pub fn admitted(&self, now: Instant, interval: Duration) {
        let mut tat = self.tat.lock().unwrap_or_else(|p| p.into_inner());
        *tat = Some(tat.map_or(now, |t| t.max(now)) + interval);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn paced_admissions_keep_the_rate_after_a_burst_of_the_tolerance() {
        let p = Pacer::default();
        let t0 = Instant::now();
        let interval = Duration::from_millis(100);
        let tolerance = Duration::from_secs(1);
        // A second's worth (10) and one more go at once...
        for _ in 0..11 {
            assert_eq!(p.ready(t0, tolerance), Ok(()));
            p.admitted(t0, interval);
        }
        // ... then one per interval, exactly.
        assert_eq!(p.ready(t0, tolerance), Err(t0 + interval));
        let t1 = t0 + interval;
        assert_eq!(p.ready(t1 - Duration::from_nanos(1), tolerance), Err(t1));
        assert_eq!(p.ready(t1, tolerance), Ok(()));
        p.admitted(t1, interval);
        assert_eq!(p.ready(t1, tolerance), Err(t1 + interval));
        // Idle time builds no credit beyond the tolerance.
        let later = t1 + Duration::from_secs(60);
        for _ in 0..11 {
            assert_eq!(p.ready(later, tolerance), Ok(()));
            p.admitted(later, interval);
        }
        assert!(p.ready(later, tolerance).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stall_saves_no_credit() {
        let p = Pacer::default();
        let t0 = Instant::now();
        let interval = Duration::from_millis(100);
        let tolerance = Duration::from_secs(1);
        p.admitted(t0, interval);
        // The window stays full for two seconds: when it frees, one goes at once, then one
        // per interval (without the stall, eleven would go at once).
        let t1 = t0 + Duration::from_secs(2);
        p.stalled(t1, tolerance);
        assert_eq!(p.ready(t1, tolerance), Ok(()));
        p.admitted(t1, interval);
        assert_eq!(p.ready(t1, tolerance), Err(t1 + interval));
        // A stall never gives back credit already spent.
        p.stalled(t1, Duration::ZERO);
        assert_eq!(p.ready(t1, tolerance), Err(t1 + interval));
    }
}
