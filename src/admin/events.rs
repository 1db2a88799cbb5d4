//! Engagement events and recipient engagement (`/api/v1/events`, `/api/v1/recipients`,
//! `/api/v1/sendtime/refit`, `/api/v1/sendtime/lift`): the HTTP face of `crate::sendtime`.
//!
//! `POST /api/v1/events` takes `{"events": [...]}`, each `{"type":
//! "open"|"click"|"send"|"conversion", "recipient", "time_ms"?, "message_id"?, "machine"?,
//! "tz_offset_minutes"?, "campaign"?, "variant"?}`. The whole call is checked before
//! anything is recorded, so a 400 (naming `events[i].field`) records nothing; after that each
//! event is recorded durably before the 200. Machine opens are counted per recipient but
//! never learnt from. A conversion (it needs `campaign`) is no engagement for the send-time
//! model; it and every open or click naming a campaign also become events (webhooks, the
//! campaign's results).
//!
//! `GET /api/v1/recipients/{address}`: the recipient's lifecycle state, the engagement
//! model's prediction, their history (sends, opens, clicks, last events, machine opens) and
//! their win-back series. `DELETE` erases the profile (this node's and the fleet's shared
//! copy) and the events kept in memory about them (tracked opens and clicks, recent
//! failures); a suppression entry stays, since it is what keeps the address from being
//! mailed. 404 when there was nothing to erase.

use super::error::{ApiError, ApiJson};
use super::AdminState;
use crate::clock::now_ms;
use crate::config::parse_duration;
use crate::events::Kind as EventsKind;
use crate::rfc5321::address::check_mailbox;
use crate::sendtime::lifecycle;
use crate::sendtime::profile::Profile;
use crate::sendtime::{Event, EventKind, SendTime};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

/// Events per call; more is a 400 (send them in batches).
const MAX_EVENTS: usize = 10_000;
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
/// Events further in the future than this are refused (a clock or unit mistake: seconds
/// given for milliseconds, say).
const MAX_FUTURE_MS: u64 = 3_600_000;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/events", post(record))
        .route("/recipients", get(dormant))
        .route("/recipients/{address}", get(recipient).delete(erase))
        .route("/sendtime/refit", post(refit))
        .route("/sendtime/lift", get(lift))
}

type ApiResult = Result<Json<Value>, ApiError>;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsBody {
    events: Vec<EventBody>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventBody {
    #[serde(rename = "type")]
    kind: ApiKind,
    recipient: String,
    time_ms: Option<u64>,
    /// The sender's id of the message engaged with: checked, not used by the model (which
    /// learns per recipient and hour).
    message_id: Option<String>,
    #[serde(default)]
    machine: bool,
    tz_offset_minutes: Option<i32>,
    /// The campaign (and variant) the event is about: it then counts in the campaign's
    /// results and goes to the webhooks.
    campaign: Option<String>,
    variant: Option<String>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum ApiKind {
    Open,
    Click,
    Send,
    Conversion,
}

fn internal(err: impl std::fmt::Display) -> ApiError {
    ApiError::internal(format!("spool: {err}"))
}

async fn record(State(state): State<AdminState>, ApiJson(body): ApiJson<EventsBody>) -> ApiResult {
    let send_time = &state.send_time;
    if body.events.len() > MAX_EVENTS {
        return Err(ApiError::bad_request(format!(
            "events: {} events; at most {MAX_EVENTS} per call",
            body.events.len()
        )));
    }
    let now = now_ms();
    let mut events = Vec::with_capacity(body.events.len());
    let mut published = Vec::new();
    let mut conversions = 0;
    for (i, e) in body.events.into_iter().enumerate() {
        check_mailbox(&e.recipient)
            .map_err(|why| ApiError::bad_request(format!("events[{i}].recipient: {why}")))?;
        let time_ms = e.time_ms.unwrap_or(now);
        if time_ms == 0 || time_ms > now + MAX_FUTURE_MS {
            return Err(ApiError::bad_request(format!(
                "events[{i}].time_ms: {time_ms} is not a unix time in milliseconds up to now"
            )));
        }
        if let Some(tz) = e.tz_offset_minutes {
            if !(-14 * 60..=14 * 60).contains(&tz) {
                return Err(ApiError::bad_request(format!(
                    "events[{i}].tz_offset_minutes: {tz} is outside -840..=840"
                )));
            }
        }
        if e.message_id
            .as_deref()
            .is_some_and(|id| id.is_empty() || id.len() > 998)
        {
            return Err(ApiError::bad_request(format!(
                "events[{i}].message_id: must be 1 to 998 characters"
            )));
        }
        if e.machine && e.kind != ApiKind::Open {
            return Err(ApiError::bad_request(format!(
                "events[{i}].machine: only an open can be a machine open"
            )));
        }
        for (field, value) in [("campaign", &e.campaign), ("variant", &e.variant)] {
            if value
                .as_deref()
                .is_some_and(|v| v.is_empty() || v.len() > 64 || v.chars().any(|c| c.is_control()))
            {
                return Err(ApiError::bad_request(format!(
                    "events[{i}].{field}: must be 1 to 64 characters, no control characters"
                )));
            }
        }
        if e.variant.is_some() && e.campaign.is_none() {
            return Err(ApiError::bad_request(format!(
                "events[{i}].variant: needs campaign"
            )));
        }
        let kind = match e.kind {
            ApiKind::Open => Some((EventKind::Open, EventsKind::Open)),
            ApiKind::Click => Some((EventKind::Click, EventsKind::Click)),
            ApiKind::Send => None,
            ApiKind::Conversion => None,
        };
        if e.kind == ApiKind::Conversion && e.campaign.is_none() {
            return Err(ApiError::bad_request(format!(
                "events[{i}].campaign: a conversion needs the campaign it is for"
            )));
        }
        if let Some(campaign) = &e.campaign {
            let kind = match e.kind {
                ApiKind::Conversion => Some(EventsKind::Conversion),
                _ => kind.map(|k| k.1),
            };
            if let Some(kind) = kind {
                let mut event = crate::events::Event::new(kind, &e.recipient, "api");
                event.ts = time_ms;
                event.campaign = Some(campaign.clone());
                event.variant = e.variant.clone();
                if kind != EventsKind::Conversion {
                    event.machine = Some(e.machine);
                }
                event.detail = e.message_id.clone().map(|m| format!("message {m}"));
                published.push(event);
            }
        }
        if e.kind == ApiKind::Conversion {
            conversions += 1;
            continue;
        }
        events.push(Event {
            kind: kind.map_or(EventKind::Send, |k| k.0),
            recipient: e.recipient,
            time_ms,
            machine: e.machine,
            tz_offset_min: e.tz_offset_minutes,
        });
    }
    let (mut engagements, mut machine_opens, mut sends) = (0, 0, 0);
    for event in &events {
        match event.kind {
            EventKind::Send => sends += 1,
            _ if SendTime::is_engagement(event) => engagements += 1,
            _ => machine_opens += 1,
        }
    }
    let recorded = events.len() + conversions;
    send_time.record_batch(events).await.map_err(internal)?;
    state.feedback.events.emit(published).await;
    let mut answer = json!({
        "recorded": recorded,
        "engagements": engagements,
        "machine_opens": machine_opens,
        "sends": sends,
    });
    if conversions > 0 {
        answer["conversions"] = json!(conversions);
    }
    Ok(Json(answer))
}

fn summary(address: &str, p: &Profile, now: u64, dormant_after_ms: u64) -> Value {
    let since = p.dormant_since();
    json!({
        "address": address,
        "score": (p.score(now) * 10.0).round() / 10.0,
        "engagements": p.total_engagements(),
        "sends": p.total_sends(),
        "machine_opens": p.machine_opens,
        "last_engaged_ms": (p.last_engaged_ms > 0).then_some(p.last_engaged_ms),
        "last_send_ms": (p.last_send_ms > 0).then_some(p.last_send_ms),
        "tz_offset_minutes": p.tz_offset_min,
        "dormant": since + dormant_after_ms < now,
    })
}

async fn recipient(State(state): State<AdminState>, Path(address): Path<String>) -> ApiResult {
    let send_time = &state.send_time;
    check_mailbox(&address).map_err(|why| ApiError::bad_request(format!("address: {why}")))?;
    let now = now_ms();
    let (p, prediction, lifecycle_state) = send_time
        .recipient(&address, now)
        .await
        .map_err(internal)?
        .ok_or_else(|| ApiError::not_found(format!("no engagement recorded for {address}")))?;
    let dormant_after = send_time.config().dormant_after.as_millis() as u64;
    let address = address.to_ascii_lowercase();
    let mut answer = summary(&address, &p, now, dormant_after);
    let when = |t: u64| (t > 0).then_some(t);
    let w = &p.winback;
    let extra = json!({
        "state": lifecycle_state,
        "prediction": (prediction * 10_000.0).round() / 10_000.0,
        "history": {
            "sends": p.send_count,
            "opens": p.open_count,
            "clicks": p.click_count,
            "machine_opens": p.machine_opens,
            "sends_since_engaged": p.sends_since_engaged,
            "first_ms": when(p.first_ms),
            "last_send_ms": when(p.last_send_ms),
            "last_engaged_ms": when(p.last_engaged_ms),
            "last_click_ms": when(p.last_click_ms),
        },
        "winback": {
            "in_series": lifecycle::in_series(&p),
            "started_ms": when(w.started_ms),
            "sends": w.sends,
            "last_ms": when(w.last_ms),
            "reactivated": lifecycle::reactivated(&p),
            "reactivations": w.reactivations + u16::from(lifecycle::reactivated(&p)),
        },
        "suppressed": state.feedback.suppressions.check(&address).map(|e| e.reason),
    });
    if let (Value::Object(a), Value::Object(e)) = (&mut answer, extra) {
        a.extend(e);
    }
    Ok(Json(answer))
}

/// `DELETE /api/v1/recipients/{address}`: the privacy erasure (see the module doc).
async fn erase(State(state): State<AdminState>, Path(address): Path<String>) -> ApiResult {
    check_mailbox(&address).map_err(|why| ApiError::bad_request(format!("address: {why}")))?;
    let profile = state.send_time.erase(&address).await.map_err(internal)?;
    let events =
        state.sidecar.forget_recipient(&address) + state.feedback.events.forget_recipient(&address);
    if !profile && events == 0 {
        return Err(ApiError::not_found(format!(
            "nothing recorded for {address}"
        )));
    }
    Ok(Json(json!({
        "address": address.to_ascii_lowercase(),
        "profile_erased": profile,
        "events_erased": events,
        "suppression_kept": state.feedback.suppressions.check(&address).is_some(),
    })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DormantParams {
    /// Overrides `sendtime.dormant_after` ("180d").
    dormant_after: Option<String>,
    limit: Option<usize>,
}

/// `GET /api/v1/recipients?dormant_after=180d&limit=100`: dormant recipients.
async fn dormant(
    State(state): State<AdminState>,
    params: Result<Query<DormantParams>, QueryRejection>,
) -> ApiResult {
    let Query(params) = params.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let send_time = state.send_time.clone();
    let after = match &params.dormant_after {
        Some(s) => {
            parse_duration(s).map_err(|e| ApiError::bad_request(format!("dormant_after: {e}")))?
        }
        None => send_time.config().dormant_after,
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad_request(format!(
            "limit: must be 1..={MAX_LIMIT}"
        )));
    }
    let now = now_ms();
    let after_ms = after.as_millis() as u64;
    let found = tokio::task::spawn_blocking(move || send_time.dormant(after, now, limit))
        .await
        .map_err(internal)?
        .map_err(internal)?;
    let recipients: Vec<Value> = found
        .iter()
        .map(|(a, p)| summary(a, p, now, after_ms))
        .collect();
    Ok(Json(json!({
        "dormant_after_ms": after_ms,
        "recipients": recipients,
    })))
}

/// Refits the priors now instead of at the next `sendtime.refit_interval`.
async fn refit(State(state): State<AdminState>) -> ApiResult {
    let n = state.send_time.refit().await.map_err(internal)?;
    Ok(Json(json!({ "recipients": n })))
}

/// `GET /api/v1/sendtime/lift`: engagement of the control arm (sent at once) against the
/// model's arm, as of the last refit.
async fn lift(State(state): State<AdminState>) -> ApiResult {
    let lift = state.send_time.lift();
    let arm = |i: usize| {
        let rate = (lift.sends[i] > 0).then(|| lift.engaged[i] as f64 / lift.sends[i] as f64);
        json!({"sends": lift.sends[i], "engaged": lift.engaged[i], "rate": rate})
    };
    let uplift = match (lift.sends, lift.engaged) {
        ([cs, ms], [ce, me]) if cs > 0 && ms > 0 && ce > 0 => {
            Some((me as f64 / ms as f64) / (ce as f64 / cs as f64) - 1.0)
        }
        _ => None,
    };
    Ok(Json(
        json!({"control": arm(0), "model": arm(1), "uplift": uplift}),
    ))
}
