//! Delivery and the content path: STARTTLS (opportunistic, broken, required), SMTPUTF8
//! without support at the far end, and DKIM signatures that survive relaying and retries
//! (checked by dkimpy, an independent verifier).

use std::path::Path;
use std::process::{Command, Stdio};

use crate::delivery::*;
use crate::harness::*;
use crate::sink::{ReceivedMessage, SinkBehaviour, SinkCert};

#[tokio::test]
async fn starttls_with_a_self_signed_certificate() {
    let r = relay(
        SinkBehaviour::default().starttls(SinkCert::SelfSigned),
        |o| o,
    )
    .await;
    let content = message("tls-self-signed");
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<t@sink.test>"],
        &content,
    )
    .await;

    let msgs = r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert!(msgs[0].tls, "delivered over TLS");
    prepended(&msgs[0].data, &content, false);
    wait_for("the log line", T, || !r.log().is_empty()).await;
    let log = r.log();
    let l = &log[0];
    assert_eq!(l["outcome"], "delivered", "{l}");
    let version = l["tls_version"].as_str().expect("tls_version set");
    assert!(version.starts_with("TLS"), "{l}");
    assert!(
        l["tls_cipher"].as_str().is_some_and(|c| !c.is_empty()),
        "{l}"
    );
}

#[tokio::test]
async fn broken_tls_falls_back_to_plain_text() {
    let r = relay(SinkBehaviour::default().broken_tls(), |o| o).await;
    let content = message("tls-broken");
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<t@sink.test>"],
        &content,
    )
    .await;

    let msgs = r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert!(!msgs[0].tls, "plain text after the failed handshake");
    prepended(&msgs[0].data, &content, false);
    let first = r.sink.session_log(0);
    assert!(first.has_verb("STARTTLS"), "TLS was tried first: {first:?}");
    assert!(
        !first.has_verb("MAIL"),
        "nothing sent on the broken session"
    );
    let delivering = r.sink.session_log(msgs[0].session);
    assert!(
        !delivering.has_verb("STARTTLS"),
        "the fallback does not try again: {delivering:?}"
    );
    wait_for("the log line", T, || !r.log().is_empty()).await;
    let log = r.log();
    assert_eq!(log.len(), 1, "one attempt: {log:#?}");
    assert_eq!(log[0]["outcome"], "delivered");
    assert!(log[0]["tls_version"].is_null(), "{log:#?}");
}

#[tokio::test]
async fn required_tls_without_starttls_defers() {
    let r = relay(SinkBehaviour::default(), |o| {
        o.route_option("sink.test", "tls", "\"required\"")
    })
    .await;
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<t@sink.test>"],
        &message("tls-required"),
    )
    .await;

    wait_log(r.server.dir.path(), "deferred", |l| {
        l["outcome"] == "deferred"
    })
    .await;
    wait_for("the deferral in the spool", T, || {
        r.server
            .envelopes()
            .first()
            .is_some_and(|e| e.attempts >= 1)
    })
    .await;
    assert!(r.sink.messages().is_empty(), "not delivered");
    assert!(r.sink.sessions() >= 1, "the host was contacted");
    for s in r.sink.session_logs() {
        assert!(
            !s.has_verb("MAIL") && !s.has_verb("DATA"),
            "no plain-text transaction: {s:?}"
        );
    }
    let log = r.log();
    assert_eq!(log.len(), 1, "{log:#?}");
    assert!(
        log[0]["reply"].as_str().unwrap().contains("STARTTLS"),
        "{log:#?}"
    );
    assert!(r.bounces.messages().is_empty(), "no DSN for a deferral");
}

#[tokio::test]
async fn smtputf8_mail_to_a_server_without_it_bounces_with_5_6_7() {
    // The bounce sink speaks SMTPUTF8: the DSN reports a UTF-8 address.
    let r = relay_with(
        SinkBehaviour::default(),
        SinkBehaviour::default().smtputf8(),
        |o| o,
    )
    .await;
    let content = "From: <sender@sender.test>\r\nTo: <jürgen@sink.test>\r\nSubject: Grüße\r\n\r\nHallo Jürgen.\r\n"
        .as_bytes();
    send(
        &r.server,
        &format!("<{SENDER}> SMTPUTF8 BODY=8BITMIME"),
        &["<jürgen@sink.test>"],
        content,
    )
    .await;

    let dsns = r.bounces.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert!(r.sink.messages().is_empty());
    for s in r.sink.session_logs() {
        assert!(!s.has_verb("MAIL"), "no downgrade attempted: {s:?}");
    }
    let dsn = parse_dsn(&dsns[0]);
    assert_eq!(dsn.rcpt("Action"), Some("failed"));
    assert_eq!(dsn.rcpt("Status"), Some("5.6.7"));
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("utf-8; jürgen@sink.test"));
    assert_eq!(dsn.report_type, "global-delivery-status");
    let log = r.log();
    let lines = lines_for(&log, "jürgen@sink.test");
    assert_eq!(outcomes(&lines), [("bounced".into(), 1)], "{log:#?}");
}

// ---------------------------------------------------------------------------------------------
// DKIM

/// Verifies every DKIM-Signature of the message in the last argument with dkimpy; the other
/// arguments are zone lines (`owner IN TXT "..." "..."`) answering the key lookups. Prints the
/// number of signatures, then True/False per signature, topmost first.
const VERIFY_ALL: &str = r#"
import re, sys
import dkim
records = {}
for line in sys.argv[1:-1]:
    owner, rdata = line.split(" IN TXT ", 1)
    records[owner.encode()] = "".join(re.findall(r'"([^"]*)"', rdata)).encode()
def dnsfunc(name, timeout=5):
    return records.get(name)
with open(sys.argv[-1], "rb") as f:
    message = f.read()
d = dkim.DKIM(message, minkey=2048)
n = len([h for h, _ in d.headers if h.lower() == b"dkim-signature"])
def verify(i):
    try:
        return dkim.DKIM(message, minkey=2048).verify(idx=i, dnsfunc=dnsfunc)
    except dkim.ValidationError as e:
        print("signature", i, e, file=sys.stderr)
        return False
print(n, *[verify(i) for i in range(n)])
"#;

fn dkimpy_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import dkim, nacl"])
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "NOTICE: python3 with dkimpy and pynacl not found (pip install dkimpy pynacl); \
             skipping the DKIM relay verification"
        );
    }
    ok
}

/// dkimpy's output for `message`: (number of signatures, verdict per signature).
fn dkimpy_verify_all(dir: &Path, records: &[&str], message: &[u8]) -> (usize, Vec<bool>) {
    let path = dir.join("relayed.eml");
    std::fs::write(&path, message).unwrap();
    let out = Command::new("python3")
        .arg("-c")
        .arg(VERIFY_ALL)
        .args(records)
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run python3");
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut words = text.split_whitespace();
    let n = words.next().expect("count").parse().expect("count");
    let verdicts = words.map(|w| w == "True").collect();
    (n, verdicts)
}

/// `tern dkim keygen` (the real binary); returns the key path and the printed zone line.
async fn keygen(dir: &Path, selector: &str, algorithm: &str) -> (String, String) {
    let path = dir.join(format!("{selector}.pem"));
    let path = path.to_str().unwrap().to_string();
    let out = run_tern(
        &[
            "dkim",
            "keygen",
            "--domain",
            "dkim.test",
            "--selector",
            selector,
            "--algorithm",
            algorithm,
            "--out",
            &path,
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let record = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        record.starts_with(&format!("{selector}._domainkey.dkim.test. IN TXT ")),
        "{record}"
    );
    (path, record)
}

#[tokio::test]
async fn dkim_signatures_survive_relay_and_retry() {
    let keys = tempfile::tempdir().unwrap();
    let (ed_key, ed_record) = keygen(keys.path(), "ed", "ed25519").await;
    let (rsa_key, rsa_record) = keygen(keys.path(), "rsa", "rsa").await;
    let (_, first_refused) = first_n::<ReceivedMessage>(1, "451 4.3.0 Try again later");
    let r = relay(SinkBehaviour::default().data_reply(first_refused), |o| {
        o.delivery("retry_initial", "\"1s\"")
            .dkim(format!(
                "domain = \"dkim.test\"\nselector = \"ed\"\nkey = {ed_key:?}"
            ))
            .dkim(format!(
                "domain = \"dkim.test\"\nselector = \"rsa\"\nkey = {rsa_key:?}"
            ))
    })
    .await;
    let content = concat!(
        "From: Alice <alice@dkim.test>\r\n",
        "To: <bob@sink.test>\r\n",
        "Subject: signed relay\r\n",
        "Date: Tue, 01 Jul 2025 10:00:00 +0000\r\n",
        "Message-ID: <relay-1@dkim.test>\r\n",
        "MIME-Version: 1.0\r\n",
        "Content-Type: text/plain; charset=us-ascii\r\n",
        "\r\n",
        "Hello Bob,\r\n",
        ".a line with a leading dot\r\n",
        "trailing  spaces \r\n",
    )
    .as_bytes();
    send(
        &r.server,
        "<alice@dkim.test>",
        &["<bob@sink.test>"],
        content,
    )
    .await;

    let msgs = r.sink.wait_for_messages(2, T).await;
    r.wait_spool_empty().await;
    assert!(msgs[0].reply.starts_with("451"), "{:?}", msgs[0].reply);
    assert!(msgs[1].reply.starts_with("250"), "{:?}", msgs[1].reply);
    assert_eq!(
        without_origin(&msgs[0].data),
        without_origin(&msgs[1].data),
        "the retry sends the very same (signed once) bytes"
    );
    let delivered = &msgs[1].data;
    let text = String::from_utf8_lossy(delivered);
    let signatures = text
        .split("\r\n")
        .take_while(|l| !l.is_empty())
        .filter(|l| l.to_ascii_lowercase().starts_with("dkim-signature:"))
        .count();
    assert_eq!(signatures, 2, "one signature per key, once: {text}");
    assert!(delivered.ends_with(content), "content unchanged: {text}");

    if !dkimpy_available() {
        return;
    }
    let (n, verdicts) = dkimpy_verify_all(keys.path(), &[&ed_record, &rsa_record], delivered);
    assert_eq!(n, 2, "dkimpy sees two signatures");
    assert_eq!(verdicts, [true, true], "both signatures verify: {text}");
    // Sanity: the verifier is not just saying yes.
    let tampered = text.replace("Hello Bob", "Hello Eve");
    let (_, verdicts) =
        dkimpy_verify_all(keys.path(), &[&ed_record, &rsa_record], tampered.as_bytes());
    assert_eq!(verdicts, [false, false], "a changed body fails");
}
