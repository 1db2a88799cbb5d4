//! CHUNKING (RFC 3030): BDAT chunks, BDAT 0 LAST, refusals that keep the session in sync,
//! size limits, DATA after BDAT, pipelined BDAT.

use crate::harness::*;

async fn ready(server: &TestServer) -> Client {
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<from@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<to@sink.test>", 250, "2.1.5").await;
    c
}

fn bdat(chunk: &[u8], last: bool) -> Vec<u8> {
    let mut out = format!(
        "BDAT {}{}\r\n",
        chunk.len(),
        if last { " LAST" } else { "" }
    )
    .into_bytes();
    out.extend_from_slice(chunk);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunks_then_last_are_queued_byte_identical() {
    let server = TestServer::start(Options::default()).await;
    let mut c = ready(&server).await;
    // Chunk boundaries fall inside a CRLF and right before a line-start dot: BDAT content is
    // taken literally (no dot-unstuffing, no end marker).
    let content =
        b"Subject: bdat\r\n\r\nfirst line\r\n.not stuffed\r\n..two dots stay two\r\n.\r\nend\r\n"
            .to_vec();
    let cuts = [10, 16, 17, 30, 45];
    let mut prev = 0;
    for &cut in &cuts {
        c.send(bdat(&content[prev..cut], false)).await;
        let r = c.reply().await;
        r.assert(250, "2.0.0");
        assert!(
            r.lines[0].contains(&format!("{} octets", cut - prev)),
            "{:?}",
            r.lines
        );
        prev = cut;
    }
    c.send(bdat(&content[prev..], true)).await;
    let id = c.reply().await.queued_id();
    let body = server.body(id);
    prepended(&body, &content, false);
    assert_eq!(server.message_count(), 1);
    // The session continues normally.
    c.expect("NOOP", 250, "2.0.0").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_zero_last_ends_the_message() {
    let server = TestServer::start(Options::default()).await;
    let mut c = ready(&server).await;
    let content = b"Subject: zero last\r\n\r\nbody\r\n";
    c.send(bdat(content, false)).await;
    c.reply().await.assert(250, "2.0.0");
    c.send("BDAT 0 LAST\r\n").await;
    let id = c.reply().await.queued_id();
    prepended(&server.body(id), content, false);

    // A message made of nothing but BDAT 0 LAST is an empty message.
    c.expect("MAIL FROM:<from@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<to@sink.test>", 250, "2.1.5").await;
    let id2 = c.cmd("BDAT 0 LAST").await.queued_id();
    assert_ne!(id, id2);
    prepended(&server.body(id2), b"", false);
    assert_eq!(server.message_count(), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_without_transaction_consumes_its_chunk() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    // If the 9 bytes were not consumed, "NOOP\r\nQUI" would be read as commands.
    c.send("BDAT 9\r\nNOOP\r\nQUINOOP\r\n").await;
    c.reply().await.assert(503, "5.5.1");
    let next = c.reply().await;
    assert_eq!(
        (next.code, next.status()),
        (250, Some("2.0.0")),
        "{:?}",
        next.lines
    );
    // With MAIL but no recipient: refused, still in sync.
    c.expect("MAIL FROM:<from@client.test>", 250, "2.1.0").await;
    // If the chunk were executed, QUIT would answer 221 and close.
    c.send("BDAT 6 LAST\r\nQUIT\r\nNOOP\r\n").await;
    let refused = c.reply().await;
    assert!(
        refused.code == 554 || refused.code == 503,
        "{:?}",
        refused.lines
    );
    c.reply().await.assert(250, "2.0.0");
    server.assert_spool_empty();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdat_over_the_size_limit_is_refused() {
    let server = TestServer::start(Options::default().limit("max_message_size", 1000)).await;
    // One non-last chunk over the limit: refused at once, the chunk still consumed.
    let mut c = ready(&server).await;
    let big = vec![b'a'; 1500];
    let mut wire = bdat(&big, false);
    wire.extend_from_slice(b"NOOP\r\n");
    c.send(&wire).await;
    c.reply().await.assert(552, "5.3.4");
    c.reply().await.assert(250, "2.0.0");
    // The transaction is over: the next chunk has no transaction.
    c.send(bdat(b"xyz", true)).await;
    c.reply().await.assert(503, "5.5.1");

    // Several chunks each under the limit, together over it, the last one LAST.
    c.expect("MAIL FROM:<from@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<to@sink.test>", 250, "2.1.5").await;
    c.send(bdat(&[b'b'; 600], false)).await;
    c.reply().await.assert(250, "2.0.0");
    c.send(bdat(&[b'c'; 600], true)).await;
    c.reply().await.assert(552, "5.3.4");
    c.expect("NOOP", 250, "2.0.0").await;
    server.assert_spool_empty();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_after_bdat_and_rcpt_after_bdat_are_refused() {
    let server = TestServer::start(Options::default()).await;
    let mut c = ready(&server).await;
    c.send(bdat(b"Subject: x\r\n", false)).await;
    c.reply().await.assert(250, "2.0.0");
    c.expect("DATA", 503, "5.5.1").await;
    c.expect("RCPT TO:<late@sink.test>", 503, "5.5.1").await;
    // The chunked transaction is still intact.
    c.send(bdat(b"\r\nbody\r\n", true)).await;
    let id = c.reply().await.queued_id();
    prepended(&server.body(id), b"Subject: x\r\n\r\nbody\r\n", false);
    assert_eq!(server.envelope(id).recipients.len(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_bdat_transaction_in_one_write() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    let ehlo = c.ehlo().await;
    assert!(ehlo.has_keyword("CHUNKING") && ehlo.has_keyword("PIPELINING"));
    let part1 = b"Subject: pipelined bdat\r\n\r\n";
    let part2 = b"chunk two\r\nMAIL FROM:<not@a.command>\r\n";
    let mut wire = b"MAIL FROM:<from@client.test> BODY=8BITMIME\r\nRCPT TO:<a@sink.test>\r\nRCPT TO:<b@other.test>\r\n".to_vec();
    wire.extend(bdat(part1, false));
    wire.extend(bdat(part2, true));
    wire.extend_from_slice(b"QUIT\r\n");
    c.send(&wire).await;
    c.reply().await.assert(250, "2.1.0");
    c.reply().await.assert(250, "2.1.5");
    c.reply().await.assert(250, "2.1.5");
    c.reply().await.assert(250, "2.0.0");
    let id = c.reply().await.queued_id();
    let rest = c.replies_until_close().await;
    assert_eq!(rest.len(), 1, "{rest:?}");
    rest[0].assert(221, "2.0.0");
    let envs = server.envelopes();
    assert_eq!(envs.len(), 2);
    assert!(envs.iter().all(|e| e.queue_id == id));
    assert!(envs
        .iter()
        .all(|e| e.body_type == tern_queue::BodyType::EightBitMime));
    let mut content = part1.to_vec();
    content.extend_from_slice(part2);
    prepended(&server.body(id), &content, false);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bare_line_ends_in_bdat_content_are_refused() {
    let server = TestServer::start(Options::default()).await;
    let mut c = ready(&server).await;
    c.send(bdat(b"Subject: x\r\n\r\nline one\nline two\r\n", true))
        .await;
    c.reply().await.assert(550, "5.6.0");
    c.expect("NOOP", 250, "2.0.0").await;
    // A CR at the end of one chunk and LF at the start of the next is a proper CRLF.
    c.expect("MAIL FROM:<from@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<to@sink.test>", 250, "2.1.5").await;
    c.send(bdat(b"Subject: split crlf\r", false)).await;
    c.reply().await.assert(250, "2.0.0");
    c.send(bdat(b"\n\r\nok\r\n", true)).await;
    let id = c.reply().await.queued_id();
    prepended(
        &server.body(id),
        b"Subject: split crlf\r\n\r\nok\r\n",
        false,
    );
    assert_eq!(server.message_count(), 1);
    server.stop().await;
}
