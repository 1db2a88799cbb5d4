//! MTA-STS (RFC 8461): the receiving domain's published policy on which MX hosts may get its
//! mail and whether TLS with a verified certificate is required.
//!
//! A domain opts in with a TXT record at `_mta-sts.<domain>` (`v=STSv1; id=...`) and the
//! policy file `https://mta-sts.<domain>/.well-known/mta-sts.txt` (`version: STSv1`,
//! `mode: enforce|testing|none`, `mx: <pattern>` lines, `max_age: <seconds>`). [`Sts`] fetches
//! and caches policies; [`crate::routing::Router::plan`] applies them:
//! - `enforce`: only MX hosts the policy names are tried, and only over TLS whose certificate
//!   chains to a trusted root and is valid for the MX host name (a plan with
//!   `TlsPolicy::Required`); no such host, or no such TLS, defers (4.7.5 / 4.7.4) instead of
//!   delivering without it.
//! - `testing` and `none`: delivered as without a policy.
//!
//! Invariants: a cached policy is used until its `max_age` runs out, whatever DNS says
//! meanwhile (RFC 8461 5.1: a removed TXT record or an unreachable policy host must not turn
//! enforcement off); a TXT `id` different from the cached one fetches the policy again; a
//! failed fetch keeps the cached policy, or means "no policy" for [`NEGATIVE_TTL`]. Fetches
//! follow no redirect, read at most [`MAX_POLICY_BYTES`], and end within [`FETCH_TIMEOUT`]:
//! a slow policy host delays only its own domain's plans. The cache holds at most
//! [`MAX_DOMAINS`] domains (expired entries go first, then arbitrary ones: a forgotten policy
//! is fetched again). Lookups of a cached policy never touch the network, so the per-message
//! path is a map lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::dns::Resolver;

/// How long "this domain has no (usable) policy" is remembered.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(300);
/// Largest policy file read (RFC 8461 3.3 suggests 64 KiB).
pub const MAX_POLICY_BYTES: usize = 64 * 1024;
/// A whole policy fetch: TXT lookup, connect, TLS, request, body.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Domains cached at once.
pub const MAX_DOMAINS: usize = 100_000;
/// RFC 8461 3.2: max_age is at most 31557600 (about a year).
const MAX_AGE_LIMIT: u64 = 31_557_600;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Enforce,
    Testing,
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Testing => "testing",
            Mode::None => "none",
        }
    }
}

/// A domain's policy, as fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    /// MX patterns, lowercase: `mail.example.com` or `*.example.com`.
    pub mx: Vec<String>,
    pub max_age: u64,
}

impl Policy {
    /// Whether MX host `host` is one the policy allows (RFC 8461 4.1: a `*.` pattern stands
    /// for exactly one leftmost label).
    pub fn allows(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.mx
            .iter()
            .any(|pattern| match pattern.strip_prefix("*.") {
                Some(suffix) => host
                    .split_once('.')
                    .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
                None => host == *pattern,
            })
    }
}

/// Parses a policy file (RFC 8461 3.2). Unknown keys are ignored; `version`, `mode` and
/// `max_age` are required, and `mx` unless the mode is `none`.
pub fn parse_policy(text: &str) -> Result<Policy, String> {
    let mut version = None;
    let mut mode = None;
    let mut mx = Vec::new();
    let mut max_age = None;
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match key.trim() {
            "version" => version = Some(value.to_owned()),
            "mode" => {
                mode = Some(match value {
                    "enforce" => Mode::Enforce,
                    "testing" => Mode::Testing,
                    "none" => Mode::None,
                    other => return Err(format!("unknown mode {other:?}")),
                })
            }
            "mx" => mx.push(value.trim_end_matches('.').to_ascii_lowercase()),
            "max_age" => {
                let age: u64 = value
                    .parse()
                    .map_err(|_| format!("max_age {value:?} is not a number"))?;
                max_age = Some(age.min(MAX_AGE_LIMIT));
            }
            _ => {}
        }
    }
    if version.as_deref() != Some("STSv1") {
        return Err("no \"version: STSv1\"".to_owned());
    }
    let mode = mode.ok_or("no mode")?;
    let max_age = max_age.ok_or("no max_age")?;
    if mode != Mode::None && mx.is_empty() {
        return Err("no mx".to_owned());
    }
    Ok(Policy { mode, mx, max_age })
}

/// The `id` of a `_mta-sts` TXT record (`v=STSv1; id=20260101T000000;`), if it is one.
pub fn txt_id(record: &str) -> Option<String> {
    let mut fields = record.split(';').map(str::trim);
    if fields.next()? != "v=STSv1" {
        return None;
    }
    fields.find_map(|f| {
        let id = f.strip_prefix("id=")?;
        (!id.is_empty() && id.len() <= 32 && id.bytes().all(|b| b.is_ascii_alphanumeric()))
            .then(|| id.to_owned())
    })
}

enum Cached {
    Policy {
        id: String,
        policy: Arc<Policy>,
        expires: Instant,
    },
    Nothing {
        until: Instant,
    },
}

/// Fetches and caches MTA-STS policies.
pub struct Sts {
    resolver: Arc<dyn Resolver>,
    tls: TlsConnector,
    /// The HTTPS port of policy hosts (443; tests may use another).
    port: u16,
    cache: Mutex<HashMap<String, Cached>>,
}

impl Sts {
    /// `tls` verifies policy hosts' certificates (the web PKI roots, plus any extra CAs the
    /// operator trusts).
    pub fn new(resolver: Arc<dyn Resolver>, tls: TlsConnector) -> Sts {
        Sts {
            resolver,
            tls,
            port: 443,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The policy of `domain` (lowercase) that applies now, if any: from the cache, else
    /// looked up and fetched within [`FETCH_TIMEOUT`].
    pub async fn policy(&self, domain: &str) -> Option<Arc<Policy>> {
        let now = Instant::now();
        let cached_id = {
            let cache = self.lock();
            match cache.get(domain) {
                Some(Cached::Nothing { until }) if *until > now => return None,
                Some(Cached::Policy { id, expires, .. }) if *expires > now => Some(id.clone()),
                _ => None,
            }
        };
        let fetched = tokio::time::timeout(FETCH_TIMEOUT, self.refresh(domain, cached_id)).await;
        let mut cache = self.lock();
        match fetched {
            Ok(Refresh::Unchanged) => {}
            Ok(Refresh::New(id, policy)) => {
                let policy = Arc::new(policy);
                let expires = now + Duration::from_secs(policy.max_age);
                self.insert(
                    &mut cache,
                    domain,
                    Cached::Policy {
                        id,
                        policy,
                        expires,
                    },
                );
            }
            Ok(Refresh::Failed(why)) => {
                tracing::debug!(domain, why, "no MTA-STS policy");
                self.keep_or_forget(&mut cache, domain, now);
            }
            Err(_) => {
                tracing::debug!(domain, "MTA-STS lookup timed out");
                self.keep_or_forget(&mut cache, domain, now);
            }
        }
        match cache.get(domain) {
            Some(Cached::Policy {
                policy, expires, ..
            }) if *expires > now => Some(policy.clone()),
            _ => None,
        }
    }

    /// The cached, unexpired policy of `domain`, without any lookup.
    pub fn cached(&self, domain: &str) -> Option<Arc<Policy>> {
        match self.lock().get(domain) {
            Some(Cached::Policy {
                policy, expires, ..
            }) if *expires > Instant::now() => Some(policy.clone()),
            _ => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// After a failed refresh: an unexpired cached policy stays; otherwise "nothing" for a
    /// while.
    fn keep_or_forget(&self, cache: &mut HashMap<String, Cached>, domain: &str, now: Instant) {
        let keep =
            matches!(cache.get(domain), Some(Cached::Policy { expires, .. }) if *expires > now);
        if !keep {
            let until = now + NEGATIVE_TTL;
            self.insert(cache, domain, Cached::Nothing { until });
        }
    }

    fn insert(&self, cache: &mut HashMap<String, Cached>, domain: &str, entry: Cached) {
        if cache.len() >= MAX_DOMAINS && !cache.contains_key(domain) {
            let now = Instant::now();
            cache.retain(|_, c| match c {
                Cached::Policy { expires, .. } => *expires > now,
                Cached::Nothing { until } => *until > now,
            });
            if cache.len() >= MAX_DOMAINS {
                if let Some(victim) = cache.keys().next().cloned() {
                    cache.remove(&victim);
                }
            }
        }
        cache.insert(domain.to_owned(), entry);
    }

    /// The TXT record, then (when its id is new) the policy file.
    async fn refresh(&self, domain: &str, cached_id: Option<String>) -> Refresh {
        let records = match self.resolver.txt(&format!("_mta-sts.{domain}")).await {
            Ok(Some(records)) => records,
            Ok(None) => return Refresh::Failed("no _mta-sts TXT record".to_owned()),
            Err(why) => return Refresh::Failed(format!("TXT lookup: {why}")),
        };
        let ids: Vec<String> = records.iter().filter_map(|r| txt_id(r)).collect();
        // RFC 8461 3.1: exactly one STSv1 record.
        let [id] = ids.as_slice() else {
            return Refresh::Failed(format!("{} STSv1 TXT records", ids.len()));
        };
        if cached_id.as_ref() == Some(id) {
            return Refresh::Unchanged;
        }
        match self.fetch(domain).await {
            Ok(policy) => Refresh::New(id.clone(), policy),
            Err(why) => Refresh::Failed(why),
        }
    }

    /// `GET https://mta-sts.<domain>/.well-known/mta-sts.txt`: 200, text/plain, no redirect.
    async fn fetch(&self, domain: &str) -> Result<Policy, String> {
        let host = format!("mta-sts.{domain}");
        let (mut sender, driver) =
            https_connection(&*self.resolver, &self.tls, &host, None, self.port).await?;
        let request = hyper::Request::get("/.well-known/mta-sts.txt")
            .header(hyper::header::HOST, &host)
            .header(hyper::header::USER_AGENT, "tern")
            .body(Empty::<Bytes>::new())
            .map_err(|e| e.to_string())?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("{host}: {e}"))?;
        let result = async {
            if response.status() != hyper::StatusCode::OK {
                return Err(format!(
                    "{host}: HTTP {} (redirects are not followed)",
                    response.status()
                ));
            }
            let text_plain = response
                .headers()
                .get(hyper::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.trim().to_ascii_lowercase().starts_with("text/plain"));
            if !text_plain {
                return Err(format!("{host}: the policy is not text/plain"));
            }
            let body = Limited::new(response.into_body(), MAX_POLICY_BYTES)
                .collect()
                .await
                .map_err(|e| format!("{host}: {e}"))?
                .to_bytes();
            let text = std::str::from_utf8(&body).map_err(|_| format!("{host}: not UTF-8"))?;
            parse_policy(text).map_err(|e| format!("{host}: {e}"))
        }
        .await;
        driver.abort();
        result
    }
}

/// An HTTP/1.1 connection over verified TLS to `host` (at `ip`, else its first address) on
/// `port`: the request sender and the task driving the connection (abort it when done).
/// Shared by policy fetches and TLS-RPT report posts.
pub async fn https_connection<B>(
    resolver: &dyn Resolver,
    tls: &TlsConnector,
    host: &str,
    ip: Option<std::net::IpAddr>,
    port: u16,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<B>,
        tokio::task::JoinHandle<hyper::Result<()>>,
    ),
    String,
>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let ip = match ip {
        Some(ip) => ip,
        None => *resolver
            .addresses(host)
            .await
            .map_err(|e| format!("{host}: {e}"))?
            .first()
            .ok_or_else(|| format!("{host}: no address"))?,
    };
    let tcp = TcpStream::connect((ip, port))
        .await
        .map_err(|e| format!("{host}: {e}"))?;
    let name = ServerName::try_from(host.to_owned()).map_err(|e| e.to_string())?;
    let tls = tls
        .connect(name, tcp)
        .await
        .map_err(|e| format!("{host}: TLS: {e}"))?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| format!("{host}: {e}"))?;
    Ok((sender, tokio::spawn(connection)))
}

enum Refresh {
    /// The TXT id is the cached policy's.
    Unchanged,
    New(String, Policy),
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_parse_per_rfc_8461() {
        let p = parse_policy(
            "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.Example.net.\r\nmax_age: 86400\r\nextension: x\r\n",
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Enforce);
        assert_eq!(p.mx, ["mail.example.com", "*.example.net"]);
        assert_eq!(p.max_age, 86400);
        assert!(parse_policy("version: STSv1\nmode: none\nmax_age: 1\n").is_ok());
        assert!(parse_policy("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n").is_err());
        assert!(parse_policy("version: STSv1\nmode: enforce\nmax_age: 1\n").is_err());
        assert!(parse_policy("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n").is_err());
        assert_eq!(
            parse_policy("version: STSv1\nmode: testing\nmx: a\nmax_age: 99999999999\n")
                .unwrap()
                .max_age,
            MAX_AGE_LIMIT
        );
    }

    #[test]
    fn a_wildcard_stands_for_exactly_one_label() {
        let p = Policy {
            mode: Mode::Enforce,
            mx: vec!["*.example.net".into(), "mail.example.com".into()],
            max_age: 1,
        };
        assert!(p.allows("mx1.example.net"));
        assert!(p.allows("MX1.Example.NET."));
        assert!(!p.allows("a.mx1.example.net"));
        assert!(!p.allows("example.net"));
        assert!(p.allows("mail.example.com"));
        assert!(!p.allows("evil-mail.example.com"));
    }

    #[test]
    fn txt_records_name_their_id() {
        assert_eq!(
            txt_id("v=STSv1; id=20260101T000000;").as_deref(),
            Some("20260101T000000")
        );
        assert_eq!(txt_id("v=STSv1;id=abc").as_deref(), Some("abc"));
        assert_eq!(txt_id("v=spf1 -all"), None);
        assert_eq!(txt_id("v=STSv1; id=bad-id!"), None);
    }
}
