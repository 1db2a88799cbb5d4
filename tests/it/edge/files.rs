//! Secret files other users can read: a key, token or password file with any group or other
//! permission bit is refused at start, by `tern check-config` and at a reload, with an error
//! naming the config key and the path and saying how to fix it. Before, tern signed and
//! logged in with whatever it could read.

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use super::T;
use crate::harness::*;

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

/// The real binary with a TLS key anyone on the machine can read: it exits before serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_world_readable_key_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = write_bin_config(dir.path(), port, &Options::default().tls());
    let key = dir.path().join("key.pem");
    chmod(&key, 0o644);
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let status = tern.wait_exit(T).await;
    assert!(!status.success(), "tern started: {}", tern.log_text());
    let log = tern.log_text();
    let key = shown(&key);
    assert!(log.contains(&format!("tls.key: {key}: mode 0644")), "{log}");
    assert!(log.contains(&format!("chmod 600 {key}")), "{log}");
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err(),
        "nothing listens"
    );
}

/// `tern check-config` names every group-readable secret, each with its key path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_readable_secret_file_fails_check_config() {
    let dir = tempfile::tempdir().unwrap();
    let secret = |name: &str| {
        let path = dir.path().join(name);
        write_secret(&path, "0123456789abcdef0123456789abcdef\n");
        chmod(&path, 0o640);
        path
    };
    let files = [
        ("admin.token_file", secret("admin.token")),
        ("bounce.verp_key_file", secret("verp.key")),
        ("bounce.origin_key_file", secret("origin.key")),
        ("sidecar.tracking.secret_file", secret("tracking.key")),
        ("webhooks[0].secret_file", secret("hook.secret")),
        ("routes[0].auth.password_file", secret("relay.pass")),
        ("dkim[0].key", secret("dkim.pem")),
    ];
    let path = |key: &str| shown(&files.iter().find(|(k, _)| *k == key).unwrap().1);
    let config = dir.path().join("tern.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nhostname = \"tern.test\"\n\
             [[listeners]]\naddress = \"127.0.0.1:2525\"\n\
             [admin]\ntoken_file = {:?}\n\
             [bounce]\ndomains = [\"bounce.tern.test\"]\nverp_key_file = {:?}\norigin_key_file = {:?}\n\
             [sidecar.tracking]\nbase_url = \"https://t.tern.test\"\nsecret_file = {:?}\n\
             [[webhooks]]\nurl = \"http://127.0.0.1:9/hook\"\nsecret_file = {:?}\n\
             [[routes]]\ndomain = \"*\"\nhosts = [\"127.0.0.1:2526\"]\n\
             [routes.auth]\nusername = \"tern\"\npassword_file = {:?}\n\
             [[dkim]]\ndomain = \"tern.test\"\nselector = \"s1\"\nkey = {:?}\n",
            path("admin.token_file"),
            path("bounce.verp_key_file"),
            path("bounce.origin_key_file"),
            path("sidecar.tracking.secret_file"),
            path("webhooks[0].secret_file"),
            path("routes[0].auth.password_file"),
            path("dkim[0].key"),
        ),
    )
    .unwrap();
    let out = run_tern(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    )
    .await;
    assert_eq!(out.status.code(), Some(78), "EX_CONFIG: {}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for (key, file) in &files {
        let file = shown(file);
        assert!(
            stderr.contains(&format!("{key}: {file}: mode 0640")),
            "{key}: {stderr}"
        );
        assert!(stderr.contains(&format!("chmod 600 {file}")), "{stderr}");
    }

    // Fixed as the error says: the same config passes (the DKIM "key" is no PEM, so only
    // that one is still reported, for its content).
    for (_, file) in &files {
        chmod(file, 0o600);
    }
    let out = run_tern(
        &["check-config", "--config", config.to_str().unwrap()],
        None,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("chmod 600"), "{stderr}");
    assert!(stderr.contains("dkim[0].key: "), "{stderr}");
}

/// A DKIM key made readable by others while tern runs: the reload that would re-read it is
/// refused (the running key stays), naming the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_file_opened_to_others_is_refused_at_reload() {
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("example.com.s1.pem");
    let generated = tern::dkim::generate_key(tern::dkim::KeyAlgorithm::Ed25519).unwrap();
    write_secret(&key, generated.private_key_pem);
    let opts = Options::default().dkim(format!(
        "domain = \"example.com\"\nselector = \"s1\"\nkey = {:?}",
        shown(&key)
    ));
    let server = TestServer::start(opts.clone()).await;
    chmod(&key, 0o604);
    let errors = server.reload(&opts).expect_err("reload refused").0;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].starts_with(&format!("dkim[0].key: {}: mode 0604", shown(&key))),
        "{errors:?}"
    );
    // Mail is still signed with the running key.
    let mut c = server.connect().await;
    c.ehlo().await;
    let id = c
        .submit(
            "alice@example.com",
            &["x@sink.test"],
            b"From: alice@example.com\r\nSubject: s\r\n\r\nhi\r\n",
        )
        .await;
    let body = String::from_utf8_lossy(&server.body(id)).into_owned();
    assert!(body.contains("DKIM-Signature:"), "{body}");
    server.stop().await;
}
