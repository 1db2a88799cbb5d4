//! The SMTP listener and its sessions, attacked: clients that hold connections (never read,
//! never leave, trickle data), floods (connections, password guesses, bounce-domain mail)
//! and many clients sending at once. Clients outside the relay networks connect from
//! 127.0.0.2 and 127.0.0.3; 127.0.0.1 is the relay network.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream};

use super::*;

const BOUNCE: &str = "bounce.example.com";

/// Relays for 127.0.0.1 only, with `limits` set.
fn options(limits: &[(&str, &str)]) -> Options {
    limits
        .iter()
        .fold(Options::default().relay(&["127.0.0.1/32"]), |o, (k, v)| {
            o.limit(k, v)
        })
}

/// A TCP connection from `ip` (a 127.0.0.0/8 address), nothing read yet.
async fn tcp_from(ip: &str, smtp: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{ip}:0").parse().unwrap()).unwrap();
    tokio::time::timeout(T, socket.connect(smtp))
        .await
        .expect("connect in time")
        .unwrap()
}

/// An SMTP client from `ip`, greeting and EHLO done.
async fn client_from(ip: &str, smtp: SocketAddr) -> Client {
    let mut c = Client::new(Box::new(tcp_from(ip, smtp).await));
    c.expect_greeting().await;
    c.ehlo().await;
    c
}

/// Waits until the metric `name` is `want` (a gauge moved by sessions ending, say).
async fn wait_sample(server: &TestServer, name: &str, want: f64) {
    let deadline = Instant::now() + T;
    loop {
        let got = sample(server, name).await;
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{name} is {got}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the bytes sessions hold for messages in progress are `want` (the server has
/// read what was sent, or given it back), checking every sample against the budget.
async fn inflight_reaches(server: &TestServer, want: f64, budget: f64) {
    let deadline = Instant::now() + T;
    loop {
        let now = sample(server, "tern_smtp_inflight_bytes").await;
        assert!(
            now <= budget,
            "{now} bytes buffered, over the budget {budget}"
        );
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{now} bytes buffered, not {want}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Content of exactly `len` bytes: a header, then CRLF lines of at most 100 bytes.
fn content(len: usize) -> Vec<u8> {
    let mut out = b"Subject: big\r\n\r\n".to_vec();
    while out.len() < len {
        let line = (len - out.len()).min(100) - 2;
        out.extend(std::iter::repeat_n(b'x', line));
        out.extend_from_slice(b"\r\n");
    }
    assert_eq!(out.len(), len);
    out
}

/// Issue 13: the server wrote replies with no time limit, so a client that sends commands
/// and never reads the replies held its session (and a connection slot) forever once the
/// socket buffers were full. Now a write waits at most `command_timeout`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_within_command_timeout() {
    let server = TestServer::start(options(&[("command_timeout", "\"1s\"")])).await;
    let socket = TcpSocket::new_v4().unwrap();
    // A small receive window, so the server's replies back up soon.
    socket.set_recv_buffer_size(4096).unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let mut stream = socket.connect(server.smtp).await.unwrap();
    // EHLO: about 20 bytes of replies per byte sent; none is ever read.
    let burst = "EHLO flood.test\r\n".repeat(500);
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        while stream.write_all(burst.as_bytes()).await.is_ok() {
            sent += burst.len();
        }
        sent
    });
    // The writer blocks once both directions are full, and fails when the server drops it.
    let sent = tokio::time::timeout(T, writer)
        .await
        .expect("the server dropped a client that never reads")
        .unwrap();
    assert!(sent > 0);
    wait_sample(&server, "tern_smtp_sessions", 0.0).await;
    assert_eq!(
        sample(
            &server,
            "tern_smtp_disconnects_total{reason=\"write_timeout\"}"
        )
        .await,
        1.0
    );
    // Everyone else is served as before.
    let mut c = client_from("127.0.0.3", server.smtp).await;
    c.expect("NOOP", 250, "2.0.0").await;
    server.stop().await;
}

/// Issue 13: a session had no limit on its length; a client answering within
/// `command_timeout` could keep it (and its slot) for ever. Now it ends after
/// `session_timeout` with 421 4.4.2, however busy it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_kept_alive_past_session_timeout_gets_421() {
    let server = TestServer::start(options(&[
        ("session_timeout", "\"2s\""),
        ("command_timeout", "\"30s\""),
    ]))
    .await;
    let start = Instant::now();
    let mut c = client_from("127.0.0.2", server.smtp).await;
    let mut noops = 0;
    let bye = loop {
        // A NOOP every 100 ms: never idle for long.
        match tokio::time::timeout(Duration::from_millis(100), c.try_reply()).await {
            Err(_) => {
                let r = c.cmd("NOOP").await;
                if r.code != 250 {
                    break r;
                }
                noops += 1;
            }
            Ok(Ok(Some(r))) => break r,
            Ok(other) => panic!("connection ended without a reply: {other:?}"),
        }
        assert!(start.elapsed() < T, "the session outlived session_timeout");
    };
    bye.assert(421, "4.4.2");
    assert!(
        start.elapsed() >= Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    assert!(noops > 5, "the client kept the session busy: {noops} NOOPs");
    assert!(c.replies_until_close().await.is_empty());
    assert_eq!(
        sample(
            &server,
            "tern_smtp_disconnects_total{reason=\"session_timeout\"}"
        )
        .await,
        1.0
    );
    server.stop().await;
}

/// Issue 13: message content had only a timeout between two reads (`data_timeout`, 10
/// minutes), so a client sending a byte every few minutes held a session for days. Now a
/// client under `min_data_rate` over a window is dropped, and nothing it sent is spooled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trickling_data_below_the_minimum_rate_is_dropped_and_nothing_is_spooled() {
    let server = TestServer::start(options(&[
        ("min_data_rate", "1000"),
        ("min_data_rate_window", "\"1s\""),
    ]))
    .await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send("Subject: slow\r\n\r\n").await;
    let start = Instant::now();
    // 10 bytes every 100 ms: 100 bytes per second, a tenth of the minimum.
    let bye = loop {
        if c.try_send(b"01234567\r\n").await.is_err() {
            break c.reply().await;
        }
        match tokio::time::timeout(Duration::from_millis(100), c.try_reply()).await {
            Err(_) => {}
            Ok(Ok(Some(r))) => break r,
            Ok(other) => panic!("connection ended without a reply: {other:?}"),
        }
        assert!(start.elapsed() < T, "the slow client was never dropped");
    };
    bye.assert(421, "4.4.2");
    assert!(bye.lines[0].contains("rate"), "{:?}", bye.lines);
    assert!(c.replies_until_close().await.is_empty());
    server.assert_spool_empty();
    assert_eq!(
        sample(&server, "tern_smtp_disconnects_total{reason=\"too_slow\"}").await,
        1.0
    );
    // A client at full speed is not affected, even over several windows' worth of data.
    let mut c = server.connect().await;
    c.ehlo().await;
    let id = c
        .submit("a@client.test", &["x@sink.test"], &content(200_000))
        .await;
    assert_eq!(server.envelope(id).recipients.len(), 1);
    server.stop().await;
}

/// Issue 13: nothing limited how fast one client opened connections; Postfix's anvil does.
/// Now a client outside the relay networks gets 421 4.7.0 at the door over
/// `max_connection_rate_per_ip`; other clients and the relay networks are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_flood_from_one_client_gets_421() {
    let server = TestServer::start(options(&[("max_connection_rate_per_ip", "\"5/1m\"")])).await;
    for _ in 0..5 {
        let mut c = client_from("127.0.0.2", server.smtp).await;
        c.expect("QUIT", 221, "2.0.0").await;
    }
    let mut refused = Client::new(Box::new(tcp_from("127.0.0.2", server.smtp).await));
    let replies = refused.replies_until_close().await;
    assert_eq!(
        replies.len(),
        1,
        "one reply, then the door closes: {replies:?}"
    );
    replies[0].assert(421, "4.7.0");
    assert!(replies[0].lines[0].contains(HOST), "{:?}", replies[0].lines);
    // Another client is its own count.
    let mut other = client_from("127.0.0.3", server.smtp).await;
    other.expect("NOOP", 250, "2.0.0").await;
    // The relay network (upstream applications) is exempt.
    for _ in 0..10 {
        let mut c = client_from("127.0.0.1", server.smtp).await;
        c.expect("QUIT", 221, "2.0.0").await;
    }
    assert_eq!(
        sample(
            &server,
            "tern_messages_rejected_total{reason=\"connection_rate\"}"
        )
        .await,
        1.0
    );
    server.stop().await;
}

/// Issue 13: AUTH answered every guess at once and forever, and each guess ran argon2 on a
/// blocking thread. Now failures of a client and of a user name are answered ever slower,
/// and past `max_auth_failures` refused with 454 4.7.0 (without checking the password) for
/// `auth_lockout`, even with the right password and from another address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_guessing_is_slowed_then_refused() {
    let server = TestServer::start(
        options(&[
            ("max_auth_failures", "3"),
            ("auth_failure_delay", "\"200ms\""),
            ("auth_lockout", "\"1h\""),
        ])
        .tls()
        .auth(),
    )
    .await;
    let tls_client = |ip: &'static str| {
        let smtp = server.smtp;
        async move {
            let c = client_from(ip, smtp).await;
            let mut c = c.starttls().await;
            c.ehlo().await;
            c
        }
    };
    let mut guesser = tls_client("127.0.0.2").await;
    for (guess, delay_ms) in [("a", 200), ("b", 400), ("c", 800)] {
        let start = Instant::now();
        guesser.auth_plain(USER, guess).await.assert(535, "5.7.8");
        assert!(
            start.elapsed() >= Duration::from_millis(delay_ms),
            "failure answered after {:?}, before {delay_ms} ms",
            start.elapsed()
        );
    }
    // Locked: even the right password is refused, at once.
    guesser
        .auth_plain(USER, PASSWORD)
        .await
        .assert(454, "4.7.0");
    guesser.expect("AUTH LOGIN", 454, "4.7.0").await;
    // The user is locked from anywhere: guesses spread over many addresses get no further.
    let mut elsewhere = tls_client("127.0.0.3").await;
    elsewhere
        .auth_plain(USER, PASSWORD)
        .await
        .assert(454, "4.7.0");
    // That address itself is not locked: another user name is checked (and wrong).
    elsewhere
        .auth_plain("nobody", "x")
        .await
        .assert(535, "5.7.8");
    assert_eq!(
        sample(
            &server,
            "tern_messages_rejected_total{reason=\"auth_throttled\"}"
        )
        .await,
        3.0
    );
    assert_eq!(
        sample(
            &server,
            "tern_messages_rejected_total{reason=\"auth_failed\"}"
        )
        .await,
        4.0
    );
    server.stop().await;
}

/// Issue 13: every session buffered its message in memory without a global limit, so many
/// clients sending large messages at once grew memory until the kernel killed the daemon
/// (with everything in it). Now the buffers of all sessions stay within
/// `max_inflight_bytes`: when it is spent, DATA and BDAT get 452 4.3.1, a message that would
/// grow past it is refused with 452 4.3.1, and the messages that fit are accepted whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_sessions_sending_data_at_once_get_452_not_oom() {
    const BUDGET: f64 = 131_072.0;
    let server = TestServer::start(options(&[
        ("max_message_size", "\"128KiB\""),
        ("max_inflight_bytes", "\"128KiB\""),
    ]))
    .await;
    let ready = || async {
        let mut c = server.connect().await;
        c.ehlo().await;
        c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
        c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
        c
    };
    // A buffer doubles as it grows, within the budget: A's 100,000 bytes hold all 128 KiB.
    let big = content(100_000);
    let mut a = ready().await;
    a.expect("DATA", 354, "").await;
    a.send(&big).await;
    inflight_reaches(&server, BUDGET, BUDGET).await;
    // The budget is spent: DATA and BDAT are refused, the BDAT chunk is read and dropped.
    let mut b = ready().await;
    b.expect("DATA", 452, "4.3.1").await;
    b.send(b"BDAT 5000\r\n").await;
    b.send(vec![b'y'; 5000]).await;
    b.reply().await.assert(452, "4.3.1");
    b.expect("NOOP", 250, "2.0.0").await;
    // A's message was within the budget and is accepted whole.
    a.send(b".\r\n").await;
    let a_id = a.reply().await.queued_id();
    prepended(&server.body(a_id), &big, false);
    inflight_reaches(&server, 0.0, BUDGET).await;

    // Two at once: C and D hold 64 KiB each; D's next bytes find no room and D's message is
    // refused, C's is accepted.
    let (mut c, mut d) = (ready().await, ready().await);
    let half = content(60_000);
    c.expect("DATA", 354, "").await;
    d.expect("DATA", 354, "").await;
    c.send(&half).await;
    d.send(&half).await;
    inflight_reaches(&server, BUDGET, BUDGET).await;
    d.send(content(10_000)).await;
    d.send(b".\r\n").await;
    d.reply().await.assert(452, "4.3.1");
    c.send(b".\r\n").await;
    let c_id = c.reply().await.queued_id();
    prepended(&server.body(c_id), &half, false);
    assert_eq!(server.envelopes().len(), 2, "A and C only");

    // Memory given back: B's transaction goes through now.
    inflight_reaches(&server, 0.0, BUDGET).await;
    let mut b = ready().await;
    b.expect("DATA", 354, "").await;
    b.send(dot_stuff(&message("b"))).await;
    b.reply().await.queued_id();
    assert_eq!(
        sample(
            &server,
            "tern_messages_rejected_total{reason=\"inflight_bytes\"}"
        )
        .await,
        3.0
    );
    server.stop().await;
}

/// Issue 13: between BDAT chunks the session waited for commands, each within
/// `command_timeout`, so a client sending NOOP now and then kept its half-received message
/// in memory for ever. Now a BDAT transaction without a chunk for `data_timeout` ends the
/// session with 421 4.4.2 and its buffer is given back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_bdat_transaction_loses_its_buffer_after_data_timeout() {
    let server = TestServer::start(options(&[
        ("data_timeout", "\"1s\""),
        ("command_timeout", "\"30s\""),
    ]))
    .await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<x@sink.test>", 250, "2.1.5").await;
    c.send(b"BDAT 20000\r\n").await;
    c.send(content(20_000)).await;
    c.reply().await.assert(250, "2.0.0");
    assert!(sample(&server, "tern_smtp_inflight_bytes").await >= 20_000.0);
    let start = Instant::now();
    // A NOOP every 100 ms: the session is busy, the transaction idle.
    let bye = loop {
        match tokio::time::timeout(Duration::from_millis(100), c.try_reply()).await {
            Err(_) => {
                let r = c.cmd("NOOP").await;
                if r.code != 250 {
                    break r;
                }
            }
            Ok(Ok(Some(r))) => break r,
            Ok(other) => panic!("connection ended without a reply: {other:?}"),
        }
        assert!(start.elapsed() < T, "the idle transaction was never ended");
    };
    bye.assert(421, "4.4.2");
    assert!(c.replies_until_close().await.is_empty());
    wait_sample(&server, "tern_smtp_inflight_bytes", 0.0).await;
    server.assert_spool_empty();
    assert_eq!(
        sample(
            &server,
            "tern_smtp_disconnects_total{reason=\"data_timeout\"}"
        )
        .await,
        1.0
    );
    server.stop().await;
}

/// Issue 13: the bounce domains take mail from anyone, with no limit: one client could fill
/// the spool and keep the bounce processor busy. Now messages to the bounce domains are
/// limited per client (`max_bounce_rate_per_ip`, counted once per message), answered
/// 450 4.7.1 at RCPT; other clients and the relay networks are not affected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounce_domain_flood_from_one_client_gets_450() {
    let server = TestServer::start(
        options(&[("max_bounce_rate_per_ip", "\"3/1m\"")])
            .extra(format!("[bounce]\ndomains = [\"{BOUNCE}\"]\n")),
    )
    .await;
    let (one, two) = (format!("a@{BOUNCE}"), format!("b@{BOUNCE}"));
    let report = message("report");
    let mut flood = client_from("127.0.0.2", server.smtp).await;
    for _ in 0..3 {
        // Two bounce addresses, one message: counted once.
        flood.submit("", &[&one, &two], &report).await;
    }
    flood.expect("MAIL FROM:<>", 250, "2.1.0").await;
    flood
        .expect(&format!("RCPT TO:<{one}>"), 450, "4.7.1")
        .await;
    flood.expect("RSET", 250, "2.0.0").await;
    let mut other = client_from("127.0.0.3", server.smtp).await;
    other.submit("", &[&one], &report).await;
    let mut relay = client_from("127.0.0.1", server.smtp).await;
    for _ in 0..5 {
        relay.submit("", &[&one], &report).await;
    }
    assert_eq!(
        sample(
            &server,
            "tern_messages_rejected_total{reason=\"bounce_rate\"}"
        )
        .await,
        1.0
    );
    server.stop().await;
}
