//! The mock's own endpoints, for the binary and for tests in other processes:
//! `GET /_mock/counts`, `POST /_mock/reset`, `GET /_mock/faults` and `POST /_mock/faults`
//! with `{"provider": "openai" | ... | "all", "fault": "error-500" | ... | null}`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::common::json_response;
use super::{Fault, Provider, Shared};

/// Body of `POST /_mock/faults`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FaultRequest {
    provider: String,
    #[serde(default)]
    fault: Option<String>,
}

/// `GET /_mock/counts`.
pub(super) async fn counts(State(shared): State<Arc<Shared>>) -> Response {
    json_response(StatusCode::OK, &shared.keys.snapshot())
}

/// `POST /_mock/reset`: counters, windows and faults back to their initial state.
pub(super) async fn reset(State(shared): State<Arc<Shared>>) -> StatusCode {
    shared.keys.reset();
    shared.faults.clear_all();
    StatusCode::NO_CONTENT
}

/// `GET /_mock/faults`: `{"openai": "error-500", "anthropic": null, ...}`.
pub(super) async fn faults(State(shared): State<Arc<Shared>>) -> Response {
    let map: serde_json::Map<String, serde_json::Value> = Provider::ALL
        .into_iter()
        .map(|p| {
            let fault = shared.faults.get(p).map(|f| f.to_string());
            (p.as_str().to_owned(), fault.into())
        })
        .collect();
    json_response(StatusCode::OK, &map)
}

/// `POST /_mock/faults`: sets (or, with `"fault": null`, clears) a provider-wide fault.
pub(super) async fn set_fault(
    State(shared): State<Arc<Shared>>,
    Json(request): Json<FaultRequest>,
) -> Response {
    let fault = match request
        .fault
        .as_deref()
        .map(str::parse::<Fault>)
        .transpose()
    {
        Ok(fault) => fault,
        Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
    };
    let providers: Vec<Provider> = if request.provider == "all" {
        Provider::ALL.to_vec()
    } else {
        match request.provider.parse() {
            Ok(provider) => vec![provider],
            Err(err) => return (StatusCode::BAD_REQUEST, err.to_string()).into_response(),
        }
    };
    for provider in providers {
        shared.faults.set(provider, fault);
    }
    tracing::info!(provider = %request.provider, fault = ?fault, "mock fault set");
    StatusCode::NO_CONTENT.into_response()
}
