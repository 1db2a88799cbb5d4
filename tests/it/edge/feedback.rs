//! Feedback that can be trusted. Anyone may mail the bounce domains (that is where bounces
//! come back), so a bounce or a complaint changes state only when it is tied to mail tern
//! sent: a verified VERP token (tests/it/suppression.rs), or an `X-Tern-Id` in the returned
//! copy that binds the address the report names.

use std::net::SocketAddr;

use serde_json::json;

use super::*;
use crate::sink::{ReceivedMessage, Sink, SinkBehaviour};

const BOUNCE: &str = "bounce.example.com";

/// Relays for 127.0.0.1 only; `bounce.example.com` is a bounce domain; `sink.test` goes to
/// the sink; no VERP.
fn options(sink: SocketAddr, extra: &str) -> Options {
    Options::default()
        .deliver()
        .relay(&["127.0.0.1/32"])
        .route("sink.test", sink)
        .extra(format!("[bounce]\ndomains = [\"{BOUNCE}\"]\n\n{extra}"))
}

/// Sends one message to `to` through the inject API and returns it as the sink got it.
async fn sent(server: &TestServer, sink: &Sink, to: &str) -> ReceivedMessage {
    let before = sink.messages().len();
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "app@sender.test",
                "to": [to],
                "message": {"from": "app@sender.test", "to": [to], "subject": "news", "text": "hi"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    sink.wait_for_messages(before + 1, T).await.remove(before)
}

fn bounce_address() -> String {
    format!("bounces@{BOUNCE}")
}

/// The attack issue 13 measured at 4ecd15e: from a client outside the relay networks, one
/// made-up ARF report (`Original-Rcpt-To: ceo@victim.example`) and one made-up DSN
/// (`Final-Recipient: vip@customer.example`, 5.1.1) put both addresses on the suppression
/// list for good, and a report naming the bounce address switched bounce intake off. None of
/// them is tied to mail tern sent: they are counted as untrusted and change nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_reports_from_anyone_suppress_nobody() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(options(sink.addr, "")).await;
    let to = bounce_address();
    let mut c = outsider(server.smtp).await;
    let original =
        b"From: news@sender.test\r\nTo: ceo@victim.example\r\nSubject: deals\r\n\r\nBuy.\r\n";
    c.submit("", &[&to], &arf_about(original, "ceo@victim.example"))
        .await;
    c.submit(
        "",
        &[&to],
        &dsn_returning(&to, "vip@customer.example", original),
    )
    .await;
    c.submit("", &[&to], &dsn_returning(&to, &to, original))
        .await;
    // A forged X-Tern-Id in the shape of ours (base32) ties nothing either.
    let forged =
        b"X-Tern-Id: aeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaqcaibaeaqcaib\r\nSubject: x\r\n\r\n";
    c.submit(
        "",
        &[&to],
        &dsn_returning(&to, "vip2@customer.example", forged),
    )
    .await;
    wait_inbound_processed(&server).await;

    let (status, list) = server.api("GET", "/api/v1/suppressions", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["entries"].as_array().unwrap().len(), 0, "{list}");
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"complaint\",kind=\"arf\",trusted=\"false\"}"
        )
        .await,
        1.0
    );
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"invalid_recipient\",kind=\"dsn\",trusted=\"false\"}"
        )
        .await,
        3.0
    );
    assert_eq!(
        sample(
            &server,
            "tern_suppression_changes_total{change=\"add\",reason=\"complaint\"}"
        )
        .await,
        0.0
    );
    // Bounce intake still works: a bounce tied to mail we sent is acted on.
    let delivered = sent(&server, &sink, "user@sink.test").await;
    c.submit(
        "",
        &[&to],
        &dsn_returning(&to, "user@sink.test", &delivered.data),
    )
    .await;
    let entry = wait_suppressed(&server, "user@sink.test").await;
    assert_eq!(entry["reason"], "invalid_recipient", "{entry}");
}

/// Mail tern sends carries an `X-Tern-Id` that binds its recipients. A bounce returning those
/// headers suppresses the recipient it names; the same headers cannot vouch for anyone else
/// (an attacker who got one of our messages cannot suppress other addresses with it), and an
/// altered value ties nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returned_copy_vouches_only_for_the_recipient_it_was_sent_to() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(options(sink.addr, "")).await;
    let delivered = sent(&server, &sink, "User@sink.test").await;
    let text = String::from_utf8_lossy(&delivered.data).to_string();
    assert!(text.starts_with("X-Tern-Id: "), "{text}");
    // Not stored: the spool's copy is the message as accepted.
    let to = bounce_address();
    let mut c = outsider(server.smtp).await;

    // Another address with our genuine header: ignored.
    c.submit(
        "",
        &[&to],
        &dsn_returning(&to, "victim@sink.test", &delivered.data),
    )
    .await;
    // The right address with an altered value: ignored.
    let value_at = text.find("X-Tern-Id: ").unwrap() + "X-Tern-Id: ".len() + 5;
    let mut altered = delivered.data.clone();
    altered[value_at] = if altered[value_at] == b'a' {
        b'b'
    } else {
        b'a'
    };
    c.submit("", &[&to], &dsn_returning(&to, "user@sink.test", &altered))
        .await;
    wait_inbound_processed(&server).await;
    assert_eq!(suppression(&server, "victim@sink.test").await, None);
    assert_eq!(suppression(&server, "user@sink.test").await, None);

    // The real thing: the recipient it was sent to, any case.
    c.submit(
        "",
        &[&to],
        &dsn_returning(&to, "USER@sink.test", &delivered.data),
    )
    .await;
    let entry = wait_suppressed(&server, "user@sink.test").await;
    assert_eq!(entry["reason"], "invalid_recipient", "{entry}");
    assert_eq!(entry["source"].as_str().map(str::len), Some(16), "{entry}");
    // A complaint about the message, from a feedback loop that returns it whole.
    let other = sent(&server, &sink, "reader@sink.test").await;
    c.submit("", &[&to], &arf_about(&other.data, "reader@sink.test"))
        .await;
    let entry = wait_suppressed(&server, "reader@sink.test").await;
    assert_eq!(entry["reason"], "complaint", "{entry}");
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"invalid_recipient\",kind=\"dsn\",trusted=\"false\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"invalid_recipient\",kind=\"dsn\",trusted=\"true\"}"
        )
        .await,
        1.0
    );
}

/// A report names more addresses than `limits.max_recipients`: only that many are looked at
/// (the rest are counted untrusted), so one message cannot make the processor check or
/// suppress an unbounded list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_report_naming_thousands_is_looked_at_only_up_to_max_recipients() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(options(sink.addr, "").limit("max_recipients", 5)).await;
    let to = bounce_address();
    let mut report = dsn_returning(&to, "r0@victim.test", b"Subject: x\r\n\r\n");
    // More status groups, each naming another address, before the returned headers.
    let extra: String = (1..2000)
        .map(|i| {
            format!(
                "Final-Recipient: rfc822; r{i}@victim.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n"
            )
        })
        .collect();
    let at = report.windows(9).position(|w| w == b"Reporting").unwrap();
    let at = at
        + report[at..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap()
        + 4;
    report.splice(at..at, extra.into_bytes());
    let mut c = outsider(server.smtp).await;
    c.submit("", &[&to], &report).await;
    wait_inbound_processed(&server).await;
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"invalid_recipient\",kind=\"dsn\",trusted=\"false\"}"
        )
        .await,
        5.0
    );
    let (_, list) = server.api("GET", "/api/v1/suppressions", None).await;
    assert_eq!(list["entries"].as_array().unwrap().len(), 0, "{list}");
}

/// Mail from anyone to a bounce domain never reaches the pre-enqueue stages: control headers
/// from outside cannot make the sidecar render campaigns (model calls, bandit counts) or the
/// send-time model record sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_headers_from_outside_never_reach_the_sidecar() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(options(sink.addr, "")).await;
    let to = bounce_address();
    let mut c = outsider(server.smtp).await;
    c.submit(
        "attacker@evil.test",
        &[&to],
        b"X-Tern-Campaign: nosuch\r\nX-Tern-Send-Time: optimize\r\nSubject: hi\r\n\r\nhi\r\n",
    )
    .await;
    wait_inbound_processed(&server).await;
    assert_eq!(
        sample(
            &server,
            "tern_sidecar_content_total{result=\"unknown_campaign\"}"
        )
        .await,
        0.0
    );
    // The same headers from a client tern relays for do reach it.
    let mut inside = server.connect().await;
    inside.ehlo().await;
    inside
        .submit(
            "app@sender.test",
            &["user@sink.test"],
            b"X-Tern-Campaign: nosuch\r\nSubject: hi\r\n\r\nhi\r\n",
        )
        .await;
    assert_eq!(
        sample(
            &server,
            "tern_sidecar_content_total{result=\"unknown_campaign\"}"
        )
        .await,
        1.0
    );
}
