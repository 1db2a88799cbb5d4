//! `GET /api/v1/shaping` and `GET /api/v1/shaping/{bucket}`: "why is this destination slow".
//!
//! Each entry is one (source address, bucket) pair that has carried traffic since start: the
//! configured and current (adaptive) rate, connections in use and the cap, suspension and the
//! reply that caused it, warm-up day, cap and count. A bucket is a provider name ("google")
//! or a destination key ("mx:...", "route:...").

use super::error::ApiError;
use super::AdminState;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/shaping", get(all))
        .route("/shaping/{bucket}", get(one))
}

async fn all(State(state): State<AdminState>) -> Json<Value> {
    Json(json!({ "pairs": state.shaper.views(None) }))
}

async fn one(
    State(state): State<AdminState>,
    Path(bucket): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pairs = state.shaper.views(Some(&bucket));
    if pairs.is_empty() {
        return Err(ApiError::not_found(format!(
            "no shaping state for bucket {bucket:?} (no traffic since start, or unknown)"
        )));
    }
    Ok(Json(json!({ "bucket": bucket, "pairs": pairs })))
}
