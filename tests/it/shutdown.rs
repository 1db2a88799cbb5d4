//! Graceful shutdown of the in-process daemon: idle sessions are told 421 4.3.2, a message
//! in progress may finish within the grace period, and nothing new is accepted.

use crate::harness::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_transaction_finish_and_dismisses_idle_sessions() {
    let mut server = TestServer::start(Options {
        shutdown_grace: "10s".into(),
        ..Options::default()
    })
    .await;
    let spool = server.spool().clone();
    let addr = server.smtp;
    let mut idle = server.connect().await;
    idle.ehlo().await;
    let mut busy = server.connect().await;
    busy.ehlo().await;
    busy.expect("MAIL FROM:<busy@client.test>", 250, "2.1.0")
        .await;
    busy.expect("RCPT TO:<r@sink.test>", 250, "2.1.5").await;
    busy.expect("DATA", 354, "").await;
    let content = message("during-shutdown");
    let wire = dot_stuff(&content);
    let (first, rest) = wire.split_at(wire.len() / 2);
    busy.send(first).await;

    let daemon = server.take_daemon();
    let stopping = tokio::spawn(async move { daemon.shutdown().await });

    // The idle session is dismissed.
    let replies = idle.replies_until_close().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies[0].assert(421, "4.3.2");
    // The listener is closed: new connections are refused (poll until the accept loop ended).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Err(_) => break,
            Ok(tcp) => {
                let mut c = Client::new(Box::new(tcp));
                if let Ok(Ok(Some(r))) = tokio::time::timeout(IO_TIMEOUT, c.try_reply()).await {
                    assert_ne!(r.code, 220, "a new session was started during shutdown");
                }
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "listener still accepting"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        !stopping.is_finished(),
        "shutdown must wait for the message in progress"
    );

    // The message in progress completes and is durable; then the session is dismissed too.
    busy.send(rest).await;
    let id = busy.reply().await.queued_id();
    let after = busy.replies_until_close().await;
    assert_eq!(after.len(), 1, "{after:?}");
    after[0].assert(421, "4.3.2");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("shutdown returns once sessions are done")
        .unwrap()
        .expect("clean shutdown");
    let env = spool
        .envelope(id)
        .unwrap()
        .expect("the message finished during shutdown is spooled");
    assert_eq!(env.sender, "busy@client.test");
    prepended(&spool.body(id).unwrap().unwrap(), &content, false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_period_bounds_the_wait() {
    let mut server = TestServer::start(Options {
        shutdown_grace: "1s".into(),
        ..Options::default()
    })
    .await;
    let mut stuck = server.connect().await;
    stuck.ehlo().await;
    stuck
        .expect("MAIL FROM:<slow@client.test>", 250, "2.1.0")
        .await;
    stuck.expect("RCPT TO:<r@sink.test>", 250, "2.1.5").await;
    stuck.expect("DATA", 354, "").await;
    stuck.send("Subject: never finished\r\n").await;
    let daemon = server.take_daemon();
    let start = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), daemon.shutdown())
        .await
        .expect("shutdown does not wait beyond the grace period")
        .expect("clean shutdown");
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "waited for the session: {took:?}"
    );
}

/// An event emitted on a background task right before SIGTERM (the `suppressed` event of a
/// refused RCPT, which the session does not wait for) is in its webhook outbox after the
/// restart: shutdown waits for every task before the spool's last flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_emitted_just_before_sigterm_is_in_the_outbox_after_restart() {
    use std::sync::Arc;
    use tern::config::SuppressionConfig;
    use tern::suppression::{Entry, Suppressions};
    use tern::telemetry::Metrics;
    use tern_queue::Spool;

    const ROUNDS: usize = 3;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    write_secret(&secret, "secret-of-the-test-webhook\n");
    // Nothing listens there: every post fails and the events stay in the outbox.
    let closed = free_port();
    let opts = Options::default().extra(format!(
        "[[webhooks]]\nurl = \"http://127.0.0.1:{closed}/hook\"\nsecret_file = {:?}\n",
        secret.display().to_string()
    ));
    let spool_dir = dir.path().join("spool");
    let suppressed: Vec<String> = (0..ROUNDS).map(|i| format!("gone{i}@sink.test")).collect();
    {
        // The suppression list lives in the spool: filled before the daemon opens it.
        let spool = Spool::open(&spool_dir).unwrap();
        let list = Suppressions::new(
            spool,
            SuppressionConfig::default(),
            Arc::new(Metrics::new()),
        );
        let now = tern::clock::now_ms();
        list.add(
            suppressed
                .iter()
                .map(|address| Entry {
                    address: address.clone(),
                    reason: "manual".into(),
                    created_ms: now,
                    expires_ms: None,
                    source: None,
                    scope: None,
                })
                .collect(),
        )
        .await
        .unwrap();
    }
    for (round, address) in suppressed.iter().enumerate() {
        let port = free_port();
        let config = write_bin_config(dir.path(), port, &opts);
        let log = dir.path().join(format!("tern-{round}.log"));
        let mut tern = TernProc::spawn(&config, port, &log);
        let mut c = tern.wait_ready(Duration::from_secs(30)).await;
        // The list is read from the spool: until sled is open, RCPT cannot be refused (the
        // mail would be taken and dropped after the open; tests/it/intake.rs).
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !tern.log_text().contains("spool opened") {
            assert!(std::time::Instant::now() < deadline, "{}", tern.log_text());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.ehlo().await;
        c.expect("MAIL FROM:<app@sender.test>", 250, "2.1.0").await;
        // Refused as suppressed (reject mode); the event is emitted on a task of its own.
        c.expect(&format!("RCPT TO:<{address}>"), 550, "5.7.1")
            .await;
        send_signal(tern.pid(), "TERM");
        let status = tern.wait_exit(Duration::from_secs(15)).await;
        assert!(status.success(), "{status:?}; log:\n{}", tern.log_text());
        let spool = Spool::open(&spool_dir).unwrap();
        let queued: Vec<serde_json::Value> = spool
            .events("webhook/0", 1000)
            .unwrap()
            .into_iter()
            .flat_map(|(_, batch)| {
                let v: serde_json::Value = serde_json::from_slice(&batch).unwrap();
                match v {
                    serde_json::Value::Array(events) => events,
                    one => vec![one],
                }
            })
            .collect();
        assert!(
            queued
                .iter()
                .any(|e| e["event"] == "suppressed" && e["recipient"] == address.as_str()),
            "round {round}: the suppressed event of {address} is not in the outbox: {queued:?}\n{}",
            tern.log_text()
        );
    }
}
