//! The admin HTTP server: `GET /metrics` (Prometheus text format), `GET /healthz` and
//! `GET /readyz` (no token) and the admin API under `/api/v1` (bearer token, JSON in and out).
//!
//! - [`auth`]: the API's bearer tokens, their scopes, and the middleware that checks them and
//!   writes the audit log.
//! - [`health`]: `GET /healthz` and `GET /readyz` (no token), for load balancers.
//! - [`error`]: [`error::ApiError`], the JSON error answer, and [`error::ApiJson`], the JSON
//!   body extractor that answers malformed input with 400.
//! - [`queue`]: `/api/v1/queue/*`, the spool seen and managed by the operator.
//! - [`inject`]: `POST /api/v1/inject`, mail submitted over HTTP into the same intake as SMTP.
//! - [`suppression`]: `/api/v1/suppressions`, the suppression list (list, add, remove, CSV).
//! - [`shaping`]: `GET /api/v1/shaping[/{bucket}]`, traffic-shaping state.
//! - [`events`]: `POST /api/v1/events` (engagement), recipients' engagement and send-time lift.
//! - [`reports`]: `GET /api/v1/rates`, `/bounces`, `/campaigns`: what the node did lately.
//! - [`console`]: the web console at `/console/` (token login, session cookie; HTML pages
//!   rendering the same values as the API routes, and the queue and suppression actions).
//! - [`listener`]: the door: connection cap, request-head timeout, body-size caps.
//!
//! The sidecar's tracking routes (`/t/o/{token}`, `/t/c/{token}`, see
//! [`crate::sidecar::tracking`]) are served here too, outside `/api/v1`.
//!
//! Invariants: every `/api/v1` route sits behind [`auth::require_token`]; every request,
//! whatever its route (or none), passes [`listener::cap_body`] first; every `/console/` page
//! but the login page needs a console session ([`console::session`]).

pub mod auth;
pub mod campaigns;
pub mod console;
pub mod error;
pub mod events;
pub mod health;
pub mod inject;
pub mod listener;
pub mod queue;
pub mod reports;
pub mod shaping;
pub mod spool;
pub mod suppression;
pub mod tls_reports;
pub mod tracking;
pub mod unsubscribe;

use crate::config::{AdminConfig, Limits};
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::live::Live;
use crate::scheduler::Scheduler;
use crate::sendtime::SendTime;
use crate::shaping::Shaper;
use crate::sidecar::Sidecar;
use crate::telemetry::Metrics;
use crate::unsubscribe::Unsubscriber;
use auth::Token;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;
use tern_queue::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// What the admin handlers work on.
#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    pub spool: Spool,
    pub scheduler: Scheduler,
    /// Where injected mail goes (the same stages and enqueue as SMTP mail).
    pub intake: Intake,
    /// The suppression list and events (checked at injection, managed by the API).
    pub feedback: Feedback,
    /// `server.hostname`, for the Message-ID of composed mail.
    pub hostname: String,
    /// The campaign stage (its campaigns are checked at injection; tracking endpoints).
    pub sidecar: Arc<Sidecar>,
    /// One-click unsubscribe (the public `/u/` route; scoped checks at injection).
    pub unsubscriber: Arc<Unsubscriber>,
    /// TLS-RPT report mails (`None` with MTA-STS off).
    pub tls_reporting: Option<Arc<crate::tlsrpt::TlsReporting>>,
    /// The send-time model (events API, recipients, refit, lift).
    pub send_time: SendTime,
    /// Size and recipient limits, applied to injected mail as to SMTP mail; a config reload
    /// replaces them.
    pub limits: Arc<Live<Limits>>,
    /// `[admin]`: the listener's limits and trusted proxies; a config reload replaces them
    /// (the connection cap and the address stay as at start).
    pub edge: Arc<Live<AdminConfig>>,
    pub shaper: Arc<Shaper>,
    /// `None`: the API is disabled (no `admin.token_file`).
    pub token: Option<Token>,
    /// What `/readyz` checks.
    pub readiness: health::Readiness,
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled (and every
/// connection has ended), under the limits of [`listener`].
pub async fn serve(listener: TcpListener, state: AdminState, shutdown: CancellationToken) {
    let address = listener.local_addr().ok();
    info!(address = ?address, api = state.token.is_some(), "admin listening");
    let (edge, metrics) = (state.edge.clone(), state.metrics.clone());
    listener::serve(listener, router(state), edge, metrics, shutdown).await;
}

fn router(state: AdminState) -> Router {
    let api = Router::new()
        .route("/status", get(status))
        .merge(queue::routes())
        .merge(inject::routes())
        .merge(shaping::routes())
        .merge(suppression::routes())
        .merge(events::routes())
        .merge(tls_reports::routes())
        .merge(reports::routes())
        .merge(campaigns::routes())
        .merge(spool::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let mut router = Router::new()
        .route("/metrics", get(scrape))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(readyz))
        .nest("/api/v1", api)
        .merge(console::routes(state.clone()));
    // Open (no token): recipients' mail clients fetch these; the signed token is the check.
    router = router.merge(tracking::routes(state.sidecar.clone(), state.edge.clone()));
    router = router.merge(unsubscribe::routes(state.unsubscriber.clone()));
    router
        // Bodies are held to admin.max_body_size by cap_body instead of axum's fixed 2 MB.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            listener::cap_body,
        ))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    health::readyz(State(state.readiness)).await
}

async fn scrape(State(state): State<AdminState>) -> impl IntoResponse {
    // Refreshes tern_ready; the verdict itself is /readyz's business.
    let _ = state.readiness.check();
    state.sidecar.export_results();
    let text = state
        .metrics
        .render(&state.spool, &state.scheduler.queue_depths());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}

/// Crash recovery's state for the API: `{"state": "done"|"running"|"failed", ...}`; while
/// it runs, the spool totals are estimates.
pub(crate) fn recovery_json(status: &tern_queue::RecoveryStatus) -> serde_json::Value {
    use tern_queue::RecoveryStatus;
    match status {
        RecoveryStatus::Done { repairs, corrupt } => {
            serde_json::json!({ "state": "done", "repairs": repairs, "corrupt": corrupt })
        }
        RecoveryStatus::Running { scanned } => {
            serde_json::json!({ "state": "running", "scanned": scanned })
        }
        RecoveryStatus::Failed(error) => serde_json::json!({ "state": "failed", "error": error }),
    }
}

/// `GET /api/v1/status`: version, spool totals and what the scheduler holds in memory.
async fn status(State(state): State<AdminState>) -> Json<serde_json::Value> {
    Json(status_report(&state))
}

/// The answer of `GET /api/v1/status` (the console's overview shows the same).
pub fn status_report(state: &AdminState) -> serde_json::Value {
    let stats = state.spool.stats();
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "spool": {
            "messages": stats.messages,
            "bytes": stats.bytes,
            "recovery": recovery_json(&state.spool.recovery()),
        },
        "in_memory": state.scheduler.in_memory(),
    })
}
