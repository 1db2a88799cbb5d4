//! The public tracking endpoints on the admin listener (no bearer token: recipients' mail
//! clients fetch them; the signed token is the check): `GET /t/o/{token}` answers the open
//! pixel, `GET /t/c/{token}` redirects to the signed target. What a token means and what is
//! recorded is [`crate::sidecar::tracking`]'s; an invalid token is a 404 that records nothing.
//!
//! The client address (for the machine-open heuristics) is the peer's, unless the peer is
//! one of `admin.trusted_proxies`: then it is the rightmost `X-Forwarded-For` address that is
//! not itself a trusted proxy ([`client_ip`]). Each proxy appends the address it got the
//! request from, so anything left of that was written by the client and is never believed;
//! from any other peer the header is ignored.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;

use axum::extract::{ConnectInfo, Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::config::AdminConfig;
use crate::live::Live;
use crate::sidecar::Sidecar;

/// What the tracking handlers work on.
#[derive(Clone)]
struct Tracking {
    sidecar: Arc<Sidecar>,
    /// `[admin]`, for `trusted_proxies` (a reload replaces it).
    edge: Arc<Live<AdminConfig>>,
}

/// The tracking routes (outside the token-protected API).
pub fn routes<S: Clone + Send + Sync + 'static>(
    sidecar: Arc<Sidecar>,
    edge: Arc<Live<AdminConfig>>,
) -> Router<S> {
    Router::new()
        .route("/t/o/{token}", get(open))
        .route("/t/c/{token}", get(click))
        .with_state(Tracking { sidecar, edge })
}

/// A transparent 1x1 GIF.
const PIXEL: &[u8] = &[
    0x47, 0x49, 0x46, 0x38, 0x39, 0x61, 0x01, 0x00, 0x01, 0x00, 0x80, 0x00, 0x00, 0x00, 0x00, 0x00,
    0xff, 0xff, 0xff, 0x21, 0xf9, 0x04, 0x01, 0x00, 0x00, 0x00, 0x00, 0x2c, 0x00, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x01, 0x00, 0x00, 0x02, 0x01, 0x44, 0x00, 0x3b,
];

async fn open(
    State(tracking): State<Tracking>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(token): UrlPath<String>,
) -> Response {
    let ip = tracking.client(peer, &headers);
    if tracking
        .sidecar
        .track_open(&token, user_agent(&headers), ip)
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
    State(tracking): State<Tracking>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    UrlPath(token): UrlPath<String>,
) -> Response {
    let ip = tracking.client(peer, &headers);
    let Some(url) = tracking
        .sidecar
        .track_click(&token, user_agent(&headers), ip)
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

impl Tracking {
    /// The client of a request from `peer` (see the module doc).
    fn client(&self, peer: SocketAddr, headers: &HeaderMap) -> IpAddr {
        let forwarded: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        client_ip(
            peer.ip(),
            &forwarded.join(","),
            &self.edge.get().trusted_proxies,
        )
    }
}

/// The client address of a request from `peer` carrying `forwarded_for` (the
/// `X-Forwarded-For` values, comma-separated, in order): `peer` unless it is in `trusted`;
/// then the rightmost forwarded address not in `trusted` (or, when every one is, the
/// leftmost). An entry that is not an address ends the walk at the last one believed.
pub fn client_ip(peer: IpAddr, forwarded_for: &str, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    let mut client = peer.to_canonical();
    if !is_trusted(&client) {
        return client;
    }
    for hop in forwarded_for.rsplit(',').map(str::trim) {
        // Some proxies write the port too ("192.0.2.1:4711", "[2001:db8::1]:4711").
        let Some(ip) = hop
            .parse::<IpAddr>()
            .or_else(|_| hop.parse::<SocketAddr>().map(|a| a.ip()))
            .ok()
        else {
            break;
        };
        client = ip.to_canonical();
        if !is_trusted(&client) {
            break;
        }
    }
    client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_believed_only_from_trusted_proxies() {
        let proxies: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy = ip("10.0.0.5");
        // No trusted proxies (the default): the header is ignored, loopback or not.
        assert_eq!(client_ip(ip("127.0.0.1"), "17.1.2.3", &[]), ip("127.0.0.1"));
        // From a peer that is not a proxy: ignored.
        assert_eq!(
            client_ip(ip("198.51.100.9"), "17.1.2.3", &proxies),
            ip("198.51.100.9")
        );
        // Through the proxy: the address it appended.
        assert_eq!(client_ip(proxy, "203.0.113.7", &proxies), ip("203.0.113.7"));
        // The client wrote an address of its own in front: the proxy's entry wins.
        assert_eq!(
            client_ip(proxy, "17.1.2.3, 203.0.113.7", &proxies),
            ip("203.0.113.7")
        );
        // Two proxies of ours: the first address neither of them is.
        assert_eq!(
            client_ip(proxy, "17.1.2.3, 203.0.113.7, 10.0.0.9", &proxies),
            ip("203.0.113.7")
        );
        // Ports, IPv6, IPv4-mapped peers.
        assert_eq!(
            client_ip(proxy, "[2001:db8::1]:4711", &proxies),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(proxy, "203.0.113.7:80", &proxies),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.5"), "203.0.113.7", &proxies),
            ip("203.0.113.7")
        );
        // Garbage or nothing: the last hop believed.
        assert_eq!(client_ip(proxy, "", &proxies), proxy);
        assert_eq!(client_ip(proxy, "203.0.113.7, unknown", &proxies), proxy);
    }
}
