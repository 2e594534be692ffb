//! A replica's own record of the requests it admitted on a shared key: what it re-writes into
//! Redis when Redis lost them (a restart without persistence, a failover, a flush) or never
//! saw them (admitted on the local share while Redis was unreachable).
//!
//! The record holds every request of this replica that a provider window may still count:
//! those in flight, and those answered within the last window, each under the member name it
//! was admitted with (so re-writing is idempotent), and the token reservations of the last
//! window with their amounts. Memory is bounded by the replica's traffic of one window.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;
use tokio::time::Instant;

/// What a replica re-writes for one key: requests and token reservations, with their ages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Seeds {
    /// (member sequence, in flight?, age): the age is since the answer, or since the
    /// admission for a request still in flight.
    pub requests: Vec<(u64, bool, Duration)>,
    /// (member sequence, age since the reservation, tokens).
    pub tokens: Vec<(u64, Duration, u64)>,
}

/// A shared key's budget that keeps a [`Record`]: the backend asks it for its seeds.
pub(crate) trait Recorded: Send + Sync {
    /// The requests to re-write at `now`, for the limits the key has (requests only with a
    /// request limit, reservations only with a token limit).
    fn seeds(&self, now: Instant) -> Seeds;
    /// Of `members` (in flight when seeded), those answered since.
    fn answered_among(&self, members: &[u64]) -> Vec<u64>;
    /// A wait Redis named (a barrier's bound) may have ended early: ask Redis again.
    fn forget_wait(&self);
}

/// This replica's requests on one shared key that a provider may still count.
#[derive(Debug, Clone)]
pub(crate) struct Record {
    window: Duration,
    /// Member sequence -> admitted at.
    in_flight: HashMap<u64, Instant>,
    /// (answered at, member sequence), oldest first.
    answered: VecDeque<(Instant, u64)>,
    /// (reserved at, member sequence), oldest first.
    reserved: VecDeque<(Instant, u64)>,
    /// Member sequence -> tokens (the estimate, then the real count).
    amounts: HashMap<u64, u64>,
}

impl Record {
    /// An empty record for a key of `window`.
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            in_flight: HashMap::new(),
            answered: VecDeque::new(),
            reserved: VecDeque::new(),
            amounts: HashMap::new(),
        }
    }

    /// The window changed (a reload): entries leave after the new one.
    pub(crate) fn set_window(&mut self, window: Duration) {
        self.window = window;
    }

    /// `member` was admitted at `now`, reserving `tokens` (with a token limit).
    pub(crate) fn admit(&mut self, member: u64, now: Instant, tokens: Option<u64>) {
        self.evict(now);
        self.in_flight.insert(member, now);
        if let Some(tokens) = tokens {
            self.reserved.push_back((now, member));
            self.amounts.insert(member, tokens);
        }
    }

    /// `member` was answered at `now`: it counts for one more window.
    pub(crate) fn answered(&mut self, member: u64, now: Instant) {
        if self.in_flight.remove(&member).is_some() {
            self.answered.push_back((now, member));
        }
        self.evict(now);
    }

    /// `member` was never sent: it counts no longer (nor do its tokens).
    pub(crate) fn cancel(&mut self, member: u64) {
        self.in_flight.remove(&member);
        if let Some(amount) = self.amounts.get_mut(&member) {
            *amount = 0;
        }
    }

    /// `member` was given back after its answer: it counts no longer (nor do its tokens).
    pub(crate) fn refund(&mut self, member: u64) {
        self.cancel(member);
        if let Some(i) = self.answered.iter().position(|&(_, m)| m == member) {
            self.answered.remove(i);
        }
    }

    /// `member` used `tokens` in the end.
    pub(crate) fn settle(&mut self, member: u64, tokens: u64) {
        if let Some(amount) = self.amounts.get_mut(&member) {
            *amount = tokens;
        }
    }

    /// Whether `member` is still in flight.
    pub(crate) fn in_flight(&self, member: u64) -> bool {
        self.in_flight.contains_key(&member)
    }

    fn evict(&mut self, now: Instant) {
        while let Some(&(at, _)) = self.answered.front() {
            if at + self.window > now {
                break;
            }
            self.answered.pop_front();
        }
        while let Some(&(at, member)) = self.reserved.front() {
            if at + self.window > now {
                break;
            }
            self.reserved.pop_front();
            self.amounts.remove(&member);
        }
    }

    /// What to re-write at `now`: requests with a request limit, reservations with a token
    /// limit.
    pub(crate) fn seeds(&mut self, now: Instant, requests: bool, tokens: bool) -> Seeds {
        self.evict(now);
        let mut seeds = Seeds::default();
        if requests {
            seeds.requests.extend(
                self.in_flight
                    .iter()
                    .map(|(&m, &at)| (m, true, now.saturating_duration_since(at))),
            );
            seeds.requests.extend(
                self.answered
                    .iter()
                    .map(|&(at, m)| (m, false, now.saturating_duration_since(at))),
            );
        }
        if tokens {
            seeds.tokens.extend(self.reserved.iter().map(|&(at, m)| {
                let amount = self.amounts.get(&m).copied().unwrap_or(0);
                (m, now.saturating_duration_since(at), amount)
            }));
        }
        seeds
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_secs(60);

    #[tokio::test(start_paused = true)]
    async fn answered_requests_are_kept_exactly_one_window() {
        let mut r = Record::new(W);
        let t0 = Instant::now();
        r.admit(1, t0, None);
        r.answered(1, t0 + Duration::from_secs(2));
        let before = t0 + Duration::from_secs(2) + W - Duration::from_millis(1);
        assert_eq!(
            r.seeds(before, true, false).requests,
            vec![(1, false, W - Duration::from_millis(1))]
        );
        assert_eq!(
            r.seeds(t0 + Duration::from_secs(2) + W, true, true),
            Seeds::default(),
            "gone one window after its answer"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn requests_in_flight_are_kept_until_answered() {
        let mut r = Record::new(W);
        let t0 = Instant::now();
        r.admit(7, t0, Some(500));
        let later = t0 + 3 * W;
        // Still in flight three windows on: the provider may not have counted it yet.
        assert_eq!(r.seeds(later, true, true).requests, vec![(7, true, 3 * W)]);
        // Its reservation, made three windows ago, has left the token window.
        assert!(r.seeds(later, true, true).tokens.is_empty());
        assert!(r.in_flight(7));
        r.answered(7, later);
        assert!(!r.in_flight(7));
        assert_eq!(
            r.seeds(later, true, true).requests,
            vec![(7, false, Duration::ZERO)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn reservations_carry_their_settled_amount_and_leave_after_a_window() {
        let mut r = Record::new(W);
        let t0 = Instant::now();
        r.admit(1, t0, Some(800));
        r.admit(2, t0 + Duration::from_secs(10), Some(800));
        r.settle(1, 120);
        r.cancel(2);
        let at = t0 + Duration::from_secs(30);
        let seeds = r.seeds(at, false, true);
        assert!(seeds.requests.is_empty(), "no request limit: no requests");
        assert_eq!(
            seeds.tokens,
            vec![
                (1, Duration::from_secs(30), 120),
                (2, Duration::from_secs(20), 0)
            ]
        );
        let seeds = r.seeds(t0 + W, false, true);
        assert_eq!(seeds.tokens, vec![(2, Duration::from_secs(50), 0)]);
    }
}
