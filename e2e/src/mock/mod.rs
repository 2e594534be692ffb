//! Mock AI providers: one HTTP server that speaks the OpenAI, Anthropic, Gemini and Ollama wire
//! formats on their own paths, so every provider's `baseUrl` can point at the same mock.
//!
//! | Provider  | Paths                                                                  | Key          |
//! |-----------|------------------------------------------------------------------------|--------------|
//! | OpenAI    | `POST /v1/chat/completions`, `POST /v1/embeddings`, `GET /v1/models`   | `Authorization: Bearer` |
//! | Anthropic | `POST /v1/messages`                                                    | `x-api-key`  |
//! | Gemini    | `POST /v1beta/models/{model}:generateContent` / `:streamGenerateContent` / `:embedContent` / `:batchEmbedContents` | `x-goog-api-key` or `?key=` |
//! | Ollama    | `POST /api/chat`, `POST /api/embed`, `GET /api/tags`                   | none         |
//! | admin     | `GET /_mock/counts`, `POST /_mock/reset`, `GET`/`POST /_mock/faults`    | none         |
//!
//! A request without a key is refused as the real service refuses it, unless
//! [`MockConfig::with_missing_key_allowed`] makes the mock a keyless self-hosted server too.
//!
//! Answers are deterministic ([`answer_for`], and [`embedding_for`] for vectors) and token
//! counts derive from text length ([`token_count`]). Per-key rate limits use a sliding
//! window, as the real services do, and
//! the mock records how many requests each key received in its busiest window, so a test can
//! assert that a gateway never pushed a key over its limit.
//!
//! Behaviour is chosen by the model name, so tests need no extra configuration (see
//! [`Behavior::from_model`]): `error-500`, `error-503`, `overloaded-529`, `ratelimited`,
//! `slow-<ms>`, `stall`, `truncate`, `malformed`, `abort`. The same faults can be forced for every call
//! to one provider with [`MockProviders::set_fault`] or `POST /_mock/faults`.
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use floodgate_e2e::mock::{MockConfig, MockProviders, Provider};
//! let mock = MockProviders::start(MockConfig::default().with_rpm("key-1", 3)).await?;
//! let url = format!("{}/v1/chat/completions", mock.base_url());
//! // ... send requests ...
//! assert!(mock.counts().over_limit().next().is_none());
//! mock.shutdown().await
//! # }
//! ```

mod admin;
mod anthropic;
mod common;
mod embed;
mod faults;
mod gemini;
mod limits;
mod ollama;
mod openai;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use common::{answer_for, fingerprint, token_count};
pub use embed::{
    GEMINI_DIMENSIONS, OLLAMA_CONTEXT_TOKENS, OLLAMA_DIMENSIONS, OPENAI_DIMENSIONS,
    default_dimensions, embedding_for,
};
pub use faults::{Behavior, Fault, ParseError};
pub use limits::{Counts, KeyCounts};

use faults::FaultTable;
use limits::KeyTable;

/// How long [`MockProviders::shutdown`] waits for open connections before aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The wire formats the mock speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// OpenAI chat completions.
    #[serde(rename = "openai")]
    OpenAi,
    /// Anthropic messages.
    Anthropic,
    /// Google Gemini `generateContent`.
    Gemini,
    /// Ollama `/api/chat`.
    Ollama,
}

impl Provider {
    /// Every provider, in a stable order.
    pub const ALL: [Self; 4] = [Self::OpenAi, Self::Anthropic, Self::Gemini, Self::Ollama];

    /// The lowercase name used in JSON and on the command line.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::OpenAi => "openai",
            Self::Anthropic => "anthropic",
            Self::Gemini => "gemini",
            Self::Ollama => "ollama",
        }
    }

    const fn index(self) -> usize {
        match self {
            Self::OpenAi => 0,
            Self::Anthropic => 1,
            Self::Gemini => 2,
            Self::Ollama => 3,
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Provider {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| ParseError::new(format!("unknown provider `{s}`")))
    }
}

/// What the mock enforces. Build with [`MockConfig::default`] and the `with_*` methods.
#[derive(Debug, Clone)]
pub struct MockConfig {
    /// Requests per window allowed for each listed key (any provider). `0` refuses every call.
    pub rpm_per_key: HashMap<String, u32>,
    /// Limit for keys not in `rpm_per_key`; `None` means unlimited.
    pub default_rpm: Option<u32>,
    /// Length of the sliding rate-limit window (60 s like the real services; short in tests).
    pub window: Duration,
    /// Keys accepted by OpenAI, Anthropic and Gemini; `None` accepts any key. A key containing
    /// `invalid` is refused either way.
    pub valid_keys: Option<HashSet<String>>,
    /// Answer requests that carry no key, as a self-hosted OpenAI-compatible server (vLLM,
    /// llama.cpp) does; a key that is given is still checked. Off by default: the real
    /// services answer 401 (403 for Gemini).
    pub allow_missing_key: bool,
    /// How many recent request timestamps to keep per key in [`Counts`].
    pub history_per_key: usize,
    /// Pause between streamed events. Zero (the default, for benchmarks) writes each stream
    /// in one piece; clients must split events themselves either way.
    pub chunk_interval: Duration,
    /// Log one line per request (key fingerprint only, never the key). Off by default.
    pub log_requests: bool,
}

impl Default for MockConfig {
    fn default() -> Self {
        Self {
            rpm_per_key: HashMap::new(),
            default_rpm: None,
            window: Duration::from_secs(60),
            valid_keys: None,
            allow_missing_key: false,
            history_per_key: 1024,
            chunk_interval: Duration::ZERO,
            log_requests: false,
        }
    }
}

impl MockConfig {
    /// Limits `key` to `rpm` requests per window.
    #[must_use]
    pub fn with_rpm(mut self, key: impl Into<String>, rpm: u32) -> Self {
        self.rpm_per_key.insert(key.into(), rpm);
        self
    }

    /// Limits every key not given its own limit.
    #[must_use]
    pub fn with_default_rpm(mut self, rpm: u32) -> Self {
        self.default_rpm = Some(rpm);
        self
    }

    /// Sets the sliding-window length (tests use a few hundred milliseconds).
    #[must_use]
    pub fn with_window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Accepts only these keys (plus Ollama, which has no keys).
    #[must_use]
    pub fn with_valid_keys<I, K>(mut self, keys: I) -> Self
    where
        I: IntoIterator<Item = K>,
        K: Into<String>,
    {
        self.valid_keys = Some(keys.into_iter().map(Into::into).collect());
        self
    }

    /// Answers requests without a key (see [`MockConfig::allow_missing_key`]).
    #[must_use]
    pub fn with_missing_key_allowed(mut self, allowed: bool) -> Self {
        self.allow_missing_key = allowed;
        self
    }

    /// Pauses between streamed chunks, to look like a real model typing.
    #[must_use]
    pub fn with_chunk_interval(mut self, interval: Duration) -> Self {
        self.chunk_interval = interval;
        self
    }

    /// Logs one line per request at `info` (key fingerprints only).
    #[must_use]
    pub fn with_request_logging(mut self, on: bool) -> Self {
        self.log_requests = on;
        self
    }

    fn validate(&self) -> io::Result<()> {
        if self.window.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "mock config: window must be longer than zero",
            ));
        }
        Ok(())
    }
}

/// State shared by every handler.
#[derive(Debug)]
struct Shared {
    config: MockConfig,
    keys: KeyTable,
    faults: FaultTable,
    next_id: AtomicU64,
    /// Stalled streams whose client went away before the mock stopped.
    abandoned: AtomicU64,
    shutdown: CancellationToken,
}

impl Shared {
    /// A process-unique suffix for response ids (`chatcmpl-mock…`, `msg_mock…`).
    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A running mock server. Dropping it stops the server; [`MockProviders::shutdown`] also waits
/// for it.
#[derive(Debug)]
pub struct MockProviders {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl MockProviders {
    /// Starts the mock on an ephemeral port of 127.0.0.1.
    pub async fn start(config: MockConfig) -> io::Result<Self> {
        Self::bind(config, SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts the mock on `addr` (the binary's `--listen`).
    pub async fn bind(config: MockConfig, addr: SocketAddr) -> io::Result<Self> {
        config.validate()?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            keys: KeyTable::new(&config),
            faults: FaultTable::default(),
            next_id: AtomicU64::new(1),
            abandoned: AtomicU64::new(0),
            shutdown: CancellationToken::new(),
            config,
        });
        // Small SSE chunks must not wait for Nagle's algorithm.
        let listener = listener.tap_io(|tcp| {
            if let Err(err) = tcp.set_nodelay(true) {
                tracing::trace!("mock: cannot set TCP_NODELAY: {err}");
            }
        });
        let serve = axum::serve(listener, router(Arc::clone(&shared)))
            .with_graceful_shutdown(shared.shutdown.clone().cancelled_owned());
        let task = tokio::spawn(async move { serve.await });
        Ok(Self {
            addr,
            shared,
            task: Some(task),
        })
    }

    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`: the `baseUrl` for every provider.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A snapshot of the per-(provider, key) counters.
    pub fn counts(&self) -> Counts {
        self.shared.keys.snapshot()
    }

    /// How many `stall` streams the client closed (the gateway cancelled the upstream
    /// request) before the mock stopped.
    pub fn streams_abandoned(&self) -> u64 {
        self.shared.abandoned.load(Ordering::Acquire)
    }

    /// The mock's clock: microseconds since it started, the origin of
    /// [`KeyCounts::timestamps_us`].
    pub fn now_us(&self) -> u64 {
        self.shared.keys.now_us()
    }

    /// Forgets every counter and rate-limit window and clears every injected fault.
    pub fn reset(&self) {
        self.shared.keys.reset();
        self.shared.faults.clear_all();
    }

    /// Applies `fault` to every call to `provider` until cleared (it overrides the model name).
    pub fn set_fault(&self, provider: Provider, fault: Fault) {
        self.shared.faults.set(provider, Some(fault));
    }

    /// Stops injecting a fault into `provider`'s calls.
    pub fn clear_fault(&self, provider: Provider) {
        self.shared.faults.set(provider, None);
    }

    /// Stops injecting faults into every provider.
    pub fn clear_faults(&self) {
        self.shared.faults.clear_all();
    }

    /// Resolves when the server stops (after [`MockProviders::shutdown`] or an I/O error).
    pub async fn stopped(&mut self) -> io::Result<()> {
        match self.task.as_mut() {
            Some(task) => {
                let result = task.await.map_err(io::Error::other)?;
                self.task = None;
                result
            }
            None => Ok(()),
        }
    }

    /// Stops accepting, ends stalled streams, and waits (briefly) for open connections.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shared.shutdown.cancel();
        let Some(mut task) = self.task.take() else {
            return Ok(());
        };
        match tokio::time::timeout(SHUTDOWN_GRACE, &mut task).await {
            Ok(joined) => joined.map_err(io::Error::other)?,
            Err(_elapsed) => {
                // A client holding a keep-alive connection open must not hang the caller.
                task.abort();
                Ok(())
            }
        }
    }
}

impl Drop for MockProviders {
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// Every route of the mock. No middleware: the mock must stay much cheaper than the proxy.
fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(openai::chat))
        .route("/v1/embeddings", post(openai::embeddings))
        .route("/v1/models", get(openai::models))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1beta/models/{target}", post(gemini::generate))
        .route("/api/chat", post(ollama::chat))
        .route("/api/embed", post(ollama::embed))
        .route("/api/tags", get(ollama::tags))
        .route("/_mock/counts", get(admin::counts))
        .route("/_mock/reset", post(admin::reset))
        .route("/_mock/faults", get(admin::faults).post(admin::set_fault))
        .with_state(shared)
}
