//! `/api/v1/campaigns`: the sidecar's campaigns over the API (read scope to read, campaigns
//! scope to change).
//!
//! - `GET /campaigns`: every campaign (config and API) with state, version, definition and
//!   its variants' bandit counts ([`super::reports::campaigns_report`], the console's too);
//! - `POST /campaigns`: create (201); the body is a campaign in the keys of a
//!   `[[sidecar.campaigns]]` table; every error in one 400, each with its path;
//! - `GET /campaigns/{name}`, `PUT` (replace the definition), `PATCH` (JSON merge patch);
//! - `POST /campaigns/{name}/pause`, `/resume`, `/archive`.
//!
//! Pause: mail naming the campaign is still accepted (SMTP `250`, inject `200`), rendered,
//! and spooled held; resume makes the campaign active and releases its held mail (also when
//! it is active already, so a resume can be repeated after a crash between the two). A
//! config campaign can be paused and resumed, not changed or archived (409).
//!
//! Invariant: the answer is sent only after the change is durable and in the table the
//! stage reads (the next message sees it).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tern_queue::MessageId;

use super::error::{ApiError, ApiJson};
use super::AdminState;
use crate::scheduler::Operation;
use crate::sidecar::campaigns::{CampaignError, CampaignInfo, Change};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/campaigns", get(list).post(create))
        .route(
            "/campaigns/{name}",
            get(show).put(replace).patch(patch_campaign),
        )
        .route("/campaigns/{name}/pause", post(pause))
        .route("/campaigns/{name}/resume", post(resume))
        .route("/campaigns/{name}/archive", post(archive))
        .route("/campaigns/{name}/results", get(results))
}

/// How long after the model deadline a resume looks for held mail once more: a submission
/// that read the table before the resume may commit after the first look (its stage waits
/// at most the model deadline, then the commit takes a group-commit round).
const SECOND_LOOK: Duration = Duration::from_secs(1);

fn refused(err: CampaignError) -> Response {
    match err {
        CampaignError::Invalid(errors) => (
            StatusCode::BAD_REQUEST,
            Json(json!({
                "error": format!("{} error(s): {}", errors.len(), errors.join("; ")),
                "errors": errors,
            })),
        )
            .into_response(),
        CampaignError::NotFound(m) => ApiError::not_found(m).into_response(),
        CampaignError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m).into_response(),
        CampaignError::Spool(m) => ApiError::unavailable(m).into_response(),
    }
}

fn answer(result: Result<CampaignInfo, CampaignError>, status: StatusCode) -> Response {
    match result {
        Ok(info) => (status, Json(json!(info))).into_response(),
        Err(e) => refused(e),
    }
}

async fn list(State(state): State<AdminState>) -> Json<Value> {
    Json(super::reports::campaigns_report(&state))
}

async fn create(State(state): State<AdminState>, ApiJson(doc): ApiJson<Value>) -> Response {
    let result = state
        .sidecar
        .change_campaign(None, Change::Create(doc))
        .await;
    answer(result, StatusCode::CREATED)
}

async fn show(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.sidecar.campaign_info(&name) {
        Some(info) => Json(json!(info)).into_response(),
        None => ApiError::not_found(format!("no campaign {name:?}")).into_response(),
    }
}

async fn change(state: &AdminState, name: &str, change: Change) -> Response {
    answer(
        state.sidecar.change_campaign(Some(name), change).await,
        StatusCode::OK,
    )
}

async fn replace(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    ApiJson(doc): ApiJson<Value>,
) -> Response {
    change(&state, &name, Change::Replace(doc)).await
}

async fn patch_campaign(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    ApiJson(doc): ApiJson<Value>,
) -> Response {
    change(&state, &name, Change::Patch(doc)).await
}

/// Per variant: counts from the events and each rate's posterior
/// ([`crate::sidecar::results`]).
async fn results(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match state.sidecar.campaign_results(&name) {
        Some(r) => Json(json!(r)).into_response(),
        None => ApiError::not_found(format!("no campaign {name:?}")).into_response(),
    }
}

async fn pause(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    change(&state, &name, Change::Pause).await
}

async fn archive(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    change(&state, &name, Change::Archive).await
}

/// Active again, then its held mail released: at once, and once more when every submission
/// that may have read the paused state has committed (the model deadline plus
/// [`SECOND_LOOK`]; the answer waits for it). The answer adds `released`.
async fn resume(State(state): State<AdminState>, Path(name): Path<String>) -> Response {
    match resume_campaign(&state, &name).await {
        Ok((info, released)) => {
            let mut body = json!(info);
            body["released"] = json!(released);
            Json(body).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// A refused change as the API's error (pause and resume: never `Invalid`).
fn api_error(err: CampaignError) -> ApiError {
    match err {
        CampaignError::Invalid(errors) => ApiError::bad_request(errors.join("; ")),
        CampaignError::NotFound(m) => ApiError::not_found(m),
        CampaignError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, m),
        CampaignError::Spool(m) => ApiError::unavailable(m),
    }
}

/// `POST /campaigns/{name}/pause` (the console's pause action too).
pub(super) async fn pause_campaign(
    state: &AdminState,
    name: &str,
) -> Result<CampaignInfo, ApiError> {
    state
        .sidecar
        .change_campaign(Some(name), Change::Pause)
        .await
        .map_err(api_error)
}

/// `POST /campaigns/{name}/resume` (the console's resume action too): the campaign, and how
/// many held messages were released.
pub(super) async fn resume_campaign(
    state: &AdminState,
    name: &str,
) -> Result<(CampaignInfo, usize), ApiError> {
    let info = state
        .sidecar
        .change_campaign(Some(name), Change::Resume)
        .await
        .map_err(api_error)?;
    let mut released = 0;
    for look in [
        Duration::ZERO,
        state.sidecar.render_deadline() + SECOND_LOOK,
    ] {
        tokio::time::sleep(look).await;
        released += release_held(state, name).await?;
    }
    Ok((info, released))
}

/// Releases every held message of campaign `name`; returns how many changed.
async fn release_held(state: &AdminState, name: &str) -> Result<usize, ApiError> {
    let spool = state.spool.clone();
    let wanted = name.to_owned();
    let ids: Vec<MessageId> = tokio::task::spawn_blocking(move || {
        let mut ids = Vec::new();
        for env in spool.envelopes_after(None) {
            let env = env?;
            if env.held && env.campaign.as_ref().is_some_and(|t| t.campaign == wanted) {
                ids.push(env.id);
            }
        }
        Ok::<_, tern_queue::SpoolError>(ids)
    })
    .await
    .map_err(|e| ApiError::internal(format!("spool scan failed: {e}")))?
    .map_err(|e| ApiError::internal(e.to_string()))?;
    let released = state
        .scheduler
        .operate(Operation::Release, &ids)
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::info!(campaign = %name, released, "held campaign mail released");
    Ok(released)
}
