use super::*;
use crate::autoscale::DemandSource;
use crate::fixtures;
use floodgate_crds::AIProviderPool;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::Span;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use prost::Message as _;
use std::sync::Mutex;

/// A test OTLP/HTTP collector on its own thread and runtime (the exporter blocks on it while
/// flushing): its base URL, and the bodies it received.
fn collector() -> (String, Arc<Mutex<Vec<axum::body::Bytes>>>) {
    let received = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = std::sync::mpsc::channel();
    let kept = received.clone();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    kept.lock().unwrap().push(body);
                    async {}
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}", listener.local_addr().unwrap()))
                .unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), received)
}

fn attribute<'a>(span: &'a Span, key: &str) -> Option<&'a str> {
    span.attributes
        .iter()
        .find(|KeyValue { key: k, .. }| k == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
        .and_then(|v| match v {
            any_value::Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        })
}

/// Pool `ai/team` naming Secret `claude-keys`.
fn pool() -> AIProviderPool {
    let spec = serde_json::from_value(serde_json::json!({
        "providers": [{"name": "claude", "type": "anthropic", "models": [{"name": "claude-sonnet-4"}],
            "keys": [{"secretRef": {"name": "claude-keys", "key": "key1"}, "rpm": 20}]}]
    }))
    .unwrap();
    let mut pool = AIProviderPool::new("team", spec);
    pool.metadata.namespace = Some("ai".into());
    pool
}

#[test]
fn a_reconcile_is_exported_as_a_span_naming_the_object_and_its_failure() {
    let (url, received) = collector();
    let provider = floodgate_telemetry::tracer_provider(
        &floodgate_telemetry::traces_url(&url).unwrap(),
        DEFAULT_SERVICE_NAME.to_owned(),
    )
    .unwrap();
    // The stack `init` installs, with the provider it would build for `url`.
    let subscriber = subscriber(false, Some(&provider));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tracing::subscriber::with_default(subscriber, || {
        runtime.block_on(async {
            let (ctx, mut api) = fixtures::context(DemandSource::Unconfigured);
            let p = Arc::new(pool());
            // The Secret read fails: the reconcile fails, and its span says how.
            let script = async move {
                let call = api
                    .expect(http::Method::GET, "/api/v1/namespaces/ai/secrets/claude-keys")
                    .await;
                call.answer(
                    http::StatusCode::FORBIDDEN,
                    &serde_json::json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
                        "status": "Failure", "message": "forbidden", "reason": "Forbidden", "code": 403}),
                );
                api
            };
            let pending = crate::pool::reconcile(p.clone(), ctx.clone());
            let result = fixtures::run(
                traced(p.as_ref(), pending, ctx, CancellationToken::new()),
                script,
            )
            .await;
            assert!(result.is_err());
        });
    });
    drop(runtime);
    provider.force_flush().unwrap();
    let spans: Vec<Span> = received
        .lock()
        .unwrap()
        .iter()
        .flat_map(|body| {
            ExportTraceServiceRequest::decode(body.clone())
                .unwrap()
                .resource_spans
        })
        .flat_map(|r| r.scope_spans)
        .flat_map(|s| s.spans)
        .collect();
    let reconcile = spans
        .iter()
        .find(|s| s.name == "reconcile AIProviderPool")
        .unwrap_or_else(|| panic!("no reconcile span in {spans:#?}"));
    assert_eq!(attribute(reconcile, "kind"), Some("AIProviderPool"));
    assert_eq!(attribute(reconcile, "namespace"), Some("ai"));
    assert_eq!(attribute(reconcile, "name"), Some("team"));
    assert_eq!(attribute(reconcile, "error.type"), Some("kube_api"));
    assert_eq!(
        reconcile.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    let _ = provider.shutdown();
}
