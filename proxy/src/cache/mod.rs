//! Stages 4, 5 and 8 of the chain: cache lookup (templates, then exact answers), in-flight
//! deduplication, and cache store. All three follow the CachePolicy of the configuration
//! serving now; without one, a request passes through untouched.
//!
//! In order, for a chat request:
//! 1. a template matching the last user message answers at once ([`template`]);
//! 2. a request the policy does not cache (sampling with `sampled: bypass`, `n > 1`) or
//!    that said `cache-control: no-cache` skips the lookup and dedup (`bypass`);
//! 3. the exact key ([`key`]) finds a stored answer ([`memory`] or [`redis`] backend);
//! 4. the semantic layer ([`semantic`]) finds the answer to a prompt that means the same
//!    (embedding similarity at or above the threshold, then a lexical guard);
//! 5. with dedup on, the request joins an identical one in flight or leads ([`flight`]);
//! 6. the answer is stored when complete: a whole answer at once, a stream at its clean end
//!    (a stream that broke, or that the caller left, is never stored); `cache-control:
//!    no-store` skips this.
//!
//! Answers are kept typed ([`answer::Answer`]), so a hit replays in the caller's door and
//! mode: a whole answer stored from `/v1/chat/completions` streams on `/v1/messages`. What
//! the cache did is on the context ([`CacheCtx::outcome`]) and in the response header
//! `x-floodgate-cache`.

pub mod answer;
pub mod figures;
pub mod flight;
pub mod key;
pub mod memory;
pub mod metrics;
pub mod redis;
pub mod semantic;
pub mod shared;
pub mod template;

use crate::budget::SharedOptions;
use crate::config::Config;
use crate::pipeline::{self, RequestCtx};
use crate::providers::types::{ChatRequest, StreamOptions};
use crate::providers::{ChatChunk, ChatResponse, ProviderError};
use crate::route::attempt::Asker;
use crate::route::{ChunkStream, Dispatcher, Reply, ReplyBody, RouteError, View};
use answer::{Answer, Assembler};
use axum::http::HeaderMap;
use flight::{Flights, Meta, Role};
use floodgate_crds::cache::{CacheBackend, CachePolicySpec, CacheScope, SampledRequests};
use futures::Stream;
use key::Key;
use memory::MemoryStore;
use prometheus_client::metrics::counter::Counter;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// How long a semantic lookup waits for the prompt's embedding at most (a text takes ~5 ms
/// in a batch, a full queue ~0.7 s of work on 2 cores): past it, the request goes on as a
/// miss. A safety net: the queue's bound refuses a burst before this.
const SEMANTIC_WAIT: Duration = Duration::from_secs(1);

/// Response header: what the cache did (`exact`, `semantic`, `template`, `dedup`, `miss`,
/// `bypass`).
pub const CACHE_HEADER: &str = "x-floodgate-cache";

/// Response header of a semantic hit: the cosine similarity of the prompts (`0.973`).
pub const SIMILARITY_HEADER: &str = "x-floodgate-cache-similarity";

/// What the cache did with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Answered from the exact cache.
    Exact,
    /// Answered from the semantic cache (a prompt that means the same).
    Semantic,
    /// Answered by a template.
    Template,
    /// Answered by an expired entry within its grace, every target having failed (the
    /// degradation chain).
    Stale,
    /// Answered by joining an identical request in flight.
    Dedup,
    /// Looked up, not found: the provider answered (and the answer may be stored).
    Miss,
    /// Not looked up (`cache-control: no-cache`, or a request the policy does not cache).
    Bypass,
}

impl Outcome {
    /// The header value and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Exact => "exact",
            Outcome::Semantic => "semantic",
            Outcome::Template => "template",
            Outcome::Stale => "stale",
            Outcome::Dedup => "dedup",
            Outcome::Miss => "miss",
            Outcome::Bypass => "bypass",
        }
    }

    fn is_hit(self) -> bool {
        matches!(
            self,
            Outcome::Exact | Outcome::Semantic | Outcome::Template | Outcome::Dedup
        )
    }
}

/// A request's dealings with the cache: the cache to use, what the caller asked
/// (`cache-control`), and what the cache did.
#[derive(Debug, Clone, Default)]
pub struct CacheCtx {
    /// The gateway's cache; `None` runs no cache stage (e.g. a caller outside the doors).
    pub cache: Option<Arc<Cache>>,
    /// `cache-control: no-cache`: do not answer from the cache (nor join a flight).
    pub no_cache: bool,
    /// `cache-control: no-store`: do not store the answer.
    pub no_store: bool,
    /// What the cache did, once it did.
    pub outcome: Option<Outcome>,
    /// A semantic hit's similarity.
    pub similarity: Option<f32>,
    /// The exact key of the request, once looked up (for a stale answer, [`Cache::stale`]).
    pub key: Option<Key>,
}

impl CacheCtx {
    /// The directives of the request's `cache-control` headers, for `cache`.
    pub fn new(cache: Option<Arc<Cache>>, headers: &HeaderMap) -> Self {
        let mut ctx = CacheCtx {
            cache,
            ..CacheCtx::default()
        };
        for value in headers.get_all(axum::http::header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else { continue };
            for directive in value.split(',') {
                match directive.trim().to_ascii_lowercase().as_str() {
                    "no-cache" => ctx.no_cache = true,
                    "no-store" => ctx.no_store = true,
                    _ => {}
                }
            }
        }
        ctx
    }
}

/// A CachePolicy, checked and ready.
#[derive(Debug)]
pub struct Policy {
    exact_ttl: Option<Duration>,
    /// How long past its TTL an entry may answer when every target failed.
    stale: Duration,
    dedup_window: Option<Duration>,
    templates: Vec<template::Template>,
    /// Templates that answer only when every target failed (`when: degraded`).
    degraded: Vec<template::Template>,
    scope: CacheScope,
    /// `modelScopes`: the scope of some models (by the name asked for).
    model_scopes: Vec<(String, CacheScope)>,
    /// `ignoreFields`: request fields left out of the key.
    ignore_fields: Vec<String>,
    backend: CacheBackend,
    max_entry_bytes: usize,
    sampled: SampledRequests,
    semantic: Option<SemanticPolicy>,
    /// `maxBytes` over what the policy holds in Redis (the Redis backend).
    bound: redis::Bound,
}

/// The semantic layer of a policy.
#[derive(Debug, Clone)]
struct SemanticPolicy {
    ttl: Duration,
    threshold: f32,
    /// The model's directory: the policy's `modelDir`, else the gateway's.
    model_dir: Option<std::path::PathBuf>,
    /// `modelRevision`: part of every entry's partition.
    revision: Option<String>,
}

/// Fields `ignoreFields` may not name: the prompt and the model always count, `n` decides
/// whether a request is cached at all, `stream` never counts.
const KEY_FIELDS_KEPT: &[&str] = &["model", "messages", "n", "stream"];

impl Policy {
    /// The policy of `spec`, with what it accepts and does not act on (each a sentence).
    pub fn new(spec: &CachePolicySpec) -> (Self, Vec<String>) {
        let mut notes = Vec::new();
        let (mut templates, mut degraded) = (Vec::new(), Vec::new());
        for t in spec.templates.iter().flat_map(|t| &t.items) {
            match template::Template::new(&t.name, &t.pattern, &t.response) {
                Ok(c) if t.when == floodgate_crds::cache::TemplateUse::Degraded => degraded.push(c),
                Ok(c) => templates.push(c),
                Err(e) => notes.push(format!("{e}; the template is not used")),
            }
        }
        let stale = spec.exact.as_ref().map_or(0, |e| e.stale_seconds);
        if let Some(s) = &spec.semantic
            && s.embedding_model != "all-MiniLM-L6-v2"
        {
            notes.push(format!(
                "spec.semantic.embeddingModel {:?} is not acted on: the gateway embeds with \
                 all-MiniLM-L6-v2 (the files in modelDir)",
                s.embedding_model
            ));
        }
        if spec.backend == CacheBackend::Redis
            && spec.max_entries != floodgate_crds::cache::DEFAULT_MAX_ENTRIES
        {
            notes.push(format!(
                "spec.maxEntries ({}) bounds only each replica's semantic index with backend \
                 redis: the answers in Redis are bounded by maxBytes alone",
                spec.max_entries
            ));
        }
        if spec.templates.is_some() {
            notes.push(
                "spec.templates.ttlSeconds is accepted but not acted on (a template's answer \
                 is computed for each request, never stored)"
                    .into(),
            );
        }
        let mut ignore_fields = Vec::new();
        for field in &spec.ignore_fields {
            if KEY_FIELDS_KEPT.contains(&field.as_str()) {
                notes.push(format!(
                    "spec.ignoreFields names {field:?}, which is not acted on: {} always \
                     count in the key or never do",
                    KEY_FIELDS_KEPT.join(", ")
                ));
            } else {
                ignore_fields.push(field.clone());
            }
        }
        let policy = Policy {
            exact_ttl: spec
                .exact
                .as_ref()
                .map(|e| Duration::from_secs(u64::from(e.ttl_seconds))),
            stale: Duration::from_secs(u64::from(stale)),
            dedup_window: spec
                .dedup
                .as_ref()
                .map(|d| Duration::from_secs(u64::from(d.window_seconds))),
            templates,
            degraded,
            scope: spec.scope,
            model_scopes: spec
                .model_scopes
                .iter()
                .map(|m| (m.model.clone(), m.scope))
                .collect(),
            ignore_fields,
            backend: spec.backend,
            max_entry_bytes: spec.max_entry_bytes as usize,
            sampled: spec.sampled,
            semantic: spec.semantic.as_ref().map(|s| SemanticPolicy {
                ttl: Duration::from_secs(u64::from(s.ttl_seconds)),
                threshold: s.threshold as f32,
                model_dir: s.model_dir.as_ref().map(std::path::PathBuf::from),
                revision: s.model_revision.clone(),
            }),
            bound: redis::Bound::new("", spec.max_bytes),
        };
        (policy, notes)
    }

    /// Whether the policy caches `req`: one choice, and sampling only when allowed.
    pub fn caches(&self, req: &ChatRequest) -> bool {
        let sampled = req.temperature.is_none_or(|t| t > 0.0);
        req.n.unwrap_or(1) <= 1 && (self.sampled == SampledRequests::Cache || !sampled)
    }

    /// The scope of a request of `ctx` for `model` (the name asked for): its tenant's name,
    /// or everyone's when the policy shares for that model (and when the gateway is open:
    /// there is one caller).
    fn scope(&self, ctx: &RequestCtx, model: &str) -> String {
        match (self.scope_of(model), &ctx.caller) {
            (CacheScope::Tenant, Some(caller)) => format!("tenant:{}", caller.name()),
            _ => "global".to_owned(),
        }
    }

    /// The policy's scope for `model`: its `modelScopes` entry, else `scope`.
    fn scope_of(&self, model: &str) -> CacheScope {
        self.model_scopes
            .iter()
            .find(|(m, _)| m == model)
            .map_or(self.scope, |(_, s)| *s)
    }

    /// `req` as the key reads it: without the fields of `ignoreFields`.
    fn keyed<'a>(&self, req: &'a ChatRequest) -> std::borrow::Cow<'a, ChatRequest> {
        if self.ignore_fields.is_empty() {
            return std::borrow::Cow::Borrowed(req);
        }
        let mut keyed = req.clone();
        for field in &self.ignore_fields {
            match field.as_str() {
                "temperature" => keyed.temperature = None,
                "top_p" => keyed.top_p = None,
                "max_tokens" | "max_completion_tokens" => {
                    keyed.max_tokens = None;
                    keyed.max_completion_tokens = None;
                }
                "stop" => keyed.stop = None,
                "tools" => keyed.tools = None,
                "tool_choice" => keyed.tool_choice = None,
                other => {
                    keyed.extra.remove(other);
                }
            }
        }
        std::borrow::Cow::Owned(keyed)
    }

    /// The exact key of `req` in `scope` for the `answering` model.
    fn key(&self, scope: &str, answering: &str, req: &ChatRequest) -> Key {
        key::exact(scope, answering, &self.keyed(req))
    }

    /// The semantic query of `req` (when the layer is on): its partition also holds the
    /// model files' revision, when the policy names one.
    fn semantic_query(
        &self,
        scope: &str,
        answering: &str,
        req: &ChatRequest,
    ) -> Option<semantic::Query> {
        let sp = self.semantic.as_ref()?;
        let keyed = self.keyed(req);
        match &sp.revision {
            Some(rev) => semantic::query(scope, &format!("{answering}|embedding={rev}"), &keyed),
            None => semantic::query(scope, answering, &keyed),
        }
    }
}

/// What the cache stage gives back: the reply, and whether the route stage made it (a hit
/// or a follower's reply was not routed).
#[derive(Debug)]
pub struct Served {
    /// The answer.
    pub reply: Reply,
    /// Whether a provider was called for this request.
    pub routed: bool,
}

/// The gateway's cache: its backends and its flights, shared by every request across
/// configuration reloads.
pub struct Cache {
    memory: MemoryStore,
    redis: Option<Arc<redis::RedisStore>>,
    flights: Arc<Flights>,
    tasks: TaskTracker,
    policy: Mutex<Option<PolicyOf>>,
    semantic: Arc<semantic::Semantic>,
    /// Where the embedding model is when the policy does not say (`--embedding-model-dir`).
    model_dir: std::path::PathBuf,
    /// Lookups over the last hour, for the CachePolicy's status.
    window: figures::Window,
}

/// The policy built for a configuration (held weakly: a reload frees the old one).
type PolicyOf = (Weak<Config>, Option<Arc<Policy>>);

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("redis", &self.redis.is_some())
            .field("flights", &self.flights.len())
            .finish_non_exhaustive()
    }
}

impl Cache {
    /// A cache in memory, with Redis as its shared backend when `redis` is given (the
    /// shared budgets' connection settings).
    pub fn new(redis: Option<&SharedOptions>) -> Self {
        let redis = redis.and_then(|opts| match redis::RedisStore::new(opts) {
            Ok(store) => Some(Arc::new(store)),
            Err(e) => {
                tracing::warn!(error = %e, "the cache cannot use Redis; answers stay in memory");
                None
            }
        });
        let flights = Arc::new(Flights::default());
        Self {
            memory: MemoryStore::new(256 << 20, 100_000).charging(flights.held()),
            redis,
            flights,
            tasks: TaskTracker::new(),
            policy: Mutex::default(),
            semantic: Arc::default(),
            model_dir: semantic::embed::default_dir(),
            window: figures::Window::default(),
        }
    }

    /// The same cache with the embedding model in `dir` unless a policy names another.
    pub fn with_model_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.model_dir = dir;
        self
    }

    /// Builds the policy of `config` now (at start-up and on reloads, so the embedding
    /// model loads, or says why it cannot, before the first request).
    pub fn prepare(&self, config: &Arc<Config>) {
        let _ = self.policy(config);
    }

    /// This replica's figures for the status of `config`'s CachePolicy (published to Redis
    /// for the operator): lookups by layer over the last hour, and what it holds in memory
    /// (answers with the memory backend, the semantic index with Redis). `None` without a
    /// CachePolicy.
    pub fn figures(&self, config: &Arc<Config>) -> Option<crate::demand::CacheFigures> {
        let cp = config.cache_policy.as_ref()?;
        let (entries, bytes) = match (&self.redis, cp.spec.backend) {
            (Some(_), CacheBackend::Redis) => {
                let index = self.semantic.index();
                (index.len(), index.bytes())
            }
            _ => self.memory.usage(),
        };
        Some(crate::demand::CacheFigures {
            namespace: kube::ResourceExt::namespace(cp).unwrap_or_default(),
            name: kube::ResourceExt::name_any(cp),
            counts: self.window.totals(tokio::time::Instant::now()),
            entries: entries as u64,
            bytes: bytes as u64,
        })
    }

    /// The semantic layer (tests and benchmarks).
    pub fn semantic(&self) -> &Arc<semantic::Semantic> {
        &self.semantic
    }

    /// The flights held now (for tests and debugging).
    pub fn flights(&self) -> &Flights {
        &self.flights
    }

    /// Waits for the cache's background work (stores, streams being fanned out).
    pub async fn drain(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The policy of `config`, built once per configuration.
    fn policy(&self, config: &Arc<Config>) -> Option<Arc<Policy>> {
        let mut held = self.policy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((weak, policy)) = &*held
            && std::ptr::eq(weak.as_ptr(), Arc::as_ptr(config))
        {
            return policy.clone();
        }
        let policy = config.cache_policy.as_ref().map(|cp| {
            let name = kube::ResourceExt::name_any(cp);
            // Its notes (what it accepts and does not act on) are logged with the
            // configuration's.
            let (mut policy, _) = Policy::new(&cp.spec);
            // Its ledger in Redis is named by the policy.
            let namespace = kube::ResourceExt::namespace(cp).unwrap_or_default();
            policy.bound = redis::Bound::new(&format!("{namespace}/{name}"), cp.spec.max_bytes);
            if policy.backend == CacheBackend::Redis && self.redis.is_none() {
                tracing::warn!(
                    policy = %name,
                    "CachePolicy/{name}: backend redis without --redis; answers stay in memory"
                );
            }
            let limits = (
                usize::try_from(cp.spec.max_bytes).unwrap_or(usize::MAX),
                cp.spec.max_entries as usize,
            );
            self.memory.set_limits(limits.0, limits.1);
            self.flights.set_limit(limits.0);
            if let Some(sp) = &policy.semantic {
                let dir = sp.model_dir.as_deref().unwrap_or(&self.model_dir);
                tracing::info!(
                    policy = %name,
                    dir = %dir.display(),
                    threshold = %format_args!("{:.3}", sp.threshold),
                    "semantic cache on: loading the embedding model"
                );
                self.semantic.ensure_model(dir);
                if let (Some(redis), CacheBackend::Redis) = (&self.redis, policy.backend)
                    && tokio::runtime::Handle::try_current().is_ok()
                {
                    self.semantic.follow(redis.clone(), limits);
                }
            }
            self.memory.set_grace(policy.stale);
            Arc::new(policy)
        });
        *held = Some((Arc::downgrade(config), policy.clone()));
        policy
    }

    /// Stages 4, 5 and 8 for `req`, around the route stage (6 + 7).
    pub async fn chat(
        self: &Arc<Self>,
        dispatcher: &Dispatcher,
        view: &View,
        ctx: &mut RequestCtx,
        req: &ChatRequest,
        asker: Asker,
    ) -> Result<Served, pipeline::Error> {
        let Some(policy) = self.policy(&view.config) else {
            return routed(crate::routing::chat(dispatcher, view, ctx, req, asker).await);
        };
        let (no_cache, no_store) = (ctx.cache.no_cache, ctx.cache.no_store);
        if !no_cache && let Some((_, text)) = template::answer(&policy.templates, req) {
            self.count(ctx, Outcome::Template);
            return Ok(hit(whole_reply(Answer::text(&req.model, text), req)));
        }
        if !policy.caches(req) {
            self.count(ctx, Outcome::Bypass);
            return routed(crate::routing::chat(dispatcher, view, ctx, req, asker).await);
        }
        let (scope, answering) = (
            policy.scope(ctx, &req.model),
            answering(view, ctx, &asker.tenant, &req.model),
        );
        let key = policy.key(&scope, &answering, req);
        let mut target = Target {
            exact: key,
            semantic: policy
                .semantic_query(&scope, &answering, req)
                .map(|q| (q, None)),
        };
        if no_cache {
            self.count(ctx, Outcome::Bypass);
        } else {
            ctx.cache.key = Some(key);
            if policy.exact_ttl.is_some()
                && let Some(answer) = self.lookup(&policy, &key).await
            {
                self.count(ctx, Outcome::Exact);
                saved(view, &req.model, &answer);
                return Ok(hit(whole_reply((*answer).clone(), req)));
            }
            if let Some((answer, similarity)) = self.semantic_lookup(&policy, &mut target).await {
                ctx.cache.similarity = Some(similarity);
                self.count(ctx, Outcome::Semantic);
                saved(view, &req.model, &answer);
                return Ok(hit(whole_reply((*answer).clone(), req)));
            }
            if let Some(window) = policy.dedup_window {
                return self
                    .flight(dispatcher, view, ctx, req, asker, (&policy, target, window))
                    .await;
            }
            self.count(ctx, Outcome::Miss);
        }
        // A streamed answer to be stored carries its usage (for the tenant's charge and the
        // tokens saved when it is served again); a caller who did not ask for it does not
        // see it.
        let storing = !no_store && (policy.exact_ttl.is_some() || target.semantic.is_some());
        let strip_usage = storing && req.stream && !req.include_usage();
        let mut lead = std::borrow::Cow::Borrowed(req);
        if strip_usage {
            lead.to_mut()
                .stream_options
                .get_or_insert_with(StreamOptions::default)
                .include_usage = true;
        }
        let mut reply = crate::routing::chat(dispatcher, view, ctx, &lead, asker).await?;
        let store = storing && first_choice(ctx);
        reply.body = match reply.body {
            ReplyBody::Complete(response) => {
                if store {
                    self.store(
                        &policy,
                        target,
                        &Answer {
                            response: response.clone(),
                        },
                    );
                }
                ReplyBody::Complete(response)
            }
            ReplyBody::Stream(chunks) if store || strip_usage => {
                let (cache, policy) = (self.clone(), policy.clone());
                let stored: Option<Box<dyn FnOnce(Answer) + Send>> =
                    store.then(|| -> Box<dyn FnOnce(Answer) + Send> {
                        Box::new(move |a| cache.store(&policy, target, &a))
                    });
                ReplyBody::Stream(Box::pin(Tee {
                    inner: chunks,
                    assembler: Assembler::default(),
                    stored,
                    strip_usage,
                }))
            }
            body => body,
        };
        Ok(Served {
            reply,
            routed: true,
        })
    }

    /// Stage 5: follows the flight of `key`, or leads it.
    async fn flight(
        self: &Arc<Self>,
        dispatcher: &Dispatcher,
        view: &View,
        ctx: &mut RequestCtx,
        req: &ChatRequest,
        asker: Asker,
        (policy, target, window): (&Arc<Policy>, Target, Duration),
    ) -> Result<Served, pipeline::Error> {
        let key = target.exact;
        // A finished answer stays joinable for the window (here and, through Redis, on every
        // replica): a kind of storing, so not for `no-store` (requests that join while it
        // is in flight still share it).
        let keep = if ctx.cache.no_store {
            Duration::ZERO
        } else {
            window
        };
        let mut remote_tries = 0;
        let (leader, mirror) = loop {
            match self.flights.join(key, window) {
                Role::Lead(leader) => {
                    let Some(redis) = self.shared_flights(policy, remote_tries) else {
                        break (leader, None);
                    };
                    let token = redis::flight_token();
                    match redis.lease(&key, &token, shared::LEASE).await {
                        Ok(true) => {
                            let mirror =
                                shared::Mirror::start(redis, (key, token), keep, &self.tasks);
                            break (leader, Some(mirror));
                        }
                        Ok(false) => {
                            remote_tries += 1;
                            // Another replica leads: this one follows it, and its own
                            // waiters follow this request.
                            let followed =
                                tokio::time::timeout_at(ctx.deadline, shared::follow(redis, key));
                            let Some((meta, upstream)) =
                                followed.await.map_err(|_| waited_too_long())?
                            else {
                                continue;
                            };
                            self.count(ctx, Outcome::Dedup);
                            let flight = leader.flight().clone();
                            let reader = (req.model.as_str(), req.include_usage());
                            // A streaming caller reads its own subscription, which counts
                            // what the answer saved (subscribed before the flight starts,
                            // so that it never runs with nobody listening).
                            let counted = req.stream.then(|| {
                                flight.subscribe_counted(reader.0, reader.1, saving(view, reader.0))
                            });
                            let own = leader.stream(
                                meta.clone(),
                                upstream,
                                reader,
                                window,
                                &self.tasks,
                                drop,
                            );
                            let body = match counted {
                                Some(stream) => {
                                    drop(own);
                                    ReplyBody::Stream(stream)
                                }
                                None => {
                                    let by = whole_by(view, &meta.provider, ctx.deadline);
                                    let answer = flight.whole_by(by).await.map_err(|error| {
                                        RouteError::Upstream { error, attempts: 0 }
                                    })?;
                                    drop(own);
                                    saved(view, &req.model, &answer);
                                    ReplyBody::Complete(answer.for_caller(&req.model))
                                }
                            };
                            return Ok(Served {
                                reply: reply_of(meta.provider, meta.key, body),
                                routed: false,
                            });
                        }
                        // Redis unreachable: lead on this replica alone.
                        Err(_) => break (leader, None),
                    }
                }
                Role::Follow(flight) => {
                    let meta = match flight.started_by(ctx.deadline).await {
                        flight::Waited::Started(meta) => meta,
                        // The leader got no answer: ask again (one of the waiters leads).
                        flight::Waited::AskAgain => continue,
                        flight::Waited::TimedOut => return Err(waited_too_long()),
                    };
                    self.count(ctx, Outcome::Dedup);
                    let body = if req.stream {
                        ReplyBody::Stream(flight.subscribe_counted(
                            &req.model,
                            req.include_usage(),
                            saving(view, &req.model),
                        ))
                    } else {
                        let by = whole_by(view, &meta.provider, ctx.deadline);
                        let answer = flight
                            .whole_by(by)
                            .await
                            .map_err(|error| RouteError::Upstream { error, attempts: 0 })?;
                        saved(view, &req.model, &answer);
                        ReplyBody::Complete(answer.for_caller(&req.model))
                    };
                    return Ok(Served {
                        reply: reply_of(meta.provider, meta.key, body),
                        routed: false,
                    });
                }
            }
        };
        self.count(ctx, Outcome::Miss);
        // A streamed answer carries its usage, for the store and for followers who ask.
        let mut lead = std::borrow::Cow::Borrowed(req);
        if req.stream && !req.include_usage() {
            let options = lead
                .to_mut()
                .stream_options
                .get_or_insert_with(StreamOptions::default);
            options.include_usage = true;
        }
        // Dropped on an error: the followers ask again.
        let mut reply = match crate::routing::chat(dispatcher, view, ctx, &lead, asker).await {
            Ok(reply) => reply,
            Err(e) => {
                if let Some(mirror) = &mirror {
                    mirror.none();
                }
                return Err(e);
            }
        };
        let meta = Meta {
            provider: reply.provider.clone(),
            key: reply.key.clone(),
        };
        if let Some(mirror) = &mirror {
            mirror.meta(&meta);
        }
        let store = (policy.exact_ttl.is_some() || target.semantic.is_some())
            && !ctx.cache.no_store
            && first_choice(ctx);
        let window = keep;
        reply.body = match reply.body {
            ReplyBody::Complete(response) => {
                let answer = Answer {
                    response: response.clone(),
                };
                if store {
                    self.store(policy, target, &answer);
                }
                if let Some(mirror) = &mirror {
                    if answer.is_complete() {
                        mirror.whole(&answer.chunks(&req.model, true));
                    } else {
                        // Cut short: followers elsewhere ask again, as here.
                        mirror.none();
                    }
                }
                leader.complete(meta, Arc::new(answer), window, &self.tasks);
                ReplyBody::Complete(response)
            }
            ReplyBody::Stream(upstream) => {
                let (cache, policy) = (self.clone(), policy.clone());
                let upstream = match mirror {
                    Some(mirror) => mirror.tee(upstream),
                    None => upstream,
                };
                ReplyBody::Stream(leader.stream(
                    meta,
                    upstream,
                    (&req.model, req.include_usage()),
                    window,
                    &self.tasks,
                    move |answer| {
                        if store {
                            cache.store(&policy, target, &answer);
                        }
                    },
                ))
            }
        };
        Ok(Served {
            reply,
            routed: true,
        })
    }

    /// Redis, when flights are shared through it: the policy's backend is Redis, the
    /// gateway has one, and this request has not already followed other replicas' flights
    /// that ended without an answer three times.
    fn shared_flights(&self, policy: &Policy, tries: u32) -> Option<Arc<redis::RedisStore>> {
        match (&self.redis, policy.backend) {
            (Some(redis), CacheBackend::Redis) if tries < 3 => Some(redis.clone()),
            _ => None,
        }
    }

    fn count(&self, ctx: &mut RequestCtx, outcome: Outcome) {
        ctx.cache.outcome = Some(outcome);
        self.window.record(outcome, tokio::time::Instant::now());
        let m = metrics::get();
        m.requests
            .get_or_create(&metrics::ResultLabels {
                result: outcome.as_str(),
            })
            .inc();
        if outcome == Outcome::Bypass {
            return;
        }
        let hits: u64 = [
            Outcome::Exact,
            Outcome::Semantic,
            Outcome::Template,
            Outcome::Dedup,
        ]
        .iter()
        .map(|o| {
            m.requests
                .get_or_create(&metrics::ResultLabels { result: o.as_str() })
                .get()
        })
        .sum();
        let misses = m
            .requests
            .get_or_create(&metrics::ResultLabels { result: "miss" })
            .get();
        if outcome.is_hit() || misses > 0 {
            m.hit_ratio.set(hits as f64 / (hits + misses).max(1) as f64);
        }
    }

    /// The stored answer of `key`, if any (a backend that fails is a miss).
    async fn lookup(&self, policy: &Policy, key: &Key) -> Option<Arc<Answer>> {
        let started = std::time::Instant::now();
        let m = metrics::get();
        let (backend, answer) = match (&self.redis, policy.backend) {
            (Some(redis), CacheBackend::Redis) => {
                let answer = match redis.get_with_ttl(key).await {
                    // Kept past its TTL for stale answers: fresh while more than that is left.
                    Ok(found) => found
                        .and_then(|(b, left)| {
                            let (answer, kept) = Answer::from_bytes_kept(&b)?;
                            left.is_none_or(|left| left > kept).then_some(answer)
                        })
                        .map(Arc::new),
                    Err(e) => {
                        tracing::debug!(error = %e, "cache lookup in Redis failed");
                        m.backend_errors
                            .get_or_create(&metrics::BackendLabels { backend: "redis" })
                            .inc();
                        None
                    }
                };
                ("redis", answer)
            }
            _ => ("memory", self.memory.get(key, tokio::time::Instant::now())),
        };
        m.lookup_seconds
            .get_or_create(&metrics::BackendLabels { backend })
            .observe(started.elapsed().as_secs_f64());
        answer
    }

    /// Stage 3b: the semantic layer's answer for `target` (embedding the prompt, kept on
    /// `target` for the store), with its similarity.
    async fn semantic_lookup(
        &self,
        policy: &Policy,
        target: &mut Target,
    ) -> Option<(Arc<Answer>, f32)> {
        let (sp, (query, vector)) = (policy.semantic.as_ref()?, target.semantic.as_mut()?);
        let started = std::time::Instant::now();
        // A lookup waits for the model at most this long, then counts as a miss.
        let v = tokio::time::timeout(SEMANTIC_WAIT, self.semantic.embed(&query.text))
            .await
            .ok()??;
        let found = self.semantic.find(query, &v, sp.threshold);
        *vector = Some(v);
        let found = found?;
        let answer = match (&self.redis, policy.backend) {
            (Some(redis), CacheBackend::Redis) => match redis.get_semantic(&found.key).await {
                Ok(bytes) => bytes.and_then(|b| Answer::from_bytes(&b)).map(Arc::new),
                Err(e) => {
                    tracing::debug!(error = %e, "semantic lookup in Redis failed");
                    metrics::get()
                        .backend_errors
                        .get_or_create(&metrics::BackendLabels { backend: "redis" })
                        .inc();
                    return None;
                }
            },
            _ => self.memory.get(&found.key, tokio::time::Instant::now()),
        };
        metrics::get()
            .lookup_seconds
            .get_or_create(&metrics::BackendLabels {
                backend: "semantic",
            })
            .observe(started.elapsed().as_secs_f64());
        match answer {
            Some(answer) => Some((answer, found.similarity)),
            None => {
                // Its answer expired or was evicted.
                self.semantic.forget(&[found.key]);
                None
            }
        }
    }

    /// Stage 8: stores a complete answer under the exact key and as a semantic entry
    /// (Redis writes, and embeddings not made at lookup, in the background).
    fn store(self: &Arc<Self>, policy: &Arc<Policy>, target: Target, answer: &Answer) {
        let m = metrics::get();
        let result = |r| {
            m.stores
                .get_or_create(&metrics::StoreLabels { result: r })
                .inc();
        };
        if !answer.is_complete() {
            result("incomplete");
            return;
        }
        let bytes = answer.to_bytes();
        if bytes.len() > policy.max_entry_bytes {
            result("too_large");
            return;
        }
        if let Some(semantic) = target.semantic {
            self.store_semantic(policy, semantic, answer, &bytes);
        }
        let key = target.exact;
        let Some(ttl) = policy.exact_ttl else { return };
        match (&self.redis, policy.backend) {
            (Some(_), CacheBackend::Redis) => {
                // Kept `staleSeconds` past its TTL for stale answers, the grace written with
                // it: Redis's own clock then says whether it is fresh ([`Cache::lookup`]).
                let bytes = if policy.stale.is_zero() {
                    bytes
                } else {
                    answer.to_bytes_kept(policy.stale)
                };
                let (cache, ttl) = (self.clone(), ttl + policy.stale);
                let policy = policy.clone();
                self.tasks.spawn(async move {
                    let Some(redis) = &cache.redis else { return };
                    match redis.put(&key, bytes, ttl, &policy.bound).await {
                        Ok(stored) => {
                            m.evictions.inc_by(stored.evicted);
                            redis_usage(&stored);
                            result(if stored.kept { "stored" } else { "too_large" });
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "cache store in Redis failed");
                            result("error");
                        }
                    }
                });
            }
            _ => {
                let now = tokio::time::Instant::now();
                let stored =
                    self.memory
                        .put(key, Arc::new(answer.clone()), bytes.len(), (now, now + ttl));
                result(if stored.kept { "stored" } else { "too_large" });
                m.evictions.inc_by(stored.evicted);
                self.semantic.forget(&stored.gone);
                let (entries, bytes) = self.memory.usage();
                m.entries.set(entries as i64);
                m.bytes.set(bytes as i64);
            }
        }
    }

    /// Stores `answer` (`bytes` serialised) as the semantic entry of `query`, embedding the
    /// prompt first if the lookup did not (a task of its own: the model runs off the
    /// request's path).
    fn store_semantic(
        self: &Arc<Self>,
        policy: &Arc<Policy>,
        (query, vector): (semantic::Query, Option<Vec<f32>>),
        answer: &Answer,
        bytes: &[u8],
    ) {
        let Some(ttl) = policy.semantic.as_ref().map(|s| s.ttl) else {
            return;
        };
        let (cache, policy) = (self.clone(), policy.clone());
        let (answer, bytes) = (Arc::new(answer.clone()), bytes.to_vec());
        self.tasks.spawn(async move {
            let vector = match vector {
                Some(v) => v,
                None => match cache.semantic.embed(&query.text).await {
                    Some(v) => v,
                    None => return,
                },
            };
            let key = query.entry_key();
            let m = metrics::get();
            let result = |r| {
                m.stores
                    .get_or_create(&metrics::StoreLabels { result: r })
                    .inc();
            };
            match (&cache.redis, policy.backend) {
                (Some(redis), CacheBackend::Redis) => {
                    let entry =
                        redis::semantic_bytes(&query.partition, &query.text, &vector, &bytes);
                    match redis.put_semantic(&key, entry, ttl, &policy.bound).await {
                        Ok(stored) if stored.kept => {
                            m.evictions.inc_by(stored.evicted);
                            redis_usage(&stored);
                            result("semantic_stored");
                            let expires = tokio::time::Instant::now() + ttl;
                            cache.semantic.insert(&query, key, &vector, expires);
                        }
                        Ok(stored) => {
                            redis_usage(&stored);
                            result("too_large");
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "semantic store in Redis failed");
                            result("error");
                        }
                    }
                }
                _ => {
                    let now = tokio::time::Instant::now();
                    let expires = now + ttl;
                    // The index entry is charged with its answer: both leave together.
                    let cost = bytes.len() + semantic::index::entry_bytes(&query.text);
                    let stored = cache.memory.put(key, answer, cost, (now, expires));
                    m.evictions.inc_by(stored.evicted);
                    cache.semantic.forget(&stored.gone);
                    if stored.kept {
                        result("semantic_stored");
                        cache.semantic.insert(&query, key, &vector, expires);
                    } else {
                        result("too_large");
                    }
                    let (entries, bytes) = cache.memory.usage();
                    m.entries.set(entries as i64);
                    m.bytes.set(bytes as i64);
                }
            }
        });
    }
}

/// Where an answer is stored: its exact key, and its semantic entry (the query, and its
/// embedding when the lookup made one) when the semantic layer is on for the request.
#[derive(Debug, Clone)]
struct Target {
    exact: Key,
    semantic: Option<(semantic::Query, Option<Vec<f32>>)>,
}

/// The degradation chain's cache steps (`routing::degrade`): answers given when every
/// target of a request's route failed.
impl Cache {
    /// An expired answer to the request of `ctx` still within the policy's `staleSeconds`
    /// (kept that long past its TTL by the memory backend, or by Redis), as a reply in the
    /// caller's mode. Counted and marked `stale` on `ctx`; never stored again.
    pub async fn stale(
        &self,
        view: &View,
        ctx: &mut RequestCtx,
        req: &ChatRequest,
    ) -> Option<Reply> {
        let policy = self.policy(&view.config)?;
        let key = *ctx.cache.key.as_ref()?;
        if policy.stale.is_zero() || ctx.cache.no_cache {
            return None;
        }
        let answer = match (&self.redis, policy.backend) {
            (Some(redis), CacheBackend::Redis) => {
                let (bytes, left) = redis.get_with_ttl(&key).await.ok()??;
                let (answer, kept) = Answer::from_bytes_kept(&bytes)?;
                // Expired for `kept - left`: within the policy's grace now (it may have
                // been written under a longer one).
                let expired_for = left.map_or(Duration::ZERO, |left| kept.saturating_sub(left));
                if expired_for >= policy.stale {
                    return None;
                }
                Arc::new(answer)
            }
            _ => self.memory.get_stale(&key, tokio::time::Instant::now())?,
        };
        self.count(ctx, Outcome::Stale);
        Some(hit(whole_reply((*answer).clone(), req)).reply)
    }

    /// The answer of the first `when: degraded` template matching `req`, as a reply; counted
    /// and marked `template` on `ctx`.
    pub fn degraded_template(
        &self,
        view: &View,
        ctx: &mut RequestCtx,
        req: &ChatRequest,
    ) -> Option<Reply> {
        let policy = self.policy(&view.config)?;
        let (_, text) = template::answer(&policy.degraded, req)?;
        self.count(ctx, Outcome::Template);
        Some(hit(whole_reply(Answer::text(&req.model, text), req)).reply)
    }
}

impl Answer {
    /// A whole answer of `text` for `model` (a template's).
    pub fn text(model: &str, text: String) -> Self {
        let chunks = {
            let mut b = crate::providers::stream::ChunkBuilder::new(model, true);
            let mut out = vec![b.opening(), b.text(&text)];
            out.extend(b.close(crate::providers::FinishReason::Stop));
            out
        };
        let mut assembler = Assembler::default();
        chunks.iter().for_each(|c| assembler.push(c));
        assembler.finish().unwrap_or_else(|| Answer {
            response: empty_response(model),
        })
    }
}

fn empty_response(model: &str) -> ChatResponse {
    ChatResponse {
        id: String::new(),
        object: crate::providers::types::completion_object(),
        created: 0,
        model: model.to_owned(),
        choices: Vec::new(),
        usage: None,
        usage_details: serde_json::Map::new(),
        system_fingerprint: None,
        extra: serde_json::Map::new(),
    }
}

/// The model identity in the key: the upstream models the requested name routes to, so
/// an alias and the model it names share entries; the name itself when nothing routes it.
/// What answers `model` for this request, for the exact key: the model's route (its targets),
/// and with a RoutingPolicy the rule that matches the request, whose chain may send the same
/// prompt of two callers (another tenant or tier, another class) to different models.
fn answering(view: &View, ctx: &RequestCtx, tenant: &str, model: &str) -> String {
    let mut answering = resolved_model(view, model);
    let class = ctx
        .routing
        .as_ref()
        .map_or(floodgate_crds::local_model::PromptClass::Medium, |n| {
            n.class
        });
    if let Some(rule) = view.config.routing.rule(&ctx.tier, class, model, tenant) {
        answering.push_str("|rule=");
        answering.push_str(&rule.name);
    }
    answering
}

/// Whether the answer came from the first target the routing stage tried: an answer from a
/// target it spilled or fell over to (a local model under pressure, another pool) is not
/// stored, so it is never served later to a request its first choice would answer.
fn first_choice(ctx: &RequestCtx) -> bool {
    // A stale or template answer of the degradation chain is not a provider's answer.
    let degraded = matches!(ctx.cache.outcome, Some(Outcome::Stale | Outcome::Template));
    !degraded && ctx.routing.as_ref().is_none_or(|n| n.steps.len() <= 1)
}

/// Each target as its pool, provider, endpoint and upstream model: a provider's name is
/// unique only within its pool, so two pools' `up` serving `x` at different endpoints are
/// two models.
fn resolved_model(view: &View, model: &str) -> String {
    match view.runtime.routes.get(model) {
        Some(route) => route
            .targets
            .iter()
            .map(|t| match view.runtime.providers.get(t.provider) {
                Some(p) => format!("{}/{}@{}/{}", p.pool, p.name, p.base_url, t.upstream_model),
                None => format!("/{}", t.upstream_model),
            })
            .collect::<Vec<_>>()
            .join(","),
        None => model.to_owned(),
    }
}

/// The entries and bytes gauges with the Redis backend: what the policy's ledger holds in
/// Redis (all replicas' entries), as of this replica's last store.
fn redis_usage(stored: &redis::Stored) {
    let m = metrics::get();
    m.entries
        .set(i64::try_from(stored.entries).unwrap_or(i64::MAX));
    m.bytes.set(i64::try_from(stored.bytes).unwrap_or(i64::MAX));
}

/// Counts the tokens and dollars a hit saved, at the first price found for `model`.
fn saved(view: &View, model: &str, answer: &Answer) {
    if let Some(usage) = &answer.response.usage {
        saving(view, model)(usage);
    }
}

/// What counts the tokens and dollars an answer of `usage` saved, at the first price found
/// for `model` (a streaming follower's, once its usage comes).
fn saving(view: &View, model: &str) -> impl FnOnce(&crate::providers::types::Usage) + Send + use<> {
    let price = view
        .config
        .pools
        .iter()
        .flat_map(|p| &p.spec.providers)
        .flat_map(|p| &p.models)
        .find(|m| m.name == model || m.alias.as_deref() == Some(model))
        .map(|p| (p.input_per_1m, p.output_per_1m));
    move |usage| {
        let m = metrics::get();
        m.saved_tokens.inc_by(u64::from(usage.total_tokens));
        if let Some((input, output)) = price {
            let usd = (f64::from(usage.prompt_tokens) * input
                + f64::from(usage.completion_tokens) * output)
                / 1e6;
            m.saved_usd.inc_by(usd);
        }
    }
}

/// How long a follower waits for its leader's whole answer once it began: as long as a call
/// of its own could have taken (its wait limit, then the answering provider's
/// `requestSeconds`), never without end.
fn whole_by(view: &View, provider: &str, deadline: tokio::time::Instant) -> tokio::time::Instant {
    let request = view
        .runtime
        .providers
        .iter()
        .find(|p| *p.name == *provider)
        .map_or_else(
            || floodgate_crds::pool::Timeouts::default().request_seconds,
            |p| p.timeouts.request_seconds,
        );
    deadline.max(tokio::time::Instant::now()) + Duration::from_secs(u64::from(request))
}

/// A follower whose deadline passed before its leader's answer began: refused like a
/// request that waited for budget that long (429), not left waiting without end.
fn waited_too_long() -> pipeline::Error {
    RouteError::Saturated {
        retry_after: Duration::from_secs(1),
    }
    .into()
}

fn routed(reply: Result<Reply, pipeline::Error>) -> Result<Served, pipeline::Error> {
    reply.map(|reply| Served {
        reply,
        routed: true,
    })
}

fn hit(body: ReplyBody) -> Served {
    Served {
        reply: reply_of(Arc::from("cache"), Arc::from(""), body),
        routed: false,
    }
}

fn reply_of(provider: Arc<str>, key: Arc<str>, body: ReplyBody) -> Reply {
    Reply {
        provider,
        key,
        attempts: 0,
        ok: Counter::default(),
        waited: Duration::ZERO,
        body,
    }
}

/// A stored answer in the caller's mode: whole, or replayed as a stream.
fn whole_reply(answer: Answer, req: &ChatRequest) -> ReplyBody {
    if req.stream {
        let chunks: Vec<Result<ChatChunk, ProviderError>> = answer
            .chunks(&req.model, req.include_usage())
            .into_iter()
            .map(Ok)
            .collect();
        ReplyBody::Stream(Box::pin(futures::stream::iter(chunks)))
    } else {
        ReplyBody::Complete(answer.for_caller(&req.model))
    }
}

/// A stream that assembles its answer as it passes and hands it to `stored` after a clean,
/// complete end; after an error, or dropped before its end, it stores nothing.
struct Tee {
    inner: ChunkStream,
    assembler: Assembler,
    stored: Option<Box<dyn FnOnce(Answer) + Send>>,
    /// The caller did not ask for usage: the usage the gateway asked for is assembled but
    /// not passed on.
    strip_usage: bool,
}

impl Stream for Tee {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            let item = self.inner.as_mut().poll_next(cx);
            match item {
                Poll::Ready(Some(Ok(mut chunk))) => {
                    self.assembler.push(&chunk);
                    if self.strip_usage && chunk.usage.is_some() {
                        if chunk.choices.is_empty() {
                            // The usage chunk alone: not the caller's.
                            continue;
                        }
                        chunk.usage = None;
                        chunk.usage_details.clear();
                    }
                    return Poll::Ready(Some(Ok(chunk)));
                }
                Poll::Ready(Some(Err(e))) => {
                    self.stored = None;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => {
                    if let Some(stored) = self.stored.take() {
                        let answer = std::mem::take(&mut self.assembler).finish();
                        if let Some(answer) = answer.filter(Answer::is_complete) {
                            stored(answer);
                        }
                    }
                    return Poll::Ready(None);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests;
