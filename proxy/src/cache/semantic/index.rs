//! The semantic index: embeddings of cached prompts, by partition (everything of a request
//! but its last user message: scope, model, system prompt, earlier turns, parameters), each
//! with the key of its stored answer, its text (for the guard) and its expiry.
//!
//! A lookup scans its partition exactly (a dot product per entry over contiguous vectors):
//! only prompts that would share an answer are compared at all, deletes are immediate (no
//! tombstones, no rebuild), and the result is exact. The figures that justify a scan over
//! an approximate index (100k entries in one partition) are in docs/architecture.md.
//!
//! Entries leave at their expiry (swept on each insert and lookup of their partition, and
//! in order of expiry when the index is over its budget) or when their answer is evicted
//! from the store ([`Index::remove`]).

use super::embed::{DIM, cosine};
use crate::cache::key::Key;
use std::collections::{BTreeSet, HashMap};
use tokio::time::Instant;

/// What an entry costs beyond its vector and text (maps, expiry order).
pub const ENTRY_OVERHEAD: usize = 160;

/// A candidate found by a lookup.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The key its answer is stored under.
    pub key: Key,
    /// The cached prompt (its last user message).
    pub text: String,
    /// Cosine similarity to the query.
    pub similarity: f32,
}

#[derive(Debug, Default)]
struct Partition {
    /// `DIM` floats per entry, in the order of `entries`.
    vectors: Vec<f32>,
    entries: Vec<Meta>,
}

#[derive(Debug, Clone)]
struct Meta {
    key: Key,
    text: String,
    expires: Instant,
}

/// The index of every partition.
#[derive(Debug, Default)]
pub struct Index {
    parts: HashMap<Key, Partition>,
    /// Entry key -> (partition, position).
    at: HashMap<Key, (Key, usize)>,
    /// (expiry, key), soonest first.
    expiry: BTreeSet<(Instant, Key)>,
    bytes: usize,
}

/// The bytes an entry of `text` costs.
pub fn entry_bytes(text: &str) -> usize {
    DIM * 4 + text.len() + ENTRY_OVERHEAD
}

impl Index {
    /// Entries held.
    pub fn len(&self) -> usize {
        self.at.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.at.is_empty()
    }

    /// Bytes held (vectors, texts, overhead).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Adds (or replaces) the entry `key` in `partition`.
    pub fn insert(
        &mut self,
        partition: Key,
        key: Key,
        text: String,
        vector: &[f32],
        expires: Instant,
    ) {
        if vector.len() != DIM {
            return;
        }
        self.remove(&key);
        let part = self.parts.entry(partition).or_default();
        part.vectors.extend_from_slice(vector);
        self.bytes += entry_bytes(&text);
        part.entries.push(Meta { key, text, expires });
        self.at.insert(key, (partition, part.entries.len() - 1));
        self.expiry.insert((expires, key));
    }

    /// Takes the entry `key` out; true if it was there.
    pub fn remove(&mut self, key: &Key) -> bool {
        let Some((partition, pos)) = self.at.remove(key) else {
            return false;
        };
        let Some(part) = self.parts.get_mut(&partition) else {
            return false;
        };
        let last = part.entries.len() - 1;
        let meta = part.entries.swap_remove(pos);
        if pos != last {
            let (head, tail) = part.vectors.split_at_mut(last * DIM);
            head[pos * DIM..(pos + 1) * DIM].copy_from_slice(&tail[..DIM]);
            if let Some(moved) = part.entries.get(pos) {
                self.at.insert(moved.key, (partition, pos));
            }
        }
        part.vectors.truncate(last * DIM);
        if part.entries.is_empty() {
            self.parts.remove(&partition);
        }
        self.expiry.remove(&(meta.expires, meta.key));
        self.bytes -= entry_bytes(&meta.text);
        true
    }

    /// Drops every entry expired at `now`; the keys dropped.
    pub fn expire(&mut self, now: Instant) -> Vec<Key> {
        let mut gone = Vec::new();
        while let Some(&(at, key)) = self.expiry.first() {
            if at > now {
                break;
            }
            self.remove(&key);
            gone.push(key);
        }
        gone
    }

    /// Drops the entries that expire soonest until the index holds at most `max_bytes` and
    /// `max_entries`; the keys dropped.
    pub fn shrink_to(&mut self, max_bytes: usize, max_entries: usize) -> Vec<Key> {
        let mut gone = Vec::new();
        while self.bytes > max_bytes || self.len() > max_entries {
            let Some(&(_, key)) = self.expiry.first() else {
                break;
            };
            self.remove(&key);
            gone.push(key);
        }
        gone
    }

    /// The entries of `partition` at or above `threshold` to `query` (unexpired at `now`),
    /// most similar first, at most `limit`.
    pub fn search(
        &self,
        partition: &Key,
        query: &[f32],
        threshold: f32,
        now: Instant,
        limit: usize,
    ) -> Vec<Candidate> {
        let Some(part) = self.parts.get(partition) else {
            return Vec::new();
        };
        let mut found: Vec<(f32, usize)> = part
            .vectors
            .chunks_exact(DIM)
            .enumerate()
            .filter_map(|(i, v)| {
                let s = cosine(query, v);
                (s >= threshold).then_some((s, i))
            })
            .filter(|&(_, i)| part.entries.get(i).is_some_and(|m| m.expires > now))
            .collect();
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found.truncate(limit);
        found
            .into_iter()
            .filter_map(|(similarity, i)| {
                part.entries.get(i).map(|m| Candidate {
                    key: m.key,
                    text: m.text.clone(),
                    similarity,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn unit(seed: u32) -> Vec<f32> {
        // A deterministic pseudo-random unit vector.
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        let mut v: Vec<f32> = (0..DIM)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) - 0.5
            })
            .collect();
        let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
        v.iter_mut().for_each(|a| *a /= n);
        v
    }

    #[tokio::test(start_paused = true)]
    async fn entries_are_found_in_their_partition_until_they_expire_or_leave() {
        let mut index = Index::default();
        let (p, q) = (Key([1; 32]), Key([2; 32]));
        let now = Instant::now();
        let ttl = Duration::from_secs(60);
        for i in 0..10u8 {
            index.insert(
                p,
                Key([10 + i; 32]),
                format!("t{i}"),
                &unit(u32::from(i)),
                now + ttl,
            );
        }
        index.insert(q, Key([99; 32]), "other".into(), &unit(3), now + ttl);
        let hits = index.search(&p, &unit(3), 0.99, now, 4);
        assert_eq!(hits.len(), 1);
        assert_eq!(hits[0].key, Key([13; 32]));
        // Another partition's identical vector is not seen.
        assert!(
            index
                .search(&Key([3; 32]), &unit(3), 0.5, now, 4)
                .is_empty()
        );
        // Removing moves the last entry into the hole; every other entry is still found.
        assert!(index.remove(&Key([13; 32])));
        assert!(index.search(&p, &unit(3), 0.99, now, 4).is_empty());
        for i in (0..10u8).filter(|&i| i != 3) {
            let hits = index.search(&p, &unit(u32::from(i)), 0.99, now, 4);
            assert_eq!(
                hits.first().map(|c| c.key),
                Some(Key([10 + i; 32])),
                "entry {i}"
            );
        }
        // At the expiry instant, gone.
        tokio::time::advance(ttl - Duration::from_millis(1)).await;
        assert_eq!(index.search(&p, &unit(5), 0.99, Instant::now(), 4).len(), 1);
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(
            index
                .search(&p, &unit(5), 0.99, Instant::now(), 4)
                .is_empty()
        );
        assert_eq!(index.expire(Instant::now()).len(), 10);
        assert!(index.is_empty());
        assert_eq!(index.bytes(), 0);
    }

    #[test]
    fn over_its_budget_the_index_drops_the_soonest_to_expire() {
        let mut index = Index::default();
        let now = Instant::now();
        for i in 0..4u8 {
            let expires = now + Duration::from_secs(100 - u64::from(i));
            index.insert(
                Key([0; 32]),
                Key([i; 32]),
                "x".into(),
                &unit(u32::from(i)),
                expires,
            );
        }
        let gone = index.shrink_to(entry_bytes("x") * 2, 100);
        assert_eq!(gone, vec![Key([3; 32]), Key([2; 32])]);
        assert_eq!(index.len(), 2);
    }
}
