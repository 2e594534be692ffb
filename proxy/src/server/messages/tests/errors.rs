//! The door's own error format where the router, not the handler, answers: an unknown path
//! below `/v1/messages`, a wrong method, a panic.

use crate::server::messages::guarded;
use crate::server::tests::state;
use axum::Router;
use axum::body::Body;
use axum::http::{Method, Request, StatusCode, header};
use axum::routing::post;
use serde_json::Value;
use tower::ServiceExt as _;

async fn call(router: Router, method: Method, path: &str) -> (StatusCode, Option<String>, Value) {
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let response = router.oneshot(request).await.unwrap();
    let status = response.status();
    let allow = response
        .headers()
        .get(header::ALLOW)
        .map(|v| v.to_str().unwrap().to_owned());
    let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    (status, allow, serde_json::from_slice(&bytes).unwrap())
}

fn assert_anthropic(body: &Value, kind: &str) {
    assert_eq!(body["type"], "error", "{body}");
    assert_eq!(body["error"]["type"], kind, "{body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}

#[tokio::test]
async fn an_unknown_path_below_the_door_is_a_404_in_anthropics_format() {
    for path in [
        "/v1/messages/batches",
        "/v1/messages/batches/b1/results",
        "/v1/messages/",
    ] {
        let (status, _, body) = call(crate::server::router(state()), Method::POST, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_anthropic(&body, "not_found_error");
    }
    // Elsewhere the OpenAI format stays.
    for path in ["/v1/nothing", "/v1/messagesx"] {
        let (status, _, body) = call(crate::server::router(state()), Method::POST, path).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(body["error"]["code"], "unknown_url", "{path}: {body}");
        assert!(body.get("type").is_none(), "{path}: {body}");
    }
}

#[tokio::test]
async fn a_wrong_method_on_the_door_is_a_405_in_anthropics_format() {
    for (method, path) in [
        (Method::GET, "/v1/messages"),
        (Method::DELETE, "/v1/messages"),
        (Method::GET, "/v1/messages/count_tokens"),
    ] {
        let (status, allow, body) = call(crate::server::router(state()), method, path).await;
        assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(allow.as_deref(), Some("POST"), "{path}");
        assert_anthropic(&body, "invalid_request_error");
    }
}

#[tokio::test]
async fn a_panic_in_a_door_handler_is_a_500_in_anthropics_format() {
    async fn boom() -> &'static str {
        panic!("a handler bug")
    }
    let router = Router::new().route("/v1/messages", guarded(post(boom)));
    let (status, _, body) = call(router, Method::POST, "/v1/messages").await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_anthropic(&body, "api_error");
    assert!(
        !body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("handler bug"),
        "{body}"
    );
}
