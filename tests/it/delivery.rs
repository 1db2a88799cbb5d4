//! End-to-end delivery: mail accepted by the in-process daemon leaves it through the delivery
//! engine (scheduler, worker, SMTP client, settler) to controllable sinks, with the delivery
//! log, retries, expiry and DSNs observed from outside.
//!
//! Shared machinery for the `delivery_*` modules lives here too: a relay fixture (a sink for
//! the recipients' domain, another for the sender's domain where DSNs arrive), delivery-log
//! reading and polling (DSN parsing is in `dsn`).
//!
//! Negative claims ("no DSN") rest on an ordering the settler guarantees: a DSN is committed
//! to the spool before the envelope that caused it is removed, so once the spool is empty
//! every DSN there ever was has been delivered (and logged, with the null sender).

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tern_queue::MessageId;

pub use crate::dsn::{parse_dsn, Dsn};
use crate::harness::*;
use crate::sink::{Fault, ReceivedMessage, Sink, SinkBehaviour, SinkPhase};

/// Longest wait for anything in these tests.
pub const T: Duration = Duration::from_secs(20);
/// The envelope sender of most test mail; its domain is routed to the bounce sink.
pub const SENDER: &str = "sender@sender.test";

// ---------------------------------------------------------------------------------------------
// Fixture

/// A daemon with delivery on, `sink.test` routed to `sink` and `sender.test` (the sender's
/// domain, where DSNs go) to `bounces`.
pub struct Relay {
    pub server: TestServer,
    pub sink: Sink,
    pub bounces: Sink,
}

pub async fn relay(sink: SinkBehaviour, opts: impl FnOnce(Options) -> Options) -> Relay {
    relay_with(sink, SinkBehaviour::default(), opts).await
}

pub async fn relay_with(
    sink: SinkBehaviour,
    bounces: SinkBehaviour,
    opts: impl FnOnce(Options) -> Options,
) -> Relay {
    let sink = Sink::start(sink).await;
    let bounces = Sink::start(bounces).await;
    let options = Options::default()
        .deliver()
        .route("sink.test", sink.addr)
        .route("sender.test", bounces.addr);
    let server = TestServer::start(opts(options)).await;
    Relay {
        server,
        sink,
        bounces,
    }
}

impl Relay {
    pub fn log(&self) -> Vec<Value> {
        log_lines(self.server.dir.path())
    }

    /// Waits until the spool holds nothing (every recipient settled, every DSN delivered).
    pub async fn wait_spool_empty(&self) {
        wait_spool_empty(&self.server).await
    }

    /// Asserts that no DSN was ever queued: none reached the bounce sink and the log shows
    /// no delivery attempt from the null sender to [`SENDER`]. Meaningful once the spool is
    /// empty.
    #[track_caller]
    pub fn assert_no_dsn(&self) {
        assert!(
            self.bounces.messages().is_empty(),
            "unexpected DSN(s): {:#?}",
            self.bounces
                .messages()
                .iter()
                .map(|m| String::from_utf8_lossy(&m.data).into_owned())
                .collect::<Vec<_>>()
        );
        let dsn_lines: Vec<Value> = self
            .log()
            .into_iter()
            .filter(|l| l["sender"] == "" && l["recipient"] == SENDER)
            .collect();
        assert!(dsn_lines.is_empty(), "DSN delivery logged: {dsn_lines:#?}");
    }
}

pub async fn wait_spool_empty(server: &TestServer) {
    let deadline = Instant::now() + T;
    loop {
        let envs = server.envelopes();
        if envs.is_empty() && server.message_count() == 0 {
            // The last attempt's log lines were recorded before the spool emptied.
            server.flush_delivery_log().await;
            return;
        }
        assert!(
            Instant::now() < deadline,
            "spool not empty within {T:?}: {envs:#?}\nlog: {:#?}",
            log_lines(server.dir.path())
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Polls `done` every 20 ms; panics after `timeout` naming `what`.
pub async fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "no {what} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// EHLO, then `MAIL FROM:<mail>` and `RCPT TO:<rcpt>` with the arguments exactly as given
/// (parameters included), DATA and `content`; returns the queue id.
pub async fn send(server: &TestServer, mail: &str, rcpts: &[&str], content: &[u8]) -> MessageId {
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect(&format!("MAIL FROM:{mail}"), 250, "").await;
    for r in rcpts {
        c.expect(&format!("RCPT TO:{r}"), 250, "").await;
    }
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(content)).await;
    let id = c.reply().await.queued_id();
    c.expect("QUIT", 221, "").await;
    id
}

/// A reply closure that answers `reply` to the first `n` calls and accepts afterwards.
pub fn first_n<A: ?Sized>(
    n: usize,
    reply: &str,
) -> (
    Arc<AtomicUsize>,
    impl Fn(&A) -> Option<String> + Send + Sync + 'static,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let reply = reply.to_string();
    let counter = calls.clone();
    (calls, move |_: &A| {
        (counter.fetch_add(1, Ordering::SeqCst) < n).then(|| reply.clone())
    })
}

// ---------------------------------------------------------------------------------------------
// The delivery log

/// Every line of `<dir>/delivery.log`, parsed; each must be a JSON object with every key.
pub fn log_lines(dir: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(dir.join("delivery.log")).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("delivery log line is not JSON ({e}): {l:?}"));
            for key in [
                "ts",
                "id",
                "queue_id",
                "recipient",
                "sender",
                "host",
                "ip",
                "source_ip",
                "tls_version",
                "tls_cipher",
                "tls_policy",
                "reply",
                "outcome",
                "attempt",
                "delay_s",
                "destination",
                "category",
            ] {
                assert!(v.get(key).is_some(), "log line without {key:?}: {l}");
            }
            v
        })
        .collect()
}

/// Waits until the log holds a line for which `pred` holds; returns all lines.
pub async fn wait_log(dir: &Path, what: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + T;
    loop {
        let lines = log_lines(dir);
        if lines.iter().any(&pred) {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "no log line {what} within {T:?}; log: {lines:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The log lines of one recipient, in order.
pub fn lines_for<'a>(lines: &'a [Value], recipient: &str) -> Vec<&'a Value> {
    lines
        .iter()
        .filter(|l| l["recipient"] == recipient)
        .collect()
}

/// (outcome, attempt) of each line.
pub fn outcomes(lines: &[&Value]) -> Vec<(String, u64)> {
    lines
        .iter()
        .map(|l| {
            (
                l["outcome"].as_str().unwrap().to_string(),
                l["attempt"].as_u64().unwrap(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn static_route_relays_both_recipients_in_one_transaction() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    let content = message("relay-two-rcpts");
    let mut c = r.server.connect().await;
    c.ehlo().await;
    let id = c
        .submit(SENDER, &["a@sink.test", "b@sink.test"], &content)
        .await;
    c.expect("QUIT", 221, "").await;

    let msgs = r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    wait_for("two log lines", T, || r.log().len() >= 2).await;
    assert_eq!(r.sink.messages().len(), 1, "one transaction: {msgs:#?}");
    let m = &msgs[0];
    assert_eq!(m.mail_from, SENDER);
    assert_eq!(m.rcpt_addresses(), ["a@sink.test", "b@sink.test"]);
    assert!(m.reply.starts_with("250"), "{m:#?}");
    assert_eq!(m.helo, HOST, "EHLO with our hostname");
    let head = prepended(&m.data, &content, false);
    let received = received_of(head);
    assert!(
        received.contains(&format!("by {HOST}")) && received.contains(&id.to_string()),
        "our Received header: {received}"
    );
    assert_eq!(r.sink.sessions(), 1, "one connection");

    let log = r.log();
    assert_eq!(log.len(), 2, "one line per recipient: {log:#?}");
    for rcpt in ["a@sink.test", "b@sink.test"] {
        let l = lines_for(&log, rcpt);
        assert_eq!(l.len(), 1, "{log:#?}");
        let l = l[0];
        assert_eq!(l["outcome"], "delivered", "{l}");
        assert_eq!(l["attempt"], 1, "{l}");
        assert_eq!(l["host"], "127.0.0.1", "{l}");
        assert_eq!(l["ip"], r.sink.addr.to_string(), "{l}");
        assert_eq!(l["queue_id"], id.to_string(), "{l}");
        assert_eq!(l["sender"], SENDER, "{l}");
        assert_eq!(l["destination"], "route:sink.test", "{l}");
        assert!(l["tls_version"].is_null(), "no TLS offered: {l}");
        assert!(l["reply"].as_str().unwrap().starts_with("250 2.0.0"), "{l}");
        assert!(l["delay_s"].as_f64().unwrap() >= 0.0, "{l}");
    }
    r.assert_no_dsn();
}

#[tokio::test]
async fn connections_are_reused_and_capped_per_destination() {
    const N: usize = 30;
    let r = relay(SinkBehaviour::default(), |o| {
        o.delivery("max_connections_per_destination", 2)
            .delivery("max_messages_per_connection", 10)
    })
    .await;
    let mut c = r.server.connect().await;
    c.ehlo().await;
    for i in 0..N {
        let marker = format!("reuse-{i:02}");
        let rcpt = format!("r{i}@sink.test");
        c.submit(SENDER, &[&rcpt], &message(&marker)).await;
    }
    c.expect("QUIT", 221, "").await;

    let msgs = r.sink.wait_for_messages(N, T).await;
    r.wait_spool_empty().await;
    let mut markers: Vec<String> = msgs
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data);
            let start = text.find("Subject: ").expect("subject") + 9;
            text[start..start + 8].to_string()
        })
        .collect();
    markers.sort();
    markers.dedup();
    assert_eq!(markers.len(), N, "each message exactly once");
    assert_eq!(r.sink.messages().len(), N, "no duplicates");
    let sessions = r.sink.sessions();
    eprintln!(
        "reuse: {N} messages over {sessions} sessions, at most {} at once",
        r.sink.max_concurrent()
    );
    assert!(
        r.sink.max_concurrent() <= 2,
        "max_connections_per_destination = 2, saw {} at once",
        r.sink.max_concurrent()
    );
    assert!(
        sessions <= N / 5,
        "connections must be reused: {sessions} sessions for {N} messages"
    );
    let mut per_session = vec![0usize; sessions];
    for m in &msgs {
        per_session[m.session] += 1;
    }
    assert!(
        per_session.iter().all(|&n| n <= 10),
        "max_messages_per_connection = 10: {per_session:?}"
    );
    for (i, log) in r.sink.session_logs().iter().enumerate() {
        if per_session[i] == 10 {
            assert!(log.quit, "a full connection is closed with QUIT: {log:?}");
        }
    }
}

#[tokio::test]
async fn only_pending_recipients_are_retried() {
    let (_, later_once) = first_n::<str>(1, "451 4.2.1 Mailbox busy");
    let r = relay(
        SinkBehaviour::default().rcpt_reply(move |a| {
            if a == "later@sink.test" {
                later_once(a)
            } else {
                None
            }
        }),
        |o| o.delivery("retry_initial", "\"1s\""),
    )
    .await;
    let content = message("partial");
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<now@sink.test>", "<later@sink.test>"],
        &content,
    )
    .await;

    let msgs = r.sink.wait_for_messages(2, T).await;
    r.wait_spool_empty().await;
    assert_eq!(msgs.len(), 2, "{msgs:#?}");
    assert_eq!(msgs[0].rcpt_addresses(), ["now@sink.test"]);
    assert_eq!(
        msgs[1].rcpt_addresses(),
        ["later@sink.test"],
        "the retry is for the pending recipient only"
    );
    assert_eq!(without_origin(&msgs[0].data), without_origin(&msgs[1].data));
    prepended(&msgs[1].data, &content, false);
    let log = r.log();
    assert_eq!(
        outcomes(&lines_for(&log, "now@sink.test")),
        [("delivered".into(), 1)],
        "{log:#?}"
    );
    assert_eq!(
        outcomes(&lines_for(&log, "later@sink.test")),
        [("deferred".into(), 1), ("delivered".into(), 2)],
        "{log:#?}"
    );
    r.assert_no_dsn();
}

#[tokio::test]
async fn per_recipient_results_and_a_failure_dsn() {
    let r = relay(
        SinkBehaviour::default()
            .rcpt_reply(|a| (a == "bad@sink.test").then(|| "550 5.1.1 No such user".into())),
        |o| o,
    )
    .await;
    let content = message("per-rcpt");
    let id = send(
        &r.server,
        &format!("<{SENDER}> ENVID=env-77 RET=FULL"),
        &[
            "<good@sink.test>",
            "<bad@sink.test> ORCPT=rfc822;orig-bad@sink.test",
        ],
        &content,
    )
    .await;

    let msgs = r.sink.wait_for_messages(1, T).await;
    assert_eq!(msgs[0].rcpt_addresses(), ["good@sink.test"]);
    prepended(&msgs[0].data, &content, false);
    let dsns = r.bounces.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert_eq!(r.bounces.messages().len(), 1, "one DSN");
    assert_eq!(r.sink.messages().len(), 1);
    let m = &dsns[0];
    assert_eq!(m.rcpt_addresses(), [SENDER], "the DSN goes to the sender");
    let dsn = parse_dsn(m);
    assert_eq!(dsn.report_type, "delivery-status");
    assert_eq!(dsn.status_type, "message/delivery-status");
    assert_eq!(dsn.subject, "Undelivered Mail Returned to Sender");
    assert_eq!(dsn.field("Reporting-MTA"), Some(&*format!("dns; {HOST}")));
    assert_eq!(dsn.field("Original-Envelope-Id"), Some("env-77"));
    assert!(dsn.field("Arrival-Date").is_some(), "{dsn:#?}");
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; bad@sink.test"));
    assert_eq!(
        dsn.rcpt("Original-Recipient"),
        Some("rfc822;orig-bad@sink.test")
    );
    assert_eq!(dsn.rcpt("Action"), Some("failed"));
    assert_eq!(dsn.rcpt("Status"), Some("5.1.1"));
    let diag = dsn.rcpt("Diagnostic-Code").expect("Diagnostic-Code");
    assert!(
        diag.starts_with("smtp;") && diag.contains("550 5.1.1 No such user"),
        "{diag}"
    );
    assert!(dsn.text.contains("<bad@sink.test>"), "{}", dsn.text);
    assert_eq!(dsn.original_type, "message/rfc822", "RET=FULL");
    assert!(
        dsn.original.ends_with(&content),
        "the whole message is returned: {}",
        String::from_utf8_lossy(&dsn.original)
    );
    assert!(!dsn.text.contains("good@sink.test"), "{}", dsn.text);

    let log = r.log();
    let good = lines_for(&log, "good@sink.test");
    let bad = lines_for(&log, "bad@sink.test");
    assert_eq!(outcomes(&good), [("delivered".into(), 1)], "{log:#?}");
    assert_eq!(outcomes(&bad), [("bounced".into(), 1)], "{log:#?}");
    assert_eq!(bad[0]["queue_id"], id.to_string());
    assert!(bad[0]["reply"].as_str().unwrap().starts_with("550 5.1.1"));
    // The DSN itself was delivered and logged with the null sender.
    let dsn_lines: Vec<_> = log.iter().filter(|l| l["sender"] == "").collect();
    assert_eq!(dsn_lines.len(), 1, "{log:#?}");
    assert_eq!(dsn_lines[0]["recipient"], SENDER);
    assert_eq!(dsn_lines[0]["outcome"], "delivered");
}

#[tokio::test]
async fn temporary_failure_is_retried_and_delivered() {
    let (calls, reply) = first_n::<ReceivedMessage>(1, "451 4.3.0 Try again later");
    let r = relay(SinkBehaviour::default().data_reply(reply), |o| {
        o.delivery("retry_initial", "\"1s\"")
    })
    .await;
    let content = message("retry-once");
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<x@sink.test>"],
        &content,
    )
    .await;

    let msgs = r.sink.wait_for_messages(2, T).await;
    r.wait_spool_empty().await;
    assert_eq!(calls.load(Ordering::SeqCst), 2, "exactly two attempts");
    assert!(msgs[0].reply.starts_with("451"), "{:?}", msgs[0].reply);
    assert!(msgs[1].reply.starts_with("250"), "{:?}", msgs[1].reply);
    assert_eq!(
        without_origin(&msgs[0].data),
        without_origin(&msgs[1].data),
        "the same message both times"
    );
    prepended(&msgs[1].data, &content, false);

    let log = r.log();
    let lines = lines_for(&log, "x@sink.test");
    assert_eq!(
        outcomes(&lines),
        [("deferred".into(), 1), ("delivered".into(), 2)],
        "{log:#?}"
    );
    assert!(lines[0]["reply"].as_str().unwrap().starts_with("451 4.3.0"));
    let d0 = lines[0]["delay_s"].as_f64().unwrap();
    let d1 = lines[1]["delay_s"].as_f64().unwrap();
    assert!(
        d1 - d0 >= 0.9,
        "retried after retry_initial: {d0} then {d1}"
    );
    r.assert_no_dsn();
}

#[tokio::test]
async fn message_expires_with_a_dsn() {
    let r = relay(
        SinkBehaviour::default().rcpt_reply(|_| Some("451 4.3.0 Mailbox busy".into())),
        |o| {
            o.delivery("retry_initial", "\"1s\"")
                .spool("max_age", "\"3s\"")
        },
    )
    .await;
    let id = send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<late@sink.test>"],
        &message("expiry"),
    )
    .await;

    let dsns = r.bounces.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert!(r.sink.messages().is_empty(), "never accepted");
    let dsn = parse_dsn(&dsns[0]);
    assert_eq!(dsn.rcpt("Action"), Some("failed"));
    assert_eq!(dsn.rcpt("Status"), Some("4.4.7"));
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; late@sink.test"));
    let diag = dsn.rcpt("Diagnostic-Code").unwrap_or_default();
    assert!(diag.contains("451 4.3.0 Mailbox busy"), "{dsn:#?}");
    assert_eq!(dsn.subject, "Undelivered Mail Returned to Sender");
    assert_eq!(r.bounces.messages().len(), 1, "one DSN");
    // tern's own bounce parser reads tern's DSN back.
    let report = tern::bounce::parse(
        &dsns[0].data,
        &tern::bounce::classify::Classifier::defaults(),
    );
    assert_eq!(
        serde_json::to_value(&report).unwrap()["recipients"][0],
        serde_json::json!({
            "address": "late@sink.test",
            "status": "4.4.7",
            "action": "failed",
            "diagnostic": "451 4.3.0 Mailbox busy",
            "category": "expired",
            "reason": "expired",
            "hard": false
        }),
        "{report:?}"
    );

    let log = r.log();
    let lines = lines_for(&log, "late@sink.test");
    assert_eq!(lines.last().unwrap()["category"], "expired", "{log:#?}");
    let outs = outcomes(&lines);
    assert!(outs.len() >= 2, "{log:#?}");
    let (last, before) = outs.split_last().unwrap();
    assert_eq!(last.0, "expired", "{log:#?}");
    assert!(before.iter().all(|(o, _)| o == "deferred"), "{log:#?}");
    let attempts: Vec<u64> = outs.iter().map(|(_, a)| *a).collect();
    assert_eq!(
        attempts,
        (1..=outs.len() as u64).collect::<Vec<_>>(),
        "attempts count up"
    );
    assert!(
        lines.last().unwrap()["delay_s"].as_f64().unwrap() >= 3.0,
        "expired only after max_age: {log:#?}"
    );
    assert!(lines.iter().all(|l| l["queue_id"] == id.to_string()));
}

#[tokio::test]
async fn one_delay_notice_then_delivery() {
    // Refused three times: attempts 2 and 3 both come after delay_notice_after, yet only one
    // "delayed" DSN may be sent; the fourth attempt delivers.
    let (calls, reply) = first_n::<str>(3, "451 4.3.0 Greylisted");
    let r = relay(SinkBehaviour::default().rcpt_reply(reply), |o| {
        o.delivery("retry_initial", "\"1s\"")
            .delivery("retry_factor", 1)
            .delivery("delay_notice_after", "\"1s\"")
    })
    .await;
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<slow@sink.test>"],
        &message("delay-notice"),
    )
    .await;

    r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert_eq!(calls.load(Ordering::SeqCst), 4, "four attempts");
    let log = r.log();
    assert_eq!(
        outcomes(&lines_for(&log, "slow@sink.test")),
        [
            ("deferred".into(), 1),
            ("deferred".into(), 2),
            ("deferred".into(), 3),
            ("delivered".into(), 4)
        ],
        "{log:#?}"
    );
    let dsns = r.bounces.messages();
    assert_eq!(dsns.len(), 1, "exactly one DSN, the delay notice");
    let dsn = parse_dsn(&dsns[0]);
    assert_eq!(dsn.subject, "Delayed Mail (still being retried)");
    assert_eq!(dsn.rcpt("Action"), Some("delayed"));
    assert_eq!(dsn.rcpt("Status"), Some("4.3.0"));
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; slow@sink.test"));
    assert!(dsn.rcpt("Will-Retry-Until").is_some(), "{dsn:#?}");
}

#[tokio::test]
async fn failed_attempts_are_logged_with_their_bounce_category() {
    let r = relay(
        SinkBehaviour::default().rcpt_reply(|rcpt| {
            if rcpt.contains("gone@") {
                Some("550 5.1.1 <gone@sink.test>: Recipient address rejected: User unknown".into())
            } else if rcpt.contains("full@") {
                Some("452 4.2.2 Mailbox full, try later".into())
            } else if rcpt.contains("listed@") {
                Some("554 5.7.1 Client host blocked using zen.spamhaus.org".into())
            } else {
                None
            }
        }),
        |o| o,
    )
    .await;
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &[
            "<gone@sink.test>",
            "<full@sink.test>",
            "<listed@sink.test>",
            "<fine@sink.test>",
        ],
        &message("categories"),
    )
    .await;
    let lines = wait_log(r.server.dir.path(), "for every recipient", |_| {
        log_lines(r.server.dir.path()).len() >= 4
    })
    .await;
    let category = |rcpt: &str| lines_for(&lines, rcpt)[0]["category"].clone();
    assert_eq!(category("gone@sink.test"), "invalid_recipient");
    assert_eq!(category("full@sink.test"), "mailbox_full");
    assert_eq!(category("listed@sink.test"), "spam_block");
    assert_eq!(category("fine@sink.test"), Value::Null);
    assert_eq!(
        lines_for(&lines, "full@sink.test")[0]["outcome"],
        "deferred"
    );
}

#[tokio::test]
async fn notify_never_suppresses_the_failure_dsn() {
    let r = relay(
        SinkBehaviour::default().rcpt_reply(|_| Some("550 5.1.1 No such user".into())),
        |o| o,
    )
    .await;
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<quiet@sink.test> NOTIFY=NEVER"],
        &message("notify-never"),
    )
    .await;
    wait_log(r.server.dir.path(), "bounced", |l| {
        l["outcome"] == "bounced"
    })
    .await;
    r.wait_spool_empty().await;
    r.assert_no_dsn();
}

#[tokio::test]
async fn notify_success_gives_a_delivered_dsn() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<happy@sink.test> NOTIFY=SUCCESS"],
        &message("notify-success"),
    )
    .await;
    let dsns = r.bounces.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert_eq!(r.sink.messages().len(), 1);
    assert_eq!(r.bounces.messages().len(), 1);
    let dsn = parse_dsn(&dsns[0]);
    assert_eq!(dsn.subject, "Successful Mail Delivery Report");
    assert_eq!(dsn.rcpt("Action"), Some("delivered"));
    assert_eq!(dsn.rcpt("Status"), Some("2.0.0"));
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; happy@sink.test"));
    assert!(
        dsn.rcpt("Diagnostic-Code")
            .is_some_and(|d| d.contains("250 2.0.0")),
        "{dsn:#?}"
    );
}

#[tokio::test]
async fn null_sender_never_gets_a_dsn() {
    let r = relay(
        SinkBehaviour::default().rcpt_reply(|_| Some("550 5.1.1 No such user".into())),
        |o| o,
    )
    .await;
    send(
        &r.server,
        "<>",
        &["<gone@sink.test>"],
        &message("null-sender"),
    )
    .await;
    wait_log(r.server.dir.path(), "bounced", |l| {
        l["outcome"] == "bounced"
    })
    .await;
    r.wait_spool_empty().await;
    // The spool is empty, so no DSN can still be on its way; a short bounded wait anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    r.assert_no_dsn();
    assert!(r.server.envelopes().is_empty());
    let log = r.log();
    assert_eq!(log.len(), 1, "one attempt, nothing else: {log:#?}");
}

#[tokio::test]
async fn stalled_data_end_times_out_and_is_retried() {
    let r = relay(
        SinkBehaviour::default().fault_first(1, SinkPhase::DataEnd, Fault::Stall),
        |o| {
            o.delivery("retry_initial", "\"1s\"")
                .delivery("timeouts.data_end", "\"1s\"")
                .delivery("watchdog", "\"2s\"")
        },
    )
    .await;
    let content = message("stall");
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<s@sink.test>"],
        &content,
    )
    .await;

    // Deferred, not lost: still in the spool with the attempt counted (for retry_initial).
    wait_for("a deferred envelope", T, || {
        r.server
            .envelopes()
            .first()
            .is_some_and(|e| e.attempts >= 1)
    })
    .await;
    assert!(r.sink.messages().is_empty(), "nothing delivered yet");
    let msgs = r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert_eq!(msgs.len(), 1, "{msgs:#?}");
    assert_eq!(msgs[0].session, 1, "delivered on a new connection");
    prepended(&msgs[0].data, &content, false);
    assert!(
        r.sink.session_log(0).closed,
        "the stalled connection was dropped"
    );
    let log = r.log();
    let lines = lines_for(&log, "s@sink.test");
    assert_eq!(
        outcomes(&lines),
        [("deferred".into(), 1), ("delivered".into(), 2)],
        "{log:#?}"
    );
    let reply = lines[0]["reply"].as_str().unwrap();
    assert!(reply.contains("timed out"), "{reply}");
    r.assert_no_dsn();
}

#[tokio::test]
async fn a_deferred_message_is_retried_when_due() {
    let (_, reply) = first_n::<str>(1, "451 4.3.0 Try again later");
    let r = relay(SinkBehaviour::default().rcpt_reply(reply), |o| {
        o.delivery("retry_initial", "\"1s\"")
    })
    .await;
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<soon@sink.test>"],
        &message("retry-when-due"),
    )
    .await;
    r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    let log = r.log();
    let lines = lines_for(&log, "soon@sink.test");
    assert_eq!(
        outcomes(&lines),
        [("deferred".into(), 1), ("delivered".into(), 2)],
        "{log:#?}"
    );
    let gap = lines[1]["delay_s"].as_f64().unwrap() - lines[0]["delay_s"].as_f64().unwrap();
    assert!(
        (0.9..2.5).contains(&gap),
        "retry_initial = 1s, but the retry came {gap:.1} s after the deferral"
    );
}
