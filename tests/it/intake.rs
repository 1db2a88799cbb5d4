//! The daemon takes mail while its spool's sled is still opening (issue 19: the first 250
//! in under a second after a start with millions of messages): the SMTP listeners answer 220
//! and 250 from the intake journal, and the mail is delivered once, after the move, and only
//! after it was checked against the suppression list.

use crate::delivery::{SENDER, T};
use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};
use std::net::SocketAddr;
use std::time::Duration;
use tern::config::Config;
use tern::daemon::Daemon;
use tokio::task::JoinHandle;

/// How long the test-only hook holds sled's open back: far longer than the SMTP dialogues
/// below take, so the 250s come while it is held.
const HELD: Duration = Duration::from_secs(5);

struct Opening {
    start: JoinHandle<Daemon>,
    smtp: SocketAddr,
    sink: Sink,
    _bounces: Sink,
    dir: tempfile::TempDir,
}

/// A daemon with delivery on, `sink.test` routed to a sink, started with sled's open held
/// back: returns as soon as the SMTP listener serves, its start still running.
async fn start_while_held(opts: impl FnOnce(Options) -> Options) -> Opening {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let options = opts(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .route("sender.test", bounces.addr),
    );
    let dir = tempfile::tempdir().unwrap();
    let text = options.config_text(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let config = Config::parse(&text).unwrap();
    let (tell, listening) = tokio::sync::oneshot::channel();
    let start = tokio::spawn(async move {
        Daemon::start_with_spool_open_delay(config, HELD, tell)
            .await
            .expect("daemon starts")
    });
    let smtp = tokio::time::timeout(T, listening)
        .await
        .expect("listening in time")
        .expect("the start did not fail")[0];
    Opening {
        start,
        smtp,
        sink,
        _bounces: bounces,
        dir,
    }
}

async fn submit(smtp: SocketAddr, rcpt: &str, content: &[u8]) -> Reply {
    let mut c = Client::connect(smtp).await;
    c.expect_greeting().await.assert(220, "");
    c.ehlo().await;
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "").await;
    c.expect(&format!("RCPT TO:<{rcpt}>"), 250, "").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(content)).await;
    let reply = c.reply().await;
    c.expect("QUIT", 221, "").await;
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_taken_while_sled_opens_is_acknowledged_then_delivered_once() {
    let o = start_while_held(|o| o).await;
    for i in 0..3 {
        let content = format!("Subject: intake {i}\r\n\r\ntaken while sled opens\r\n");
        submit(o.smtp, "rcpt@sink.test", content.as_bytes())
            .await
            .assert(250, "2.0.0");
    }
    // Every 250 came while the start still waited for sled: from the intake journal.
    assert!(!o.start.is_finished(), "sled opened before the 250s");
    assert!(
        o.dir
            .path()
            .join("spool/intake")
            .read_dir()
            .unwrap()
            .count()
            > 0,
        "no intake journal"
    );
    let daemon = o.start.await.unwrap();
    assert!(daemon.spool().is_open());
    o.sink.wait_for_messages(3, T).await;
    crate::delivery::wait_for("an empty spool", T, || {
        daemon.spool().list().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = o.sink.messages();
    assert_eq!(got.len(), 3, "each message delivered exactly once");
    for i in 0..3 {
        let subject = format!("Subject: intake {i}");
        let copies = got
            .iter()
            .filter(|m| String::from_utf8_lossy(&m.data).contains(&subject))
            .count();
        assert_eq!(copies, 1, "{subject}");
    }
    assert_eq!(
        o.dir
            .path()
            .join("spool/intake")
            .read_dir()
            .unwrap()
            .count(),
        0,
        "the journal is gone after the move"
    );
    daemon.shutdown().await.unwrap();
}

/// The suppression list lives in the spool, so it cannot be read while sled opens: mail to a
/// suppressed address is taken (250), then dropped with a `suppressed` event before delivery
/// starts; never delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_to_a_suppressed_address_taken_while_sled_opens_is_never_delivered() {
    let dir = tempfile::tempdir().unwrap();
    // A first run puts the address on the list.
    suppress_in_a_first_run(dir.path(), "gone@sink.test").await;
    let sink = Sink::start(SinkBehaviour::default()).await;
    let options = Options::default().deliver().route("sink.test", sink.addr);
    let text = options.config_text(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let (tell, listening) = tokio::sync::oneshot::channel();
    let config = Config::parse(&text).unwrap();
    let start = tokio::spawn(async move {
        Daemon::start_with_spool_open_delay(config, HELD, tell)
            .await
            .unwrap()
    });
    let smtp = listening.await.unwrap()[0];
    submit(smtp, "gone@sink.test", b"Subject: suppressed\r\n\r\nx\r\n")
        .await
        .assert(250, "2.0.0");
    submit(smtp, "kept@sink.test", b"Subject: kept\r\n\r\nx\r\n")
        .await
        .assert(250, "2.0.0");
    assert!(!start.is_finished(), "sled opened before the 250s");
    assert!(
        dir.path().join("spool/intake").read_dir().unwrap().count() > 0,
        "no intake journal"
    );
    let daemon = start.await.unwrap();
    assert_delivered_once_to(&daemon, &sink, "kept@sink.test").await;
    daemon.shutdown().await.unwrap();
}

/// Adversarial: while sled opens, a message over `limits.max_message_size` is refused as
/// always (552 5.3.4), and nothing of it reaches the journal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_limit_is_refused_while_sled_opens() {
    let o = start_while_held(|o| o.limit("max_message_size", 10000)).await;
    let mut c = Client::connect(o.smtp).await;
    c.expect_greeting().await;
    c.ehlo().await;
    c.expect(&format!("MAIL FROM:<{SENDER}> SIZE=10001"), 552, "5.3.4")
        .await;
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "").await;
    c.expect("RCPT TO:<rcpt@sink.test>", 250, "").await;
    c.expect("DATA", 354, "").await;
    let mut content = b"Subject: big\r\n\r\n".to_vec();
    while content.len() <= 200_000 {
        content.extend_from_slice(&[b'x'; 70]);
        content.extend_from_slice(b"\r\n");
    }
    c.send(dot_stuff(&content)).await;
    c.reply().await.assert(552, "5.3.4");
    // The session goes on; a message within the limit is taken, into the journal.
    c.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "").await;
    c.expect("RCPT TO:<rcpt@sink.test>", 250, "").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(b"Subject: small\r\n\r\nx\r\n")).await;
    c.reply().await.assert(250, "2.0.0");
    assert!(!o.start.is_finished(), "sled opened before the 250");
    let journal_bytes: u64 = o
        .dir
        .path()
        .join("spool/intake")
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(
        journal_bytes > 0 && journal_bytes < 10_000,
        "the journal holds the small message only: {journal_bytes} bytes"
    );
    let daemon = o.start.await.unwrap();
    // Delivered after the move: the small message only.
    o.sink.wait_for_messages(1, T).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = o.sink.messages();
    assert_eq!(got.len(), 1);
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: small"));
    daemon.shutdown().await.unwrap();
}

/// A run that crashed while its spool was opening never checked the mail it had taken: the
/// next start moves that journal and checks it against the suppression list before delivery
/// starts, so a suppressed recipient of it is dropped and the other delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_a_crashed_run_took_while_its_spool_opened_is_checked_at_the_next_start() {
    crashed_run_is_checked_at_the_next_start(false).await;
}

/// The narrow end of the same gap: the crashed run had opened its spool and moved the journal
/// into it (the journal file is gone) but ended before its check. The marks the move wrote
/// with the mail make the next start check it all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mail_a_run_moved_but_never_checked_is_checked_at_the_next_start() {
    crashed_run_is_checked_at_the_next_start(true).await;
}

/// A first run suppresses gone@sink.test; a crashed run takes a message to it and to
/// kept@sink.test while its spool opens, and ends before its check: before sled opened, or
/// (`moved`) after its open moved the journal into sled. The next start delivers once, to
/// kept@ only, and records the check: the start after it names nothing to check.
async fn crashed_run_is_checked_at_the_next_start(moved: bool) {
    let dir = tempfile::tempdir().unwrap();
    suppress_in_a_first_run(dir.path(), "gone@sink.test").await;
    // The crashed run: a message to both addresses acknowledged from the journal. Before
    // sled opened, the handle is forgotten with its open held back for a day (so it never
    // moves the journal itself and holds no lock); after the move, it is dropped without
    // anyone reporting the mail checked.
    let spool_dir = dir.path().join("spool");
    let id = {
        let options = tern_queue::SpoolOptions {
            defer_open: true,
            open_delay_for_tests: Some(if moved {
                Duration::from_millis(300)
            } else {
                Duration::from_secs(24 * 3600)
            }),
            ..tern_queue::SpoolOptions::default()
        };
        let spool = tern_queue::Spool::open_with(&spool_dir, &options).unwrap();
        let id = spool.next_id();
        let body =
            b"From: a@app.test\r\nTo: b@sink.test\r\nSubject: taken while opening\r\n\r\nx\r\n"
                .to_vec();
        let mut env = due_now(id, &["gone@sink.test", "kept@sink.test"]);
        env.size = body.len() as u64;
        spool.commit(vec![(env, body)]).await.unwrap();
        assert!(!spool.is_open());
        if moved {
            spool.ready().await.unwrap();
            drop(spool);
        } else {
            std::mem::forget(spool);
        }
        id
    };
    let journals = spool_dir.join("intake").read_dir().unwrap().count();
    assert_eq!(journals > 0, !moved, "{journals} journal files");
    let sink = Sink::start(SinkBehaviour::default()).await;
    let options = Options::default().deliver().route("sink.test", sink.addr);
    let text = options.config_text(dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    let daemon = Daemon::start(Config::parse(&text).unwrap()).await.unwrap();
    assert_delivered_once_to(&daemon, &sink, "kept@sink.test").await;
    assert!(daemon.spool().envelope(id).unwrap().is_none());
    daemon.shutdown().await.unwrap();
    let spool = tern_queue::Spool::open(&spool_dir).unwrap();
    assert!(
        spool.earlier_intake().is_empty(),
        "checked once, and recorded as checked"
    );
}

/// A first run of a daemon on `dir` puts `address` on the suppression list and stops.
async fn suppress_in_a_first_run(dir: &std::path::Path, address: &str) {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let options = Options::default().route("sink.test", sink.addr);
    let text = options.config_text(dir, "127.0.0.1:0", "127.0.0.1:0");
    let daemon = Daemon::start(Config::parse(&text).unwrap()).await.unwrap();
    daemon
        .feedback()
        .suppressions
        .add(vec![tern::suppression::Entry {
            address: address.into(),
            reason: "manual".into(),
            created_ms: 0,
            expires_ms: None,
            source: None,
            scope: None,
        }])
        .await
        .unwrap();
    daemon.shutdown().await.unwrap();
}

/// Once the spool is empty, the sink got exactly one message, for `rcpt` only (the
/// suppressed recipient dropped).
async fn assert_delivered_once_to(daemon: &Daemon, sink: &Sink, rcpt: &str) {
    sink.wait_for_messages(1, T).await;
    crate::delivery::wait_for("an empty spool", T, || {
        daemon.spool().list().unwrap().is_empty()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = sink.messages();
    assert_eq!(got.len(), 1, "one message, delivered once");
    let rcpts: Vec<&str> = got[0].rcpts.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(rcpts, [rcpt], "only the recipient not suppressed");
}

/// An envelope for `recipients` at sink.test, due now.
fn due_now(id: tern_queue::MessageId, recipients: &[&str]) -> tern_queue::Envelope {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tern_queue::Envelope {
        id,
        queue_id: id,
        sender: "bounces@app.test".into(),
        destination: "sink.test".into(),
        recipients: recipients
            .iter()
            .map(|address| tern_queue::Recipient {
                orcpt: None,
                address: (*address).into(),
                notify: tern_queue::Notify::default_rfc3461(),
                state: tern_queue::RecipientState::Pending,
                last_reply: None,
                attempts: 0,
            })
            .collect(),
        env_id: None,
        ret: None,
        body_type: tern_queue::BodyType::SevenBit,
        smtputf8: false,
        size: 0,
        created_ms: now,
        expires_ms: now + 5 * 86_400_000,
        next_due_ms: now,
        attempts: 0,
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
