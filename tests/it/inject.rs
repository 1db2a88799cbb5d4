//! `POST /api/v1/inject` and `tern inject` over real HTTP: raw and structured mail reaches
//! real SMTP sinks split by domain (structured mail is valid MIME, DKIM-signed when the From
//! domain has a key), every refusal is JSON with the right status, a 200 survives SIGKILL of
//! the real binary, and the CLI injects from standard input.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_parser::{MessageParser, MimeHeaders};
use serde_json::{json, Value};
use tern::cli::client::ApiClient;
use tern::dkim::{generate_key, KeyAlgorithm};
use tern_queue::{MessageId, Spool};

use crate::delivery::{relay, wait_spool_empty, SENDER, T};
use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};

fn ids(answer: &Value) -> Vec<MessageId> {
    answer["ids"]
        .as_array()
        .unwrap_or_else(|| panic!("no ids in {answer}"))
        .iter()
        .map(|id| id.as_str().unwrap().parse().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_and_structured_mail_is_delivered_split_by_domain() {
    let keys = tempfile::tempdir().unwrap();
    let key_path = keys.path().join("ed.pem");
    let key = generate_key(KeyAlgorithm::Ed25519).unwrap();
    write_secret(&key_path, key.private_key_pem);
    let other = Sink::start(SinkBehaviour::default()).await;
    let r = relay(SinkBehaviour::default(), |o| {
        o.route("other.test", other.addr).dkim(format!(
            "domain = \"dkim.test\"\nselector = \"ed\"\nkey = {:?}",
            key_path.display().to_string()
        ))
    })
    .await;

    // Raw, LF line ends as JSON clients write them, three recipients in two domains (one
    // listed twice, kept once).
    let raw = "From: <sender@sender.test>\nTo: <a@sink.test>\nSubject: raw inject\n\n\
               Hello over HTTP.\n.leading dot\n";
    let (status, answer) = r
        .server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": SENDER,
                "to": ["a@sink.test", "b@sink.test", "c@other.test", "a@SINK.test"],
                "raw": raw,
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["recipients"], 3, "{answer}");
    let raw_ids = ids(&answer);
    assert_eq!(raw_ids.len(), 2, "one part per domain: {answer}");
    assert_eq!(answer["id"], raw_ids[0].to_string());

    // Structured: text, HTML, a binary attachment, a custom header, DKIM-signed.
    let attachment: Vec<u8> = (0..=255u8).collect();
    let (status, answer) = r
        .server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "alice@dkim.test",
                "to": ["d@sink.test", {"address": "e@other.test", "notify": ["never"]}],
                "ret": "headers",
                "envid": "campaign-7",
                "message": {
                    "to": ["Dora <d@sink.test>", "e@other.test"],
                    "subject": "Structured ✓",
                    "text": "Plain part\nsecond line",
                    "html": "<p>HTML part</p>",
                    "headers": {"X-Campaign": "spring"},
                    "attachments": [{
                        "filename": "bytes.bin",
                        "content_type": "application/octet-stream",
                        "content_base64": b64(&attachment),
                    }],
                },
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["recipients"], 2);
    assert_eq!(ids(&answer).len(), 2);

    let at_sink = r.sink.wait_for_messages(2, T).await;
    let at_other = other.wait_for_messages(2, T).await;
    let find = |messages: &[crate::sink::ReceivedMessage], subject: &str| {
        messages
            .iter()
            .find(|m| String::from_utf8_lossy(&m.data).contains(subject))
            .unwrap_or_else(|| panic!("no message with {subject:?}"))
            .clone()
    };
    let raw_sink = find(&at_sink, "raw inject");
    assert_eq!(raw_sink.mail_from, SENDER);
    assert_eq!(raw_sink.rcpt_addresses(), ["a@sink.test", "b@sink.test"]);
    let text = String::from_utf8(without_origin(&raw_sink.data).to_vec()).unwrap();
    assert!(
        text.starts_with("Received: from api ([127.0.0.1])\r\n\tby tern.test (tern) with HTTP id "),
        "{text}"
    );
    assert!(
        text.ends_with("Subject: raw inject\r\n\r\nHello over HTTP.\r\n.leading dot\r\n"),
        "LF became CRLF: {text:?}"
    );
    // Authenticated submission: Date and Message-ID were added.
    let parsed = MessageParser::default().parse(&raw_sink.data).unwrap();
    assert!(parsed.date().is_some() && parsed.message_id().is_some());
    assert_eq!(
        find(&at_other, "raw inject").rcpt_addresses(),
        ["c@other.test"]
    );

    for (m, rcpt) in [
        (find(&at_sink, "X-Campaign"), "d@sink.test"),
        (find(&at_other, "X-Campaign"), "e@other.test"),
    ] {
        assert_eq!(m.rcpt_addresses(), [rcpt]);
        assert_eq!(m.mail_from, "alice@dkim.test");
        let parsed = MessageParser::default().parse(&m.data).expect("valid MIME");
        assert_eq!(parsed.subject(), Some("Structured ✓"));
        assert_eq!(
            parsed.body_text(0).as_deref(),
            Some("Plain part\r\nsecond line")
        );
        assert_eq!(parsed.body_html(0).as_deref(), Some("<p>HTML part</p>"));
        let part = parsed.attachment(0).expect("attachment");
        assert_eq!(part.attachment_name(), Some("bytes.bin"));
        assert_eq!(part.contents(), &attachment[..]);
        assert_eq!(
            parsed.header_raw("X-Campaign").map(str::trim),
            Some("spring")
        );
        assert_eq!(parsed.to().unwrap().first().unwrap().name(), Some("Dora"));
        let signature = parsed
            .header_raw("DKIM-Signature")
            .expect("DKIM-signed at ingest");
        assert!(
            signature.contains("d=dkim.test") && signature.contains("s=ed"),
            "{signature}"
        );
    }
    r.wait_spool_empty().await;
    r.assert_no_dsn();
}

#[tokio::test]
async fn refusals_are_json_with_the_right_status() {
    let server = TestServer::start(
        Options::default()
            .limit("max_message_size", 2000)
            .limit("max_recipients", 3),
    )
    .await;
    let token = server.admin_token();
    let raw = |text: &str| json!({"from": "a@client.test", "to": ["b@sink.test"], "raw": text});
    let cases: Vec<(&str, Option<Value>, &str, u16, &str)> = vec![
        ("malformed JSON", None, "{\"from\": ", 400, "invalid JSON"),
        (
            "no recipients",
            Some(json!({"from": "a@client.test", "to": [], "raw": "Subject: x\n\nx\n"})),
            "",
            400,
            "to:",
        ),
        (
            "recipients missing",
            Some(json!({"from": "a@client.test", "raw": "Subject: x\n\nx\n"})),
            "",
            400,
            "to:",
        ),
        (
            "bad recipient address",
            Some(
                json!({"from": "a@client.test", "to": ["b@sink.test", "not an address"], "raw": "x\n"}),
            ),
            "",
            400,
            "to[1]:",
        ),
        (
            "bad sender address",
            Some(json!({"from": "a@@", "to": ["b@sink.test"], "raw": "x\n"})),
            "",
            400,
            "from:",
        ),
        (
            "too many recipients",
            Some(
                json!({"from": "", "to": ["a@x.test", "b@x.test", "c@x.test", "d@x.test"], "raw": "x\n"}),
            ),
            "",
            400,
            "limits.max_recipients",
        ),
        (
            "too large",
            Some(raw(&"x".repeat(2100))),
            "",
            413,
            "limits.max_message_size",
        ),
        (
            "far too large to read",
            Some(raw(&"x".repeat(1 << 21))),
            "",
            413,
            "limits.max_message_size",
        ),
        (
            "bare CR",
            Some(raw("Subject: x\r\n\r\na\rb\r\n")),
            "",
            400,
            "bare CR",
        ),
        ("NUL", Some(raw("Subject: x\n\na\u{0}b\n")), "", 400, "NUL"),
        (
            "no message",
            Some(json!({"from": "a@client.test", "to": ["b@sink.test"]})),
            "",
            400,
            "raw",
        ),
        (
            "unknown field",
            Some(json!({"from": "a@client.test", "to": ["b@sink.test"], "raw": "x\n", "bcc": []})),
            "",
            400,
            "unknown field",
        ),
        (
            "bad base64",
            Some(json!({"from": "a@client.test", "to": ["b@sink.test"], "raw_base64": "***"})),
            "",
            400,
            "raw_base64:",
        ),
        (
            "structured header injection",
            Some(json!({"from": "a@client.test", "to": ["b@sink.test"],
                        "message": {"text": "x", "headers": {"X-A": "1\r\nBcc: c@d.test"}}})),
            "",
            400,
            "message.headers",
        ),
    ];
    for (what, body, text, want, needle) in cases {
        let body = body
            .map(|b| b.to_string())
            .unwrap_or_else(|| text.to_string());
        let (status, answer) = http(
            server.admin(),
            "POST",
            "/api/v1/inject",
            Some(&token),
            Some(&body),
        )
        .await;
        assert_eq!(status, want, "{what}: {answer}");
        let answer: Value = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("{what}: error is not JSON ({e}): {answer}"));
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(needle), "{what}: {error:?} lacks {needle:?}");
    }
    let good = raw("Subject: x\n\nx\n").to_string();
    for bad in [None, Some("wrong-token")] {
        let (status, answer) =
            http(server.admin(), "POST", "/api/v1/inject", bad, Some(&good)).await;
        assert_eq!(status, 401, "{answer}");
        let answer: Value = serde_json::from_str(&answer).expect("JSON 401");
        assert!(answer["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    server.assert_spool_empty();

    // What was refused is counted, and the one good call as received over HTTP.
    let (status, _) = server
        .api("POST", "/api/v1/inject", Some(&raw("Subject: x\n\nx\n")))
        .await;
    assert_eq!(status, 200);
    let (_, metrics) = http(server.admin(), "GET", "/metrics", None, None).await;
    for line in [
        "tern_messages_received_total{protocol=\"http\"} 1",
        "tern_messages_received_total{protocol=\"smtp\"} 0",
        "tern_messages_rejected_total{reason=\"size\"} 2",
        "tern_messages_rejected_total{reason=\"recipients\"} 1",
        "tern_messages_rejected_total{reason=\"smuggling\"} 2",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    assert_eq!(server.message_count(), 1);
    server.stop().await;
}

/// Writes a config for the real binary with the admin API on a known port.
fn bin_config(dir: &std::path::Path, smtp_port: u16, admin_port: u16) -> std::path::PathBuf {
    let opts = Options {
        log_level: "warn".to_string(),
        ..Options::default()
    };
    let path = write_bin_config(dir, smtp_port, &opts);
    let text = std::fs::read_to_string(&path).unwrap().replace(
        "[admin]\naddress = \"127.0.0.1:0\"",
        &format!("[admin]\naddress = \"127.0.0.1:{admin_port}\""),
    );
    assert!(text.contains(&format!(":{admin_port}\"")), "{text}");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_200_survives_sigkill() {
    const CLIENTS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let config = bin_config(dir.path(), port, admin_port);
    let mut tern = TernProc::spawn(&config, port, &dir.path().join("tern.log"));
    drop(tern.wait_ready(Duration::from_secs(30)).await);
    let token = std::fs::read_to_string(dir.path().join("admin.token")).unwrap();
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], admin_port));

    // Blocking clients on their own threads, each on one keep-alive connection, until the
    // connection breaks (the kill) or `stop`.
    let stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<HashMap<String, MessageId>>> = Arc::default();
    let threads: Vec<_> = (0..CLIENTS)
        .map(|n| {
            let (stop, acked, token) = (stop.clone(), acked.clone(), token.trim().to_string());
            std::thread::spawn(move || {
                let mut client = ApiClient::new(admin, token);
                for seq in 0.. {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let marker = format!("kill-{n}-{seq}");
                    let body = json!({
                        "from": "load@client.test",
                        "to": [format!("r{n}@sink.test"), format!("r{n}@other.test")],
                        "raw": format!("Subject: {marker}\n\n{}\n", "z".repeat(4000)),
                    });
                    let Ok(answer) = client.call("POST", "/api/v1/inject", Some(&body)) else {
                        return;
                    };
                    assert_eq!(answer.status, 200, "{}", answer.body);
                    let id = answer.body["id"].as_str().unwrap().parse().unwrap();
                    acked.lock().unwrap().insert(marker, id);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(1500)).await; // load phase length, not a sync
    tern.child.start_kill().expect("SIGKILL");
    tern.wait_exit(Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    for t in threads {
        t.join().expect("client thread");
    }

    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= CLIENTS, "only {} acked", acked.len());
    let spool = Spool::open(&dir.path().join("spool")).expect("reopen the spool");
    let envelopes = spool.list().unwrap();
    for (marker, id) in &acked {
        let parts: Vec<_> = envelopes.iter().filter(|e| e.queue_id == *id).collect();
        assert_eq!(parts.len(), 2, "{marker} ({id}): both domain parts spooled");
        for part in parts {
            let body = spool.body(part.id).unwrap().expect("body");
            let text = String::from_utf8_lossy(&body);
            assert!(text.contains(&format!("Subject: {marker}\r\n")), "{marker}");
        }
    }
    eprintln!(
        "{} acknowledged injections, all in the spool after SIGKILL",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_injects_from_stdin() {
    let r = relay(SinkBehaviour::default(), |o| o).await;
    let config = r.server.dir.path().join("cli.toml");
    let text = Options::default()
        .config_text(r.server.dir.path(), "127.0.0.1:1", "127.0.0.1:0")
        .replace(
            "[admin]\naddress = \"127.0.0.1:0\"",
            &format!("[admin]\naddress = \"{}\"", r.server.admin()),
        );
    std::fs::write(&config, text).unwrap();
    let cfg = config.to_str().unwrap();

    let message = b"From: <sender@sender.test>\nSubject: from the CLI\n\nPiped in.\n";
    let out = run_tern(
        &[
            "inject",
            "--config",
            cfg,
            "--from",
            SENDER,
            "--to",
            "x@sink.test",
            "--to",
            "y@sink.test",
        ],
        Some(message),
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let id: MessageId = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("a queue id on stdout ({e:?}): {}", describe(&out)));
    let received = r.sink.wait_for_messages(1, T).await;
    assert_eq!(received[0].rcpt_addresses(), ["x@sink.test", "y@sink.test"]);
    let data = String::from_utf8_lossy(&received[0].data);
    assert!(data.contains(&format!("with HTTP id {id}")), "{data}");
    assert!(
        data.ends_with("Subject: from the CLI\r\n\r\nPiped in.\r\n"),
        "{data}"
    );

    // Structured flags and --json.
    let attach = r.server.dir.path().join("note.txt");
    std::fs::write(&attach, "attached text").unwrap();
    let out = run_tern(
        &[
            "inject",
            "--config",
            cfg,
            "--from",
            SENDER,
            "--to",
            "z@sink.test",
            "--subject",
            "built",
            "--text",
            "hello",
            "--attach",
            attach.to_str().unwrap(),
            "--json",
        ],
        None,
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let answer: Value = serde_json::from_slice(&out.stdout).expect("--json prints JSON");
    assert_eq!(answer["recipients"], 1, "{answer}");
    let received = r.sink.wait_for_messages(2, T).await;
    let parsed = MessageParser::default().parse(&received[1].data).unwrap();
    assert_eq!(parsed.subject(), Some("built"));
    assert_eq!(parsed.attachment(0).unwrap().contents(), b"attached text");
    assert_eq!(
        parsed
            .attachment(0)
            .unwrap()
            .content_type()
            .unwrap()
            .ctype(),
        "text"
    );

    // An API refusal: exit 65 and the API's message.
    let out = run_tern(
        &[
            "inject",
            "--config",
            cfg,
            "--from",
            SENDER,
            "--to",
            "bad address",
        ],
        Some(message),
    )
    .await;
    assert_eq!(out.status.code(), Some(65), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to[0]:"),
        "{}",
        describe(&out)
    );
    wait_spool_empty(&r.server).await;
}
