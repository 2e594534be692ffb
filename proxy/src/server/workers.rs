//! Thread-per-core serving: `n` OS threads, each running its own single-threaded tokio
//! runtime over the same listening socket.
//!
//! A request is read, routed, sent upstream and answered on one thread: no task hops between
//! threads, so no cross-thread wake-ups (a futex call and a context switch each) and warm
//! caches. On a small machine that is most of the proxy's added latency; a multi-threaded
//! runtime also wakes an idle worker to steal every newly woken task.
//!
//! Every worker accepts from the same socket (each holds a duplicate of its descriptor), so a
//! busy worker simply accepts less; no `SO_REUSEPORT`, so a second gateway on the same port
//! still fails with "address in use". State is shared: the configuration, budgets and
//! breakers are behind `Arc`s; only the upstream connection pools are per thread
//! ([`Dispatcher`](crate::route::Dispatcher) keeps one client per thread).

use super::conn::{self, Connections};
use axum::Router;
use std::net::TcpListener;
use std::num::NonZeroUsize;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The default number of workers: the CPUs this process may use (cgroup quota included).
pub fn default_count() -> NonZeroUsize {
    std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN)
}

/// Running workers; see [`Workers::spawn`].
#[derive(Debug)]
pub struct Workers {
    exited: mpsc::UnboundedReceiver<(usize, std::io::Result<()>)>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// Starts `count` workers serving `app` on `listener`, within `connections`' bounds (the
    /// cap is shared by all), until `shutdown` is cancelled; then each stops accepting and
    /// finishes its in-flight requests before its runtime stops.
    ///
    /// A worker's runtime ends with it, and so does every task spawned there: work that must
    /// outlive the serving (such as pending budget writes) belongs on the caller's runtime.
    /// If not every worker can start, the ones started are stopped (`shutdown` is cancelled).
    pub fn spawn(
        listener: TcpListener,
        app: Router,
        count: NonZeroUsize,
        connections: Arc<Connections>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let started = Self::start(listener, app, count, connections, shutdown.clone());
        if started.is_err() {
            shutdown.cancel();
        }
        started
    }

    fn start(
        listener: TcpListener,
        app: Router,
        count: NonZeroUsize,
        connections: Arc<Connections>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        let (tx, exited) = mpsc::unbounded_channel();
        let mut threads = Vec::with_capacity(count.get());
        for index in 0..count.get() {
            let listener = listener.try_clone()?;
            let app = app.clone();
            let connections = connections.clone();
            let shutdown = shutdown.clone();
            let tx = tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("floodgate-worker-{index}"))
                .spawn(move || {
                    // A panic that escapes the per-request catch (in the runtime or the
                    // connection code) is reported like any other failure, so that the process
                    // stops rather than serving on with fewer workers.
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        run(listener, app, connections, shutdown)
                    }))
                    .unwrap_or_else(|_| Err(std::io::Error::other("the worker panicked")));
                    let _ = tx.send((index, result));
                })?;
            threads.push(thread);
        }
        Ok(Self { exited, threads })
    }

    /// Waits for the next worker to stop: its index and why. `None` once all have.
    pub async fn next_exit(&mut self) -> Option<(usize, std::io::Result<()>)> {
        self.exited.recv().await
    }

    /// Waits for every worker thread to end (call after cancelling `shutdown`).
    pub async fn join(mut self) -> std::io::Result<()> {
        let mut first_error = None;
        while let Some((_, result)) = self.exited.recv().await {
            if let Err(e) = result {
                first_error.get_or_insert(e);
            }
        }
        let threads = std::mem::take(&mut self.threads);
        // The threads have sent their results; joining them is immediate.
        let _ = tokio::task::spawn_blocking(move || {
            for thread in threads {
                let _ = thread.join();
            }
        })
        .await;
        first_error.map_or(Ok(()), Err)
    }
}

fn run(
    listener: TcpListener,
    app: Router,
    connections: Arc<Connections>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        conn::serve(listener, app, connections, shutdown).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use std::io::{Read as _, Write as _};
    use tokio::sync::Notify;

    /// A blocking HTTP/1.1 GET; returns the response text.
    fn get_once(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    }

    #[tokio::test]
    async fn workers_share_the_socket_and_drain_in_flight_requests_on_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let started = Arc::new(Notify::new());
        let release = Arc::new(Notify::new());
        let app = Router::new()
            .route(
                "/who",
                get(|| async { std::thread::current().name().unwrap_or("?").to_owned() }),
            )
            .route(
                "/slow",
                get({
                    let (started, release) = (started.clone(), release.clone());
                    move || async move {
                        started.notify_one();
                        release.notified().await;
                        "slow done"
                    }
                }),
            );
        let shutdown = CancellationToken::new();
        let count = NonZeroUsize::new(2).unwrap();
        let connections = Arc::new(Connections::new(conn::Limits::default(), 100));
        let workers = Workers::spawn(listener, app, count, connections, shutdown.clone()).unwrap();

        // Served by the worker threads, never by the caller's.
        let answers = tokio::task::spawn_blocking(move || {
            (0..20).map(|_| get_once(addr, "/who")).collect::<Vec<_>>()
        })
        .await
        .unwrap();
        for answer in &answers {
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            assert!(answer.contains("floodgate-worker-"), "{answer}");
        }

        // A request in flight when shutdown starts still gets its whole answer.
        let slow = tokio::task::spawn_blocking(move || get_once(addr, "/slow"));
        started.notified().await;
        shutdown.cancel();
        let joined = tokio::spawn(workers.join());
        release.notify_one();
        joined.await.unwrap().unwrap();
        let slow = slow.await.unwrap();
        assert!(slow.starts_with("HTTP/1.1 200"), "{slow}");
        assert!(slow.contains("slow done"), "{slow}");
        // The socket is closed.
        assert!(std::net::TcpStream::connect(addr).is_err());
    }
}
