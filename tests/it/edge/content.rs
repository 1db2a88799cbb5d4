//! What a message may carry, whoever sends it: a header section that would make every later
//! header scan (DKIM, the stages, bounce parsing) expensive, and a mail loop. Both are refused
//! at the end of DATA (and by the inject API) before anything is spooled.

use serde_json::json;

use super::*;

/// `n` header fields of `size` bytes each, then a body.
fn headers(n: usize, size: usize, name: &str) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        let mut line = format!("{name}: {i} ");
        line.push_str(&"x".repeat(size.saturating_sub(line.len() + 2)));
        line.push_str("\r\n");
        out.extend_from_slice(line.as_bytes());
    }
    out.extend_from_slice(b"Subject: hi\r\n\r\nbody\r\n");
    out
}

/// A header section beyond `limits.max_header_size` (here 64 KiB, with the message size limit
/// far above it) gets `552 5.3.4` and nothing is spooled; one just under it is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_header_section_is_refused_with_552_and_nothing_spooled() {
    let server = TestServer::start(Options::default().limit("max_header_size", "\"64KiB\"")).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<b@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    // 2,000 lines of 100 bytes: 200 KB of header, well inside the 50 MiB message limit.
    c.send(dot_stuff(&headers(2000, 100, "X-Filler"))).await;
    c.reply().await.assert(552, "5.3.4");
    assert_eq!(server.message_count(), 0, "nothing spooled");
    assert_eq!(
        sample(
            &server,
            "tern_messages_rejected_total{reason=\"header_size\"}"
        )
        .await,
        1.0
    );
    // The session goes on, and a header under the limit is fine.
    c.submit(
        "a@client.test",
        &["b@sink.test"],
        &headers(500, 100, "X-Filler"),
    )
    .await;
    assert_eq!(server.message_count(), 1);

    // The inject API applies the same limit (413 naming the field).
    let raw = String::from_utf8(headers(2000, 100, "X-Filler")).unwrap();
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({"from": "a@client.test", "to": ["b@sink.test"], "raw": raw})),
        )
        .await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("raw: "),
        "{body}"
    );
    assert_eq!(server.message_count(), 1);
}

/// A message that has been around the loop: with the Received header tern adds it would
/// carry more than `limits.max_hops` (50), so it is refused with `554 5.4.6` instead of being
/// sent round again; 49 Received headers still go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_message_is_refused_with_554_instead_of_sent_round_again() {
    let server = TestServer::start(Options::default()).await;
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<a@client.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<b@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&headers(50, 60, "Received"))).await;
    c.reply().await.assert(554, "5.4.6");
    assert_eq!(server.message_count(), 0);
    assert_eq!(
        sample(&server, "tern_messages_rejected_total{reason=\"loop\"}").await,
        1.0
    );
    c.submit(
        "a@client.test",
        &["b@sink.test"],
        &headers(49, 60, "Received"),
    )
    .await;
    assert_eq!(server.message_count(), 1);
}

/// A suppression entry whose address or source a spreadsheet would run as a formula comes out
/// of the CSV export defused (a leading `'`), and the export imports back unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_formula_planted_in_the_suppression_list_is_defused_in_the_csv_export() {
    let server = TestServer::start(Options::default()).await;
    let planted = "=cmd|calc@x.test";
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": planted})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, csv) = crate::harness::http(
        server.admin(),
        "GET",
        "/api/v1/suppressions/export",
        Some(&server.admin_token()),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let line = csv
        .lines()
        .find(|l| l.contains("cmd|calc"))
        .unwrap_or_else(|| panic!("{csv}"));
    assert!(
        line.starts_with("\"'="),
        "the cell starts with a quote: {line}"
    );
    assert!(!line.starts_with('='), "{line}");
}
