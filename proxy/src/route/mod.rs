//! Choosing a target for each request and calling it: model name or alias -> providers in
//! fallback order -> a key with free budget (by the pool's strategy) behind a closed circuit ->
//! the provider's wire format. Failures move on: a 429 cools the key, a 401/403 takes it out,
//! 5xx and timeouts count against the provider's breaker and move to the next provider. When
//! every key is out of budget the request waits in the route's queue (arrival order, bounded)
//! for the earliest key to free up, up to its deadline.
//!
//! The answer is typed: a whole [`ChatResponse`] or a stream of [`ChatChunk`]s
//! ([`ChunkStream`]); the front door that took the request renders it in its own format.
//! Embeddings ([`Dispatcher::embeddings`]) spend the same key budgets through the same
//! attempt loop ([`attempt`]) and answer an [`EmbeddingsResponse`].

pub mod attempt;
pub mod breaker;
pub mod runtime;
mod status;
pub mod tiers;
mod upstream;
pub mod wait;

use crate::budget::{Budgets, SharedError, SharedOptions, Signal};
use crate::config::Config;
use crate::config::watch::ConfigSink;
use crate::providers::types::ChatRequest;
use crate::providers::{
    ChatChunk, ChatResponse, EmbeddingsRequest, EmbeddingsResponse, ProviderError,
};
use arc_swap::ArcSwap;
use attempt::{Asker, Attempts, Demand};
use futures::Stream;
use prometheus_client::metrics::counter::Counter;
use runtime::{Breakers, QueueBound, Queues, Runtime};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;
use tiers::{TierPlan, TierStates};
use tokio::time::Instant;

/// The usage of one streamed answer as the gateway settled it with the key's budget: the
/// provider's count when it gave one (whether or not the caller asked to see it), or, for a
/// stream the caller left, the gateway's settlement. Written once by the attempt that
/// answered; read after the stream by the stages that charge for it (a tenant's tokens, the
/// cost ledger), which otherwise see usage only when the caller asked for it.
#[derive(Debug, Clone, Default)]
pub struct UsageReport(Arc<std::sync::OnceLock<crate::providers::types::Usage>>);

impl UsageReport {
    /// The usage, once the stream ended (or was left) and the provider's count was known.
    pub fn get(&self) -> Option<crate::providers::types::Usage> {
        self.0.get().copied()
    }

    /// Records `usage` (the first record stands).
    pub(crate) fn set(&self, usage: crate::providers::types::Usage) {
        let _ = self.0.set(usage);
    }
}

/// A streamed answer: chunks in order, ending cleanly after the provider's terminal event,
/// or with one `Err` when the upstream broke mid-stream (nothing follows it).
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChatChunk, ProviderError>> + Send>>;

/// What the caller gets back: a chat answer ([`ReplyBody`]), or an [`EmbeddingsResponse`].
pub struct Reply<B = ReplyBody> {
    /// Provider that answered.
    pub provider: Arc<str>,
    /// Key that was used (its display name).
    pub key: Arc<str>,
    /// Upstream attempts made.
    pub attempts: u32,
    /// The counter of requests of this tier served on this route by this provider.
    pub ok: Counter,
    /// How long the request waited in the queue for budget.
    pub waited: Duration,
    /// The answer.
    pub body: B,
}

impl<B> std::fmt::Debug for Reply<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reply")
            .field("provider", &self.provider)
            .field("key", &self.key)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// A whole answer, or a typed stream.
pub enum ReplyBody {
    /// A chat.completion.
    Complete(ChatResponse),
    /// Chunks as they come.
    Stream(ChunkStream),
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
    /// Every key is out of budget for longer than the request may wait, or too many requests
    /// already wait for it.
    #[error("all provider keys for this model are at their rate limit; retry after {} s", whole_seconds(*retry_after))]
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

/// Whole seconds, rounded up, at least 1: what `retry-after` says.
pub fn whole_seconds(d: Duration) -> u64 {
    (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
}

impl RouteError {
    /// Whether the gateway refused the request itself (no such model, no key in time, no
    /// provider able to serve, nothing it could be sent to), rather than pass on a
    /// provider's error: no attempt reached a provider.
    pub fn is_gateway_refusal(&self) -> bool {
        match self {
            RouteError::Upstream { attempts, .. } => *attempts == 0,
            _ => true,
        }
    }

    /// A low-cardinality label for metrics and logs.
    pub fn metric_label(&self) -> &'static str {
        match self {
            RouteError::UnknownModel(_) => "model_not_found",
            RouteError::Saturated { .. } => "rate_limit_exceeded",
            RouteError::Unavailable { .. } => "no_upstream_available",
            RouteError::Upstream { error, .. } => error.metric_label(),
        }
    }
}

/// How a [`Dispatcher`] is built.
#[derive(Debug, Clone)]
pub struct DispatcherOptions {
    /// Length of the rate windows (60 s in production; tests shorten it).
    pub window: Duration,
    /// Longest a request waits for budget.
    pub max_wait: Duration,
    /// Most requests waiting for budget per model; `None`: what the model's keys could
    /// serve within `max_wait` ([`QueueBound::Capacity`]).
    pub max_queued: Option<usize>,
    /// Share the key budgets with other replicas through Redis; `None` keeps them in process.
    pub redis: Option<SharedOptions>,
}

impl DispatcherOptions {
    /// In-process budgets over `window`, waiting at most `max_wait`.
    pub fn new(window: Duration, max_wait: Duration) -> Self {
        Self {
            window,
            max_wait,
            max_queued: None,
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
    Http(#[from] rustls::Error),
    /// The shared budgets' settings.
    #[error("shared rate budgets")]
    Redis(#[from] SharedError),
}

/// One configuration and the routing view built from it, swapped together: a request sees
/// the routes of the configuration it read, never a mix.
#[derive(Debug)]
pub struct View {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Providers, keys and routes of `config`.
    pub runtime: Runtime,
}

/// Routes requests over the configured pools. One per process; budgets and breakers survive
/// configuration reloads.
#[derive(Debug)]
pub struct Dispatcher {
    budgets: Budgets,
    breakers: Breakers,
    queues: Queues,
    tier_states: TierStates,
    signal: Arc<Signal>,
    max_wait: Duration,
    bound: QueueBound,
    view: ArcSwap<View>,
    rr: AtomicUsize,
    routing: crate::routing::State,
}

impl Dispatcher {
    /// A dispatcher whose rate windows last `window` (60 s in production) and whose requests
    /// wait at most `max_wait` for budget.
    pub fn new(window: Duration, max_wait: Duration) -> Result<Self, BuildError> {
        Self::with_options(DispatcherOptions::new(window, max_wait))
    }

    /// A dispatcher built from `opts`, serving an empty configuration until
    /// [`Dispatcher::apply`]. With Redis it connects on first use: an unreachable Redis is not
    /// an error here, budgets then start on local shares.
    pub fn with_options(opts: DispatcherOptions) -> Result<Self, BuildError> {
        // One crypto provider for the process (ring); a second install is a no-op.
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Fails here, at start-up, rather than on the first request.
        upstream::client(Duration::from_secs(10))?;
        let signal = Arc::new(Signal::default());
        // Monthly cost budgets are shared through the same Redis.
        let spend = opts
            .redis
            .as_ref()
            .and_then(crate::routing::spend::SharedSpend::new);
        let routing = crate::routing::State {
            ledger: Arc::new(spend.map_or_else(
                crate::routing::cost::Ledger::default,
                crate::routing::cost::Ledger::shared,
            )),
            ..crate::routing::State::default()
        };
        let budgets = match opts.redis {
            Some(redis) => Budgets::shared(opts.window, redis, signal.clone())?,
            None => Budgets::new(opts.window, signal.clone()),
        };
        let bound = match opts.max_queued {
            Some(n) => QueueBound::Fixed(n),
            None => QueueBound::Capacity {
                window: opts.window,
                max_wait: opts.max_wait,
            },
        };
        let breakers = Breakers::default();
        let queues = Queues::default();
        let tier_states = TierStates::default();
        let config = Arc::new(Config::default());
        let tiers = TierPlan::build(&config, opts.max_wait, &tier_states);
        let runtime = Runtime::build(&config, &budgets, &breakers, &queues, &signal, bound, tiers);
        Ok(Self {
            budgets,
            breakers,
            queues,
            tier_states,
            signal,
            max_wait: opts.max_wait,
            bound,
            view: ArcSwap::from_pointee(View { config, runtime }),
            rr: AtomicUsize::new(0),
            routing,
        })
    }

    /// The queue figures of the TierQueue served now (see [`TierPlan::queue_figures`]).
    pub fn queue_figures(&self) -> Option<crate::demand::QueueFigures> {
        self.view
            .load()
            .runtime
            .tiers
            .queue_figures(tokio::time::Instant::now())
    }

    /// Serves `config` from now on: builds its routing view (reusing the budgets and breakers
    /// of keys and providers it keeps) and swaps both in at once.
    pub fn apply(&self, config: Arc<Config>) {
        for note in config.not_acted_on() {
            tracing::warn!("{note}");
        }
        let tiers = TierPlan::build(&config, self.max_wait, &self.tier_states);
        let runtime = Runtime::build(
            &config,
            &self.budgets,
            &self.breakers,
            &self.queues,
            &self.signal,
            self.bound,
            tiers,
        );
        self.routing.gates.configure(&config.routing.locals);
        self.view.store(Arc::new(View { config, runtime }));
        // Keys may have been added or raised: waiters look again.
        self.signal.pulse();
    }

    /// The configuration and routing view serving now.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    /// The configuration serving now.
    pub fn config(&self) -> Arc<Config> {
        self.view.load().config.clone()
    }

    /// Longest a request waits for budget without a TierQueue.
    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Whether budgets are meant to be shared through Redis but Redis is unreachable, so
    /// every key runs on this replica's local share (`floodgate_budget_backend_degraded`).
    /// Cheap: one atomic load.
    pub fn redis_degraded(&self) -> bool {
        self.budgets.redis_degraded()
    }

    /// What routing keeps across reloads: local models' gates and demand, monthly spending.
    pub fn routing(&self) -> &crate::routing::State {
        &self.routing
    }

    /// The key budgets.
    pub fn budgets(&self) -> &Budgets {
        &self.budgets
    }

    /// Waits for pending writes to shared budgets; call once serving has stopped.
    pub async fn drain(&self) {
        self.budgets.drain().await;
    }

    /// Serves one chat request of `asker` on `view`, waiting for budget until `deadline` at
    /// the latest.
    pub async fn chat(
        &self,
        view: &View,
        req: &ChatRequest,
        deadline: Instant,
        asker: Asker,
    ) -> Result<Reply, RouteError> {
        self.chat_on(view, &req.model, req, deadline, asker).await
    }

    /// Serves one chat request on the route named `route` (a model name or alias, or
    /// `<pool>/<model>` for that pool's targets alone), as [`Dispatcher::chat`].
    pub async fn chat_on(
        &self,
        view: &View,
        route: &str,
        req: &ChatRequest,
        deadline: Instant,
        asker: Asker,
    ) -> Result<Reply, RouteError> {
        self.chat_except(view, route, req, deadline, asker, &[])
            .await
    }

    /// [`Dispatcher::chat_on`] without the targets of the pools named in `pools` (their cost
    /// budgets are spent): no budget is spent on them and no wait counts on them.
    pub async fn chat_except(
        &self,
        view: &View,
        route: &str,
        req: &ChatRequest,
        deadline: Instant,
        asker: Asker,
        pools: &[Arc<str>],
    ) -> Result<Reply, RouteError> {
        let route = view
            .runtime
            .routes
            .get(route)
            .ok_or_else(|| RouteError::UnknownModel(req.model.clone()))?;
        let demand = Demand::chat(req);
        let report = asker.report.clone();
        let answer_by = asker.answer_by;
        let mut attempts = Attempts::new(self, &view.runtime, route, demand, deadline, asker);
        for (i, target) in route.targets.iter().enumerate() {
            let pool = &view.runtime.providers[target.provider].pool;
            if pools.iter().any(|p| **p == **pool) {
                attempts.skip(i);
            }
        }
        loop {
            let lease = attempts.next().await?;
            let adapter = lease.provider.adapter;
            // Translated before anything is sent: a target that cannot take the request is
            // skipped without spending budget, and another may still serve it.
            let body = match adapter.build_body(&lease.target.upstream_model, req, req.stream) {
                Ok(body) => body,
                Err(error) => {
                    lease.permit.cancel();
                    attempts.refused(lease.target_index, error)?;
                    continue;
                }
            };
            let http = match upstream::thread_client(lease.provider.timeouts.connect_ms) {
                Ok(http) => http,
                Err(error) => {
                    lease.permit.cancel();
                    attempts.failed(lease.target_index, error)?;
                    continue;
                }
            };
            let result = upstream::call(
                &http,
                lease.provider,
                lease.key,
                lease.target,
                req,
                body,
                lease.permit,
                report.as_ref(),
                answer_by,
            )
            .await;
            match result {
                Ok(body) => {
                    return Ok(Reply {
                        provider: lease.provider.name.clone(),
                        key: lease.key.name.clone(),
                        attempts: attempts.made(),
                        ok: route.ok[lease.target_index]
                            .get(attempts.tier().index)
                            .cloned()
                            .unwrap_or_default(),
                        waited: attempts.waited(),
                        body,
                    });
                }
                // The chain's step is over: no other key of this pool is tried in its time.
                Err(error @ ProviderError::StepDeadline) => {
                    return Err(RouteError::Upstream {
                        error,
                        attempts: attempts.made(),
                    });
                }
                Err(error) => attempts.failed(lease.target_index, error)?,
            }
        }
    }
}

impl Dispatcher {
    /// Serves one embeddings request on `view`, waiting for budget until `deadline` at the
    /// latest. It spends the same key budgets as chat: one request, and the input's estimated
    /// tokens (settled with the provider's count). Targets whose provider cannot take the
    /// request (Anthropic, or token ids for Gemini and Ollama) are left out before any budget
    /// is spent; when none can, the first refusal is the answer (a 400 naming the field).
    pub async fn embeddings(
        &self,
        view: &View,
        req: &EmbeddingsRequest,
        deadline: Instant,
        asker: Asker,
    ) -> Result<Reply<EmbeddingsResponse>, RouteError> {
        let runtime = &view.runtime;
        let route = runtime
            .routes
            .get(&req.model)
            .ok_or_else(|| RouteError::UnknownModel(req.model.clone()))?;
        let demand = Demand::input_only(u64::from(req.estimate_tokens()));
        let mut attempts = Attempts::new(self, runtime, route, demand, deadline, asker);
        let mut refusal = None;
        let mut servable = false;
        for (i, target) in route.targets.iter().enumerate() {
            let adapter = runtime.providers[target.provider].adapter;
            match adapter.check_embeddings(&target.upstream_model, req) {
                Ok(()) => servable = true,
                Err(error) => {
                    attempts.skip(i);
                    refusal.get_or_insert(error);
                }
            }
        }
        if let (false, Some(error)) = (servable, refusal) {
            return Err(RouteError::Upstream { error, attempts: 0 });
        }
        loop {
            let lease = attempts.next().await?;
            let http = match upstream::thread_client(lease.provider.timeouts.connect_ms) {
                Ok(http) => http,
                Err(error) => {
                    lease.permit.cancel();
                    attempts.failed(lease.target_index, error)?;
                    continue;
                }
            };
            let call = upstream::embed(
                &http,
                lease.provider,
                lease.key,
                lease.target,
                req,
                lease.permit,
            );
            match call.await {
                Ok(body) => {
                    return Ok(Reply {
                        provider: lease.provider.name.clone(),
                        key: lease.key.name.clone(),
                        attempts: attempts.made(),
                        ok: route.ok[lease.target_index]
                            .get(attempts.tier().index)
                            .cloned()
                            .unwrap_or_default(),
                        waited: attempts.waited(),
                        body,
                    });
                }
                Err(error) => attempts.failed(lease.target_index, error)?,
            }
        }
    }
}

impl ConfigSink for Dispatcher {
    fn apply(&self, config: Config) {
        Dispatcher::apply(self, Arc::new(config));
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tier_tests;
