//! Read-only reports of what the node did lately (under `/api/v1`, read scope), each also a
//! page of the [`super::console`], which renders the very same values:
//!
//! - `GET /rates`: recipient outcomes per destination label (provider, static route or
//!   `other`) per minute over the last hour ([`crate::telemetry::Metrics::rate_history`]);
//! - `GET /bounces`: the latest bounces, expiries and complaints, newest first
//!   ([`crate::events::Events::recent_failures`]), `?limit=` (default 100, at most 1000);
//! - `GET /campaigns`: each configured campaign with its variants' sends, rewards and reward
//!   rate as the bandit has applied them.
//!
//! Invariant: each route is a thin wrapper of a `*_report` function that the console calls
//! too, so the API and the console cannot show different numbers.

use super::error::{page_limit, ApiError};
use super::AdminState;
use crate::events::RECENT_FAILURES;
use crate::sidecar::bandit::HOLDOUT;
use crate::telemetry::{Outcome, RATE_MINUTES};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/rates", get(rates))
        .route("/bounces", get(bounces))
}

/// `{"minutes": 60, "outcomes": [...], "labels": [{"label", "totals": {outcome: n},
/// "series": [{"minute", "ts_ms", outcome: n, ...}]}]}`; minutes oldest first.
pub fn rates_report(state: &AdminState) -> Value {
    let labels: Vec<Value> = state
        .metrics
        .rate_history()
        .into_iter()
        .map(|(label, minutes)| {
            let mut totals = [0u64; Outcome::ALL.len()];
            let series: Vec<Value> = minutes
                .iter()
                .map(|m| {
                    let mut row = Map::new();
                    row.insert("minute".into(), json!(m.minute));
                    row.insert("ts_ms".into(), json!(m.minute * 60_000));
                    for (i, outcome) in Outcome::ALL.iter().enumerate() {
                        totals[i] += m.counts[i];
                        row.insert(outcome.as_str().into(), json!(m.counts[i]));
                    }
                    Value::Object(row)
                })
                .collect();
            let totals: Map<String, Value> = Outcome::ALL
                .iter()
                .zip(totals)
                .map(|(o, n)| (o.as_str().to_owned(), json!(n)))
                .collect();
            json!({"label": label, "totals": totals, "series": series})
        })
        .collect();
    let outcomes: Vec<&str> = Outcome::ALL.iter().map(|o| o.as_str()).collect();
    json!({"minutes": RATE_MINUTES, "outcomes": outcomes, "labels": labels})
}

async fn rates(State(state): State<AdminState>) -> Json<Value> {
    Json(rates_report(&state))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct BounceParams {
    pub limit: Option<usize>,
}

/// `{"events": [...], "bounced": n, "expired": n, "complaints": n}`: the counts are of
/// everything kept in memory, `events` the first `limit` of them.
pub fn bounces_report(state: &AdminState, params: &BounceParams) -> Result<Value, ApiError> {
    let limit = page_limit(params.limit, 100, RECENT_FAILURES)?;
    let recent = state.feedback.events.recent_failures();
    let count = |kind: &str| {
        recent
            .iter()
            .filter(|e| serde_json::to_value(e.event).is_ok_and(|v| v == kind))
            .count()
    };
    Ok(json!({
        "bounced": count("bounced"),
        "expired": count("expired"),
        "complaints": count("complaint"),
        "events": recent.iter().take(limit).collect::<Vec<_>>(),
    }))
}

async fn bounces(
    State(state): State<AdminState>,
    params: Result<Query<BounceParams>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(bounces_report(&state, &params)?))
}

/// `{"campaigns": [{"name", "origin", "state", "version", "updated_ms", "config",
/// "variants": [{"id", "sends", "rewards", "rate"}]}]}` (`GET /api/v1/campaigns`): every
/// campaign, config and API, by name; the variants in definition order, then the holdout
/// when it has sends; `rate` is rewards / sends (`null` before any send).
pub fn campaigns_report(state: &AdminState) -> Value {
    let campaigns: Vec<Value> = state
        .sidecar
        .campaign_list()
        .into_iter()
        .map(|info| {
            let name = info.name.clone();
            let variants: Vec<String> = info.config["variants"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| v["id"].as_str().map(str::to_owned))
                .collect();
            let arms = state.sidecar.bandit_arms(&name);
            let holdout = arms.get(HOLDOUT).filter(|a| a.sends > 0.0).map(|_| HOLDOUT);
            let rows: Vec<Value> = variants
                .iter()
                .map(String::as_str)
                .chain(holdout)
                .map(|id| {
                    let arm = arms.get(id).copied().unwrap_or_default();
                    let rate = (arm.sends > 0.0).then(|| arm.rewards / arm.sends);
                    json!({"id": id, "sends": arm.sends, "rewards": arm.rewards, "rate": rate})
                })
                .collect();
            let mut row = json!(info);
            row["variants"] = json!(rows);
            // The console's campaigns page shows the same results as the results route.
            row["results"] = json!(state.sidecar.campaign_results(&name).map(|r| r.variants));
            row
        })
        .collect();
    json!({ "campaigns": campaigns })
}
