//! `GET /v1/models`: every model and alias the pools offer, in OpenAI's list format.

use super::AppState;
use axum::Json;
use axum::extract::State;
use serde::Serialize;

#[derive(Serialize)]
pub(super) struct ModelList {
    object: &'static str,
    data: Vec<ModelObject>,
}

#[derive(Serialize)]
struct ModelObject {
    id: String,
    object: &'static str,
    created: u64,
    owned_by: String,
}

pub(super) async fn list(State(state): State<AppState>) -> Json<ModelList> {
    let config = state.dispatcher.config();
    let data = config
        .models()
        .into_iter()
        .map(|m| ModelObject {
            id: m.id,
            object: "model",
            created: 0,
            owned_by: m.owned_by,
        })
        .collect();
    Json(ModelList {
        object: "list",
        data,
    })
}
