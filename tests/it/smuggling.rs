//! SMTP smuggling (CVE-2023-51764 class): fake end-of-data sequences with a smuggled
//! transaction behind them, NUL bytes, bare LF in BDAT. Every such message is refused with
//! 550 5.6.0, nothing is spooled, the smuggled commands never run, and the session stays
//! usable.

use crate::harness::*;

const SMUGGLED: &[u8] =
    b"MAIL FROM:<evil@x.test>\r\nRCPT TO:<victim@sink.test>\r\nDATA\r\nsmuggled\r\n";

/// Sends one message whose DATA content is `content` (sent raw, with the real end appended)
/// and asserts it is refused without side effects.
async fn assert_refused(server: &TestServer, c: &mut Client, what: &str, content: &[u8]) {
    c.expect("MAIL FROM:<honest@client.test>", 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<rcpt@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    let mut wire = content.to_vec();
    wire.extend_from_slice(b"\r\n.\r\n");
    c.send(&wire).await;
    let verdict = c.reply().await;
    assert_eq!(
        (verdict.code, verdict.status()),
        (550, Some("5.6.0")),
        "{what}: expected a 550 5.6.0 refusal, got {:?}",
        verdict.lines
    );
    // Exactly one reply for the data: the next reply must be the NOOP's, not a MAIL's
    // (2.1.0), RCPT's (2.1.5), DATA's (354) or a queued message's.
    let noop = c.cmd("NOOP").await;
    assert_eq!(
        (noop.code, noop.status()),
        (250, Some("2.0.0")),
        "{what}: a smuggled command was executed? got {:?}",
        noop.lines
    );
    // And no transaction is open: a smuggled MAIL would make this RCPT succeed.
    c.expect("RCPT TO:<victim@sink.test>", 503, "5.5.1").await;
    assert_eq!(server.message_count(), 0, "{what}: nothing may be spooled");
    assert!(
        server.envelopes().is_empty(),
        "{what}: nothing may be spooled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_ends_of_data_do_not_end_data_and_the_message_is_refused() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let fakes: [(&str, &[u8]); 4] = [
        ("LF.LF", b"\n.\n"),
        ("CR.CR", b"\r.\r"),
        ("CRLF.CR", b"\r\n.\r"),
        ("LF.CRLF", b"\n.\r\n"),
    ];
    for (name, fake) in fakes {
        let mut content = b"Subject: smuggling test\r\n\r\nhello".to_vec();
        content.extend_from_slice(fake);
        content.extend_from_slice(SMUGGLED);
        // `SMUGGLED` ends with CRLF; `assert_refused` adds the real ".\r\n" after one more CRLF.
        assert_refused(&server, &mut c, name, &content).await;
    }
    // After all that, an honest message goes through: the session was never out of sync.
    let content = message("after-smuggling");
    let id = c
        .submit("honest@client.test", &["rcpt@sink.test"], &content)
        .await;
    let envs = server.envelopes();
    assert_eq!(envs.len(), 1);
    assert_eq!(envs[0].sender, "honest@client.test");
    prepended(&server.body(id), &content, false);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fake_end_with_everything_in_one_write_is_refused() {
    // The whole attack pipelined in one segment, as a smuggling client would send it.
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut wire =
        b"MAIL FROM:<honest@client.test>\r\nRCPT TO:<rcpt@sink.test>\r\nDATA\r\n".to_vec();
    wire.extend_from_slice(b"Subject: x\r\n\r\nhello\n.\r\n");
    wire.extend_from_slice(SMUGGLED);
    wire.extend_from_slice(b"\r\n.\r\nNOOP\r\nQUIT\r\n");
    c.send(&wire).await;
    let replies = c.replies_until_close().await;
    let codes: Vec<u16> = replies.iter().map(|r| r.code).collect();
    assert_eq!(codes, [250, 250, 354, 550, 250, 221], "{replies:?}");
    assert_eq!(replies[3].status(), Some("5.6.0"), "{replies:?}");
    assert_eq!(
        replies[4].status(),
        Some("2.0.0"),
        "NOOP, not a smuggled MAIL: {replies:?}"
    );
    server.assert_spool_empty();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_byte_in_data_is_refused() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    assert_refused(&server, &mut c, "NUL", b"Subject: nul\r\n\r\nbefore\0after").await;
    assert_refused(
        &server,
        &mut c,
        "bare CR before the end",
        b"Subject: cr\r\n\r\nline\r",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_lf_and_smuggled_commands_in_bdat_are_refused() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<honest@client.test>", 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<rcpt@sink.test>", 250, "2.1.5").await;
    let mut chunk = b"Subject: bdat smuggling\r\n\r\nhello\n.\n".to_vec();
    chunk.extend_from_slice(SMUGGLED);
    let mut wire = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
    wire.extend_from_slice(&chunk);
    c.send(&wire).await;
    c.reply().await.assert(550, "5.6.0");
    c.expect("NOOP", 250, "2.0.0").await;
    c.expect("RCPT TO:<victim@sink.test>", 503, "5.5.1").await;
    server.assert_spool_empty();
    server.stop().await;
}
