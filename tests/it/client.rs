//! The outbound SMTP client and the connection pool against the sink: plain and pipelined
//! transactions, per-recipient results, STARTTLS policies and the broken-TLS fallback, AUTH,
//! SMTPUTF8 and DSN parameters, body transparency, timeouts and connection reuse.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use rustls::RootCertStore;
use tern::config::{SmtpTimeouts, TlsPolicy};
use tern::delivery::client::{
    connect, AttemptError, BrokenTls, ClientSettings, Connection, OutboundMessage, Phase,
    RcptResult, Target,
};
use tern::delivery::pool::{ConnectionPool, PoolLimits};
use tern::telemetry::StateMap;
use tern::tls::load_roots;
use tern_queue::{BodyType, Notify, Recipient, Ret};
use tokio_util::sync::CancellationToken;

use crate::harness::{test_cert, PASSWORD, USER};
use crate::sink::{Fault, Sink, SinkBehaviour, SinkCert, SinkPhase};

const WAIT: Duration = Duration::from_secs(10);

fn timeouts() -> SmtpTimeouts {
    let s = Duration::from_secs(10);
    SmtpTimeouts {
        connect: s,
        greeting: s,
        ehlo: s,
        mail: s,
        rcpt: s,
        data_init: s,
        data_block: s,
        data_end: s,
    }
}

fn metrics() -> std::sync::Arc<tern::telemetry::Metrics> {
    std::sync::Arc::new(tern::telemetry::Metrics::new())
}

/// Pool limits with room for plenty of idle connections.
fn limits(idle_timeout: Duration, max_messages_per_connection: usize) -> PoolLimits {
    PoolLimits {
        idle_timeout,
        max_messages_per_connection,
        max_idle: 100,
    }
}

/// A fresh broken-TLS memory (hosts stay marked for `WAIT`).
fn broken() -> BrokenTls {
    BrokenTls::new(WAIT, metrics())
}

fn settings() -> ClientSettings {
    ClientSettings::new("client.test".into(), timeouts(), RootCertStore::empty())
}

/// Settings trusting the harness CA, loaded the way production loads the system bundle.
fn settings_trusting_test_ca() -> ClientSettings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ca.pem");
    std::fs::write(&path, &test_cert().ca_pem).unwrap();
    let roots = load_roots(&path).expect("CA bundle loads");
    ClientSettings::new("client.test".into(), timeouts(), roots)
}

fn target(sink: &Sink, tls: TlsPolicy) -> Target<'static> {
    Target {
        host: "localhost",
        addr: sink.addr,
        source: None,
        tls,
        auth: None,
    }
}

fn rcpts(addresses: &[&str]) -> Vec<Recipient> {
    addresses
        .iter()
        .map(|a| Recipient::new(a.to_string()))
        .collect()
}

const BODY: &[u8] = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n";

fn message<'a>(recipients: &'a [Recipient], body: &'a [u8]) -> OutboundMessage<'a> {
    OutboundMessage {
        sender: "a@example.org",
        recipients,
        env_id: None,
        ret: None,
        body_type: BodyType::SevenBit,
        smtputf8: false,
        body,
        prefix: b"",
    }
}

async fn open(sink: &Sink, tls: TlsPolicy) -> Connection {
    connect(&target(sink, tls), &settings(), &broken())
        .await
        .expect("connect")
}

fn codes(results: &[RcptResult]) -> Vec<(String, u16)> {
    results
        .iter()
        .map(|r| (r.address.clone(), r.reply.code))
        .collect()
}

#[tokio::test]
async fn plain_transaction_delivers_body_byte_identical() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let mut conn = open(&sink, TlsPolicy::Opportunistic).await;
    assert!(conn.tls().is_none());
    assert_eq!(conn.host(), "localhost");
    assert_eq!(conn.addr(), sink.addr);

    // Dots at the start of the content and of lines, a lone dot line, a dot line at the end.
    let body = b".leading dot\r\nSubject: dots\r\n\r\n.\r\n..two\r\n. space\r\nend\r\n.\r\n";
    let list = rcpts(&["b@example.net", "c@example.net"]);
    let results = conn.send(&message(&list, body)).await.unwrap();
    assert_eq!(
        codes(&results),
        [("b@example.net".into(), 250), ("c@example.net".into(), 250)]
    );
    assert_eq!(results[0].reply.status.as_deref(), Some("2.0.0"));
    assert!(conn.is_reusable());
    assert_eq!(conn.messages_sent(), 1);

    // Content without a final CRLF gets one (SMTP content is lines); nothing else changes.
    let results = conn
        .send(&message(&list[..1], b"no final newline"))
        .await
        .unwrap();
    assert_eq!(results[0].reply.code, 250);
    conn.quit().await;

    let msgs = sink.wait_for_messages(2, WAIT).await;
    assert_eq!(msgs[0].data, body, "body must arrive byte-identical");
    assert_eq!(msgs[0].mail_from, "a@example.org");
    assert_eq!(msgs[0].rcpt_addresses(), ["b@example.net", "c@example.net"]);
    assert_eq!(msgs[0].helo, "client.test");
    assert!(!msgs[0].tls);
    assert_eq!(msgs[0].mail_params, [format!("SIZE={}", body.len())]);
    assert_eq!(msgs[1].data, b"no final newline\r\n");
    sink.wait_until("QUIT", WAIT, |s| s.session_log(0).quit)
        .await;
    assert_eq!(sink.sessions(), 1);
}

#[tokio::test]
async fn pipelining_sends_the_envelope_in_one_round_trip() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let mut conn = open(&sink, TlsPolicy::Disabled).await;
    let list = rcpts(&["b@example.net", "c@example.net", "d@example.net"]);
    conn.send(&message(&list, BODY)).await.unwrap();
    let log = sink.session_log(0);
    let envelope: Vec<_> = log
        .commands
        .iter()
        .filter(|c| {
            ["MAIL", "RCPT", "DATA"]
                .iter()
                .any(|v| c.line.starts_with(v))
        })
        .collect();
    assert_eq!(envelope.len(), 5, "{log:?}");
    assert!(
        envelope.iter().all(|c| c.batch == envelope[0].batch),
        "MAIL, RCPTs and DATA must arrive in one read: {envelope:?}"
    );

    // Without PIPELINING: one command per round trip.
    let sink = Sink::start(SinkBehaviour::default().no_pipelining()).await;
    let mut conn = open(&sink, TlsPolicy::Disabled).await;
    let results = conn.send(&message(&list, BODY)).await.unwrap();
    assert!(results.iter().all(|r| r.reply.code == 250));
    let log = sink.session_log(0);
    let batches: Vec<usize> = log
        .commands
        .iter()
        .filter(|c| {
            ["MAIL", "RCPT", "DATA"]
                .iter()
                .any(|v| c.line.starts_with(v))
        })
        .map(|c| c.batch)
        .collect();
    assert_eq!(batches.len(), 5);
    assert!(batches.windows(2).all(|w| w[0] < w[1]), "{log:?}");
    assert_eq!(sink.wait_for_messages(1, WAIT).await[0].data, BODY);
}

#[tokio::test]
async fn results_are_per_recipient() {
    for pipelining in [true, false] {
        let mut b = SinkBehaviour::default()
            .rcpt_reply(|a| {
                a.starts_with("bad")
                    .then(|| "550 5.1.1 No such user".into())
            })
            .data_reply(|m| {
                m.data
                    .starts_with(b"Subject: later")
                    .then(|| "451 4.3.0 Try again later".into())
            });
        if !pipelining {
            b = b.no_pipelining();
        }
        let sink = Sink::start(b).await;
        let mut conn = open(&sink, TlsPolicy::Disabled).await;
        let list = rcpts(&["bad@example.net", "good@example.net"]);

        let results = conn.send(&message(&list, BODY)).await.unwrap();
        assert_eq!(
            codes(&results),
            [
                ("bad@example.net".into(), 550),
                ("good@example.net".into(), 250)
            ]
        );
        assert_eq!(results[0].reply.status.as_deref(), Some("5.1.1"));
        assert_eq!(results[0].reply.to_string(), "550 5.1.1 No such user");

        // The reply after the data applies to the accepted recipient only.
        let results = conn
            .send(&message(&list, b"Subject: later\r\n\r\nx\r\n"))
            .await
            .unwrap();
        assert_eq!(
            codes(&results),
            [
                ("bad@example.net".into(), 550),
                ("good@example.net".into(), 451)
            ]
        );
        assert!(conn.is_reusable());
        let msgs = sink.wait_for_messages(2, WAIT).await;
        assert_eq!(msgs[0].rcpt_addresses(), ["good@example.net"]);
        assert_eq!(sink.sessions(), 1);
    }
}

#[tokio::test]
async fn refused_mail_applies_to_every_recipient() {
    for pipelining in [true, false] {
        let mut b = SinkBehaviour::default()
            .mail_reply(|from| (from == "spam@example.org").then(|| "550 5.7.1 Go away".into()));
        if !pipelining {
            b = b.no_pipelining();
        }
        let sink = Sink::start(b).await;
        let mut conn = open(&sink, TlsPolicy::Disabled).await;
        let list = rcpts(&["b@example.net", "c@example.net"]);
        let mut msg = message(&list, BODY);
        msg.sender = "spam@example.org";
        let results = conn.send(&msg).await.unwrap();
        assert!(
            results
                .iter()
                .all(|r| r.reply.to_string() == "550 5.7.1 Go away"),
            "{results:?}"
        );
        assert!(conn.is_reusable());
        // The connection carries on with the next message.
        let results = conn.send(&message(&list, BODY)).await.unwrap();
        assert!(results.iter().all(|r| r.reply.code == 250));
        let msgs = sink.wait_for_messages(1, WAIT).await;
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].mail_from, "a@example.org");
    }
}

#[tokio::test]
async fn no_accepted_recipient_sends_no_data_and_resets() {
    for pipelining in [true, false] {
        let mut b = SinkBehaviour::default().rcpt_reply(|a| {
            a.starts_with("bad")
                .then(|| "550 5.1.1 No such user".into())
        });
        if !pipelining {
            b = b.no_pipelining();
        }
        let sink = Sink::start(b).await;
        let mut conn = open(&sink, TlsPolicy::Disabled).await;
        let list = rcpts(&["bad1@example.net", "bad2@example.net"]);
        let results = conn.send(&message(&list, BODY)).await.unwrap();
        assert!(results.iter().all(|r| r.reply.code == 550));
        assert!(conn.is_reusable());
        let verbs = sink.session_log(0).verbs();
        assert_eq!(verbs.last().map(String::as_str), Some("RSET"), "{verbs:?}");
        // Pipelined, DATA went with the envelope and was refused; otherwise it was not sent.
        assert_eq!(verbs.contains(&"DATA".to_string()), pipelining, "{verbs:?}");

        let good = rcpts(&["good@example.net"]);
        conn.send(&message(&good, BODY)).await.unwrap();
        let msgs = sink.wait_for_messages(1, WAIT).await;
        assert_eq!(msgs.len(), 1, "only the second transaction has data");
        assert_eq!(msgs[0].rcpt_addresses(), ["good@example.net"]);
        assert_eq!(sink.sessions(), 1);
    }
}

#[tokio::test]
async fn opportunistic_tls_with_a_self_signed_certificate() {
    let sink = Sink::start(SinkBehaviour::default().starttls(SinkCert::SelfSigned)).await;
    let mut conn = open(&sink, TlsPolicy::Opportunistic).await;
    let tls = conn.tls().expect("STARTTLS used").clone();
    assert!(tls.version.starts_with("TLSv1."), "{tls:?}");
    assert!(
        !conn.capabilities().starttls,
        "EHLO after TLS no longer offers it"
    );
    let list = rcpts(&["b@example.net"]);
    conn.send(&message(&list, BODY)).await.unwrap();
    let msgs = sink.wait_for_messages(1, WAIT).await;
    assert!(msgs[0].tls);
    assert_eq!(msgs[0].data, BODY);
    let verbs = sink.session_log(0).verbs();
    assert_eq!(&verbs[..3], ["EHLO", "STARTTLS", "EHLO"]);
}

#[tokio::test]
async fn broken_tls_falls_back_to_plain_and_is_remembered() {
    let sink = Sink::start(SinkBehaviour::default().broken_tls()).await;
    let broken = BrokenTls::new(Duration::from_secs(60), metrics());
    let t = target(&sink, TlsPolicy::Opportunistic);
    let mut conn = connect(&t, &settings(), &broken)
        .await
        .expect("plain fallback");
    assert!(conn.tls().is_none());
    assert!(broken.is_broken("localhost"));
    assert_eq!(sink.sessions(), 2, "one attempt with TLS, one without");
    assert!(sink.session_log(0).has_verb("STARTTLS"));
    assert!(!sink.session_log(1).has_verb("STARTTLS"));
    let list = rcpts(&["b@example.net"]);
    conn.send(&message(&list, BODY)).await.unwrap();
    assert!(!sink.wait_for_messages(1, WAIT).await[0].tls);

    // Remembered: the next connection does not try TLS at all.
    let conn = connect(&t, &settings(), &broken).await.unwrap();
    conn.quit().await;
    assert_eq!(sink.sessions(), 3);
    assert!(!sink.session_log(2).has_verb("STARTTLS"));

    // Required never falls back.
    let err = connect(&target(&sink, TlsPolicy::Required), &settings(), &broken)
        .await
        .err()
        .expect("required TLS fails");
    assert!(matches!(err, AttemptError::Tls { .. }), "{err:?}");
}

#[tokio::test]
async fn required_tls_without_starttls_fails() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let err = connect(&target(&sink, TlsPolicy::Required), &settings(), &broken())
        .await
        .err()
        .expect("no STARTTLS");
    assert_eq!(err, AttemptError::NoStartTls);
    assert_eq!(err.status(), "4.7.4");
    assert!(!err.is_permanent());
    assert!(err.try_next_host());
}

#[tokio::test]
async fn required_tls_verifies_the_certificate() {
    let sink = Sink::start(SinkBehaviour::default().starttls(SinkCert::TestCa)).await;
    let broken = broken();
    let t = target(&sink, TlsPolicy::Required);
    let mut conn = connect(&t, &settings_trusting_test_ca(), &broken)
        .await
        .expect("verified TLS");
    assert!(conn.tls().is_some());
    let list = rcpts(&["b@example.net"]);
    conn.send(&message(&list, BODY)).await.unwrap();
    assert!(sink.wait_for_messages(1, WAIT).await[0].tls);

    // Without the CA among the roots the same certificate is refused.
    let err = connect(&t, &settings(), &broken).await.err().unwrap();
    assert!(matches!(err, AttemptError::Tls { .. }), "{err:?}");
    assert_eq!(err.status(), "4.7.5");
    // A name the certificate does not cover is refused too.
    let wrong_name = Target {
        host: "other.test",
        ..t
    };
    let err = connect(&wrong_name, &settings_trusting_test_ca(), &broken)
        .await
        .err()
        .unwrap();
    assert!(matches!(err, AttemptError::Tls { .. }), "{err:?}");
    assert!(!broken.is_broken("localhost") && !broken.is_broken("other.test"));
}

#[tokio::test]
async fn smtputf8_message_to_a_server_without_it_fails_permanently() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let mut conn = open(&sink, TlsPolicy::Disabled).await;
    let list = rcpts(&["b@example.net", "c@example.net"]);
    let mut msg = message(&list, BODY);
    msg.smtputf8 = true;
    let results = conn.send(&msg).await.unwrap();
    assert_eq!(results.len(), 2);
    for r in &results {
        assert_eq!(r.reply.code, 550);
        assert_eq!(r.reply.status.as_deref(), Some("5.6.7"));
    }
    assert!(!sink.session_log(0).has_verb("MAIL"), "no transaction");
    assert!(conn.is_reusable());

    // With SMTPUTF8 offered, the parameter is sent.
    let sink = Sink::start(SinkBehaviour::default().smtputf8()).await;
    let mut conn = open(&sink, TlsPolicy::Disabled).await;
    conn.send(&msg).await.unwrap();
    let m = &sink.wait_for_messages(1, WAIT).await[0];
    assert!(m.mail_params.contains(&"SMTPUTF8".to_string()), "{m:?}");
}

#[tokio::test]
async fn dsn_and_body_parameters_only_when_offered() {
    let mut list = rcpts(&["b@example.net"]);
    list[0].orcpt = Some("rfc822;b+tag=x@example.net".into());
    list[0].notify = Notify {
        success: true,
        failure: true,
        delay: false,
        never: false,
    };
    let mut msg = message(&list, BODY);
    msg.env_id = Some("id 1+");
    msg.ret = Some(Ret::Headers);
    msg.body_type = BodyType::EightBitMime;

    let sink = Sink::start(SinkBehaviour::default().dsn()).await;
    open(&sink, TlsPolicy::Disabled)
        .await
        .send(&msg)
        .await
        .unwrap();
    let m = &sink.wait_for_messages(1, WAIT).await[0];
    assert_eq!(
        m.mail_params,
        [
            format!("SIZE={}", BODY.len()),
            "BODY=8BITMIME".into(),
            "RET=HDRS".into(),
            "ENVID=id+201+2B".into()
        ]
    );
    assert_eq!(
        m.rcpts[0].params,
        [
            "NOTIFY=SUCCESS,FAILURE",
            "ORCPT=rfc822;b+2Btag+3Dx@example.net"
        ]
    );

    let mut never = list.clone();
    never[0].notify.never = true;
    never[0].orcpt = None;
    let sink = Sink::start(SinkBehaviour::default().dsn()).await;
    open(&sink, TlsPolicy::Disabled)
        .await
        .send(&message(&never, BODY))
        .await
        .unwrap();
    assert_eq!(
        sink.wait_for_messages(1, WAIT).await[0].rcpts[0].params,
        ["NOTIFY=NEVER"]
    );

    // No DSN, no 8BITMIME, no SIZE: no parameters at all.
    let plain = SinkBehaviour {
        eightbitmime: false,
        size: None,
        ..SinkBehaviour::default()
    };
    let sink = Sink::start(plain).await;
    open(&sink, TlsPolicy::Disabled)
        .await
        .send(&msg)
        .await
        .unwrap();
    let m = &sink.wait_for_messages(1, WAIT).await[0];
    assert!(m.mail_params.is_empty(), "{m:?}");
    assert!(m.rcpts[0].params.is_empty(), "{m:?}");
}

#[tokio::test]
async fn oversized_message_is_refused_without_a_transaction() {
    let sink = Sink::start(SinkBehaviour::default().size(Some(10))).await;
    let mut conn = open(&sink, TlsPolicy::Disabled).await;
    let list = rcpts(&["b@example.net"]);
    let results = conn.send(&message(&list, BODY)).await.unwrap();
    assert_eq!(results[0].reply.code, 552);
    assert_eq!(results[0].reply.status.as_deref(), Some("5.3.4"));
    assert!(!sink.session_log(0).has_verb("MAIL"));
}

#[tokio::test]
async fn stall_after_data_times_out_in_time() {
    let sink = Sink::start(SinkBehaviour::default().fault(SinkPhase::DataEnd, Fault::Stall)).await;
    let mut s = settings();
    s.timeouts.data_end = Duration::from_millis(300);
    let mut conn = connect(&target(&sink, TlsPolicy::Disabled), &s, &broken())
        .await
        .unwrap();
    let list = rcpts(&["b@example.net"]);
    let started = Instant::now();
    let err = conn.send(&message(&list, BODY)).await.unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        err,
        AttemptError::Timeout {
            phase: Phase::DataEnd
        }
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
    assert!(!conn.is_reusable());
    assert!(!err.try_next_host(), "the server may have the message");
    assert_eq!(err.status(), "4.4.2");
    let pool = ConnectionPool::new(
        limits(WAIT, 10),
        tokio_util::task::TaskTracker::new(),
        metrics(),
    );
    pool.put(conn).await;
    assert_eq!(pool.idle_count(), 0, "a timed-out connection is not kept");
}

#[tokio::test]
async fn stall_and_drop_in_other_phases() {
    let mut s = settings();
    s.timeouts.greeting = Duration::from_millis(200);
    let sink = Sink::start(SinkBehaviour::default().fault(SinkPhase::Greeting, Fault::Stall)).await;
    let err = connect(&target(&sink, TlsPolicy::Disabled), &s, &broken())
        .await
        .err()
        .unwrap();
    assert_eq!(
        err,
        AttemptError::Timeout {
            phase: Phase::Greeting
        }
    );
    assert!(err.try_next_host());

    let sink = Sink::start(SinkBehaviour::default().fault(SinkPhase::Rcpt, Fault::Drop)).await;
    let mut conn = open(&sink, TlsPolicy::Disabled).await;
    let list = rcpts(&["b@example.net"]);
    let err = conn.send(&message(&list, BODY)).await.unwrap_err();
    assert!(
        matches!(
            err,
            AttemptError::Lost {
                phase: Phase::Envelope,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!conn.is_reusable());
    assert!(conn.send(&message(&list, BODY)).await.is_err());
}

#[tokio::test]
async fn greeting_and_ehlo_refusals() {
    let sink = Sink::start(SinkBehaviour::default().greeting("554 5.7.1 No service")).await;
    let err = connect(&target(&sink, TlsPolicy::Disabled), &settings(), &broken())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            &err,
            AttemptError::Refused {
                phase: Phase::Greeting,
                reply
            } if reply.code == 554
        ),
        "{err:?}"
    );
    assert!(err.is_permanent() && err.try_next_host());
    assert_eq!(err.reply_text(), "554 5.7.1 No service");
    assert_eq!(err.status(), "5.7.1");

    let sink = Sink::start(SinkBehaviour::default().greeting("421 busy")).await;
    let err = connect(&target(&sink, TlsPolicy::Disabled), &settings(), &broken())
        .await
        .err()
        .unwrap();
    assert!(!err.is_permanent());
    assert_eq!(err.status(), "4.0.0");

    // EHLO refused: HELO, and then no extensions are used.
    let sink = Sink::start(SinkBehaviour::default().refuse_ehlo("502 5.5.2 No EHLO here")).await;
    let mut conn = open(&sink, TlsPolicy::Opportunistic).await;
    assert_eq!(*conn.capabilities(), Default::default());
    let list = rcpts(&["b@example.net"]);
    conn.send(&message(&list, BODY)).await.unwrap();
    let m = &sink.wait_for_messages(1, WAIT).await[0];
    assert!(m.mail_params.is_empty());
    assert_eq!(m.data, BODY);
    assert_eq!(&sink.session_log(0).verbs()[..2], ["EHLO", "HELO"]);
}

#[tokio::test]
async fn connection_refused() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap();
    drop(free);
    let t = Target {
        host: "localhost",
        addr,
        source: None,
        tls: TlsPolicy::Opportunistic,
        auth: None,
    };
    let err = connect(&t, &settings(), &broken()).await.err().unwrap();
    assert!(matches!(err, AttemptError::Connect { .. }), "{err:?}");
    assert_eq!(err.status(), "4.4.1");
    assert!(!err.is_permanent() && err.try_next_host());
}

#[tokio::test]
async fn auth_over_verified_tls() {
    // Opportunistic TLS, and the certificate verifies: credentials may go.
    let sink = Sink::start(
        SinkBehaviour::default()
            .starttls(SinkCert::TestCa)
            .auth(USER, PASSWORD),
    )
    .await;
    let t = Target {
        auth: Some((USER, PASSWORD)),
        ..target(&sink, TlsPolicy::Opportunistic)
    };
    let settings = settings_trusting_test_ca();
    let mut conn = connect(&t, &settings, &broken())
        .await
        .expect("AUTH over TLS");
    let list = rcpts(&["b@example.net"]);
    conn.send(&message(&list, BODY)).await.unwrap();
    let m = &sink.wait_for_messages(1, WAIT).await[0];
    assert_eq!(m.auth_user.as_deref(), Some(USER));
    assert!(m.tls);

    let wrong = Target {
        auth: Some((USER, "wrong")),
        ..t
    };
    let err = connect(&wrong, &settings, &broken()).await.err().unwrap();
    assert!(
        matches!(&err, AttemptError::Refused { phase: Phase::Auth, reply } if reply.code == 535),
        "{err:?}"
    );
    assert!(!err.is_permanent(), "our credentials are ours to fix");
}

#[tokio::test]
async fn auth_over_unverified_tls_is_refused_locally() {
    // Opportunistic TLS takes any certificate, so a man in the middle can present its own:
    // a self-signed one (or one for another name) never gets the credentials.
    let sink = Sink::start(
        SinkBehaviour::default()
            .starttls(SinkCert::SelfSigned)
            .auth(USER, PASSWORD),
    )
    .await;
    let t = Target {
        auth: Some((USER, PASSWORD)),
        ..target(&sink, TlsPolicy::Opportunistic)
    };
    // Whether or not some CA is trusted, a self-signed certificate does not verify.
    for settings in [settings_trusting_test_ca(), settings()] {
        let err = connect(&t, &settings, &broken()).await.err().unwrap();
        assert!(
            matches!(&err, AttemptError::AuthUnverifiedTls { host, .. } if host == "localhost"),
            "{err:?}"
        );
        assert_eq!(err.status(), "4.7.10");
        assert!(!err.is_permanent());
    }
    // The harness CA's certificate is for "localhost", not for this name.
    let trusted = Sink::start(
        SinkBehaviour::default()
            .starttls(SinkCert::TestCa)
            .auth(USER, PASSWORD),
    )
    .await;
    let other_name = Target {
        host: "smarthost.test",
        auth: Some((USER, PASSWORD)),
        ..target(&trusted, TlsPolicy::Opportunistic)
    };
    let err = connect(&other_name, &settings_trusting_test_ca(), &broken())
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, AttemptError::AuthUnverifiedTls { .. }),
        "{err:?}"
    );
    for sink in [&sink, &trusted] {
        sink.wait_until("closed sessions", WAIT, |s| {
            (0..s.sessions()).all(|i| s.session_log(i).closed)
        })
        .await;
        for i in 0..sink.sessions() {
            let log = sink.session_log(i);
            assert!(log.tls, "TLS was up");
            assert!(!log.has_verb("AUTH"), "credentials sent: {:?}", log.verbs());
        }
    }
}

#[tokio::test]
async fn auth_without_tls_is_refused_locally() {
    let sink = Sink::start(SinkBehaviour::default().auth(USER, PASSWORD)).await;
    let t = Target {
        auth: Some((USER, PASSWORD)),
        ..target(&sink, TlsPolicy::Opportunistic)
    };
    let err = connect(&t, &settings(), &broken()).await.err().unwrap();
    assert_eq!(err, AttemptError::AuthWithoutTls);
    assert_eq!(err.status(), "4.7.10");
    sink.wait_until("closed session", WAIT, |s| s.session_log(0).closed)
        .await;
    assert!(!sink.session_log(0).has_verb("AUTH"), "no credentials sent");

    // With TLS disabled by policy, no connection is even made.
    let disabled = Target {
        tls: TlsPolicy::Disabled,
        ..t
    };
    let err = connect(&disabled, &settings(), &broken())
        .await
        .err()
        .unwrap();
    assert_eq!(err, AttemptError::AuthWithoutTls);
    assert_eq!(sink.sessions(), 1);
}

#[tokio::test]
async fn pool_reuses_a_connection() {
    let sink = Sink::start(SinkBehaviour::default().starttls(SinkCert::SelfSigned)).await;
    let pool = ConnectionPool::new(
        limits(WAIT, 100),
        tokio_util::task::TaskTracker::new(),
        metrics(),
    );
    let t = target(&sink, TlsPolicy::Opportunistic);
    let broken = broken();
    let list = rcpts(&["b@example.net"]);

    assert!(pool.take(&t).is_none());
    let mut conn = connect(&t, &settings(), &broken).await.unwrap();
    conn.send(&message(&list, BODY)).await.unwrap();
    pool.put(conn).await;
    assert_eq!(pool.idle_count(), 1);

    // A target with another TLS policy or host name does not get it.
    assert!(pool.take(&target(&sink, TlsPolicy::Required)).is_none());
    assert!(pool
        .take(&Target {
            host: "other.test",
            ..t
        })
        .is_none());

    let mut conn = pool.take(&t).expect("pooled connection");
    assert_eq!(pool.idle_count(), 0);
    conn.send(&message(&list, BODY)).await.unwrap();
    assert_eq!(conn.messages_sent(), 2);
    pool.put(conn).await;
    sink.wait_for_messages(2, WAIT).await;
    assert_eq!(sink.sessions(), 1, "both messages on one session");
    assert!(sink.messages().iter().all(|m| m.tls));

    pool.close_all().await;
    assert_eq!(pool.idle_count(), 0);
    sink.wait_until("QUIT", WAIT, |s| s.session_log(0).quit)
        .await;
}

#[tokio::test]
async fn pool_keys_on_the_source_address() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let pool = ConnectionPool::new(
        limits(WAIT, 100),
        tokio_util::task::TaskTracker::new(),
        metrics(),
    );
    let from2 = Target {
        source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))),
        ..target(&sink, TlsPolicy::Disabled)
    };
    let conn = connect(&from2, &settings(), &broken()).await.unwrap();
    assert_eq!(conn.source(), from2.source);
    pool.put(conn).await;
    assert_eq!(sink.session_log(0).client_ip, from2.source.unwrap());
    assert!(pool.take(&target(&sink, TlsPolicy::Disabled)).is_none());
    assert!(pool.take(&from2).is_some());
}

/// Connections to ever more destinations (here: from distinct source addresses) idle in the
/// pool past `delivery.max_idle_connections`: the pool stays within it, QUITs the connections
/// idle longest and counts each.
#[tokio::test]
async fn idle_connections_past_the_bound_quit_the_ones_idle_longest() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let metrics = metrics();
    let tasks = tokio_util::task::TaskTracker::new();
    let pool = ConnectionPool::new(
        PoolLimits {
            max_idle: 2,
            ..limits(WAIT, 100)
        },
        tasks.clone(),
        metrics.clone(),
    );
    for n in 2..7u8 {
        let from = Target {
            source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, n))),
            ..target(&sink, TlsPolicy::Disabled)
        };
        let conn = connect(&from, &settings(), &broken()).await.unwrap();
        pool.put(conn).await;
        assert!(pool.idle_count() <= 2, "{}", pool.idle_count());
    }
    assert_eq!(pool.idle_count(), 2);
    assert_eq!(metrics.state_evictions(StateMap::IdleConnections), 3);
    // The first three were QUIT; the last two wait for a message.
    sink.wait_until("QUIT of the evicted", WAIT, |s| {
        (0..3).all(|i| s.session_log(i).quit)
    })
    .await;
    assert!(!sink.session_log(3).quit && !sink.session_log(4).quit);
    let newest = Target {
        source: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 6))),
        ..target(&sink, TlsPolicy::Disabled)
    };
    assert!(pool.take(&newest).is_some());
    tasks.close();
    tokio::time::timeout(WAIT, tasks.wait()).await.unwrap();
}

#[tokio::test]
async fn pool_closes_after_max_messages() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let pool = ConnectionPool::new(
        limits(WAIT, 2),
        tokio_util::task::TaskTracker::new(),
        metrics(),
    );
    let t = target(&sink, TlsPolicy::Disabled);
    let list = rcpts(&["b@example.net"]);
    let mut conn = connect(&t, &settings(), &broken()).await.unwrap();
    conn.send(&message(&list, BODY)).await.unwrap();
    pool.put(conn).await;
    let mut conn = pool.take(&t).unwrap();
    conn.send(&message(&list, BODY)).await.unwrap();
    pool.put(conn).await;
    assert_eq!(pool.idle_count(), 0, "closed after its second message");
    sink.wait_until("QUIT", WAIT, |s| s.session_log(0).quit)
        .await;
}

#[tokio::test]
async fn pool_expires_idle_connections() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let t = target(&sink, TlsPolicy::Disabled);

    // take() skips what has been idle too long.
    let pool = ConnectionPool::new(
        limits(Duration::from_millis(100), 100),
        tokio_util::task::TaskTracker::new(),
        metrics(),
    );
    pool.put(open(&sink, TlsPolicy::Disabled).await).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(pool.take(&t).is_none());
    assert_eq!(pool.idle_count(), 0);

    // The reaper QUITs it without anyone asking.
    let tasks = tokio_util::task::TaskTracker::new();
    let pool = ConnectionPool::new(
        limits(Duration::from_millis(200), 100),
        tasks.clone(),
        metrics(),
    );
    let stop = CancellationToken::new();
    pool.spawn_reaper(stop.clone());
    pool.put(open(&sink, TlsPolicy::Disabled).await).await;
    assert_eq!(pool.idle_count(), 1);
    sink.wait_until("QUIT by the reaper", WAIT, |s| s.session_log(1).quit)
        .await;
    assert_eq!(pool.idle_count(), 0);
    stop.cancel();
    tasks.close();
    tokio::time::timeout(WAIT, tasks.wait())
        .await
        .expect("the reaper ends at stop");

    // A connection the server closed while idle is not handed out.
    let sink = Sink::start(SinkBehaviour::default()).await;
    let t = target(&sink, TlsPolicy::Disabled);
    let pool = ConnectionPool::new(
        limits(WAIT, 100),
        tokio_util::task::TaskTracker::new(),
        metrics(),
    );
    pool.put(open(&sink, TlsPolicy::Disabled).await).await;
    drop(sink); // ends its sessions
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(pool.take(&t).is_none());
    assert_eq!(pool.idle_count(), 0);
}
