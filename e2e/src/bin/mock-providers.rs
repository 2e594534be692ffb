//! `mock-providers`: the four mock AI providers on one port, for `make run` and benchmarks.
//!
//! ```text
//! mock-providers --listen 127.0.0.1:8090 --rpm claude-key-1=20 --default-rpm 60 --quiet
//! ```
//!
//! Faults at runtime: `curl -XPOST localhost:8090/_mock/faults -d '{"provider":"openai","fault":"error-500"}'
//! -H content-type:application/json`; counters: `curl localhost:8090/_mock/counts`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use floodgate_e2e::mock::{MockConfig, MockProviders, fingerprint};
use tracing_subscriber::EnvFilter;

/// Mock OpenAI, Anthropic, Gemini and Ollama APIs on one port.
#[derive(Debug, Parser)]
#[command(name = "mock-providers", version)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Per-key limit, `KEY=RPM` (repeatable).
    #[arg(long = "rpm", value_name = "KEY=RPM")]
    rpm: Vec<String>,
    /// Limit for keys without their own `--rpm` (default: unlimited).
    #[arg(long, value_name = "RPM")]
    default_rpm: Option<u32>,
    /// Rate-limit window in milliseconds.
    #[arg(long, default_value_t = 60_000, value_name = "MS")]
    window_ms: u64,
    /// Accept only these keys (repeatable; default: any key without "invalid" in it).
    #[arg(long = "valid-key", value_name = "KEY")]
    valid_keys: Vec<String>,
    /// Answer requests that carry no key, like a self-hosted OpenAI-compatible server (a key
    /// that is given is still checked). The bench's keyless pass-through needs it.
    #[arg(long)]
    allow_missing_key: bool,
    /// Pause between streamed chunks, in milliseconds.
    #[arg(long, default_value_t = 0, value_name = "MS")]
    chunk_interval_ms: u64,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// No per-request log lines, warnings only (use for benchmarks).
    #[arg(long)]
    quiet: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(if args.quiet { "warn" } else { "info" }));
    tracing_subscriber::fmt().with_env_filter(filter).init();

    let config = config(&args)?;
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = args.threads {
        runtime.worker_threads(threads);
    }
    runtime
        .enable_all()
        .build()
        .context("building the tokio runtime")?
        .block_on(run(args.listen, config))
}

/// Validates every flag, reporting all problems at once, before binding the port.
fn config(args: &Args) -> Result<MockConfig> {
    let mut errors = Vec::new();
    let mut config = MockConfig::default()
        .with_window(Duration::from_millis(args.window_ms))
        .with_chunk_interval(Duration::from_millis(args.chunk_interval_ms))
        .with_request_logging(!args.quiet)
        .with_missing_key_allowed(args.allow_missing_key);
    if args.window_ms == 0 {
        errors.push("--window-ms must be greater than 0".to_owned());
    }
    for spec in &args.rpm {
        match spec.rsplit_once('=').map(|(k, n)| (k, n.parse::<u32>())) {
            Some((key, Ok(rpm))) if !key.is_empty() => config = config.with_rpm(key, rpm),
            _ => errors.push(format!(
                "--rpm for {} must be KEY=RPM with RPM a whole number",
                fingerprint(spec)
            )),
        }
    }
    if let Some(rpm) = args.default_rpm {
        config = config.with_default_rpm(rpm);
    }
    if !args.valid_keys.is_empty() {
        config = config.with_valid_keys(args.valid_keys.iter().cloned());
    }
    if !errors.is_empty() {
        bail!("invalid arguments:\n  {}", errors.join("\n  "));
    }
    Ok(config)
}

async fn run(listen: SocketAddr, config: MockConfig) -> Result<()> {
    let limits: Vec<String> = config
        .rpm_per_key
        .iter()
        .map(|(key, rpm)| format!("{}={rpm}", fingerprint(key)))
        .collect();
    let window = config.window;
    let mut mock = MockProviders::bind(config, listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(
        base_url = %mock.base_url(),
        window_ms = window.as_millis(),
        limits = ?limits,
        "mock providers listening"
    );
    tokio::select! {
        result = mock.stopped() => return result.context("mock server failed"),
        () = shutdown_signal() => {}
    }
    tracing::info!("shutting down");
    mock.shutdown().await.context("shutting down")
}

async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for ctrl-c: {err}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!("cannot listen for SIGTERM: {err}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
