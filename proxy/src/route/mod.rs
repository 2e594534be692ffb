//! Choosing a target for each request and calling it: model name or alias -> providers in
//! fallback order -> a key with free budget (by the pool's strategy) behind a closed circuit ->
//! the provider's wire format. Failures move on: a 429 cools the key, a 401/403 takes it out,
//! 5xx and timeouts count against the provider's breaker and move to the next provider. When
//! every key is out of budget the request waits for the earliest one to free up, up to the
//! dispatcher's maximum wait.

pub mod breaker;
pub mod runtime;
mod status;
mod upstream;

use crate::budget::{Budgets, Permit, SharedError, SharedOptions, Unavailable};
use crate::config::Config;
use crate::metrics;
use crate::providers::types::ChatRequest;
use crate::providers::{ChatResponse, ProviderError, estimate_prompt_tokens};
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use floodgate_crds::Strategy;
use futures::stream::BoxStream;
use runtime::{Breakers, ProviderRt, Route, Runtime};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// Default output tokens reserved when the caller sets no `max_tokens`.
const DEFAULT_OUTPUT_RESERVATION: u64 = 1024;

/// What the caller gets back.
pub struct Reply {
    /// Provider that answered.
    pub provider: String,
    /// Key that was used (its display name).
    pub key: String,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The answer.
    pub body: ReplyBody,
}

impl std::fmt::Debug for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("provider", &self.provider)
            .field("key", &self.key)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// A whole answer, or a stream of SSE event bytes (`data: ...\n\n`, ending with `[DONE]`, or
/// with an error event if the upstream broke mid-stream).
pub enum ReplyBody {
    /// A chat.completion.
    Complete(ChatResponse),
    /// Server-sent events.
    Stream(BoxStream<'static, Bytes>),
}

impl std::fmt::Debug for ReplyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReplyBody::Complete(r) => f.debug_tuple("Complete").field(r).finish(),
            ReplyBody::Stream(_) => f.write_str("Stream(..)"),
        }
    }
}

/// Why a request could not be served.
#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    /// No pool offers the model.
    #[error("the model `{0}` does not exist or is not served by this gateway")]
    UnknownModel(String),
    /// Every key is out of budget for longer than the request may wait.
    #[error("all provider keys for this model are at their rate limit; retry after {} s", retry_after.as_secs().max(1))]
    Saturated {
        /// When budget frees up.
        retry_after: Duration,
    },
    /// No key can serve: all failed (401/403) or every provider's circuit is open.
    #[error("no provider can serve this model now (keys refused or circuits open)")]
    Unavailable {
        /// When a circuit closes, if one will.
        retry_after: Option<Duration>,
    },
    /// The last upstream attempt failed.
    #[error("{error}")]
    Upstream {
        /// The classified failure.
        error: ProviderError,
        /// Attempts made.
        attempts: u32,
    },
}

/// How a [`Dispatcher`] is built.
#[derive(Debug, Clone)]
pub struct DispatcherOptions {
    /// Length of the rate windows (60 s in production; tests shorten it).
    pub window: Duration,
    /// Longest a request waits for budget.
    pub max_wait: Duration,
    /// Share the key budgets with other replicas through Redis; `None` keeps them in process.
    pub redis: Option<SharedOptions>,
}

impl DispatcherOptions {
    /// In-process budgets over `window`, waiting at most `max_wait`.
    pub fn new(window: Duration, max_wait: Duration) -> Self {
        Self {
            window,
            max_wait,
            redis: None,
        }
    }

    /// Shares the key budgets through Redis.
    #[must_use]
    pub fn with_redis(mut self, redis: SharedOptions) -> Self {
        self.redis = Some(redis);
        self
    }
}

/// Why a [`Dispatcher`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The upstream HTTP client.
    #[error("cannot build the upstream HTTP client")]
    Http(#[from] reqwest::Error),
    /// The shared budgets' settings.
    #[error("shared rate budgets")]
    Redis(#[from] SharedError),
}

/// The client for provider calls: pooled keep-alive connections, Nagle off (a request is one
/// write, and small SSE frames should not wait).
fn upstream_client() -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .tcp_nodelay(true)
        .build()
}

/// Routes requests over the configured pools. One per process; budgets and breakers survive
/// configuration reloads.
#[derive(Debug)]
pub struct Dispatcher {
    budgets: Budgets,
    breakers: Breakers,
    http: reqwest::Client,
    max_wait: Duration,
    runtime: ArcSwapOption<(usize, Arc<Runtime>)>,
    rr: AtomicUsize,
}

impl Dispatcher {
    /// A dispatcher whose rate windows last `window` (60 s in production) and whose requests
    /// wait at most `max_wait` for budget.
    pub fn new(window: Duration, max_wait: Duration) -> Result<Self, BuildError> {
        Self::with_options(DispatcherOptions::new(window, max_wait))
    }

    /// A dispatcher built from `opts`. With Redis it connects on first use: an unreachable
    /// Redis is not an error here, budgets then start on local shares.
    pub fn with_options(opts: DispatcherOptions) -> Result<Self, BuildError> {
        // One crypto provider for the process (ring); a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = upstream_client()?;
        let budgets = match opts.redis {
            Some(redis) => Budgets::shared(opts.window, redis)?,
            None => Budgets::new(opts.window),
        };
        Ok(Self {
            budgets,
            breakers: Breakers::default(),
            http,
            max_wait: opts.max_wait,
            runtime: ArcSwapOption::empty(),
            rr: AtomicUsize::new(0),
        })
    }

    /// The upstream HTTP client of the calling thread.
    ///
    /// One per thread: a pooled connection is driven by a task on the runtime that opened it,
    /// so a client shared by the gateway's single-threaded workers would hand each request to
    /// another thread and back. Built on first use; `self.http` if that fails (it was built
    /// the same way when the dispatcher was).
    fn http(&self) -> reqwest::Client {
        thread_local! {
            static CLIENT: std::cell::OnceCell<Option<reqwest::Client>> =
                const { std::cell::OnceCell::new() };
        }
        CLIENT
            .with(|client| client.get_or_init(|| upstream_client().ok()).clone())
            .unwrap_or_else(|| self.http.clone())
    }

    /// Whether budgets are meant to be shared through Redis but Redis is unreachable, so
    /// every key runs on this replica's local share (`floodgate_budget_backend_degraded`).
    /// Cheap: one atomic load.
    pub fn redis_degraded(&self) -> bool {
        self.budgets.redis_degraded()
    }

    /// The key budgets.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Waits for pending writes to shared budgets; call once serving has stopped.
    pub async fn drain(&self) {
        self.budgets.drain().await;
    }

    /// The routing view of `config`, built once per configuration.
    fn runtime(&self, config: &Arc<Config>) -> Arc<Runtime> {
        let id = Arc::as_ptr(config) as usize;
        if let Some(current) = self.runtime.load().as_ref()
            && current.0 == id
        {
            return current.1.clone();
        }
        let rt = Arc::new(Runtime::build(config, &self.budgets, &self.breakers));
        self.runtime.store(Some(Arc::new((id, rt.clone()))));
        rt
    }

    /// Serves one chat request.
    pub async fn chat(&self, config: &Arc<Config>, req: ChatRequest) -> Result<Reply, RouteError> {
        let rt = self.runtime(config);
        let route = rt
            .routes
            .get(&req.model)
            .cloned()
            .ok_or_else(|| RouteError::UnknownModel(req.model.clone()))?;
        let tokens = u64::from(estimate_prompt_tokens(&req))
            + req
                .max_output_tokens()
                .map_or(DEFAULT_OUTPUT_RESERVATION, u64::from);
        let deadline = Instant::now() + self.max_wait;
        let mut skipped = vec![false; route.targets.len()];
        let mut attempts = 0;
        let mut last_error = None;
        let m = metrics::global();
        while attempts < route.max_attempts {
            let now = Instant::now();
            let picked = self.pick(&rt, &route, &skipped, now, tokens).await;
            m.stage("limiter", now.elapsed());
            let Some((ti, ki, permit)) = picked else {
                let wait = self.earliest(&rt, &route, &skipped, now, tokens);
                match wait {
                    Some(at) if at <= deadline => {
                        // Waiting for budget: each wait is one `queue` observation.
                        let queued = Instant::now();
                        tokio::time::sleep_until(at).await;
                        m.stage("queue", queued.elapsed());
                        continue;
                    }
                    Some(at) if last_error.is_none() => {
                        return Err(RouteError::Saturated {
                            retry_after: at - now,
                        });
                    }
                    None if last_error.is_none() => {
                        let retry_after = self.circuit_wait(&rt, &route, now);
                        return Err(RouteError::Unavailable { retry_after });
                    }
                    _ => break,
                }
            };
            attempts += 1;
            let target = &route.targets[ti];
            let provider = &rt.providers[target.provider];
            let key = &provider.keys[ki];
            let result = upstream::call(
                &self.http(),
                provider,
                key,
                &target.upstream_model,
                &req,
                permit,
            )
            .await;
            match result {
                Ok(body) => {
                    return Ok(Reply {
                        provider: provider.name.clone(),
                        key: key.name.clone(),
                        attempts,
                        body,
                    });
                }
                Err(error) => {
                    tracing::warn!(provider = %provider.name, key = %key.name, reason = error.metric_label(), "upstream attempt failed");
                    if !error.retryable() {
                        return Err(RouteError::Upstream { error, attempts });
                    }
                    if error.opens_circuit() {
                        skipped[ti] = true;
                    }
                    last_error = Some(error);
                }
            }
        }
        match last_error {
            Some(error) => Err(RouteError::Upstream { error, attempts }),
            None => Err(RouteError::Unavailable { retry_after: None }),
        }
    }

    /// The first target (in route order, or weighted) with a key that has budget now, and a
    /// permit on that key. Never waits with local budgets; with shared budgets each key tried
    /// costs one Redis round trip (bounded by its timeout).
    async fn pick(
        &self,
        rt: &Runtime,
        route: &Route,
        skipped: &[bool],
        now: Instant,
        tokens: u64,
    ) -> Option<(usize, usize, Permit)> {
        let n = route.targets.len();
        let start = self.start_offset(rt, route);
        for step in 0..n {
            let ti = (start + step) % n;
            if skipped[ti] {
                continue;
            }
            let provider = &rt.providers[route.targets[ti].provider];
            for ki in self.key_order(provider, now, tokens) {
                if !provider.breaker.allow(now) {
                    break;
                }
                match provider.keys[ki].budget.acquire(now, tokens).await {
                    Ok(permit) => return Some((ti, ki, permit)),
                    Err(_) => provider.breaker.neutral(),
                }
            }
        }
        None
    }

    /// Where to start in the route: the first target, except under the weighted strategy,
    /// which rotates through targets in proportion to their providers' weights.
    fn start_offset(&self, rt: &Runtime, route: &Route) -> usize {
        let weights: Vec<u32> = route
            .targets
            .iter()
            .map(|t| rt.providers[t.provider].weight)
            .collect();
        let weighted = route
            .targets
            .first()
            .is_some_and(|t| rt.providers[t.provider].strategy == Strategy::Weighted);
        if !weighted || route.targets.len() < 2 {
            return 0;
        }
        let total: u32 = weights.iter().sum();
        let mut tick = (self.rr.fetch_add(1, Ordering::Relaxed) % total.max(1) as usize) as u32;
        for (i, w) in weights.iter().enumerate() {
            if tick < *w {
                return i;
            }
            tick -= w;
        }
        0
    }

    /// Keys of a provider that can take `tokens` now, best first by the pool's strategy.
    fn key_order(&self, provider: &ProviderRt, now: Instant, tokens: u64) -> Vec<usize> {
        let mut free: Vec<(usize, f64)> = provider
            .keys
            .iter()
            .enumerate()
            .filter(|(_, k)| k.budget.availability(now, tokens).is_ok())
            .map(|(i, k)| (i, k.budget.remaining_fraction(now)))
            .collect();
        match provider.strategy {
            Strategy::RoundRobin => {
                let n = free.len().max(1);
                let start = self.rr.fetch_add(1, Ordering::Relaxed) % n;
                free.rotate_left(start);
            }
            Strategy::LeastLoaded | Strategy::Weighted | Strategy::Cheapest => {
                free.sort_by(|a, b| b.1.total_cmp(&a.1));
            }
        }
        free.into_iter().map(|(i, _)| i).collect()
    }

    /// When the earliest key of a usable provider frees up; `None` if none ever will.
    fn earliest(
        &self,
        rt: &Runtime,
        route: &Route,
        skipped: &[bool],
        now: Instant,
        tokens: u64,
    ) -> Option<Instant> {
        route
            .targets
            .iter()
            .zip(skipped)
            .filter(|(_, s)| !**s)
            .flat_map(|(t, _)| {
                let p = &rt.providers[t.provider];
                let circuit = p.breaker.open_until(now);
                p.keys
                    .iter()
                    .filter_map(move |k| match k.budget.availability(now, tokens) {
                        Ok(()) => Some(circuit.unwrap_or(now).max(now + Duration::from_millis(1))),
                        Err(Unavailable::Until(at)) => Some(circuit.map_or(at, |c| c.max(at))),
                        Err(Unavailable::Failed) => None,
                    })
            })
            .min()
    }

    fn circuit_wait(&self, rt: &Runtime, route: &Route, now: Instant) -> Option<Duration> {
        route
            .targets
            .iter()
            .filter_map(|t| rt.providers[t.provider].breaker.open_until(now))
            .min()
            .map(|at| at - now)
    }
}
