//! The command line: check-config, hash-password, queue list / show.

use crate::harness::*;
use std::time::Duration;
use tern_queue::Envelope;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_accepts_the_shipped_example() {
    let out = run_tern(&["check-config", "--config", "config/tern.toml"], None).await;
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("config/tern.toml: ok"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_reports_every_error_with_its_key_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        r#"
[server]
hostname = "bad_host"
shutdown_grace = "soon"

[[listeners]]
address = "not-an-address"

[[listeners]]
address = "127.0.0.1:2525"
mode = "lmtp"

[relay]
networks = ["10.0.0.0/33"]

[[auth.users]]
name = "alice"
password = "hunter2"

[limits]
max_recipients = 0
max_eror = 3

[log]
level = "verbose"
"#,
    )
    .unwrap();
    let out = run_tern(&["check-config", "--config", path.to_str().unwrap()], None).await;
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let expected = [
        "server.hostname: ",
        "server.shutdown_grace: ",
        "listeners[0].address: ",
        "listeners[1].mode: ",
        "relay.networks[0]: ",
        "auth.users[0].password: ",
        "limits.max_recipients: ",
        "limits.max_eror: unknown key (did you mean `max_errors`?)",
        "log.level: ",
    ];
    for want in expected {
        assert!(
            stderr.lines().any(|l| l.trim_start().starts_with(want)),
            "missing {want:?} on a line of its own:\n{stderr}"
        );
    }
    assert!(
        stderr.contains(path.to_str().unwrap()),
        "names the file:\n{stderr}"
    );
    assert!(
        out.stdout.is_empty(),
        "nothing on stdout: {}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_checks_tls_files_and_missing_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tls.toml");
    std::fs::write(
        &path,
        "server.hostname = \"mx.test\"\n[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
         [tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
    )
    .unwrap();
    let out = run_tern(&["check-config", "--config", path.to_str().unwrap()], None).await;
    assert_eq!(out.status.code(), Some(78), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("tls.cert") && stderr.contains("/nonexistent/cert.pem"),
        "{stderr}"
    );

    let out = run_tern(
        &["check-config", "--config", "/nonexistent/tern.toml"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(78), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("/nonexistent/tern.toml: no such file"),
        "{}",
        describe(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hash_password_output_verifies() {
    let out = run_tern(&["hash-password"], Some(b"correct horse\n")).await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let hash = stdout.trim_end_matches('\n');
    assert_eq!(hash.lines().count(), 1, "one line: {stdout:?}");
    assert!(hash.starts_with("$argon2id$"), "{hash}");
    assert!(
        tern::auth::verify_password(hash, "correct horse"),
        "the printed hash verifies"
    );
    assert!(
        !tern::auth::verify_password(hash, "correct horse\n"),
        "the newline is not part of it"
    );
    assert!(!tern::auth::verify_password(hash, "wrong"));
    // The hash is accepted in a config file.
    let text = format!(
        "server.hostname = \"mx.test\"\n[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
         [[auth.users]]\nname = \"app\"\npassword_hash = \"{hash}\"\n"
    );
    tern::config::Config::parse(&text).expect("hash-password output is a valid password_hash");

    let empty = run_tern(&["hash-password"], Some(b"\n")).await;
    assert_eq!(
        empty.status.code(),
        Some(65),
        "empty password refused: {}",
        describe(&empty)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_show_prints_envelope_and_headers() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &Options::default());
    let cfg = config.to_str().unwrap();
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let mut c = tern.wait_ready(Duration::from_secs(30)).await;
    c.ehlo().await;
    let content = b"From: <a@client.test>\r\nSubject: show-me\r\n\r\nthe body text\r\n".to_vec();
    c.expect("MAIL FROM:<a@client.test> ENVID=env-1", 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&content)).await;
    let id = c.reply().await.queued_id();
    c.expect("QUIT", 221, "2.0.0").await;
    send_signal(tern.pid(), "TERM");
    let status = tern.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status:?}");

    let id_text = id.to_string();
    let out = run_tern(&["queue", "show", &id_text, "--config", cfg], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    let stdout = String::from_utf8(out.stdout.clone()).unwrap();
    let (json, headers) = stdout
        .split_once("\n\n")
        .expect("envelope, blank line, headers");
    let env: Envelope =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("envelope JSON ({e}): {json}"));
    assert_eq!(env.id, id);
    assert_eq!(env.sender, "a@client.test");
    assert_eq!(env.env_id.as_deref(), Some("env-1"));
    assert_eq!(env.recipients[0].address, "x@sink.test");
    assert!(
        headers.starts_with("Received: from client.test ([127.0.0.1])"),
        "{headers:?}"
    );
    assert!(headers.contains("\r\nSubject: show-me\r\n"), "{headers:?}");
    assert!(
        !headers.contains("the body text"),
        "headers only: {headers:?}"
    );

    // --body shows the whole stored message; ids are accepted in lowercase too.
    let lower = id_text.to_ascii_lowercase();
    let out = run_tern(&["queue", "show", &lower, "--body", "--config", cfg], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(out.stdout.ends_with(&content), "{}", describe(&out));

    // The table lists it.
    let out = run_tern(&["queue", "list", "--config", cfg], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with(&id_text) && l.contains("sink.test")),
        "{table}"
    );
    assert!(table.contains("-- 1 messages"), "{table}");

    // Bad and unknown ids.
    let out = run_tern(&["queue", "show", "xyz", "--config", cfg], None).await;
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    let out = run_tern(
        &["queue", "show", "0000000000000001", "--config", cfg],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no message 0000000000000001"),
        "{}",
        describe(&out)
    );
}

/// A config for the `tern` binary that points at the in-process daemon's admin API (and its
/// spool, for the offline fallback once the daemon is stopped).
pub(crate) fn cli_config(server: &TestServer) -> std::path::PathBuf {
    let text = Options::default()
        .config_text(server.dir.path(), "127.0.0.1:1", "127.0.0.1:0")
        .replace(
            "address = \"127.0.0.1:0\"\ntoken_file",
            &format!("address = \"{}\"\ntoken_file", server.admin()),
        );
    assert!(text.contains(&server.admin().to_string()), "{text}");
    let path = server.dir.path().join("cli.toml");
    std::fs::write(&path, text).unwrap();
    path
}

pub(crate) async fn tern_ok(args: &[&str]) -> String {
    let out = run_tern(args, None).await;
    assert!(out.status.success(), "{args:?}: {}", describe(&out));
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_drive_the_running_daemon_and_fall_back_offline() {
    // Delivery is suspended by the config flag: the message stays put.
    let mut server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let id = c
        .submit("a@client.test", &["x@sink.test"], &message("cli"))
        .await;
    let id_text = id.to_string();
    let config = cli_config(&server);
    let cfg = config.to_str().unwrap();

    let summary = tern_ok(&["queue", "summary", "--config", cfg]).await;
    assert!(summary.contains("ALL DELIVERY SUSPENDED"), "{summary}");
    assert!(
        summary
            .lines()
            .any(|l| l.starts_with("sink.test") && l.contains(" 1 ")),
        "{summary}"
    );

    let listed: serde_json::Value =
        serde_json::from_str(&tern_ok(&["queue", "list", "--json", "--config", cfg]).await)
            .unwrap();
    assert_eq!(listed["messages"][0]["id"], id_text, "{listed}");
    let table = tern_ok(&["queue", "list", "--config", cfg]).await;
    assert!(table.lines().any(|l| l.starts_with(&id_text)), "{table}");

    let out = tern_ok(&[
        "queue",
        "suspend",
        "Sink.Test",
        "--duration",
        "1h",
        "--reason",
        "cli",
        "--config",
        cfg,
    ])
    .await;
    assert!(out.starts_with("suspended sink.test until"), "{out}");
    let list: serde_json::Value =
        serde_json::from_str(&tern_ok(&["queue", "suspensions", "--json", "--config", cfg]).await)
            .unwrap();
    let suspended: Vec<&str> = list["suspensions"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["destination"].as_str())
        .collect();
    assert_eq!(suspended, ["sink.test"], "{list}");
    let out = tern_ok(&["queue", "resume", "sink.test", "--config", cfg]).await;
    assert_eq!(out, "resumed sink.test\n");
    let out = tern_ok(&["queue", "resume", "sink.test", "--config", cfg]).await;
    assert_eq!(out, "sink.test was not suspended\n");

    let out = tern_ok(&["queue", "hold", &id_text, "--config", cfg]).await;
    assert_eq!(out, "1 of 1 matching messages affected\n");
    assert!(server.envelope(id).held);
    let held: serde_json::Value = serde_json::from_str(
        &tern_ok(&["queue", "list", "--held", "--json", "--config", cfg]).await,
    )
    .unwrap();
    assert_eq!(held["messages"].as_array().unwrap().len(), 1, "{held}");
    let out = tern_ok(&[
        "queue",
        "release",
        "--destination",
        "sink.test",
        "--config",
        cfg,
    ])
    .await;
    assert_eq!(out, "1 of 1 matching messages affected\n");
    assert!(!server.envelope(id).held);

    // The API's errors, with its message.
    let out = run_tern(&["queue", "hold", "--config", cfg], None).await;
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("a selector is required"),
        "{}",
        describe(&out)
    );
    let out = run_tern(
        &["queue", "show", "00063F0000000000", "--config", cfg],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the queue"),
        "{}",
        describe(&out)
    );

    // Stopped daemon: list and show read the spool; management needs the daemon.
    tokio::time::timeout(Duration::from_secs(20), server.take_daemon().shutdown())
        .await
        .expect("shutdown in time")
        .expect("clean shutdown");
    let offline: Vec<Envelope> =
        serde_json::from_str(&tern_ok(&["queue", "list", "--json", "--config", cfg]).await)
            .unwrap();
    assert_eq!(offline.len(), 1);
    assert_eq!(offline[0].id, id);
    let shown = tern_ok(&["queue", "show", &id_text, "--config", cfg]).await;
    assert!(shown.contains("\"sender\": \"a@client.test\""), "{shown}");
    let out = run_tern(&["queue", "hold", &id_text, "--config", cfg], None).await;
    assert_eq!(out.status.code(), Some(75), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs the running daemon"),
        "{}",
        describe(&out)
    );
}

/// `tern queue summary` against a running daemon: columns line up under their headers however
/// long a destination's name is, and the age histogram (qshape) counts every message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_summary_columns_align_with_long_destinations_and_show_the_age_histogram() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &Options::default());
    pin_admin_port(&config);
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let mut c = tern.wait_ready(Duration::from_secs(30)).await;
    c.ehlo().await;
    let long = "a-destination-with-a-rather-long-name.mail.example-provider.test";
    for (i, rcpt) in [
        format!("x@{long}"),
        format!("y@{long}"),
        "z@sink.test".to_owned(),
    ]
    .iter()
    .enumerate()
    {
        c.submit("a@client.test", &[rcpt], &message(&format!("m{i}")))
            .await;
    }
    let cfg = config.to_str().unwrap();
    let out = run_tern(&["queue", "summary", "--config", cfg], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut lines: Vec<&str> = text.lines().collect();
    // Tests start the daemon with delivery suspended: that comes first.
    assert!(lines[0].starts_with("ALL DELIVERY SUSPENDED"), "{text}");
    lines.remove(0);
    let header = lines[0];
    assert!(header.starts_with("DESTINATION"), "{text}");
    let rows: Vec<&str> = lines[1..3].to_vec();
    assert!(
        rows[0].starts_with(long) && rows[1].starts_with("sink.test"),
        "{text}"
    );
    // Every number ends exactly under the end of its (right-aligned) header.
    for column in ["MESSAGES", "RCPTS", "BYTES", "OLDEST", "HELD"] {
        let end = header.find(column).unwrap() + column.len();
        for row in &rows {
            let bytes = row.as_bytes();
            assert!(
                bytes[end - 1] != b' ' && bytes.get(end).is_none_or(|&b| b == b' '),
                "{column} misaligned:\n{text}"
            );
        }
    }
    let start = header.find("SUSPENDED").unwrap();
    for row in &rows {
        assert_eq!(&row[start..], "-", "{text}");
    }
    // The histogram: T, then one column per age bound (minutes), all fresh mail under 5.
    let at = lines
        .iter()
        .position(|l| l.starts_with("AGE (minutes)"))
        .unwrap_or_else(|| panic!("no histogram:\n{text}"));
    let cells = |line: &str| -> Vec<String> {
        line.split("  ")
            .map(str::trim)
            .filter(|c| !c.is_empty())
            .map(str::to_owned)
            .collect()
    };
    assert_eq!(
        cells(lines[at]),
        [
            "AGE (minutes)",
            "T",
            "5",
            "10",
            "20",
            "40",
            "80",
            "160",
            "320",
            "640",
            "1280",
            "1280+"
        ],
        "{text}"
    );
    assert_eq!(
        cells(lines[at + 1]),
        ["TOTAL", "3", "3", "0", "0", "0", "0", "0", "0", "0", "0", "0"],
        "{text}"
    );
    assert_eq!(cells(lines[at + 2])[..3], [long, "2", "2"], "{text}");
    let t_end = lines[at].find(" T").unwrap() + 2;
    for line in &lines[at + 1..] {
        assert_ne!(line.as_bytes()[t_end - 1], b' ', "T misaligned:\n{text}");
    }
    drop(c);
    send_signal(tern.pid(), "TERM");
    assert!(tern.wait_exit(Duration::from_secs(20)).await.success());
}

/// Shell completions and man pages come from the same argument definitions: each shell's
/// script names the subcommands (bash's parses), and `tern man` writes a page per command.
#[tokio::test]
async fn completions_for_each_shell_and_man_pages_for_every_command() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run_tern(&["completions", shell], None).await;
        assert!(out.status.success(), "{shell}: {}", describe(&out));
        let script = String::from_utf8(out.stdout).unwrap();
        for word in ["queue", "suppression", "check-config", "destination"] {
            assert!(script.contains(word), "{shell} script lacks {word}");
        }
        if shell == "bash" {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("tern.bash");
            std::fs::write(&path, &script).unwrap();
            let check = std::process::Command::new("bash")
                .arg("-n")
                .arg(&path)
                .output()
                .unwrap();
            assert!(check.status.success(), "bash -n: {check:?}");
        }
    }
    let out = run_tern(&["completions", "tcsh-like"], None).await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "unknown shell: {}",
        describe(&out)
    );

    let dir = tempfile::tempdir().unwrap();
    let man = dir.path().join("man1");
    let out = run_tern(&["man", man.to_str().unwrap()], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    for page in [
        "tern.1",
        "tern-queue.1",
        "tern-queue-summary.1",
        "tern-token-new.1",
    ] {
        let text =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(
            text.starts_with(".ie") || text.contains(".TH"),
            "{page}: {text}"
        );
    }
    let summary = std::fs::read_to_string(man.join("tern-queue-summary.1")).unwrap();
    assert!(
        summary.contains("TERN_CONFIG"),
        "the --config help is in the page"
    );
}

/// The Debian package's default config (`debian/tern.toml`, installed as /etc/tern/tern.toml)
/// is valid, listens on loopback only and keeps its state where the unit may write.
#[tokio::test]
async fn the_packaged_default_config_is_valid_and_loopback_only() {
    let path = manifest_dir().join("debian/tern.toml");
    let out = run_tern(&["check-config", path.to_str().unwrap()], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    let config = tern::config::Config::load(&path).unwrap();
    assert!(!config.listeners.is_empty());
    for listener in &config.listeners {
        assert!(
            listener.address.ip().is_loopback(),
            "{:?}",
            listener.address
        );
    }
    assert!(config.admin.address.ip().is_loopback());
    assert!(config.spool.path.starts_with("/var/lib/tern"));
    assert!(config
        .admin
        .token_file
        .as_ref()
        .unwrap()
        .starts_with("/var/lib/tern"));
    assert!(config
        .delivery
        .log_path
        .as_ref()
        .unwrap()
        .starts_with("/var/log/tern"));
}
