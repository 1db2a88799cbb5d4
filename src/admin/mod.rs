//! The admin HTTP server. So far it serves only `GET /metrics` (Prometheus text format);
//! the admin API is later work.
//!
//! - [`metrics`]: every metric tern exports, in one [`metrics::Metrics`] with its own registry.

pub mod metrics;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use metrics::Metrics;
use std::sync::Arc;
use tern_queue::Spool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

#[derive(Clone)]
struct AdminState {
    metrics: Arc<Metrics>,
    spool: Spool,
}

/// Serves the admin endpoints on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    spool: Spool,
    shutdown: CancellationToken,
) {
    let address = listener.local_addr().ok();
    info!(address = ?address, "admin listening");
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(AdminState { metrics, spool });
    if let Err(err) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        warn!(error = %err, "admin server failed");
    }
    info!(address = ?address, "admin stopped");
}

async fn scrape(State(state): State<AdminState>) -> impl IntoResponse {
    let text = state.metrics.render(&state.spool);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
}
