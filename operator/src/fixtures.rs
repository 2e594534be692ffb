//! Reconciler tests against a scripted API server, as kube-rs's controller-rs does: the
//! [`Context`] gets a `kube::Client` over [`tower_test::mock::pair`], and the test plays the
//! API server, one expected request at a time: it checks each request's method, path, query
//! and body, and answers it. A request the script does not expect fails the script (a wrong
//! method or path) or the reconcile (the script ended, so the client sees the service closed);
//! a request the reconcile does not make leaves the script waiting, which its timeout catches.

use crate::autoscale::DemandSource;
use crate::context::{Config, Context, FIELD_MANAGER};
use crate::metrics::Metrics;
use http::{Method, Request, Response, StatusCode};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

/// The API server side of a test [`Context`]'s client.
pub struct ApiServer(Handle);

impl std::fmt::Debug for ApiServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiServer")
    }
}

/// A context whose client talks to the returned [`ApiServer`], reading demand from `demand`.
pub fn context(demand: DemandSource) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let ctx = Context::with_demand(
        client,
        Config::default(),
        Arc::new(Metrics::default()),
        demand,
    );
    (ctx, ApiServer(handle))
}

/// A context whose client talks to the returned [`ApiServer`], reading live figures (usage,
/// circuits, demand) from the Redis at `redis_url`.
pub fn context_with_redis(redis_url: &str) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let config = Config {
        redis_url: Some(redis_url.to_owned()),
        ..Config::default()
    };
    match Context::new(client, config, Arc::new(Metrics::default())) {
        Ok(ctx) => (ctx, ApiServer(handle)),
        Err(e) => panic!("a context reading {redis_url}: {e}"),
    }
}

/// A context whose client talks to the returned [`ApiServer`], reading pools' live figures
/// from the gateway's `/metrics` at `targets` (no Redis).
pub fn context_with_gateway(targets: crate::gateway::Targets) -> (Arc<Context>, ApiServer) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let config = Config {
        gateway_metrics: Some(targets),
        ..Config::default()
    };
    match Context::new(client, config, Arc::new(Metrics::default())) {
        Ok(ctx) => (ctx, ApiServer(handle)),
        Err(e) => panic!("a context scraping the gateway: {e}"),
    }
}

/// One request the reconcile made, as the API server received it.
#[derive(Debug)]
pub struct Call {
    /// `?`-less query string.
    pub query: String,
    /// The `content-type` header.
    pub content_type: String,
    /// The body as JSON (`null` when empty).
    pub body: Value,
    reply: tower_test::mock::SendResponse<Response<Body>>,
}

impl Call {
    /// Answers with `status` and the JSON `body`.
    pub fn answer(self, status: StatusCode, body: &Value) {
        let response = Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string().into_bytes()));
        match response {
            Ok(response) => self.reply.send_response(response),
            Err(e) => panic!("a response of status and JSON body: {e}"),
        }
    }

    /// Answers 200 with `body`.
    pub fn ok(self, body: &Value) {
        self.answer(StatusCode::OK, body);
    }

    /// Answers 200 with the request's own body (what an apply or a create returns, less the
    /// server's additions).
    pub fn echo(self) {
        let body = self.body.clone();
        self.ok(&body);
    }

    /// Answers 404 as the API server does for an object that does not exist.
    pub fn not_found(self, what: &str) {
        let status = json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("{what} not found"), "reason": "NotFound", "code": 404
        });
        self.answer(StatusCode::NOT_FOUND, &status);
    }
}

impl ApiServer {
    /// Takes the next request, which must be `method path`.
    pub async fn expect(&mut self, method: Method, path: &str) -> Call {
        let Some((request, reply)) = self.0.next_request().await else {
            panic!("the client went away while {method} {path} was expected");
        };
        let (parts, body) = request.into_parts();
        assert_eq!(
            (&parts.method, parts.uri.path()),
            (&method, path),
            "expected {method} {path}, got {} {}",
            parts.method,
            parts.uri
        );
        let bytes = match body.collect_bytes().await {
            Ok(bytes) => bytes,
            Err(e) => panic!("a readable request body: {e}"),
        };
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&bytes) {
                Ok(v) => v,
                Err(e) => panic!("a JSON request body for {method} {path}: {e}"),
            }
        };
        Call {
            query: parts.uri.query().unwrap_or_default().to_owned(),
            content_type: parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
            body,
            reply,
        }
    }

    /// Takes the next request, which must be a server-side apply to `path` under the
    /// operator's field manager, forced.
    pub async fn expect_apply(&mut self, path: &str) -> Call {
        let call = self.expect(Method::PATCH, path).await;
        assert_eq!(call.content_type, "application/apply-patch+yaml", "{path}");
        assert!(
            call.query
                .contains(&format!("fieldManager={FIELD_MANAGER}"))
                && call.query.contains("force=true"),
            "{path}?{}",
            call.query
        );
        call
    }

    /// Takes the next request, which must create an Event in `namespace`; answers it and
    /// returns the Event.
    pub async fn expect_event(&mut self, namespace: &str) -> Value {
        let call = self
            .expect(
                Method::POST,
                &format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events"),
            )
            .await;
        let event = call.body.clone();
        call.echo();
        event
    }

    /// Takes the Events the reconcile publishes next, `count` of them, as `(type, reason)`,
    /// sorted (their order follows the conditions').
    pub async fn expect_events(&mut self, namespace: &str, count: usize) -> Vec<(String, String)> {
        let mut events = Vec::new();
        for _ in 0..count {
            let e = self.expect_event(namespace).await;
            events.push((field(&e, "type"), field(&e, "reason")));
        }
        events.sort();
        events
    }

    /// Takes a GET of Secret `namespace/name` and answers it with `data` (key -> value), or
    /// 404 when `None`.
    pub async fn expect_secret(&mut self, namespace: &str, name: &str, data: Option<&[&str]>) {
        let call = self
            .expect(
                Method::GET,
                &format!("/api/v1/namespaces/{namespace}/secrets/{name}"),
            )
            .await;
        match data {
            None => call.not_found(&format!("secrets {name:?}")),
            Some(keys) => {
                let data: serde_json::Map<String, Value> = keys
                    .iter()
                    // "c2stdGVzdA==" is base64 of "sk-test".
                    .map(|k| ((*k).to_owned(), json!("c2stdGVzdA==")))
                    .collect();
                call.ok(&json!({
                    "apiVersion": "v1", "kind": "Secret",
                    "metadata": {"name": name, "namespace": namespace}, "data": data
                }));
            }
        }
    }
}

/// The string at `key` of `value`, or empty.
pub fn field(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

/// The condition of `type_` in the `status.conditions` of an applied status patch.
pub fn condition<'a>(patch: &'a Value, type_: &str) -> &'a Value {
    patch["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
        .unwrap_or(&Value::Null)
}

/// Runs `reconcile` against `script` (the API server's side), and returns the reconcile's
/// result once both are done; fails when the reconcile waits for an answer the script does
/// not give, when the script does not finish within 5 s after the reconcile (a request it
/// expects was never made), or when the client made a request the script did not take.
pub async fn run<R, S>(reconcile: R, script: S) -> R::Output
where
    R: Future,
    S: Future<Output = ApiServer> + Send + 'static,
{
    let script = tokio::spawn(script);
    let Ok(result) = tokio::time::timeout(Duration::from_secs(10), reconcile).await else {
        panic!("the reconcile did not finish: it waits for an answer the script did not give");
    };
    let finished = tokio::time::timeout(Duration::from_secs(5), script).await;
    let mut api = match finished {
        Ok(Ok(api)) => api,
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("the script did not finish: a request it expects was never made"),
    };
    // Nothing more: the reconcile made no request the script did not answer.
    if let Ok(Some((request, _))) =
        tokio::time::timeout(Duration::from_millis(1), api.0.next_request()).await
    {
        panic!(
            "an unexpected request: {} {}",
            request.method(),
            request.uri()
        );
    }
    result
}
