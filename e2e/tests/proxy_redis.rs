//! Shared rate budgets against a real redis-server (`make redis` provides the binary; each
//! test starts its own on a free port): the Lua scripts' logic, two in-process replicas that
//! together stay within every key's limit, and a Redis that dies and comes back.

// Helpers below unwrap freely: clippy allows that in `cfg(test)` code only.
#![cfg(test)]

use floodgate_crds::redis_keys::{KeyBudgetKeys, tenant_use_key};
use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::redis::RedisServer;
use floodgate_proxy::budget::shared::Admission;
use floodgate_proxy::budget::{Limits, RedisBudgets, SharedOptions};
use floodgate_proxy::route::{Dispatcher, DispatcherOptions};
use floodgate_proxy::secret::SecretString;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

const POLL: Duration = Duration::from_millis(20);

fn options(redis: &RedisServer) -> SharedOptions {
    let mut o = SharedOptions::new(SecretString::new(redis.url()));
    o.poll = POLL;
    o
}

/// A backend for the script tests: answers within a second even on a loaded machine.
fn backend(redis: &RedisServer, window: Duration, in_flight_ttl: Duration) -> Arc<RedisBudgets> {
    let mut o = options(redis);
    o.timeout = Duration::from_secs(1);
    o.in_flight_ttl = in_flight_ttl;
    Arc::new(RedisBudgets::new(o, window).unwrap())
}

fn rpm(n: u32) -> Limits {
    Limits {
        rpm: Some(n),
        tpm: None,
    }
}

fn keys() -> Arc<KeyBudgetKeys> {
    Arc::new(KeyBudgetKeys::new("pool", "openai", "k0"))
}

fn refused_wait(a: Admission) -> Duration {
    match a {
        Admission::Refused { wait, .. } => wait,
        Admission::Admitted { .. } => panic!("admitted, expected a refusal"),
    }
}

mod script {
    use super::*;

    const WINDOW: Duration = Duration::from_millis(1000);
    const TTL: Duration = Duration::from_secs(60);

    /// A lower class's cap is decided in the same admission, with every replica's requests
    /// counted: a replica that never saw the other's requests still stops at the cap, and
    /// says that only the cap refused (the key has room for the classes above).
    #[tokio::test]
    async fn a_class_cap_holds_across_replicas_and_leaves_the_rest_to_the_classes_above() {
        let redis = RedisServer::start().await.unwrap();
        let (a, b) = (backend(&redis, WINDOW, TTL), backend(&redis, WINDOW, TTL));
        let (k, l) = (keys(), rpm(10));
        // Replica b takes 3 for the priority class (no cap).
        for i in 0..3 {
            let admitted = b.acquire(&k, l, 1, &format!("b{i}")).await.unwrap();
            assert!(
                matches!(admitted, Admission::Admitted { .. }),
                "{admitted:?}"
            );
        }
        // Replica a's standard class may only take while fewer than 5 are in the window.
        for i in 0..2 {
            let admitted = a
                .acquire_capped(&k, l, 1, &format!("a{i}"), Some(5))
                .await
                .unwrap();
            assert!(
                matches!(admitted, Admission::Admitted { used, .. } if used == 4 + i),
                "{admitted:?}"
            );
        }
        match a.acquire_capped(&k, l, 1, "a2", Some(5)).await.unwrap() {
            Admission::Refused {
                used, class_only, ..
            } => assert_eq!((used, class_only), (5, true)),
            other => panic!("expected the cap to refuse, got {other:?}"),
        }
        // The classes above still find the other 5.
        for i in 3..8 {
            let admitted = b.acquire(&k, l, 1, &format!("b{i}")).await.unwrap();
            assert!(
                matches!(admitted, Admission::Admitted { .. }),
                "{admitted:?}"
            );
        }
        match b.acquire(&k, l, 1, "b8").await.unwrap() {
            Admission::Refused {
                used, class_only, ..
            } => assert_eq!((used, class_only), (10, false)),
            other => panic!("expected the limit to refuse, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn admits_up_to_the_limit_then_says_when() {
        let redis = RedisServer::start().await.unwrap();
        let b = backend(&redis, WINDOW, TTL);
        let (k, l) = (keys(), rpm(2));
        assert_eq!(
            b.acquire(&k, l, 1, "a").await.unwrap(),
            Admission::Admitted {
                used: 1,
                next_free: Duration::ZERO
            }
        );
        // Full, and only answers to requests in flight can make room: ask again soon.
        assert_eq!(
            b.acquire(&k, l, 1, "b").await.unwrap(),
            Admission::Admitted {
                used: 2,
                next_free: POLL
            }
        );
        assert_eq!(
            b.acquire(&k, l, 1, "c").await.unwrap(),
            Admission::Refused {
                used: 2,
                wait: POLL,
                class_only: false,
                paced: false
            }
        );
        // Answered now: its slot frees one window later, not before.
        assert!(b.complete(&k, "a").await.unwrap());
        let wait = refused_wait(b.acquire(&k, l, 1, "c").await.unwrap());
        assert!(
            wait > WINDOW - Duration::from_millis(200) && wait <= WINDOW,
            "{wait:?}"
        );
        tokio::time::sleep(wait).await;
        assert!(matches!(
            b.acquire(&k, l, 1, "c").await.unwrap(),
            Admission::Admitted { used: 2, .. }
        ));
    }

    #[tokio::test]
    async fn a_request_in_flight_past_its_ttl_counts_as_answered_then() {
        let redis = RedisServer::start().await.unwrap();
        let ttl = Duration::from_millis(300);
        let b = backend(&redis, WINDOW, ttl);
        let (k, l) = (keys(), rpm(1));
        let started = tokio::time::Instant::now();
        assert!(matches!(
            b.acquire(&k, l, 1, "crashed").await.unwrap(),
            Admission::Admitted { .. }
        ));
        assert_eq!(refused_wait(b.acquire(&k, l, 1, "b").await.unwrap()), POLL);
        // Its replica never answers: after the TTL it counts as answered at admission + TTL.
        tokio::time::sleep_until(started + ttl + Duration::from_millis(50)).await;
        let wait = refused_wait(b.acquire(&k, l, 1, "b").await.unwrap());
        assert!(wait <= WINDOW && wait > WINDOW / 2, "{wait:?}");
        // A late answer never moves it later.
        assert!(!b.complete(&k, "crashed").await.unwrap());
        tokio::time::sleep(wait).await;
        assert!(matches!(
            b.acquire(&k, l, 1, "b").await.unwrap(),
            Admission::Admitted { .. }
        ));
    }

    #[tokio::test]
    async fn the_limit_is_an_argument_so_reloads_apply_at_once() {
        let redis = RedisServer::start().await.unwrap();
        let b = backend(&redis, WINDOW, TTL);
        let k = keys();
        assert!(matches!(
            b.acquire(&k, rpm(1), 1, "a").await.unwrap(),
            Admission::Admitted { .. }
        ));
        assert!(b.complete(&k, "a").await.unwrap());
        assert!(refused_wait(b.acquire(&k, rpm(1), 1, "b").await.unwrap()) > POLL);
        assert!(matches!(
            b.acquire(&k, rpm(2), 1, "b").await.unwrap(),
            Admission::Admitted { used: 2, .. }
        ));
        refused_wait(b.acquire(&k, rpm(1), 1, "c").await.unwrap());
    }

    #[tokio::test]
    async fn tokens_are_reserved_and_settled() {
        let redis = RedisServer::start().await.unwrap();
        let b = backend(&redis, WINDOW, TTL);
        let k = keys();
        let l = Limits {
            rpm: None,
            tpm: Some(1000),
        };
        assert!(matches!(
            b.acquire(&k, l, 600, "a").await.unwrap(),
            Admission::Admitted { .. }
        ));
        let wait = refused_wait(b.acquire(&k, l, 600, "b").await.unwrap());
        assert!(wait > WINDOW / 2 && wait <= WINDOW, "{wait:?}");
        // It used 100 tokens in the end: room for 600 more, not for 600 + 400.
        assert!(b.settle(&k, "a", 100).await.unwrap());
        assert!(matches!(
            b.acquire(&k, l, 600, "b").await.unwrap(),
            Admission::Admitted { .. }
        ));
        refused_wait(b.acquire(&k, l, 400, "c").await.unwrap());
        // Larger than the whole limit: only into an empty window.
        refused_wait(b.acquire(&k, l, 5000, "d").await.unwrap());
    }

    #[tokio::test]
    async fn keys_follow_the_documented_layout_and_expire() {
        let redis = RedisServer::start().await.unwrap();
        let b = backend(&redis, WINDOW, TTL);
        let k = keys();
        let l = Limits {
            rpm: Some(5),
            tpm: Some(1000),
        };
        b.acquire(&k, l, 10, "a").await.unwrap();
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let mut found: Vec<String> = redis::cmd("KEYS")
            .arg("floodgate:*")
            .query_async(&mut c)
            .await
            .unwrap();
        found.sort();
        let mut expected = vec![
            k.requests.clone(),
            k.tokens.clone(),
            k.token_amounts.clone(),
            k.epoch.clone(),
        ];
        expected.sort();
        assert_eq!(found, expected);
        let pttl = |key: String| {
            let mut c = c.clone();
            async move {
                let ms: i64 = redis::cmd("PTTL")
                    .arg(key)
                    .query_async(&mut c)
                    .await
                    .unwrap();
                Duration::from_millis(u64::try_from(ms).unwrap())
            }
        };
        // In flight: kept until the in-flight TTL plus a window.
        assert!(pttl(k.requests.clone()).await > TTL);
        assert!(pttl(k.tokens.clone()).await <= 2 * WINDOW);
        // Nothing in flight any more: two windows.
        assert!(b.complete(&k, "a").await.unwrap());
        assert!(pttl(k.requests.clone()).await <= 2 * WINDOW);
        // The epoch outlives them by far: an idle key is not taken for a lost one.
        assert!(pttl(k.epoch.clone()).await > Duration::from_secs(3600));
    }
}

/// Detecting that Redis lost the budgets, and re-writing every replica's record into it.
mod loss {
    use super::*;
    use floodgate_proxy::budget::{Budgets, KeyBudget, KeyId, Permit, Unavailable};
    use tokio::time::Instant;

    const WINDOW: Duration = Duration::from_secs(5);
    const GRACE: Duration = Duration::from_millis(600);

    fn shared(redis: &RedisServer) -> Budgets {
        shared_at(redis.url())
    }

    /// [`shared`] through `url` (a relay in front of the server).
    fn shared_at(url: String) -> Budgets {
        let mut o = SharedOptions::new(SecretString::new(url));
        o.poll = POLL;
        o.timeout = Duration::from_millis(500);
        o.check_interval = Duration::from_millis(100);
        o.reseed_grace = GRACE;
        o.rewrite_bound = GRACE;
        Budgets::shared(WINDOW, o, Arc::default()).unwrap()
    }

    fn id() -> KeyId {
        KeyId {
            pool: "pool".into(),
            provider: "openai".into(),
            key: "k0".into(),
        }
    }

    async fn take(key: &Arc<KeyBudget>, n: usize) -> Vec<Permit> {
        let mut permits = Vec::new();
        for _ in 0..n {
            permits.push(key.acquire(Instant::now(), 1).await.unwrap());
        }
        permits
    }

    async fn requests_in_redis(redis: &RedisServer) -> usize {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let key = KeyBudgetKeys::new("pool", "openai", "k0").requests;
        redis::cmd("ZCARD")
            .arg(key)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    async fn flush(redis: &RedisServer) {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
    }

    /// Waits (up to 5 s) until Redis holds `n` requests of the key again.
    async fn rewritten(redis: &RedisServer, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let found = requests_in_redis(redis).await;
            if found == n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{found} requests in Redis, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Two replicas used 6 and 4 of a key's 10 (one still in flight), then Redis loses
    /// everything: both re-write their requests (the idle one through its monitor), and
    /// the key stays full until they leave the window.
    async fn both_replicas_rewrite_after(lose: impl AsyncFnOnce(&mut RedisServer)) {
        let mut redis = RedisServer::start().await.unwrap();
        let (a, b) = (shared(&redis), shared(&redis));
        let (ka, kb) = (a.key(&id(), rpm(10)), b.key(&id(), rpm(10)));
        let mut in_flight = take(&ka, 6).await;
        let still = in_flight.pop().unwrap();
        drop(in_flight);
        drop(take(&kb, 4).await);
        assert_eq!(requests_in_redis(&redis).await, 10);
        lose(&mut redis).await;
        rewritten(&redis, 10).await;
        let (ra, rb) = (a.backend().unwrap(), b.backend().unwrap());
        assert!(
            ra.losses() >= 1 && rb.losses() >= 1,
            "{} {}",
            ra.losses(),
            rb.losses()
        );
        // The key is full as before the loss: nothing is admitted, by either replica.
        for key in [&ka, &kb] {
            assert!(matches!(
                key.acquire(Instant::now(), 1).await,
                Err(Unavailable::Until(_) | Unavailable::Pending)
            ));
        }
        assert_eq!(requests_in_redis(&redis).await, 10);
        drop(still);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_is_found_and_every_replica_rewrites_its_requests() {
        both_replicas_rewrite_after(async |redis: &mut RedisServer| flush(redis).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restart_without_data_is_found_and_every_replica_rewrites_its_requests() {
        both_replicas_rewrite_after(async |redis: &mut RedisServer| {
            redis.restart().await.unwrap();
        })
        .await;
    }

    /// After a loss, admissions wait for the barrier (the other replicas' re-writes), and
    /// no longer: a key with room admits again as soon as it ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_loss_admissions_resume_when_the_barrier_ends() {
        admissions_resume_when_the_barrier_ends(async |redis: &mut RedisServer, _: &Budgets| {
            flush(redis).await;
        })
        .await;
    }

    /// The same after a restart without data that the replica saw as an outage: one
    /// barrier, not a second one when its next check finds the new `run_id` (the record was
    /// re-written when Redis came back).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_restart_admissions_resume_when_the_one_barrier_ends() {
        admissions_resume_when_the_barrier_ends(async |redis: &mut RedisServer, a: &Budgets| {
            let mut watch = a.backend().unwrap().watch_degraded();
            // A few checks first, so that the monitor knows the server's `run_id`.
            tokio::time::sleep(Duration::from_millis(350)).await;
            redis.kill().await.unwrap();
            tokio::time::timeout(Duration::from_secs(2), watch.wait_for(|d| *d))
                .await
                .unwrap()
                .unwrap();
            redis.restart().await.unwrap();
            tokio::time::timeout(Duration::from_secs(2), watch.wait_for(|d| !*d))
                .await
                .unwrap()
                .unwrap();
        })
        .await;
    }

    async fn admissions_resume_when_the_barrier_ends(
        lose: impl AsyncFnOnce(&mut RedisServer, &Budgets),
    ) {
        let mut redis = RedisServer::start().await.unwrap();
        let a = shared(&redis);
        let ka = a.key(&id(), rpm(10));
        drop(take(&ka, 2).await);
        lose(&mut redis, &a).await;
        let flushed = Instant::now();
        let refused = ka.acquire(Instant::now(), 1).await;
        let Err(Unavailable::Until(until)) = refused else {
            panic!("admitted inside the barrier: {refused:?}");
        };
        assert!(
            until <= flushed + GRACE + Duration::from_millis(500),
            "{:?}",
            until - flushed
        );
        tokio::time::sleep_until(until).await;
        let mut admitted = None;
        while admitted.is_none() && Instant::now() < until + Duration::from_millis(300) {
            admitted = ka.acquire(Instant::now(), 1).await.ok();
        }
        assert!(admitted.is_some(), "not admitted once the barrier ended");
        assert_eq!(requests_in_redis(&redis).await, 3);
        // Several checks later, the loss was counted (and its barrier raised) once.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(a.backend().unwrap().losses(), 1);
    }

    /// Redis dies after replica B took 8 of a key's 10 and replica A only 1, and A's last
    /// answer from Redis (1 used) predates B's requests. A must not take the rest of its
    /// half (4 of 5) on the strength of that stale answer: in the outage's first window it
    /// holds no more than it held when Redis was lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_never_trusts_a_stale_answer_about_the_other_replicas() {
        let mut redis = RedisServer::start().await.unwrap();
        let (a, b) = (shared(&redis), shared(&redis));
        let (ka, kb) = (a.key(&id(), rpm(10)), b.key(&id(), rpm(10)));
        let _a = take(&ka, 1).await;
        let _b = take(&kb, 8).await;
        redis.kill().await.unwrap();
        let mut more = Vec::new();
        for _ in 0..5 {
            if let Ok(p) = ka.acquire(Instant::now(), 1).await {
                more.push(p);
            }
        }
        assert!(a.redis_degraded());
        assert!(
            1 + 8 + more.len() <= 10,
            "A took {} more with 9 of 10 in the window",
            more.len()
        );
    }

    /// As above, but the provider had told A that the key is spent (remaining 0) when Redis
    /// died: that says nothing of how many of the window's requests were A's, so A still
    /// holds no more than its own 1 once the provider's reset has passed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_does_not_take_the_providers_word_for_what_a_replica_held() {
        let mut redis = RedisServer::start().await.unwrap();
        let (a, b) = (shared(&redis), shared(&redis));
        let (ka, kb) = (a.key(&id(), rpm(10)), b.key(&id(), rpm(10)));
        let _b = take(&kb, 8).await;
        let _a = take(&ka, 1).await;
        let reset = Duration::from_millis(300);
        let spent = floodgate_proxy::providers::RateLimitInfo {
            requests_remaining: Some(0),
            requests_reset: Some(reset),
            ..Default::default()
        };
        let mut watch = a.backend().unwrap().watch_degraded();
        ka.learn(&spent, Instant::now());
        redis.kill().await.unwrap();
        // The outage is found (by the monitor) while the provider's word still holds.
        tokio::time::timeout(reset, watch.wait_for(|d| *d))
            .await
            .unwrap()
            .unwrap();
        assert!(ka.acquire(Instant::now(), 1).await.is_err());
        tokio::time::sleep(reset).await;
        let mut more = Vec::new();
        for _ in 0..5 {
            if let Ok(p) = ka.acquire(Instant::now(), 1).await {
                more.push(p);
            }
        }
        assert!(
            9 + more.len() <= 10,
            "A took {} more with 9 of 10 in the window",
            more.len()
        );
    }

    /// A key idle for a day keeps its epoch while a replica still uses it: the monitor
    /// renews it, so the next request is not taken for a lost budget (a barrier, a warning
    /// and a loss for nothing).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_idle_keys_epoch_is_renewed_while_a_replica_uses_it() {
        let redis = RedisServer::start().await.unwrap();
        let a = shared(&redis);
        let ka = a.key(&id(), rpm(10));
        drop(take(&ka, 1).await);
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let epoch = KeyBudgetKeys::new("pool", "openai", "k0").epoch;
        // As a day without admissions leaves it: a second to live.
        let _: i64 = redis::cmd("PEXPIRE")
            .arg(&epoch)
            .arg(1000)
            .query_async(&mut c)
            .await
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let left: i64 = redis::cmd("PTTL")
                .arg(&epoch)
                .query_async(&mut c)
                .await
                .unwrap();
            if left > 3_600_000 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the epoch was not renewed: {left} ms left"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(a.backend().unwrap().losses(), 0);
    }

    /// After a short pause of Redis that kept the budgets, the local share holds only as
    /// long as the other replicas need to re-write theirs (the barrier's time), not a whole
    /// window: a replica that used its share takes more from Redis soon after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_short_blip_does_not_cost_a_window_on_the_local_share() {
        let redis = RedisServer::start().await.unwrap();
        let a = shared(&redis);
        let ka = a.key(&id(), rpm(10));
        let _held = take(&ka, 5).await;
        let mut watch = a.backend().unwrap().watch_degraded();
        redis.pause().await.unwrap();
        tokio::time::timeout(Duration::from_secs(3), watch.wait_for(|d| *d))
            .await
            .unwrap()
            .unwrap();
        redis.resume().await.unwrap();
        tokio::time::timeout(Duration::from_secs(3), watch.wait_for(|d| !*d))
            .await
            .unwrap()
            .unwrap();
        let back = Instant::now();
        let mut sixth = None;
        while sixth.is_none() && back.elapsed() < WINDOW / 2 {
            sixth = ka.acquire(Instant::now(), 1).await.ok();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            sixth.is_some(),
            "held to the local share for half a window after Redis returned"
        );
    }

    /// Tokens follow the rule requests do in an outage's first window: Redis dies after
    /// replica B reserved 800 of a key's 1,000 tokens and A 100. A's half would be 500, but
    /// what B spent is not known to A: A holds at most its own 100 until the window ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_holds_a_replica_to_the_tokens_it_held() {
        let mut redis = RedisServer::start().await.unwrap();
        let (a, b) = (shared(&redis), shared(&redis));
        let tpm = Limits {
            rpm: None,
            tpm: Some(1000),
        };
        let (ka, kb) = (a.key(&id(), tpm), b.key(&id(), tpm));
        let _b = kb.acquire(Instant::now(), 800).await.unwrap();
        let _a = ka.acquire(Instant::now(), 100).await.unwrap();
        redis.kill().await.unwrap();
        let more = ka.acquire(Instant::now(), 400).await;
        assert!(a.redis_degraded());
        let Err(Unavailable::Until(until)) = more else {
            panic!("A took 400 more tokens with 900 of 1,000 in the window: {more:?}");
        };
        // Until the first window (one window and the grace) has passed.
        assert!(until >= Instant::now() + WINDOW, "{until:?}");
        assert!(
            ka.acquire(Instant::now(), 1).await.is_err(),
            "its 100 are held"
        );
    }

    /// A TCP link from a replica to Redis that the test can cut: while cut it drops every
    /// connection it carries and every new one. The replica behind it finds Redis (and
    /// re-writes its record) only once the link is mended: a re-write as slow as wanted.
    struct Link {
        port: u16,
        open: tokio::sync::watch::Sender<bool>,
    }

    impl Link {
        async fn to(redis: &RedisServer) -> Link {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (open, watch) = tokio::sync::watch::channel(true);
            let target = redis.port();
            tokio::spawn(async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    let mut watch = watch.clone();
                    if !*watch.borrow() {
                        continue;
                    }
                    tokio::spawn(async move {
                        let Ok(mut server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                        else {
                            return;
                        };
                        tokio::select! {
                            _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                            _ = watch.wait_for(|open| !*open) => {}
                        }
                    });
                }
            });
            Link { port, open }
        }

        fn cut(&self) {
            self.open.send_replace(false);
        }

        fn mend(&self) {
            self.open.send_replace(true);
        }
    }

    const SHORT: Duration = Duration::from_secs(1);

    /// Budgets of a 1 s window through `url`: a 200 ms grace for an outage's first window, a
    /// bound of 5 s on the wait for the other replicas' re-writes.
    fn short(url: String) -> Budgets {
        let mut o = SharedOptions::new(SecretString::new(url));
        o.poll = POLL;
        o.timeout = Duration::from_millis(200);
        o.check_interval = Duration::from_millis(100);
        o.reseed_grace = Duration::from_millis(200);
        o.rewrite_bound = Duration::from_secs(5);
        Budgets::shared(SHORT, o, Arc::default()).unwrap()
    }

    async fn marks(redis: &RedisServer) -> std::collections::HashMap<String, u64> {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        redis::cmd("HGETALL")
            .arg(floodgate_crds::redis_keys::BUDGET_REWRITES)
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Waits until each replica has read the other's mark (each marked again after both
    /// marks were there).
    async fn know_each_other(redis: &RedisServer, a: &Budgets, b: &Budgets) {
        let names = [a, b].map(|r| r.backend().unwrap().replica_name());
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut first: Option<Vec<u64>> = None;
        loop {
            let m = marks(redis).await;
            let now: Option<Vec<u64>> = names.iter().map(|n| m.get(n).copied()).collect();
            match (&first, now) {
                (None, Some(now)) => first = Some(now),
                (Some(then), Some(now)) if now.iter().zip(then).all(|(n, t)| n > t) => return,
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "the replicas never marked: {m:?}"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    /// Requests of the key in Redis's window now (in flight, or answered within it).
    async fn live_in_redis(redis: &RedisServer) -> u64 {
        let client = redis::Client::open(redis.url()).unwrap();
        let mut c = client.get_multiplexed_async_connection().await.unwrap();
        let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut c).await.unwrap();
        let now = secs * 1000 + micros / 1000;
        let key = KeyBudgetKeys::new("pool", "openai", "k0").requests;
        redis::cmd("ZCOUNT")
            .arg(key)
            .arg(format!("({}", now - 1000))
            .arg("+inf")
            .query_async(&mut c)
            .await
            .unwrap()
    }

    /// Takes `n` requests of `key` as soon as they are admitted (within 5 s), keeping them
    /// in flight.
    async fn take_when_free(key: &Arc<KeyBudget>, n: usize, permits: &mut Vec<Permit>) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while permits.len() < n {
            match key.acquire(Instant::now(), 1).await {
                Ok(p) => permits.push(p),
                Err(_) => tokio::time::sleep(POLL).await,
            }
            assert!(Instant::now() < deadline, "only {} admitted", permits.len());
        }
    }

    /// Tries to take a request of `key` every 20 ms until `until`; returns those admitted.
    async fn keep_asking(key: &Arc<KeyBudget>, until: Instant, permits: &mut Vec<Permit>) {
        while Instant::now() < until {
            if let Ok(p) = key.acquire(Instant::now(), 1).await {
                permits.push(p);
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn degraded_is(budgets: &Budgets, degraded: bool) {
        let mut watch = budgets.backend().unwrap().watch_degraded();
        tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|d| *d == degraded))
            .await
            .unwrap()
            .unwrap();
    }

    /// Redis paused for both replicas: each serves its share (5 of 10) in flight. Redis
    /// returns with its budgets, but replica B's re-write comes 1.5 s late (its link stays
    /// cut): A must hold its local share until B's re-write is in, not for a fixed grace
    /// (after which A took 5 more from a Redis that lacked B's 5: 15 on a 10 key).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_an_outage_a_replica_waits_for_a_slow_rewrite() {
        let redis = RedisServer::start().await.unwrap();
        let link = Link::to(&redis).await;
        let a = short(redis.url());
        let b = short(format!("redis://127.0.0.1:{}", link.port));
        let (ka, kb) = (a.key(&id(), rpm(10)), b.key(&id(), rpm(10)));
        // Each has admitted on the key (it knows the epoch), and knows the other.
        drop(take(&ka, 1).await);
        drop(take(&kb, 1).await);
        know_each_other(&redis, &a, &b).await;
        redis.pause().await.unwrap();
        link.cut();
        degraded_is(&a, true).await;
        degraded_is(&b, true).await;
        // Past the outage's first window, each serves its share.
        let (mut pa, mut pb) = (Vec::new(), Vec::new());
        take_when_free(&ka, 5, &mut pa).await;
        take_when_free(&kb, 5, &mut pb).await;
        redis.resume().await.unwrap();
        degraded_is(&a, false).await;
        keep_asking(&ka, Instant::now() + Duration::from_millis(1500), &mut pa).await;
        link.mend();
        degraded_is(&b, false).await;
        let deadline = Instant::now() + Duration::from_secs(5);
        while live_in_redis(&redis).await < 10 {
            assert!(Instant::now() < deadline, "B's re-write never came");
            tokio::time::sleep(POLL).await;
        }
        keep_asking(&ka, Instant::now() + Duration::from_millis(500), &mut pa).await;
        assert_eq!(
            pa.len(),
            5,
            "A took more while B's requests were not in Redis"
        );
        assert_eq!(live_in_redis(&redis).await, 10);
    }

    /// Redis restarts empty while replica B is cut off from it; B re-writes 1.5 s later. The
    /// budget's barrier must last until B's re-write is in (then A takes the 2 left), not a
    /// fixed time (after which A took 7 on top of B's unwritten 5).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_loss_the_barrier_waits_for_a_slow_rewrite() {
        let mut redis = RedisServer::start().await.unwrap();
        let link = Link::to(&redis).await;
        let a = short(redis.url());
        let b = short(format!("redis://127.0.0.1:{}", link.port));
        let (ka, kb) = (a.key(&id(), rpm(10)), b.key(&id(), rpm(10)));
        let mut pa = take(&ka, 3).await;
        let _pb = take(&kb, 5).await;
        know_each_other(&redis, &a, &b).await;
        link.cut();
        degraded_is(&b, true).await;
        redis.restart().await.unwrap();
        let cut_until = Instant::now() + Duration::from_millis(1500);
        keep_asking(&ka, cut_until, &mut pa).await;
        assert_eq!(
            pa.len(),
            3,
            "A took more while B's requests were not in Redis"
        );
        link.mend();
        degraded_is(&b, false).await;
        keep_asking(&ka, Instant::now() + Duration::from_millis(1000), &mut pa).await;
        assert_eq!(live_in_redis(&redis).await, 10);
        assert_eq!(
            pa.len(),
            5,
            "A takes the room left once B re-wrote, and no more"
        );
    }

    /// A TCP relay in front of Redis that a failover moves to another server, as a proxy
    /// or a virtual address does: each connection it carries moves to the new server at a
    /// quiet moment (nothing sent either way for 50 ms: no command in flight), so the
    /// replica behind it sees no error, only a server with another `run_id` and the data it
    /// has.
    struct Failover {
        port: u16,
        target: tokio::sync::watch::Sender<u16>,
    }

    impl Failover {
        async fn to(redis: &RedisServer) -> Failover {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = listener.local_addr().unwrap().port();
            let (target, watch) = tokio::sync::watch::channel(redis.port());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    tokio::spawn(relay(client, watch.clone()));
                }
            });
            Failover { port, target }
        }

        fn move_to(&self, redis: &RedisServer) {
            self.target.send_replace(redis.port());
        }
    }

    async fn relay(
        mut client: tokio::net::TcpStream,
        mut target: tokio::sync::watch::Receiver<u16>,
    ) {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        const QUIET: Duration = Duration::from_millis(50);
        let mut port = *target.borrow_and_update();
        let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
            return;
        };
        let (mut up, mut down) = (vec![0u8; 16 * 1024], vec![0u8; 16 * 1024]);
        let mut last = Instant::now();
        loop {
            let moving = *target.borrow() != port;
            tokio::select! {
                n = client.read(&mut up) => {
                    let Ok(n @ 1..) = n else { return };
                    if server.write_all(&up[..n]).await.is_err() {
                        return;
                    }
                    last = Instant::now();
                }
                n = server.read(&mut down) => {
                    let Ok(n @ 1..) = n else { return };
                    if client.write_all(&down[..n]).await.is_err() {
                        return;
                    }
                    last = Instant::now();
                }
                Ok(()) = target.changed() => {}
                () = tokio::time::sleep_until(last + QUIET), if moving => {
                    port = *target.borrow_and_update();
                    let Ok(moved) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
                        return;
                    };
                    server = moved;
                }
            }
        }
    }

    /// A failover to a server that restored an older snapshot (or a replica that had not
    /// caught up) keeps the budgets' epochs but lacks the requests admitted since. No call
    /// fails (the relay moves without an error): the replicas find the server's new `run_id`,
    /// extend the epoch's barrier and re-write their records, and the key stays within its
    /// limit (without it: 5 in Redis, and 5 more admitted on top of the 4 it lacked).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failover_to_an_older_snapshot_is_found_by_its_run_id_and_rewritten() {
        let dir = tempfile::tempdir().unwrap();
        let old = RedisServer::start_in(dir.path()).await.unwrap();
        let link = Failover::to(&old).await;
        let url = format!("redis://127.0.0.1:{}", link.port);
        let (a, b) = (shared_at(url.clone()), shared_at(url));
        let (ka, kb) = (a.key(&id(), rpm(10)), b.key(&id(), rpm(10)));
        let mut held = take(&ka, 3).await;
        held.extend(take(&kb, 2).await);
        old.save().await.unwrap();
        held.extend(take(&ka, 2).await);
        held.extend(take(&kb, 2).await);
        assert_eq!(requests_in_redis(&old).await, 9);
        // Both have checked the server (they know its `run_id`) and each other.
        know_each_other(&old, &a, &b).await;
        let new = RedisServer::start_in(dir.path()).await.unwrap();
        assert_eq!(requests_in_redis(&new).await, 5, "the snapshot's 5");
        link.move_to(&new);
        rewritten(&new, 9).await;
        let (ra, rb) = (a.backend().unwrap(), b.backend().unwrap());
        assert_eq!((ra.losses(), rb.losses()), (1, 1), "found by the run_id");
        assert!(!a.redis_degraded() && !b.redis_degraded());
        // 9 of 10 are held: one more at most, by either replica.
        let mut more = Vec::new();
        keep_asking(&ka, Instant::now() + Duration::from_millis(1500), &mut more).await;
        keep_asking(&kb, Instant::now() + Duration::from_millis(300), &mut more).await;
        assert_eq!(
            more.len(),
            1,
            "the key took {} more with 9 of 10 held",
            more.len()
        );
        assert_eq!(requests_in_redis(&new).await, 10);
        drop(held);
    }

    /// How long a replica with 10,000 keys in use takes to re-write them when Redis comes
    /// back from a pause that kept the budgets: from the resume until it leaves degraded
    /// mode (every key's epoch read, every record re-written, the kept answers written). It
    /// must be well within the bound the other replicas wait (5 s). A measurement:
    /// `cargo test -p floodgate-e2e --test proxy_redis rewrite_of_ten_thousand -- --ignored --nocapture`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "a measurement (10,000 keys), not part of make test"]
    async fn rewrite_of_ten_thousand_keys_after_an_outage() {
        const KEYS: usize = 10_000;
        let redis = RedisServer::start().await.unwrap();
        let a = shared(&redis);
        let mut held = Vec::with_capacity(KEYS);
        let mut budgets = Vec::with_capacity(KEYS);
        for i in 0..KEYS {
            let id = KeyId {
                pool: "pool".into(),
                provider: "openai".into(),
                key: format!("k{i}"),
            };
            let key = a.key(&id, rpm(10));
            held.push(key.acquire(Instant::now(), 1).await.unwrap());
            budgets.push(key);
        }
        degraded_is(&a, false).await;
        redis.pause().await.unwrap();
        degraded_is(&a, true).await;
        redis.resume().await.unwrap();
        let resumed = Instant::now();
        let mut watch = a.backend().unwrap().watch_degraded();
        tokio::time::timeout(Duration::from_secs(30), watch.wait_for(|d| !*d))
            .await
            .unwrap()
            .unwrap();
        let took = resumed.elapsed();
        eprintln!("{KEYS} keys re-written in {took:?} after Redis resumed");
        assert!(took < Duration::from_secs(5), "{took:?}");
        drop(held);
    }

    /// The monitor finds an outage and the return of Redis without any request asking.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_is_seen_without_requests() {
        let mut redis = RedisServer::start().await.unwrap();
        let a = shared(&redis);
        let ka = a.key(&id(), rpm(10));
        drop(take(&ka, 1).await);
        let mut watch = a.backend().unwrap().watch_degraded();
        redis.kill().await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.wait_for(|d| *d))
            .await
            .expect("degraded within 2 s, no request asking")
            .unwrap();
        redis.restart().await.unwrap();
        tokio::time::timeout(Duration::from_secs(2), watch.wait_for(|d| !*d))
            .await
            .expect("back within 2 s, no request asking")
            .unwrap();
        // Its request of before the outage is back in Redis.
        assert_eq!(requests_in_redis(&redis).await, 1);
    }
}

fn manifests(keys: usize, rpm: u32, base: &str) -> String {
    let secrets: String = (0..keys).map(|i| format!("  k{i}: key-{i}\n")).collect();
    let refs: String = (0..keys)
        .map(|i| format!("{{name: k{i}, secretRef: {{name: keys, key: k{i}}}, rpm: {rpm}}}, "))
        .collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n{secrets}---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], keys: [{refs}]}}\n"
    )
}

/// A replica: a gateway whose budgets live in `redis`. Its rate
/// window is exactly the mock's (see proxy_limits.rs for why no margin is needed).
async fn replica(yaml: &str, window: Duration, redis: SharedOptions) -> Gateway {
    let opts = DispatcherOptions::new(window, Duration::from_secs(60)).with_redis(redis);
    Gateway::start_naming_keys(yaml, Dispatcher::with_options(opts).unwrap())
        .await
        .unwrap()
}

/// Sends `n` requests at once, alternating between `gateways`; returns per request the
/// gateway's index, the status and the key used.
async fn burst(gateways: &[&Gateway], n: usize) -> Vec<(usize, u16, String)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    futures::future::join_all((0..n).map(|i| {
        let g = i % gateways.len();
        let url = format!("{}/v1/chat/completions", gateways[g].url());
        let client = client.clone();
        async move {
            let body = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("q{i}")}]});
            let r = client.post(&url).json(&body).send().await.unwrap();
            let key = r
                .headers()
                .get("x-floodgate-key")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned();
            (g, r.status().as_u16(), key)
        }
    }))
    .await
}

/// Every request answered 200, and the mock saw no 429 and no key over its limit.
fn assert_within_limits(mock: &MockProviders, results: &[(usize, u16, String)]) {
    let failed: Vec<_> = results.iter().filter(|r| r.1 != 200).collect();
    assert!(failed.is_empty(), "not 200: {failed:?}");
    let counts = mock.counts();
    let limited: u64 = counts.keys.iter().map(|k| k.rate_limited).sum();
    assert_eq!(limited, 0, "upstream 429s");
    let over: Vec<_> = counts
        .over_limit()
        .map(|k| (k.key.clone(), k.max_in_window))
        .collect();
    assert!(
        over.is_empty(),
        "keys over their limit in some window: {over:?}"
    );
}

/// Two replicas send concurrently over 4 keys of 10 requests per 2 s: each key is used by
/// both, and the provider never sees more than 10 in a window. With per-replica budgets the
/// same traffic puts up to 20 into a window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_every_key_budget() {
    let window = Duration::from_secs(2);
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = manifests(4, 10, &mock.base_url());
    let mut o = options(&redis);
    // This test is about sharing: a slow answer on a loaded machine must not fall back.
    o.timeout = Duration::from_secs(1);
    let a = replica(&yaml, window, o.clone()).await;
    let b = replica(&yaml, window, o).await;
    let results = burst(&[&a, &b], 120).await;
    assert_within_limits(&mock, &results);
    assert_eq!(mock.counts().total(), 120);
    let mut replicas_per_key: BTreeMap<&str, BTreeSet<usize>> = BTreeMap::new();
    for (g, _, key) in &results {
        replicas_per_key.entry(key).or_default().insert(*g);
    }
    assert_eq!(replicas_per_key.len(), 4, "{replicas_per_key:?}");
    assert!(
        replicas_per_key.values().all(|r| r.len() == 2),
        "every key used by both replicas: {replicas_per_key:?}"
    );
    assert!(!a.dispatcher.redis_degraded() && !b.dispatcher.redis_degraded());
}

/// Redis dies mid-run: both replicas keep serving on half of each key (no upstream 429) and
/// say they are degraded; Redis comes back on the same port and both return to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_survive_a_redis_outage_on_local_shares() {
    let window = Duration::from_secs(2);
    let mut redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = manifests(2, 10, &mock.base_url());
    let mut o = options(&redis);
    o.replicas_hint = NonZeroU32::new(2).unwrap();
    let a = replica(&yaml, window, o.clone()).await;
    let b = replica(&yaml, window, o).await;
    let watch = |g: &Gateway| g.dispatcher.budgets().backend().unwrap().watch_degraded();
    let (mut wa, mut wb) = (watch(&a), watch(&b));

    let before = burst(&[&a, &b], 16).await;
    assert_within_limits(&mock, &before);
    assert!(!a.dispatcher.redis_degraded());

    redis.kill().await.unwrap();
    let during = burst(&[&a, &b], 40).await;
    assert_within_limits(&mock, &during);
    assert!(a.dispatcher.redis_degraded() && b.dispatcher.redis_degraded());
    assert_eq!(
        degraded_metric(&a).await,
        1,
        "the degraded state is visible in /metrics"
    );
    for g in 0..2 {
        assert_eq!(during.iter().filter(|r| r.0 == g).count(), 20);
    }

    redis.restart().await.unwrap();
    for w in [&mut wa, &mut wb] {
        tokio::time::timeout(Duration::from_secs(10), w.wait_for(|degraded| !degraded))
            .await
            .expect("back on Redis within 10 s")
            .unwrap();
    }
    let after = burst(&[&a, &b], 30).await;
    assert_within_limits(&mock, &after);
    assert!(!a.dispatcher.redis_degraded() && !b.dispatcher.redis_degraded());
    assert_eq!(mock.counts().total(), 86);
}

/// The other replica's use counts too when Redis dies: replica A used 8 of a key's 10, B 1
/// (so Redis did not tell B the key is full); after the outage B may not take the rest of its
/// half (4 of 5) until A's requests have left the window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_counts_what_the_other_replicas_used() {
    let window = Duration::from_secs(2);
    let mut redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = manifests(1, 10, &mock.base_url());
    let a = replica(&yaml, window, options(&redis)).await;
    let b = replica(&yaml, window, options(&redis)).await;
    assert_within_limits(&mock, &burst(&[&a], 8).await);
    assert_within_limits(&mock, &burst(&[&b], 1).await);
    redis.kill().await.unwrap();
    let during = burst(&[&b], 4).await;
    assert_within_limits(&mock, &during);
    assert!(b.dispatcher.redis_degraded());
    assert_eq!(mock.counts().total(), 13);
}

/// `floodgate_budget_backend_degraded` as scraped from the gateway's `/metrics`.
async fn degraded_metric(g: &Gateway) -> i64 {
    let text = reqwest::get(format!("{}/metrics", g.admin_url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("floodgate_budget_backend_degraded "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1)
}

/// How Redis loses the budgets in [`redis_loses_its_data_mid_run`].
#[derive(Debug, Clone, Copy)]
enum Loss {
    /// Killed, and restarted on the same port with no data half a second later.
    Restart,
    /// `FLUSHALL`: the connection stays up, the data is gone.
    Flush,
}

/// Redis loses every budget while every key is full, before the requests of that window have
/// left it (as after a restart without persistence, a failover to a replica that had not
/// caught up, or a flush). The replicas must neither admit a fresh window on the empty Redis
/// (upstream 429s, keys over their limit) nor sit idle once Redis is back.
async fn redis_loses_its_data_mid_run(loss: Loss) {
    let window = Duration::from_secs(3);
    let (keys, limit) = (3, 10);
    let mut redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(limit)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = manifests(keys, limit, &mock.base_url());
    let mut o = options(&redis);
    o.timeout = Duration::from_millis(250);
    let a = replica(&yaml, window, o.clone()).await;
    let b = replica(&yaml, window, o).await;
    let started = tokio::time::Instant::now();
    // Fill every key over 1.2 s, so that their requests leave the window one by one.
    let gateways = [&a, &b];
    let per = Duration::from_millis(1200) / (keys as u32 * limit);
    let mut paced = Vec::new();
    for i in 0..(keys * limit as usize) {
        tokio::time::sleep_until(started + per * i as u32).await;
        paced.extend(burst(&gateways[i % 2..i % 2 + 1], 1).await);
    }
    assert_within_limits(&mock, &paced);
    // Now more callers than the keys admit: every key stays saturated.
    let load = floodgate_e2e::chaos::Load::start(&[a.url(), b.url()], 12, &["gpt-4o"]);
    tokio::time::sleep_until(started + Duration::from_millis(1500)).await;
    match loss {
        Loss::Restart => {
            redis.kill().await.unwrap();
            tokio::time::sleep_until(started + Duration::from_millis(2000)).await;
            redis.restart().await.unwrap();
        }
        Loss::Flush => {
            let client = redis::Client::open(redis.url()).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
        }
    }
    let back_us = mock.now_us();
    tokio::time::sleep_until(started + 3 * window).await;
    let tally = load.stop().await;
    let counts = mock.counts();
    let report = floodgate_e2e::chaos::Report::of(&counts);
    let lost: Vec<_> = counts
        .keys
        .iter()
        .map(|k| floodgate_e2e::chaos::idle_with_room(k, limit, window, back_us))
        .collect();
    eprintln!(
        "{loss:?}: {report:?}; idle with room after Redis was back: {lost:?}; clients: {:?}",
        tally.statuses
    );
    assert_eq!(report.upstream_429s, 0, "{report:?}");
    assert!(report.over_limit().is_empty(), "{report:?}");
    assert_eq!(tally.not_ok(), 0, "{:?}", tally.failures);
    for gap in lost {
        let gap = gap.expect("the key served again after Redis was back");
        assert!(gap < Duration::from_secs(1), "capacity unused for {gap:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_keeps_every_limit_and_recovers_capacity() {
    redis_loses_its_data_mid_run(Loss::Restart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_flushed_keeps_every_limit_and_recovers_capacity() {
    redis_loses_its_data_mid_run(Loss::Flush).await;
}

/// One key of 10 requests per 2 s shared by two replicas through Redis, a TierQueue where
/// the standard class leaves half of every window to priority, and one tenant per tier.
fn tier_manifests(base: &str) -> String {
    tier_manifests_waiting(base, 10_000, 60_000)
}

/// [`tier_manifests`] with the pro and basic tiers' wait limits.
fn tier_manifests_waiting(base: &str, pro_ms: u64, basic_ms: u64) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{k0: key-0, pro: sk-pro, basic: sk-basic}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], \
         keys: [{{name: k0, secretRef: {{name: keys, key: k0}}, rpm: 10}}]}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n\
         \x20 classHeadroom: {{priority: 0, standard: 50, batch: 50}}\n  tiers:\n\
         \x20 - {{name: pro, class: priority, weight: 10, maxWaitMs: {pro_ms}}}\n\
         \x20 - {{name: basic, class: standard, weight: 5, maxWaitMs: {basic_ms}}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: pro}}\nspec:\n\
         \x20 tier: pro\n  keys: [{{name: main, secretRef: {{name: keys, key: pro}}}}]\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: Tenant\nmetadata: {{name: basic}}\nspec:\n\
         \x20 tier: basic\n  keys: [{{name: main, secretRef: {{name: keys, key: basic}}}}]\n"
    )
}

/// One chat request to `url` with client key `key` (`None`: no key): its status and queue
/// time in milliseconds.
async fn tier_request(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
    i: usize,
) -> (u16, u64) {
    let body =
        json!({"model": "gpt-4o", "messages": [{"role": "user", "content": format!("q{i}")}]});
    let mut request = client.post(url).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.unwrap();
    let queued = r
        .headers()
        .get("x-floodgate-queue-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    (r.status().as_u16(), queued)
}

/// `clients` callers each sending one request after another to `gateway` until `until`;
/// every status and queue time.
async fn closed_loop(
    gateway: &Gateway,
    key: Option<&str>,
    clients: usize,
    until: tokio::time::Instant,
) -> Vec<(u16, u64)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gateway.url());
    let loops = futures::future::join_all((0..clients).map(|c| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let mut results = Vec::new();
            let mut i = 0;
            while tokio::time::Instant::now() < until {
                results.push(tier_request(&client, &url, key, c * 10_000 + i).await);
                i += 1;
            }
            results
        }
    }))
    .await;
    loops.into_iter().flatten().collect()
}

/// Sends `n` requests at once to `gateway` with client key `key`; returns each status and
/// queue time in milliseconds.
async fn tier_burst(gateway: &Gateway, key: &str, n: usize) -> Vec<(u16, u64)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gateway.url());
    let (client, url) = (&client, &url);
    futures::future::join_all((0..n).map(|i| tier_request(client, url, Some(key), i))).await
}

/// Two replicas under saturation: replica b serves the priority tier, replica a a burst of
/// standard work that would take the whole window. The standard class stops at half the
/// window, counted in Redis over both replicas, so the priority tier's next requests are
/// served at once; each replica alone could not know (a never saw b's requests).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priority_class_keeps_its_share_across_replicas() {
    let window = Duration::from_secs(2);
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = tier_manifests(&mock.base_url());
    let mut o = options(&redis);
    o.timeout = Duration::from_secs(1);
    let a = replica(&yaml, window, o.clone()).await;
    let b = replica(&yaml, window, o).await;
    // b: 3 priority requests take 3 of the key's 10.
    let first = tier_burst(&b, "sk-pro", 3).await;
    assert!(first.iter().all(|r| r.0 == 200), "{first:?}");
    // a: 10 standard requests at once. Only 2 fit under the class cap (5, with b's 3).
    let (standard, more_priority) = tokio::join!(tier_burst(&a, "sk-basic", 10), async {
        // ... and b's next priority requests, a moment later, find the 5 the class cap left.
        tokio::time::sleep(Duration::from_millis(300)).await;
        tier_burst(&b, "sk-pro", 5).await
    });
    assert!(
        more_priority
            .iter()
            .all(|&(status, queued)| status == 200 && queued < 500),
        "priority requests waited: {more_priority:?}"
    );
    assert!(standard.iter().all(|r| r.0 == 200), "{standard:?}");
    let waited = standard.iter().filter(|r| r.1 >= 1000).count();
    assert!(
        waited >= 8,
        "standard work beyond the cap waited for the window: {standard:?}"
    );
    assert_within_limits_statuses(&mock);
}

/// Two replicas under sustained saturation: replica a keeps a key busy with standard work
/// whose wait limit is 2 s for four windows, replica b sends a priority request every 300 ms
/// (two thirds of the key's rate). Past half its wait the standard class keeps half its
/// reserve (25% of the window: at most 8 of 10, counted in Redis over both replicas), so b's
/// requests always find a slot within their 1 s limit. When the reserve switched itself off
/// after half the wait, a's backlog took the slots as fast as they freed and the priority
/// requests waited past their limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_priority_class_keeps_its_share_under_sustained_load_across_replicas() {
    let window = Duration::from_secs(2);
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = tier_manifests_waiting(&mock.base_url(), 1_000, 2_000);
    let mut o = options(&redis);
    o.timeout = Duration::from_secs(1);
    let a = replica(&yaml, window, o.clone()).await;
    let b = replica(&yaml, window, o).await;
    let start = tokio::time::Instant::now();
    let end = start + 5 * window;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", b.url());
    let (standard, priority) = tokio::join!(closed_loop(&a, Some("sk-basic"), 8, end), async {
        // From the second window on, once the standard backlog is there.
        let (client, url) = (&client, &url);
        futures::future::join_all((0..20).map(|i| async move {
            tokio::time::sleep_until(start + window + Duration::from_millis(300) * i).await;
            tier_request(client, url, Some("sk-pro"), i as usize).await
        }))
        .await
    });
    eprintln!("priority (status, queue ms): {priority:?}");
    let late: Vec<_> = priority
        .iter()
        .filter(|&&(status, queued)| status != 200 || queued >= 1_000)
        .collect();
    assert!(
        late.is_empty(),
        "priority requests over their 1 s: {late:?} of {priority:?}"
    );
    let served = standard.iter().filter(|r| r.0 == 200).count();
    assert!(
        served >= 5,
        "the standard class still got slots: {standard:?}"
    );
    assert_within_limits_statuses(&mock);
}

/// Two replicas pace a key together: one key of 10 requests per 2 s (a slot every 200 ms),
/// both replicas with a backlog of requests that waited. Paced through Redis, the two
/// together admit one every 200 ms, so the window's slots come back as a steady supply and
/// no stretch with nothing admitted lasts more than two slots. Paced per replica, each took
/// the key's rate, the window filled in half of it and then nothing was admitted for about
/// five slots, every window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_pace_a_key_together() {
    let window = Duration::from_secs(2);
    let slot = window / 10;
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(
        MockConfig::default()
            .with_default_rpm(10)
            .with_window(window),
    )
    .await
    .unwrap();
    let yaml = manifests(1, 10, &mock.base_url());
    let mut o = options(&redis);
    o.timeout = Duration::from_secs(1);
    let a = replica(&yaml, window, o.clone()).await;
    let b = replica(&yaml, window, o).await;
    let start_us = mock.now_us();
    let end = tokio::time::Instant::now() + 5 * window;
    let (on_a, on_b) = tokio::join!(closed_loop(&a, None, 6, end), closed_loop(&b, None, 6, end));
    let failed: Vec<_> = on_a.iter().chain(&on_b).filter(|r| r.0 != 200).collect();
    assert!(failed.is_empty(), "not 200: {failed:?}");
    assert_within_limits_statuses(&mock);
    // From a window and a half on (the first window went at once, unpaced, and its slots
    // all came back at 2 s), until the load stopped.
    let counts = mock.counts();
    let from = start_us + (window + window / 2).as_micros() as u64;
    let to = start_us + (5 * window - slot).as_micros() as u64;
    let mut times: Vec<u64> = counts.keys[0]
        .timestamps_us
        .iter()
        .copied()
        .filter(|&t| t >= from && t <= to)
        .collect();
    times.sort_unstable();
    let longest = times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(u64::MAX);
    eprintln!(
        "longest stretch with nothing admitted: {:?} ({} admitted)",
        Duration::from_micros(longest),
        times.len()
    );
    assert!(
        times.len() >= 15 && Duration::from_micros(longest) <= 2 * slot + slot / 2,
        "longest stretch with nothing admitted {:?} ({} admitted): {times:?}",
        Duration::from_micros(longest),
        times.len()
    );
}

/// A tenant without an rpm limit has no window in Redis: each request it is admitted is
/// counted per minute in its use hash instead, which the operator reads for its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_without_limits_is_counted_for_its_status() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let mut o = options(&redis);
    o.timeout = Duration::from_secs(1);
    let g = replica(
        &tier_manifests(&mock.base_url()),
        Duration::from_secs(60),
        o,
    )
    .await;
    let sent = tier_burst(&g, "sk-pro", 3).await;
    assert!(sent.iter().all(|r| r.0 == 200), "{sent:?}");
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // Written in the background, off the requests' path.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let (counted, last) = loop {
        let hash: BTreeMap<String, String> = redis::cmd("HGETALL")
            .arg(tenant_use_key("pro"))
            .query_async(&mut conn)
            .await
            .unwrap();
        let counted: u64 = hash
            .iter()
            .filter(|(k, _)| *k != "last")
            .map(|(_, v)| v.parse::<u64>().unwrap())
            .sum();
        if counted >= 3 || tokio::time::Instant::now() > deadline {
            break (counted, hash.get("last").cloned());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(counted, 3);
    assert!(last.is_some_and(|ms| ms.parse::<u64>().is_ok()));
}

/// The mock saw no 429 and no key over its limit.
fn assert_within_limits_statuses(mock: &MockProviders) {
    let counts = mock.counts();
    let limited: u64 = counts.keys.iter().map(|k| k.rate_limited).sum();
    assert_eq!(limited, 0, "upstream 429s");
    assert_eq!(counts.over_limit().count(), 0, "a key over its limit");
}

/// A Redis user without `INFO` (an ACL that grants the scripts and keys only) is not an
/// outage: the monitor keeps checking the epochs and never calls the budgets degraded.
#[tokio::test]
async fn a_redis_user_without_info_is_not_taken_for_an_outage() {
    let redis = RedisServer::start().await.unwrap();
    let admin = redis::Client::open(redis.url()).unwrap();
    let mut conn = admin.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "gw",
            "on",
            ">gw-secret",
            "~*",
            "&*",
            "+@all",
            "-info",
        ])
        .query_async(&mut conn)
        .await
        .unwrap();
    let url = redis.url().replacen("redis://", "redis://gw:gw-secret@", 1);
    let mut o = SharedOptions::new(SecretString::new(url));
    o.timeout = Duration::from_secs(1);
    o.check_interval = Duration::from_millis(50);
    let budgets = Arc::new(RedisBudgets::new(o, Duration::from_secs(10)).unwrap());
    let admitted = budgets.acquire(&keys(), rpm(10), 1, "m0").await.unwrap();
    assert!(
        matches!(admitted, Admission::Admitted { .. }),
        "{admitted:?}"
    );
    let mut degraded = budgets.watch_degraded();
    // Twenty checks' worth of time: any check that took the refusal for an outage would
    // flip the budgets to degraded.
    let flipped = tokio::time::timeout(Duration::from_secs(1), degraded.changed()).await;
    assert!(flipped.is_err(), "degraded: {}", *degraded.borrow());
    assert!(!budgets.degraded());
}
