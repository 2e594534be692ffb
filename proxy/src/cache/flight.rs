//! In-flight deduplication on one replica: the first request of an exact key leads (calls
//! the provider); identical requests that arrive while it is in flight follow it.
//!
//! A streamed answer is driven by a task of its own, not by the leader's caller, and fanned
//! out: every subscriber (the leader's caller included) reads the chunks received so far,
//! then the live ones, so a follower that joins late misses nothing and none waits for the
//! end. The task stops, dropping the upstream (which cancels it at the provider), when every
//! subscriber has gone.
//!
//! When the leader fails:
//! - before any answer (refused, no budget, every attempt failed): followers are not given
//!   its error; each asks again, so one of them leads the next try and the rest follow it.
//!   A leader's refusal can be its own (its tenant's deadline, its tier), not theirs.
//! - after its stream began: every subscriber gets the same error after the chunks it has
//!   (what the leader's caller gets); nothing is stored.
//! - with an answer cut short (no finish reason; a stream that ended without one, or a
//!   whole answer without one): the leader's caller gets it as it came; followers of a
//!   stream get an error after the chunks, followers of a whole answer ask again; nothing
//!   is stored.
//!
//! A finished answer stays joinable for the policy's dedup window after it ended, then the
//! flight is forgotten (the exact cache, when on, keeps the answer longer).
//!
//! **Memory.** What a flight holds (its chunks so far, or its whole answer) is counted in
//! [`Flights::bytes`] for as long as it is held (until the flight is forgotten and its last
//! reader is gone). The cache charges it to the policy's `maxBytes` ([`super::memory`]
//! evicts stored answers to make room for it), and a finished flight is kept for its window
//! only while flights hold less than [`Flights::set_limit`]'s bound; past it, it is forgotten
//! at once (later identical requests lead again or hit the exact cache). What is still in
//! flight is not cut: it is bounded by the answers being streamed at once.

use super::answer::{Answer, Assembler};
use super::key::Key;
use crate::providers::ProviderError;
use crate::providers::types::{ChatChunk, Usage};
use crate::route::ChunkStream;
use futures::StreamExt as _;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// The flights of this replica, by exact key.
#[derive(Debug)]
pub struct Flights {
    map: Mutex<HashMap<Key, Arc<Flight>>>,
    /// Bytes the flights hold (chunks and whole answers), shared with the memory store.
    bytes: Arc<AtomicUsize>,
    /// Past this many bytes held, a finished flight is not kept for its window.
    limit: AtomicUsize,
}

impl Default for Flights {
    fn default() -> Self {
        Self {
            map: Mutex::default(),
            bytes: Arc::default(),
            limit: AtomicUsize::new(usize::MAX),
        }
    }
}

/// One answer in flight (or just finished).
#[derive(Debug)]
pub struct Flight {
    data: Mutex<Data>,
    tx: watch::Sender<u64>,
    /// The flights' count of bytes held, which this flight's `Data::bytes` are part of.
    held: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Data {
    meta: Option<Meta>,
    body: Body,
    end: Option<End>,
    ended_at: Option<Instant>,
    /// Bytes of `body`, as counted in the flights' total.
    bytes: usize,
}

impl Drop for Flight {
    fn drop(&mut self) {
        let bytes = self
            .data
            .get_mut()
            .map_or_else(|p| p.into_inner().bytes, |d| d.bytes);
        let left = self.held.fetch_sub(bytes, Ordering::Relaxed) - bytes;
        super::metrics::get().flight_bytes.set(left as i64);
    }
}

/// About what a chunk holds in memory: its struct, its strings, its choices' text.
pub fn chunk_bytes(chunk: &ChatChunk) -> usize {
    let value = |m: &serde_json::Map<String, serde_json::Value>| {
        if m.is_empty() {
            0
        } else {
            serde_json::to_vec(m).map_or(0, |v| v.len())
        }
    };
    let choices: usize = chunk
        .choices
        .iter()
        .map(|c| {
            let d = &c.delta;
            std::mem::size_of_val(c)
                + d.content.as_ref().map_or(0, String::len)
                + d.refusal.as_ref().map_or(0, String::len)
                + d.tool_calls
                    .as_ref()
                    .and_then(|t| serde_json::to_vec(t).ok())
                    .map_or(0, |v| v.len())
                + c.logprobs
                    .as_ref()
                    .and_then(|l| serde_json::to_vec(l).ok())
                    .map_or(0, |v| v.len())
                + value(&d.extra)
                + value(&c.extra)
        })
        .sum();
    std::mem::size_of::<ChatChunk>()
        + chunk.id.len()
        + chunk.object.len()
        + chunk.model.len()
        + choices
        + value(&chunk.usage_details)
        + value(&chunk.extra)
}

/// Who answered the leader.
#[derive(Debug, Clone)]
pub struct Meta {
    /// The provider.
    pub provider: Arc<str>,
    /// The key's display name.
    pub key: Arc<str>,
}

#[derive(Debug, Default)]
enum Body {
    #[default]
    Pending,
    Chunks(Vec<ChatChunk>),
    Whole(Arc<Answer>),
}

#[derive(Debug, Clone)]
enum End {
    Done,
    /// The stream ended cleanly but without a finish reason: the leader's caller sees the
    /// end as it came; followers get an error (an answer cut short is not passed on).
    Incomplete,
    Failed(ProviderError),
    /// The leader got no answer: followers ask again.
    NotStarted,
}

/// What a follower's wait for its leader came to.
#[derive(Debug)]
pub enum Waited {
    /// The answer began: who answers it.
    Started(Meta),
    /// The leader got no answer: ask again.
    AskAgain,
    /// The follower's deadline passed first.
    TimedOut,
}

/// What a request is in its flight.
#[derive(Debug)]
pub enum Role {
    /// It calls the provider; the others wait for it.
    Lead(Leader),
    /// It waits for the leader of this flight.
    Follow(Follower),
}

/// A follower's flight, and its place among the flight's readers, taken when it joined
/// (under the flights' lock): a stream's driver stops the upstream when nobody reads, and
/// would otherwise find nobody between the join and the follower's own subscription (the
/// leader's caller gone), failing the follower for nothing.
#[derive(Debug)]
pub struct Follower {
    flight: Arc<Flight>,
    _reading: watch::Receiver<u64>,
}

impl std::ops::Deref for Follower {
    type Target = Arc<Flight>;

    fn deref(&self) -> &Arc<Flight> {
        &self.flight
    }
}

/// The leader's handle. Dropped without an answer, it tells its followers to ask again.
#[derive(Debug)]
pub struct Leader {
    flights: Arc<Flights>,
    key: Key,
    flight: Arc<Flight>,
    /// Cleared once the flight has an answer (the drop then does nothing).
    armed: bool,
}

impl Flights {
    /// Joins the flight of `key` if one is in flight, or ended well less than `window` ago;
    /// else starts one and leads it.
    pub fn join(self: &Arc<Self>, key: Key, window: Duration) -> Role {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(flight) = map.get(&key)
            && flight.joinable(window)
        {
            return Role::Follow(Follower {
                flight: flight.clone(),
                _reading: flight.tx.subscribe(),
            });
        }
        let flight = Arc::new(Flight {
            data: Mutex::default(),
            tx: watch::Sender::new(0),
            held: self.bytes.clone(),
        });
        map.insert(key, flight.clone());
        Role::Lead(Leader {
            flights: self.clone(),
            key,
            flight,
            armed: true,
        })
    }

    /// Flights held now (in flight, or finished within their window and not yet forgotten).
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no flight is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the flights hold now (chunks so far and whole answers, until forgotten and
    /// unread).
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The count behind [`Flights::bytes`], for the memory store to charge.
    pub fn held(&self) -> Arc<AtomicUsize> {
        self.bytes.clone()
    }

    /// Past `bytes` held, finished flights are forgotten at once instead of after their
    /// window.
    pub fn set_limit(&self, bytes: usize) {
        self.limit.store(bytes, Ordering::Relaxed);
    }

    fn over_limit(&self) -> bool {
        self.bytes() > self.limit.load(Ordering::Relaxed)
    }

    fn forget(&self, key: &Key, flight: &Arc<Flight>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if map.get(key).is_some_and(|f| Arc::ptr_eq(f, flight)) {
            map.remove(key);
        }
    }
}

impl Flight {
    fn lock(&self) -> std::sync::MutexGuard<'_, Data> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn joinable(&self, window: Duration) -> bool {
        let data = self.lock();
        match (&data.end, data.ended_at) {
            (None, _) => true,
            (Some(End::Done), Some(at)) => at.elapsed() < window,
            _ => false,
        }
    }

    fn update(&self, f: impl FnOnce(&mut Data)) {
        f(&mut self.lock());
        self.tx.send_modify(|v| *v += 1);
    }

    /// Counts `bytes` more held by this flight (under its lock, `data`).
    fn charge(&self, data: &mut Data, bytes: usize) {
        data.bytes += bytes;
        let now = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        super::metrics::get().flight_bytes.set(now as i64);
    }

    fn end(&self, end: End) {
        self.update(|d| {
            if d.end.is_none() {
                d.end = Some(end);
                d.ended_at = Some(Instant::now());
            }
        });
    }

    /// Waits until the leader has an answer under way: who answers it, or `None` when the
    /// leader got none (ask again).
    pub async fn started(&self) -> Option<Meta> {
        let mut rx = self.tx.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let data = self.lock();
                if let Some(meta) = &data.meta {
                    return Some(meta.clone());
                }
                if data.end.is_some() {
                    return None;
                }
            }
            rx.changed().await.ok()?;
        }
    }

    /// Waits until the leader has an answer under way, at most until `deadline` (the
    /// follower's own: how long its caller may wait for an answer to begin).
    pub async fn started_by(&self, deadline: Instant) -> Waited {
        match tokio::time::timeout_at(deadline, self.started()).await {
            Ok(Some(meta)) => Waited::Started(meta),
            Ok(None) => Waited::AskAgain,
            Err(_) => Waited::TimedOut,
        }
    }

    /// [`Flight::whole`], at most until `deadline`: past it, [`ProviderError::Timeout`].
    pub async fn whole_by(&self, deadline: Instant) -> Result<Arc<Answer>, ProviderError> {
        tokio::time::timeout_at(deadline, self.whole())
            .await
            .unwrap_or(Err(ProviderError::Timeout))
    }

    /// Waits for the whole answer: assembled from the chunks when it streamed.
    pub async fn whole(&self) -> Result<Arc<Answer>, ProviderError> {
        let mut rx = self.tx.subscribe();
        loop {
            rx.borrow_and_update();
            {
                let data = self.lock();
                match (&data.end, &data.body) {
                    (Some(End::Done), Body::Whole(answer)) => return Ok(answer.clone()),
                    (Some(End::Done), Body::Chunks(chunks)) => {
                        let mut asm = Assembler::default();
                        chunks.iter().for_each(|c| asm.push(c));
                        return asm.finish().map(Arc::new).ok_or(ProviderError::Truncated);
                    }
                    (Some(End::Failed(e)), _) => return Err(e.clone()),
                    (Some(_), _) => return Err(ProviderError::Truncated),
                    (None, _) => {}
                }
            }
            if rx.changed().await.is_err() {
                return Err(ProviderError::Truncated);
            }
        }
    }

    /// The answer as a stream for a caller who asked for `model`: the chunks so far, then
    /// the live ones (a whole answer is replayed as chunks). Without `include_usage`, usage
    /// is left out.
    pub fn subscribe(self: &Arc<Self>, model: &str, include_usage: bool) -> ChunkStream {
        self.subscribe_as(model, include_usage, false)
    }

    /// As [`Flight::subscribe`], and `counted` is given the answer's usage (whether or not
    /// the caller sees it) once it comes: what a follower's answer would have cost.
    pub fn subscribe_counted(
        self: &Arc<Self>,
        model: &str,
        include_usage: bool,
        counted: impl FnOnce(&Usage) + Send + 'static,
    ) -> ChunkStream {
        self.reader(model, include_usage, false, Some(Box::new(counted)))
    }

    fn subscribe_as(self: &Arc<Self>, model: &str, include_usage: bool, own: bool) -> ChunkStream {
        self.reader(model, include_usage, own, None)
    }

    fn reader(
        self: &Arc<Self>,
        model: &str,
        include_usage: bool,
        own: bool,
        counted: Option<Counted>,
    ) -> ChunkStream {
        let state = Reader {
            flight: self.clone(),
            rx: self.tx.subscribe(),
            next: 0,
            replay: None,
            model: model.to_owned(),
            include_usage,
            over: false,
            own,
            counted,
        };
        Box::pin(futures::stream::unfold(state, Reader::next))
    }
}

struct Reader {
    flight: Arc<Flight>,
    rx: watch::Receiver<u64>,
    next: usize,
    replay: Option<VecDeque<ChatChunk>>,
    model: String,
    include_usage: bool,
    over: bool,
    /// The leader's own caller.
    own: bool,
    /// Given the answer's usage when it comes.
    counted: Option<Counted>,
}

/// What a reader gives the answer's usage to.
type Counted = Box<dyn FnOnce(&Usage) + Send>;

type Item = Result<ChatChunk, ProviderError>;

impl Reader {
    async fn next(mut self) -> Option<(Item, Self)> {
        loop {
            if self.over {
                return None;
            }
            if let Some(chunk) = self.replay.as_mut().and_then(VecDeque::pop_front) {
                return Some((Ok(chunk), self));
            }
            if self.replay.is_some() {
                return None;
            }
            self.rx.borrow_and_update();
            let step = self.step();
            match step {
                Step::Chunk(mut chunk) => {
                    if let Some(usage) = &chunk.usage {
                        self.count(usage);
                    }
                    chunk.model.clone_from(&self.model);
                    if !self.include_usage {
                        chunk.usage = None;
                        if chunk.choices.is_empty() {
                            continue;
                        }
                    }
                    return Some((Ok(chunk), self));
                }
                Step::Replay(chunks, usage) => {
                    if let Some(usage) = &usage {
                        self.count(usage);
                    }
                    self.replay = Some(chunks.into());
                }
                Step::End => return None,
                Step::Failed(e) => {
                    self.over = true;
                    return Some((Err(e), self));
                }
                Step::Wait => {
                    if self.rx.changed().await.is_err() {
                        self.over = true;
                        return Some((Err(ProviderError::Truncated), self));
                    }
                }
            }
        }
    }

    fn count(&mut self, usage: &Usage) {
        if let Some(counted) = self.counted.take() {
            counted(usage);
        }
    }

    fn step(&mut self) -> Step {
        let data = self.flight.lock();
        match &data.body {
            Body::Chunks(chunks) => {
                if let Some(chunk) = chunks.get(self.next) {
                    self.next += 1;
                    return Step::Chunk(chunk.clone());
                }
            }
            Body::Whole(answer) => {
                return Step::Replay(
                    answer.chunks(&self.model, self.include_usage),
                    answer.response.usage,
                );
            }
            Body::Pending => {}
        }
        match &data.end {
            Some(End::Done) => Step::End,
            Some(End::Incomplete) if self.own => Step::End,
            Some(End::Incomplete) => Step::Failed(ProviderError::Truncated),
            Some(End::Failed(e)) => Step::Failed(e.clone()),
            Some(End::NotStarted) => Step::Failed(ProviderError::Truncated),
            None => Step::Wait,
        }
    }
}

enum Step {
    Chunk(ChatChunk),
    Replay(Vec<ChatChunk>, Option<Usage>),
    End,
    Failed(ProviderError),
    Wait,
}

impl Leader {
    /// The flight this leader leads.
    pub fn flight(&self) -> &Arc<Flight> {
        &self.flight
    }

    /// The leader's whole answer: followers get it; the flight stays joinable for `window`.
    /// An answer without a finish reason (cut short) is not passed on: followers ask again.
    pub fn complete(self, meta: Meta, answer: Arc<Answer>, window: Duration, tasks: &TaskTracker) {
        if !answer.is_complete() {
            // Dropped armed: the flight ends without an answer and is forgotten.
            return;
        }
        let bytes = std::mem::size_of::<Answer>() + answer.to_bytes().len();
        let flight = &self.flight;
        flight.update(|d| {
            d.meta = Some(meta);
            d.body = Body::Whole(answer);
            flight.charge(d, bytes);
        });
        self.flight.end(End::Done);
        self.forget_after(window, tasks);
    }

    /// The leader's stream: driven by a task of `tasks` and fanned out. Returns the leader's
    /// own subscription (for a caller who asked for `model`, with usage if `include_usage`).
    /// `stored` gets the whole answer after a clean end, never after a break.
    pub fn stream(
        self,
        meta: Meta,
        upstream: ChunkStream,
        reader: (&str, bool),
        window: Duration,
        tasks: &TaskTracker,
        stored: impl FnOnce(Answer) + Send + 'static,
    ) -> ChunkStream {
        self.flight.update(|d| {
            d.meta = Some(meta);
            d.body = Body::Chunks(Vec::new());
        });
        // Subscribed before the task starts, so that it never sees nobody listening.
        let own = self.flight.subscribe_as(reader.0, reader.1, true);
        let tracker = tasks.clone();
        tasks.spawn(async move {
            if let Some(answer) = drive(&self.flight, upstream).await {
                stored(answer);
            }
            self.forget_after(window, &tracker);
        });
        own
    }

    fn forget_after(mut self, window: Duration, tasks: &TaskTracker) {
        self.armed = false;
        let (flights, key, flight) = (self.flights.clone(), self.key, self.flight.clone());
        if window.is_zero() || flights.over_limit() {
            // Not kept: flights hold more than the cache may (or no window).
            flights.forget(&key, &flight);
            return;
        }
        tasks.spawn(async move {
            tokio::time::sleep(window).await;
            flights.forget(&key, &flight);
        });
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        self.flight.end(End::NotStarted);
        self.flights.forget(&self.key, &self.flight);
    }
}

/// Reads `upstream` into `flight` until it ends, breaks, or nobody listens any more.
/// Returns the whole answer after a clean, complete end.
async fn drive(flight: &Flight, mut upstream: ChunkStream) -> Option<Answer> {
    let mut asm = Assembler::default();
    loop {
        tokio::select! {
            item = upstream.next() => match item {
                Some(Ok(chunk)) => {
                    asm.push(&chunk);
                    let bytes = chunk_bytes(&chunk);
                    flight.update(|d| {
                        if let Body::Chunks(chunks) = &mut d.body {
                            chunks.push(chunk);
                            flight.charge(d, bytes);
                        }
                    });
                }
                Some(Err(e)) => {
                    flight.end(End::Failed(e));
                    return None;
                }
                None => {
                    let answer = asm.finish().filter(Answer::is_complete);
                    flight.end(if answer.is_some() { End::Done } else { End::Incomplete });
                    return answer;
                }
            },
            () = flight.tx.closed() => {
                // Every caller hung up: dropping the upstream cancels it at the provider.
                flight.end(End::Failed(ProviderError::Truncated));
                return None;
            }
        }
    }
}
