//! `POST /api/v1/spool/backup {"dir": "/path"}`: a consistent copy of the running spool in a
//! new (or empty) directory on this host (`tern_queue::Spool::backup`: writes wait for the
//! copy). Answers `{"dir", "keys", "bytes", "seconds"}`. Needs the `admin` scope.

use super::error::{ApiError, ApiJson};
use super::AdminState;
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/spool/backup", post(backup))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackupRequest {
    dir: String,
}

async fn backup(
    State(state): State<AdminState>,
    ApiJson(req): ApiJson<BackupRequest>,
) -> Result<Json<Value>, ApiError> {
    let dir = PathBuf::from(&req.dir);
    if !dir.is_absolute() {
        return Err(ApiError::bad_request(format!(
            "dir: {:?} is not an absolute path",
            req.dir
        )));
    }
    let spool = state.spool.clone();
    let started = std::time::Instant::now();
    let target = dir.clone();
    let copied = tokio::task::spawn_blocking(move || spool.backup(&target))
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(|e| ApiError::bad_request(format!("dir: {e}")))?;
    Ok(Json(json!({
        "dir": dir,
        "keys": copied.keys,
        "bytes": copied.bytes,
        "seconds": started.elapsed().as_secs_f64(),
    })))
}
