//! Client connections: accepting them under a cap, serving HTTP/1.1 and HTTP/2 (prior
//! knowledge) on each, and closing the ones that hold the gateway without using it.
//!
//! Bounds, so that a slow or idle client holds at most one connection slot for a bounded
//! time:
//! - **header read timeout**: a request's head must arrive whole within it, counted from the
//!   connection's accept for its first request and from the first byte for later ones;
//! - **idle timeout**: a connection with no request in flight and no byte of a new one is
//!   closed after it (keep-alive); for HTTP/2, the time between streams;
//! - **body read timeout** ([`AppState::body_timeout`](super::AppState::body_timeout)): a door
//!   reads the whole body within it, else answers 408 in its own format;
//! - **send timeout**: a response whose next part is ready must be taken by the client within
//!   it (the client reads, or opens its HTTP/2 flow-control window), else the connection is
//!   closed and the response dropped, with whatever it holds (its upstream call, its key's
//!   permit, the tenant's concurrency slot). Waiting for the upstream is not a stall: only
//!   data the client does not take counts, so a long stream that a client reads is never cut;
//! - **connection cap** ([`Connections`]), shared by every worker. At the cap a new connection
//!   takes the slot of the connection idle longest (no request in flight: a keep-alive
//!   connection between requests, or one whose head has not arrived), which is closed
//!   (`reason="evicted"`); only when every connection has a request in flight is the new one
//!   closed at once (its client sees a reset and can try another replica), counted in
//!   `floodgate_server_connections_refused_total` and logged (at most every 10 s). So idle
//!   and slow clients cannot keep new callers out: holding a slot takes a request in flight,
//!   which the other bounds limit. Eviction rather than a cap per client address, because
//!   behind a load balancer or a NAT every client shares one address: a per-address cap
//!   would shut them all out together, while eviction costs an idle client a reconnection.
//!
//! hyper's own HTTP/1 header timer is not used: it also runs while a keep-alive connection
//! waits for its next request, so it cannot tell a slow head from an idle connection. Instead
//! each connection's [`Activity`] notes requests in flight (a request is in flight until its
//! response body has been sent) and the first byte read while idle, and one timer per
//! connection closes it (gracefully: HTTP/2 gets a GOAWAY) when the bound that applies passes.

use crate::metrics;
use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http_body::Frame;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

/// Default time for a request's head to arrive whole.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a keep-alive connection may wait for its next request.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(75);
/// Default time a client may leave a ready part of its response untaken (nginx's
/// `send_timeout`).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default most connections open at once, before the file-descriptor bound
/// ([`default_max_connections`]).
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

/// How often, at most, reaching the connection cap is logged.
const CAP_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Per-connection time bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time for a request's head to arrive whole.
    pub header_read_timeout: Duration,
    /// Time a connection may wait, idle, for its next request.
    pub idle_timeout: Duration,
    /// Time a client may leave a ready part of a response untaken.
    pub send_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            send_timeout: DEFAULT_SEND_TIMEOUT,
        }
    }
}

/// The default connection cap: [`DEFAULT_MAX_CONNECTIONS`], or half the process's open-file
/// limit if that is lower (the other half is for upstream connections, Redis and files), so
/// that the cap is reached before `accept` fails for want of descriptors.
pub fn default_max_connections() -> usize {
    match open_files_limit() {
        Some(limit) => DEFAULT_MAX_CONNECTIONS.min((limit / 2).max(1)),
        None => DEFAULT_MAX_CONNECTIONS,
    }
}

/// The soft limit on open files, where the system says (Linux: `/proc/self/limits`).
fn open_files_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// The connections of the whole process: the time bounds and the cap every worker shares.
#[derive(Debug)]
pub struct Connections {
    limits: Limits,
    max: usize,
    /// The `listener` label of its metrics.
    listener: &'static str,
    slots: Arc<Semaphore>,
    last_warned: Mutex<Option<Instant>>,
    /// Every open connection's activity, by a number of its own: where eviction looks.
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    next: AtomicU64,
}

/// Whether a new connection may be served.
enum Admit {
    /// Yes, in this slot.
    Now(Slot),
    /// At the cap, a connection idle longer was asked to close: its slot comes soon.
    AfterEviction,
    /// At the cap, with a request in flight on every connection.
    Refused,
}

impl Connections {
    /// At most `max` connections at once (at least one), each bounded by `limits`, counted
    /// as the public listener's.
    pub fn new(limits: Limits, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            limits,
            max,
            listener: PUBLIC,
            slots: Arc::new(Semaphore::new(max)),
            last_warned: Mutex::new(None),
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
    /// the cap, once the connection idle longest has closed for it; else refused (counted,
    /// and logged now and then).
    fn admit(self: &Arc<Self>, activity: &Arc<Activity>) -> Admit {
        if let Ok(permit) = self.slots.clone().try_acquire_owned() {
            return Admit::Now(self.slot(permit, activity));
        }
        if self.evict_idlest() {
            return Admit::AfterEviction;
        }
        self.refused();
        Admit::Refused
    }

    /// Waits (at most the header timeout: the new client waits for its answer meanwhile) for
    /// the slot an eviction frees.
    async fn slot_after_eviction(self: &Arc<Self>, activity: &Arc<Activity>) -> Option<Slot> {
        let wait = self.slots.clone().acquire_owned();
        match tokio::time::timeout(self.limits.header_read_timeout, wait).await {
            Ok(Ok(permit)) => Some(self.slot(permit, activity)),
            _ => {
                self.refused();
                None
            }
        }
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

    /// Asks the connection idle longest (nothing in flight, not already asked) to close;
    /// `false` if there is none. A linear scan, at the cap only.
    fn evict_idlest(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let idlest = open
            .values()
            .filter(|a| a.evictable())
            .min_by_key(|a| a.quiet_since());
        match idlest {
            Some(activity) => {
                activity.evict();
                true
            }
            None => false,
        }
    }

    fn refused(&self) {
        metrics::global()
            .server_connections_refused
            .get_or_create(&self.labels())
            .inc();
        let now = Instant::now();
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|at| now.duration_since(at) >= CAP_LOG_INTERVAL) {
            *last = Some(now);
            tracing::warn!(
                listener = self.listener,
                max_connections = self.max,
                "connection limit reached with a request in flight on every connection: refusing new connections (see floodgate_server_connections_refused_total)"
            );
        }
    }
}

/// A connection's place under the cap, given back when it closes.
struct Slot {
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

/// Serves `app` on `listener` until `shutdown` is cancelled; then stops accepting, lets each
/// connection finish its requests in flight (idle ones close at once) and returns when all
/// have closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let tasks = TaskTracker::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // The header timer is ours (see the module doc).
    builder.http1().header_read_timeout(None);
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                accept_error(e).await;
                continue;
            }
        };
        let activity = Arc::new(Activity::new());
        let admitted = match connections.admit(&activity) {
            Admit::Now(slot) => Some(slot),
            Admit::AfterEviction => None,
            Admit::Refused => {
                drop(tcp);
                continue;
            }
        };
        // Without TCP_NODELAY, streamed events (small writes) wait on the client's delayed ACK.
        let _ = tcp.set_nodelay(true);
        let conn = connection(
            tcp,
            activity.clone(),
            app.clone(),
            builder.clone(),
            (connections.limits, connections.listener),
            shutdown.clone(),
        );
        let connections = connections.clone();
        tasks.spawn(async move {
            let slot = match admitted {
                Some(slot) => slot,
                None => match connections.slot_after_eviction(&activity).await {
                    Some(slot) => slot,
                    None => return,
                },
            };
            conn.await;
            drop(slot);
        });
    }
    drop(listener);
    tasks.close();
    tasks.wait().await;
    Ok(())
}

/// An `accept` error: a connection that failed before it was accepted is skipped; anything
/// else (out of file descriptors) is logged and accepting pauses a second, rather than
/// spinning.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!("accept error: {e}");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// Serves one connection until it closes, `shutdown` drains it, or a time bound closes it.
async fn connection(
    tcp: TcpStream,
    activity: Arc<Activity>,
    app: Router,
    builder: auto::Builder<TokioExecutor>,
    (limits, listener): (Limits, &'static str),
    shutdown: CancellationToken,
) {
    let io = TokioIo::new(Watched {
        inner: tcp,
        activity: activity.clone(),
    });
    let service = {
        let activity = activity.clone();
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = activity.begin();
            let app = app.clone();
            async move {
                let response = app.oneshot(req.map(Body::new)).await?;
                Ok::<_, Infallible>(response.map(|body| Body::new(InFlight::new(body, guard))))
            }
        })
    };
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);
    let expired = activity.expired(limits);
    tokio::pin!(expired);
    // Set once the connection is asked to close: then only its end is awaited, and after a
    // time bound, not for longer than another header timeout (a client that ignores a GOAWAY).
    let mut closing = false;
    let hard_stop = tokio::time::sleep(Duration::MAX);
    tokio::pin!(hard_stop);
    loop {
        tokio::select! {
            // The connection first: after a stall of the worker (an overloaded machine) a
            // head that arrived in time is read before its timer is looked at, and so is
            // not taken for a slow client's.
            biased;
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::trace!("connection ended: {e}");
                }
                return;
            }
            () = shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            reason = &mut expired, if !closing => {
                metrics::global()
                    .server_connections_closed
                    .get_or_create(&metrics::CloseLabels { listener, reason })
                    .inc();
                tracing::debug!(reason, "closing a client connection");
                if reason == HEADER_TIMEOUT
                    || reason == SEND_TIMEOUT
                    || (reason == EVICTED && activity.head_begun())
                {
                    // A head in progress is not idle to hyper: a graceful shutdown would wait
                    // for it. Nothing was asked yet, so nothing is lost by closing now. A
                    // response the client does not take would hold a graceful shutdown as
                    // long: dropping it ends its upstream call and frees what it holds. An
                    // evicted connection's head (or a new one's silence) is cut the same way.
                    return;
                }
                closing = true;
                conn.as_mut().graceful_shutdown();
                hard_stop
                    .as_mut()
                    .reset(Instant::now() + limits.header_read_timeout);
            }
            () = &mut hard_stop => return,
        }
    }
}

/// What a connection is doing, for its time bounds. Times are nanoseconds since `epoch`.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    /// Requests whose response is not yet wholly sent.
    in_flight: AtomicUsize,
    /// Responses whose last part is ready and not yet taken by the connection (it asks for
    /// the next part once it has room for it: the client read, or widened its window).
    waiting_to_send: AtomicUsize,
    /// When a response last made progress while some wait to send.
    send_since: AtomicU64,
    /// When the connection last became idle (no request in flight).
    idle_since: AtomicU64,
    /// One more than when the first byte of a request head arrived while idle; 0 if none
    /// has. The accept counts as one: a new connection's first request is bounded by the
    /// header timeout from the start.
    head_since: AtomicU64,
    /// Whether the client opened with the HTTP/2 preface: then bytes between requests are
    /// control frames (pings, window updates), not the start of a head, and only the idle
    /// timeout applies between streams.
    http2: AtomicBool,
    /// How much of the HTTP/2 preface's start (`PRI `) the first bytes matched, however the
    /// reads split them; [`PREFACE_MISSED`] once a byte did not match.
    preface: AtomicU8,
    /// Asked to close for a new connection at the cap (once nothing is in flight).
    evicted: AtomicBool,
    changed: Notify,
}

/// The start of the HTTP/2 client preface (`PRI * HTTP/2.0`): no HTTP/1 method begins so.
const PREFACE: &[u8] = b"PRI ";
/// [`Activity::preface`] once the first bytes were not the preface.
const PREFACE_MISSED: u8 = u8::MAX;

/// The `listener` label of the public listener's connections.
const PUBLIC: &str = "public";

/// Why a connection was closed (the `reason` label).
const HEADER_TIMEOUT: &str = "header_timeout";
const IDLE_TIMEOUT: &str = "idle_timeout";
const SEND_TIMEOUT: &str = "send_timeout";
const EVICTED: &str = "evicted";

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            in_flight: AtomicUsize::new(0),
            waiting_to_send: AtomicUsize::new(0),
            send_since: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_since: AtomicU64::new(1),
            http2: AtomicBool::new(false),
            preface: AtomicU8::new(0),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    /// Whether eviction may take this connection: nothing in flight, not asked already.
    fn evictable(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && !self.evicted.load(Ordering::Acquire)
    }

    /// Since when nothing was in flight: the end of its last request, or its accept.
    fn quiet_since(&self) -> Instant {
        self.at(self.idle_since.load(Ordering::Acquire))
    }

    /// Whether a request head was begun and not finished (or, on a new connection, none
    /// has arrived yet).
    fn head_begun(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0 && self.head_since.load(Ordering::Acquire) != 0
    }

    /// Asks the connection to close for a new one: at once if nothing is in flight, else
    /// when its requests end.
    fn evict(&self) {
        self.evicted.store(true, Ordering::Release);
        self.changed.notify_one();
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    fn at(&self, nanos: u64) -> Instant {
        self.epoch + Duration::from_nanos(nanos)
    }

    /// `bytes` arrived.
    fn read(&self, bytes: &[u8]) {
        self.look_for_preface(bytes);
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_since.load(Ordering::Acquire) == 0
            && !self.http2.load(Ordering::Acquire)
        {
            self.head_since.store(self.now() + 1, Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// Matches the first bytes of the connection against the HTTP/2 preface's start, across
    /// reads (a client may send it in pieces).
    fn look_for_preface(&self, bytes: &[u8]) {
        let mut matched = self.preface.load(Ordering::Acquire);
        if usize::from(matched) >= PREFACE.len() {
            return;
        }
        for &b in bytes {
            if PREFACE.get(usize::from(matched)) != Some(&b) {
                matched = PREFACE_MISSED;
                break;
            }
            matched += 1;
            if usize::from(matched) == PREFACE.len() {
                self.http2.store(true, Ordering::Release);
                break;
            }
        }
        self.preface.store(matched, Ordering::Release);
    }

    /// A request's head was read: it is in flight until the guard is dropped.
    fn begin(self: &Arc<Self>) -> Guard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        Guard(self.clone())
    }

    /// A response produced a part that is not its last: it waits for the connection to take
    /// it and ask for the next.
    fn part_ready(&self) {
        if self.waiting_to_send.fetch_add(1, Ordering::AcqRel) == 0 {
            self.send_since.store(self.now(), Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// The connection asked a waiting response for its next part (or dropped it, `taken`
    /// false): progress.
    fn part_taken(&self, taken: bool) {
        self.waiting_to_send.fetch_sub(1, Ordering::AcqRel);
        if taken {
            self.send_since.store(self.now(), Ordering::Release);
        }
        self.changed.notify_one();
    }

    /// Resolves with the reason once the bound that applies now has passed.
    async fn expired(&self, limits: Limits) -> &'static str {
        loop {
            let changed = self.changed.notified();
            if self.evicted.load(Ordering::Acquire) && self.in_flight.load(Ordering::Acquire) == 0 {
                return EVICTED;
            }
            let deadline = if self.in_flight.load(Ordering::Acquire) > 0 {
                (self.waiting_to_send.load(Ordering::Acquire) > 0).then(|| {
                    (
                        self.at(self.send_since.load(Ordering::Acquire)) + limits.send_timeout,
                        SEND_TIMEOUT,
                    )
                })
            } else {
                match self.head_since.load(Ordering::Acquire) {
                    0 => Some((
                        self.at(self.idle_since.load(Ordering::Acquire)) + limits.idle_timeout,
                        IDLE_TIMEOUT,
                    )),
                    head => Some((
                        self.at(head - 1) + limits.header_read_timeout,
                        HEADER_TIMEOUT,
                    )),
                }
            };
            match deadline {
                None => changed.await,
                Some((at, reason)) => {
                    if Instant::now() >= at {
                        return reason;
                    }
                    tokio::select! {
                        () = changed => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
            }
        }
    }
}

/// A request in flight on a connection.
#[derive(Debug)]
struct Guard(Arc<Activity>);

impl Drop for Guard {
    fn drop(&mut self) {
        let activity = &self.0;
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.idle_since.store(activity.now(), Ordering::Release);
            activity.head_since.store(0, Ordering::Release);
            activity.changed.notify_one();
        }
    }
}

/// A response body that keeps its request in flight until its last frame is sent, and tells
/// the connection's [`Activity`] when a frame it produced waits to be taken.
struct InFlight {
    inner: Body,
    guard: Option<Guard>,
    /// Its last frame was produced and the connection has not asked for the next yet.
    waiting: bool,
}

impl InFlight {
    fn new(inner: Body, guard: Guard) -> Self {
        Self {
            inner,
            guard: Some(guard),
            waiting: false,
        }
    }

    fn stop_waiting(&mut self, taken: bool) {
        if std::mem::take(&mut self.waiting)
            && let Some(guard) = &self.guard
        {
            guard.0.part_taken(taken);
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.stop_waiting(false);
    }
}

impl http_body::Body for InFlight {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        self.stop_waiting(true);
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.inner.is_end_stream() {
            self.guard = None;
        } else if let (Poll::Ready(Some(Ok(_))), Some(guard)) = (&polled, &self.guard) {
            guard.0.part_ready();
            self.waiting = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// A client socket that tells its [`Activity`] when bytes arrive.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests;
