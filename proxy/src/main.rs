//! `floodgate-proxy`: the Floodgate gateway binary.

use anyhow::Context as _;
use clap::Parser;
use floodgate_proxy::budget::{MINUTE, SharedOptions};
use floodgate_proxy::config::cluster;
use floodgate_proxy::config::load::load_config;
use floodgate_proxy::config::secrets::SecretSources;
use floodgate_proxy::config::watch::{SharedConfig, Watcher};
use floodgate_proxy::identity::Identity;
use floodgate_proxy::jobs;
use floodgate_proxy::route::{Dispatcher, DispatcherOptions};
use floodgate_proxy::secret::SecretString;
use floodgate_proxy::server::conn;
use floodgate_proxy::server::workers::{self, Workers};
use floodgate_proxy::server::{AppState, admin_router, probe_router, router};
use floodgate_proxy::telemetry;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

// Allocation is a measurable share of a request's CPU (many small, short-lived buffers);
// mimalloc's thread-local free lists make it cheaper than glibc malloc (see `make bench`).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Floodgate: an OpenAI-compatible AI gateway over pools of rate-limited provider keys.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Manifest files or directories (standalone mode). Repeatable.
    #[arg(
        long = "config",
        env = "FLOODGATE_CONFIG",
        required_unless_present_any = ["cluster", "capacity"],
        value_delimiter = ','
    )]
    config: Vec<PathBuf>,
    /// Cluster mode: watch the Floodgate resources and Secrets of `--namespace` on the API
    /// server (KUBECONFIG, or the pod's service account) instead of reading files.
    #[arg(long, env = "FLOODGATE_CLUSTER", conflicts_with_all = ["config", "check_config"])]
    cluster: bool,
    /// Namespace watched in cluster mode (default: the pod's, else the kubeconfig context's,
    /// else `default`).
    #[arg(long, env = "FLOODGATE_NAMESPACE", requires = "cluster")]
    namespace: Option<String>,
    /// Address to listen on.
    #[arg(long, env = "FLOODGATE_LISTEN", default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Address of the admin listener: `/metrics` (and the probes). Admin endpoints are never
    /// served on `--listen`; unset, there are none.
    #[arg(long, env = "FLOODGATE_ADMIN_LISTEN")]
    admin_listen: Option<SocketAddr>,
    /// Address of a listener serving only the probes, `/healthz` and `/readyz`: for the
    /// kubelet, which probes the pod's IP, when `--listen` is on loopback (the sidecar).
    #[arg(long, env = "FLOODGATE_PROBE_LISTEN")]
    probe_listen: Option<SocketAddr>,
    /// Directory of `<secret>/<key>` files, as a mounted Secret volume.
    #[arg(long, env = "FLOODGATE_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// How often the config files are checked for changes, in milliseconds (0 disables).
    #[arg(long, env = "FLOODGATE_WATCH_INTERVAL_MS", default_value_t = 1000)]
    watch_interval_ms: u64,
    /// Longest a request waits for a key with free rate budget before it is answered 429.
    #[arg(long, env = "FLOODGATE_MAX_QUEUE_WAIT_MS", default_value_t = 30_000)]
    max_queue_wait_ms: u64,
    /// Most requests waiting for rate budget per model; beyond it a request is answered 429
    /// at once, with the time its turn could come in `retry-after`. Default: what the model's
    /// keys could serve within --max-queue-wait-ms (their rpm x wait / 60 s, at least 1).
    #[arg(long, env = "FLOODGATE_MAX_QUEUED")]
    max_queued: Option<usize>,
    /// Name the provider key used in each answer's `x-floodgate-key` header. Off by default:
    /// it tells any caller the key inventory; for debugging only.
    #[arg(long, env = "FLOODGATE_EXPOSE_KEY_HEADER")]
    expose_key_header: bool,
    /// Sidecar mode: accept `x-floodgate-tenant: <tenant>` from the local application instead
    /// of a client key. Off by default: anyone who can reach the port could then name any
    /// tenant; turn it on only where only the application in the same pod can.
    #[arg(long, env = "FLOODGATE_TRUST_TENANT_HEADER")]
    trust_tenant_header: bool,
    /// Longest a request's head may take to arrive whole, in milliseconds: from the accept
    /// for a connection's first request, from its first byte for later ones.
    #[arg(long, env = "FLOODGATE_HEADER_READ_TIMEOUT_MS", default_value_t = 10_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    header_read_timeout_ms: u64,
    /// Longest a keep-alive connection may wait, idle, for its next request, in milliseconds.
    /// Keep it above the idle timeout of a load balancer in front (often 60 s).
    #[arg(long, env = "FLOODGATE_IDLE_TIMEOUT_MS", default_value_t = 75_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_ms: u64,
    /// Longest a client may leave a ready part of its response untaken (not reading it, or
    /// an HTTP/2 window kept shut), in milliseconds; then the connection is closed and the
    /// response dropped (its upstream call cancelled). Waiting for the upstream never counts.
    #[arg(long, env = "FLOODGATE_SEND_TIMEOUT_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    send_timeout_ms: u64,
    /// Longest a door waits for a whole request body, in milliseconds; then it answers 408.
    #[arg(long, env = "FLOODGATE_BODY_READ_TIMEOUT_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(1..))]
    body_read_timeout_ms: u64,
    /// Most client connections open at once, all workers together; beyond it new connections
    /// are closed at once. Default: 10000, or half the open-file limit if that is lower.
    #[arg(long, env = "FLOODGATE_MAX_CONNECTIONS")]
    max_connections: Option<NonZeroUsize>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "FLOODGATE_BODY_LIMIT_BYTES", default_value_t = floodgate_proxy::server::DEFAULT_BODY_LIMIT)]
    body_limit_bytes: usize,
    /// Share the keys' rate budgets with the other replicas through this Redis
    /// (`redis://[user:password@]host:port[/db]`), so that together they stay within every
    /// limit. Without it budgets are per process.
    #[arg(long = "redis", env = "FLOODGATE_REDIS_URL", value_name = "URL", hide_env_values = true,
          value_parser = |s: &str| Ok::<_, std::convert::Infallible>(SecretString::new(s)))]
    redis: Option<SecretString>,
    /// Bearer token the admin listener's dead-letter endpoints (`/admin/jobs/...`: list,
    /// show, re-drive, purge) and capacity report (`/admin/capacity`) require
    /// (`Authorization: Bearer <token>`); `--capacity` sends it. Unset, they answer 403 to
    /// everyone. Give it through the environment (a Secret), not the command line.
    #[arg(long, env = "FLOODGATE_ADMIN_TOKEN", value_name = "TOKEN", hide_env_values = true,
          value_parser = |s: &str| Ok::<_, std::convert::Infallible>(SecretString::new(s)))]
    admin_token: Option<SecretString>,
    /// With --redis: the most replicas that may share the keys. While Redis is unreachable each
    /// replica serves at most limit / N of every key (at least one request per window).
    #[arg(
        long,
        env = "FLOODGATE_REPLICAS_HINT",
        default_value = "2",
        requires = "redis"
    )]
    replicas_hint: NonZeroU32,
    /// Length of the providers' rate-limit window, in milliseconds: a key's `rpm` is counted
    /// per this window. The providers count per minute (the default); change it only for a
    /// provider that counts over another window, or for tests that need short windows.
    #[arg(long, env = "FLOODGATE_RATE_WINDOW_MS", default_value_t = 60_000,
          value_parser = clap::value_parser!(u64).range(100..=3_600_000))]
    rate_window_ms: u64,
    /// Job workers on this replica: each runs one queued job (`/v1/jobs`) at a time through
    /// the pipeline. 0 accepts jobs but runs none here (another replica sharing --redis does).
    #[arg(long, env = "FLOODGATE_JOB_WORKERS", default_value_t = 4)]
    job_workers: usize,
    /// With --redis: how long a job's claim may go without being kept alive before another
    /// replica takes the job over (its holder died), in milliseconds; also the lease on a
    /// job's notification, after which another replica sends what was not recorded as
    /// delivered. Both are kept alive every third of it.
    #[arg(long, env = "FLOODGATE_JOB_VISIBILITY_MS", default_value_t = 30_000,
          value_parser = clap::value_parser!(u64).range(300..))]
    job_visibility_ms: u64,
    /// Let a job's own webhook (`notify.webhook`, a tenant's input) point at private,
    /// loopback and link-local addresses. Off, such URLs are refused with a 400 and, for host
    /// names, again when they resolve at delivery (no requests into the gateway's network).
    #[arg(long, env = "FLOODGATE_JOB_WEBHOOK_PRIVATE_ADDRESSES")]
    job_webhook_private_addresses: bool,
    /// The most jobs one tenant may have pending (queued, running or waiting for a retry,
    /// Batch API lines included) before `POST /v1/jobs` answers 429 with `retry-after`.
    /// 0: no bound.
    #[arg(
        long,
        env = "FLOODGATE_JOB_MAX_PENDING_PER_TENANT",
        default_value_t = 10_000
    )]
    job_max_pending_per_tenant: u64,
    /// Threads serving requests, each with its own single-threaded runtime (default: the
    /// CPUs this process may use). Configuration watching runs on the main thread.
    #[arg(long, env = "FLOODGATE_WORKERS")]
    workers: Option<NonZeroUsize>,
    /// Validate the configuration, print the result and exit.
    #[arg(long)]
    check_config: bool,
    /// Print the capacity report of the gateway whose admin listener is at this URL (e.g.
    /// `http://127.0.0.1:9090`) and exit.
    #[arg(long, value_name = "ADMIN_URL", conflicts_with_all = ["cluster", "check_config"])]
    capacity: Option<String>,
    /// The semantic cache's embedding model (all-MiniLM-L6-v2: model.safetensors,
    /// tokenizer.json, config.json), unless the CachePolicy names a `modelDir`. Default:
    /// $HOME/.cache/floodgate/models/all-MiniLM-L6-v2, where `make model` installs it.
    #[arg(long, env = "FLOODGATE_EMBEDDING_MODEL_DIR", value_name = "DIR")]
    embedding_model_dir: Option<std::path::PathBuf>,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "FLOODGATE_LOG_JSON")]
    log_json: bool,
    /// Export traces with OTLP over HTTP/protobuf to this collector (base URL such as
    /// `http://otel-collector:4318`; `/v1/traces` is appended). Unset: no traces exported.
    /// The service name comes from `OTEL_SERVICE_NAME` (default `floodgate-proxy`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(url) = &args.capacity {
        return capacity(url, args.admin_token.as_ref());
    }
    // Dropped when main returns, after serve(): flushes the spans not yet exported.
    let _telemetry = match init_tracing(&args) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("floodgate-proxy: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    let secrets = SecretSources {
        env: std::env::vars()
            .filter(|(k, _)| k.starts_with("FLOODGATE_SECRET_"))
            .collect(),
        dir: args.secrets_dir.clone(),
        manifests: Default::default(),
    };
    // Fingerprint the files before loading them, so a change made meanwhile is not missed.
    let watcher = (!args.cluster && args.watch_interval_ms > 0).then(|| {
        Watcher::new(
            args.config.clone(),
            secrets.clone(),
            Duration::from_millis(args.watch_interval_ms),
        )
    });
    // Fail before binding a port: the gateway never runs half-configured.
    // In cluster mode the configuration arrives from the API server once serving.
    let loaded = if args.cluster {
        Ok((cluster::initial_config(), Vec::new()))
    } else {
        load_config(&args.config, secrets.clone())
    };
    let (config, warnings) = match loaded {
        Ok(loaded) => loaded,
        Err(errors) => {
            eprintln!("floodgate-proxy: {errors}");
            return std::process::ExitCode::from(2);
        }
    };
    for warning in &warnings {
        tracing::warn!("{warning}");
    }
    if args.check_config {
        eprintln!(
            "configuration OK: {} pool(s), {} model id(s)",
            config.pools.len(),
            config.models().len()
        );
        return std::process::ExitCode::SUCCESS;
    }
    // The control runtime: configuration watchers, signals, shutdown. Requests are served
    // by the worker threads (`serve`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("floodgate-proxy: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(args, config, secrets, watcher)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("floodgate-proxy: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn serve(
    args: Args,
    config: floodgate_proxy::config::Config,
    secrets: SecretSources,
    watcher: Option<Watcher>,
) -> anyhow::Result<()> {
    let window = Duration::from_millis(args.rate_window_ms);
    if window != MINUTE {
        tracing::warn!(
            window_ms = args.rate_window_ms,
            "rate limits counted per a window other than the providers' minute"
        );
    }
    let mut options = DispatcherOptions::new(window, Duration::from_millis(args.max_queue_wait_ms));
    options.max_queued = args.max_queued;
    let mut redis_thread = None;
    if let Some(url) = args.redis.clone() {
        let mut redis = SharedOptions::new(url);
        redis.replicas_hint = args.replicas_hint;
        // Redis calls and background writes run on a runtime of their own, on its own thread:
        // it outlives the workers (none takes the connection or a pending write with it when
        // it stops), and nothing else runs there, so no configuration work (file polling,
        // API-server watches, validation) can delay an admission.
        let thread = RedisThread::start().context("cannot start the Redis runtime")?;
        redis.runtime = Some(thread.handle.clone());
        redis_thread = Some(thread);
        tracing::info!(replicas_hint = %args.replicas_hint, "rate budgets shared through Redis");
        options = options.with_redis(redis);
    }
    let dispatcher = Arc::new(Dispatcher::with_options(options)?);
    dispatcher.apply(Arc::new(config));
    // Cluster mode is ready after the first configuration from the API server is applied.
    let ready = Arc::new(AtomicBool::new(!args.cluster));
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let sink: SharedConfig = dispatcher.clone();
    if args.cluster {
        let client = cluster::client()
            .await
            .context("cluster mode: no Kubernetes client configuration")?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let watcher = cluster::ClusterWatcher::new(client, namespace, secrets);
        tasks.spawn(watcher.run(sink, ready.clone(), cancel.clone()));
    } else if let Some(watcher) = watcher {
        tasks.spawn(watcher.run(sink, cancel.clone()));
    }
    // Active health checks of the pools that ask for them (`healthCheck`).
    tasks.spawn(floodgate_proxy::routing::health::run(
        dispatcher.clone(),
        cancel.clone(),
    ));
    if args.expose_key_header {
        tracing::warn!("answers name the provider key used (x-floodgate-key): for debugging only");
    }
    if args.trust_tenant_header {
        tracing::warn!(
            "x-floodgate-tenant is trusted (--trust-tenant-header): callers may name their tenant without a key"
        );
    }
    let mut state = AppState::new(ready.clone(), dispatcher.clone());
    state.body_limit = args.body_limit_bytes;
    state.body_timeout = Duration::from_millis(args.body_read_timeout_ms);
    state.expose_key = args.expose_key_header;
    state.identity = Arc::new(Identity::new(args.trust_tenant_header));
    state.admin_token = args.admin_token.clone();
    if let Some(dir) = args.embedding_model_dir.clone() {
        let redis = dispatcher.budgets().backend().map(|b| b.options().clone());
        state.cache =
            Arc::new(floodgate_proxy::cache::Cache::new(redis.as_ref()).with_model_dir(dir));
    }
    // The CachePolicy now: the embedding model loads (or says why not) before any request.
    state.cache.prepare(&dispatcher.config());
    // Local models' demand, for the operator's autoscaler, and the TierQueue's queue figures,
    // the CachePolicy's cache figures and the pools' circuit states, for their status:
    // published to the shared Redis.
    // Without --redis there is nowhere the operator could read it.
    if let Some(url) = &args.redis {
        let board = dispatcher.routing().gates.board();
        let replica = format!("{}-{}", hostname(), std::process::id());
        let (queues, circuits) = (dispatcher.clone(), dispatcher.clone());
        let (cache, config) = (state.cache.clone(), dispatcher.clone());
        match floodgate_proxy::demand::Publisher::new(board, url, replica) {
            Ok(publisher) => {
                let publisher = publisher
                    .with_queues(Arc::new(move || queues.queue_figures()))
                    .with_caches(Arc::new(move || cache.figures(&config.config())))
                    .with_circuits(Arc::new(move || circuits.circuit_figures()));
                drop(tasks.spawn(publisher.run(cancel.clone())));
            }
            Err(e) => tracing::warn!(
                error = %e,
                "local-model demand cannot be published (autoscaling sees none from this replica)"
            ),
        }
    }
    state.jobs = Some(start_jobs(&args, &state, &tasks, &cancel).await?);
    // The kubelet and little else: a small cap of its own.
    let probes = match args.probe_listen {
        Some(addr) => Some(
            serve_side(
                addr,
                "probe",
                16,
                probe_router(state.clone()),
                &tasks,
                &cancel,
            )
            .await?,
        ),
        None => None,
    };
    let app = router(state.clone());
    let listener = std::net::TcpListener::bind(args.listen)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    // A few scrapers and probes: a small cap of its own, never the public one's.
    let admin = match args.admin_listen {
        Some(addr) => {
            Some(serve_side(addr, "admin", 64, admin_router(state), &tasks, &cancel).await?)
        }
        None => None,
    };
    let count = args.workers.unwrap_or_else(workers::default_count);
    let local = listener.local_addr()?;
    let limits = conn::Limits {
        header_read_timeout: Duration::from_millis(args.header_read_timeout_ms),
        idle_timeout: Duration::from_millis(args.idle_timeout_ms),
        send_timeout: Duration::from_millis(args.send_timeout_ms),
    };
    let max_connections = args
        .max_connections
        .map_or_else(conn::default_max_connections, NonZeroUsize::get);
    let connections = Arc::new(conn::Connections::new(limits, max_connections));
    let mut workers = Workers::spawn(listener, app, count, connections, cancel.clone())
        .context("cannot start the worker threads")?;
    let tenants = dispatcher.config().tenants.len();
    tracing::info!(
        listen = %local,
        admin_listen = admin.map(|a| a.to_string()),
        probe_listen = probes.map(|a| a.to_string()),
        workers = count.get(),
        max_connections,
        header_read_timeout_ms = args.header_read_timeout_ms,
        idle_timeout_ms = args.idle_timeout_ms,
        send_timeout_ms = args.send_timeout_ms,
        body_read_timeout_ms = args.body_read_timeout_ms,
        models = dispatcher.config().models().len(),
        tenants,
        "floodgate-proxy serving"
    );
    if !args.cluster {
        if tenants == 0 {
            tracing::info!("{}", floodgate_proxy::identity::OPEN_MODE);
        } else {
            tracing::info!(
                tenants,
                "callers must send a tenant's client key (Authorization: Bearer or x-api-key)"
            );
        }
    }
    let failed = tokio::select! {
        () = shutdown_signal() => {
            // A second SIGTERM or Ctrl-C does not wait for the drain.
            let second = shutdown_signal();
            tokio::spawn(async {
                second.await;
                tracing::warn!("second signal: exiting without draining");
                std::process::exit(130);
            });
            tracing::info!("shutting down: draining in-flight requests (a second signal stops at once)");
            None
        }
        exit = workers.next_exit() => exit,
    };
    ready.store(false, Ordering::Release);
    cancel.cancel();
    let joined = workers.join().await;
    tasks.close();
    tasks.wait().await;
    dispatcher.drain().await;
    if let Some(thread) = redis_thread {
        thread.stop();
    }
    if let Some((index, result)) = failed {
        result.with_context(|| format!("worker {index} stopped"))?;
        anyhow::bail!("worker {index} stopped");
    }
    joined.context("a worker failed")?;
    Ok(())
}

/// Binds `addr` (the flag `--<name>-listen`) and serves `app` there until `cancel`, with a
/// connection cap of its own (`max` connections, counted under `listener="<name>"`);
/// returns the address bound.
async fn serve_side(
    addr: SocketAddr,
    name: &'static str,
    max: usize,
    app: axum::Router,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (--{name}-listen)"))?;
    let local = listener.local_addr()?;
    let connections = Arc::new(conn::Connections::new(conn::Limits::default(), max).named(name));
    tasks.spawn(conn::serve(listener, app, connections, cancel.clone()));
    Ok(local)
}

/// The jobs subsystem: its store (Redis Streams with --redis, else in memory) and this
/// replica's workers.
async fn start_jobs(
    args: &Args,
    state: &AppState,
    tasks: &TaskTracker,
    cancel: &CancellationToken,
) -> anyhow::Result<Arc<jobs::Jobs>> {
    let visibility = Duration::from_millis(args.job_visibility_ms);
    let store = match &args.redis {
        Some(url) => jobs::Store::Redis(
            jobs::redis::RedisStore::new(url, visibility)
                .context("the --redis URL cannot be used for the job store")?,
        ),
        None => {
            tracing::info!(
                "jobs kept in memory: a restart loses queued and finished jobs (--redis keeps them)"
            );
            jobs::Store::Memory(jobs::memory::MemoryStore::new())
        }
    };
    let jobs = jobs::Jobs::bounded(
        store,
        args.job_workers,
        args.job_webhook_private_addresses,
        args.job_max_pending_per_tenant,
        args.admin_token.clone(),
    );
    if args.admin_token.is_none() {
        tracing::info!(
            "no --admin-token: the dead-letter and capacity admin endpoints refuse every caller (403)"
        );
    }
    let webhook_client = || {
        // No proxy from the environment either: a proxy would resolve and reach the
        // receiver itself, past the resolver that refuses internal addresses.
        reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
    };
    let workers = jobs::worker::Workers {
        jobs: jobs.clone(),
        dispatcher: state.dispatcher.clone(),
        identity: state.identity.clone(),
        // Webhooks are not followed through redirects: a receiver cannot send the signed
        // delivery on to another host.
        http: webhook_client()
            .build()
            .context("cannot build the webhook client")?,
        // Tenants' own webhook URLs: names resolving inside are refused.
        guarded_http: webhook_client()
            .dns_resolver(Arc::new(jobs::address::PublicResolver))
            .build()
            .context("cannot build the webhook client")?,
        consumer: format!("{}-{}", hostname(), std::process::id()),
        visibility,
        tasks: tasks.clone(),
        cancel: cancel.clone(),
        notifying: Arc::new(tokio::sync::Semaphore::new(jobs::worker::MAX_NOTIFYING)),
    };
    workers.spawn(args.job_workers);
    Ok(jobs)
}

/// This host's name, for job consumer names (`HOSTNAME`, the pod's name in Kubernetes).
fn hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "floodgate".to_owned())
}

/// The runtime that runs every Redis call and background budget write, on a thread of its
/// own.
struct RedisThread {
    handle: tokio::runtime::Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl RedisThread {
    fn start() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("floodgate-redis".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                });
            })?;
        Ok(Self {
            handle,
            stop,
            thread,
        })
    }

    /// Stops the runtime once the pending writes are drained (call after `drain`).
    fn stop(self) {
        let _ = self.stop.send(());
        if self.thread.join().is_err() {
            tracing::error!("the Redis runtime's thread panicked");
        }
    }
}

/// The next SIGTERM or Ctrl-C. The handlers are registered when this is called, not when the
/// future is first polled, so a signal that arrives in between is not missed.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let int = signal(SignalKind::interrupt());
        async move {
            match (term, int) {
                (Ok(mut term), Ok(mut int)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                }
                (Ok(mut one), Err(_)) | (Err(_), Ok(mut one)) => {
                    let _ = one.recv().await;
                }
                // No signal handling: only a kill stops the process.
                (Err(_), Err(_)) => std::future::pending().await,
            }
        }
    }
    #[cfg(not(unix))]
    async {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn init_tracing(args: &Args) -> Result<telemetry::Telemetry, telemetry::Error> {
    telemetry::init(telemetry::Options {
        json: args.log_json,
        otlp_endpoint: args.otlp_endpoint.clone(),
        service_name: std::env::var("OTEL_SERVICE_NAME")
            .ok()
            .filter(|name| !name.trim().is_empty())
            .unwrap_or_else(|| telemetry::DEFAULT_SERVICE_NAME.to_owned()),
    })
}

/// `--capacity URL`: fetches `GET /admin/capacity` with the admin token
/// (`FLOODGATE_ADMIN_TOKEN`, `--admin-token`) and prints it as a table.
fn capacity(admin_url: &str, token: Option<&SecretString>) -> std::process::ExitCode {
    let url = format!("{}/admin/capacity", admin_url.trim_end_matches('/'));
    let fetched = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)
        .and_then(|rt| {
            rt.block_on(async {
                let _ = rustls::crypto::ring::default_provider().install_default();
                let mut request = reqwest::Client::new().get(&url);
                if let Some(token) = token {
                    request = request.bearer_auth(token.expose());
                }
                let report: floodgate_proxy::routing::capacity::Report =
                    request.send().await?.error_for_status()?.json().await?;
                Ok::<_, anyhow::Error>(report)
            })
        });
    match fetched {
        Ok(report) => {
            let table = floodgate_proxy::routing::capacity::render(&report);
            let _ = std::io::Write::write_all(&mut std::io::stdout(), table.as_bytes());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("floodgate-proxy: {url}: {e}");
            std::process::ExitCode::from(1)
        }
    }
}
