//! Customer tiers as the wait queues see them: each tier's queue class, weight, wait limit and
//! target, depth bound, class headroom and batching, resolved from the TierQueue once per
//! configuration. Without a TierQueue every request is tier `default`: class standard, no
//! headroom, the `--max-wait` limit, as before tiers existed.
//!
//! A tier's running state (how many of its requests wait, its metric handles) lives in
//! [`TierState`], kept across configuration swaps by tier name and class so that a reload
//! neither forgets who waits nor resets the depth bound (a tier moved to another class gets a
//! fresh state, whose metrics carry its new class).

use crate::config::Config;
use floodgate_crds::QueueClass;
use floodgate_crds::redis_keys::{SLO_SLOT_SECONDS, SLO_WINDOW_SECONDS, WAIT_BUCKETS_MS};
use floodgate_crds::tier::ClassHeadroom;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The tier of callers when no TierQueue is configured.
pub const DEFAULT_TIER: &str = "default";

/// One tier, resolved.
#[derive(Debug)]
pub struct TierRt {
    /// Position in the plan (indexes per-tier handles such as a route's `ok` counters).
    pub index: usize,
    /// Tier name.
    pub name: Arc<str>,
    /// Queue class.
    pub class: QueueClass,
    /// Weight in the weighted fair queueing between tiers.
    pub weight: u32,
    /// Longest a request of this tier waits for budget.
    pub max_wait: Duration,
    /// The wait this tier is promised (its SLO).
    pub target: Duration,
    /// Most requests of this tier that may wait at once, over every route.
    pub max_depth: usize,
    /// Share of a key's request window that must be free for this tier to take from it.
    pub headroom: f64,
    /// The headroom once a request has waited half its limit: half the smaller of its own
    /// and the smallest headroom any class has, so that past half their waits the lower
    /// classes share what they may take by weight (none starves) and still leave a reserve
    /// to the classes above ([`TierPlan::build`]).
    pub relaxed_headroom: f64,
    /// Batching, for a batch-class tier.
    pub batch: Option<BatchRt>,
    /// Running state, kept across configuration swaps.
    pub state: Arc<TierState>,
}

/// Batching of a batch-class tier.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchRt {
    /// Requests released together.
    pub size: usize,
    /// Longest the oldest request of a batch waits for the batch to fill.
    pub interval: Duration,
    /// Released requests wait while the route's keys are more used than this share.
    pub off_peak: f64,
}

/// A tier's running state.
#[derive(Debug)]
pub struct TierState {
    depth: AtomicUsize,
    /// When each waiting request joined, by place: the oldest wait, for the TierQueue's status.
    joined: Mutex<BTreeMap<u64, Instant>>,
    next_place: AtomicU64,
    /// Outcomes of the last [`SLO_WINDOW_SECONDS`], for the TierQueue's status.
    recent: Mutex<SloWindow>,
    /// Metric handles of this tier.
    pub metrics: TierMetrics,
}

/// Number of slots of a [`SloWindow`].
const SLO_SLOTS: usize = (SLO_WINDOW_SECONDS / SLO_SLOT_SECONDS) as usize;

/// Number of buckets of the wait histogram: one per bound, then the longer waits.
const WAIT_BUCKETS: usize = WAIT_BUCKETS_MS.len() + 1;

/// A tier's outcomes over the last [`SLO_WINDOW_SECONDS`], in slots of [`SLO_SLOT_SECONDS`]
/// (a slot is reused, emptied, when its time comes round again).
#[derive(Debug)]
struct SloWindow {
    /// The instant slot numbers count from.
    origin: Instant,
    slots: [SloSlot; SLO_SLOTS],
}

/// One slot of a [`SloWindow`].
#[derive(Debug, Clone, Copy, Default)]
struct SloSlot {
    /// The slot's number since `origin`; what it holds is of that slot only.
    number: u64,
    within: u64,
    missed: u64,
    waits: [u64; WAIT_BUCKETS],
}

/// A tier's outcomes over the last [`SLO_WINDOW_SECONDS`] on this replica.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SloFigures {
    /// Requests admitted within the wait target.
    pub within: u64,
    /// Requests admitted later, or refused for time or room.
    pub missed: u64,
    /// Admitted requests' waits per bucket of [`WAIT_BUCKETS_MS`], then longer ones.
    pub waits: [u64; WAIT_BUCKETS],
}

impl SloWindow {
    fn new(origin: Instant) -> Self {
        Self {
            origin,
            slots: [SloSlot::default(); SLO_SLOTS],
        }
    }

    fn number(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs() / SLO_SLOT_SECONDS
    }

    /// The slot of `now`, emptied first if it still holds an older slot's counts.
    fn slot(&mut self, now: Instant) -> &mut SloSlot {
        let number = self.number(now);
        let slot = &mut self.slots[(number % SLO_SLOTS as u64) as usize];
        if slot.number != number {
            *slot = SloSlot {
                number,
                ..SloSlot::default()
            };
        }
        slot
    }

    /// Counts a request admitted after waiting `waited`, within the target or not.
    fn admitted(&mut self, now: Instant, waited: Duration, within: bool) {
        let ms = u64::try_from(waited.as_millis()).unwrap_or(u64::MAX);
        let bucket = WAIT_BUCKETS_MS
            .iter()
            .position(|bound| ms <= *bound)
            .unwrap_or(WAIT_BUCKETS_MS.len());
        let slot = self.slot(now);
        if within {
            slot.within += 1;
        } else {
            slot.missed += 1;
        }
        slot.waits[bucket] += 1;
    }

    /// Counts a request refused for time or room.
    fn refused(&mut self, now: Instant) {
        self.slot(now).missed += 1;
    }

    /// The sum of the slots of the window that ends at `now`.
    fn figures(&self, now: Instant) -> SloFigures {
        let current = self.number(now);
        let mut figures = SloFigures::default();
        for slot in &self.slots {
            // A slot counts while it is one of the last `SLO_SLOTS` (the current included).
            if slot.number + (SLO_SLOTS as u64) <= current || slot.number > current {
                continue;
            }
            figures.within += slot.within;
            figures.missed += slot.missed;
            for (sum, n) in figures.waits.iter_mut().zip(slot.waits) {
                *sum += n;
            }
        }
        figures
    }
}

impl TierState {
    /// A fresh state for tier `name` of `class`.
    pub fn new(name: &str, class: QueueClass) -> Self {
        Self {
            depth: AtomicUsize::new(0),
            joined: Mutex::default(),
            next_place: AtomicU64::new(0),
            recent: Mutex::new(SloWindow::new(Instant::now())),
            metrics: TierMetrics::new(name, class),
        }
    }

    /// Counts a request refused for `reason` (`wait_limit`, `queue_full`, `unavailable`) in
    /// the metrics and, unless the refusal is for want of a provider, against the tier's
    /// wait target.
    pub fn refused(&self, reason: &'static str) {
        self.metrics.refused(reason);
        if reason != "unavailable" {
            self.recent
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .refused(Instant::now());
        }
    }

    /// This tier's outcomes over the window that ends at `now`.
    pub fn recent(&self, now: Instant) -> SloFigures {
        self.recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .figures(now)
    }

    /// How long the request of this tier that has waited longest has waited at `now`.
    pub fn oldest_wait(&self, now: Instant) -> Option<Duration> {
        let joined = self.joined.lock().unwrap_or_else(|p| p.into_inner());
        joined
            .values()
            .min()
            .map(|at| now.saturating_duration_since(*at))
    }

    /// Requests of this tier waiting now, over every route.
    pub fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// Takes a place for one more waiting request, joining at `now`, unless `max` already
    /// wait; the place is given back with [`TierState::leave`].
    pub(crate) fn enter(&self, max: usize, now: Instant) -> Option<u64> {
        let entered = self
            .depth
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |d| {
                (d < max).then_some(d + 1)
            })
            .is_ok();
        if !entered {
            return None;
        }
        self.metrics.waiting.inc();
        let place = self.next_place.fetch_add(1, Ordering::Relaxed);
        self.joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(place, now);
        Some(place)
    }

    /// Gives `place` back.
    pub(crate) fn leave(&self, place: u64) {
        self.joined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&place);
        self.depth.fetch_sub(1, Ordering::AcqRel);
        self.metrics.waiting.dec();
    }
}

/// The metric handles of one tier, resolved once.
#[derive(Debug)]
pub struct TierMetrics {
    /// `floodgate_queue_depth{tier, class}`.
    pub waiting: Gauge,
    /// `floodgate_queue_wait_seconds{tier, class}`: every admitted request's wait, 0 on the
    /// fast path.
    pub wait: Histogram,
    /// `floodgate_queue_slo_total{tier, within="true"}`.
    pub within_target: Counter,
    /// `floodgate_queue_slo_total{tier, within="false"}`.
    pub missed_target: Counter,
    class: &'static str,
    name: String,
}

impl TierMetrics {
    fn new(name: &str, class: QueueClass) -> Self {
        let m = crate::metrics::global();
        let labels = crate::metrics::TierLabels {
            tier: name.to_owned(),
            class: class.as_str(),
        };
        let slo = |within| {
            m.queue_slo
                .get_or_create(&crate::metrics::SloLabels {
                    tier: name.to_owned(),
                    within,
                })
                .clone()
        };
        Self {
            waiting: m.queue_depth.get_or_create(&labels).clone(),
            wait: m.queue_wait.get_or_create(&labels).clone(),
            within_target: slo("true"),
            missed_target: slo("false"),
            class: class.as_str(),
            name: name.to_owned(),
        }
    }

    /// Counts a request refused for `reason` (`wait_limit`, `queue_full`, ...); a refusal
    /// for time or room also misses the tier's wait target.
    pub fn refused(&self, reason: &'static str) {
        if reason != "unavailable" {
            self.missed_target.inc();
        }
        crate::metrics::global()
            .queue_refusals
            .get_or_create(&crate::metrics::RefusalLabels {
                tier: self.name.clone(),
                class: self.class,
                reason,
            })
            .inc();
    }
}

impl TierRt {
    /// Records an admitted request that waited `waited` (zero on the fast path).
    pub fn admitted(&self, waited: Duration) {
        let m = &self.state.metrics;
        m.wait.observe(waited.as_secs_f64());
        let within = waited <= self.target;
        if within {
            m.within_target.inc();
        } else {
            m.missed_target.inc();
        }
        self.state
            .recent
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admitted(Instant::now(), waited, within);
    }
}

/// Tier states by name and class, kept across configuration swaps.
pub type TierStates = Mutex<HashMap<(String, QueueClass), Arc<TierState>>>;

/// The tiers of one configuration.
#[derive(Debug)]
pub struct TierPlan {
    tiers: Vec<Arc<TierRt>>,
    fallback: usize,
    /// The TierQueue they come from (`namespace`, `name`); none for the `default` tier.
    source: Option<(String, String)>,
}

impl TierPlan {
    /// The tiers of `config`'s TierQueue, or the one `default` tier waiting `max_wait`.
    pub fn build(config: &Config, max_wait: Duration, states: &TierStates) -> Self {
        let mut states = states.lock().unwrap_or_else(|p| p.into_inner());
        let mut state = |name: &str, class| {
            states
                .entry((name.to_owned(), class))
                .or_insert_with(|| Arc::new(TierState::new(name, class)))
                .clone()
        };
        let Some(tq) = config
            .tier_queue
            .as_ref()
            .filter(|tq| !tq.spec.tiers.is_empty())
        else {
            let tier = TierRt {
                index: 0,
                name: Arc::from(DEFAULT_TIER),
                class: QueueClass::Standard,
                weight: 1,
                max_wait,
                target: max_wait,
                max_depth: usize::MAX,
                headroom: 0.0,
                relaxed_headroom: 0.0,
                batch: None,
                state: state(DEFAULT_TIER, QueueClass::Standard),
            };
            return Self {
                tiers: vec![Arc::new(tier)],
                fallback: 0,
                source: None,
            };
        };
        let spec = &tq.spec;
        let headroom = |c: QueueClass, h: &ClassHeadroom| f64::from(h.of(c).min(99)) / 100.0;
        // The smallest reserve any class keeps: past half its wait a class keeps half of it
        // (or half its own, if smaller).
        let smallest = [
            QueueClass::Priority,
            QueueClass::Standard,
            QueueClass::Batch,
        ]
        .into_iter()
        .map(|c| headroom(c, &spec.class_headroom))
        .filter(|h| *h > 0.0)
        .fold(1.0, f64::min);
        let tiers: Vec<Arc<TierRt>> = spec
            .tiers
            .iter()
            .enumerate()
            .map(|(index, t)| {
                let max_wait = Duration::from_millis(t.max_wait_ms.max(1));
                Arc::new(TierRt {
                    index,
                    name: Arc::from(t.name.as_str()),
                    class: t.class,
                    weight: t.weight.max(1),
                    max_wait,
                    target: t
                        .wait_target_ms
                        .map_or(max_wait, Duration::from_millis)
                        .min(max_wait),
                    max_depth: t.max_queue_depth.max(1) as usize,
                    headroom: headroom(t.class, &spec.class_headroom),
                    relaxed_headroom: headroom(t.class, &spec.class_headroom).min(smallest) / 2.0,
                    batch: t.batch.as_ref().map(|b| BatchRt {
                        size: b.size.max(1) as usize,
                        interval: Duration::from_secs(u64::from(b.interval_seconds.max(1))),
                        off_peak: f64::from(b.off_peak_utilization_percent.clamp(1, 100)) / 100.0,
                    }),
                    state: state(&t.name, t.class),
                })
            })
            .collect();
        // Callers without a tier: the TierQueue's defaultTier, else a tier named `default`,
        // else the last one listed (lists usually go from best to cheapest).
        let fallback = spec
            .default_tier
            .as_deref()
            .or(Some(DEFAULT_TIER))
            .and_then(|d| tiers.iter().position(|t| &*t.name == d))
            .unwrap_or(tiers.len().saturating_sub(1));
        let source = Some((
            tq.metadata.namespace.clone().unwrap_or_default(),
            tq.metadata.name.clone().unwrap_or_default(),
        ));
        Self {
            tiers,
            fallback,
            source,
        }
    }

    /// Each tier's queue on this replica at `now`, for the TierQueue's status (published by
    /// [`crate::demand::Publisher`]); `None` without a TierQueue.
    pub fn queue_figures(&self, now: Instant) -> Option<crate::demand::QueueFigures> {
        let (namespace, name) = self.source.clone()?;
        let tiers = self
            .tiers
            .iter()
            .map(|t| crate::demand::TierFigures {
                recent: t.state.recent(now),
                name: t.name.to_string(),
                waiting: u64::try_from(t.state.depth()).unwrap_or(u64::MAX),
                oldest_wait_ms: t
                    .state
                    .oldest_wait(now)
                    .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        Some(crate::demand::QueueFigures {
            namespace,
            name,
            tiers,
        })
    }

    /// The tier named `name`, or the tier of callers without one (also for a name the
    /// TierQueue does not list).
    pub fn get(&self, name: Option<&str>) -> &Arc<TierRt> {
        let found = name.and_then(|n| self.tiers.iter().find(|t| &*t.name == n));
        found.unwrap_or(&self.tiers[self.fallback])
    }

    /// Every tier, in the order of the TierQueue.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<TierRt>> {
        self.tiers.iter()
    }

    /// Number of tiers (at least 1).
    pub fn len(&self) -> usize {
        self.tiers.len()
    }

    /// Never empty: there is always at least the `default` tier.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The longest any tier waits.
    pub fn longest_wait(&self) -> Duration {
        self.tiers
            .iter()
            .map(|t| t.max_wait)
            .max()
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SLOT: Duration = Duration::from_secs(SLO_SLOT_SECONDS);

    #[tokio::test(start_paused = true)]
    async fn the_window_counts_within_missed_and_waits_by_bucket() {
        let state = TierState::new("pro", QueueClass::Priority);
        let mut w = state.recent.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        w.admitted(now, Duration::ZERO, true);
        w.admitted(now, Duration::from_millis(10), true);
        w.admitted(now, Duration::from_millis(11), true);
        w.admitted(now, Duration::from_millis(2_500), false);
        w.admitted(now, Duration::from_secs(400), false);
        w.refused(now);
        let f = w.figures(now);
        assert_eq!((f.within, f.missed), (3, 3));
        // 0 and 10 ms in the first bucket (bounds are inclusive), 11 ms in the second,
        // 2.5 s in the 5 s bucket, 400 s past the last bound; a refusal has no wait.
        let mut waits = [0; WAIT_BUCKETS];
        waits[0] = 2;
        waits[1] = 1;
        waits[7] = 1;
        waits[WAIT_BUCKETS - 1] = 1;
        assert_eq!(f.waits, waits);
    }

    #[tokio::test(start_paused = true)]
    async fn a_slot_leaves_the_window_exactly_when_the_window_has_moved_past_it() {
        let state = TierState::new("pro", QueueClass::Priority);
        let origin = Instant::now();
        let mut w = state.recent.lock().unwrap_or_else(|p| p.into_inner());
        // One request in the first slot, one at the last instant of the second.
        w.admitted(origin, Duration::ZERO, true);
        w.refused(origin + 2 * SLOT - Duration::from_millis(1));
        let window = Duration::from_secs(SLO_WINDOW_SECONDS);
        // The first slot counts until the window (ten slots) has passed its end.
        let last = origin + window - Duration::from_millis(1);
        assert_eq!((w.figures(last).within, w.figures(last).missed), (1, 1));
        let f = w.figures(origin + window);
        assert_eq!((f.within, f.missed), (0, 1));
        let f = w.figures(origin + window + SLOT);
        assert_eq!((f.within, f.missed), (0, 0));
        // A slot reused ten slots later holds only its new counts.
        w.admitted(origin + window, Duration::ZERO, false);
        let f = w.figures(origin + window);
        assert_eq!((f.within, f.missed), (0, 2));
        assert_eq!(f.waits[0], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn admissions_and_refusals_reach_the_tiers_queue_figures() {
        let config = Config::default();
        let states = TierStates::default();
        let plan = TierPlan::build(&config, Duration::from_secs(5), &states);
        let tier = plan.get(None);
        tier.admitted(Duration::from_secs(1));
        tier.admitted(Duration::from_secs(6));
        tier.state.refused("wait_limit");
        tier.state.refused("unavailable");
        let f = tier.state.recent(Instant::now());
        // The target is the 5 s limit: one within, one late, one refused for time; a refusal
        // for want of a provider is not the queue's.
        assert_eq!((f.within, f.missed), (1, 2));
        assert_eq!(f.waits.iter().sum::<u64>(), 2);
    }
}
