//! `GET /healthz` and `GET /readyz`: what a load balancer or an orchestrator asks, without a
//! token (they reveal nothing but "up" and a reason).
//!
//! - `/healthz`: the process answers HTTP (its runtime is not wedged): always 200.
//! - `/readyz`: 200 only while this node should get new mail: the spool can make writes
//!   durable ([`Spool::health`], the check the systemd watchdog uses), every SMTP listener's
//!   accept loop is running, and the daemon is not draining. Otherwise 503 with
//!   `{"ready": false, "reason": "..."}` naming the first check that failed, so a load
//!   balancer takes the node out before SIGTERM closes its listeners and while a sick spool
//!   would only answer 451.
//!
//! The same verdict is exported as `tern_ready` (set at every check and every scrape), so an
//! alert can fire on it.

use crate::telemetry::Metrics;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use std::sync::Arc;
use std::time::Duration;
use tern_queue::Spool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a spool sync round may run before the node is not ready: writes that wait longer
/// than this are what a client would see as a stalled `250`.
const SPOOL_STALL: Duration = Duration::from_secs(10);

/// What `/readyz` checks; cheap to clone.
#[derive(Clone)]
pub struct Readiness {
    spool: Spool,
    /// Cancelled when the daemon starts draining (SIGTERM): the listeners' stop token.
    draining: CancellationToken,
    /// The SMTP listeners' accept loops, and how many there should be.
    accepting: TaskTracker,
    listeners: usize,
    metrics: Arc<Metrics>,
}

impl Readiness {
    pub fn new(
        spool: Spool,
        draining: CancellationToken,
        accepting: TaskTracker,
        listeners: usize,
        metrics: Arc<Metrics>,
    ) -> Readiness {
        Readiness {
            spool,
            draining,
            accepting,
            listeners,
            metrics,
        }
    }

    /// `Ok` when ready, else why not; also sets `tern_ready`.
    pub fn check(&self) -> Result<(), String> {
        let verdict = if self.draining.is_cancelled() {
            Err("draining: the daemon is shutting down".to_owned())
        } else if self.accepting.len() < self.listeners {
            Err(format!(
                "listeners: {} of {} accepting",
                self.accepting.len(),
                self.listeners
            ))
        } else {
            self.spool
                .health(SPOOL_STALL)
                .map_err(|e| format!("spool: {e}"))
        };
        self.metrics.set_ready(verdict.is_ok());
        verdict
    }
}

/// `GET /healthz`: the process is alive.
pub async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "alive": true }))
}

/// `GET /readyz`: 200 `{"ready": true}` or 503 `{"ready": false, "reason": ...}`.
pub async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    match readiness.check() {
        // Ready while crash recovery still counts the spool: taking mail then is the point.
        Ok(()) => (
            StatusCode::OK,
            Json(serde_json::json!({
                "ready": true,
                "recovering": matches!(
                    readiness.spool.recovery(),
                    tern_queue::RecoveryStatus::Running { .. }
                ),
            })),
        ),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "ready": false, "reason": reason })),
        ),
    }
}
