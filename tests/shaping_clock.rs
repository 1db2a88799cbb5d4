//! Traffic shaping over simulated minutes and days, on tokio's paused clock (see
//! tests/retry_clock.rs for how the daemon runs there): configured rates, warm-up caps across
//! a day rollover and a restart, and adaptive backoff against a sink that throttles.
//!
//! A separate test binary, because following the runtime clock is process-wide.

#[path = "it/harness.rs"]
mod harness;
#[path = "it/paused_clock.rs"]
mod paused_clock;
#[path = "it/sink.rs"]
mod sink;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use harness::{Options, TestServer};
use paused_clock::{hold_clock, pause_real};
use sink::{Sink, SinkBehaviour};
use tern::clock::now_ms;

/// Waits in real time until `done`; false after `limit`.
async fn until(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        pause_real(Duration::from_millis(1)).await;
    }
    true
}

/// Waits until the sink's message count stops moving for a few real milliseconds.
async fn settle(sink: &Sink) {
    let mut last = sink.messages().len();
    let deadline = Instant::now() + Duration::from_millis(300);
    let mut quiet = 0;
    while quiet < 4 && Instant::now() < deadline {
        pause_real(Duration::from_millis(1)).await;
        let n = sink.messages().len();
        if n == last {
            quiet += 1;
        } else {
            (last, quiet) = (n, 0);
        }
    }
}

async fn submit_many(server: &TestServer, rcpts: impl Iterator<Item = String>) {
    let mut client = server.connect().await;
    client.ehlo().await;
    for rcpt in rcpts {
        client
            .submit("s@sender.test", &[&rcpt], b"Subject: shaped\r\n\r\nx\r\n")
            .await;
    }
}

#[tokio::test(start_paused = true)]
async fn configured_rate_holds_within_five_percent_per_minute() {
    tern::clock::follow_runtime_clock();
    let (stop, holder) = hold_clock();
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .extra("[shaping.default]\nrate = \"60/min\"\n"),
    )
    .await;
    const MINUTES: usize = 3;
    submit_many(
        &server,
        (0..70 * MINUTES).map(|i| format!("r{i}@sink.test")),
    )
    .await;
    let mut per_minute = Vec::new();
    let mut before = 0;
    for minute in 0..MINUTES {
        for step in 1..=240 {
            tokio::time::advance(Duration::from_millis(250)).await;
            // One message per second: wait until the one due by now has arrived.
            let due = minute * 60 + step / 4;
            until(Duration::from_millis(200), || sink.messages().len() >= due).await;
        }
        settle(&sink).await;
        let total = sink.messages().len();
        per_minute.push(total - before);
        before = total;
    }
    for (i, &n) in per_minute.iter().enumerate() {
        assert!(
            (57..=63).contains(&n),
            "minute {i}: {n} messages at a configured 60/min ({per_minute:?})"
        );
    }
    server.stop().await;
    drop(stop);
    holder.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn warmup_caps_are_exact_across_a_restart_and_day_rollovers() {
    tern::clock::follow_runtime_clock();
    let (stop, holder) = hold_clock();
    // Start the day just after midnight UTC, so "an hour later" is the same day.
    let midnight = (now_ms() / 86_400_000 + 1) * 86_400_000;
    tokio::time::advance(Duration::from_millis(midnight + 60_000 - now_ms())).await;
    let sink = Sink::start(SinkBehaviour::default()).await;
    let today = jiff::Timestamp::from_millisecond(now_ms() as i64)
        .unwrap()
        .to_zoned(jiff::tz::TimeZone::UTC)
        .date();
    let options = Options::default()
        .deliver()
        .route("w.test", sink.addr)
        .extra(format!(
            r#"
[shaping.warmup]
curve = [5, 8, 10]
time_zone = "UTC"
when_capped = "wait"
[[shaping.providers]]
name = "warmprov"
domains = ["w.test"]
[[pools]]
name = "new"
[[pools.addresses]]
address = "127.0.0.4"
ehlo = "new4.tern.test"
warmup_start = "{today}"
"#
        ));
    let mut server = TestServer::start(options.clone()).await;
    let delivered = |n: usize| {
        let sink = &sink;
        async move {
            until(Duration::from_secs(20), || sink.messages().len() >= n).await;
            settle(sink).await;
            sink.messages().len()
        }
    };
    // Day 0, cap 5: four now, then a clean restart, then only one more of six.
    submit_many(&server, (0..4).map(|i| format!("a{i}@w.test"))).await;
    assert_eq!(delivered(4).await, 4);
    server = server.restart(options.clone()).await;
    submit_many(&server, (0..6).map(|i| format!("b{i}@w.test"))).await;
    assert_eq!(delivered(5).await, 5, "day 0 cap is 5, across the restart");
    tokio::time::advance(Duration::from_secs(3600)).await;
    pause_real(Duration::from_millis(50)).await;
    assert_eq!(sink.messages().len(), 5, "still capped an hour later");
    for m in sink.messages() {
        assert_eq!(m.client_ip.to_string(), "127.0.0.4");
        assert_eq!(m.helo, "new4.tern.test");
    }

    // Day 1, cap 8: the five held back go out after midnight, then three of six more.
    let midnight = (now_ms() / 86_400_000 + 1) * 86_400_000;
    tokio::time::advance(Duration::from_millis(midnight - now_ms() - 1000)).await;
    pause_real(Duration::from_millis(50)).await;
    assert_eq!(sink.messages().len(), 5, "nothing before midnight");
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(1)).await;
        pause_real(Duration::from_millis(10)).await;
    }
    assert_eq!(delivered(10).await, 10, "held mail goes out on the new day");
    submit_many(&server, (0..6).map(|i| format!("c{i}@w.test"))).await;
    assert_eq!(delivered(13).await, 13, "day 1 cap is 8");
    tokio::time::advance(Duration::from_secs(600)).await;
    settle(&sink).await;
    assert_eq!(sink.messages().len(), 13);

    // Day 2, cap 10: the last three.
    let midnight = (now_ms() / 86_400_000 + 1) * 86_400_000;
    tokio::time::advance(Duration::from_millis(midnight - now_ms())).await;
    for _ in 0..10 {
        tokio::time::advance(Duration::from_secs(1)).await;
        pause_real(Duration::from_millis(10)).await;
    }
    assert_eq!(delivered(16).await, 16);
    assert!(until(Duration::from_secs(20), || server.message_count() == 0).await);
    let (_, body) = server.api("GET", "/api/v1/shaping/warmprov", None).await;
    let warm = &body["pairs"][0]["warmup"];
    assert_eq!(warm["day"], 2, "{body}");
    assert_eq!(warm["cap"], 10, "{body}");
    assert_eq!(warm["sent_today"], 3, "{body}");
    server.stop().await;
    drop(stop);
    holder.await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn throttling_sink_makes_the_rate_converge_without_bouncing() {
    tern::clock::follow_runtime_clock();
    let (stop, holder) = hold_clock();
    const N: usize = 60; // the sink's limit per minute
    let start = tokio::time::Instant::now();
    // Per virtual minute: (accepted, throttled).
    let minutes: Arc<Mutex<Vec<(usize, usize)>>> = Arc::default();
    let counts = minutes.clone();
    let sink = Sink::start(SinkBehaviour::default().data_reply(move |_| {
        let minute = (start.elapsed().as_secs() / 60) as usize;
        let mut m = counts.lock().unwrap();
        if m.len() <= minute {
            m.resize(minute + 1, (0, 0));
        }
        if m[minute].0 >= N {
            m[minute].1 += 1;
            Some("421 4.7.0 Too many messages, try again later".into())
        } else {
            m[minute].0 += 1;
            None
        }
    }))
    .await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .delivery("retry_initial", "\"1m\"")
            .delivery("retry_max", "\"2m\"")
            .route("t.test", sink.addr)
            .route("sender.test", bounces.addr)
            .extra(
                r#"
[[shaping.providers]]
name = "throttler"
domains = ["t.test"]
rate = "120/min"
[shaping.adaptive]
decrease = 0.75
increase = 0.02
window = "10s"
"#,
            ),
    )
    .await;
    const TOTAL: usize = 900;
    submit_many(&server, (0..TOTAL).map(|i| format!("r{i}@t.test"))).await;
    let mut minute = 0;
    while server.message_count() > 0 {
        assert!(minute < 40, "not all delivered after 40 simulated minutes");
        for _ in 0..240 {
            tokio::time::advance(Duration::from_millis(250)).await;
            settle(&sink).await;
        }
        minute += 1;
    }
    let m = minutes.lock().unwrap().clone();
    let accepted: usize = m.iter().map(|x| x.0).sum();
    assert_eq!(accepted, TOTAL, "every message delivered once: {m:?}");
    // After convergence (minute 3 on) attempts per minute stay near N while the backlog
    // lasts (up to the last minute the sink still throttled).
    let last_throttled = m.iter().rposition(|x| x.1 > 0).unwrap_or(0);
    let busy: Vec<usize> = m
        .iter()
        .take(last_throttled + 1)
        .skip(3)
        .map(|x| x.0 + x.1)
        .collect();
    assert!(busy.len() >= 5, "{m:?}");
    let mean = busy.iter().sum::<usize>() as f64 / busy.len() as f64;
    assert!(
        (0.8 * N as f64..=1.2 * N as f64).contains(&mean),
        "mean attempts per minute {mean:.1} vs the sink's {N}: {m:?}"
    );
    pause_real(Duration::from_millis(100)).await;
    assert!(bounces.messages().is_empty(), "no DSN for throttled mail");
    let (_, body) = server.api("GET", "/api/v1/shaping/throttler", None).await;
    let pair = &body["pairs"][0];
    assert!(pair["throttles"].as_u64().unwrap() > 0, "{body}");
    assert!(
        pair["trigger_reply"].as_str().unwrap().contains("421"),
        "{body}"
    );
    server.stop().await;
    drop(stop);
    holder.await.unwrap();
}
