//! The queue of requests waiting for budget on one route, in arrival order.
//!
//! Only the request at the head looks for budget; it waits for the instant its earliest key
//! frees up or for a [`Signal`](crate::budget::Signal) pulse, whichever comes first. The
//! others wait for their turn: when the head is admitted (or gives up, or its caller hangs
//! up) it leaves the queue and wakes the next. Nobody polls. The queue is bounded: a request
//! that finds it full is answered at once with 429 and an honest `retry-after`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Requests waiting on one route.
#[derive(Debug)]
pub struct WaitQueue {
    waiters: Mutex<VecDeque<(u64, Arc<Notify>)>>,
    len: AtomicUsize,
    next_id: AtomicU64,
    /// Most requests that may wait at once (updated when a configuration is applied).
    bound: AtomicUsize,
}

impl WaitQueue {
    /// An empty queue of at most `bound` waiters.
    pub fn new(bound: usize) -> Self {
        Self {
            waiters: Mutex::default(),
            len: AtomicUsize::new(0),
            next_id: AtomicU64::new(0),
            bound: AtomicUsize::new(bound),
        }
    }

    /// Most requests that may wait at once.
    pub fn bound(&self) -> usize {
        self.bound.load(Ordering::Relaxed)
    }

    /// Changes the bound; requests already waiting keep their places.
    pub fn set_bound(&self, bound: usize) {
        self.bound.store(bound, Ordering::Relaxed);
    }

    fn lock(&self) -> MutexGuard<'_, VecDeque<(u64, Arc<Notify>)>> {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Requests waiting now; lock-free, for the fast path's "is anyone ahead of me".
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// Whether nobody waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Joins at the back, or `None` if the queue is full.
    pub fn join(&self) -> Option<Ticket<'_>> {
        let mut waiters = self.lock();
        if waiters.len() >= self.bound() {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let turn = Arc::new(Notify::new());
        waiters.push_back((id, turn.clone()));
        self.len.store(waiters.len(), Ordering::Release);
        Some(Ticket {
            queue: self,
            id,
            turn,
        })
    }
}

/// A place in a [`WaitQueue`]; leaving it (drop) wakes the next request if this one was
/// at the head.
#[derive(Debug)]
pub struct Ticket<'a> {
    queue: &'a WaitQueue,
    id: u64,
    turn: Arc<Notify>,
}

impl Ticket<'_> {
    /// Whether this request is at the head of the queue.
    pub fn is_head(&self) -> bool {
        self.queue
            .lock()
            .front()
            .is_some_and(|(id, _)| *id == self.id)
    }

    /// Resolves when this request becomes the head (at once if it is).
    pub async fn turn(&self) {
        if self.is_head() {
            return;
        }
        // `notify_one` stores a permit, so a wake-up before this await is not lost.
        self.turn.notified().await;
    }

    /// Requests ahead of this one.
    pub fn position(&self) -> usize {
        self.queue
            .lock()
            .iter()
            .position(|(id, _)| *id == self.id)
            .unwrap_or(0)
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut waiters = self.queue.lock();
        let Some(at) = waiters.iter().position(|(id, _)| *id == self.id) else {
            return;
        };
        waiters.remove(at);
        self.queue.len.store(waiters.len(), Ordering::Release);
        if at == 0
            && let Some((_, next)) = waiters.front()
        {
            next.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_next_in_line_is_woken_when_the_head_leaves() {
        let queue = WaitQueue::new(3);
        let first = queue.join().unwrap();
        let second = queue.join().unwrap();
        let third = queue.join().unwrap();
        assert!(queue.join().is_none(), "bounded at 3");
        assert!(first.is_head() && !second.is_head());
        assert_eq!(third.position(), 2);
        // The third leaving (its caller hung up) wakes nobody and frees a place.
        drop(third);
        assert_eq!(queue.len(), 2);
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), second.turn())
            .await
            .expect("the second is woken when the first leaves");
        assert!(second.is_head());
        drop(second);
        assert!(queue.is_empty());
    }
}
