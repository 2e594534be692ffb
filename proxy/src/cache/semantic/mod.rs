//! The semantic cache (stage 4, after the exact lookup): a request whose last user message
//! means what a cached one meant gets that answer.
//!
//! - **Partition.** Only requests that agree on everything but the wording of their last
//!   user message are compared: the exact key of the request with that message blanked
//!   ([`query`]) holds the scope (tenant unless the policy shares), the answering model,
//!   the system prompt, every earlier turn verbatim (a multi-turn rule that cannot produce
//!   a false hit from history), and the parameters.
//! - **Similarity.** The last user message is embedded ([`embed`], all-MiniLM-L6-v2 on CPU
//!   on a thread of its own, batched) and compared with the partition's entries
//!   ([`index`]); candidates at or above the policy's threshold (0.95 by default) are
//!   offered to the guard, most similar first.
//! - **Guard.** A candidate is served only if the words that carry meaning are the same
//!   ([`guard`]): negations, numbers, names and word order must agree.
//!
//! Answers live in the cache's backend under the entry's own key (apart from the exact
//! entry: each has its own TTL). In memory, an entry's answer and its index entry are
//! charged together to the byte budget and leave together (LRU, TTL). In Redis, the entry
//! holds its partition, text, vector and answer; every addition is appended to a stream,
//! which each replica follows, and a replica builds its index from Redis when it starts.

pub mod embed;
pub mod guard;
pub mod index;
mod minilm;

use super::key::{self, Key};
use super::metrics;
use super::redis::RedisStore;
use crate::providers::types::{ChatRequest, ContentPart, MessageContent, Role};
use embed::{Embedder, Model};
use index::Index;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

/// Longest last user message (in bytes) the semantic layer considers; a longer one is left
/// to the exact cache (the model reads 256 tokens, about 1,000 characters).
pub const MAX_TEXT: usize = 1000;

/// Most candidates above the threshold offered to the guard.
const CANDIDATES: usize = 8;

/// What the semantic layer compares for a request.
#[derive(Debug, Clone)]
pub struct Query {
    /// Everything but the last user message's wording.
    pub partition: Key,
    /// The last user message.
    pub text: String,
}

impl Query {
    /// The key an answer to this query is stored under.
    pub fn entry_key(&self) -> Key {
        let mut bytes = b"semantic\0".to_vec();
        bytes.extend_from_slice(&self.partition.0);
        bytes.extend_from_slice(self.text.as_bytes());
        let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
        let mut key = [0u8; 32];
        key.copy_from_slice(digest.as_ref());
        Key(key)
    }
}

/// The query of `req` in `scope` for the answering `model`; `None` when the request does
/// not end with a user message of text (up to [`MAX_TEXT`] bytes).
pub fn query(scope: &str, model: &str, req: &ChatRequest) -> Option<Query> {
    let last = req.messages.last()?;
    if last.role != Role::User {
        return None;
    }
    let text = match last.content.as_ref()? {
        MessageContent::Text(t) => t.clone(),
        c @ MessageContent::Parts(parts) => {
            if !parts.iter().all(|p| matches!(p, ContentPart::Text { .. })) {
                return None;
            }
            c.text()
        }
    };
    let text = text.trim().to_owned();
    if text.is_empty() || text.len() > MAX_TEXT {
        return None;
    }
    let mut blank = req.clone();
    if let Some(m) = blank.messages.last_mut() {
        m.content = Some(MessageContent::Text("\0semantic".to_owned()));
    }
    Some(Query {
        partition: key::exact(scope, model, &blank),
        text,
    })
}

/// The embedder of the model in `dir`: loaded once per process and directory (gateways
/// in one process, as in tests, share it).
fn loaded(dir: &Path) -> Result<Embedder, embed::EmbedError> {
    static LOADED: Mutex<Vec<(PathBuf, Embedder)>> = Mutex::new(Vec::new());
    let mut all = LOADED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, e)) = all.iter().find(|(d, _)| d == dir) {
        return Ok(e.clone());
    }
    let embedder = Model::load(dir).and_then(Embedder::start)?;
    all.push((dir.to_owned(), embedder.clone()));
    Ok(embedder)
}

/// The embedding model's state.
#[derive(Debug, Default)]
enum ModelState {
    /// No policy asked for it yet.
    #[default]
    None,
    /// Loading from this directory.
    Loading(PathBuf),
    /// Ready.
    Ready(PathBuf, Embedder),
    /// Could not be loaded from this directory (logged once).
    Off(PathBuf),
}

/// The semantic layer's state: the model and the index, shared by every request.
#[derive(Debug, Default)]
pub struct Semantic {
    model: Mutex<ModelState>,
    index: Mutex<Index>,
    following: Mutex<bool>,
}

/// A hit: the stored answer's key and how similar its prompt was.
#[derive(Debug, Clone)]
pub struct Found {
    /// Where the answer is stored.
    pub key: Key,
    /// Cosine similarity of the prompts.
    pub similarity: f32,
}

impl Semantic {
    /// Loads the model in `dir` unless it is loaded or loading from there, on a thread of
    /// its own; a failure is logged once with its reason, and the layer stays off.
    pub fn ensure_model(self: &Arc<Self>, dir: &Path) {
        {
            let mut state = self.lock_model();
            match &*state {
                ModelState::Loading(d) | ModelState::Ready(d, _) | ModelState::Off(d)
                    if d == dir =>
                {
                    return;
                }
                _ => {}
            }
            *state = ModelState::Loading(dir.to_owned());
        }
        let (me, dir) = (self.clone(), dir.to_owned());
        let load = move || {
            let started = std::time::Instant::now();
            let loaded = loaded(&dir);
            let mut state = me.lock_model();
            if !matches!(&*state, ModelState::Loading(d) if *d == dir) {
                return;
            }
            *state = match loaded {
                Ok(embedder) => {
                    tracing::info!(
                        dir = %dir.display(),
                        ms = started.elapsed().as_millis() as u64,
                        "semantic cache: embedding model loaded"
                    );
                    ModelState::Ready(dir, embedder)
                }
                Err(e) => {
                    tracing::warn!(
                        dir = %dir.display(),
                        error = %e,
                        "semantic cache is OFF: the embedding model cannot be loaded ({e}); \
                         exact, template and dedup layers still work"
                    );
                    ModelState::Off(dir)
                }
            };
        };
        if let Err(e) = std::thread::Builder::new()
            .name("floodgate-embed-load".into())
            .spawn(load)
        {
            tracing::warn!(error = %e, "semantic cache is OFF: no thread to load the model");
            *self.lock_model() = ModelState::Off(PathBuf::new());
        }
    }

    /// The layer with `embedder` as its model, ready (tests).
    #[cfg(test)]
    pub(crate) fn ready_with(&self, embedder: Embedder) {
        *self.lock_model() = ModelState::Ready(PathBuf::new(), embedder);
    }

    fn lock_model(&self) -> std::sync::MutexGuard<'_, ModelState> {
        self.model.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The index, locked.
    pub fn index(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the model is loaded and the layer is working.
    pub fn ready(&self) -> bool {
        matches!(&*self.lock_model(), ModelState::Ready(..))
    }

    /// The model's whole words (the guard's [`guard::Vocab`]), once it is loaded.
    pub fn vocab(&self) -> Option<Arc<guard::Vocab>> {
        match &*self.lock_model() {
            ModelState::Ready(_, e) => Some(e.vocab().clone()),
            _ => None,
        }
    }

    /// Whether the model could not be loaded (the layer is off).
    pub fn off(&self) -> bool {
        matches!(&*self.lock_model(), ModelState::Off(_))
    }

    /// The embedding of `text`; `None` while the model is not ready (or failed to run).
    pub async fn embed(&self, text: &str) -> Option<Vec<f32>> {
        let embedder = match &*self.lock_model() {
            ModelState::Ready(_, e) => e.clone(),
            _ => return None,
        };
        match embedder.embed(text.to_owned()).await {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::debug!(error = %e, "embedding failed; semantic lookup skipped");
                None
            }
        }
    }

    /// The best candidate for `q` (embedded as `vector`) that the guard lets through, at or
    /// above `threshold`; none while the model (whose vocabulary the guard reads) is not
    /// loaded.
    pub fn find(&self, q: &Query, vector: &[f32], threshold: f32) -> Option<Found> {
        let vocab = self.vocab()?;
        let now = Instant::now();
        let candidates = {
            let mut index = self.index();
            index.expire(now);
            index.search(&q.partition, vector, threshold, now, CANDIDATES)
        };
        let m = metrics::get();
        for c in candidates {
            match guard::check(&c.text, &q.text, &vocab) {
                Ok(()) => {
                    return Some(Found {
                        key: c.key,
                        similarity: c.similarity,
                    });
                }
                Err(refusal) => {
                    m.guard_refusals
                        .get_or_create(&metrics::ReasonLabels {
                            reason: refusal.as_str(),
                        })
                        .inc();
                }
            }
        }
        None
    }

    /// Adds an entry to the index (and sets the entries gauge).
    pub fn insert(&self, q: &Query, key: Key, vector: &[f32], expires: Instant) {
        let mut index = self.index();
        index.insert(q.partition, key, q.text.clone(), vector, expires);
        metrics::get().semantic_entries.set(index.len() as i64);
    }

    /// Takes entries out of the index (their answers are gone).
    pub fn forget(&self, keys: &[Key]) {
        if keys.is_empty() {
            return;
        }
        let mut index = self.index();
        for k in keys {
            index.remove(k);
        }
        metrics::get().semantic_entries.set(index.len() as i64);
    }

    /// Follows the entries that replicas add to Redis: first every entry there (a new
    /// replica warms its index), then each addition, polled every 250 ms. Once per process.
    pub fn follow(self: &Arc<Self>, redis: Arc<RedisStore>, limits: (usize, usize)) {
        {
            let mut following = self.following.lock().unwrap_or_else(|p| p.into_inner());
            if *following {
                return;
            }
            *following = true;
        }
        let me = self.clone();
        tokio::spawn(async move {
            // The stream's end before the scan: nothing added during the scan is missed.
            let mut last = loop {
                match redis.semantic_added_tail().await {
                    Ok(id) => break id,
                    Err(e) => {
                        tracing::debug!(error = %e, "semantic cache: Redis not reachable yet");
                        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    }
                }
            };
            match redis.semantic_scan().await {
                Ok(entries) => {
                    let n = entries.len();
                    for e in entries {
                        me.add_remote(e, limits);
                    }
                    tracing::info!(entries = n, "semantic cache: index built from Redis");
                }
                Err(e) => tracing::warn!(error = %e, "semantic cache: reading Redis failed"),
            }
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                match redis.semantic_added_since(&last).await {
                    Ok((next, entries)) => {
                        last = next;
                        for e in entries {
                            me.add_remote(e, limits);
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "semantic cache: following Redis failed"),
                }
            }
        });
    }

    fn add_remote(&self, e: super::redis::SemanticEntry, (max_bytes, max_entries): (usize, usize)) {
        let q = Query {
            partition: e.partition,
            text: e.text,
        };
        let expires = Instant::now() + e.ttl;
        let mut index = self.index();
        index.insert(q.partition, e.key, q.text, &e.vector, expires);
        index.shrink_to(max_bytes, max_entries);
        metrics::get().semantic_entries.set(index.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn without_the_model_files_the_layer_is_off_and_lookups_pass_through() {
        let dir = tempfile::tempdir().unwrap();
        let semantic = Arc::new(Semantic::default());
        semantic.ensure_model(dir.path());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !semantic.off() {
            assert!(std::time::Instant::now() < deadline, "never turned off");
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(!semantic.ready());
        assert_eq!(semantic.embed("hello").await, None);
    }

    fn request(messages: serde_json::Value) -> ChatRequest {
        serde_json::from_value(json!({"model": "m", "messages": messages})).unwrap()
    }

    #[test]
    fn the_partition_is_everything_but_the_last_user_message() {
        let q = |m| query("global", "p/m", &request(m));
        let a = q(json!([{"role": "user", "content": "reset my password"}])).unwrap();
        let b = q(json!([{"role": "user", "content": "how do I reset my password"}])).unwrap();
        assert_eq!(a.partition, b.partition);
        assert_ne!(a.entry_key(), b.entry_key());
        // Another scope, model, system prompt or earlier turn: another partition.
        let req = request(json!([{"role": "user", "content": "reset my password"}]));
        assert_ne!(
            query("tenant:a", "p/m", &req).unwrap().partition,
            a.partition
        );
        assert_ne!(query("global", "p/n", &req).unwrap().partition, a.partition);
        let sys = q(json!([{"role": "system", "content": "be brief"}, {"role": "user", "content": "reset my password"}])).unwrap();
        assert_ne!(sys.partition, a.partition);
        let turns = |first: &str| {
            q(json!([
                {"role": "user", "content": first},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "reset my password"}
            ]))
            .unwrap()
            .partition
        };
        assert_eq!(turns("I am Ada"), turns("I am Ada"));
        assert_ne!(turns("I am Ada"), turns("I am Bob"));
        // Not a user message of text: no semantic lookup.
        assert!(
            q(json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]))
                .is_none()
        );
        assert!(q(json!([{"role": "user", "content": "   "}])).is_none());
        assert!(q(json!([{"role": "user", "content": "x".repeat(MAX_TEXT + 1)}])).is_none());
    }
}
