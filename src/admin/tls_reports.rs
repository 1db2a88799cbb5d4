//! `POST /api/v1/tls-reports/send`: queues the TLS-RPT reports (RFC 8460) of every day
//! counted so far, today's included, now instead of after midnight UTC (`crate::tlsrpt`).
//! Answers `{"queued": N, "ids": [...]}`; 404 when MTA-STS (and so TLS reporting) is off.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::error::ApiError;
use super::AdminState;

pub fn routes() -> Router<AdminState> {
    Router::new().route("/tls-reports/send", post(send))
}

async fn send(State(state): State<AdminState>) -> Result<Json<Value>, ApiError> {
    let Some(reporting) = &state.tls_reporting else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "TLS reporting is off (delivery.mta_sts and delivery.dane are both false)",
        ));
    };
    let mut ids = Vec::new();
    for report in reporting.due(true).await {
        let id = state
            .intake
            .accept(report)
            .await
            .map_err(|e| ApiError::unavailable(format!("spool: {e}")))?;
        ids.push(id);
    }
    Ok(Json(json!({"queued": ids.len(), "ids": ids})))
}
