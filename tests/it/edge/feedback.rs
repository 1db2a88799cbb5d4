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

/// A complaint report signed (DKIM) by `domain` with a freshly made key under selector `s1`;
/// returns the signed message and the key's TXT record value.
struct Signer {
    signers: tern::dkim::DkimSigners,
    txt: String,
    _dir: tempfile::TempDir,
}

impl Signer {
    fn new(domain: &str) -> Signer {
        use std::os::unix::fs::PermissionsExt as _;
        let key = tern::dkim::generate_key(tern::dkim::KeyAlgorithm::Ed25519).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("key.pem");
        std::fs::write(&key_path, &key.private_key_pem).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let names = |list: &[&str]| list.iter().map(|h| h.to_string()).collect();
        let config = tern::config::DkimConfig {
            domain: domain.into(),
            selector: "s1".into(),
            key_path,
            headers: names(tern::config::DEFAULT_DKIM_HEADERS),
            oversign: names(tern::config::DEFAULT_DKIM_OVERSIGN),
            active_from: None,
            retire_after: None,
        };
        let signers = tern::dkim::DkimSigners::load(
            &[config],
            std::sync::Arc::new(tern::telemetry::Metrics::new()),
        )
        .unwrap();
        Signer {
            signers,
            txt: key.txt_value,
            _dir: dir,
        }
    }

    /// `report` with its From set to `fbl@<domain>`, signed.
    fn sign(&self, domain: &str, report: &[u8]) -> Vec<u8> {
        let text = String::from_utf8_lossy(report).into_owned();
        let (first, rest) = text.split_once("\r\n").unwrap();
        assert!(first.starts_with("From:"), "{first}");
        let message = format!("From: Feedback Loop <fbl@{domain}>\r\n{rest}");
        let header = self.signers.sign(message.as_bytes()).expect("signed");
        [header.as_bytes(), message.as_bytes()].concat()
    }
}

/// Providers that redact the returned copy send complaints that cannot be tied to mail
/// tern sent; `bounce.feedback_loops` names the providers whose DKIM-signed complaints are
/// believed anyway. Played as an attacker: a complaint signed by the attacker's own domain,
/// one whose body was altered after a provider signed it, a DSN (not a complaint) signed by
/// the provider, and a signed complaint about tern's own addresses change nothing. The real
/// complaint suppresses its recipient (before, nothing untied was ever believed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_configured_feedback_loop_vouches_for_the_complaints_it_signs() {
    use crate::dns_server::{DnsServer, Zone};
    const PROVIDER: &str = "fbl.provider.test";
    const ATTACKER: &str = "attacker.test";
    let provider = Signer::new(PROVIDER);
    let attacker = Signer::new(ATTACKER);
    let dns = DnsServer::start(
        Zone::new()
            .txt(&format!("s1._domainkey.{PROVIDER}"), &provider.txt)
            .txt(&format!("s1._domainkey.{ATTACKER}"), &attacker.txt),
    )
    .await;
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        options(sink.addr, "feedback_loops = [\"provider.test\"]\n")
            .delivery("nameservers", format!("[\"{}\"]", dns.addr)),
    )
    .await;
    let to = bounce_address();
    let mut c = outsider(server.smtp).await;
    // The returned copy is redacted: no X-Tern-Id, nothing to tie it to mail we sent.
    let redacted = b"From: news@sender.test\r\nTo: redacted\r\nSubject: deals\r\n\r\nBuy.\r\n";
    c.submit(
        "",
        &[&to],
        &attacker.sign(ATTACKER, &arf_about(redacted, "victim1@sink.test")),
    )
    .await;
    let altered = provider
        .sign(PROVIDER, &arf_about(redacted, "someone@sink.test"))
        .to_vec();
    let altered = String::from_utf8(altered)
        .unwrap()
        .replace("someone@sink.test", "victim2@sink.test");
    c.submit("", &[&to], altered.as_bytes()).await;
    let dsn = dsn_returning(&to, "victim3@sink.test", redacted);
    // dsn_returning's From is the MAILER-DAEMON; sign it as the provider.
    c.submit("", &[&to], &provider.sign(PROVIDER, &dsn)).await;
    for own in [to.clone(), format!("postmaster@{HOST}")] {
        c.submit(
            "",
            &[&to],
            &provider.sign(PROVIDER, &arf_about(redacted, &own)),
        )
        .await;
    }
    c.submit(
        "",
        &[&to],
        &provider.sign(PROVIDER, &arf_about(redacted, "reader@sink.test")),
    )
    .await;
    wait_inbound_processed(&server).await;

    let entry = wait_suppressed(&server, "reader@sink.test").await;
    assert_eq!(entry["reason"], "complaint", "{entry}");
    assert_eq!(entry["source"], "feedback loop provider.test", "{entry}");
    let (_, list) = server.api("GET", "/api/v1/suppressions", None).await;
    let listed: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["reader@sink.test"], "{list}");
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"complaint\",kind=\"arf\",trusted=\"false\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        sample(
            &server,
            "tern_inbound_reports_total{category=\"invalid_recipient\",kind=\"dsn\",trusted=\"false\"}"
        )
        .await,
        1.0
    );
}
