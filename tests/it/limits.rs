//! Limits: message size (declared and actual), recipients, connections per IP, command
//! timeout, relay access, protocol error count.

use crate::harness::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declared_size_over_limit_is_refused_at_mail() {
    let server = TestServer::start(Options::default().limit("max_message_size", 10000)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test> SIZE=10001", 552, "5.3.4")
        .await;
    // No transaction was started by the refused MAIL.
    c.expect("RCPT TO:<x@sink.test>", 503, "5.5.1").await;
    c.expect("MAIL FROM:<a@client.test> SIZE=10000", 250, "2.1.0")
        .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn actual_size_over_limit_is_refused_after_data() {
    let server = TestServer::start(Options::default().limit("max_message_size", 10000)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    let mut content = b"Subject: big\r\n\r\n".to_vec();
    while content.len() <= 12000 {
        content.extend_from_slice(
            b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
        );
    }
    c.send(dot_stuff(&content)).await;
    c.reply().await.assert(552, "5.3.4");
    server.assert_spool_empty();
    // The session is in sync and the transaction is over.
    c.expect("NOOP", 250, "2.0.0").await;
    c.expect("RCPT TO:<x@sink.test>", 503, "5.5.1").await;
    // Exactly at the limit is fine.
    let mut exact = b"Subject: exact\r\n\r\n".to_vec();
    while exact.len() < 10000 - 72 {
        exact.extend_from_slice(
            b"0123456789012345678901234567890123456789012345678901234567890123456789\r\n",
        );
    }
    let pad = 10000 - exact.len() - 2;
    exact.extend(std::iter::repeat_n(b'x', pad));
    exact.extend_from_slice(b"\r\n");
    assert_eq!(exact.len(), 10000);
    let id = c.submit("a@client.test", &["x@sink.test"], &exact).await;
    prepended(&server.body(id), &exact, false);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipients_over_limit_get_452_and_the_rest_is_kept() {
    let server = TestServer::start(Options::default().limit("max_recipients", 3)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    for i in 0..3 {
        c.expect(&format!("RCPT TO:<r{i}@sink.test>"), 250, "2.1.5")
            .await;
    }
    c.expect("RCPT TO:<r3@sink.test>", 452, "4.5.3").await;
    c.expect("RCPT TO:<r4@other.test>", 452, "4.5.3").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&message("rcpt-limit"))).await;
    let id = c.reply().await.queued_id();
    let envs = server.envelopes();
    assert_eq!(envs.len(), 1);
    assert_eq!(envs[0].id, id);
    let addrs: Vec<&str> = envs[0]
        .recipients
        .iter()
        .map(|r| r.address.as_str())
        .collect();
    assert_eq!(addrs, ["r0@sink.test", "r1@sink.test", "r2@sink.test"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_connection_limit_is_enforced_at_the_door() {
    let server = TestServer::start(Options::default().limit("max_connections_per_ip", 2)).await;
    let mut first = server.connect().await;
    let _second = server.connect().await;
    let mut third = Client::connect(server.smtp).await;
    let replies = third.replies_until_close().await;
    assert_eq!(
        replies.len(),
        1,
        "one reply, then the door closes: {replies:?}"
    );
    replies[0].assert(421, "4.7.0");
    assert!(replies[0].lines[0].contains(HOST), "{:?}", replies[0].lines);

    // Closing one connection frees its slot (released when the session task ends: poll).
    first.expect("QUIT", 221, "2.0.0").await;
    assert!(first.replies_until_close().await.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Client::connect(server.smtp).await;
        let r = c.reply().await;
        if r.code == 220 {
            c.expect("NOOP", 250, "2.0.0").await;
            break;
        }
        r.assert(421, "4.7.0");
        assert!(Instant::now() < deadline, "slot never released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_disconnected_after_the_command_timeout() {
    let server = TestServer::start(Options::default().limit("command_timeout", "\"1s\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let start = Instant::now();
    let replies = c.replies_until_close().await;
    let waited = start.elapsed();
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies[0].assert(421, "4.4.2");
    assert!(
        waited >= Duration::from_millis(900),
        "timed out too early: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(8),
        "timed out too late: {waited:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_timeout_ends_a_stalled_message_without_spooling_it() {
    let server = TestServer::start(Options::default().limit("data_timeout", "\"1s\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send("Subject: stalled\r\n\r\nhalf a message\r\n").await;
    let replies = c.replies_until_close().await;
    assert_eq!(replies.len(), 1, "{replies:?}");
    replies[0].assert(421, "4.4.2");
    server.assert_spool_empty();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relay_is_denied_outside_the_relay_networks() {
    let server = TestServer::start(Options::default().relay(&["10.0.0.0/8"])).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<victim@sink.test>", 554, "5.7.1").await;
    c.expect("RCPT TO:<other@elsewhere.test>", 554, "5.7.1")
        .await;
    let data = c.cmd("DATA").await;
    assert!(
        data.code == 554 || data.code == 503,
        "no valid recipient: {:?}",
        data.lines
    );
    server.assert_spool_empty();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_errors_close_the_connection() {
    let server = TestServer::start(Options::default().limit("max_errors", 3)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("BOGUS1", 500, "5.5.2").await;
    c.expect("NOOP", 250, "2.0.0").await; // successes do not count
    c.expect("BOGUS2", 500, "5.5.2").await;
    c.send("BOGUS3\r\nNOOP\r\n").await;
    let replies = c.replies_until_close().await;
    let codes: Vec<(u16, Option<&str>)> = replies.iter().map(|r| (r.code, r.status())).collect();
    assert_eq!(
        codes,
        [(500, Some("5.5.2")), (421, Some("4.7.0"))],
        "third error answered, then 421 and close; the pipelined NOOP is not executed"
    );
    server.stop().await;
}

async fn overlong_line_then_noop(len: usize) {
    // A short command timeout turns a lost resync into a quick failure instead of a hang.
    let server = TestServer::start(Options::default().limit("command_timeout", "\"3s\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut line = b"NOOP ".to_vec();
    line.extend(std::iter::repeat_n(b'a', len));
    line.extend_from_slice(b"\r\nNOOP\r\n");
    c.send(&line).await;
    c.reply().await.assert(500, "5.5.6");
    let next = tokio::time::timeout(IO_TIMEOUT, c.try_reply())
        .await
        .expect("a reply or a close");
    let next = next.expect("no I/O error").unwrap_or_else(|| {
        panic!("the connection was closed (silently) instead of answering the NOOP after a {len}-byte line")
    });
    assert_eq!(
        (next.code, next.status()),
        (250, Some("2.0.0")),
        "the command after a {len}-byte line must be executed: {:?}",
        next.lines
    );
    c.expect("QUIT", 221, "2.0.0").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_line_across_reads_is_refused_and_the_session_resyncs() {
    // 20000 bytes: the line spans several reads.
    overlong_line_then_noop(20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_line_within_one_read_is_refused_and_the_next_command_kept() {
    // 5000 bytes: the whole line, its end and the next command arrive in one read.
    overlong_line_then_noop(5_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_line_then_silence_gets_the_timeout_reply() {
    // Idle after an overlong line is idle like any other: 421 4.4.2, not a silent close.
    let server = TestServer::start(Options::default().limit("command_timeout", "\"1s\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.send(vec![b'a'; 5000]).await;
    let replies = c.replies_until_close().await;
    let codes: Vec<(u16, Option<&str>)> = replies.iter().map(|r| (r.code, r.status())).collect();
    assert_eq!(
        codes,
        [(500, Some("5.5.6")), (421, Some("4.4.2"))],
        "{replies:?}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recipient_overshoot_does_not_abort_the_transaction() {
    // RFC 5321 4.5.3.1.10: over the recipient limit the server answers 452 and the client
    // sends the rest in a later transaction. A client pipelining more excess recipients
    // than max_errors must still get its first max_recipients delivered, or a message to a
    // long list could never be delivered at all (Postfix tolerates 1000 excess recipients,
    // smtpd_recipient_overshoot_limit, before counting them as errors).
    let server = TestServer::start(Options::default().limit("max_recipients", 3)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut wire = String::from("MAIL FROM:<list@client.test>\r\n");
    for i in 0..30 {
        wire.push_str(&format!("RCPT TO:<member{i}@sink.test>\r\n"));
    }
    wire.push_str("DATA\r\n");
    c.send(wire).await;
    c.reply().await.assert(250, "2.1.0");
    for i in 0..30 {
        let r = c.reply().await;
        if i < 3 {
            r.assert(250, "2.1.5");
        } else {
            assert_eq!(
                (r.code, r.status()),
                (452, Some("4.5.3")),
                "RCPT {i}: {:?}",
                r.lines
            );
        }
    }
    c.reply().await.assert(354, "");
    c.send(dot_stuff(&message("overshoot"))).await;
    let id = c.reply().await.queued_id();
    assert_eq!(server.envelope(id).recipients.len(), 3);
    server.stop().await;
}
