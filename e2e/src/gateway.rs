//! The proxy in-process for tests: a configuration written to a temporary directory, a
//! dispatcher with a short rate window, served on an ephemeral loopback port.

use floodgate_proxy::config::load::load_config;
use floodgate_proxy::config::secrets::SecretSources;
use floodgate_proxy::route::Dispatcher;
use floodgate_proxy::server::conn::{self, Connections, Limits};
use floodgate_proxy::server::{AppState, admin_router, router};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A running in-process gateway.
#[derive(Debug)]
pub struct Gateway {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where its admin router (`/metrics`) listens.
    pub admin_addr: SocketAddr,
    /// Its dispatcher (budgets, breakers, the configuration serving now).
    pub dispatcher: Arc<Dispatcher>,
    server: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Gateway {
    /// Starts a gateway on the manifests `yaml`, with rate windows of `window` and at most
    /// `max_wait` of waiting for budget.
    pub async fn start(
        yaml: &str,
        window: Duration,
        max_wait: Duration,
    ) -> anyhow::Result<Gateway> {
        Self::start_with(yaml, Dispatcher::new(window, max_wait)?).await
    }

    /// Starts a gateway on the manifests `yaml` with `dispatcher` (e.g. one built with
    /// shared budgets by `Dispatcher::with_options`).
    pub async fn start_with(yaml: &str, dispatcher: Dispatcher) -> anyhow::Result<Gateway> {
        Self::start_configured(yaml, dispatcher, |_| {}).await
    }

    /// Starts a gateway that names the key used in each answer (`x-floodgate-key`, off by
    /// default), for tests that check which key served.
    pub async fn start_naming_keys(yaml: &str, dispatcher: Dispatcher) -> anyhow::Result<Gateway> {
        Self::start_configured(yaml, dispatcher, |state| state.expose_key = true).await
    }

    /// Starts a gateway on `yaml` with `dispatcher`, its state adjusted by `configure`.
    pub async fn start_configured(
        yaml: &str,
        dispatcher: Dispatcher,
        configure: impl FnOnce(&mut AppState),
    ) -> anyhow::Result<Gateway> {
        Self::start_bounded(
            yaml,
            dispatcher,
            configure,
            Limits::default(),
            conn::DEFAULT_MAX_CONNECTIONS,
        )
        .await
    }

    /// Starts a gateway on `yaml` with `dispatcher`, its state adjusted by `configure`, its
    /// connections bounded by `limits` and at most `max_connections` open at once.
    pub async fn start_bounded(
        yaml: &str,
        dispatcher: Dispatcher,
        configure: impl FnOnce(&mut AppState),
        limits: Limits,
        max_connections: usize,
    ) -> anyhow::Result<Gateway> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("gateway.yaml"), yaml)?;
        let (config, _) = load_config(&[dir.path().to_owned()], SecretSources::default())?;
        let dispatcher = Arc::new(dispatcher);
        dispatcher.apply(Arc::new(config));
        let mut state = AppState::new(Arc::new(AtomicBool::new(true)), dispatcher.clone());
        configure(&mut state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin_addr = admin.local_addr()?;
        let connections = Arc::new(Connections::new(limits, max_connections));
        let admin_connections = Arc::new(Connections::new(Limits::default(), 64));
        let server = tokio::spawn(async move {
            // As the binary serves: the same connection handling and bounds, and the admin
            // router on a listener of its own.
            let stop = CancellationToken::new();
            let admin = conn::serve(
                admin,
                admin_router(state.clone()),
                admin_connections,
                stop.clone(),
            );
            let public = conn::serve(listener, router(state), connections, stop);
            let _ = tokio::join!(admin, public);
        });
        Ok(Gateway {
            addr,
            admin_addr,
            dispatcher,
            server,
            _dir: dir,
        })
    }

    /// Replaces the configuration with the manifests `yaml` (validated like a file reload).
    pub fn reconfigure(&self, yaml: &str) -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("gateway.yaml"), yaml)?;
        let (config, _) = load_config(&[dir.path().to_owned()], SecretSources::default())?;
        self.dispatcher.apply(Arc::new(config));
        Ok(())
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://admin_addr`: `/metrics`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin_addr)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.server.abort();
    }
}
