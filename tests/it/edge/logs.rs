//! What logs must not carry. A webhook URL's path is often the receiver's secret (Slack-style
//! hook URLs): whoever reads the logs must not be able to post events as tern.

use std::time::{Duration, Instant};

use crate::harness::*;

/// The webhook is down, so every post fails and is logged; the log names the receiver's
/// host and port but never the secret in its path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_url_secret_never_reaches_the_log() {
    const SECRET_PATH: &str = "hooks/T0SECRET/B0SECRET/s3cr3tTokenOfTheReceiver";
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    write_secret(&secret, "signing-secret-of-the-test\n");
    let (hook_port, sink_port) = (free_port(), free_port());
    let opts = Options::default()
        .deliver()
        .route("sink.test", format!("127.0.0.1:{sink_port}"))
        .extra(format!(
            "[[webhooks]]\nurl = \"http://127.0.0.1:{hook_port}/{SECRET_PATH}\"\nsecret_file = {:?}\ninterval = \"50ms\"\n",
            secret.display().to_string()
        ));
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &opts);
    let log = dir.path().join("tern.log");
    let mut tern = TernProc::spawn(&config, port, &log);
    let mut c = tern.wait_ready(Duration::from_secs(30)).await;
    c.ehlo().await;
    // Nothing listens on the sink's port: the attempt is deferred, which is an event.
    c.submit(
        "a@client.test",
        &["b@sink.test"],
        b"Subject: x\r\n\r\nx\r\n",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !tern.log_text().contains("webhook post failed") {
        assert!(
            Instant::now() < deadline,
            "no failed post logged:\n{}",
            tern.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_signal(tern.pid(), "TERM");
    tern.wait_exit(Duration::from_secs(15)).await;
    let text = tern.log_text();
    assert!(
        !text.contains("s3cr3t"),
        "the secret path is in the log:\n{text}"
    );
    assert!(!text.contains("T0SECRET"), "{text}");
    assert!(
        text.contains(&format!("127.0.0.1:{hook_port}/...")),
        "the log still says which webhook:\n{text}"
    );
}
