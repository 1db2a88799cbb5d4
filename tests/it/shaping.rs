//! Traffic shaping on real time: source-IP pools (binding, EHLO name, the control header),
//! a provider's connection cap shared by several domains, and the shaping API.
//! Rates, warm-up and adaptive backoff run on the paused clock in tests/shaping_clock.rs.

use crate::harness::{Options, TestServer};
use crate::sink::{Sink, SinkBehaviour};
use serde_json::json;
use std::net::IpAddr;
use std::time::Duration;

const POOLS: &str = r#"
[[pools]]
name = "bulk"
senders = ["news.sender.test"]
[[pools.addresses]]
address = "127.0.0.3"
ehlo = "bulk3.tern.test"

[[pools]]
name = "main"
default = true
[[pools.addresses]]
address = "127.0.0.2"
ehlo = "main2.tern.test"
"#;

#[tokio::test]
async fn pools_bind_their_address_and_ehlo_name_and_the_pool_header_is_stripped() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .extra(POOLS),
    )
    .await;
    let mut client = server.connect().await;
    client.ehlo().await;
    // By header, by sender domain, and the default pool.
    client
        .submit(
            "a@sender.test",
            &["one@sink.test"],
            b"X-Tern-Pool: bulk\r\nSubject: by header\r\n\r\nhi\r\n",
        )
        .await;
    client
        .submit(
            "b@news.sender.test",
            &["two@sink.test"],
            b"Subject: by sender\r\n\r\nhi\r\n",
        )
        .await;
    client
        .submit(
            "c@sender.test",
            &["three@sink.test"],
            b"X-Tern-Pool: no-such-pool\r\nSubject: default\r\n\r\nhi\r\n",
        )
        .await;
    let got = sink.wait_for_messages(3, Duration::from_secs(20)).await;
    let find = |rcpt: &str| {
        got.iter()
            .find(|m| m.rcpt_addresses() == [rcpt])
            .unwrap_or_else(|| panic!("{rcpt} not delivered"))
    };
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    for (rcpt, addr, ehlo) in [
        ("one@sink.test", "127.0.0.3", "bulk3.tern.test"),
        ("two@sink.test", "127.0.0.3", "bulk3.tern.test"),
        ("three@sink.test", "127.0.0.2", "main2.tern.test"),
    ] {
        let m = find(rcpt);
        assert_eq!(m.client_ip, ip(addr), "{rcpt}");
        assert_eq!(m.helo, ehlo, "{rcpt}");
        let text = String::from_utf8_lossy(&m.data).to_ascii_lowercase();
        assert!(
            !text.contains("x-tern-pool"),
            "{rcpt}: control header leaked"
        );
    }
    // Pools do not share connections: two source addresses, two sessions at least.
    let ips: std::collections::BTreeSet<IpAddr> =
        sink.session_logs().iter().map(|s| s.client_ip).collect();
    assert_eq!(ips, [ip("127.0.0.2"), ip("127.0.0.3")].into());
    server.stop().await;
}

async fn inject_with_pool(
    server: &TestServer,
    from: &str,
    to: &str,
    pool: &str,
    raw: &str,
) -> (u16, serde_json::Value) {
    server
        .api(
            "POST",
            "/api/v1/inject",
            Some(&json!({"from": from, "to": [to], "pool": pool, "raw": raw})),
        )
        .await
}

#[tokio::test]
async fn the_inject_api_chooses_the_pool_ahead_of_the_header() {
    let sink = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sink.test", sink.addr)
            .extra(POOLS),
    )
    .await;
    // The field wins over the header (which is still stripped) and over the sender domain.
    let (status, answer) = inject_with_pool(
        &server,
        "a@news.sender.test",
        "api@sink.test",
        "main",
        "X-Tern-Pool: bulk\nSubject: by api\n\nhi\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = inject_with_pool(
        &server,
        "b@sender.test",
        "api2@sink.test",
        "bulk",
        "Subject: by api\n\nhi\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    // An unknown pool refuses the call, naming the field; nothing is queued.
    let (status, answer) = inject_with_pool(
        &server,
        "c@sender.test",
        "never@sink.test",
        "nope",
        "Subject: x\n\nhi\n",
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(
        error.starts_with("pool:") && error.contains("nope") && error.contains("bulk, main"),
        "{error}"
    );

    let got = sink.wait_for_messages(2, Duration::from_secs(20)).await;
    let ip = |s: &str| s.parse::<IpAddr>().unwrap();
    for (rcpt, addr, ehlo) in [
        ("api@sink.test", "127.0.0.2", "main2.tern.test"),
        ("api2@sink.test", "127.0.0.3", "bulk3.tern.test"),
    ] {
        let m = got
            .iter()
            .find(|m| m.rcpt_addresses() == [rcpt])
            .unwrap_or_else(|| panic!("{rcpt} not delivered"));
        assert_eq!(m.client_ip, ip(addr), "{rcpt}");
        assert_eq!(m.helo, ehlo, "{rcpt}");
        let text = String::from_utf8_lossy(&m.data).to_ascii_lowercase();
        assert!(
            !text.contains("x-tern-pool"),
            "{rcpt}: control header leaked"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(sink.messages().len(), 2, "the refused call queued nothing");
    server.stop().await;
}

#[tokio::test]
async fn a_providers_connection_cap_holds_across_its_domains() {
    let sink = Sink::start(SinkBehaviour::default().data_delay(Duration::from_millis(30))).await;
    let mut opts = Options::default().deliver();
    for d in ["a.test", "b.test", "c.test"] {
        opts = opts.route(d, sink.addr);
    }
    let server = TestServer::start(opts.extra(
        r#"
[[shaping.providers]]
name = "testprov"
domains = ["a.test", "b.test", "c.test"]
max_connections = 2
max_messages_per_connection = 5
"#,
    ))
    .await;
    let mut client = server.connect().await;
    client.ehlo().await;
    for i in 0..30 {
        let d = ["a.test", "b.test", "c.test"][i % 3];
        client
            .submit(
                "s@sender.test",
                &[&format!("r{i}@{d}")],
                b"Subject: cap\r\n\r\nx\r\n",
            )
            .await;
    }
    sink.wait_for_messages(30, Duration::from_secs(30)).await;
    assert_eq!(
        sink.max_concurrent(),
        2,
        "the cap (2) is used and never exceeded by three domains' workers"
    );
    // At most 5 messages per connection.
    let logs = sink.session_logs();
    for log in &logs {
        let mails = log
            .commands
            .iter()
            .filter(|c| c.line.starts_with("MAIL"))
            .count();
        assert!(mails <= 5, "{mails} messages on one connection");
    }
    assert!(
        logs.len() >= 6,
        "30 messages, 5 per connection: {}",
        logs.len()
    );

    let (status, body) = server.api("GET", "/api/v1/shaping/testprov", None).await;
    assert_eq!(status, 200, "{body}");
    let pair = &body["pairs"][0];
    assert_eq!(pair["bucket"], "testprov");
    assert_eq!(pair["provider"], true);
    assert_eq!(pair["max_connections"], 2);
    assert_eq!(pair["source"], "default");
    let (status, all) = server.api("GET", "/api/v1/shaping", None).await;
    assert_eq!(status, 200);
    assert!(all["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["bucket"] == "testprov"));
    let (status, missing) = server.api("GET", "/api/v1/shaping/nowhere", None).await;
    assert_eq!(status, 404);
    assert!(missing["error"].as_str().unwrap().contains("nowhere"));
    server.stop().await;
}
