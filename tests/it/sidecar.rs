//! The sidecar stage end to end: campaigns over SMTP control headers and the inject API, a
//! mock OpenAI-compatible server on loopback (canned, hostile, malformed, failing and slow
//! answers), the guardrails, the deadline, the breaker and the cache, DKIM over the rendered
//! message, and the signed tracking endpoints feeding the bandit.

use crate::dkim::{dkimpy_available, dkimpy_verifies, keygen};
use crate::harness::{http, Options, TestServer};
use crate::sink::{Sink, SinkBehaviour};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the mock model answers.
#[derive(Clone)]
enum Mode {
    /// A chat completion whose content is this text.
    Content(String),
    /// This status and body.
    Status(u16, String),
    /// Sleeps this long, then answers with a valid completion.
    Slow(Duration),
}

struct Mock {
    mode: Mutex<Mode>,
    /// Every request body received.
    received: Mutex<Vec<Value>>,
}

impl Mock {
    async fn start(mode: Mode) -> (Arc<Mock>, SocketAddr) {
        let mock = Arc::new(Mock {
            mode: Mutex::new(mode),
            received: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/v1/chat/completions", post(answer))
            .with_state(mock.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (mock, addr)
    }

    fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn calls(&self) -> usize {
        self.received.lock().unwrap().len()
    }
}

fn completion(content: &str) -> Value {
    json!({"choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]})
}

async fn answer(State(mock): State<Arc<Mock>>, Json(body): Json<Value>) -> Response {
    mock.received.lock().unwrap().push(body);
    let mode = mock.mode.lock().unwrap().clone();
    match mode {
        Mode::Content(text) => Json(completion(&text)).into_response(),
        Mode::Status(code, body) => (StatusCode::from_u16(code).unwrap(), body).into_response(),
        Mode::Slow(delay) => {
            tokio::time::sleep(delay).await;
            Json(completion(r#"{"subject": "late"}"#)).into_response()
        }
    }
}

/// A campaign whose subject and opening are generated, with a whitelisted field.
fn campaign(model: SocketAddr, deadline: &str, extra_model: &str) -> String {
    format!(
        r#"[sidecar.model]
base_url = "http://{model}/v1"
model = "test-model"
deadline = "{deadline}"
breaker_failures = 3
breaker_cooldown = "1h"
{extra_model}

[[sidecar.campaigns]]
name = "winback"
subject = "{{{{ slots.subject }}}}"
text = "Hello {{{{ recipient.first_name }}}},\n{{{{ slots.opening }}}}\nhttps://shop.test/\n"
model_fields = ["first_name"]

[[sidecar.campaigns.slots]]
name = "subject"
prompt = "a subject line"
default = "We miss you"
max_chars = 60

[[sidecar.campaigns.slots]]
name = "opening"
prompt = "an opening sentence"
default = "Default opening."
max_chars = 200
"#
    )
}

fn inject_body(to: &[&str], data: Value) -> Value {
    let recipients: serde_json::Map<String, Value> =
        to.iter().map(|a| (a.to_string(), data.clone())).collect();
    json!({
        "from": "news@example.com",
        "to": to,
        "raw": "From: news@example.com\nTo: you@sink.test\nList-Unsubscribe: <https://u.example.com/u/abc>\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\nSubject: placeholder\n\nplaceholder\n",
        "sidecar": {"campaign": "winback", "recipients": recipients},
    })
}

fn header_section(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.split("\r\n\r\n").next().unwrap().to_owned()
}

/// The unfolded value of header `name` (first occurrence).
fn header(body: &[u8], name: &str) -> Option<String> {
    let message = mail_parser::MessageParser::default().parse(body)?;
    message
        .header_raw(name)
        .map(|v| v.replace("\r\n", "").trim().to_owned())
}

#[tokio::test]
async fn model_fills_slots_within_guardrails_and_sees_only_whitelisted_fields() {
    let hostile = json!({
        "subject": "Come back\r\nBcc: victim@evil.test\r\n\r\n<b>now</b> https://evil.test/x",
        "opening": "Great deals at www.evil.test and <a href=\"https://evil.test\">here</a>\u{0}!",
    })
    .to_string();
    let (mock, model) = Mock::start(Mode::Content(hostile)).await;
    let server = TestServer::start(Options::default().extra(campaign(model, "3s", ""))).await;
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&inject_body(
                &["ann@sink.test"],
                json!({"first_name": "Ann", "secret_score": 97, "phone": "555-0100"}),
            )),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["sidecar"][0]["content"], "model", "{answer}");
    assert_eq!(answer["sidecar"][0]["reason"], "guardrail", "{answer}");

    let envelopes = server.envelopes();
    assert_eq!(envelopes.len(), 1);
    let body = server.body(envelopes[0].id);
    let head = header_section(&body);
    // The injected CR/LF never made a header: one Subject, no Bcc, nothing after it.
    assert!(
        !head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
        "{head}"
    );
    assert_eq!(head.matches("\nSubject:").count(), 1, "{head}");
    let subject = header(&body, "Subject").unwrap();
    assert!(subject.starts_with("Come back"), "{subject}");
    for banned in ["evil", "<", "http", "victim"] {
        assert!(!subject.contains(banned), "{banned} in {subject:?}");
    }
    let message = mail_parser::MessageParser::default().parse(&body).unwrap();
    let text = message.body_text(0).unwrap();
    assert!(text.contains("Hello Ann,"), "{text}");
    assert!(!text.contains("evil") && !text.contains('<'), "{text}");
    assert!(text.contains("Great deals at"), "{text}");
    // Only the template's link remains.
    assert!(text.contains("https://shop.test/"), "{text}");
    // The unsubscribe headers are byte-identical.
    assert!(
        head.contains("\r\nList-Unsubscribe: <https://u.example.com/u/abc>\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
        "{head}"
    );

    // What the model saw: the whitelisted field, never the address or other data.
    let received = mock.received.lock().unwrap().clone();
    assert_eq!(received.len(), 1);
    let request = received[0].to_string();
    assert!(request.contains("Ann"), "{request}");
    for leaked in ["ann@sink.test", "secret_score", "97", "555-0100"] {
        assert!(
            !request.contains(leaked),
            "{leaked} sent to the model: {request}"
        );
    }
    assert_eq!(received[0]["model"], "test-model");
    server.stop().await;
}

#[tokio::test]
async fn failures_render_the_defaults_and_say_why_and_the_breaker_opens() {
    let (mock, model) = Mock::start(Mode::Content("this is not json".into())).await;
    // No retries: each failure is one call (retries are tests/it/sidecar_scale.rs's).
    let server =
        TestServer::start(Options::default().extra(campaign(model, "3s", "retries = 0"))).await;
    let inject = |to: &'static str, name: &'static str| {
        let server = &server;
        async move {
            let (status, answer) = server
                .api(
                    "POST",
                    "/api/v1/inject",
                    Some(&inject_body(&[to], json!({"first_name": name}))),
                )
                .await;
            assert_eq!(status, 200, "{answer}");
            answer["sidecar"][0].clone()
        }
    };
    let report = inject("a@sink.test", "A").await;
    assert_eq!(
        (report["content"].as_str(), report["reason"].as_str()),
        (Some("default"), Some("malformed"))
    );
    mock.set(Mode::Status(500, "{\"error\": \"boom\"}".into()));
    let report = inject("b@sink.test", "B").await;
    assert_eq!(report["reason"], "status");
    mock.set(Mode::Content(completion("{}").to_string()));
    let report = inject("c@sink.test", "C").await;
    assert_eq!(report["reason"], "malformed");
    // Three failures in a row: the breaker is open and the model is not called any more.
    let calls = mock.calls();
    assert_eq!(calls, 3);
    mock.set(Mode::Content(json!({"subject": "fine"}).to_string()));
    let report = inject("d@sink.test", "D").await;
    assert_eq!(report["reason"], "breaker_open");
    assert_eq!(mock.calls(), calls, "an open breaker makes no call");

    // Every message went out with the defaults.
    for env in server.envelopes() {
        let body = server.body(env.id);
        assert_eq!(header(&body, "Subject").as_deref(), Some("We miss you"));
        let message = mail_parser::MessageParser::default().parse(&body).unwrap();
        assert!(message.body_text(0).unwrap().contains("Default opening."));
    }
    let (_, metrics) = http(server.admin(), "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("tern_sidecar_content_total{result=\"breaker_open\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_slow_model_never_holds_enqueue_past_the_deadline() {
    let (mock, model) = Mock::start(Mode::Slow(Duration::from_secs(10))).await;
    let server = TestServer::start(Options::default().extra(campaign(model, "500ms", ""))).await;
    let started = Instant::now();
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&inject_body(
                &["a@sink.test", "b@sink.test", "c@sink.test"],
                json!({"first_name": "Al"}),
            )),
        )
        .await;
    let took = started.elapsed();
    assert_eq!(status, 200, "{answer}");
    assert!(took < Duration::from_millis(1500), "inject took {took:?}");
    for r in answer["sidecar"].as_array().unwrap() {
        assert_eq!(r["reason"], "timeout", "{answer}");
    }
    assert_eq!(server.envelopes().len(), 3);
    assert!(mock.calls() >= 1);
    server.stop().await;
}

#[tokio::test]
async fn identical_inputs_hit_the_cache() {
    let (mock, model) = Mock::start(Mode::Content(
        json!({"subject": "Hi Bo", "opening": "Welcome back."}).to_string(),
    ))
    .await;
    let server = TestServer::start(Options::default().extra(campaign(model, "3s", ""))).await;
    let mut contents = Vec::new();
    for to in ["x@sink.test", "y@sink.test", "z@sink.test"] {
        let (status, answer) = server
            .api(
                "POST",
                "/api/v1/inject",
                Some(&inject_body(&[to], json!({"first_name": "Bo"}))),
            )
            .await;
        assert_eq!(status, 200, "{answer}");
        contents.push(answer["sidecar"][0]["content"].as_str().unwrap().to_owned());
    }
    assert_eq!(contents, ["model", "cache", "cache"]);
    assert_eq!(mock.calls(), 1);
    // Different whitelisted input: a new call.
    let (_, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&inject_body(&["w@sink.test"], json!({"first_name": "Cy"}))),
        )
        .await;
    assert_eq!(answer["sidecar"][0]["content"], "model");
    assert_eq!(mock.calls(), 2);
    server.stop().await;
}

#[tokio::test]
async fn unknown_campaigns_and_bad_send_times_are_refused_by_the_api() {
    let server = TestServer::start(Options::default()).await;
    let mut body = inject_body(&["a@sink.test"], json!({}));
    let (status, answer) = server.api("POST", "/api/v1/inject", Some(&body)).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("sidecar.campaign: unknown campaign"),
        "{answer}"
    );
    body["sidecar"] = json!({"send_time": "tomorrow"});
    let (status, answer) = server.api("POST", "/api/v1/inject", Some(&body)).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .starts_with("sidecar.send_time:"),
        "{answer}"
    );
    server.assert_spool_empty();
    server.stop().await;
}

const SMTP_CAMPAIGN: &str = r#"[[sidecar.campaigns]]
name = "hello"
subject = "Hi {{ recipient.first_name }} from {{ campaign }}"
text = "Dear {{ recipient.first_name }},\nyour code is {{ data.code }}.\n"
"#;

#[tokio::test]
async fn control_headers_are_stripped_before_dkim_and_the_signature_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let (key, zone_line) = keygen(dir.path(), "sc", &["--algorithm", "ed25519"]);
    let sink = Sink::start(SinkBehaviour::default()).await;
    let opts = Options::default()
        .deliver()
        .route("sink.test", sink.addr)
        .dkim(format!(
            "domain = \"example.com\"\nselector = \"sc\"\nkey = {:?}",
            key.display().to_string()
        ))
        .extra(SMTP_CAMPAIGN);
    let server = TestServer::start(opts).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let message = concat!(
        "From: news@example.com\r\n",
        "To: ann@sink.test\r\n",
        "Subject: will be replaced\r\n",
        "X-Tern-Campaign: hello\r\n",
        "X-Tern-Send-Time: optimize; window=12h\r\n",
        "X-Tern-Data: {\"first_name\": \"Ann\",\r\n",
        "  \"code\": \"K7\"}\r\n",
        "x-tern-unknown: also removed\r\n",
        "List-Unsubscribe: <https://u.example.com/u/1>\r\n",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
        "\r\n",
        "ignored body\r\n",
    );
    c.submit("news@example.com", &["ann@sink.test"], message.as_bytes())
        .await;
    let got = sink.wait_for_messages(1, Duration::from_secs(20)).await;
    let data = &got[0].data;
    let text = String::from_utf8_lossy(crate::harness::without_origin(data));
    // No control header leaves tern; the signed X-Tern-Id tern puts first is not one.
    assert!(!text.to_ascii_lowercase().contains("x-tern-"), "{text}");
    assert_eq!(
        header(data, "Subject").as_deref(),
        Some("Hi Ann from hello")
    );
    assert!(text.contains("your code is K7."), "{text}");
    assert!(
        text.contains("\r\nList-Unsubscribe: <https://u.example.com/u/1>\r\n"),
        "{text}"
    );
    let signature = header(data, "DKIM-Signature").expect("signed");
    assert!(signature.contains("list-unsubscribe"), "{signature}");
    if dkimpy_available() {
        assert!(dkimpy_verifies(dir.path(), &zone_line, data), "{text}");
    }
    server.stop().await;
}

/// The tracking campaign: an HTML part with one link, two variants.
pub(crate) fn tracking_config(dir: &std::path::Path) -> String {
    format!(
        r#"[sidecar.tracking]
base_url = "http://t.example.com"
secret_file = {:?}

[sidecar.bandit]
exploration = 0.0
holdout = 0.0

[[sidecar.campaigns]]
name = "promo"
subject = "Promo"
text = "See https://shop.test/sale\n"
html = "<html><body><a href=\"https://shop.test/sale?x=1&y=2\">Sale</a></body></html>"
tracking = true

[[sidecar.campaigns.variants]]
id = "a"

[[sidecar.campaigns.variants]]
id = "b"
subject = "Promo B"
"#,
        dir.join("tracking.key").display().to_string()
    )
}

/// GET with a User-Agent; returns the status and the raw response head.
pub(crate) async fn get(addr: SocketAddr, path: &str, user_agent: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: t\r\nUser-Agent: {user_agent}\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text[9..12].parse().unwrap();
    (status, text)
}

/// ann@sink.test's engagement summary once `ready` holds (within five seconds).
async fn recipient_when(server: &TestServer, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, body) = server
            .api("GET", "/api/v1/recipients/ann@sink.test", None)
            .await;
        if status == 200 && ready(&body) {
            return body;
        }
        last = body;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("the profile never got there: {last}");
}

#[tokio::test]
async fn tracking_links_are_signed_and_feed_the_bandit_and_the_profile() {
    let keys = tempfile::tempdir().unwrap();
    let server = TestServer::start(Options::default().extra(tracking_config(keys.path()))).await;
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": ["ann@sink.test"],
                "raw": "From: news@example.com\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "promo"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let variant = answer["sidecar"][0]["variant"].as_str().unwrap().to_owned();
    assert!(variant == "a" || variant == "b", "{answer}");
    let body = server.body(server.envelopes()[0].id);
    // Attribution: campaign and chosen variant are in Feedback-ID (Gmail's a:b:c:SenderId).
    assert_eq!(
        header(&body, "Feedback-ID"),
        Some(format!("promo:{variant}:example.com:tern-mta"))
    );
    let message = mail_parser::MessageParser::default().parse(&body).unwrap();
    let html = message.body_html(0).unwrap().into_owned();
    assert!(!html.contains("shop.test"), "link not rewritten: {html}");
    let token = |kind: &str| {
        let marker = format!("http://t.example.com/t/{kind}/");
        html.split(&marker)
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("no {kind} link in {html}"))
            .to_owned()
    };
    let (click, open) = (token("c"), token("o"));

    // Forged or altered tokens: 404 with a JSON error, nothing recorded.
    let mut altered = click.clone();
    altered.insert(3, 'x');
    for bad in [altered.as_str(), "abc.def", open.as_str()] {
        let (status, text) = get(server.admin(), &format!("/t/c/{bad}"), "Firefox").await;
        assert_eq!(status, 404, "{bad}: {text}");
        assert!(text.contains("{\"error\":"), "{text}");
    }
    assert!(server.daemon().sidecar().recent_engagement().is_empty());

    // The redirect goes to the template's link.
    let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15";
    let (status, text) = get(server.admin(), &format!("/t/c/{click}"), iphone).await;
    assert_eq!(status, 302, "{text}");
    assert!(
        text.contains("\r\nlocation: https://shop.test/sale?x=1&y=2\r\n"),
        "{text}"
    );
    // The click reached the engagement store the events API feeds (recorded in the
    // background: polled).
    let profile = recipient_when(&server, |p| p["engagements"].as_f64() >= Some(1.0)).await;
    assert!(profile["score"].as_f64().unwrap() > 0.0, "{profile}");
    assert_eq!(profile["machine_opens"], 0);
    // An Apple MPP prefetch: counted, not learnt.
    let (status, text) = get(server.admin(), &format!("/t/o/{open}"), "Mozilla/5.0").await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("content-type: image/gif"), "{text}");
    let after = recipient_when(&server, |p| p["machine_opens"] == 1).await;
    for field in ["engagements", "score", "last_engaged_ms"] {
        assert_eq!(after[field], profile[field], "{field}: {after}");
    }
    // A human open is learnt.
    get(server.admin(), &format!("/t/o/{open}"), iphone).await;
    // (Counts decay from the first event's time: two events a second apart sum to a hair
    // under 2.)
    recipient_when(&server, |p| p["engagements"].as_f64() > Some(1.9)).await;

    let events = server.daemon().sidecar().recent_engagement();
    let seen: Vec<(&str, bool)> = events
        .iter()
        .map(|e| {
            let kind = match e.kind {
                tern::sidecar::EngagementKind::Open => "open",
                tern::sidecar::EngagementKind::Click => "click",
            };
            (kind, e.machine)
        })
        .collect();
    assert_eq!(seen, [("click", false), ("open", true), ("open", false)]);
    assert!(events.iter().all(|e| e.campaign == "promo"
        && e.recipient == "ann@sink.test"
        && e.variant.as_deref() == Some(variant.as_str())));

    // The batch: one reward (the message counts once, machine opens never), and no send:
    // sends count when delivered (delivery is suspended here; tests/it/campaigns.rs
    // delivers).
    let sidecar = server.daemon().sidecar().clone();
    sidecar.apply_bandit_batch().await;
    let arms = sidecar.bandit_arms("promo");
    assert_eq!(
        (arms[&variant].sends, arms[&variant].rewards),
        (0.0, 1.0),
        "{arms:?}"
    );
    // (The stage holds the spool open.)
    drop(sidecar);
    // The posteriors survive a restart (stored in the spool's meta keyspace).
    let server = server
        .restart(Options::default().extra(tracking_config(keys.path())))
        .await;
    let arms = server.daemon().sidecar().bandit_arms("promo");
    assert_eq!(arms[&variant].rewards, 1.0, "{arms:?}");
    server.stop().await;
}

#[tokio::test]
async fn bad_control_headers_never_lose_the_message() {
    let server = TestServer::start(Options::default().extra(SMTP_CAMPAIGN)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    // An unknown campaign: sent as submitted, control headers removed.
    let unknown = b"From: a@example.com\r\nSubject: keep me\r\nX-Tern-Campaign: nope\r\nX-Tern-Send-Time: someday\r\n\r\nbody\r\n";
    let first = c.submit("a@example.com", &["x@sink.test"], unknown).await;
    // A known campaign with data that is not JSON: rendered without it.
    let bad_data = b"From: a@example.com\r\nSubject: s\r\nX-Tern-Campaign: hello\r\nX-Tern-Data: {not json\r\n\r\nbody\r\n";
    let second = c.submit("a@example.com", &["y@sink.test"], bad_data).await;
    let body = server.body(first);
    let text = String::from_utf8_lossy(&body);
    assert!(!text.to_ascii_lowercase().contains("x-tern-"), "{text}");
    assert_eq!(header(&body, "Subject").as_deref(), Some("keep me"));
    assert!(text.ends_with("\r\n\r\nbody\r\n"), "{text}");
    let body = server.body(second);
    assert_eq!(header(&body, "Subject").as_deref(), Some("Hi from hello"));
    let (_, metrics) = http(server.admin(), "GET", "/metrics", None, None).await;
    assert!(
        metrics.contains("tern_sidecar_content_total{result=\"unknown_campaign\"} 1"),
        "{metrics}"
    );
    server.stop().await;
}
