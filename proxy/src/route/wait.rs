//! The queue of requests waiting for budget on one route, and who goes next.
//!
//! Only one request, the *head*, looks for budget; it waits for the instant its earliest key
//! frees up or for a [`Signal`](crate::budget::Signal) pulse, whichever comes first. The others
//! wait for their turn. Nobody polls. When the head is admitted (or gives up, or its caller
//! hangs up) it leaves and the next head is chosen; an arrival that should go first takes the
//! head's place at once, and the old head stands back without taking budget.
//!
//! **Who goes next**, in four levels:
//! 1. *Between tiers*: weighted fair queueing over dispatch slots. Each tier with a request
//!    waiting has a virtual finish tag; the tier with the lowest tag has the next slot, and
//!    each slot it has adds `1 / weight` to its tag. Under overload each waiting tier gets its
//!    weight over the sum of the waiting tiers' weights of the dispatch slots, so a tier whose
//!    demand fits its share waits only for the next slot, and no tier starves (batch work still
//!    gets its weighted trickle). A tier that starts waiting again starts at the current
//!    virtual time: it cannot spend a credit saved while idle.
//! 2. *Inside a class*: the slot goes to the request due first among the tiers of the slot's
//!    class (each tier offering its own choice, below), due meaning when it joined plus its
//!    tier's wait limit (not a shorter wait its caller asked for); on a tie, the slot's own
//!    tier. So a class keeps the slots of its tiers' weights, and inside it a tier with a
//!    shorter limit (enterprise, 1 s, beside pro, 2 s) goes before requests that can wait
//!    longer; the slot is charged to the tier that had it.
//! 3. *Inside a tier*: tenants share by tokens, the same way with equal weights and each
//!    request's tokens as its cost, so one tenant sending large or many requests cannot starve
//!    the others of its tier. A tenant whose queue empties keeps what it was charged for one
//!    rate window (a request's tokens count against the keys for that long): coming back
//!    within it, it starts from its charge; later, from the current virtual time like any
//!    newcomer, so that neither an old charge nor the memory of every tenant ever seen lasts.
//! 4. *Inside a tenant*: earliest deadline first (ties by arrival).
//!
//! A request can be *held* out of the choice: a batch-class request until its batch is
//! released (the batch is full, or its oldest request waited the batch interval), and every
//! request of a tier for a short while after its class could not take budget that another class
//! could (its headroom, or off-peak deferral), so that it does not block those behind it.
//!
//! The queue is bounded per route and per tier: a request that finds either full is answered
//! at once with 429 and an honest `retry-after`.

use super::tiers::TierRt;
use floodgate_crds::QueueClass;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Who is asking, as the queue orders them.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The request's tier.
    pub tier: Arc<TierRt>,
    /// The caller's tenant (any stable name; one name for every anonymous caller).
    pub tenant: Arc<str>,
    /// The latest instant the request waits.
    pub deadline: Instant,
    /// The tokens it asks for (its cost in the fairness between tenants).
    pub tokens: u64,
}

/// Where a waiting request stands, for the progress a streaming caller sees while it waits:
/// set when it joins a queue, cleared when it leaves.
#[derive(Debug, Default)]
pub struct Progress {
    place: Mutex<Option<Place>>,
}

#[derive(Debug)]
struct Place {
    queue: Arc<WaitQueue>,
    id: u64,
    tier: Arc<TierRt>,
    tenant: Arc<str>,
    /// One slot of the route's rate (window / rpm).
    slot: std::time::Duration,
}

impl Progress {
    pub(crate) fn joined(
        &self,
        queue: Arc<WaitQueue>,
        ticket: &Ticket<'_>,
        slot: std::time::Duration,
    ) {
        *self.place.lock().unwrap_or_else(|p| p.into_inner()) = Some(Place {
            queue,
            id: ticket.id,
            tier: ticket.tier.clone(),
            tenant: ticket.tenant.clone(),
            slot,
        });
    }

    pub(crate) fn left(&self) {
        *self.place.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Requests ahead and the estimated wait, while the request waits in a queue: each
    /// request ahead, of any tier, takes one slot of the route's rate (requests that arrive
    /// later and go first are not foreseen).
    pub fn now(&self) -> Option<(usize, std::time::Duration)> {
        let place = self.place.lock().unwrap_or_else(|p| p.into_inner());
        let place = place.as_ref()?;
        let ahead = place
            .queue
            .position_of(place.id, &place.tier, &place.tenant)?
            .total();
        Some((ahead, place.slot * (ahead as u32 + 1)))
    }
}

/// The requests that would be chosen before a waiting one if nothing else arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Ahead {
    /// Of its own class: of its tier (its tenant's with earlier deadlines, and the other
    /// tenants'), and of the class's other tiers, due before it.
    pub in_class: usize,
    /// Of the other classes' tiers with a virtual tag no higher than its class's.
    pub other_classes: usize,
}

impl Ahead {
    /// All of them.
    pub fn total(&self) -> usize {
        self.in_class + self.other_classes
    }
}

/// Why a request could not join.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Full {
    /// The route's queue holds its bound.
    Route,
    /// The tier has `maxQueueDepth` requests waiting.
    Tier,
}

/// Requests waiting on one route.
#[derive(Debug)]
pub struct WaitQueue {
    state: Mutex<State>,
    len: AtomicUsize,
    next_id: AtomicU64,
    /// Most requests that may wait at once (updated when a configuration is applied).
    bound: AtomicUsize,
    /// How long a tenant's charge is kept once its queue empties: the rate window.
    memory: std::time::Duration,
}

#[derive(Debug, Default)]
struct State {
    tiers: Vec<TierQ>,
    /// The tag of the last tier dispatched: where a tier that starts waiting starts.
    vtime: f64,
    head: Option<u64>,
    /// The tier whose dispatch slot the head takes (another tier of its class may have it).
    head_slot: Option<usize>,
}

/// The request that should look for budget now ([`State::first`]).
#[derive(Debug)]
struct Pick {
    /// The tier whose dispatch slot it takes.
    slot: usize,
    /// Its own tier.
    tier: usize,
    tenant: Arc<str>,
    id: u64,
}

#[derive(Debug)]
struct TierQ {
    name: Arc<str>,
    class: QueueClass,
    weight: f64,
    tag: f64,
    /// Ineligible until then (its class could not take budget others could).
    held_until: Option<Instant>,
    tenants: HashMap<Arc<str>, TenantQ>,
    /// Tenants with nobody waiting whose tag is still ahead of `vtime`: what they were
    /// charged last, which a tenant that comes back starts from (sending one request at a
    /// time must not wipe out what its large requests cost). Pruned when `vtime` passes it,
    /// and forgotten when it lapses ([`Charge::until`]).
    charged: HashMap<Arc<str>, Charge>,
    /// When each charge lapses, in the order they were made (so in the order they lapse):
    /// `(until, tenant)`; an entry whose charge was taken back or made again is skipped.
    lapses: VecDeque<(Instant, Arc<str>)>,
    /// The tenant tag of the last dispatch in this tier.
    vtime: f64,
    waiting: usize,
    /// Batch requests not yet released, oldest first: (id, joined).
    gated: Vec<(u64, Instant)>,
}

/// What a tenant with nobody waiting was charged, and until when it counts.
#[derive(Debug, Clone, Copy)]
struct Charge {
    tag: f64,
    until: Instant,
}

#[derive(Debug)]
struct TenantQ {
    tag: f64,
    /// By (deadline, id).
    waiters: Vec<Waiter>,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    deadline: Instant,
    /// When it joined plus its tier's wait limit: its order inside its class.
    due: Instant,
    turn: Arc<Notify>,
    gated: bool,
}

impl TierQ {
    /// Whether this tier may be chosen at `now`: it has a request waiting that is neither
    /// gathered into a batch nor held back.
    fn eligible(&self, now: Instant) -> bool {
        self.waiting > self.gated.len() && self.held_until.is_none_or(|h| h <= now)
    }

    /// This tier's own choice: of the tenant with the lowest tag, its request with the
    /// earliest deadline (ties by deadline, then arrival); gathered requests are left out.
    fn choice(&self) -> Option<(&Arc<str>, &Waiter)> {
        let mut pick: Option<(f64, &Waiter, &Arc<str>)> = None;
        for (name, q) in &self.tenants {
            let Some(w) = q.waiters.iter().find(|w| !w.gated) else {
                continue;
            };
            let better = pick.is_none_or(|(tag, p, _)| {
                q.tag
                    .total_cmp(&tag)
                    .then(w.deadline.cmp(&p.deadline))
                    .then(w.id.cmp(&p.id))
                    == std::cmp::Ordering::Less
            });
            if better {
                pick = Some((q.tag, w, name));
            }
        }
        pick.map(|(_, w, name)| (name, w))
    }

    /// Its requests that go before one due at `due` (with id `id`) in their class's order.
    fn due_before(&self, due: Instant, id: u64) -> usize {
        self.tenants
            .values()
            .flat_map(|q| &q.waiters)
            .filter(|w| (w.due, w.id) < (due, id))
            .count()
    }

    /// Forgets the charges that lapsed by `now`: one rate window after the tenant's queue
    /// emptied, its requests no longer count against any key.
    fn forget_lapsed(&mut self, now: Instant) {
        while let Some((until, _)) = self.lapses.front()
            && *until <= now
        {
            let Some((until, tenant)) = self.lapses.pop_front() else {
                break;
            };
            if self.charged.get(&tenant).is_some_and(|c| c.until == until) {
                self.charged.remove(&tenant);
            }
        }
    }

    /// Keeps `tag` as `tenant`'s charge from `now`, for `memory`, if it is ahead of `vtime`.
    fn charge(&mut self, tenant: &Arc<str>, tag: f64, now: Instant, memory: std::time::Duration) {
        if tag > self.vtime {
            let until = now + memory;
            self.charged.insert(tenant.clone(), Charge { tag, until });
            self.lapses.push_back((until, tenant.clone()));
        }
    }
}

impl State {
    fn tier(&self, name: &str) -> Option<usize> {
        self.tiers.iter().position(|t| &*t.name == name)
    }

    /// The request that should look for budget now, and the tier whose slot it takes: see
    /// the module's ordering.
    fn first(&self, now: Instant) -> Option<Pick> {
        let mut best: Option<(f64, f64, usize)> = None;
        for (ti, t) in self.tiers.iter().enumerate() {
            if !t.eligible(now) {
                continue;
            }
            // Lowest tag; on a tie, the heavier tier.
            let better = best.is_none_or(|(tag, weight, _)| {
                t.tag.total_cmp(&tag).then(weight.total_cmp(&t.weight)) == std::cmp::Ordering::Less
            });
            if better {
                best = Some((t.tag, t.weight, ti));
            }
        }
        let (_, _, slot) = best?;
        let class = self.tiers[slot].class;
        // Inside the slot's class, the choice due first; on a tie, the slot's own tier's.
        // (due, not the slot's tier, id) orders them.
        type Order = (Instant, bool, u64);
        let mut pick: Option<(Order, usize, &Arc<str>)> = None;
        for (ti, t) in self.tiers.iter().enumerate() {
            if t.class != class || !t.eligible(now) {
                continue;
            }
            let Some((tenant, w)) = t.choice() else {
                continue;
            };
            let order = (w.due, ti != slot, w.id);
            if pick.is_none_or(|(best, _, _)| order < best) {
                pick = Some((order, ti, tenant));
            }
        }
        pick.map(|((_, _, id), tier, tenant)| Pick {
            slot,
            tier,
            tenant: tenant.clone(),
            id,
        })
    }

    fn waiter(&self, ti: usize, tenant: &str, id: u64) -> Option<&Waiter> {
        self.tiers
            .get(ti)?
            .tenants
            .get(tenant)?
            .waiters
            .iter()
            .find(|w| w.id == id)
    }

    /// Chooses the head again; tells the new head and the old one (which stands back).
    fn reassign(&mut self, now: Instant) {
        self.reassign_but(now, None);
    }

    /// [`State::reassign`], telling nobody if the new head is `joining` (it is about to look
    /// by itself; a stored wake-up would only make it look twice).
    fn reassign_but(&mut self, now: Instant, joining: Option<u64>) {
        let first = self.first(now);
        self.head_slot = first.as_ref().map(|f| f.slot);
        let new = first.as_ref().map(|f| f.id);
        if new == self.head {
            return;
        }
        if let Some(old) = self.head
            && let Some(turn) = self.find_turn(old)
        {
            turn.notify_one();
        }
        self.head = new;
        if let Some(pick) = first
            && Some(pick.id) != joining
            && let Some(w) = self.waiter(pick.tier, &pick.tenant, pick.id)
        {
            w.turn.notify_one();
        }
    }

    fn find_turn(&self, id: u64) -> Option<Arc<Notify>> {
        self.tiers
            .iter()
            .flat_map(|t| t.tenants.values())
            .flat_map(|q| &q.waiters)
            .find(|w| w.id == id)
            .map(|w| w.turn.clone())
    }

    /// Releases the tier's gated requests that are due at `now`: a full batch, or every
    /// request of a batch whose oldest waited `interval`. Returns whether any was released.
    fn release(
        &mut self,
        ti: usize,
        size: usize,
        interval: std::time::Duration,
        now: Instant,
    ) -> bool {
        let tier = &mut self.tiers[ti];
        let mut released = false;
        while let Some(&(_, oldest)) = tier.gated.first()
            && (tier.gated.len() >= size || oldest + interval <= now)
        {
            let batch: Vec<u64> = tier
                .gated
                .drain(..size.min(tier.gated.len()))
                .map(|g| g.0)
                .collect();
            for q in tier.tenants.values_mut() {
                for w in &mut q.waiters {
                    if batch.contains(&w.id) {
                        w.gated = false;
                        w.turn.notify_one();
                    }
                }
            }
            released = true;
        }
        released
    }
}

impl WaitQueue {
    /// An empty queue of at most `bound` waiters, for keys whose rate window is a minute.
    pub fn new(bound: usize) -> Self {
        Self::with_window(bound, crate::budget::MINUTE)
    }

    /// An empty queue of at most `bound` waiters, for keys whose rate window is `window`:
    /// how long a tenant's charge is kept once its queue empties.
    pub fn with_window(bound: usize, window: std::time::Duration) -> Self {
        Self {
            state: Mutex::default(),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            bound: AtomicUsize::new(bound),
            memory: window,
        }
    }

    /// Most requests that may wait at once.
    pub fn bound(&self) -> usize {
        self.bound.load(Ordering::Relaxed)
    }

    /// Changes the bound; requests already waiting keep their places.
    pub fn set_bound(&self, bound: usize) {
        self.bound.store(bound, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests waiting now; lock-free, for the fast path's "is anyone ahead of me".
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What a request of `tier` joining at `now` would find: the requests that would be
    /// chosen before it by the class's slots (all of its own tier's, and those of the other
    /// tiers of its class due before it: the class's slots go to the request due first), and
    /// its class's share of dispatch slots among the tiers waiting (1 when alone).
    pub fn outlook(&self, tier: &TierRt, now: Instant) -> (usize, f64) {
        let s = self.lock();
        let due = now + tier.max_wait;
        let mine = f64::from(tier.weight.max(1));
        let (mut ahead, mut class, mut total) = (0, mine, mine);
        for t in &s.tiers {
            if t.waiting == 0 {
                continue;
            }
            if *t.name == *tier.name {
                ahead += t.waiting;
                continue;
            }
            total += t.weight;
            if t.class == tier.class {
                class += t.weight;
                ahead += t.due_before(due, u64::MAX);
            }
        }
        (ahead, class / total)
    }

    /// Requests that would be chosen before request `id` of `tier` and `tenant` if nothing
    /// else arrived: of its class, those of other tenants of its tier and those ahead of it
    /// in its tenant, and those of the class's other tiers due before it; of the other
    /// classes, those of tiers with a tag no higher than its class's lowest. An estimate for
    /// progress reports, not a promise; `None` if it does not wait here.
    pub fn position_of(&self, id: u64, tier: &TierRt, tenant: &str) -> Option<Ahead> {
        let s = self.lock();
        let ti = s.tier(&tier.name)?;
        let me = s.tiers[ti]
            .tenants
            .get(tenant)?
            .waiters
            .iter()
            .find(|w| w.id == id)?;
        let class = s.tiers[ti].class;
        let class_tag = s
            .tiers
            .iter()
            .filter(|t| t.class == class && t.waiting > 0)
            .map(|t| t.tag)
            .fold(s.tiers[ti].tag, f64::min);
        let mut ahead = Ahead::default();
        for (i, t) in s.tiers.iter().enumerate() {
            if i == ti {
                for (name, q) in &t.tenants {
                    if **name == *tenant {
                        ahead.in_class += q.waiters.iter().take_while(|w| w.id != id).count();
                    } else {
                        ahead.in_class += q.waiters.len();
                    }
                }
            } else if t.class == class {
                ahead.in_class += t.due_before(me.due, id);
            } else if t.tag <= class_tag {
                ahead.other_classes += t.waiting;
            }
        }
        Some(ahead)
    }

    /// Joins the queue, or says which bound is full.
    pub fn join(&self, entry: &Entry, now: Instant) -> Result<Ticket<'_>, Full> {
        let mut s = self.lock();
        if self.len() >= self.bound() {
            return Err(Full::Route);
        }
        let Some(place) = entry.tier.state.enter(entry.tier.max_depth, now) else {
            return Err(Full::Tier);
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let turn = Arc::new(Notify::new());
        let vtime = s.vtime;
        let ti = match s.tier(&entry.tier.name) {
            Some(ti) => ti,
            None => {
                s.tiers.push(TierQ {
                    name: entry.tier.name.clone(),
                    class: entry.tier.class,
                    weight: f64::from(entry.tier.weight.max(1)),
                    tag: vtime,
                    held_until: None,
                    tenants: HashMap::new(),
                    charged: HashMap::new(),
                    lapses: VecDeque::new(),
                    vtime: 0.0,
                    waiting: 0,
                    gated: Vec::new(),
                });
                s.tiers.len() - 1
            }
        };
        let tier = &mut s.tiers[ti];
        // The weight and class may have changed with the configuration.
        tier.weight = f64::from(entry.tier.weight.max(1));
        tier.class = entry.tier.class;
        if tier.waiting == 0 {
            // Starts at the current virtual time: no credit saved while idle.
            tier.tag = tier.tag.max(vtime);
        }
        tier.forget_lapsed(now);
        let tier_vtime = tier.vtime;
        let charged = &mut tier.charged;
        let tenant = tier
            .tenants
            .entry(entry.tenant.clone())
            .or_insert_with(|| TenantQ {
                // No credit saved while idle, and no debt forgotten within its window.
                tag: charged
                    .remove(&entry.tenant)
                    .map_or(tier_vtime, |c| c.tag.max(tier_vtime)),
                waiters: Vec::new(),
            });
        let gated = entry.tier.batch.is_some();
        let at = tenant
            .waiters
            .partition_point(|w| (w.deadline, w.id) <= (entry.deadline, id));
        tenant.waiters.insert(
            at,
            Waiter {
                id,
                deadline: entry.deadline,
                due: now + entry.tier.max_wait,
                turn: turn.clone(),
                gated,
            },
        );
        tier.waiting += 1;
        if gated {
            tier.gated.push((id, now));
        }
        if let Some(batch) = entry.tier.batch {
            s.release(ti, batch.size, batch.interval, now);
        }
        self.len.fetch_add(1, Ordering::AcqRel);
        s.reassign_but(now, Some(id));
        Ok(Ticket {
            queue: self,
            id,
            place,
            tier: entry.tier.clone(),
            tenant: entry.tenant.clone(),
            tokens: entry.tokens,
            turn,
            admitted: false,
        })
    }
}

/// A place in a [`WaitQueue`]; leaving it (drop) chooses the next head if this one was it.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    id: u64,
    /// Its place in the tier's count ([`super::tiers::TierState::enter`]).
    place: u64,
    tier: Arc<TierRt>,
    tenant: Arc<str>,
    tokens: u64,
    turn: Arc<Notify>,
    admitted: bool,
}

impl Ticket<'_> {
    /// Whether this request is the one that looks for budget now.
    pub fn is_head(&self) -> bool {
        self.queue.lock().head == Some(self.id)
    }

    /// Resolves when something about this request's place changed: it became the head or
    /// stopped being it, its batch was released, or it should look at its timers again.
    /// Spurious wake-ups are possible; check [`Ticket::is_head`].
    pub async fn changed(&self) {
        // `notify_one` stores a permit, so a change before this await is not lost.
        self.turn.notified().await;
    }

    /// The instant this waiting (non-head) request must act by itself, if before its
    /// deadline: when its tier's hold ends, or when its batch is due for release.
    pub fn wake_at(&self) -> Option<Instant> {
        let s = self.queue.lock();
        let ti = s.tier(&self.tier.name)?;
        let tier = &s.tiers[ti];
        let mut at = tier.held_until;
        if let (Some(batch), Some(&(id, joined))) = (self.tier.batch, tier.gated.first())
            && id == self.id
        {
            let due = joined + batch.interval;
            at = Some(at.map_or(due, |a| a.min(due)));
        }
        at
    }

    /// Acts on timers that are due at `now`: releases a due batch, ends a hold, and
    /// chooses the head again.
    pub fn tick(&self, now: Instant) {
        let mut s = self.queue.lock();
        let vtime = s.vtime;
        if let Some(ti) = s.tier(&self.tier.name) {
            let mut eligible = false;
            if s.tiers[ti].held_until.is_some_and(|h| h <= now) {
                s.tiers[ti].held_until = None;
                eligible = true;
            }
            if let Some(batch) = self.tier.batch {
                eligible |= s.release(ti, batch.size, batch.interval, now);
            }
            if eligible {
                // Eligible again: no credit saved while it could not be chosen.
                let tier = &mut s.tiers[ti];
                tier.tag = tier.tag.max(vtime);
            }
        }
        s.reassign(now);
    }

    /// This request's tier could not take budget that another class could: its whole tier
    /// stands back until `until`, and the next head is chosen among the others.
    pub fn hold_tier(&self, now: Instant, until: Instant) {
        let mut s = self.queue.lock();
        if let Some(ti) = s.tier(&self.tier.name) {
            s.tiers[ti].held_until = Some(until);
        }
        s.reassign(now);
    }

    /// Requests that would be chosen before this one if nothing else arrived (see
    /// [`WaitQueue::position_of`]).
    pub fn position(&self) -> Ahead {
        self.queue
            .position_of(self.id, &self.tier, &self.tenant)
            .unwrap_or_default()
    }

    /// The request leaves with budget: its tier and tenant are charged for it.
    pub fn admitted(mut self) {
        self.admitted = true;
    }
}

impl Ticket<'_> {
    /// Takes this request out of its tier's queue, charging its tenant and the slot's tier
    /// if it was admitted; the index of its tier, or `None` if it was not found there.
    fn remove(&self, s: &mut State, now: Instant) -> Option<usize> {
        let vtime = s.vtime;
        let ti = s.tier(&self.tier.name)?;
        // The head takes the slot it was chosen for (maybe another tier's of its class).
        let slot = match s.head_slot {
            Some(slot) if s.head == Some(self.id) => slot,
            _ => ti,
        };
        let tier = &mut s.tiers[ti];
        let q = tier.tenants.get_mut(&self.tenant)?;
        let at = q.waiters.iter().position(|w| w.id == self.id)?;
        q.waiters.remove(at);
        if self.admitted {
            tier.vtime = q.tag;
            q.tag += self.tokens.max(1) as f64;
        }
        if q.waiters.is_empty() {
            let tag = q.tag;
            tier.tenants.remove(&self.tenant);
            tier.charge(&self.tenant, tag, now, self.queue.memory);
        }
        if self.admitted && !tier.charged.is_empty() {
            let vtime = tier.vtime;
            tier.charged.retain(|_, c| c.tag > vtime);
        }
        tier.forget_lapsed(now);
        tier.waiting = tier.waiting.saturating_sub(1);
        tier.gated.retain(|g| g.0 != self.id);
        if self.admitted
            && let Some(charged) = s.tiers.get_mut(slot)
        {
            let tag = charged.tag;
            charged.tag += 1.0 / charged.weight;
            s.vtime = vtime.max(tag);
        }
        Some(ti)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        let mut s = self.queue.lock();
        let ti = self.remove(&mut s, now);
        // Whatever was found, the request no longer waits: the counts it took are given
        // back, so that the bounds never fill with requests long gone.
        if s.head == Some(self.id) {
            s.head = None;
            s.head_slot = None;
        }
        self.queue.len.fetch_sub(1, Ordering::AcqRel);
        self.tier.state.leave(self.place);
        s.reassign(now);
        let Some(ti) = ti else {
            return;
        };
        // A gated request that leaves may make its successor the oldest of the batch, whose
        // timer then counts: it learns so from a wake-up.
        if let Some(&(next, _)) = s.tiers[ti].gated.first()
            && let Some(turn) = s.find_turn(next)
        {
            turn.notify_one();
        }
        // A held tier needs someone to lift the hold when it ends: the request that held it
        // may be the one leaving, so another of the tier re-reads its timers.
        let tier = &s.tiers[ti];
        if tier.held_until.is_some_and(|h| h > now)
            && let Some(w) = tier.tenants.values().flat_map(|q| &q.waiters).next()
        {
            w.turn.notify_one();
        }
    }
}

#[cfg(test)]
mod tests;
