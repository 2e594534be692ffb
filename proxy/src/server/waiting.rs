//! A streaming caller that has to wait for budget is told where it stands. If the pipeline
//! has not answered within [`PROGRESS_EVERY`], the event stream starts at once with a
//! comment line every second, `: floodgate queued position=3 eta_ms=1200`, until the answer
//! comes; then the door's own events follow, or, if the wait ends in a refusal, one error
//! event in the door's format. SSE comments are ignored by every SSE client (the OpenAI and
//! Anthropic SDKs included); a person watching with curl sees them.
//!
//! The price: once the stream has started, the status is 200 and the decision headers
//! (provider, attempts, queue time) cannot follow; a refusal is the error event instead.

use crate::route::wait::Progress;
use axum::body::Body;
use axum::http::{HeaderValue, header};
use axum::response::Response;
use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt as _};
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// How long a streaming request may wait before its stream starts, and how often it is then
/// told where it stands.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Runs `pending` (the pipeline of a streaming request): its output if it comes within
/// [`PROGRESS_EVERY`]; else an event stream that reports `progress` every second while
/// `pending` runs, then carries what `finish` renders from its output.
pub async fn stream_while_waiting<T, Fut, F>(
    pending: Fut,
    progress: Arc<Progress>,
    finish: F,
) -> Result<T, Response>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    F: FnOnce(T) -> BoxStream<'static, Bytes> + Send + 'static,
{
    let mut pending = Box::pin(pending);
    tokio::select! {
        biased;
        out = &mut pending => return Ok(out),
        () = tokio::time::sleep(PROGRESS_EVERY) => {}
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now(), PROGRESS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let state = State::Waiting {
        pending,
        finish,
        tick,
        progress,
    };
    let events = futures::stream::unfold(state, |state| async move {
        match state {
            State::Waiting {
                mut pending,
                finish,
                mut tick,
                progress,
            } => {
                tokio::select! {
                    biased;
                    out = &mut pending => {
                        let mut rest = finish(out);
                        let first = rest.next().await?;
                        Some((first, State::Rendering(rest)))
                    }
                    _ = tick.tick() => {
                        let line = comment(&progress);
                        Some((line, State::Waiting { pending, finish, tick, progress }))
                    }
                }
            }
            State::Rendering(mut rest) => {
                let next = rest.next().await?;
                Some((next, State::Rendering(rest)))
            }
        }
    })
    .map(Ok::<Bytes, Infallible>);
    let mut response = Response::new(Body::from_stream(events));
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    Err(response)
}

enum State<Fut, F> {
    Waiting {
        pending: Pin<Box<Fut>>,
        finish: F,
        tick: tokio::time::Interval,
        progress: Arc<Progress>,
    },
    Rendering(BoxStream<'static, Bytes>),
}

/// The progress comment: requests ahead and the estimated wait, or just that it waits (it
/// is between queues, or looking for budget at the head).
fn comment(progress: &Progress) -> Bytes {
    match progress.now() {
        Some((ahead, eta)) => Bytes::from(format!(
            ": floodgate queued position={ahead} eta_ms={}\n\n",
            eta.as_millis()
        )),
        None => Bytes::from_static(b": floodgate waiting\n\n"),
    }
}
