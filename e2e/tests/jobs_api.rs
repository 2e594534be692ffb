//! Async jobs through the real proxy binary against the mock providers, a webhook receiver
//! started here and, for durability, a real redis-server: a job's lifecycle with its event
//! stream and a signed webhook the receiver verifies; tenant scoping; a job failing three
//! times lands in the dead letters with its reason and is re-driven to success; a proxy
//! SIGKILLed while holding jobs loses none (another process completes them, each caller's
//! notification received once, by job and by notification id).
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use axum::http::HeaderMap;
use bytes::Bytes;
use floodgate_e2e::mock::{Fault, MockConfig, MockProviders, Provider};
use floodgate_e2e::proxy::ProxyProcess;
use floodgate_e2e::redis::RedisServer;
use floodgate_e2e::smtp::{SinkOptions, SmtpSink};
use floodgate_e2e::webhook_sink::HoldingReceiver;
use floodgate_proxy::jobs::webhook;
use futures::StreamExt as _;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);
const ACME: &str = "sk-e2e-jobs-acme";
const GLOBEX: &str = "sk-e2e-jobs-globex";
const SIGNING: &str = "whsec-e2e-jobs";
/// The admin listener's token for the dead-letter endpoints.
const ADMIN: &str = "admin-e2e-jobs-token";

/// What the webhook receiver got: headers and body of each POST.
type Received = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

/// A webhook receiver on a free port: records every POST, answers 200.
async fn receiver() -> (String, Received) {
    failing_receiver(0).await
}

/// A webhook receiver that answers its first `fail` POSTs 503 (not recorded), then 200.
async fn failing_receiver(fail: usize) -> (String, Received) {
    let got: Received = Arc::default();
    let store = got.clone();
    let refused = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let store = store.clone();
            let refused = refused.clone();
            async move {
                if refused.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                store.lock().unwrap().push((headers, body));
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

fn config(mock: &MockProviders, hook: &str) -> tempfile::TempDir {
    config_rpm(mock, hook, 1000)
}

/// The config directory, the provider key allowing `rpm`.
fn config_rpm(mock: &MockProviders, hook: &str, rpm: u32) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), config_yaml(mock, hook, rpm)).unwrap();
    dir
}

/// The config directory with the tier's email sent through `sink` (its CA trusted), logging
/// in as `mailer` with `password`.
fn config_email(
    mock: &MockProviders,
    hook: &str,
    sink: &SmtpSink,
    password: &str,
) -> tempfile::TempDir {
    let yaml = config_yaml(mock, hook, 1000).replacen(
        "      webhook: {url:",
        &format!(
            "      email: {{from: \"floodgate@example.com\", smtpServer: \"{}\", credentialsSecretRef: {{name: smtp, key: login}}, caSecretRef: {{name: smtp, key: ca}}}}\n      webhook: {{url:",
            sink.server()
        ),
        1,
    );
    let ca: String = sink
        .ca_pem()
        .lines()
        .map(|l| format!("    {l}\n"))
        .collect();
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: smtp}}\nstringData:\n  login: \"mailer:{password}\"\n  ca: |\n{ca}---\n"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), format!("{secret}{yaml}")).unwrap();
    dir
}

/// The gateway's resources: the provider key allowing `rpm`, the tier's webhook to `hook`.
fn config_yaml(mock: &MockProviders, hook: &str, rpm: u32) -> String {
    format!(
        r#"apiVersion: v1
kind: Secret
metadata: {{name: keys}}
stringData: {{a: sk-provider-e2e, acme: {ACME}, globex: {GLOBEX}, signing: {SIGNING}}}
---
apiVersion: floodgate.dev/v1alpha1
kind: AIProviderPool
metadata: {{name: pool}}
spec:
  providers:
  - {{name: openai, type: openai, baseUrl: "{base}", models: [{{name: gpt-4o}}, {{name: slow-2000}}, {{name: slow-10000}}], keys: [{{name: k, secretRef: {{name: keys, key: a}}, rpm: {rpm}}}]}}
---
apiVersion: floodgate.dev/v1alpha1
kind: TierQueue
metadata: {{name: tiers}}
spec:
  defaultTier: free
  retry: {{maxAttempts: 3, initialBackoffSeconds: 1, maxBackoffSeconds: 2}}
  tiers:
  - name: free
    class: batch
    maxWaitMs: 20000
    batch: {{size: 1, intervalSeconds: 1}}
    async:
      notify: [webhook]
      webhook: {{url: "{hook}", signingSecretRef: {{name: keys, key: signing}}}}
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: acme}}
spec: {{tier: free, keys: [{{name: main, secretRef: {{name: keys, key: acme}}}}]}}
---
apiVersion: floodgate.dev/v1alpha1
kind: Tenant
metadata: {{name: globex}}
spec: {{tier: free, keys: [{{name: main, secretRef: {{name: keys, key: globex}}}}]}}
"#,
        base = mock.base_url()
    )
}

async fn start(dir: &tempfile::TempDir, extra: &[&str]) -> ProxyProcess {
    start_logging(dir, extra, "info").await
}

async fn start_logging(dir: &tempfile::TempDir, extra: &[&str], log: &str) -> ProxyProcess {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = vec!["--config", dir.path().to_str().unwrap()];
    args.extend_from_slice(extra);
    let env: [(&str, &OsStr); 1] = [("RUST_LOG", OsStr::new(log))];
    ProxyProcess::start(args, &env).await.unwrap()
}

/// Two tests of `$body` (`async fn(extra: &[&str])`, the proxy's extra arguments): with
/// jobs in memory (`$memory`), and in Redis (`$redis`, on a redis-server of its own).
macro_rules! in_memory_and_redis {
    ($memory:ident, $redis:ident, $body:ident) => {
        #[tokio::test]
        async fn $memory() {
            $body(&[]).await;
        }

        #[tokio::test]
        async fn $redis() {
            let redis = RedisServer::start().await.unwrap();
            $body(&["--redis", &redis.url()]).await;
        }
    };
}

/// One test's gateway: the mock providers, the tier's webhook receiver (what it got), the
/// configuration directory (`config`: the provider key at 1,000 RPM), the proxy started on
/// it with `extra`, and a client.
struct Gateway {
    mock: MockProviders,
    got: Received,
    dir: tempfile::TempDir,
    proxy: ProxyProcess,
    http: reqwest::Client,
}

impl Gateway {
    async fn start(extra: &[&str]) -> Gateway {
        Self::configured(extra, "info", config).await
    }

    /// A gateway whose tier also emails through `smtp`, logging in as `mailer` with
    /// `password`; its configuration first passed through `edit`; logging at `log`.
    async fn with_email(
        smtp: &SmtpSink,
        password: &str,
        log: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Gateway {
        Self::configured(&[], log, |mock, hook| {
            let dir = config_email(mock, hook, smtp, password);
            let path = dir.path().join("all.yaml");
            std::fs::write(&path, edit(std::fs::read_to_string(&path).unwrap())).unwrap();
            dir
        })
        .await
    }

    /// The mock providers and the receiver, the configuration `configure` writes for them,
    /// and the proxy on it with `extra`, logging at `log`.
    async fn configured(
        extra: &[&str],
        log: &str,
        configure: impl FnOnce(&MockProviders, &str) -> tempfile::TempDir,
    ) -> Gateway {
        let mock = MockProviders::start(MockConfig::default()).await.unwrap();
        let (hook, got) = receiver().await;
        let dir = configure(&mock, &hook);
        let mut args = vec!["--admin-token", ADMIN];
        args.extend_from_slice(extra);
        let proxy = start_logging(&dir, &args, log).await;
        Gateway {
            mock,
            got,
            dir,
            proxy,
            http: reqwest::Client::new(),
        }
    }

    async fn stop(self) {
        self.proxy.stop().await.unwrap();
    }
}

fn job(model: &str, text: &str) -> Value {
    json!({
        "request": {"model": model, "messages": [{"role": "user", "content": text}]},
        "metadata": {"ticket": text}
    })
}

async fn submit(http: &reqwest::Client, proxy: &ProxyProcess, key: &str, body: &Value) -> Value {
    let r = http
        .post(proxy.url("/v1/jobs"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let id = r.json::<Value>().await.unwrap();
    assert!(id["id"].as_str().unwrap().starts_with("job_"));
    id
}

/// [`submit`], the job's id.
async fn submit_id(
    http: &reqwest::Client,
    proxy: &ProxyProcess,
    key: &str,
    body: &Value,
) -> String {
    submit(http, proxy, key, body).await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn get(http: &reqwest::Client, proxy: &ProxyProcess, key: &str, id: &str) -> (u16, Value) {
    let r = http
        .get(proxy.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(key)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// The admin listener's metrics.
async fn metrics(http: &reqwest::Client, proxy: &ProxyProcess) -> String {
    http.get(proxy.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// A job's event stream read to its end: the events' names, and the whole text.
async fn event_names(events: reqwest::Response) -> (Vec<String>, String) {
    let mut body = String::new();
    let mut stream = events.bytes_stream();
    while let Some(chunk) = tokio::time::timeout(WAIT, stream.next()).await.unwrap() {
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    let names = body
        .lines()
        .filter_map(|l| l.strip_prefix("event: "))
        .map(str::to_owned)
        .collect();
    (names, body)
}

/// Polls `check` until it gives a value (a condition, not a sleep).
async fn until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn finished(http: &reqwest::Client, proxy: &ProxyProcess, id: &str) -> Value {
    until(&format!("job {id} to finish"), || async {
        let (_, job) = get(http, proxy, ACME, id).await;
        matches!(job["status"].as_str(), Some("completed" | "failed")).then_some(job)
    })
    .await
}

/// [`verified`] over what `got` received.
fn verified_deliveries(got: &Received) -> Vec<(String, Value)> {
    verified(&got.lock().unwrap())
}

/// Checks every delivery's signature as a receiver must, and that its id is its
/// notification's (`<job id>.<re-drives>`); returns the job id and body of each.
fn verified(deliveries: &[(HeaderMap, Bytes)]) -> Vec<(String, Value)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    deliveries
        .iter()
        .map(|(headers, body)| {
            let h = |name: &str| headers.get(name).unwrap().to_str().unwrap().to_owned();
            let verified = webhook::verify(
                SIGNING.as_bytes(),
                &h(webhook::TIMESTAMP_HEADER),
                body,
                &h(webhook::SIGNATURE_HEADER),
                now,
            );
            assert_eq!(verified, Ok(()), "the webhook's signature verifies");
            let body: Value = serde_json::from_slice(body).unwrap();
            let job = body["job"]["id"].as_str().unwrap().to_owned();
            let notice = format!("{job}.{}", body["job"]["redrives"]);
            assert_eq!(h(webhook::ID_HEADER), notice);
            (job, body)
        })
        .collect()
}

in_memory_and_redis!(
    a_job_runs_with_events_a_signed_webhook_and_is_its_tenants_alone,
    a_job_in_redis_runs_with_events_a_signed_webhook_and_is_its_tenants_alone,
    lifecycle
);

async fn lifecycle(extra: &[&str]) {
    let gw = Gateway::start(extra).await;
    let (proxy, http, got) = (&gw.proxy, &gw.http, &gw.got);

    let accepted = submit(http, proxy, ACME, &job("slow-2000", "hello")).await;
    let id = accepted["id"].as_str().unwrap().to_owned();
    assert_eq!(accepted["status"], "queued");
    assert!(accepted["position"].is_u64() && accepted["estimated_start"].is_u64());

    // The event stream, from queued to completed.
    let events = http
        .get(proxy.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(events.status(), 200);
    let (names, body) = event_names(events).await;
    assert_eq!(names.first().map(String::as_str), Some("queued"), "{body}");
    assert!(names.iter().any(|n| n == "started"), "{body}");
    assert_eq!(
        names.last().map(String::as_str),
        Some("completed"),
        "{body}"
    );

    let (status, done) = get(http, proxy, ACME, &id).await;
    assert_eq!(status, 200);
    assert_eq!(done["status"], "completed");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["metadata"]["ticket"], "hello");
    assert_eq!(done["result"]["object"], "chat.completion");

    // One delivery, signed, of this job.
    let delivered = until("the webhook", || async {
        let d = verified_deliveries(got);
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].0, id);
    assert_eq!(delivered[0].1["type"], "job.completed");

    // Another tenant cannot see, follow or cancel it; a stranger is not identified.
    assert_eq!(get(http, proxy, GLOBEX, &id).await.0, 404);
    let r = http
        .get(proxy.url(&format!("/v1/jobs/{id}/events")))
        .bearer_auth(GLOBEX)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .delete(proxy.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(GLOBEX)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(get(http, proxy, "sk-stranger", &id).await.0, 401);
    assert_eq!(get(http, proxy, ACME, &id).await.1["status"], "completed");

    // Bad input is a 400 naming the problem.
    let r = http
        .post(proxy.url("/v1/jobs"))
        .bearer_auth(ACME)
        .json(&json!({"request": {"model": "gpt-4o"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    gw.stop().await;
}

in_memory_and_redis!(
    a_job_failing_three_times_is_dead_lettered_and_redriven_to_success,
    a_job_in_redis_failing_three_times_is_dead_lettered_and_redriven_to_success,
    dead_letter_and_redrive
);

async fn dead_letter_and_redrive(extra: &[&str]) {
    let gw = Gateway::start(extra).await;
    let (mock, proxy, http, got) = (&gw.mock, &gw.proxy, &gw.http, &gw.got);
    mock.set_fault(Provider::OpenAi, Fault::Status(500));

    let id = submit_id(http, proxy, ACME, &job("gpt-4o", "doomed")).await;
    let failed = finished(http, proxy, &id).await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["attempts"], 3);
    assert_eq!(failed["dead_letter"], true);
    let history = failed["history"].as_array().unwrap();
    assert_eq!(history.len(), 3);
    assert!(history.iter().all(|a| a["error"]["code"].is_string()));

    // The admin listener lists it with its reason; the public one has no such path.
    let dead: Value = http
        .get(proxy.admin_url("/admin/jobs/dead-letters"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let data = dead["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], id.as_str());
    assert!(
        data[0]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("500")
    );
    let public = http
        .get(proxy.url("/admin/jobs/dead-letters"))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(public.status(), 404);
    // The admin listener wants the admin token: none, a tenant's key or another is 401.
    for key in [None, Some(ACME), Some("not-the-admin-token")] {
        let mut r = http.get(proxy.admin_url("/admin/jobs/dead-letters"));
        if let Some(key) = key {
            r = r.bearer_auth(key);
        }
        let r = r.send().await.unwrap();
        assert_eq!(r.status(), 401, "{key:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_admin_token", "{body}");
    }

    // Re-driven with attempts reset, it succeeds once the provider is well again.
    mock.clear_fault(Provider::OpenAi);
    let redriven: Value = http
        .post(proxy.admin_url(&format!("/admin/jobs/dead-letters/{id}/redrive")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(redriven["redriven"], 1);
    let done = finished(http, proxy, &id).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["dead_letter"], false);
    let dead: Value = http
        .get(proxy.admin_url("/admin/jobs/dead-letters"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(dead["data"].as_array().unwrap().is_empty());
    // Told twice: of the failure, then of the success after the re-drive.
    let kinds = until("both webhooks", || async {
        let d = verified_deliveries(got);
        (d.len() == 2).then(|| {
            d.into_iter()
                .map(|(_, b)| b["type"].clone())
                .collect::<Vec<_>>()
        })
    })
    .await;
    assert_eq!(kinds, vec![json!("job.failed"), json!("job.completed")]);
    // Each under its own id: a receiver dropping ids it has seen keeps both.
    let ids: Vec<String> = got
        .lock()
        .unwrap()
        .iter()
        .map(|(h, _)| h[webhook::ID_HEADER].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, [format!("{id}.0"), format!("{id}.1")]);
    // Metrics: four attempts waited and ran in tier free, one dead letter, two deliveries.
    let expected = [
        "floodgate_jobs_wait_seconds_count{tier=\"free\"} 4",
        "floodgate_jobs_run_seconds_count{tier=\"free\"} 4",
        "floodgate_jobs_dead_letters_total 1",
        "floodgate_jobs_webhook_deliveries_total{outcome=\"delivered\"} 2",
        "floodgate_jobs_total{state=\"redriven\"} 1",
    ];
    until("the job metrics", || async {
        let text = metrics(http, proxy).await;
        expected
            .iter()
            .all(|l| text.lines().any(|x| x == *l))
            .then_some(())
    })
    .await;

    // Purged, the dead letters are gone; the job itself stays readable, failed.
    mock.set_fault(Provider::OpenAi, Fault::Status(500));
    let id = submit_id(http, proxy, ACME, &job("gpt-4o", "purged")).await;
    assert_eq!(finished(http, proxy, &id).await["status"], "failed");
    let admin = |path: &str| proxy.admin_url(path);
    let purged: Value = http
        .delete(admin("/admin/jobs/dead-letters"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(purged["purged"], 1);
    let dead: Value = http
        .get(admin("/admin/jobs/dead-letters"))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(dead["data"].as_array().unwrap().is_empty());
    let r = http
        .post(admin(&format!("/admin/jobs/dead-letters/{id}/redrive")))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(get(http, proxy, ACME, &id).await.1["status"], "failed");
    gw.stop().await;
}

/// Whether nothing is queued, held (claimed, unacknowledged) or waiting for a retry in the
/// Redis store: nothing is left that could send a notification (only a claim's holder does).
async fn nothing_pending(mut conn: redis::aio::MultiplexedConnection) -> bool {
    let (queued, held, delayed): (u64, Vec<redis::Value>, u64) = redis::pipe()
        .cmd("XLEN")
        .arg("floodgate:{jobs}:queue")
        .cmd("XPENDING")
        .arg("floodgate:{jobs}:queue")
        .arg("workers")
        .cmd("ZCARD")
        .arg("floodgate:{jobs}:delayed")
        .query_async(&mut conn)
        .await
        .unwrap();
    let none_held = matches!(held.first(), Some(redis::Value::Int(0)));
    queued == 0 && none_held && delayed == 0
}

#[tokio::test]
async fn a_proxy_killed_while_holding_jobs_loses_none_and_each_caller_is_told_once() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    // The receiver holds each delivery 3 s before its 200: A is killed while it notifies,
    // and what A sent then is abandoned (A never got the 200), not received.
    let receiver = HoldingReceiver::start(Duration::from_secs(3))
        .await
        .unwrap();
    let dir = config(&mock, receiver.url());
    let url = redis.url();
    // Leases of 3 s, renewed each second: a second's stall of the loaded test machine does
    // not let one of B's workers take over another's notification and send it again.
    let shared = ["--redis", url.as_str(), "--job-visibility-ms", "3000"];
    let mut args_a = shared.to_vec();
    args_a.extend(["--job-workers", "4"]);
    let a = start(&dir, &args_a).await;
    let http = reqwest::Client::new();

    // Twelve slow jobs: A's four workers run four, notify of them (the receiver holds the
    // deliveries, unanswered) and run four more.
    let mut ids = Vec::new();
    for i in 0..12 {
        let accepted = submit(&http, &a, ACME, &job("slow-2000", &format!("job {i}"))).await;
        ids.push(accepted["id"].as_str().unwrap().to_owned());
    }
    until(
        "A to hold four running jobs and four notifications",
        || async {
            let mut running = 0;
            for id in &ids {
                if get(&http, &a, ACME, id).await.1["status"] == "running" {
                    running += 1;
                }
            }
            (running == 4 && receiver.holding() == 4).then_some(())
        },
    )
    .await;
    a.stop().await.unwrap(); // SIGKILL

    let b = start(&dir, &shared).await;
    for id in &ids {
        let done = finished(&http, &b, id).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    // Past every lease: nothing queued, held or waiting for a retry, so nothing is left that
    // could send a notification again (only a claim's holder sends one).
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    until("every job told and every claim acknowledged", || {
        let conn = conn.clone();
        let answered = receiver.answered().len();
        async move { (answered >= 12 && nothing_pending(conn).await).then_some(()) }
    })
    .await;

    // Each job's notification received exactly once, by job and by notification id.
    let answered = receiver.answered();
    let mut per_job: HashMap<String, usize> = HashMap::new();
    for (job, _) in verified(&answered) {
        *per_job.entry(job).or_default() += 1;
    }
    let notice = |d: &(HeaderMap, Bytes)| d.0[webhook::ID_HEADER].to_str().unwrap().to_owned();
    let mut per_notice: HashMap<String, usize> = HashMap::new();
    for d in &answered {
        *per_notice.entry(notice(d)).or_default() += 1;
    }
    assert_eq!(answered.len(), 12, "{per_job:?}");
    assert_eq!(per_job.len(), 12);
    assert!(
        ids.iter().all(|id| per_job.get(id) == Some(&1)),
        "{per_job:?}"
    );
    assert_eq!(per_notice.len(), 12, "{per_notice:?}");
    // The four A was sending when it died: sent again by B, under the same ids.
    let abandoned = receiver.abandoned();
    assert_eq!(abandoned.len(), 4);
    for d in &abandoned {
        assert_eq!(per_notice.get(&notice(d)), Some(&1), "{}", notice(d));
    }
    assert!(b.log().iter().any(|l| l.contains("reclaimed a job")));
    b.stop().await.unwrap();
}

#[tokio::test]
async fn a_queued_jobs_event_stream_tells_its_position_as_the_jobs_before_it_start() {
    let gw = Gateway::start(&["--job-workers", "1"]).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    // One worker, three jobs of 2 s: the third waits behind the other two.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(submit_id(http, proxy, ACME, &job("slow-2000", &format!("queued {i}"))).await);
    }
    let events = http
        .get(proxy.url(&format!("/v1/jobs/{}/events", ids[2])))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    let (names, body) = event_names(events).await;
    // Each event's data, in order.
    let data: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let positions: Vec<u64> = names
        .iter()
        .zip(&data)
        .filter(|(n, _)| *n == "position")
        .map(|(_, d)| d["position"].as_u64().unwrap())
        .collect();
    // Behind two, then one (the first started when it was submitted, or just after).
    assert_eq!(positions.last(), Some(&0), "{body}");
    assert!(positions.windows(2).all(|w| w[0] > w[1]), "{body}");
    assert!(positions.len() >= 2, "{body}");
    let last_position = names.iter().rposition(|n| n == "position").unwrap();
    let started = names.iter().position(|n| n == "started").unwrap();
    assert!(last_position < started, "{body}");
    assert_eq!(
        names.last().map(String::as_str),
        Some("completed"),
        "{body}"
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_stalled_replica_whose_job_another_finished_tells_the_caller_that_one_did_not() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let receiver = HoldingReceiver::start(Duration::from_secs(3))
        .await
        .unwrap();
    let dir = config(&mock, receiver.url());
    let url = redis.url();
    let shared = [
        "--redis",
        url.as_str(),
        "--job-visibility-ms",
        "1000",
        "--job-workers",
        "1",
    ];
    let a = start(&dir, &shared).await;
    let http = reqwest::Client::new();
    let id = submit_id(&http, &a, ACME, &job("slow-2000", "stalled")).await;
    until("A to run the job", || async {
        (get(&http, &a, ACME, &id).await.1["status"] == "running").then_some(())
    })
    .await;
    // A stalls mid-attempt; B takes the job over, finishes it and begins to tell it: killed.
    a.pause().await.unwrap();
    let b = start(&dir, &shared).await;
    until("B to tell the job", || async {
        (receiver.holding() == 1).then_some(())
    })
    .await;
    b.stop().await.unwrap(); // SIGKILL
    a.resume().await.unwrap();
    // A's attempt ends and its write is refused (B finished the job); B's notification was
    // never answered, so A tells it, once B's lease has lapsed.
    until("the caller to be told", || async {
        (!receiver.answered().is_empty()).then_some(())
    })
    .await;
    // Then until every claim is acknowledged: nothing is left that could tell it again.
    let client = redis::Client::open(url.as_str()).unwrap();
    let conn = client.get_multiplexed_async_connection().await.unwrap();
    until("every claim acknowledged", || {
        let conn = conn.clone();
        async move { nothing_pending(conn).await.then_some(()) }
    })
    .await;
    let told = receiver.answered();
    let told = verified(&told);
    assert_eq!(told.len(), 1);
    assert_eq!(
        (told[0].0.as_str(), &told[0].1["type"]),
        (id.as_str(), &json!("job.completed"))
    );
    let abandoned = receiver.abandoned();
    assert_eq!(abandoned.len(), 1);
    assert_eq!(
        abandoned[0].0[webhook::ID_HEADER],
        format!("{id}.0").as_str(),
        "B's abandoned delivery had the same id"
    );
    a.stop().await.unwrap();
}

/// The jobs bench (`cargo test -p floodgate-e2e --test jobs_api -- --ignored --nocapture`):
/// POST /v1/jobs latency on a proxy that accepts into Redis and runs none, then how fast one
/// replica with 16 workers drains the queue (mock answers at once, keys unlimited for it).
#[tokio::test]
#[ignore = "a bench: run by hand, figures in README"]
async fn bench_job_acceptance_and_drain() {
    const JOBS: usize = 2000;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (hook, _got) = receiver().await;
    let dir = config_rpm(&mock, &hook, 1_000_000);
    let url = redis.url();
    let http = reqwest::Client::new();
    let body = job("gpt-4o", "bench");
    // Acceptance latency, in memory and in Redis, on proxies that run no job meanwhile.
    let memory = start(&dir, &["--job-workers", "0"]).await;
    let accept = start(&dir, &["--redis", url.as_str(), "--job-workers", "0"]).await;
    for (store, proxy) in [("memory", &memory), ("Redis", &accept)] {
        let mut took = Vec::with_capacity(JOBS);
        for _ in 0..JOBS {
            let t = Instant::now();
            let r = http
                .post(proxy.url("/v1/jobs"))
                .bearer_auth(ACME)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 202);
            took.push(t.elapsed());
        }
        took.sort();
        let p = |q: f64| took[((took.len() as f64 * q) as usize).min(took.len() - 1)];
        eprintln!(
            "POST /v1/jobs ({JOBS}, sequential, {store} store): p50 {:?} p99 {:?} max {:?}",
            p(0.5),
            p(0.99),
            took[took.len() - 1]
        );
    }
    memory.stop().await.unwrap();
    let drain = start(&dir, &["--redis", url.as_str(), "--job-workers", "16"]).await;
    let t = Instant::now();
    until("the queue to drain", || async {
        let text = http
            .get(drain.admin_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let done: f64 = text
            .lines()
            .find(|l| l.starts_with("floodgate_jobs_total{state=\"completed\"}"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0.0);
        (done as usize >= JOBS).then_some(())
    })
    .await;
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "drained {JOBS} jobs in {secs:.2} s with one replica (16 workers): {:.0} jobs/s",
        JOBS as f64 / secs
    );
    accept.stop().await.unwrap();
    drain.stop().await.unwrap();
}

#[tokio::test]
async fn a_synchronous_request_preferring_async_becomes_a_job_past_its_wait_limit() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (hook, _got) = receiver().await;
    // One request per 2 s window on the only key.
    let dir = config_rpm(&mock, &hook, 1);
    let proxy = start(&dir, &["--rate-window-ms", "2000"]).await;
    let http = reqwest::Client::new();
    let chat = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "now"}]});
    let send = |prefer: bool| {
        let mut r = http
            .post(proxy.url("/v1/chat/completions"))
            .bearer_auth(ACME)
            .header("x-floodgate-max-wait-ms", "100")
            .json(&chat);
        if prefer {
            r = r.header("prefer", "respond-async");
        }
        r.send()
    };
    assert_eq!(send(false).await.unwrap().status(), 200);
    // The window is spent: without the preference, 429; with it, 202 and a job.
    assert_eq!(send(false).await.unwrap().status(), 429);
    let deferred = send(true).await.unwrap();
    assert_eq!(deferred.status(), 202);
    let location = deferred.headers()["location"].to_str().unwrap().to_owned();
    let id = location.strip_prefix("/v1/jobs/").unwrap().to_owned();
    let done = finished(&http, &proxy, &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request"]["messages"][0]["content"], "now");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn the_openai_sdk_runs_a_batch_whose_lines_different_providers_answer() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (hook, _got) = receiver().await;
    let dir = config(&mock, &hook);
    // `smart` is served by OpenAI and by Anthropic, in turn (equal weights).
    let pool = format!(
        "apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  strategy: weighted\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o, alias: smart}}, {{name: slow-2000}}], keys: [{{name: k, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: claude, type: anthropic, baseUrl: \"{base}\", models: [{{name: claude-sonnet-4, alias: smart}}], keys: [{{name: c, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        base = mock.base_url()
    );
    let all = std::fs::read_to_string(dir.path().join("all.yaml")).unwrap();
    let start_pool = all
        .find("apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool")
        .unwrap();
    let end_pool = start_pool + all[start_pool..].find("---").unwrap();
    let all = format!("{}{}{}", &all[..start_pool], pool, &all[end_pool..]);
    std::fs::write(dir.path().join("all.yaml"), all).unwrap();
    // In Redis: the store a cluster runs with.
    let redis = RedisServer::start().await.unwrap();
    let proxy = start(&dir, &["--redis", &redis.url()]).await;

    let args = vec![
        "--base-url".to_owned(),
        proxy.url("/v1"),
        "--api-key".to_owned(),
        ACME.to_owned(),
        "--model".to_owned(),
        "smart".to_owned(),
        "--cancel-model".to_owned(),
        "slow-2000".to_owned(),
    ];
    let output =
        floodgate_e2e::python::run_script("openai_batch_check.py", &args, Duration::from_secs(120))
            .await
            .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the OpenAI SDK batch check failed:\n{stdout}\n{stderr}"
    );
    let summary: Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(summary["status"], "completed");
    assert_eq!(summary["completed"], 6);
    // Cancelled through the SDK: its lines cancelled, it ends cancelled.
    let cancel = &summary["cancel"];
    assert!(
        matches!(cancel["asked"].as_str(), Some("cancelling" | "cancelled")),
        "{stdout}"
    );
    assert_eq!(
        (&cancel["ended"], &cancel["total"]),
        (&json!("cancelled"), &json!(3)),
        "{stdout}"
    );
    // Each line was a job of its own, run in the batch tier, answered by both providers.
    let http = reqwest::Client::new();
    let mut providers = std::collections::BTreeSet::new();
    for id in summary["request_ids"].as_array().unwrap() {
        let (status, job) = get(&http, &proxy, ACME, id.as_str().unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(job["tier"], "free");
        providers.insert(job["history"][0]["provider"].as_str().unwrap().to_owned());
    }
    assert_eq!(
        providers.into_iter().collect::<Vec<_>>(),
        vec!["claude".to_owned(), "openai".to_owned()]
    );
    // Another tenant reads neither the batch nor its output.
    let batch = summary["batch_id"].as_str().unwrap();
    let file = summary["output_file_id"].as_str().unwrap();
    for path in [
        format!("/v1/batches/{batch}"),
        format!("/v1/files/{file}/content"),
    ] {
        let r = http
            .get(proxy.url(&path))
            .bearer_auth(GLOBEX)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_batch_past_its_completion_window_expires_unread_with_its_unfinished_lines_in_errors() {
    let redis = RedisServer::start().await.unwrap();
    let gw = Gateway::start(&["--redis", &redis.url()]).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    // Lines that take 10 s, in a window of 1 s.
    let lines = batch_lines("slow-10000", &["slow-0", "slow-1"]);
    let file = upload_batch_file(http, proxy, &lines).await;
    let batch = create_batch(http, proxy, &file, "1s").await;
    let id = batch["id"].as_str().unwrap().to_owned();
    assert_eq!(batch["status"], "in_progress", "{batch}");
    // Nobody reads the batch: it expires by itself when its window ends.
    let ended = stored_batch_until(&redis, &id, "expired").await;
    assert_eq!(ended["request_counts"]["failed"], 2, "{ended}");
    assert!(ended["output_file_id"].is_null());
    assert!(ended["expired_at"].as_u64().unwrap() >= ended["expires_at"].as_u64().unwrap());
    let errors = file_content(http, proxy, ended["error_file_id"].as_str().unwrap()).await;
    let codes: Vec<Value> = errors.iter().map(|l| l["error"]["code"].clone()).collect();
    assert_eq!(codes, vec![json!("batch_expired"), json!("batch_expired")]);
    gw.stop().await;
}

/// Polls Redis (not the gateway: nobody reads the batch) until batch `id`'s stored record
/// has `status`; the record's batch.
async fn stored_batch_until(redis: &RedisServer, id: &str, status: &str) -> Value {
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    until(&format!("the stored batch to be {status}"), || {
        let mut conn = conn.clone();
        async move {
            let raw: Option<String> = redis::cmd("GET")
                .arg(format!("floodgate:{{jobs}}:kv:batch:{id}"))
                .query_async(&mut conn)
                .await
                .ok()?;
            let stored: Value = serde_json::from_str(&raw?).ok()?;
            (stored["batch"]["status"] == status).then(|| stored["batch"].clone())
        }
    })
    .await
}

/// The JSON lines of ACME's file `id`.
async fn file_content(http: &reqwest::Client, proxy: &ProxyProcess, id: &str) -> Vec<Value> {
    http.get(proxy.url(&format!("/v1/files/{id}/content")))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Uploads `lines` (JSONL) as ACME's batch input file, as the SDK does; the file's id.
async fn upload_batch_file(http: &reqwest::Client, proxy: &ProxyProcess, lines: &str) -> String {
    let boundary = "floodgate-e2e-boundary";
    let body = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{lines}\r\n--{boundary}--\r\n"
    );
    let file: Value = http
        .post(proxy.url("/v1/files"))
        .bearer_auth(ACME)
        .header(
            "content-type",
            format!("multipart/form-data; boundary={boundary}"),
        )
        .body(body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(file["purpose"], "batch", "{file}");
    file["id"].as_str().unwrap().to_owned()
}

/// Creates ACME's batch over input `file` with completion `window`; the batch.
async fn create_batch(
    http: &reqwest::Client,
    proxy: &ProxyProcess,
    file: &str,
    window: &str,
) -> Value {
    http.post(proxy.url("/v1/batches"))
        .bearer_auth(ACME)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": window}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// JSONL of one chat line per custom id, to `model`.
fn batch_lines(model: &str, ids: &[&str]) -> String {
    ids.iter()
        .map(|id| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                   "body": {"model": model, "messages": [{"role": "user", "content": id}]}})
            .to_string()
                + "\n"
        })
        .collect()
}

#[tokio::test]
async fn a_batch_in_redis_is_ended_by_its_last_line_and_its_output_outlives_the_lines() {
    let redis = RedisServer::start().await.unwrap();
    let gw = Gateway::start(&["--redis", &redis.url()]).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    let file = upload_batch_file(http, proxy, &batch_lines("gpt-4o", &["one", "two"])).await;
    let id = create_batch(http, proxy, &file, "24h").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Nobody reads the batch: the worker ending its last line stores it completed, with its
    // output file.
    let stored = stored_batch_until(&redis, &id, "completed").await;
    let output = stored["output_file_id"].as_str().unwrap().to_owned();
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let counted: Option<i64> = redis::cmd("HGET")
        .arg("floodgate:{jobs}:batches")
        .arg(&id)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(counted, None, "the state is dropped when the batch ends");
    // The lines' jobs expire (their result TTL), as if a day had passed: the output stays.
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("floodgate:{jobs}:job:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(keys.len(), 2);
    let _: () = redis::cmd("DEL")
        .arg(&keys)
        .query_async(&mut conn)
        .await
        .unwrap();
    let batch = read_batch(http, proxy, &id).await;
    assert_eq!(batch["status"], "completed", "{batch}");
    assert_eq!(batch["request_counts"]["completed"], 2, "{batch}");
    assert_eq!(batch["output_file_id"], output.as_str());
    let answered: Vec<(String, String)> = file_content(http, proxy, &output)
        .await
        .iter()
        .map(|l| {
            let text = |v: &Value| v.as_str().unwrap().to_owned();
            (
                text(&l["custom_id"]),
                text(&l["response"]["body"]["object"]),
            )
        })
        .collect();
    let want = |id: &str| (id.to_owned(), "chat.completion".to_owned());
    assert_eq!(answered, vec![want("one"), want("two")]);
    // A batch that has ended cannot be cancelled: 409, as OpenAI answers, and it stays
    // completed.
    let r = http
        .post(proxy.url(&format!("/v1/batches/{id}/cancel")))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
    assert_eq!(
        body["error"]["message"],
        "Cannot cancel a batch with status 'completed'."
    );
    assert_eq!(read_batch(http, proxy, &id).await["status"], "completed");
    gw.stop().await;
}

/// ACME's batch `id` as `GET /v1/batches/{id}` answers it.
async fn read_batch(http: &reqwest::Client, proxy: &ProxyProcess, id: &str) -> Value {
    http.get(proxy.url(&format!("/v1/batches/{id}")))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A batch of `lines` created by ACME on a gateway that runs no job itself, sharing `redis`:
/// the gateway and the batch's id.
async fn idle_batch(redis: &RedisServer, lines: &str, extra: &[&str]) -> (Gateway, String) {
    let url = redis.url();
    let mut args = vec!["--redis", url.as_str(), "--job-workers", "0"];
    args.extend_from_slice(extra);
    let gw = Gateway::start(&args).await;
    let file = upload_batch_file(&gw.http, &gw.proxy, lines).await;
    let id = create_batch(&gw.http, &gw.proxy, &file, "24h").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    (gw, id)
}

#[tokio::test]
async fn a_batch_whose_last_worker_stopped_before_ending_it_is_ended_unread_by_a_sweep() {
    use floodgate_proxy::jobs::{JobStore as _, Status, Step, redis::RedisStore};
    let redis = RedisServer::start().await.unwrap();
    let lines = batch_lines("gpt-4o", &["one", "two"]);
    let (gw, id) = idle_batch(&redis, &lines, &["--job-visibility-ms", "1000"]).await;
    // The test is the only worker. It runs both lines and writes their outcomes; after the
    // last one's SAVE it stops: the batch is not ended, the last entry not acknowledged
    // (and no replica runs workers to reclaim it).
    let url = floodgate_proxy::secret::SecretString::new(redis.url());
    let store = RedisStore::new(&url, Duration::from_secs(1)).unwrap();
    for n in 0..2 {
        let claim = store.claim("stopping-worker", WAIT).await.unwrap().unwrap();
        let mut over = claim.job.clone();
        over.status = Status::Completed;
        over.result = Some(json!({"object": "chat.completion", "line": n}));
        let policy = floodgate_proxy::jobs::Policy::of(&Default::default(), "free");
        assert!(
            store
                .save(&claim, &over, Step::Finish, &policy)
                .await
                .unwrap()
        );
        if n == 0 {
            store.ack(&claim).await.unwrap();
        }
    }
    // Nobody reads the batch: a replica's sweep ends it once the worker's lease is over.
    let ended = stored_batch_until(&redis, &id, "completed").await;
    assert_eq!(ended["request_counts"]["completed"], 2, "{ended}");
    let output = file_content(
        &gw.http,
        &gw.proxy,
        ended["output_file_id"].as_str().unwrap(),
    )
    .await;
    let custom: Vec<&str> = output
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    assert_eq!(custom, ["one", "two"]);
    gw.stop().await;
}

#[tokio::test]
async fn a_running_batch_in_redis_is_read_in_a_few_store_calls_whatever_its_size() {
    const LINES: usize = 50;
    let redis = RedisServer::start().await.unwrap();
    let ids: Vec<String> = (0..LINES).map(|n| format!("line-{n}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let (gw, id) = idle_batch(&redis, &batch_lines("gpt-4o", &ids), &[]).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    let batch = read_batch(&gw.http, &gw.proxy, &id).await;
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(batch["status"], "in_progress", "{batch}");
    assert_eq!(batch["request_counts"]["total"], LINES, "{batch}");
    // Every command since the reset but this test's own: the read, and at most a few of the
    // replica's periodic ones (the batch sweep, the gauges) in the meantime.
    let calls: Vec<(String, u64)> = stats
        .lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .filter(|(name, _)| !["config", "info"].contains(&name.as_str()))
        .collect();
    let total: u64 = calls.iter().map(|(_, n)| n).sum();
    assert!(total <= 10, "a read of {LINES} lines took {calls:?}");
    gw.stop().await;
}

#[tokio::test]
async fn a_batch_in_redis_is_created_whole_or_not_at_all() {
    const LINES: usize = 20;
    let redis = RedisServer::start().await.unwrap();
    let gw = Gateway::start(&["--redis", &redis.url(), "--job-workers", "0"]).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    // Twenty lines of 50 KB each.
    let big = "x".repeat(50_000);
    let ids: Vec<String> = (0..LINES).map(|n| format!("{n}-{big}")).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    let file = upload_batch_file(http, proxy, &batch_lines("gpt-4o", &ids)).await;
    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // Redis refuses writes once it holds 200 KB more than now: a creation stored a line at a
    // time fails part-way.
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query_async(&mut conn)
        .await
        .unwrap();
    let used: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg(used + 200_000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let r = http
        .post(proxy.url("/v1/batches"))
        .bearer_auth(ACME)
        .json(&json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let body: Value = r.json().await.unwrap();
    let keys = |pattern: &str| {
        let mut conn = conn.clone();
        let pattern = pattern.to_owned();
        async move {
            redis::cmd("KEYS")
                .arg(pattern)
                .query_async::<Vec<String>>(&mut conn)
                .await
                .unwrap()
        }
    };
    let jobs = keys("floodgate:{jobs}:job:*").await;
    let batches = keys("floodgate:{jobs}:kv:batch*").await;
    let queued: u64 = redis::cmd("XLEN")
        .arg("floodgate:{jobs}:queue")
        .query_async(&mut conn)
        .await
        .unwrap();
    let state: Vec<String> = redis::cmd("HKEYS")
        .arg("floodgate:{jobs}:batches")
        .query_async(&mut conn)
        .await
        .unwrap();
    match status {
        // Whole: every line queued, the batch and its lines stored, its state counting all.
        200 => {
            assert_eq!((jobs.len(), queued as usize), (LINES, LINES), "{body}");
            assert_eq!(batches.len(), 2, "{batches:?}");
            let left: Option<u64> = redis::cmd("HGET")
                .arg("floodgate:{jobs}:batches")
                .arg(body["id"].as_str().unwrap())
                .query_async(&mut conn)
                .await
                .unwrap();
            assert_eq!(left, Some(LINES as u64));
        }
        // Refused: nothing of it stored, no line queued.
        503 => {
            assert_eq!((jobs.len(), queued), (0, 0), "lines left behind: {body}");
            assert!(
                batches.is_empty() && state.is_empty(),
                "{batches:?} {state:?}"
            );
        }
        other => panic!("unexpected {other}: {body}"),
    }
    gw.stop().await;
}

#[tokio::test]
async fn a_webhook_refused_once_is_retried_with_backoff_and_every_try_is_recorded() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (hook, got) = failing_receiver(1).await;
    let dir = config(&mock, &hook);
    let proxy = start(&dir, &[]).await;
    let http = reqwest::Client::new();
    let id = submit_id(&http, &proxy, ACME, &job("gpt-4o", "retry the hook")).await;
    let job = until("two delivery tries on the job", || async {
        let (_, job) = get(&http, &proxy, ACME, &id).await;
        (job["deliveries"].as_array().map(Vec::len) == Some(2)).then_some(job)
    })
    .await;
    let outcomes: Vec<&str> = job["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["http_503", "delivered"]);
    // The retry waited the TierQueue's first backoff (1 s).
    let at = |i: usize| job["deliveries"][i]["at_ms"].as_u64().unwrap();
    assert!(at(1) - at(0) >= 1000, "{job}");
    assert_eq!(verified_deliveries(&got).len(), 1);
    let metrics = metrics(&http, &proxy).await;
    for line in [
        "floodgate_jobs_webhook_deliveries_total{outcome=\"retried\"} 1",
        "floodgate_jobs_webhook_deliveries_total{outcome=\"delivered\"} 1",
        "floodgate_jobs_total{state=\"completed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_replica_starts_with_redis_unreachable_and_answers_jobs_503_meanwhile() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (hook, _got) = receiver().await;
    let dir = config(&mock, &hook);
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}");
    let proxy = start(&dir, &["--redis", &url]).await;
    let t = Instant::now();
    let http = reqwest::Client::new();
    let r = http
        .post(proxy.url("/v1/jobs"))
        .bearer_auth(ACME)
        .json(&job("gpt-4o", "later"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "answered at once, not after retries"
    );
    // Synchronous requests are served meanwhile.
    let chat = http
        .post(proxy.url("/v1/chat/completions"))
        .bearer_auth(ACME)
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "now"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(chat.status(), 200);
    proxy.stop().await.unwrap();
}

const SMTP_PASSWORD: &str = "smtp-pw-e2e-7f3a";

async fn sink(starttls: bool) -> SmtpSink {
    SmtpSink::start(SinkOptions {
        user: "mailer".to_owned(),
        password: SMTP_PASSWORD.to_owned(),
        starttls,
    })
    .await
    .unwrap()
}

fn email_job(text: &str, to: &str) -> Value {
    let mut body = job("gpt-4o", text);
    body["notify"] = json!({"email": to});
    body
}

/// The job's email tries: their outcomes, once `n` are recorded.
async fn email_tries(
    http: &reqwest::Client,
    proxy: &ProxyProcess,
    id: &str,
    n: usize,
) -> Vec<String> {
    until(&format!("{n} email tries on {id}"), || async {
        let (_, job) = get(http, proxy, ACME, id).await;
        let tries: Vec<String> = job["deliveries"]
            .as_array()?
            .iter()
            .filter(|d| d["channel"] == "email")
            .map(|d| d["outcome"].as_str().unwrap_or_default().to_owned())
            .collect();
        (tries.len() >= n).then_some(tries)
    })
    .await
}

#[tokio::test]
async fn a_job_asking_for_email_gets_one_over_starttls_naming_its_id_and_outcome() {
    let smtp = sink(true).await;
    let gw = Gateway::with_email(&smtp, SMTP_PASSWORD, "debug", |yaml| yaml).await;
    let (mock, proxy, http) = (&gw.mock, &gw.proxy, &gw.http);

    let id = submit_id(
        http,
        proxy,
        ACME,
        &email_job("mail me", "alice@example.com"),
    )
    .await;
    assert_eq!(finished(http, proxy, &id).await["status"], "completed");
    assert_eq!(email_tries(http, proxy, &id, 1).await, ["delivered"]);
    let mails = smtp.mails();
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(mail.to, ["alice@example.com"]);
    assert_eq!(mail.from, "floodgate@example.com");
    assert_eq!(mail.user, "mailer");
    assert!(mail.tls, "sent after STARTTLS");
    assert!(
        mail.data
            .contains(&format!("Subject: [floodgate] job {id} completed")),
        "{}",
        mail.data
    );
    assert!(
        mail.data
            .contains(&format!("Job: {id}\r\nOutcome: completed")),
        "{}",
        mail.data
    );
    // The notification's own Message-ID: the same on any re-send, so a duplicate can be dropped.
    assert!(
        mail.data
            .contains(&format!("Message-ID: <{id}.0@example.com>\r\n")),
        "{}",
        mail.data
    );
    // Logged in once, over TLS, never in plain text.
    assert_eq!(smtp.refused_plain(), 0);
    let logins = smtp.logins();
    assert!(
        logins.len() == 1 && logins[0].accepted && logins[0].tls,
        "{logins:?}"
    );

    // A failed job is told too, with its error.
    mock.set_fault(Provider::OpenAi, Fault::Status(500));
    let failed = submit_id(http, proxy, ACME, &email_job("doomed", "bob@example.com")).await;
    assert_eq!(finished(http, proxy, &failed).await["status"], "failed");
    assert_eq!(email_tries(http, proxy, &failed, 1).await, ["delivered"]);
    let mails = smtp.mails();
    let told = mails.iter().find(|m| m.to == ["bob@example.com"]).unwrap();
    assert!(
        told.data
            .contains(&format!("Subject: [floodgate] job {failed} failed"))
    );
    assert!(
        told.data
            .contains("Outcome: failed\r\nAttempts: 3\r\nError: "),
        "{}",
        told.data
    );

    // Bad addresses are a 400 naming the field.
    let r = http
        .post(proxy.url("/v1/jobs"))
        .bearer_auth(ACME)
        .json(&email_job("x", "not an address"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_email", "{body}");
    assert!(!proxy.log().iter().any(|l| l.contains(SMTP_PASSWORD)));
    gw.stop().await;
}

#[tokio::test]
async fn a_tier_notifying_by_email_writes_to_its_own_recipient_but_not_per_batch_line() {
    let smtp = sink(true).await;
    let gw = Gateway::with_email(&smtp, SMTP_PASSWORD, "info", |yaml| {
        yaml.replacen("notify: [webhook]", "notify: [webhook, email]", 1)
            .replacen(
                "email: {from: \"floodgate@example.com\",",
                "email: {from: \"floodgate@example.com\", to: \"ops@example.com\",",
                1,
            )
    })
    .await;
    let (proxy, http, got) = (&gw.proxy, &gw.http, &gw.got);

    // A job naming no address: the tier's recipient is told.
    let plain = submit_id(http, proxy, ACME, &job("gpt-4o", "tier mail")).await;
    assert_eq!(email_tries(http, proxy, &plain, 1).await, ["delivered"]);
    // A job naming its own: that one only.
    let own = submit_id(http, proxy, ACME, &email_job("own mail", "bob@example.com")).await;
    assert_eq!(email_tries(http, proxy, &own, 1).await, ["delivered"]);
    let to: Vec<Vec<String>> = smtp.mails().iter().map(|m| m.to.clone()).collect();
    assert_eq!(to, [["ops@example.com"], ["bob@example.com"]]);

    // A batch's lines are told by the tier's webhook, not by one mail each.
    let file = upload_batch_file(http, proxy, &batch_lines("gpt-4o", &["l1", "l2"])).await;
    let id = create_batch(http, proxy, &file, "24h").await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    until("the batch to complete", || async {
        let b: Value = http
            .get(proxy.url(&format!("/v1/batches/{id}")))
            .bearer_auth(ACME)
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (b["status"] == "completed").then_some(())
    })
    .await;
    let lines: Vec<String> = until("a webhook for each line", || async {
        let lines: Vec<String> = verified_deliveries(got)
            .into_iter()
            .filter(|(_, body)| body["job"]["batch"] == id.as_str())
            .map(|(job, _)| job)
            .collect();
        (lines.len() == 2).then_some(lines)
    })
    .await;
    for line in &lines {
        // Its notification is recorded once every channel is done with it.
        let channels: Vec<Value> = until("the line's deliveries", || async {
            let (_, job) = get(http, proxy, ACME, line).await;
            let d = job["deliveries"].as_array()?.clone();
            (!d.is_empty()).then(|| d.iter().map(|d| d["channel"].clone()).collect())
        })
        .await;
        assert_eq!(channels, [json!("webhook")], "{line}");
    }
    assert_eq!(smtp.mails().len(), 2, "no mail for the batch's lines");
    gw.stop().await;
}

#[tokio::test]
async fn bad_smtp_credentials_are_recorded_as_failed_deliveries_retried_and_never_logged() {
    const WRONG: &str = "wrong-pw-e2e-91c2";
    let smtp = sink(true).await;
    let gw = Gateway::with_email(&smtp, WRONG, "debug", |yaml| yaml).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    let id = submit_id(
        http,
        proxy,
        ACME,
        &email_job("mail me", "alice@example.com"),
    )
    .await;
    assert_eq!(finished(http, proxy, &id).await["status"], "completed");
    // Three tries (the TierQueue's maxAttempts), each refused by the server's 535.
    let tries = email_tries(http, proxy, &id, 3).await;
    assert_eq!(tries, ["smtp_535", "smtp_535", "smtp_535"]);
    let (_, job) = get(http, proxy, ACME, &id).await;
    let at = |i: usize| {
        job["deliveries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["channel"] == "email")
            .nth(i)
            .unwrap()["at_ms"]
            .as_u64()
            .unwrap()
    };
    assert!(at(1) - at(0) >= 1000, "backoff between tries: {job}");
    let logins = smtp.logins();
    assert_eq!(logins.len(), 3, "{logins:?}");
    assert!(
        logins
            .iter()
            .all(|l| l.tls && !l.accepted && l.user == "mailer")
    );
    assert!(smtp.mails().is_empty());
    let metrics = metrics(http, proxy).await;
    assert!(
        metrics.contains("floodgate_jobs_email_deliveries_total{outcome=\"failed\"} 3"),
        "{metrics}"
    );
    let log = proxy.log();
    assert!(log.iter().any(|l| l.contains("email not delivered")));
    assert!(
        !log.iter()
            .any(|l| l.contains(WRONG) || l.contains(SMTP_PASSWORD))
    );
    gw.stop().await;
}

#[tokio::test]
async fn a_server_that_offers_no_starttls_gets_no_credentials_and_no_mail() {
    let smtp = sink(false).await;
    let gw = Gateway::with_email(&smtp, SMTP_PASSWORD, "info", |yaml| yaml).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    let id = submit_id(
        http,
        proxy,
        ACME,
        &email_job("mail me", "alice@example.com"),
    )
    .await;
    let tries = email_tries(http, proxy, &id, 3).await;
    assert_eq!(tries, ["error", "error", "error"]);
    assert!(smtp.logins().is_empty(), "{:?}", smtp.logins());
    assert_eq!(smtp.refused_plain(), 0);
    assert!(smtp.mails().is_empty());
    gw.stop().await;
}

/// A webhook receiver that records each POST when it arrives and answers it `delay` later.
async fn slow_receiver(delay: Duration) -> (String, Received) {
    let got: Received = Arc::default();
    let store = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let store = store.clone();
            async move {
                store.lock().unwrap().push((headers, body));
                tokio::time::sleep(delay).await;
                axum::http::StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), got)
}

#[tokio::test]
async fn a_jobs_own_webhook_into_the_gateways_network_is_refused_unless_allowed() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (tier_hook, _) = receiver().await;
    let (own_hook, got) = receiver().await;
    let dir = config(&mock, &tier_hook);
    let http = reqwest::Client::new();
    let with_hook = |url: &str| {
        let mut body = job("gpt-4o", "own hook");
        body["notify"] = json!({"webhook": url});
        body
    };
    let proxy = start(&dir, &[]).await;
    for url in [
        own_hook.as_str(),
        "http://localhost:9/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/hook",
        "http://[::1]:9/hook",
    ] {
        let r = http
            .post(proxy.url("/v1/jobs"))
            .bearer_auth(ACME)
            .json(&with_hook(url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{url}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "invalid_webhook", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("`notify.webhook`"),
            "{body}"
        );
    }
    proxy.stop().await.unwrap();
    // With the opt-in, the loopback receiver is told.
    let proxy = start(&dir, &["--job-webhook-private-addresses"]).await;
    let id = submit_id(&http, &proxy, ACME, &with_hook(&own_hook)).await;
    let delivered = until("the job's own webhook", || async {
        let d = verified_deliveries(&got);
        (!d.is_empty()).then_some(d)
    })
    .await;
    assert_eq!(delivered[0].0, id);
    proxy.stop().await.unwrap();
}

/// The config directory's YAML without the tier's `async` settings (webhook, its secret).
fn without_tier_webhook(yaml: &str, hook: &str) -> String {
    let settings = format!(
        "    async:\n      notify: [webhook]\n      webhook: {{url: \"{hook}\", signingSecretRef: {{name: keys, key: signing}}}}\n"
    );
    assert!(yaml.contains(&settings));
    yaml.replace(&settings, "")
}

#[tokio::test]
async fn a_jobs_own_webhook_in_a_tier_without_webhook_settings_is_refused() {
    // Such a tier has no signingSecretRef: the job's URL would be sent unsigned.
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (own_hook, _) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = without_tier_webhook(&config_yaml(&mock, &own_hook, 1000), &own_hook);
    std::fs::write(dir.path().join("all.yaml"), yaml).unwrap();
    let proxy = start(&dir, &["--job-webhook-private-addresses"]).await;
    let http = reqwest::Client::new();
    let mut body = job("gpt-4o", "own hook");
    body["notify"] = json!({"webhook": own_hook});
    let r = http
        .post(proxy.url("/v1/jobs"))
        .bearer_auth(ACME)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "webhook_not_configured", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("tier free has no webhook settings"),
        "{body}"
    );
    // Without `notify.webhook` the same tier takes jobs.
    submit_id(&http, &proxy, ACME, &job("gpt-4o", "no hook")).await;
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn a_jobs_own_webhook_sent_unsigned_after_its_tier_lost_its_settings_is_logged() {
    let redis = RedisServer::start().await.unwrap();
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (own_hook, got) = receiver().await;
    let yaml = config_yaml(&mock, &own_hook, 1000);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("all.yaml"), &yaml).unwrap();
    let url = redis.url();
    let allow = "--job-webhook-private-addresses";
    // Queued while the tier signs its jobs' own URLs, by a replica that runs none.
    let accept = start(
        &dir,
        &["--redis", url.as_str(), "--job-workers", "0", allow],
    )
    .await;
    let http = reqwest::Client::new();
    let mut body = job("gpt-4o", "own hook");
    body["notify"] = json!({"webhook": own_hook});
    let id = submit_id(&http, &accept, ACME, &body).await;
    accept.stop().await.unwrap();
    // The tier's webhook settings are removed; a replica with workers runs and tells it.
    std::fs::write(
        dir.path().join("all.yaml"),
        without_tier_webhook(&yaml, &own_hook),
    )
    .unwrap();
    let run = start(&dir, &["--redis", url.as_str(), allow]).await;
    let sent = until("the job's own webhook", || async {
        got.lock().unwrap().first().cloned()
    })
    .await;
    assert!(
        sent.0.get(webhook::SIGNATURE_HEADER).is_none(),
        "{:?}",
        sent.0
    );
    let told: Value = serde_json::from_slice(&sent.1).unwrap();
    assert_eq!(told["job"]["id"], id.as_str());
    let warned = run
        .wait_for_log("webhook sent unsigned", Duration::from_secs(5))
        .await
        .unwrap();
    assert!(warned.contains(&id), "{warned}");
    run.stop().await.unwrap();
}

in_memory_and_redis!(
    a_cancelled_job_is_told_by_webhook_and_event_stream,
    a_cancelled_job_in_redis_is_told_by_webhook_and_event_stream,
    cancelled_job_is_told
);

async fn cancelled_job_is_told(extra: &[&str]) {
    let gw = Gateway::start(extra).await;
    let (mock, proxy, http, got) = (&gw.mock, &gw.proxy, &gw.http, &gw.got);
    // One job cancelled while it runs, one while it waits for its retry.
    let running = submit_id(http, proxy, ACME, &job("slow-2000", "cancel me")).await;
    let events = http
        .get(proxy.url(&format!("/v1/jobs/{running}/events")))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    until("the job to run", || async {
        (get(http, proxy, ACME, &running).await.1["status"] == "running").then_some(())
    })
    .await;
    let cancel = |id: String| {
        let http = http.clone();
        let url = proxy.url(&format!("/v1/jobs/{id}"));
        async move {
            let r = http.delete(url).bearer_auth(ACME).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
    };
    cancel(running.clone()).await;
    let (names, body) = event_names(events).await;
    assert_eq!(
        names.last().map(String::as_str),
        Some("cancelled"),
        "{body}"
    );

    mock.set_fault(Provider::OpenAi, Fault::Status(500));
    let retrying = submit_id(http, proxy, ACME, &job("gpt-4o", "retry then cancel")).await;
    until("the job to wait for its retry", || async {
        (get(http, proxy, ACME, &retrying).await.1["status"] == "retrying").then_some(())
    })
    .await;
    cancel(retrying.clone()).await;

    let told = until("two job.cancelled webhooks", || async {
        let d = verified_deliveries(got);
        (d.len() >= 2).then_some(d)
    })
    .await;
    let mut told: Vec<(String, Value)> = told
        .into_iter()
        .map(|(id, body)| (id, body["type"].clone()))
        .collect();
    told.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want = vec![
        (running, json!("job.cancelled")),
        (retrying, json!("job.cancelled")),
    ];
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(told, want);
    gw.stop().await;
}

#[tokio::test]
async fn a_slow_webhook_receiver_holds_no_worker() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (hook, got) = slow_receiver(Duration::from_secs(6)).await;
    let dir = config(&mock, &hook);
    let proxy = start(&dir, &["--job-workers", "1"]).await;
    let http = reqwest::Client::new();
    let first = submit_id(&http, &proxy, ACME, &job("gpt-4o", "first")).await;
    until("the first webhook to arrive", || async {
        (!got.lock().unwrap().is_empty()).then_some(())
    })
    .await;
    // The only worker is free while the receiver sits on the first delivery.
    let second = submit_id(&http, &proxy, ACME, &job("gpt-4o", "second")).await;
    let t = Instant::now();
    assert_eq!(
        finished(&http, &proxy, &second).await["status"],
        "completed"
    );
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    // The first delivery is still in flight (its tries are recorded when it ends).
    let (_, first) = get(&http, &proxy, ACME, &first).await;
    assert_eq!(first["deliveries"], json!([]), "{first}");
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn redis_dead_letters_outlive_the_result_ttl_and_a_redrive_never_drops_one_it_cannot_queue() {
    use floodgate_proxy::jobs::{Job, JobStore as _, Policy, Status, Step, redis::RedisStore};
    let redis = RedisServer::start().await.unwrap();
    let url = floodgate_proxy::secret::SecretString::new(redis.url());
    let store = RedisStore::new(&url, Duration::from_secs(30)).unwrap();
    let policy = Policy {
        retry: floodgate_proxy::jobs::retry::Backoff {
            max_attempts: 3,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(2),
        },
        dead_letters: true,
        retention: Duration::from_secs(7 * 86_400),
        result_ttl: Duration::from_secs(60),
    };
    let request = json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]});
    let job = Job::new(Some("acme".to_owned()), "free".to_owned(), request, 3);
    let job = store.submit(job, 0).await.unwrap().queued().unwrap();
    let claim = store.claim("w", WAIT).await.unwrap().unwrap();
    let mut dead = claim.job.clone();
    dead.status = Status::Failed;
    dead.attempts = 3;
    dead.dead_letter = true;
    assert!(
        store
            .save(&claim, &dead, Step::Finish, &policy)
            .await
            .unwrap()
    );
    store.ack(&claim).await.unwrap();

    let mut conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let key = format!("floodgate:{{jobs}}:job:{}", job.id);
    // Kept for the dead letters' retention, not the result TTL.
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(ttl > 60 && ttl <= 7 * 86_400, "TTL {ttl}");

    // A job that cannot be read is not re-driven, and stays a dead letter.
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("job")
        .arg("{not json")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(store.redrive(Some(&job.id)).await.is_err());
    let dead_len = |mut conn: redis::aio::MultiplexedConnection| async move {
        redis::cmd("XLEN")
            .arg("floodgate:{jobs}:dead")
            .query_async::<u64>(&mut conn)
            .await
            .unwrap()
    };
    assert_eq!(dead_len(conn.clone()).await, 1);
    // Mended, it is re-driven once: a second re-drive finds nothing.
    let _: () = redis::cmd("HSET")
        .arg(&key)
        .arg("job")
        .arg(serde_json::to_string(&dead).unwrap())
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(store.redrive(Some(&job.id)).await.unwrap(), 1);
    assert_eq!(store.redrive(Some(&job.id)).await.unwrap(), 0);
    assert_eq!(dead_len(conn.clone()).await, 0);
    let again = store.claim("w", WAIT).await.unwrap().unwrap();
    assert_eq!(again.job.id, job.id);
    assert_eq!((again.job.status, again.job.attempts), (Status::Queued, 0));
    let ttl: i64 = redis::cmd("TTL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "a queued job does not expire");
}

in_memory_and_redis!(
    a_tenant_past_its_pending_jobs_bound_gets_429_and_the_backlog_is_a_gauge,
    a_tenant_past_its_pending_jobs_bound_in_redis_gets_429_and_the_backlog_is_a_gauge,
    pending_bound
);

async fn pending_bound(extra: &[&str]) {
    let mut args = extra.to_vec();
    // No worker here: the jobs stay queued.
    args.extend(["--job-workers", "0", "--job-max-pending-per-tenant", "2"]);
    let gw = Gateway::start(&args).await;
    let (proxy, http) = (&gw.proxy, &gw.http);
    let post = |key: &'static str| {
        http.post(proxy.url("/v1/jobs"))
            .bearer_auth(key)
            .json(&job("gpt-4o", "queued"))
            .send()
    };
    let first = post(ACME).await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(post(ACME).await.unwrap().status(), 202);
    let refused = post(ACME).await.unwrap();
    assert_eq!(refused.status(), 429);
    assert!(refused.headers().contains_key("retry-after"));
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_pending_jobs", "{body}");
    // Another tenant has a bound of its own.
    assert_eq!(post(GLOBEX).await.unwrap().status(), 202);
    // The backlog by tier and tenant.
    let gauge = |text: &str, tenant: &str| -> Option<u64> {
        let line = format!("floodgate_jobs_pending{{tier=\"free\",tenant=\"{tenant}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(line.as_str()))
            .and_then(|v| v.trim().parse().ok())
    };
    until("the pending gauges", || async {
        let text = http
            .get(proxy.admin_url("/metrics"))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        (gauge(&text, "acme") == Some(2) && gauge(&text, "globex") == Some(1)).then_some(())
    })
    .await;
    // A cancelled job is over: room for one more.
    let id = first["id"].as_str().unwrap();
    let r = http
        .delete(proxy.url(&format!("/v1/jobs/{id}")))
        .bearer_auth(ACME)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(post(ACME).await.unwrap().status(), 202);
    assert_eq!(post(ACME).await.unwrap().status(), 429);
    gw.stop().await;
}

in_memory_and_redis!(
    concurrent_submissions_of_one_tenant_never_pass_its_pending_bound,
    concurrent_submissions_in_redis_never_pass_the_pending_bound_across_replicas,
    concurrent_bound
);

/// 64 submissions of one tenant at once, bound 5: exactly 5 accepted, however they
/// interleave (with Redis, sent to two replicas sharing the store).
async fn concurrent_bound(extra: &[&str]) {
    const BOUND: usize = 5;
    const SENT: usize = 64;
    let mut args = extra.to_vec();
    args.extend(["--job-workers", "0", "--job-max-pending-per-tenant", "5"]);
    let gw = Gateway::start(&args).await;
    let (a, http) = (&gw.proxy, &gw.http);
    // In memory each replica has its own store: one replica. With Redis: two.
    let b = if extra.is_empty() {
        None
    } else {
        Some(start(&gw.dir, &args).await)
    };
    let body = job("gpt-4o", "at once");
    let sends = (0..SENT).map(|i| {
        let proxy = match &b {
            Some(b) if i % 2 == 1 => b,
            _ => a,
        };
        http.post(proxy.url("/v1/jobs"))
            .bearer_auth(ACME)
            .json(&body)
            .send()
    });
    let statuses: Vec<u16> = futures::future::join_all(sends)
        .await
        .into_iter()
        .map(|r| r.unwrap().status().as_u16())
        .collect();
    let accepted = statuses.iter().filter(|s| **s == 202).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((accepted, refused), (BOUND, SENT - BOUND), "{statuses:?}");
    gw.stop().await;
    if let Some(b) = b {
        b.stop().await.unwrap();
    }
}
