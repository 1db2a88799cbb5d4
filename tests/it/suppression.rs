//! Issue 6, second half, end to end: VERP senders, inbound bounces over SMTP from an
//! unauthorised client, the suppression list (API, CLI, reject and drop modes), ARF
//! complaints, forged VERP tokens, and signed webhook events that survive a restart while
//! the receiver is down.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_lc_rs::hmac;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};

use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};

const T: Duration = Duration::from_secs(20);
pub const SECRET: &str = "webhook-secret-for-tests";
const BOUNCE_DOMAIN: &str = "bounce.test";

pub type Posts = Arc<Mutex<Vec<Value>>>;

/// A webhook receiver on `addr` (port 0: any): keeps the events of every post whose
/// signature verifies; a post with a bad signature fails the test.
pub async fn receiver(addr: SocketAddr) -> (SocketAddr, Posts, tokio::task::JoinHandle<()>) {
    let (app, posts) = hook_app();
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, posts, task)
}

/// The receiver's app: `POST /hook` checks the signature and keeps the events.
fn hook_app() -> (axum::Router, Posts) {
    let posts: Posts = Arc::default();
    let kept = posts.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let kept = kept.clone();
            async move {
                let sig = headers["x-tern-signature"].to_str().unwrap().to_owned();
                let (t, v1) = sig.split_once(",v1=").unwrap();
                let t = t.strip_prefix("t=").unwrap();
                let key = hmac::Key::new(hmac::HMAC_SHA256, SECRET.as_bytes());
                let mut signed = format!("{t}.").into_bytes();
                signed.extend_from_slice(&body);
                let want: String = hmac::sign(&key, &signed)
                    .as_ref()
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect();
                assert_eq!(v1, want, "bad webhook signature");
                let events: Vec<Value> = serde_json::from_slice(&body).unwrap();
                kept.lock().unwrap().extend(events);
                StatusCode::NO_CONTENT
            }
        }),
    );
    (app, posts)
}

/// The same receiver behind TLS on 127.0.0.1, with the harness's "localhost" certificate
/// (signed by the harness test CA).
async fn tls_receiver() -> (SocketAddr, Posts, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let cert = test_cert();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(cert.leaf_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let listener = TlsListener {
        tcp: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
    };
    let addr = listener.tcp.local_addr().unwrap();
    let (app, posts) = hook_app();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, posts, task)
}

pub(crate) struct TlsListener {
    pub(crate) tcp: TcpListener,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else {
                continue;
            };
            // A client that rejects our certificate fails its handshake: wait for the next.
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}

pub(crate) async fn wait_events(
    posts: &Posts,
    what: &str,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let events = posts.lock().unwrap().clone();
        if done(&events) {
            return events;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {T:?}: {events:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn has(events: &[Value], event: &str, recipient: &str) -> bool {
    events
        .iter()
        .any(|e| e["event"] == event && e["recipient"] == recipient)
}

/// Key files in `dir` and the options: relay only from 127.0.0.1 (so 127.0.0.2 is an
/// unauthorised client), VERP on, the webhook at `hook`.
fn options(dir: &Path, sink: SocketAddr, hook: SocketAddr, mode: &str) -> Options {
    let verp_key = dir.join("verp.key");
    let secret = dir.join("hook.secret");
    write_secret(&verp_key, "verp-key-of-enough-bytes\n");
    write_secret(&secret, format!("{SECRET}\n"));
    Options::default()
        .deliver()
        .relay(&["127.0.0.1/32"])
        .route("sink.test", sink)
        .extra(format!(
            "[bounce]\ndomains = [\"{BOUNCE_DOMAIN}\"]\nverp = true\nverp_key_file = {:?}\n\n\
             [suppression]\nmode = \"{mode}\"\n\n\
             [[webhooks]]\nurl = \"http://{hook}/hook\"\nsecret_file = {:?}\nbatch_size = 10\ninterval = \"50ms\"\n",
            path(&verp_key),
            path(&secret),
        ))
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// An SMTP client connected from 127.0.0.2: outside the relay network.
async fn outsider(server: &TestServer) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(server.smtp).await.unwrap();
    let mut c = Client::new(Box::new(stream));
    c.expect_greeting().await;
    c.ehlo().await;
    c
}

/// A DSN saying `failed` is unknown, returning no headers (with VERP, the address it was
/// sent to says whom it is about).
fn dsn(to: &str, failed: &str) -> Vec<u8> {
    crate::edge::dsn_returning(to, failed, b"")
}

async fn inject(server: &TestServer, to: &[&str]) -> (u16, Value) {
    server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "app@sender.test",
                "to": to,
                "message": {"from": "app@sender.test", "subject": "hello", "text": "hi"},
            })),
        )
        .await
}

async fn wait_suppressed(server: &TestServer, address: &str) -> Value {
    let deadline = Instant::now() + T;
    loop {
        let (status, body) = server
            .api("GET", &format!("/api/v1/suppressions/{address}"), None)
            .await;
        if status == 200 {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{address} not suppressed within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the bounce processor has taken every inbound record.
async fn wait_inbound_processed(server: &TestServer) {
    let deadline = Instant::now() + T;
    while !server
        .spool()
        .inbound_batch(1, 0)
        .unwrap()
        .records
        .is_empty()
    {
        assert!(Instant::now() < deadline, "inbound mail not processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verp_bounce_suppresses_then_reject_mode_refuses() {
    let keys = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _receiver) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let server = TestServer::start(options(keys.path(), sink.addr, hook, "reject")).await;

    // Out with a VERP sender naming the recipient.
    let (status, answer) = inject(&server, &["User@sink.test"]).await;
    assert_eq!(status, 200, "{answer}");
    let sent = sink.wait_for_messages(1, T).await;
    let verp = sent[0].mail_from.clone();
    assert!(
        verp.starts_with("bounces+") && verp.ends_with("+user=sink.test@bounce.test"),
        "{verp}"
    );

    // The bounce comes back from a client that may not relay: the bounce domain takes it.
    let mut c = outsider(&server).await;
    c.expect("MAIL FROM:<>", 250, "2.1.0").await;
    c.expect("RCPT TO:<someone@elsewhere.test>", 554, "5.7.1")
        .await;
    c.expect(&format!("RCPT TO:<{verp}>"), 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    // The body names another address: the verified VERP token decides whom it is about.
    c.send(dot_stuff(&dsn(&verp, "unrelated@sink.test"))).await;
    c.reply().await.assert(250, "2.0.0");

    let entry = wait_suppressed(&server, "user@sink.test").await;
    assert_eq!(entry["reason"], "invalid_recipient", "{entry}");
    assert_eq!(entry["expires_ms"], Value::Null);
    assert_eq!(entry["source"].as_str().unwrap().len(), 16, "{entry}");
    wait_inbound_processed(&server).await;
    assert_eq!(
        server.spool().suppression("unrelated@sink.test").unwrap(),
        None
    );
    // Nothing was delivered or bounced because of the bounce (no backscatter).
    assert_eq!(sink.messages().len(), 1);
    assert_eq!(server.message_count(), 0);

    // Reject mode: 550 5.7.1 at RCPT, other recipients unaffected; 422 over HTTP.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<app@sender.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<USER@sink.test>", 550, "5.7.1").await;
    c.expect("RCPT TO:<fine@sink.test>", 250, "2.1.5").await;
    let (status, answer) = inject(&server, &["fine@sink.test", "user@sink.test"]).await;
    assert_eq!(status, 422, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("user@sink.test"),
        "{answer}"
    );

    let events = wait_events(&posts, "delivered, bounced and suppressed events", |e| {
        has(e, "delivered", "User@sink.test")
            && has(e, "bounced", "user@sink.test")
            && e.iter()
                .filter(|e| e["event"] == "suppressed" && e["recipient"] == "user@sink.test")
                .count()
                >= 2
    })
    .await;
    let bounced = events.iter().find(|e| e["event"] == "bounced").unwrap();
    assert_eq!(bounced["category"], "invalid_recipient");
    assert_eq!(bounced["hard"], true);
    assert_eq!(bounced["source"], "bounce");
    assert_eq!(bounced["status"], "5.1.1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_tokens_non_bounces_and_complaints() {
    let keys = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _receiver) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let server = TestServer::start(options(keys.path(), sink.addr, hook, "reject")).await;

    // A token in the right shape that we never signed.
    let forged = "bounces+aaaaaaaaaaaaaaaaaaaaaaaaaaaaa+victim=sink.test@bounce.test";
    let mut c = outsider(&server).await;
    c.submit("", &[forged], &dsn(forged, "victim@sink.test"))
        .await;
    // Not a bounce at all, to the plain bounce address.
    c.submit(
        "someone@elsewhere.test",
        &["bounces@bounce.test"],
        b"From: someone@elsewhere.test\r\nSubject: hello\r\n\r\nUser unknown? No, just saying hi.\r\n",
    )
    .await;
    // An ARF complaint (Yahoo's form, from the corpus) about mail we never sent: it names
    // an address, but nothing ties it to us, so it changes nothing.
    let arf = std::fs::read("tests/bounces/arf-yahoo-to-from-original.eml").unwrap();
    let arf = String::from_utf8(arf)
        .unwrap()
        .replace("\r\n", "\n")
        .replace('\n', "\r\n");
    c.submit("", &["bounces@bounce.test"], arf.as_bytes()).await;
    wait_inbound_processed(&server).await;
    assert_eq!(
        server.spool().suppression("reader.one@yahoo.com").unwrap(),
        None
    );
    assert_eq!(
        server.spool().suppression("victim@sink.test").unwrap(),
        None
    );
    let (_, list) = server.api("GET", "/api/v1/suppressions", None).await;
    assert_eq!(list["entries"].as_array().unwrap().len(), 0, "{list}");

    // A complaint that returns a message we sent (its X-Tern-Id binds the recipient) counts.
    let (status, answer) = inject(&server, &["reader@sink.test"]).await;
    assert_eq!(status, 200, "{answer}");
    let delivered = sink.wait_for_messages(1, T).await.remove(0);
    c.submit(
        "",
        &["bounces@bounce.test"],
        &crate::edge::arf_about(&delivered.data, "reader@sink.test"),
    )
    .await;
    let entry = wait_suppressed(&server, "reader@sink.test").await;
    assert_eq!(entry["reason"], "complaint", "{entry}");
    let events = wait_events(&posts, "the complaint event", |e| {
        has(e, "complaint", "reader@sink.test")
    })
    .await;
    assert!(
        !events
            .iter()
            .any(|e| e["recipient"] == "victim@sink.test"
                || e["recipient"] == "reader.one@yahoo.com"),
        "{events:#?}"
    );
    assert_eq!(
        sink.messages().len(),
        1,
        "only the message complained about"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drop_mode_events_survive_a_restart_while_the_receiver_is_down() {
    let keys = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    // A port nobody listens on, for now.
    let hook = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let opts = || options(keys.path(), sink.addr, hook, "drop");
    let server = TestServer::start(opts()).await;
    let (status, _) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": "Gone@sink.test"})),
        )
        .await;
    assert_eq!(status, 200);

    let (status, answer) = inject(&server, &["gone@sink.test", "ok@sink.test"]).await;
    assert_eq!(status, 200, "{answer}");
    let got = sink.wait_for_messages(1, T).await;
    assert_eq!(got[0].rcpt_addresses(), ["ok@sink.test"]);
    // Over SMTP too: accepted at RCPT, never delivered.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit(
        "app@sender.test",
        &["gone@sink.test"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;

    // Wait until the events are queued (delivered, and two suppressed), then restart.
    let deadline = Instant::now() + T;
    while server.spool().events("webhook/0", 100).unwrap().len() < 3 {
        assert!(Instant::now() < deadline, "events not queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let server = server.restart(opts()).await;
    let (_, posts, _receiver) = receiver(hook).await;
    let events = wait_events(&posts, "the queued events after the restart", |e| {
        has(e, "delivered", "ok@sink.test")
            && e.iter()
                .filter(|e| e["event"] == "suppressed" && e["recipient"] == "gone@sink.test")
                .count()
                == 2
    })
    .await;
    let sources: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "suppressed")
        .map(|e| e["source"].as_str().unwrap())
        .collect();
    assert!(
        sources.contains(&"http") && sources.contains(&"smtp"),
        "{sources:?}"
    );
    // Posted events leave the outbox.
    let deadline = Instant::now() + T;
    while !server.spool().events("webhook/0", 1).unwrap().is_empty() {
        assert!(Instant::now() < deadline, "outbox not emptied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(sink.messages().len(), 1, "gone@ never delivered");
    server.flush_delivery_log().await;
    let log = std::fs::read_to_string(server.dir.path().join("delivery.log")).unwrap();
    let dropped: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("\"outcome\":\"suppressed\""))
        .collect();
    assert_eq!(dropped.len(), 2, "{log}");
    assert!(
        dropped.iter().all(|l| l.contains("gone@sink.test")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn synchronous_hard_bounce_suppresses() {
    let keys = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default().rcpt_reply(|a| {
        a.starts_with("nobody@")
            .then(|| "550 5.1.1 <nobody@sink.test>: User unknown".to_owned())
    }))
    .await;
    let (hook, posts, _receiver) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let server = TestServer::start(options(keys.path(), sink.addr, hook, "reject")).await;
    let (status, _) = inject(&server, &["nobody@sink.test"]).await;
    assert_eq!(status, 200);
    let entry = wait_suppressed(&server, "nobody@sink.test").await;
    assert_eq!(entry["reason"], "invalid_recipient");
    wait_events(&posts, "the bounced event", |e| {
        has(e, "bounced", "nobody@sink.test")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_add_list_remove_and_csv_round_trip() {
    use crate::cli::{cli_config, tern_ok};
    let server = TestServer::start(Options::default()).await;
    let config = cli_config(&server);
    let cfg = config.to_str().unwrap();

    let out = tern_ok(&[
        "suppression",
        "add",
        "A@x.test",
        "--reason",
        "complaint",
        "--config",
        cfg,
    ])
    .await;
    assert_eq!(out, "suppressed a@x.test\n");
    tern_ok(&[
        "suppression",
        "add",
        "b@x.test",
        "--expires-in",
        "7d",
        "--config",
        cfg,
    ])
    .await;
    let list = tern_ok(&["suppression", "list", "--config", cfg]).await;
    assert!(
        list.contains("a@x.test") && list.contains("complaint"),
        "{list}"
    );
    assert!(
        list.contains("b@x.test") && list.contains("manual"),
        "{list}"
    );
    let page = tern_ok(&[
        "suppression",
        "list",
        "--limit",
        "1",
        "--json",
        "--config",
        cfg,
    ])
    .await;
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(page["next"], "a@x.test");
    let filtered = tern_ok(&[
        "suppression",
        "list",
        "--reason",
        "manual",
        "--json",
        "--config",
        cfg,
    ])
    .await;
    let filtered: Value = serde_json::from_str(&filtered).unwrap();
    assert_eq!(filtered["entries"][0]["address"], "b@x.test");

    // Export, clear, import the export: the same list.
    let csv = tern_ok(&["suppression", "export", "--config", cfg]).await;
    assert!(
        csv.starts_with("address,reason,created_ms,expires_ms,source,scope\n"),
        "{csv}"
    );
    assert_eq!(csv.lines().count(), 3, "{csv}");
    tern_ok(&["suppression", "remove", "a@x.test", "--config", cfg]).await;
    tern_ok(&["suppression", "remove", "B@X.test", "--config", cfg]).await;
    let empty = tern_ok(&["suppression", "export", "--config", cfg]).await;
    assert_eq!(empty.lines().count(), 1, "{empty}");
    let file = server.dir.path().join("list.csv");
    std::fs::write(&file, &csv).unwrap();
    let out = tern_ok(&[
        "suppression",
        "import",
        file.to_str().unwrap(),
        "--config",
        cfg,
    ])
    .await;
    assert_eq!(out, "imported 2\n");
    assert_eq!(
        tern_ok(&["suppression", "export", "--config", cfg]).await,
        csv
    );

    // Errors: JSON with the right status, named; the CLI exits non-zero.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": "x", "reason": "bogus"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("address:"),
        "{body}"
    );
    let (status, body) = server
        .api("DELETE", "/api/v1/suppressions/none@x.test", None)
        .await;
    assert_eq!((status, body["error"].as_str().is_some()), (404, true));
    std::fs::write(&file, "ok@x.test\nbad line\n").unwrap();
    let (status, body) = http(
        server.admin(),
        "POST",
        "/api/v1/suppressions/import",
        Some(&server.admin_token()),
        Some("ok@x.test\nbad line\n"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("line 2"), "{body}");
    assert_eq!(
        server.spool().suppression("ok@x.test").unwrap(),
        None,
        "all or nothing"
    );
}

/// An Office 365 NDR saying the message's lifetime ran out (4.4.7, final) is reported as an
/// `expired` event with category `expired`, not as a delay or a plain bounce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_ndr_is_an_expired_event() {
    let keys = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _receiver) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let server = TestServer::start(
        options(keys.path(), sink.addr, hook, "reject").route("contoso-mail.example", sink.addr),
    )
    .await;

    // The two recipients got mail from us; their NDRs return its headers (X-Tern-Id included).
    let mut c = outsider(&server).await;
    for (n, (sample, rcpt)) in [
        (
            "office365-expired-4.4.7",
            "ines.alvarez@contoso-mail.example",
        ),
        ("dsn-no-action-4.4.7", "j.okafor@contoso-mail.example"),
    ]
    .into_iter()
    .enumerate()
    {
        let (status, answer) = inject(&server, &[rcpt]).await;
        assert_eq!(status, 200, "{answer}");
        let delivered = sink.wait_for_messages(n + 1, T).await.remove(n);
        let ndr = std::fs::read_to_string(format!("tests/bounces/{sample}.eml"))
            .unwrap()
            .replace('\n', "\r\n");
        let ndr = crate::edge::returning_id_of(ndr.as_bytes(), &delivered.data);
        c.submit("", &["bounces@bounce.test"], &ndr).await;
    }
    let events = wait_events(&posts, "two expired events", |e| {
        has(e, "expired", "ines.alvarez@contoso-mail.example")
            && has(e, "expired", "j.okafor@contoso-mail.example")
    })
    .await;
    for e in events.iter().filter(|e| e["event"] == "expired") {
        assert_eq!(e["category"], "expired", "{e}");
        assert_eq!(e["status"], "4.4.7", "{e}");
    }
    assert!(
        !events
            .iter()
            .any(|e| e["event"] == "deferred" || e["event"] == "bounced"),
        "{events:#?}"
    );
}

/// The feedback metrics after real traffic: inbound reports by kind and category, list
/// changes by reason and the list size, recipients dropped in drop mode, webhook posts and
/// the outbox backlog draining to zero. The suppression list already holds an entry when the
/// daemon starts (the size gauge counts it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feedback_metrics_count_what_happened() {
    let keys = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _receiver) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let server = TestServer::start(options(keys.path(), sink.addr, hook, "drop")).await;
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": "early@sink.test"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // Restart on the same spool: the size gauge gets what is stored from a background count.
    let server = server
        .restart(options(keys.path(), sink.addr, hook, "drop"))
        .await;
    let admin = server.admin();
    let deadline = Instant::now() + Duration::from_secs(10);
    let m = loop {
        let m = crate::metrics::scrape(admin).await;
        if crate::metrics::value(&m, "tern_suppression_entries") == 1.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "the stored entry is never counted: {m:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        crate::metrics::value(&m, "tern_webhook_backlog{webhook=\"0\"}"),
        0.0
    );

    // Reports tied to mail we sent (their returned copies carry its X-Tern-Id) ...
    let (status, body) = inject(&server, &["gone@sink.test"]).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = inject(&server, &["reader@sink.test"]).await;
    assert_eq!(status, 200, "{body}");
    let delivered = sink.wait_for_messages(2, T).await;
    let copy = |to: &str| {
        delivered
            .iter()
            .find(|m| m.rcpt_addresses() == [to])
            .unwrap()
            .data
            .clone()
    };
    let mut c = outsider(&server).await;
    c.submit(
        "",
        &["bounces@bounce.test"],
        &crate::edge::dsn_returning(
            "bounces@bounce.test",
            "gone@sink.test",
            &copy("gone@sink.test"),
        ),
    )
    .await;
    c.submit(
        "",
        &["bounces@bounce.test"],
        &crate::edge::arf_about(&copy("reader@sink.test"), "reader@sink.test"),
    )
    .await;
    // ... and two that are not: a complaint about mail we never sent, and an auto-reply.
    for sample in ["arf-yahoo-to-from-original", "autoreply-rfc3834"] {
        let raw = std::fs::read_to_string(format!("tests/bounces/{sample}.eml"))
            .unwrap()
            .replace('\n', "\r\n");
        c.submit("", &["bounces@bounce.test"], raw.as_bytes()).await;
    }
    wait_suppressed(&server, "reader@sink.test").await;
    wait_suppressed(&server, "gone@sink.test").await;
    wait_inbound_processed(&server).await;
    let (status, body) = server
        .api("DELETE", "/api/v1/suppressions/early@sink.test", None)
        .await;
    assert_eq!(status, 200, "{body}");
    // Drop mode: accepted, the suppressed recipient dropped.
    let (status, body) = inject(&server, &["gone@sink.test", "fine@sink.test"]).await;
    assert_eq!(status, 200, "{body}");
    wait_events(&posts, "the dropped recipient's event", |e| {
        has(e, "suppressed", "gone@sink.test") && has(e, "delivered", "fine@sink.test")
    })
    .await;

    let deadline = Instant::now() + T;
    let m = loop {
        let m = crate::metrics::scrape(admin).await;
        if crate::metrics::value(&m, "tern_webhook_backlog{webhook=\"0\"}") == 0.0 {
            break m;
        }
        assert!(Instant::now() < deadline, "backlog never drained: {m:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let v = |s: &str| crate::metrics::value(&m, s);
    assert_eq!(
        v("tern_inbound_reports_total{category=\"invalid_recipient\",kind=\"dsn\",trusted=\"true\"}"),
        1.0
    );
    assert_eq!(
        v("tern_inbound_reports_total{category=\"complaint\",kind=\"arf\",trusted=\"true\"}"),
        1.0
    );
    assert_eq!(
        v("tern_inbound_reports_total{category=\"complaint\",kind=\"arf\",trusted=\"false\"}"),
        1.0
    );
    assert_eq!(
        v("tern_inbound_reports_total{category=\"auto_reply\",kind=\"autoreply\",trusted=\"false\"}"),
        1.0
    );
    assert_eq!(
        v("tern_suppression_changes_total{change=\"add\",reason=\"invalid_recipient\"}"),
        1.0
    );
    assert_eq!(
        v("tern_suppression_changes_total{change=\"add\",reason=\"complaint\"}"),
        1.0
    );
    assert_eq!(
        v("tern_suppression_changes_total{change=\"remove\",reason=\"manual\"}"),
        1.0
    );
    // early@ removed; gone@ and the complainer added.
    assert_eq!(v("tern_suppression_entries"), 2.0);
    assert_eq!(v("tern_suppressed_recipients_total{action=\"drop\"}"), 1.0);
    assert_eq!(
        v("tern_suppressed_recipients_total{action=\"reject\"}"),
        0.0
    );
    assert!(v("tern_webhook_posts_total{result=\"ok\",webhook=\"0\"}") >= 1.0);
    assert_eq!(
        v("tern_webhook_posts_total{result=\"error\",webhook=\"0\"}"),
        0.0
    );
}

/// The CSV export of a list larger than one read page is streamed (chunked, no
/// Content-Length) and complete: the header, then every entry once, in address order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_export_streams_every_page() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start(Options::default()).await;
    const N: usize = 21_000; // three pages of 10 000
    let mut csv = String::from("address,reason,created_ms,expires_ms,source\n");
    for i in 0..N {
        csv.push_str(&format!("u{i:05}@bulk.test,manual,1700000000000,,\n"));
    }
    let (status, body) = http(
        server.admin(),
        "POST",
        "/api/v1/suppressions/import",
        Some(&server.admin_token()),
        Some(&csv),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    let mut stream = tokio::net::TcpStream::connect(server.admin())
        .await
        .unwrap();
    stream
        .write_all(
            format!(
                "GET /api/v1/suppressions/export HTTP/1.1\r\nHost: tern\r\n\
                 Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
                server.admin_token()
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut raw))
        .await
        .expect("export answered in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, _) = raw.split_once("\r\n\r\n").unwrap();
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.contains("content-type: text/csv"), "{head}");

    let (status, exported) = http(
        server.admin(),
        "GET",
        "/api/v1/suppressions/export",
        Some(&server.admin_token()),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let lines: Vec<&str> = exported.lines().collect();
    assert_eq!(
        lines[0],
        "address,reason,created_ms,expires_ms,source,scope"
    );
    assert_eq!(lines.len(), N + 1);
    for (i, line) in lines[1..].iter().enumerate() {
        assert!(
            line.starts_with(&format!("u{i:05}@bulk.test,manual,")),
            "line {i}: {line}"
        );
    }
}

/// `https://` webhooks: with `ca_file` naming the receiver's private CA the events arrive over
/// TLS; without it the certificate does not verify against the public roots, every post fails
/// (counted as `error`) and the events wait in that webhook's outbox.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_webhook_verifies_the_receiver_against_its_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _receiver) = tls_receiver().await;
    let secret = dir.path().join("hook.secret");
    write_secret(&secret, format!("{SECRET}\n"));
    let (_, _, ca) = write_cert_files(dir.path());
    let port = hook.port();
    let server = TestServer::start(
        Options::default()
            .deliver()
            .relay(&["127.0.0.1/32"])
            .route("sink.test", sink.addr)
            .extra(format!(
                "[[webhooks]]\nurl = \"https://localhost:{port}/hook\"\nsecret_file = {:?}\n\
                 ca_file = {:?}\ninterval = \"50ms\"\n\n\
                 [[webhooks]]\nurl = \"https://localhost:{port}/hook\"\nsecret_file = {:?}\n\
                 interval = \"50ms\"\n",
                path(&secret),
                path(&ca),
                path(&secret),
            )),
    )
    .await;
    let (status, body) = inject(&server, &["reader@sink.test"]).await;
    assert_eq!(status, 200, "{body}");
    let events = wait_events(&posts, "the delivered event over TLS", |e| {
        has(e, "delivered", "reader@sink.test")
    })
    .await;
    assert_eq!(
        events.iter().filter(|e| e["event"] == "delivered").count(),
        1,
        "only the webhook that trusts the CA posts: {events:#?}"
    );
    let deadline = Instant::now() + T;
    loop {
        let m = crate::metrics::scrape(server.admin()).await;
        let v = |s: &str| crate::metrics::value(&m, s);
        if v("tern_webhook_posts_total{result=\"error\",webhook=\"1\"}") >= 1.0 {
            assert!(v("tern_webhook_posts_total{result=\"ok\",webhook=\"0\"}") >= 1.0);
            assert_eq!(
                v("tern_webhook_posts_total{result=\"ok\",webhook=\"1\"}"),
                0.0
            );
            assert!(v("tern_webhook_backlog{webhook=\"1\"}") >= 1.0);
            break;
        }
        assert!(Instant::now() < deadline, "no failed post for webhooks[1]");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
