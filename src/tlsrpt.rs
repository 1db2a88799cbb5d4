//! SMTP TLS Reporting (RFC 8460): what tern's TLS sessions with the MX hosts of domains that
//! publish an MTA-STS policy or DANE TLSA records looked like, reported to those domains.
//!
//! The delivery worker records each new connection to such a domain's MX hosts
//! ([`TlsReports::success`], [`TlsReports::failure`] with an RFC 8460 result type) under the
//! policy it was made under ([`ReportPolicy`]: the domain's MTA-STS policy, `sts`, or one MX
//! host's TLSA records, `tlsa`); counts are kept per policy domain per UTC day, per policy, in
//! memory (a restart loses the day's counts so far).
//! [`TlsReports::reports`] (daily after midnight UTC, or now through the admin API) looks up
//! `_smtp._tls.<domain>` (`v=TLSRPTv1; rua=mailto:...`), and builds each day's report mail as
//! RFC 8460 3 says: a gzipped JSON attachment (`application/tlsrpt+gzip`) in a
//! `multipart/report; report-type="tlsrpt"` message with `TLS-Report-Domain` and
//! `TLS-Report-Submitter` headers, from `postmaster@<hostname>`; `https:` rua endpoints get
//! the gzipped JSON as `POST` with `Content-Type: application/tlsrpt+gzip` (certificate
//! verified; a failed post is logged, not retried).
//!
//! Invariants: at most [`MAX_DOMAINS`] domains are counted per day (the rest are not
//! reported, and logged once); a day is reported once, then forgotten.

use std::collections::{BTreeMap, HashMap};
use std::io::Write as _;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde_json::{json, Value};
use tern_queue::{BodyType, Recipient, Source};
use tracing::{info, warn};

use crate::message::Submission;
use crate::routing::dane::TlsaSet;
use crate::routing::dns::Resolver;
use crate::routing::sts::Policy;

/// Policy domains counted per day.
pub const MAX_DOMAINS: usize = 50_000;
/// One report POST, connect to answer.
pub const POST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// The policy a session was made under (RFC 8460 4.4 `policy-type`).
#[derive(Debug, Clone)]
pub enum ReportPolicy {
    /// The domain's MTA-STS policy: `sts`.
    Sts(Arc<Policy>),
    /// DANE: the TLSA records of `mx` (empty when they could not be validated): `tlsa`.
    Tlsa { mx: String, records: Arc<TlsaSet> },
}

impl ReportPolicy {
    /// One report entry per MTA-STS policy, one per MX host's TLSA RRset.
    fn key(&self) -> String {
        match self {
            ReportPolicy::Sts(_) => "sts".to_owned(),
            ReportPolicy::Tlsa { mx, .. } => format!("tlsa:{}", mx.to_ascii_lowercase()),
        }
    }
}

/// One domain's day: its policies' counts.
#[derive(Debug, Clone, Default)]
struct DomainDay {
    policies: BTreeMap<String, PolicyDay>,
}

/// One policy's day.
#[derive(Debug, Clone)]
struct PolicyDay {
    policy: ReportPolicy,
    /// MX host names seen.
    mx: std::collections::BTreeSet<String>,
    successes: u64,
    /// (result type, receiving MX host, receiving IP) -> sessions.
    failures: BTreeMap<(String, String, String), u64>,
}

/// The counts of the days not reported yet.
#[derive(Default)]
pub struct TlsReports {
    days: Mutex<HashMap<(String, u64), DomainDay>>,
}

fn today() -> u64 {
    crate::clock::now_ms() / 86_400_000
}

impl TlsReports {
    fn with_day(&self, domain: &str, policy: &ReportPolicy, f: impl FnOnce(&mut PolicyDay)) {
        let mut days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let key = (domain.to_ascii_lowercase(), today());
        if !days.contains_key(&key) && days.len() >= MAX_DOMAINS {
            return;
        }
        let day = days
            .entry(key)
            .or_default()
            .policies
            .entry(policy.key())
            .or_insert_with(|| PolicyDay {
                policy: policy.clone(),
                mx: Default::default(),
                successes: 0,
                failures: BTreeMap::new(),
            });
        // The latest policy (an MTA-STS policy may have been refreshed) is reported.
        day.policy = policy.clone();
        f(day);
    }

    /// A TLS session with `mx` (an MX host of `domain`, under `policy`) that met the policy.
    pub fn success(&self, domain: &str, policy: &ReportPolicy, mx: &str) {
        self.with_day(domain, policy, |d| {
            d.mx.insert(mx.to_ascii_lowercase());
            d.successes += 1;
        });
    }

    /// A session with `mx` at `ip` that failed as `result_type` (RFC 8460 4.3).
    pub fn failure(
        &self,
        domain: &str,
        policy: &ReportPolicy,
        result_type: &str,
        mx: &str,
        ip: &str,
    ) {
        self.with_day(domain, policy, |d| {
            d.mx.insert(mx.to_ascii_lowercase());
            *d.failures
                .entry((
                    result_type.to_owned(),
                    mx.to_ascii_lowercase(),
                    ip.to_owned(),
                ))
                .or_default() += 1;
        });
    }

    /// Takes the days to report: those before today, or all with `include_today`.
    fn take(&self, include_today: bool) -> Vec<(String, u64, DomainDay)> {
        let mut days = self.days.lock().unwrap_or_else(|e| e.into_inner());
        let now = today();
        let keys: Vec<(String, u64)> = days
            .keys()
            .filter(|(_, day)| include_today || *day < now)
            .cloned()
            .collect();
        keys.into_iter()
            .filter_map(|k| days.remove(&k).map(|d| (k.0, k.1, d)))
            .collect()
    }

    /// The report mails of the days before today (all of them with `include_today`) for
    /// every domain that asks for reports by mail, ready to enqueue; the days are forgotten.
    pub async fn reports(
        &self,
        include_today: bool,
        resolver: &dyn Resolver,
        hostname: &str,
    ) -> Reports {
        let mut out = Reports::default();
        for (domain, day, data) in self.take(include_today) {
            let rua = match resolver.txt(&format!("_smtp._tls.{domain}")).await {
                Ok(Some(records)) => records.iter().flat_map(|r| rua(r)).collect::<Vec<_>>(),
                _ => Vec::new(),
            };
            let mailto: Vec<String> = rua
                .iter()
                .filter_map(|u| u.strip_prefix("mailto:"))
                .map(|a| a.split('?').next().unwrap_or(a).to_owned())
                .collect();
            let https: Vec<String> = rua
                .iter()
                .filter(|u| u.starts_with("https://"))
                .cloned()
                .collect();
            if mailto.is_empty() && https.is_empty() {
                continue;
            }
            let report = report_json(&domain, day, &data, hostname);
            for url in https {
                out.posts.push((url, gzip(&report)));
            }
            if mailto.is_empty() {
                continue;
            }
            let message = report_message(&domain, day, &report, hostname);
            let submission = Submission {
                sender: format!("postmaster@{hostname}"),
                recipients: mailto.iter().map(|a| Recipient::new(a.clone())).collect(),
                env_id: None,
                ret: None,
                body_type: BodyType::SevenBit,
                smtputf8: false,
                source: Source {
                    client_ip: "127.0.0.1".into(),
                    helo: hostname.to_owned(),
                    auth_user: None,
                    protocol: "local".into(),
                },
                tls: None,
                content: message,
                sidecar: None,
                pool: None,
                trusted: false,
                unsubscribe: None,
            };
            info!(domain, rua = ?mailto, "TLS report ready");
            out.mails.push(submission);
        }
        out
    }
}

/// The reports due: mails to enqueue, and (URL, gzipped JSON) pairs to POST.
#[derive(Default)]
pub struct Reports {
    pub mails: Vec<Submission>,
    pub posts: Vec<(String, Vec<u8>)>,
}

fn gzip(report: &Value) -> Vec<u8> {
    let json = serde_json::to_vec(report).unwrap_or_default();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let _ = gz.write_all(&json);
    gz.finish().unwrap_or_default()
}

/// The counts with what turning them into report mails takes: the resolver for the
/// `_smtp._tls` records and our host name (organization and submitter).
pub struct TlsReporting {
    pub reports: Arc<TlsReports>,
    resolver: Arc<dyn Resolver>,
    hostname: String,
    /// Verifies `https:` report endpoints (web PKI roots and `delivery.ca_file`).
    tls: tokio_rustls::TlsConnector,
}

impl TlsReporting {
    pub fn new(
        reports: Arc<TlsReports>,
        resolver: Arc<dyn Resolver>,
        hostname: String,
        tls: tokio_rustls::TlsConnector,
    ) -> Self {
        TlsReporting {
            reports,
            resolver,
            hostname,
            tls,
        }
    }

    /// Posts the reports due to their `https:` endpoints (each within [`POST_TIMEOUT`];
    /// a failure is logged, the report is not retried) and returns the report mails to
    /// enqueue: see [`TlsReports::reports`].
    pub async fn due(&self, include_today: bool) -> Vec<Submission> {
        let reports = self
            .reports
            .reports(include_today, &*self.resolver, &self.hostname)
            .await;
        for (url, body) in reports.posts {
            match tokio::time::timeout(POST_TIMEOUT, self.post(&url, body)).await {
                Ok(Ok(status)) if (200..300).contains(&status) => {
                    info!(url, status, "TLS report posted")
                }
                Ok(Ok(status)) => warn!(url, status, "TLS report refused"),
                Ok(Err(err)) => warn!(url, error = %err, "cannot post a TLS report"),
                Err(_) => warn!(url, "posting a TLS report timed out"),
            }
        }
        reports.mails
    }

    /// `POST url` with `Content-Type: application/tlsrpt+gzip` (RFC 8460 3); the status.
    async fn post(&self, url: &str, body: Vec<u8>) -> Result<u16, String> {
        let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let host = uri
            .host()
            .ok_or_else(|| format!("{url}: no host"))?
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let ip = host.parse::<std::net::IpAddr>().ok();
        let (mut sender, driver) =
            crate::routing::sts::https_connection(&*self.resolver, &self.tls, &host, ip, port)
                .await?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        let request = hyper::Request::post(path)
            .header(hyper::header::HOST, &host)
            .header(hyper::header::CONTENT_TYPE, "application/tlsrpt+gzip")
            .header(hyper::header::USER_AGENT, "tern")
            .body(http_body_util::Full::new(hyper::body::Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let result = sender
            .send_request(request)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| format!("{host}: {e}"));
        driver.abort();
        result
    }

    /// How long until the next daily run: 5 minutes past the next UTC midnight.
    pub fn until_next_run() -> std::time::Duration {
        let now_ms = crate::clock::now_ms();
        let next = (now_ms / 86_400_000 + 1) * 86_400_000 + 300_000;
        std::time::Duration::from_millis(next - now_ms)
    }
}

/// The `rua` URIs of a `_smtp._tls` TXT record (`v=TLSRPTv1; rua=mailto:a@b.example,...`).
pub fn rua(record: &str) -> Vec<String> {
    let mut fields = record.split(';').map(str::trim);
    if fields.next() != Some("v=TLSRPTv1") {
        return Vec::new();
    }
    fields
        .filter_map(|f| f.strip_prefix("rua="))
        .flat_map(|list| list.split(','))
        .map(|u| u.trim().to_owned())
        .filter(|u| u.starts_with("mailto:") || u.starts_with("https:"))
        .collect()
}

fn day_bounds(day: u64) -> (String, String) {
    let start = jiff::Timestamp::from_second((day * 86_400) as i64).unwrap_or_default();
    let end = jiff::Timestamp::from_second((day * 86_400 + 86_399) as i64).unwrap_or_default();
    (
        start.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        end.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
    )
}

/// The report (RFC 8460 4.4) of one policy domain's day.
fn report_json(domain: &str, day: u64, data: &DomainDay, hostname: &str) -> Value {
    let (start, end) = day_bounds(day);
    let policies: Vec<Value> = data
        .policies
        .values()
        .map(|p| policy_json(domain, p))
        .collect();
    json!({
        "organization-name": hostname,
        "date-range": {"start-datetime": start, "end-datetime": end},
        "contact-info": format!("postmaster@{hostname}"),
        "report-id": format!("{start}_{domain}@{hostname}"),
        "policies": policies,
    })
}

fn policy_json(domain: &str, data: &PolicyDay) -> Value {
    let (policy_type, policy_string) = match &data.policy {
        ReportPolicy::Sts(p) => {
            let mut lines = vec![
                "version: STSv1".to_owned(),
                format!("mode: {}", p.mode.as_str()),
            ];
            lines.extend(p.mx.iter().map(|m| format!("mx: {m}")));
            lines.push(format!("max_age: {}", p.max_age));
            ("sts", lines)
        }
        ReportPolicy::Tlsa { records, .. } => ("tlsa", records.text.clone()),
    };
    let failed: u64 = data.failures.values().sum();
    let details: Vec<Value> = data
        .failures
        .iter()
        .map(|((result_type, mx, ip), n)| {
            let mut detail = json!({
                "result-type": result_type,
                "receiving-mx-hostname": mx,
                "failed-session-count": n,
            });
            // No address when the host was not connected to (a DANE lookup that failed).
            if !ip.is_empty() {
                detail["receiving-ip"] = json!(ip);
            }
            detail
        })
        .collect();
    json!({
        "policy": {
            "policy-type": policy_type,
            "policy-string": policy_string,
            "policy-domain": domain,
            "mx-host": data.mx.iter().collect::<Vec<_>>(),
        },
        "summary": {
            "total-successful-session-count": data.successes,
            "total-failure-session-count": failed,
        },
        "failure-details": details,
    })
}

/// The report mail (RFC 8460 3): the JSON gzipped as an attachment named
/// `submitter!policy-domain!begin!end.json.gz`.
fn report_message(domain: &str, day: u64, report: &Value, hostname: &str) -> Vec<u8> {
    let encoded = base64::engine::general_purpose::STANDARD.encode(gzip(report));
    let wrapped: Vec<&str> = encoded
        .as_bytes()
        .chunks(76)
        .map(|c| std::str::from_utf8(c).unwrap_or(""))
        .collect();
    let begin = day * 86_400;
    let name = format!("{hostname}!{domain}!{begin}!{}.json.gz", begin + 86_399);
    let boundary = format!("tlsrpt-{begin}-{}", domain.len());
    let date = crate::message::rfc5322_date(std::time::SystemTime::now());
    format!(
        "From: TLS reporting <postmaster@{hostname}>\r\n\
         Date: {date}\r\n\
         Subject: Report Domain: {domain} Submitter: {hostname} Report-ID: <{day}.{domain}@{hostname}>\r\n\
         TLS-Report-Domain: {domain}\r\n\
         TLS-Report-Submitter: {hostname}\r\n\
         Message-ID: <tlsrpt.{day}.{domain}@{hostname}>\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=\"tlsrpt\"; boundary=\"{boundary}\"\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: text/plain; charset=us-ascii\r\n\
         \r\n\
         This is an aggregate TLS report from {hostname} (RFC 8460).\r\n\
         \r\n\
         --{boundary}\r\n\
         Content-Type: application/tlsrpt+gzip\r\n\
         Content-Transfer-Encoding: base64\r\n\
         Content-Disposition: attachment; filename=\"{name}\"\r\n\
         \r\n\
         {}\r\n\
         --{boundary}--\r\n",
        wrapped.join("\r\n")
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::sts::Mode;

    #[test]
    fn rua_lists_mailto_and_https_uris_of_tlsrptv1_records_only() {
        assert_eq!(
            rua("v=TLSRPTv1; rua=mailto:tls@x.test,https://r.x.test/v1"),
            ["mailto:tls@x.test", "https://r.x.test/v1"]
        );
        assert!(rua("v=spf1 -all").is_empty());
        assert!(rua("v=TLSRPTv1; rua=ftp://x").is_empty());
    }

    #[test]
    fn the_report_counts_sessions_per_failure_and_names_the_policy() {
        let reports = TlsReports::default();
        let policy = ReportPolicy::Sts(Arc::new(Policy {
            mode: Mode::Enforce,
            mx: vec!["mx.x.test".into()],
            max_age: 86400,
        }));
        reports.success("x.test", &policy, "mx.x.test");
        for _ in 0..2 {
            reports.failure(
                "x.test",
                &policy,
                "certificate-not-trusted",
                "mx.x.test",
                "192.0.2.1",
            );
        }
        let taken = reports.take(true);
        assert_eq!(taken.len(), 1);
        let (domain, day, data) = &taken[0];
        let report = report_json(domain, *day, data, "tern.test");
        let p = &report["policies"][0];
        assert_eq!(p["policy"]["policy-type"], "sts");
        assert_eq!(p["policy"]["policy-string"][1], "mode: enforce");
        assert_eq!(p["summary"]["total-successful-session-count"], 1);
        assert_eq!(p["summary"]["total-failure-session-count"], 2);
        assert_eq!(
            p["failure-details"][0]["result-type"],
            "certificate-not-trusted"
        );
        assert!(reports.take(true).is_empty(), "a day is reported once");
    }

    #[test]
    fn dane_sessions_are_reported_per_mx_host_under_its_tlsa_records() {
        let reports = TlsReports::default();
        let tlsa = |mx: &str, text: &str| ReportPolicy::Tlsa {
            mx: mx.into(),
            records: Arc::new(TlsaSet {
                usable: Vec::new(),
                text: vec![text.into()],
            }),
        };
        reports.success("d.test", &tlsa("mx1.d.test", "3 1 1 aa"), "mx1.d.test");
        reports.failure(
            "d.test",
            &tlsa("mx2.d.test", "3 1 1 bb"),
            "tlsa-invalid",
            "mx2.d.test",
            "192.0.2.2",
        );
        let taken = reports.take(true);
        let (domain, day, data) = &taken[0];
        let report = report_json(domain, *day, data, "tern.test");
        let policies = report["policies"].as_array().unwrap();
        assert_eq!(policies.len(), 2, "one entry per MX host's TLSA RRset");
        assert_eq!(policies[0]["policy"]["policy-type"], "tlsa");
        assert_eq!(policies[0]["policy"]["policy-string"][0], "3 1 1 aa");
        assert_eq!(policies[0]["summary"]["total-successful-session-count"], 1);
        assert_eq!(policies[1]["policy"]["mx-host"][0], "mx2.d.test");
        assert_eq!(
            policies[1]["failure-details"][0]["result-type"],
            "tlsa-invalid"
        );
    }
}
