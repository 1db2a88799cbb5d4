//! The web console (`/console/`) against the in-process daemon with mail in its queue
//! (deferred by a sink that answers 451), a bounce (550) and suppressions, one of them hostile.
//!
//! Over plain HTTP: login is required, a wrong token gets nothing, a read-only token sees every
//! page but no action, an action without the session's CSRF token is refused, each action asks
//! for confirmation and then does what the API would (suspend, resume, flush, hold, release,
//! suppress, remove), operator-visible strings are escaped, logout and a token removed by a
//! reload end the session, and the cookie has the attributes it should.
//!
//! In headless Chromium (Debian's `chromium`; the test fails without it): every page loads
//! without a console error or a CSP violation, its key numbers equal the JSON API's, hostile
//! strings show as text and no script exists in the page, the hold action is confirmed and done
//! through the browser, and a PNG screenshot of each page is kept under
//! `target/console-screenshots/`.

use crate::delivery::*;
use crate::harness::*;
use crate::sink::SinkBehaviour;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    // The spool's clock (Unix ms), for comparing with envelopes' due times.
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}
use tern::admin::auth::Token;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const READ: &str = "console-read-only-secret-0123456789ab";
const OPS: &str = "console-ops-secret-0123456789abcdef0";
/// A suppressed address a browser would run if it were not escaped.
const HOSTILE_ADDRESS: &str = "x<script>document.title='pwned'</script>@evil.test";
/// A suspension reason likewise.
const HOSTILE_REASON: &str = "<img src=x onerror=\"document.title='pwned'\">";

fn token_entry(name: &str, secret: &str, scopes: &[&str]) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[[admin.tokens]]\nname = {name:?}\nsecret_sha256 = {:?}\nscopes = [{}]\n",
        Token::sha256_hex(secret),
        scopes.join(", ")
    )
}

fn options(o: Options) -> Options {
    o.extra(token_entry("viewer", READ, &["read"]))
        .extra(token_entry("ops", OPS, &["queue", "suppression"]))
        .admin("trusted_proxies", "[\"127.0.0.1/32\"]")
}

/// Deferred at RCPT (451) unless the local part starts with `perm` (550).
fn refusing_sink() -> SinkBehaviour {
    SinkBehaviour::default().rcpt_reply(|a| {
        Some(if a.starts_with("perm") {
            "550 5.1.1 No such user".to_owned()
        } else {
            "451 4.3.0 Try again later".to_owned()
        })
    })
}

/// A daemon with three messages deferred to sink.test, one bounced recipient, a suppressed
/// address and a hostile one; returns once the API shows the deferrals and the bounce.
async fn queued_relay(extra: &str) -> Relay {
    // Deferred mail waits an hour: only a flush makes it due sooner.
    let r = relay(refusing_sink(), |o| {
        options(o).delivery("retry_initial", "\"1h\"").extra(extra)
    })
    .await;
    for i in 0..3 {
        send(
            &r.server,
            &format!("<{SENDER}>"),
            &[&format!("<user{i}@sink.test>")],
            &message(&format!("console {i}")),
        )
        .await;
    }
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<perm@sink.test>"],
        &message("console bounce"),
    )
    .await;
    for (address, reason) in [
        ("blocked@example.test", "manual"),
        (HOSTILE_ADDRESS, "manual"),
    ] {
        let (status, body) = r
            .server
            .api(
                "POST",
                "/api/v1/suppressions",
                Some(&json!({"address": address, "reason": reason})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
    }
    let deadline = Instant::now() + T;
    loop {
        let (_, rates) = r.server.api("GET", "/api/v1/rates", None).await;
        let (_, bounces) = r.server.api("GET", "/api/v1/bounces", None).await;
        let deferred: u64 = rates["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["totals"]["deferred"].as_u64().unwrap())
            .sum();
        if deferred >= 3 && bounces["bounced"].as_u64() >= Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no deferrals and bounce: {rates} {bounces}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    r
}

// ---------------------------------------------------------------------------------------------
// HTTP with cookies and forms

struct Answer {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The session cookie's value from Set-Cookie.
    fn session(&self) -> Option<String> {
        let cookie = self.header("set-cookie")?;
        let value = cookie.split(';').next()?.strip_prefix("tern_console=")?;
        (!value.is_empty()).then(|| value.to_owned())
    }

    /// The value of the first hidden `csrf` field.
    fn csrf(&self) -> String {
        let at = self
            .body
            .find("name=\"csrf\" value=\"")
            .unwrap_or_else(|| panic!("no CSRF field in:\n{}", self.body));
        let rest = &self.body[at + 19..];
        rest[..rest.find('"').unwrap()].to_owned()
    }
}

fn form_encode(fields: &[(&str, &str)]) -> String {
    fields
        .iter()
        .map(|(k, v)| {
            let v: String = v
                .bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                        (b as char).to_string()
                    }
                    b => format!("%{b:02X}"),
                })
                .collect();
            format!("{k}={v}")
        })
        .collect::<Vec<_>>()
        .join("&")
}

async fn call(
    addr: SocketAddr,
    method: &str,
    path: &str,
    session: Option<&str>,
    extra: &[(&str, &str)],
    form: Option<&[(&str, &str)]>,
) -> Answer {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n");
    if let Some(s) = session {
        request.push_str(&format!("Cookie: tern_console={s}\r\n"));
    }
    for (k, v) in extra {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = form.map(form_encode).unwrap_or_default();
    if form.is_some() {
        request.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(&body);
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut response))
        .await
        .expect("answered in time")
        .unwrap();
    let response = String::from_utf8(response).unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn login(addr: SocketAddr, token: &str) -> String {
    let a = call(
        addr,
        "POST",
        "/console/login",
        None,
        &[],
        Some(&[("token", token)]),
    )
    .await;
    assert_eq!(a.status, 303, "{}", a.body);
    assert_eq!(a.header("location"), Some("/console/"));
    a.session().expect("a session cookie")
}

async fn page(addr: SocketAddr, session: &str, path: &str) -> Answer {
    let a = call(addr, "GET", path, Some(session), &[], None).await;
    assert_eq!(a.status, 200, "GET {path}: {}", a.body);
    a
}

async fn api(addr: SocketAddr, token: &str, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, Some(token), None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap()
}

/// Posts an action form: the first answer is the confirmation page; confirmed, the result.
async fn act(
    addr: SocketAddr,
    session: &str,
    csrf: &str,
    fields: &[(&str, &str)],
) -> (Answer, Answer) {
    let mut form = vec![("csrf", csrf)];
    form.extend_from_slice(fields);
    let ask = call(
        addr,
        "POST",
        "/console/action",
        Some(session),
        &[],
        Some(&form),
    )
    .await;
    form.push(("confirm", "yes"));
    let done = call(
        addr,
        "POST",
        "/console/action",
        Some(session),
        &[],
        Some(&form),
    )
    .await;
    (ask, done)
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP

#[tokio::test]
async fn login_is_required_and_a_wrong_token_gets_nothing() {
    let r = relay(SinkBehaviour::default(), options).await;
    let addr = r.server.admin();
    for path in [
        "/console/",
        "/console/queue",
        "/console/rates",
        "/console/shaping",
        "/console/suppressions",
        "/console/bounces",
        "/console/campaigns",
    ] {
        let a = call(addr, "GET", path, None, &[], None).await;
        assert_eq!(a.status, 303, "{path}");
        assert_eq!(a.header("location"), Some("/console/login"), "{path}");
        // A made-up session is no session.
        let a = call(addr, "GET", path, Some("0123abcd"), &[], None).await;
        assert_eq!(a.status, 303, "{path}");
    }
    let a = call(
        addr,
        "POST",
        "/console/action",
        None,
        &[],
        Some(&[("action", "hold")]),
    )
    .await;
    assert_eq!(a.status, 303);
    let form = call(addr, "GET", "/console/login", None, &[], None).await;
    assert_eq!(form.status, 200);
    assert!(form.body.contains("name=\"token\""), "{}", form.body);
    let csp = form.header("content-security-policy").unwrap();
    assert!(
        csp.contains("default-src 'none'") && !csp.contains("script-src"),
        "{csp}"
    );

    for wrong in ["", "not-a-token", &format!("{READ}x"), &READ[1..]] {
        let a = call(
            addr,
            "POST",
            "/console/login",
            None,
            &[],
            Some(&[("token", wrong)]),
        )
        .await;
        assert_eq!(a.status, 401, "{wrong:?}");
        assert!(a.session().is_none(), "{wrong:?}");
        assert!(a.body.contains("not valid"), "{}", a.body);
    }
    // The API's own token file logs in too, with the cookie's attributes.
    let a = call(
        addr,
        "POST",
        "/console/login",
        None,
        &[],
        Some(&[("token", &r.server.admin_token())]),
    )
    .await;
    let cookie = a.header("set-cookie").unwrap().to_owned();
    for attribute in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/console",
        "Max-Age=43200",
    ] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "plain HTTP: {cookie}");
    assert!(
        !cookie.contains(&r.server.admin_token()),
        "the token is not in the cookie"
    );
    let s = a.session().unwrap();
    let overview = page(addr, &s, "/console/").await;
    assert!(overview.body.contains("token_file"), "{}", overview.body);
    // Behind a trusted proxy that terminated TLS, the cookie is Secure.
    let a = call(
        addr,
        "POST",
        "/console/login",
        None,
        &[("X-Forwarded-Proto", "https")],
        Some(&[("token", OPS)]),
    )
    .await;
    assert!(a.header("set-cookie").unwrap().contains("; Secure"));
}

#[tokio::test]
async fn read_only_sees_every_page_but_may_not_act_and_csrf_is_required() {
    let r = queued_relay("").await;
    let addr = r.server.admin();
    let viewer = login(addr, READ).await;
    for path in [
        "/console/",
        "/console/queue",
        "/console/rates",
        "/console/shaping",
        "/console/suppressions",
        "/console/bounces",
        "/console/campaigns",
    ] {
        let a = page(addr, &viewer, path).await;
        assert!(
            a.body.contains("viewer"),
            "{path}: the token's name is shown"
        );
    }
    let csrf = page(addr, &viewer, "/console/queue").await.csrf();
    for action in ["hold", "suspend", "flush", "release", "resume"] {
        let (ask, done) = act(
            addr,
            &viewer,
            &csrf,
            &[("action", action), ("destination", "sink.test")],
        )
        .await;
        assert_eq!(ask.status, 403, "{action}: {}", ask.body);
        assert!(ask.body.contains("queue"), "names the scope: {}", ask.body);
        assert_eq!(done.status, 403, "{action}");
    }
    let (ask, _) = act(
        addr,
        &viewer,
        &csrf,
        &[("action", "suppress"), ("address", "x@y.test")],
    )
    .await;
    assert_eq!(ask.status, 403);
    let summary = api(addr, &r.server.admin_token(), "/api/v1/queue/summary").await;
    assert_eq!(summary["totals"]["held"], 0, "nothing was held: {summary}");
    assert!(
        api(addr, &r.server.admin_token(), "/api/v1/queue/suspensions").await["suspensions"]
            .as_array()
            .unwrap()
            .is_empty()
    );

    // The ops token may act, but not without its session's CSRF token, nor with another's.
    let ops = login(addr, OPS).await;
    let ops_csrf = page(addr, &ops, "/console/queue").await.csrf();
    assert_ne!(ops_csrf, csrf);
    for bad in ["", "0000", csrf.as_str()] {
        let (ask, done) = act(
            addr,
            &ops,
            bad,
            &[("action", "hold"), ("destination", "sink.test")],
        )
        .await;
        assert_eq!(ask.status, 403, "csrf {bad:?}");
        assert!(ask.body.contains("CSRF"), "{}", ask.body);
        assert_eq!(done.status, 403);
    }
    let summary = api(addr, &r.server.admin_token(), "/api/v1/queue/summary").await;
    assert_eq!(summary["totals"]["held"], 0, "{summary}");
}

#[tokio::test]
async fn actions_ask_for_confirmation_then_do_what_the_api_does() {
    let r = queued_relay("").await;
    let addr = r.server.admin();
    let token = r.server.admin_token();
    let s = login(addr, OPS).await;
    let csrf = page(addr, &s, "/console/queue").await.csrf();
    let summary = || async { api(addr, &token, "/api/v1/queue/summary").await };
    let messages = summary().await["totals"]["messages"].as_u64().unwrap();
    assert_eq!(messages, 3, "three deferred messages queued");

    // Flush: the deferred messages (due in an hour) are tried again at once.
    let waiting = r.server.envelopes();
    assert!(
        waiting
            .iter()
            .all(|e| e.attempts == 1 && e.next_due_ms > now_ms() + 1_800_000),
        "{waiting:?}"
    );
    let (ask, done) = act(
        addr,
        &s,
        &csrf,
        &[("action", "flush"), ("destination", "sink.test")],
    )
    .await;
    assert!(
        ask.body.contains("retry every queued message now?"),
        "{}",
        ask.body
    );
    assert!(
        done.body
            .contains("Retrying now 3 of 3 messages of sink.test."),
        "{}",
        done.body
    );
    wait_for("the flushed messages' second attempt", T, || {
        r.server.envelopes().iter().all(|e| e.attempts == 2)
    })
    .await;

    // Hold: the first post only asks.
    let (ask, done) = act(
        addr,
        &s,
        &csrf,
        &[("action", "hold"), ("destination", "sink.test")],
    )
    .await;
    assert_eq!(ask.status, 200);
    assert!(
        ask.body
            .contains("Hold every queued message of destination sink.test?"),
        "{}",
        ask.body
    );
    assert!(ask.body.contains("name=\"confirm\" value=\"yes\""));
    assert_eq!(done.status, 200, "{}", done.body);
    assert!(
        done.body.contains("Held 3 of 3 messages of sink.test."),
        "{}",
        done.body
    );
    assert_eq!(summary().await["totals"]["held"], 3);

    // Release all (no destination).
    let (ask, done) = act(addr, &s, &csrf, &[("action", "release")]).await;
    assert!(ask.body.contains("every destination"), "{}", ask.body);
    assert!(done.body.contains("Released 3 of 3"), "{}", done.body);
    assert_eq!(summary().await["totals"]["held"], 0);

    // Suspend with a (hostile) reason, shown escaped; then resume.
    let (ask, done) = act(
        addr,
        &s,
        &csrf,
        &[
            ("action", "suspend"),
            ("destination", "sink.test"),
            ("reason", HOSTILE_REASON),
        ],
    )
    .await;
    assert!(
        ask.body
            .contains("Suspend delivery to destination sink.test?"),
        "{}",
        ask.body
    );
    // The confirmation asks for the reason and the duration, the given reason filled in.
    assert!(
        ask.body
            .contains("name=\"reason\" value=\"&lt;img src=x onerror=")
            && ask.body.contains("name=\"duration\""),
        "{}",
        ask.body
    );
    assert!(!ask.body.contains("<img src=x"), "{}", ask.body);
    assert!(done.body.contains("suspended"), "{}", done.body);
    let suspensions = api(addr, &token, "/api/v1/queue/suspensions").await;
    assert_eq!(suspensions["suspensions"][0]["destination"], "sink.test");
    assert_eq!(suspensions["suspensions"][0]["reason"], HOSTILE_REASON);
    let queue = page(addr, &s, "/console/queue").await;
    assert!(
        !queue.body.contains("<img src=x"),
        "unescaped reason:\n{}",
        queue.body
    );
    assert!(
        queue.body.contains("&lt;img src=x onerror="),
        "{}",
        queue.body
    );
    let (_, done) = act(
        addr,
        &s,
        &csrf,
        &[("action", "resume"), ("destination", "sink.test")],
    )
    .await;
    assert!(
        done.body.contains("Delivery to sink.test is resumed."),
        "{}",
        done.body
    );
    assert!(
        api(addr, &token, "/api/v1/queue/suspensions").await["suspensions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Suspend all, resume all.
    let (_, done) = act(addr, &s, &csrf, &[("action", "suspend")]).await;
    assert!(
        done.body.contains("every destination is suspended"),
        "{}",
        done.body
    );
    assert!(!api(addr, &token, "/api/v1/queue/summary").await["suspended_all"].is_null());
    let (_, done) = act(addr, &s, &csrf, &[("action", "resume")]).await;
    assert!(done.body.contains("resumed"), "{}", done.body);
    assert!(api(addr, &token, "/api/v1/queue/summary").await["suspended_all"].is_null());

    // Suppressions: add, find, remove; the hostile entry is shown as text.
    let (ask, done) = act(
        addr,
        &s,
        &csrf,
        &[
            ("action", "suppress"),
            ("address", "New@Example.test"),
            ("reason", "manual"),
        ],
    )
    .await;
    assert!(
        ask.body.contains("Suppress New@Example.test?"),
        "{}",
        ask.body
    );
    assert!(
        done.body.contains("new@example.test is suppressed"),
        "{}",
        done.body
    );
    let (status, _) = r
        .server
        .api("GET", "/api/v1/suppressions/new@example.test", None)
        .await;
    assert_eq!(status, 200);
    let found = page(addr, &s, "/console/suppressions?contains=example.test").await;
    assert!(found.body.contains("new@example.test") && found.body.contains("blocked@example.test"));
    assert!(!found.body.contains("evil.test"), "the search filters");
    let all = page(addr, &s, "/console/suppressions").await;
    assert!(
        !all.body.contains("<script>document"),
        "unescaped:\n{}",
        all.body
    );
    assert!(
        all.body.contains("&lt;script&gt;document.title="),
        "{}",
        all.body
    );
    let (_, done) = act(
        addr,
        &s,
        &csrf,
        &[("action", "unsuppress"), ("address", "new@example.test")],
    )
    .await;
    assert!(done.body.contains("no longer suppressed"), "{}", done.body);
    let (status, _) = r
        .server
        .api("GET", "/api/v1/suppressions/new@example.test", None)
        .await;
    assert_eq!(status, 404);
    // A refused API call shows the API's reason.
    let (_, done) = act(
        addr,
        &s,
        &csrf,
        &[("action", "suppress"), ("address", "not-an-address")],
    )
    .await;
    assert_eq!(done.status, 400);
    assert!(done.body.contains("is not an address"), "{}", done.body);
}

#[tokio::test]
async fn suppression_pages_follow_the_api_cursor() {
    let r = relay(SinkBehaviour::default(), options).await;
    let addr = r.server.admin();
    let csv: String = (0..7)
        .map(|i| format!("page{i}@list.test,manual\n"))
        .collect();
    let (status, body) = http(
        addr,
        "POST",
        "/api/v1/suppressions/import",
        Some(&r.server.admin_token()),
        Some(&format!("address,reason\n{csv}")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let s = login(addr, READ).await;
    let mut path = "/console/suppressions?contains=list.test&limit=3".to_owned();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let a = page(addr, &s, &path).await;
        for i in 0..7 {
            if a.body.contains(&format!("page{i}@list.test")) {
                seen.push(i);
            }
        }
        let needle = "id=\"next-page\" href=\"";
        match a.body.find(needle) {
            Some(at) => {
                let rest = &a.body[at + needle.len()..];
                path = rest[..rest.find('"').unwrap()].replace("&amp;", "&");
            }
            None => break,
        }
    }
    assert_eq!(
        seen,
        (0..7).collect::<Vec<_>>(),
        "every entry once, in order"
    );
}

#[tokio::test]
async fn logout_and_a_removed_token_end_the_session() {
    let server = TestServer::start(options(Options::default())).await;
    let addr = server.admin();
    let s = login(addr, OPS).await;
    let csrf = page(addr, &s, "/console/").await.csrf();
    // Logout needs the CSRF token too (a cross-site form cannot log the operator out).
    let a = call(
        addr,
        "POST",
        "/console/logout",
        Some(&s),
        &[],
        Some(&[("csrf", "x")]),
    )
    .await;
    assert_eq!(a.status, 403);
    page(addr, &s, "/console/").await;
    let a = call(
        addr,
        "POST",
        "/console/logout",
        Some(&s),
        &[],
        Some(&[("csrf", &csrf)]),
    )
    .await;
    assert_eq!(a.status, 303);
    assert!(a.header("set-cookie").unwrap().contains("Max-Age=0"));
    let a = call(addr, "GET", "/console/", Some(&s), &[], None).await;
    assert_eq!(a.status, 303, "logged out");

    // Reload without the ops token: its session ends; the viewer's stays.
    let ops = login(addr, OPS).await;
    let viewer = login(addr, READ).await;
    let reduced = Options::default()
        .extra(token_entry("viewer", READ, &["read"]))
        .admin("trusted_proxies", "[\"127.0.0.1/32\"]");
    server.reload(&reduced).expect("reload");
    let a = call(addr, "GET", "/console/", Some(&ops), &[], None).await;
    assert_eq!(a.status, 303, "the removed token's session ended");
    page(addr, &viewer, "/console/").await;
    // A rotated secret under the same name ends it as well.
    let mut rotated = reduced.clone();
    rotated.extra = vec![token_entry("viewer", OPS, &["read"])];
    server.reload(&rotated).expect("reload");
    let a = call(addr, "GET", "/console/", Some(&viewer), &[], None).await;
    assert_eq!(a.status, 303, "a rotated secret ends the session");
}

// ---------------------------------------------------------------------------------------------
// Headless Chromium

/// Where the screenshots go: `target/console-screenshots/` (CARGO_TARGET_DIR honoured).
fn screenshot_dir() -> std::path::PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| manifest_dir().join("target"));
    let dir = target.join("console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn chromium() -> std::path::PathBuf {
    for name in ["chromium", "chromium-browser"] {
        for dir in std::env::var("PATH").unwrap_or_default().split(':') {
            let path = std::path::Path::new(dir).join(name);
            if path.is_file() {
                return path;
            }
        }
    }
    panic!("chromium is not installed: the console's browser test needs Debian's `chromium` (scripts/test.sh installs it)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_in_chromium_matches_the_api_without_errors() {
    use headless_chrome::protocol::cdp::types::Event;
    use headless_chrome::protocol::cdp::Log::LogEntryLevel;
    use headless_chrome::protocol::cdp::Page::CaptureScreenshotFormatOption;
    use headless_chrome::protocol::cdp::Runtime::ConsoleAPICalledEventTypeOption;
    use std::sync::{Arc, Mutex};

    let path = chromium();
    // sink.test is a provider's with a rate (cut by the 451s, which read as throttling) and
    // a warm-up cap (its source address started warming up today); one campaign, two variants.
    let today = jiff::Timestamp::now()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let r = queued_relay(&format!(
        r#"
[[shaping.providers]]
name = "testprov"
domains = ["sink.test"]
rate = "120/min"
max_connections = 2

[shaping.warmup]
curve = [50, 100]

[[pools]]
name = "main"
[[pools.addresses]]
address = "127.0.0.1"
warmup_start = "{today}"

[sidecar.bandit]
exploration = 0.5
holdout = 0.0
batch_interval = "1s"

[[sidecar.campaigns]]
name = "spring"
subject = "Spring"
text = "Hello"

[[sidecar.campaigns.variants]]
id = "a"

[[sidecar.campaigns.variants]]
id = "b"
subject = "Spring B"
"#
    ))
    .await;
    // Four campaign mails (delivered: sender.test's sink accepts), counted by the bandit at its
    // next batch; the queue keeps only the three deferred ones.
    for i in 0..4 {
        let content = format!(
            "From: shop@sender.test\r\nTo: c{i}@sender.test\r\nSubject: s\r\nX-Tern-Campaign: spring\r\n\r\nbody\r\n"
        );
        send(
            &r.server,
            &format!("<{SENDER}>"),
            &[&format!("<c{i}@sender.test>")],
            content.as_bytes(),
        )
        .await;
    }
    let addr = r.server.admin();
    let token = r.server.admin_token();
    let deadline = Instant::now() + T;
    loop {
        let campaigns = api(addr, &token, "/api/v1/campaigns").await;
        let sends: f64 = campaigns["campaigns"][0]["variants"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["sends"].as_f64().unwrap())
            .sum();
        if sends == 4.0 && r.server.message_count() == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{campaigns}, {} messages",
            r.server.message_count()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let login_token = token.clone();
    let shots = screenshot_dir();
    let runtime = tokio::runtime::Handle::current();
    let browse = tokio::task::spawn_blocking(move || {
        let api = |path: &str| runtime.block_on(api(addr, &token, path));
        let browser = headless_chrome::Browser::new(headless_chrome::LaunchOptions {
            path: Some(path),
            headless: true,
            sandbox: false,
            window_size: Some((1280, 1100)),
            idle_browser_timeout: Duration::from_secs(120),
            ..Default::default()
        })
        .expect("chromium starts");
        let tab = browser.new_tab().unwrap();
        tab.set_default_timeout(Duration::from_secs(20));
        let errors: Arc<Mutex<Vec<String>>> = Arc::default();
        let seen = errors.clone();
        tab.add_event_listener(Arc::new(move |event: &Event| {
            let error = match event {
                Event::LogEntryAdded(e) if e.params.entry.level == LogEntryLevel::Error => {
                    Some(format!("log: {}", e.params.entry.text))
                }
                Event::RuntimeConsoleAPICalled(e)
                    if matches!(
                        e.params.Type,
                        ConsoleAPICalledEventTypeOption::Error
                            | ConsoleAPICalledEventTypeOption::Assert
                    ) =>
                {
                    Some(format!("console: {:?}", e.params.args))
                }
                Event::RuntimeExceptionThrown(e) => {
                    Some(format!("exception: {}", e.params.exception_details.text))
                }
                _ => None,
            };
            if let Some(error) = error {
                seen.lock().unwrap().push(error);
            }
        }))
        .unwrap();
        tab.enable_log().unwrap();
        tab.enable_runtime().unwrap();

        let base = format!("http://{addr}");
        let text = |selector: &str| -> String {
            let js = format!(
                "(() => {{ const e = document.querySelector({selector:?}); return e ? e.textContent.trim() : null; }})()"
            );
            let v = tab.evaluate(&js, false).unwrap().value;
            match v {
                Some(Value::String(s)) => s,
                other => panic!("{selector}: {other:?} on {}", tab.get_url()),
            }
        };
        let number = |selector: &str| -> u64 {
            let t = text(selector);
            t.parse()
                .unwrap_or_else(|_| panic!("{selector}: {t:?} is not a number"))
        };
        // By JSON text: arrays come back from the DevTools protocol as references otherwise.
        let eval = |js: &str| -> Value {
            let v = tab
                .evaluate(&format!("JSON.stringify({js})"), false)
                .unwrap()
                .value;
            match v {
                Some(Value::String(s)) => serde_json::from_str(&s).unwrap(),
                other => panic!("{js}: {other:?}"),
            }
        };
        let visit = |path: &str, shot: &str| {
            tab.navigate_to(&format!("{base}{path}")).unwrap();
            tab.wait_until_navigated().unwrap();
            tab.wait_for_element("main").unwrap();
            let png = tab
                .capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
                .unwrap();
            assert!(png.starts_with(b"\x89PNG"), "{shot}");
            std::fs::write(shots.join(format!("{shot}.png")), png).unwrap();
            assert_eq!(
                eval("document.querySelectorAll('script').length"),
                json!(0),
                "{path}"
            );
            assert_ne!(eval("document.title"), json!("pwned"), "{path}");
        };

        // Login through the form.
        visit("/console/", "login");
        assert!(
            tab.get_url().ends_with("/console/login"),
            "{}",
            tab.get_url()
        );
        tab.wait_for_element("input[name=token]")
            .unwrap()
            .click()
            .unwrap();
        tab.type_str(&login_token).unwrap();
        tab.wait_for_element("#login").unwrap().click().unwrap();
        tab.wait_until_navigated().unwrap();
        tab.wait_for_element("#spool-messages").unwrap();

        // Overview.
        visit("/console/", "overview");
        let status = api("/api/v1/status");
        let summary = api("/api/v1/queue/summary");
        let bounces = api("/api/v1/bounces");
        assert_eq!(
            number("#spool-messages"),
            status["spool"]["messages"].as_u64().unwrap()
        );
        assert_eq!(
            number("#spool-bytes"),
            status["spool"]["bytes"].as_u64().unwrap()
        );
        assert_eq!(
            number("#queue-messages"),
            summary["totals"]["messages"].as_u64().unwrap()
        );
        assert_eq!(number("#queue-messages"), 3);
        assert_eq!(
            number("#pending-recipients"),
            summary["totals"]["pending_recipients"].as_u64().unwrap()
        );
        assert_eq!(number("#bounced"), bounces["bounced"].as_u64().unwrap());
        assert!(number("#bounced") >= 1);
        assert_eq!(text("#ready"), "yes");
        assert_eq!(text("#version"), status["version"].as_str().unwrap());

        // Queue.
        visit("/console/queue", "queue");
        assert_eq!(
            number("#total-messages"),
            summary["totals"]["messages"].as_u64().unwrap()
        );
        assert_eq!(
            number("#total-bytes"),
            summary["totals"]["bytes"].as_u64().unwrap()
        );
        let row = &summary["destinations"][0];
        assert_eq!(row["destination"], "sink.test");
        let cell = |class: &str| number(&format!("tr[data-destination='sink.test'] td.{class}"));
        assert_eq!(cell("messages"), row["messages"].as_u64().unwrap());
        assert_eq!(
            cell("recipients"),
            row["pending_recipients"].as_u64().unwrap()
        );
        assert_eq!(cell("bytes"), row["bytes"].as_u64().unwrap());
        let ages = eval(
            "[...document.querySelectorAll(\"tr[data-destination='sink.test'] td.age\")].map(e => Number(e.textContent))",
        );
        assert_eq!(ages, row["age_histogram"], "the age histogram");
        assert_eq!(
            eval("document.querySelectorAll('svg.chart rect.bar').length"),
            json!(10)
        );

        // Rates.
        visit("/console/rates", "rates");
        let rates = api("/api/v1/rates");
        let labels = rates["labels"].as_array().unwrap();
        assert!(!labels.is_empty(), "{rates}");
        for label in labels {
            let name = label["label"].as_str().unwrap();
            for outcome in ["delivered", "deferred", "bounced"] {
                let shown = number(&format!(
                    "section[data-label='{name}'] td[data-outcome='{outcome}']"
                ));
                assert_eq!(
                    shown,
                    label["totals"][outcome].as_u64().unwrap(),
                    "{name} {outcome}"
                );
            }
            let lines = eval(&format!(
                "document.querySelectorAll(\"section[data-label='{name}'] svg polyline\").length"
            ));
            assert_eq!(lines, json!(4), "{name}");
        }

        // Shaping: sink.test's pair has its rate cut and its warm-up day, and says so.
        visit("/console/shaping", "shaping");
        let pairs = api("/api/v1/shaping");
        let pairs = pairs["pairs"].as_array().unwrap();
        let testprov = pairs
            .iter()
            .find(|p| p["bucket"] == "testprov")
            .expect("testprov pair");
        let why = testprov["why"].to_string();
        assert!(
            why.contains("Warm-up day 0") || why.contains("Warm-up day 1"),
            "{why}"
        );
        assert!(why.contains("Rate cut by adaptive shaping"), "{why}");
        assert_eq!(
            eval("document.querySelectorAll('#pairs tr[data-bucket]').length"),
            json!(pairs.len())
        );
        for p in pairs {
            let why = eval(&format!(
                "[...document.querySelectorAll(\"tr[data-bucket='{}'][data-source='{}'] td.why li\")].map(e => e.textContent)",
                p["bucket"].as_str().unwrap(),
                p["source"].as_str().unwrap()
            ));
            assert_eq!(why, p["why"], "why slow");
        }

        // Suppressions: the hostile address is text, nothing ran.
        visit("/console/suppressions", "suppressions");
        let list = api("/api/v1/suppressions");
        assert_eq!(
            number("#page-count"),
            list["entries"].as_array().unwrap().len() as u64
        );
        let shown = eval("[...document.querySelectorAll('td.address')].map(e => e.textContent)");
        let listed: Vec<Value> = list["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["address"].clone())
            .collect();
        assert_eq!(shown, json!(listed));
        assert!(listed.contains(&json!(HOSTILE_ADDRESS)), "{list}");

        // Bounces.
        visit("/console/bounces", "bounces");
        let bounces = api("/api/v1/bounces");
        assert_eq!(number("#bounced"), bounces["bounced"].as_u64().unwrap());
        assert_eq!(
            number("#complaints"),
            bounces["complaints"].as_u64().unwrap()
        );
        assert_eq!(
            eval("document.querySelectorAll('#events tr.event').length"),
            json!(bounces["events"].as_array().unwrap().len())
        );
        assert!(text("#events tr.event td.recipient") == "perm@sink.test");

        // Campaigns: each variant's figures as the API has them.
        visit("/console/campaigns", "campaigns");
        let campaigns = api("/api/v1/campaigns");
        assert_eq!(campaigns["campaigns"][0]["name"], "spring", "{campaigns}");
        let variants = campaigns["campaigns"][0]["variants"].as_array().unwrap();
        assert_eq!(variants.len(), 2, "{campaigns}");
        for v in variants {
            let id = v["id"].as_str().unwrap();
            let cell = |class: &str| -> f64 {
                text(&format!(
                    "section[data-campaign='spring'] table.bandit tr[data-variant='{id}'] td.{class}"
                ))
                .parse()
                .unwrap()
            };
            assert_eq!(cell("sends"), v["sends"].as_f64().unwrap());
            assert_eq!(
                text(&format!(
                    "section[data-campaign='spring'] table.bandit tr[data-variant='{id}'] td.rate"
                )),
                if v["sends"].as_f64().unwrap() > 0.0 {
                    "0.0 %"
                } else {
                    "–"
                },
                "no engagement yet: a rate of 0 once sent"
            );
            assert_eq!(cell("rewards"), v["rewards"].as_f64().unwrap());
        }
        assert_eq!(
            eval("document.querySelectorAll(\"section[data-campaign='spring'] svg rect.bar\").length"),
            json!(2)
        );
        // The results, as the results endpoint has them: every count, and each rate's mean,
        // interval and P(best) (exactly, in data attributes; rounded, as text).
        let results = api("/api/v1/campaigns/spring/results");
        let rows = results["variants"].as_array().unwrap();
        assert_eq!(rows.len(), 2, "{results}");
        assert_eq!(
            eval("document.querySelectorAll(\"section[data-campaign='spring'] table.results tr[data-variant]\").length"),
            json!(rows.len())
        );
        assert!(
            rows.iter()
                .map(|r| r["sends"].as_u64().unwrap())
                .sum::<u64>()
                > 0,
            "{results}"
        );
        for row in rows {
            let id = row["variant"].as_str().unwrap();
            for field in [
                "sends",
                "bounces",
                "human_opens",
                "machine_opens",
                "clicks",
                "unsubscribes",
                "complaints",
                "conversions",
            ] {
                assert_eq!(
                    number(&format!(
                        "section[data-campaign='spring'] table.results tr[data-variant='{id}'] td.{field}"
                    )),
                    row[field].as_u64().unwrap(),
                    "{id}.{field}"
                );
            }
            for (rate, want) in row["rates"].as_object().unwrap() {
                let cell = format!(
                    "section[data-campaign='spring'] table.rates tr[data-variant='{id}'] td.rate-{rate}"
                );
                for part in ["mean", "low", "high", "best"] {
                    let shown = eval(&format!(
                        "document.querySelector(\"{cell}\").dataset.{part}"
                    ));
                    let shown: f64 = shown.as_str().unwrap().parse().unwrap();
                    assert_eq!(shown, want[part].as_f64().unwrap(), "{id}.{rate}.{part}");
                }
                let mean = text(&format!("{cell} .mean"));
                let want_mean = want["mean"].as_f64().unwrap() * 100.0;
                let shown_mean: f64 = mean.trim_end_matches(" %").parse().unwrap();
                assert!(
                    (shown_mean - want_mean).abs() < 0.006,
                    "{mean} vs {want_mean}"
                );
            }
        }
        assert_eq!(
            text("section[data-campaign='spring'] .state"),
            api("/api/v1/campaigns/spring")["state"].as_str().unwrap()
        );

        // Pause and resume through the browser, each confirmed (CSRF-protected forms).
        for (button, state) in [("pause", "paused"), ("resume", "active")] {
            tab.wait_for_element(&format!("section[data-campaign='spring'] button.{button}"))
                .unwrap()
                .click()
                .unwrap();
            tab.wait_until_navigated().unwrap();
            tab.wait_for_element("#confirm").unwrap().click().unwrap();
            tab.wait_until_navigated().unwrap();
            tab.wait_for_element("#message").unwrap();
            assert!(
                text("#message").starts_with("Campaign spring is"),
                "{}",
                text("#message")
            );
            assert_eq!(api("/api/v1/campaigns/spring")["state"], state);
            visit("/console/campaigns", &format!("campaigns-{state}"));
            assert_eq!(text("section[data-campaign='spring'] .state"), state);
        }

        // An action through the browser: hold sink.test, confirm, done.
        visit("/console/queue", "queue-before-hold");
        tab.wait_for_element("tr[data-destination='sink.test'] button.hold")
            .unwrap()
            .click()
            .unwrap();
        tab.wait_until_navigated().unwrap();
        tab.wait_for_element("#confirm").unwrap();
        std::fs::write(
            shots.join("confirm.png"),
            tab.capture_screenshot(CaptureScreenshotFormatOption::Png, None, None, true)
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            api("/api/v1/queue/summary")["totals"]["held"],
            0,
            "not before confirming"
        );
        tab.wait_for_element("#confirm").unwrap().click().unwrap();
        tab.wait_until_navigated().unwrap();
        tab.wait_for_element("#message").unwrap();
        assert_eq!(text("#message"), "Held 3 of 3 messages of sink.test.");
        assert_eq!(api("/api/v1/queue/summary")["totals"]["held"], 3);
        visit("/console/queue", "queue-held");
        assert_eq!(number("#total-held"), 3);

        let errors = errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "console errors: {errors:#?}");
    });
    browse.await.unwrap();
    for shot in [
        "login",
        "overview",
        "queue",
        "rates",
        "shaping",
        "suppressions",
        "bounces",
        "campaigns",
        "confirm",
    ] {
        let meta = std::fs::metadata(screenshot_dir().join(format!("{shot}.png"))).unwrap();
        assert!(meta.len() > 1000, "{shot}.png");
    }
    drop(r);
}

/// The real binary's log: logins (refused ones too), confirmed actions and refused actions
/// are audit lines with the token's name; looking is not logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_logins_and_actions_are_audit_logged_by_token_name() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &options(Options::default()));
    let admin_port = pin_admin_port(&config);
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let c = tern.wait_ready(Duration::from_secs(30)).await;
    let addr: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();

    let refused = call(
        addr,
        "POST",
        "/console/login",
        None,
        &[],
        Some(&[("token", "guess")]),
    )
    .await;
    assert_eq!(refused.status, 401);
    let ops = login(addr, OPS).await;
    let csrf = page(addr, &ops, "/console/queue").await.csrf();
    let (_, done) = act(
        addr,
        &ops,
        &csrf,
        &[("action", "hold"), ("destination", "sink.test")],
    )
    .await;
    assert_eq!(done.status, 200, "{}", done.body);
    let viewer = login(addr, READ).await;
    let csrf = page(addr, &viewer, "/console/queue").await.csrf();
    let (ask, _) = act(addr, &viewer, &csrf, &[("action", "release")]).await;
    assert_eq!(ask.status, 403);

    send_signal(tern.pid(), "TERM");
    assert!(tern.wait_exit(Duration::from_secs(20)).await.success());
    drop(c);
    let log = tern.log_text();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("tern::audit")).collect();
    let has = |parts: &[&str]| audit.iter().any(|l| parts.iter().all(|p| l.contains(p)));
    assert!(
        has(&["console login refused", "token=-", "status=401"]),
        "{audit:#?}"
    );
    assert!(
        has(&["console login", "token=ops", "status=303"]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "console action",
            "token=ops",
            "path=/console/action/hold",
            "api=\"POST /api/v1/queue/hold\"",
            "status=200"
        ]),
        "{audit:#?}"
    );
    assert!(
        has(&[
            "console action refused",
            "token=viewer",
            "path=/console/action/release",
            "status=403"
        ]),
        "{audit:#?}"
    );
    // The pages are reads and the confirmation step changes nothing: no more lines than
    // the two logins refused and made, the ops action, the viewer's login and its two
    // refused posts (the ask and the confirmed one).
    assert_eq!(audit.len(), 6, "{audit:#?}");
}

#[tokio::test]
async fn the_report_routes_need_a_token_and_check_their_parameters() {
    let r = relay(SinkBehaviour::default(), options).await;
    let addr = r.server.admin();
    for path in ["/api/v1/rates", "/api/v1/bounces", "/api/v1/campaigns"] {
        let (status, _) = http(addr, "GET", path, None, None).await;
        assert_eq!(status, 401, "{path}");
        let (status, body) = http(addr, "GET", path, Some(READ), None).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    for (query, field) in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("since=1", "since"),
    ] {
        let (status, body) = http(
            addr,
            "GET",
            &format!("/api/v1/bounces?{query}"),
            Some(READ),
            None,
        )
        .await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body.contains(field), "{query}: {body}");
    }
}
