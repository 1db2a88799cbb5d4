//! MX delivery end to end: the real resolver asks the loopback DNS server, and sinks listen
//! on port 25 of distinct loopback addresses (127.0.8.x, unique per test so tests run in
//! parallel). The sender's domain has a static route to a bounce sink, where DSNs arrive.

use std::net::SocketAddr;

use crate::delivery::*;
use crate::dns_server::{DnsServer, Zone};
use crate::harness::*;
use crate::sink::{Sink, SinkBehaviour};
use hickory_resolver::proto::rr::RecordType;
use tern::clock::now_ms as scheduler_now_ms;

struct MxRelay {
    server: TestServer,
    bounces: Sink,
    _dns: DnsServer,
}

async fn mx_relay(zone: Zone) -> MxRelay {
    let dns = DnsServer::start(zone).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sender.test", bounces.addr)
            .delivery("nameservers", format!("[\"{}\"]", dns.addr))
            // The MX sinks live on loopback.
            .delivery("allow_local_mx", true),
    )
    .await;
    MxRelay {
        server,
        bounces,
        _dns: dns,
    }
}

/// A sink on `ip`:25.
async fn mx_sink(ip: &str, behaviour: SinkBehaviour) -> Sink {
    let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
    Sink::start_at(addr, behaviour).await
}

async fn send_to(r: &MxRelay, rcpt: &str, marker: &str) -> Vec<u8> {
    let content = message(marker);
    send(
        &r.server,
        &format!("<{SENDER}>"),
        &[&format!("<{rcpt}>")],
        &content,
    )
    .await;
    content
}

/// The one DSN of the test, after the spool emptied.
async fn only_dsn(r: &MxRelay) -> Dsn {
    let dsns = r.bounces.wait_for_messages(1, T).await;
    wait_spool_empty(&r.server).await;
    assert_eq!(r.bounces.messages().len(), 1, "one DSN");
    parse_dsn(&dsns[0])
}

#[tokio::test]
async fn lowest_preference_mx_gets_the_mail() {
    let zone = Zone::new()
        .mx("pref.test", 20, "mx2.pref.test")
        .mx("pref.test", 10, "mx1.pref.test")
        .a("mx1.pref.test", "127.0.8.1")
        .a("mx2.pref.test", "127.0.8.2");
    let first = mx_sink("127.0.8.1", SinkBehaviour::default()).await;
    let second = mx_sink("127.0.8.2", SinkBehaviour::default()).await;
    let r = mx_relay(zone).await;
    let content = send_to(&r, "u@pref.test", "mx-pref").await;

    let msgs = first.wait_for_messages(1, T).await;
    wait_spool_empty(&r.server).await;
    assert_eq!(msgs[0].rcpt_addresses(), ["u@pref.test"]);
    prepended(&msgs[0].data, &content, false);
    assert_eq!(second.sessions(), 0, "the backup MX is not contacted");
    let log = log_lines(r.server.dir.path());
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["outcome"], "delivered");
    assert_eq!(log[0]["host"], "mx1.pref.test");
    assert_eq!(log[0]["ip"], "127.0.8.1:25");
    assert_eq!(log[0]["destination"], "mx:mx1.pref.test,mx2.pref.test");
}

#[tokio::test]
async fn next_mx_when_the_first_refuses_connections() {
    // Nothing listens on 127.0.8.3:25.
    let zone = Zone::new()
        .mx("refused.test", 10, "mx1.refused.test")
        .mx("refused.test", 20, "mx2.refused.test")
        .a("mx1.refused.test", "127.0.8.3")
        .a("mx2.refused.test", "127.0.8.4");
    let second = mx_sink("127.0.8.4", SinkBehaviour::default()).await;
    let r = mx_relay(zone).await;
    send_to(&r, "u@refused.test", "mx-refused").await;

    second.wait_for_messages(1, T).await;
    wait_spool_empty(&r.server).await;
    let log = log_lines(r.server.dir.path());
    assert_eq!(
        log.len(),
        1,
        "one attempt, both hosts tried in it: {log:#?}"
    );
    assert_eq!(log[0]["outcome"], "delivered");
    assert_eq!(log[0]["attempt"], 1);
    assert_eq!(log[0]["host"], "mx2.refused.test");
}

#[tokio::test]
async fn next_mx_when_the_first_greets_with_421() {
    let zone = Zone::new()
        .mx("busy.test", 10, "mx1.busy.test")
        .mx("busy.test", 20, "mx2.busy.test")
        .a("mx1.busy.test", "127.0.8.5")
        .a("mx2.busy.test", "127.0.8.6");
    let busy = mx_sink(
        "127.0.8.5",
        SinkBehaviour::default().greeting("421 4.3.2 Too busy, try later"),
    )
    .await;
    let second = mx_sink("127.0.8.6", SinkBehaviour::default()).await;
    let r = mx_relay(zone).await;
    send_to(&r, "u@busy.test", "mx-busy").await;

    second.wait_for_messages(1, T).await;
    wait_spool_empty(&r.server).await;
    assert!(busy.sessions() >= 1, "the preferred MX was tried first");
    assert!(busy.messages().is_empty());
    let log = log_lines(r.server.dir.path());
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["outcome"], "delivered");
    assert_eq!(log[0]["host"], "mx2.busy.test");
    assert_eq!(log[0]["ip"], "127.0.8.6:25");
}

#[tokio::test]
async fn implicit_mx_is_the_domain_itself() {
    let zone = Zone::new().a("implicit.test", "127.0.8.7");
    let sink = mx_sink("127.0.8.7", SinkBehaviour::default()).await;
    let r = mx_relay(zone).await;
    send_to(&r, "u@implicit.test", "mx-implicit").await;

    let msgs = sink.wait_for_messages(1, T).await;
    wait_spool_empty(&r.server).await;
    assert_eq!(msgs[0].rcpt_addresses(), ["u@implicit.test"]);
    let log = log_lines(r.server.dir.path());
    assert_eq!(log[0]["host"], "implicit.test");
    assert_eq!(log[0]["destination"], "mx:implicit.test");
}

#[tokio::test]
async fn null_mx_bounces_with_5_1_10() {
    let zone = Zone::new().null_mx("nullmx.test");
    let r = mx_relay(zone).await;
    send_to(&r, "u@nullmx.test", "mx-null").await;

    let dsn = only_dsn(&r).await;
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; u@nullmx.test"));
    assert_eq!(dsn.rcpt("Action"), Some("failed"));
    assert_eq!(dsn.rcpt("Status"), Some("5.1.10"));
    let log = log_lines(r.server.dir.path());
    let lines = lines_for(&log, "u@nullmx.test");
    assert_eq!(outcomes(&lines), [("bounced".into(), 1)], "{log:#?}");
}

#[tokio::test]
async fn nxdomain_bounces_with_5_1_2() {
    let zone = Zone::new().a("other.test", "127.0.8.8");
    let r = mx_relay(zone).await;
    send_to(&r, "u@nosuch.test", "mx-nxdomain").await;

    let dsn = only_dsn(&r).await;
    assert_eq!(dsn.rcpt("Final-Recipient"), Some("rfc822; u@nosuch.test"));
    assert_eq!(dsn.rcpt("Action"), Some("failed"));
    assert_eq!(dsn.rcpt("Status"), Some("5.1.2"));
    let log = log_lines(r.server.dir.path());
    let lines = lines_for(&log, "u@nosuch.test");
    assert_eq!(outcomes(&lines), [("bounced".into(), 1)], "{log:#?}");
}

#[tokio::test]
async fn servfail_defers_without_a_dsn() {
    let zone = Zone::new().servfail("servfail.test");
    let r = mx_relay(zone).await;
    send_to(&r, "u@servfail.test", "mx-servfail").await;

    wait_log(r.server.dir.path(), "deferred", |l| {
        l["outcome"] == "deferred"
    })
    .await;
    wait_for("the deferral in the spool", T, || {
        r.server
            .envelopes()
            .first()
            .is_some_and(|e| e.attempts >= 1)
    })
    .await;
    let envs = r.server.envelopes();
    assert_eq!(envs.len(), 1, "still queued, and no DSN queued: {envs:#?}");
    let env = &envs[0];
    assert!(
        env.next_due_ms > scheduler_now_ms(),
        "retried later, not now: {env:?}"
    );
    assert_eq!(env.recipients[0].state, tern_queue::RecipientState::Pending);
    let log = log_lines(r.server.dir.path());
    assert_eq!(log.len(), 1, "{log:#?}");
    assert_eq!(log[0]["destination"], "routing-deferred");
    assert!(
        log[0]["reply"].as_str().unwrap().contains("DNS"),
        "{log:#?}"
    );
    assert!(r.bounces.messages().is_empty(), "no DSN for a deferral");
}

#[tokio::test]
async fn unanswered_dns_for_one_domain_does_not_hold_up_other_mail() {
    // MX queries for slow.test are never answered (the resolver times out after seconds);
    // mail for a statically routed domain, accepted right after, must not wait for that.
    let zone = Zone::new().silent("slow.test");
    let dns = DnsServer::start(zone).await;
    let sink = Sink::start(SinkBehaviour::default()).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sender.test", bounces.addr)
            .route("sink.test", sink.addr)
            .delivery("nameservers", format!("[\"{}\"]", dns.addr)),
    )
    .await;
    send(
        &server,
        &format!("<{SENDER}>"),
        &["<u@slow.test>"],
        &message("dns-slow"),
    )
    .await;
    wait_for("the MX query", T, || {
        dns.queries("slow.test", RecordType::MX) >= 1
    })
    .await;
    let start = std::time::Instant::now();
    send(
        &server,
        &format!("<{SENDER}>"),
        &["<fast@sink.test>"],
        &message("dns-fast"),
    )
    .await;
    sink.wait_for_messages(1, T).await;
    let took = start.elapsed();
    assert!(
        took < std::time::Duration::from_secs(2),
        "mail for sink.test waited {took:?} behind a DNS lookup for another domain"
    );
}

#[tokio::test]
async fn a_refusing_mx_and_one_without_address_defer_rather_than_bounce() {
    // mx1 has an address but nothing listens there (temporary: it may come back); mx2 has
    // no address at all. Not every host is permanently unusable, so the mail must wait.
    let zone = Zone::new()
        .mx("halfdead.test", 10, "mx1.halfdead.test")
        .mx("halfdead.test", 20, "mx2.halfdead.test")
        .a("mx1.halfdead.test", "127.0.8.9");
    let r = mx_relay(zone).await;
    send_to(&r, "u@halfdead.test", "mx-halfdead").await;

    let log = wait_log(r.server.dir.path(), "an outcome", |l| {
        l["recipient"] == "u@halfdead.test"
    })
    .await;
    let lines = lines_for(&log, "u@halfdead.test");
    assert_eq!(
        outcomes(&lines),
        [("deferred".into(), 1)],
        "a host that refused connections may recover: {log:#?}"
    );
    wait_for("the deferral in the spool", T, || {
        r.server
            .envelopes()
            .first()
            .is_some_and(|e| e.attempts >= 1)
    })
    .await;
    assert!(r.bounces.messages().is_empty(), "no DSN for a deferral");
}

/// Metrics name the receiver: mail to a domain whose MX is under a built-in provider's
/// suffix (`.google.com`) is labelled `google`, other MX mail `other` (before, every MX
/// destination was `other`, so an operator could not tell Gmail from the rest).
#[tokio::test]
async fn metrics_label_mx_destinations_by_provider() {
    let google = mx_sink("127.0.8.10", SinkBehaviour::default()).await;
    // Unknown users at plain.test are refused for good: a bounce, by category.
    let refusing = SinkBehaviour {
        rcpt: std::sync::Arc::new(|to: &str| {
            to.starts_with("gone@")
                .then(|| "550 5.1.1 no such user".to_owned())
        }),
        ..SinkBehaviour::default()
    };
    let plain = mx_sink("127.0.8.11", refusing).await;
    let r = mx_relay(
        Zone::new()
            .mx("inbox.test", 10, "alt1.gmail-smtp-in.l.google.com")
            .a("alt1.gmail-smtp-in.l.google.com", "127.0.8.10")
            .mx("plain.test", 10, "mx.plain.test")
            .a("mx.plain.test", "127.0.8.11"),
    )
    .await;
    send_to(&r, "a@inbox.test", "to-google").await;
    send_to(&r, "b@plain.test", "to-plain").await;
    send_to(&r, "gone@plain.test", "to-nobody").await;
    google.wait_for_messages(1, T).await;
    plain.wait_for_messages(1, T).await;
    wait_spool_empty(&r.server).await;
    let metrics = crate::metrics::scrape(r.server.admin()).await;
    let sample = |name: &str| metrics.get(name).copied().unwrap_or(0.0);
    assert_eq!(
        sample("tern_deliveries_total{destination=\"google\",outcome=\"delivered\"}"),
        1.0,
        "{metrics:?}"
    );
    assert_eq!(
        sample("tern_deliveries_total{destination=\"other\",outcome=\"delivered\"}"),
        1.0
    );
    assert_eq!(
        sample(
            "tern_delivery_failures_total{category=\"invalid_recipient\",destination=\"other\",outcome=\"bounced\"}"
        ),
        1.0,
        "{metrics:?}"
    );
    // Every provider has its queue-depth series, at 0 here.
    for provider in ["google", "microsoft", "yahoo", "apple"] {
        assert!(
            metrics.contains_key(&format!(
                "tern_ready_queue_depth{{destination=\"{provider}\"}}"
            )),
            "{provider}: {metrics:?}"
        );
    }
    r.server.stop().await;
}
