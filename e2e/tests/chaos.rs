//! Chaos runs with real processes: `floodgate-proxy` replicas, a redis-server and the mock
//! providers, under a load that keeps every key saturated, while something fails: Redis is
//! killed and restarted empty at random points, paused longer than the call timeout, a
//! provider accepts connections and never answers, a replica is SIGKILLed, the configuration
//! is reloaded over and over (models, prices, a key's limit and a key's secret). The mock counts with a window equal to the proxies'
//! (`--rate-window-ms`), so "within limits" is exact, not approximate.
//!
//! Random points are drawn from a seed printed by each run; `FLOODGATE_CHAOS_SEED=N` replays
//! one, and `FLOODGATE_CHAOS_TRACE=1` prints each key's arrivals at the mock beside the run's
//! events (a failed run names its busiest windows anyway). The runs take a few seconds each
//! and run one at a time.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::chaos::{Load, Report, Tally};
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use std::ffi::OsStr;
use std::time::Duration;
use tokio::time::{Instant, sleep, sleep_until};

/// The providers' window, in the mock and in the proxies.
const WINDOW: Duration = Duration::from_secs(2);
const KEYS: usize = 3;
const LIMIT: u32 = 10;
/// Clients per run: more than the keys admit at once, so every key stays saturated.
const CLIENTS: usize = 12;
/// The models the clients ask for: the mock answers them at different speeds, so that the
/// requests of a window spread over it (with one speed they stay in phase, and a budget
/// that forgets them all at once would still look exact).
const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-slow-200", "gpt-4o-slow-500"];

/// One chaos run at a time: they measure timing, and share two cores.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A small deterministic generator (xorshift64*) for the random points of a run.
struct Rng(u64);

impl Rng {
    fn seeded(test: &str) -> Rng {
        let seed = std::env::var("FLOODGATE_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{test}: FLOODGATE_CHAOS_SEED={seed}");
        Rng(seed | 1)
    }

    /// A duration in `[lo, hi)`.
    fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let span = u64::try_from((hi - lo).as_millis()).unwrap().max(1);
        lo + Duration::from_millis(x % span)
    }
}

/// An OpenAI pool of `KEYS` keys at `LIMIT` per window on the mock, plus `extra` spec lines.
fn pool(mock: &MockProviders, extra: &str) -> String {
    let secrets: String = (0..KEYS).map(|i| format!("  k{i}: key-{i}\n")).collect();
    let refs: String = (0..KEYS)
        .map(|i| format!("{{name: k{i}, secretRef: {{name: keys, key: k{i}}}, rpm: {LIMIT}}}, "))
        .collect();
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n{secrets}---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n{extra}  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{}\", models: [{models}], keys: [{refs}]}}\n",
        mock.base_url(),
        models = MODELS.map(|m| format!("{{name: {m}}}")).join(", ")
    )
}

fn config_dir(yaml: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pool.yaml"), yaml).unwrap();
    dir
}

async fn mock() -> MockProviders {
    MockProviders::start(
        MockConfig::default()
            .with_default_rpm(LIMIT)
            .with_window(WINDOW),
    )
    .await
    .unwrap()
}

/// A replica on `dir`, sharing budgets through `redis` when given.
async fn replica(dir: &tempfile::TempDir, redis: Option<&RedisServer>) -> ProxyProcess {
    let mut args: Vec<String> = vec![
        "--config".into(),
        dir.path().display().to_string(),
        "--rate-window-ms".into(),
        WINDOW.as_millis().to_string(),
        "--workers".into(),
        "1".into(),
        "--watch-interval-ms".into(),
        "100".into(),
    ];
    if let Some(redis) = redis {
        args.extend(["--redis".into(), redis.url()]);
    }
    ProxyProcess::start(args, &[] as &[(&str, &OsStr)])
        .await
        .unwrap()
}

/// What a run did to its processes, on the mock's clock (ms since it started), for the
/// message of a failed run: when a limit was exceeded, these tell which failure it followed.
#[derive(Default)]
struct Events(std::sync::Mutex<Vec<(u64, String)>>);

impl Events {
    fn note(&self, mock: &MockProviders, what: impl Into<String>) {
        let at = mock.now_us() / 1000;
        self.0.lock().unwrap().push((at, what.into()));
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.0.lock().unwrap().iter())
            .finish()
    }
}

/// For each key over its limit: the arrivals (ms on the mock's clock) of its first window that
/// held more than the limit.
fn busiest_windows(mock: &MockProviders) -> Vec<(String, Vec<f64>)> {
    let counts = mock.counts();
    let window_us = u64::try_from(WINDOW.as_micros()).unwrap();
    let limit = usize::try_from(LIMIT).unwrap();
    counts
        .over_limit()
        .filter_map(|k| {
            let t = &k.timestamps_us;
            (limit..t.len())
                .find(|&i| t[i] < t[i - limit] + window_us)
                .map(|i| {
                    let arrivals = t[i - limit..=i].iter().map(|&us| us as f64 / 1000.0);
                    (k.key.clone(), arrivals.collect())
                })
        })
        .collect()
}

/// Every answer 200, no 429 upstream, no key over its limit in any window of the mock.
fn assert_exact(test: &str, mock: &MockProviders, tally: &Tally, started: Instant) {
    assert_exact_after(test, mock, tally, started, &Events::default());
}

/// [`assert_exact`], naming the run's `events` and the busiest windows when it fails.
fn assert_exact_after(
    test: &str,
    mock: &MockProviders,
    tally: &Tally,
    started: Instant,
    events: &Events,
) {
    let report = Report::of(&mock.counts());
    eprintln!(
        "{test}: {report:?}; clients {:?}, slowest {:?}; run {:?}",
        tally.statuses,
        tally.slowest,
        started.elapsed()
    );
    if std::env::var_os("FLOODGATE_CHAOS_TRACE").is_some() {
        for k in mock.counts().keys {
            let ms: Vec<u64> = k.timestamps_us.iter().map(|us| us / 1000).collect();
            eprintln!("{test}: {} {ms:?}; events {events:?}", k.key);
        }
    }
    let context = || {
        format!(
            "{report:?}; events {events:?}; over the limit: {:?}",
            busiest_windows(mock)
        )
    };
    assert_eq!(report.upstream_429s, 0, "{}", context());
    assert!(report.over_limit().is_empty(), "{}", context());
    assert_eq!(tally.not_ok(), 0, "{:?}", tally.failures);
    assert!(tally.ok() > 0, "nothing served");
}

/// A metric without labels of a replica, from its `/metrics`.
async fn metric(proxy: &ProxyProcess, name: &str) -> Option<f64> {
    let text = reqwest::get(proxy.admin_url("/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `floodgate_budget_backend_degraded` of a replica.
async fn degraded(proxy: &ProxyProcess) -> Option<i64> {
    let value = metric(proxy, "floodgate_budget_backend_degraded").await?;
    Some(value as i64)
}

async fn wait_degraded(proxy: &ProxyProcess, want: i64, within: Duration) {
    wait_for(
        &format!("floodgate_budget_backend_degraded {want}"),
        within,
        || async { Ok((degraded(proxy).await == Some(want)).then_some(())) },
    )
    .await
    .unwrap();
}

/// Redis loses its data three times at random points of a saturated run of two replicas:
/// flushed once (as a failover to an empty replica looks, the connection staying up), and
/// killed and restarted empty twice. No upstream 429, no key over its limit, no request
/// failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_at_random_points() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "redis_killed_and_restarted_empty_at_random_points";
    let mut rng = Rng::seeded(test);
    let mut redis = RedisServer::start().await.unwrap();
    let mock = mock().await;
    let dir = config_dir(&pool(&mock, ""));
    let (a, b) = (
        replica(&dir, Some(&redis)).await,
        replica(&dir, Some(&redis)).await,
    );
    let started = Instant::now();
    let load = Load::start(&[a.url(""), b.url("")], CLIENTS, &MODELS);
    let events = Events::default();
    for round in 0..3 {
        sleep(rng.between(Duration::from_millis(300), Duration::from_millis(2500))).await;
        if round == 0 {
            events.note(&mock, "flush");
            flush(&redis).await;
            events.note(&mock, "flushed");
            continue;
        }
        events.note(&mock, "kill");
        redis.kill().await.unwrap();
        sleep(rng.between(Duration::from_millis(50), Duration::from_millis(1000))).await;
        events.note(&mock, "restart");
        redis.restart().await.unwrap();
        events.note(&mock, "restarted");
    }
    sleep(WINDOW + Duration::from_secs(1)).await;
    let tally = load.stop().await;
    assert_exact_after(test, &mock, &tally, started, &events);
    for proxy in [&a, &b] {
        let losses = metric(proxy, "floodgate_budget_backend_losses_total").await;
        assert!(losses >= Some(1.0), "losses found: {losses:?}");
    }
}

async fn flush(redis: &RedisServer) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
}

/// Redis stops answering (SIGSTOP) for longer than the call timeout: both replicas say
/// they are degraded and serve on their shares, then return to Redis when it continues.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_paused_longer_than_the_call_timeout() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "redis_paused_longer_than_the_call_timeout";
    let mut rng = Rng::seeded(test);
    let redis = RedisServer::start().await.unwrap();
    let mock = mock().await;
    let dir = config_dir(&pool(&mock, ""));
    let (a, b) = (
        replica(&dir, Some(&redis)).await,
        replica(&dir, Some(&redis)).await,
    );
    let started = Instant::now();
    let load = Load::start(&[a.url(""), b.url("")], CLIENTS, &MODELS);
    let events = Events::default();
    sleep(rng.between(Duration::from_millis(500), Duration::from_millis(2000))).await;
    events.note(&mock, "pause");
    redis.pause().await.unwrap();
    for proxy in [&a, &b] {
        wait_degraded(proxy, 1, Duration::from_secs(2)).await;
    }
    events.note(&mock, "both degraded");
    sleep(Duration::from_millis(1500)).await;
    events.note(&mock, "resume");
    redis.resume().await.unwrap();
    for proxy in [&a, &b] {
        wait_degraded(proxy, 0, Duration::from_secs(3)).await;
    }
    events.note(&mock, "both recovered");
    sleep(WINDOW).await;
    let tally = load.stop().await;
    assert_exact_after(test, &mock, &tally, started, &events);
}

/// A provider that accepts connections and never answers: requests to it end at the
/// pool's request timeout and fall back to the next provider, its breaker opens, and every
/// caller is answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_accepts_and_never_answers() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "a_provider_that_accepts_and_never_answers";
    let mock = mock().await;
    // Accepts, reads nothing, answers nothing, closes nothing.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_url = format!("http://{}", silent.local_addr().unwrap());
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let held = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut open = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                accepted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                open.push(socket);
            }
        })
    };
    let extra = "  fallback: [silent, openai]\n  timeouts: {requestSeconds: 1}\n  circuitBreaker: {failureThreshold: 2, openSeconds: 600}\n";
    let yaml = pool(&mock, extra)
        .replace("stringData:\n", "stringData:\n  silent: key-silent\n")
        .replace(
        "  providers:\n",
        &format!(
            "  providers:\n  - {{name: silent, type: openai, baseUrl: \"{silent_url}\", models: [{{name: gpt-4o}}], keys: [{{name: s, secretRef: {{name: keys, key: silent}}, rpm: 1000}}]}}\n"
        ),
    );
    let dir = config_dir(&yaml);
    let a = replica(&dir, None).await;
    let started = Instant::now();
    let load = Load::start(&[a.url("")], 4, &["gpt-4o"]);
    sleep(Duration::from_secs(4)).await;
    let tally = load.stop().await;
    held.abort();
    assert_exact(test, &mock, &tally, started);
    let accepted = accepted.load(std::sync::atomic::Ordering::Relaxed);
    assert!(accepted >= 1, "the silent provider was never tried");
    // Its breaker opened after two timeouts: only the first callers were sent there, not
    // the 60 that followed.
    eprintln!("{test}: the silent provider accepted {accepted} connections");
    assert!(
        accepted < 10,
        "{accepted} connections to a provider whose breaker is open"
    );
    // Each caller waited at most the request timeout for the silent provider.
    assert!(
        tally.slowest < Duration::from_millis(2500),
        "{:?}",
        tally.slowest
    );
}

/// One of two replicas is SIGKILLed at a random point: the survivor keeps every key within
/// its limit (the dead replica's requests stay counted in Redis) and its callers are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_run() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "a_replica_killed_mid_run";
    let mut rng = Rng::seeded(test);
    let redis = RedisServer::start().await.unwrap();
    let mock = mock().await;
    let dir = config_dir(&pool(&mock, ""));
    let (a, b) = (
        replica(&dir, Some(&redis)).await,
        replica(&dir, Some(&redis)).await,
    );
    let started = Instant::now();
    let on_a = Load::start(&[a.url("")], CLIENTS / 2, &MODELS);
    let on_b = Load::start(&[b.url("")], CLIENTS / 2, &MODELS);
    sleep(rng.between(Duration::from_millis(500), Duration::from_millis(3000))).await;
    b.stop().await.unwrap();
    drop(on_b.stop().await);
    sleep(2 * WINDOW).await;
    let tally = on_a.stop().await;
    assert_exact(test, &mock, &tally, started);
}

/// The configuration is rewritten every 150 ms during a saturated run of two replicas: a
/// model added and removed, prices changed, key k0's limit alternating between 10 and 8 (and
/// held at 8 for the run's last 1.5 windows), key k2's secret rotated at every reload. Every
/// reload applies, no request fails, no key exceeds its limit; k0 holds to 8 in every window
/// once lowered for good; k2's budget follows it through the rotations (its two values
/// together stay within 10 in every window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_reloads_under_load() {
    let _one = ONE_AT_A_TIME.lock().await;
    let test = "config_reloads_under_load";
    let redis = RedisServer::start().await.unwrap();
    let mock = mock().await;
    let base = pool(&mock, "");
    let dir = config_dir(&base);
    let (a, b) = (
        replica(&dir, Some(&redis)).await,
        replica(&dir, Some(&redis)).await,
    );
    let started = Instant::now();
    let load = Load::start(&[a.url(""), b.url("")], CLIENTS, &MODELS);
    let end = started + 3 * WINDOW;
    let steady = started + WINDOW * 3 / 2;
    let mut lowered_us = None;
    let mut version = 0u32;
    while Instant::now() < end {
        version += 1;
        let low = Instant::now() >= steady;
        if low && lowered_us.is_none() {
            lowered_us = Some(mock.now_us());
        }
        let rpm = if low || version.is_multiple_of(2) {
            LOWERED
        } else {
            LIMIT
        };
        let secret = if version.is_multiple_of(2) {
            "key-2"
        } else {
            "key-2b"
        };
        let models =
            format!("{{name: gpt-4o, inputPer1M: {version}.0}}, {{name: gpt-4o-mini-v{version}}}");
        let yaml = base
            .replace("{name: gpt-4o}", &models)
            .replace(
                &format!("{{name: k0, secretRef: {{name: keys, key: k0}}, rpm: {LIMIT}}}"),
                &format!("{{name: k0, secretRef: {{name: keys, key: k0}}, rpm: {rpm}}}"),
            )
            .replace("  k2: key-2\n", &format!("  k2: {secret}\n"));
        // Replaced at once, as a mounted ConfigMap is (a symlink swap), never half-written.
        let next = dir.path().join("pool.yaml.next");
        std::fs::write(&next, yaml).unwrap();
        std::fs::rename(&next, dir.path().join("pool.yaml")).unwrap();
        sleep_until(Instant::now() + Duration::from_millis(150)).await;
    }
    sleep(Duration::from_millis(300)).await;
    let tally = load.stop().await;
    assert_exact(test, &mock, &tally, started);
    for proxy in [&a, &b] {
        let applied = proxy
            .log()
            .iter()
            .filter(|l| l.contains("configuration change applied"))
            .count();
        assert!(applied >= 5, "only {applied} reloads applied of {version}");
    }
    // Once the lowered limit applied (a watch interval and a reload after it was written),
    // no window of k0 holds more than it.
    let k0 = arrivals(&mock, &["key-0"]);
    let applied_us = lowered_us.unwrap() + 300_000;
    let worst = worst_window_from(&k0, applied_us);
    eprintln!("{test}: k0 at {LOWERED}: worst window {worst}");
    assert!(worst <= LOWERED, "k0 took {worst} in a window at {LOWERED}");
    let k2 = arrivals(&mock, &["key-2", "key-2b"]);
    let worst = worst_window_from(&k2, 0);
    assert!(
        worst <= LIMIT,
        "k2 took {worst} in a window over its two secrets"
    );
    for value in ["key-2", "key-2b"] {
        assert!(
            !arrivals(&mock, &[value]).is_empty(),
            "the mock never saw k2's secret {value}"
        );
    }
}

/// k0's limit while lowered by a reload.
const LOWERED: u32 = 8;

/// Every arrival at the mock with one of the key `values`, in order (µs on its clock).
fn arrivals(mock: &MockProviders, values: &[&str]) -> Vec<u64> {
    let mut times: Vec<u64> = mock
        .counts()
        .keys
        .iter()
        .filter(|k| values.contains(&k.key.as_str()))
        .flat_map(|k| k.timestamps_us.iter().copied())
        .collect();
    times.sort_unstable();
    times
}

/// The most arrivals in one window among the windows that begin at an arrival at or after
/// `from_us`.
fn worst_window_from(times: &[u64], from_us: u64) -> u32 {
    let window_us = u64::try_from(WINDOW.as_micros()).unwrap();
    times
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t >= from_us)
        .map(|(i, &t)| times[i..].partition_point(|&u| u < t + window_us))
        .max()
        .map_or(0, |n| u32::try_from(n).unwrap())
}
