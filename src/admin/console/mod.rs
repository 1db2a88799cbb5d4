//! The web console at `/console/` on the admin listener: server-rendered HTML pages for the
//! operator (overview and health, queue by destination and age, delivery rates per provider,
//! shaping and warm-up with "why slow", suppressions, bounces and complaints, campaigns) and
//! the queue and suppression actions, all without a line of script.
//!
//! - Login takes an API token (`admin.token_file` or `[[admin.tokens]]`), checked as the
//!   bearer token is ([`super::auth::identify`]); a session ([`session`]) is then held by a
//!   cookie. The `read` scope is enough to look.
//! - Each page renders the same value its JSON API route answers (`queue::summary_report`,
//!   `suppression::list_report`, `shaping::pairs_report`, `reports::*_report`, `status_report`),
//!   so the console and the API cannot disagree. Charts are SVG drawn here ([`chart`]).
//! - Actions (suspend, resume, flush, hold, release; suppress, remove) are POST forms to
//!   `/console/action` carrying the session's CSRF token; each needs the scope its API call
//!   needs ([`super::auth::required_scope`], else 403), shows a confirmation page first and
//!   runs only once confirmed, through the API's own handler; each is written to the audit log
//!   (target `tern::audit`) like an API call.
//!
//! Invariants: every operator-visible string reaches the page through minijinja's HTML
//! auto-escaping or [`chart::escape`]; every answer carries a Content-Security-Policy that
//! allows no script and loads nothing from elsewhere (the stylesheet is in the binary), so the
//! console works offline and an escaping slip still cannot run anything.

pub mod chart;
pub mod session;

use super::auth::{identify, required_scope, Principal, TOKEN_FILE_NAME};
use super::campaigns as campaign_api;
use super::error::{ApiError, ApiJson};
use super::queue::{self, ResumeRequest, Selector, SuspendRequest, AGE_BUCKETS_MINUTES};
use super::reports::{self, BounceParams};
use super::suppression::{self, AddRequest, ListParams};
use super::AdminState;
use crate::clock::now_ms;
use crate::config::Scope;
use crate::scheduler::Operation;
use axum::extract::{ConnectInfo, Form, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use minijinja::{context, Environment, Value as Tpl};
use serde::Deserialize;
use serde_json::Value;
use session::{Session, Sessions, COOKIE, SESSION_TTL};
use std::net::SocketAddr;
use std::sync::Arc;

/// The stylesheet, served at `/console/style.css`.
const STYLE: &str = include_str!("templates/style.css");

/// What every console answer forbids: no script at all, nothing from another origin.
const CSP: &str = "default-src 'none'; style-src 'self'; img-src 'self' data:; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const TEMPLATES: [(&str, &str); 11] = [
    ("base.html", include_str!("templates/base.html")),
    ("login.html", include_str!("templates/login.html")),
    ("message.html", include_str!("templates/message.html")),
    ("overview.html", include_str!("templates/overview.html")),
    ("queue.html", include_str!("templates/queue.html")),
    ("rates.html", include_str!("templates/rates.html")),
    ("shaping.html", include_str!("templates/shaping.html")),
    (
        "suppressions.html",
        include_str!("templates/suppressions.html"),
    ),
    ("bounces.html", include_str!("templates/bounces.html")),
    ("campaigns.html", include_str!("templates/campaigns.html")),
    ("confirm.html", include_str!("templates/confirm.html")),
];

/// The console's state: the admin state it reads, its sessions and its templates.
#[derive(Clone)]
struct Console {
    admin: AdminState,
    sessions: Arc<Sessions>,
    env: Arc<Environment<'static>>,
}

/// Who is looking: the session and the token's current rights.
struct Viewer {
    id: String,
    session: Session,
    principal: Principal,
}

/// The console's routes, with their own state (sessions live as long as the router).
pub fn routes(admin: AdminState) -> Router<AdminState> {
    let console = Console {
        admin,
        sessions: Arc::new(Sessions::default()),
        env: Arc::new(environment()),
    };
    Router::new()
        .route(
            "/console",
            get(|| async { Redirect::permanent("/console/") }),
        )
        .route("/console/", get(overview))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/queue", get(queue_page))
        .route("/console/rates", get(rates_page))
        .route("/console/shaping", get(shaping_page))
        .route("/console/suppressions", get(suppressions_page))
        .route("/console/bounces", get(bounces_page))
        .route("/console/campaigns", get(campaigns_page))
        .route("/console/action", post(action))
        .route("/console/style.css", get(style))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .expect("the console's templates compile (checked by the unit tests)");
    }
    env.add_filter("ms_time", ms_time);
    env
}

/// Unix milliseconds as `2026-12-07 13:45:00 UTC`.
fn ms_time(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .map(|t| t.strftime("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

impl Console {
    fn api_enabled(&self) -> bool {
        self.admin.token.is_some() || !self.admin.edge.get().tokens.is_empty()
    }

    /// The SHA-256 of token `name`'s secret as configured now (`None`: no such token).
    fn fingerprint_now(&self, name: &str) -> Option<[u8; 32]> {
        if name == TOKEN_FILE_NAME {
            return self.admin.token.as_ref().map(|t| sha256(t.as_str()));
        }
        self.admin
            .edge
            .get()
            .tokens
            .iter()
            .find(|t| t.name == name)
            .map(|t| t.secret_sha256)
    }

    /// The token's rights now (a reload may have changed its scopes).
    fn principal_now(&self, name: &str) -> Option<Principal> {
        if name == TOKEN_FILE_NAME {
            return self.admin.token.as_ref().map(|_| Principal {
                name: TOKEN_FILE_NAME.to_owned(),
                scopes: vec![Scope::Admin],
            });
        }
        self.admin
            .edge
            .get()
            .tokens
            .iter()
            .find(|t| t.name == name)
            .map(|t| Principal {
                name: t.name.clone(),
                scopes: t.scopes.clone(),
            })
    }

    /// The viewer of a request: a live session whose token still exists unchanged.
    fn viewer(&self, headers: &HeaderMap) -> Option<Viewer> {
        let id = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(session::cookie_value)?;
        let session = self
            .sessions
            .get(id, now_ms(), |name| self.fingerprint_now(name))?;
        let principal = self.principal_now(&session.token)?;
        Some(Viewer {
            id: id.to_owned(),
            session,
            principal,
        })
    }

    /// Renders template `name` with `ctx` and the frame's values (host name, viewer, page).
    fn render(
        &self,
        status: StatusCode,
        name: &str,
        title: &str,
        viewer: Option<&Viewer>,
        ctx: Tpl,
    ) -> Response {
        let viewer = viewer.map(|v| {
            context! { token => v.session.token.clone(), csrf => v.session.csrf.clone() }
        });
        let current = match name {
            "overview.html" => "/console/".to_owned(),
            other => format!("/console/{}", other.trim_end_matches(".html")),
        };
        let frame = context! {
            hostname => self.admin.hostname.clone(),
            title => title,
            viewer => viewer,
            current => current,
            ..ctx
        };
        match self.env.get_template(name).and_then(|t| t.render(frame)) {
            Ok(html) => (
                status,
                [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
                html,
            )
                .into_response(),
            Err(err) => {
                tracing::error!(template = name, error = %err, "console page failed to render");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "console page failed to render",
                )
                    .into_response()
            }
        }
    }

    /// A page with one message (errors, refusals, results).
    fn message(
        &self,
        status: StatusCode,
        title: &str,
        viewer: Option<&Viewer>,
        message: &str,
        back: Option<&str>,
    ) -> Response {
        let kind = if status.is_success() { "ok" } else { "error" };
        self.render(
            status,
            "message.html",
            title,
            viewer,
            context! { message => message, kind => kind, back => back },
        )
    }

    fn api_error(&self, viewer: &Viewer, err: ApiError, back: &str) -> Response {
        self.message(
            err.status,
            "Not done",
            Some(viewer),
            &err.message,
            Some(back),
        )
    }
}

/// A serde value for a template.
fn tpl<T: serde::Serialize>(value: &T) -> Tpl {
    Tpl::from(minijinja::value::Serde(value))
}

fn sha256(text: &str) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

/// The redirect to the login page of a request without a live session.
fn to_login() -> Response {
    Redirect::to("/console/login").into_response()
}

/// Runs `page` for the viewer of `headers`, or sends them to the login page.
macro_rules! viewer_or_login {
    ($console:expr, $headers:expr) => {
        match $console.viewer(&$headers) {
            Some(v) => v,
            None => return to_login(),
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Login and logout

async fn login_form(State(c): State<Console>, headers: HeaderMap) -> Response {
    if c.viewer(&headers).is_some() {
        return Redirect::to("/console/").into_response();
    }
    if !c.api_enabled() {
        return disabled(&c);
    }
    c.render(StatusCode::OK, "login.html", "Log in", None, context! {})
}

fn disabled(c: &Console) -> Response {
    c.message(
        StatusCode::SERVICE_UNAVAILABLE,
        "Console disabled",
        None,
        "The admin API and its console are disabled: set admin.token_file or [[admin.tokens]].",
        None,
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

/// Whether the request came over TLS: through one of `admin.trusted_proxies` that says so
/// (`X-Forwarded-Proto: https`); the admin listener itself speaks plain HTTP.
fn over_tls(c: &Console, headers: &HeaderMap, peer: Option<SocketAddr>) -> bool {
    let proxied = peer.is_some_and(|p| {
        c.admin
            .edge
            .get()
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&p.ip()))
    });
    proxied
        && headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("https"))
}

async fn login(
    State(c): State<Console>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    form: Result<Form<LoginForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !c.api_enabled() {
        return disabled(&c);
    }
    let presented = form.map(|Form(f)| f.token).unwrap_or_default();
    let presented = presented.trim();
    let edge = c.admin.edge.get();
    let Some(principal) = identify(c.admin.token.as_ref(), &edge.tokens, presented) else {
        tracing::warn!(target: "tern::audit", token = %"-", method = %"POST", path = %"/console/login", status = 401, "console login refused: unknown token");
        return c.render(
            StatusCode::UNAUTHORIZED,
            "login.html",
            "Log in",
            None,
            context! { error => "That token is not valid." },
        );
    };
    let id = c
        .sessions
        .open(&principal.name, sha256(presented), now_ms());
    tracing::info!(target: "tern::audit", token = %principal.name, method = %"POST", path = %"/console/login", status = 303, "console login");
    let peer = connect.map(|Extension(ConnectInfo(p))| p);
    let secure = if over_tls(&c, &headers, peer) {
        "; Secure"
    } else {
        ""
    };
    let cookie = format!(
        "{COOKIE}={id}; Path=/console; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_TTL.as_secs()
    );
    ([(header::SET_COOKIE, cookie)], Redirect::to("/console/")).into_response()
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    State(c): State<Console>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let csrf = form.map(|Form(f)| f.csrf).unwrap_or_default();
    if !session::csrf_matches(&viewer.session.csrf, &csrf) {
        return c.message(
            StatusCode::FORBIDDEN,
            "Refused",
            Some(&viewer),
            "The form's CSRF token is missing or wrong: reload the page and try again.",
            Some("/console/"),
        );
    }
    c.sessions.close(&viewer.id);
    tracing::info!(target: "tern::audit", token = %viewer.principal.name, method = %"POST", path = %"/console/logout", status = 303, "console logout");
    (
        [(
            header::SET_COOKIE,
            format!("{COOKIE}=; Path=/console; HttpOnly; SameSite=Strict; Max-Age=0"),
        )],
        Redirect::to("/console/login"),
    )
        .into_response()
}

// ---------------------------------------------------------------------------------------------
// Pages

/// The JSON of `GET /api/v1/status` (also the overview's figures).
async fn overview(State(c): State<Console>, headers: HeaderMap) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let status = super::status_report(&c.admin);
    let queue = match queue::summary_report(&c.admin).await {
        Ok(q) => q,
        Err(e) => return c.api_error(&viewer, e, "/console/"),
    };
    let bounces = match reports::bounces_report(&c.admin, &BounceParams::default()) {
        Ok(b) => b,
        Err(e) => return c.api_error(&viewer, e, "/console/"),
    };
    let ready = c.admin.readiness.check();
    let shaping_pairs = c.admin.shaper.views(None).len();
    c.render(
        StatusCode::OK,
        "overview.html",
        "Overview",
        Some(&viewer),
        context! {
            status => tpl(&status),
            queue => tpl(&queue),
            bounces => tpl(&bounces),
            ready => ready.is_ok(),
            ready_reason => ready.err(),
            shaping_pairs => shaping_pairs,
        },
    )
}

/// The labels of the age histogram's buckets.
fn age_labels() -> Vec<String> {
    let mut labels = Vec::new();
    let mut low = 0;
    for high in AGE_BUCKETS_MINUTES {
        labels.push(if low == 0 {
            format!("< {high} min")
        } else {
            format!("{low}–{high} min")
        });
        low = high;
    }
    labels.push(format!("≥ {low} min"));
    labels
}

async fn queue_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let queue = match queue::summary_report(&c.admin).await {
        Ok(q) => q,
        Err(e) => return c.api_error(&viewer, e, "/console/"),
    };
    let labels = age_labels();
    let bars: Vec<(String, f64, String)> = labels
        .iter()
        .zip(
            queue["totals"]["age_histogram"]
                .as_array()
                .cloned()
                .unwrap_or_default(),
        )
        .map(|(label, n)| {
            let n = n.as_u64().unwrap_or(0);
            (label.clone(), n as f64, n.to_string())
        })
        .collect();
    let age_chart = chart::bar_chart("Queued messages by age", &bars);
    c.render(
        StatusCode::OK,
        "queue.html",
        "Queue",
        Some(&viewer),
        context! {
            queue => tpl(&queue),
            age_labels => labels,
            age_chart => Tpl::from_safe_string(age_chart),
        },
    )
}

/// `part / whole` as a percentage for the page, `–` without a whole.
fn percent(part: u64, whole: u64) -> String {
    if whole == 0 {
        "–".to_owned()
    } else {
        format!("{:.1} %", part as f64 * 100.0 / whole as f64)
    }
}

async fn rates_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let rates = reports::rates_report(&c.admin);
    let labels: Vec<Tpl> = rates["labels"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|label| {
            let series_of = |outcome: &str| -> Vec<u64> {
                label["series"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|m| m[outcome].as_u64().unwrap_or(0))
                    .collect()
            };
            let shown = ["delivered", "deferred", "bounced", "expired"];
            let series: Vec<chart::Series<'_>> = shown
                .iter()
                .map(|&name| chart::Series {
                    name,
                    values: series_of(name),
                })
                .collect();
            let minute = |i: usize| {
                label["series"][i]["ts_ms"]
                    .as_i64()
                    .map(|ms| ms_time(ms).get(11..16).unwrap_or_default().to_owned())
                    .unwrap_or_default()
            };
            let last = label["series"]
                .as_array()
                .map_or(0, Vec::len)
                .saturating_sub(1);
            let name = label["label"].as_str().unwrap_or_default();
            let svg = chart::line_chart(
                &format!("Outcomes per minute: {name}"),
                &series,
                &minute(0),
                &format!("{} UTC", minute(last)),
            );
            let total = |o: &str| label["totals"][o].as_u64().unwrap_or(0);
            let all = total("delivered") + total("deferred") + total("bounced") + total("expired");
            context! {
                label => name,
                totals => tpl(&label["totals"]),
                chart => Tpl::from_safe_string(svg),
                deferral_rate => percent(total("deferred"), all),
                bounce_rate => percent(total("bounced") + total("expired"), all),
            }
        })
        .collect();
    c.render(
        StatusCode::OK,
        "rates.html",
        "Rates",
        Some(&viewer),
        context! { rates => tpl(&rates), labels => labels },
    )
}

async fn shaping_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let pairs = super::shaping::pairs_report(&c.admin, None);
    c.render(
        StatusCode::OK,
        "shaping.html",
        "Shaping",
        Some(&viewer),
        context! { pairs => tpl(&pairs) },
    )
}

async fn suppressions_page(
    State(c): State<Console>,
    headers: HeaderMap,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let Ok(Query(mut params)) = params else {
        return c.message(
            StatusCode::BAD_REQUEST,
            "Bad search",
            Some(&viewer),
            "The search has fields this page does not know.",
            Some("/console/suppressions"),
        );
    };
    // An empty form field means "any".
    params.contains = params.contains.filter(|s| !s.is_empty());
    params.reason = params.reason.filter(|s| !s.is_empty());
    params.after = params.after.filter(|s| !s.is_empty());
    let shown = ListParams {
        after: None,
        limit: params.limit,
        reason: params.reason.clone(),
        contains: params.contains.clone(),
    };
    let list = match suppression::list_report(&c.admin, params).await {
        Ok(l) => l,
        Err(e) => return c.api_error(&viewer, e, "/console/suppressions"),
    };
    let mut next = Vec::new();
    if let Some(after) = list["next"].as_str() {
        next.push(("after", after.to_owned()));
        if let Some(s) = &shown.contains {
            next.push(("contains", s.clone()));
        }
        if let Some(s) = &shown.reason {
            next.push(("reason", s.clone()));
        }
        if let Some(n) = shown.limit {
            next.push(("limit", n.to_string()));
        }
    }
    let next_query = serde_urlencoded(&next);
    c.render(
        StatusCode::OK,
        "suppressions.html",
        "Suppressions",
        Some(&viewer),
        context! {
            list => tpl(&list),
            params => context! { contains => shown.contains, reason => shown.reason },
            next_query => next_query,
        },
    )
}

/// `k=v&...`, percent-encoded (the next page's link).
fn serde_urlencoded(pairs: &[(&str, String)]) -> String {
    fn encode(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                b => format!("%{b:02X}"),
            })
            .collect()
    }
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

async fn bounces_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let bounces = match reports::bounces_report(&c.admin, &BounceParams::default()) {
        Ok(b) => b,
        Err(e) => return c.api_error(&viewer, e, "/console/"),
    };
    c.render(
        StatusCode::OK,
        "bounces.html",
        "Bounces",
        Some(&viewer),
        context! {
            bounces => tpl(&bounces),
            kept => crate::events::RECENT_FAILURES,
        },
    )
}

async fn campaigns_page(State(c): State<Console>, headers: HeaderMap) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let report = reports::campaigns_report(&c.admin);
    let campaigns: Vec<Tpl> = report["campaigns"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|campaign| {
            let name = campaign["name"].as_str().unwrap_or_default();
            let bars: Vec<(String, f64, String)> = campaign["variants"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default()
                .iter()
                .map(|v| {
                    let rate = v["rate"].as_f64();
                    (
                        v["id"].as_str().unwrap_or_default().to_owned(),
                        rate.unwrap_or(0.0),
                        rate.map_or("no sends".to_owned(), |r| format!("{:.2} %", r * 100.0)),
                    )
                })
                .collect();
            let svg = chart::bar_chart(&format!("Reward rate by variant: {name}"), &bars);
            context! {
                name => name,
                state => campaign["state"].as_str().unwrap_or_default(),
                variants => tpl(&campaign["variants"]),
                results => tpl(&campaign["results"]),
                chart => Tpl::from_safe_string(svg),
            }
        })
        .collect();
    c.render(
        StatusCode::OK,
        "campaigns.html",
        "Campaigns",
        Some(&viewer),
        context! {
            campaigns => campaigns,
            rates => crate::sidecar::results::RATES.iter().map(|(r, _)| *r).collect::<Vec<_>>(),
            may_change => viewer.principal.may(Scope::Campaigns),
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Actions

/// One action form (the queue page's buttons, the suppression page's forms, the confirmation).
#[derive(Deserialize, Default, Debug)]
struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    action: String,
    /// Queue actions: the destination; empty means all.
    #[serde(default)]
    destination: String,
    /// Suspend: why and for how long (empty: until resumed).
    #[serde(default)]
    reason: String,
    #[serde(default)]
    duration: String,
    /// Suppression actions.
    #[serde(default)]
    address: String,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    expires_in: String,
    #[serde(default)]
    confirm: String,
    /// Campaign actions: the campaign's name.
    #[serde(default)]
    campaign: String,
}

/// What an action is: the API call it stands for (so its scope and audit line are the API's),
/// the words of its confirmation and the page to go back to.
struct ActionKind {
    method: Method,
    api_path: String,
    what: String,
    back: &'static str,
}

fn some(text: &str) -> Option<String> {
    let t = text.trim();
    (!t.is_empty()).then(|| t.to_owned())
}

fn describe(form: &ActionForm) -> Option<ActionKind> {
    let dest = some(&form.destination);
    let target = dest.as_deref().map_or("every destination".to_owned(), |d| {
        format!("destination {d}")
    });
    let queue = |path: &str, what: String| ActionKind {
        method: Method::POST,
        api_path: format!("/queue/{path}"),
        what,
        back: "/console/queue",
    };
    Some(match form.action.as_str() {
        "suspend" => queue("suspend", format!("Suspend delivery to {target}?")),
        "resume" => queue("resume", format!("Resume delivery to {target}?")),
        "flush" => queue(
            "retry",
            format!("Flush {target}: retry every queued message now?"),
        ),
        "hold" => queue("hold", format!("Hold every queued message of {target}?")),
        "release" => queue(
            "release",
            format!("Release every held message of {target}?"),
        ),
        "suppress" => ActionKind {
            method: Method::POST,
            api_path: "/suppressions".to_owned(),
            what: format!("Suppress {}?", form.address.trim()),
            back: "/console/suppressions",
        },
        "unsuppress" => ActionKind {
            method: Method::DELETE,
            api_path: format!("/suppressions/{}", form.address.trim()),
            what: format!(
                "Remove {} from the suppression list{}?",
                form.address.trim(),
                some(&form.scope).map_or(String::new(), |s| format!(" (list {s})"))
            ),
            back: "/console/suppressions",
        },
        "pause_campaign" | "resume_campaign" => {
            let name = form.campaign.trim();
            let verb = &form.action[..form.action.len() - "_campaign".len()];
            ActionKind {
                method: Method::POST,
                api_path: format!("/campaigns/{name}/{verb}"),
                what: match verb {
                    "pause" => format!(
                        "Pause campaign {name}? Its new mail is accepted and held until it is resumed."
                    ),
                    _ => format!("Resume campaign {name} and release its held mail?"),
                },
                back: "/console/campaigns",
            }
        }
        _ => return None,
    })
}

async fn action(
    State(c): State<Console>,
    headers: HeaderMap,
    form: Result<Form<ActionForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let viewer = viewer_or_login!(c, headers);
    let form = match form {
        Ok(Form(f)) => f,
        Err(e) => {
            return c.message(
                StatusCode::BAD_REQUEST,
                "Bad form",
                Some(&viewer),
                &e.body_text(),
                Some("/console/"),
            )
        }
    };
    let audit_path = format!("/console/action/{}", form.action);
    let refuse = |status: StatusCode, why: &str, back: &str| {
        tracing::warn!(target: "tern::audit", token = %viewer.principal.name, method = %"POST", path = %audit_path, status = status.as_u16(), reason = %why, "console action refused");
        c.message(status, "Refused", Some(&viewer), why, Some(back))
    };
    if !session::csrf_matches(&viewer.session.csrf, &form.csrf) {
        return refuse(
            StatusCode::FORBIDDEN,
            "The form's CSRF token is missing or wrong: reload the page and try again.",
            "/console/",
        );
    }
    let Some(kind) = describe(&form) else {
        return refuse(StatusCode::BAD_REQUEST, "Unknown action.", "/console/");
    };
    let scope = required_scope(&kind.method, &kind.api_path);
    if !viewer.principal.may(scope) {
        let why = format!(
            "Token {:?} lacks the {:?} scope this action needs.",
            viewer.principal.name,
            scope.name()
        );
        return refuse(StatusCode::FORBIDDEN, &why, kind.back);
    }
    if form.confirm != "yes" {
        let mut fields = vec![("csrf", form.csrf.clone()), ("action", form.action.clone())];
        // A suspension's reason and duration are asked for on the confirmation page itself.
        let suspend = form.action == "suspend";
        for (name, value) in [
            ("destination", &form.destination),
            ("reason", &form.reason),
            ("duration", &form.duration),
            ("address", &form.address),
            ("scope", &form.scope),
            ("expires_in", &form.expires_in),
            ("campaign", &form.campaign),
        ] {
            let asked = suspend && matches!(name, "reason" | "duration");
            if !value.is_empty() && !asked {
                fields.push((name, value.clone()));
            }
        }
        return c.render(
            StatusCode::OK,
            "confirm.html",
            "Confirm",
            Some(&viewer),
            context! {
                what => kind.what,
                fields => fields,
                back => kind.back,
                suspend => suspend,
                reason => form.reason,
                duration => form.duration,
            },
        );
    }
    let result = run(&c.admin, &form).await;
    let status = match &result {
        Ok(_) => StatusCode::OK,
        Err(e) => e.status,
    };
    tracing::info!(target: "tern::audit", token = %viewer.principal.name, method = %"POST", path = %audit_path, api = ?format!("{} /api/v1{}", kind.method, kind.api_path), status = status.as_u16(), "console action");
    match result {
        Ok(done) => c.message(
            StatusCode::OK,
            "Done",
            Some(&viewer),
            &done,
            Some(kind.back),
        ),
        Err(e) => c.api_error(&viewer, e, kind.back),
    }
}

/// Carries out a confirmed action through the API's own handler; answers what it did.
async fn run(state: &AdminState, form: &ActionForm) -> Result<String, ApiError> {
    let dest = some(&form.destination);
    let target = dest
        .as_deref()
        .map_or("every destination".to_owned(), |d| d.to_owned());
    let selector = || Selector {
        all: dest.is_none(),
        destination: dest.clone(),
        ..Selector::default()
    };
    let s = || State(state.clone());
    let counted = |verb: &str, Json(v): Json<Value>| {
        format!(
            "{verb} {} of {} messages of {target}.",
            v["affected"], v["matched"]
        )
    };
    Ok(match form.action.as_str() {
        "suspend" => {
            let req = SuspendRequest {
                destination: dest.clone(),
                duration: some(&form.duration),
                reason: some(&form.reason),
            };
            let _suspended = queue::suspend(s(), ApiJson(req)).await?;
            format!("Delivery to {target} is suspended.")
        }
        "resume" => {
            let Json(v) = queue::resume(
                s(),
                ApiJson(ResumeRequest {
                    destination: dest.clone(),
                }),
            )
            .await?;
            if v["resumed"] == true {
                format!("Delivery to {target} is resumed.")
            } else {
                format!("Delivery to {target} was not suspended.")
            }
        }
        "flush" => counted(
            "Retrying now",
            queue::operate(s(), ApiJson(selector()), Operation::Retry).await?,
        ),
        "hold" => counted(
            "Held",
            queue::operate(s(), ApiJson(selector()), Operation::Hold).await?,
        ),
        "release" => counted(
            "Released",
            queue::operate(s(), ApiJson(selector()), Operation::Release).await?,
        ),
        "suppress" => {
            let req = AddRequest {
                address: form.address.trim().to_owned(),
                reason: some(&form.reason),
                expires_in: some(&form.expires_in),
                scope: some(&form.scope),
            };
            let Json(v) = suppression::add(s(), ApiJson(req)).await?;
            format!(
                "{} is suppressed ({}).",
                v["address"].as_str().unwrap_or_default(),
                v["reason"].as_str().unwrap_or_default()
            )
        }
        "unsuppress" => {
            let address = form.address.trim();
            suppression::remove_entry(state, address, some(&form.scope).as_deref()).await?;
            format!("{address} is no longer suppressed.")
        }
        "pause_campaign" => {
            let info = campaign_api::pause_campaign(state, form.campaign.trim()).await?;
            format!("Campaign {} is paused: its new mail is held.", info.name)
        }
        "resume_campaign" => {
            let (info, released) =
                campaign_api::resume_campaign(state, form.campaign.trim()).await?;
            format!(
                "Campaign {} is active again; {released} held messages released.",
                info.name
            )
        }
        other => return Err(ApiError::bad_request(format!("unknown action {other:?}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_compiles_and_escapes_what_it_is_given() {
        let env = environment();
        let html = env
            .get_template("message.html")
            .unwrap()
            .render(context! {
                hostname => "<b>host</b>",
                title => "t",
                viewer => (),
                message => "<script>alert(1)</script>",
                kind => "error",
                back => "\"><script>",
            })
            .unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(
            html.contains("&lt;script&gt;alert(1)&lt;&#x2f;script&gt;"),
            "{html}"
        );
        assert!(html.contains("&lt;b&gt;host"), "{html}");
    }

    #[test]
    fn age_labels_match_the_histogram() {
        let labels = age_labels();
        assert_eq!(labels.len(), AGE_BUCKETS_MINUTES.len() + 1);
        assert_eq!(labels[0], "< 5 min");
        assert_eq!(labels[1], "5–10 min");
        assert_eq!(labels.last().unwrap(), "≥ 1280 min");
    }

    #[test]
    fn actions_name_the_api_call_whose_scope_they_need() {
        let form = |action: &str| ActionForm {
            action: action.into(),
            address: "a@b.test".into(),
            ..ActionForm::default()
        };
        for (action, scope) in [
            ("suspend", Scope::Queue),
            ("resume", Scope::Queue),
            ("flush", Scope::Queue),
            ("hold", Scope::Queue),
            ("release", Scope::Queue),
            ("suppress", Scope::Suppression),
            ("unsuppress", Scope::Suppression),
            ("pause_campaign", Scope::Campaigns),
            ("resume_campaign", Scope::Campaigns),
        ] {
            let kind = describe(&form(action)).unwrap();
            assert_eq!(
                required_scope(&kind.method, &kind.api_path),
                scope,
                "{action}"
            );
        }
        assert!(describe(&form("delete")).is_none());
        assert_eq!(
            serde_urlencoded(&[("after", "a b&c".into()), ("x", "é".into())]),
            "after=a%20b%26c&x=%C3%A9"
        );
    }
}
