//! Exact sliding windows: never more than `limit` requests, or tokens, in any window.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// A sliding-window log of requests, exact from the provider's point of view.
///
/// The provider counts a request when it arrives, which is some time between our dispatch and
/// its answer. So a request holds a slot from dispatch until it is answered ([`complete`]) and
/// then for one more `window`: wherever the arrival fell, no window of the provider's, of
/// that length, can hold more than `limit` requests, however slow the network. The price is
/// the latency of each request, a percent or two of a 60 s window.
///
/// Answers are logged by the millisecond, rounded up (a slot is held at most 1 ms longer than
/// needed, which errs on the safe side), with a count per millisecond: memory and the cost of
/// each call stay bounded by the window's milliseconds, whatever the rate and the limit.
///
/// [`complete`]: RequestWindow::complete
#[derive(Debug, Clone)]
pub struct RequestWindow {
    window: Duration,
    limit: u32,
    in_flight: u32,
    /// Origin of the millisecond stamps, one window before creation so that phantoms
    /// ([`RequestWindow::exhaust_until`]) stamped up to a window back are representable.
    epoch: Instant,
    /// (stamp, answers at that stamp), oldest first.
    log: VecDeque<(Instant, u32)>,
    /// Answers in `log`.
    logged: u32,
    /// The provider said the budget is spent until then ([`RequestWindow::exhaust_until`]).
    blocked_until: Option<Instant>,
}

impl RequestWindow {
    /// A window admitting `limit` requests per `window`.
    pub fn new(limit: u32, window: Duration) -> Self {
        let now = Instant::now();
        Self {
            window,
            limit,
            in_flight: 0,
            epoch: now.checked_sub(window).unwrap_or(now),
            log: VecDeque::new(),
            logged: 0,
            blocked_until: None,
        }
    }

    /// Changes the limit; the requests already made keep counting.
    pub fn set_limit(&mut self, limit: u32, window: Duration) {
        self.limit = limit;
        self.window = window;
    }

    /// The limit per window.
    pub fn limit(&self) -> u32 {
        self.limit
    }

    /// The window length.
    pub fn window(&self) -> Duration {
        self.window
    }

    /// `at` rounded up to the next whole millisecond since the epoch.
    fn stamp(&self, at: Instant) -> Instant {
        let since = at.saturating_duration_since(self.epoch);
        let ms = since.as_nanos().div_ceil(1_000_000);
        self.epoch + Duration::from_millis(u64::try_from(ms).unwrap_or(u64::MAX))
    }

    fn push(&mut self, at: Instant, count: u32) {
        let stamp = self.stamp(at);
        self.logged = self.logged.saturating_add(count);
        match self.log.back_mut() {
            Some((last, n)) if *last == stamp => *n = n.saturating_add(count),
            _ => self.log.push_back((stamp, count)),
        }
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(front, n)) = self.log.front() {
            if front + self.window <= now {
                self.log.pop_front();
                self.logged = self.logged.saturating_sub(n);
            } else {
                break;
            }
        }
    }

    /// Requests in flight or answered within the window ending at `now` (the whole limit
    /// while the provider says the budget is spent).
    pub fn used(&mut self, now: Instant) -> u32 {
        self.evict(now);
        let used = self.logged.saturating_add(self.in_flight);
        match self.blocked_until {
            Some(until) if until > now => used.max(self.limit),
            _ => used,
        }
    }

    /// Requests in flight or answered within the window ending at `now`, as counted here
    /// (the provider's word that the budget is spent left aside).
    pub fn counted(&mut self, now: Instant) -> u32 {
        self.evict(now);
        self.logged.saturating_add(self.in_flight)
    }

    /// When a request could next be admitted: `now` if there is room. When only answers to
    /// requests in flight can make room, one window from now: a request answered at `t`
    /// frees its slot at `t + window`, so no room comes earlier (and the exact instant is
    /// known at the answer, which pulses the key's signal).
    pub fn next_free(&mut self, now: Instant) -> Instant {
        self.next_free_within(now, self.limit)
    }

    /// [`RequestWindow::next_free`] under `limit` instead of the window's own limit (a
    /// replica's local share of a shared budget).
    pub fn next_free_within(&mut self, now: Instant, limit: u32) -> Instant {
        let blocked = self.blocked_until.filter(|&until| until > now);
        let free = self.free_by_log(now, limit);
        blocked.map_or(free, |until| until.max(free))
    }

    fn free_by_log(&mut self, now: Instant, limit: u32) -> Instant {
        self.evict(now);
        let used = self.logged.saturating_add(self.in_flight);
        if used < limit {
            return now;
        }
        // How many answered requests must leave the window before one more fits.
        let mut leave = used + 1 - limit;
        for &(stamp, n) in &self.log {
            if n >= leave {
                return stamp + self.window;
            }
            leave -= n;
        }
        now + self.window
    }

    /// Admits a request at `now` (it is in flight until [`RequestWindow::complete`]), or says
    /// when one could be admitted.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Instant> {
        let free = self.next_free(now);
        if free > now {
            return Err(free);
        }
        self.admit();
        Ok(())
    }

    /// Records a request admitted elsewhere (by the shared budget), without a check: it is in
    /// flight until [`RequestWindow::complete`].
    pub fn admit(&mut self) {
        self.in_flight += 1;
    }

    /// A request admitted earlier was never sent: it leaves without counting.
    pub fn cancel(&mut self) {
        self.in_flight = self.in_flight.saturating_sub(1);
    }

    /// A request answered (by [`RequestWindow::complete`]) at `at` is given back: it no
    /// longer counts. Nothing happens if it has left the window already.
    pub fn refund(&mut self, at: Instant) {
        let stamp = self.stamp(at);
        if let Some(i) = self.log.iter().rposition(|&(s, _)| s == stamp) {
            let n = &mut self.log[i].1;
            *n -= 1;
            self.logged = self.logged.saturating_sub(1);
            if *n == 0 {
                self.log.remove(i);
            }
        }
    }

    /// A request admitted earlier was answered (or failed) at `now`: from now on it counts
    /// for one window.
    pub fn complete(&mut self, now: Instant) {
        self.in_flight = self.in_flight.saturating_sub(1);
        self.evict(now);
        self.push(now, 1);
    }

    /// Marks the window full until `until` (the provider said the budget is spent): nothing
    /// is admitted before then, whatever the log holds, and a reset longer than a window is
    /// honoured whole.
    pub fn exhaust_until(&mut self, now: Instant, until: Instant) {
        if until <= now {
            return;
        }
        self.blocked_until = Some(self.blocked_until.map_or(until, |b| b.max(until)));
    }
}

/// A sliding window of token reservations. A request reserves its estimated tokens before
/// dispatch and settles the real count afterwards; the window never holds more than `limit`.
#[derive(Debug, Clone)]
pub struct TokenWindow {
    window: Duration,
    limit: u64,
    entries: VecDeque<(Instant, u64, u64)>,
    sum: u64,
    next_id: u64,
}

impl TokenWindow {
    /// A window admitting `limit` tokens per `window`.
    pub fn new(limit: u64, window: Duration) -> Self {
        Self {
            window,
            limit,
            entries: VecDeque::new(),
            sum: 0,
            next_id: 0,
        }
    }

    /// Changes the limit; reservations already made keep counting.
    pub fn set_limit(&mut self, limit: u64, window: Duration) {
        self.limit = limit;
        self.window = window;
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(t, _, tokens)) = self.entries.front() {
            if t + self.window <= now {
                self.sum -= tokens;
                self.entries.pop_front();
            } else {
                break;
            }
        }
    }

    /// Tokens reserved or used in the window ending at `now`.
    pub fn used(&mut self, now: Instant) -> u64 {
        self.evict(now);
        self.sum
    }

    /// When `tokens` could next be reserved: `now` if they fit. A request larger than the
    /// whole limit is admitted into an empty window, since it could never fit otherwise.
    pub fn next_free(&mut self, now: Instant, tokens: u64) -> Instant {
        self.next_free_within(now, tokens, self.limit)
    }

    /// [`TokenWindow::next_free`] under `limit` instead of the window's own limit.
    pub fn next_free_within(&mut self, now: Instant, tokens: u64, limit: u64) -> Instant {
        self.evict(now);
        let need = tokens.min(limit);
        if self.sum + need <= limit {
            return now;
        }
        let mut freed = 0;
        for &(t, _, reserved) in &self.entries {
            freed += reserved;
            if self.sum - freed + need <= limit {
                return t + self.window;
            }
        }
        now + self.window
    }

    /// Reserves `tokens` at `now`, returning a reservation id, or says when they would fit.
    pub fn try_reserve(&mut self, now: Instant, tokens: u64) -> Result<u64, Instant> {
        let free = self.next_free(now, tokens);
        if free > now {
            return Err(free);
        }
        Ok(self.reserve(now, tokens))
    }

    /// Records a reservation of `tokens` at `now` without a check (admitted by the shared
    /// budget), returning its id.
    pub fn reserve(&mut self, now: Instant, tokens: u64) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.entries.push_back((now, id, tokens));
        self.sum += tokens;
        id
    }

    /// Replaces a reservation's estimate with the real count (if it is still in the window).
    /// Constant time: ids are handed out in order and entries leave only from the front, so a
    /// reservation's place is its id less the oldest entry's.
    pub fn settle(&mut self, id: u64, actual: u64) {
        let Some(&(_, first, _)) = self.entries.front() else {
            return;
        };
        let Some(at) = id.checked_sub(first).and_then(|i| usize::try_from(i).ok()) else {
            return;
        };
        if let Some(entry) = self.entries.get_mut(at)
            && entry.1 == id
        {
            self.sum = self.sum - entry.2 + actual;
            entry.2 = actual;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn never_more_than_the_limit_in_any_window() {
        let mut w = RequestWindow::new(3, MIN);
        let start = Instant::now();
        let mut admitted = Vec::new();
        // Try every 7 s for 10 minutes.
        for i in 0..86 {
            let now = start + Duration::from_secs(7 * i);
            if w.try_acquire(now).is_ok() {
                // Answered 2 s later: the provider saw it somewhere in between.
                w.complete(now + Duration::from_secs(2));
                admitted.push(now);
            }
        }
        for (i, &t) in admitted.iter().enumerate() {
            let in_window = admitted[i..].iter().take_while(|&&u| u < t + MIN).count();
            assert!(
                in_window <= 3,
                "{in_window} requests in the minute from {t:?}"
            );
        }
        // And it is not overly strict: 3 per minute over 10 minutes is about 30.
        assert!(admitted.len() >= 29, "{}", admitted.len());
    }

    #[tokio::test(start_paused = true)]
    async fn next_free_is_when_the_oldest_leaves() {
        let mut w = RequestWindow::new(2, MIN);
        let t0 = Instant::now();
        w.try_acquire(t0).unwrap();
        w.complete(t0 + Duration::from_secs(1));
        w.try_acquire(t0 + Duration::from_secs(10)).unwrap();
        let at = t0 + Duration::from_secs(20);
        // One answered (holds its slot until 1 s + 60 s), one still in flight.
        assert_eq!(w.try_acquire(at), Err(t0 + Duration::from_secs(1) + MIN));
        assert!(w.try_acquire(t0 + Duration::from_secs(1) + MIN).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_hold_their_slot_until_answered() {
        let mut w = RequestWindow::new(1, MIN);
        let t0 = Instant::now();
        w.try_acquire(t0).unwrap();
        // Two minutes later the first request is still unanswered: the provider may not have
        // counted it yet, so there is no room.
        let later = t0 + 2 * MIN;
        assert_eq!(w.try_acquire(later), Err(later + MIN));
        w.complete(later);
        assert_eq!(w.try_acquire(later), Err(later + MIN));
    }

    #[tokio::test(start_paused = true)]
    async fn a_lower_limit_counts_past_requests() {
        let mut w = RequestWindow::new(5, MIN);
        let t0 = Instant::now();
        for _ in 0..3 {
            w.try_acquire(t0).unwrap();
            w.complete(t0);
        }
        w.set_limit(2, MIN);
        assert!(w.try_acquire(t0 + Duration::from_secs(1)).is_err());
        assert_eq!(w.next_free(t0 + Duration::from_secs(1)), t0 + MIN);
    }

    #[tokio::test(start_paused = true)]
    async fn exhaust_blocks_until_the_reset() {
        let mut w = RequestWindow::new(10, MIN);
        let t0 = Instant::now();
        w.exhaust_until(t0, t0 + Duration::from_secs(5));
        assert_eq!(w.try_acquire(t0), Err(t0 + Duration::from_secs(5)));
        assert!(w.try_acquire(t0 + Duration::from_secs(5)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_reset_longer_than_a_window_never_lets_more_in() {
        let mut w = RequestWindow::new(10, MIN);
        let t0 = Instant::now();
        for _ in 0..5 {
            w.try_acquire(t0).unwrap();
        }
        w.exhaust_until(t0, t0 + Duration::from_secs(130));
        for _ in 0..5 {
            w.complete(t0 + Duration::from_secs(1));
        }
        w.set_limit(2, MIN);
        for s in [2, 62, 129] {
            let at = t0 + Duration::from_secs(s);
            assert!(w.try_acquire(at).is_err(), "admitted at {s} s");
        }
        assert!(w.try_acquire(t0 + Duration::from_secs(130)).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn the_log_is_bounded_by_the_windows_milliseconds_not_the_rate() {
        let mut w = RequestWindow::new(1_000_000, Duration::from_secs(1));
        let t0 = Instant::now();
        for i in 0..50_000u64 {
            // 500 answers per millisecond for 100 ms.
            let at = t0 + Duration::from_micros(i * 2);
            w.try_acquire(at).unwrap();
            w.complete(at);
        }
        assert_eq!(w.used(t0 + Duration::from_millis(100)), 50_000);
        assert!(w.log.len() <= 101, "{} entries", w.log.len());
        // Rounded up: the last answers leave at most 1 ms late, never early.
        let last = t0 + Duration::from_micros(99_998);
        assert!(w.used(last + Duration::from_secs(1)) > 0);
        assert_eq!(
            w.used(last + Duration::from_secs(1) + Duration::from_millis(1)),
            0
        );
    }

    #[tokio::test(start_paused = true)]
    async fn settling_finds_its_reservation_after_older_ones_left() {
        let mut w = TokenWindow::new(10_000, MIN);
        let t0 = Instant::now();
        let old = w.try_reserve(t0, 100).unwrap();
        let a = w.try_reserve(t0 + Duration::from_secs(30), 100).unwrap();
        let b = w.try_reserve(t0 + Duration::from_secs(30), 100).unwrap();
        assert_eq!(w.used(t0 + MIN), 200, "the oldest left");
        w.settle(b, 7);
        w.settle(old, 1);
        assert_eq!(w.used(t0 + MIN), 107, "a reservation gone changes nothing");
        w.settle(a, 3);
        assert_eq!(w.used(t0 + MIN), 10);
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_reserve_and_settle() {
        let mut w = TokenWindow::new(1000, MIN);
        let t0 = Instant::now();
        let a = w.try_reserve(t0, 600).unwrap();
        assert!(w.try_reserve(t0, 600).is_err(), "1200 > 1000");
        w.settle(a, 100);
        assert_eq!(w.used(t0), 100);
        let b = w.try_reserve(t0, 600).unwrap();
        w.settle(b, 900);
        assert_eq!(w.used(t0), 1000);
        assert_eq!(w.next_free(t0, 1), t0 + MIN);
        assert_eq!(w.used(t0 + MIN), 0);
        // Larger than the whole limit: admitted into an empty window only.
        assert!(w.try_reserve(t0 + MIN, 5000).is_ok());
    }
}
