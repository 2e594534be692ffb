//! The routing view of one configuration: providers with their adapters, key budgets and
//! breakers, and an index from every model name and alias to its targets in fallback order.
//! Built once per configuration (not per request); budgets and breakers live in the
//! dispatcher and survive reloads.

use super::breaker::Breaker;
use super::tiers::TierPlan;
use super::wait::WaitQueue;
use crate::budget::{Budgets, KeyBudget, KeyId, Limits, Signal};
use crate::config::{Config, ProviderConfig};
use crate::metrics::{self, TargetMetrics};
use crate::providers::{Adapter, ProviderError};
use crate::secret::SecretString;
use floodgate_crds::Strategy;
use floodgate_crds::pool::Timeouts;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// One key of a provider.
#[derive(Debug)]
pub struct KeyRt {
    /// Display name (headers, metrics); never the secret.
    pub name: Arc<str>,
    /// The secret; `None` for keyless self-hosted providers.
    pub secret: Option<SecretString>,
    /// The request headers of a call with this key (content type, API version, the key
    /// marked sensitive), built once; an error if the key cannot be a header value.
    pub headers: Result<http::HeaderMap, ProviderError>,
    /// Its budget.
    pub budget: Arc<KeyBudget>,
}

/// One provider of one pool.
#[derive(Debug)]
pub struct ProviderRt {
    /// Pool name.
    pub pool: String,
    /// Provider name.
    pub name: Arc<str>,
    /// Wire format.
    pub adapter: Adapter,
    /// Endpoint.
    pub base_url: String,
    /// Keys (one pseudo-key for keyless providers).
    pub keys: Vec<KeyRt>,
    /// The provider's breaker.
    pub breaker: Arc<Breaker>,
    /// Weighted-strategy share.
    pub weight: u32,
    /// The pool's key strategy.
    pub strategy: Strategy,
    /// The pool's timeouts.
    pub timeouts: Timeouts,
    /// Provider type, for metric labels (`gen_ai.provider.name`).
    pub provider_type: &'static str,
}

/// A model a request may be sent to, with what a call to it needs, built once per
/// configuration: its parsed URLs and its metric handles.
#[derive(Debug, Clone)]
pub struct Target {
    /// Index into [`Runtime::providers`].
    pub provider: usize,
    /// The provider's model id.
    pub upstream_model: String,
    /// USD per million input + output tokens, for the cheapest strategy.
    pub price: f64,
    /// The chat endpoint, non-streamed and streamed; an error if the base URL and model do
    /// not make a valid URL.
    pub urls: [Result<http::Uri, String>; 2],
    /// Metric handles of this provider and model.
    pub metrics: Arc<TargetMetrics>,
}

impl Target {
    /// The endpoint for a streamed or a whole answer.
    pub fn url(&self, stream: bool) -> &Result<http::Uri, String> {
        &self.urls[usize::from(stream)]
    }
}

/// Targets of one requested model name, the attempts the pool allows, and the requests
/// waiting for budget on it.
#[derive(Debug)]
pub struct Route {
    /// In order of preference.
    pub targets: Vec<Target>,
    /// Attempts over keys and providers.
    pub max_attempts: u32,
    /// Requests waiting for budget, in arrival order; the same queue across configuration
    /// swaps, so that a reload neither reorders the waiters nor lets new arrivals pass them.
    pub queue: Arc<WaitQueue>,
    /// `floodgate_requests_total{tier, model=<this name>, provider, outcome="ok"}` per
    /// target and tier (`ok[target][tier.index]`), resolved once so that a served request
    /// counts without building labels.
    pub ok: Vec<Vec<Counter>>,
}

/// The routing view of one configuration.
#[derive(Debug)]
pub struct Runtime {
    /// Every provider of every pool.
    pub providers: Vec<ProviderRt>,
    /// Model name or alias to its route.
    pub routes: HashMap<String, Route>,
    /// The customer tiers.
    pub tiers: TierPlan,
}

/// Breakers by (pool, provider), kept across reloads.
pub type Breakers = Mutex<HashMap<(String, String), Arc<Breaker>>>;

/// Wait queues by model name, kept across reloads.
pub type Queues = Mutex<HashMap<String, Arc<WaitQueue>>>;

/// How many requests may wait for budget on a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueBound {
    /// This many on every route.
    Fixed(usize),
    /// What the route's keys could serve within the wait limit: the sum of their limits per
    /// window, times `max_wait / window`, at least 1. Routes with an unlimited key get
    /// [`QueueBound::UNLIMITED_KEYS`].
    Capacity {
        /// The rate window.
        window: Duration,
        /// The longest a request waits.
        max_wait: Duration,
    },
}

impl QueueBound {
    /// The bound of a route with an unlimited (keyless, no rpm) target: those wait only for
    /// circuits, and this caps the memory a burst can hold.
    pub const UNLIMITED_KEYS: usize = 10_000;

    /// The same bound for requests that may wait `longest` (the longest wait of any tier),
    /// if that is longer than what it was made for.
    fn waiting(self, longest: Duration) -> Self {
        match self {
            QueueBound::Capacity { window, max_wait } => QueueBound::Capacity {
                window,
                max_wait: max_wait.max(longest),
            },
            fixed => fixed,
        }
    }

    fn of(self, route_rpm: Option<u64>) -> usize {
        match (self, route_rpm) {
            (QueueBound::Fixed(n), _) => n,
            (QueueBound::Capacity { .. }, None) => Self::UNLIMITED_KEYS,
            (QueueBound::Capacity { window, max_wait }, Some(rpm)) => {
                let per_wait = rpm as f64 * max_wait.as_secs_f64() / window.as_secs_f64().max(1e-3);
                (per_wait.ceil() as usize).clamp(1, Self::UNLIMITED_KEYS)
            }
        }
    }
}

impl Runtime {
    /// Builds the routing view of `config`, reusing budgets and breakers of unchanged keys.
    pub fn build(
        config: &Config,
        budgets: &Budgets,
        breakers: &Breakers,
        queues: &Queues,
        signal: &Arc<Signal>,
        bound: QueueBound,
        tiers: TierPlan,
    ) -> Runtime {
        let bound = bound.waiting(tiers.longest_wait());
        let mut providers = Vec::new();
        let mut routes: HashMap<String, (Vec<Target>, u32)> = HashMap::new();
        let mut live_keys = Vec::new();
        let mut breakers = breakers.lock().unwrap_or_else(|p| p.into_inner());
        for pool in &config.pools {
            let cb = &pool.spec.circuit_breaker;
            let open_for = Duration::from_secs(u64::from(cb.open_seconds));
            // Fallback order first, then the providers it does not name, in spec order.
            let mut order: Vec<usize> = pool
                .spec
                .fallback
                .iter()
                .filter_map(|f| pool.providers.iter().position(|p| &p.name == f))
                .collect();
            let rest: Vec<usize> = (0..pool.providers.len())
                .filter(|i| !order.contains(i))
                .collect();
            order.extend(rest);
            for &pi in &order {
                let p = &pool.providers[pi];
                let breaker = breakers
                    .entry((pool.name.clone(), p.name.clone()))
                    .or_insert_with(|| {
                        Arc::new(Breaker::new(cb.failure_threshold, open_for, signal.clone()))
                    });
                breaker.configure(cb.failure_threshold, open_for);
                let keys = provider_keys(&pool.name, p, budgets, &mut live_keys);
                let index = providers.len();
                providers.push(ProviderRt {
                    pool: pool.name.clone(),
                    name: Arc::from(p.name.as_str()),
                    adapter: Adapter::for_type(p.provider_type),
                    base_url: p.base_url.clone(),
                    keys,
                    breaker: breaker.clone(),
                    weight: p.weight.get(),
                    strategy: pool.spec.strategy,
                    timeouts: pool.spec.timeouts.clone(),
                    provider_type: p.provider_type.as_str(),
                });
                let adapter = Adapter::for_type(p.provider_type);
                for model in &p.models {
                    let url = |stream| {
                        let text = adapter.url(&p.base_url, &model.name, stream);
                        // Parsed as a URL (checked, and normalised as a browser would),
                        // then held as the `Uri` each request takes.
                        reqwest::Url::parse(&text)
                            .map_err(|e| format!("{e}"))
                            .and_then(|url| {
                                url.as_str()
                                    .parse::<http::Uri>()
                                    .map_err(|e| format!("{e}"))
                            })
                    };
                    let target = Target {
                        provider: index,
                        upstream_model: model.name.clone(),
                        price: model.input_per_1m + model.output_per_1m,
                        urls: [url(false), url(true)],
                        metrics: Arc::new(TargetMetrics::new(
                            &p.name,
                            p.provider_type.as_str(),
                            &model.name,
                            (model.input_per_1m, model.output_per_1m),
                        )),
                    };
                    // In a pool that routing rules name (crate::routing), each name also as
                    // `<pool>/<name>`: that pool's targets alone.
                    let ruled = config.routing.names_pool(&pool.name);
                    let names = std::iter::once(model.name.clone())
                        .chain(model.alias.clone())
                        .flat_map(|n| [ruled.then(|| format!("{}/{n}", pool.name)), Some(n)])
                        .flatten();
                    for name in names {
                        let route = routes
                            .entry(name)
                            .or_insert_with(|| (Vec::new(), pool.spec.max_attempts));
                        route.1 = route.1.max(pool.spec.max_attempts);
                        route.0.push(target.clone());
                    }
                }
            }
        }
        drop(breakers);
        budgets.reconfigured(&live_keys);
        let mut queues = queues.lock().unwrap_or_else(|p| p.into_inner());
        queues.retain(|name, _| routes.contains_key(name));
        let routes = routes
            .into_iter()
            .map(|(name, (mut targets, max_attempts))| {
                if let Some(first) = targets.first()
                    && providers[first.provider].strategy == Strategy::Cheapest
                {
                    targets.sort_by(|a, b| a.price.total_cmp(&b.price));
                }
                let rpm = route_rpm(&providers, &targets);
                let ok = targets
                    .iter()
                    .map(|t| {
                        tiers
                            .iter()
                            .map(|tier| {
                                metrics::ok_requests(&tier.name, &name, &providers[t.provider].name)
                            })
                            .collect()
                    })
                    .collect();
                let queue = queues
                    .entry(name.clone())
                    .or_insert_with(|| {
                        Arc::new(WaitQueue::with_window(bound.of(rpm), budgets.window()))
                    })
                    .clone();
                queue.set_bound(bound.of(rpm));
                let route = Route {
                    targets,
                    max_attempts,
                    queue,
                    ok,
                };
                (name, route)
            })
            .collect();
        Runtime {
            providers,
            routes,
            tiers,
        }
    }
}

/// The requests per window a route's distinct providers allow together; `None` if one of
/// them has a key without a request limit.
fn route_rpm(providers: &[ProviderRt], targets: &[Target]) -> Option<u64> {
    let mut seen: Vec<usize> = Vec::with_capacity(targets.len());
    let mut total = 0u64;
    for t in targets {
        if seen.contains(&t.provider) {
            continue;
        }
        seen.push(t.provider);
        for key in &providers[t.provider].keys {
            total += u64::from(key.budget.rpm()?);
        }
    }
    Some(total)
}

fn provider_keys(
    pool: &str,
    p: &ProviderConfig,
    budgets: &Budgets,
    live: &mut Vec<KeyId>,
) -> Vec<KeyRt> {
    // A key's budget is named by its secret reference, not its display name: reordering or
    // removing keys must not hand one secret's window to another.
    let id = |key: &str| KeyId {
        pool: pool.to_owned(),
        provider: p.name.clone(),
        key: key.to_owned(),
    };
    if p.keys.is_empty() {
        // A keyless self-hosted server: one budget for the provider, limited by its rpm if set.
        let kid = id(&p.name);
        let limits = Limits {
            rpm: p.rpm.map(|r| r.get()),
            tpm: None,
        };
        let budget = budgets.key(&kid, limits);
        live.push(kid);
        return vec![KeyRt {
            name: Arc::from(p.name.as_str()),
            secret: None,
            headers: Adapter::for_type(p.provider_type).headers(None),
            budget,
        }];
    }
    p.keys
        .iter()
        .map(|k| {
            let kid = id(&k.secret_ref);
            let limits = Limits {
                rpm: Some(k.rpm.get()),
                tpm: k.tpm.map(|t| t.get()),
            };
            let budget = budgets.key(&kid, limits);
            live.push(kid);
            KeyRt {
                name: Arc::from(k.name.as_str()),
                headers: Adapter::for_type(p.provider_type).headers(Some(k.secret.expose())),
                secret: Some(k.secret.clone()),
                budget,
            }
        })
        .collect()
}
