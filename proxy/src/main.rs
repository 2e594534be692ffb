//! `floodgate-proxy`: the Floodgate gateway binary.

use anyhow::Context as _;
use arc_swap::ArcSwap;
use clap::Parser;
use floodgate_proxy::budget::MINUTE;
use floodgate_proxy::config::cluster;
use floodgate_proxy::config::load::load_config;
use floodgate_proxy::config::secrets::SecretSources;
use floodgate_proxy::config::watch::Watcher;
use floodgate_proxy::route::Dispatcher;
use floodgate_proxy::server::{AppState, router};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Floodgate: an OpenAI-compatible AI gateway over pools of rate-limited provider keys.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Manifest files or directories (standalone mode). Repeatable.
    #[arg(
        long = "config",
        env = "FLOODGATE_CONFIG",
        required_unless_present = "cluster",
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
    /// Directory of `<secret>/<key>` files, as a mounted Secret volume.
    #[arg(long, env = "FLOODGATE_SECRETS_DIR")]
    secrets_dir: Option<PathBuf>,
    /// How often the config files are checked for changes, in milliseconds (0 disables).
    #[arg(long, env = "FLOODGATE_WATCH_INTERVAL_MS", default_value_t = 1000)]
    watch_interval_ms: u64,
    /// Longest a request waits for a key with free rate budget before it is answered 429.
    #[arg(long, env = "FLOODGATE_MAX_QUEUE_WAIT_MS", default_value_t = 30_000)]
    max_queue_wait_ms: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "FLOODGATE_BODY_LIMIT_BYTES", default_value_t = floodgate_proxy::server::DEFAULT_BODY_LIMIT)]
    body_limit_bytes: usize,
    /// Validate the configuration, print the result and exit.
    #[arg(long)]
    check_config: bool,
    /// Log as JSON lines instead of text.
    #[arg(long, env = "FLOODGATE_LOG_JSON")]
    log_json: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
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
    let shared = Arc::new(ArcSwap::from_pointee(config));
    // Cluster mode is ready after the first configuration from the API server is applied.
    let ready = Arc::new(AtomicBool::new(!args.cluster));
    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    if args.cluster {
        let client = cluster::client()
            .await
            .context("cluster mode: no Kubernetes client configuration")?;
        let namespace = args
            .namespace
            .clone()
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let watcher = cluster::ClusterWatcher::new(client, namespace, secrets);
        tasks.spawn(watcher.run(shared.clone(), ready.clone(), cancel.clone()));
    } else if let Some(watcher) = watcher {
        tasks.spawn(watcher.run(shared.clone(), cancel.clone()));
    }
    let dispatcher = Dispatcher::new(MINUTE, Duration::from_millis(args.max_queue_wait_ms))
        .context("cannot build the upstream HTTP client")?;
    let mut state = AppState::new(shared.clone(), ready.clone(), Arc::new(dispatcher));
    state.body_limit = args.body_limit_bytes;
    let app = router(state);
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(
        listen = %listener.local_addr()?,
        models = shared.load().models().len(),
        "floodgate-proxy serving"
    );
    let shutdown = {
        let cancel = cancel.clone();
        async move {
            shutdown_signal().await;
            tracing::info!("shutting down: draining in-flight requests");
            ready.store(false, Ordering::Release);
            cancel.cancel();
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    tasks.close();
    tasks.wait().await;
    Ok(())
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,tower_http=warn"));
    use std::io::IsTerminal as _;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
