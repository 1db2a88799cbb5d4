//! The public tracking endpoints on the admin listener (no bearer token: recipients' mail
//! clients fetch them; the signed token is the check): `GET /t/o/{token}` answers the open
//! pixel, `GET /t/c/{token}` redirects to the signed target. What a token means and what is
//! recorded is [`crate::sidecar::tracking`]'s; an invalid token is a 404 that records nothing.
//! With a reverse proxy in front, the first `X-Forwarded-For` address is used when the
//! connection comes from a loopback address.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::sidecar::Sidecar;

/// The tracking routes (outside the token-protected API).
pub fn routes<S: Clone + Send + Sync + 'static>(sidecar: Arc<Sidecar>) -> Router<S> {
    Router::new()
        .route("/t/o/{token}", get(open))
        .route("/t/c/{token}", get(click))
        .with_state(sidecar)
}

/// A transparent 1x1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x01, 0x44, 0x00, 0x3b,
];

async fn open(
    State(sidecar): State<Arc<Sidecar>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(token): UrlPath<String>,
) -> Response {
    if sidecar
        .track_open(&token, user_agent(&headers), client_ip(peer, &headers))
        .is_none()
    {
        return not_found();
    }
    (
        [
            (header::CONTENT_TYPE, "image/gif"),
            (header::CACHE_CONTROL, "no-store, max-age=0"),
        ],
        PIXEL,
    )
        .into_response()
}

async fn click(
    State(sidecar): State<Arc<Sidecar>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(token): UrlPath<String>,
) -> Response {
    let Some(url) = sidecar.track_click(&token, user_agent(&headers), client_ip(peer, &headers))
    else {
        return not_found();
    };
    (
        StatusCode::FOUND,
        [
            (header::LOCATION, url),
            (header::CACHE_CONTROL, "no-store".to_owned()),
        ],
    )
        .into_response()
}

fn not_found() -> Response {
    super::error::ApiError::new(StatusCode::NOT_FOUND, "unknown or invalid token").into_response()
}

fn user_agent(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// The peer, or the first `X-Forwarded-For` address when the peer is a local proxy.
fn client_ip(peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
    if peer.ip().is_loopback() {
        let forwarded = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse().ok());
        if let Some(ip) = forwarded {
            return ip;
        }
    }
    peer.ip()
}
