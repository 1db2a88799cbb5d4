//! Python's smtplib as an independent, real-world client.

use crate::harness::*;
use std::process::Stdio;
use tokio::process::Command;

const SCRIPT: &str = r#"
import smtplib, ssl, sys
from email.message import EmailMessage

mode, port = sys.argv[1], int(sys.argv[2])
msg = EmailMessage()
msg["From"] = "py@client.test"
msg["To"] = "a@sink.test, b@other.test"
msg["Subject"] = "python-" + mode
msg.set_content("hello from python\n.leading dot line\n..two dots\nend\n")

if mode == "plain":
    with smtplib.SMTP("127.0.0.1", port, local_hostname="py.client.test", timeout=30) as s:
        code, _ = s.ehlo()
        assert code == 250, code
        for ext in ("pipelining", "size", "8bitmime", "chunking", "dsn"):
            assert s.has_extn(ext), ext
        assert not s.has_extn("auth")
        refused = s.send_message(msg)
        print("REFUSED", sorted(refused.items()))
else:
    ctx = ssl.create_default_context(cafile=sys.argv[3])
    with smtplib.SMTP("localhost", port, local_hostname="py.client.test", timeout=30) as s:
        s.ehlo()
        assert s.has_extn("starttls")
        s.starttls(context=ctx)
        s.ehlo()
        assert "PLAIN" in s.esmtp_features.get("auth", ""), s.esmtp_features
        print("TLS", s.sock.version())
        code, resp = s.login("app", "secret")
        print("LOGIN", code)
        refused = s.send_message(msg)
        print("REFUSED", sorted(refused.items()))
    with smtplib.SMTP("localhost", port, local_hostname="py.client.test", timeout=30) as s:
        s.starttls(context=ctx)
        try:
            s.login("app", "wrong")
        except smtplib.SMTPAuthenticationError as e:
            print("WRONG PASSWORD REFUSED", e.smtp_code)
print("DONE")
"#;

/// Expected stored content: smtplib's rendering of the message, dot-unstuffed by the server.
fn expected_tail() -> &'static [u8] {
    b"\r\n\r\nhello from python\r\n.leading dot line\r\n..two dots\r\nend\r\n"
}

async fn python(args: &[&str]) -> Option<std::process::Output> {
    let probe = Command::new("python3").arg("--version").output().await;
    if !probe.is_ok_and(|o| o.status.success()) {
        eprintln!("NOTICE: python3 not found; skipping the smtplib interoperability test");
        return None;
    }
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(60),
        Command::new("python3")
            .arg("-c")
            .arg(SCRIPT)
            .args(args)
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("python finished within 60 s")
    .expect("run python3");
    Some(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_send_message_to_two_domains() {
    let server = TestServer::start(Options::default()).await;
    let port = server.smtp.port().to_string();
    let Some(out) = python(&["plain", &port]).await else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.contains("REFUSED []"), "{}", describe(&out));
    assert!(stdout.contains("DONE"));

    let envs = server.envelopes();
    assert_eq!(envs.len(), 2, "one envelope per domain: {envs:#?}");
    let queue_id = envs[0].queue_id;
    assert!(envs.iter().all(|e| e.queue_id == queue_id));
    let mut dests: Vec<&str> = envs.iter().map(|e| e.destination.as_str()).collect();
    dests.sort();
    assert_eq!(dests, ["other.test", "sink.test"]);
    for env in &envs {
        assert_eq!(env.sender, "py@client.test");
        assert_eq!(env.source.helo, "py.client.test");
        assert_eq!(env.recipients.len(), 1);
        let body = server.body(env.id);
        assert_eq!(env.size, body.len() as u64);
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.starts_with("Received: from py.client.test ([127.0.0.1])"),
            "{text}"
        );
        assert!(text.contains("\r\nSubject: python-plain\r\n"), "{text}");
        assert!(
            body.ends_with(expected_tail()),
            "dot-unstuffed, CRLF body: {text:?}"
        );
        assert!(
            !body.windows(2).any(|w| w[1] == b'\n' && w[0] != b'\r'),
            "no bare LF: {text:?}"
        );
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtplib_starttls_and_login() {
    let server = TestServer::start(Options::default().tls().auth().relay(&["10.0.0.0/8"])).await;
    let ca = server.dir.path().join("ca.pem");
    assert!(ca.exists());
    let port = server.smtp.port().to_string();
    let Some(out) = python(&["tls", &port, ca.to_str().unwrap()]).await else {
        return;
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stdout.contains("TLS TLSv1.3"), "{}", describe(&out));
    assert!(stdout.contains("LOGIN 235"), "{}", describe(&out));
    assert!(stdout.contains("REFUSED []"), "{}", describe(&out));
    assert!(
        stdout.contains("WRONG PASSWORD REFUSED 535"),
        "{}",
        describe(&out)
    );

    let envs = server.envelopes();
    assert_eq!(envs.len(), 2, "{envs:#?}");
    for env in &envs {
        assert_eq!(env.source.auth_user.as_deref(), Some(USER));
        assert_eq!(env.source.protocol, "ESMTPSA");
        let body = server.body(env.id);
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("with ESMTPSA"), "{text}");
        assert!(text.contains("(using TLSv1.3 with cipher "), "{text}");
        assert!(text.contains("\r\nSubject: python-tls\r\n"), "{text}");
        // smtplib adds neither Date nor Message-ID: tern does for authenticated submissions.
        assert!(text.contains("\r\nDate: "), "{text}");
        assert!(
            text.contains(&format!("\r\nMessage-ID: <{}@{HOST}>\r\n", env.queue_id)),
            "{text}"
        );
        assert!(body.ends_with(expected_tail()), "{text:?}");
    }
    server.stop().await;
}
