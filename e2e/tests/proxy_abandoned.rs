//! Callers who go away: a stream the caller hangs up on cancels its upstream request and
//! settles the key's token reservation at what was used, so the key's budget is free again
//! at once; a caller who hangs up while waiting for budget takes none.

#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use floodgate_e2e::gateway::Gateway;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use serde_json::json;
use std::time::{Duration, Instant};

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn pool(base: &str, limits: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData: {{a: key-a}}\n---\n\
         apiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n\
         \x20 providers:\n\
         \x20 - {{name: up, type: openai, baseUrl: \"{base}\", models: [{{name: gpt-4o}}, {{name: gpt-stall}}, {{name: gpt-malformed}}], keys: [{{secretRef: {{name: keys, key: a}}, {limits}}}]}}\n"
    )
}

/// A chat completion of `max_tokens` to `gw` for `model`.
fn ask(
    gw: &Gateway,
    model: &str,
    stream: bool,
    max_tokens: u32,
) -> impl std::future::Future<Output = reqwest::Result<reqwest::Response>> + use<> {
    client()
        .post(format!("{}/v1/chat/completions", gw.url()))
        .timeout(Duration::from_secs(20))
        .json(
            &json!({"model": model, "stream": stream, "max_tokens": max_tokens,
                      "messages": [{"role": "user", "content": "hi"}]}),
        )
        .send()
}

/// Polls `done` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_stream_the_caller_hangs_up_on_settles_at_what_was_used() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    // A 5,000-TPM key, 60 s windows, and at most 2 s of waiting for budget.
    let gw = Gateway::start(
        &pool(&mock.base_url(), "rpm: 1000, tpm: 5000"),
        Duration::from_secs(60),
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    let chat = |model: &str, stream: bool, max_tokens: u32| ask(&gw, model, stream, max_tokens);
    // Reserves ~2,000 tokens (with the ~4,000 below, about 1,000 over the key's 5,000: far
    // from the few tokens of the prompts' estimates); the caller reads the first chunk and
    // hangs up.
    let mut stream = chat("gpt-stall", true, 2000).await.unwrap();
    assert_eq!(stream.status(), 200);
    assert!(stream.chunk().await.unwrap().is_some());
    drop(stream);
    // The gateway cancels the upstream request.
    eventually("the upstream stream to be abandoned", || {
        mock.streams_abandoned() == 1
    })
    .await;
    // ~4,000 tokens: refused for the rest of the window if the abandoned stream still held
    // its reservation; admitted at once once it is settled at the few tokens it used.
    let started = Instant::now();
    let next = chat("gpt-4o", false, 3990).await.unwrap();
    let status = next.status();
    let body = next.text().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(started.elapsed() < Duration::from_secs(2));
}

/// `floodgate_requests_total{outcome="client_closed"}` of requests that left before their
/// model was known to the counter (`model="unknown"`): metrics are per process, and other
/// tests here count streams the caller left, with their model.
async fn client_closed(gw: &Gateway) -> u64 {
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
        .filter(|l| l.contains("outcome=\"client_closed\""))
        .filter(|l| l.contains("model=\"unknown\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn a_caller_who_hangs_up_while_waiting_for_budget_takes_none() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    // One request per 2 s window.
    let window = Duration::from_secs(2);
    let gw = Gateway::start(
        &pool(&mock.base_url(), "rpm: 1"),
        window,
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let chat = |timeout: Duration| {
        client()
            .post(format!("{}/v1/chat/completions", gw.url()))
            .timeout(timeout)
            .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
    };
    let started = Instant::now();
    assert_eq!(chat(Duration::from_secs(5)).await.unwrap().status(), 200);
    // Waits for the next window, and gives up before it comes.
    let gave_up = chat(Duration::from_millis(300)).await;
    assert!(gave_up.unwrap_err().is_timeout());
    // Counted as a caller who left, not lost from the request counts.
    let mut closed = 0;
    for _ in 0..200 {
        closed = client_closed(&gw).await;
        if closed == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(closed, 1, "the caller who hung up while waiting is counted");
    // The next caller is first in line: served when the window frees (~2 s), not a window
    // later behind a request nobody waits for.
    let next = chat(Duration::from_secs(15)).await.unwrap();
    assert_eq!(next.status(), 200);
    let served = started.elapsed();
    assert!(
        served < window + Duration::from_millis(1500),
        "served after {served:?}"
    );
    // The provider saw two requests: the one who hung up was never sent.
    assert_eq!(mock.counts().total(), 2);
}

/// A stream that breaks before its first chunk is an upstream error, not a caller who left:
/// its reservation stands whole (the provider may have counted it), so the next ~4,000-token
/// request on the 5,000-TPM key is refused. Settled as abandoned (at the prompt), it would be
/// admitted at once.
#[tokio::test]
async fn a_stream_that_breaks_before_its_first_chunk_keeps_its_whole_reservation() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let gw = Gateway::start(
        &pool(&mock.base_url(), "rpm: 1000, tpm: 5000"),
        Duration::from_secs(60),
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let chat = |model: &str, stream: bool, max_tokens: u32| ask(&gw, model, stream, max_tokens);
    // Its first text event is cut in half: the attempt fails before anything is streamed.
    let broken = chat("gpt-malformed", true, 3990).await.unwrap();
    let status = broken.status();
    let body = broken.text().await.unwrap();
    assert!(status.is_server_error(), "{status} {body}");
    assert_eq!(
        mock.counts().total(),
        1,
        "one attempt fitted the key's tokens"
    );
    let next = chat("gpt-4o", false, 3990).await.unwrap();
    assert_eq!(
        next.status(),
        429,
        "the broken attempt's tokens still count"
    );
}
