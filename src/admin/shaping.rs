//! `GET /api/v1/shaping` and `GET /api/v1/shaping/{bucket}`: "why is this destination slow".
//!
//! Each entry is one (source address, bucket) pair that has carried traffic since start: the
//! configured and current (adaptive) rate, connections in use and the cap, suspension and the
//! reply that caused it, warm-up day, cap and count, and `why`: those facts as sentences, the
//! ones holding traffic back first ([`why_slow`]; the console shows the same). A bucket is a
//! provider name ("google") or a destination key ("mx:...", "route:...").

use super::error::ApiError;
use super::AdminState;
use crate::shaping::PairView;
use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/shaping", get(all))
        .route("/shaping/{bucket}", get(one))
}

/// The pairs (of one bucket, or all), each view with its `why` added.
pub fn pairs_report(state: &AdminState, bucket: Option<&str>) -> Vec<Value> {
    state
        .shaper
        .views(bucket)
        .iter()
        .map(|view| {
            let mut value = json!(view);
            value["why"] = json!(why_slow(view));
            value
        })
        .collect()
}

async fn all(State(state): State<AdminState>) -> Json<Value> {
    Json(json!({ "pairs": pairs_report(&state, None) }))
}

async fn one(
    State(state): State<AdminState>,
    Path(bucket): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let pairs = pairs_report(&state, Some(&bucket));
    if pairs.is_empty() {
        return Err(ApiError::not_found(format!(
            "no shaping state for bucket {bucket:?} (no traffic since start, or unknown)"
        )));
    }
    Ok(Json(json!({ "bucket": bucket, "pairs": pairs })))
}

fn per_minute(rate: f64) -> String {
    if rate >= 10.0 {
        format!("{rate:.0}/min")
    } else {
        format!("{rate:.2}/min")
    }
}

/// Why traffic of one pair is slow, as sentences for an operator: what stops it first
/// (a block or a suspension, a warm-up cap used up), then what slows it (an adaptive cut,
/// every connection in use, the configured rate), then what happened (throttling replies).
/// One sentence saying nothing holds it back when nothing does.
pub fn why_slow(view: &PairView) -> Vec<String> {
    let mut why = Vec::new();
    let after = match (&view.trigger_reply, &view.trigger_at) {
        (Some(reply), Some(at)) => format!(" after the reply \"{reply}\" at {at}"),
        (Some(reply), None) => format!(" after the reply \"{reply}\""),
        _ => String::new(),
    };
    if let Some(until) = &view.suspended_until {
        if view.blocked {
            why.push(format!(
                "Blocked: the provider refused this source as a block{after}; nothing is sent until {until}."
            ));
        } else {
            why.push(format!(
                "Suspended until {until}{after}: no new connections until then."
            ));
        }
    }
    if let Some(w) = &view.warmup {
        match w.cap {
            Some(cap) if w.sent_today >= cap => why.push(format!(
                "Warm-up day {}: today's cap of {cap} messages is used up ({} sent); the rest waits for tomorrow.",
                w.day, w.sent_today
            )),
            Some(cap) => why.push(format!(
                "Warm-up day {}: {} of today's cap of {cap} messages sent.",
                w.day, w.sent_today
            )),
            None => why.push(format!(
                "Warm-up finished (day {}): no daily cap.",
                w.day
            )),
        }
    }
    match (
        view.current_rate_per_minute,
        view.configured_rate_per_minute,
    ) {
        (Some(current), Some(configured)) if current < configured * 0.999 => why.push(format!(
            "Rate cut by adaptive shaping to {} (configured {}){after}.",
            per_minute(current),
            per_minute(configured)
        )),
        (_, Some(configured)) => why.push(format!(
            "Rate limited to {} by configuration.",
            per_minute(configured)
        )),
        _ => {}
    }
    if let Some(max) = view.max_connections {
        if view.connections >= max {
            why.push(format!(
                "All {max} connections allowed are in use ({} open).",
                view.connections
            ));
        }
    }
    if view.throttles > 0 {
        why.push(format!(
            "{} throttling replies since start.",
            view.throttles
        ));
    }
    if why.is_empty() {
        why.push("Nothing holds this traffic back: no limit is in force.".to_owned());
    }
    why
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shaping::warmup::WarmState;

    fn view() -> PairView {
        PairView {
            bucket: "google".into(),
            provider: true,
            source: "default".into(),
            configured_rate_per_minute: None,
            current_rate_per_minute: None,
            connections: 0,
            max_connections: None,
            max_messages_per_connection: None,
            connections_per_minute: None,
            suspended_until: None,
            blocked: false,
            trigger_reply: None,
            trigger_at: None,
            throttles: 0,
            warmup: None,
        }
    }

    #[test]
    fn an_unlimited_pair_says_so() {
        let why = why_slow(&view());
        assert_eq!(why.len(), 1);
        assert!(why[0].starts_with("Nothing holds"), "{why:?}");
    }

    #[test]
    fn a_block_comes_first_with_its_reply_and_the_cut_rate_follows() {
        let v = PairView {
            suspended_until: Some("2026-12-07T15:00:00Z".into()),
            blocked: true,
            trigger_reply: Some("421 4.7.0 blocked".into()),
            trigger_at: Some("2026-12-07T14:00:00Z".into()),
            configured_rate_per_minute: Some(600.0),
            current_rate_per_minute: Some(150.0),
            throttles: 3,
            ..view()
        };
        let why = why_slow(&v);
        assert!(why[0].starts_with("Blocked"), "{why:?}");
        assert!(why[0].contains("421 4.7.0 blocked"), "{why:?}");
        assert!(why[0].contains("2026-12-07T15:00:00Z"), "{why:?}");
        assert!(
            why[1].contains("150/min") && why[1].contains("600/min"),
            "{why:?}"
        );
        assert!(why[2].starts_with("3 throttling"), "{why:?}");
    }

    #[test]
    fn warm_up_cap_used_up_and_connections_full() {
        let v = PairView {
            warmup: Some(WarmState {
                day: 3,
                cap: Some(200),
                sent_today: 200,
            }),
            max_connections: Some(2),
            connections: 2,
            configured_rate_per_minute: Some(60.0),
            ..view()
        };
        let why = why_slow(&v);
        assert!(
            why[0].contains("day 3") && why[0].contains("used up"),
            "{why:?}"
        );
        assert_eq!(why[1], "Rate limited to 60/min by configuration.");
        assert!(why[2].starts_with("All 2 connections"), "{why:?}");
    }
}
