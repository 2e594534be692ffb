//! The connection cap shared by every worker, and which connection makes room at it.
//!
//! At the cap a new connection takes the slot of a connection that holds it without anything
//! of its requests having gone past the client: the one idle longest (no request in flight:
//! a keep-alive connection between requests, or one whose head has not arrived), else the one
//! whose request bodies arrive slowest (every request it has in flight is still receiving its
//! body, so nothing of them has gone upstream yet: a door reads the whole body first). That
//! connection is closed (`reason="evicted"`: an idle one gracefully, one receiving a body at
//! once); only when every connection has a request past its body (waiting for its answer,
//! or sending it, which the other bounds limit) is the new one closed at once.
//!
//! If the connection chosen takes a new request before it closes (its client sent one just
//! then), the newcomer waiting for the slot chooses another the same way.

use super::{Activity, PUBLIC};
use crate::metrics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

/// How often, at most, reaching the connection cap is logged (refusals and evictions each).
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// The connections of the whole process: the time bounds and the cap every worker shares.
#[derive(Debug)]
pub struct Connections {
    pub(super) limits: super::Limits,
    max: usize,
    /// The `listener` label of its metrics.
    pub(super) listener: &'static str,
    slots: Arc<Semaphore>,
    last_refused_log: Mutex<Option<Instant>>,
    last_evicted_log: Mutex<Option<Instant>>,
    /// Every open connection's activity, by a number of its own: where eviction looks.
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next: AtomicU64,
}

/// Whether a new connection may be served.
pub(super) enum Admit {
    /// Yes, in this slot.
    Now(Slot),
    /// At the cap, this connection was asked to close: its slot comes soon.
    AfterEviction(Arc<Activity>),
    /// At the cap, with a request past its body on every connection.
    Refused,
}

impl Connections {
    /// At most `max` connections at once (at least one), each bounded by `limits`, counted
    /// as the public listener's.
    pub fn new(limits: super::Limits, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            limits,
            max,
            listener: PUBLIC,
            slots: Arc::new(Semaphore::new(max)),
            last_refused_log: Mutex::new(None),
            last_evicted_log: Mutex::new(None),
            open: Mutex::default(),
            next: AtomicU64::new(0),
        }
    }

    /// The same, counted in the metrics under `listener` (`admin` for `--admin-listen`).
    pub fn named(self, listener: &'static str) -> Self {
        Self { listener, ..self }
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.max
    }

    fn labels(&self) -> metrics::ListenerLabels {
        metrics::ListenerLabels {
            listener: self.listener,
        }
    }

    /// A slot for a new connection whose activity is `activity`: at once under the cap; at
    /// the cap, once a connection asked to close has closed for it; else refused (counted,
    /// and logged now and then).
    pub(super) fn admit(self: &Arc<Self>, activity: &Arc<Activity>) -> Admit {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Admit::Now(self.slot(permit, activity));
        }
        if let Some(evicted) = self.evict() {
            return Admit::AfterEviction(evicted);
        }
        self.refused();
        Admit::Refused
    }

    /// Waits (at most the header timeout: the new client waits for its answer meanwhile) for
    /// the slot an eviction frees. If `evicted` takes a request instead of closing, another
    /// connection is asked.
    pub(super) async fn slot_after_eviction(
        self: &Arc<Self>,
        activity: &Arc<Activity>,
        evicted: Arc<Activity>,
    ) -> Option<Slot> {
        let deadline = Instant::now() + self.limits.header_read_timeout;
        let wait = self.slots.clone().acquire_owned();
        tokio::pin!(wait);
        let mut evicted = Some(evicted);
        loop {
            let kept = async {
                match &evicted {
                    Some(e) => e.kept_instead().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                biased;
                permit = &mut wait => match permit {
                    Ok(permit) => return Some(self.slot(permit, activity)),
                    Err(_) => break,
                },
                () = kept => evicted = self.evict(),
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.refused();
        None
    }

    fn slot(self: &Arc<Self>, permit: OwnedSemaphorePermit, activity: &Arc<Activity>) -> Slot {
        let open = metrics::global()
            .server_connections
            .get_or_create(&self.labels())
            .clone();
        open.inc();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, activity.clone());
        Slot {
            _permit: permit,
            open,
            id,
            connections: self.clone(),
        }
    }

    /// Asks one connection to close for a new one (see the module doc for which); `None` if
    /// every connection has a request past its body. A linear scan, at the cap only.
    pub(super) fn evict(&self) -> Option<Arc<Activity>> {
        let chosen = {
            let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let candidates = || open.values().filter(|a| a.evictable());
            candidates()
                .filter(|a| a.idle())
                .min_by_key(|a| a.quiet_since())
                .or_else(|| {
                    candidates()
                        .filter(|a| a.receiving_only())
                        .min_by(|a, b| a.body_rate(now).total_cmp(&b.body_rate(now)))
                })
                .cloned()
        }?;
        chosen.evict();
        self.evicted_log(&chosen);
        Some(chosen)
    }

    fn evicted_log(&self, chosen: &Activity) {
        if !due(&self.last_evicted_log) {
            return;
        }
        let receiving = chosen.receiving_only();
        tracing::warn!(
            listener = self.listener,
            max_connections = self.max,
            chosen = if receiving {
                "slowest_body"
            } else {
                "idle_longest"
            },
            "connection limit reached: closing a connection that holds a slot without using it for a new one (see floodgate_server_connections_closed_total{{reason=\"evicted\"}})"
        );
    }

    pub(super) fn refused(&self) {
        metrics::global()
            .server_connections_refused
            .get_or_create(&self.labels())
            .inc();
        if due(&self.last_refused_log) {
            tracing::warn!(
                listener = self.listener,
                max_connections = self.max,
                "connection limit reached with a request past its body on every connection: refusing new connections (see floodgate_server_connections_refused_total)"
            );
        }
    }
}

/// Whether a log line rate-limited by `last` may be written now (then noted).
fn due(last: &Mutex<Option<Instant>>) -> bool {
    let now = Instant::now();
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    let due = last.is_none_or(|at| now.duration_since(at) >= CAP_LOG_INTERVAL);
    if due {
        *last = Some(now);
    }
    due
}

/// A connection's place under the cap, given back when it closes.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    /// Its listener's count of open connections.
    open: prometheus_client::metrics::gauge::Gauge,
    /// Its number in [`Connections::open`].
    id: u64,
    connections: Arc<Connections>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.connections
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.open.dec();
    }
}
