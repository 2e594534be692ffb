//! Local models: a concurrency limit instead of an RPM (calls in flight at most
//! `numParallel` per replica), the queue of requests waiting for a slot (first come, first
//! served), the latency of the calls (failed ones included), and whether a paid tier should
//! spill over to the next target instead of waiting.
//!
//! Thresholds read as the operator's autoscaler reads them (`operator/src/autoscale.rs`): a
//! model is under queue pressure when *more* requests wait than `queueDepth` x replicas, and
//! under latency pressure when its latency is *past* `latencyMs`, so a gateway spills over
//! exactly when the operator would scale up. The latency is an exponentially weighted mean of
//! call durations that halves every [`LATENCY_HALF_LIFE`] without a new call: while paid
//! tiers spill over, a model that got slow is not called, and its mean must come down for
//! them to return.
//!
//! [`LocalDemand`] is what the operator's autoscaler reads: one struct per local model,
//! snapshot by [`Gates::demand`], also exported as Prometheus gauges labelled
//! `local_model="<namespace>/<name>"`.

use super::metrics::{LocalLabels, routing_metrics};
use super::plan::LocalSpec;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Time without a call over which a model's latency mean halves.
pub const LATENCY_HALF_LIFE: Duration = Duration::from_secs(10);

/// The demand on one local model at one gateway replica, for autoscaling.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalDemand {
    /// `<namespace>/<name>` of the LocalModelDeployment.
    pub local_model: Arc<str>,
    /// Requests waiting for a slot.
    pub queue_depth: u64,
    /// Calls in flight.
    pub in_flight: u64,
    /// Recent latency (exponentially weighted mean of call durations), milliseconds.
    pub latency_ms: u64,
}

/// The concurrency gate and demand counters of one local model; survives reloads.
#[derive(Debug)]
pub struct Gate {
    key: Arc<str>,
    limit: AtomicUsize,
    in_flight: AtomicUsize,
    waiting: AtomicUsize,
    /// The tickets of the requests waiting, first in line first: a freed slot goes to the
    /// head, and a new arrival queues behind them rather than take it.
    line: Mutex<Line>,
    /// Mean latency in microseconds (EWMA, weight 1/8) and when it was last observed.
    latency: Mutex<(u64, Option<Instant>)>,
    freed: Notify,
    /// Twice the latency bound of its spec, in milliseconds (0 without one): what a failed
    /// call counts as at least.
    failure_ms: AtomicU64,
    gauges: (Gauge, Gauge, Gauge, Histogram),
    /// The same demand, for the operator's autoscaler (published to Redis by
    /// [`crate::demand::Publisher`] when budgets are shared).
    cell: Arc<crate::demand::DemandCell>,
}

#[derive(Debug, Default)]
struct Line {
    next: u64,
    tickets: VecDeque<u64>,
}

/// What the gate says a request should do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// Under its thresholds.
    Normal,
    /// Its queue passed the threshold.
    Queue,
    /// Its latency passed the threshold.
    Latency,
}

impl Pressure {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Pressure::Normal => "normal",
            Pressure::Queue => "queue",
            Pressure::Latency => "latency",
        }
    }
}

impl Gate {
    fn new(spec: &LocalSpec, board: &crate::demand::DemandBoard) -> Self {
        let m = routing_metrics();
        let labels = LocalLabels {
            local_model: spec.key.to_string(),
        };
        let depth = m.local_queue_depth.get_or_create(&labels).clone();
        let flight = m.local_in_flight.get_or_create(&labels).clone();
        let latency = m.local_latency_ms.get_or_create(&labels).clone();
        let hist = m.local_seconds.get_or_create(&labels).clone();
        Self {
            key: spec.key.clone(),
            limit: AtomicUsize::new(spec.limit.max(1)),
            in_flight: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            line: Mutex::default(),
            latency: Mutex::new((0, None)),
            freed: Notify::new(),
            failure_ms: AtomicU64::new(failure_ms(spec)),
            gauges: (depth, flight, latency, hist),
            cell: {
                // `<namespace>/<name>`; standalone, a name alone.
                let (ns, name) = spec.key.split_once('/').unwrap_or(("", &spec.key));
                board.cell(ns, name)
            },
        }
    }

    /// A request spilled over past this model: demand it could not take, for the autoscaler.
    pub fn spilled(&self) {
        self.cell.spilled();
    }

    /// Whether the model is past `spec`'s thresholds: more waiting than the queue threshold,
    /// or a latency past the bound (both as the operator's scale-up reads them).
    pub fn pressure(&self, spec: &LocalSpec) -> Pressure {
        if self.waiting.load(Ordering::Relaxed) > spec.queue_threshold {
            return Pressure::Queue;
        }
        if let Some(ms) = spec.latency_ms
            && self.latency_us(Instant::now()) > u64::from(ms) * 1000
        {
            return Pressure::Latency;
        }
        Pressure::Normal
    }

    /// The latency mean at `now`, in microseconds: the last mean, halved for every
    /// [`LATENCY_HALF_LIFE`] since it was observed.
    fn latency_us(&self, now: Instant) -> u64 {
        let (us, at) = *self.latency.lock().unwrap_or_else(|p| p.into_inner());
        let Some(at) = at else { return us };
        let halves =
            now.saturating_duration_since(at).as_secs_f64() / LATENCY_HALF_LIFE.as_secs_f64();
        (us as f64 * 0.5f64.powf(halves)) as u64
    }

    /// A slot, waiting in line (first come, first served) until `deadline` at the latest;
    /// `None` past it.
    pub async fn acquire(self: &Arc<Self>, deadline: Instant) -> Option<Slot> {
        let ticket = {
            let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
            // Nobody in line: take a free slot at once.
            if line.tickets.is_empty()
                && let Some(slot) = self.try_acquire()
            {
                return Some(slot);
            }
            line.next += 1;
            let ticket = line.next;
            line.tickets.push_back(ticket);
            ticket
        };
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.publish();
        let _waiting = Waiting(self, ticket);
        // Counted as waiting for the autoscaler until it gets a slot or gives up.
        let _queued = self.cell.queued();
        loop {
            let freed = self.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(slot) = self.take_as_head(ticket) {
                return Some(slot);
            }
            tokio::select! {
                () = freed => {}
                () = tokio::time::sleep_until(deadline) => return self.take_as_head(ticket),
            }
        }
    }

    /// A slot for `ticket` if it is first in line and a slot is free (it then leaves the line).
    fn take_as_head(self: &Arc<Self>, ticket: u64) -> Option<Slot> {
        let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
        if line.tickets.front() != Some(&ticket) {
            return None;
        }
        let slot = self.try_acquire()?;
        line.tickets.pop_front();
        drop(line);
        // The next in line may find a slot free too (a limit raised, several freed).
        self.freed.notify_waiters();
        Some(slot)
    }

    fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        let limit = self.limit.load(Ordering::Relaxed);
        let mut now = self.in_flight.load(Ordering::Relaxed);
        loop {
            if now >= limit {
                return None;
            }
            match self.in_flight.compare_exchange_weak(
                now,
                now + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(seen) => now = seen,
            }
        }
        self.publish();
        Some(Slot {
            gate: self.clone(),
            started: Instant::now(),
            _demand: Some(self.cell.queued().start()),
        })
    }

    /// Records a finished call's latency.
    fn observe(&self, d: Duration) {
        let now = Instant::now();
        let us = d.as_micros().min(u128::from(u64::MAX)) as u64;
        let old = self.latency_us(now);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        *self.latency.lock().unwrap_or_else(|p| p.into_inner()) = (new, Some(now));
        self.gauges.3.observe(d.as_secs_f64());
    }

    fn publish(&self) {
        self.gauges
            .0
            .set(self.waiting.load(Ordering::Relaxed) as i64);
        self.gauges
            .1
            .set(self.in_flight.load(Ordering::Relaxed) as i64);
        self.gauges
            .2
            .set((self.latency_us(Instant::now()) / 1000) as i64);
    }

    /// The model's demand now.
    pub fn demand(&self) -> LocalDemand {
        LocalDemand {
            local_model: self.key.clone(),
            queue_depth: self.waiting.load(Ordering::Relaxed) as u64,
            in_flight: self.in_flight.load(Ordering::Relaxed) as u64,
            latency_ms: self.latency_us(Instant::now()) / 1000,
        }
    }
}

/// A request in line: leaves it (if still there) and the waiting count when dropped.
struct Waiting<'a>(&'a Gate, u64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut line = self.0.line.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = line.tickets.iter().position(|t| *t == self.1) {
            line.tickets.remove(i);
            drop(line);
            // It may have been the head: the next one looks again.
            self.0.freed.notify_waiters();
        }
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
        self.0.publish();
    }
}

/// A call's slot on a local model: held until the answer is finished (a stream carries it
/// to its end); its release wakes the next waiter.
#[derive(Debug)]
pub struct Slot {
    gate: Arc<Gate>,
    started: Instant,
    /// In flight for the autoscaler until the slot is released.
    _demand: Option<crate::demand::InFlight>,
}

impl Slot {
    /// The call's first answer came after `d` (a whole answer, or a stream's head): records
    /// it as the model's latency, for spill-over and for the autoscaler.
    pub fn answered(&self) {
        let elapsed = self.started.elapsed();
        self.gate.observe(elapsed);
        self.gate.cell.record_latency(elapsed);
    }

    /// The call failed: counted as slow as it was, and at least twice the latency bound,
    /// so that a failing model raises the latency that makes paid tiers spill even when it
    /// fails at once (a pod refusing connections answers in no time).
    pub fn failed(&self) {
        let floor = Duration::from_millis(self.gate.failure_ms.load(Ordering::Relaxed));
        let d = self.started.elapsed().max(floor);
        self.gate.observe(d);
        self.gate.cell.record_latency(d);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gate.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.gate.publish();
        // Every waiter looks; only the head of the line takes the slot.
        self.gate.freed.notify_waiters();
    }
}

/// The gates of every local model, by name; kept across configuration reloads.
#[derive(Debug, Default)]
pub struct Gates {
    gates: Mutex<HashMap<String, Arc<Gate>>>,
    /// Every local model's demand, for the operator's autoscaler.
    board: Arc<crate::demand::DemandBoard>,
}

/// What a failed call of a model under `spec` counts as at least: twice its latency bound.
fn failure_ms(spec: &LocalSpec) -> u64 {
    spec.latency_ms.map_or(0, |ms| u64::from(ms) * 2)
}

impl Gates {
    /// The gate of local model `name`, created or resized to `spec`.
    pub fn get(&self, name: &str, spec: &LocalSpec) -> Arc<Gate> {
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let gate = gates
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Gate::new(spec, &self.board)))
            .clone();
        gate.failure_ms.store(failure_ms(spec), Ordering::Relaxed);
        if gate.limit.swap(spec.limit.max(1), Ordering::Relaxed) < spec.limit {
            gate.freed.notify_waiters();
        }
        gate
    }

    /// Makes the gates those of `locals` (a configuration's local models): new ones are
    /// created, so their demand reads zero before their first request, limits are resized,
    /// and models no longer configured are dropped (calls in flight keep theirs to the end).
    pub fn configure(&self, locals: &HashMap<String, LocalSpec>) {
        for (name, spec) in locals {
            self.get(name, spec);
        }
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        gates.retain(|name, _| locals.contains_key(name));
    }

    /// The board the autoscaler's publisher reads ([`crate::demand::Publisher`]).
    pub fn board(&self) -> Arc<crate::demand::DemandBoard> {
        self.board.clone()
    }

    /// The demand on every configured local model at this replica: the numbers the
    /// operator's autoscaler reads (queue depth, in flight, latency).
    pub fn demand(&self) -> Vec<LocalDemand> {
        let gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<LocalDemand> = gates.values().map(|g| g.demand()).collect();
        out.sort_by(|a, b| a.local_model.cmp(&b.local_model));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(limit: usize, queue: usize, latency_ms: Option<u32>) -> LocalSpec {
        LocalSpec {
            key: Arc::from("ns/gate-test"),
            limit,
            queue_threshold: queue,
            latency_ms,
            classes: 0,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_limit_holds_and_a_freed_slot_goes_to_the_waiter() {
        let s = spec(2, 10, None);
        let gates = Gates::default();
        let gate = gates.get("a", &s);
        let far = Instant::now() + Duration::from_secs(10);
        let a = gate.acquire(far).await.unwrap();
        let _b = gate.acquire(far).await.unwrap();
        // The third waits, and gives up at its deadline exactly.
        let start = Instant::now();
        assert!(
            gate.acquire(start + Duration::from_millis(500))
                .await
                .is_none()
        );
        assert_eq!(start.elapsed(), Duration::from_millis(500));
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(far).await.map(|_| Instant::now()) });
        tokio::task::yield_now().await;
        assert_eq!(gates.demand()[0].queue_depth, 1);
        assert_eq!(gates.demand()[0].in_flight, 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        let freed_at = Instant::now();
        drop(a);
        assert_eq!(waiter.await.unwrap(), Some(freed_at));
        assert_eq!(gates.demand()[0].queue_depth, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn the_autoscalers_board_follows_the_gate() {
        let s = spec(1, 10, None);
        let gates = Gates::default();
        let gate = gates.get("a", &s);
        let board = gates.board();
        let figures = || board.cell("ns", "gate-test").figures();
        let far = Instant::now() + Duration::from_secs(10);
        let first = gate.acquire(far).await.unwrap();
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.acquire(far).await });
        tokio::task::yield_now().await;
        assert_eq!((figures().queued, figures().in_flight), (1, 1));
        tokio::time::advance(Duration::from_millis(700)).await;
        first.answered();
        drop(first);
        let second = waiter.await.unwrap().unwrap();
        assert_eq!((figures().queued, figures().in_flight), (0, 1));
        assert_eq!(figures().latency_p95_ms, 700);
        drop(second);
        assert_eq!((figures().queued, figures().in_flight), (0, 0));
        // The publisher reads the same board (ns/name split from the key).
        assert_eq!(board.snapshot()[0].0, "ns");
    }

    #[test]
    fn configured_models_report_demand_before_their_first_request() {
        let gates = Gates::default();
        let mut locals = HashMap::new();
        locals.insert("a".to_owned(), spec(2, 10, None));
        gates.configure(&locals);
        let demand = gates.demand();
        assert_eq!(demand.len(), 1);
        assert_eq!((demand[0].queue_depth, demand[0].in_flight), (0, 0));
        gates.configure(&HashMap::new());
        assert!(gates.demand().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn pressure_at_the_queue_and_latency_thresholds() {
        // Past the threshold, as the operator's scale-up reads it: more waiting than 2.
        let s = spec(1, 2, Some(1000));
        let gates = Gates::default();
        let gate = gates.get("b", &s);
        let far = Instant::now() + Duration::from_secs(60);
        let slot = gate.acquire(far).await.unwrap();
        assert_eq!(gate.pressure(&s), Pressure::Normal);
        let mut waiters = Vec::new();
        for waiting in 1..=3 {
            waiters.push(tokio::spawn({
                let g = gate.clone();
                async move { g.acquire(far).await.is_some() }
            }));
            tokio::task::yield_now().await;
            assert_eq!(gates.demand()[0].queue_depth, waiting);
            // One or two waiting, threshold two: normal; the third is past it.
            let expected = if waiting > 2 {
                Pressure::Queue
            } else {
                Pressure::Normal
            };
            assert_eq!(gate.pressure(&s), expected, "{waiting} waiting");
        }
        // A call of exactly 1000 ms is at the threshold, not past it.
        tokio::time::advance(Duration::from_millis(1000)).await;
        slot.answered();
        drop(slot);
        assert!(waiters.remove(0).await.unwrap());
        assert_eq!(gate.pressure(&s), Pressure::Normal);
        let s2 = spec(1, 2, Some(999));
        assert_eq!(gate.pressure(&s2), Pressure::Latency);
        drop(waiters);
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_fails_at_once_still_counts_as_slow() {
        let s = spec(1, 2, Some(1000));
        let gate = Gates::default().get("f", &s);
        let far = Instant::now() + Duration::from_secs(60);
        let slot = gate.acquire(far).await.unwrap();
        // Refused at once: no time passes.
        slot.failed();
        drop(slot);
        assert_eq!(gate.pressure(&s), Pressure::Latency);
    }

    #[tokio::test(start_paused = true)]
    async fn a_freed_slot_goes_to_the_first_in_line_not_to_a_new_arrival() {
        let s = spec(1, 10, None);
        let gates = Gates::default();
        let gate = gates.get("fifo", &s);
        let far = Instant::now() + Duration::from_secs(10);
        let held = gate.acquire(far).await.unwrap();
        let first = tokio::spawn({
            let g = gate.clone();
            async move { g.acquire(far).await.map(|slot| (Instant::now(), slot)) }
        });
        tokio::task::yield_now().await;
        assert_eq!(gates.demand()[0].queue_depth, 1);
        // The slot is freed, and a new arrival asks before the waiter has run: it queues
        // behind the waiter (and gives up at its own deadline), the waiter gets the slot.
        drop(held);
        let late = gate
            .acquire(Instant::now() + Duration::from_millis(100))
            .await;
        assert!(late.is_none(), "a new arrival overtook the waiter");
        assert!(first.await.unwrap().is_some());
        assert_eq!(gates.demand()[0].queue_depth, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_that_gives_up_lets_the_next_one_in() {
        let s = spec(1, 10, None);
        let gates = Gates::default();
        let gate = gates.get("give-up", &s);
        let far = Instant::now() + Duration::from_secs(10);
        let held = gate.acquire(far).await.unwrap();
        // The head of the line gives up at 1 s; the second stays.
        let head = tokio::spawn({
            let g = gate.clone();
            async move {
                g.acquire(Instant::now() + Duration::from_secs(1))
                    .await
                    .is_some()
            }
        });
        tokio::task::yield_now().await;
        let second = tokio::spawn({
            let g = gate.clone();
            async move { g.acquire(far).await.map(|_| Instant::now()) }
        });
        tokio::task::yield_now().await;
        assert!(!head.await.unwrap());
        tokio::time::advance(Duration::from_secs(1)).await;
        let freed = Instant::now();
        drop(held);
        assert_eq!(second.await.unwrap(), Some(freed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_models_latency_halves_every_half_life_without_calls() {
        // 4 s observed against a 2 s bound: past it; at exactly one half-life it is 2 s, at
        // the bound, and paid tiers come back.
        let s = spec(1, 10, Some(2000));
        let gates = Gates::default();
        let gate = gates.get("decay", &s);
        let far = Instant::now() + Duration::from_secs(60);
        let slot = gate.acquire(far).await.unwrap();
        tokio::time::advance(Duration::from_secs(4)).await;
        slot.answered();
        drop(slot);
        assert_eq!(gate.pressure(&s), Pressure::Latency);
        tokio::time::advance(LATENCY_HALF_LIFE - Duration::from_millis(1)).await;
        assert_eq!(gate.pressure(&s), Pressure::Latency);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(gate.pressure(&s), Pressure::Normal);
        assert_eq!(gates.demand()[0].latency_ms, 2000);
    }
}
