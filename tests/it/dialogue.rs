//! The basic SMTP dialogue: EHLO keywords, a full transaction, the spool's view of it,
//! pipelining, the small commands and their error replies, and splitting by domain.

use crate::harness::*;
use tern_queue::{Notify, Ret};

const EXTENSIONS: [&str; 7] = [
    "PIPELINING",
    "SIZE",
    "8BITMIME",
    "SMTPUTF8",
    "ENHANCEDSTATUSCODES",
    "DSN",
    "CHUNKING",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_advertises_extensions_without_tls_or_auth() {
    // AUTH users configured but no TLS: neither STARTTLS nor AUTH may be offered.
    let server =
        TestServer::start(Options::default().auth().limit("max_message_size", 12345)).await;
    let mut c = server.connect().await;
    let ehlo = c.ehlo().await;
    assert_eq!(
        ehlo.lines[0],
        format!("250-{HOST}"),
        "first line names the server"
    );
    for kw in EXTENSIONS {
        assert!(
            ehlo.has_keyword(kw),
            "EHLO must list {kw}: {:?}",
            ehlo.lines
        );
    }
    assert_eq!(
        ehlo.keyword_line("SIZE"),
        Some("SIZE 12345"),
        "SIZE carries the configured limit"
    );
    assert!(
        !ehlo.has_keyword("STARTTLS"),
        "no STARTTLS without [tls]: {:?}",
        ehlo.lines
    );
    assert!(
        !ehlo.has_keyword("AUTH"),
        "no AUTH without TLS: {:?}",
        ehlo.lines
    );
    // HELO: one line, no extensions.
    let helo = c.expect("HELO client.test", 250, "").await;
    assert_eq!(helo.lines, [format!("250 {HOST}")]);
    c.expect("QUIT", 221, "2.0.0").await;
    assert!(
        c.replies_until_close().await.is_empty(),
        "QUIT closes the connection"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ehlo_offers_starttls_when_tls_is_configured() {
    let server = TestServer::start(Options::default().tls().auth()).await;
    let mut c = server.connect().await;
    let ehlo = c.ehlo().await;
    assert!(ehlo.has_keyword("STARTTLS"), "{:?}", ehlo.lines);
    assert!(
        !ehlo.has_keyword("AUTH"),
        "AUTH only after TLS: {:?}",
        ehlo.lines
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_is_spooled_with_dsn_parameters_and_identical_body() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@b.test> RET=HDRS", 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<x@sink.test> NOTIFY=SUCCESS,FAILURE", 250, "2.1.5")
        .await;
    c.expect("RCPT TO:<y@sink.test>", 250, "2.1.5").await;
    c.expect("RCPT TO:<z@sink.test> NOTIFY=NEVER", 250, "2.1.5")
        .await;
    c.expect("DATA", 354, "").await;
    let content = message("dialogue-basic");
    c.send(dot_stuff(&content)).await;
    let id = c.reply().await.queued_id();

    let envs = server.envelopes();
    assert_eq!(envs.len(), 1, "one destination, one envelope: {envs:#?}");
    let env = &envs[0];
    assert_eq!(env.id, id, "the reported id is the envelope id");
    assert_eq!(env.queue_id, id);
    assert_eq!(env.sender, "a@b.test");
    assert_eq!(env.destination, "sink.test");
    assert_eq!(env.ret, Some(Ret::Headers));
    assert_eq!(env.env_id, None);
    let addrs: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(addrs, ["x@sink.test", "y@sink.test", "z@sink.test"]);
    assert_eq!(
        env.recipients[0].notify,
        Notify {
            success: true,
            failure: true,
            delay: false,
            never: false
        },
        "NOTIFY=SUCCESS,FAILURE"
    );
    assert_eq!(
        env.recipients[1].notify,
        Notify::default_rfc3461(),
        "no NOTIFY: the default"
    );
    assert_eq!(
        env.recipients[2].notify,
        Notify {
            success: false,
            failure: false,
            delay: false,
            never: true
        },
        "NOTIFY=NEVER"
    );
    assert!(env.recipients.iter().all(|r| r.orcpt.is_none()));
    assert_eq!(env.source.helo, "client.test");
    assert_eq!(env.source.client_ip, "127.0.0.1");
    assert_eq!(env.source.protocol, "ESMTP");
    assert_eq!(env.source.auth_user, None);

    let body = server.body(id);
    assert_eq!(
        env.size,
        body.len() as u64,
        "envelope size is the stored body's size"
    );
    let head = prepended(&body, &content, false);
    let received = received_of(head);
    assert!(
        received.contains(&format!("by {HOST} (tern) with ESMTP id {id}")),
        "{received}"
    );
    assert!(
        received.contains("from client.test ([127.0.0.1])"),
        "{received}"
    );
    assert!(
        !received.contains("using TLS"),
        "no TLS on this session: {received}"
    );
    assert_eq!(server.message_count(), 1);
    c.expect("QUIT", 221, "2.0.0").await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envid_is_xtext_decoded_exactly_once() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    // "+2B" is an xtext-encoded "+": the stored ENVID is "abc+def".
    c.expect(
        "MAIL FROM:<a@b.test> RET=FULL ENVID=abc+2Bdef",
        250,
        "2.1.0",
    )
    .await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&message("envid"))).await;
    let id = c.reply().await.queued_id();
    let env = server.envelope(id);
    assert_eq!(env.env_id.as_deref(), Some("abc+def"));
    assert_eq!(env.ret, Some(Ret::Full));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orcpt_is_decoded_and_keeps_its_address_type() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@b.test>", 250, "2.1.0").await;
    c.expect(
        "RCPT TO:<x@sink.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;x+40sink.test",
        250,
        "2.1.5",
    )
    .await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&message("orcpt"))).await;
    let id = c.reply().await.queued_id();
    let rcpt = &server.envelope(id).recipients[0];
    assert_eq!(
        rcpt.notify,
        Notify {
            success: true,
            failure: true,
            delay: false,
            never: false
        }
    );
    // Envelope::Recipient::orcpt is documented as "DSN ORCPT as given, e.g. rfc822;x@y", and
    // a DSN's Original-Recipient field needs the address type (RFC 3461 5.2.1, 6.3).
    assert_eq!(rcpt.orcpt.as_deref(), Some("rfc822;x@sink.test"));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_pipelined_dialogue_in_one_write() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.send(
        "EHLO pipe.test\r\nMAIL FROM:<p@pipe.test>\r\nRCPT TO:<one@sink.test>\r\n\
         RCPT TO:<two@sink.test>\r\nDATA\r\n",
    )
    .await;
    let ehlo = c.reply().await;
    assert_eq!(ehlo.code, 250);
    assert!(ehlo.has_keyword("PIPELINING"), "{:?}", ehlo.lines);
    c.reply().await.assert(250, "2.1.0");
    c.reply().await.assert(250, "2.1.5");
    c.reply().await.assert(250, "2.1.5");
    c.reply().await.assert(354, "");
    // Content, the end, and the next transaction's commands, again in one write.
    let content = message("pipelined");
    let mut wire = dot_stuff(&content);
    wire.extend_from_slice(b"RSET\r\nNOOP\r\nQUIT\r\n");
    c.send(&wire).await;
    let id = c.reply().await.queued_id();
    let rest = c.replies_until_close().await;
    let codes: Vec<(u16, Option<&str>)> = rest.iter().map(|r| (r.code, r.status())).collect();
    assert_eq!(
        codes,
        [
            (250, Some("2.0.0")),
            (250, Some("2.0.0")),
            (221, Some("2.0.0"))
        ]
    );

    let env = server.envelope(id);
    assert_eq!(env.recipients.len(), 2);
    assert_eq!(env.source.helo, "pipe.test");
    prepended(&server.body(id), &content, false);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_commands_and_sequence_errors() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    // Before EHLO.
    c.expect("MAIL FROM:<a@b.test>", 503, "5.5.1").await;
    c.expect("NOOP", 250, "2.0.0").await;
    c.expect("FOOBAR baz", 500, "5.5.2").await;
    c.ehlo().await;
    c.expect("RCPT TO:<x@sink.test>", 503, "5.5.1").await;
    c.expect("DATA", 503, "5.5.1").await;
    let vrfy = c.expect("VRFY someone", 252, "").await;
    assert!(
        vrfy.status().is_some_and(|s| s.starts_with("2.")),
        "{:?}",
        vrfy.lines
    );
    let help = c.expect("HELP", 214, "").await;
    assert!(help.text().contains("EHLO"), "{:?}", help.lines);
    // Syntax errors.
    let bad_mail = c.cmd("MAIL FROM:not-an-address").await;
    assert_eq!(bad_mail.code, 501, "{:?}", bad_mail.lines);
    assert!(
        bad_mail.status().is_some_and(|s| s.starts_with("5.")),
        "{:?}",
        bad_mail.lines
    );
    let bad_ehlo = c.cmd("EHLO").await;
    assert_eq!(bad_ehlo.code, 501, "{:?}", bad_ehlo.lines);
    c.ehlo().await;
    // MAIL, then DATA without any recipient.
    c.expect("MAIL FROM:<a@b.test>", 250, "2.1.0").await;
    c.expect("MAIL FROM:<a@b.test>", 503, "5.5.1").await;
    let bad_rcpt = c.cmd("RCPT TO:<no-domain>").await;
    assert_eq!(bad_rcpt.code, 501, "{:?}", bad_rcpt.lines);
    let data = c.cmd("DATA").await;
    assert!(
        (data.code == 554 || data.code == 503) && data.status().is_some(),
        "DATA without RCPT: {:?}",
        data.lines
    );
    // RSET ends the transaction: RCPT needs a new MAIL.
    c.expect("MAIL FROM:<a@b.test>", 503, "5.5.1").await; // still inside: nested
    c.expect("RSET", 250, "2.0.0").await;
    c.expect("RCPT TO:<x@sink.test>", 503, "5.5.1").await;
    c.expect("MAIL FROM:<>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.expect("RSET", 250, "2.0.0").await;
    c.expect("DATA", 503, "5.5.1").await;
    c.expect("QUIT", 221, "2.0.0").await;
    assert!(c.replies_until_close().await.is_empty());
    server.assert_spool_empty();
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_domain_message_is_split_sharing_the_queue_id() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let content = message("split");
    let id = c
        .submit(
            "from@client.test",
            &["a@sink.test", "b@Other.TEST", "c@SINK.test"],
            &content,
        )
        .await;
    let envs = server.envelopes();
    assert_eq!(envs.len(), 2, "two destinations, two envelopes: {envs:#?}");
    assert_eq!(server.message_count(), 2);
    assert!(
        envs.iter().all(|e| e.queue_id == id),
        "all parts share the queue id"
    );
    assert!(
        envs.iter().any(|e| e.id == id),
        "the first part has id == queue_id"
    );
    assert_ne!(envs[0].id, envs[1].id);
    let mut by_dest: Vec<(String, Vec<String>)> = envs
        .iter()
        .map(|e| {
            (
                e.destination.clone(),
                e.recipients.iter().map(|r| r.address.clone()).collect(),
            )
        })
        .collect();
    by_dest.sort();
    assert_eq!(
        by_dest,
        [
            ("other.test".to_string(), vec!["b@Other.TEST".to_string()]),
            (
                "sink.test".to_string(),
                vec!["a@sink.test".to_string(), "c@SINK.test".to_string()]
            ),
        ]
    );
    let b0 = server.body(envs[0].id);
    let b1 = server.body(envs[1].id);
    assert_eq!(b0, b1, "every part carries the same body");
    prepended(&b0, &content, false);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_recipient_is_stored_once() {
    let server = TestServer::start(Options::default().limit("max_recipients", 2)).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<from@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<dup@sink.test>", 250, "2.1.5").await;
    c.expect("RCPT TO:<dup@sink.test>", 250, "2.1.5").await;
    c.expect("RCPT TO:<dup@SINK.TEST>", 250, "2.1.5").await;
    // Duplicates do not count against the limit of 2.
    c.expect("RCPT TO:<other@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&message("dup"))).await;
    let id = c.reply().await.queued_id();
    let env = server.envelope(id);
    let addrs: Vec<&str> = env.recipients.iter().map(|r| r.address.as_str()).collect();
    assert_eq!(addrs, ["dup@sink.test", "other@sink.test"]);
    assert_eq!(server.message_count(), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_transactions_on_one_connection() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    let mut ids = Vec::new();
    for i in 0..3 {
        let content = message(&format!("seq-{i}"));
        let id = c
            .submit("from@client.test", &["r@sink.test"], &content)
            .await;
        prepended(&server.body(id), &content, false);
        ids.push(id);
    }
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    assert_eq!(server.message_count(), 3);
    // An empty message is a message too.
    let id = c.submit("", &["r@sink.test"], b"").await;
    assert_eq!(server.envelope(id).sender, "", "null sender");
    prepended(&server.body(id), b"", false);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smtputf8_body_and_helo_parameters() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    // HELO (not EHLO): no MAIL parameters.
    c.expect("HELO old.client.test", 250, "").await;
    let r = c.cmd("MAIL FROM:<a@client.test> BODY=8BITMIME").await;
    assert_eq!(r.code / 100, 5, "parameters need EHLO: {:?}", r.lines);
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RSET", 250, "2.0.0").await;
    c.ehlo().await;
    // Non-ASCII addresses need SMTPUTF8.
    c.expect("MAIL FROM:<j\u{f6}rg@client.test>", 553, "5.6.7")
        .await;
    c.expect("MAIL FROM:<a@client.test> BODY=BINARYMIME", 555, "5.5.4")
        .await;
    c.expect(
        "MAIL FROM:<j\u{f6}rg@client.test> SMTPUTF8 BODY=8BITMIME",
        250,
        "2.1.0",
    )
    .await;
    c.expect("RCPT TO:<m\u{fc}ller@sink.test>", 250, "2.1.5")
        .await;
    c.expect("DATA", 354, "").await;
    let content = "Subject: gr\u{fc}\u{df}e\r\n\r\n\u{e9}t\u{e9}\r\n"
        .as_bytes()
        .to_vec();
    c.send(dot_stuff(&content)).await;
    let id = c.reply().await.queued_id();
    let env = server.envelope(id);
    assert!(env.smtputf8);
    assert_eq!(env.body_type, tern_queue::BodyType::EightBitMime);
    assert_eq!(env.sender, "j\u{f6}rg@client.test");
    assert_eq!(env.recipients[0].address, "m\u{fc}ller@sink.test");
    let body = server.body(id);
    let head = prepended(&body, &content, false);
    assert!(
        received_of(head).contains("for <m\u{fc}ller@sink.test>"),
        "{head}"
    );
    server.stop().await;
}
