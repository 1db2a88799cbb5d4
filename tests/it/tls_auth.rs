//! STARTTLS, implicit TLS, AUTH PLAIN/LOGIN, authenticated relay, trace headers, and the
//! STARTTLS command-injection guard.

use crate::harness::*;

/// TLS + one user; 127.0.0.1 is NOT a relay network, so relaying needs AUTH.
fn opts() -> Options {
    Options::default().tls().auth().relay(&["10.0.0.0/8"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_then_ehlo_offers_auth_and_no_starttls() {
    let server = TestServer::start(opts()).await;
    let mut c = server.connect().await;
    let before = c.ehlo().await;
    assert!(before.has_keyword("STARTTLS"), "{:?}", before.lines);
    assert!(!before.has_keyword("AUTH"), "{:?}", before.lines);
    let mut c = c.starttls().await;
    // RFC 3207: the session is reset; MAIL needs a new EHLO.
    c.expect("MAIL FROM:<a@client.test>", 503, "5.5.1").await;
    let after = c.ehlo().await;
    assert_eq!(
        after.keyword_line("AUTH"),
        Some("AUTH PLAIN LOGIN"),
        "{:?}",
        after.lines
    );
    assert!(!after.has_keyword("STARTTLS"), "{:?}", after.lines);
    let again = c.cmd("STARTTLS").await;
    assert_eq!(again.code / 100, 5, "no second STARTTLS: {:?}", again.lines);
    c.expect("QUIT", 221, "2.0.0").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_requires_tls() {
    let server = TestServer::start(opts()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect(
        &format!("AUTH PLAIN {}", b64(format!("\0{USER}\0{PASSWORD}"))),
        538,
        "5.7.11",
    )
    .await;
    c.expect("AUTH LOGIN", 538, "5.7.11").await;
    // Not authenticated: relay still denied.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 554, "5.7.1").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_failure_then_success_and_authenticated_relay() {
    let server = TestServer::start(opts()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    // Unauthenticated on TLS: relay denied.
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 554, "5.7.1").await;
    c.expect("RSET", 250, "2.0.0").await;

    c.auth_plain(USER, "wrong").await.assert(535, "5.7.8");
    c.auth_plain("nobody", PASSWORD).await.assert(535, "5.7.8");
    c.auth_plain(USER, PASSWORD).await.assert(235, "2.7.0");
    let r = c.auth_plain(USER, PASSWORD).await;
    assert_eq!(r.code, 503, "already authenticated: {:?}", r.lines);
    let ehlo = c.ehlo().await;
    assert!(
        !ehlo.has_keyword("AUTH"),
        "AUTH not offered once authenticated: {:?}",
        ehlo.lines
    );

    // Submission without Date and Message-ID: both are added.
    let content =
        b"From: <app@client.test>\r\nTo: <x@sink.test>\r\nSubject: submitted\r\n\r\nHello.\r\n"
            .to_vec();
    let id = c
        .submit(
            "app@client.test",
            &["x@sink.test", "y@elsewhere.test"],
            &content,
        )
        .await;
    let envs = server.envelopes();
    assert_eq!(envs.len(), 2);
    let env = server.envelope(id);
    assert_eq!(env.source.auth_user.as_deref(), Some(USER));
    assert_eq!(env.source.protocol, "ESMTPSA");
    let body = server.body(id);
    let head = prepended(&body, &content, true);
    let received = received_of(head);
    assert!(received.contains("with ESMTPSA"), "{received}");
    assert!(
        received.contains("(using TLSv1.3 with cipher "),
        "{received}"
    );
    assert!(head.contains("\r\nDate: "), "Date added: {head:?}");
    let msgid = format!("\r\nMessage-ID: <{id}@{HOST}>\r\n");
    assert!(head.contains(&msgid), "Message-ID added: {head:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticated_submission_keeps_existing_date_and_message_id() {
    let server = TestServer::start(opts()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    c.auth_plain(USER, PASSWORD).await.assert(235, "2.7.0");
    let content = message("has-date");
    let id = c
        .submit("app@client.test", &["x@sink.test"], &content)
        .await;
    let body = server.body(id);
    let head = prepended(&body, &content, true);
    assert!(
        !head.contains("Date: ") && !head.contains("Message-ID: "),
        "nothing added: {head:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_login_exchange() {
    let server = TestServer::start(opts()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    // Cancelled with "*".
    let p = c.cmd("AUTH LOGIN").await;
    assert_eq!(p.lines, ["334 VXNlcm5hbWU6"], "Username: prompt");
    let r = c.cmd("*").await;
    assert_eq!(r.code, 501, "{:?}", r.lines);
    // Wrong password.
    c.cmd("AUTH LOGIN").await;
    let p = c.cmd(&b64(USER)).await;
    assert_eq!(p.lines, ["334 UGFzc3dvcmQ6"], "Password: prompt");
    c.cmd(&b64("nope")).await.assert(535, "5.7.8");
    // Right password, user given as initial response.
    let p = c.cmd(&format!("AUTH LOGIN {}", b64(USER))).await;
    assert_eq!(p.lines, ["334 UGFzc3dvcmQ6"]);
    c.cmd(&b64(PASSWORD)).await.assert(235, "2.7.0");
    c.expect("MAIL FROM:<app@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_session_has_tls_in_received_header() {
    // 127.0.0.1 may relay here: TLS without AUTH is ESMTPS.
    let server = TestServer::start(Options::default().tls()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    let content = message("starttls");
    let id = c.submit("a@client.test", &["x@sink.test"], &content).await;
    let head = prepended(&server.body(id), &content, false).to_string();
    let received = received_of(&head);
    assert!(received.contains("with ESMTPS id"), "{received}");
    assert!(
        received.contains("(using TLSv1.3 with cipher TLS13_"),
        "{received}"
    );
    assert_eq!(server.envelope(id).source.protocol, "ESMTPS");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn implicit_tls_listener() {
    let server = TestServer::start(opts().smtps()).await;
    let mut c = server.connect_smtps().await;
    let ehlo = c.ehlo().await;
    assert!(
        !ehlo.has_keyword("STARTTLS"),
        "already TLS: {:?}",
        ehlo.lines
    );
    assert_eq!(
        ehlo.keyword_line("AUTH"),
        Some("AUTH PLAIN LOGIN"),
        "{:?}",
        ehlo.lines
    );
    c.auth_plain(USER, PASSWORD).await.assert(235, "2.7.0");
    let content = message("smtps");
    let id = c
        .submit("app@client.test", &["x@sink.test"], &content)
        .await;
    let head = prepended(&server.body(id), &content, true).to_string();
    let received = received_of(&head);
    assert!(received.contains("with ESMTPSA"), "{received}");
    assert!(received.contains("using TLSv1.3"), "{received}");
    c.expect("QUIT", 221, "2.0.0").await;

    // A plaintext client on the smtps port gets no SMTP greeting.
    let mut plain = Client::connect(server.smtps.unwrap()).await;
    plain.send("EHLO plain.test\r\n").await;
    let got = tokio::time::timeout(IO_TIMEOUT, plain.try_reply())
        .await
        .expect("closed in time");
    assert!(
        !matches!(got, Ok(Some(ref r)) if r.code == 220 || r.code == 250),
        "plaintext on smtps must not get an SMTP dialogue: {got:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_after_starttls_are_discarded() {
    let server = TestServer::start(Options::default().tls()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    // STARTTLS and a NOOP in one segment: the NOOP must not be answered, neither in clear
    // before the handshake nor inside TLS afterwards.
    c.send("STARTTLS\r\nNOOP\r\n").await;
    c.reply().await.assert(220, "2.0.0");
    assert!(
        c.buffered().is_empty(),
        "nothing may follow the 220: {:?}",
        String::from_utf8_lossy(c.buffered())
    );
    let tls = tls_connect(c.into_io())
        .await
        .expect("handshake must not see leftover plaintext");
    let mut c = Client::new(Box::new(tls));
    c.send("EHLO after.test\r\nNOOP\r\nQUIT\r\n").await;
    let replies = c.replies_until_close().await;
    assert_eq!(replies.len(), 3, "EHLO, NOOP, QUIT only: {replies:?}");
    assert_eq!(replies[0].code, 250);
    assert!(
        replies[0].lines.len() > 1 && replies[0].lines[0] == format!("250-{HOST}"),
        "{replies:?}"
    );
    replies[1].assert(250, "2.0.0");
    replies[2].assert(221, "2.0.0");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_end_with_close_notify() {
    // RFC 8446 6.1: each party MUST send close_notify before closing its write side;
    // without it a client cannot tell a complete reply stream from a truncated one.
    let server = TestServer::start(Options::default().smtps()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    c.expect("QUIT", 221, "2.0.0").await;
    let end = tokio::time::timeout(IO_TIMEOUT, c.try_reply())
        .await
        .expect("closed in time");
    assert!(
        matches!(end, Ok(None)),
        "STARTTLS session: expected close_notify then EOF, got {end:?}"
    );

    let mut c = server.connect_smtps().await;
    c.expect("QUIT", 221, "2.0.0").await;
    let end = tokio::time::timeout(IO_TIMEOUT, c.try_reply())
        .await
        .expect("closed in time");
    assert!(
        matches!(end, Ok(None)),
        "smtps session: expected close_notify then EOF, got {end:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_plain_without_initial_response_and_starttls_in_a_transaction() {
    let server = TestServer::start(opts()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("STARTTLS", 503, "5.5.1").await;
    c.expect("RSET", 250, "2.0.0").await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    let prompt = c.cmd("AUTH PLAIN").await;
    assert_eq!(prompt.code, 334, "{:?}", prompt.lines);
    c.cmd(&b64(format!("{USER}\0{USER}\0{PASSWORD}")))
        .await
        .assert(235, "2.7.0");
    c.expect("MAIL FROM:<app@client.test>", 250, "2.1.0").await;
    c.expect("AUTH LOGIN", 503, "5.5.1").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_inside_an_auth_exchange_gets_the_timeout_reply() {
    let server = TestServer::start(opts().limit("command_timeout", "\"1s\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    let prompt = c.cmd("AUTH LOGIN").await;
    assert_eq!(prompt.code, 334);
    // Silence: the same 421 4.4.2 as when idle between commands.
    let replies = c.replies_until_close().await;
    let codes: Vec<(u16, Option<&str>)> = replies.iter().map(|r| (r.code, r.status())).collect();
    assert_eq!(codes, [(421, Some("4.4.2"))], "{replies:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_auth_response_gets_exactly_one_error() {
    let server = TestServer::start(opts().limit("command_timeout", "\"3s\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut c = c.starttls().await;
    c.ehlo().await;
    let prompt = c.cmd("AUTH PLAIN").await;
    assert_eq!(prompt.code, 334);
    // A 20000-byte response line spans several reads; its tail must not be taken for a
    // command (that would answer twice and desynchronise a pipelining client).
    let mut line = vec![b'A'; 20_000];
    line.extend_from_slice(b"\r\nNOOP\r\n");
    c.send(&line).await;
    let refused = c.reply().await;
    assert_eq!(refused.code / 100, 5, "{:?}", refused.lines);
    let next = c.reply().await;
    assert_eq!(
        (next.code, next.status()),
        (250, Some("2.0.0")),
        "the reply after the refusal must be the NOOP's: {:?}",
        next.lines
    );
    server.stop().await;
}
