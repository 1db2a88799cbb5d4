//! MTA-STS (RFC 8461) end to end: a loopback DNS server publishes `_mta-sts` TXT records and
//! MX records, a loopback HTTPS server (the harness CA, trusted through `delivery.ca_file`)
//! serves the policies, and sinks on port 25 of loopback addresses play the MX hosts. With
//! `mode: enforce`, mail goes only over TLS whose certificate verifies for the MX name, and is
//! deferred (4.7.5) otherwise; `mode: testing` delivers anyway. The policy is fetched once
//! and then served from the cache. TLS-RPT (RFC 8460): the failed sessions are reported by
//! mail and by HTTPS POST to the domain's `rua`, as a report that validates against the RFC's
//! format.

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

/// TLS reports POSTed to the policy server: (Content-Type, body).
type Posted = Arc<std::sync::Mutex<Vec<(String, Vec<u8>)>>>;

/// The HTTPS server of every test domain's policy (one address, the Host header decides),
/// counting fetches per host; it also takes TLS reports at `POST /tlsrpt`.
async fn policy_server(
    policies: HashMap<&'static str, &'static str>,
) -> (Arc<AtomicUsize>, Posted) {
    policy_server_at(POLICY_HOST_IP, policies).await
}

/// [`policy_server`] on port 443 of `ip` (a loopback address no other test uses).
pub(crate) async fn policy_server_at(
    ip: &str,
    policies: HashMap<&'static str, &'static str>,
) -> (Arc<AtomicUsize>, Posted) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    let posted: Posted = Arc::default();
    let kept = posted.clone();
    let reports = axum::Router::new().route(
        "/tlsrpt",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    let content_type = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    kept.lock().unwrap().push((content_type, body.to_vec()));
                    axum::http::StatusCode::OK
                }
            },
        ),
    );
    let app = axum::Router::new().merge(reports).route(
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
    let addr: SocketAddr = format!("{ip}:443").parse().unwrap();
    let listener = TlsListener {
        tcp: tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind :443"),
        acceptor: tokio_rustls::TlsAcceptor::from(server_config(SinkCert::TestCa)),
    };
    tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (fetches, posted)
}

async fn mx_sink(ip: &str, cert: SinkCert) -> Sink {
    let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
    Sink::start_at(addr, SinkBehaviour::default().starttls(cert)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforce_delivers_only_over_verified_tls_and_testing_delivers_anyway() {
    let (fetches, posted) = policy_server(HashMap::from([
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
    // mismatch.test asks for TLS reports by mail and HTTPS, testing.test by mail.
    zone = zone
        .txt(
            "_smtp._tls.mismatch.test",
            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test,https://mta-sts.mismatch.test/tlsrpt",
        )
        .txt(
            "_smtp._tls.testing.test",
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
    // The delivery log says which policy each attempt was under.
    assert_eq!(line["tls_policy"], "mta-sts-enforce", "{line}");
    for (rcpt, policy) in [
        ("b@testing.test", "mta-sts-testing"),
        ("a@sts.test", "mta-sts-enforce"),
    ] {
        let log = wait_log(server.dir.path(), rcpt, |l| {
            l["recipient"] == rcpt && l["outcome"] == "delivered"
        })
        .await;
        assert_eq!(lines_for(&log, rcpt)[0]["tls_policy"], policy, "{rcpt}");
    }

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

    // TLS-RPT: the day's reports for mismatch.test and testing.test, now instead of after
    // midnight, by mail (both) and by HTTPS POST (mismatch.test).
    let (status, body) = server.api("POST", "/api/v1/tls-reports/send", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queued"], 2, "one report mail per domain: {body}");
    let got = reports.wait_for_messages(2, T).await;
    let about = |domain: &str| {
        got.iter()
            .find(|m| {
                String::from_utf8_lossy(&m.data)
                    .contains(&format!("TLS-Report-Domain: {domain}\r\n"))
            })
            .unwrap_or_else(|| panic!("a report about {domain}"))
    };
    assert_eq!(
        about("mismatch.test").rcpt_addresses(),
        ["tlsrpt@reports.test"]
    );
    // Testing mode verified the certificate without enforcing it: delivered, and the
    // untrusted certificate is counted.
    let testing_report = tls_report(&about("testing.test").data, "testing.test");
    assert_valid_tls_report(&testing_report);
    let policy = &testing_report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["policy"]["policy-string"][1], "mode: testing");
    assert_eq!(policy["summary"]["total-successful-session-count"], 0);
    assert_eq!(
        policy["summary"]["total-failure-session-count"], 1,
        "{testing_report}"
    );
    assert_eq!(
        policy["failure-details"][0]["result-type"], "certificate-not-trusted",
        "{testing_report}"
    );
    assert_eq!(policy["failure-details"][0]["receiving-ip"], "127.0.8.23");
    let report = tls_report(&about("mismatch.test").data, "mismatch.test");
    assert_valid_tls_report(&report);
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-domain"], "mismatch.test");
    assert_eq!(policy["policy"]["policy-type"], "sts");
    assert_eq!(policy["policy"]["policy-string"][1], "mode: enforce");
    assert_eq!(policy["summary"]["total-successful-session-count"], 0);
    let failures = policy["summary"]["total-failure-session-count"]
        .as_u64()
        .unwrap();
    assert!(failures >= 1, "{report}");
    assert_eq!(
        policy["failure-details"][0]["result-type"], "certificate-not-trusted",
        "{report}"
    );
    assert_eq!(policy["failure-details"][0]["receiving-ip"], "127.0.8.22");
    assert_eq!(
        policy["failure-details"][0]["receiving-mx-hostname"],
        "mx.mismatch.test"
    );
    // The same report POSTed to the https: endpoint, gzipped.
    let (content_type, body) = posted
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("a report POST");
    assert_eq!(content_type, "application/tlsrpt+gzip");
    let mut json = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::GzDecoder::new(body.as_slice()),
        &mut json,
    )
    .expect("gzip");
    let posted_report: serde_json::Value = serde_json::from_slice(&json).unwrap();
    assert_eq!(posted_report, report, "the same report both ways");
    // Reported once: nothing is left to send.
    let (_, body) = server.api("POST", "/api/v1/tls-reports/send", None).await;
    assert_eq!(body["queued"], 0, "{body}");
    server.stop().await;
}

/// The JSON of the gzipped `application/tlsrpt+gzip` part of a report mail about `domain`.
pub(crate) fn tls_report(mail: &[u8], domain: &str) -> serde_json::Value {
    use mail_parser::MimeHeaders as _;
    use std::io::Read as _;
    let text = String::from_utf8_lossy(mail);
    assert!(
        text.contains("report-type=\"tlsrpt\"")
            && text.contains(&format!("TLS-Report-Domain: {domain}\r\n")),
        "{text}"
    );
    let message = mail_parser::MessageParser::default()
        .parse(mail)
        .expect("MIME");
    let part = message
        .attachments()
        .find(|a| {
            a.content_type()
                .is_some_and(|c| c.subtype() == Some("tlsrpt+gzip"))
        })
        .expect("an application/tlsrpt+gzip part");
    let mut json = Vec::new();
    flate2::read::GzDecoder::new(part.contents())
        .read_to_end(&mut json)
        .expect("gzip");
    serde_json::from_slice(&json).expect("JSON")
}

/// Validates `report` against the RFC 8460 report format (tests/data/tlsrpt-schema.json)
/// with Python's jsonschema, an independent validator.
pub(crate) fn assert_valid_tls_report(report: &serde_json::Value) {
    use std::io::Write as _;
    let schema = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/tlsrpt-schema.json");
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            "import json,sys,jsonschema; jsonschema.validate(json.load(sys.stdin), json.load(open(sys.argv[1]))); print('valid')",
            schema,
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(report.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.starts_with(b"valid"),
        "not a valid RFC 8460 report: {}\n{report}",
        String::from_utf8_lossy(&out.stderr)
    );
}
