//! Send-time optimisation through the admin API and the CLI: engagement events recorded,
//! machine opens counted but never learnt from, every bad input a 400 JSON error that
//! records nothing, the engagement score and the dormant query, the sunset policy (dormant
//! recipients suppressed, so their mail is refused), campaign windows, and the simulator.
//! (Held mail and `not_before` on the paused clock: tests/sendtime_clock.rs.)

use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};
use serde_json::{json, Value};

const DAY_MS: u64 = 86_400_000;

async fn events(server: &TestServer, events: Value) -> (u16, Value) {
    server
        .api("POST", "/api/v1/events", Some(&json!({ "events": events })))
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_recorded_and_machine_opens_are_not_learnt() {
    let server = TestServer::start(Options::default()).await;
    let now = tern::clock::now_ms();
    let (status, body) = events(
        &server,
        json!([
            {"type": "send", "recipient": "Ann@Example.test", "time_ms": now - 3 * 3_600_000, "tz_offset_minutes": 60},
            {"type": "open", "recipient": "ann@example.test", "time_ms": now - 3_600_000, "message_id": "<a@b>"},
            {"type": "click", "recipient": "ann@example.test", "time_ms": now - 3_000_000},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body,
        json!({"recorded": 3, "engagements": 2, "machine_opens": 0, "sends": 1})
    );
    let (status, before) = server
        .api("GET", "/api/v1/recipients/ann@example.test", None)
        .await;
    assert_eq!(status, 200, "{before}");
    assert_eq!(before["address"], "ann@example.test");
    assert_eq!(before["tz_offset_minutes"], 60);
    assert!(before["score"].as_f64().unwrap() > 0.0, "{before}");
    assert_eq!(before["dormant"], false);

    // A machine open changes nothing the model or the score uses.
    let (status, body) = events(
        &server,
        json!([{"type": "open", "recipient": "ann@example.test", "machine": true}]),
    )
    .await;
    assert_eq!((status, body["machine_opens"].as_u64()), (200, Some(1)));
    let (_, after) = server
        .api("GET", "/api/v1/recipients/ann@example.test", None)
        .await;
    assert_eq!(after["machine_opens"], 1);
    for field in ["engagements", "sends", "score", "last_engaged_ms"] {
        assert_eq!(after[field], before[field], "{field}");
    }
    let profile = server
        .daemon()
        .spool()
        .get_meta("sendtime/ann@example.test")
        .unwrap()
        .expect("the profile is in the spool's meta keyspace");
    assert!(profile.len() < 2200, "compact: {} bytes", profile.len());

    let (status, body) = server
        .api("GET", "/api/v1/recipients/nobody@example.test", None)
        .await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_events_are_refused_with_400_and_record_nothing() {
    let server = TestServer::start(Options::default()).await;
    let now = tern::clock::now_ms();
    let good = json!({"type": "open", "recipient": "bob@example.test", "time_ms": now});
    let cases = [
        (json!({"type": "open"}), "recipient"),
        (
            json!({"type": "glance", "recipient": "bob@example.test"}),
            "glance",
        ),
        (
            json!({"type": "open", "recipient": "not an address"}),
            "events[1].recipient",
        ),
        (
            json!({"type": "click", "recipient": "bob@example.test", "machine": true}),
            "events[1].machine",
        ),
        (
            json!({"type": "open", "recipient": "bob@example.test", "time_ms": now + 2 * DAY_MS}),
            "events[1].time_ms",
        ),
        (
            json!({"type": "open", "recipient": "bob@example.test", "tz_offset_minutes": 2000}),
            "events[1].tz_offset_minutes",
        ),
        (
            json!({"type": "open", "recipient": "bob@example.test", "message_id": ""}),
            "events[1].message_id",
        ),
        (
            json!({"type": "open", "recipient": "bob@example.test", "colour": "red"}),
            "colour",
        ),
    ];
    for (bad, needle) in cases {
        let (status, body) = events(&server, json!([good.clone(), bad.clone()])).await;
        assert_eq!(status, 400, "{bad}: {body}");
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{bad}: {error}");
    }
    let (status, body) = http(
        server.admin(),
        "POST",
        "/api/v1/events",
        Some(&server.admin_token()),
        Some("{not json"),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(serde_json::from_str::<Value>(&body).unwrap()["error"].is_string());
    // The valid event before each bad one was not recorded either.
    let (status, _) = server
        .api("GET", "/api/v1/recipients/bob@example.test", None)
        .await;
    assert_eq!(status, 404);
    // The API needs its token.
    let (status, _) = http(server.admin(), "POST", "/api/v1/events", None, Some("{}")).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dormant_recipients_are_listed() {
    let server = TestServer::start(Options::default()).await;
    let now = tern::clock::now_ms();
    let (status, body) = events(
        &server,
        json!([
            {"type": "open", "recipient": "old@example.test", "time_ms": now - 200 * DAY_MS},
            {"type": "send", "recipient": "never@example.test", "time_ms": now - 100 * DAY_MS},
            {"type": "open", "recipient": "fresh@example.test", "time_ms": now - DAY_MS},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server.api("GET", "/api/v1/recipients", None).await;
    assert_eq!(status, 200, "{body}");
    let names: Vec<&str> = body["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["old@example.test"], "default: 180 days");
    let (_, body) = server
        .api("GET", "/api/v1/recipients?dormant_after=90d", None)
        .await;
    let names: Vec<&str> = body["recipients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["address"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["never@example.test", "old@example.test"]);
    assert_eq!(body["recipients"][1]["dormant"], true);
    let (status, body) = server
        .api("GET", "/api/v1/recipients?dormant_after=soon", None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap().contains("dormant_after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_simulate_prints_the_policy_table() {
    let out = tokio::process::Command::new(tern_bin())
        .args(["sidecar", "simulate", "--seed", "3", "--users", "400"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let text = String::from_utf8(out.stdout).unwrap();
    for word in [
        "send-now",
        "global-best",
        "mode-hour",
        "tern",
        "oracle",
        "15+",
        "all",
    ] {
        assert!(text.contains(word), "{word}: {text}");
    }
    let again = tokio::process::Command::new(tern_bin())
        .args(["sidecar", "simulate", "--seed", "3", "--users", "400"])
        .output()
        .await
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap(), text, "seeded");
    let bad = tokio::process::Command::new(tern_bin())
        .args(["sidecar", "simulate", "--users", "5"])
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2), "clap usage error");
    let lifecycle = tokio::process::Command::new(tern_bin())
        .args([
            "sidecar",
            "simulate",
            "--lifecycle",
            "--seed",
            "2",
            "--users",
            "200",
        ])
        .output()
        .await
        .unwrap();
    assert_eq!(lifecycle.status.code(), Some(0));
    let text = String::from_utf8(lifecycle.stdout).unwrap();
    for word in [
        "Brier",
        "AUC",
        "sunset-only",
        "lifecycle",
        "reactivated",
        "suppressed mailed",
    ] {
        assert!(text.contains(word), "{word}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_actions_never_move_mail_before_its_send_time() {
    let server = TestServer::start(
        Options::default()
            .sendtime("control_share", "0.0")
            .sendtime("quiet_hours", "\"none\""),
    )
    .await;
    // Opened five hours after each send for eight weeks: the model holds new mail ~5 h.
    let now = tern::clock::now_ms();
    let week = 7 * DAY_MS;
    let mut history = Vec::new();
    for w in 1..=8 {
        let sent = now - w * week;
        history.push(json!({"type": "send", "recipient": "eve@sink.test", "time_ms": sent, "tz_offset_minutes": 0}));
        history.push(json!({"type": "open", "recipient": "eve@sink.test", "time_ms": sent + 5 * 3_600_000 + 600_000}));
    }
    assert_eq!(events(&server, json!(history)).await.0, 200);
    assert_eq!(
        server.api("POST", "/api/v1/sendtime/refit", None).await.0,
        200
    );

    let mut client = server.connect().await;
    client.ehlo().await;
    let id = client
        .submit(
            "a@example.test",
            &["eve@sink.test"],
            b"X-Tern-Send-Time: Optimize\r\nSubject: s\r\n\r\nb\r\n",
        )
        .await;
    let env = server.envelope(id);
    assert!(env.not_before_ms > now + 3 * 3_600_000, "{env:?}");
    assert_eq!(env.next_due_ms, env.not_before_ms);
    let select = json!({"id": id.to_string()});
    let (status, body) = server
        .api("POST", "/api/v1/queue/retry", Some(&select))
        .await;
    assert_eq!(
        (status, body["affected"].as_u64()),
        (200, Some(0)),
        "{body}"
    );
    assert_eq!(server.envelope(id).next_due_ms, env.not_before_ms);
    for action in ["hold", "release"] {
        let (status, body) = server
            .api("POST", &format!("/api/v1/queue/{action}"), Some(&select))
            .await;
        assert_eq!(
            (status, body["affected"].as_u64()),
            (200, Some(1)),
            "{body}"
        );
    }
    assert_eq!(server.envelope(id).next_due_ms, env.not_before_ms);

    // Without the header the same recipient's mail is due at once.
    let id = client
        .submit(
            "a@example.test",
            &["eve@sink.test"],
            b"Subject: s\r\n\r\nb\r\n",
        )
        .await;
    let env = server.envelope(id);
    assert_eq!((env.not_before_ms, env.next_due_ms), (0, env.created_ms));
}

/// `address`'s engagement record (`GET /api/v1/recipients/{address}`) once `done` holds.
async fn recipient_when(
    server: &TestServer,
    address: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = std::time::Instant::now() + crate::delivery::T;
    loop {
        let (status, body) = server
            .api("GET", &format!("/api/v1/recipients/{address}"), None)
            .await;
        if status == 200 && done(&body) {
            return body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{address}: {status} {body}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_arm_is_counted_for_lift() {
    let r = crate::delivery::relay(SinkBehaviour::default(), |o| {
        o.sendtime("control_share", "1.0")
    })
    .await;
    let server = &r.server;
    let mut client = server.connect().await;
    client.ehlo().await;
    let id = client
        .submit(
            "a@example.test",
            &["cat@sink.test", "dan@sink.test"],
            b"X-Tern-Send-Time: optimize\r\nSubject: s\r\n\r\nb\r\n",
        )
        .await;
    // The control arm goes at once.
    let env = server.envelope(id);
    assert_eq!((env.not_before_ms, env.next_due_ms), (0, env.created_ms));
    r.sink.wait_for_messages(2, crate::delivery::T).await;
    // Sends are counted once delivered.
    for rcpt in ["cat@sink.test", "dan@sink.test"] {
        recipient_when(server, rcpt, |b| b["history"]["sends"] == 1).await;
    }
    let (status, _) = events(
        server,
        json!([{"type": "click", "recipient": "cat@sink.test"}]),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        server.api("POST", "/api/v1/sendtime/refit", None).await.0,
        200
    );
    let (status, body) = server.api("GET", "/api/v1/sendtime/lift", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["control"]["sends"], 2);
    assert_eq!(body["control"]["engaged"], 1);
    assert_eq!(body["control"]["rate"], 0.5);
    assert_eq!(body["model"]["sends"], 0);
    assert_eq!(body["uplift"], Value::Null, "no model arm yet");
}

/// A planned send is recorded in the profile when it is delivered, at the delivery time: the
/// sink defers the first attempt (451) and the retry a second later delivers it; a recipient
/// the sink refuses (550) gets no send at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_sends_are_recorded_at_delivery_and_bounces_not_at_all() {
    let (calls, later_once) = crate::delivery::first_n::<str>(1, "451 4.3.0 Try again later");
    let sink = SinkBehaviour::default().rcpt_reply(move |rcpt| {
        if rcpt.contains("gone@") {
            Some("550 5.1.1 No such user".into())
        } else {
            later_once(rcpt)
        }
    });
    let r = crate::delivery::relay(sink, |o| {
        o.sendtime("control_share", "0.0")
            .sendtime("quiet_hours", "\"none\"")
            .delivery("retry_initial", "\"2s\"")
    })
    .await;
    let server = &r.server;
    // New recipients (no zone, no history): planned at once, in the model's arm.
    let mut client = server.connect().await;
    client.ehlo().await;
    let accepted = tern::clock::now_ms();
    client
        .submit(
            crate::delivery::SENDER,
            &["fay@sink.test", "gone@sink.test"],
            b"X-Tern-Send-Time: optimize\r\nSubject: s\r\n\r\nb\r\n",
        )
        .await;
    // Planned, not yet sent: nothing recorded as a send.
    let fay = recipient_when(server, "fay@sink.test", |_| true).await;
    assert_eq!(fay["history"]["sends"], 0, "{fay}");
    r.sink.wait_for_messages(1, crate::delivery::T).await;
    let delivered_seen = tern::clock::now_ms();
    let fay = recipient_when(server, "fay@sink.test", |b| b["history"]["sends"] == 1).await;
    let sent = fay["history"]["last_send_ms"].as_u64().unwrap();
    assert!(
        calls.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "deferred once, then delivered"
    );
    assert!(
        sent >= accepted + 1_500 && sent <= delivered_seen + 1_000,
        "the send is recorded when delivered (accepted {accepted}, recorded {sent}, delivery seen {delivered_seen})"
    );
    // The refused recipient's planned send is dropped: no send.
    r.wait_spool_empty().await;
    tokio::time::sleep(tern::sendtime::FLUSH_AFTER * 3).await;
    let gone = recipient_when(server, "gone@sink.test", |_| true).await;
    assert_eq!(gone["history"]["sends"], 0, "{gone}");
    assert_eq!(gone["last_send_ms"], Value::Null, "{gone}");
    // Mail the model did not plan: its delivery never touches (or creates) a profile.
    client
        .submit(
            crate::delivery::SENDER,
            &["plain@sink.test"],
            b"Subject: plain\r\n\r\nb\r\n",
        )
        .await;
    r.sink.wait_for_messages(2, crate::delivery::T).await;
    r.wait_spool_empty().await;
    tokio::time::sleep(tern::sendtime::FLUSH_AFTER * 3).await;
    let (status, plain) = server
        .api("GET", "/api/v1/recipients/plain@sink.test", None)
        .await;
    assert_eq!(status, 404, "no profile for unplanned mail: {plain}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaigns_send_window_and_quiet_hours_bound_the_planned_time() {
    const HOUR_MS: u64 = 3_600_000;
    let now = tern::clock::now_ms();
    // The recipient is in UTC+2; quiet hours cover their local hours 4 and 5 after now's,
    // the last two whole hours of the campaign's 6 h window.
    let offset_h = 2;
    let local_hour = |t: u64| ((t / HOUR_MS + offset_h) % 24) as u8;
    let quiet = ((local_hour(now) + 4) % 24, (local_hour(now) + 6) % 24);
    let campaign = format!(
        "[[sidecar.campaigns]]\nname = \"timed\"\nsubject = \"Hi\"\ntext = \"Hello\\n\"\n\
         send_window = \"6h\"\nquiet_hours = [{}, {}]\n",
        quiet.0, quiet.1
    );
    let server = TestServer::start(
        Options::default()
            .sendtime("control_share", "0.0")
            .sendtime("quiet_hours", "\"none\"")
            .extra(campaign),
    )
    .await;
    // Opened ten hours after each send for eight weeks: left alone, the model would hold
    // new mail about ten hours, past this campaign's window.
    let mut history = Vec::new();
    for w in 1..=8 {
        let sent = now - w * 7 * DAY_MS;
        history.push(json!({"type": "send", "recipient": "fay@sink.test", "time_ms": sent, "tz_offset_minutes": offset_h * 60}));
        history.push(json!({"type": "open", "recipient": "fay@sink.test", "time_ms": sent + 10 * HOUR_MS + 600_000}));
    }
    assert_eq!(events(&server, json!(history)).await.0, 200);
    assert_eq!(
        server.api("POST", "/api/v1/sendtime/refit", None).await.0,
        200
    );
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": ["fay@sink.test"],
                "raw": "From: news@example.com\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "timed", "send_time": "optimize"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let env = &server.envelopes()[0];
    let at = env.not_before_ms;
    assert!(at > now + HOUR_MS, "held toward the active hours: {env:?}");
    assert!(at < now + 6 * HOUR_MS, "inside the 6 h window: {env:?}");
    let h = local_hour(at);
    assert!(
        h != quiet.0 && h != (quiet.0 + 1) % 24,
        "local hour {h} is quiet ({quiet:?}): {env:?}"
    );
}

/// Sunset suppressions go through the daemon's one suppression list, so they are counted in
/// the registry `/metrics` exposes (the send-time service once built a list of its own with
/// a private registry, and `reason="sunset"` stayed 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sunset_suppressions_are_counted_in_the_daemons_metrics() {
    let server = TestServer::start(Options::default().sendtime("sunset_after", "\"30d\"")).await;
    let now = tern::clock::now_ms();
    let (status, body) = events(
        &server,
        json!([
            {"type": "send", "recipient": "dormant1@example.test", "time_ms": now - 60 * DAY_MS},
            {"type": "send", "recipient": "dormant2@example.test", "time_ms": now - 45 * DAY_MS},
            {"type": "send", "recipient": "awake@example.test", "time_ms": now - 60 * DAY_MS},
            {"type": "open", "recipient": "awake@example.test", "time_ms": now - DAY_MS},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let before = crate::metrics::scrape(server.admin()).await;
    assert_eq!(
        before
            .get("tern_suppression_changes_total{change=\"add\",reason=\"sunset\"}")
            .copied()
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(
        server.api("POST", "/api/v1/sendtime/refit", None).await.0,
        200
    );
    let after = crate::metrics::scrape(server.admin()).await;
    assert_eq!(
        crate::metrics::value(
            &after,
            "tern_suppression_changes_total{change=\"add\",reason=\"sunset\"}"
        ),
        2.0
    );
    assert_eq!(
        crate::metrics::value(&after, "tern_suppression_entries")
            - crate::metrics::value(&before, "tern_suppression_entries"),
        2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sunset_policy_suppresses_dormant_recipients_and_their_mail_is_refused() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .sendtime("sunset_after", "\"30d\""),
    )
    .await;
    let now = tern::clock::now_ms();
    let (status, body) = events(
        &server,
        json!([
            // Mailed for two months, never engaged: the recent send does not make them less
            // dormant.
            {"type": "send", "recipient": "never@sink.test", "time_ms": now - 60 * DAY_MS},
            {"type": "send", "recipient": "never@sink.test", "time_ms": now - 2 * DAY_MS},
            // Engaged once, 89 days ago.
            {"type": "send", "recipient": "lapsed@sink.test", "time_ms": now - 90 * DAY_MS},
            {"type": "open", "recipient": "lapsed@sink.test", "time_ms": now - 89 * DAY_MS},
            // Engaged yesterday.
            {"type": "send", "recipient": "fresh@sink.test", "time_ms": now - 60 * DAY_MS},
            {"type": "click", "recipient": "fresh@sink.test", "time_ms": now - DAY_MS},
        ]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    // An operator's entry is kept as it is.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": "lapsed@sink.test", "reason": "manual"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        server.api("POST", "/api/v1/sendtime/refit", None).await.0,
        200
    );

    let (status, entry) = server
        .api("GET", "/api/v1/suppressions/never@sink.test", None)
        .await;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["reason"], "sunset", "{entry}");
    assert_eq!(entry["expires_ms"], Value::Null, "{entry}");
    let (_, entry) = server
        .api("GET", "/api/v1/suppressions/lapsed@sink.test", None)
        .await;
    assert_eq!(entry["reason"], "manual", "{entry}");
    let (status, body) = server
        .api("GET", "/api/v1/suppressions/fresh@sink.test", None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (_, listed) = server
        .api("GET", "/api/v1/suppressions?reason=sunset", None)
        .await;
    assert_eq!(
        listed["entries"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );

    // The suppression policy (reject, the default) refuses the dormant recipient's mail;
    // the engaged one's is delivered.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<news@example.test>", 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<never@sink.test>", 550, "5.7.1").await;
    c.expect("RCPT TO:<fresh@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send("Subject: back\r\n\r\nhello\r\n.\r\n").await;
    c.reply().await.assert(250, "2.0.0");
    let delivered = sink
        .wait_for_messages(1, std::time::Duration::from_secs(20))
        .await;
    let rcpts: Vec<&str> = delivered[0]
        .rcpts
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(rcpts, ["fresh@sink.test"]);
}

/// A campaign's bandit holdout is its control group: those recipients are sent at once (no
/// planned window, no `send_time_planned`) although the model would hold them, and their
/// deliveries still count in the campaign's results; the other recipients are planned.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bandits_holdout_is_sent_at_once_and_counted() {
    const HOUR_MS: u64 = 3_600_000;
    let campaign =
        "[[sidecar.campaigns]]\nname = \"held\"\nsubject = \"Hi\"\ntext = \"Hello\\n\"\n\
                    send_window = \"12h\"\n\
                    [[sidecar.campaigns.variants]]\nid = \"a\"\n\
                    [sidecar.campaigns.bandit]\nholdout = 0.5\n";
    let r = crate::delivery::relay(SinkBehaviour::default(), |o| {
        o.sendtime("control_share", "0.0")
            .sendtime("quiet_hours", "\"none\"")
            .extra(campaign)
    })
    .await;
    let server = &r.server;
    let now = tern::clock::now_ms();
    // Everyone opened ten hours after each send for eight weeks: the model holds their mail
    // about ten hours.
    let people: Vec<String> = (0..16).map(|i| format!("r{i}@sink.test")).collect();
    let mut history = Vec::new();
    for who in &people {
        for w in 1..=8 {
            let sent = now - w * 7 * DAY_MS;
            history.push(
                json!({"type": "send", "recipient": who, "time_ms": sent, "tz_offset_minutes": 0}),
            );
            history.push(
                json!({"type": "open", "recipient": who, "time_ms": sent + 10 * HOUR_MS + 600_000}),
            );
        }
    }
    assert_eq!(events(server, json!(history)).await.0, 200);
    assert_eq!(
        server.api("POST", "/api/v1/sendtime/refit", None).await.0,
        200
    );
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": people,
                "raw": "From: news@example.com\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "held", "send_time": "optimize"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let (holdout, model): (Vec<&Value>, Vec<&Value>) = answer["sidecar"]
        .as_array()
        .unwrap()
        .iter()
        .partition(|r| r["variant"] == "holdout");
    assert!(
        !holdout.is_empty() && !model.is_empty(),
        "both arms drawn: {answer}"
    );
    // The holdout goes out at once ...
    let got = r
        .sink
        .wait_for_messages(holdout.len(), crate::delivery::T)
        .await;
    let mut delivered: Vec<&str> = got
        .iter()
        .flat_map(|m| m.rcpts.iter().map(|r| r.address.as_str()))
        .collect();
    delivered.sort_unstable();
    let mut want: Vec<&str> = holdout
        .iter()
        .map(|r| r["recipient"].as_str().unwrap())
        .collect();
    want.sort_unstable();
    assert_eq!(delivered, want);
    // ... and the rest waits for the time the model planned, flagged as planned.
    let mut waiting = server.envelopes();
    for _ in 0..100 {
        if waiting.len() <= model.len() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        waiting = server.envelopes();
    }
    assert_eq!(waiting.len(), model.len(), "{waiting:?}");
    for env in &waiting {
        assert!(env.send_time_planned, "{env:?}");
        assert!(env.not_before_ms > now + HOUR_MS, "held: {env:?}");
        let to = &env.recipients[0].address;
        assert!(
            model.iter().any(|r| r["recipient"] == to.as_str()),
            "{to} is not in the holdout"
        );
    }
    // The holdout's deliveries count in the campaign's results.
    let mut results = Value::Null;
    for _ in 0..100 {
        let (status, body) = server
            .api("GET", "/api/v1/campaigns/held/results", None)
            .await;
        assert_eq!(status, 200, "{body}");
        results = body;
        let sends = |v: &str| {
            results["variants"]
                .as_array()
                .unwrap()
                .iter()
                .find(|row| row["variant"] == v)
                .map(|row| row["sends"].as_u64().unwrap())
        };
        if sends("holdout") == Some(holdout.len() as u64) {
            assert_eq!(sends("a").unwrap_or(0), 0, "{results}");
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    panic!("holdout sends not counted: {results}");
}
