//! `GET /healthz` and `GET /readyz` on the admin listener, without a token: 200 while serving,
//! `/readyz` 503 with a JSON reason once the daemon drains.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_readiness_without_a_token_and_503_while_draining() {
    let mut server = TestServer::start(Options::default()).await;
    let admin = server.admin();
    let (status, body) = http(admin, "GET", "/healthz", None, None).await;
    assert_eq!((status, body.as_str()), (200, r#"{"alive":true}"#));
    let (status, body) = http(admin, "GET", "/readyz", None, None).await;
    // A fresh spool has nothing to recover.
    assert_eq!(
        (status, body.as_str()),
        (200, r#"{"ready":true,"recovering":false}"#)
    );
    let (_, metrics) = http(admin, "GET", "/metrics", None, None).await;
    assert!(metrics.contains("\ntern_ready 1\n"), "{metrics}");
    // The API still wants its token: the health routes opened nothing else.
    let (status, _) = http(admin, "GET", "/api/v1/status", None, None).await;
    assert_eq!(status, 401);

    // A session in a transaction keeps the listeners draining for up to shutdown_grace (3s),
    // while the admin server still answers (an idle one would be closed at once).
    let mut session = server.connect().await;
    session.ehlo().await;
    session
        .expect("MAIL FROM:<app@sender.test>", 250, "2.1.0")
        .await;
    let daemon = server.take_daemon();
    let stopping = tokio::spawn(daemon.shutdown());
    let deadline = Instant::now() + Duration::from_secs(3);
    let (status, body) = loop {
        let (status, body) = http(admin, "GET", "/readyz", None, None).await;
        if status != 200 || Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(status, 503, "{body}");
    let reason: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reason["ready"], false, "{body}");
    assert!(
        reason["reason"].as_str().unwrap().starts_with("draining"),
        "{body}"
    );
    // Alive all the same, and the scrape says not ready.
    let (status, _) = http(admin, "GET", "/healthz", None, None).await;
    assert_eq!(status, 200);
    let (_, metrics) = http(admin, "GET", "/metrics", None, None).await;
    assert!(metrics.contains("\ntern_ready 0\n"), "{metrics}");
    drop(session);
    tokio::time::timeout(Duration::from_secs(20), stopping)
        .await
        .expect("shutdown in time")
        .unwrap()
        .expect("clean shutdown");
}
