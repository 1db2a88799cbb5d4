//! Crash safety of the real binary: SIGKILL under concurrent load loses no acknowledged
//! message and duplicates none; the restarted daemon recovers the spool, refuses to share
//! it with `tern queue`, and stops cleanly on SIGTERM, leaving a clean-close record whose
//! counters match the envelopes.

use crate::harness::*;
use std::collections::{HashMap, HashSet};
use std::os::unix::process::ExitStatusExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tern_queue::{Envelope, MessageId, Spool};
use tokio::net::TcpStream;

const CLIENTS: usize = 16;
const LOAD: Duration = Duration::from_millis(1500);
const GRACE_SECS: u64 = 3;

#[derive(Default)]
struct Record {
    /// marker -> (queue id, content as sent)
    acked: HashMap<String, (MessageId, Vec<u8>)>,
    /// Every marker whose content was (at least partly) sent.
    sent: HashSet<String>,
    /// Replies that should never happen to a well-formed message.
    unexpected: Vec<String>,
}

fn load_message(marker: &str) -> Vec<u8> {
    let mut m = format!(
        "From: <load@client.test>\r\nTo: <rcpt@sink.test>\r\nSubject: {marker}\r\n\
         Message-ID: <{marker}@client.test>\r\n\r\n"
    );
    let mut i = 0;
    while m.len() < 5000 {
        m.push_str(&format!(
            "{marker} line {i:03} {}\r\n",
            "abcdefghij".repeat(6)
        ));
        if i % 10 == 0 {
            m.push_str(&format!(".{marker} line starting with a dot\r\n"));
        }
        i += 1;
    }
    m.push_str("end\r\n");
    m.into_bytes()
}

/// Submits messages until `stop` or until the connection breaks (the kill).
async fn load_client(
    addr: std::net::SocketAddr,
    n: usize,
    stop: Arc<AtomicBool>,
    record: Arc<Mutex<Record>>,
) {
    let mut seq = 0;
    let step = Duration::from_secs(10);
    while !stop.load(Ordering::SeqCst) {
        let Ok(Ok(tcp)) = tokio::time::timeout(step, TcpStream::connect(addr)).await else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        let mut c = Client::new(Box::new(tcp));
        macro_rules! reply {
            () => {
                match tokio::time::timeout(step, c.try_reply()).await {
                    Ok(Ok(Some(r))) => r,
                    _ => return,
                }
            };
        }
        if reply!().code != 220 {
            return;
        }
        if c.try_send(b"EHLO load.test\r\n").await.is_err() || reply!().code != 250 {
            return;
        }
        // A few messages per connection, then a new connection: both paths get load.
        for _ in 0..20 {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let marker = format!("crash-{n:02}-{seq:05}");
            seq += 1;
            let content = load_message(&marker);
            let cmds =
                format!("MAIL FROM:<load{n}@client.test>\r\nRCPT TO:<r{n}@sink.test>\r\nDATA\r\n");
            if c.try_send(cmds.as_bytes()).await.is_err() {
                return;
            }
            for want in [250, 250, 354] {
                let r = reply!();
                if r.code != want {
                    record
                        .lock()
                        .unwrap()
                        .unexpected
                        .push(format!("{marker}: {:?}", r.lines));
                    return;
                }
            }
            record.lock().unwrap().sent.insert(marker.clone());
            if c.try_send(&dot_stuff(&content)).await.is_err() {
                return;
            }
            let r = reply!();
            let queued = r.code == 250 && r.lines[0].starts_with("250 2.0.0 Ok: queued as ");
            if !queued {
                record
                    .lock()
                    .unwrap()
                    .unexpected
                    .push(format!("{marker}: {:?}", r.lines));
                return;
            }
            let id = r.queued_id();
            record.lock().unwrap().acked.insert(marker, (id, content));
        }
        let _ = c.try_send(b"QUIT\r\n").await;
    }
}

fn subject_marker(body: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(body).ok()?;
    let start = text.find("\r\nSubject: ")? + "\r\nSubject: ".len();
    let end = start + text[start..].find("\r\n")?;
    Some(text[start..end].to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_message() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let opts = Options {
        shutdown_grace: format!("{GRACE_SECS}s"),
        log_level: "warn".to_string(),
        ..Options::default()
    };
    let config = write_bin_config(dir.path(), port, &opts);
    let config_arg = config.to_str().unwrap();

    // 1. Load, then SIGKILL in the middle of it.
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("first.log"));
    drop(tern.wait_ready(Duration::from_secs(30)).await);
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(Mutex::new(Record::default()));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|n| tokio::spawn(load_client(tern.addr, n, stop.clone(), record.clone())))
        .collect();
    tokio::time::sleep(LOAD).await; // the load phase's duration, not a synchronisation
    tern.child.start_kill().expect("SIGKILL");
    let status = tern.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL: {status:?}");
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        tokio::time::timeout(Duration::from_secs(30), c)
            .await
            .expect("client notices the kill")
            .expect("client task");
    }
    let record = std::mem::take(&mut *record.lock().unwrap());
    assert!(
        record.unexpected.is_empty(),
        "unexpected replies under load: {:?}",
        record.unexpected
    );
    assert!(
        record.acked.len() >= CLIENTS,
        "too little load to prove anything: {} acknowledged messages",
        record.acked.len()
    );
    eprintln!(
        "crash: {} messages acknowledged, {} sent before SIGKILL",
        record.acked.len(),
        record.sent.len()
    );

    // 2. Restart: recovery, and the spool is exclusively the daemon's.
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("second.log"));
    let mut c = tern.wait_ready(Duration::from_secs(30)).await;
    c.ehlo().await;
    c.expect("QUIT", 221, "2.0.0").await;
    let busy = run_tern(&["queue", "list", "--config", config_arg], None).await;
    assert_eq!(
        busy.status.code(),
        Some(75),
        "queue list on a live spool: {}",
        describe(&busy)
    );
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains("in use"),
        "the error says the spool is in use: {}",
        describe(&busy)
    );

    // 3. SIGTERM: clean exit within the grace period.
    send_signal(tern.pid(), "TERM");
    let status = tern.wait_exit(Duration::from_secs(GRACE_SECS + 5)).await;
    assert!(
        status.success(),
        "exit status after SIGTERM: {status:?}; log:\n{}",
        tern.log_text()
    );

    // A clean stop leaves the clean-close record, so the next open trusts the counters
    // instead of scanning (step 4 checks them against the envelopes).
    {
        let spool = Spool::open(&dir.path().join("spool")).expect("open the stopped spool");
        assert!(
            spool.opened_after_clean_close(),
            "SIGTERM closes the spool cleanly; log:\n{}",
            tern.log_text()
        );
    }

    // 4. The stopped spool, through the CLI and directly (after the CLI's clean close).
    let listed = run_tern(&["queue", "list", "--json", "--config", config_arg], None).await;
    assert!(listed.status.success(), "{}", describe(&listed));
    let from_cli: Vec<Envelope> = serde_json::from_slice(&listed.stdout).unwrap_or_else(|e| {
        panic!(
            "queue list --json is not a JSON envelope array ({e}): {}",
            describe(&listed)
        )
    });
    let spool = Spool::open(&dir.path().join("spool")).expect("open the stopped spool");
    assert!(
        spool.opened_after_clean_close(),
        "the CLI closes the spool cleanly"
    );
    let envelopes = sorted(spool.list().unwrap());
    assert_eq!(
        sorted(from_cli),
        envelopes,
        "the CLI lists exactly the spool's envelopes"
    );
    let stats = spool.stats();
    assert_eq!(
        stats.messages as usize,
        envelopes.len(),
        "stats count the listed envelopes"
    );
    let mut by_marker: HashMap<String, Vec<(Envelope, Vec<u8>)>> = HashMap::new();
    let mut total = 0u64;
    for env in &envelopes {
        let body = spool
            .body(env.id)
            .unwrap()
            .expect("every listed envelope has a body")
            .to_vec();
        assert_eq!(env.size, body.len() as u64, "{env:?}");
        total += body.len() as u64;
        let marker = subject_marker(&body)
            .unwrap_or_else(|| panic!("no marker in {}", String::from_utf8_lossy(&body)));
        assert!(
            record.sent.contains(&marker),
            "a message nobody sent: {marker}"
        );
        by_marker
            .entry(marker)
            .or_default()
            .push((env.clone(), body));
    }
    assert_eq!(
        stats.bytes as u64, total,
        "stats bytes are the bodies' total"
    );
    for (marker, copies) in &by_marker {
        assert_eq!(copies.len(), 1, "{marker} is stored {} times", copies.len());
    }
    let mut lost = Vec::new();
    for (marker, (id, content)) in &record.acked {
        let Some(copies) = by_marker.get(marker) else {
            lost.push(marker.clone());
            continue;
        };
        let (env, body) = &copies[0];
        assert_eq!(env.id, *id, "{marker}: stored under the acknowledged id");
        assert_eq!(env.queue_id, *id);
        assert_eq!(env.recipients.len(), 1);
        prepended(body, content, false);
    }
    assert!(
        lost.is_empty(),
        "{} acknowledged messages lost after SIGKILL: {lost:?}",
        lost.len()
    );
    eprintln!(
        "crash: {} stored after recovery ({} acknowledged, {} in flight at the kill)",
        envelopes.len(),
        record.acked.len(),
        envelopes.len() - record.acked.len()
    );
}

/// A deferred envelope for `n`, due in two days (nothing falls due during the test).
fn deferred(id: MessageId, n: u64) -> Envelope {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let address = format!("user{n}@customer{}.test", n % 50);
    Envelope {
        id,
        queue_id: id,
        sender: "bounces@mailer.test".into(),
        destination: format!("customer{}.test", n % 50),
        recipients: vec![tern_queue::Recipient {
            orcpt: Some(format!("rfc822;{address}")),
            address,
            notify: tern_queue::Notify::default_rfc3461(),
            state: tern_queue::RecipientState::Pending,
            last_reply: None,
            attempts: 1,
        }],
        env_id: None,
        ret: None,
        body_type: tern_queue::BodyType::SevenBit,
        smtputf8: false,
        size: 0,
        created_ms: now,
        expires_ms: now + 5 * 86_400_000,
        next_due_ms: now + 2 * 86_400_000 + n,
        attempts: 1,
        source: tern_queue::Source {
            client_ip: "127.0.0.1".into(),
            helo: "app.test".into(),
            auth_user: None,
            protocol: "ESMTP".into(),
        },
        held: false,
        delay_notified: false,
        parked: false,
        pool: None,
        not_before_ms: 0,
        body_id: None,
        campaign: None,
        send_time_planned: false,
    }
}

/// After a crash the daemon takes mail before recovery has counted the spool: the open does
/// not wait for the scan (the log says `recovering=true`), a message is accepted, the scan
/// ends in the background, and its count is exact: after SIGTERM the clean-close record's
/// counters (trusted by the next open) equal the envelopes present. How fast the first
/// message comes with a million messages is benches/spool_scale.sh's business.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_crash_mail_is_taken_while_recovery_counts_in_the_background() {
    const OLD: u64 = 20_000;
    let dir = tempfile::tempdir().unwrap();
    let spool_dir = dir.path().join("spool");
    {
        let spool = Spool::open(&spool_dir).unwrap();
        for chunk in (0..OLD).collect::<Vec<_>>().chunks(1_000) {
            let parts = chunk
                .iter()
                .map(|&n| {
                    let id = spool.next_id();
                    (
                        deferred(id, n),
                        format!("Subject: old {n}\r\n\r\nbody {n}\r\n").into_bytes(),
                    )
                })
                .collect();
            spool.commit(parts).await.unwrap();
        }
    }
    let port = free_port();
    let opts = Options {
        log_level: "info".to_string(),
        ..Options::default()
    };
    let config = write_bin_config(dir.path(), port, &opts);

    // A clean open removes the clean-close record; SIGKILL then leaves none: a crash.
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("first.log"));
    drop(tern.wait_ready(Duration::from_secs(30)).await);
    // The listener answers before sled is open (the intake journal); a kill before the open
    // took the record would leave the spool as cleanly closed as it was.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !tern.log_text().contains("spool opened") {
        assert!(std::time::Instant::now() < deadline, "{}", tern.log_text());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tern.child.start_kill().expect("SIGKILL");
    assert_eq!(
        tern.wait_exit(Duration::from_secs(10)).await.signal(),
        Some(9)
    );

    let mut tern = TernProc::spawn(&config, port, &dir.path().join("second.log"));
    let mut c = tern.wait_ready(Duration::from_secs(30)).await;
    c.ehlo().await;
    c.expect("MAIL FROM:<app@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<new@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.expect("Subject: new\r\n\r\nafter the crash\r\n.", 250, "2.0.0")
        .await;
    c.expect("QUIT", 221, "2.0.0").await;
    // The 250 may come before sled is open (the intake journal; tests/it/intake.rs).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let opened = loop {
        if let Some(line) = tern.log_text().lines().find(|l| l.contains("spool opened")) {
            break line.to_owned();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no 'spool opened' line; log:\n{}",
            tern.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(opened.contains("recovering=true"), "{opened}");
    assert!(opened.contains("after_clean_close=false"), "{opened}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !tern.log_text().contains("spool recovery done") {
        assert!(
            std::time::Instant::now() < deadline,
            "recovery did not finish; log:\n{}",
            tern.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    send_signal(tern.pid(), "TERM");
    assert!(tern.wait_exit(Duration::from_secs(20)).await.success());

    let spool = Spool::open(&spool_dir).unwrap();
    assert!(spool.opened_after_clean_close(), "{}", tern.log_text());
    let envelopes = spool.list().unwrap();
    assert!(envelopes.len() as u64 > OLD, "the new message is there too");
    assert_eq!(spool.stats().messages, envelopes.len() as u64);
    assert_eq!(
        spool.stats().bytes,
        envelopes.iter().map(|e| e.size).sum::<u64>()
    );
}
