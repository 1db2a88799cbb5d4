//! The admin listener's door: how many clients it holds, for how long, and how much of a
//! request body it reads. The port serves the public tracking endpoints too, so it may face
//! the internet (through a proxy or not).
//!
//! - At most `admin.max_connections` connections at once; one more is answered `503` and
//!   closed at once, without a task or a read.
//! - A request head must arrive whole within `admin.header_timeout`, which is also how long
//!   a kept-alive connection may wait idle for its next request; then the connection is
//!   closed (a slow loris holds a slot for that long at most).
//! - A write of an answer that makes no progress for `admin.write_timeout` (a client that
//!   asks and never reads, so the socket's send buffer stays full) closes the connection.
//! - A request body over its limit ([`body_limit`]) is refused with 413 naming the config key:
//!   before a byte of it is read when its Content-Length declares it, when it grows past the
//!   limit otherwise. (Inject refusals are message size refusals, counted as such.)
//!
//! Invariants: every connection task runs on the listener's tracker and holds one slot
//! until it ends; at shutdown the listener stops accepting, asks each connection to end
//! after the request in flight and waits for them all. Refusals are counted in
//! `tern_admin_refused_total{reason}` (inject's in `tern_messages_rejected_total{reason="size"}`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_io_timeout::TimeoutStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;
use tracing::{debug, info, warn};

use super::error::ApiError;
use super::AdminState;
use crate::config::AdminConfig;
use crate::live::Live;
use crate::telemetry::{AdminRefusal, Metrics, Rejection};

/// What a client over `admin.max_connections` reads before the connection closes.
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\n\
retry-after: 1\r\n\
connection: close\r\n\
content-length: 57\r\n\
\r\n\
{\"error\":\"too many connections (admin.max_connections)\"}\n";

/// Serves `app` on `listener` until `shutdown` is cancelled, under the limits of `config`
/// (read per connection, so a reload applies to new connections; the connection cap is the
/// value at start).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    config: Arc<Live<AdminConfig>>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let address = listener.local_addr().ok();
    let slots = Arc::new(Semaphore::new(config.get().max_connections));
    let connections = TaskTracker::new();
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors, mostly: accepting again at once would spin.
                    warn!(error = %err, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.admin_refused(AdminRefusal::Connections);
            // A fresh socket's send buffer takes this whole; if not, closing says as much.
            let _ = stream.try_write(BUSY);
            continue;
        };
        let timeouts = Timeouts {
            header: config.get().header_timeout,
            write: config.get().write_timeout,
        };
        let (app, metrics, stop) = (app.clone(), metrics.clone(), shutdown.clone());
        connections.spawn(async move {
            metrics.admin_connection(true);
            connection(stream, peer, app, timeouts, &metrics, stop).await;
            metrics.admin_connection(false);
            drop(slot);
        });
    }
    connections.close();
    connections.wait().await;
    info!(address = ?address, "admin stopped");
}

/// `admin.header_timeout` and `admin.write_timeout`, as they were when a connection came.
#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    write: Duration,
}

/// Serves one connection (HTTP/1.1, keep-alive) until the client or the server ends it.
async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    timeouts: Timeouts,
    metrics: &Metrics,
    stop: CancellationToken,
) {
    // The peer address goes into the Received header of injected mail and into the
    // tracking endpoints' client address.
    let service = hyper::service::service_fn(move |mut request: Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        app.clone().oneshot(request.map(Body::new))
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(timeouts.header);
    // hyper has no write timeout of its own: a write pending longer than this fails, and
    // the connection ends with that error.
    let mut stream = TimeoutStream::new(stream);
    stream.set_write_timeout(Some(timeouts.write));
    let conn = builder.serve_connection(TokioIo::new(Box::pin(stream)), service);
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        result = conn.as_mut() => result,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(err) = result {
        if err.is_timeout() {
            metrics.admin_refused(AdminRefusal::HeaderTimeout);
            debug!(%peer, "admin connection closed: no request head within admin.header_timeout");
        } else if write_timed_out(&err) {
            metrics.admin_refused(AdminRefusal::WriteTimeout);
            debug!(%peer, "admin connection closed: an answer made no progress within admin.write_timeout");
        } else {
            debug!(%peer, error = %err, "admin connection ended with an error");
        }
    }
}

/// Whether hyper ended a connection because a write timed out (an I/O error of kind
/// `TimedOut` somewhere in its source chain).
fn write_timed_out(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(err);
    while let Some(cause) = source {
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io.kind() == std::io::ErrorKind::TimedOut;
        }
        source = cause.source();
    }
    false
}

/// The largest body of a request to `path`: `admin.max_body_size`, except for the inject
/// route, whose limit follows `limits.max_message_size` (see [`super::inject`]); with the
/// key that sets it, for the 413.
pub fn body_limit(path: &str, max_body_size: u64, max_message_size: u64) -> (u64, &'static str) {
    if path == "/api/v1/inject" {
        (
            super::inject::body_limit(max_message_size),
            "limits.max_message_size",
        )
    } else {
        (max_body_size, "admin.max_body_size")
    }
}

/// Middleware in front of every route: refuses a body declared over its limit with 413
/// before reading it, and holds the rest to the limit while they are read. The inject
/// route reads its body under the same limit itself (to count and word its refusal as a
/// message size refusal), so its body is passed on as it is.
pub async fn cap_body(State(state): State<AdminState>, request: Request, next: Next) -> Response {
    let path = request.uri().path();
    let (limit, key) = body_limit(
        path,
        state.edge.get().max_body_size,
        state.limits.get().max_message_size,
    );
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let inject = key == "limits.max_message_size";
    if declared.is_some_and(|n| n > limit) {
        if inject {
            // Counted and worded as the inject handler does it: a message too large.
            state.metrics.message_rejected(Rejection::Size);
            let max_size = state.limits.get().max_message_size;
            return super::inject::too_large(max_size).into_response();
        }
        state.metrics.admin_refused(AdminRefusal::BodySize);
        return too_large(limit, key).into_response();
    }
    if inject {
        return next.run(request).await;
    }
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let request = request.map(|body| Body::new(http_body_util::Limited::new(body, limit)));
    let response = next.run(request).await;
    if response.status() == StatusCode::PAYLOAD_TOO_LARGE {
        state.metrics.admin_refused(AdminRefusal::BodySize);
    }
    response
}

/// The 413 for a body over `limit` bytes, set by `key`.
pub fn too_large(limit: u64, key: &str) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("request body larger than {key} allows ({limit} bytes)"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{text}"
        );
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[test]
    fn inject_has_its_own_limit() {
        assert_eq!(
            body_limit("/api/v1/events", 2 << 20, 50 << 20),
            (2 << 20, "admin.max_body_size")
        );
        let (limit, key) = body_limit("/api/v1/inject", 2 << 20, 50 << 20);
        assert_eq!(key, "limits.max_message_size");
        assert!(limit > 50 << 20, "{limit}");
    }
}
