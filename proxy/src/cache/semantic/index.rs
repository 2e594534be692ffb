//! The semantic index: embeddings of cached prompts, by partition (everything of a request
//! but its last user message: scope, model, system prompt, earlier turns, parameters), each
//! with the key of its stored answer, its text (for the guard) and its expiry.
//!
//! Only prompts of one partition are ever compared. Within a partition, entries sit in
//! lists (an inverted file, IVF), each list with a centroid (the normalised mean of its
//! vectors, kept current on every insert and remove):
//! - an entry joins the list whose centroid is nearest; a list past [`Params::list_max`]
//!   entries is split in two by 2-means over its own vectors (a few hundred vectors, well
//!   under a millisecond), so lists follow the data as it grows, with no training pass and
//!   no rebuild;
//! - a lookup in a partition of at most [`Params::exact_max`] entries scans every list (the
//!   exact result; a scan that small is faster than choosing lists); in a larger one it
//!   scores the centroids and scans the [`Params::probes`] nearest lists only (approximate:
//!   recall against the exact scan is measured by the cache bench and a unit test);
//! - a remove is a swap-remove in its list (and the list leaves when empty): an expired or
//!   evicted entry is gone at once, with no tombstones and no rebuild.
//!
//! Written here rather than taken from a crate: hnsw_rs has no deletes, usearch and hnswlib
//! bring C++ into the cold build and pay for deletes with tombstones; the partitioned IVF is
//! a few hundred lines of safe Rust. Figures in docs/architecture.md.
//!
//! Entries leave at their expiry (swept on each insert and lookup of their partition, and
//! in order of expiry when the index is over its budget) or when their answer is evicted
//! from the store ([`Index::remove`]).

use super::embed::{DIM, cosine};
use crate::cache::key::Key;
use std::collections::{BTreeSet, HashMap};
use tokio::time::Instant;

/// What an entry costs beyond its vector and text (maps, expiry order, its share of its
/// list's centroid).
pub const ENTRY_OVERHEAD: usize = 176;

/// How the index arranges a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// A partition of at most this many entries is scanned whole (exactly).
    pub exact_max: usize,
    /// A list of more entries than this is split in two.
    pub list_max: usize,
    /// Lists scanned by an approximate lookup (the nearest centroids).
    pub probes: usize,
}

impl Default for Params {
    /// Chosen with the cache bench (docs/architecture.md): below 8,192 entries a whole scan
    /// takes under ~2 ms; lists of at most 512 entries and 24 probes find the exact nearest
    /// entry for nearly every query that has one above the threshold.
    fn default() -> Self {
        Self {
            exact_max: 8192,
            list_max: 512,
            probes: 24,
        }
    }
}

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
    lists: Vec<List>,
    len: usize,
}

/// Entries near one centroid.
#[derive(Debug)]
struct List {
    /// The normalised mean of `vectors` (unit length).
    centroid: Vec<f32>,
    /// The sum of `vectors`, kept as entries come and go.
    sum: Vec<f32>,
    /// `DIM` floats per entry, in the order of `entries`.
    vectors: Vec<f32>,
    entries: Vec<Meta>,
    /// Split when longer than this (raised when its vectors cannot be split apart).
    split_at: usize,
}

#[derive(Debug, Clone)]
struct Meta {
    key: Key,
    text: String,
    expires: Instant,
}

/// Where an entry is: its partition, its list, its position in the list.
#[derive(Debug, Clone, Copy)]
struct At {
    partition: Key,
    list: usize,
    pos: usize,
}

/// The index of every partition.
#[derive(Debug, Default)]
pub struct Index {
    params: Params,
    parts: HashMap<Key, Partition>,
    at: HashMap<Key, At>,
    /// (expiry, key), soonest first.
    expiry: BTreeSet<(Instant, Key)>,
    bytes: usize,
}

/// The bytes an entry of `text` costs.
pub fn entry_bytes(text: &str) -> usize {
    DIM * 4 + text.len() + ENTRY_OVERHEAD
}

impl List {
    fn new(split_at: usize) -> Self {
        Self {
            centroid: vec![0.0; DIM],
            sum: vec![0.0; DIM],
            vectors: Vec::new(),
            entries: Vec::new(),
            split_at,
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }

    fn vector(&self, pos: usize) -> &[f32] {
        &self.vectors[pos * DIM..(pos + 1) * DIM]
    }

    fn push(&mut self, meta: Meta, vector: &[f32]) -> usize {
        self.vectors.extend_from_slice(vector);
        self.entries.push(meta);
        self.sum.iter_mut().zip(vector).for_each(|(s, v)| *s += v);
        self.recentre();
        self.entries.len() - 1
    }

    /// Takes the entry at `pos` out (the last one moves into its place).
    fn swap_remove(&mut self, pos: usize) -> Meta {
        let last = self.entries.len() - 1;
        for (s, v) in self.sum.iter_mut().zip(&self.vectors[pos * DIM..]) {
            *s -= v;
        }
        if pos != last {
            let (head, tail) = self.vectors.split_at_mut(last * DIM);
            head[pos * DIM..(pos + 1) * DIM].copy_from_slice(&tail[..DIM]);
        }
        self.vectors.truncate(last * DIM);
        let meta = self.entries.swap_remove(pos);
        self.recentre();
        meta
    }

    /// The centroid from the sum: its direction, at unit length.
    fn recentre(&mut self) {
        let norm = self.sum.iter().map(|x| x * x).sum::<f32>().sqrt();
        if norm > 1e-12 {
            for (c, s) in self.centroid.iter_mut().zip(&self.sum) {
                *c = s / norm;
            }
        }
    }

    /// The sum from the vectors (floating error of many adds and removes cleared).
    fn resum(&mut self) {
        self.sum.iter_mut().for_each(|s| *s = 0.0);
        for v in self.vectors.chunks_exact(DIM) {
            self.sum.iter_mut().zip(v).for_each(|(s, x)| *s += x);
        }
        self.recentre();
    }

    /// Splits the list in two by 2-means over its vectors: the entries that go to the new
    /// list are taken out of this one. `None` when the vectors do not fall apart (all near
    /// one point): the list then waits until it is twice as long.
    fn split(&mut self) -> Option<List> {
        let n = self.len();
        // Seeds: the vector farthest from the centroid, then the one farthest from it.
        let farthest = |from: &[f32], list: &List| {
            (0..n)
                .map(|i| (cosine(from, list.vector(i)), i))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .map(|(_, i)| i)
        };
        let a = farthest(&self.centroid, self)?;
        let b = farthest(self.vector(a), self)?;
        let (mut ca, mut cb) = (self.vector(a).to_vec(), self.vector(b).to_vec());
        let mut side = vec![false; n];
        for _ in 0..8 {
            let mut changed = false;
            let (mut sa, mut sb) = (vec![0.0f32; DIM], vec![0.0f32; DIM]);
            for (i, s) in side.iter_mut().enumerate() {
                let v = self.vector(i);
                let to_b = cosine(v, &cb) > cosine(v, &ca);
                changed |= to_b != *s;
                *s = to_b;
                let sum = if to_b { &mut sb } else { &mut sa };
                sum.iter_mut().zip(v).for_each(|(x, y)| *x += y);
            }
            normalise_into(&mut ca, &sa);
            normalise_into(&mut cb, &sb);
            if !changed {
                break;
            }
        }
        let moving = side.iter().filter(|s| **s).count();
        if moving == 0 || moving == n {
            self.split_at = self.split_at.saturating_mul(2);
            return None;
        }
        let mut other = List::new(self.split_at);
        let mut kept = List::new(self.split_at);
        let entries = std::mem::take(&mut self.entries);
        for (i, meta) in entries.into_iter().enumerate() {
            let v = &self.vectors[i * DIM..(i + 1) * DIM];
            let to = if side[i] { &mut other } else { &mut kept };
            to.vectors.extend_from_slice(v);
            to.entries.push(meta);
        }
        kept.resum();
        other.resum();
        *self = kept;
        Some(other)
    }
}

fn normalise_into(out: &mut [f32], sum: &[f32]) {
    let norm = sum.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 1e-12 {
        out.iter_mut().zip(sum).for_each(|(o, s)| *o = s / norm);
    }
}

impl Index {
    /// An empty index arranged by `params`.
    pub fn with_params(params: Params) -> Self {
        Self {
            params: Params {
                exact_max: params.exact_max,
                list_max: params.list_max.max(2),
                probes: params.probes.max(1),
            },
            ..Self::default()
        }
    }

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
        let list_max = self.params.list_max;
        let part = self.parts.entry(partition).or_default();
        if part.lists.is_empty() {
            part.lists.push(List::new(list_max));
        }
        let list = nearest(&part.lists, vector, 1)[0];
        self.bytes += entry_bytes(&text);
        let pos = part.lists[list].push(Meta { key, text, expires }, vector);
        part.len += 1;
        self.at.insert(
            key,
            At {
                partition,
                list,
                pos,
            },
        );
        self.expiry.insert((expires, key));
        if part.lists[list].len() > part.lists[list].split_at
            && let Some(other) = part.lists[list].split()
        {
            part.lists.push(other);
            let moved = [list, part.lists.len() - 1];
            for l in moved {
                for (pos, meta) in part.lists[l].entries.iter().enumerate() {
                    self.at.insert(
                        meta.key,
                        At {
                            partition,
                            list: l,
                            pos,
                        },
                    );
                }
            }
        }
    }

    /// Takes the entry `key` out; true if it was there.
    pub fn remove(&mut self, key: &Key) -> bool {
        let Some(at) = self.at.remove(key) else {
            return false;
        };
        let Some(part) = self.parts.get_mut(&at.partition) else {
            return false;
        };
        let Some(list) = part.lists.get_mut(at.list) else {
            return false;
        };
        let meta = list.swap_remove(at.pos);
        if let Some(moved) = list.entries.get(at.pos) {
            self.at.insert(moved.key, at);
        }
        part.len -= 1;
        if list.entries.is_empty() {
            part.lists.swap_remove(at.list);
            // The last list took its place.
            if let Some(moved) = part.lists.get(at.list) {
                for (pos, m) in moved.entries.iter().enumerate() {
                    self.at.insert(
                        m.key,
                        At {
                            partition: at.partition,
                            list: at.list,
                            pos,
                        },
                    );
                }
            }
        }
        if part.len == 0 {
            self.parts.remove(&at.partition);
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
    /// most similar first, at most `limit`: exact in a partition of at most
    /// [`Params::exact_max`] entries, else from the nearest lists.
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
        let probes = if part.len <= self.params.exact_max {
            part.lists.len()
        } else {
            self.params.probes
        };
        self.scan(part, query, threshold, now, limit, probes)
    }

    /// The exact answer to [`Index::search`]: every list of the partition scanned, whatever
    /// its size (to measure the approximate lookup against).
    pub fn search_exact(
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
        self.scan(part, query, threshold, now, limit, part.lists.len())
    }

    fn scan(
        &self,
        part: &Partition,
        query: &[f32],
        threshold: f32,
        now: Instant,
        limit: usize,
        probes: usize,
    ) -> Vec<Candidate> {
        if query.len() != DIM {
            return Vec::new();
        }
        let mut found: Vec<(f32, usize, usize)> = Vec::new();
        for l in nearest(&part.lists, query, probes) {
            let list = &part.lists[l];
            found.extend(
                list.vectors
                    .chunks_exact(DIM)
                    .enumerate()
                    .filter_map(|(i, v)| {
                        let s = cosine(query, v);
                        (s >= threshold).then_some((s, l, i))
                    })
                    .filter(|&(_, _, i)| list.entries.get(i).is_some_and(|m| m.expires > now)),
            );
        }
        found.sort_by(|a, b| b.0.total_cmp(&a.0));
        found.truncate(limit);
        found
            .into_iter()
            .filter_map(|(similarity, l, i)| {
                part.lists[l].entries.get(i).map(|m| Candidate {
                    key: m.key,
                    text: m.text.clone(),
                    similarity,
                })
            })
            .collect()
    }
}

/// The positions of the `n` lists whose centroids are nearest to `query` (every list when
/// there are at most `n`).
fn nearest(lists: &[List], query: &[f32], n: usize) -> Vec<usize> {
    if lists.len() <= n {
        return (0..lists.len()).collect();
    }
    let mut scored: Vec<(f32, usize)> = lists
        .iter()
        .enumerate()
        .map(|(i, l)| (cosine(query, &l.centroid), i))
        .collect();
    scored.select_nth_unstable_by(n - 1, |a, b| b.0.total_cmp(&a.0));
    scored.truncate(n);
    scored.into_iter().map(|(_, i)| i).collect()
}

#[cfg(test)]
mod tests;
