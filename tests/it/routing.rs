//! Routing through the real resolver against the test DNS server on loopback: MX order and
//! shuffling, implicit MX, null MX, NXDOMAIN, SERVFAIL and timeouts, static routes, destination
//! keys, TTL-honouring caching and TCP fallback.

use std::collections::HashSet;
use std::fmt::Debug;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_resolver::proto::rr::RecordType;
use tern::config::{RouteAuth, RouteConfig, TlsPolicy};
use tern::routing::dns::HickoryResolver;
use tern::routing::guard::AddressGuard;
use tern::routing::route::{Hop, RouteError, RoutePlan, Router};

use crate::dns_server::{DnsServer, Zone};

/// A router over the test DNS server; its MX hosts live on loopback, so local addresses are
/// allowed (`delivery.allow_local_mx`).
fn router(server: &DnsServer, routes: &[RouteConfig]) -> Router {
    let resolver = HickoryResolver::new(&[server.addr]).expect("resolver");
    Router::new(
        routes,
        TlsPolicy::Opportunistic,
        Arc::new(resolver),
        AddressGuard::new(true, &[]),
    )
}

/// A hop of a static route.
fn hop(name: &str, port: u16) -> Hop {
    Hop {
        name: name.to_owned(),
        port,
        static_route: true,
    }
}

/// Hops the recipient's domain chose.
fn mx_hops(names: &[&str]) -> Vec<Hop> {
    names
        .iter()
        .map(|n| Hop {
            static_route: false,
            ..hop(n, 25)
        })
        .collect()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// The reason of a permanent error with this status.
#[track_caller]
fn permanent<T: Debug>(result: Result<T, RouteError>, expected: &str) -> String {
    match result {
        Err(RouteError::Permanent { status, reason }) if status == expected => reason,
        other => panic!("expected permanent {expected}, got {other:?}"),
    }
}

#[track_caller]
fn temporary<T: Debug>(result: Result<T, RouteError>) -> String {
    match result {
        Err(RouteError::Temporary {
            status: "4.4.3",
            reason,
        }) => reason,
        other => panic!("expected temporary 4.4.3, got {other:?}"),
    }
}

#[tokio::test]
async fn mx_hosts_in_preference_order_with_addresses_resolved_per_hop() {
    let server = DnsServer::start(
        Zone::new()
            .mx("example.test", 20, "MX2.Example.test")
            .mx("example.test", 10, "mx1.example.test")
            .mx("example.test", 30, "mx3.example.test")
            .a("mx1.example.test", "127.0.0.1")
            .aaaa("mx1.example.test", "::1")
            .a("mx2.example.test", "127.0.0.2"),
    )
    .await;
    let router = Arc::new(router(&server, &[]));

    // Spawned, because the scheduler will spawn plans: the future must be Send.
    let plan = tokio::spawn({
        let router = router.clone();
        async move { router.plan("example.test").await }
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        plan,
        RoutePlan {
            key: "mx:mx1.example.test,mx2.example.test,mx3.example.test".to_owned(),
            hops: mx_hops(&["mx1.example.test", "mx2.example.test", "mx3.example.test"]),
            tls: TlsPolicy::Opportunistic,
            tls_label: "opportunistic",
            dane: None,
            auth: None,
        }
    );
    // Addresses are looked up only for the hops actually tried.
    assert_eq!(server.queries("mx1.example.test", RecordType::A), 0);

    assert_eq!(
        router.addresses(&plan.hops[0]).await.unwrap(),
        [addr("127.0.0.1:25"), addr("[::1]:25")]
    );
    assert_eq!(
        router.addresses(&plan.hops[1]).await.unwrap(),
        [addr("127.0.0.2:25")]
    );
    // mx3 does not exist: that hop alone is unusable.
    let reason = permanent(router.addresses(&plan.hops[2]).await, "5.1.2");
    assert!(reason.contains("mx3.example.test"), "{reason}");
}

#[tokio::test]
async fn equal_preferences_are_shuffled_on_every_plan() {
    let server = DnsServer::start(
        Zone::new()
            .mx("shuffle.test", 10, "a.shuffle.test")
            .mx("shuffle.test", 10, "b.shuffle.test")
            .mx("shuffle.test", 20, "c.shuffle.test"),
    )
    .await;
    let router = router(&server, &[]);
    let mut orders = HashSet::new();
    for _ in 0..50 {
        let plan = router.plan("shuffle.test").await.unwrap();
        assert_eq!(plan.key, "mx:a.shuffle.test,b.shuffle.test,c.shuffle.test");
        assert_eq!(plan.hops[2], mx_hops(&["c.shuffle.test"])[0]);
        orders.insert(plan.hops[0].name.clone());
    }
    assert_eq!(orders.len(), 2, "both orders of the preference-10 hosts");
    // All 50 plans came from one answer, cached.
    assert_eq!(server.queries("shuffle.test", RecordType::MX), 1);
}

#[tokio::test]
async fn no_mx_means_the_domain_itself_is_the_implicit_mx() {
    let server = DnsServer::start(
        Zone::new()
            .a("plain.test", "127.0.0.1")
            // nodata.test exists (a name below it has records) but has no MX and no address.
            .a("www.nodata.test", "127.0.0.1"),
    )
    .await;
    let router = router(&server, &[]);

    let plan = router.plan("plain.test").await.unwrap();
    assert_eq!(plan.key, "mx:plain.test");
    assert_eq!(plan.hops, mx_hops(&["plain.test"]));
    assert_eq!(
        router.addresses(&plan.hops[0]).await.unwrap(),
        [addr("127.0.0.1:25")]
    );

    let plan = router.plan("nodata.test").await.unwrap();
    assert_eq!(plan.hops, mx_hops(&["nodata.test"]));
    let reason = permanent(router.addresses(&plan.hops[0]).await, "5.1.2");
    assert_eq!(reason, "nodata.test: no address records");
}

#[tokio::test]
async fn null_mx_is_permanent_and_ignored_next_to_real_hosts() {
    let server = DnsServer::start(Zone::new().null_mx("nullmx.test").null_mx("mixed.test").mx(
        "mixed.test",
        10,
        "mx.mixed.test",
    ))
    .await;
    let router = router(&server, &[]);
    let reason = permanent(router.plan("nullmx.test").await, "5.1.10");
    assert_eq!(reason, "Recipient address has null MX");
    let plan = router.plan("mixed.test").await.unwrap();
    assert_eq!(plan.hops, mx_hops(&["mx.mixed.test"]));
}

#[tokio::test]
async fn nxdomain_is_permanent() {
    let server = DnsServer::start(Zone::new().a("other.test", "127.0.0.1")).await;
    let router = router(&server, &[]);
    let reason = permanent(router.plan("missing.test").await, "5.1.2");
    assert_eq!(reason, "missing.test: no such domain");
}

#[tokio::test]
async fn servfail_is_temporary_for_the_domain_and_for_a_hop() {
    let server = DnsServer::start(
        Zone::new()
            .servfail("broken.test")
            .mx("partly.test", 10, "broken-mx.test")
            .mx("partly.test", 20, "gone.test")
            .servfail("broken-mx.test"),
    )
    .await;
    let router = router(&server, &[]);
    let reason = temporary(router.plan("broken.test").await);
    assert!(
        reason.starts_with("DNS temporary failure: broken.test"),
        "{reason}"
    );

    // The caller can tell "DNS is down for this hop" from "this hop does not exist".
    let plan = router.plan("partly.test").await.unwrap();
    temporary(router.addresses(&plan.hops[0]).await);
    permanent(router.addresses(&plan.hops[1]).await, "5.1.2");
}

#[tokio::test]
async fn unanswered_queries_are_temporary() {
    let server = DnsServer::start(Zone::new().silent("slow.test")).await;
    let router = router(&server, &[]);
    let started = Instant::now();
    temporary(router.plan("slow.test").await);
    // 5 s per try, 2 tries.
    assert!(started.elapsed() < Duration::from_secs(20));
}

#[tokio::test]
async fn static_route_beats_mx_and_the_wildcard_catches_the_rest() {
    let server = DnsServer::start(
        Zone::new()
            .mx("example.test", 10, "mx.example.test")
            .a("relay.example.test", "127.0.0.1"),
    )
    .await;
    let auth = RouteAuth {
        username: "app".to_owned(),
        password_file: PathBuf::from("/etc/tern/relay.password"),
    };
    let routes = [
        RouteConfig {
            domain: "example.test".to_owned(),
            hosts: vec![
                "Relay.example.test:2525".to_owned(),
                "127.0.0.1:26".to_owned(),
                "[::1]:27".to_owned(),
            ],
            tls: Some(TlsPolicy::Required),
            auth: Some(auth.clone()),
            pool: None,
            verp: None,
        },
        RouteConfig {
            domain: "*".to_owned(),
            hosts: vec!["smarthost.test:587".to_owned()],
            tls: None,
            auth: None,
            pool: None,
            verp: None,
        },
    ];
    let router = router(&server, &routes);

    let plan = router.plan("example.test").await.unwrap();
    assert_eq!(
        plan,
        RoutePlan {
            key: "route:example.test".to_owned(),
            hops: vec![
                hop("relay.example.test", 2525),
                hop("127.0.0.1", 26),
                hop("::1", 27)
            ],
            tls: TlsPolicy::Required,
            tls_label: "required",
            dane: None,
            auth: Some(auth),
        }
    );
    assert_eq!(
        router.addresses(&plan.hops[0]).await.unwrap(),
        [addr("127.0.0.1:2525")]
    );
    assert_eq!(
        router.addresses(&plan.hops[2]).await.unwrap(),
        [addr("[::1]:27")]
    );

    let plan = router.plan("other.test").await.unwrap();
    assert_eq!(
        plan,
        RoutePlan {
            key: "route:*".to_owned(),
            hops: vec![hop("smarthost.test", 587)],
            tls: TlsPolicy::Opportunistic,
            tls_label: "opportunistic",
            dane: None,
            auth: None,
        }
    );
    // Neither domain's MX was asked for.
    assert_eq!(server.queries("example.test", RecordType::MX), 0);
    assert_eq!(server.queries("other.test", RecordType::MX), 0);
}

#[tokio::test]
async fn domains_sharing_an_mx_set_share_a_destination_key() {
    let server = DnsServer::start(
        Zone::new()
            .mx("a.test", 10, "mx1.shared.test")
            .mx("a.test", 20, "mx2.shared.test")
            .mx("b.test", 5, "mx2.shared.test")
            .mx("b.test", 50, "mx1.shared.test")
            .mx("c.test", 10, "mx1.shared.test"),
    )
    .await;
    let router = router(&server, &[]);
    let key = |plan: RoutePlan| plan.key;
    let a = key(router.plan("a.test").await.unwrap());
    let b = key(router.plan("b.test").await.unwrap());
    let c = key(router.plan("c.test").await.unwrap());
    assert_eq!(a, "mx:mx1.shared.test,mx2.shared.test");
    assert_eq!(a, b);
    assert_eq!(c, "mx:mx1.shared.test");
}

#[tokio::test]
async fn answers_are_cached_for_their_ttl() {
    let server = DnsServer::start(
        Zone::new()
            .ttl(1)
            .mx("short.test", 10, "mx.short.test")
            .ttl(300)
            .mx("long.test", 10, "mx.long.test")
            .a("mx.long.test", "127.0.0.1"),
    )
    .await;
    let router = router(&server, &[]);
    let hop = mx_hops(&["mx.long.test"]).remove(0);
    for _ in 0..3 {
        router.plan("short.test").await.unwrap();
        router.plan("long.test").await.unwrap();
        router.addresses(&hop).await.unwrap();
    }
    assert_eq!(server.queries("short.test", RecordType::MX), 1);
    assert_eq!(server.queries("long.test", RecordType::MX), 1);
    assert_eq!(server.queries("mx.long.test", RecordType::A), 1);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    router.plan("short.test").await.unwrap();
    router.plan("long.test").await.unwrap();
    assert_eq!(server.queries("short.test", RecordType::MX), 2);
    assert_eq!(server.queries("long.test", RecordType::MX), 1);
}

#[tokio::test]
async fn a_truncated_udp_answer_is_retried_over_tcp() {
    let zone = (0..60).fold(Zone::new(), |zone, i| {
        zone.mx(
            "large.test",
            10,
            &format!("mx-{i:02}.a-rather-large-mail-cluster.test"),
        )
    });
    let server = DnsServer::start(zone).await;
    let router = router(&server, &[]);
    let plan = router.plan("large.test").await.unwrap();
    assert_eq!(plan.hops.len(), 60);
    assert!(server.tcp_queries() > 0);
}

#[tokio::test]
async fn an_address_literal_domain_needs_no_dns() {
    let server = DnsServer::start(Zone::new()).await;
    let router = router(&server, &[]);
    let plan = router.plan("[127.0.0.1]").await.unwrap();
    assert_eq!(plan.key, "mx:[127.0.0.1]");
    assert_eq!(plan.hops, mx_hops(&["127.0.0.1"]));
    assert_eq!(
        router.addresses(&plan.hops[0]).await.unwrap(),
        [addr("127.0.0.1:25")]
    );
    // The resolver, too, returns a literal without asking.
    assert_eq!(
        router.resolver().addresses("::1").await.unwrap(),
        [IpAddr::from(Ipv6Addr::LOCALHOST)]
    );
}
