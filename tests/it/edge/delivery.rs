//! The delivery side of the edge: whoever controls a recipient's domain chooses where tern
//! connects (MX, A/AAAA, address literals), and a smarthost's credentials are worth stealing.
//! Sinks listen on 127.0.31.x (port 25 for MX delivery), unique to these tests.

use std::net::SocketAddr;

use tern::config::Config;
use tern::daemon::Daemon;

use super::*;
use crate::delivery::{log_lines, wait_log, SENDER};
use crate::dns_server::{DnsServer, Zone};
use crate::sink::{Sink, SinkBehaviour};

/// A sink on `ip`:25, where MX delivery connects.
async fn mx_sink(ip: &str) -> Sink {
    let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
    Sink::start_at(addr, SinkBehaviour::default()).await
}

/// The log line of `recipient`'s first attempt, once there is one.
async fn first_line(server: &TestServer, recipient: &str) -> serde_json::Value {
    let lines = wait_log(server.dir.path(), recipient, |l| {
        l["recipient"] == recipient
    })
    .await;
    lines
        .into_iter()
        .find(|l| l["recipient"] == recipient)
        .unwrap()
}

/// A signup with an address whose domain points at the loopback interface: through an MX,
/// through the implicit MX (an A record and no MX) or as an address literal. Without the
/// guard tern connects to whatever listens there (itself, a local service). Now each is a
/// temporary failure naming the address, and nothing listening there is ever contacted; a
/// static route to the same address still delivers, since the operator chose it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_pointing_at_loopback_is_never_connected() {
    let by_mx = mx_sink("127.0.31.1").await;
    let by_a = mx_sink("127.0.31.2").await;
    let by_literal = mx_sink("127.0.31.3").await;
    let dns = DnsServer::start(
        Zone::new()
            .mx("evil.test", 10, "mx.evil.test")
            .a("mx.evil.test", "127.0.31.1")
            .a("implicit.test", "127.0.31.2"),
    )
    .await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sender.test", bounces.addr)
            .route("lab.test", "127.0.31.1:25")
            .delivery("nameservers", format!("[\"{}\"]", dns.addr)),
    )
    .await;
    let rcpts = ["u@evil.test", "u@implicit.test", "u@lab.test"];
    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit(SENDER, &rcpts, &message("loopback-mx")).await;
    // SMTP refuses address literals at RCPT; the inject API takes them.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&serde_json::json!({
                "from": SENDER,
                "to": ["u@[127.0.31.3]"],
                "message": {"from": SENDER, "to": ["u@[127.0.31.3]"], "subject": "hi", "text": "hi"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    for (rcpt, ip) in [
        ("u@evil.test", "127.0.31.1"),
        ("u@implicit.test", "127.0.31.2"),
        ("u@[127.0.31.3]", "127.0.31.3"),
    ] {
        let line = first_line(&server, rcpt).await;
        assert_eq!(line["outcome"], "deferred", "{line}");
        let reply = line["reply"].as_str().unwrap();
        assert!(
            reply.contains(&format!("not delivering to {ip} (a loopback address)")),
            "{line}"
        );
    }
    let lab = first_line(&server, "u@lab.test").await;
    assert_eq!(lab["outcome"], "delivered", "a static route may name it");
    let delivered = by_mx.messages();
    assert_eq!(delivered.len(), 1);
    assert_eq!(delivered[0].rcpt_addresses(), ["u@lab.test"]);
    assert_eq!(by_a.sessions(), 0, "implicit MX on loopback contacted");
    assert_eq!(
        by_literal.sessions(),
        0,
        "address literal on loopback contacted"
    );
    // The delivered message leaves the spool just after its log line: wait for that.
    let deadline = std::time::Instant::now() + T;
    while server.message_count() != 3 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        server.message_count(),
        3,
        "the refused recipients wait for a retry (one envelope per domain)"
    );
}

/// An MX naming tern's own listener makes tern deliver to itself, and (as a relay client of
/// itself) on and on until the hop limit. The own-listener check holds even where local
/// addresses are allowed (`allow_local_mx`, as in a lab).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mx_pointing_at_our_own_listener_is_never_connected() {
    let dir = tempfile::tempdir().unwrap();
    let listener = "127.0.31.9:25";
    let dns = DnsServer::start(
        Zone::new()
            .mx("loop.test", 10, "mx.loop.test")
            .a("mx.loop.test", "127.0.31.9"),
    )
    .await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let opts = Options::default()
        .deliver()
        .route("sender.test", bounces.addr)
        .delivery("nameservers", format!("[\"{}\"]", dns.addr))
        .delivery("allow_local_mx", true);
    let text = opts.config_text(dir.path(), listener, "127.0.0.1:0");
    let daemon = Daemon::start(Config::parse(&text).unwrap())
        .await
        .expect("daemon starts");
    let smtp = daemon.smtp_addresses()[0];
    assert_eq!(smtp.to_string(), listener);

    let mut c = Client::connect(smtp).await;
    c.expect_greeting().await;
    c.ehlo().await;
    c.submit(SENDER, &["u@loop.test"], &message("own-listener"))
        .await;
    c.expect("QUIT", 221, "").await;

    let lines = wait_log(dir.path(), "an attempt", |l| {
        l["recipient"] == "u@loop.test"
    })
    .await;
    let line = &lines[0];
    assert_eq!(line["outcome"], "deferred", "{line}");
    assert!(
        line["reply"]
            .as_str()
            .unwrap()
            .contains("127.0.31.9 (one of tern's own listeners)"),
        "{line}"
    );
    assert_eq!(
        daemon.spool().stats().messages,
        1,
        "tern accepted a copy from itself: {:#?}",
        log_lines(dir.path())
    );
    tokio::time::timeout(T, daemon.shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
}

/// A smarthost route with credentials and opportunistic TLS (the default). Opportunistic TLS
/// takes any certificate, so whoever sits in the path (or answers for the smarthost's
/// address) can present a self-signed one and read the password from AUTH. The credentials
/// now go only over TLS whose certificate verified: here the attempt is deferred (4.7.10)
/// and no AUTH ever reaches the impostor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smarthost_password_never_sent_over_unverified_tls() {
    use std::os::unix::fs::PermissionsExt;

    let impostor = Sink::start(
        SinkBehaviour::default()
            .starttls(crate::sink::SinkCert::SelfSigned)
            .auth(USER, PASSWORD),
    )
    .await;
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("smarthost.pass");
    write_secret(&password_file, PASSWORD);
    std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sender.test", bounces.addr)
            .route("smart.test", impostor.addr)
            .route_option(
                "smart.test",
                "auth",
                format!(
                    "{{ username = \"{USER}\", password_file = {:?} }}",
                    password_file.display().to_string()
                ),
            ),
    )
    .await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit(SENDER, &["u@smart.test"], &message("smarthost-auth"))
        .await;

    let line = first_line(&server, "u@smart.test").await;
    assert_eq!(line["outcome"], "deferred", "{line}");
    assert!(
        line["reply"]
            .as_str()
            .unwrap()
            .starts_with("refusing to send credentials: the certificate of"),
        "{line}"
    );
    assert!(impostor.sessions() >= 1, "the smarthost was tried");
    impostor
        .wait_until("closed sessions", T, |s| {
            (0..s.sessions()).all(|i| s.session_log(i).closed)
        })
        .await;
    for log in impostor.session_logs() {
        assert!(log.tls, "STARTTLS was taken");
        assert!(
            !log.has_verb("AUTH") && log.auth_user.is_none(),
            "credentials reached the impostor: {:?}",
            log.verbs()
        );
    }
    assert!(impostor.messages().is_empty());
}

/// A burst of mail for a domain whose name servers never answer (anyone can sign up with
/// such a domain). Each MX lookup waits out the resolver's timeout; before, they took every
/// routing slot, and mail for other domains queued behind them for rounds of that timeout.
/// Now one domain's lookups hold at most a few slots, its waiting mail is deferred with the
/// first failure, and a static route needs no lookup at all: mail for an MX domain and for a
/// routed domain, sent after the burst, is delivered at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_dns_zone_does_not_stall_other_domains() {
    // Eight rounds of the old scheduler's 256 routing slots, each waiting out the resolver's
    // timeout, before it got to the mail sent after them (it took longer than `T`).
    const DEAD: usize = 2000;
    const SESSIONS: usize = 8;
    let live = mx_sink("127.0.31.5").await;
    let lab = Sink::start(SinkBehaviour::default()).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let dns = DnsServer::start(
        Zone::new()
            .silent("dead.test")
            .mx("live.test", 10, "mx.live.test")
            .a("mx.live.test", "127.0.31.5"),
    )
    .await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sender.test", bounces.addr)
            .route("lab.test", lab.addr)
            .delivery("nameservers", format!("[\"{}\"]", dns.addr))
            // live.test's MX sink is on loopback.
            .delivery("allow_local_mx", true),
    )
    .await;

    let senders: Vec<_> = (0..SESSIONS)
        .map(|s| {
            let smtp = server.smtp;
            tokio::spawn(async move {
                let mut c = Client::connect(smtp).await;
                c.expect_greeting().await;
                c.ehlo().await;
                for i in 0..DEAD / SESSIONS {
                    c.submit(
                        SENDER,
                        &[&format!("u{s}-{i}@dead.test")],
                        &message("dead-zone"),
                    )
                    .await;
                }
                c.expect("QUIT", 221, "").await;
            })
        })
        .collect();
    for sender in senders {
        sender.await.unwrap();
    }
    crate::delivery::wait_for("an MX query for dead.test", T, || {
        dns.queries("dead.test", hickory_resolver::proto::rr::RecordType::MX) >= 1
    })
    .await;

    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit(SENDER, &["u@live.test"], &message("live-mx"))
        .await;
    c.submit(SENDER, &["u@lab.test"], &message("static-route"))
        .await;
    c.expect("QUIT", 221, "").await;
    let by_mx = live.wait_for_messages(1, T).await;
    assert_eq!(by_mx[0].rcpt_addresses(), ["u@live.test"]);
    let by_route = lab.wait_for_messages(1, T).await;
    assert_eq!(by_route[0].rcpt_addresses(), ["u@lab.test"]);
}
