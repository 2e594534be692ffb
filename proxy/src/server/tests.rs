//! The front door's health, readiness, model list and error format.

use super::*;
use crate::config::load::load_config;
use crate::config::secrets::SecretSources;
use axum::body::Body;
use axum::http::Request;
use tower::ServiceExt;

pub(super) fn state() -> AppState {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/standalone");
    let (config, _) = load_config(&[dir], SecretSources::default()).unwrap();
    let dispatcher =
        crate::route::Dispatcher::new(crate::budget::MINUTE, std::time::Duration::from_secs(1))
            .unwrap();
    dispatcher.apply(Arc::new(config));
    AppState::new(Arc::new(AtomicBool::new(true)), Arc::new(dispatcher))
}

async fn get(state: AppState, path: &str) -> (StatusCode, serde_json::Value) {
    let response = router(state)
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::String(
        String::from_utf8_lossy(&bytes).into(),
    ));
    (status, json)
}

#[tokio::test]
async fn models_lists_every_model_and_alias() {
    let (status, body) = get(state(), "/v1/models").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["object"], "list");
    let ids: Vec<&str> = body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    for id in [
        "gpt-4o-mini",
        "claude-sonnet-4",
        "gemini-2.5-flash",
        "llama3.1:8b",
        "text-embedding-3-small",
        "gemini-embedding-001",
        "nomic-embed-text",
        "smart",
        "fast",
        "local",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    assert_eq!(body["data"][0]["object"], "model");
}

#[tokio::test]
async fn readiness_follows_the_flag() {
    let s = state();
    assert_eq!(get(s.clone(), "/readyz").await.0, StatusCode::OK);
    s.ready.store(false, Ordering::Release);
    assert_eq!(
        get(s.clone(), "/readyz").await.0,
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert_eq!(get(s, "/healthz").await.0, StatusCode::OK);
}

#[tokio::test]
async fn unknown_paths_get_an_openai_error_body() {
    let (status, body) = get(state(), "/v1/nope").await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["code"], "unknown_url");
}

#[tokio::test]
async fn the_request_id_is_echoed_or_generated() {
    let response = router(state())
        .oneshot(
            Request::get("/v1/models")
                .header("x-request-id", "caller-id-42")
                .body(Body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "caller-id-42");
    let response = router(state())
        .oneshot(Request::get("/v1/nope").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let id = response.headers()["x-request-id"].to_str().unwrap();
    assert!(id.starts_with("req_"), "{id}");
}

async fn post(
    state: AppState,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, serde_json::Value) {
    let mut request = Request::post(path).header("content-type", "application/json");
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let body = r#"{"model":"smart","messages":[{"role":"user","content":"hi"}],"max_tokens":5}"#;
    let response = router(state)
        .oneshot(request.body(Body::from(body)).unwrap())
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, serde_json::from_slice(&bytes).unwrap())
}

#[tokio::test]
async fn without_a_valid_client_key_each_door_answers_401_in_its_format() {
    for headers in [
        &[][..],
        &[("authorization", "Bearer sk-demo-nope")][..],
        &[("x-api-key", "sk-demo-nope")][..],
    ] {
        for path in ["/v1/chat/completions", "/v1/embeddings"] {
            let (status, body) = post(state(), path, headers).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{path} {headers:?}");
            assert_eq!(body["error"]["code"], "invalid_api_key", "{body}");
            assert_eq!(body["error"]["type"], "invalid_request_error", "{body}");
            assert!(!body.to_string().contains("sk-demo-nope"), "{body}");
        }
        let (status, body) = post(state(), "/v1/messages", headers).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{headers:?}");
        assert_eq!(body["type"], "error", "{body}");
        assert_eq!(body["error"]["type"], "authentication_error", "{body}");
        assert!(!body.to_string().contains("sk-demo-nope"), "{body}");
    }
}

#[tokio::test]
async fn a_model_the_tenant_may_not_use_is_a_403_naming_it() {
    // demo-free may use fast, local, gpt-4o-mini and text-embedding-3-small only.
    let (status, body) = post(
        state(),
        "/v1/chat/completions",
        &[("authorization", "Bearer sk-demo-free")],
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "model_not_allowed", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`smart`"),
        "{body}"
    );
    let (status, body) = post(state(), "/v1/messages", &[("x-api-key", "sk-demo-free")]).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["type"], "permission_error", "{body}");
}

#[tokio::test]
async fn metrics_are_served_on_the_admin_router_only() {
    for path in ["/metrics", "/debug", "/admin"] {
        let (status, body) = get(state(), path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}: {body}");
    }
    let response = admin_router(state())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&bytes).contains("# EOF"));
}

/// Every admin route (from the admin router's own list, so a route added there later is
/// checked too), and anything under `/admin` or `/debug`, is 404 on the public router for
/// every method, even with a bearer token; each admin route is served on the admin router.
#[tokio::test]
async fn the_public_router_serves_no_admin_or_debug_path() {
    let ask = async |router: Router, method: &str, path: &str| {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::AUTHORIZATION, "Bearer admin-token")
            .body(Body::empty())
            .unwrap();
        router.oneshot(request).await.unwrap().status()
    };
    let mut paths: Vec<String> = admin_routes()
        .into_iter()
        .map(|(path, _)| path.replace("{id}", "job_1"))
        .collect();
    assert!(paths.len() >= 6, "{paths:?}");
    for path in &paths {
        let mut served = false;
        for method in ["GET", "POST", "DELETE"] {
            served |= ask(admin_router(state()), method, path).await != StatusCode::NOT_FOUND;
        }
        assert!(served, "{path} is not served on the admin router");
    }
    paths.extend(
        [
            "/admin",
            "/admin/",
            "/admin/anything/else",
            "/debug",
            "/debug/pprof/profile",
        ]
        .map(str::to_owned),
    );
    for path in &paths {
        for method in ["GET", "POST", "PUT", "DELETE"] {
            let status = ask(router(state()), method, path).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
        }
    }
}

#[tokio::test]
async fn the_probe_router_serves_the_probes_and_nothing_else() {
    let ask = async |state: AppState, path: &str| {
        probe_router(state)
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap()
            .status()
    };
    assert_eq!(ask(state(), "/healthz").await, StatusCode::OK);
    assert_eq!(ask(state(), "/readyz").await, StatusCode::OK);
    let not_ready = state();
    not_ready.ready.store(false, Ordering::Release);
    assert_eq!(
        ask(not_ready, "/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    for path in [
        "/metrics",
        "/v1/models",
        "/admin/capacity",
        "/admin/jobs/dead-letters",
    ] {
        assert_eq!(ask(state(), path).await, StatusCode::NOT_FOUND, "{path}");
    }
    let post = probe_router(state())
        .oneshot(
            Request::post("/v1/chat/completions")
                .body(Body::from("{}"))
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn a_wait_limit_that_is_not_whole_milliseconds_is_refused_in_the_doors_format() {
    let body =
        r#"{"model":"gpt-4o-mini","max_tokens":10,"messages":[{"role":"user","content":"hi"}]}"#;
    for (path, key) in [
        ("/v1/chat/completions", "authorization"),
        ("/v1/messages", "x-api-key"),
    ] {
        let key_value = if key == "authorization" {
            "Bearer sk-demo-pro"
        } else {
            "sk-demo-pro"
        };
        let response = router(state())
            .oneshot(
                Request::post(path)
                    .header("content-type", "application/json")
                    .header(key, key_value)
                    .header("x-floodgate-max-wait-ms", "2s")
                    .body(Body::from(body))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{path}");
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let message = json["error"]["message"].as_str().unwrap_or_default();
        assert!(
            message.contains("x-floodgate-max-wait-ms"),
            "{path}: {json}"
        );
        if path == "/v1/messages" {
            assert_eq!(json["type"], "error", "Anthropic's error shape: {json}");
        } else {
            assert_eq!(json["error"]["code"], "invalid_header", "{json}");
        }
    }
}
