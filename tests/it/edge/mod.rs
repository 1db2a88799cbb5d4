//! The internet edge, tried as an attacker would: each test is named for the attack and
//! fails on tern before it held (issue 13). Clients outside the relay networks connect from
//! 127.0.0.2; everything stays on loopback.

mod content;
mod delivery;
mod disk;
mod feedback;
mod files;
mod http;
mod logs;
mod memory;
mod smtp;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpSocket;

use crate::harness::*;

pub const T: Duration = Duration::from_secs(20);

/// An SMTP client connected from 127.0.0.2: outside any relay network the tests configure
/// (they relay for 127.0.0.1/32 only).
pub async fn outsider(smtp: SocketAddr) -> Client {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let stream = socket.connect(smtp).await.unwrap();
    let mut c = Client::new(Box::new(stream));
    c.expect_greeting().await;
    c.ehlo().await;
    c
}

/// The header section of `message` (up to and including the empty line).
pub fn header_section(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => &message[..i + 4],
        None => message,
    }
}

/// A DSN (RFC 3464) to `to` saying `failed` is unknown (5.1.1), returning `original` (a header
/// section) as text/rfc822-headers, as Postfix sends one.
pub fn dsn_returning(to: &str, failed: &str, original: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "From: Mail Delivery System <MAILER-DAEMON@mx.test>\r\n\
         To: {to}\r\n\
         Subject: Undelivered Mail Returned to Sender\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status; boundary=\"b1\"\r\n\
         \r\n\
         --b1\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         Your message could not be delivered.\r\n\
         --b1\r\n\
         Content-Type: message/delivery-status\r\n\
         \r\n\
         Reporting-MTA: dns; mx.test\r\n\
         \r\n\
         Final-Recipient: rfc822; {failed}\r\n\
         Action: failed\r\n\
         Status: 5.1.1\r\n\
         Diagnostic-Code: smtp; 550 5.1.1 <{failed}>: Recipient address rejected: User unknown\r\n\
         \r\n\
         --b1\r\n\
         Content-Type: text/rfc822-headers\r\n\
         \r\n"
    )
    .into_bytes();
    out.extend_from_slice(header_section(original));
    out.extend_from_slice(b"--b1--\r\n");
    out
}

/// An ARF abuse report (RFC 5965) about `original` (a whole message), sent to `recipient`, as
/// a mailbox provider's feedback loop sends one.
pub fn arf_about(original: &[u8], recipient: &str) -> Vec<u8> {
    let mut out = format!(
        "From: Feedback Loop <fbl@isp.test>\r\n\
         To: fbl@sender.test\r\n\
         Subject: FW: complaint\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=feedback-report; boundary=\"p1\"\r\n\
         \r\n\
         --p1\r\n\
         Content-Type: text/plain\r\n\
         \r\n\
         This is an email abuse report.\r\n\
         --p1\r\n\
         Content-Type: message/feedback-report\r\n\
         \r\n\
         Feedback-Type: abuse\r\n\
         User-Agent: FBL/1.0\r\n\
         Version: 1\r\n\
         Original-Rcpt-To: <{recipient}>\r\n\
         \r\n\
         --p1\r\n\
         Content-Type: message/rfc822\r\n\
         \r\n"
    )
    .into_bytes();
    out.extend_from_slice(original);
    if !original.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--p1--\r\n");
    out
}

/// Waits until the bounce processor has taken every inbound record.
pub async fn wait_inbound_processed(server: &TestServer) {
    let deadline = Instant::now() + T;
    while !server
        .spool()
        .inbound_batch(1, 0)
        .unwrap()
        .records
        .is_empty()
    {
        assert!(Instant::now() < deadline, "inbound mail not processed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The suppression entry of `address`, if any (over the API).
pub async fn suppression(server: &TestServer, address: &str) -> Option<serde_json::Value> {
    let (status, body) = server
        .api("GET", &format!("/api/v1/suppressions/{address}"), None)
        .await;
    (status == 200).then_some(body)
}

/// Waits until `address` is on the suppression list and returns its entry.
pub async fn wait_suppressed(server: &TestServer, address: &str) -> serde_json::Value {
    let deadline = Instant::now() + T;
    loop {
        if let Some(entry) = suppression(server, address).await {
            return entry;
        }
        assert!(
            Instant::now() < deadline,
            "{address} not suppressed within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A sample of the admin listener's `/metrics`, 0 when absent.
pub async fn sample(server: &TestServer, name: &str) -> f64 {
    crate::metrics::scrape(server.admin())
        .await
        .get(name)
        .copied()
        .unwrap_or(0.0)
}

/// `report` (a bounce from the corpus, say) with the `X-Tern-Id` line of `delivered` (a
/// message as the sink received it) put first in its returned headers
/// (`text/rfc822-headers` or `message/rfc822` part), as the reporting MTA would have returned
/// them had the message been ours.
pub fn returning_id_of(report: &[u8], delivered: &[u8]) -> Vec<u8> {
    let id_line_end = delivered
        .windows(2)
        .position(|w| w == b"\r\n")
        .expect("a delivered message has lines")
        + 2;
    let id_line = &delivered[..id_line_end];
    assert!(id_line.starts_with(b"X-Tern-Id: "), "no X-Tern-Id first");
    let lower = report.to_ascii_lowercase();
    let part = [
        "content-type: text/rfc822-headers",
        "content-type: message/rfc822",
    ]
    .iter()
    .find_map(|p| lower.windows(p.len()).position(|w| w == p.as_bytes()))
    .expect("the report returns the original headers");
    let body = part
        + report[part..]
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("part headers end")
        + 4;
    let mut out = report[..body].to_vec();
    out.extend_from_slice(id_line);
    out.extend_from_slice(&report[body..]);
    out
}
