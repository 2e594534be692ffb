//! The in-memory store's contract, on a paused clock.

use super::memory::MemoryStore;
use super::store::{Created, JobStore, Notice, Notifier, Step, Submitted};
use super::*;
use serde_json::json;

fn job() -> Job {
    Job::new(
        Some("acme".to_owned()),
        "free".to_owned(),
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        3,
    )
}

/// Queues `job` with no bound.
async fn queue(store: &MemoryStore, job: Job) -> Job {
    store.submit(job, 0).await.unwrap().queued().unwrap()
}

/// A policy of 3 attempts, dead letters kept 10 minutes, results an hour.
pub(crate) fn policy() -> Policy {
    Policy {
        retry: retry::Backoff {
            max_attempts: 3,
            initial: Duration::from_secs(2),
            max: Duration::from_secs(60),
        },
        dead_letters: true,
        retention: Duration::from_secs(600),
        result_ttl: Duration::from_secs(3600),
    }
}

#[tokio::test(start_paused = true)]
async fn jobs_are_claimed_in_order_with_positions() {
    let store = MemoryStore::new();
    let a = queue(&store, job()).await;
    let b = queue(&store, job()).await;
    assert_eq!(store.position(&a).await.unwrap(), 0);
    assert_eq!(store.position(&b).await.unwrap(), 1);
    let first = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(first.job.id, a.id);
    assert_eq!(store.position(&b).await.unwrap(), 0);
    let second = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(second.job.id, b.id);
    assert!(
        store
            .claim("w", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn a_retry_is_claimable_exactly_when_its_delay_ends() {
    let store = MemoryStore::new();
    let submitted = queue(&store, job()).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let mut j = claim.job.clone();
    j.status = Status::Retrying;
    j.attempts = 1;
    let delay = Duration::from_secs(2);
    assert!(
        store
            .save(&claim, &j, Step::Retry { delay }, &policy())
            .await
            .unwrap()
    );
    let start = tokio::time::Instant::now();
    // Not a moment before its delay ends.
    assert!(
        store
            .claim("w", delay - Duration::from_millis(1))
            .await
            .unwrap()
            .is_none()
    );
    let again = store
        .claim("w", Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.job.id, submitted.id);
    assert_eq!(start.elapsed(), delay);
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_is_handed_over_once_to_be_told_and_a_running_one_is_not_overwritten() {
    let store = MemoryStore::new();
    let queued = queue(&store, job()).await;
    let cancelled = store.cancel(&queued.id).await.unwrap().unwrap();
    assert_eq!(cancelled.status, Status::Cancelled);
    // Handed over cancelled (for its caller to be told), once; never to be run.
    let told = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(told.job.status, Status::Cancelled);
    store.ack(&told).await.unwrap();
    assert!(store.claim("w", Duration::ZERO).await.unwrap().is_none());

    // Cancelled while waiting for its retry: back in the queue at once, cancelled.
    let retried = queue(&store, job()).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let mut j = claim.job.clone();
    j.status = Status::Retrying;
    let step = Step::Retry {
        delay: Duration::from_secs(60),
    };
    assert!(store.save(&claim, &j, step, &policy()).await.unwrap());
    store.cancel(&retried.id).await.unwrap();
    let told = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(
        (told.job.id.as_str(), told.job.status),
        (retried.id.as_str(), Status::Cancelled)
    );
    store.ack(&told).await.unwrap();

    let running = queue(&store, job()).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    store.cancel(&running.id).await.unwrap();
    let mut done = claim.job.clone();
    done.status = Status::Completed;
    assert!(
        !store
            .save(&claim, &done, Step::Finish, &policy())
            .await
            .unwrap()
    );
    let now = store.get(&running.id).await.unwrap().unwrap();
    assert_eq!(now.status, Status::Cancelled);
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_kept_for_their_retention_and_redriven_with_attempts_reset() {
    let store = MemoryStore::new();
    let submitted = queue(&store, job()).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let mut dead = claim.job.clone();
    dead.status = Status::Failed;
    dead.attempts = 3;
    dead.dead_letter = true;
    assert!(
        store
            .save(&claim, &dead, Step::Finish, &policy())
            .await
            .unwrap()
    );
    store.ack(&claim).await.unwrap();
    let retention = Duration::from_secs(600);
    assert_eq!(store.dead_letters(retention).await.unwrap().len(), 1);
    assert_eq!(store.redrive(Some(&submitted.id)).await.unwrap(), 1);
    assert!(store.dead_letters(retention).await.unwrap().is_empty());
    let again = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(again.job.id, submitted.id);
    assert_eq!((again.job.attempts, again.job.status), (0, Status::Queued));

    // Dead again: gone from the dead letters exactly at the end of its retention.
    assert!(
        store
            .save(&again, &dead, Step::Finish, &policy())
            .await
            .unwrap()
    );
    tokio::time::advance(retention - Duration::from_millis(1)).await;
    assert_eq!(store.dead_letters(retention).await.unwrap().len(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(store.dead_letters(retention).await.unwrap().is_empty());
}

/// A delivery record of `channel`: `delivered`, or refused.
fn tried(channel: Channel, delivered: bool) -> Vec<Delivery> {
    vec![Delivery {
        at_ms: now_ms(),
        channel,
        outcome: if delivered { "delivered" } else { "http_500" }.to_owned(),
    }]
}

const BOTH: [Channel; 2] = [Channel::Webhook, Channel::Email];

#[tokio::test(start_paused = true)]
async fn one_holds_a_notice_until_its_lease_lapses_and_a_recorded_channel_is_not_sent_again() {
    let store = MemoryStore::new();
    let j = queue(&store, job()).await;
    let lease = Duration::from_secs(30);
    let (a, b) = (Notifier::new(&j), Notifier::new(&j));
    let nothing_told = Notice::Granted {
        webhook: false,
        email: false,
    };
    assert_eq!(store.begin_notice(&a, lease).await.unwrap(), nothing_told);
    assert_eq!(store.begin_notice(&b, lease).await.unwrap(), Notice::Busy);
    // A's webhook is delivered and recorded; then A stops renewing (it died).
    let webhook = tried(Channel::Webhook, true);
    assert!(
        store
            .record_notice(&a, Channel::Webhook, &webhook, &BOTH)
            .await
            .unwrap()
    );
    tokio::time::advance(lease - Duration::from_millis(1)).await;
    assert_eq!(store.begin_notice(&b, lease).await.unwrap(), Notice::Busy);
    tokio::time::advance(Duration::from_millis(1)).await;
    // Exactly at its end B takes over, and sends only the email: the webhook is recorded.
    let only_email = Notice::Granted {
        webhook: true,
        email: false,
    };
    assert_eq!(store.begin_notice(&b, lease).await.unwrap(), only_email);
    // A, back, can neither renew nor record over B (its email tries are not B's).
    assert!(!store.renew_notice(&a, lease).await.unwrap());
    let a_mail = tried(Channel::Email, false);
    assert!(
        !store
            .record_notice(&a, Channel::Email, &a_mail, &BOTH)
            .await
            .unwrap()
    );
    assert!(store.renew_notice(&b, lease).await.unwrap());
    let b_mail = tried(Channel::Email, true);
    assert!(
        store
            .record_notice(&b, Channel::Email, &b_mail, &BOTH)
            .await
            .unwrap()
    );
    // Told for good: nobody holds it again, whenever.
    tokio::time::advance(lease * 10).await;
    let c = Notifier::new(&j);
    assert_eq!(store.begin_notice(&c, lease).await.unwrap(), Notice::Done);
    assert_eq!(store.begin_notice(&b, lease).await.unwrap(), Notice::Done);
    let deliveries = store.get(&j.id).await.unwrap().unwrap().deliveries;
    assert_eq!(deliveries, [webhook, b_mail].concat());
}

#[tokio::test(start_paused = true)]
async fn a_renewed_lease_is_not_taken_over() {
    let store = MemoryStore::new();
    let j = queue(&store, job()).await;
    let lease = Duration::from_secs(30);
    let (a, b) = (Notifier::new(&j), Notifier::new(&j));
    assert!(matches!(
        store.begin_notice(&a, lease).await.unwrap(),
        Notice::Granted { .. }
    ));
    for _ in 0..5 {
        tokio::time::advance(lease / 3).await;
        assert!(store.renew_notice(&a, lease).await.unwrap());
        assert_eq!(store.begin_notice(&b, lease).await.unwrap(), Notice::Busy);
    }
}

#[tokio::test(start_paused = true)]
async fn a_finished_job_is_never_reopened_by_a_holder_whose_claim_lapsed() {
    let store = MemoryStore::new();
    let submitted = queue(&store, job()).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    // Another holder finished it while this one still ran.
    let mut done = claim.job.clone();
    done.status = Status::Completed;
    assert!(
        store
            .save(&claim, &done, Step::Finish, &policy())
            .await
            .unwrap()
    );
    let mut retry = claim.job.clone();
    retry.status = Status::Retrying;
    let step = Step::Retry {
        delay: Duration::from_secs(1),
    };
    assert!(!store.save(&claim, &retry, step, &policy()).await.unwrap());
    let now = store.get(&submitted.id).await.unwrap().unwrap();
    assert_eq!(now.status, Status::Completed);
    assert!(
        store
            .claim("w", Duration::from_secs(5))
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_job_is_forgotten_after_it_was_kept_a_day() {
    let store = MemoryStore::new();
    let queued = queue(&store, job()).await;
    store.cancel(&queued.id).await.unwrap();
    tokio::time::advance(CANCELLED_KEPT - Duration::from_millis(1)).await;
    assert!(store.get(&queued.id).await.unwrap().is_some(), "kept");
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(store.get(&queued.id).await.unwrap().is_none(), "forgotten");
}

/// Runs `job` to its end (failed and dead-lettered when `dead`) and reports it.
async fn finish_and_report(store: &MemoryStore, policy: &Policy, dead: bool) -> Job {
    let submitted = queue(store, job()).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let mut over = claim.job.clone();
    over.status = if dead {
        Status::Failed
    } else {
        Status::Completed
    };
    over.dead_letter = dead;
    assert!(
        store
            .save(&claim, &over, Step::Finish, policy)
            .await
            .unwrap()
    );
    let notifier = Notifier::new(&submitted);
    assert!(matches!(
        store
            .begin_notice(&notifier, Duration::from_secs(30))
            .await
            .unwrap(),
        Notice::Granted { .. }
    ));
    let tries = tried(Channel::Webhook, true);
    let wanted = [Channel::Webhook];
    assert!(
        store
            .record_notice(&notifier, Channel::Webhook, &tries, &wanted)
            .await
            .unwrap()
    );
    store.ack(&claim).await.unwrap();
    over
}

#[tokio::test(start_paused = true)]
async fn reported_marks_are_forgotten_with_their_jobs() {
    let store = MemoryStore::new();
    let policy = policy();
    for _ in 0..10 {
        finish_and_report(&store, &policy, false).await;
    }
    assert_eq!(store.reported_marks(), 10);
    // Past the result TTL the jobs are forgotten, and their marks with them: the marks are
    // bounded by the jobs kept, not by every job ever reported.
    tokio::time::advance(policy.result_ttl).await;
    finish_and_report(&store, &policy, false).await;
    assert_eq!(store.reported_marks(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_batch_line_outlives_the_result_ttl_until_its_batch_can_end() {
    let store = MemoryStore::new();
    let policy = Policy {
        result_ttl: Duration::from_secs(60),
        ..policy()
    };
    let mut line = job();
    line.batch = Some("batch_1".to_owned());
    let submitted = queue(&store, line).await;
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    let mut over = claim.job.clone();
    over.status = Status::Completed;
    assert!(
        store
            .save(&claim, &over, Step::Finish, &policy)
            .await
            .unwrap()
    );
    // A batch that runs longer than the tier's result TTL still finds its early lines when
    // it builds its files; they go with the files' retention.
    tokio::time::advance(batch::KEEP - Duration::from_millis(1)).await;
    assert!(store.get(&submitted.id).await.unwrap().is_some());
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(store.get(&submitted.id).await.unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn a_dead_letter_outlives_the_result_ttl_for_its_retention() {
    let store = MemoryStore::new();
    let policy = Policy {
        result_ttl: Duration::from_secs(60),
        retention: Duration::from_secs(7 * 86_400),
        ..policy()
    };
    let dead = finish_and_report(&store, &policy, true).await;
    let done = finish_and_report(&store, &policy, false).await;
    tokio::time::advance(policy.result_ttl).await;
    // The completed job is gone after its TTL; the dead letter stays, readable.
    assert!(store.get(&done.id).await.unwrap().is_none());
    let letters = store.dead_letters(policy.retention).await.unwrap();
    assert_eq!(letters.len(), 1);
    assert_eq!(letters[0].id, dead.id);
    assert!(store.get(&dead.id).await.unwrap().is_some());
    // Until the end of its retention exactly.
    tokio::time::advance(policy.retention - policy.result_ttl - Duration::from_millis(1)).await;
    assert_eq!(store.dead_letters(policy.retention).await.unwrap().len(), 1);
    tokio::time::advance(Duration::from_millis(1)).await;
    assert!(
        store
            .dead_letters(policy.retention)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn pending_counts_follow_jobs_until_they_are_over() {
    let store = MemoryStore::new();
    let policy = policy();
    let key = ("free".to_owned(), "acme".to_owned());
    let a = queue(&store, job()).await;
    queue(&store, job()).await;
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 2);
    // Running and retrying still count; finishing, dead-lettered, does not.
    let claim = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    assert_eq!(claim.job.id, a.id);
    let mut dead = claim.job.clone();
    dead.status = Status::Failed;
    dead.dead_letter = true;
    assert!(
        store
            .save(&claim, &dead, Step::Finish, &policy)
            .await
            .unwrap()
    );
    assert_eq!(store.pending().await.unwrap(), vec![(key.clone(), 1)]);
    // Re-driven, it counts again; cancelled, the other one stops counting.
    assert_eq!(store.redrive(Some(&a.id)).await.unwrap(), 1);
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 2);
    let other = store.claim("w", Duration::ZERO).await.unwrap().unwrap();
    store.cancel(&other.job.id).await.unwrap();
    store.cancel(&other.job.id).await.unwrap();
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 1);
    assert_eq!(store.pending_for("free", "globex").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_submissions_never_pass_the_bound_and_a_refusal_queues_nothing() {
    let store = std::sync::Arc::new(MemoryStore::new());
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.submit(job(), 5).await.unwrap() })
        })
        .collect();
    let mut queued = Vec::new();
    for t in tasks {
        match t.await.unwrap() {
            Submitted::Queued { job, ahead } => queued.push((job.seq, ahead)),
            Submitted::Full { pending } => assert_eq!(pending, 5),
        }
    }
    queued.sort_unstable();
    // Five queued, each told how many were before it.
    assert_eq!(queued, vec![(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]);
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 5);
    // The bound is the pair's: another tenant, and no bound, still queue.
    let mut other = job();
    other.tenant = Some("globex".to_owned());
    assert!(store.submit(other, 5).await.unwrap().queued().is_some());
    assert!(store.submit(job(), 0).await.unwrap().queued().is_some());
    // The refused were never queued: the queue holds the seven accepted only.
    let mut claimed = 0;
    while store.claim("w", Duration::ZERO).await.unwrap().is_some() {
        claimed += 1;
    }
    assert_eq!(claimed, 7);
}

#[tokio::test(start_paused = true)]
async fn a_holder_whose_job_was_queued_again_can_neither_save_nor_acknowledge() {
    let store = MemoryStore::new();
    let policy = policy();
    let submitted = queue(&store, job()).await;
    let old = store.claim("a", Duration::ZERO).await.unwrap().unwrap();
    let mut dead = old.job.clone();
    dead.status = Status::Failed;
    dead.dead_letter = true;
    assert!(
        store
            .save(&old, &dead, Step::Finish, &policy)
            .await
            .unwrap()
    );
    // Re-driven while A still holds its claim (telling the failure); B runs it again.
    assert_eq!(store.redrive(Some(&submitted.id)).await.unwrap(), 1);
    let new = store.claim("b", Duration::ZERO).await.unwrap().unwrap();
    let mut running = new.job.clone();
    running.status = Status::Running;
    assert!(
        store
            .save(&new, &running, Step::Start, &policy)
            .await
            .unwrap()
    );
    // A's old claim writes nothing, and its acknowledgement leaves B's claim held.
    let mut stale = old.job.clone();
    stale.status = Status::Retrying;
    let step = Step::Retry {
        delay: Duration::from_secs(1),
    };
    assert!(!store.save(&old, &stale, step, &policy).await.unwrap());
    assert!(!store.keep(&old).await.unwrap());
    store.ack(&old).await.unwrap();
    assert!(store.keep(&new).await.unwrap());
    let mut done = running.clone();
    done.status = Status::Completed;
    assert!(
        store
            .save(&new, &done, Step::Finish, &policy)
            .await
            .unwrap()
    );
    let now = store.get(&submitted.id).await.unwrap().unwrap();
    assert_eq!((now.status, now.redrives), (Status::Completed, 1));
}

#[tokio::test(start_paused = true)]
async fn dead_letters_are_trimmed_by_their_retention_as_new_ones_come() {
    let store = MemoryStore::new();
    let policy = policy();
    finish_and_report(&store, &policy, true).await;
    tokio::time::advance(policy.retention - Duration::from_millis(1)).await;
    finish_and_report(&store, &policy, true).await;
    assert_eq!(store.dead_kept(), 2);
    // Past the first one's retention, the next dead letter drops it, unlisted.
    tokio::time::advance(Duration::from_millis(1)).await;
    finish_and_report(&store, &policy, true).await;
    assert_eq!(store.dead_kept(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_batch_is_refused_whole_when_its_lines_would_pass_the_tenants_bound() {
    let store = MemoryStore::new();
    queue(&store, job()).await;
    let lines = |n: usize| -> Vec<Job> {
        (0..n)
            .map(|_| {
                let mut j = job();
                j.batch = Some("batch_b".to_owned());
                j
            })
            .collect()
    };
    let create = |n: usize| {
        store.create_batch(
            "batch_b",
            "{}".to_owned(),
            "[]".to_owned(),
            lines(n),
            Duration::from_secs(3600),
            3,
        )
    };
    // One pending: three more lines pass a bound of 3; refused whole, nothing queued.
    match create(3).await.unwrap() {
        Created::Full { pending } => assert_eq!(pending, 1),
        Created::Queued(_) => panic!("a batch past the bound was queued"),
    }
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 1);
    assert!(store.batch("batch_b").await.unwrap().is_none());
    // Two fit exactly.
    assert_eq!(create(2).await.unwrap().queued().map(|q| q.len()), Some(2));
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 3);
}
