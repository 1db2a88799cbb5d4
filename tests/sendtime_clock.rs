//! Send-time optimisation end to end on tokio's paused clock: engagement events in through
//! the admin API, `X-Tern-Send-Time: optimize` at ingest, the `not_before` the model chose
//! kept across a restart, no attempt a second before it, and expiry still counted from
//! arrival.
//!
//! Same set-up as tests/retry_clock.rs (a blocking task held for the whole test stops
//! tokio's auto-advance; the test moves virtual time and waits in real time for the daemon).
//! A separate test binary, because following the runtime clock is process-wide.

#[path = "it/harness.rs"]
mod harness;
#[path = "it/paused_clock.rs"]
mod paused_clock;
#[path = "it/sink.rs"]
mod sink;

use std::time::Duration;

use harness::{Options, TestServer};
use paused_clock::{attempts_seen, hold_clock, pause_real, until};
use serde_json::json;
use sink::{Sink, SinkBehaviour};
use tern::clock::now_ms;

const HOUR_MS: u64 = 3_600_000;
const WEEK_MS: u64 = 7 * 24 * HOUR_MS;
const MAX_AGE_MS: u64 = 12 * HOUR_MS;

async fn advance_to(t_ms: u64) {
    let now = now_ms();
    if t_ms > now {
        tokio::time::advance(Duration::from_millis(t_ms - now)).await;
    }
    // Let the daemon act on what fell due.
    pause_real(Duration::from_millis(50)).await;
}

#[tokio::test(start_paused = true)]
async fn held_until_not_before_across_a_restart_and_expiry_still_holds() {
    tern::clock::follow_runtime_clock();
    let (stop_holding, holder) = hold_clock();

    let sink = Sink::start(SinkBehaviour::default()).await;
    let slow =
        Sink::start(SinkBehaviour::default().rcpt_reply(|_| Some("451 4.3.0 Mailbox busy".into())))
            .await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let opts = Options::default()
        .deliver()
        .route("sink.test", sink.addr)
        .route("slow.test", slow.addr)
        .route("sender.test", bounces.addr)
        .spool("max_age", "\"12h\"")
        .sendtime("control_share", "0.0")
        .sendtime("quiet_hours", "\"none\"");
    let server = TestServer::start(opts.clone()).await;

    // Eight weeks of history: each mail opened five hours after it was sent, at this hour
    // of the week plus five.
    let t0 = now_ms();
    let mut events = Vec::new();
    for rcpt in ["reader@sink.test", "late@slow.test"] {
        for w in 1..=8 {
            let sent = t0 - w * WEEK_MS;
            events.push(
                json!({"type": "send", "recipient": rcpt, "time_ms": sent, "tz_offset_minutes": 0}),
            );
            events.push(json!({"type": "open", "recipient": rcpt, "time_ms": sent + 5 * HOUR_MS + 600_000, "message_id": "m1"}));
        }
    }
    let (status, body) = server
        .api("POST", "/api/v1/events", Some(&json!({ "events": events })))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["engagements"], 16);
    let (status, body) = server.api("POST", "/api/v1/sendtime/refit", None).await;
    assert_eq!((status, body["recipients"].as_u64()), (200, Some(2)));

    let mut client = server.connect().await;
    client.ehlo().await;
    let id = client
        .submit(
            "sender@sender.test",
            &["reader@sink.test", "late@slow.test"],
            b"Subject: later\r\nX-Tern-Send-Time: optimize\r\n\r\nwhen you read\r\n",
        )
        .await;
    let created = server.envelope(id).created_ms;
    assert_eq!(created, t0, "no virtual time passed while accepting");
    let envs = server.envelopes();
    assert_eq!(envs.len(), 2, "one part per recipient");
    let not_before = |domain: &str| {
        let env = envs.iter().find(|e| e.destination == domain).unwrap();
        assert_eq!(env.next_due_ms, env.not_before_ms);
        env.not_before_ms
    };
    let (reader_at, late_at) = (not_before("sink.test"), not_before("slow.test"));
    for at in [reader_at, late_at] {
        assert!(
            (t0 + 3 * HOUR_MS..t0 + 6 * HOUR_MS).contains(&at),
            "chosen {} min after arrival",
            (at - t0) / 60_000
        );
    }
    let stored = String::from_utf8(server.body(envs[0].id)).unwrap();
    assert!(!stored.contains("X-Tern-Send-Time"), "{stored}");

    // The schedule is in the spool: a restart keeps it.
    let server = server.restart(opts).await;
    let envs = server.envelopes();
    assert_eq!(envs.len(), 2);
    assert!(envs
        .iter()
        .all(|e| e.not_before_ms == e.next_due_ms && e.not_before_ms > now_ms()));

    // A second before each chosen time nothing was attempted; at it, it is.
    let first = reader_at.min(late_at);
    advance_to(first - 1000).await;
    pause_real(Duration::from_millis(200)).await;
    assert!(sink.messages().is_empty(), "delivered before not_before");
    assert_eq!(attempts_seen(&slow, "late@slow.test"), 0);
    for (at, what) in [(reader_at, "reader"), (late_at, "late")] {
        advance_to(at - 1000).await;
        advance_to(at).await;
        match what {
            "reader" => until("delivery to reader", || sink.messages().len() == 1).await,
            _ => {
                until("the first attempt to late", || {
                    attempts_seen(&slow, "late@slow.test") >= 1
                })
                .await
            }
        }
    }

    // The late one keeps failing; it expires at arrival + max_age, not later and not before.
    let mut t = now_ms();
    while t + HOUR_MS / 2 < created + MAX_AGE_MS - 1000 {
        t += HOUR_MS / 2;
        advance_to(t).await;
    }
    advance_to(created + MAX_AGE_MS - 1000).await;
    late_envelope(&server);
    assert_eq!(server.message_count(), 1, "not expired before max age");
    advance_to(created + MAX_AGE_MS + 1000).await;
    until("expiry", || server.message_count() == 0).await;
    until("the failure DSN", || {
        bounces
            .messages()
            .iter()
            .any(|m| String::from_utf8_lossy(&m.data).contains("Action: failed"))
    })
    .await;

    drop(stop_holding);
    holder.await.unwrap();
}

/// Panics unless the part for late@slow.test is still spooled.
fn late_envelope(server: &TestServer) {
    assert!(
        server
            .envelopes()
            .iter()
            .any(|e| e.destination == "slow.test"),
        "the late part is still spooled"
    );
}
