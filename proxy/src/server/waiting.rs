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
/// `pending` runs, then carries what `finish` renders from its output. If the caller hangs
/// up while `pending` still runs, `pending` is dropped (it leaves the queue) and `hung_up`
/// is called, to record the request's outcome.
pub async fn stream_while_waiting<T, Fut, F, H>(
    pending: Fut,
    progress: Arc<Progress>,
    finish: F,
    hung_up: H,
) -> Result<T, Response>
where
    T: Send + 'static,
    Fut: Future<Output = T> + Send + 'static,
    F: FnOnce(T) -> BoxStream<'static, Bytes> + Send + 'static,
    H: FnOnce() + Send + 'static,
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
        hung_up: HangUp(Some(hung_up)),
    };
    let events = futures::stream::unfold(state, |state| async move {
        match state {
            State::Waiting {
                mut pending,
                finish,
                mut tick,
                progress,
                mut hung_up,
            } => {
                tokio::select! {
                    biased;
                    out = &mut pending => {
                        // Answered: its outcome is `finish`'s to record now.
                        hung_up.0 = None;
                        let mut rest = finish(out);
                        let first = rest.next().await?;
                        Some((first, State::Rendering(rest)))
                    }
                    _ = tick.tick() => {
                        let line = comment(&progress);
                        Some((line, State::Waiting { pending, finish, tick, progress, hung_up }))
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

enum State<Fut, F, H: FnOnce()> {
    Waiting {
        pending: Pin<Box<Fut>>,
        finish: F,
        tick: tokio::time::Interval,
        progress: Arc<Progress>,
        hung_up: HangUp<H>,
    },
    Rendering(BoxStream<'static, Bytes>),
}

/// Calls its function when dropped, unless disarmed (set to `None`) first.
struct HangUp<H: FnOnce()>(Option<H>);

impl<H: FnOnce()> Drop for HangUp<H> {
    fn drop(&mut self) {
        if let Some(hung_up) = self.0.take() {
            hung_up();
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    fn never_renders(_: ()) -> BoxStream<'static, Bytes> {
        futures::stream::empty().boxed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_hangs_up_while_waiting_is_recorded_and_leaves() {
        let hung_up = Arc::new(AtomicBool::new(false));
        let flag = hung_up.clone();
        // The pipeline never answers; dropping it is how the request leaves the queue.
        let left = Arc::new(AtomicBool::new(false));
        let guard = HangUp(Some({
            let left = left.clone();
            move || left.store(true, Ordering::SeqCst)
        }));
        let pending = async move {
            let _guard = guard;
            futures::future::pending::<()>().await;
        };
        let started = stream_while_waiting(
            pending,
            Arc::new(Progress::default()),
            never_renders,
            move || flag.store(true, Ordering::SeqCst),
        )
        .await;
        let Err(response) = started else {
            panic!("the stream starts after a second of waiting");
        };
        let mut body = response.into_body().into_data_stream();
        let first = body.next().await.unwrap().unwrap();
        assert_eq!(&first[..], b": floodgate waiting\n\n");
        assert!(!hung_up.load(Ordering::SeqCst));
        drop(body);
        assert!(hung_up.load(Ordering::SeqCst), "the hang-up is recorded");
        assert!(left.load(Ordering::SeqCst), "the pipeline is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn an_answer_after_the_stream_started_is_not_a_hang_up() {
        let hung_up = Arc::new(AtomicBool::new(false));
        let flag = hung_up.clone();
        let pending = tokio::time::sleep(Duration::from_millis(1500));
        let finish =
            |()| futures::stream::once(async { Bytes::from_static(b"data: x\n\n") }).boxed();
        let Err(response) =
            stream_while_waiting(pending, Arc::new(Progress::default()), finish, move || {
                flag.store(true, Ordering::SeqCst)
            })
            .await
        else {
            panic!("the stream starts after a second of waiting");
        };
        let body = axum::body::to_bytes(response.into_body(), 1 << 16)
            .await
            .unwrap();
        assert_eq!(&body[..], b": floodgate waiting\n\ndata: x\n\n");
        assert!(!hung_up.load(Ordering::SeqCst));
    }
}
