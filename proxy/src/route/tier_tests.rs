//! Tiers over real key budgets on a paused clock: dispatch order under saturation, the
//! class headroom, off-peak deferral of batch work, and a refusal past the wait limit whose
//! `retry-after` is honest.

use super::attempt::{Asker, Attempts, Demand};
use super::tests::{dispatcher, request, until};
use super::*;
use crate::config::load::load_config;
use crate::config::secrets::SecretSources;
use std::sync::Mutex;

const MIN: Duration = Duration::from_secs(60);

/// One OpenAI key of `rpm` serving model `m`, and a TierQueue with `tiers` (YAML flow
/// sequence items) and `headroom` (priority, standard, batch percent).
fn config(rpm: u32, tiers: &[&str], headroom: (u32, u32, u32)) -> Arc<Config> {
    config_keys(1, rpm, tiers, headroom)
}

/// [`config`] with `n` keys of `rpm` each.
fn config_keys(n: usize, rpm: u32, tiers: &[&str], headroom: (u32, u32, u32)) -> Arc<Config> {
    let secrets: Vec<String> = (0..n).map(|i| format!("k{i}: sk-{i}")).collect();
    let secrets = secrets.join(", ");
    let keys: Vec<String> = (0..n)
        .map(|i| format!("{{secretRef: {{name: keys, key: k{i}}}, rpm: {rpm}}}"))
        .collect();
    let keys = keys.join(", ");
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{{secrets}}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{{name: m}}], \
         keys: [{keys}]}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {{name: tiers}}\nspec:\n\
         \x20 classHeadroom: {{priority: {}, standard: {}, batch: {}}}\n  tiers:\n{}",
        headroom.0,
        headroom.1,
        headroom.2,
        tiers
            .iter()
            .map(|t| format!("  - {t}\n"))
            .collect::<String>()
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let (config, _) = load_config(&[dir.path().to_owned()], SecretSources::default()).unwrap();
    Arc::new(config)
}

fn asker(view: &View, tier: &str) -> Asker {
    Asker {
        tier: view.runtime.tiers.get(Some(tier)).clone(),
        tenant: Arc::from("t"),
        progress: None,
        affinity: None,
        report: None,
        answer_by: None,
    }
}

/// Waits for a key for a request of `tier` until `deadline`; the lease is answered at once.
async fn take(d: &Dispatcher, tier: &str, deadline: Instant) -> Result<u32, RouteError> {
    take_as(d, tier, "t", deadline).await
}

/// [`take`] for a request of `tenant`: the looks it took.
async fn take_as(
    d: &Dispatcher,
    tier: &str,
    tenant: &str,
    deadline: Instant,
) -> Result<u32, RouteError> {
    let view = d.view();
    let route = &view.runtime.routes["m"];
    let mut asker = asker(&view, tier);
    asker.tenant = Arc::from(tenant);
    let mut attempts = Attempts::new(
        d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        deadline,
        asker,
    );
    let mut lease = attempts.next().await?;
    lease.permit.answered();
    Ok(attempts.looks())
}

#[tokio::test(start_paused = true)]
async fn under_saturation_tiers_are_served_by_weight() {
    let tiers = [
        "{name: enterprise, class: priority, weight: 10, maxWaitMs: 900000}",
        "{name: basic, class: standard, weight: 5, maxWaitMs: 900000}",
        // No off-peak deferral here: the trickle of a batch tier under sustained load.
        "{name: free, class: batch, weight: 1, maxWaitMs: 900000, \
         batch: {size: 1, intervalSeconds: 1, offPeakUtilizationPercent: 100}}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(32, &tiers, (0, 0, 0)),
    );
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(900);
    // The key's 32 slots are taken one a second, so they free one a second from 60 s on.
    for _ in 0..32 {
        take(&d, "enterprise", deadline).await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..20 {
        for tier in ["free", "basic", "enterprise"] {
            let (dd, order) = (d.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                take(&dd, tier, deadline).await.unwrap();
                order.lock().unwrap().push(tier);
            }));
            let view = d.view();
            let joined = tasks.len();
            until(|| view.runtime.routes["m"].queue.len() == joined).await;
        }
    }
    // Slots free one a second from 60 s on (paced for the classes below priority): the
    // first 16 dispatches.
    while order.lock().unwrap().len() < 16 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let order: Vec<&str> = order.lock().unwrap()[..16].to_vec();
    let n = |t| order.iter().filter(|&&o| o == t).count();
    assert!(n("enterprise").abs_diff(10) <= 1, "{order:?}");
    assert!(n("basic").abs_diff(5) <= 1, "{order:?}");
    assert!(n("free") >= 1, "batch gets its trickle: {order:?}");
    for t in tasks {
        t.abort();
    }
}

/// Spawns a request of `tier` and returns when it was admitted.
fn spawn(
    d: &Arc<Dispatcher>,
    tier: &'static str,
    deadline: Instant,
) -> tokio::task::JoinHandle<Result<Instant, RouteError>> {
    let d = d.clone();
    tokio::spawn(async move {
        take(&d, tier, deadline).await?;
        Ok(Instant::now())
    })
}

#[tokio::test(start_paused = true)]
async fn batch_work_waits_off_peak_but_not_past_half_its_limit() {
    for (max_wait_s, admitted_at) in [(200u64, 60u64), (100, 50)] {
        let tiers = [
            "{name: basic, class: standard, maxWaitMs: 30000}".to_owned(),
            format!(
                "{{name: free, class: batch, maxWaitMs: {}, batch: {{size: 1, intervalSeconds: 1}}}}",
                max_wait_s * 1000
            ),
        ];
        let tiers: Vec<&str> = tiers.iter().map(String::as_str).collect();
        let d = dispatcher(
            DispatcherOptions::new(MIN, Duration::from_secs(30)),
            config(10, &tiers, (0, 0, 0)),
        );
        let t0 = Instant::now();
        for _ in 0..9 {
            take(&d, "basic", t0 + MIN).await.unwrap();
        }
        // 90% used, over the 80% off-peak threshold: the batch request waits though a slot
        // is free...
        let free = spawn(&d, "free", t0 + Duration::from_secs(max_wait_s));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!free.is_finished());
        if admitted_at == 60 {
            // ... and interactive work takes that slot at once.
            let t1 = Instant::now();
            take(&d, "basic", t1 + Duration::from_secs(1))
                .await
                .unwrap();
            assert_eq!(Instant::now(), t1);
        }
        let at = free.await.unwrap().unwrap();
        // Admitted when the window frees (60 s), or when half its limit is spent (50 s):
        // within one recheck (6 s at 10 rpm) of it, never before.
        let at = at - t0;
        assert!(
            at >= Duration::from_secs(admitted_at) && at <= Duration::from_secs(admitted_at + 6),
            "limit {max_wait_s} s: admitted at {at:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_class_takes_only_what_leaves_its_headroom() {
    let tiers = [
        "{name: pro, class: priority, maxWaitMs: 1000}",
        "{name: basic, class: standard, maxWaitMs: 120000}",
    ];
    // Standard needs 20% of the key's window free.
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(10, &tiers, (0, 20, 50)),
    );
    let t0 = Instant::now();
    for _ in 0..7 {
        take(&d, "basic", t0 + MIN).await.unwrap();
    }
    // 30% free: basic may take one more, then not.
    let basic = spawn(&d, "basic", t0 + Duration::from_secs(120));
    assert_eq!(basic.await.unwrap().unwrap(), t0);
    let basic = spawn(&d, "basic", t0 + Duration::from_secs(120));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!basic.is_finished(), "10% free is pro's headroom");
    // pro takes the last two slots at once, past the waiting basic request.
    let t1 = Instant::now();
    for _ in 0..2 {
        take(&d, "pro", t1 + Duration::from_secs(1)).await.unwrap();
    }
    assert_eq!(Instant::now(), t1);
    // basic gets its slot when the window frees, and looked a bounded number of times.
    let at = basic.await.unwrap().unwrap() - t0;
    assert!(at >= MIN && at <= MIN + Duration::from_secs(6), "{at:?}");
}

#[tokio::test(start_paused = true)]
async fn past_its_wait_limit_a_request_is_refused_with_a_retry_after_that_holds() {
    let tiers = ["{name: pro, class: priority, maxWaitMs: 2000}"];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(1, &tiers, (0, 0, 0)),
    );
    let t0 = Instant::now();
    take(&d, "pro", t0 + Duration::from_secs(2)).await.unwrap();
    tokio::time::advance(Duration::from_millis(1500)).await;
    let retry_after = match take(&d, "pro", Instant::now() + Duration::from_secs(2)).await {
        Err(RouteError::Saturated { retry_after }) => retry_after,
        other => panic!("expected 429, got {other:?}"),
    };
    assert_eq!(retry_after, MIN - Duration::from_millis(1500));
    tokio::time::advance(retry_after - Duration::from_millis(1)).await;
    assert!(
        take(&d, "pro", Instant::now()).await.is_err(),
        "a moment earlier is too early"
    );
    tokio::time::advance(Duration::from_millis(1)).await;
    take(&d, "pro", Instant::now() + Duration::from_secs(2))
        .await
        .expect("a retry at retry-after is admitted");
}

#[tokio::test(start_paused = true)]
async fn past_half_its_wait_a_class_keeps_half_its_reserve() {
    let tiers = [
        "{name: pro, class: priority, maxWaitMs: 1000}",
        "{name: basic, class: standard, maxWaitMs: 10000}",
    ];
    // Standard keeps 20% for priority; past half its wait, half of that (the smallest
    // headroom of any class is standard's own).
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(10, &tiers, (0, 20, 50)),
    );
    let t0 = Instant::now();
    for _ in 0..8 {
        take(&d, "pro", t0 + MIN).await.unwrap();
    }
    // 20% free is basic's whole headroom: held; after 5 s it needs only 10% free and takes
    // a slot (within one recheck, 6 s at 10 rpm).
    let at = spawn(&d, "basic", t0 + Duration::from_secs(10))
        .await
        .unwrap()
        .unwrap()
        - t0;
    assert!(
        at >= Duration::from_secs(5) && at <= Duration::from_secs(6),
        "{at:?}"
    );
    // 10% free is the relaxed reserve itself: basic is held for its whole wait and refused
    // (it used to take it once half its wait was spent), and pro still finds it at once.
    let t1 = Instant::now();
    let basic = spawn(&d, "basic", t1 + Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        matches!(basic, Err(RouteError::Saturated { .. })),
        "{basic:?}"
    );
    assert_eq!(Instant::now() - t1, Duration::from_secs(10));
    let t2 = Instant::now();
    take(&d, "pro", t2 + Duration::from_secs(1)).await.unwrap();
    assert_eq!(Instant::now(), t2);
}

#[tokio::test(start_paused = true)]
async fn a_request_behind_its_class_is_told_its_turn_in_deadline_order() {
    // Enterprise (1 s) and pro (2 s) share the priority class at equal weights; inside it
    // the request due first goes first, so enterprise takes the class's slots before pro.
    let tiers = [
        "{name: enterprise, class: priority, weight: 10, maxWaitMs: 1000}",
        "{name: pro, class: priority, weight: 10, maxWaitMs: 2000}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(600, &tiers, (0, 0, 0)),
    );
    // The key's 600 slots taken one per 100 ms: from 60 s on they free one per 100 ms.
    let t0 = Instant::now();
    for i in 0..600 {
        if i > 0 {
            tokio::time::advance(Duration::from_millis(100)).await;
        }
        take(&d, "pro", t0 + MIN).await.unwrap();
    }
    let view = d.view();
    let queue = &view.runtime.routes["m"].queue;
    let now = Instant::now();
    let mut waiting = Vec::new();
    for tier in ["pro"; 5].into_iter().chain(["enterprise"; 5]) {
        let max_wait = view.runtime.tiers.get(Some(tier)).max_wait;
        waiting.push(spawn(&d, tier, now + max_wait));
        let joined = waiting.len();
        until(|| queue.len() == joined).await;
    }
    // Five enterprise requests ahead, one slot each at the whole class's rate: its turn
    // comes 0.6 s on (the first slot 0.1 s away). Counted at enterprise's half of the slots
    // it was 1.1 s, past its 1 s limit, and it was refused at once.
    let joined = Instant::now();
    let at = spawn(&d, "enterprise", joined + Duration::from_secs(1))
        .await
        .unwrap()
        .expect("admitted, not refused early");
    assert!(at - joined <= Duration::from_secs(1), "{:?}", at - joined);
    for w in waiting {
        assert!(w.await.unwrap().is_ok());
    }
}

#[tokio::test(start_paused = true)]
async fn a_retry_at_the_retry_after_of_a_refusal_in_line_is_admitted() {
    // Priority tiers of unequal weights: enterprise's requests are due first (300 s), pro's
    // later (900 s). One key of 2 rpm.
    let tiers = [
        "{name: enterprise, class: priority, weight: 1, maxWaitMs: 300000}",
        "{name: pro, class: priority, weight: 10, maxWaitMs: 900000}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(2, &tiers, (0, 0, 0)),
    );
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    // Its 2 slots taken at 0 s: they free at 60 s, then (taken again) at 120 s.
    take(&d, "pro", t0 + MIN).await.unwrap();
    take(&d, "pro", t0 + MIN).await.unwrap();
    let view = d.view();
    let queue = &view.runtime.routes["m"].queue;
    // P (pro) waits until 95 s; then E1..E4 (enterprise), due before it.
    let mut tasks = vec![spawn_as(&d, "pro", "p", t0 + s * 95)];
    until(|| queue.len() == 1).await;
    for _ in 0..4 {
        tasks.push(spawn_as(&d, "enterprise", "e", t0 + s * 300));
        let joined = tasks.len();
        until(|| queue.len() == joined).await;
    }
    // E1 and E2 take the slots at 60 s; P is refused at 95 s. E3 and E4 go before any
    // newcomer of pro: its retry comes when they are through (120 s) and one slot of 2 rpm
    // each has passed, 180 s. (Counted from P's own place, with enterprise's tag past pro's,
    // it was 120 s, when E3 and E4 take the slots, and the retry waited again.)
    let (at, result) = tasks.remove(0).await.unwrap();
    assert_eq!(at - t0, s * 95);
    let Err(RouteError::Saturated { retry_after }) = result else {
        panic!("expected 429 at the deadline, got {result:?}");
    };
    assert_eq!(retry_after, s * 85);
    // (Sleeping, not advancing: the clock stops at 120 s for E3 and E4 on the way.)
    tokio::time::sleep(retry_after - Duration::from_millis(1)).await;
    assert!(
        take_as(&d, "pro", "p", Instant::now()).await.is_err(),
        "a moment earlier no slot is free"
    );
    tokio::time::sleep(Duration::from_millis(1)).await;
    take_as(&d, "pro", "p", Instant::now())
        .await
        .expect("a retry at retry-after is admitted at once");
    for t in tasks {
        assert!(t.await.unwrap().1.is_ok());
    }
}

#[test]
fn a_tier_that_changes_class_on_reload_gets_a_state_of_its_new_class() {
    let states = super::tiers::TierStates::default();
    let plan = |class: &str| {
        let tier = format!("{{name: pro, class: {class}, maxWaitMs: 1000}}");
        super::tiers::TierPlan::build(&config(1, &[tier.as_str()], (0, 0, 0)), MIN, &states)
    };
    let (priority, standard, again) = (plan("priority"), plan("standard"), plan("priority"));
    let state = |p: &super::tiers::TierPlan| p.get(Some("pro")).state.clone();
    // A new class is a new state (its metrics carry the class); the same class keeps its own.
    assert!(!Arc::ptr_eq(&state(&priority), &state(&standard)));
    assert!(Arc::ptr_eq(&state(&priority), &state(&again)));
}

/// The bench's tier scenario on a paused clock: 10% enterprise, 20% pro, 30% basic and 40%
/// free at twice the key's capacity for three minutes (`--nocapture` prints the figures).
/// The interactive priority tiers keep their wait targets with no refusal; the others are
/// answered within their limits or refused, and every request ends one way or the other.
/// Without pacing, the window's slots come back in the burst they were taken in, and
/// enterprise sees half-minute stretches with nothing free (a third of it refused).
#[tokio::test(start_paused = true)]
async fn under_twice_the_capacity_the_priority_tiers_keep_their_targets() {
    twice_the_capacity(1, 600).await;
}

/// The same over the tier bench's pool, four keys of 150: each key paced at one per 0.4 s.
/// With a second of pacing tolerance the window filled a second early, and the stretch with
/// nothing free came back at the end of every window (in the bench, one enterprise request a
/// window, sent at 59 s, 119 s and 179 s, found the next slot just over its 1 s away and was
/// refused; here, on a paused clock, enterprise's p99 was 400 ms and its longest wait 850 ms).
#[tokio::test(start_paused = true)]
async fn under_twice_the_capacity_of_four_keys_the_priority_tiers_keep_their_targets() {
    twice_the_capacity(4, 150).await;
}

/// 20 requests a second for 180 s to `keys` keys of `rpm` (600 RPM together): enterprise and
/// pro answered within their limits, none refused; basic and free within theirs or refused.
async fn twice_the_capacity(keys: usize, rpm: u32) {
    let tiers = [
        "{name: enterprise, class: priority, weight: 10, maxWaitMs: 1000}",
        "{name: pro, class: priority, weight: 10, maxWaitMs: 2000}",
        "{name: basic, class: standard, weight: 5, maxWaitMs: 5000}",
        "{name: free, class: batch, weight: 1, maxWaitMs: 60000, batch: {size: 10, intervalSeconds: 5}}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config_keys(keys, rpm, &tiers, (0, 20, 50)),
    );
    let t0 = Instant::now();
    // Per request: its tier, and its wait if it was admitted.
    type Ended = Vec<(&'static str, Option<Duration>)>;
    let results: Arc<Mutex<Ended>> = Arc::default();
    let mut tasks = Vec::new();
    // 20 requests a second, in a repeating pattern of 10: 1 enterprise, 2 pro, 3 basic, 4 free.
    let pattern = [
        "free",
        "basic",
        "pro",
        "free",
        "enterprise",
        "basic",
        "free",
        "pro",
        "basic",
        "free",
    ];
    for i in 0..(180 * 20) {
        let tier = pattern[i % 10];
        tokio::time::sleep_until(t0 + Duration::from_millis(50 * i as u64)).await;
        let (dd, results) = (d.clone(), results.clone());
        tasks.push(tokio::spawn(async move {
            let view = dd.view();
            let max_wait = view.runtime.tiers.get(Some(tier)).max_wait;
            let start = Instant::now();
            let waited = take(&dd, tier, start + max_wait)
                .await
                .ok()
                .map(|_| start.elapsed());
            results.lock().unwrap().push((tier, waited));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let results = results.lock().unwrap();
    for tier in ["enterprise", "pro", "basic", "free"] {
        let mut waits: Vec<Duration> = results
            .iter()
            .filter(|(t, _)| *t == tier)
            .filter_map(|(_, w)| *w)
            .collect();
        waits.sort();
        let refused = results
            .iter()
            .filter(|(t, w)| *t == tier && w.is_none())
            .count();
        let p = |q: f64| {
            waits
                .get(((waits.len() as f64 * q) as usize).min(waits.len().saturating_sub(1)))
                .copied()
        };
        eprintln!(
            "{tier:<10} answered {:>5} refused {:>5} p50 {:?} p99 {:?}",
            waits.len(),
            refused,
            p(0.5),
            p(0.99)
        );
        let (limit, may_refuse) = match tier {
            "enterprise" => (Duration::from_secs(1), false),
            "pro" => (Duration::from_secs(2), false),
            "basic" => (Duration::from_secs(5), true),
            _ => (MIN, true),
        };
        let p99 = p(0.99).unwrap();
        assert!(
            p99 < limit || (may_refuse && p99 <= limit),
            "{tier}: p99 {p99:?}"
        );
        assert!(may_refuse || refused == 0, "{tier}: {refused} refused");
        // No stretch with nothing free recurs at the end of each window: the priority tiers'
        // p99 stays well inside their limits (50 and 100 ms here; it was 400 ms and 1-1.15 s
        // with a second of pacing tolerance, a second that came back every window).
        assert!(may_refuse || p99 < limit / 4, "{tier}: p99 {p99:?}");
        assert!(waits.len() > 100, "{tier}: answered {}", waits.len());
    }
    assert_eq!(results.len(), 180 * 20, "every request ended");
}

#[tokio::test(start_paused = true)]
async fn asking_for_a_shorter_wait_does_not_skip_the_class_headroom() {
    let tiers = [
        "{name: pro, class: priority, maxWaitMs: 1000}",
        "{name: basic, class: standard, maxWaitMs: 5000}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(10, &tiers, (0, 20, 50)),
    );
    let t0 = Instant::now();
    for _ in 0..9 {
        take(&d, "pro", t0 + MIN).await.unwrap();
    }
    // Half of basic's 5 s limit is 2.5 s: a caller asking for 2.5 s is held all of it and
    // refused, never let into pro's headroom at once.
    let result = take(&d, "basic", t0 + Duration::from_millis(2500)).await;
    assert!(
        matches!(result, Err(RouteError::Saturated { .. })),
        "{result:?}"
    );
}

/// [`take`] for `tenant`, spawned; returns when it was admitted or refused.
fn spawn_as(
    d: &Arc<Dispatcher>,
    tier: &'static str,
    tenant: &'static str,
    deadline: Instant,
) -> tokio::task::JoinHandle<(Instant, Result<(), RouteError>)> {
    let d = d.clone();
    tokio::spawn(async move {
        let result = take_as(&d, tier, tenant, deadline).await.map(drop);
        (Instant::now(), result)
    })
}

#[tokio::test(start_paused = true)]
async fn refused_at_its_deadline_a_waiting_request_retries_after_those_ahead_of_it() {
    // Two tiers of the priority class (not paced), weights 10 and 1.
    let tiers = [
        "{name: enterprise, class: priority, weight: 10, maxWaitMs: 900000}",
        "{name: pro, class: priority, weight: 1, maxWaitMs: 900000}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(2, &tiers, (0, 0, 0)),
    );
    let t0 = Instant::now();
    let s = Duration::from_secs(1);
    // The key's 2 slots are taken at 0 s: they free at 60 s.
    take(&d, "enterprise", t0 + MIN).await.unwrap();
    take(&d, "enterprise", t0 + MIN).await.unwrap();
    let view = d.view();
    let queue = &view.runtime.routes["m"].queue;
    // pro: P1 and P2 of tenant x due at 95 s, P3 of tenant y at 200 s; then enterprise E1, E2.
    let mut tasks = Vec::new();
    for (tier, tenant, due) in [
        ("pro", "x", 95),
        ("pro", "x", 95),
        ("pro", "y", 200),
        ("enterprise", "e", 900),
        ("enterprise", "e", 900),
    ] {
        tasks.push(spawn_as(&d, tier, tenant, t0 + s * due));
        let joined = tasks.len();
        until(|| queue.len() == joined).await;
    }
    let mut tasks = tasks.into_iter();
    let (p1, p2) = (tasks.next().unwrap(), tasks.next().unwrap());
    // At 60 s E1 (the heavier tier on a tie) and P1 (pro's earliest deadline) take the two
    // slots; then E2 heads the queue until 120 s.
    let (at, result) = p1.await.unwrap();
    assert_eq!((at - t0, result.is_ok()), (MIN, true));
    let (at, result) = p2.await.unwrap();
    assert_eq!(at - t0, s * 95);
    let Err(RouteError::Saturated { retry_after }) = result else {
        panic!("expected 429 at the deadline, got {result:?}");
    };
    // Ahead of P2: E2 (enterprise) and P3 (pro, another tenant). The earliest slot frees at
    // 120 s (25 s on), and each of the two ahead takes one slot of 2 rpm (30 s each).
    assert_eq!(retry_after, s * 85);
    for t in tasks {
        t.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_held_by_pacing_waits_for_its_pace_without_standing_back() {
    // basic: the standard class, 20% headroom; one key of 10 rpm, paced at one per 6 s with
    // a second's tolerance.
    let tiers = [
        "{name: pro, class: priority, maxWaitMs: 1000}",
        "{name: basic, class: standard, maxWaitMs: 900000}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(10, &tiers, (0, 20, 50)),
    );
    let t0 = Instant::now();
    for _ in 0..10 {
        take(&d, "pro", t0 + MIN).await.unwrap();
    }
    let view = d.view();
    let queue = &view.runtime.routes["m"].queue;
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let d = d.clone();
        waiting.push(tokio::spawn(async move {
            let looks = take(&d, "basic", t0 + Duration::from_secs(900))
                .await
                .unwrap();
            (Instant::now() - t0, looks)
        }));
        let joined = waiting.len();
        until(|| queue.len() == joined).await;
    }
    // At 60 s the ten slots free at once: the first is admitted; the second finds 90% of the
    // key free (above its headroom) but is paced until 65 s. It waits for that instant as
    // the head, rather than holding its tier back and looking again every second.
    let (first, second) = (waiting.remove(0), waiting.remove(0));
    assert_eq!(first.await.unwrap().0, MIN);
    let (at, looks) = second.await.unwrap();
    assert_eq!(at, MIN + Duration::from_secs(5));
    assert!(looks <= 3, "looked {looks} times");
}

#[tokio::test(start_paused = true)]
async fn the_queue_figures_name_the_tier_queue_and_what_each_tier_has_waiting() {
    let tiers = [
        "{name: pro, class: priority, maxWaitMs: 120000}",
        "{name: free, class: standard, maxWaitMs: 120000}",
    ];
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(1, &tiers, (0, 0, 0)),
    );
    let figures = |d: &Dispatcher| {
        let q = d.queue_figures().unwrap();
        let tiers: Vec<_> = q
            .tiers
            .iter()
            .map(|t| (t.name.clone(), t.waiting, t.oldest_wait_ms))
            .collect();
        (q.name, tiers)
    };
    let t0 = Instant::now();
    take(&d, "pro", t0 + Duration::from_secs(30)).await.unwrap();
    // The key's one request a minute is spent: the next pro request waits (its deadline is
    // past the minute, so it is not refused at once).
    let waiting = spawn(&d, "pro", Instant::now() + Duration::from_secs(120));
    until(|| d.queue_figures().unwrap().tiers[0].waiting == 1).await;
    tokio::time::advance(Duration::from_millis(2500)).await;
    assert_eq!(
        figures(&d),
        (
            "tiers".to_owned(),
            vec![("pro".to_owned(), 1, 2500), ("free".to_owned(), 0, 0)]
        )
    );
    waiting.abort();
    until(|| d.queue_figures().unwrap().tiers[0].waiting == 0).await;
    assert_eq!(figures(&d).1[0], ("pro".to_owned(), 0, 0));
}

#[tokio::test(start_paused = true)]
async fn batch_work_on_a_route_without_a_request_limit_is_not_held_for_its_batch() {
    // A local model (Ollama, no key, no RPM): its concurrency gate is the limit, and a batch
    // request held for its batch would hold one of its slots idle.
    let yaml = "apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: local}\nspec:\n\
                \x20 providers:\n\
                \x20 - {name: llama, type: ollama, baseUrl: \"http://127.0.0.1:9\", models: [{name: m}]}\n---\n\
                apiVersion: floodgate.dev/v1alpha1\nkind: TierQueue\nmetadata: {name: tiers}\nspec:\n\
                \x20 tiers:\n\
                \x20 - {name: free, class: batch, maxWaitMs: 60000, batch: {size: 10, intervalSeconds: 5}}\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let (local, _) = load_config(&[dir.path().to_owned()], SecretSources::default()).unwrap();
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        Arc::new(local),
    );
    let t0 = Instant::now();
    for _ in 0..3 {
        take(&d, "free", t0 + MIN).await.unwrap();
        assert_eq!(Instant::now(), t0, "held for its batch");
    }
    // On a route with a request limit, batch work is still gathered: held until its batch
    // of 10 fills or its oldest waited 5 s.
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(
            100,
            &[
                "{name: free, class: batch, maxWaitMs: 60000, batch: {size: 10, intervalSeconds: 5}}",
            ],
            (0, 0, 0),
        ),
    );
    let t0 = Instant::now();
    take(&d, "free", t0 + MIN).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(5));
}
