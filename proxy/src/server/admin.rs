//! The admin token (`--admin-token`, `FLOODGATE_ADMIN_TOKEN`): what the admin listener's
//! endpoints beyond metrics and probes require, `Authorization: Bearer <token>` (the jobs'
//! dead letters, the capacity report).

use super::AppState;
use super::error::ApiError;
use crate::secret::SecretString;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// Checks the caller's bearer token against `token`, compared by SHA-256 digest (the time
/// taken says nothing of the token): 401 without it or with another, 403 when no token is
/// set. `what` names the endpoints in the error (`"the dead-letter endpoints"`).
pub(super) fn check(
    token: Option<&SecretString>,
    headers: &HeaderMap,
    what: &str,
) -> Result<(), ApiError> {
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "permission_error",
            "admin_token_not_set",
            format!(
                "{what}: an admin token is required (--admin-token, FLOODGATE_ADMIN_TOKEN) and none is set"
            ),
        ));
    };
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if digest(g).as_ref() == digest(token.expose()).as_ref() => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "authentication_error",
            "invalid_admin_token",
            format!("{what}: `Authorization: Bearer <admin token>` is required"),
        )),
    }
}

/// `GET /admin/capacity` (admin token): raw provider RPM, recent offload shares, effective
/// RPM.
pub(super) async fn capacity(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(e) = check(state.admin_token.as_ref(), &headers, "the capacity report") {
        return e.into_response();
    }
    let view = state.dispatcher.view();
    axum::Json(crate::routing::capacity::report(
        &view,
        &state.dispatcher.routing().recent,
    ))
    .into_response()
}
