//! The public one-click unsubscribe endpoint on the admin listener (no bearer token: the
//! signed token in the path is the check; what it means is [`crate::unsubscribe`]'s).
//!
//! - `POST /u/{token}` with the form field `List-Unsubscribe=One-Click` (RFC 8058; url-encoded
//!   or multipart, as mailbox providers send it): unsubscribes and answers `200` at once, no
//!   cookie, no redirect; again: `200`, nothing changes.
//! - `GET /u/{token}`: a minimal page with a button that sends that POST (a GET never
//!   unsubscribes: link scanners and prefetchers follow every link).
//! - An unsigned, altered or expired token: `404`, nothing recorded; a POST without the field:
//!   `400`.

use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::unsubscribe::Unsubscriber;

/// The route, outside the token-protected API.
pub fn routes<S: Clone + Send + Sync + 'static>(unsubscriber: Arc<Unsubscriber>) -> Router<S> {
    Router::new()
        .route("/u/{token}", get(page).post(unsubscribe))
        .with_state(unsubscriber)
}

fn now_secs() -> u64 {
    crate::clock::now_ms() / 1000
}

fn html(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

fn not_found() -> Response {
    html(
        StatusCode::NOT_FOUND,
        "<!doctype html><title>Unknown link</title><p>This unsubscribe link is not valid (or too old).</p>\n".into(),
    )
}

/// Escapes text for HTML element content and attribute values.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

async fn page(
    State(unsubscriber): State<Arc<Unsubscriber>>,
    UrlPath(token): UrlPath<String>,
) -> Response {
    let Some(claims) = unsubscriber.verify(&token, now_secs()) else {
        return not_found();
    };
    html(
        StatusCode::OK,
        format!(
            "<!doctype html><meta charset=\"utf-8\"><title>Unsubscribe</title>\n\
             <p>Stop mail of <b>{list}</b> to <b>{address}</b>?</p>\n\
             <form method=\"post\" action=\"/u/{token}\">\
             <input type=\"hidden\" name=\"List-Unsubscribe\" value=\"One-Click\">\
             <button type=\"submit\">Unsubscribe</button></form>\n",
            list = escape(&claims.l),
            address = escape(&claims.r),
            token = escape(&token),
        ),
    )
}

async fn unsubscribe(
    State(unsubscriber): State<Arc<Unsubscriber>>,
    UrlPath(token): UrlPath<String>,
    body: axum::body::Bytes,
) -> Response {
    let Some(claims) = unsubscriber.verify(&token, now_secs()) else {
        return not_found();
    };
    // `List-Unsubscribe=One-Click` url-encoded, or a multipart part named List-Unsubscribe
    // holding One-Click: either way both words are in the body.
    let asks = |needle: &[u8]| memchr::memmem::find(&body, needle).is_some();
    if !(asks(b"List-Unsubscribe") && asks(b"One-Click")) {
        return (
            StatusCode::BAD_REQUEST,
            "the body must be List-Unsubscribe=One-Click (RFC 8058)\n",
        )
            .into_response();
    }
    match unsubscriber.unsubscribe(&claims, "unsubscribe").await {
        Ok(_) => html(
            StatusCode::OK,
            format!(
                "<!doctype html><meta charset=\"utf-8\"><title>Unsubscribed</title>\n\
                 <p>{} will get no more mail of {}.</p>\n",
                escape(&claims.r),
                escape(&claims.l)
            ),
        ),
        Err(err) => {
            tracing::warn!(error = %err, "cannot record an unsubscribe");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "60")],
                "try again later\n",
            )
                .into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
    }
}
