//! Finding the config file (`--config`, `TERN_CONFIG`, `/etc/tern/tern.toml`,
//! `./config/tern.toml`) and resolving the paths inside it against its directory: the real
//! binary, run from directories that have nothing to do with the config.

use crate::harness::*;
use std::time::Duration;

/// A config in `etc/` whose files are all named relative to it, the daemon's SMTP listener on
/// `smtp` and admin on `admin`.
fn relative_config(etc: &std::path::Path, smtp: u16, admin: u16) -> std::path::PathBuf {
    std::fs::create_dir_all(etc).unwrap();
    let path = etc.join("tern.toml");
    std::fs::write(
        &path,
        format!(
            "[server]\nhostname = \"{HOST}\"\nshutdown_grace = \"2s\"\n\
             [[listeners]]\naddress = \"127.0.0.1:{smtp}\"\n\
             [relay]\nnetworks = [\"127.0.0.0/8\"]\n\
             [spool]\npath = \"state/spool\"\n\
             [admin]\naddress = \"127.0.0.1:{admin}\"\ntoken_file = \"state/admin.token\"\n\
             [delivery]\nsuspended = true\nlog_path = \"state/delivery.log\"\n\
             [[routes]]\ndomain = \"sink.test\"\nhosts = [\"127.0.0.1:9\"]\n"
        ),
    )
    .unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_summary_from_an_unrelated_directory_finds_the_config_and_its_files() {
    let root = tempfile::tempdir().unwrap();
    let etc = root.path().join("etc/tern");
    let (smtp, admin) = (free_port(), free_port());
    let config = relative_config(&etc, smtp, admin);
    // The daemon runs elsewhere, found through TERN_CONFIG alone (no --config).
    let daemon_cwd = root.path().join("daemon-cwd");
    std::fs::create_dir_all(&daemon_cwd).unwrap();
    let mut cmd = tokio::process::Command::new(tern_bin());
    cmd.arg("serve")
        .current_dir(&daemon_cwd)
        .env("TERN_CONFIG", &config);
    let mut tern = TernProc::spawn_command(cmd, smtp, &root.path().join("tern.log"));
    let mut c = tern.wait_ready(Duration::from_secs(30)).await;
    c.ehlo().await;
    c.submit("a@client.test", &["x@sink.test"], &message("lookup"))
        .await;
    // Relative to the config's directory, not the working directory.
    assert!(etc.join("state/spool").is_dir(), "{}", tern.log_text());
    assert!(etc.join("state/admin.token").is_file());
    assert!(
        std::fs::read_dir(&daemon_cwd).unwrap().next().is_none(),
        "nothing written to the working directory"
    );

    let elsewhere = tempfile::tempdir().unwrap();
    let out = run_tern_in(elsewhere.path(), Some(&config), &["queue", "summary"], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("sink.test") && l.contains(" 1 ")),
        "{table}"
    );
    // --config wins over TERN_CONFIG (which here names nothing).
    let out = run_tern_in(
        elsewhere.path(),
        Some(&root.path().join("nothing.toml")),
        &["queue", "summary", "--config", config.to_str().unwrap()],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    // ./config/tern.toml, relative to the working directory, is the last place tried.
    let out = run_tern_in(&etc.join(".."), None, &["queue", "summary"], None).await;
    if !std::path::Path::new("/etc/tern/tern.toml").exists() {
        assert_eq!(out.status.code(), Some(78), "{}", describe(&out));
        std::fs::create_dir_all(root.path().join("checkout/config")).unwrap();
        std::fs::copy(&config, root.path().join("checkout/config/tern.toml")).unwrap();
        // A copy of the config: its relative paths point into checkout/config/state, which
        // gets the running daemon's token (same admin address).
        std::fs::create_dir_all(root.path().join("checkout/config/state")).unwrap();
        write_secret(
            &root.path().join("checkout/config/state/admin.token"),
            std::fs::read(etc.join("state/admin.token")).unwrap(),
        );
        let out = run_tern_in(
            &root.path().join("checkout"),
            None,
            &["queue", "summary"],
            None,
        )
        .await;
        assert!(out.status.success(), "{}", describe(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("sink.test"));
    }
    drop(c);
    send_signal(tern.pid(), "TERM");
    assert!(tern.wait_exit(Duration::from_secs(20)).await.success());
}

#[tokio::test]
async fn without_any_config_the_error_names_every_place_tried() {
    if std::path::Path::new("/etc/tern/tern.toml").exists() {
        // The machine has an installed config: it would be found (correctly).
        return;
    }
    let empty = tempfile::tempdir().unwrap();
    for args in [&["queue", "summary"][..], &["check-config"], &["serve"]] {
        let out = run_tern_in(empty.path(), None, args, None).await;
        assert_eq!(out.status.code(), Some(78), "{args:?}: {}", describe(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        for place in [
            "--config",
            "TERN_CONFIG",
            "/etc/tern/tern.toml",
            "./config/tern.toml",
        ] {
            assert!(stderr.contains(place), "{args:?}: {place} not in {stderr}");
        }
    }
    // A named file that is missing is reported, not replaced by another place.
    let out = run_tern_in(
        empty.path(),
        Some(&empty.path().join("typo.toml")),
        &["check-config"],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(78), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("typo.toml: no such file"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn check_config_takes_the_file_as_an_argument_and_the_readme_example_resolves() {
    // The Debian package's postinst and the CI step run it this way.
    let out = run_tern(&["check-config", "config/tern.toml"], None).await;
    assert!(out.status.success(), "{}", describe(&out));
    // The example keeps its files in the repository's data/ (README: cat data/admin.token),
    // from any working directory.
    let config = tern::config::Config::load(&manifest_dir().join("config/tern.toml")).unwrap();
    assert_eq!(
        config.admin.token_file.unwrap(),
        manifest_dir().join("config/../data/admin.token")
    );
}
