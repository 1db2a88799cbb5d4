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
