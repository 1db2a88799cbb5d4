//! The re-engagement lifecycle through the daemon: mail from a sender identity with a
//! win-back campaign reaches a dormant recipient as that campaign (paced, at most
//! `winback_sends` per series), an engagement makes them active again and lifts a `sunset`
//! suppression (never a complaint), a failed series ends in a sunset suppression that refuses
//! their mail; `GET /api/v1/recipients/{address}` shows state, prediction and history and
//! `DELETE` erases the profile but keeps the suppression. (The fleet's shared copy:
//! tests/it/cluster.rs.)

use crate::harness::*;
use serde_json::{json, Value};
use std::time::Duration;

const DAY_MS: u64 = 86_400_000;

fn options(winback_interval: &str) -> Options {
    Options::default()
        .sendtime("dormant_after", "\"30d\"")
        .sendtime("winback_sends", "2")
        .sendtime("winback_interval", format!("\"{winback_interval}\""))
        .extra(
            "[[sidecar.campaigns]]\nname = \"comeback\"\nsubject = \"We miss you\"\n\
             text = \"Come back, {{ recipient.address }}\"\nwinback_for = \"news@example.test\"\n",
        )
}

async fn events(server: &TestServer, events: Value) {
    let (status, body) = server
        .api("POST", "/api/v1/events", Some(&json!({ "events": events })))
        .await;
    assert_eq!(status, 200, "{body}");
}

/// Lapsed 89 days ago (dormant after 30), and one who engaged yesterday.
async fn audience(server: &TestServer) {
    let now = tern::clock::now_ms();
    events(
        server,
        json!([
            {"type": "send", "recipient": "lapsed@x.test", "time_ms": now - 90 * DAY_MS},
            {"type": "open", "recipient": "lapsed@x.test", "time_ms": now - 89 * DAY_MS},
            {"type": "send", "recipient": "lapsed@x.test", "time_ms": now - 60 * DAY_MS},
            {"type": "send", "recipient": "fresh@x.test", "time_ms": now - 2 * DAY_MS},
            {"type": "open", "recipient": "fresh@x.test", "time_ms": now - DAY_MS},
        ]),
    )
    .await;
}

/// Sends one plain message From the newsletter identity to `rcpts` over SMTP.
async fn newsletter(server: &TestServer, rcpts: &[&str]) {
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<bounces@example.test>", 250, "2.1.0")
        .await;
    for r in rcpts {
        c.expect(&format!("RCPT TO:<{r}>"), 250, "2.1.5").await;
    }
    c.expect("DATA", 354, "").await;
    c.send("From: News <News@Example.test>\r\nSubject: This week\r\n\r\nthe newsletter\r\n.\r\n")
        .await;
    c.reply().await.assert(250, "2.0.0");
}

/// Each queued recipient with the body their message carries.
fn queued(server: &TestServer) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = server
        .envelopes()
        .into_iter()
        .flat_map(|env| {
            let body = String::from_utf8_lossy(&server.body(env.id)).into_owned();
            env.recipients
                .iter()
                .map(|r| (r.address.clone(), body.clone()))
                .collect::<Vec<_>>()
        })
        .collect();
    out.sort();
    out
}

async fn recipient(server: &TestServer, address: &str) -> (u16, Value) {
    server
        .api("GET", &format!("/api/v1/recipients/{address}"), None)
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dormant_recipient_gets_the_winback_campaign_paced_and_engagement_reactivates() {
    let server = TestServer::start(options("1h")).await;
    audience(&server).await;
    let (_, before) = recipient(&server, "lapsed@x.test").await;
    assert_eq!(before["state"], "dormant", "{before}");

    newsletter(&server, &["lapsed@x.test", "fresh@x.test"]).await;
    let mail = queued(&server);
    assert_eq!(mail.len(), 2, "{mail:?}");
    let (fresh, lapsed) = (&mail[0].1, &mail[1].1);
    assert!(fresh.contains("the newsletter"), "{fresh}");
    assert!(
        lapsed.contains("Come back, lapsed@x.test") && lapsed.contains("Subject: We miss you"),
        "{lapsed}"
    );
    assert!(!lapsed.contains("the newsletter"), "{lapsed}");
    assert!(
        lapsed.contains("From: News <News@Example.test>"),
        "{lapsed}"
    );
    let (_, during) = recipient(&server, "lapsed@x.test").await;
    assert_eq!(during["state"], "win_back", "{during}");
    assert_eq!(during["winback"]["sends"], 1, "{during}");
    assert_eq!(during["winback"]["in_series"], true, "{during}");

    // The next send of the series is not due for an hour: this newsletter goes as it is.
    newsletter(&server, &["lapsed@x.test"]).await;
    let plain = queued(&server)
        .into_iter()
        .filter(|(r, body)| r == "lapsed@x.test" && body.contains("the newsletter"))
        .count();
    assert_eq!(plain, 1);
    let (_, still) = recipient(&server, "lapsed@x.test").await;
    assert_eq!(still["winback"]["sends"], 1, "{still}");

    // Another identity's mail never becomes the win-back campaign.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<shop@other.test>", 250, "2.1.0").await;
    c.expect("RCPT TO:<lapsed@x.test>", 250, "2.1.5").await;
    c.expect("DATA", 354, "").await;
    c.send("From: shop@other.test\r\nSubject: Sale\r\n\r\nthe sale\r\n.\r\n")
        .await;
    c.reply().await.assert(250, "2.0.0");
    assert_eq!(
        queued(&server)
            .iter()
            .filter(|(_, b)| b.contains("Come back"))
            .count(),
        1
    );

    // An open: active again, the series ended in a reactivation.
    events(
        &server,
        json!([{"type": "open", "recipient": "lapsed@x.test"}]),
    )
    .await;
    let (_, after) = recipient(&server, "lapsed@x.test").await;
    assert_eq!(after["state"], "active", "{after}");
    assert_eq!(after["winback"]["reactivated"], true, "{after}");
    assert_eq!(after["winback"]["in_series"], false, "{after}");
    assert_eq!(after["history"]["opens"], 2, "{after}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_series_is_sunset_and_engagement_lifts_only_a_sunset_suppression() {
    let server = TestServer::start(options("1s")).await;
    audience(&server).await;
    newsletter(&server, &["lapsed@x.test"]).await;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    newsletter(&server, &["lapsed@x.test"]).await;
    let winback = queued(&server)
        .iter()
        .filter(|(_, b)| b.contains("Come back"))
        .count();
    assert_eq!(winback, 2, "two series sends, an interval apart");
    // The series is spent; after its last interval a refit finds it failed.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = server.api("POST", "/api/v1/sendtime/refit", None).await;
    assert_eq!(status, 200);
    let (status, entry) = server
        .api("GET", "/api/v1/suppressions/lapsed@x.test", None)
        .await;
    assert_eq!(
        (status, entry["reason"].as_str()),
        (200, Some("sunset")),
        "{entry}"
    );
    let (_, state) = recipient(&server, "lapsed@x.test").await;
    assert_eq!(state["state"], "sunset", "{state}");
    assert_eq!(state["suppressed"], "sunset", "{state}");
    // Never mailed again while suppressed: refused at RCPT.
    let mut c = server.connect().await;
    c.ehlo().await;
    c.expect("MAIL FROM:<bounces@example.test>", 250, "2.1.0")
        .await;
    c.expect("RCPT TO:<lapsed@x.test>", 550, "5.7.1").await;
    drop(c);

    // A click (an old message's link) lifts the sunset entry; a complaint stays.
    let (status, body) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": "fresh@x.test", "reason": "complaint"})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    events(
        &server,
        json!([
            {"type": "click", "recipient": "lapsed@x.test"},
            {"type": "click", "recipient": "fresh@x.test"},
        ]),
    )
    .await;
    let (status, body) = server
        .api("GET", "/api/v1/suppressions/lapsed@x.test", None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, entry) = server
        .api("GET", "/api/v1/suppressions/fresh@x.test", None)
        .await;
    assert_eq!((status, entry["reason"].as_str()), (200, Some("complaint")));
    let (_, state) = recipient(&server, "lapsed@x.test").await;
    assert_eq!(state["state"], "active", "{state}");
    assert_eq!(state["history"]["clicks"], 1, "{state}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recipients_api_shows_state_and_history_and_delete_erases_all_but_the_suppression() {
    let server = TestServer::start(options("1h")).await;
    audience(&server).await;
    let now = tern::clock::now_ms();
    events(
        &server,
        json!([
            {"type": "click", "recipient": "fresh@x.test", "time_ms": now - 3_600_000},
            {"type": "open", "recipient": "fresh@x.test", "machine": true},
        ]),
    )
    .await;
    let (status, r) = recipient(&server, "Fresh@X.test").await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["address"], "fresh@x.test");
    assert_eq!(r["state"], "active", "{r}");
    let p = r["prediction"].as_f64().unwrap();
    assert!(p > 0.05 && p < 1.0, "{r}");
    let h = &r["history"];
    assert_eq!(
        (&h["sends"], &h["opens"], &h["clicks"], &h["machine_opens"]),
        (&json!(1), &json!(1), &json!(1), &json!(1)),
        "{r}"
    );
    assert_eq!(h["last_click_ms"], json!(now - 3_600_000), "{r}");
    assert_eq!(h["sends_since_engaged"], 0, "{r}");
    let (_, lapsed) = recipient(&server, "lapsed@x.test").await;
    assert!(
        lapsed["prediction"].as_f64().unwrap() < p,
        "{lapsed} vs {r}"
    );

    // Bad addresses are 400 naming the field.
    let (status, body) = server
        .api("DELETE", "/api/v1/recipients/not-an-address", None)
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().starts_with("address"),
        "{body}"
    );

    // Erase a suppressed recipient: the profile goes, the suppression stays.
    let (status, _) = server
        .api(
            "POST",
            "/api/v1/suppressions",
            Some(&json!({"address": "fresh@x.test", "reason": "manual"})),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = server
        .api("DELETE", "/api/v1/recipients/fresh@x.test", None)
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["profile_erased"], true, "{body}");
    assert_eq!(body["suppression_kept"], true, "{body}");
    assert_eq!(recipient(&server, "fresh@x.test").await.0, 404);
    assert!(server
        .daemon()
        .spool()
        .get_meta("sendtime/fresh@x.test")
        .unwrap()
        .is_none());
    let (status, _) = server
        .api("GET", "/api/v1/suppressions/fresh@x.test", None)
        .await;
    assert_eq!(status, 200, "the suppression is kept");
    let (status, body) = server
        .api("DELETE", "/api/v1/recipients/fresh@x.test", None)
        .await;
    assert_eq!(status, 404, "nothing left: {body}");
    // The other recipient is untouched.
    assert_eq!(recipient(&server, "lapsed@x.test").await.0, 200);
    server.stop().await;
}
