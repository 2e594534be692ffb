//! The connection bounds against real loopback sockets, with short bounds (hundreds of
//! milliseconds): each test waits for the server to close the connection (a read that ends)
//! and checks when it did.

use super::*;
use axum::routing::get;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const HEADER: Duration = Duration::from_millis(300);
const IDLE: Duration = Duration::from_millis(900);
const SEND: Duration = Duration::from_millis(400);
/// Longest any wait here may take before the test fails.
const PATIENCE: Duration = Duration::from_secs(10);

/// Serves a `/hello` route with `limits` and `max` connections; the token stops it.
async fn server(limits: Limits, max: usize) -> (SocketAddr, CancellationToken) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route("/hello", get(|| async { "hello" }));
    let stop = CancellationToken::new();
    let connections = Arc::new(Connections::new(limits, max));
    tokio::spawn(serve(listener, app, connections, stop.clone()));
    (addr, stop)
}

fn limits() -> Limits {
    Limits {
        header_read_timeout: HEADER,
        idle_timeout: IDLE,
        send_timeout: SEND,
    }
}

/// Reads until the server closes the connection; returns what it sent. Fails the test if
/// it stays open for [`PATIENCE`].
async fn until_closed(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 1024];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the server kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

/// Sends one keep-alive GET and reads its whole answer (a fixed-length body).
async fn hello(tcp: &mut TcpStream) {
    tcp.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("hello") {
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
}

fn closed_total(reason: &'static str) -> u64 {
    metrics::global()
        .server_connections_closed
        .get_or_create(&metrics::CloseLabels {
            listener: PUBLIC,
            reason,
        })
        .get()
}

fn refused_total(listener: &'static str) -> u64 {
    metrics::global()
        .server_connections_refused
        .get_or_create(&metrics::ListenerLabels { listener })
        .get()
}

fn open_now(listener: &'static str) -> i64 {
    metrics::global()
        .server_connections
        .get_or_create(&metrics::ListenerLabels { listener })
        .get()
}

/// The admin listener's connections are counted under its own label: a scraper refused at
/// its small cap is not mistaken for the public listener's clients, nor the other way.
#[tokio::test]
async fn each_listener_counts_its_own_connections() {
    let release = CancellationToken::new();
    let connections = Connections::new(limits(), 1).named("admin-test");
    let (addr, entered) = holding_with(connections, release.clone()).await;
    let mut first = TcpStream::connect(addr).await.unwrap();
    first
        .write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    in_flight(&entered, 1).await;
    assert_eq!(open_now("admin-test"), 1);
    let mut second = TcpStream::connect(addr).await.unwrap();
    // Refused at the cap of one, the first busy: closed without an answer.
    until_closed(&mut second).await;
    assert_eq!(refused_total("admin-test"), 1);
    release.cancel();
    read_hello(&mut first).await;
    drop(first);
    tokio::time::timeout(PATIENCE, async {
        while open_now("admin-test") != 0 {
            tokio::time::sleep(MS).await;
        }
    })
    .await
    .expect("the closed connection is still counted open");
}

#[tokio::test]
async fn a_half_sent_head_is_closed_after_the_header_timeout() {
    let (addr, _stop) = server(limits(), 100).await;
    let before = closed_total(HEADER_TIMEOUT);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    tcp.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let sent = until_closed(&mut tcp).await;
    let took = started.elapsed();
    assert!(sent.is_empty(), "{sent}");
    assert!(took >= HEADER && took < HEADER * 2, "closed after {took:?}");
    assert!(closed_total(HEADER_TIMEOUT) > before);
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_timeout() {
    let (addr, _stop) = server(limits(), 100).await;
    let started = Instant::now();
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    until_closed(&mut tcp).await;
    let took = started.elapsed();
    assert!(took >= HEADER && took < HEADER * 2, "closed after {took:?}");
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed_after_the_idle_timeout_not_before() {
    let (addr, _stop) = server(limits(), 100).await;
    let before = closed_total(IDLE_TIMEOUT);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    hello(&mut tcp).await;
    let idle = Instant::now();
    // Still open after the header timeout: idle is not a slow head.
    tokio::time::sleep(HEADER + Duration::from_millis(100)).await;
    hello(&mut tcp).await;
    let idle_again = Instant::now();
    assert!(idle_again - idle < IDLE);
    until_closed(&mut tcp).await;
    let took = idle_again.elapsed();
    assert!(took >= IDLE, "closed after {took:?}");
    assert!(closed_total(IDLE_TIMEOUT) > before);
}

#[tokio::test]
async fn a_head_started_on_an_idle_connection_gets_the_header_timeout() {
    let (addr, _stop) = server(limits(), 100).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    hello(&mut tcp).await;
    tcp.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    until_closed(&mut tcp).await;
    let took = started.elapsed();
    assert!(took >= HEADER && took < HEADER * 2, "closed after {took:?}");
}

#[tokio::test]
async fn a_slow_response_is_not_cut_by_the_idle_timeout() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/slow",
        get(|| async {
            tokio::time::sleep(IDLE * 2).await;
            "done"
        }),
    );
    let connections = Arc::new(Connections::new(limits(), 100));
    tokio::spawn(serve(listener, app, connections, CancellationToken::new()));
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = until_closed(&mut tcp).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("done"), "{answer}");
}

/// Serves `/endless`, a response that never ends (64 KiB parts, always ready); `dropped` is
/// cancelled when the server drops it.
async fn endless(dropped: CancellationToken) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/endless",
        get(move || {
            let guard = dropped.clone().drop_guard();
            async move {
                let part = Bytes::from(vec![b'x'; 64 * 1024]);
                Body::from_stream(futures::stream::repeat_with(move || {
                    let _held = &guard;
                    Ok::<_, Infallible>(part.clone())
                }))
            }
        }),
    );
    let connections = Arc::new(Connections::new(limits(), 100));
    tokio::spawn(serve(listener, app, connections, CancellationToken::new()));
    addr
}

#[tokio::test]
async fn a_response_the_client_does_not_take_is_dropped_after_the_send_timeout() {
    let dropped = CancellationToken::new();
    let addr = endless(dropped.clone()).await;
    let before = closed_total(SEND_TIMEOUT);
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    // The client reads nothing: the buffers fill, then the response waits to be taken.
    tokio::time::timeout(PATIENCE, dropped.cancelled())
        .await
        .expect("the response was kept although the client took nothing");
    let took = started.elapsed();
    assert!(took >= SEND, "dropped after {took:?}");
    assert!(closed_total(SEND_TIMEOUT) > before);
    drop(tcp);
}

#[tokio::test]
async fn a_client_that_keeps_reading_is_never_cut_by_the_send_timeout() {
    let dropped = CancellationToken::new();
    let addr = endless(dropped.clone()).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let until = Instant::now() + SEND * 3;
    let mut buf = vec![0u8; 64 * 1024];
    let mut read = 0usize;
    while Instant::now() < until {
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed while the client was reading");
        read += n;
    }
    assert!(!dropped.is_cancelled(), "dropped after {read} bytes read");
}

/// Serves `/hello` and `/held`, whose answer waits until `release` is cancelled, with `max`
/// connections; returns the address and the count of `/held` requests being answered.
async fn holding(max: usize, release: CancellationToken) -> (SocketAddr, Arc<AtomicUsize>) {
    holding_with(Connections::new(Limits::default(), max), release).await
}

/// [`holding`] under `connections`.
async fn holding_with(
    connections: Connections,
    release: CancellationToken,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let entered = Arc::new(AtomicUsize::new(0));
    let count = entered.clone();
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/held",
            get(move || {
                let (count, release) = (count.clone(), release.clone());
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    release.cancelled().await;
                    "hello"
                }
            }),
        );
    tokio::spawn(serve(
        listener,
        app,
        Arc::new(connections),
        CancellationToken::new(),
    ));
    (addr, entered)
}

/// Waits until `n` requests are being answered.
async fn in_flight(entered: &AtomicUsize, n: usize) {
    tokio::time::timeout(PATIENCE, async {
        while entered.load(Ordering::SeqCst) < n {
            tokio::time::sleep(MS).await;
        }
    })
    .await
    .expect("the requests never reached the handler");
}

/// Reads one whole `hello` answer.
async fn read_hello(tcp: &mut TcpStream) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("hello") {
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
}

/// At the cap with a request in flight on every connection, a new connection is refused;
/// once those requests are answered, their connections are idle and the next new one is
/// served in the slot of one of them.
#[tokio::test]
async fn connections_beyond_the_cap_are_refused_and_counted() {
    let release = CancellationToken::new();
    let (addr, entered) = holding(2, release.clone()).await;
    let refused = || refused_total(PUBLIC);
    let before = refused();
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        held.push(tcp);
    }
    in_flight(&entered, 2).await;
    // The third is accepted by the kernel and closed by the gateway at once.
    let mut third = TcpStream::connect(addr).await.unwrap();
    let _ = third
        .write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let answer = until_closed(&mut third).await;
    assert!(answer.is_empty(), "{answer}");
    assert!(refused() > before);
    // Answered, the held connections are idle: a new one takes a slot.
    release.cancel();
    for tcp in &mut held {
        read_hello(tcp).await;
    }
    let mut next = TcpStream::connect(addr).await.unwrap();
    hello(&mut next).await;
}

/// At the cap a new connection takes the slot of the connection idle longest, which is
/// closed; a connection with a request in flight keeps its slot, and so do the others.
#[tokio::test]
async fn at_the_cap_the_connection_idle_longest_makes_room_for_a_new_one() {
    let release = CancellationToken::new();
    let (addr, entered) = holding(3, release.clone()).await;
    let before = closed_total(EVICTED);
    let mut oldest = TcpStream::connect(addr).await.unwrap();
    hello(&mut oldest).await;
    let mut busy = TcpStream::connect(addr).await.unwrap();
    busy.write_all(b"GET /held HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    in_flight(&entered, 1).await;
    let mut newer = TcpStream::connect(addr).await.unwrap();
    hello(&mut newer).await;
    // A fourth: served (the old behaviour closed it unanswered).
    let mut fourth = TcpStream::connect(addr).await.unwrap();
    hello(&mut fourth).await;
    let sent = until_closed(&mut oldest).await;
    assert!(sent.is_empty(), "{sent}");
    assert!(closed_total(EVICTED) > before);
    // A fifth: the idlest now is `newer` (its last answer is older than the fourth's), never
    // `busy`, idle since before it but with its request in flight.
    let mut fifth = TcpStream::connect(addr).await.unwrap();
    hello(&mut fifth).await;
    until_closed(&mut newer).await;
    release.cancel();
    read_hello(&mut busy).await;
    hello(&mut fourth).await;
}

/// Serves `/upload`, which counts its request as entered and then reads the whole body,
/// with `max` connections; returns the address and the count of uploads entered.
async fn uploads(max: usize) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let entered = Arc::new(AtomicUsize::new(0));
    let count = entered.clone();
    let app = Router::new()
        .route("/hello", get(|| async { "hello" }))
        .route(
            "/upload",
            axum::routing::post(move |body: Body| {
                let count = count.clone();
                async move {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = axum::body::to_bytes(body, usize::MAX).await;
                    "hello"
                }
            }),
        );
    let connections = Arc::new(Connections::new(Limits::default(), max));
    tokio::spawn(serve(listener, app, connections, CancellationToken::new()));
    (addr, entered)
}

/// At the cap with every connection's request still receiving its body, a new connection
/// takes the slot of the slowest upload (nothing of it went upstream), which is cut; the
/// faster upload goes on and is answered. (Before: the new connection was refused while
/// trickling bodies held every slot for up to the body timeout.)
#[tokio::test]
async fn at_the_cap_the_slowest_upload_makes_room_for_a_new_connection() {
    let (addr, entered) = uploads(2).await;
    let head =
        |len: usize| format!("POST /upload HTTP/1.1\r\nhost: x\r\ncontent-length: {len}\r\n\r\n");
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(format!("{}ab", head(100_000)).as_bytes())
        .await
        .unwrap();
    let mut faster = TcpStream::connect(addr).await.unwrap();
    let half = vec![b'x'; 50_000];
    faster.write_all(head(100_000).as_bytes()).await.unwrap();
    faster.write_all(&half).await.unwrap();
    in_flight(&entered, 2).await;
    let before = closed_total(EVICTED);
    let mut newcomer = TcpStream::connect(addr).await.unwrap();
    hello(&mut newcomer).await;
    let sent = until_closed(&mut slow).await;
    assert!(sent.is_empty(), "{sent}");
    assert!(closed_total(EVICTED) > before);
    faster.write_all(&half).await.unwrap();
    read_hello(&mut faster).await;
}

/// Which connection makes room at the cap: the one idle longest, then the one whose bodies
/// arrive slowest, then the next slowest; never one with a request past its body.
#[tokio::test(start_paused = true)]
async fn eviction_takes_the_idle_then_the_slowest_upload_never_a_busy_connection() {
    let connections = Arc::new(Connections::new(limits(), 4));
    let mut slots = Vec::new();
    let mut open = || {
        let activity = Arc::new(Activity::new());
        match connections.admit(&activity) {
            Admit::Now(slot) => slots.push(slot),
            _ => panic!("under the cap"),
        }
        activity
    };
    let (idle, busy, fast, slow) = (open(), open(), open(), open());
    drop(idle.begin(false));
    tokio::time::advance(Duration::from_secs(1)).await;
    let _busy = busy.begin(false);
    let _fast = fast.begin(true);
    let _slow = slow.begin(true);
    fast.read(&[0; 10_000]);
    slow.read(&[0; 10]);
    tokio::time::advance(Duration::from_secs(1)).await;
    let chosen = |evicted: Option<Arc<Activity>>| {
        let evicted = evicted.expect("one evicted");
        [&idle, &busy, &fast, &slow]
            .iter()
            .position(|a| Arc::ptr_eq(a, &evicted))
    };
    assert_eq!(chosen(connections.evict()), Some(0), "the idle one first");
    assert_eq!(
        chosen(connections.evict()),
        Some(3),
        "then the slowest upload"
    );
    assert_eq!(chosen(connections.evict()), Some(2));
    assert!(connections.evict().is_none(), "never the busy one");
}

/// A connection asked to close whose client sent a new request just then keeps its slot:
/// the newcomer waiting for it asks the next idle connection at once, rather than waiting
/// out the header timeout and being refused.
#[tokio::test(start_paused = true)]
async fn a_newcomer_whose_evicted_connection_took_a_request_evicts_another() {
    let connections = Arc::new(Connections::new(limits(), 2));
    let mut slots = Vec::new();
    let mut open = || {
        let activity = Arc::new(Activity::new());
        match connections.admit(&activity) {
            Admit::Now(slot) => slots.push(slot),
            _ => panic!("under the cap"),
        }
        activity
    };
    let (older, newer) = (open(), open());
    drop(older.begin(false));
    tokio::time::advance(MS).await;
    drop(newer.begin(false));
    let newcomer = Arc::new(Activity::new());
    let Admit::AfterEviction(evicted) = connections.admit(&newcomer) else {
        panic!("at the cap with idle connections: an eviction");
    };
    assert!(Arc::ptr_eq(&evicted, &older));
    let mut waiting = Box::pin(connections.slot_after_eviction(&newcomer, evicted));
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    // The evicted connection's client sends a request before it closes.
    let _request = older.begin(false);
    assert!(futures::poll!(waiting.as_mut()).is_pending());
    assert!(
        newer.evicted.load(Ordering::Acquire),
        "the other idle one is asked"
    );
    // It closes: its slot is the newcomer's, at once.
    slots.remove(1);
    let started = Instant::now();
    let slot = tokio::time::timeout(MS, waiting).await;
    assert!(matches!(slot, Ok(Some(_))), "no slot");
    assert_eq!(started.elapsed(), Duration::ZERO);
}

/// An evicted connection whose request still receives its body closes at once; one whose
/// request is past its body closes only when the request ends.
#[tokio::test(start_paused = true)]
async fn an_evicted_connection_closes_at_once_only_while_its_bodies_arrive() {
    let receiving = Arc::new(Activity::new());
    let mut expired = Box::pin(receiving.expired(limits()));
    receiving.read(b"POST / HTTP/1.1\r\ncontent-length: 100\r\n\r\n");
    let _request = receiving.begin(true);
    assert!(pending(&mut expired).await);
    receiving.evict();
    assert_eq!(tokio::time::timeout(MS, expired).await, Ok(EVICTED));

    let past = Arc::new(Activity::new());
    let mut expired = Box::pin(past.expired(limits()));
    past.read(b"POST / HTTP/1.1\r\ncontent-length: 100\r\n\r\n");
    let (guard, receipt) = past.begin(true);
    drop(receipt);
    past.evict();
    tokio::time::advance(IDLE * 10).await;
    assert!(pending(&mut expired).await);
    drop(guard);
    assert_eq!(tokio::time::timeout(MS, expired).await, Ok(EVICTED));
}

#[tokio::test]
async fn http2_with_prior_knowledge_is_served() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let (addr, _stop) = server(limits(), 100).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(format!("http://{addr}/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.text().await.unwrap(), "hello");
}

#[tokio::test]
async fn shutdown_closes_idle_connections_and_stops_accepting() {
    let (addr, stop) = server(Limits::default(), 100).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    hello(&mut tcp).await;
    stop.cancel();
    until_closed(&mut tcp).await;
    let deadline = Instant::now() + PATIENCE;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "still accepting");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn shutdown_gives_a_half_sent_head_its_header_bound_not_more() {
    let (addr, stop) = server(limits(), 100).await;
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    hello(&mut tcp).await;
    tcp.write_all(b"GET /hello HTTP/1.1\r\n").await.unwrap();
    let started = Instant::now();
    stop.cancel();
    until_closed(&mut tcp).await;
    let took = started.elapsed();
    assert!(took < HEADER * 2, "closed after {took:?}");
}

/// `expired` of `activity` has not resolved yet.
async fn pending(expired: &mut Pin<Box<impl Future<Output = &'static str>>>) -> bool {
    futures::poll!(expired.as_mut()).is_pending()
}

const MS: Duration = Duration::from_millis(1);

#[tokio::test(start_paused = true)]
async fn a_new_connections_head_is_bounded_from_its_accept_to_the_millisecond() {
    let activity = Arc::new(Activity::new());
    let mut expired = Box::pin(activity.expired(limits()));
    assert!(pending(&mut expired).await);
    tokio::time::advance(HEADER - MS).await;
    assert!(pending(&mut expired).await);
    tokio::time::advance(MS).await;
    assert_eq!(expired.await, HEADER_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_is_never_timed_out_and_idleness_counts_from_its_end() {
    let activity = Arc::new(Activity::new());
    let mut expired = Box::pin(activity.expired(limits()));
    tokio::time::advance(HEADER / 2).await;
    activity.read(b"GET / HTTP/1.1\r\n\r\n");
    let (guard, _) = activity.begin(false);
    // A slow answer: ten idle timeouts with the request in flight.
    tokio::time::advance(IDLE * 10).await;
    assert!(pending(&mut expired).await);
    drop(guard);
    tokio::time::advance(IDLE - MS).await;
    assert!(pending(&mut expired).await);
    tokio::time::advance(MS).await;
    assert_eq!(expired.await, IDLE_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn a_part_left_untaken_is_bounded_by_the_send_timeout_to_the_millisecond() {
    let activity = Arc::new(Activity::new());
    let mut expired = Box::pin(activity.expired(limits()));
    activity.read(b"GET / HTTP/1.1\r\n\r\n");
    let _guard = activity.begin(false);
    // Waiting for the upstream (nothing produced) is never a stall.
    tokio::time::advance(SEND * 10).await;
    assert!(pending(&mut expired).await);
    // A part is ready; the client takes it just in time, then leaves the next one.
    activity.part_ready();
    tokio::time::advance(SEND - MS).await;
    assert!(pending(&mut expired).await);
    activity.part_taken(true);
    activity.part_ready();
    tokio::time::advance(SEND - MS).await;
    assert!(pending(&mut expired).await);
    tokio::time::advance(MS).await;
    assert_eq!(
        tokio::time::timeout(MS, expired).await,
        Ok(SEND_TIMEOUT),
        "not closed at the send timeout"
    );
}

#[tokio::test(start_paused = true)]
async fn a_head_begun_while_idle_is_bounded_from_its_first_byte() {
    let activity = Arc::new(Activity::new());
    let mut expired = Box::pin(activity.expired(limits()));
    activity.read(b"GET / HTTP/1.1\r\n\r\n");
    drop(activity.begin(false));
    // Idle for a while, then the next head starts and stalls.
    tokio::time::advance(IDLE - HEADER / 2).await;
    activity.read(b"GET / HT");
    assert!(pending(&mut expired).await);
    // The idle bound (HEADER / 2 from here) no longer applies; the head's does.
    tokio::time::advance(HEADER - MS).await;
    assert!(pending(&mut expired).await);
    tokio::time::advance(MS).await;
    assert_eq!(expired.await, HEADER_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn http2_frames_between_streams_are_not_a_head_even_when_the_preface_came_in_pieces() {
    let activity = Arc::new(Activity::new());
    let mut expired = Box::pin(activity.expired(limits()));
    // The preface in three reads.
    activity.read(b"P");
    activity.read(b"RI");
    activity.read(b" * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    drop(activity.begin(false));
    tokio::time::advance(IDLE / 2).await;
    // A PING frame between streams: the idle bound still applies, not the header's.
    activity.read(&[0, 0, 8, 6, 0, 0, 0, 0, 0]);
    tokio::time::advance(HEADER).await;
    assert!(pending(&mut expired).await);
    tokio::time::advance(IDLE / 2 - HEADER - MS).await;
    assert!(pending(&mut expired).await);
    tokio::time::advance(MS).await;
    assert_eq!(expired.await, IDLE_TIMEOUT);
}

#[test]
fn http1_methods_are_not_taken_for_the_preface() {
    for first in [&b"POST /v1"[..], b"PATCH", b"PUT "] {
        let activity = Activity::new();
        activity.read(first);
        activity.read(b"RI * HTTP/2.0");
        assert!(!activity.http2.load(Ordering::Acquire), "{first:?}");
    }
}
