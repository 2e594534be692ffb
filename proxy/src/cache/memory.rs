//! The memory backend: answers by exact key, each with its expiry, within a byte budget and
//! an entry count: to make room, expired entries go first (soonest expired first, those
//! kept only for stale answers included), then the least recently used.
//!
//! The byte budget also covers what in-flight deduplication holds ([`MemoryStore::charging`]:
//! the flights' chunks and answers): a store evicts until its answer, the answers held and
//! the flights' bytes fit, and is refused when the flights alone leave no room for it.

use super::answer::Answer;
use super::key::Key;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// What an entry costs beyond its answer's bytes (map, order index, expiry).
const ENTRY_OVERHEAD: usize = 128;

/// Answers in memory, bounded in bytes and entries.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Lru>,
}

#[derive(Debug, Default)]
struct Lru {
    map: HashMap<Key, Slot>,
    /// Use tick -> key, oldest first.
    order: BTreeMap<u64, Key>,
    /// Entries by expiry, soonest first.
    expiries: BTreeSet<(Instant, Key)>,
    tick: u64,
    bytes: usize,
    max_bytes: usize,
    max_entries: usize,
    /// How long past its expiry an entry is kept for [`MemoryStore::get_stale`].
    grace: std::time::Duration,
    /// Bytes held outside the store and charged to its budget (the flights').
    outside: Option<Arc<AtomicUsize>>,
}

#[derive(Debug)]
struct Slot {
    answer: Arc<Answer>,
    bytes: usize,
    expires: Instant,
    tick: u64,
}

/// What a store did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Whether the answer was kept (not when larger than the whole budget).
    pub kept: bool,
    /// Entries evicted to make room.
    pub evicted: u64,
    /// The keys that left (evicted, or replaced): their semantic index entries go too.
    pub gone: Vec<Key>,
}

impl MemoryStore {
    /// A store of at most `max_bytes` and `max_entries`.
    pub fn new(max_bytes: usize, max_entries: usize) -> Self {
        let store = Self::default();
        store.set_limits(max_bytes, max_entries);
        store
    }

    /// Charges the bytes counted by `outside` (the flights') to this store's budget.
    pub fn charging(self, outside: Arc<AtomicUsize>) -> Self {
        self.lock().outside = Some(outside);
        self
    }

    /// Changes the bounds (a new policy); evicts down to them at the next store.
    pub fn set_limits(&self, max_bytes: usize, max_entries: usize) {
        let mut lru = self.lock();
        lru.max_bytes = max_bytes;
        lru.max_entries = max_entries.max(1);
    }

    /// Keeps expired entries `grace` longer, for [`MemoryStore::get_stale`] (a new policy).
    pub fn set_grace(&self, grace: std::time::Duration) {
        self.lock().grace = grace;
    }

    /// The answer under `key` if it has not expired at `now` or expired less than the grace
    /// ago (a stale answer, for the degradation chain), without marking it used.
    pub fn get_stale(&self, key: &Key, now: Instant) -> Option<Arc<Answer>> {
        let lru = self.lock();
        let slot = lru.map.get(key)?;
        (now < slot.expires + lru.grace).then(|| slot.answer.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The answer stored under `key` if it has not expired at `now`; marks it used.
    pub fn get(&self, key: &Key, now: Instant) -> Option<Arc<Answer>> {
        let mut lru = self.lock();
        let lru = &mut *lru;
        let slot = lru.map.get_mut(key)?;
        if slot.expires <= now {
            // Kept within the grace for a stale answer; gone after it.
            if now < slot.expires + lru.grace {
                return None;
            }
            lru.remove(key);
            return None;
        }
        lru.tick += 1;
        lru.order.remove(&slot.tick);
        slot.tick = lru.tick;
        lru.order.insert(lru.tick, *key);
        Some(slot.answer.clone())
    }

    /// Stores `answer` (of `bytes` serialised) under `key` until `expires`, evicting to stay
    /// within the bounds: entries expired at `now` first, then the least recently used.
    pub fn put(
        &self,
        key: Key,
        answer: Arc<Answer>,
        bytes: usize,
        (now, expires): (Instant, Instant),
    ) -> Stored {
        let mut lru = self.lock();
        let lru = &mut *lru;
        let bytes = bytes + ENTRY_OVERHEAD;
        let outside = lru
            .outside
            .as_ref()
            .map_or(0, |o| o.load(Ordering::Relaxed));
        if bytes.saturating_add(outside) > lru.max_bytes {
            return Stored::default();
        }
        lru.remove(&key);
        let mut evicted = 0;
        let mut gone = Vec::new();
        while lru.bytes + bytes + outside > lru.max_bytes || lru.map.len() >= lru.max_entries {
            let expired = lru.expiries.first().filter(|(at, _)| *at <= now);
            let Some(victim) = expired
                .map(|(_, k)| *k)
                .or_else(|| lru.order.first_key_value().map(|(_, k)| *k))
            else {
                break;
            };
            lru.remove(&victim);
            evicted += 1;
            gone.push(victim);
        }
        lru.tick += 1;
        let tick = lru.tick;
        lru.order.insert(tick, key);
        lru.expiries.insert((expires, key));
        lru.map.insert(
            key,
            Slot {
                answer,
                bytes,
                expires,
                tick,
            },
        );
        lru.bytes += bytes;
        Stored {
            kept: true,
            evicted,
            gone,
        }
    }

    /// Entries and bytes held now (expired ones count until looked up or evicted).
    pub fn usage(&self) -> (usize, usize) {
        let lru = self.lock();
        (lru.map.len(), lru.bytes)
    }
}

impl Lru {
    /// Takes `key`'s entry out of the map and both orders.
    fn remove(&mut self, key: &Key) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        self.order.remove(&slot.tick);
        self.expiries.remove(&(slot.expires, *key));
        self.bytes -= slot.bytes;
        Some(slot)
    }
}
