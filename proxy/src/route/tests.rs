//! The dispatcher on a paused clock: arrival order, no polling, bounded queues, half-open
//! probes, configuration swaps and budget identity. Upstreams are never called: the tests
//! drive [`Attempts`] and settle the permits themselves.

use super::attempt::{ANONYMOUS, Asker, Attempts, Demand};
use super::*;
use crate::config::load::load_config;
use crate::config::secrets::SecretSources;
use crate::providers::Adapter;
use std::sync::Mutex;

const MIN: Duration = Duration::from_secs(60);

/// A configuration with one OpenAI provider serving model `m` with `keys` (secret key name,
/// rpm); the breaker opens after one failure for 10 s.
fn config(keys: &[(&str, u32)]) -> Arc<Config> {
    config_with(keys, "m")
}

pub(super) fn config_with(keys: &[(&str, u32)], model: &str) -> Arc<Config> {
    let secrets: Vec<String> = keys.iter().map(|(k, _)| format!("{k}: sk-{k}")).collect();
    let keys: Vec<String> = keys
        .iter()
        .map(|(k, rpm)| format!("{{secretRef: {{name: keys, key: {k}}}, rpm: {rpm}}}"))
        .collect();
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{{}}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 circuitBreaker: {{failureThreshold: 1, openSeconds: 10}}\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{{name: {model}}}], keys: [{}]}}\n",
        secrets.join(", "),
        keys.join(", ")
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let (config, _) = load_config(&[dir.path().to_owned()], SecretSources::default()).unwrap();
    Arc::new(config)
}

pub(super) fn dispatcher(opts: DispatcherOptions, config: Arc<Config>) -> Arc<Dispatcher> {
    let d = Arc::new(Dispatcher::with_options(opts).unwrap());
    d.apply(config);
    d
}

pub(super) fn request() -> ChatRequest {
    serde_json::from_value(serde_json::json!({
        "model": "m", "messages": [{"role": "user", "content": "hi"}]
    }))
    .unwrap()
}

/// Takes a lease on `m` and has it answered now, so its slot is held for one window.
async fn take_and_answer(d: &Dispatcher, deadline: Instant) {
    let view = d.view();
    let route = &view.runtime.routes["m"];
    let demand = Demand::chat(&request());
    let mut attempts = Attempts::new(d, &view.runtime, route, demand, deadline, anon(&view));
    let mut lease = attempts.next().await.unwrap();
    lease.permit.answered();
}

/// The asker of a request without identity: the configuration's default tier.
pub(super) fn anon(view: &View) -> Asker {
    Asker {
        tier: view.runtime.tiers.get(None).clone(),
        tenant: Arc::from(ANONYMOUS),
        progress: None,
        affinity: None,
        report: None,
        answer_by: None,
    }
}

pub(super) async fn until(mut condition: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if condition() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("condition never held");
}

#[tokio::test(start_paused = true)]
async fn waiters_are_served_in_arrival_order_and_none_polls() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(300)),
        config(&[("a", 1)]),
    );
    let t0 = Instant::now();
    take_and_answer(&d, t0 + Duration::from_secs(300)).await;
    let served: Arc<Mutex<Vec<(usize, Duration, u32)>>> = Arc::default();
    let mut tasks = Vec::new();
    for i in 0..3 {
        let (dd, served) = (d.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let d = dd;
            let view = d.view();
            let route = &view.runtime.routes["m"];
            let deadline = t0 + Duration::from_secs(300);
            let mut attempts = Attempts::new(
                &d,
                &view.runtime,
                route,
                Demand::chat(&request()),
                deadline,
                anon(&view),
            );
            let mut lease = attempts.next().await.unwrap();
            served
                .lock()
                .unwrap()
                .push((i, t0.elapsed(), attempts.looks()));
            lease.permit.answered();
        }));
        // Each joins the queue before the next arrives.
        let view = d.view();
        until(|| view.runtime.routes["m"].queue.len() == i + 1).await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    let served = served.lock().unwrap().clone();
    let order: Vec<usize> = served.iter().map(|s| s.0).collect();
    assert_eq!(order, [0, 1, 2], "arrival order");
    let times: Vec<Duration> = served.iter().map(|s| s.1).collect();
    assert_eq!(times, [MIN, 2 * MIN, 3 * MIN], "each as its slot frees");
    for (i, _, looks) in served {
        // A look on arrival or at the head, one per pulse and one when the slot frees: a
        // poll every millisecond would be thousands.
        assert!(looks <= 4, "waiter {i} looked {looks} times");
    }
}

#[tokio::test(start_paused = true)]
async fn a_half_open_probe_is_waited_for_without_spinning() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(&[("a", 1000)]),
    );
    let view = d.view();
    let breaker = view.runtime.providers[0].breaker.clone();
    breaker.failure(Instant::now());
    tokio::time::advance(Duration::from_secs(10)).await;
    assert!(breaker.allow(Instant::now()), "the probe goes out");
    let waiter = {
        let d = d.clone();
        tokio::spawn(async move {
            let view = d.view();
            let route = &view.runtime.routes["m"];
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut attempts = Attempts::new(
                &d,
                &view.runtime,
                route,
                Demand::chat(&request()),
                deadline,
                anon(&view),
            );
            let lease = attempts.next().await.map(|_| ());
            (lease, attempts.looks())
        })
    };
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(!waiter.is_finished(), "no key while the probe is out");
    breaker.success();
    let (lease, looks) = waiter.await.unwrap();
    assert!(lease.is_ok(), "served once the probe succeeded");
    assert!(looks <= 3, "looked {looks} times in 5 s of probe");
}

#[tokio::test(start_paused = true)]
async fn a_full_queue_is_refused_at_once_with_an_honest_retry_after() {
    let mut opts = DispatcherOptions::new(MIN, Duration::from_secs(300));
    opts.max_queued = Some(2);
    let d = dispatcher(opts, config(&[("a", 1)]));
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(300);
    take_and_answer(&d, deadline).await;
    let mut waiters = Vec::new();
    for i in 0..2 {
        let dd = d.clone();
        waiters.push(tokio::spawn(async move {
            let d = dd;
            let view = d.view();
            let route = &view.runtime.routes["m"];
            let mut attempts = Attempts::new(
                &d,
                &view.runtime,
                route,
                Demand::chat(&request()),
                deadline,
                anon(&view),
            );
            attempts.next().await.map(|_| ())
        }));
        let view = d.view();
        until(|| view.runtime.routes["m"].queue.len() == i + 1).await;
    }
    let view = d.view();
    let route = &view.runtime.routes["m"];
    let mut attempts = Attempts::new(
        &d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        deadline,
        anon(&view),
    );
    match attempts.next().await {
        Err(RouteError::Saturated { retry_after }) => {
            // The slot frees in a window, the two ahead take it and the next: its turn comes
            // three windows from now.
            assert_eq!(retry_after, 3 * MIN);
        }
        other => panic!("expected 429, got {other:?}"),
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "refused without waiting");
    for w in waiters {
        w.abort();
    }
}

#[tokio::test(start_paused = true)]
async fn a_request_whose_turn_comes_after_its_deadline_is_refused_at_once() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(90)),
        config(&[("a", 1)]),
    );
    let t0 = Instant::now();
    take_and_answer(&d, t0 + Duration::from_secs(90)).await;
    // One waiter ahead takes the slot that frees at 60 s.
    let ahead = {
        let dd = d.clone();
        tokio::spawn(async move {
            let d = dd;
            let view = d.view();
            let route = &view.runtime.routes["m"];
            let deadline = t0 + Duration::from_secs(90);
            let mut attempts = Attempts::new(
                &d,
                &view.runtime,
                route,
                Demand::chat(&request()),
                deadline,
                anon(&view),
            );
            attempts.next().await.map(|_| ())
        })
    };
    let view = d.view();
    until(|| view.runtime.routes["m"].queue.len() == 1).await;
    let route = &view.runtime.routes["m"];
    let deadline = t0 + Duration::from_secs(90);
    let mut attempts = Attempts::new(
        &d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        deadline,
        anon(&view),
    );
    match attempts.next().await {
        // Its turn is at 120 s, past its 90 s deadline: told now, with when it would come.
        Err(RouteError::Saturated { retry_after }) => assert_eq!(retry_after, 2 * MIN),
        other => panic!("expected 429, got {other:?}"),
    }
    assert_eq!(t0.elapsed(), Duration::ZERO, "refused without waiting");
    assert!(
        ahead.await.unwrap().is_ok(),
        "the one ahead is served at 60 s"
    );
}

#[tokio::test(start_paused = true)]
async fn an_abandoned_probe_does_not_strand_the_next_request() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(&[("a", 1000)]),
    );
    let view = d.view();
    let route = &view.runtime.routes["m"];
    view.runtime.providers[0].breaker.failure(Instant::now());
    tokio::time::advance(Duration::from_secs(10)).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut probe = Attempts::new(
        &d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        deadline,
        anon(&view),
    );
    let lease = probe.next().await.unwrap();
    assert!(
        lease.probe.is_some(),
        "the first request after the open period probes"
    );
    // Its caller hangs up before the provider answers.
    drop(lease);
    let t1 = Instant::now();
    let mut next = Attempts::new(
        &d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        deadline,
        anon(&view),
    );
    let lease = next.next().await.unwrap();
    assert!(
        lease.probe.is_some(),
        "the next request probes in its place"
    );
    assert_eq!(t1.elapsed(), Duration::ZERO, "at once");
}

#[tokio::test(start_paused = true)]
async fn answers_on_keys_with_room_wake_no_waiter() {
    let yaml = "apiVersion: v1\nkind: Secret\nmetadata: {name: keys}\nstringData: {a: sk-a, b: sk-b}\n---\n\
        apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {name: pool}\nspec:\n  providers:\n\
        \x20 - {name: one, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{name: m}], keys: [{secretRef: {name: keys, key: a}, rpm: 1}]}\n\
        \x20 - {name: two, type: openai, baseUrl: \"http://127.0.0.1:9\", models: [{name: m2}], keys: [{secretRef: {name: keys, key: b}, rpm: 100000}]}\n";
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("gateway.yaml"), yaml).unwrap();
    let (config, _) = load_config(&[dir.path().to_owned()], SecretSources::default()).unwrap();
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(120)),
        Arc::new(config),
    );
    let t0 = Instant::now();
    take_and_answer(&d, t0 + MIN).await;
    let waiter = {
        let dd = d.clone();
        tokio::spawn(async move {
            let d = dd;
            let view = d.view();
            let route = &view.runtime.routes["m"];
            let deadline = t0 + Duration::from_secs(120);
            let mut attempts = Attempts::new(
                &d,
                &view.runtime,
                route,
                Demand::chat(&request()),
                deadline,
                anon(&view),
            );
            let ok = attempts.next().await.is_ok();
            (ok, attempts.looks())
        })
    };
    let view = d.view();
    until(|| view.runtime.routes["m"].queue.len() == 1).await;
    let other = &view.runtime.routes["m2"];
    for _ in 0..1000 {
        let mut attempts = Attempts::new(
            &d,
            &view.runtime,
            other,
            Demand::chat(&request()),
            t0 + MIN,
            anon(&view),
        );
        let mut lease = attempts.next().await.unwrap();
        lease.permit.answered();
        tokio::task::yield_now().await;
    }
    let (ok, looks) = waiter.await.unwrap();
    assert!(ok);
    assert!(
        looks <= 4,
        "the waiter on m looked {looks} times while m2 served 1000"
    );
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_the_waiters_and_their_order() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(300)),
        config(&[("a", 1)]),
    );
    let t0 = Instant::now();
    take_and_answer(&d, t0 + Duration::from_secs(300)).await;
    let first = {
        let dd = d.clone();
        tokio::spawn(async move {
            let d = dd;
            let view = d.view();
            let route = &view.runtime.routes["m"];
            let deadline = t0 + Duration::from_secs(300);
            let mut attempts = Attempts::new(
                &d,
                &view.runtime,
                route,
                Demand::chat(&request()),
                deadline,
                anon(&view),
            );
            attempts.next().await.map(|mut l| {
                l.permit.answered();
                t0.elapsed()
            })
        })
    };
    let view = d.view();
    until(|| view.runtime.routes["m"].queue.len() == 1).await;
    // The same model in a new configuration (say, a Secret changed elsewhere).
    d.apply(config(&[("a", 1)]));
    let view = d.view();
    assert_eq!(
        view.runtime.routes["m"].queue.len(),
        1,
        "the waiter is still in line"
    );
    let route = &view.runtime.routes["m"];
    let deadline = t0 + Duration::from_secs(300);
    let mut later = Attempts::new(
        &d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        deadline,
        anon(&view),
    );
    let lease = later.next().await.unwrap();
    let second = t0.elapsed();
    drop(lease);
    assert_eq!(
        first.await.unwrap().unwrap(),
        MIN,
        "the first in line is served first"
    );
    assert_eq!(
        second,
        2 * MIN,
        "the later arrival waits its turn behind it"
    );
}

#[tokio::test(start_paused = true)]
async fn the_default_bound_is_what_the_keys_serve_within_the_wait() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(&[("a", 20), ("b", 40)]),
    );
    assert_eq!(d.view().runtime.routes["m"].queue.bound(), 30);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_served_in_time_is_refused_at_once() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(&[("a", 1)]),
    );
    let t0 = Instant::now();
    take_and_answer(&d, t0 + Duration::from_secs(30)).await;
    let view = d.view();
    let route = &view.runtime.routes["m"];
    let mut attempts = Attempts::new(
        &d,
        &view.runtime,
        route,
        Demand::chat(&request()),
        t0 + Duration::from_secs(30),
        anon(&view),
    );
    match attempts.next().await {
        Err(RouteError::Saturated { retry_after }) => assert_eq!(retry_after, MIN),
        other => panic!("expected 429, got {other:?}"),
    }
    assert_eq!(t0.elapsed(), Duration::ZERO);
}

#[tokio::test]
async fn many_swaps_with_no_request_between_serve_the_last_configuration() {
    let d = dispatcher(DispatcherOptions::new(MIN, MIN), config(&[("a", 1)]));
    let configs: Vec<Arc<Config>> = (0..4)
        .map(|i| config_with(&[("a", 1)], &format!("model-{i}")))
        .collect();
    for round in 0..200 {
        let i = round % configs.len();
        // A fresh allocation each time, as a reload makes: addresses get reused.
        d.apply(Arc::new((*configs[i]).clone()));
        let view = d.view();
        let names: Vec<&String> = view.runtime.routes.keys().collect();
        assert_eq!(names, [&format!("model-{i}")], "round {round}");
        assert!(Arc::ptr_eq(&view.config, &d.config()));
    }
}

#[tokio::test(start_paused = true)]
async fn a_key_keeps_its_window_when_keys_are_reordered() {
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(1)),
        config(&[("a", 1), ("b", 1)]),
    );
    take_and_answer(&d, Instant::now() + Duration::from_secs(1)).await;
    let used = |d: &Dispatcher| -> Vec<(String, u32)> {
        let view = d.view();
        view.runtime.providers[0]
            .keys
            .iter()
            .map(|k| (k.name.to_string(), k.budget.used(Instant::now())))
            .collect()
    };
    assert_eq!(used(&d), [("openai-0".into(), 1), ("openai-1".into(), 0)]);
    // The same secrets in the other order: the display names follow the positions, the
    // budgets follow the secrets.
    d.apply(config(&[("b", 1), ("a", 1)]));
    assert_eq!(used(&d), [("openai-0".into(), 0), ("openai-1".into(), 1)]);
}

#[test]
fn the_token_reservation_is_the_output_cap_the_adapter_sends() {
    let req = request();
    let demand = Demand::chat(&req);
    let prompt = u64::from(crate::providers::estimate_prompt_tokens(&req));
    for adapter in Adapter::ALL {
        let built = adapter
            .build_request("http://127.0.0.1:9", Some("k"), "m", &req, false)
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&built.body).unwrap();
        let sent = body["max_tokens"]
            .as_u64()
            .or(body["generationConfig"]["maxOutputTokens"].as_u64())
            .or(body["options"]["num_predict"].as_u64());
        let expected = sent.unwrap_or(attempt::DEFAULT_OUTPUT_RESERVATION);
        assert_eq!(demand.tokens(adapter), prompt + expected, "{adapter:?}");
    }
    assert_eq!(
        demand.tokens(Adapter::Anthropic),
        prompt + u64::from(crate::providers::anthropic::DEFAULT_MAX_TOKENS)
    );
}

#[test]
fn a_refusal_is_the_gateways_when_no_attempt_reached_a_provider() {
    let upstream = |attempts| RouteError::Upstream {
        error: ProviderError::Timeout,
        attempts,
    };
    assert!(upstream(0).is_gateway_refusal(), "nothing was sent");
    assert!(!upstream(1).is_gateway_refusal(), "a provider answered");
    assert!(RouteError::UnknownModel("m".into()).is_gateway_refusal());
    assert!(
        RouteError::Saturated {
            retry_after: Duration::from_secs(1)
        }
        .is_gateway_refusal()
    );
}

/// What the publisher shares for the operator's pool status: each pool's providers with
/// their breakers' states, exactly at the open period's end.
#[tokio::test(start_paused = true)]
async fn circuit_figures_give_each_providers_breaker_state() {
    use crate::demand::PoolCircuits;
    let d = dispatcher(
        DispatcherOptions::new(MIN, Duration::from_secs(30)),
        config(&[("a", 1000)]),
    );
    let figures = |state: &'static str| {
        vec![PoolCircuits {
            pool: "pool".into(),
            providers: vec![("openai".into(), state)],
        }]
    };
    assert_eq!(d.circuit_figures(), figures("closed"));
    d.view().runtime.providers[0]
        .breaker
        .failure(Instant::now());
    assert_eq!(d.circuit_figures(), figures("open"));
    tokio::time::advance(Duration::from_millis(9_999)).await;
    assert_eq!(d.circuit_figures(), figures("open"));
    tokio::time::advance(Duration::from_millis(1)).await;
    assert_eq!(d.circuit_figures(), figures("half-open"));
}
