//! Traces: the `floodgate-proxy` binary exports its request and upstream spans with OTLP over
//! HTTP/protobuf to a collector given by `--otlp-endpoint`, flushes them on shutdown, never
//! exports a secret or a prompt, and exports nothing without the flag.
//!
//! The collector is a small axum server in the test that decodes each `POST /v1/traces` body
//! as an `ExportTraceServiceRequest`.
#![expect(clippy::unwrap_used, reason = "test helpers outside #[test] functions")]

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::routing::post;
use bytes::Bytes;
use floodgate_e2e::cluster::wait_for;
use floodgate_e2e::mock::{MockConfig, MockProviders};
use floodgate_e2e::proxy::ProxyProcess;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The key's secret value: it must never leave the proxy except towards the provider.
const SECRET: &str = "sk-otlp-test-secret-4f1c9a";
/// A marker in the prompt: prompts are not exported either.
const PROMPT: &str = "otlp-test-prompt-7d2e";
const SERVICE: &str = "floodgate-otlp-test";
const WAIT: Duration = Duration::from_secs(20);

/// What the test collector received: each body with its content type.
#[derive(Debug, Clone, Default)]
struct Collector {
    posts: Arc<Mutex<Vec<(String, Bytes)>>>,
}

impl Collector {
    /// Serves `POST /v1/traces` on an ephemeral port; returns the base URL.
    async fn start() -> (Collector, String) {
        let collector = Collector::default();
        let app = axum::Router::new()
            .route("/v1/traces", post(receive))
            .with_state(collector.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (collector, url)
    }

    fn posts(&self) -> Vec<(String, Bytes)> {
        self.posts
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Every exported span, with the `service.name` of its resource.
    fn spans(&self) -> Vec<(String, Span)> {
        let mut spans = Vec::new();
        for (_, body) in self.posts() {
            let request = ExportTraceServiceRequest::decode(body).unwrap();
            for resource in request.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| string(&r.attributes, "service.name"))
                    .unwrap_or_default()
                    .to_owned();
                for scope in resource.scope_spans {
                    spans.extend(scope.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
        }
        spans
    }
}

async fn receive(State(collector): State<Collector>, headers: HeaderMap, body: Bytes) {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    collector
        .posts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .push((content_type, body));
}

fn value<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|AnyValue { value }| value.as_ref())
}

fn string<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match value(attributes, key)? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match value(attributes, key)? {
        any_value::Value::IntValue(i) => Some(*i),
        _ => None,
    }
}

/// A config directory with one OpenAI pool on the mock, its key holding [`SECRET`].
fn config_dir(mock: &MockProviders) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let manifests = format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: keys}}\nstringData:\n  a: {SECRET}\n\
         ---\napiVersion: floodgate.dev/v1alpha1\nkind: AIProviderPool\nmetadata: {{name: pool}}\nspec:\n  providers:\n\
         \x20 - {{name: openai, type: openai, baseUrl: \"{}\", models: [{{name: gpt-4o}}], keys: [{{name: primary, secretRef: {{name: keys, key: a}}, rpm: 1000}}]}}\n",
        mock.base_url()
    );
    std::fs::write(dir.path().join("pool.yaml"), manifests).unwrap();
    dir
}

/// Starts the proxy on `dir`, with `--otlp-endpoint` when `otlp` is set and the batch
/// processor's schedule delay `delay_ms`; an inherited `OTEL_EXPORTER_OTLP_ENDPOINT` is blanked.
async fn start_proxy(
    dir: &tempfile::TempDir,
    otlp: Option<&str>,
    env: &[(&str, &str)],
) -> ProxyProcess {
    let mut args = vec![
        "--config".to_owned(),
        dir.path().display().to_string(),
        "--watch-interval-ms".to_owned(),
        "0".to_owned(),
    ];
    if let Some(url) = otlp {
        args.extend(["--otlp-endpoint".to_owned(), url.to_owned()]);
    }
    let mut vars = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", OsStr::new("")),
        ("OTEL_SERVICE_NAME", OsStr::new(SERVICE)),
    ];
    vars.extend(env.iter().map(|(k, v)| (*k, OsStr::new(*v))));
    ProxyProcess::start(args, &vars).await.unwrap()
}

/// One chat through the proxy (whole or streamed, with usage); asserts it succeeded.
async fn chat(proxy: &ProxyProcess, stream: bool) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let response = reqwest::Client::new()
        .post(proxy.url("/v1/chat/completions"))
        .json(&serde_json::json!({
            "model": "gpt-4o",
            "stream": stream,
            "stream_options": stream.then(|| serde_json::json!({"include_usage": true})),
            "messages": [{"role": "user", "content": PROMPT}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains(PROMPT), "the mock echoes the prompt: {body}");
}

/// Each request span (`chat`, kind server) with its upstream attempt (its one child).
fn requests_and_attempts(spans: &[(String, Span)]) -> Vec<(Span, Span)> {
    let spans: Vec<&Span> = spans.iter().map(|(_, s)| s).collect();
    spans
        .iter()
        .filter(|s| {
            s.name == "chat"
                && s.kind == SpanKind::Server as i32
                && string(&s.attributes, "gen_ai.request.model") == Some("gpt-4o")
        })
        .filter_map(|request| {
            let attempt = spans.iter().find(|s| {
                s.kind == SpanKind::Client as i32
                    && s.trace_id == request.trace_id
                    && s.parent_span_id == request.span_id
            })?;
            Some(((*request).clone(), (*attempt).clone()))
        })
        .collect()
}

fn assert_nothing_secret(collector: &Collector) {
    for (content_type, body) in collector.posts() {
        assert_eq!(content_type, "application/x-protobuf");
        assert!(!body.is_empty());
        for needle in [SECRET, PROMPT] {
            assert!(
                !body.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{needle} was exported"
            );
        }
    }
}

#[tokio::test]
async fn request_and_upstream_spans_are_exported_without_secrets() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (collector, otlp) = Collector::start().await;
    let dir = config_dir(&mock);
    let proxy = start_proxy(&dir, Some(&otlp), &[("OTEL_BSP_SCHEDULE_DELAY", "100")]).await;
    chat(&proxy, false).await;
    chat(&proxy, true).await;

    let pairs = wait_for("both requests' spans at the collector", WAIT, || async {
        let pairs = requests_and_attempts(&collector.spans());
        Ok((pairs.len() == 2).then_some(pairs))
    })
    .await
    .unwrap();

    for (request, attempt) in &pairs {
        let attrs = &request.attributes;
        assert_eq!(string(attrs, "gen_ai.operation.name"), Some("chat"));
        assert_eq!(int(attrs, "http.response.status_code"), Some(200));
        assert_eq!(int(attrs, "floodgate.attempts"), Some(1));
        assert_eq!(string(attrs, "floodgate.provider"), Some("openai"));
        assert_eq!(string(attrs, "error.type"), None);

        let attrs = &attempt.attributes;
        assert_eq!(attempt.name, "chat gpt-4o");
        assert_eq!(string(attrs, "gen_ai.provider.name"), Some("openai"));
        assert_eq!(string(attrs, "gen_ai.request.model"), Some("gpt-4o"));
        assert_eq!(string(attrs, "server.address"), Some("127.0.0.1"));
        assert_eq!(string(attrs, "floodgate.key"), Some("primary"));
        // A stream's usage arrives with its last chunk, after the response headers.
        assert!(int(attrs, "gen_ai.usage.input_tokens").unwrap() > 0);
        assert!(int(attrs, "gen_ai.usage.output_tokens").unwrap() > 0);
    }

    let services: Vec<String> = collector.spans().into_iter().map(|(s, _)| s).collect();
    assert!(services.iter().all(|s| s == SERVICE), "{services:?}");
    assert_nothing_secret(&collector);
    proxy.stop().await.unwrap();
}

#[tokio::test]
async fn spans_still_buffered_are_flushed_on_shutdown() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (collector, otlp) = Collector::start().await;
    let dir = config_dir(&mock);
    // No scheduled export during the test: only shutdown can send the spans.
    let proxy = start_proxy(&dir, Some(&otlp), &[("OTEL_BSP_SCHEDULE_DELAY", "600000")]).await;
    chat(&proxy, false).await;
    let status = proxy.terminate(WAIT).await.unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(
        requests_and_attempts(&collector.spans()).len(),
        1,
        "{:?}",
        collector.spans()
    );
    assert_nothing_secret(&collector);
}

#[tokio::test]
async fn nothing_is_exported_without_the_flag() {
    let mock = MockProviders::start(MockConfig::default()).await.unwrap();
    let (collector, otlp) = Collector::start().await;
    let dir = config_dir(&mock);
    // The SDK's own variables point at the collector: only the flag may turn export on.
    let traces = format!("{otlp}/v1/traces");
    let proxy = start_proxy(
        &dir,
        None,
        &[
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", &traces),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ],
    )
    .await;
    chat(&proxy, false).await;
    // A clean exit would have flushed any exporter: after it, the collector has its all.
    let status = proxy.terminate(WAIT).await.unwrap();
    assert!(status.success(), "{status}");
    assert!(collector.posts().is_empty());
}
