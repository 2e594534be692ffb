//! The request path: one ordered chain of stages over a [`RequestCtx`], the same for every
//! front door. This is the one place the order is written down.
//!
//! | # | stage            | where                          | status                         |
//! |---|------------------|--------------------------------|--------------------------------|
//! | 1 | identity         | the door, from headers, before the body is read | not built yet (tiers issue) |
//! | 2 | parse            | the door: its wire format -> [`ChatRequest`] (or [`EmbeddingsRequest`]) | built |
//! | 3 | classify         | here, prompt class             | not built yet (routing issue)  |
//! | 4 | cache lookup     | here                           | not built yet (cache issue)    |
//! | 5 | dedup            | here, join an identical request in flight | not built yet (cache issue) |
//! | 6 | queue (admission)| [`route::attempt`], per route, arrival order, bounded | built |
//! | 7 | route / attempt  | [`route`]: key, provider, fallback | built                      |
//! | 8 | cache store      | here, tees the typed answer    | not built yet (cache issue)    |
//!
//! A stage that is not built is absent, not a stub: it costs nothing. Each later stage adds
//! its step to [`chat`] (and its field to the context) without touching the others.
//! Embeddings ([`embeddings`]) run the same chain; of the stages built so far they have the
//! queue and route stages, over the same key budgets. The
//! answer leaves the chain typed ([`ReplyBody`]: a whole response or a stream of chunks) and
//! the door renders it in its own format, so a stage can tee or replay it without parsing.
//!
//! [`ReplyBody`]: crate::route::ReplyBody

pub mod ctx;

pub use ctx::{Door, RequestCtx, RequestId, RouteDecision};

use crate::providers::types::ChatRequest;
use crate::providers::{EmbeddingsRequest, EmbeddingsResponse};
use crate::route::attempt::{ANONYMOUS, Asker};
use crate::route::{Dispatcher, Reply, RouteError, View};
use std::sync::Arc;

/// Runs stages 3-8 for a parsed chat request (stages 1-2 ran in the door) and records the
/// route decision on `ctx`.
pub async fn chat(
    dispatcher: &Dispatcher,
    view: &View,
    ctx: &mut RequestCtx,
    req: &ChatRequest,
) -> Result<Reply, RouteError> {
    // 6 + 7: admission in the route's queue, then attempts over keys and providers.
    let asker = queue_place(view, ctx);
    let reply = dispatcher.chat(view, req, ctx.deadline, asker).await;
    decided(ctx, &reply);
    reply
}

/// Runs stages 3-8 for a parsed embeddings request (stages 1-2 ran in the door) and records
/// the route decision on `ctx`.
pub async fn embeddings(
    dispatcher: &Dispatcher,
    view: &View,
    ctx: &mut RequestCtx,
    req: &EmbeddingsRequest,
) -> Result<Reply<EmbeddingsResponse>, RouteError> {
    // 6 + 7: admission in the route's queue, then attempts over keys and providers.
    let asker = queue_place(view, ctx);
    let reply = dispatcher.embeddings(view, req, ctx.deadline, asker).await;
    decided(ctx, &reply);
    reply
}

/// The queue stage's view of the caller: its tier (the TierQueue's default until identity
/// names one) with the deadline that tier sets, and its tenant. Sets the tier and deadline
/// on `ctx` (the same each time it is called).
pub fn queue_place(view: &View, ctx: &mut RequestCtx) -> Asker {
    let tier = view.runtime.tiers.get(None);
    ctx.set_tier(tier);
    Asker {
        tier: tier.clone(),
        tenant: Arc::from(ANONYMOUS),
        progress: ctx.progress.clone(),
    }
}

/// Records the route stage's decision on `ctx`.
fn decided<B>(ctx: &mut RequestCtx, reply: &Result<Reply<B>, RouteError>) {
    if let Ok(reply) = reply {
        ctx.queued = Some(reply.waited);
        ctx.route = Some(RouteDecision {
            provider: reply.provider.clone(),
            key: reply.key.clone(),
            attempts: reply.attempts,
            ok: reply.ok.clone(),
        });
    }
}
