//! Scoped admin API tokens (`[[admin.tokens]]`) over real HTTP: each token gets exactly the
//! calls of its scopes (403 otherwise, and nothing changes), the `admin.token_file` token keeps
//! every right, and every mutating call is written to the audit log with the token's name.

use crate::harness::*;
use std::time::Duration;
use tern::admin::auth::Token;

const INJECT: &str = "inject-only-secret-0123456789abcdef";
const READ: &str = "read-only-secret-0123456789abcdef";
const QUEUE: &str = "queue-secret-0123456789abcdef0123";
const ALL: &str = "all-rights-secret-0123456789abcdef";

fn token_entry(name: &str, secret: &str, scopes: &[&str]) -> String {
    let scopes: Vec<String> = scopes.iter().map(|s| format!("{s:?}")).collect();
    format!(
        "[[admin.tokens]]\nname = {name:?}\nsecret_sha256 = {:?}\nscopes = [{}]\n",
        Token::sha256_hex(secret),
        scopes.join(", ")
    )
}

/// Every call that changes something, as (method, path under /api/v1, body); the path
/// template it stands for is checked against docs/OPERATIONS.md below.
fn mutating_routes() -> Vec<(&'static str, &'static str, &'static str, &'static str)> {
    let selector = r#"{"destination": "sink.test"}"#;
    vec![
        (
            "POST",
            "/queue/suspend",
            "/queue/suspend",
            r#"{"destination": "sink.test"}"#,
        ),
        (
            "POST",
            "/queue/resume",
            "/queue/resume",
            r#"{"destination": "sink.test"}"#,
        ),
        ("POST", "/queue/retry", "/queue/retry", selector),
        ("POST", "/queue/hold", "/queue/hold", selector),
        ("POST", "/queue/release", "/queue/release", selector),
        ("POST", "/queue/bounce", "/queue/bounce", selector),
        ("POST", "/queue/delete", "/queue/delete", selector),
        (
            "POST",
            "/queue/drain",
            "/queue/drain",
            r#"{"to": "127.0.0.1:9"}"#,
        ),
        (
            "POST",
            "/suppressions",
            "/suppressions",
            r#"{"address": "new@sink.test"}"#,
        ),
        (
            "DELETE",
            "/suppressions/{address}",
            "/suppressions/kept@sink.test",
            "",
        ),
        (
            "POST",
            "/suppressions/import",
            "/suppressions/import",
            "address,reason\nimported@sink.test,manual\n",
        ),
        ("POST", "/events", "/events", r#"{"events": []}"#),
        ("POST", "/sendtime/refit", "/sendtime/refit", "{}"),
        (
            "DELETE",
            "/recipients/{address}",
            "/recipients/kept@sink.test",
            "",
        ),
        ("POST", "/tls-reports/send", "/tls-reports/send", ""),
        ("POST", "/inject", "/inject", ""),
        (
            "POST",
            "/campaigns",
            "/campaigns",
            r#"{"name": "c", "text": "t"}"#,
        ),
        (
            "PUT",
            "/campaigns/{name}",
            "/campaigns/c",
            r#"{"text": "t"}"#,
        ),
        (
            "PATCH",
            "/campaigns/{name}",
            "/campaigns/c",
            r#"{"text": "t"}"#,
        ),
        ("POST", "/campaigns/{name}/pause", "/campaigns/c/pause", ""),
        (
            "POST",
            "/campaigns/{name}/resume",
            "/campaigns/c/resume",
            "",
        ),
        (
            "POST",
            "/campaigns/{name}/archive",
            "/campaigns/c/archive",
            "",
        ),
    ]
}

#[test]
fn the_route_list_covers_every_documented_mutating_call() {
    let docs = std::fs::read_to_string(manifest_dir().join("docs/OPERATIONS.md")).unwrap();
    let known: Vec<String> = mutating_routes()
        .iter()
        .map(|(m, template, _, _)| format!("{m} /api/v1{template}"))
        .collect();
    let mut documented = 0;
    for method in ["POST", "DELETE", "PUT", "PATCH"] {
        for (i, _) in docs.match_indices(&format!("{method} /api/v1/")) {
            let path: String = docs[i + method.len() + 1..]
                .chars()
                .take_while(|c| !matches!(c, ' ' | '`' | '|' | ')' | ',' | ':' | '"' | '\n'))
                .collect();
            // "POST /api/v1/queue/{retry,hold,...}" (cut at its comma) and ".../queue/*" sum up
            // rows listed one by one elsewhere.
            if path.contains('*') || (path.contains('{') && !path.ends_with('}')) {
                continue;
            }
            let call = format!("{method} {path}");
            documented += 1;
            assert!(known.contains(&call), "{call} is not in mutating_routes()");
        }
    }
    assert!(documented >= 13, "found {documented} documented calls");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_token_gets_only_its_scopes_and_the_token_file_keeps_every_right() {
    let server = TestServer::start(
        Options::default()
            .extra(token_entry("app", INJECT, &["inject"]))
            .extra(token_entry("viewer", READ, &["read"]))
            .extra(token_entry("ops", QUEUE, &["queue", "read"]))
            .extra(token_entry("root", ALL, &["admin"])),
    )
    .await;
    let admin = server.admin();
    // A message for the queue calls to match, and a suppression for DELETE to find.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit("a@client.test", &["x@sink.test"], &message("scopes"))
        .await;
    let (status, _) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&serde_json::json!({"address": "kept@sink.test"})),
        )
        .await;
    assert_eq!(status, 200);

    // The inject-only token: 403 on every other mutating route, and on reads.
    for (method, _, path, body) in mutating_routes() {
        if path == "/inject" {
            continue;
        }
        let (status, text) = http(
            admin,
            method,
            &format!("/api/v1{path}"),
            Some(INJECT),
            Some(body),
        )
        .await;
        assert_eq!(status, 403, "{method} {path} with an inject token: {text}");
        let error: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(
            error["error"].as_str().unwrap().contains("\"app\""),
            "{text}"
        );
    }
    let (status, _) = http(admin, "GET", "/api/v1/queue/summary", Some(INJECT), None).await;
    assert_eq!(status, 403, "inject alone does not read");
    // ... and nothing was changed by those calls.
    let (_, summary) = server.api("GET", "/api/v1/queue/summary", None).await;
    assert_eq!(summary["totals"]["messages"], 1, "{summary}");
    assert_eq!(summary["totals"]["held"], 0, "{summary}");
    let (status, _) = server
        .api("GET", "/api/v1/suppressions/kept@sink.test", None)
        .await;
    assert_eq!(status, 200, "still suppressed");
    let (status, _) = server
        .api("GET", "/api/v1/suppressions/new@sink.test", None)
        .await;
    assert_eq!(status, 404, "not added");
    // What it may do.
    let inject =
        r#"{"from": "app@client.test", "to": ["y@sink.test"], "raw": "Subject: hi\n\nhello\n"}"#;
    let (status, text) = http(admin, "POST", "/api/v1/inject", Some(INJECT), Some(inject)).await;
    assert_eq!(status, 200, "{text}");

    // Read-only: every GET, no write.
    for path in [
        "/status",
        "/queue/summary",
        "/shaping",
        "/suppressions",
        "/campaigns",
    ] {
        let (status, text) = http(admin, "GET", &format!("/api/v1{path}"), Some(READ), None).await;
        assert_eq!(status, 200, "GET {path} with a read token: {text}");
    }
    for (method, _, path, body) in mutating_routes() {
        let (status, _) = http(
            admin,
            method,
            &format!("/api/v1{path}"),
            Some(READ),
            Some(body),
        )
        .await;
        assert_eq!(status, 403, "{method} {path} with a read token");
    }

    // queue + read: holds, but cannot touch suppressions or inject.
    let hold = r#"{"destination": "sink.test"}"#;
    let (status, text) = http(admin, "POST", "/api/v1/queue/hold", Some(QUEUE), Some(hold)).await;
    assert_eq!(status, 200, "{text}");
    let (_, summary) = server.api("GET", "/api/v1/queue/summary", None).await;
    assert_eq!(summary["totals"]["held"], 2, "{summary}");
    let (status, _) = http(
        admin,
        "DELETE",
        "/api/v1/suppressions/kept@sink.test",
        Some(QUEUE),
        None,
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = http(admin, "POST", "/api/v1/inject", Some(QUEUE), Some(inject)).await;
    assert_eq!(status, 403);
    // A drain reads files on the host and empties the queue: admin only.
    let drain = r#"{"to": "127.0.0.1:9"}"#;
    let (status, _) = http(
        admin,
        "POST",
        "/api/v1/queue/drain",
        Some(QUEUE),
        Some(drain),
    )
    .await;
    assert_eq!(status, 403);

    // admin scope and the token file: everything.
    let (status, text) = http(
        admin,
        "DELETE",
        "/api/v1/suppressions/kept@sink.test",
        Some(ALL),
        None,
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, text) = http(
        admin,
        "POST",
        "/api/v1/queue/release",
        Some(ALL),
        Some(hold),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&serde_json::json!({"address": "other@sink.test"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    // An unknown token is still 401, not 403.
    let (status, _) = http(
        admin,
        "GET",
        "/api/v1/status",
        Some("not-a-token-at-all-000"),
        None,
    )
    .await;
    assert_eq!(status, 401);
    drop(c);
    server.stop().await;
}

/// The real binary: `tern token new` makes a working entry, the CLI uses a scoped secret
/// from TERN_TOKEN, and the log has an audit line, with the token's name, for every mutating
/// call (allowed or refused) and none for reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_new_entry_works_and_mutating_calls_are_audit_logged_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_tern_in(
        dir.path(),
        None,
        &[
            "token", "new", "ops-team", "--scope", "queue", "--scope", "read",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let printed = String::from_utf8(out.stdout).unwrap();
    let (secret, entry) = printed
        .split_once("\n\n")
        .expect("secret, blank line, entry");
    assert_eq!(secret.len(), 64, "{printed}");
    assert!(!entry.contains(secret), "the config gets only the hash");
    assert!(entry.contains(&Token::sha256_hex(secret)), "{entry}");
    let out = run_tern_in(
        dir.path(),
        None,
        &["token", "new", "x", "--scope", "root"],
        None,
    )
    .await;
    assert_eq!(
        out.status.code(),
        Some(2),
        "unknown scope: {}",
        describe(&out)
    );

    let port = free_port();
    let config = write_bin_config(dir.path(), port, &Options::default().extra(entry));
    pin_admin_port(&config);
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    let c = tern.wait_ready(Duration::from_secs(30)).await;

    let mut cli = tokio::process::Command::new(tern_bin());
    cli.args(["queue", "suspend", "sink.test", "--reason", "audit test"])
        .env("TERN_CONFIG", &config)
        .env("TERN_TOKEN", secret);
    let out = cli.output().await.unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    let mut cli = tokio::process::Command::new(tern_bin());
    cli.args(["suppression", "add", "z@sink.test"])
        .env("TERN_CONFIG", &config)
        .env("TERN_TOKEN", secret);
    let out = cli.output().await.unwrap();
    assert_eq!(
        out.status.code(),
        Some(77),
        "403 is permission denied: {}",
        describe(&out)
    );
    let mut cli = tokio::process::Command::new(tern_bin());
    cli.args(["queue", "summary"])
        .env("TERN_CONFIG", &config)
        .env("TERN_TOKEN", secret);
    let out = cli.output().await.unwrap();
    assert!(out.status.success(), "{}", describe(&out));

    send_signal(tern.pid(), "TERM");
    assert!(tern.wait_exit(Duration::from_secs(20)).await.success());
    drop(c);
    let log = tern.log_text();
    let audit: Vec<&str> = log.lines().filter(|l| l.contains("tern::audit")).collect();
    assert_eq!(audit.len(), 2, "one line per mutating call:\n{log}");
    assert!(
        audit[0].contains("token=ops-team")
            && audit[0].contains("method=POST")
            && audit[0].contains("path=/api/v1/queue/suspend")
            && audit[0].contains("status=200"),
        "{}",
        audit[0]
    );
    assert!(
        audit[1].contains("token=ops-team")
            && audit[1].contains("path=/api/v1/suppressions")
            && audit[1].contains("status=403"),
        "{}",
        audit[1]
    );
}

/// `[[admin.tokens]]` reloads live: a token added by a reload gets in at once (no restart
/// needed), and one removed by the next reload is refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_added_and_revoked_by_a_reload() {
    let server = TestServer::start(Options::default()).await;
    let admin = server.admin();
    let (status, _) = http(admin, "GET", "/api/v1/status", Some(READ), None).await;
    assert_eq!(status, 401, "not configured yet");
    let report = server
        .reload(&Options::default().extra(token_entry("viewer", READ, &["read"])))
        .expect("valid reload");
    assert!(
        !report.restart_needed.iter().any(|k| k.starts_with("admin")),
        "{report:?}"
    );
    let (status, text) = http(admin, "GET", "/api/v1/status", Some(READ), None).await;
    assert_eq!(status, 200, "{text}");
    server.reload(&Options::default()).expect("valid reload");
    let (status, _) = http(admin, "GET", "/api/v1/status", Some(READ), None).await;
    assert_eq!(status, 401, "revoked");
    // The token file's token was never affected.
    let (status, _) = server.api("GET", "/api/v1/status", None).await;
    assert_eq!(status, 200);
    server.stop().await;
}
