//! `tern queue drain`: 10,000 deferred messages of a stopped node relayed to a running one
//! over SMTP by the real binary: none lost, none duplicated, envelopes (sender, recipients
//! with NOTIFY and ORCPT, RET, ENVID, attempts, creation, expiry) intact, the trace header
//! gone, held mail left behind; `--destination` moves only that domain.

use crate::harness::{run_tern, Options, TestServer};
use std::collections::HashMap;
use tern_queue::{
    BodyType, Envelope, Notify, Recipient, RecipientState, Ret, Source, Spool, SpoolError,
};

const MESSAGES: usize = 10_000;

/// A deferred message: attempted `attempts` times, next try in 10 minutes.
fn deferred(spool: &Spool, i: usize, now: u64) -> (Envelope, Vec<u8>) {
    let id = spool.next_id();
    let destination = if i.is_multiple_of(10) {
        "b.test"
    } else {
        "a.test"
    };
    let mut first = Recipient::new(format!("r{i}@{destination}"));
    first.orcpt = Some(format!("rfc822;orig{i}@{destination}"));
    first.notify = Notify {
        success: i.is_multiple_of(2),
        failure: true,
        delay: i.is_multiple_of(3),
        never: false,
    };
    let mut recipients = vec![first];
    if i.is_multiple_of(7) {
        let mut second = Recipient::new(format!("s{i}@{destination}"));
        second.notify = Notify {
            success: false,
            failure: false,
            delay: false,
            never: true,
        };
        recipients.push(second);
    }
    let body = format!("From: app@sender.test\r\nSubject: m{i}\r\n\r\nbody {i}\r\n").into_bytes();
    let env = Envelope {
        id,
        queue_id: id,
        sender: if i.is_multiple_of(11) {
            String::new()
        } else {
            format!("app{i}@sender.test")
        },
        destination: destination.into(),
        recipients,
        env_id: (!i.is_multiple_of(2)).then(|| format!("env-{i}")),
        ret: match i % 3 {
            0 => Some(Ret::Full),
            1 => Some(Ret::Headers),
            _ => None,
        },
        body_type: if i.is_multiple_of(5) {
            BodyType::EightBitMime
        } else {
            BodyType::SevenBit
        },
        smtputf8: false,
        size: body.len() as u64,
        created_ms: now - 3_600_000 - i as u64,
        expires_ms: now + 4 * 86_400_000 + i as u64,
        next_due_ms: now + 600_000,
        attempts: 1 + (i % 4) as u32,
        source: Source {
            client_ip: "127.0.0.1".into(),
            helo: "client.test".into(),
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
    };
    (env, body)
}

fn key(env: &Envelope) -> String {
    env.recipients[0].address.clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_ten_thousand_deferred_messages_intact() {
    // The node being decommissioned: stopped, its spool full of deferred mail.
    let old = tempfile::tempdir().unwrap();
    let text = Options::default().config_text(old.path(), "127.0.0.1:0", "127.0.0.1:0");
    let config_path = old.path().join("tern.toml");
    std::fs::write(&config_path, &text).unwrap();
    let spool_path = tern::config::Config::load(&config_path).unwrap().spool.path;
    let now = tern::clock::now_ms();
    let mut originals = HashMap::new();
    {
        let spool = Spool::open(&spool_path).unwrap();
        for chunk in (0..MESSAGES).collect::<Vec<_>>().chunks(1000) {
            let parts: Vec<(Envelope, Vec<u8>)> =
                chunk.iter().map(|&i| deferred(&spool, i, now)).collect();
            for (env, body) in &parts {
                originals.insert(key(env), (env.clone(), body.clone()));
            }
            spool.commit(parts).await.unwrap();
        }
        // One held message: left where it is.
        let (mut held, body) = deferred(&spool, MESSAGES, now);
        held.held = true;
        spool.commit(vec![(held, body)]).await.unwrap();
        spool.flush().await.unwrap();
    }

    // The node taking over (delivery suspended: the mail stays in its spool to be looked at).
    let new = TestServer::start(Options::default()).await;
    let cfg = config_path.to_str().unwrap();
    let to = new.smtp.to_string();
    let out = run_tern(
        &[
            "queue",
            "drain",
            "--config",
            cfg,
            "--to",
            &to,
            "--destination",
            "b.test",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let b_count = originals
        .values()
        .filter(|(e, _)| e.destination == "b.test")
        .count();
    assert_eq!(new.envelopes().len(), b_count, "only b.test moved");

    let out = run_tern(&["queue", "drain", "--config", cfg, "--to", &to], None).await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("second drain: {stdout}");
    assert!(stdout.contains("1 held messages left"), "{stdout}");

    // Nothing lost, nothing twice, every envelope as it was.
    let moved = new.envelopes();
    assert_eq!(moved.len(), MESSAGES);
    let mut seen = std::collections::HashSet::new();
    for env in &moved {
        assert!(seen.insert(key(env)), "{} arrived twice", key(env));
        let (orig, body) = &originals[&key(env)];
        assert_eq!(env.sender, orig.sender);
        assert_eq!(env.destination, orig.destination);
        assert_eq!(env.env_id, orig.env_id);
        assert_eq!(env.ret, orig.ret);
        assert_eq!(env.body_type, orig.body_type);
        assert_eq!(env.attempts, orig.attempts, "attempts of {}", key(env));
        assert_eq!(env.created_ms, orig.created_ms);
        assert_eq!(env.expires_ms, orig.expires_ms);
        assert!(env.next_due_ms >= orig.next_due_ms, "keeps its retry time");
        let rcpts: Vec<(&str, Option<&str>, Notify, RecipientState)> = env
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.orcpt.as_deref(), r.notify, r.state))
            .collect();
        let want: Vec<(&str, Option<&str>, Notify, RecipientState)> = orig
            .recipients
            .iter()
            .map(|r| (r.address.as_str(), r.orcpt.as_deref(), r.notify, r.state))
            .collect();
        assert_eq!(rcpts, want);
        let content = new.body(env.id);
        let text = String::from_utf8_lossy(&content);
        assert!(content.ends_with(body), "{text}");
        assert!(
            !text.contains("X-Tern-Relayed"),
            "the trace is taken out: {text}"
        );
    }
    drop(new);
    // The old spool keeps only the held message.
    let spool = Spool::open(&spool_path).unwrap();
    let left: Vec<Envelope> = spool
        .envelopes_after(None)
        .collect::<Result<_, SpoolError>>()
        .unwrap();
    assert_eq!(left.len(), 1);
    assert!(left[0].held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_backup_of_a_running_node_is_consistent_and_restores() {
    use crate::cli::cli_config;
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    for i in 0..50 {
        c.submit(
            "a@client.test",
            &[&format!("x{i}@sink.test")],
            b"Subject: before\r\n\r\nbody\r\n",
        )
        .await;
    }
    // Mail keeps arriving while the backup runs.
    let writer = {
        let smtp = server.smtp;
        tokio::spawn(async move {
            let mut c = crate::harness::Client::connect(smtp).await;
            c.expect_greeting().await;
            c.ehlo().await;
            for i in 0..200 {
                c.submit(
                    "a@client.test",
                    &[&format!("y{i}@sink.test")],
                    b"Subject: during\r\n\r\nbody\r\n",
                )
                .await;
            }
        })
    };
    let config = cli_config(&server);
    let backups = tempfile::tempdir().unwrap();
    let dir = backups.path().join("b1");
    let out = run_tern(
        &[
            "spool",
            "backup",
            dir.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    eprintln!("{}", String::from_utf8_lossy(&out.stdout).trim());
    writer.await.unwrap();
    // The API refuses a relative path, naming the field; the CLI a directory in use.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/spool/backup",
            Some(&serde_json::json!({"dir": "rel"})),
        )
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("dir: "),
        "{body}"
    );
    let out = run_tern(
        &[
            "spool",
            "backup",
            dir.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
        None,
    )
    .await;
    assert!(
        !out.status.success(),
        "a second backup into the same directory"
    );

    // Restored into the empty spool directory of another (stopped) node.
    let other = tempfile::tempdir().unwrap();
    let text = Options::default().config_text(other.path(), "127.0.0.1:0", "127.0.0.1:0");
    let other_config = other.path().join("tern.toml");
    std::fs::write(&other_config, text).unwrap();
    let restore = |dir: std::path::PathBuf, cfg: std::path::PathBuf| async move {
        run_tern(
            &[
                "spool",
                "restore",
                dir.to_str().unwrap(),
                "--config",
                cfg.to_str().unwrap(),
            ],
            None,
        )
        .await
    };
    let out = restore(dir.clone(), other_config.clone()).await;
    assert!(out.status.success(), "{out:?}");
    let out = restore(dir.clone(), other_config.clone()).await;
    assert!(
        !out.status.success(),
        "restore into a spool that holds something"
    );
    let spool_path = tern::config::Config::load(&other_config)
        .unwrap()
        .spool
        .path;
    let spool = Spool::open(&spool_path).unwrap();
    let envelopes: Vec<Envelope> = spool
        .envelopes_after(None)
        .collect::<Result<_, SpoolError>>()
        .unwrap();
    assert!(
        (50..=250).contains(&envelopes.len()),
        "{} messages: all 50 before the backup, some of those during it",
        envelopes.len()
    );
    for env in &envelopes {
        let body = spool.body_of(env).unwrap().expect("every message whole");
        assert!(body.ends_with(b"body\r\n"));
    }
    server.stop().await;
}

/// A stopped node's spool with `n` deferred messages; its config file and spool path.
async fn stopped_node(dir: &std::path::Path, n: usize) -> (std::path::PathBuf, std::path::PathBuf) {
    let text = Options::default().config_text(dir, "127.0.0.1:0", "127.0.0.1:0");
    let config_path = dir.join("tern.toml");
    std::fs::write(&config_path, &text).unwrap();
    let spool_path = tern::config::Config::load(&config_path).unwrap().spool.path;
    let now = tern::clock::now_ms();
    let spool = Spool::open(&spool_path).unwrap();
    let parts: Vec<(Envelope, Vec<u8>)> = (0..n).map(|i| deferred(&spool, i, now)).collect();
    spool.commit(parts).await.unwrap();
    spool.flush().await.unwrap();
    (config_path, spool_path)
}

fn queued(spool_path: &std::path::Path) -> usize {
    Spool::open(spool_path)
        .unwrap()
        .envelopes_after(None)
        .count()
}

/// The peer takes mail only from authenticated clients (no relay networks), AUTH only after
/// STARTTLS: a wrong password moves nothing and says why; the right one (from a file, the
/// peer's certificate verified for its name against the given CA) moves everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_logs_in_to_a_peer_that_requires_auth() {
    let old = tempfile::tempdir().unwrap();
    let (config_path, spool_path) = stopped_node(old.path(), 40).await;
    // The wrong-password step fails one AUTH per drain connection; the peer's lockout after
    // max_auth_failures (5 by default) would then refuse the right password too.
    let peer = TestServer::start(
        Options::default()
            .tls()
            .auth()
            .relay(&[])
            .limit("max_auth_failures", 1000),
    )
    .await;
    let (_, _, ca) = crate::harness::write_cert_files(old.path());
    let cfg = config_path.to_str().unwrap();
    let to = peer.smtp.to_string();
    let wrong = old.path().join("wrong.auth");
    std::fs::write(
        &wrong,
        format!("{}\nnot-the-password\n", crate::harness::USER),
    )
    .unwrap();
    let right = old.path().join("right.auth");
    std::fs::write(
        &right,
        format!("{}\n{}\n", crate::harness::USER, crate::harness::PASSWORD),
    )
    .unwrap();
    let args = |auth: &std::path::Path| {
        vec![
            "queue".to_owned(),
            "drain".into(),
            "--config".into(),
            cfg.into(),
            "--to".into(),
            to.clone(),
            "--auth-file".into(),
            auth.display().to_string(),
            "--peer-name".into(),
            "localhost".into(),
            "--ca-file".into(),
            ca.display().to_string(),
        ]
    };

    let wrong_args = args(&wrong);
    eprintln!("step: wrong password");
    let out = run_tern(
        &wrong_args.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a wrong password fails the drain");
    assert!(
        stderr.contains("535") && stderr.contains("still queued"),
        "the error names the refusal: {stderr}"
    );
    assert!(
        !stderr.contains("not-the-password"),
        "no password in the error"
    );
    assert_eq!(queued(&spool_path), 40, "nothing removed");
    assert!(peer.envelopes().is_empty(), "nothing arrived");

    // Without a CA that vouches for the peer, no password is sent.
    let mut unverified = args(&right);
    unverified.truncate(unverified.len() - 2);
    eprintln!("step: unverified");
    let out = run_tern(
        &unverified.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .await;
    assert!(!out.status.success());
    assert_eq!(queued(&spool_path), 40, "nothing removed");

    let right_args = args(&right);
    eprintln!("step: right");
    let out = run_tern(
        &right_args.iter().map(String::as_str).collect::<Vec<_>>(),
        None,
    )
    .await;
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(queued(&spool_path), 0, "all moved");
    let moved = peer.envelopes();
    assert_eq!(moved.len(), 40);
    let keys: std::collections::HashSet<String> = moved.iter().map(key).collect();
    assert_eq!(keys.len(), 40, "none twice");
}

/// A running node drains itself through its API while its scheduler delivers (the sink
/// takes a while per message, so attempts are in flight) and mail keeps arriving: every
/// recipient ends up in exactly one place (delivered by the node, moved to the peer, or
/// still queued), never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_drains_without_losing_or_doubling_mail() {
    use crate::sink::{Sink, SinkBehaviour};
    let sink =
        Sink::start(SinkBehaviour::default().data_delay(std::time::Duration::from_millis(500)))
            .await;
    let node = TestServer::start(
        Options::default()
            .deliver()
            .delivery("max_connections_per_destination", 1)
            .route("a.test", sink.addr),
    )
    .await;
    let peer = TestServer::start(Options::default()).await;
    let mut all = std::collections::BTreeSet::new();
    let mut c = node.connect().await;
    c.ehlo().await;
    for i in 0..150 {
        let rcpt = format!("m{i}@a.test");
        c.submit(
            "app@sender.test",
            &[&rcpt],
            b"Subject: live\r\n\r\nbody\r\n",
        )
        .await;
        all.insert(rcpt);
    }
    // Intake keeps working while the drain runs.
    let writer = {
        let smtp = node.smtp;
        tokio::spawn(async move {
            let mut c = crate::harness::Client::connect(smtp).await;
            c.expect_greeting().await;
            c.ehlo().await;
            let mut sent = Vec::new();
            for i in 0..50 {
                let rcpt = format!("late{i}@a.test");
                c.submit(
                    "app@sender.test",
                    &[&rcpt],
                    b"Subject: late\r\n\r\nbody\r\n",
                )
                .await;
                sent.push(rcpt);
            }
            sent
        })
    };
    let (status, body) = node
        .api(
            "POST",
            "/api/v1/queue/drain",
            Some(&serde_json::json!({"to": peer.smtp.to_string(), "connections": 2})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    all.extend(writer.await.unwrap());
    // Let the node finish what it still delivers itself.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !node.envelopes().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let mut places: HashMap<String, Vec<&str>> = HashMap::new();
    for m in sink.messages() {
        for r in m.rcpt_addresses() {
            places.entry(r.to_owned()).or_default().push("delivered");
        }
    }
    for env in peer.envelopes() {
        for r in &env.recipients {
            places.entry(r.address.clone()).or_default().push("moved");
        }
    }
    for env in node.envelopes() {
        for r in &env.recipients {
            if r.state == RecipientState::Pending {
                places.entry(r.address.clone()).or_default().push("queued");
            }
        }
    }
    for rcpt in &all {
        assert_eq!(
            places.get(rcpt).map(Vec::len),
            Some(1),
            "{rcpt}: {:?}",
            places.get(rcpt)
        );
    }
    let moved = places.values().filter(|p| p == &&vec!["moved"]).count();
    eprintln!(
        "live drain: {moved} moved, {} delivered by the node meanwhile ({body})",
        all.len() - moved
    );
    assert!(moved > 0, "the drain moved mail");
    assert_eq!(body["messages"].as_u64(), Some(moved as u64));
}

/// Campaign mail drained from a running node keeps its campaign and variant on the peer (the
/// `X-Tern-Relayed-Campaign` header beside the trace), so the peer's delivery log, events and
/// results count it; the header never reaches the peer's spool, and without a trace (a plain
/// client's submission) it is removed and ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_campaign_mail_keeps_its_campaign_and_variant_on_the_peer() {
    use serde_json::json;
    const CAMPAIGN: &str = r#"[sidecar.bandit]
holdout = 0.0

[[sidecar.campaigns]]
name = "spring.26"
text = "campaign text\n"
[[sidecar.campaigns.slots]]
name = "subject"
default = "Spring"
[[sidecar.campaigns.variants]]
id = "only_one"
text = "Variant text\n"
"#;
    let node = TestServer::start(Options::default().extra(CAMPAIGN)).await;
    let peer = TestServer::start(Options::default()).await;
    let (status, body) = node
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": ["ann@a.test"],
                "raw": "From: news@example.com\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "spring.26"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let tag = tern_queue::CampaignTag {
        campaign: "spring.26".into(),
        variant: Some("only_one".into()),
    };
    let queued = node.envelopes();
    assert_eq!(queued.len(), 1);
    assert_eq!(queued[0].campaign.as_ref(), Some(&tag));
    // A trusted client's own header without a trace is taken out and ignored.
    let mut c = peer.connect().await;
    c.ehlo().await;
    c.submit(
        "app@sender.test",
        &["bob@a.test"],
        b"X-Tern-Relayed-Campaign: campaign=spring.26; variant=only_one\r\nSubject: s\r\n\r\nb\r\n",
    )
    .await;
    let (status, body) = node
        .api(
            "POST",
            "/api/v1/queue/drain",
            Some(&json!({"to": peer.smtp.to_string()})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["messages"], 1, "{body}");
    assert!(node.envelopes().is_empty(), "moved to the peer");
    let moved = peer.envelopes();
    assert_eq!(moved.len(), 2, "{moved:?}");
    for env in moved {
        let stored = String::from_utf8(peer.body(env.id)).unwrap();
        assert!(!stored.contains("X-Tern-Relayed"), "{stored}");
        match env.recipients[0].address.as_str() {
            "ann@a.test" => {
                assert_eq!(env.campaign.as_ref(), Some(&tag));
                assert!(stored.contains("Variant text"), "{stored}");
            }
            _ => assert_eq!(env.campaign, None, "no trace, no campaign"),
        }
    }
    node.stop().await;
    peer.stop().await;
}
