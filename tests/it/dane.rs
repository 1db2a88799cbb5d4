//! DANE for SMTP (RFC 7672) end to end: the loopback DNS server plays a DNSSEC-signed root
//! (its key is the daemon's `delivery.dnssec_trust_anchor`), with TLSA records for MX hosts,
//! an unsigned zone below an insecure delegation and a name whose signatures are broken.
//! Sinks on port 25 of loopback addresses play the MX hosts, each with a certificate made
//! here. What must hold: a DANE-EE or DANE-TA match delivers over TLS (`tls_policy` "dane");
//! a certificate that matches no TLSA record is deferred and nothing is sent; TLSA records in
//! an unsigned zone change nothing; a bogus MX answer defers; DANE wins over an MTA-STS
//! policy; the TLS report names the TLSA records and counts the failure. Route levels
//! (`tls = "encrypt" | "none" | "verify" | "dane-only"`) replace what would be discovered.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::delivery::{lines_for, send, wait_log, SENDER};
use crate::dns_server::{DnsServer, Zone};
use crate::harness::*;
use crate::mta_sts::{assert_valid_tls_report, policy_server_at, tls_report};
use crate::sink::{Sink, SinkBehaviour, SinkCert};
use hickory_resolver::proto::rr::RecordType;

const T: std::time::Duration = std::time::Duration::from_secs(20);

/// A certificate chain (PEM, end entity first) and key, leaked for [`SinkCert::Pem`], with
/// the DER of the end entity's SubjectPublicKeyInfo and of the issuer.
struct Made {
    sink: SinkCert,
    spki: Vec<u8>,
    ca_der: Option<Vec<u8>>,
    ca_spki: Option<Vec<u8>>,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A self-signed certificate for `name`.
fn self_signed(name: &str) -> Made {
    let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    Made {
        sink: SinkCert::Pem(leak(c.cert.pem()), leak(c.key_pair.serialize_pem())),
        spki: c.key_pair.public_key_der(),
        ca_der: None,
        ca_spki: None,
    }
}

/// A CA of our own and a certificate for `name` it issued; the sink presents both.
fn ca_issued(name: &str) -> Made {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "DANE test TA");
    ca_params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    let leaf = params.signed_by(&key, &ca, &ca_key).unwrap();
    Made {
        sink: SinkCert::Pem(
            leak(format!("{}{}", leaf.pem(), ca.pem())),
            leak(key.serialize_pem()),
        ),
        spki: key.public_key_der(),
        ca_der: Some(ca.der().to_vec()),
        ca_spki: Some(ca_key.public_key_der()),
    }
}

fn sha512(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA512, data)
        .as_ref()
        .to_vec()
}

fn sha256(data: &[u8]) -> Vec<u8> {
    aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data)
        .as_ref()
        .to_vec()
}

async fn mx_sink(ip: &str, behaviour: SinkBehaviour) -> Sink {
    let addr: SocketAddr = format!("{ip}:25").parse().unwrap();
    Sink::start_at(addr, behaviour).await
}

/// `domain`'s MX `mx.<domain>` at `ip`.
fn mx(zone: Zone, domain: &str, ip: &str) -> Zone {
    zone.mx(domain, 10, &format!("mx.{domain}"))
        .a(&format!("mx.{domain}"), ip)
}

fn tlsa_name(domain: &str) -> String {
    format!("_25._tcp.mx.{domain}")
}

/// A daemon delivering through `dns` with `zone`'s key as trust anchor.
async fn daemon(dns: &DnsServer, anchor: &str, options: Options) -> TestServer {
    let dir = tempfile::tempdir().unwrap().keep();
    let anchor_path = dir.join("root.key");
    std::fs::write(&anchor_path, anchor).unwrap();
    TestServer::start(
        options
            .deliver()
            .delivery("nameservers", format!("[\"{}\"]", dns.addr))
            .delivery("allow_local_mx", true)
            .delivery(
                "dnssec_trust_anchor",
                format!("{:?}", anchor_path.display().to_string()),
            ),
    )
    .await
}

async fn wait_outcome(server: &TestServer, rcpt: &str, outcome: &str) -> serde_json::Value {
    let log = wait_log(server.dir.path(), rcpt, |l| {
        l["recipient"] == rcpt && l["outcome"] == outcome
    })
    .await;
    lines_for(&log, rcpt)[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tlsa_records_decide_the_certificate_and_bogus_answers_defer() {
    // DANE-EE checks no name: this certificate names some other host.
    let ee = self_signed("not-the-mx.example");
    let other = self_signed("mx.eebad.test");
    let ta = ca_issued("mx.ta.test");
    let unsigned = self_signed("mx.plain.test");
    let both = self_signed("mx.stsdane.test");
    let bogus = self_signed("mx.bogus.test");
    // DANE-TA checks the name: this chain is anchored right, but for another host.
    let ta_wrong_name = ca_issued("elsewhere.example");

    let ee_sink = mx_sink("127.0.9.1", SinkBehaviour::default().starttls(ee.sink)).await;
    let eebad_sink = mx_sink("127.0.9.2", SinkBehaviour::default().starttls(other.sink)).await;
    let ta_sink = mx_sink("127.0.9.3", SinkBehaviour::default().starttls(ta.sink)).await;
    let plain_sink = mx_sink(
        "127.0.9.4",
        SinkBehaviour::default().starttls(unsigned.sink),
    )
    .await;
    let bogus_sink = mx_sink("127.0.9.5", SinkBehaviour::default().starttls(bogus.sink)).await;
    let both_sink = mx_sink("127.0.9.6", SinkBehaviour::default().starttls(both.sink)).await;
    let overridden_sink = mx_sink("127.0.9.9", SinkBehaviour::default().starttls(other.sink)).await;
    let host_bogus_sink = mx_sink("127.0.9.8", SinkBehaviour::default().starttls(ee.sink)).await;
    let wrong_name_sink = mx_sink(
        "127.0.9.7",
        SinkBehaviour::default().starttls(ta_wrong_name.sink),
    )
    .await;
    // stsdane.test also publishes an enforced MTA-STS policy, which the self-signed
    // certificate of its MX could never meet: only DANE delivers there.
    let (fetches, _) = policy_server_at(
        "127.0.9.20",
        HashMap::from([(
            "mta-sts.stsdane.test",
            "version: STSv1\nmode: enforce\nmx: mx.stsdane.test\nmax_age: 86400\n",
        )]),
    )
    .await;

    let mut zone = Zone::new().signed();
    zone = mx(zone, "ee.test", "127.0.9.1").tlsa(&tlsa_name("ee.test"), 3, 1, 1, &sha256(&ee.spki));
    // eebad.test's TLSA record names ee.test's key, not the one its MX presents.
    zone = mx(zone, "eebad.test", "127.0.9.2")
        .tlsa(&tlsa_name("eebad.test"), 3, 1, 1, &sha256(&ee.spki))
        .txt(
            "_smtp._tls.eebad.test",
            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test",
        );
    // DANE-TA: the issuer, by its full certificate's SHA-256.
    let ca_der = ta.ca_der.clone().unwrap();
    zone = mx(zone, "ta.test", "127.0.9.3").tlsa(&tlsa_name("ta.test"), 2, 0, 1, &sha256(&ca_der));
    // (This one by the issuer's public key and SHA-512.)
    zone = mx(zone, "tawrong.test", "127.0.9.7").tlsa(
        &tlsa_name("tawrong.test"),
        2,
        1,
        2,
        &sha512(&ta_wrong_name.ca_spki.clone().unwrap()),
    );
    // overridden.test's TLSA record does not match either, but a route says "may".
    zone = mx(zone, "overridden.test", "127.0.9.9").tlsa(
        &tlsa_name("overridden.test"),
        3,
        1,
        1,
        &sha256(&ee.spki),
    );
    // hostbogus.test's MX answer is fine, its MX host's TLSA answer is not.
    zone = mx(zone, "hostbogus.test", "127.0.9.8")
        .tlsa(&tlsa_name("hostbogus.test"), 3, 1, 1, &sha256(&ee.spki))
        .tamper(&tlsa_name("hostbogus.test"))
        .txt(
            "_smtp._tls.hostbogus.test",
            "v=TLSRPTv1; rua=mailto:tlsrpt@reports.test",
        );
    // plain.test is unsigned: its TLSA record (which its MX would not match) is ignored.
    zone = mx(zone, "plain.test", "127.0.9.4")
        .tlsa(&tlsa_name("plain.test"), 3, 1, 1, &sha256(&ee.spki))
        .insecure("plain.test");
    // bogus.test's MX answer carries a broken signature.
    zone = mx(zone, "bogus.test", "127.0.9.5")
        .tlsa(&tlsa_name("bogus.test"), 3, 1, 1, &sha256(&bogus.spki))
        .tamper("bogus.test");
    zone = mx(zone, "stsdane.test", "127.0.9.6")
        .tlsa(&tlsa_name("stsdane.test"), 3, 1, 1, &sha256(&both.spki))
        .txt("_mta-sts.stsdane.test", "v=STSv1; id=1;")
        .a("mta-sts.stsdane.test", "127.0.9.20");
    // Where reports and bounces go (static routes, no DNS).
    let anchor = zone.trust_anchor();
    let dns = DnsServer::start(zone).await;
    let reports = Sink::start(SinkBehaviour::default()).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (_, _, ca) = write_cert_files(dir.path());
    let server = daemon(
        &dns,
        &anchor,
        Options::default()
            .route("sender.test", bounces.addr)
            .route("reports.test", reports.addr)
            .route("overridden.test", "")
            .route_option("overridden.test", "tls", "\"may\"")
            .delivery("dane", true)
            .delivery("mta_sts", true)
            .delivery("ca_file", format!("{:?}", ca.display().to_string())),
    )
    .await;

    for (rcpt, subject) in [
        ("a@ee.test", "ee"),
        ("b@eebad.test", "eebad"),
        ("c@ta.test", "ta"),
        ("d@plain.test", "plain"),
        ("e@bogus.test", "bogus"),
        ("f@stsdane.test", "stsdane"),
        ("g@tawrong.test", "tawrong"),
        ("h@hostbogus.test", "hostbogus"),
        ("i@overridden.test", "overridden"),
    ] {
        send(
            &server,
            &format!("<{SENDER}>"),
            &[&format!("<{rcpt}>")],
            &message(subject),
        )
        .await;
    }

    // DANE-EE match: delivered over TLS under "dane".
    assert!(ee_sink.wait_for_messages(1, T).await[0].tls);
    assert_eq!(
        wait_outcome(&server, "a@ee.test", "delivered").await["tls_policy"],
        "dane"
    );
    // DANE-TA match: delivered over TLS under "dane".
    assert!(ta_sink.wait_for_messages(1, T).await[0].tls);
    assert_eq!(
        wait_outcome(&server, "c@ta.test", "delivered").await["tls_policy"],
        "dane"
    );
    // Unsigned zone: its TLSA record is not looked at; opportunistic TLS delivers.
    plain_sink.wait_for_messages(1, T).await;
    assert_eq!(
        wait_outcome(&server, "d@plain.test", "delivered").await["tls_policy"],
        "opportunistic"
    );
    // DANE before MTA-STS: the enforced policy would have refused the self-signed
    // certificate; the TLSA record accepts it.
    assert!(both_sink.wait_for_messages(1, T).await[0].tls);
    let line = wait_outcome(&server, "f@stsdane.test", "delivered").await;
    assert_eq!(line["tls_policy"], "dane", "{line}");
    // DANE-EE mismatch: deferred, never sent.
    let line = wait_outcome(&server, "b@eebad.test", "deferred").await;
    assert_eq!(line["tls_policy"], "dane", "{line}");
    let reply = line["reply"].as_str().unwrap();
    assert!(
        reply.contains("certificate matches no TLSA record"),
        "{line}"
    );
    assert!(
        eebad_sink.messages().is_empty(),
        "nothing sent on a mismatch"
    );
    // Bogus MX answer: deferred (4.7.5), never sent.
    let line = wait_outcome(&server, "e@bogus.test", "deferred").await;
    assert!(line["reply"].as_str().unwrap().contains("DNSSEC"), "{line}");
    assert!(
        bogus_sink.messages().is_empty(),
        "nothing sent on a bogus answer"
    );
    // A route's level replaces DANE: delivered although no TLSA record matches.
    overridden_sink.wait_for_messages(1, T).await;
    let line = wait_outcome(&server, "i@overridden.test", "delivered").await;
    assert_eq!(line["tls_policy"], "opportunistic", "{line}");
    // A bogus TLSA answer: the host is not used (and would have matched).
    let line = wait_outcome(&server, "h@hostbogus.test", "deferred").await;
    assert!(
        line["reply"]
            .as_str()
            .unwrap()
            .contains("failed DNSSEC validation"),
        "{line}"
    );
    assert!(
        host_bogus_sink.messages().is_empty(),
        "nothing sent on a bogus TLSA answer"
    );
    // Cached: another message to ee.test asks DNS for nothing new.
    let tlsa_queries = dns.queries(&tlsa_name("ee.test"), RecordType::TLSA);
    assert_eq!(tlsa_queries, 1, "one TLSA query so far");
    send(
        &server,
        &format!("<{SENDER}>"),
        &["<a2@ee.test>"],
        &message("again"),
    )
    .await;
    ee_sink.wait_for_messages(2, T).await;
    assert_eq!(
        dns.queries(&tlsa_name("ee.test"), RecordType::TLSA),
        1,
        "served from the cache"
    );
    // DANE-TA with the right anchor but a certificate for another name: deferred.
    let line = wait_outcome(&server, "g@tawrong.test", "deferred").await;
    assert_eq!(line["tls_policy"], "dane", "{line}");
    // The anchor matched (2 1 2); the name did not.
    assert!(
        line["reply"]
            .as_str()
            .unwrap()
            .contains("certificate not valid for name \"mx.tawrong.test\""),
        "{line}"
    );
    assert!(
        wrong_name_sink.messages().is_empty(),
        "nothing sent to the wrong name"
    );
    // The MTA-STS policy of stsdane.test was never needed.
    assert_eq!(fetches.load(std::sync::atomic::Ordering::SeqCst), 0);
    // Metrics count sessions by policy and result.
    let metrics = crate::metrics::scrape(server.admin()).await;
    let sample = |name: &str| metrics.get(name).copied().unwrap_or(0.0);
    assert!(
        sample("tern_tls_policy_sessions_total{policy=\"dane\",result=\"ok\"}") >= 3.0,
        "{metrics:?}"
    );
    assert!(
        sample("tern_tls_policy_sessions_total{policy=\"dane\",result=\"tlsa-invalid\"}") >= 1.0,
        "{metrics:?}"
    );

    // TLS-RPT: eebad.test's report names the TLSA record and counts the failed session.
    let (status, body) = server.api("POST", "/api/v1/tls-reports/send", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["queued"], 2, "{body}");
    let got = reports.wait_for_messages(2, T).await;
    let about = |domain: &str| {
        got.iter()
            .find(|m| {
                String::from_utf8_lossy(&m.data)
                    .contains(&format!("TLS-Report-Domain: {domain}\r\n"))
            })
            .unwrap_or_else(|| panic!("a report about {domain}"))
    };
    // The bogus TLSA answer is reported as dnssec-invalid.
    let bogus_report = tls_report(&about("hostbogus.test").data, "hostbogus.test");
    assert_valid_tls_report(&bogus_report);
    let policy = &bogus_report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "tlsa", "{bogus_report}");
    assert_eq!(
        policy["failure-details"][0]["result-type"], "dnssec-invalid",
        "{bogus_report}"
    );
    let report = tls_report(&about("eebad.test").data, "eebad.test");
    assert_valid_tls_report(&report);
    let policy = &report["policies"][0];
    assert_eq!(policy["policy"]["policy-type"], "tlsa", "{report}");
    let record = format!("3 1 1 {}", hex(&sha256(&ee.spki)));
    assert_eq!(
        policy["policy"]["policy-string"][0],
        record.as_str(),
        "{report}"
    );
    assert_eq!(policy["policy"]["mx-host"][0], "mx.eebad.test");
    assert!(
        policy["summary"]["total-failure-session-count"]
            .as_u64()
            .unwrap()
            >= 1
    );
    assert_eq!(
        policy["failure-details"][0]["result-type"], "tlsa-invalid",
        "{report}"
    );
    assert_eq!(policy["failure-details"][0]["receiving-ip"], "127.0.9.2");
    server.stop().await;
}

fn hex(data: &[u8]) -> String {
    data.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_tls_levels_replace_the_discovered_policy() {
    let cert = self_signed("mx.x.test");
    let no_tls = mx_sink("127.0.9.11", SinkBehaviour::default()).await;
    let offers_tls = mx_sink("127.0.9.12", SinkBehaviour::default().starttls(cert.sink)).await;
    let untrusted = mx_sink("127.0.9.13", SinkBehaviour::default().starttls(cert.sink)).await;
    let no_tlsa = mx_sink("127.0.9.14", SinkBehaviour::default().starttls(cert.sink)).await;
    let static_dane = mx_sink("127.0.9.15", SinkBehaviour::default().starttls(cert.sink)).await;
    let mut zone = Zone::new().signed();
    for (domain, ip) in [
        ("encrypt.test", "127.0.9.11"),
        ("none.test", "127.0.9.12"),
        ("verify.test", "127.0.9.13"),
        ("daneonly.test", "127.0.9.14"),
    ] {
        zone = mx(zone, domain, ip);
    }
    // A static route's host under "dane": its TLSA record names another key.
    let elsewhere = self_signed("relay.example");
    zone = zone.a("relay.ds.test", "127.0.9.15").tlsa(
        "_25._tcp.relay.ds.test",
        3,
        1,
        1,
        &sha256(&elsewhere.spki),
    );
    // daneonly.test is signed, but its MX host has no TLSA record.
    zone = zone
        .insecure("encrypt.test")
        .insecure("none.test")
        .insecure("verify.test");
    let anchor = zone.trust_anchor();
    let dns = DnsServer::start(zone).await;
    let bounces = Sink::start(SinkBehaviour::default()).await;
    let level = |options: Options, domain: &str, tls: &str| {
        // A route without hosts: MX routing under its level.
        options
            .route(domain, "")
            .route_option(domain, "tls", format!("{tls:?}"))
    };
    let mut options = Options::default().route("sender.test", bounces.addr);
    for (domain, tls) in [
        ("encrypt.test", "encrypt"),
        ("none.test", "none"),
        ("verify.test", "verify"),
        ("daneonly.test", "dane-only"),
    ] {
        options = level(options, domain, tls);
    }
    options = options
        .route("ds.test", "relay.ds.test:25")
        .route_option("ds.test", "tls", "\"dane\"");
    let server = daemon(&dns, &anchor, options).await;
    for rcpt in [
        "e@ds.test",
        "a@encrypt.test",
        "b@none.test",
        "c@verify.test",
        "d@daneonly.test",
    ] {
        send(
            &server,
            &format!("<{SENDER}>"),
            &[&format!("<{rcpt}>")],
            &message(rcpt),
        )
        .await;
    }
    // none: sent in the clear although STARTTLS is offered.
    let got = offers_tls.wait_for_messages(1, T).await;
    assert!(!got[0].tls, "tls = none never starts TLS");
    assert_eq!(
        wait_outcome(&server, "b@none.test", "delivered").await["tls_policy"],
        "disabled"
    );
    // encrypt: no STARTTLS offered, so nothing is sent.
    let line = wait_outcome(&server, "a@encrypt.test", "deferred").await;
    assert_eq!(line["tls_policy"], "encrypt", "{line}");
    assert!(no_tls.messages().is_empty());
    // verify: the certificate does not chain to a trusted root.
    let line = wait_outcome(&server, "c@verify.test", "deferred").await;
    assert_eq!(line["tls_policy"], "required", "{line}");
    assert!(untrusted.messages().is_empty());
    // dane-only: a signed MX without TLSA records is not delivered to.
    let line = wait_outcome(&server, "d@daneonly.test", "deferred").await;
    assert_eq!(line["tls_policy"], "dane-only", "{line}");
    assert!(
        line["reply"]
            .as_str()
            .unwrap()
            .contains("no usable DNSSEC-signed TLSA"),
        "{line}"
    );
    assert!(no_tlsa.messages().is_empty());
    // dane on a static route: the named host's TLSA record decides.
    let line = wait_outcome(&server, "e@ds.test", "deferred").await;
    assert_eq!(line["tls_policy"], "dane", "{line}");
    assert!(
        line["reply"]
            .as_str()
            .unwrap()
            .contains("certificate matches no TLSA record"),
        "{line}"
    );
    assert!(static_dane.messages().is_empty());
    let metrics = crate::metrics::scrape(server.admin()).await;
    assert!(
        metrics
            .get("tern_tls_policy_sessions_total{policy=\"dane-only\",result=\"dane-required\"}")
            .is_some_and(|n| *n >= 1.0),
        "{metrics:?}"
    );
    server.stop().await;
}
