//! Upstream failures are told apart: a port nobody listens on (`connect`), a server that does
//! not speak TLS to an `https` URL or resets or ignores the client hello (`tls`), a server
//! that never answers (`timeout`), a stream that goes silent (`stalled`), a connection closed
//! in the middle of a response (`upstream_closed`) and a server that does not answer in HTTP
//! (`malformed`) each get their own code and message, against real sockets.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

const MIN: Duration = Duration::from_secs(60);

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A gateway whose one provider is at `base`, with short timers (1 s to answer, 1 s of
/// stream silence).
async fn gateway(base: &str) -> Gateway {
    let yaml = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 timeouts: {{connectMs: 500, requestSeconds: 1, streamIdleSeconds: 1}}\n  providers:\n\
         \x20 - {{name: up, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}], keys: [{{secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n"
    );
    Gateway::start(&yaml, MIN, Duration::from_secs(5))
        .await
        .unwrap()
}

/// The status and error body of one chat request.
async fn ask(gw: &Gateway, stream: bool) -> (u16, Value) {
    let response = client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .timeout(Duration::from_secs(20))
        .json(&json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    if let Ok(body) = serde_json::from_str(&text) {
        return (status, body);
    }
    // A stream already started (a caller still waiting after a second gets its stream and
    // progress comments): the failure is its one error event.
    let event = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .find(|data| data.contains("\"error\""))
        .unwrap();
    (status, serde_json::from_str(event).unwrap())
}

/// A loopback server that reads each connection's request and then does `act` with it.
async fn server<F, Fut>(act: F) -> SocketAddr
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            // Wait for the request's first bytes (a whole small request, in practice).
            let mut buf = [0u8; 4096];
            let _ = socket.read(&mut buf).await;
            tokio::spawn(act(socket));
        }
    });
    addr
}

fn assert_error(status: u16, body: &Value, want_status: u16, code: &str, words: &str) {
    assert_eq!(status, want_status, "{body}");
    assert_eq!(body["error"]["code"], code, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains(words), "{message}");
}

#[tokio::test]
async fn a_port_nobody_listens_on_is_a_connect_failure() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    // The listener is dropped: the port refuses connections.
    let gw = gateway(&format!("http://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "connect",
        "could not connect to upstream",
    );
}

#[tokio::test]
async fn a_server_that_does_not_speak_tls_is_a_tls_failure() {
    // A plain HTTP server answers the TLS client hello with an HTTP error.
    let addr = server(|mut socket| async move {
        let _ = socket
            .write_all(
                b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .await;
    })
    .await;
    let gw = gateway(&format!("https://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "tls",
        "TLS handshake with upstream failed",
    );
}

#[tokio::test]
async fn a_server_that_hangs_up_on_the_client_hello_is_a_tls_failure() {
    let addr = server(|socket| async move { drop(socket) }).await;
    let gw = gateway(&format!("https://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "tls",
        "TLS handshake with upstream failed",
    );
}

/// A server that reads the first byte of the client hello and resets the connection
/// (`SO_LINGER` 0): the reset reaches the gateway during its TLS handshake, once the TCP
/// connection is open, and is the handshake's failure.
#[tokio::test]
async fn a_server_that_resets_the_client_hello_is_a_tls_failure() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut first = [0u8; 1];
            let _ = socket.read_exact(&mut first).await;
            let _ = socket.set_zero_linger();
            drop(socket);
        }
    });
    let gw = gateway(&format!("https://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "tls",
        "reset the connection during the handshake",
    );
}

/// A server that takes the client hello and never answers: the connect timeout ran out in
/// the TLS handshake, which the error says.
#[tokio::test]
async fn a_server_silent_after_the_client_hello_is_a_tls_failure() {
    let addr = server(|socket| async move {
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    })
    .await;
    let gw = gateway(&format!("https://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "tls",
        "no TLS handshake within the connect timeout",
    );
}

#[tokio::test]
async fn a_server_that_never_answers_is_a_timeout() {
    let addr = server(|socket| async move {
        // Holds the connection, silent, until the test ends.
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    })
    .await;
    let gw = gateway(&format!("http://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(status, &body, 504, "timeout", "did not answer in time");
}

#[tokio::test]
async fn a_stream_that_goes_silent_is_a_stall() {
    let addr = server(|mut socket| async move {
        let _ = socket
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(socket);
    })
    .await;
    let gw = gateway(&format!("http://{addr}")).await;
    let (status, body) = ask(&gw, true).await;
    // 504, or an error event on a stream already started for a caller kept waiting.
    let want = if status == 200 { 200 } else { 504 };
    assert_error(status, &body, want, "stalled", "stalled");
}

#[tokio::test]
async fn a_connection_closed_mid_response_says_so() {
    let addr = server(|mut socket| async move {
        let _ = socket
            .write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"id\": \"chatcmpl-1\", ",
            )
            .await;
        // Closed with 980 bytes of the body still to come.
    })
    .await;
    let gw = gateway(&format!("http://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "upstream_closed",
        "upstream closed the connection mid-response",
    );
    let message = body["error"]["message"].as_str().unwrap();
    assert!(!message.contains("could not connect"), "{message}");
}

#[tokio::test]
async fn a_server_that_does_not_answer_in_http_is_a_malformed_answer_not_a_closed_one() {
    let addr = server(|mut socket| async move {
        let _ = socket.write_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n").await;
    })
    .await;
    let gw = gateway(&format!("http://{addr}")).await;
    let (status, body) = ask(&gw, false).await;
    assert_error(
        status,
        &body,
        502,
        "malformed",
        "upstream response could not be parsed",
    );
}
