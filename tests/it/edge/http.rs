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
