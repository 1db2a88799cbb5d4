//! Retry timing and expiry over five simulated days, on tokio's paused clock.
//!
//! The whole daemon runs on one paused current-thread runtime, and `tern::clock` follows that
//! runtime's clock, so due times, retries, the delay notice and expiry are all virtual. Time
//! moves only when this test advances it: a blocking task is kept running for the whole test,
//! which stops tokio from auto-advancing while the daemon waits on real I/O (fsyncs on the
//! spool's sync thread, loopback sockets). Between steps the test waits in real time (on the
//! blocking pool, so the runtime keeps serving the daemon) until the daemon has acted.
//!
//! Everything else is real: SMTP sinks on 127.0.0.1, a sled spool in a temp dir, the DSNs
//! parsed back from what the bounce sink received.
//!
//! A separate test binary, because following the runtime clock is process-wide.

#[path = "it/dsn.rs"]
mod dsn;
#[path = "it/harness.rs"]
mod harness;
#[path = "it/paused_clock.rs"]
mod paused_clock;
#[path = "it/sink.rs"]
mod sink;

use std::time::Duration;

use harness::{Options, TestServer};
use paused_clock::{attempts_seen, hold_clock, pause_real, until};
use sink::{Sink, SinkBehaviour};
use tern::clock::now_ms;

const MINUTE_MS: u64 = 60_000;
/// The default schedule: 5 min doubling up to 4 h.
const RETRY_INITIAL_MS: u64 = 5 * MINUTE_MS;
const RETRY_MAX_MS: u64 = 240 * MINUTE_MS;
/// The defaults for max age and the delay notice.
const MAX_AGE_MS: u64 = 5 * 24 * 60 * MINUTE_MS;
const DELAY_NOTICE_MS: u64 = 240 * MINUTE_MS;

async fn advance_ms(ms: u64) {
    tokio::time::advance(Duration::from_millis(ms)).await;
}

#[tokio::test(start_paused = true)]
async fn retries_follow_the_schedule_until_expiry_with_one_delay_notice() {
    tern::clock::follow_runtime_clock();
    // Held until the end of the test: no auto-advance while it runs (see the module doc).
    let (stop_holding, holder) = hold_clock();

    const RCPT: &str = "late@sink.test";
    let sink =
        Sink::start(SinkBehaviour::default().rcpt_reply(|_| Some("451 4.3.0 Mailbox busy".into())))
            .await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .route("sender.test", bounces.addr),
    )
    .await;
    let mut client = server.connect().await;
    client.ehlo().await;
    let id = client
        .submit(
            "sender@sender.test",
            &[RCPT],
            b"Subject: paused clock\r\n\r\nretried for five days\r\n",
        )
        .await;
    let created = server.envelope(id).created_ms;
    assert_eq!(created, now_ms(), "no virtual time passed while accepting");

    let mut attempt = 0u32;
    let mut delay_notice_at = None;
    loop {
        until(&format!("attempt {}", attempt + 1), || {
            attempts_seen(&sink, RCPT) == attempt as usize + 1
        })
        .await;
        attempt += 1;
        let at = now_ms();
        // The outcome is in the spool once the attempt count moved or the message is gone.
        until(&format!("outcome of attempt {attempt}"), || {
            server
                .spool()
                .envelope(id)
                .unwrap()
                .is_none_or(|env| env.attempts == attempt)
        })
        .await;
        let age = at - created;
        if attempt == 1 {
            assert_eq!(age, 0, "the first attempt is immediate");
        }
        if delay_notice_at.is_none() {
            // The delay notice goes out with the first failure at or after 4 h, and only then.
            if age >= DELAY_NOTICE_MS {
                until("the delay notice", || bounces.messages().len() == 1).await;
                delay_notice_at = Some(age);
            } else {
                assert!(bounces.messages().is_empty(), "no DSN after {age} ms");
            }
        }
        let Some(env) = server.spool().envelope(id).unwrap() else {
            assert_eq!(at, created + MAX_AGE_MS, "expired exactly at max age");
            break;
        };
        assert!(at < created + MAX_AGE_MS, "attempt {attempt} after expiry");
        let delay = (RETRY_INITIAL_MS << (attempt - 1).min(10)).min(RETRY_MAX_MS);
        let due = (at + delay).min(created + MAX_AGE_MS);
        assert_eq!(
            env.next_due_ms - at,
            due - at,
            "attempt {attempt} at +{age} ms: next due"
        );
        // Nothing happens a second early; the attempt happens on the due time.
        advance_ms(due - at - 1000).await;
        pause_real(Duration::from_millis(30)).await;
        assert_eq!(
            attempts_seen(&sink, RCPT),
            attempt as usize,
            "attempt {} came early",
            attempt + 1
        );
        advance_ms(1000).await;
    }
    // 5+10+20+40+80+160 minutes, then every 4 h until the last attempt at exactly 5 days.
    let expected_attempts = 7 + (MAX_AGE_MS - 315 * MINUTE_MS).div_ceil(RETRY_MAX_MS) as u32;
    assert_eq!(attempt, expected_attempts);
    assert_eq!(
        delay_notice_at,
        Some(315 * MINUTE_MS),
        "the delay notice comes with the first failure past 4 h (the 7th attempt, at 5h15)"
    );

    until("the failure DSN", || bounces.messages().len() == 2).await;
    let received = bounces.messages();
    let notice = dsn::parse_dsn(&received[0]);
    assert_eq!(notice.rcpt("Action"), Some("delayed"));
    assert_eq!(notice.rcpt("Status"), Some("4.3.0"));
    let failure = dsn::parse_dsn(&received[1]);
    assert_eq!(failure.field("Reporting-MTA"), Some("dns; tern.test"));
    assert_eq!(
        failure.field("Arrival-Date").map(str::to_owned),
        Some(tern::message::rfc5322_date(
            std::time::UNIX_EPOCH + Duration::from_millis(created)
        ))
    );
    assert_eq!(
        failure.rcpt("Final-Recipient"),
        Some("rfc822; late@sink.test")
    );
    assert_eq!(failure.rcpt("Action"), Some("failed"));
    assert_eq!(failure.rcpt("Status"), Some("4.4.7"));
    let diagnostic = failure.rcpt("Diagnostic-Code").unwrap_or_default();
    assert!(
        diagnostic.starts_with("smtp;") && diagnostic.contains("451 4.3.0 Mailbox busy"),
        "{failure:#?}"
    );
    until("an empty spool", || server.message_count() == 0).await;

    // A day later nothing was attempted again.
    advance_ms(24 * 60 * MINUTE_MS).await;
    pause_real(Duration::from_millis(30)).await;
    assert_eq!(attempts_seen(&sink, RCPT), attempt as usize);

    drop(stop_holding);
    holder.await.unwrap();
}
