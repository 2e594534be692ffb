//! The binary's connection bounds, set by its flags, against real sockets: a half-sent head
//! is closed after `--header-read-timeout-ms`, an idle keep-alive connection after
//! `--idle-timeout-ms`, a body sent too slowly is answered 408 in the door's format after
//! `--body-read-timeout-ms`, and connections beyond `--max-connections` are refused, logged
//! and counted; `--probe-listen` serves the probes only.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const HEADER_MS: u64 = 300;
const IDLE_MS: u64 = 1500;
const BODY_MS: u64 = 500;
const PATIENCE: Duration = Duration::from_secs(15);

/// A config directory with one pool of one key on `mock`.
fn pool_dir(mock: &MockProviders) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let manifests = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  a: sk-conn-test\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}, {{name: gpt-4o-stall}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        mock.base_url()
    );
    std::fs::write(dir.path().join("pool.yaml"), manifests).unwrap();
    dir
}

async fn proxy(mock: &MockProviders, max_connections: usize) -> (ProxyProcess, tempfile::TempDir) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = pool_dir(mock);
    let (header, idle, body, max) = (
        HEADER_MS.to_string(),
        IDLE_MS.to_string(),
        BODY_MS.to_string(),
        max_connections.to_string(),
    );
    let args = [
        "--config",
        dir.path().to_str().unwrap(),
        "--watch-interval-ms",
        "0",
        "--workers",
        "2",
        "--header-read-timeout-ms",
        &header,
        "--idle-timeout-ms",
        &idle,
        "--body-read-timeout-ms",
        &body,
        "--max-connections",
        &max,
    ];
    (ProxyProcess::start(args, &[]).await.unwrap(), dir)
}

/// Reads until the proxy closes the connection; returns what it sent.
async fn until_closed(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let read = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the proxy kept the connection open");
    String::from_utf8_lossy(&out).into_owned()
}

/// One keep-alive `GET /healthz` on `tcp`, read to the end of its answer.
async fn healthz(tcp: &mut TcpStream) {
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !String::from_utf8_lossy(&got).ends_with("ok") {
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed before the answer");
        got.extend_from_slice(&buf[..n]);
    }
}

#[tokio::test]
async fn slow_heads_and_idle_connections_are_closed() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (proxy, _dir) = proxy(&mock, 100).await;
    // Half a head.
    let mut slow = TcpStream::connect(proxy.addr()).await.unwrap();
    let started = Instant::now();
    slow.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // An idle keep-alive connection, after one request.
    let mut idle = TcpStream::connect(proxy.addr()).await.unwrap();
    // Its idle time starts when the proxy has sent the answer, after the request went out
    // (measuring from when the client had read it would count the answer's way back too).
    let idle_from = Instant::now();
    healthz(&mut idle).await;
    let (slow_answer, ()) = tokio::join!(until_closed(&mut slow), async {
        until_closed(&mut idle).await;
    });
    let idle_took = idle_from.elapsed();
    assert!(slow_answer.is_empty(), "{slow_answer}");
    assert!(idle_took >= Duration::from_millis(IDLE_MS), "{idle_took:?}");
    let slow_took = started.elapsed();
    assert!(
        slow_took >= Duration::from_millis(HEADER_MS),
        "{slow_took:?}"
    );
    let metrics = reqwest::get(proxy.admin_url("/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for reason in ["header_timeout", "idle_timeout"] {
        let line = format!(
            "floodgate_server_connections_closed_total{{listener=\"public\",reason=\"{reason}\"}} "
        );
        assert!(metrics.contains(&line), "{reason}: {metrics}");
    }
}

#[tokio::test]
async fn a_body_sent_too_slowly_is_answered_408_in_the_doors_format() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (proxy, _dir) = proxy(&mock, 100).await;
    for (path, extra) in [
        ("/v1/chat/completions", ""),
        ("/v1/messages", "anthropic-version: 2023-06-01\r\n"),
    ] {
        let mut tcp = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = Instant::now();
        let head = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n{extra}content-length: 200\r\n\r\n{{\"model\": \"gpt-4o\""
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        // The rest of the body never comes.
        let answer = until_closed(&mut tcp).await;
        let took = started.elapsed();
        assert!(answer.starts_with("HTTP/1.1 408"), "{path}: {answer}");
        assert!(took >= Duration::from_millis(BODY_MS), "{took:?}");
        let body = answer.split("\r\n\r\n").nth(1).unwrap();
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        if path == "/v1/messages" {
            assert_eq!(body["type"], "error", "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
        } else {
            assert_eq!(body["error"]["code"], "request_timeout", "{body}");
        }
    }
    assert_eq!(mock.counts().total(), 0);
}

/// At the cap, a new connection takes the slot of the connection idle longest; only when
/// every connection has a request in flight (here, to a provider that never answers) is it
/// refused, logged and counted.
#[tokio::test]
async fn connections_beyond_the_cap_are_refused_logged_and_counted() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (proxy, _dir) = proxy(&mock, 3).await;
    let mut idle = TcpStream::connect(proxy.addr()).await.unwrap();
    healthz(&mut idle).await;
    let mut held = Vec::new();
    let body = r#"{"model": "gpt-4o-stall", "messages": [{"role": "user", "content": "hi"}]}"#;
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(proxy.addr()).await.unwrap();
        let request = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        held.push(tcp);
    }
    // Both stalled requests reached the provider: in flight.
    let deadline = Instant::now() + PATIENCE;
    while mock.counts().total() < 2 {
        assert!(
            Instant::now() < deadline,
            "the requests never reached the mock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A new connection takes the idle one's slot.
    let mut fresh = TcpStream::connect(proxy.addr()).await.unwrap();
    healthz(&mut fresh).await;
    let sent = until_closed(&mut idle).await;
    assert!(sent.is_empty(), "{sent}");
    // `fresh` is idle now: the next one takes its slot in turn. With a request in flight on
    // every connection, the one after is refused.
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    fresh.write_all(request.as_bytes()).await.unwrap();
    while mock.counts().total() < 3 {
        assert!(
            Instant::now() < deadline,
            "the request never reached the mock"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    held.push(fresh);
    let mut over = TcpStream::connect(proxy.addr()).await.unwrap();
    let _ = over
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let answer = until_closed(&mut over).await;
    assert!(answer.is_empty(), "{answer}");
    proxy
        .wait_for_log("connection limit reached", PATIENCE)
        .await
        .unwrap();
    drop(held.pop());
    let deadline = Instant::now() + PATIENCE;
    let metrics = loop {
        if let Ok(response) = reqwest::get(proxy.admin_url("/metrics")).await {
            break response.text().await.unwrap();
        }
        assert!(Instant::now() < deadline, "no connection slot freed up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let refused = metrics
        .lines()
        .find_map(|l| {
            l.strip_prefix("floodgate_server_connections_refused_total{listener=\"public\"} ")
        })
        .unwrap();
    assert!(refused.parse::<u64>().unwrap() >= 1, "{metrics}");
}

/// `--probe-listen`: the kubelet's listener (the sidecar's, on the pod's IP) answers the
/// probes and nothing else: no door, no metrics, no admin API.
#[tokio::test]
async fn the_probe_listener_serves_only_the_probes() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let dir = pool_dir(&mock);
    let args = [
        "--config",
        dir.path().to_str().unwrap(),
        "--watch-interval-ms",
        "0",
        "--probe-listen",
        "127.0.0.1:0",
    ];
    let proxy = ProxyProcess::start(args, &[]).await.unwrap();
    let line = proxy
        .wait_for_log("floodgate-proxy serving", PATIENCE)
        .await
        .unwrap();
    let fields: serde_json::Value = serde_json::from_str(&line).unwrap();
    let probes = fields["fields"]["probe_listen"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(probes, proxy.addr().to_string());
    let http = reqwest::Client::new();
    let status = async |method: reqwest::Method, path: &str| {
        http.request(method, format!("http://{probes}{path}"))
            .header("authorization", "Bearer sk-anything")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(reqwest::Method::GET, "/healthz").await, 200);
    assert_eq!(status(reqwest::Method::GET, "/readyz").await, 200);
    for path in ["/v1/models", "/metrics", "/admin/capacity"] {
        assert_eq!(status(reqwest::Method::GET, path).await, 404, "{path}");
    }
    assert_eq!(
        status(reqwest::Method::POST, "/v1/chat/completions").await,
        404
    );
    // The public listener still serves the doors.
    let models = http.get(proxy.url("/v1/models")).send().await.unwrap();
    assert_ne!(models.status().as_u16(), 404);
    // Nothing sent to the probe listener reached a provider.
    assert!(mock.counts().keys.is_empty(), "{:?}", mock.counts());
}
