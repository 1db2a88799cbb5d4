//! Config reload: in-process through `Daemon::reload` (the call SIGHUP makes), and with the
//! real binary and a real SIGHUP. A valid change applies to new sessions and new mail without
//! disturbing a session already open; an invalid one changes nothing and names the key.

use std::time::Duration;

use tern::dkim::{generate_key, KeyAlgorithm};

use crate::delivery::{relay, wait_for, SENDER, T};
use crate::harness::*;
use crate::metrics::{scrape, value};
use crate::sink::{Sink, SinkBehaviour};

const MAIL: &[u8] = b"From: sender@sender.test\r\nSubject: reload\r\n\r\nhello\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_to_new_mail_without_dropping_an_open_session() {
    let r = relay(SinkBehaviour::default(), |o| o.limit("max_recipients", 2)).await;
    let second = Sink::start(SinkBehaviour::default()).await;

    // Before: sink.test goes to the first sink.
    let mut c = r.server.connect().await;
    c.ehlo().await;
    c.submit(SENDER, &["before@sink.test"], MAIL).await;
    wait_for("delivery to the first sink", T, || {
        r.sink.messages().len() == 1
    })
    .await;

    // A session in the middle of a transaction when the reload happens.
    let mut open = r.server.connect().await;
    open.ehlo().await;
    open.expect(&format!("MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        .await;
    open.expect("RCPT TO:<open1@sink.test>", 250, "2.1.5").await;

    let new = Options::default()
        .deliver()
        .route("sink.test", second.addr)
        .route("sender.test", r.bounces.addr)
        .limit("max_recipients", 1);
    let report = r.server.reload(&new).expect("valid reload");
    assert!(report.restart_needed.is_empty(), "{report:?}");

    // The open session keeps the limit it started with (2 recipients) and completes.
    open.expect("RCPT TO:<open2@sink.test>", 250, "2.1.5").await;
    open.expect("DATA", 354, "").await;
    open.send(b"Subject: open\r\n\r\nstill here\r\n.\r\n").await;
    open.reply().await.assert(250, "2.0.0");

    // A new session gets the new limit.
    let mut fresh = r.server.connect().await;
    fresh.ehlo().await;
    fresh
        .expect(&format!("MAIL FROM:<{SENDER}>"), 250, "2.1.0")
        .await;
    fresh.expect("RCPT TO:<new1@sink.test>", 250, "2.1.5").await;
    fresh.expect("RCPT TO:<new2@sink.test>", 452, "4.5.3").await;
    fresh.expect("DATA", 354, "").await;
    fresh.send(b"Subject: new\r\n\r\nnew route\r\n.\r\n").await;
    fresh.reply().await.assert(250, "2.0.0");

    // Mail routed after the reload follows the new route; nothing more reaches the old sink.
    wait_for("both messages at the second sink", T, || {
        second.messages().len() == 2
    })
    .await;
    let mut rcpts: Vec<String> = second
        .messages()
        .iter()
        .flat_map(|m| m.rcpt_addresses().into_iter().map(str::to_string))
        .collect();
    rcpts.sort();
    assert_eq!(
        rcpts,
        ["new1@sink.test", "open1@sink.test", "open2@sink.test"]
    );
    assert_eq!(r.sink.messages().len(), 1, "the old route got nothing new");

    let samples = scrape(r.server.admin()).await;
    assert_eq!(
        value(&samples, "tern_config_reloads_total{result=\"ok\"}"),
        1.0
    );
    assert_eq!(
        value(&samples, "tern_config_reloads_total{result=\"failed\"}"),
        0.0
    );
    r.server.stop().await;
}

fn write_key(path: &std::path::Path, algorithm: KeyAlgorithm) {
    let key = generate_key(algorithm).unwrap();
    write_secret(path, key.private_key_pem);
}

/// The DKIM-Signature algorithm (`a=`) of a spooled message.
fn dkim_algorithm(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let header = text
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .replace("\r\n\t", " ")
        .replace("\r\n ", " ");
    let signature = header
        .lines()
        .find(|l| l.starts_with("DKIM-Signature:"))
        .unwrap_or_else(|| panic!("no DKIM-Signature in:\n{header}"));
    let a = signature
        .split(';')
        .map(str::trim)
        .find_map(|tag| tag.strip_prefix("a="))
        .expect("a= tag");
    a.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dkim_key_rotation_by_reload_signs_with_the_new_key() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("example.com.s1.pem");
    write_key(&key, KeyAlgorithm::Ed25519);
    let opts = Options::default().dkim(format!(
        "domain = \"example.com\"\nselector = \"s1\"\nkey = {:?}",
        key.display().to_string()
    ));
    let server = TestServer::start(opts.clone()).await;
    let content = b"From: alice@example.com\r\nSubject: rotate\r\n\r\nhi\r\n";

    let mut c = server.connect().await;
    c.ehlo().await;
    let before = c
        .submit("alice@example.com", &["x@sink.test"], content)
        .await;
    assert_eq!(dkim_algorithm(&server.body(before)), "ed25519-sha256");

    // Same config, new key material in the same file: the reload re-reads it.
    std::fs::remove_file(&key).unwrap();
    write_key(&key, KeyAlgorithm::Rsa { bits: 2048 });
    server.reload(&opts).expect("valid reload");
    let after = c
        .submit("alice@example.com", &["x@sink.test"], content)
        .await;
    assert_eq!(dkim_algorithm(&server.body(after)), "rsa-sha256");

    let samples = scrape(server.admin()).await;
    for algorithm in ["ed25519-sha256", "rsa-sha256"] {
        let sample = format!(
            "tern_dkim_signatures_total{{algorithm=\"{algorithm}\",domain=\"example.com\"}}"
        );
        assert_eq!(value(&samples, &sample), 1.0, "{sample}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_reload_is_refused_and_names_the_key() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    let elsewhere = Sink::start(SinkBehaviour::default()).await;

    // An unreadable DKIM key in an otherwise valid config that also moves the route.
    let missing = r.server.dir.path().join("no-such-key.pem");
    let broken = Options::default()
        .deliver()
        .route("sink.test", elsewhere.addr)
        .route("sender.test", r.bounces.addr)
        .dkim(format!(
            "domain = \"example.com\"\nselector = \"s1\"\nkey = {:?}",
            missing.display().to_string()
        ));
    let errors = r.server.reload(&broken).expect_err("refused").0;
    assert!(
        errors.iter().any(|e| e.starts_with("dkim[0].key: ")),
        "{errors:?}"
    );

    // A file that does not compile: a route with a bad host.
    let file = r.server.dir.path().join("bad.toml");
    let text = Options::default()
        .deliver()
        .route("sink.test", "bad_host!:25")
        .config_text(r.server.dir.path(), "127.0.0.1:0", "127.0.0.1:0");
    std::fs::write(&file, text).unwrap();
    let errors = r.server.daemon().reload_file(&file).expect_err("refused").0;
    assert!(
        errors.iter().any(|e| e.starts_with("routes[0].hosts[0]: ")),
        "{errors:?}"
    );

    // Nothing changed: mail still goes to the first sink, unsigned.
    let mut c = r.server.connect().await;
    c.ehlo().await;
    c.submit(SENDER, &["still@sink.test"], MAIL).await;
    wait_for("delivery on the old route", T, || {
        r.sink.messages().len() == 1
    })
    .await;
    assert!(elsewhere.messages().is_empty());

    let samples = scrape(r.server.admin()).await;
    assert_eq!(
        value(&samples, "tern_config_reloads_total{result=\"failed\"}"),
        2.0
    );
    assert_eq!(
        value(&samples, "tern_config_reloads_total{result=\"ok\"}"),
        0.0
    );
    r.server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keys_are_reported_and_kept() {
    let server = TestServer::start(Options::default()).await;
    let changed = Options {
        shutdown_grace: "7s".to_string(),
        ..Options::default()
    }
    .spool("max_age", "\"1d\"");
    let report = server.reload(&changed).expect("valid reload");
    assert_eq!(
        report.restart_needed,
        ["server.shutdown_grace", "spool.max_age"]
    );
    // Still serving on the same listener.
    let mut c = server.connect().await;
    c.ehlo().await;
    server.stop().await;
}

/// The real binary: SIGHUP with an edited file changes where mail goes; SIGHUP with a broken
/// file keeps the daemon running on its old config and logs the error with its key path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_the_file_and_survives_a_broken_one() {
    let first = Sink::start(SinkBehaviour::default()).await;
    let second = Sink::start(SinkBehaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let opts = Options::default().deliver().route("sink.test", first.addr);
    let config = write_bin_config(dir.path(), port, &opts);
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let mut c = tern.wait_ready(T).await;
    c.ehlo().await;
    c.submit(SENDER, &["one@sink.test"], MAIL).await;
    wait_for("delivery to the first sink", T, || {
        first.messages().len() == 1
    })
    .await;

    // Log rotation: the file is moved away, SIGHUP makes tern write to a new one by name.
    let log = dir.path().join("delivery.log");
    let log_has = |path: &std::path::Path, what: &str| {
        std::fs::read_to_string(path).is_ok_and(|text| text.contains(what))
    };
    wait_for("the first delivery logged", T, || {
        log_has(&log, "one@sink.test")
    })
    .await;
    std::fs::rename(&log, dir.path().join("delivery.log.1")).unwrap();
    write_bin_config(
        dir.path(),
        port,
        &Options::default().deliver().route("sink.test", second.addr),
    );
    send_signal(tern.pid(), "HUP");
    wait_for("the reload in the log", T, || {
        tern.log_text().contains("config reloaded")
    })
    .await;
    c.submit(SENDER, &["two@sink.test"], MAIL).await;
    wait_for("delivery to the second sink", T, || {
        second.messages().len() == 1
    })
    .await;
    wait_for("the second delivery logged in a new file", T, || {
        log_has(&log, "two@sink.test")
    })
    .await;
    assert!(!log_has(&log, "one@sink.test"), "the new file starts empty");
    assert!(log_has(&dir.path().join("delivery.log.1"), "one@sink.test"));

    // A broken config still rotates the log.
    std::fs::rename(&log, dir.path().join("delivery.log.2")).unwrap();
    std::fs::write(&config, "[[listeners]]\naddress = \"nonsense\"\n").unwrap();
    send_signal(tern.pid(), "HUP");
    wait_for("the refusal in the log", T, || {
        tern.log_text().contains("config reload refused")
    })
    .await;
    assert!(
        tern.log_text().contains("listeners[0].address: "),
        "{}",
        tern.log_text()
    );
    assert!(tern.child.try_wait().unwrap().is_none(), "still running");
    // The session opened before both reloads still works, on the last good config.
    c.submit(SENDER, &["three@sink.test"], MAIL).await;
    wait_for("delivery on the last good route", T, || {
        second.messages().len() == 2
    })
    .await;
    assert_eq!(first.messages().len(), 1);
    wait_for("the third delivery logged in a new file", T, || {
        log_has(&log, "three@sink.test")
    })
    .await;

    send_signal(tern.pid(), "TERM");
    let status = tern.wait_exit(Duration::from_secs(20)).await;
    assert!(status.success(), "{status:?}\n{}", tern.log_text());
}
