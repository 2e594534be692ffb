//! The request path: one ordered chain of stages over a [`RequestCtx`], the same for every
//! front door. This is the one place the order is written down.
//!
//! | # | stage            | where                          | status                         |
//! |---|------------------|--------------------------------|--------------------------------|
//! | 1 | identity         | the door ([`door::serve`]), from headers, before the body is read: [`identity`] | built |
//! | 2 | parse            | the door: its wire format -> [`ChatRequest`] (or [`EmbeddingsRequest`]) | built |
//! | 2b | tenant limits   | here: allowed models, the tenant's rpm / tpm / concurrency ([`identity::limits`]) | built |
//! | 3 | classify         | here, prompt class: [`routing::classify`] | built          |
//! | 4 | cache lookup     | here                           | not built yet (cache issue)    |
//! | 5 | dedup            | here, join an identical request in flight | not built yet (cache issue) |
//! | 6 | queue (admission)| [`route::attempt`] + [`route::wait`]: per route, by tier (weighted fair queueing), bounded | built |
//! | 7 | route / attempt  | [`routing::chat`]: rule and chain of pools and local models; in each, [`route`]: key, provider, fallback | built |
//! | 8 | cache store      | here, tees the typed answer    | not built yet (cache issue)    |
//!
//! A stage that is not built is absent, not a stub: it costs nothing. Each later stage adds
//! its step to [`chat`] (and its field to the context) without touching the others.
//! Embeddings ([`embeddings`]) run the same chain; of the stages built so far they have the
//! queue and route stages, over the same key budgets. The
//! answer leaves the chain typed ([`ReplyBody`]: a whole response or a stream of chunks) and
//! the door renders it in its own format, so a stage can tee or replay it without parsing.
//!
//! A tenant's admitted request holds a [`Slot`] until its answer is finished: a whole answer
//! settles the tenant's tokens at once; a stream carries the slot to its end ([`Held`]).
//!
//! [`ReplyBody`]: crate::route::ReplyBody
//! [`door::serve`]: crate::server::door::serve

pub mod ctx;

pub use ctx::{Door, RequestCtx, RequestId, RouteDecision};

use crate::identity::{self, Refusal, Slot};
use crate::providers::types::ChatRequest;
use crate::providers::{
    ChatChunk, EmbeddingsRequest, EmbeddingsResponse, ProviderError, estimate_prompt_tokens,
};
use crate::route::attempt::{ANONYMOUS, Asker};
use crate::route::{ChunkStream, Dispatcher, Reply, ReplyBody, RouteError, View};
use futures::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Why the chain did not answer: refused by the tenant's limits, or by the route stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tenant may not make this request now (403 or 429).
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The route stage failed.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// A monthly cost budget (the tenant's, or every target pool's) is spent (429).
    #[error(transparent)]
    OverBudget(#[from] crate::routing::cost::OverBudget),
}

/// Runs stages 2b-8 for a parsed chat request (stages 1-2 ran in the door) and records the
/// route decision on `ctx`.
pub async fn chat(
    dispatcher: &Dispatcher,
    view: &View,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
) -> Result<Reply, Error> {
    // 2b: the tenant's own limits, before its request queues.
    let output = req.max_completion_tokens.or(req.max_tokens).unwrap_or(0);
    let tokens = u64::from(estimate_prompt_tokens(req)) + u64::from(output);
    let asker = queue_place(view, ctx);
    // 3: the prompt's class.
    crate::routing::classify(view, ctx, req);
    let slot = tenant_slot(ctx, &req.model, tokens).await?;
    // 6 + 7: the routing rule's chain of targets; in each, admission in the route's queue,
    // then attempts over keys and providers.
    let mut reply = crate::routing::chat(dispatcher, view, ctx, req, asker).await?;
    record_decision(ctx, &reply);
    if let Some(slot) = slot {
        reply.body = match reply.body {
            ReplyBody::Complete(answer) => {
                if let Some(usage) = &answer.usage {
                    slot.settle(u64::from(usage.total_tokens));
                }
                ReplyBody::Complete(answer)
            }
            ReplyBody::Stream(chunks) => ReplyBody::Stream(Box::pin(Held {
                inner: chunks,
                slot,
            })),
        };
    }
    Ok(reply)
}

/// Runs stages 2b-8 for a parsed embeddings request (stages 1-2 ran in the door) and
/// records the route decision on `ctx`.
pub async fn embeddings(
    dispatcher: &Dispatcher,
    view: &View,
    ctx: &mut RequestCtx,
    req: &EmbeddingsRequest,
) -> Result<Reply<EmbeddingsResponse>, Error> {
    // 2b: the tenant's own limits, before its request queues.
    let asker = queue_place(view, ctx);
    let slot = tenant_slot(ctx, &req.model, u64::from(req.estimate_tokens())).await?;
    // 6 + 7: admission in the route's queue, then attempts over keys and providers.
    let reply = dispatcher.embeddings(view, req, ctx.deadline, asker).await;
    decided(ctx, &reply);
    let reply = reply?;
    if let Some(slot) = slot
        && reply.body.usage.total_tokens > 0
    {
        slot.settle(u64::from(reply.body.usage.total_tokens));
    }
    Ok(reply)
}

/// Stage 2b: the caller's tenant admits the request of `tokens` estimated tokens for
/// `model`, or refuses it; nothing to do when the gateway is open.
async fn tenant_slot(ctx: &RequestCtx, model: &str, tokens: u64) -> Result<Option<Slot>, Refusal> {
    match &ctx.caller {
        Some(caller) => identity::limits::admit(caller, model, tokens, ctx.deadline)
            .await
            .map(Some),
        None => Ok(None),
    }
}

/// A stream that holds its tenant's [`Slot`] until it ends or is dropped, and settles the
/// tenant's tokens with the usage a chunk reports.
struct Held {
    inner: ChunkStream,
    slot: Slot,
}

impl Stream for Held {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let item = self.inner.as_mut().poll_next(cx);
        if let Poll::Ready(Some(Ok(chunk))) = &item
            && let Some(usage) = &chunk.usage
        {
            self.slot.settle(u64::from(usage.total_tokens));
        }
        item
    }
}

/// The queue stage's view of the caller: its tier (the TierQueue's default until identity
/// names one) with the deadline that tier sets, and its tenant. Sets the tier and deadline
/// on `ctx` (the same each time it is called).
pub fn queue_place(view: &View, ctx: &mut RequestCtx) -> Asker {
    let caller = ctx.caller.clone();
    let tier = view
        .runtime
        .tiers
        .get(caller.as_ref().and_then(|c| c.tier()).map(|t| &**t));
    ctx.set_tier(tier);
    Asker {
        tier: tier.clone(),
        tenant: caller.map_or_else(|| Arc::from(ANONYMOUS), |c| c.name().clone()),
        progress: ctx.progress.clone(),
        affinity: None,
    }
}

/// Records the route stage's decision on `ctx`.
fn decided<B>(ctx: &mut RequestCtx, reply: &Result<Reply<B>, RouteError>) {
    if let Ok(reply) = reply {
        record_decision(ctx, reply);
    }
}

/// Records a served request's route decision on `ctx`.
fn record_decision<B>(ctx: &mut RequestCtx, reply: &Reply<B>) {
    ctx.queued = Some(reply.waited);
    ctx.route = Some(RouteDecision {
        provider: reply.provider.clone(),
        key: reply.key.clone(),
        attempts: reply.attempts,
        ok: reply.ok.clone(),
    });
}
