//! Crash during delivery, with the real binary: SIGKILL while many messages are being
//! relayed to a slow sink, then a restart. Nothing accepted is lost, and only attempts that
//! were in flight at the kill are repeated.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::time::Duration;

use tern_queue::Envelope;

use crate::delivery::*;
use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};

const N: usize = 200;
const CONNECTIONS: usize = 8;
const CLIENTS: usize = 4;

fn marker_of(data: &[u8]) -> String {
    let text = String::from_utf8_lossy(data);
    let start = text.find("\r\nSubject: ").expect("subject") + "\r\nSubject: ".len();
    let end = start + text[start..].find("\r\n").unwrap();
    text[start..end].to_string()
}

async fn queue_list(config: &str) -> Vec<Envelope> {
    let out = run_tern(&["queue", "list", "--json", "--config", config], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", describe(&out)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_delivery_repeats_only_attempts_in_flight() {
    let sink = Sink::start(SinkBehaviour::default().data_delay(Duration::from_millis(200))).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let opts = Options {
        log_level: "warn".to_string(),
        ..Options::default()
    }
    .deliver()
    .route("sink.test", sink.addr)
    .route("sender.test", bounces.addr)
    .delivery("max_connections_per_destination", CONNECTIONS);
    let config = write_bin_config(dir.path(), port, &opts);
    let config_arg = config.to_str().unwrap().to_string();

    // 1. Relay N messages (marker i in the Subject, recipient r<i>), kill mid-delivery.
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("first.log"));
    drop(tern.wait_ready(Duration::from_secs(30)).await);
    let addr = tern.addr;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            tokio::spawn(async move {
                let mut client = Client::connect(addr).await;
                client.expect_greeting().await;
                client.ehlo().await;
                for i in (c..N).step_by(CLIENTS) {
                    let rcpt = format!("r{i}@sink.test");
                    client
                        .submit(SENDER, &[&rcpt], &message(&format!("crash-{i:03}")))
                        .await;
                }
                client.expect("QUIT", 221, "").await;
            })
        })
        .collect();
    for c in clients {
        c.await.expect("all messages accepted");
    }
    sink.wait_until("a quarter delivered", T, |s| s.messages().len() >= N / 4)
        .await;
    tern.child.start_kill().expect("SIGKILL");
    let status = tern.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    let at_kill = sink.messages().len();
    assert!(
        at_kill + 2 * CONNECTIONS < N,
        "the kill must come mid-delivery: {at_kill} of {N} already at the sink"
    );

    // 2. What is left: every message not yet at the sink must still be queued.
    let pending = queue_list(&config_arg).await;
    let pending_rcpts: BTreeSet<String> = pending
        .iter()
        .flat_map(|e| e.recipients.iter().map(|r| r.address.clone()))
        .collect();
    let arrived: BTreeSet<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.rcpt_addresses().into_iter().map(str::to_string))
        .collect();
    for i in 0..N {
        let rcpt = format!("r{i}@sink.test");
        assert!(
            arrived.contains(&rcpt) || pending_rcpts.contains(&rcpt),
            "{rcpt} neither delivered nor queued after the kill"
        );
    }
    let in_doubt = pending_rcpts.intersection(&arrived).count();
    eprintln!(
        "delivery crash: {at_kill} at the sink at the kill, {} queued, {in_doubt} of them \
         already at the sink",
        pending.len()
    );

    // 3. Restart; wait until every queued message is delivered, then stop cleanly.
    let log_before = log_lines(dir.path()).len();
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("second.log"));
    drop(tern.wait_ready(Duration::from_secs(30)).await);
    let ids: BTreeSet<String> = pending.iter().map(|e| e.id.to_string()).collect();
    wait_for("delivery of every queued message", T, || {
        let delivered: BTreeSet<String> = log_lines(dir.path())[log_before..]
            .iter()
            .filter(|l| l["outcome"] == "delivered")
            .map(|l| l["id"].as_str().unwrap().to_string())
            .collect();
        ids.is_subset(&delivered)
    })
    .await;
    send_signal(tern.pid(), "TERM");
    let status = tern.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}; log:\n{}", tern.log_text());
    let left = queue_list(&config_arg).await;
    assert!(left.is_empty(), "spool empty after redelivery: {left:#?}");

    // 4. Everything arrived; only attempts in flight at the kill arrived twice.
    let mut copies: HashMap<String, usize> = HashMap::new();
    for m in sink.messages() {
        *copies.entry(marker_of(&m.data)).or_default() += 1;
    }
    let missing: Vec<usize> = (0..N)
        .filter(|i| !copies.contains_key(&format!("crash-{i:03}")))
        .collect();
    assert!(missing.is_empty(), "never delivered: {missing:?}");
    assert_eq!(copies.len(), N, "no unknown message");
    let most = copies.values().copied().max().unwrap();
    assert!(most <= 2, "a message arrived {most} times: {copies:?}");
    let duplicates: usize = copies.values().map(|c| c - 1).sum();
    eprintln!("delivery crash: {duplicates} duplicates");
    // Per connection, one delivery may be in progress and the previous one's outcome may
    // still be waiting for its fsync round (the scheduler pipelines at most one).
    assert!(
        duplicates <= 2 * CONNECTIONS,
        "{duplicates} duplicates, but at most {} deliveries were unrecorded",
        2 * CONNECTIONS
    );
    assert!(bounces.messages().is_empty(), "no DSN");
}
