//! MTA-STS (RFC 8461) end to end: a loopback DNS server publishes `_mta-sts` TXT records and
//! MX records, a loopback HTTPS server (the harness CA, trusted through `delivery.ca_file`)
//! serves the policies, and sinks on port 25 of loopback addresses play the MX hosts. With
//! `mode: enforce`, mail goes only over TLS whose certificate verifies for the MX name, and is
//! deferred (4.7.5) otherwise; `mode: testing` delivers anyway. The policy is fetched once
//! and then served from the cache. TLS-RPT (RFC 8460): the failed sessions are reported by
//! mail to the domain's `rua`, as a report that validates against the RFC's format.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::delivery::{lines_for, send, wait_log, SENDER};
use crate::dns_server::{DnsServer, Zone};
use crate::harness::*;
use crate::sink::{server_config, Sink, SinkBehaviour, SinkCert};
use crate::suppression::TlsListener;

const T: std::time::Duration = std::time::Duration::from_secs(20);
const POLICY_HOST_IP: &str = "127.0.8.20";

/// The HTTPS server of every test domain's policy (one address, the Host header decides),
/// counting fetches per host.
async fn policy_server(policies: HashMap<&'static str, &'static str>) -> Arc<AtomicUsize> {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let app = axum::Router::new().route(
        "/.well-known/mta-sts.txt",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let counted = counted.clone();
            let policies = policies.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                let host = headers
                    .get("host")
                    .and_then(|h| h.to_str().ok())
                    .unwrap_or("")
                    .to_owned();
                match policies.get(host.as_str()) {
                    Some(policy) => (
                        axum::http::StatusCode::OK,
                        [("content-type", "text/plain")],
                        policy.to_string(),
                    ),
                    None => (
                        axum::http::StatusCode::NOT_FOUND,
                        [("content-type", "text/plain")],
                        String::new(),
                    ),
                }
            }
        }),
    );
    let addr: SocketAddr = format!("{POLICY_HOST_IP}:443").parse().unwrap();
    let listener = TlsListener {
        tcp: tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind :443"),
        acceptor: tokio_rustls::TlsAcceptor::from(server_config(SinkCert::TestCa)),
    };
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    fetches
}

async fn mx_sink(ip: &str, cert: SinkCert) -> Sink {
    let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
    Sink::start_at(addr, SinkBehaviour::default().starttls(cert)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_delivers_only_over_verified_tls_and_testing_delivers_anyway() {
    let fetches = policy_server(HashMap::from([
        (
            "mta-sts.sts.test",
            "version: STSv1\nmode: enforce\nmx: *.sts.test\nmax_age: 86400\n",
        ),
        (
            "mta-sts.mismatch.test",
            "version: STSv1\nmode: enforce\nmx: mx.mismatch.test\nmax_age: 86400\n",
        ),
        (
            "mta-sts.testing.test",
            "version: STSv1\nmode: testing\nmx: mx.testing.test\nmax_age: 86400\n",
        ),
    ]))
    .await;
    // sts.test's MX presents a certificate of the harness CA valid for it; the others
    // present self-signed ones, which nothing trusts.
    let good = mx_sink("127.0.8.21", SinkCert::TestCa).await;
    let mismatch = mx_sink("127.0.8.22", SinkCert::SelfSigned).await;
    let testing = mx_sink("127.0.8.23", SinkCert::SelfSigned).await;
    let mut zone = Zone::new();
    for (domain, mx_ip) in [
        ("sts.test", "127.0.8.21"),
        ("mismatch.test", "127.0.8.22"),
        ("testing.test", "127.0.8.23"),
    ] {
        zone = zone
            .txt(&format!("_mta-sts.{domain}"), "v=STSv1; id=2026120701;")
            .a(&format!("mta-sts.{domain}"), POLICY_HOST_IP)
            .mx(domain, 10, &format!("mx.{domain}"))
            .a(&format!("mx.{domain}"), mx_ip);
    }
    // mismatch.test asks for TLS reports by mail.
    zone = zone.txt(
        "_smtp._tls.mismatch.test",
        "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test",
    );
    let dns = DnsServer::start(zone).await;
    let reports = Sink::start(SinkBehaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ca) = write_cert_files(dir.path());
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let server = TestServer::start(
        Options::default()
            .deliver()
            .route("sender.test", bounces.addr)
            .route("reports.test", reports.addr)
            .delivery("nameservers", format!("[\"{}\"]", dns.addr))
            .delivery("allow_local_mx", true)
            .delivery("mta_sts", true)
            .delivery("ca_file", format!("{:?}", ca.display().to_string())),
    )
    .await;

    send(
        &server,
        &format!("<{SENDER}>"),
        &["<a@sts.test>"],
        &message("enforced"),
    )
    .await;
    send(
        &server,
        &format!("<{SENDER}>"),
        &["<b@testing.test>"],
        &message("testing"),
    )
    .await;
    send(
        &server,
        &format!("<{SENDER}>"),
        &["<c@mismatch.test>"],
        &message("refused"),
    )
    .await;

    // Enforce, valid certificate: delivered, over TLS.
    let got = good.wait_for_messages(1, T).await;
    assert!(got[0].tls, "enforce delivers over TLS only");
    // Testing: delivered although the certificate does not verify.
    testing.wait_for_messages(1, T).await;
    // Enforce, certificate that does not verify: deferred with 4.7.5, never delivered.
    let log = wait_log(server.dir.path(), "deferral of c@mismatch.test", |l| {
        l["recipient"] == "c@mismatch.test" && l["outcome"] == "deferred"
    })
    .await;
    let line = lines_for(&log, "c@mismatch.test")[0];
    // A TLS failure is status 4.7.5 (delivery::client); the log keeps the reason.
    let reply = line["reply"].as_str().unwrap();
    assert!(
        reply.contains("TLS handshake failed") && reply.contains("invalid peer certificate"),
        "{line}"
    );
    assert!(
        mismatch.messages().is_empty(),
        "nothing sent without verified TLS"
    );

    // Each policy was fetched once: later plans use the cache.
    let before = fetches.load(Ordering::SeqCst);
    assert_eq!(before, 3, "one fetch per domain");
    send(
        &server,
        &format!("<{SENDER}>"),
        &["<d@sts.test>"],
        &message("cached"),
    )
    .await;
    good.wait_for_messages(2, T).await;
    assert_eq!(
        fetches.load(Ordering::SeqCst),
        before,
        "served from the cache"
    );
    server.stop().await;
}
