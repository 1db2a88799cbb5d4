//! One-click unsubscribe (RFC 8058) end to end: campaign mail through tern to a loopback
//! sink, the List-Unsubscribe URL read from the delivered message and POSTed over HTTP on
//! loopback, then the recipient suppressed for that list (API), the `unsubscribed` event at a
//! webhook receiver, and the next message of the list refused; dkimpy checks that the
//! signature covers (and over-signs) both headers. The `mailto:` form works through the
//! bounce domain's intake. Played as an attacker: an altered token unsubscribes nobody, a GET
//! (link scanners) never unsubscribes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::dkim::{dkimpy_available, dkimpy_verifies, keygen};
use crate::harness::*;
use crate::sink::{ReceivedMessage, Sink, SinkBehaviour};
use crate::suppression::{receiver, wait_events, SECRET};

const T: Duration = Duration::from_secs(20);
const BOUNCE: &str = "bounce.example.com";

fn write_secret(path: &std::path::Path, text: &str) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// One HTTP/1.1 request on a fresh connection; the status and the whole answer.
async fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: t.example.com\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(T, stream.read_to_end(&mut answer))
        .await
        .expect("answered in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, answer)
}

/// The unfolded `List-Unsubscribe` value of a delivered message.
fn list_unsubscribe(message: &ReceivedMessage) -> String {
    let text = String::from_utf8_lossy(&message.data).into_owned();
    let head = text.split("\r\n\r\n").next().unwrap().replace("\r\n ", " ");
    head.lines()
        .find_map(|l| l.strip_prefix("List-Unsubscribe: "))
        .unwrap_or_else(|| panic!("no List-Unsubscribe in {head}"))
        .to_owned()
}

/// The path of the https/http URI (`/u/TOKEN`) and the mailto token of a List-Unsubscribe.
fn uris(value: &str) -> (String, String) {
    let mut path = None;
    let mut mailto_token = None;
    for uri in value.split(',') {
        let uri = uri.trim().trim_start_matches('<').trim_end_matches('>');
        if let Some(rest) = uri.strip_prefix("http://t.example.com") {
            path = Some(rest.to_owned());
        } else if let Some(rest) = uri.strip_prefix(&format!(
            "mailto:unsubscribe@{BOUNCE}?subject=unsubscribe%20"
        )) {
            mailto_token = Some(rest.to_owned());
        }
    }
    (
        path.expect("an http URI"),
        mailto_token.expect("a mailto URI"),
    )
}

fn unsubscribed(events: &[Value], who: &str) -> usize {
    events
        .iter()
        .filter(|e| e["event"] == "unsubscribed" && e["recipient"] == who)
        .count()
}

fn newsletter(to: &str) -> Vec<u8> {
    format!(
        "From: news@example.com\r\nTo: {to}\r\nSubject: This week\r\n\
         Message-ID: <week1@example.com>\r\nX-Tern-Unsubscribe: one-click; list=news\r\n\
         \r\nHello.\r\n"
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_click_unsubscribe_from_the_delivered_message_suppresses_and_refuses_the_next() {
    let dir = tempfile::tempdir().unwrap();
    let (key, zone_line) = keygen(dir.path(), "s1", &["--algorithm", "ed25519"]);
    let sink = Sink::start(SinkBehaviour::default()).await;
    let (hook, posts, _hook_task) = receiver("127.0.0.1:0".parse().unwrap()).await;
    let hook_secret = dir.path().join("hook.secret");
    write_secret(&hook_secret, &format!("{SECRET}\n"));
    let server = TestServer::start(
        Options::default()
            .deliver()
            .relay(&["127.0.0.1/32"])
            .route("sink.test", sink.addr)
            .dkim(format!(
                "domain = \"example.com\"\nselector = \"s1\"\nkey = {:?}",
                key.display().to_string()
            ))
            .extra(format!(
                "[bounce]\ndomains = [\"{BOUNCE}\"]\n\n\
                 [sidecar.tracking]\nbase_url = \"http://t.example.com\"\nsecret_file = {:?}\n\n\
                 [[webhooks]]\nurl = \"http://{hook}/hook\"\nsecret_file = {:?}\ninterval = \"50ms\"\n",
                dir.path().join("tracking.key").display().to_string(),
                hook_secret.display().to_string(),
            )),
    )
    .await;

    // One message to two recipients: each gets a message with its own link.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.submit(
        "news@example.com",
        &["reader@sink.test", "other@sink.test"],
        &newsletter("list@example.com"),
    )
    .await;
    let got = sink.wait_for_messages(2, T).await;
    let for_rcpt = |who: &str| {
        got.iter()
            .find(|m| m.rcpts.len() == 1 && m.rcpts[0].address == who)
            .unwrap_or_else(|| panic!("no message for {who} alone"))
            .clone()
    };
    let (reader, other) = (for_rcpt("reader@sink.test"), for_rcpt("other@sink.test"));
    let text = String::from_utf8_lossy(&reader.data).into_owned();
    assert!(
        !text.to_ascii_lowercase().contains("x-tern-unsubscribe"),
        "{text}"
    );
    assert!(
        text.contains("\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"),
        "{text}"
    );
    let (path, _) = uris(&list_unsubscribe(&reader));
    let (other_path, other_mailto) = uris(&list_unsubscribe(&other));
    assert_ne!(path, other_path, "each recipient has a token of its own");
    // Both headers signed, and over-signed (named once more than they occur).
    let head = text.split("\r\n\r\n").next().unwrap().replace("\r\n", "");
    let h = head
        .split("DKIM-Signature:")
        .nth(1)
        .and_then(|s| s.split(';').find_map(|t| t.trim().strip_prefix("h=")))
        .expect("a DKIM-Signature with h=")
        .to_ascii_lowercase();
    let names: Vec<&str> = h.split(':').map(str::trim).collect();
    for name in ["list-unsubscribe", "list-unsubscribe-post"] {
        assert_eq!(names.iter().filter(|n| **n == name).count(), 2, "{h}");
    }
    if dkimpy_available() {
        assert!(
            dkimpy_verifies(dir.path(), &zone_line, &reader.data),
            "{text}"
        );
    }

    // A scanner following the link (GET) gets a page with a button, and unsubscribes nobody.
    let (status, page) = http(server.admin(), "GET", &path, "").await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("method=\"post\""), "{page}");
    assert!(
        page.contains("name=\"List-Unsubscribe\" value=\"One-Click\""),
        "{page}"
    );
    // An altered token (another recipient in the claims) is a 404 and changes nothing.
    let token = path.strip_prefix("/u/").unwrap();
    let mut altered = token.to_owned().into_bytes();
    altered[5] ^= 0x01;
    let altered = format!("/u/{}", String::from_utf8(altered).unwrap());
    let (status, _) = http(
        server.admin(),
        "POST",
        &altered,
        "List-Unsubscribe=One-Click",
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = server
        .api(
            "GET",
            "/api/v1/suppressions/reader@sink.test?scope=news",
            None,
        )
        .await;
    assert_eq!(status, 404, "not suppressed by a GET or an altered token");

    // The one-click POST, as a mailbox provider sends it.
    let started = Instant::now();
    let (status, answer) = http(server.admin(), "POST", &path, "List-Unsubscribe=One-Click").await;
    assert_eq!(status, 200, "{answer}");
    assert!(
        !answer.to_ascii_lowercase().contains("set-cookie"),
        "{answer}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    let (status, entry) = server
        .api(
            "GET",
            "/api/v1/suppressions/reader@sink.test?scope=news",
            None,
        )
        .await;
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["reason"], "unsubscribe", "{entry}");
    assert_eq!(entry["scope"], "news", "{entry}");
    // Scoped: receipts (mail of no list) still go.
    let (status, _) = server
        .api("GET", "/api/v1/suppressions/reader@sink.test", None)
        .await;
    assert_eq!(status, 404);
    wait_events(&posts, "unsubscribed event", |e| {
        unsubscribed(e, "reader@sink.test") == 1
    })
    .await;
    // Idempotent: again 200, no second entry or event.
    let (status, _) = http(server.admin(), "POST", &path, "List-Unsubscribe=One-Click").await;
    assert_eq!(status, 200);
    let (status, body) = http(server.admin(), "POST", &path, "anything=else").await;
    assert_eq!(status, 400, "{body}");

    // The next message of the list: refused at the end of DATA (SMTP) and 422 (API).
    c.expect("MAIL FROM:<news@example.com>", 250, "2.1.0").await;
    c.expect("RCPT TO:<reader@sink.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send(dot_stuff(&newsletter("reader@sink.test"))).await;
    let refused = c.reply().await;
    assert_eq!(refused.code, 550, "{:?}", refused.lines);
    assert_eq!(refused.status(), Some("5.7.1"), "{:?}", refused.lines);
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({
                "from": "news@example.com",
                "to": ["reader@sink.test"],
                "unsubscribe": "one-click; list=news",
                "raw": "From: news@example.com\r\nSubject: again\r\n\r\nHi\r\n",
            })),
        )
        .await;
    assert_eq!(status, 422, "{body}");
    assert!(body.to_string().contains("reader@sink.test"), "{body}");
    // A receipt to the same recipient is delivered.
    c.submit(
        "news@example.com",
        &["reader@sink.test"],
        b"From: news@example.com\r\nSubject: your receipt\r\n\r\nThanks.\r\n",
    )
    .await;
    let got = sink.wait_for_messages(3, T).await;
    assert!(String::from_utf8_lossy(&got[2].data).contains("your receipt"));

    // The mailto form, through the bounce domain's intake, from anyone.
    let mut outsider = crate::edge::outsider(server.smtp).await;
    outsider
        .submit(
            "other@sink.test",
            &[&format!("unsubscribe@{BOUNCE}")],
            format!("From: other@sink.test\r\nSubject: unsubscribe {other_mailto}\r\n\r\n\r\n")
                .as_bytes(),
        )
        .await;
    let deadline = Instant::now() + T;
    loop {
        let (status, entry) = server
            .api(
                "GET",
                "/api/v1/suppressions/other@sink.test?scope=news",
                None,
            )
            .await;
        if status == 200 {
            assert_eq!(entry["reason"], "unsubscribe", "{entry}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mailto unsubscribe did nothing"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let events = wait_events(&posts, "the mailto event", |e| {
        unsubscribed(e, "other@sink.test") == 1
    })
    .await;
    assert_eq!(unsubscribed(&events, "reader@sink.test"), 1, "{events:?}");
    server.stop().await;
}
