//! Defects found in review, each with the test that failed before its fix: a provider that
//! cannot be connected to costs `timeouts.connectMs`, not the whole request's time; and a
//! stream's outcome is counted when it ends (a broken stream is not `ok`, a caller who hung
//! up is `client_closed`).
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const MIN: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A listener whose accept queue is full and never drained: the kernel drops further SYNs,
/// so a connect to it hangs rather than failing. The returned sockets keep it full.
fn black_hole() -> (
    SocketAddr,
    tokio::net::TcpListener,
    Vec<std::net::TcpStream>,
) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    // A backlog of 1 holds two completed connections; more only to be sure it is full.
    for _ in 0..4 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            fillers.push(s);
        }
    }
    assert!(
        std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_err(),
        "the accept queue is full: a further connect hangs"
    );
    (addr, listener, fillers)
}

fn pool(dead: SocketAddr, base: &str, extra: &str) -> String {
    pool_at(&format!("http://{dead}"), base, extra)
}

/// The pool of [`pool`] with the dead provider at `dead`, a URL.
fn pool_at(dead: &str, base: &str, extra: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a, b: key-b}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 fallback: [dead, alive]\n  timeouts: {{connectMs: 300, requestSeconds: 30}}\n  providers:\n\
         \x20 - {{name: dead, type: openai, baseUrl: \"{dead}\", models: [{{name: gpt-4o}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n\
         \x20 - {{name: alive, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}{extra}], keys: [{{secretRef: {{name: keys, key: b}}, rpm: 1000}}]}}\n"
    )
}

/// Starts a gateway whose first provider is `dead` (a URL) and asks once: the answer must
/// come from the live provider on the second attempt, well before the dead one's 30 s
/// request time (its failed connect costs `connectMs`, 300 ms).
async fn falls_over_within_the_connect_timeout(dead: &str) {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &pool_at(dead, &mock.base_url(), ""),
        MIN,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let response = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .timeout(Duration::from_secs(25))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        // Answered before the 25 s client timeout, so before the dead provider's 30 s.
        .unwrap();
    let took = started.elapsed();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-floodgate-provider"], "alive");
    assert_eq!(response.headers()["x-floodgate-attempts"], "2");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[tokio::test]
async fn an_unreachable_provider_costs_the_connect_timeout_not_the_request_time() {
    let (dead, _listener, _fillers) = black_hole();
    falls_over_within_the_connect_timeout(&format!("http://{dead}")).await;
}

/// Opening a connection includes its TLS handshake: a server that accepts TCP and never
/// answers the client hello costs `connectMs` too, not the request's time.
#[tokio::test]
async fn a_tls_handshake_that_never_completes_costs_the_connect_timeout() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    // Accepts and holds every connection, silent, until the test ends.
    let held = tokio::spawn(async move {
        let mut sockets = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            sockets.push(socket);
        }
    });
    falls_over_within_the_connect_timeout(&format!("https://{addr}")).await;
    held.abort();
}

async fn requests_total(gw: &Gateway, model: &str, outcome: &str) -> u64 {
    let metrics = client()
        .get(format!("{}/metrics", gw.admin_url()))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .filter(|l| l.starts_with("floodgate_requests_total"))
        .filter(|l| l.contains(&format!("model=\"{model}\"")))
        .filter(|l| l.contains(&format!("outcome=\"{outcome}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_stream_is_counted_when_it_ends_and_as_it_ended() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (dead, _listener, _fillers) = black_hole();
    let yaml = pool(
        dead,
        &mock.base_url(),
        ", {name: gpt-truncate}, {name: gpt-stall}, {name: gpt-whole}",
    );
    let gw = Gateway::start(&yaml, MIN, Duration::from_secs(5))
        .await
        .unwrap();
    let stream = |model: &str| {
        client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .json(&json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    // Broken half-way: an error event and no [DONE], counted with the reason.
    let body = stream("gpt-truncate").await.unwrap().text().await.unwrap();
    assert!(
        body.contains("\"error\"") && !body.contains("[DONE]"),
        "{body}"
    );
    assert_eq!(requests_total(&gw, "gpt-truncate", "truncated").await, 1);
    assert_eq!(requests_total(&gw, "gpt-truncate", "ok").await, 0);
    // Whole: counted ok once its last event is out.
    // (Metrics are per process: each test here counts its own model names.)
    let body = stream("gpt-whole").await.unwrap().text().await.unwrap();
    assert!(body.ends_with("data: [DONE]\n\n"), "{body}");
    assert_eq!(requests_total(&gw, "gpt-whole", "ok").await, 1);
    // The caller hangs up after the first chunk of a slow stream.
    let mut response = stream("gpt-stall").await.unwrap();
    assert!(response.chunk().await.unwrap().is_some());
    drop(response);
    let mut counted = 0;
    for _ in 0..200 {
        counted = requests_total(&gw, "gpt-stall", "client_closed").await;
        if counted == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        counted, 1,
        "a stream the caller left is counted client_closed"
    );
    assert_eq!(requests_total(&gw, "gpt-stall", "ok").await, 0);
}
