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
//! - **connection cap** ([`Connections`], in `cap.rs`), shared by every worker. At the cap a
//!   new connection takes the slot of the connection idle longest (no request in flight: a
//!   keep-alive connection between requests, or one whose head has not arrived), else of the
//!   one whose request bodies arrive slowest (all its requests still receiving their body:
//!   nothing of them has gone upstream), which is closed (`reason="evicted"`, logged at most
//!   every 10 s); only when every connection has a request past its body is the new one
//!   closed at once (its client sees a reset and can try another replica), counted in
//!   `floodgate_server_connections_refused_total` and logged (at most every 10 s). So idle
//!   and slow clients cannot keep new callers out: holding a slot at the cap takes a request
//!   whose body has arrived, which the other bounds limit. Eviction rather than a cap per
//!   client address, because behind a load balancer or a NAT every client shares one
//!   address: a per-address cap would shut them all out together, while eviction costs an
//!   idle client a reconnection and a trickling upload its request.
//!
//! HTTP/2 has no header timeout per stream: hyper's server offers none, and h2 hands a
//! stream to hyper only once its header block is whole, so no timer of ours sees it begin.
//! What bounds a header block that never ends: h2's 16 KiB header-list limit (and its count
//! of CONTINUATION frames), and the connection's own bounds, since a header block in progress
//! stops every other frame of its connection (RFC 9113 6.10): its streams' bodies stall into
//! their body timeout, and with nothing in flight the connection is idle (the idle timeout,
//! and eviction at the cap).
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
use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

mod cap;

use cap::Admit;
pub use cap::Connections;

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
            Admit::Now(slot) => Ok(slot),
            Admit::AfterEviction(evicted) => Err(evicted),
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
                Ok(slot) => slot,
                Err(evicted) => match connections.slot_after_eviction(&activity, evicted).await {
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
            let body_pending = !http_body::Body::is_end_stream(req.body());
            let (guard, receipt) = activity.begin(body_pending);
            let req = req.map(|body| Body::new(Arriving::new(body, receipt)));
            let app = app.clone();
            async move {
                let response = app.oneshot(req).await?;
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
                    || (reason == EVICTED && (activity.head_begun() || activity.receiving_only()))
                {
                    // A head in progress is not idle to hyper: a graceful shutdown would wait
                    // for it. Nothing was asked yet, so nothing is lost by closing now. A
                    // response the client does not take would hold a graceful shutdown as
                    // long: dropping it ends its upstream call and frees what it holds. An
                    // evicted connection's head (or a new one's silence), and its requests
                    // still receiving their bodies (nothing of them went upstream), are cut
                    // the same way.
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
    /// Requests in flight whose body has not arrived whole.
    receiving: AtomicUsize,
    /// When `receiving` last rose from 0, and the bytes read since while it stayed above 0:
    /// how fast the connection's bodies arrive.
    receiving_since: AtomicU64,
    body_bytes: AtomicU64,
    /// Asked to close for a new connection at the cap (once nothing is in flight, or at once
    /// while its requests only receive their bodies).
    evicted: AtomicBool,
    changed: Notify,
    /// Pulsed when a connection asked to close takes a request past its body instead.
    kept: Notify,
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
            receiving: AtomicUsize::new(0),
            receiving_since: AtomicU64::new(0),
            body_bytes: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            changed: Notify::new(),
            kept: Notify::new(),
        }
    }

    /// Whether nothing is in flight.
    fn idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Whether requests are in flight and every one is still receiving its body: nothing of
    /// them has gone upstream.
    fn receiving_only(&self) -> bool {
        let in_flight = self.in_flight.load(Ordering::Acquire);
        in_flight > 0 && self.receiving.load(Ordering::Acquire) >= in_flight
    }

    /// Whether closing the connection now loses nothing but what its client has not
    /// finished sending: idle, or only receiving bodies.
    fn closable(&self) -> bool {
        self.idle() || self.receiving_only()
    }

    /// Whether eviction may take this connection: closable, not asked already.
    fn evictable(&self) -> bool {
        self.closable() && !self.evicted.load(Ordering::Acquire)
    }

    /// Body bytes per second since its bodies began arriving.
    fn body_rate(&self, now: Instant) -> f64 {
        let since = self.at(self.receiving_since.load(Ordering::Acquire));
        let secs = now.saturating_duration_since(since).as_secs_f64().max(1e-3);
        self.body_bytes.load(Ordering::Acquire) as f64 / secs
    }

    /// Returns once this connection, asked to close, has taken a request past its body
    /// instead (its client sent one just then): it will not close soon.
    async fn kept_instead(&self) {
        loop {
            let kept = self.kept.notified();
            tokio::pin!(kept);
            kept.as_mut().enable();
            if !self.closable() {
                return;
            }
            kept.await;
        }
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

    /// Asks the connection to close for a new one: at once if nothing is in flight or its
    /// requests only receive their bodies, else when its requests end.
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
        if self.receiving.load(Ordering::Acquire) > 0 {
            let n = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
            self.body_bytes.fetch_add(n, Ordering::AcqRel);
        }
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

    /// A request's head was read: it is in flight until the guard is dropped, and (when
    /// `body_pending`) receiving its body until the receipt is.
    fn begin(self: &Arc<Self>, body_pending: bool) -> (Guard, Option<Receipt>) {
        let receipt = body_pending.then(|| {
            if self.receiving.fetch_add(1, Ordering::AcqRel) == 0 {
                self.body_bytes.store(0, Ordering::Release);
                self.receiving_since.store(self.now(), Ordering::Release);
            }
            Receipt(self.clone())
        });
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_since.store(0, Ordering::Release);
        self.became_busy();
        (Guard(self.clone()), receipt)
    }

    /// If this connection was asked to close and now holds a request past its body, whoever
    /// waits for its slot looks elsewhere.
    fn became_busy(&self) {
        if self.evicted.load(Ordering::Acquire) && !self.closable() {
            self.kept.notify_waiters();
        }
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
            if self.evicted.load(Ordering::Acquire) && self.closable() {
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

/// A request whose body is arriving on a connection, until it has arrived whole (or was
/// dropped unread).
#[derive(Debug)]
struct Receipt(Arc<Activity>);

impl Drop for Receipt {
    fn drop(&mut self) {
        self.0.receiving.fetch_sub(1, Ordering::AcqRel);
        self.0.became_busy();
    }
}

/// A request body that tells its connection's [`Activity`] once it has arrived whole.
struct Arriving {
    inner: Incoming,
    receipt: Option<Receipt>,
}

impl Arriving {
    fn new(inner: Incoming, receipt: Option<Receipt>) -> Self {
        Self { inner, receipt }
    }
}

impl http_body::Body for Arriving {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) || self.inner.is_end_stream() {
            self.receipt = None;
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
