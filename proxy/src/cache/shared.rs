//! In-flight deduplication across replicas, through Redis: the replica whose request
//! takes a flight's lease (`SET NX PX`, the value a token of its own) leads it and appends
//! every entry of its answer to the flight's log (named by the token) (who answers, each chunk, then how it ended), renewing the lease and
//! saying so on the flight's channel. Another replica with the same request reads the log
//! from its start (so it misses nothing) and then each time the channel speaks (or every
//! 250 ms), and fans it out to its own waiters as a local flight.
//!
//! If the leader gets no answer, its followers on every replica ask again. If it dies, its
//! lease lapses ([`LEASE`] after its last entry) and followers still waiting for an answer
//! ask again; those mid-stream get an error. After a clean end the lease and the log are
//! kept for the dedup window (from the end), so a request on any replica arriving just after
//! the end finds the lease taken and is answered from the log, with no second provider call
//! (whether or not the exact cache is on, or its write has landed). After an answer that
//! broke, or none, the lease is released at once: the next request leads.

use super::flight::Meta;
use super::key::Key;
use super::redis::{LeaseAfter, RedisStore};
use crate::providers::{ChatChunk, ProviderError};
use crate::route::ChunkStream;
use futures::{Stream, StreamExt as _};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

/// How long a leader's lease lasts after its last entry.
pub const LEASE: Duration = Duration::from_secs(30);

/// How often a follower looks at the log when the channel is silent.
const POLL: Duration = Duration::from_millis(250);

/// One entry of a flight's log.
#[derive(Debug, Serialize, Deserialize)]
enum Entry {
    /// Who answers: the leader's route began an answer.
    Meta { provider: String, key: String },
    /// A chunk of the answer, in OpenAI's shape.
    Chunk(serde_json::Value),
    /// The answer ended cleanly.
    Done,
    /// The answer broke after it began.
    Failed,
    /// The leader got no answer: ask again.
    None,
}

/// The leader's side: entries go to Redis in order, from a task of their own.
#[derive(Debug, Clone)]
pub struct Mirror {
    tx: mpsc::UnboundedSender<Entry>,
}

impl Mirror {
    /// Starts publishing the flight `token` of `key`, keeping its log for `keep` after the
    /// end, and after a clean end its lease too (so the answer is followed, not asked for
    /// again, for that long; `keep` zero releases it at once).
    pub fn start(
        store: Arc<RedisStore>,
        (key, token): (Key, String),
        keep: Duration,
        tasks: &TaskTracker,
    ) -> Self {
        let (tx, mut rx) = mpsc::unbounded_channel::<Entry>();
        tasks.spawn(async move {
            let mut ended = false;
            while let Some(entry) = rx.recv().await {
                let after = match entry {
                    Entry::Done if !keep.is_zero() => LeaseAfter::Keep,
                    Entry::Done | Entry::Failed | Entry::None => LeaseAfter::Release,
                    Entry::Meta { .. } | Entry::Chunk(_) => LeaseAfter::Renew,
                };
                let last = after != LeaseAfter::Renew;
                let bytes = serde_json::to_vec(&entry).unwrap_or_default();
                if let Err(e) = store
                    .publish((&key, &token), bytes, keep, LEASE, after)
                    .await
                {
                    tracing::debug!(error = %e, "publishing a shared flight failed");
                }
                if last {
                    ended = true;
                    break;
                }
            }
            if !ended {
                // Dropped before its end (the leader went away).
                let bytes = serde_json::to_vec(&Entry::Failed).unwrap_or_default();
                let _ = store
                    .publish((&key, &token), bytes, keep, LEASE, LeaseAfter::Release)
                    .await;
            }
        });
        Mirror { tx }
    }

    /// The leader's answer began.
    pub fn meta(&self, meta: &Meta) {
        let _ = self.tx.send(Entry::Meta {
            provider: meta.provider.to_string(),
            key: meta.key.to_string(),
        });
    }

    /// The leader got no answer.
    pub fn none(&self) {
        let _ = self.tx.send(Entry::None);
    }

    /// A whole answer, as chunks, then its end.
    pub fn whole(&self, chunks: &[ChatChunk]) {
        for chunk in chunks {
            self.chunk(chunk);
        }
        let _ = self.tx.send(Entry::Done);
    }

    fn chunk(&self, chunk: &ChatChunk) {
        if let Ok(v) = serde_json::to_value(chunk) {
            let _ = self.tx.send(Entry::Chunk(v));
        }
    }

    /// `upstream`, published as it passes.
    pub fn tee(self, upstream: ChunkStream) -> ChunkStream {
        Box::pin(Published {
            inner: upstream,
            mirror: Some(self),
            finished: false,
        })
    }
}

struct Published {
    inner: ChunkStream,
    mirror: Option<Mirror>,
    /// A chunk gave a finish reason: an end after it is a complete answer.
    finished: bool,
}

impl Stream for Published {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => {
                let finished = chunk.choices.iter().any(|c| c.finish_reason.is_some());
                if let Some(m) = &self.mirror {
                    m.chunk(chunk);
                }
                self.finished |= finished;
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(m) = self.mirror.take() {
                    let _ = m.tx.send(Entry::Failed);
                }
            }
            Poll::Ready(None) => {
                if let Some(m) = self.mirror.take() {
                    // Cut short (no finish reason): followers elsewhere get an error.
                    let end = if self.finished {
                        Entry::Done
                    } else {
                        Entry::Failed
                    };
                    let _ = m.tx.send(end);
                }
            }
            Poll::Pending => {}
        }
        item
    }
}

/// The follower's side: waits for the leader's answer to begin; `None` if it got none (or
/// went away without one): ask again.
pub async fn follow(store: Arc<RedisStore>, key: Key) -> Option<(Meta, ChunkStream)> {
    // The flight leading now: its own log, never a later flight's.
    let token = store.lease_holder(&key).await.ok()??;
    let mut reader = Reader {
        sub: store.subscribe((&key, &token)).await.ok()?,
        store,
        key,
        token,
        next: 0,
        pending: VecDeque::new(),
    };
    let meta = match reader.next_entry().await? {
        Entry::Meta { provider, key } => Meta {
            provider: Arc::from(provider),
            key: Arc::from(key),
        },
        _ => return None,
    };
    let chunks = futures::stream::unfold(Some(reader), |reader| async move {
        let mut reader = reader?;
        match reader.next_entry().await {
            Some(Entry::Chunk(v)) => match serde_json::from_value::<ChatChunk>(v) {
                Ok(chunk) => Some((Ok(chunk), Some(reader))),
                Err(_) => Some((Err(ProviderError::Truncated), None)),
            },
            Some(Entry::Done) => None,
            _ => Some((Err(ProviderError::Truncated), None)),
        }
    });
    Some((meta, Box::pin(chunks)))
}

struct Reader {
    store: Arc<RedisStore>,
    sub: redis::aio::PubSubStream,
    key: Key,
    token: String,
    next: usize,
    pending: VecDeque<Entry>,
}

impl Reader {
    /// The next entry of the log; `None` when the lease lapsed with no entry to come.
    async fn next_entry(&mut self) -> Option<Entry> {
        loop {
            if let Some(entry) = self.pending.pop_front() {
                return Some(entry);
            }
            let flight = (&self.key, self.token.as_str());
            let entries = self.store.log(flight, self.next).await.ok()?;
            self.next += entries.len();
            self.pending.extend(
                entries
                    .iter()
                    .filter_map(|bytes| serde_json::from_slice::<Entry>(bytes).ok()),
            );
            if !self.pending.is_empty() {
                continue;
            }
            if !self.store.leased(flight).await.ok()? {
                // Lapsed, or another flight leads now: one last look at this flight's log,
                // in case its end landed in between.
                let entries = self.store.log(flight, self.next).await.ok()?;
                self.next += entries.len();
                self.pending.extend(
                    entries
                        .iter()
                        .filter_map(|bytes| serde_json::from_slice::<Entry>(bytes).ok()),
                );
                if self.pending.is_empty() {
                    return None;
                }
                continue;
            }
            let _ = tokio::time::timeout(POLL, self.sub.next()).await;
        }
    }
}
