//! Disk full: the spool lives on a small file system made for the test (a size-limited tmpfs
//! the test mounts; tests run as root), which a filler file then nearly fills, as a log or
//! another program would. The spool keeps `spool.min_free_space` free: mail that would eat
//! into it is refused with `452 4.3.1` (HTTP 507) before anything of it is written, what was
//! acknowledged stays, and mail is accepted again by itself once space is back.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;
use crate::delivery::SENDER;

/// A tmpfs of `size` bytes mounted on a fresh temporary directory, unmounted on drop.
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// `None` (after saying why) where mounting is impossible (not root, no tmpfs).
    fn mount(size: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(SmallFs { dir }),
            Ok(out) => {
                eprintln!(
                    "SKIPPED: cannot mount a tmpfs for the disk-full test: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot run mount for the disk-full test: {e}");
                None
            }
        }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Bytes free on it now.
    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(self.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the available bytes")
    }

    /// Writes a file that leaves about `leave` bytes free, as another program filling the
    /// disk would.
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 64 << 10];
        let mut left = self.free().saturating_sub(leave);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            file.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        file.sync_all().unwrap();
        path
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        // Lazy: the daemon's files are closed by now, but a straggler must not fail the test.
        let _ = Command::new("umount").arg("-l").arg(self.path()).status();
    }
}

/// A message of about `size` bytes whose body starts with `marker`.
fn sized_message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = message(marker);
    let line = b"0123456789abcdefghijklmnopqrstuvwxyz0123456789abcdefghijklmnopqrstuvwxyz\r\n";
    while m.len() < size {
        m.extend_from_slice(line);
    }
    m
}

/// MAIL, RCPT, DATA and the content; the reply to the final dot.
async fn transaction(c: &mut Client, content: &[u8]) -> Reply {
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<u@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(content)).await;
    c.reply().await
}

/// Fills the spool's file system until mail is refused. Before, the spool wrote until the
/// storage engine failed, and a failed write poisoned the spool for good: every later
/// message got `451 4.3.0` until tern was restarted. Now: `452 4.3.1` at the end of DATA
/// and at MAIL FROM (with SIZE), 507 over HTTP, nothing of a refused message in the spool,
/// every acknowledged message intact, and mail accepted again as soon as the filler is gone,
/// without a restart (and the spool still closes cleanly).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_answers_452_and_recovers() {
    const MIB: u64 = 1 << 20;
    let Some(fs) = SmallFs::mount(64 * MIB) else {
        return;
    };
    let spool_dir = fs.path().join("spool");
    let opts = Options::default()
        .spool("path", format!("{:?}", spool_dir.display().to_string()))
        .spool("min_free_space", "\"16MiB\"");
    let mut server = TestServer::start(opts.clone()).await;
    let mut acked = Vec::new();
    let mut c = server.connect().await;
    c.ehlo().await;
    let first = message("before-the-disk-filled");
    acked.push((c.submit(SENDER, &["u@sink.test"], &first).await, first));

    // Another program leaves 20 MiB: two 1 MiB messages fit above the 16 MiB reserve (each
    // counted twice), the third does not.
    let filler = fs.fill_leaving(20 * MIB);
    let mut refused = None;
    for n in 0..10 {
        let content = sized_message(&format!("filling-{n}"), MIB as usize);
        let reply = transaction(&mut c, &content).await;
        if reply.code == 250 {
            acked.push((reply.queued_id(), content));
        } else {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the disk filled up without a refusal");
    refused.assert(452, "4.3.1");
    assert!(acked.len() >= 2, "a message fitted before the disk filled");
    // The client is told before it sends a message of the declared size.
    c.expect(
        &format!("MAIL FROM:<{SENDER}> SIZE={}", 2 * MIB),
        452,
        "4.3.1",
    )
    .await;
    c.expect("RSET", 250, "").await;
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&serde_json::json!({
                "from": SENDER,
                "to": ["u@sink.test"],
                "message": {"from": SENDER, "to": ["u@sink.test"], "subject": "s",
                            "text": "x".repeat(2 * MIB as usize)},
            })),
        )
        .await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(
        server.message_count(),
        acked.len() as u64,
        "nothing of a refused message is counted"
    );
    assert_eq!(server.envelopes().len(), acked.len(), "nor stored");

    // Space comes back: mail is accepted again, by itself.
    std::fs::remove_file(filler).unwrap();
    let after = sized_message("after-the-disk-filled", MIB as usize);
    let reply = transaction(&mut c, &after).await;
    acked.push((reply.queued_id(), after));
    c.expect("QUIT", 221, "").await;
    let check = |server: &TestServer| {
        assert_eq!(server.envelopes().len(), acked.len());
        for (id, content) in &acked {
            let body = server.body(*id);
            assert!(
                body.ends_with(content),
                "message {id} is not what was acknowledged"
            );
        }
    };
    check(&server);
    server = server.restart(opts).await;
    assert!(
        server.spool().opened_after_clean_close(),
        "a full disk left the spool unclean"
    );
    check(&server);
    server.stop().await;
}

/// A webhook endpoint that is gone for good while mail flows: every outcome queues an event
/// in its outbox in the spool, so before, the outbox grew until the disk was full. Now it
/// holds at most `max_backlog` events: the oldest are dropped and counted, and when the
/// endpoint comes back it gets the newest ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_webhook_endpoint_cannot_fill_the_spool() {
    const MAX: usize = 5;
    const SENT: usize = 12;
    let sink = crate::sink::Sink::start(crate::sink::SinkBehaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("hook.secret");
    write_secret(&secret, crate::suppression::SECRET);
    // Nothing listens there until the end.
    let hook: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            // One connection: outcomes, and so events, in the order sent.
            .delivery("max_connections_per_destination", 1)
            .extra(format!(
                "[[webhooks]]\nurl = \"http://{hook}/hook\"\nsecret_file = {:?}\n\
                 batch_size = 100\ninterval = \"20ms\"\nmax_backlog = {MAX}\n",
                secret.display().to_string()
            )),
    )
    .await;
    let mut c = server.connect().await;
    c.ehlo().await;
    for n in 0..SENT {
        c.submit(SENDER, &[&format!("u{n}@sink.test")], &message("hook"))
            .await;
    }
    c.expect("QUIT", 221, "").await;
    sink.wait_for_messages(SENT, T).await;

    // Every delivery made an event; the outbox keeps the last MAX of them.
    let evicted = || {
        sample(
            &server,
            "tern_state_evictions_total{map=\"webhook_events\"}",
        )
    };
    let deadline = Instant::now() + T;
    loop {
        let stored = server.spool().count_events("webhook/0").unwrap();
        if stored == MAX as u64 && evicted().await == (SENT - MAX) as f64 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "outbox holds {stored} events, {} evicted",
            evicted().await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The endpoint comes back: it gets the newest events, the dropped ones never.
    let (_, posts, _task) = crate::suppression::receiver(hook).await;
    let deadline = Instant::now() + T;
    while posts.lock().unwrap().len() < MAX {
        assert!(Instant::now() < deadline, "events not posted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut got: Vec<String> = posts
        .lock()
        .unwrap()
        .iter()
        .map(|e| e["recipient"].as_str().unwrap().to_string())
        .collect();
    got.sort();
    let mut newest: Vec<String> = (SENT - MAX..SENT)
        .map(|n| format!("u{n}@sink.test"))
        .collect();
    newest.sort();
    assert_eq!(got, newest);
}
