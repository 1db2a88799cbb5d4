//! The admin queue API over real HTTP against the in-process daemon, with real SMTP sinks as
//! destinations: each call's effect is checked in the spool and in what the sinks receive
//! (suspend/resume, restart persistence, retry now, hold/release, bounce with its DSN, delete
//! without one), the in-flight races (delete, bounce and hold while the sink holds the
//! message's delivery open), and the error answers.

use std::time::Duration;

use serde_json::{json, Value};

use crate::delivery::*;
use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};

/// How long "nothing arrives" is watched for: several due-loader rounds (5 s apart at most,
/// but new and released mail is handled at once).
const QUIET: Duration = Duration::from_millis(1500);

async fn post(server: &TestServer, path: &str, body: Value) -> Value {
    let (status, answer) = server.api("POST", path, Some(&body)).await;
    assert_eq!(status, 200, "POST {path} {body}: {answer}");
    answer
}

async fn get(server: &TestServer, path: &str) -> Value {
    let (status, answer) = server.api("GET", path, None).await;
    assert_eq!(status, 200, "GET {path}: {answer}");
    answer
}

async fn send_one(server: &TestServer, rcpt: &str, marker: &str) -> tern_queue::MessageId {
    send(
        server,
        &format!("<{SENDER}>"),
        &[&format!("<{rcpt}>")],
        &message(marker),
    )
    .await
}

#[tokio::test]
async fn a_suspended_destination_gets_nothing_until_resumed_and_others_flow() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    let answer = post(
        &r.server,
        "/api/v1/queue/suspend",
        json!({"destination": "Sink.Test", "reason": "maintenance"}),
    )
    .await;
    assert_eq!(answer["suspended"]["destination"], "sink.test");
    assert_eq!(answer["suspended"]["until_ms"], Value::Null);

    let held_back = send_one(&r.server, "a@sink.test", "suspended").await;
    // Another destination keeps flowing meanwhile.
    send_one(&r.server, "b@sender.test", "flowing").await;
    r.bounces.wait_for_messages(1, T).await;
    tokio::time::sleep(QUIET).await;
    assert!(
        r.sink.messages().is_empty(),
        "suspended destination got mail"
    );
    let env = r.server.envelope(held_back);
    assert!(env.parked, "{env:?}");
    assert_eq!(env.attempts, 0, "a suspension is not an attempt");

    let summary = get(&r.server, "/api/v1/queue/summary").await;
    let row = &summary["destinations"][0];
    assert_eq!(row["destination"], "sink.test", "{summary}");
    assert_eq!(row["messages"], 1);
    assert_eq!(row["pending_recipients"], 1);
    assert_eq!(row["suspended"]["reason"], "maintenance");
    assert_eq!(summary["totals"]["messages"], 1);
    assert_eq!(summary["suspended_all"], Value::Null);
    let listed = get(&r.server, "/api/v1/queue/messages?destination=sink.test").await;
    assert_eq!(
        listed["messages"][0]["next_due_ms"],
        Value::Null,
        "{listed}"
    );
    assert_eq!(listed["messages"][0]["parked"], true);

    let answer = post(
        &r.server,
        "/api/v1/queue/resume",
        json!({"destination": "sink.test"}),
    )
    .await;
    assert_eq!(answer["resumed"], true);
    let msgs = r.sink.wait_for_messages(1, T).await;
    assert_eq!(msgs[0].rcpt_addresses(), ["a@sink.test"]);
    r.wait_spool_empty().await;
    // The log is written by its own thread: wait for the line rather than race it.
    let log = wait_log(r.server.dir.path(), "of the delivery", |l| {
        l["recipient"] == "a@sink.test" && l["outcome"] == "delivered"
    })
    .await;
    assert_eq!(
        outcomes(&lines_for(&log, "a@sink.test")),
        [("delivered".into(), 1)],
        "one attempt in all: {log:#?}"
    );
    assert!(
        get(&r.server, "/api/v1/queue/suspensions").await["suspensions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn suspensions_survive_a_restart_and_a_timed_one_ends_by_itself() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let options = || {
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .route("sender.test", bounces.addr)
    };
    let server = TestServer::start(options()).await;
    post(
        &server,
        "/api/v1/queue/suspend",
        json!({"destination": "sink.test", "reason": "blocklisted"}),
    )
    .await;
    post(
        &server,
        "/api/v1/queue/suspend",
        json!({"destination": "sender.test", "duration": "3s"}),
    )
    .await;
    send_one(&server, "a@sink.test", "before-restart").await;

    let server = server.restart(options()).await;
    let list = get(&server, "/api/v1/queue/suspensions").await;
    let list = list["suspensions"].as_array().unwrap().clone();
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[0]["destination"], "sender.test");
    assert!(list[0]["until_ms"].is_u64());
    assert_eq!(list[1]["destination"], "sink.test");
    assert_eq!(list[1]["reason"], "blocklisted");

    // The timed suspension ends by itself: mail parked behind it goes when it does.
    send_one(&server, "b@sender.test", "timed").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(bounces.messages().is_empty(), "sender.test is suspended");
    bounces.wait_for_messages(1, T).await;
    assert!(sink.messages().is_empty(), "sink.test is still suspended");

    post(
        &server,
        "/api/v1/queue/resume",
        json!({"destination": "sink.test"}),
    )
    .await;
    sink.wait_for_messages(1, T).await;
    wait_spool_empty(&server).await;
    assert!(
        get(&server, "/api/v1/queue/suspensions").await["suspensions"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    server.stop().await;
}

#[tokio::test]
async fn suspending_all_delivery_integrates_the_config_flag() {
    // The harness's config flag `delivery.suspended = true` shows as a suspension of all.
    let r = relay(SinkBehaviour::default(), |o| {
        o.delivery("suspended", "true")
    })
    .await;
    let list = get(&r.server, "/api/v1/queue/suspensions").await;
    assert_eq!(list["suspensions"][0]["destination"], Value::Null, "{list}");
    send_one(&r.server, "a@sink.test", "all").await;
    tokio::time::sleep(QUIET).await;
    assert!(r.sink.messages().is_empty());

    let answer = post(&r.server, "/api/v1/queue/resume", json!({})).await;
    assert_eq!(answer["resumed"], true);
    r.sink.wait_for_messages(1, T).await;

    // Suspend everything through the API: nothing goes, then everything does.
    post(&r.server, "/api/v1/queue/suspend", json!({"reason": "all"})).await;
    let summary = get(&r.server, "/api/v1/queue/summary").await;
    assert_eq!(summary["suspended_all"]["reason"], "all", "{summary}");
    send_one(&r.server, "b@sink.test", "all-2").await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(r.sink.messages().len(), 1);
    post(&r.server, "/api/v1/queue/resume", json!({})).await;
    r.sink.wait_for_messages(2, T).await;
    r.wait_spool_empty().await;
}

#[tokio::test]
async fn retry_now_delivers_a_deferred_message_at_once() {
    let (_, reply) = first_n::<str>(1, "451 4.3.0 Try again later");
    let r = relay(SinkBehaviour::default().rcpt_reply(reply), |o| {
        o.delivery("retry_initial", "\"1h\"")
    })
    .await;
    let id = send_one(&r.server, "x@sink.test", "flush").await;
    wait_for("a deferral", T, || {
        r.server
            .envelopes()
            .first()
            .is_some_and(|e| e.attempts == 1)
    })
    .await;
    let answer = post(
        &r.server,
        "/api/v1/queue/retry",
        json!({"destination": "sink.test"}),
    )
    .await;
    assert_eq!(answer, json!({"matched": 1, "affected": 1}));
    let msgs = r.sink.wait_for_messages(1, Duration::from_secs(5)).await;
    assert_eq!(msgs[0].rcpt_addresses(), ["x@sink.test"]);
    r.wait_spool_empty().await;
    // Retrying what is gone is a 404.
    let (status, body) = r
        .server
        .api(
            "POST",
            "/api/v1/queue/retry",
            Some(&json!({"id": id.to_string()})),
        )
        .await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn held_mail_is_not_delivered_until_released() {
    let r = relay(SinkBehaviour::default(), |o| {
        o.delivery("suspended", "true")
    })
    .await;
    let id = send_one(&r.server, "h@sink.test", "held").await;
    let answer = post(
        &r.server,
        "/api/v1/queue/hold",
        json!({"sender": SENDER.to_uppercase()}),
    )
    .await;
    assert_eq!(answer["affected"], 1);
    // Holding again changes nothing.
    let answer = post(&r.server, "/api/v1/queue/hold", json!({"all": true})).await;
    assert_eq!(answer, json!({"matched": 1, "affected": 0}));
    post(&r.server, "/api/v1/queue/resume", json!({})).await;
    tokio::time::sleep(QUIET).await;
    assert!(r.sink.messages().is_empty(), "held mail was delivered");
    let env = r.server.envelope(id);
    assert!(env.held && env.attempts == 0, "{env:?}");
    let held = get(&r.server, "/api/v1/queue/messages?held=true").await;
    assert_eq!(held["messages"][0]["id"], id.to_string(), "{held}");
    assert_eq!(held["messages"][0]["next_due_ms"], Value::Null);
    let summary = get(&r.server, "/api/v1/queue/summary").await;
    assert_eq!(summary["totals"]["held"], 1);

    let answer = post(
        &r.server,
        "/api/v1/queue/release",
        json!({"ids": [id.to_string()]}),
    )
    .await;
    assert_eq!(answer["affected"], 1);
    r.sink.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
}

#[tokio::test]
async fn bounce_sends_one_dsn_and_removes_the_message() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    post(
        &r.server,
        "/api/v1/queue/suspend",
        json!({"destination": "sink.test"}),
    )
    .await;
    let id = send(
        &r.server,
        &format!("<{SENDER}> ENVID=admin-1"),
        &["<one@sink.test>", "<two@sink.test> NOTIFY=NEVER"],
        &message("bounce"),
    )
    .await;
    let answer = post(
        &r.server,
        "/api/v1/queue/bounce",
        json!({"id": id.to_string()}),
    )
    .await;
    assert_eq!(answer["affected"], 1);
    let dsns = r.bounces.wait_for_messages(1, T).await;
    r.wait_spool_empty().await;
    assert_eq!(r.bounces.messages().len(), 1, "one DSN");
    assert_eq!(dsns[0].rcpt_addresses(), [SENDER]);
    let dsn = parse_dsn(&dsns[0]);
    assert_eq!(dsn.field("Original-Envelope-Id"), Some("admin-1"));
    // NOTIFY=NEVER is honoured: only the first recipient is reported.
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; one@sink.test"));
    assert_eq!(dsn.rcpt("Action"), Some("failed"));
    assert_eq!(dsn.rcpt("Status"), Some("5.0.0"));
    let diag = dsn.rcpt("Diagnostic-Code").unwrap_or_default().to_string();
    assert!(diag.contains("bounced by the administrator"), "{dsn:#?}");

    post(
        &r.server,
        "/api/v1/queue/resume",
        json!({"destination": "sink.test"}),
    )
    .await;
    tokio::time::sleep(QUIET).await;
    assert!(
        r.sink.messages().is_empty(),
        "a bounced message was delivered"
    );
    let log = r.log();
    for rcpt in ["one@sink.test", "two@sink.test"] {
        let lines = lines_for(&log, rcpt);
        assert_eq!(lines.len(), 1, "{log:#?}");
        assert_eq!(lines[0]["outcome"], "bounced");
        assert!(lines[0]["reply"]
            .as_str()
            .unwrap()
            .contains("administrator"));
    }
}

#[tokio::test]
async fn delete_removes_without_a_dsn() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    post(
        &r.server,
        "/api/v1/queue/suspend",
        json!({"destination": "sink.test"}),
    )
    .await;
    send_one(&r.server, "d@sink.test", "delete-me").await;
    let keep = send(&r.server, "<>", &["<k@sink.test>"], &message("keep")).await;
    let answer = post(&r.server, "/api/v1/queue/delete", json!({"sender": SENDER})).await;
    assert_eq!(answer, json!({"matched": 1, "affected": 1}));
    let left = r.server.envelopes();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0].id, keep);
    // The null sender is selected by "".
    let answer = post(&r.server, "/api/v1/queue/delete", json!({"sender": ""})).await;
    assert_eq!(answer["affected"], 1);
    r.wait_spool_empty().await;
    post(
        &r.server,
        "/api/v1/queue/resume",
        json!({"destination": "sink.test"}),
    )
    .await;
    tokio::time::sleep(QUIET).await;
    assert!(r.sink.messages().is_empty(), "deleted mail was delivered");
    r.assert_no_dsn();
    let log = r.log();
    assert_eq!(lines_for(&log, "d@sink.test")[0]["outcome"], "deleted");
}

/// Waits until the sink has the message's content and is holding back its reply.
async fn wait_in_flight(r: &Relay) {
    r.sink
        .wait_until("DATA in progress", T, |s| {
            s.session_logs().iter().any(|l| l.has_verb("DATA"))
        })
        .await;
}

#[tokio::test]
async fn delete_during_an_attempt_is_not_undone_by_its_outcome() {
    // One recipient is refused at RCPT, the other deferred (451) 2 s after the content:
    // without the guard the settle would send a DSN for the refused one (about a message
    // the operator deleted) and try to write the deferral back.
    let (calls, reply) = first_n::<crate::sink::ReceivedMessage>(1, "451 4.3.0 Later");
    let r = relay(
        SinkBehaviour::default()
            .rcpt_reply(|a| (a == "perm@sink.test").then(|| "550 5.1.1 No such user".into()))
            .data_delay(Duration::from_secs(2))
            .data_reply(reply),
        |o| o.delivery("retry_initial", "\"1s\""),
    )
    .await;
    let id = send(
        &r.server,
        &format!("<{SENDER}>"),
        &["<perm@sink.test>", "<temp@sink.test>"],
        &message("race-delete"),
    )
    .await;
    wait_in_flight(&r).await;
    let answer = post(
        &r.server,
        "/api/v1/queue/delete",
        json!({"id": id.to_string()}),
    )
    .await;
    assert_eq!(answer["affected"], 1);
    wait_log(r.server.dir.path(), "of the attempt", |l| {
        l["outcome"] == "deferred"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "not retried"
    );
    r.server.assert_spool_empty();
    r.assert_no_dsn();
}

#[tokio::test]
async fn bounce_during_an_attempt_gives_exactly_one_dsn() {
    // The attempt itself fails permanently: the settle would send a second DSN.
    let r = relay(
        SinkBehaviour::default()
            .data_delay(Duration::from_secs(2))
            .data_reply(|_| Some("550 5.7.1 Rejected".into())),
        |o| o,
    )
    .await;
    let id = send_one(&r.server, "race@sink.test", "race-bounce").await;
    wait_in_flight(&r).await;
    let answer = post(
        &r.server,
        "/api/v1/queue/bounce",
        json!({"id": id.to_string()}),
    )
    .await;
    assert_eq!(answer["affected"], 1);
    wait_log(r.server.dir.path(), "of the attempt", |l| {
        l["reply"].as_str().is_some_and(|t| t.starts_with("550"))
    })
    .await;
    r.wait_spool_empty().await;
    tokio::time::sleep(QUIET).await;
    let dsns = r.bounces.messages();
    assert_eq!(dsns.len(), 1, "exactly one DSN");
    let dsn = parse_dsn(&dsns[0]);
    assert_eq!(dsn.rcpt("Status"), Some("5.0.0"));
}

#[tokio::test]
async fn hold_during_an_attempt_survives_its_outcome() {
    let (calls, reply) = first_n::<crate::sink::ReceivedMessage>(1, "451 4.3.0 Later");
    let r = relay(
        SinkBehaviour::default()
            .data_delay(Duration::from_secs(2))
            .data_reply(reply),
        |o| o.delivery("retry_initial", "\"1s\""),
    )
    .await;
    let id = send_one(&r.server, "race@sink.test", "race-hold").await;
    wait_in_flight(&r).await;
    post(
        &r.server,
        "/api/v1/queue/hold",
        json!({"id": id.to_string()}),
    )
    .await;
    wait_log(r.server.dir.path(), "of the attempt", |l| {
        l["outcome"] == "deferred"
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "no retry while held"
    );
    let env = r.server.envelope(id);
    assert!(env.held, "{env:?}");
    assert_eq!(env.attempts, 1, "the attempt was recorded");
    post(
        &r.server,
        "/api/v1/queue/release",
        json!({"id": id.to_string()}),
    )
    .await;
    r.sink.wait_for_messages(2, T).await;
    r.wait_spool_empty().await;
}

#[tokio::test]
async fn list_pages_and_show_returns_the_message() {
    let server = TestServer::start(Options::default()).await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(send_one(&server, &format!("r{i}@sink.test"), &format!("list-{i}")).await);
    }
    send_one(&server, "x@other.test", "list-other").await;

    let page = get(
        &server,
        "/api/v1/queue/messages?destination=sink.test&limit=2",
    )
    .await;
    let got: Vec<&str> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[0].to_string(), ids[1].to_string()]);
    assert_eq!(page["next"], ids[1].to_string());
    let rest = get(
        &server,
        &format!(
            "/api/v1/queue/messages?destination=sink.test&limit=2&after={}",
            ids[1]
        ),
    )
    .await;
    assert_eq!(rest["messages"].as_array().unwrap().len(), 1);
    assert_eq!(rest["messages"][0]["id"], ids[2].to_string());
    assert_eq!(rest["next"], Value::Null);
    let m = &rest["messages"][0];
    assert_eq!(m["sender"], SENDER);
    assert_eq!(m["recipients"][0]["address"], "r2@sink.test");
    assert_eq!(m["recipients"][0]["state"], "pending");
    assert!(m["size"].as_u64().unwrap() > 0);
    let all = get(&server, "/api/v1/queue/messages").await;
    assert_eq!(all["messages"].as_array().unwrap().len(), 4);

    let one = get(
        &server,
        &format!("/api/v1/queue/messages/{}?body=true", ids[0]),
    )
    .await;
    assert_eq!(one["destination"], "sink.test");
    assert!(
        one["body"].as_str().unwrap().contains("Subject: list-0"),
        "{one}"
    );
    let no_body = get(&server, &format!("/api/v1/queue/messages/{}", ids[0])).await;
    assert!(no_body.get("body").is_none());
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let server = TestServer::start(Options::default()).await;
    let id = send_one(&server, "e@sink.test", "errors").await;
    let token = server.admin_token();
    let cases: &[(&str, &str, Option<&str>, u16)] = &[
        ("POST", "/api/v1/queue/hold", Some("{not json"), 400),
        ("POST", "/api/v1/queue/hold", Some("{}"), 400),
        ("POST", "/api/v1/queue/hold", Some(r#"{"all": false}"#), 400),
        ("POST", "/api/v1/queue/hold", Some(r#"{"idz": "x"}"#), 400),
        (
            "POST",
            "/api/v1/queue/delete",
            Some(r#"{"all": true}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/queue/bounce",
            Some(r#"{"all": true}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/queue/hold",
            Some(r#"{"id": "not-an-id"}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/queue/hold",
            Some(r#"{"id": "00063F0000000000"}"#),
            404,
        ),
        (
            "POST",
            "/api/v1/queue/suspend",
            Some(r#"{"duration": "soon"}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/queue/suspend",
            Some(r#"{"destination": "a b"}"#),
            400,
        ),
        (
            "POST",
            "/api/v1/queue/suspend",
            Some(r#"{"until": "2h"}"#),
            400,
        ),
        ("POST", "/api/v1/queue/resume", Some("[]"), 400),
        ("GET", "/api/v1/queue/messages?limit=0", None, 400),
        ("GET", "/api/v1/queue/messages?limit=5000", None, 400),
        ("GET", "/api/v1/queue/messages?after=zzz", None, 400),
        ("GET", "/api/v1/queue/messages?colour=red", None, 400),
        ("GET", "/api/v1/queue/messages/00063F0000000000", None, 404),
        ("GET", "/api/v1/queue/messages/nonsense", None, 404),
    ];
    for &(method, path, body, want) in cases {
        let (status, text) = http(server.admin(), method, path, Some(&token), body).await;
        assert_eq!(status, want, "{method} {path} {body:?}: {text}");
        let json: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{method} {path}: {json}"
        );
    }
    // Nothing of that touched the message.
    let env = server.envelope(id);
    assert!(!env.held && !env.parked, "{env:?}");
    server.stop().await;
}
