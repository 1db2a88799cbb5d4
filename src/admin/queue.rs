//! The queue-management half of the admin API (under `/api/v1`, behind the bearer token):
//! looking at the spool (summary, message list, one message), suspending and resuming
//! destinations, and acting on messages chosen by a selector (retry now, hold, release,
//! bounce, delete).
//!
//! This module owns the HTTP shape only: parsing and validating requests, choosing messages,
//! rendering JSON. What an action does, and how it is kept safe against a delivery attempt in
//! flight, is `scheduler::Scheduler::operate` and `outcome::operator`.
//!
//! Invariants: every answer is JSON, errors `{"error": "..."}` (400 for malformed or unknown
//! input, 404 for an unknown message); reads that scan the spool run on blocking threads.

use super::error::{page_limit, ApiError, ApiJson};
use super::AdminState;
use crate::clock::now_ms;
use crate::config::parse_duration;
use crate::outcome::operator::NOT_DUE;
use crate::scheduler::{Operation, Suspension};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tern_queue::{Envelope, MessageId, RecipientState, Spool, SpoolError};

/// Messages per page of `GET /queue/messages` unless `limit` says otherwise, and the most it
/// may ask for.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1000;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/queue/summary", get(summary))
        .route("/queue/messages", get(list))
        .route("/queue/messages/{id}", get(show))
        .route("/queue/suspensions", get(suspensions))
        .route("/queue/suspend", post(suspend))
        .route("/queue/resume", post(resume))
        .route("/queue/retry", post(|s, b| operate(s, b, Operation::Retry)))
        .route("/queue/hold", post(|s, b| operate(s, b, Operation::Hold)))
        .route(
            "/queue/release",
            post(|s, b| operate(s, b, Operation::Release)),
        )
        .route(
            "/queue/bounce",
            post(|s, b| operate(s, b, Operation::Bounce)),
        )
        .route(
            "/queue/delete",
            post(|s, b| operate(s, b, Operation::Delete)),
        )
        .route("/queue/drain", post(drain))
}

/// `POST /queue/drain`: this running node's queue relayed to another tern node (see
/// `scheduler::drain`; `admin` scope). File names, never credentials, travel in the body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DrainRequest {
    to: String,
    destination: Option<String>,
    connections: Option<usize>,
    auth_file: Option<String>,
    peer_name: Option<String>,
    ca_file: Option<String>,
    #[serde(default)]
    loopback_unverified: bool,
}

async fn drain(State(state): State<AdminState>, ApiJson(req): ApiJson<DrainRequest>) -> ApiResult {
    use crate::scheduler::drain::{self, Local, Peer};
    let addr: std::net::SocketAddr = req
        .to
        .parse()
        .map_err(|_| ApiError::bad_request(format!("to: {:?} is not IP:PORT", req.to)))?;
    let mut peer = Peer::new(addr);
    if let Some(name) = req.peer_name {
        peer.name = name;
    }
    if req.loopback_unverified && !addr.ip().is_loopback() {
        return Err(ApiError::bad_request(format!(
            "loopback_unverified: {addr} is not a loopback address"
        )));
    }
    peer.loopback_unverified = req.loopback_unverified;
    peer.ca_file = req.ca_file.map(std::path::PathBuf::from);
    if let Some(file) = req.auth_file {
        peer.auth = Some(
            drain::read_credentials(std::path::Path::new(&file))
                .map_err(|e| ApiError::bad_request(format!("auth_file: {e}")))?,
        );
    }
    let destination = req.destination.as_deref().map(destination).transpose()?;
    let delivery = state.scheduler.delivery_config();
    let local = Local {
        hostname: state.hostname.clone(),
        timeouts: delivery.timeouts,
        ca_file: delivery.ca_file.clone(),
    };
    let started = std::time::Instant::now();
    let result = drain::drain(
        &local,
        state.spool.clone(),
        &peer,
        destination,
        req.connections.unwrap_or(4).clamp(1, 64),
        Some(state.scheduler.clone()),
    )
    .await;
    let seconds = started.elapsed().as_secs_f64();
    match result {
        Ok(d) => {
            tracing::info!(to = %addr, messages = d.messages, "queue drained by the administrator");
            Ok(Json(json!({
                "messages": d.messages, "recipients": d.recipients, "refused": d.refused,
                "held": d.held, "seconds": seconds,
            })))
        }
        Err((d, e)) => Err(ApiError::new(
            axum::http::StatusCode::BAD_GATEWAY,
            format!(
                "drain stopped after {} messages: {e}; the rest is still queued",
                d.messages
            ),
        )),
    }
}

type ApiResult = Result<Json<Value>, ApiError>;

fn spool_error(err: SpoolError) -> ApiError {
    ApiError::internal(err.to_string())
}

/// Runs a spool scan on a blocking thread.
async fn scan<T: Send + 'static>(
    spool: &Spool,
    f: impl FnOnce(&Spool) -> Result<T, SpoolError> + Send + 'static,
) -> Result<T, ApiError> {
    let spool = spool.clone();
    tokio::task::spawn_blocking(move || f(&spool))
        .await
        .map_err(|e| ApiError::internal(format!("spool scan failed: {e}")))?
        .map_err(spool_error)
}

fn due(ms: u64) -> Value {
    if ms == NOT_DUE {
        Value::Null
    } else {
        json!(ms)
    }
}

fn suspension_json(s: &Suspension) -> Value {
    json!({
        "destination": s.destination,
        "since_ms": s.since_ms,
        "until_ms": s.until_ms,
        "reason": s.reason,
    })
}

fn state_name(state: RecipientState) -> &'static str {
    match state {
        RecipientState::Pending => "pending",
        RecipientState::Delivered => "delivered",
        RecipientState::Bounced => "bounced",
        RecipientState::Expired => "expired",
    }
}

fn message_json(env: &Envelope, now: u64) -> Value {
    let recipients: Vec<Value> = env
        .recipients
        .iter()
        .map(|r| {
            json!({
                "address": r.address,
                "state": state_name(r.state),
                "attempts": r.attempts,
                "last_reply": r.last_reply,
            })
        })
        .collect();
    json!({
        "id": env.id.to_string(),
        "queue_id": env.queue_id.to_string(),
        "sender": env.sender,
        "destination": env.destination,
        "recipients": recipients,
        "size": env.size,
        "created_ms": env.created_ms,
        "age_s": now.saturating_sub(env.created_ms) / 1000,
        "next_due_ms": due(env.next_due_ms),
        "expires_ms": env.expires_ms,
        "attempts": env.attempts,
        "held": env.held,
        "parked": env.parked,
    })
}

/// Upper bounds (minutes) of the age histogram's buckets, like Postfix's qshape: a message
/// is counted in the first bucket its age is below; one more bucket holds the older ones.
pub const AGE_BUCKETS_MINUTES: [u64; 9] = [5, 10, 20, 40, 80, 160, 320, 640, 1280];

/// The histogram bucket of a message `age_ms` old.
fn age_bucket(age_ms: u64) -> usize {
    AGE_BUCKETS_MINUTES
        .iter()
        .position(|&m| age_ms < m * 60_000)
        .unwrap_or(AGE_BUCKETS_MINUTES.len())
}

/// `GET /queue/summary`: per destination (recipient domain) and in total, with the age
/// histogram of its messages.
async fn summary(State(state): State<AdminState>) -> ApiResult {
    Ok(Json(summary_report(&state).await?))
}

/// The answer of `GET /queue/summary` (the console's queue page renders the same value).
pub async fn summary_report(state: &AdminState) -> Result<Value, ApiError> {
    #[derive(Default)]
    struct Row {
        messages: u64,
        recipients: u64,
        bytes: u64,
        oldest_ms: Option<u64>,
        held: u64,
        ages: [u64; AGE_BUCKETS_MINUTES.len() + 1],
    }
    let now = now_ms();
    let rows = scan(&state.spool, move |spool| {
        let mut rows: BTreeMap<String, Row> = BTreeMap::new();
        for env in spool.envelopes_after(None) {
            let env = env?;
            let row = rows.entry(env.destination.clone()).or_default();
            row.messages += 1;
            row.recipients += env
                .recipients
                .iter()
                .filter(|r| r.state == RecipientState::Pending)
                .count() as u64;
            row.bytes += env.size;
            row.oldest_ms = Some(
                row.oldest_ms
                    .map_or(env.created_ms, |o| o.min(env.created_ms)),
            );
            row.held += u64::from(env.held);
            row.ages[age_bucket(now.saturating_sub(env.created_ms))] += 1;
        }
        Ok(rows)
    })
    .await?;
    let suspensions = state.scheduler.suspensions();
    let mut by_destination: BTreeMap<String, (Option<Row>, Option<&Suspension>)> = rows
        .into_iter()
        .map(|(d, row)| (d, (Some(row), None)))
        .collect();
    for s in &suspensions {
        if let Some(d) = &s.destination {
            by_destination.entry(d.clone()).or_default().1 = Some(s);
        }
    }
    let mut totals = Row::default();
    let destinations: Vec<Value> = by_destination
        .into_iter()
        .map(|(destination, (row, suspended))| {
            let row = row.unwrap_or_default();
            totals.messages += row.messages;
            totals.recipients += row.recipients;
            totals.bytes += row.bytes;
            totals.held += row.held;
            for (total, n) in totals.ages.iter_mut().zip(row.ages) {
                *total += n;
            }
            json!({
                "destination": destination,
                "messages": row.messages,
                "pending_recipients": row.recipients,
                "bytes": row.bytes,
                "oldest_age_s": row.oldest_ms.map(|o| now.saturating_sub(o) / 1000),
                "held": row.held,
                "suspended": suspended.map(suspension_json),
                "age_histogram": row.ages,
            })
        })
        .collect();
    let all = suspensions.iter().find(|s| s.destination.is_none());
    Ok(json!({
        "destinations": destinations,
        "totals": {
            "messages": totals.messages,
            "pending_recipients": totals.recipients,
            "bytes": totals.bytes,
            "held": totals.held,
            "age_histogram": totals.ages,
        },
        "age_buckets_minutes": AGE_BUCKETS_MINUTES,
        "suspended_all": all.map(suspension_json),
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    destination: Option<String>,
    sender: Option<String>,
    held: Option<bool>,
    limit: Option<usize>,
    after: Option<String>,
}

fn parse_id(text: &str) -> Result<MessageId, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("{text:?} is not a message id")))
}

/// `GET /queue/messages?destination=&sender=&held=&limit=&after=`: a page of messages in id
/// (arrival) order; `next` is the cursor for the following page, `null` on the last.
async fn list(
    State(state): State<AdminState>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = page_limit(params.limit, DEFAULT_LIMIT, MAX_LIMIT)?;
    let after = params.after.as_deref().map(parse_id).transpose()?;
    let filter = Filter {
        destination: params.destination.map(|d| d.to_ascii_lowercase()),
        sender: params.sender,
        held: params.held,
    };
    let (page, more) = scan(&state.spool, move |spool| {
        let mut page = Vec::new();
        for env in spool.envelopes_after(after) {
            let env = env?;
            if !filter.matches(&env) {
                continue;
            }
            if page.len() == limit {
                return Ok((page, true));
            }
            page.push(env);
        }
        Ok((page, false))
    })
    .await?;
    let now = now_ms();
    let next = if more {
        page.last().map(|env| env.id.to_string())
    } else {
        None
    };
    let messages: Vec<Value> = page.iter().map(|env| message_json(env, now)).collect();
    Ok(Json(json!({ "messages": messages, "next": next })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ShowParams {
    #[serde(default)]
    body: bool,
}

/// `GET /queue/messages/{id}[?body=true]`: one message; the raw message as `body` (UTF-8)
/// or `body_base64` (anything else).
async fn show(
    State(state): State<AdminState>,
    Path(id): Path<String>,
    params: Result<Query<ShowParams>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let not_found = || ApiError::not_found(format!("message {id} is not in the queue"));
    let msg_id: MessageId = id.parse().map_err(|_| not_found())?;
    let env = state
        .spool
        .envelope(msg_id)
        .map_err(spool_error)?
        .ok_or_else(not_found)?;
    let mut out = message_json(&env, now_ms());
    if params.body {
        let body = state
            .spool
            .body(msg_id)
            .map_err(spool_error)?
            .ok_or_else(not_found)?;
        match std::str::from_utf8(&body) {
            Ok(text) => out["body"] = json!(text),
            Err(_) => {
                out["body_base64"] = json!(base64::engine::general_purpose::STANDARD.encode(&*body))
            }
        }
    }
    Ok(Json(out))
}

/// `GET /queue/suspensions`.
async fn suspensions(State(state): State<AdminState>) -> Json<Value> {
    let list: Vec<Value> = state
        .scheduler
        .suspensions()
        .iter()
        .map(suspension_json)
        .collect();
    Json(json!({ "suspensions": list }))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct SuspendRequest {
    pub destination: Option<String>,
    pub duration: Option<String>,
    pub reason: Option<String>,
}

/// A recipient domain as the spool writes it (lowercase); refuses what cannot be one.
fn destination(text: &str) -> Result<String, ApiError> {
    let d = text.trim().to_ascii_lowercase();
    if d.is_empty() || d.contains(|c: char| c.is_whitespace() || matches!(c, '@' | '/' | '*')) {
        return Err(ApiError::bad_request(format!(
            "destination {text:?} is not a domain"
        )));
    }
    Ok(d)
}

/// `POST /queue/suspend {"destination"?, "duration"?, "reason"?}`: no destination suspends
/// all delivery; no duration lasts until resumed.
pub async fn suspend(
    State(state): State<AdminState>,
    ApiJson(req): ApiJson<SuspendRequest>,
) -> ApiResult {
    let dest = req.destination.as_deref().map(destination).transpose()?;
    let until_ms = match req.duration.as_deref() {
        None => None,
        Some(text) => {
            let d = parse_duration(text)
                .map_err(|e| ApiError::bad_request(format!("duration: {e}")))?;
            if d.is_zero() {
                return Err(ApiError::bad_request("duration: must be more than zero"));
            }
            Some(now_ms().saturating_add(d.as_millis() as u64))
        }
    };
    let reason = req.reason.unwrap_or_default();
    let s = state
        .scheduler
        .suspend(dest, until_ms, reason)
        .await
        .map_err(spool_error)?;
    Ok(Json(json!({ "suspended": suspension_json(&s) })))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResumeRequest {
    pub destination: Option<String>,
}

/// `POST /queue/resume {"destination"?}`: no destination resumes all delivery (including the
/// `delivery.suspended` config flag). Answers whether a suspension was in force.
pub async fn resume(
    State(state): State<AdminState>,
    ApiJson(req): ApiJson<ResumeRequest>,
) -> ApiResult {
    let dest = req.destination.as_deref().map(destination).transpose()?;
    let resumed = state
        .scheduler
        .resume(dest.as_deref())
        .await
        .map_err(spool_error)?;
    Ok(Json(json!({ "destination": dest, "resumed": resumed })))
}

/// Which messages an action applies to. Criteria combine (all must hold); at least one is
/// required, and `all` only where the action is harmless to apply to everything.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub id: Option<String>,
    pub ids: Option<Vec<String>>,
    pub destination: Option<String>,
    /// Exact address, compared without regard to case; "" is the null sender.
    pub sender: Option<String>,
    #[serde(default)]
    pub all: bool,
}

struct Filter {
    destination: Option<String>,
    sender: Option<String>,
    held: Option<bool>,
}

impl Filter {
    fn matches(&self, env: &Envelope) -> bool {
        self.destination
            .as_ref()
            .is_none_or(|d| env.destination == *d)
            && self
                .sender
                .as_ref()
                .is_none_or(|s| env.sender.eq_ignore_ascii_case(s))
            && self.held.is_none_or(|h| env.held == h)
    }
}

fn op_name(op: Operation) -> &'static str {
    match op {
        Operation::Retry => "retry",
        Operation::Hold => "hold",
        Operation::Release => "release",
        Operation::Bounce => "bounce",
        Operation::Delete => "delete",
    }
}

/// `POST /queue/{retry,hold,release,bounce,delete}` with a [`Selector`]: answers
/// `{"matched": n, "affected": m}` (matched messages that the action changed; e.g. a retry
/// of a message already due, or a hold of a held one, does not count).
pub async fn operate(
    State(state): State<AdminState>,
    ApiJson(sel): ApiJson<Selector>,
    op: Operation,
) -> ApiResult {
    let named = sel.id.is_some() || sel.ids.is_some();
    if !named && sel.destination.is_none() && sel.sender.is_none() && !sel.all {
        return Err(ApiError::bad_request(
            "a selector is required: id, ids, destination, sender (or all: true for retry, hold and release)",
        ));
    }
    if sel.all && matches!(op, Operation::Bounce | Operation::Delete) {
        return Err(ApiError::bad_request(format!(
            "all is not accepted for {}: name the messages (id, ids, destination or sender)",
            op_name(op)
        )));
    }
    let filter = Filter {
        destination: sel.destination.as_deref().map(destination).transpose()?,
        sender: sel.sender,
        held: None,
    };
    let ids: Vec<MessageId> = if named {
        let mut ids = Vec::new();
        for text in sel.id.iter().chain(sel.ids.iter().flatten()) {
            ids.push(parse_id(text)?);
        }
        let mut chosen = Vec::new();
        let mut unknown = Vec::new();
        for id in ids {
            match state.spool.envelope(id).map_err(spool_error)? {
                Some(env) if filter.matches(&env) => chosen.push(id),
                Some(_) => {}
                None => unknown.push(id.to_string()),
            }
        }
        if !unknown.is_empty() {
            return Err(ApiError::not_found(format!(
                "not in the queue: {}",
                unknown.join(", ")
            )));
        }
        chosen
    } else {
        scan(&state.spool, move |spool| {
            let mut ids = Vec::new();
            for env in spool.envelopes_after(None) {
                let env = env?;
                if filter.matches(&env) {
                    ids.push(env.id);
                }
            }
            Ok(ids)
        })
        .await?
    };
    let affected = state
        .scheduler
        .operate(op, &ids)
        .await
        .map_err(spool_error)?;
    tracing::info!(
        action = op_name(op),
        matched = ids.len(),
        affected,
        "queue action by the administrator"
    );
    Ok(Json(json!({ "matched": ids.len(), "affected": affected })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_fall_in_the_first_bucket_they_are_below() {
        let minute = 60_000;
        assert_eq!(age_bucket(0), 0);
        assert_eq!(age_bucket(5 * minute - 1), 0);
        assert_eq!(age_bucket(5 * minute), 1);
        assert_eq!(age_bucket(1279 * minute), 8);
        assert_eq!(age_bucket(1280 * minute), 9);
        assert_eq!(age_bucket(u64::MAX), AGE_BUCKETS_MINUTES.len());
    }
}
