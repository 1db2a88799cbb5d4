//! `GET /metrics` on the admin server, scraped over real HTTP after real traffic: the
//! counters match what happened exactly, and destinations are labelled by static route.

use std::collections::HashMap;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::delivery::{relay, SENDER, T};
use crate::harness::*;
use crate::sink::SinkBehaviour;

/// One scrape: sample (`name{labels}` exactly as exposed) -> value.
pub async fn scrape(admin: SocketAddr) -> HashMap<String, f64> {
    let mut stream = TcpStream::connect(admin)
        .await
        .expect("admin server listening");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tern\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut response))
        .await
        .expect("scrape answered in time")
        .unwrap();
    let response = String::from_utf8(response).expect("UTF-8 response");
    let (head, body) = response.split_once("\r\n\r\n").expect("HTTP head and body");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain; version=0.0.4"),
        "{head}"
    );
    body.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (sample, value) = l.rsplit_once(' ').expect("sample and value");
            (sample.to_string(), value.parse().expect("numeric value"))
        })
        .collect()
}

#[track_caller]
pub fn value(samples: &HashMap<String, f64>, sample: &str) -> f64 {
    *samples
        .get(sample)
        .unwrap_or_else(|| panic!("no sample {sample} in {samples:#?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_what_happened() {
    let r = relay(SinkBehaviour::default(), |o| {
        o.limit("max_message_size", 10000)
    })
    .await;
    let admin = r.server.admin();
    assert_ne!(admin.port(), 0, "port 0 must be resolved");

    let before = scrape(admin).await;
    assert_eq!(
        value(&before, "tern_messages_received_total{protocol=\"smtp\"}"),
        0.0
    );
    assert_eq!(
        value(&before, "tern_messages_rejected_total{reason=\"size\"}"),
        0.0
    );

    let mut c = r.server.connect().await;
    c.ehlo().await;
    for i in 0..3 {
        c.submit(
            SENDER,
            &[&format!("rcpt{i}@sink.test")],
            &message(&format!("metrics-{i}")),
        )
        .await;
    }
    // One message over the size limit: refused after DATA.
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<big@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    let mut content = b"Subject: big\r\n\r\n".to_vec();
    while content.len() <= 12000 {
        content.extend_from_slice(&[b'x'; 70]);
        content.extend_from_slice(b"\r\n");
    }
    c.send(dot_stuff(&content)).await;
    c.reply().await.assert(552, "5.3.4");

    r.sink.wait_for_messages(3, T).await;
    r.wait_spool_empty().await;
    // The session is still open: one connection, one session.
    let m = scrape(admin).await;
    assert_eq!(value(&m, "tern_smtp_connections_total"), 1.0);
    assert_eq!(value(&m, "tern_smtp_connections_rejected_total"), 0.0);
    assert_eq!(value(&m, "tern_smtp_sessions"), 1.0);
    assert_eq!(
        value(&m, "tern_messages_received_total{protocol=\"smtp\"}"),
        3.0
    );
    assert_eq!(
        value(&m, "tern_messages_rejected_total{reason=\"size\"}"),
        1.0
    );
    assert_eq!(
        value(&m, "tern_messages_rejected_total{reason=\"relay_denied\"}"),
        0.0
    );
    assert_eq!(
        value(
            &m,
            "tern_deliveries_total{destination=\"route:sink.test\",outcome=\"delivered\"}"
        ),
        3.0
    );
    let deliveries: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tern_deliveries_total{"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(deliveries, 3.0, "nothing but the three deliveries: {m:#?}");
    assert_eq!(value(&m, "tern_delivery_attempt_seconds_count"), 3.0);
    assert_eq!(value(&m, "tern_delivery_latency_seconds_count"), 3.0);
    let tls: f64 = m
        .iter()
        .filter(|(k, _)| k.starts_with("tern_tls_deliveries_total"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(tls, 0.0, "the sink has no TLS");
    assert_eq!(value(&m, "tern_dsns_sent_total{action=\"failed\"}"), 0.0);
    assert_eq!(value(&m, "tern_spool_messages"), 0.0);
    assert_eq!(value(&m, "tern_spool_bytes"), 0.0);
    // Three commits and three removals, at least; each round covers one or more writes.
    let commits = value(&m, "tern_spool_commits_total");
    let syncs = value(&m, "tern_spool_syncs_total");
    assert!(commits >= 6.0, "{commits}");
    assert!(
        syncs >= 1.0 && syncs <= commits,
        "{syncs} rounds for {commits}"
    );

    c.expect("QUIT", 221, "2.0.0").await;
    drop(c);
    let deadline = std::time::Instant::now() + T;
    while value(&scrape(admin).await, "tern_smtp_sessions") != 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "session gauge back to 0"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    r.server.stop().await;
    assert!(
        TcpStream::connect(admin).await.is_err(),
        "the admin server stops with the daemon"
    );
}

/// The metrics added for operations: ready-queue depth per destination (bounded labels),
/// DKIM signatures by domain and algorithm, group-commit batch sizes and round durations,
/// syntax rejections, each matching what the test did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_dkim_group_commit_and_syntax_metrics() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("example.com.pem");
    let generated = tern::dkim::generate_key(tern::dkim::KeyAlgorithm::Ed25519).unwrap();
    write_secret(&key, generated.private_key_pem);
    // One connection to the sink, each message held 2 s in DATA: the rest wait in memory.
    let r = relay(
        SinkBehaviour::default().data_delay(std::time::Duration::from_secs(2)),
        |o| {
            o.delivery("max_connections_per_destination", 1)
                .dkim(format!(
                    "domain = \"example.com\"\nselector = \"s1\"\nkey = {:?}",
                    key.display().to_string()
                ))
        },
    )
    .await;
    let admin = r.server.admin();

    let mut c = r.server.connect().await;
    c.ehlo().await;
    // Three syntax errors: an unknown verb, a bad sender address, a recipient without domain.
    c.expect("FROB", 500, "5.5.2").await;
    c.expect("MAIL FROM:<unterminated", 501, "5.1.7").await;
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<nodomain>", 501, "5.1.3").await;
    c.expect("RSET", 250, "2.0.0").await;
    let content = b"From: alice@example.com\r\nSubject: depth\r\n\r\nhi\r\n";
    for i in 0..4 {
        c.submit("alice@example.com", &[&format!("d{i}@sink.test")], content)
            .await;
    }

    // One message in flight, three ready behind it.
    let depth = "tern_ready_queue_depth{destination=\"route:sink.test\"}";
    let deadline = std::time::Instant::now() + T;
    loop {
        let m = scrape(admin).await;
        if value(&m, depth) == 3.0 {
            assert_eq!(
                value(&m, "tern_ready_queue_depth{destination=\"other\"}"),
                0.0
            );
            assert_eq!(
                value(
                    &m,
                    "tern_ready_queue_depth{destination=\"route:sender.test\"}"
                ),
                0.0
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{depth} never 3: {m:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    r.sink.wait_for_messages(4, T).await;
    r.wait_spool_empty().await;
    // The last removal may still be in its sync round: wait until every queued write is in a
    // finished round (the round observer runs just before the round is published).
    let deadline = std::time::Instant::now() + T;
    let m = loop {
        let m = scrape(admin).await;
        let settled = value(&m, "tern_spool_commit_batch_writes_sum")
            == value(&m, "tern_spool_commits_total")
            && value(&m, "tern_spool_commit_batch_writes_count")
                == value(&m, "tern_spool_syncs_total");
        if settled {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rounds never settle: {m:#?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert_eq!(value(&m, depth), 0.0);
    assert_eq!(
        value(&m, "tern_messages_rejected_total{reason=\"syntax\"}"),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "tern_dkim_signatures_total{algorithm=\"ed25519-sha256\",domain=\"example.com\"}"
        ),
        4.0
    );
    assert!(
        !m.keys()
            .any(|k| k.starts_with("tern_dkim_signing_failures_total{")),
        "no signing failures"
    );
    // Every round is observed: as many rounds as the spool counted, covering every write
    // (checked above), and there were at least the commits and removals of the test.
    let writes = value(&m, "tern_spool_commits_total");
    let rounds = value(&m, "tern_spool_syncs_total");
    assert!(writes >= 8.0, "4 commits and 4 removals at least: {writes}");
    assert_eq!(value(&m, "tern_spool_commit_batch_writes_count"), rounds);
    assert_eq!(value(&m, "tern_spool_commit_batch_writes_sum"), writes);
    assert_eq!(value(&m, "tern_spool_flush_seconds_count"), rounds);
    assert!(value(&m, "tern_spool_flush_seconds_sum") > 0.0);
    let last_reload = value(&m, "tern_config_last_reload_success_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        last_reload > now - 120.0 && last_reload <= now,
        "{last_reload}"
    );
    r.server.stop().await;
}
