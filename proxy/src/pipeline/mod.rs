//! The request path: one ordered chain of stages over a [`RequestCtx`], the same for every
//! front door. This is the one place the order is written down.
//!
//! | # | stage            | where                          | status                         |
//! |---|------------------|--------------------------------|--------------------------------|
//! | 1 | identity         | the door ([`door::serve`]), from headers, before the body is read: [`identity`] | built |
//! | 2 | parse            | the door: its wire format -> [`ChatRequest`] (or [`EmbeddingsRequest`]) | built |
//! | 2b | tenant limits   | here: allowed models, the tenant's rpm / tpm / concurrency ([`identity::limits`]) | built |
//! | 3 | classify         | here, prompt class: [`routing::classify`] | built          |
//! | 4 | cache lookup     | [`cache`](crate::cache): templates, then exact answers, then semantic ones | built |
//! | 5 | dedup            | [`cache::flight`](crate::cache::flight): join an identical request in flight, fanned out | built |
//! | 6 | queue (admission)| [`route::attempt`] + [`route::wait`]: per route, by tier (weighted fair queueing), bounded | built |
//! | 7 | route / attempt  | [`routing::chat`]: rule and chain of pools and local models; in each, [`route`]: key, provider, fallback | built |
//! | 8 | cache store      | [`cache`](crate::cache): tees the typed answer, stores it when complete | built |
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
    ChatChunk, EmbeddingsRequest, EmbeddingsResponse, ProviderError, estimate_output_tokens,
    estimate_prompt_tokens,
};
use crate::route::attempt::{ANONYMOUS, Asker};
use crate::route::{ChunkStream, Dispatcher, Reply, ReplyBody, RouteError, UsageReport, View};
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
    let prompt = u64::from(estimate_prompt_tokens(req));
    let tokens = prompt + u64::from(output);
    let mut asker = queue_place(view, ctx);
    // A stream's usage as the provider counted it, for the stages that charge for it after
    // the stream, whether or not the caller asked to see it.
    let report = req.stream.then(UsageReport::default);
    asker.report.clone_from(&report);
    // 3: the prompt's class.
    crate::routing::classify(view, ctx, req);
    let slot = tenant_slot(ctx, &req.model, tokens).await?;
    // 4 + 5 + 8: cache lookup, dedup and store around 6 + 7: the routing rule's chain of
    // targets; in each, admission in the route's queue, then attempts over keys and
    // providers.
    let reply = match ctx.cache.cache.clone() {
        Some(cache) => cache
            .chat(dispatcher, view, ctx, req, asker)
            .await
            .map(|served| (served.reply, served.routed)),
        None => crate::routing::chat(dispatcher, view, ctx, req, asker)
            .await
            .map(|reply| (reply, true)),
    };
    if let (Err(e), Some(slot)) = (&reply, slot.as_ref()) {
        // A refusal by the gateway itself (no attempt reached a provider, or a spent cost
        // budget) gives the tenant its request and tokens back.
        let refused = match e {
            Error::Route(e) => e.is_gateway_refusal(),
            Error::OverBudget(_) => true,
            Error::Refused(_) => false,
        };
        if refused {
            slot.refund();
        }
    }
    let (mut reply, routed) = reply?;
    // A hit, or a follower's answer, has no route decision of its own.
    if routed {
        record_decision(ctx, &reply);
    } else {
        crate::routing::capacity::record_unrouted(&dispatcher.routing().recent, ctx);
    }
    if let Some(slot) = slot {
        reply.body = match reply.body {
            ReplyBody::Complete(answer) => {
                if let Some(usage) = &answer.usage {
                    slot.settle(u64::from(usage.total_tokens));
                }
                ReplyBody::Complete(answer)
            }
            ReplyBody::Stream(chunks) => ReplyBody::Stream(Box::pin(Held {
                inner: Some(chunks),
                slot,
                prompt,
                output: 0,
                report,
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
    let reply = refund_unless_sent(reply, slot.as_ref())?;
    if let Some(slot) = slot
        && reply.body.usage.total_tokens > 0
    {
        slot.settle(u64::from(reply.body.usage.total_tokens));
    }
    Ok(reply)
}

/// The route stage's reply; when the gateway refused the request itself (no key in time, none
/// able to serve, no such model) rather than pass on a provider's error, the tenant's slot is
/// refunded: a refusal the tenant did not cause does not spend its own limits.
fn refund_unless_sent<B>(
    reply: Result<Reply<B>, RouteError>,
    slot: Option<&Slot>,
) -> Result<Reply<B>, RouteError> {
    if let (Err(e), Some(slot)) = (&reply, slot)
        && e.is_gateway_refusal()
    {
        slot.refund();
    }
    reply
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
/// tenant's tokens: with the usage a chunk reports, else with the provider's count reported
/// by the attempt ([`UsageReport`]: the caller did not ask for usage, or left early), else
/// (the provider gave none, or the stream broke) with the prompt's estimate plus the output
/// streamed so far, estimated a token per four bytes, so that a stream without `max_tokens`
/// is not charged its prompt alone.
struct Held {
    /// `None` once dropped, before settling (the attempt reports a stream it lost on drop).
    inner: Option<ChunkStream>,
    slot: Slot,
    /// The prompt's estimated tokens.
    prompt: u64,
    /// The output's estimated tokens so far.
    output: u64,
    report: Option<UsageReport>,
}

impl Held {
    /// Settles at the reported usage, or the estimate (once: later calls are no-ops).
    fn settle(&self) {
        let reported = self.report.as_ref().and_then(UsageReport::get);
        let tokens = match reported {
            Some(usage) if usage.total_tokens > 0 => u64::from(usage.total_tokens),
            _ => self.prompt + self.output,
        };
        self.slot.settle(tokens);
    }
}

impl Stream for Held {
    type Item = Result<ChatChunk, ProviderError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let item = inner.as_mut().poll_next(cx);
        match &item {
            Poll::Ready(Some(Ok(chunk))) => match &chunk.usage {
                Some(usage) => self.slot.settle(u64::from(usage.total_tokens)),
                None => self.output += estimate_output_tokens(chunk),
            },
            Poll::Ready(None) => self.settle(),
            _ => {}
        }
        item
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        // The stream first: an attempt the caller left reports what it settled as it drops.
        drop(self.inner.take());
        // Settles once: a no-op if usage or the end settled it already.
        self.settle();
    }
}

/// The queue stage's view of the caller: its tier (the TierQueue's default until identity
/// names one) with the deadline that tier sets, and its tenant. Sets the tier and deadline
/// on `ctx` (the same each time it is called).
pub fn queue_place(view: &View, ctx: &mut RequestCtx) -> Asker {
    let caller = ctx.caller.clone();
    let name = ctx.job_tier.as_deref();
    let tier = view
        .runtime
        .tiers
        .get(name.or(caller.as_ref().and_then(|c| c.tier()).map(|t| &**t)));
    ctx.set_tier(tier);
    Asker {
        tier: tier.clone(),
        tenant: caller.map_or_else(|| Arc::from(ANONYMOUS), |c| c.name().clone()),
        progress: ctx.progress.clone(),
        affinity: None,
        report: None,
        answer_by: None,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::budget::{Budgets, MINUTE};
    use crate::config::{ClientKeyConfig, Config, TenantConfig, TenantLimits};
    use crate::identity::Identity;
    use crate::providers::stream::ChunkBuilder;
    use crate::providers::types::Usage;
    use crate::secret::KeyDigest;
    use axum::http::{HeaderMap, HeaderValue};
    use futures::StreamExt as _;
    use std::num::NonZeroU32;
    use tokio::time::Instant;

    /// A tenant `acme` with `tpm` tokens per minute, identified.
    fn caller(budgets: &Budgets, tpm: u32) -> Arc<identity::Caller> {
        let tenant = Arc::new(TenantConfig {
            name: Arc::from("acme"),
            tier: None,
            keys: vec![ClientKeyConfig {
                name: Arc::from("main"),
                digest: KeyDigest::of("sk-acme"),
            }],
            limits: TenantLimits {
                tpm: NonZeroU32::new(tpm),
                ..TenantLimits::default()
            },
            models: None,
        });
        let config = Arc::new(Config {
            tenants: vec![tenant],
            ..Config::default()
        });
        let mut headers = HeaderMap::new();
        headers.insert("x-api-key", HeaderValue::from_static("sk-acme"));
        Identity::new(false)
            .identify(&config, budgets, &headers)
            .unwrap()
            .unwrap()
    }

    /// Exactly `left` tokens fit in the tenant's window: `left + 1` is refused.
    async fn assert_left(caller: &Arc<identity::Caller>, far: Instant, left: u64) {
        assert!(
            identity::limits::admit(caller, "m", left + 1, far)
                .await
                .is_err()
        );
        assert!(
            identity::limits::admit(caller, "m", left, far)
                .await
                .is_ok()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_without_usage_charges_the_tenant_its_output_too() {
        let budgets = Budgets::new(MINUTE, Arc::default());
        let caller = caller(&budgets, 1000);
        let far = Instant::now() + MINUTE;
        // No max_tokens: the reservation is the prompt's estimate alone.
        let slot = identity::limits::admit(&caller, "m", 100, far)
            .await
            .unwrap();
        let mut chunks = ChunkBuilder::new("m", false);
        let stream: Vec<Result<ChatChunk, ProviderError>> = vec![
            Ok(chunks.opening()),
            // 2,000 bytes: 500 tokens of output.
            Ok(chunks.text(&"x".repeat(2000))),
        ];
        let held = Held {
            inner: Some(Box::pin(futures::stream::iter(stream))),
            slot,
            prompt: 100,
            output: 0,
            report: None,
        };
        assert_eq!(held.collect::<Vec<_>>().await.len(), 2);
        // Charged 100 + 500: 400 tokens are left in the window, not 900.
        assert_left(&caller, far, 400).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_the_caller_leaves_charges_what_was_streamed() {
        let budgets = Budgets::new(MINUTE, Arc::default());
        let caller = caller(&budgets, 1000);
        let far = Instant::now() + MINUTE;
        // max_tokens 800: 100 + 800 reserved.
        let slot = identity::limits::admit(&caller, "m", 900, far)
            .await
            .unwrap();
        let mut chunks = ChunkBuilder::new("m", false);
        let stream: Vec<Result<ChatChunk, ProviderError>> = vec![
            Ok(chunks.text(&"x".repeat(400))),
            Ok(chunks.text(&"x".repeat(400))),
        ];
        let mut held = Held {
            inner: Some(Box::pin(futures::stream::iter(stream))),
            slot,
            prompt: 100,
            output: 0,
            report: None,
        };
        // The caller reads one chunk (100 tokens) and hangs up.
        assert!(held.next().await.is_some());
        drop(held);
        // Charged 100 + 100: 800 left.
        assert_left(&caller, far, 800).await;
    }

    /// A stream that reports `usage` as the attempt does: when it ends, or when it is
    /// dropped before its end.
    struct Reporting {
        inner: ChunkStream,
        report: UsageReport,
        usage: Usage,
    }

    impl Stream for Reporting {
        type Item = Result<ChatChunk, ProviderError>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            let item = self.inner.as_mut().poll_next(cx);
            if let Poll::Ready(None) = item {
                self.report.set(self.usage);
            }
            item
        }
    }

    impl Drop for Reporting {
        fn drop(&mut self) {
            self.report.set(self.usage);
        }
    }

    fn reporting(text: &str, usage: Usage) -> (ChunkStream, UsageReport) {
        let mut chunks = ChunkBuilder::new("m", false);
        let stream: Vec<Result<ChatChunk, ProviderError>> =
            vec![Ok(chunks.text(text)), Ok(chunks.text(text))];
        let report = UsageReport::default();
        let inner = Reporting {
            inner: Box::pin(futures::stream::iter(stream)),
            report: report.clone(),
            usage,
        };
        (Box::pin(inner), report)
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_is_charged_the_providers_count_the_caller_did_not_ask_to_see() {
        let budgets = Budgets::new(MINUTE, Arc::default());
        let caller = caller(&budgets, 1000);
        let far = Instant::now() + MINUTE;
        let slot = identity::limits::admit(&caller, "m", 100, far)
            .await
            .unwrap();
        // 2 x 1,000 bytes (an estimate of 100 + 500), but the provider counted 700.
        let (inner, report) = reporting(&"x".repeat(1000), Usage::new(120, 580));
        let held = Held {
            inner: Some(inner),
            slot,
            prompt: 100,
            output: 0,
            report: Some(report),
        };
        assert_eq!(held.collect::<Vec<_>>().await.len(), 2);
        assert_left(&caller, far, 300).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_the_caller_leaves_is_charged_what_its_attempt_settled_on_drop() {
        let budgets = Budgets::new(MINUTE, Arc::default());
        let caller = caller(&budgets, 1000);
        let far = Instant::now() + MINUTE;
        let slot = identity::limits::admit(&caller, "m", 900, far)
            .await
            .unwrap();
        // The attempt settles 50 + 30 when it is dropped (the provider's prompt count and
        // the output it had sent); the gateway's own estimate would be 100 + 100.
        let (inner, report) = reporting(&"x".repeat(400), Usage::new(50, 30));
        let mut held = Held {
            inner: Some(inner),
            slot,
            prompt: 100,
            output: 0,
            report: Some(report),
        };
        assert!(held.next().await.is_some());
        drop(held);
        assert_left(&caller, far, 920).await;
    }
}
