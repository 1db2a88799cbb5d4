//! `/api/v1/suppressions`: the suppression list seen and edited by the operator.
//!
//! - `GET /suppressions?after=&limit=&reason=&contains=`: active entries in address order,
//!   `{"entries": [...], "next": cursor|null}` (pass `next` as `after` for the next page);
//! - `GET /suppressions/{address}[?scope=LIST]`: one entry, 404 if the address is not
//!   suppressed (for all mail, or with `scope` for that list's mail);
//! - `POST /suppressions` `{"address", "reason"?, "expires_in"?, "scope"?}`: adds (or
//!   replaces) one; `reason` is a bounce category, `manual` (the default), `sunset` or
//!   `unsubscribe`, `expires_in` a duration, `scope` a list name (only that list's mail);
//! - `DELETE /suppressions/{address}[?scope=LIST]`: removes one (404 if absent);
//! - `POST /suppressions/import` (CSV body, see `crate::suppression`): adds them all in one
//!   write, or none (400 naming the first bad line);
//! - `GET /suppressions/export`: every active entry as CSV, streamed (chunked) page by page:
//!   memory stays bounded by [`EXPORT_PAGE`] entries and [`EXPORT_PAGES_AHEAD`] pages for
//!   any list size. A read error before the first page is a JSON 500; after it, the body
//!   ends early (the client sees a truncated chunked body, not a complete-looking CSV).

use super::error::{page_limit, ApiError, ApiJson};
use super::AdminState;
use crate::config::parse_duration;
use crate::suppression::{self, Entry};
use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};

const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
/// Entries per read (and per body chunk) while exporting.
const EXPORT_PAGE: usize = 10_000;
/// Pages read ahead of a slow client.
const EXPORT_PAGES_AHEAD: usize = 2;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/suppressions", get(list).post(add))
        .route("/suppressions/import", post(import))
        .route("/suppressions/export", get(export))
        .route("/suppressions/{address}", get(show).delete(remove))
}

type ApiResult = Result<Json<Value>, ApiError>;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    pub after: Option<String>,
    pub limit: Option<usize>,
    pub reason: Option<String>,
    pub contains: Option<String>,
}

fn spool_error(e: tern_queue::SpoolError) -> ApiError {
    ApiError::unavailable(format!("spool: {e}"))
}

fn list_of(state: &AdminState) -> suppression::Suppressions {
    state.feedback.suppressions.clone()
}

async fn list(
    State(state): State<AdminState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(list_report(&state, params).await?))
}

/// The answer of `GET /suppressions` (the console's suppression page renders the same value).
pub async fn list_report(state: &AdminState, params: ListParams) -> Result<Value, ApiError> {
    let limit = page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    if let Some(reason) = params
        .reason
        .as_deref()
        .filter(|r| !suppression::valid_reason(r))
    {
        return Err(ApiError::bad_request(format!(
            "reason: unknown reason {reason:?} (a bounce category or \"manual\")"
        )));
    }
    let list = list_of(state);
    let (entries, next) = tokio::task::spawn_blocking(move || {
        list.list(
            params.after.as_deref(),
            limit,
            params.reason.as_deref(),
            params.contains.as_deref(),
        )
    })
    .await
    .map_err(|e| ApiError::internal(e.to_string()))?
    .map_err(spool_error)?;
    Ok(json!({"entries": entries, "next": next}))
}

async fn show(
    State(state): State<AdminState>,
    Path(address): Path<String>,
    params: Result<Query<ScopeParam>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let list = list_of(&state);
    let found = match params.scope.as_deref() {
        Some(scope) => list.check_scoped(&address, scope),
        None => list.check(&address),
    };
    match found {
        Some(entry) => Ok(Json(json!(entry))),
        None => Err(ApiError::not_found(format!("{address} is not suppressed"))),
    }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct AddRequest {
    pub address: String,
    pub reason: Option<String>,
    pub expires_in: Option<String>,
    pub scope: Option<String>,
}

/// `?scope=LIST` of one entry's routes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScopeParam {
    scope: Option<String>,
}

pub async fn add(State(state): State<AdminState>, ApiJson(req): ApiJson<AddRequest>) -> ApiResult {
    let address = suppression::normalize(&req.address);
    match address.rsplit_once('@') {
        Some((l, d)) if !l.is_empty() && !d.is_empty() => {}
        _ => {
            return Err(ApiError::bad_request(format!(
                "address: {:?} is not an address",
                req.address
            )))
        }
    }
    let reason = req.reason.unwrap_or_else(|| "manual".to_owned());
    if !suppression::valid_reason(&reason) {
        return Err(ApiError::bad_request(format!(
            "reason: unknown reason {reason:?} (a bounce category, \"manual\", \"sunset\" or \"unsubscribe\")"
        )));
    }
    if let Some(scope) = &req.scope {
        crate::message::OneClick::parse(&format!("one-click; list={scope}"))
            .map_err(|e| ApiError::bad_request(format!("scope: {e}")))?;
    }
    let now = crate::clock::now_ms();
    let expires_ms = req
        .expires_in
        .map(|d| {
            parse_duration(&d)
                .map(|d| now.saturating_add(d.as_millis() as u64))
                .map_err(|e| ApiError::bad_request(format!("expires_in: {e}")))
        })
        .transpose()?;
    let entry = Entry {
        address,
        reason,
        created_ms: now,
        expires_ms,
        source: None,
        scope: req.scope.map(|s| s.to_ascii_lowercase()),
    };
    list_of(&state)
        .add(vec![entry.clone()])
        .await
        .map_err(spool_error)?;
    Ok(Json(json!(entry)))
}

async fn remove(
    State(state): State<AdminState>,
    Path(address): Path<String>,
    params: Result<Query<ScopeParam>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    Ok(Json(
        remove_entry(&state, &address, params.scope.as_deref()).await?,
    ))
}

/// `DELETE /suppressions/{address}[?scope=LIST]` (the console's remove button too).
pub async fn remove_entry(
    state: &AdminState,
    address: &str,
    scope: Option<&str>,
) -> Result<Value, ApiError> {
    let key = suppression::key_for(address, scope);
    let removed = list_of(state)
        .remove(std::slice::from_ref(&key))
        .await
        .map_err(spool_error)?;
    if removed == 0 {
        return Err(ApiError::not_found(format!("{address} is not suppressed")));
    }
    Ok(json!({"removed": removed}))
}

async fn import(State(state): State<AdminState>, body: String) -> ApiResult {
    let entries = suppression::parse_csv(&body, crate::clock::now_ms())
        .map_err(|e| ApiError::bad_request(format!("CSV: {e}")))?;
    let n = entries.len();
    list_of(&state).add(entries).await.map_err(spool_error)?;
    Ok(Json(json!({"imported": n})))
}

async fn export(State(state): State<AdminState>) -> Result<impl IntoResponse, ApiError> {
    let list = list_of(&state);
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(EXPORT_PAGES_AHEAD);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let page = |after: Option<&str>| {
            let (entries, next) = list.list(after, EXPORT_PAGE, None, None)?;
            let mut chunk = String::with_capacity(entries.len() * 64);
            for e in &entries {
                chunk.push_str(&suppression::to_csv_line(e));
                chunk.push('\n');
            }
            Ok::<_, tern_queue::SpoolError>((chunk, next))
        };
        let (first, mut after) = match page(None) {
            Ok(p) => p,
            Err(e) => {
                let _ = first_tx.send(Err(e));
                return;
            }
        };
        let _ = first_tx.send(Ok(format!("{}\n{first}", suppression::CSV_HEADER)));
        while let Some(cursor) = after {
            let chunk = match page(Some(&cursor)) {
                Ok((chunk, next)) => {
                    after = next;
                    Ok(Bytes::from(chunk))
                }
                Err(e) => {
                    after = None;
                    Err(std::io::Error::other(e.to_string()))
                }
            };
            // A client that went away ends the export.
            if tx.blocking_send(chunk).is_err() {
                return;
            }
        }
    });
    let first = first_rx
        .await
        .map_err(|e| ApiError::internal(e.to_string()))?
        .map_err(spool_error)?;
    let rest = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|chunk| (chunk, rx))
    });
    let body = futures_util::stream::once(async move { Ok(Bytes::from(first)) }).chain(rest);
    Ok((
        [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        Body::from_stream(body),
    ))
}
