//! Stage 3 (classify) and the routing half of stage 7: a request's prompt class, the
//! RoutingPolicy rule that matches it, and the rule's chain of targets walked in order until
//! one answers — the degradation chain.
//!
//! ```text
//! classify (stage 3)           -> x-floodgate-class, floodgate_requests_classified_total
//! tenant budget                -> 429 budget_exceeded when spent this month
//! rule = first match (tier, class, model, tenant)      -> x-floodgate-route
//! for step in rule.targets:                            -> x-floodgate-chain
//!     pool budget spent?            next step  (over_budget)
//!     local model past threshold?   paid tiers: next step (spill_queue / spill_latency);
//!                                   batch tiers wait for a slot
//!     dispatcher on <pool>/<model>  within the keys and providers of that pool: next key,
//!                                   next provider (route::attempt); on saturation,
//!                                   circuits open or a retryable failure: next step
//! cost of the answer            -> x-floodgate-cost-usd, floodgate_request_cost_usd_total
//! ```
//!
//! Every step has a deadline derived from the tier's wait limit: a step that is not the last
//! gets an equal share of the time left, the last gets all of it. The deadline bounds the
//! wait for budget and for a local model's slot and, on a step that is not the last, the
//! wait for the target to begin answering (response headers, a stream's first chunk:
//! [`ProviderError::StepDeadline`](crate::providers::ProviderError::StepDeadline), outcome
//! `step_deadline`); the last step's call is bounded by the pool's `requestSeconds`. A batch
//! tier's local step is the exception: it waits for the model up to its whole deadline and
//! is not cut once the model answers (it would not be sent on to premium anyway).
//!
//! Past the last target, when the targets failed for capacity or health ([`degrade`]): a
//! **stale answer** (an exact-cache entry expired less than the CachePolicy's
//! `exact.staleSeconds` ago, in memory or in Redis, `x-floodgate-cache: stale`, chain step
//! `stale=ok`), then a
//! **template answer** (a CachePolicy template with `when: degraded`, step `template=ok`),
//! then, in the door, a **job** for a caller that prefers one (`Prefer: respond-async`: 202
//! and the job's `Location`, step `job=queued`); otherwise the last error is the answer: 429
//! or 503 with `retry-after`.
//!
//! Requests no rule matches are routed by their model name over every pool, as before.

pub mod affinity;
pub mod capacity;
pub mod classify;
pub mod cost;
pub mod health;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod spend;

use crate::pipeline::{self, RequestCtx};
use crate::providers::types::{ChatRequest, Usage};
use crate::providers::{ChatChunk, ProviderError};
use crate::route::attempt::Asker;
use crate::route::{ChunkStream, Dispatcher, Reply, ReplyBody, RouteError, UsageReport, View};
use axum::http::{HeaderMap, HeaderName, HeaderValue};
use floodgate_crds::QueueClass;
use floodgate_crds::local_model::PromptClass;
use futures::Stream;
use metrics::{ClassLabels, RouteLabels, StepLabels, routing_metrics};
use plan::{Plan, Step};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::Instant;

/// Response header: the prompt's class.
pub const CLASS_HEADER: &str = "x-floodgate-class";
/// Response header: the routing rule that matched, or `by-model`.
pub const ROUTE_HEADER: &str = "x-floodgate-route";
/// Response header: the steps of the chain taken, `<target>=<outcome>` joined by commas.
pub const CHAIN_HEADER: &str = "x-floodgate-chain";
/// Response header: the request's cost in USD at the pool's prices (whole answers).
pub const COST_HEADER: &str = "x-floodgate-cost-usd";
/// The route name of requests no rule matched.
pub const BY_MODEL: &str = "by-model";

/// What routing keeps across configuration reloads: local models' gates and the monthly
/// spending. One per dispatcher.
#[derive(Debug, Default)]
pub struct State {
    /// Concurrency gates and demand of local models.
    pub gates: local::Gates,
    /// Spending per tenant and pool this month.
    pub ledger: Arc<cost::Ledger>,
    /// Who answered recent requests (the capacity report).
    pub recent: capacity::Recent,
    /// The key that served each long prompt prefix last.
    pub affinity: affinity::Affinity,
}

/// What the routing stage decided, for the response headers.
#[derive(Debug, Clone)]
pub struct Note {
    /// The prompt's class.
    pub class: PromptClass,
    /// The rule that matched.
    pub rule: Option<Arc<str>>,
    /// Steps taken: target and outcome.
    pub steps: Vec<(Arc<str>, &'static str)>,
    /// The cost, once known (whole answers).
    pub cost: Option<cost::Costed>,
}

/// Stage 3: classifies `req`'s prompt and records the class on `ctx`.
pub fn classify(view: &View, ctx: &mut RequestCtx, req: &ChatRequest) {
    let class = view.config.routing.classifier.classify(req);
    routing_metrics()
        .classified
        .get_or_create(&ClassLabels {
            class: classify::name(class),
        })
        .inc();
    ctx.routing = Some(Note {
        class,
        rule: None,
        steps: Vec::new(),
        cost: None,
    });
}

/// Sets the routing headers of `ctx`'s response.
pub fn headers(headers: &mut HeaderMap, ctx: &RequestCtx) {
    let Some(note) = &ctx.routing else { return };
    headers.insert(
        HeaderName::from_static(CLASS_HEADER),
        HeaderValue::from_static(classify::name(note.class)),
    );
    if ctx.route.is_none() && note.steps.is_empty() && note.rule.is_none() {
        return;
    }
    let rule = note.rule.as_deref().unwrap_or(BY_MODEL);
    if let Ok(v) = HeaderValue::from_str(rule) {
        headers.insert(HeaderName::from_static(ROUTE_HEADER), v);
    }
    if !note.steps.is_empty() {
        let chain: Vec<String> = note
            .steps
            .iter()
            .map(|(target, outcome)| format!("{target}={outcome}"))
            .collect();
        if let Ok(v) = HeaderValue::from_str(&chain.join(",")) {
            headers.insert(HeaderName::from_static(CHAIN_HEADER), v);
        }
    }
    if let Some(cost) = note.cost
        && let Ok(v) = HeaderValue::from_str(&format!("{:.8}", cost.usd))
    {
        headers.insert(HeaderName::from_static(COST_HEADER), v);
    }
}

/// Routes `req` (classified by [`classify`]) by the first matching rule's chain, or by its
/// model name when none matches; records the cost of the answer.
pub async fn chat(
    dispatcher: &Dispatcher,
    view: &View,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    mut asker: Asker,
) -> Result<Reply, pipeline::Error> {
    let plan = view.config.routing.clone();
    asker.affinity = affinity::prefix_hash(req);
    let reply = route(dispatcher, view, ctx, req, &asker, &plan).await;
    if let (Ok(reply), Some(hash)) = (&reply, asker.affinity) {
        dispatcher
            .routing()
            .affinity
            .record(hash, &reply.provider, &reply.key);
    }
    reply
}

/// [`chat`] once the prompt's prefix is known.
async fn route(
    dispatcher: &Dispatcher,
    view: &View,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    asker: &Asker,
    plan: &Arc<Plan>,
) -> Result<Reply, pipeline::Error> {
    let state = dispatcher.routing();
    let class = ctx
        .routing
        .as_ref()
        .map_or(PromptClass::Medium, |n| n.class);
    state
        .ledger
        .check("tenant", &asker.tenant, &plan.tenant_budgets, plan.alert_at)
        .await?;
    let Some(rule) = plan.rule(&ctx.tier, class, &req.model, &asker.tenant) else {
        // By model: the pools that serve it keep their budgets too. Refused when every one
        // of them is spent; otherwise the spent ones' targets are left out and a pool with
        // budget left answers. The answer's cost is booked to the pool of the provider that
        // gave it.
        let pools = pools_serving(view, &req.model);
        let mut spent: Vec<(Arc<str>, cost::OverBudget)> = Vec::new();
        for p in &pools {
            if let Err(over) = state
                .ledger
                .check("pool", p, &plan.pool_budgets, plan.alert_at)
                .await
            {
                spent.push((p.clone(), over));
            }
        }
        if !pools.is_empty() && spent.len() == pools.len() {
            count_route(BY_MODEL, None);
            return Err(spent.swap_remove(0).1.into());
        }
        let spent: Vec<Arc<str>> = spent.into_iter().map(|(p, _)| p).collect();
        let reply = dispatcher
            .chat_except(view, &req.model, req, ctx.deadline, asker.clone(), &spent)
            .await;
        count_route(BY_MODEL, reply.as_ref().ok().map(|r| &*r.provider));
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => return degrade(state, view, ctx, req, e.into()).await,
        };
        state.recent.record(capacity::Served::Premium);
        let pool = pool_of(view, &req.model, &reply.provider);
        return Ok(costed(ctx, plan, state, asker, pool, &req.model, &req.model, reply).await);
    };
    set_rule(ctx, &rule.name);
    let spills = asker.tier.class != QueueClass::Batch;
    let mut last: Option<pipeline::Error> = None;
    for (i, step) in rule.steps.iter().enumerate() {
        let more = i + 1 < rule.steps.len();
        let now = Instant::now();
        // A tier that does not spill waits for a local model up to its own deadline: an
        // equal share of it would send batch work to the next (premium) step by timeout.
        let deadline = if step.local.is_some() && !spills {
            ctx.deadline
        } else {
            step_deadline(now, ctx.deadline, rule.steps.len() - i)
        };
        if let Err(e) = state
            .ledger
            .check("pool", &step.pool, &plan.pool_budgets, plan.alert_at)
            .await
        {
            record_step(ctx, step, "over_budget");
            last = Some(e.into());
            continue;
        }
        // A local model: its concurrency slot, or spill over.
        let mut slot = None;
        if let Some(name) = &step.local
            && let Some(spec) = plan.locals.get(&**name)
        {
            // The LocalModelDeployment's `classes`: the prompt classes it may take.
            if !spec.takes(class) {
                record_step(ctx, step, "class_not_served");
                continue;
            }
            let gate = state.gates.get(name, spec);
            let pressure = gate.pressure(spec);
            if pressure != local::Pressure::Normal && spills && more {
                gate.spilled();
                record_step(
                    ctx,
                    step,
                    match pressure {
                        local::Pressure::Latency => "spill_latency",
                        _ => "spill_queue",
                    },
                );
                continue;
            }
            match gate.acquire(deadline).await {
                Some(s) => slot = Some(s),
                None => {
                    record_step(ctx, step, "timeout");
                    last = Some(
                        RouteError::Saturated {
                            retry_after: Duration::from_secs(1),
                        }
                        .into(),
                    );
                    if !spills {
                        // Its whole wait is spent: refused, not sent on to premium.
                        break;
                    }
                    continue;
                }
            }
        }
        let route = route_of(step, &req.model);
        // A step that is not the last must begin answering by its deadline, or the next
        // step is tried; a batch tier's local step is where it waits, not a step it leaves.
        let mut asking = asker.clone();
        asking.answer_by = (more && (spills || step.local.is_none())).then_some(deadline);
        let reply = dispatcher
            .chat_on(view, &route, req, deadline, asking)
            .await;
        match reply {
            Ok(mut reply) => {
                record_step(ctx, step, "ok");
                state.recent.record(if step.local.is_some() {
                    capacity::Served::Local
                } else {
                    capacity::Served::Premium
                });
                count_route(&rule.name, Some(&step.label));
                if let Some(slot) = slot {
                    slot.answered();
                    reply.body = hold(reply.body, slot);
                }
                let pool = Some(step.pool.clone());
                return Ok(costed(ctx, plan, state, asker, pool, &route, &req.model, reply).await);
            }
            // The next step, or past the last the degradation steps, may serve.
            Err(e) if falls_through(&e) => {
                if let Some(slot) = &slot {
                    slot.failed();
                }
                record_step(ctx, step, e.metric_label());
                last = Some(e.into());
            }
            // The request's own fault (a 400): the model answered, in the time it took,
            // and is not held to have failed.
            Err(e) => {
                if let Some(slot) = &slot {
                    slot.answered();
                }
                record_step(ctx, step, e.metric_label());
                count_route(&rule.name, None);
                return Err(e.into());
            }
        }
    }
    count_route(&rule.name, None);
    // No step could even be tried (a local model without an endpoint yet, classes it does
    // not take): unavailable for now, and the caller is told when to come back.
    let error = last.unwrap_or_else(|| {
        RouteError::Unavailable {
            retry_after: Some(UNAVAILABLE_RETRY_AFTER),
        }
        .into()
    });
    degrade(state, view, ctx, req, error).await
}

/// The degradation chain past the targets, when they failed for capacity or health (not for
/// the request itself): an expired answer within the CachePolicy's `exact.staleSeconds`
/// (`x-floodgate-cache: stale`), then a `when: degraded` template; otherwise `error`. The
/// door then hands the request to a job when the caller prefers it (`server::jobs::defer`),
/// and past that the error is the answer (429 or 503 with `retry-after`).
async fn degrade(
    state: &State,
    view: &View,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
    error: pipeline::Error,
) -> Result<Reply, pipeline::Error> {
    let Some(cache) = ctx.cache.cache.clone().filter(|_| degradable(&error)) else {
        return Err(error);
    };
    if let Some(reply) = cache.stale(view, ctx, req).await {
        record_degraded(ctx, "stale");
        state.recent.record(capacity::Served::Cache);
        return Ok(reply);
    }
    if let Some(reply) = cache.degraded_template(view, ctx, req) {
        record_degraded(ctx, "template");
        state.recent.record(capacity::Served::Cache);
        return Ok(reply);
    }
    Err(error)
}

/// Whether the chain failed for its targets' capacity or health (a step of the degradation
/// chain may still answer), not for the request itself or its caller's limits.
pub fn degradable(error: &pipeline::Error) -> bool {
    match error {
        pipeline::Error::Route(RouteError::UnknownModel(_)) => false,
        pipeline::Error::Route(e) => falls_through(e),
        // A pool's spent budget (a tenant's is refused before any step).
        pipeline::Error::OverBudget(e) => e.scope == "pool",
        pipeline::Error::Refused(_) => false,
    }
}

/// Records the hand-over of a request to a job (the door's last step of the chain).
pub fn handed_over(ctx: &mut RequestCtx) {
    record_degraded_outcome(ctx, "job", "queued");
}

/// A degradation step that answered: in the chain header and the step metrics.
fn record_degraded(ctx: &mut RequestCtx, target: &'static str) {
    record_degraded_outcome(ctx, target, "ok");
}

fn record_degraded_outcome(ctx: &mut RequestCtx, target: &'static str, outcome: &'static str) {
    routing_metrics()
        .steps
        .get_or_create(&StepLabels {
            target: target.to_owned(),
            outcome: outcome.to_owned(),
        })
        .inc();
    if let Some(note) = &mut ctx.routing {
        note.steps.push((Arc::from(target), outcome));
    }
}

/// `retry-after` of a 503 when nothing says better: a rule none of whose targets could be
/// tried, or a provider's 5xx without its own `retry-after` (the door, `upstream_error`).
pub const UNAVAILABLE_RETRY_AFTER: Duration = Duration::from_secs(10);

/// The pools whose providers serve `model` (its route's targets), each once.
fn pools_serving(view: &View, model: &str) -> Vec<Arc<str>> {
    let mut pools: Vec<Arc<str>> = Vec::new();
    if let Some(route) = view.runtime.routes.get(model) {
        for t in &route.targets {
            if let Some(p) = view.runtime.providers.get(t.provider)
                && !pools.iter().any(|q| **q == *p.pool)
            {
                pools.push(Arc::from(p.pool.as_str()));
            }
        }
    }
    pools
}

/// The pool of the provider named `provider` among `model`'s route's targets.
fn pool_of(view: &View, model: &str, provider: &str) -> Option<Arc<str>> {
    let route = view.runtime.routes.get(model)?;
    route
        .targets
        .iter()
        .filter_map(|t| view.runtime.providers.get(t.provider))
        .find(|p| &*p.name == provider)
        .map(|p| Arc::from(p.pool.as_str()))
}

/// The dispatcher route of `step` for a request of `model`.
fn route_of(step: &Step, model: &str) -> String {
    if step.keeps_model {
        format!("{}/{model}", step.pool)
    } else {
        step.route.clone()
    }
}

/// The deadline of a step with `steps_left` steps (itself included) left: an equal share of
/// the time to `deadline`, all of it for the last.
pub fn step_deadline(now: Instant, deadline: Instant, steps_left: usize) -> Instant {
    let left = deadline.saturating_duration_since(now);
    now + left / u32::try_from(steps_left.max(1)).unwrap_or(u32::MAX)
}

/// Whether the next step may serve where this one could not: the target's capacity or
/// health, not the request itself.
fn falls_through(e: &RouteError) -> bool {
    match e {
        RouteError::Saturated { .. } | RouteError::Unavailable { .. } => true,
        RouteError::UnknownModel(_) => true,
        RouteError::Upstream { error, .. } => error.retryable(),
    }
}

fn set_rule(ctx: &mut RequestCtx, rule: &Arc<str>) {
    if let Some(note) = &mut ctx.routing {
        note.rule = Some(rule.clone());
    }
}

fn record_step(ctx: &mut RequestCtx, step: &Step, outcome: &'static str) {
    routing_metrics()
        .steps
        .get_or_create(&StepLabels {
            target: step.label.to_string(),
            outcome: outcome.to_owned(),
        })
        .inc();
    if let Some(note) = &mut ctx.routing {
        note.steps.push((step.label.clone(), outcome));
    }
}

fn count_route(rule: &str, target: Option<&str>) {
    routing_metrics()
        .routed
        .get_or_create(&RouteLabels {
            rule: rule.to_owned(),
            target: target.unwrap_or("none").to_owned(),
        })
        .inc();
}

/// Records the cost of `reply`: now for a whole answer (returned once the shared spending
/// holds it, so the next request on any replica sees it), at its end for a stream.
#[expect(
    clippy::too_many_arguments,
    reason = "one call site; a struct would only rename them"
)]
async fn costed(
    ctx: &mut RequestCtx,
    plan: &Arc<Plan>,
    state: &State,
    asker: &Asker,
    pool: Option<Arc<str>>,
    route: &str,
    requested: &str,
    mut reply: Reply,
) -> Reply {
    let tenant = asker.tenant.clone();
    match reply.body {
        ReplyBody::Complete(answer) => {
            if let Some(usage) = &answer.usage {
                let (c, writing) = cost::record(
                    plan,
                    &state.ledger,
                    &tenant,
                    pool.as_deref(),
                    &reply.provider,
                    route,
                    requested,
                    usage,
                );
                if let Some(note) = &mut ctx.routing {
                    note.cost = c;
                }
                writing.done().await;
            }
            reply.body = ReplyBody::Complete(answer);
        }
        ReplyBody::Stream(inner) => {
            reply.body = ReplyBody::Stream(Box::pin(Costing {
                inner: Some(inner),
                report: asker.report.clone(),
                recorded: false,
                plan: plan.clone(),
                ledger: state.ledger.clone(),
                tenant,
                pool,
                provider: reply.provider.clone(),
                route: route.to_owned(),
                requested: requested.to_owned(),
            }));
        }
    }
    reply
}

/// Keeps a local model's slot until the answer is finished.
fn hold(body: ReplyBody, slot: local::Slot) -> ReplyBody {
    match body {
        ReplyBody::Complete(answer) => ReplyBody::Complete(answer),
        ReplyBody::Stream(inner) => ReplyBody::Stream(Box::pin(Slotted { inner, _slot: slot })),
    }
}

struct Slotted {
    inner: ChunkStream,
    _slot: local::Slot,
}

impl Stream for Slotted {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// A stream that records its cost once: when a chunk reports usage, else when it ends or is
/// dropped, at the usage its attempt reported ([`UsageReport`]: the caller did not ask to see
/// it, or left), so that a stream without `include_usage` is not free.
struct Costing {
    /// `None` once dropped, before recording (the attempt reports a stream it lost on drop).
    inner: Option<ChunkStream>,
    report: Option<UsageReport>,
    recorded: bool,
    plan: Arc<Plan>,
    ledger: Arc<cost::Ledger>,
    tenant: Arc<str>,
    pool: Option<Arc<str>>,
    provider: Arc<str>,
    route: String,
    requested: String,
}

impl Costing {
    fn record(&mut self, usage: &Usage) {
        if std::mem::replace(&mut self.recorded, true) {
            return;
        }
        // The write to the shared spending finishes on its own.
        let (_, writing) = cost::record(
            &self.plan,
            &self.ledger,
            &self.tenant,
            self.pool.as_deref(),
            &self.provider,
            &self.route,
            &self.requested,
            usage,
        );
        drop(writing);
    }

    fn record_reported(&mut self) {
        if let Some(usage) = self.report.as_ref().and_then(UsageReport::get) {
            self.record(&usage);
        }
    }
}

impl Stream for Costing {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let item = inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => {
                if let Some(usage) = &chunk.usage {
                    self.record(usage);
                }
            }
            Poll::Ready(None) => self.record_reported(),
            _ => {}
        }
        item
    }
}

impl Drop for Costing {
    fn drop(&mut self) {
        drop(self.inner.take());
        self.record_reported();
    }
}

#[cfg(test)]
mod tests;
