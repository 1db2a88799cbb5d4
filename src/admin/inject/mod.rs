//! `POST /api/v1/inject`: mail from applications that speak HTTP instead of SMTP.
//!
//! The request carries the envelope (`from`, `to`, DSN `ret`/`envid`, per-recipient `notify`
//! and `orcpt`) and the message, either raw (`raw`, or `raw_base64` for 8-bit bodies) or
//! structured (`message`, built by [`compose`]). It is checked with the policy of an
//! authenticated SMTP submission (`limits.max_message_size`, `limits.max_recipients`, address
//! syntax, no bare CR or NUL) and handed to the same [`Intake`](crate::intake::Intake) as SMTP
//! mail: Received header, Date/Message-ID when missing, DKIM, split by domain, one durable
//! commit, scheduler.
//!
//! Invariants: 200 only after the spool commit returned (the HTTP twin of SMTP's 250); a
//! spool failure is 503, never 200. Bare LF line ends (JSON clients send `\n`) become CRLF;
//! a bare CR or a NUL is refused with 400, as SMTP refuses it. Every 4xx names the field or
//! the config key it is about. Recipients over the limit refuse the whole call with 400
//! (SMTP answers 452 per excess recipient; an HTTP call cannot be half-accepted). An optional
//! `pool` names the source-IP pool (`[[pools]]`), ahead of `X-Tern-Pool` and the sender
//! domain; an unknown name is a 400 (unlike the header, the caller sees the answer).

pub mod compose;

use super::error::ApiError;
use super::AdminState;
use crate::config::Limits;
use crate::message::{same_address, CampaignReport, CampaignRequest, Submission};
use crate::rfc5321::address::check_mailbox;
use crate::rfc5321::proto::ContentCheck;
use crate::telemetry::{Protocol, Rejection};
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine as _;
use http_body_util::BodyExt as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::net::SocketAddr;
use tern_queue::{BodyType, MessageId, Notify, Recipient, Ret, Source};
use tracing::{info, warn};

/// The inject route, for [`super::router`].
pub fn routes() -> Router<AdminState> {
    Router::new().route("/inject", post(inject))
}

/// The request body (unknown fields are refused, so a typo is a 400, not a silent default).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InjectRequest {
    /// Reverse-path; `""` is the null sender.
    from: String,
    /// A recipient or a list; each a string or `{"address", "notify", "orcpt"}`.
    #[serde(default)]
    to: Option<Value>,
    #[serde(default)]
    ret: Option<Ret>,
    #[serde(default)]
    envid: Option<String>,
    #[serde(default)]
    raw: Option<String>,
    #[serde(default)]
    raw_base64: Option<String>,
    #[serde(default)]
    message: Option<compose::Structured>,
    /// A campaign, send time and template data for the sidecar stage.
    #[serde(default)]
    sidecar: Option<CampaignRequest>,
    /// A configured source-IP pool (`[[pools]]`); wins over `X-Tern-Pool` and the sender
    /// domain.
    #[serde(default)]
    pool: Option<String>,
    /// `"one-click"` or `"one-click; list=NAME"`: List-Unsubscribe headers per recipient
    /// (RFC 8058), like `X-Tern-Unsubscribe`.
    #[serde(default)]
    unsubscribe: Option<String>,
}

/// The 200 answer.
#[derive(Debug, Serialize)]
struct Injected {
    /// The queue id (as SMTP's "queued as").
    id: MessageId,
    /// One id per destination domain; the first is `id`.
    ids: Vec<MessageId>,
    /// Distinct recipients accepted.
    recipients: usize,
    /// Per recipient, what the sidecar did (campaign, variant, content source, reason).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    sidecar: Vec<CampaignReport>,
}

/// Largest request body read: the message may grow by a third as base64 and more as JSON
/// escapes, so twice the message limit plus room for the envelope. The message itself is
/// held to `limits.max_message_size` after decoding.
pub(super) fn body_limit(max_message_size: u64) -> u64 {
    max_message_size.saturating_mul(2).saturating_add(1 << 20)
}

async fn inject(
    State(state): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    body: Body,
) -> Result<Json<Injected>, ApiError> {
    // One snapshot for the whole request, even if a reload changes the limits meanwhile.
    let limits = state.limits.get();
    let max_size = limits.max_message_size;
    let bytes = match http_body_util::Limited::new(
        body,
        usize::try_from(body_limit(max_size)).unwrap_or(usize::MAX),
    )
    .collect()
    .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(err) if err.is::<http_body_util::LengthLimitError>() => {
            state.metrics.message_rejected(Rejection::Size);
            return Err(too_large(max_size));
        }
        Err(err) => {
            return Err(ApiError::bad_request(format!(
                "cannot read the body: {err}"
            )))
        }
    };
    let request: InjectRequest = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON request: {e}")))?;
    drop(bytes);
    let submission = submission(&state, &limits, request, peer)?;
    let size = submission.content.len();
    let recipients = submission.recipients.len();
    match state.intake.accept_report(submission).await {
        Ok(crate::enqueue::Accepted { ids, sidecar }) => {
            info!(id = %ids[0], %peer, size, rcpts = recipients, "queued (http)");
            state.metrics.message_received(Protocol::Http);
            Ok(Json(Injected {
                id: ids[0],
                ids,
                recipients,
                sidecar,
            }))
        }
        Err(tern_queue::SpoolError::Full(why)) => {
            warn!(%peer, %why, "spool full: message refused (http)");
            state.metrics.message_rejected(Rejection::SpoolFull);
            Err(ApiError::new(
                StatusCode::INSUFFICIENT_STORAGE,
                "insufficient storage: the spool's disk is full; try again later",
            ))
        }
        Err(err) => {
            warn!(%peer, error = %err, "spool write failed (http)");
            state.metrics.message_rejected(Rejection::SpoolError);
            Err(ApiError::unavailable(format!(
                "could not queue the message ({err}); try again later"
            )))
        }
    }
}

pub(super) fn too_large(max_size: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("message larger than limits.max_message_size ({max_size} bytes)"),
    )
}

/// Checks the request against the submission policy and builds what [`Intake`] takes.
///
/// [`Intake`]: crate::intake::Intake
fn submission(
    state: &AdminState,
    limits: &Limits,
    request: InjectRequest,
    peer: SocketAddr,
) -> Result<Submission, ApiError> {
    if !request.from.is_empty() {
        check_mailbox(&request.from)
            .map_err(|why| ApiError::bad_request(format!("from: {why} ({:?})", request.from)))?;
    }
    if let Some(envid) = &request.envid {
        // It ends up in DSN headers (RFC 3461 4.4: at most 100 characters, printable).
        if envid.is_empty()
            || envid.len() > 100
            || !envid.bytes().all(|b| (b' '..=b'~').contains(&b))
        {
            return Err(ApiError::bad_request(
                "envid: 1 to 100 printable ASCII characters",
            ));
        }
    }
    if let Some(sidecar) = &request.sidecar {
        check_sidecar(state, sidecar)?;
    }
    if let Some(pool) = &request.pool {
        let pools = state.shaper.pools();
        if !pools.contains(pool) {
            return Err(ApiError::bad_request(format!(
                "pool: unknown pool {pool:?} (configured: {})",
                pools.names().join(", ")
            )));
        }
    }
    let recipients = recipients(request.to)?;
    if recipients.is_empty() {
        return Err(ApiError::bad_request(
            "to: at least one recipient is required",
        ));
    }
    if recipients.len() > limits.max_recipients {
        state.metrics.message_rejected(Rejection::Recipients);
        return Err(ApiError::bad_request(format!(
            "to: {} recipients, more than limits.max_recipients ({}); split the call",
            recipients.len(),
            limits.max_recipients
        )));
    }
    // Reject mode refuses the whole call, naming every suppressed recipient, so the app can
    // drop them and call again (an HTTP call cannot be half-accepted). Drop mode: enqueue
    // drops them.
    let unsubscribe = match &request.unsubscribe {
        Some(value) => Some(
            crate::message::OneClick::parse(value)
                .map_err(|e| ApiError::bad_request(format!("unsubscribe: {e}")))?,
        ),
        None => None,
    };
    // Mail that asks for one-click unsubscribe belongs to a list: an unsubscribe from that
    // list refuses it too.
    let list = state.sidecar.unsubscribe_list(
        unsubscribe.as_ref(),
        request.sidecar.as_ref().and_then(|s| s.campaign.as_deref()),
        &request.from,
    );
    let refused: Vec<String> = recipients
        .iter()
        .filter(|r| match &list {
            Some(list) => {
                crate::policy::suppressed_for_list(&state.feedback, &r.address, list, "http")
                    .is_some()
            }
            None => crate::policy::suppressed(&state.feedback, &r.address, "http").is_some(),
        })
        .map(|r| r.address.clone())
        .collect();
    if !refused.is_empty() {
        state.metrics.message_rejected(Rejection::Suppressed);
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("to: recipient suppressed: {}", refused.join(", ")),
        ));
    }

    let (field, content) = match (request.raw, request.raw_base64, request.message) {
        (Some(raw), None, None) => ("raw", raw.into_bytes()),
        (None, Some(encoded), None) => {
            let compact: Vec<u8> = encoded
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map_err(|e| ApiError::bad_request(format!("raw_base64: invalid base64: {e}")))?;
            ("raw_base64", decoded)
        }
        (None, None, Some(message)) => (
            "message",
            compose::build(message, &request.from, &state.hostname)
                .map_err(ApiError::bad_request)?,
        ),
        (None, None, None) => {
            return Err(ApiError::bad_request(
                "one of raw, raw_base64 or message is required",
            ))
        }
        _ => {
            return Err(ApiError::bad_request(
                "only one of raw, raw_base64 or message may be given",
            ))
        }
    };
    if content.is_empty() {
        return Err(ApiError::bad_request(format!("{field}: empty message")));
    }
    let content = crlf(content);
    if content.len() as u64 > limits.max_message_size {
        state.metrics.message_rejected(Rejection::Size);
        return Err(too_large(limits.max_message_size));
    }
    let headers = crate::message::header_stats(&content);
    if headers.len as u64 > limits.max_header_size {
        state.metrics.message_rejected(Rejection::HeaderSize);
        return Err(ApiError::new(
            axum::http::StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "{field}: the header section is larger than limits.max_header_size ({} bytes)",
                limits.max_header_size
            ),
        ));
    }
    if headers.received >= limits.max_hops {
        state.metrics.message_rejected(Rejection::Loop);
        return Err(ApiError::bad_request(format!(
            "{field}: too many Received headers: with ours the message would exceed limits.max_hops ({})",
            limits.max_hops
        )));
    }
    let mut check = ContentCheck::default();
    check.scan(&content);
    let flags = check.finish();
    if flags.bare_cr || flags.nul {
        state.metrics.message_rejected(Rejection::Smuggling);
        let what = if flags.nul { "NUL" } else { "bare CR" };
        return Err(ApiError::bad_request(format!(
            "{field}: {what} in the message; lines end with LF or CRLF"
        )));
    }

    let smtputf8 = !request.from.is_ascii() || recipients.iter().any(|r| !r.address.is_ascii());
    let body_type = if content.is_ascii() {
        BodyType::SevenBit
    } else {
        BodyType::EightBitMime
    };
    Ok(Submission {
        sender: request.from,
        recipients,
        env_id: request.envid,
        ret: request.ret,
        body_type,
        smtputf8,
        // Authenticated (the bearer token) like a submission: Date and Message-ID are added
        // when missing, and any domain may be relayed to.
        source: Source {
            client_ip: peer.ip().to_string(),
            helo: "api".into(),
            auth_user: Some("api".into()),
            protocol: "HTTP".into(),
        },
        tls: None,
        content,
        sidecar: request.sidecar,
        pool: request.pool,
        unsubscribe,
        trusted: true,
    })
}

/// A named campaign must exist and a send time must parse: refused before anything is queued.
fn check_sidecar(state: &AdminState, request: &CampaignRequest) -> Result<(), ApiError> {
    let stage = &state.sidecar;
    if let Some(name) = &request.campaign {
        if !stage.has_campaign(name) {
            return Err(ApiError::bad_request(format!(
                "sidecar.campaign: unknown campaign {name:?} (or archived; see GET /api/v1/campaigns)"
            )));
        }
    }
    if let Some(text) = &request.send_time {
        stage
            .send_time(request.campaign.as_deref(), text)
            .map_err(|e| ApiError::bad_request(format!("sidecar.send_time: {e}")))?;
    }
    Ok(())
}

/// The `to` value as recipients, duplicates (same local part, domain in any case) kept once.
fn recipients(to: Option<Value>) -> Result<Vec<Recipient>, ApiError> {
    let items = match to {
        None => Vec::new(),
        Some(Value::Array(items)) => items,
        Some(one) => vec![one],
    };
    let mut out: Vec<Recipient> = Vec::with_capacity(items.len());
    for (i, item) in items.into_iter().enumerate() {
        let field = format!("to[{i}]");
        let bad = |why: &str| ApiError::bad_request(format!("{field}: {why}"));
        let rcpt = match item {
            Value::String(address) => Recipient::new(address),
            Value::Object(mut object) => {
                let Some(Value::String(address)) = object.remove("address") else {
                    return Err(bad("\"address\" (a string) is required"));
                };
                let mut rcpt = Recipient::new(address);
                if let Some(notify) = object.remove("notify") {
                    rcpt.notify = parse_notify(notify).map_err(|why| bad(&why))?;
                }
                if let Some(orcpt) = object.remove("orcpt") {
                    let Value::String(orcpt) = orcpt else {
                        return Err(bad("orcpt must be a string"));
                    };
                    if orcpt.is_empty() || !orcpt.bytes().all(|b| (b' '..=b'~').contains(&b)) {
                        return Err(bad("orcpt must be printable ASCII"));
                    }
                    // Stored as SMTP keeps it: with its address type.
                    rcpt.orcpt = Some(if orcpt.contains(';') {
                        orcpt
                    } else {
                        format!("rfc822;{orcpt}")
                    });
                }
                if let Some(key) = object.keys().next() {
                    return Err(bad(&format!(
                        "unknown key {key:?} (address, notify, orcpt)"
                    )));
                }
                rcpt
            }
            _ => return Err(bad("expected an address or {\"address\": ...}")),
        };
        check_mailbox(&rcpt.address).map_err(|why| bad(&format!("{why} ({:?})", rcpt.address)))?;
        if !out.iter().any(|r| same_address(&r.address, &rcpt.address)) {
            out.push(rcpt);
        }
    }
    Ok(out)
}

/// `["success", "failure", "delay"]` (any subset) or `["never"]`, as RCPT's NOTIFY=.
fn parse_notify(value: Value) -> Result<Notify, String> {
    let Value::Array(items) = value else {
        return Err("notify must be a list, e.g. [\"failure\", \"delay\"] or [\"never\"]".into());
    };
    let mut notify = Notify {
        success: false,
        failure: false,
        delay: false,
        never: false,
    };
    for item in &items {
        match item.as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("success") => notify.success = true,
            Some("failure") => notify.failure = true,
            Some("delay") => notify.delay = true,
            Some("never") => notify.never = true,
            _ => return Err(format!("notify: unknown value {item}")),
        }
    }
    if notify.never && items.len() > 1 {
        return Err("notify: never cannot be combined with other values".into());
    }
    if items.is_empty() {
        return Err("notify: empty list".into());
    }
    Ok(notify)
}

/// Bare LF becomes CRLF, and the message ends with CRLF (as SMTP content always does).
fn crlf(content: Vec<u8>) -> Vec<u8> {
    let bare_lf = content
        .iter()
        .enumerate()
        .any(|(i, &b)| b == b'\n' && (i == 0 || content[i - 1] != b'\r'));
    let mut out = if bare_lf {
        let mut out = Vec::with_capacity(content.len() + content.len() / 32);
        for (i, &b) in content.iter().enumerate() {
            if b == b'\n' && (i == 0 || content[i - 1] != b'\r') {
                out.push(b'\r');
            }
            out.push(b);
        }
        out
    } else {
        content
    };
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_ends_become_crlf() {
        assert_eq!(crlf(b"a\nb\r\nc".to_vec()), b"a\r\nb\r\nc\r\n");
        assert_eq!(crlf(b"\n".to_vec()), b"\r\n");
        assert_eq!(crlf(b"a\r\n".to_vec()), b"a\r\n");
        // A bare CR stays for the content check to refuse.
        assert_eq!(crlf(b"a\rb".to_vec()), b"a\rb\r\n");
    }

    #[test]
    fn recipients_parse_notify_and_dedupe() {
        let rcpts = recipients(Some(serde_json::json!([
            "a@x.test",
            {"address": "b@y.test", "notify": ["never"], "orcpt": "b@y.test"},
            "a@X.TEST",
        ])))
        .unwrap();
        assert_eq!(rcpts.len(), 2);
        assert!(rcpts[1].notify.never);
        assert_eq!(rcpts[1].orcpt.as_deref(), Some("rfc822;b@y.test"));
        let err = recipients(Some(serde_json::json!(["a@x.test", "a@x.test", "bad"]))).unwrap_err();
        assert!(err.message.starts_with("to[2]:"), "{}", err.message);
        let err = recipients(Some(
            serde_json::json!([{"address": "a@x.test", "notify": ["never", "delay"]}]),
        ))
        .unwrap_err();
        assert!(err.message.starts_with("to[0]: notify:"), "{}", err.message);
    }
}
