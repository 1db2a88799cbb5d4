//! The admin listener (API, /metrics and the public tracking endpoints), tried as an
//! attacker would: slow request heads, connection floods, bodies too large to buffer.
//! Before, a client could hold a connection forever by never finishing its request head,
//! open as many as the process had file descriptors, and make an endpoint that reads its
//! body wait for (and buffer) whatever Content-Length it declared.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use super::{sample, T};
use crate::harness::*;

/// Reads until the server closes the connection (or `T` passes: a failure); returns what
/// it sent.
async fn until_closed(stream: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let read = tokio::time::timeout(T, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        read.is_ok(),
        "the server kept the connection open for {T:?}"
    );
    String::from_utf8_lossy(&got).into_owned()
}

/// One request (`head` without the empty line) with an optional body on a fresh
/// connection; the whole answer.
async fn exchange(server: &TestServer, head: &str, body: &[u8]) -> String {
    let mut stream = TcpStream::connect(server.admin()).await.unwrap();
    let mut request = format!("{head}\r\nHost: tern\r\nConnection: close\r\n\r\n").into_bytes();
    request.extend_from_slice(body);
    // The server may answer (and close) before it has read everything: that is the point.
    let _ = stream.write_all(&request).await;
    until_closed(&mut stream).await
}

/// A client that sends its request head a byte at a time, forever (slow loris): it is cut
/// off after `admin.header_timeout`, unanswered, and counted; other clients are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_loris_on_the_admin_listener_is_cut_off() {
    let server = TestServer::start(Options::default().admin("header_timeout", "\"1s\"")).await;
    let mut stream = TcpStream::connect(server.admin()).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: tern\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    let answer = loop {
        tokio::select! {
            read = stream.read(&mut buf) => break read.map(|n| buf[..n].to_vec()),
            _ = tokio::time::sleep(Duration::from_millis(200)) => {
                assert!(started.elapsed() < T, "the slow client was never cut off");
                // One more header byte: the head is never finished.
                if stream.write_all(b"X").await.is_err() {
                    break Ok(Vec::new());
                }
            }
        }
    };
    // Closed (or reset), with nothing answered.
    if let Ok(bytes) = answer {
        assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
    }
    assert_eq!(
        sample(
            &server,
            "tern_admin_refused_total{reason=\"header_timeout\"}"
        )
        .await,
        1.0
    );
    server.stop().await;
}

/// More connections than `admin.max_connections`: the extra one is answered 503 (naming the
/// key) and closed at once; a slot freed is a slot usable again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_flood_on_the_admin_listener_is_capped() {
    let server = TestServer::start(
        Options::default()
            .admin("max_connections", 4)
            .admin("header_timeout", "\"60s\""),
    )
    .await;
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(TcpStream::connect(server.admin()).await.unwrap());
    }
    // Accepted in order: the four above hold every slot.
    let mut extra = TcpStream::connect(server.admin()).await.unwrap();
    let answer = until_closed(&mut extra).await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("admin.max_connections"), "{answer}");

    drop(held.pop());
    // The server sees that close on its own time: retry until the slot is back.
    let deadline = Instant::now() + T;
    loop {
        let answer = exchange(&server, "GET /metrics HTTP/1.1", b"").await;
        if answer.starts_with("HTTP/1.1 200 ") {
            // The extra connection, and any retry that came before the slot was back.
            let refused: f64 = answer
                .lines()
                .find_map(|l| l.strip_prefix("tern_admin_refused_total{reason=\"connections\"} "))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0);
            assert!(refused >= 1.0, "{answer}");
            // Three held, and this one.
            assert!(answer.contains("\ntern_admin_connections 4\n"), "{answer}");
            break;
        }
        assert!(Instant::now() < deadline, "no slot came back: {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
    server.stop().await;
}

/// A client that pipelines requests and never reads the answers (so the server's writes
/// stall on a full socket buffer) is cut off after `admin.write_timeout`, counted, and its
/// slot goes to the next client. Before, hyper waited on the write forever and, with the
/// connection cap, one such client locked everybody out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_is_cut_off() {
    let server = TestServer::start(
        Options::default()
            .admin("max_connections", 1)
            .admin("write_timeout", "\"1s\"")
            .admin("header_timeout", "\"60s\""),
    )
    .await;
    // A small receive window, so the server's answers back up soon.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut reader_that_never_reads = socket.connect(server.admin()).await.unwrap();
    let one = "GET /metrics HTTP/1.1\r\nHost: tern\r\n\r\n";
    // Far more answer bytes (each /metrics is tens of KiB) than any socket buffers hold.
    let requests = one.repeat(2000);
    let _ = tokio::time::timeout(
        Duration::from_secs(2),
        reader_that_never_reads.write_all(requests.as_bytes()),
    )
    .await;

    // While it holds the only slot, others are turned away; once it is cut off, served.
    let started = Instant::now();
    let answer = loop {
        let answer = exchange(&server, "GET /metrics HTTP/1.1", b"").await;
        if answer.starts_with("HTTP/1.1 200 ") {
            break answer;
        }
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(
            started.elapsed() < T,
            "the client that never reads kept its slot"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        answer.contains("tern_admin_refused_total{reason=\"write_timeout\"} 1\n"),
        "{answer}"
    );
    drop(reader_that_never_reads);
    server.stop().await;
}

/// A body declared larger than its route allows is refused with 413 before a byte of it is
/// sent, whether or not the caller holds the token; one that grows past the limit without
/// declaring it is refused when it does; the inject route's limit follows the message size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_body_is_refused_before_it_is_read() {
    let server = TestServer::start(Options::default().admin("max_body_size", "\"64KiB\"")).await;
    let token = server.admin_token();
    let auth = format!("Authorization: Bearer {token}");

    // Declared: 1 GiB to the CSV import (with the token) and to a public route (without).
    for head in [
        format!(
            "POST /api/v1/suppressions/import HTTP/1.1\r\n{auth}\r\nContent-Length: 1073741824"
        ),
        "POST /t/o/anything HTTP/1.1\r\nContent-Length: 1073741824".to_owned(),
    ] {
        let answer = exchange(&server, &head, b"").await;
        assert!(answer.starts_with("HTTP/1.1 413 "), "{head}: {answer}");
        assert!(answer.contains("admin.max_body_size"), "{answer}");
    }
    // The inject route: its own limit, from limits.max_message_size (50 MiB by default).
    let answer = exchange(
        &server,
        &format!("POST /api/v1/inject HTTP/1.1\r\n{auth}\r\nContent-Length: 1073741824"),
        b"",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("limits.max_message_size"), "{answer}");
    assert_eq!(
        sample(&server, "tern_messages_rejected_total{reason=\"size\"}").await,
        1.0
    );

    // Undeclared (chunked): refused once past 64 KiB.
    let event = "{\"type\":\"open\",\"recipient\":\"a@x.test\"},";
    let mut json = String::from("{\"events\":[");
    while json.len() < 100 << 10 {
        json.push_str(event);
    }
    json.pop();
    json.push_str("]}");
    let mut chunked = format!("{:x}\r\n", json.len()).into_bytes();
    chunked.extend_from_slice(json.as_bytes());
    chunked.extend_from_slice(b"\r\n0\r\n\r\n");
    let answer = exchange(
        &server,
        &format!(
            "POST /api/v1/events HTTP/1.1\r\n{auth}\r\nContent-Type: application/json\r\n\
             Transfer-Encoding: chunked"
        ),
        &chunked,
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(answer.contains("admin.max_body_size"), "{answer}");

    // Within the limit: served as before.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/events",
            Some(&serde_json::json!({"events": [{"type": "open", "recipient": "a@x.test"}]})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        sample(&server, "tern_admin_refused_total{reason=\"body_size\"}").await,
        3.0
    );
    server.stop().await;
}

// ---------------------------------------------------------------------------------------------
// The public tracking endpoints

/// A tracking campaign (one link, one variant, so every send is variant `a`) whose signing
/// key tern creates in `keys`.
fn tracking(keys: &std::path::Path) -> Options {
    Options::default().extra(format!(
        "[sidecar.tracking]\nbase_url = \"http://t.tern.test\"\nsecret_file = {:?}\n\n\
         [sidecar.bandit]\nexploration = 0.0\nholdout = 0.0\n\n\
         [[sidecar.campaigns]]\nname = \"promo\"\nsubject = \"Promo\"\n\
         text = \"See https://shop.test/sale\\n\"\n\
         html = \"<html><body><a href=\\\"https://shop.test/sale\\\">Sale</a></body></html>\"\n\
         tracking = true\n\n\
         [[sidecar.campaigns.variants]]\nid = \"a\"\n",
        keys.join("tracking.key").display().to_string()
    ))
}

/// Sends one campaign message to `to` over the API; its open and click tokens.
async fn tracked(server: &TestServer, to: &str) -> (String, String) {
    let (status, answer) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&serde_json::json!({
                "from": "news@tern.test",
                "to": [to],
                "raw": "From: news@tern.test\nSubject: x\n\nx\n",
                "sidecar": {"campaign": "promo"},
            })),
        )
        .await;
    assert_eq!(status, 200, "{answer}");
    let id = answer["id"].as_str().unwrap().parse().unwrap();
    let body = server.body(id);
    let message = mail_parser::MessageParser::default().parse(&body).unwrap();
    let html = message.body_html(0).unwrap().into_owned();
    let token = |kind: &str| {
        html.split(&format!("http://t.tern.test/t/{kind}/"))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or_else(|| panic!("no {kind} link in {html}"))
            .to_owned()
    };
    (token("o"), token("c"))
}

/// `GET path` from the loopback address `from`, with `headers` (lines without CRLF); the
/// status code.
async fn get_from(server: &TestServer, from: &str, path: &str, headers: &[&str]) -> u16 {
    get_at(server.admin(), from, path, headers).await
}

async fn get_at(admin: std::net::SocketAddr, from: &str, path: &str, headers: &[&str]) -> u16 {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    let mut stream = socket.connect(admin).await.unwrap();
    let mut request = format!("GET {path} HTTP/1.1\r\nHost: t.tern.test\r\nConnection: close\r\n");
    for h in headers {
        request.push_str(h);
        request.push_str("\r\n");
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = until_closed(&mut stream).await;
    answer
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer: {answer:?}"))
}

const IPHONE: &str =
    "User-Agent: Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15";

/// (kind, machine) of each engagement recorded so far, in order.
fn engagements(server: &TestServer) -> Vec<(&'static str, bool)> {
    server
        .daemon()
        .sidecar()
        .recent_engagement()
        .iter()
        .map(|e| {
            let kind = match e.kind {
                tern::sidecar::EngagementKind::Open => "open",
                tern::sidecar::EngagementKind::Click => "click",
            };
            (kind, e.machine)
        })
        .collect()
}

/// A client that is not a configured proxy claims, in `X-Forwarded-For`, to be Apple's
/// prefetch proxy (17.0.0.0/8): the header is ignored and its human open counts as human.
/// Through the configured proxy the header is believed, but only the address the proxy
/// appended: what the client wrote in front of it is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_x_forwarded_for_from_an_untrusted_peer_is_ignored() {
    let keys = tempfile::tempdir().unwrap();
    let server =
        TestServer::start(tracking(keys.path()).admin("trusted_proxies", "[\"127.0.0.1\"]")).await;
    let (open, click) = tracked(&server, "ann@sink.test").await;

    // 127.0.0.2 is no proxy of ours (before, any loopback peer was believed).
    let forged = "X-Forwarded-For: 17.58.1.2";
    let status = get_from(
        &server,
        "127.0.0.2",
        &format!("/t/o/{open}"),
        &[IPHONE, forged],
    )
    .await;
    assert_eq!(status, 200);
    // The proxy at 127.0.0.1 got the request from Apple's network: a machine click.
    let status = get_from(
        &server,
        "127.0.0.1",
        &format!("/t/c/{click}"),
        &[IPHONE, forged],
    )
    .await;
    assert_eq!(status, 302);
    // The proxy got it from 198.51.100.7, which wrote an Apple address in front.
    let appended = "X-Forwarded-For: 17.58.1.2, 198.51.100.7";
    let status = get_from(
        &server,
        "127.0.0.1",
        &format!("/t/c/{click}"),
        &[IPHONE, appended],
    )
    .await;
    assert_eq!(status, 302);

    assert_eq!(
        engagements(&server),
        [("open", false), ("click", true), ("click", false)]
    );
    server.stop().await;
}

/// A recipient's (or a scanner's, or an attacker's) client fetching the same pixel and link
/// again and again: every fetch is served, but each (message, recipient, kind, human or
/// machine) counts once, for the bandit, the recent list, the metrics and the profile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_click_counts_once() {
    let keys = tempfile::tempdir().unwrap();
    let server = TestServer::start(tracking(keys.path())).await;
    let (open, click) = tracked(&server, "ann@sink.test").await;
    let prefetch = "User-Agent: Mozilla/5.0";
    for _ in 0..5 {
        let status = get_from(&server, "127.0.0.1", &format!("/t/c/{click}"), &[IPHONE]).await;
        assert_eq!(status, 302, "every replay is still redirected");
    }
    for headers in [[prefetch]; 3].iter().chain(&[[IPHONE]; 2]) {
        let status = get_from(&server, "127.0.0.1", &format!("/t/o/{open}"), headers).await;
        assert_eq!(status, 200, "every replay still gets the pixel");
    }
    assert_eq!(
        engagements(&server),
        [("click", false), ("open", true), ("open", false)]
    );
    for (labels, want) in [
        ("kind=\"click\",source=\"human\"", 1.0),
        ("kind=\"open\",source=\"machine\"", 1.0),
        ("kind=\"open\",source=\"human\"", 1.0),
    ] {
        let name = format!("tern_sidecar_engagements_total{{{labels}}}");
        assert_eq!(sample(&server, &name).await, want, "{name}");
    }
    assert_eq!(
        sample(&server, "tern_tracking_ignored_total{reason=\"replay\"}").await,
        7.0
    );
    let sidecar = server.daemon().sidecar().clone();
    sidecar.apply_bandit_batch().await;
    assert_eq!(sidecar.bandit_arms("promo")["a"].rewards, 1.0);
    drop(sidecar);

    // The profile, once every pending write is done (shutdown waits for them): one human
    // click and one human open learnt, one machine open counted.
    let server = server.restart(tracking(keys.path())).await;
    let (status, profile) = server
        .api("GET", "/api/v1/recipients/ann@sink.test", None)
        .await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(profile["machine_opens"], 1, "{profile}");
    let engaged = profile["engagements"].as_f64().unwrap();
    assert!((1.5..2.5).contains(&engaged), "{profile}");
    server.stop().await;
}

/// A token older than `sidecar.tracking.max_age` (a link in a years-old mail, or one
/// harvested and replayed later), or one signed before tokens carried their issue time:
/// 404, nothing recorded, no redirect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_tracking_token_records_nothing() {
    use tern::sidecar::tracking::Tracker;
    let keys = tempfile::tempdir().unwrap();
    let server = TestServer::start(tracking(keys.path())).await;
    let (open, click) = tracked(&server, "ann@sink.test").await;
    // The same key, as another node sharing it (or tern itself, long ago) would sign.
    let secret = std::fs::read_to_string(keys.path().join("tracking.key")).unwrap();
    let tracker = Tracker::new(
        "http://t.tern.test",
        secret.trim().as_bytes(),
        Duration::from_secs(90 * 86_400),
    );
    let aged = |token: &str| {
        let mut claims = tracker.verify(token).expect("tern signed it");
        claims.t -= 91 * 86_400;
        tracker.sign(&claims)
    };
    let legacy = |token: &str| {
        let mut claims = tracker.verify(token).expect("tern signed it");
        claims.t = 0;
        tracker.sign(&claims)
    };
    for path in [
        format!("/t/o/{}", aged(&open)),
        format!("/t/c/{}", aged(&click)),
        format!("/t/o/{}", legacy(&open)),
    ] {
        let status = get_from(&server, "127.0.0.1", &path, &[IPHONE]).await;
        assert_eq!(status, 404, "{path}");
    }
    assert!(engagements(&server).is_empty());
    assert_eq!(
        sample(&server, "tern_tracking_ignored_total{reason=\"expired\"}").await,
        3.0
    );
    // The token as sent, within its age: served and counted.
    let status = get_from(&server, "127.0.0.1", &format!("/t/o/{open}"), &[IPHONE]).await;
    assert_eq!(status, 200);
    assert_eq!(engagements(&server), [("open", false)]);
    server.stop().await;
}

/// A burst of valid hits for one recipient (ten messages opened at once): the profile is
/// read, changed and written once per batch, not once per hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_tracking_hits_is_written_in_batches() {
    let keys = tempfile::tempdir().unwrap();
    let server = TestServer::start(tracking(keys.path())).await;
    let mut opens = Vec::new();
    for _ in 0..10 {
        opens.push(tracked(&server, "ann@sink.test").await.0);
    }
    let before = server.spool().commit_stats().writes;
    let mut hits = tokio::task::JoinSet::new();
    for open in opens {
        let admin = server.admin();
        hits.spawn(
            async move { get_at(admin, "127.0.0.1", &format!("/t/o/{open}"), &[IPHONE]).await },
        );
    }
    while let Some(status) = hits.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    // Every hit reaches the profile...
    let deadline = Instant::now() + T;
    loop {
        let (_, profile) = server
            .api("GET", "/api/v1/recipients/ann@sink.test", None)
            .await;
        if profile["engagements"].as_f64().is_some_and(|e| e > 9.5) {
            break;
        }
        assert!(Instant::now() < deadline, "hits not recorded: {profile}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // ...in one write (two if the burst straddled a batch), where there were ten.
    let writes = server.spool().commit_stats().writes - before;
    assert!((1..=2).contains(&writes), "{writes} profile writes");
    server.stop().await;
}
