//! The job stores' contract where the order of steps matters, driven step by step (each
//! interleaving forced, not left to timing) against a real redis-server and the in-memory
//! store: a re-drive landing while the job's failure is being told, a notification whose
//! holder died after recording one channel, a holder whose claim was taken over, and the
//! bounds (dead letters trimmed as they come, a batch counted against the tenant's pending
//! jobs).
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::redis::RedisServer;
use floodgate_proxy::jobs::memory::MemoryStore;
use floodgate_proxy::jobs::redis::RedisStore;
use floodgate_proxy::jobs::store::{Created, Notice, Notifier};
use floodgate_proxy::jobs::{
    Channel, Claim, Delivery, Job, JobError, JobStore as _, Policy, Status, Step, Store, retry,
};
use floodgate_proxy::secret::SecretString;
use serde_json::json;
use std::time::{Duration, Instant};

/// A notification lease longer than any test step.
const LEASE: Duration = Duration::from_secs(30);

fn policy() -> Policy {
    Policy {
        retry: retry::Backoff {
            max_attempts: 3,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(2),
        },
        dead_letters: true,
        retention: Duration::from_secs(600),
        result_ttl: Duration::from_secs(3600),
    }
}

fn job() -> Job {
    Job::new(
        Some("acme".to_owned()),
        "free".to_owned(),
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}),
        3,
    )
}

/// The Redis store on `redis`, claims lapsing after `visibility`.
fn redis_store(redis: &RedisServer, visibility: Duration) -> Store {
    let url = SecretString::new(redis.url());
    Store::Redis(RedisStore::new(&url, visibility).unwrap())
}

async fn queued(store: &Store) -> Job {
    store.submit(job(), 0).await.unwrap().queued().unwrap()
}

/// The next job for `consumer` (waiting for one at most 5 s).
async fn claimed(store: &Store, consumer: &str) -> Claim {
    store
        .claim(consumer, Duration::from_secs(5))
        .await
        .unwrap()
        .unwrap()
}

fn tried(channel: Channel, outcome: &str) -> Vec<Delivery> {
    vec![Delivery {
        at_ms: floodgate_proxy::jobs::now_ms(),
        channel,
        outcome: outcome.to_owned(),
    }]
}

/// Two tests of `$body` (`async fn(&Store)`): the in-memory store (`$memory`), and the
/// Redis store on a redis-server of its own (`$redis`).
macro_rules! both_stores {
    ($memory:ident, $redis:ident, $body:ident) => {
        #[tokio::test]
        async fn $memory() {
            $body(&Store::Memory(MemoryStore::new())).await;
        }

        #[tokio::test]
        async fn $redis() {
            let redis = RedisServer::start().await.unwrap();
            $body(&redis_store(&redis, Duration::from_secs(30))).await;
        }
    };
}

both_stores!(
    a_redrive_while_the_failure_is_told_keeps_the_new_result_and_tells_it,
    a_redrive_in_redis_while_the_failure_is_told_keeps_the_new_result_and_tells_it,
    redrive_during_the_failure_notice
);

/// A job fails for good; A begins to tell its failure; an admin re-drives it (between A's
/// start and A's record) and B runs it to success. A's record comes before B begins to tell
/// (`early`) or while B tells: either way A's is refused, the success and its result stay,
/// and B tells it under the next notification id.
async fn redrive_during_the_failure_notice(store: &Store) {
    let policy = policy();
    for early in [true, false] {
        let submitted = queued(store).await;
        let first = claimed(store, "a").await;
        let mut failed = first.job.clone();
        failed.status = Status::Failed;
        failed.attempts = 3;
        failed.dead_letter = true;
        failed.error = Some(JobError {
            code: "upstream_server_error".to_owned(),
            message: "500".to_owned(),
        });
        assert!(
            store
                .save(&first, &failed, Step::Finish, &policy)
                .await
                .unwrap()
        );
        let a = Notifier::new(&failed);
        assert!(matches!(
            store.begin_notice(&a, LEASE).await.unwrap(),
            Notice::Granted { .. }
        ));

        // The re-drive lands while A sends `job.failed`.
        assert_eq!(store.redrive(Some(&submitted.id)).await.unwrap(), 1);
        let again = claimed(store, "b").await;
        assert_eq!(again.job.id, submitted.id);
        assert_eq!((again.job.status, again.job.redrives), (Status::Queued, 1));
        let mut done = again.job.clone();
        done.status = Status::Running;
        done.attempts = 1;
        assert!(
            store
                .save(&again, &done, Step::Start, &policy)
                .await
                .unwrap()
        );
        done.status = Status::Completed;
        done.result = Some(json!({"object": "chat.completion", "answer": 42}));
        assert!(
            store
                .save(&again, &done, Step::Finish, &policy)
                .await
                .unwrap()
        );
        assert_ne!(failed.notice_id(), done.notice_id());
        assert_eq!(done.notice_id(), format!("{}.1", submitted.id));

        let a_tries = tried(Channel::Webhook, "delivered");
        let b = Notifier::new(&done);
        if early {
            assert!(
                !store
                    .record_notice(&a, Channel::Webhook, &a_tries, &[Channel::Webhook])
                    .await
                    .unwrap(),
                "the failure's holder records over a re-driven job"
            );
        }
        assert_eq!(
            store.begin_notice(&b, LEASE).await.unwrap(),
            Notice::Granted {
                webhook: false,
                email: false
            },
            "the success after a re-drive is told"
        );
        if !early {
            assert!(
                !store
                    .record_notice(&a, Channel::Webhook, &a_tries, &[Channel::Webhook])
                    .await
                    .unwrap()
            );
        }
        assert!(!store.renew_notice(&a, LEASE).await.unwrap());
        assert_eq!(store.begin_notice(&a, LEASE).await.unwrap(), Notice::Stale);
        let b_tries = tried(Channel::Webhook, "delivered");
        assert!(
            store
                .record_notice(&b, Channel::Webhook, &b_tries, &[Channel::Webhook])
                .await
                .unwrap()
        );

        let now = store.get(&submitted.id).await.unwrap().unwrap();
        assert_eq!(now.status, Status::Completed, "early: {early}");
        assert_eq!(now.result, done.result, "early: {early}");
        assert!(!now.dead_letter);
        assert_eq!(now.deliveries, b_tries, "early: {early}");
        let c = Notifier::new(&now);
        assert_eq!(store.begin_notice(&c, LEASE).await.unwrap(), Notice::Done);
        store.ack(&first).await.unwrap();
        store.ack(&again).await.unwrap();
    }
}

both_stores!(
    a_recorded_channel_is_never_sent_again_and_a_lapsed_holder_records_nothing,
    a_recorded_channel_in_redis_is_never_sent_again_and_a_lapsed_holder_records_nothing,
    takeover_of_a_notice
);

/// A holds a short lease and records the webhook delivered; it stalls past its lease; B takes
/// over and is told to send only the email; A, back, can neither renew nor record.
async fn takeover_of_a_notice(store: &Store) {
    let submitted = queued(store).await;
    let lease = Duration::from_millis(300);
    let (a, b) = (Notifier::new(&submitted), Notifier::new(&submitted));
    let both = [Channel::Webhook, Channel::Email];
    assert!(matches!(
        store.begin_notice(&a, lease).await.unwrap(),
        Notice::Granted { .. }
    ));
    let hooked = tried(Channel::Webhook, "delivered");
    assert!(
        store
            .record_notice(&a, Channel::Webhook, &hooked, &both)
            .await
            .unwrap()
    );
    assert_eq!(store.begin_notice(&b, lease).await.unwrap(), Notice::Busy);
    let deadline = Instant::now() + Duration::from_secs(10);
    let granted = loop {
        match store.begin_notice(&b, lease).await.unwrap() {
            Notice::Busy => {}
            other => break other,
        }
        assert!(Instant::now() < deadline, "A's lease never lapsed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        granted,
        Notice::Granted {
            webhook: true,
            email: false
        }
    );
    assert!(!store.renew_notice(&a, lease).await.unwrap());
    let a_mail = tried(Channel::Email, "smtp_451");
    assert!(
        !store
            .record_notice(&a, Channel::Email, &a_mail, &both)
            .await
            .unwrap()
    );
    let b_mail = tried(Channel::Email, "delivered");
    assert!(
        store
            .record_notice(&b, Channel::Email, &b_mail, &both)
            .await
            .unwrap()
    );
    let c = Notifier::new(&submitted);
    assert_eq!(store.begin_notice(&c, lease).await.unwrap(), Notice::Done);
    let now = store.get(&submitted.id).await.unwrap().unwrap();
    assert_eq!(now.deliveries, [hooked, b_mail].concat());
}

both_stores!(
    a_batch_is_refused_whole_past_the_tenants_bound,
    a_batch_in_redis_is_refused_whole_past_the_tenants_bound,
    batch_bound
);

async fn batch_bound(store: &Store) {
    queued(store).await;
    let lines = |n: usize| -> Vec<Job> {
        (0..n)
            .map(|_| {
                let mut j = job();
                j.batch = Some("batch_bound".to_owned());
                j
            })
            .collect()
    };
    let window = Duration::from_secs(3600);
    let record = || "{}".to_owned();
    let made = store
        .create_batch(
            "batch_bound",
            record(),
            "[]".to_owned(),
            lines(3),
            window,
            3,
        )
        .await
        .unwrap();
    assert!(
        matches!(made, Created::Full { pending: 1 }),
        "a batch past the bound: {made:?}"
    );
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 1);
    assert!(store.batch("batch_bound").await.unwrap().is_none());
    let made = store
        .create_batch(
            "batch_bound",
            record(),
            "[]".to_owned(),
            lines(2),
            window,
            3,
        )
        .await
        .unwrap();
    assert_eq!(made.queued().map(|q| q.len()), Some(2));
    assert_eq!(store.pending_for("free", "acme").await.unwrap(), 3);
}

#[tokio::test]
async fn a_holder_whose_claim_was_taken_over_can_neither_keep_save_nor_acknowledge_it() {
    let redis = RedisServer::start().await.unwrap();
    let store = redis_store(&redis, Duration::from_millis(200));
    let policy = policy();
    let submitted = queued(&store).await;
    let a = claimed(&store, "a").await;
    let mut running = a.job.clone();
    running.status = Status::Running;
    running.attempts = 1;
    assert!(
        store
            .save(&a, &running, Step::Start, &policy)
            .await
            .unwrap()
    );
    // A stalls: once its claim has been idle for the visibility timeout, B takes it over.
    let b = claimed(&store, "b").await;
    assert_eq!(
        (b.job.id.as_str(), b.entry.as_str()),
        (submitted.id.as_str(), a.entry.as_str())
    );
    assert!(
        !store.keep(&a).await.unwrap(),
        "A keeps a claim B took over"
    );
    assert!(store.keep(&b).await.unwrap());
    // A's writes are refused while B holds the entry...
    let mut stale = running.clone();
    stale.status = Status::Completed;
    assert!(!store.save(&a, &stale, Step::Finish, &policy).await.unwrap());
    // ... and its acknowledgement leaves B's claim in place.
    store.ack(&a).await.unwrap();
    assert!(store.keep(&b).await.unwrap());
    let mut retry = running.clone();
    retry.attempts = 2;
    assert!(store.save(&b, &retry, Step::Start, &policy).await.unwrap());
    retry.status = Status::Retrying;
    let step = Step::Retry {
        delay: Duration::from_secs(60),
    };
    assert!(store.save(&b, &retry, step, &policy).await.unwrap());
    // After B's retry acknowledged the entry, A still cannot overwrite the retry.
    let mut late = running.clone();
    late.status = Status::Retrying;
    assert!(!store.save(&a, &late, step, &policy).await.unwrap());
    let now = store.get(&submitted.id).await.unwrap().unwrap();
    assert_eq!((now.status, now.attempts), (Status::Retrying, 2));
}

/// Queues a job and fails it into the dead letters under `policy`.
async fn dead_letter(store: &Store, policy: &Policy) {
    queued(store).await;
    let claim = claimed(store, "w").await;
    let mut j = claim.job.clone();
    j.status = Status::Failed;
    j.dead_letter = true;
    assert!(store.save(&claim, &j, Step::Finish, policy).await.unwrap());
    store.ack(&claim).await.unwrap();
}

#[tokio::test]
async fn redis_dead_letters_are_trimmed_by_their_retention_as_new_ones_come() {
    let redis = RedisServer::start().await.unwrap();
    let store = redis_store(&redis, Duration::from_secs(30));
    let policy = Policy {
        retention: Duration::from_millis(500),
        ..policy()
    };
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut dead_kept = async || -> u64 {
        redis::cmd("XLEN")
            .arg("floodgate:{jobs}:dead")
            .query_async(&mut conn)
            .await
            .unwrap()
    };
    dead_letter(&store, &policy).await;
    dead_letter(&store, &policy).await;
    assert_eq!(dead_kept().await, 2);
    // Past their retention, the next dead letter trims them: nobody listed the dead letters.
    tokio::time::sleep(policy.retention + Duration::from_millis(100)).await;
    dead_letter(&store, &policy).await;
    assert_eq!(dead_kept().await, 1);
}
