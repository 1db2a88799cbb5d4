//! The outbound sections: `[delivery]` (scheduler, retries, SMTP client, DNS, delivery log),
//! the per-route TLS policy and smarthost credentials, and `[[dkim]]` signing keys.
//!
//! Only syntax and ranges are checked here; DKIM key files are loaded and checked by
//! `delivery::dkim` at start (and by `check-config`), like TLS files.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use toml::Value;

use super::reader::{count, duration, nonzero, string, TableReader};
use super::{check_dns_name, path};

#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryConfig {
    /// Start with delivery suspended: mail is accepted and spooled, nothing is attempted.
    /// Default false.
    pub suspended: bool,
    /// First retry delay after a temporary failure. Default 5m.
    pub retry_initial: Duration,
    /// Longest retry delay. Default 4h.
    pub retry_max: Duration,
    /// Each retry delay is the previous one times this, capped at `retry_max`. Default 2.
    pub retry_factor: u32,
    /// Send one "delayed" DSN (for recipients that asked with NOTIFY=DELAY, the default) once
    /// a message has been undelivered this long. Default 4h; `"off"` disables.
    pub delay_notice_after: Option<Duration>,
    /// Concurrent outbound connections per destination (MX host set). Default 16.
    pub max_connections_per_destination: usize,
    /// Messages sent over one connection before it is closed. Default 100.
    pub max_messages_per_connection: usize,
    /// How long an idle outbound connection is kept for reuse. Default 30s.
    pub idle_timeout: Duration,
    /// Idle outbound connections kept for reuse at most, all destinations together; putting
    /// one more closes the one idle longest. Default 1000.
    pub max_idle_connections: usize,
    /// Default STARTTLS policy for destinations without a route of their own. Default
    /// opportunistic.
    pub tls: TlsPolicy,
    /// After a failed TLS handshake, how long a host is sent plain text (opportunistic TLS
    /// only). Default 1h.
    pub broken_tls_retry: Duration,
    pub timeouts: SmtpTimeouts,
    /// DNS servers (IP:port) for MX and address lookups. Default: empty, use /etc/resolv.conf.
    pub nameservers: Vec<SocketAddr>,
    /// Deliver to loopback, unspecified, link-local and multicast addresses even when the
    /// recipient's domain (MX, A/AAAA, an address literal) named them; tern's own listeners
    /// stay refused. For tests and labs only. Default false.
    pub allow_local_mx: bool,
    /// Apply receivers' MTA-STS policies (RFC 8461) to MX-routed mail. Default true.
    pub mta_sts: bool,
    /// DANE (RFC 7672) for MX-routed mail: a DNSSEC-validating resolver looks up TLSA
    /// records of MX hosts whose MX answer is secure. Default false (it needs a resolver path
    /// that passes DNSSEC records; see OPERATIONS).
    pub dane: bool,
    /// DNSKEY records (zone-file form) to validate DNSSEC from instead of the root KSKs.
    /// Default none (the built-in root anchors).
    pub dnssec_trust_anchor: Option<PathBuf>,
    /// Extra trusted CAs (PEM) for verified TLS: `tls = "required"` routes, MTA-STS
    /// enforcement and policy fetches, besides the system bundle. Default none.
    pub ca_file: Option<PathBuf>,
    /// Check at start and daily that DNS publishes every `[[dkim]]` key
    /// (`tern_dkim_key_published`). Default true.
    pub check_dkim_records: bool,
    /// One JSON line per delivery attempt. Default `./data/delivery.log`; `"off"` disables.
    pub log_path: Option<PathBuf>,
    /// A destination with ready mail and no finished attempt for this long is reported and
    /// its workers restarted. Default 5m.
    pub watchdog: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            suspended: false,
            retry_initial: Duration::from_secs(5 * 60),
            retry_max: Duration::from_secs(4 * 3600),
            retry_factor: 2,
            delay_notice_after: Some(Duration::from_secs(4 * 3600)),
            max_connections_per_destination: 16,
            max_messages_per_connection: 100,
            idle_timeout: Duration::from_secs(30),
            max_idle_connections: 1000,
            tls: TlsPolicy::Opportunistic,
            broken_tls_retry: Duration::from_secs(3600),
            timeouts: SmtpTimeouts::default(),
            nameservers: Vec::new(),
            allow_local_mx: false,
            mta_sts: true,
            dane: false,
            dnssec_trust_anchor: None,
            ca_file: None,
            check_dkim_records: true,
            log_path: Some(PathBuf::from("./data/delivery.log")),
            watchdog: Duration::from_secs(5 * 60),
        }
    }
}

/// Client-side SMTP timeouts; the defaults are RFC 5321 4.5.3.2's minimums.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SmtpTimeouts {
    /// TCP connect. Default 30s.
    pub connect: Duration,
    /// Waiting for the 220 greeting. Default 5m.
    pub greeting: Duration,
    /// EHLO/HELO, STARTTLS and AUTH replies, and the TLS handshake. Default 5m.
    pub ehlo: Duration,
    /// MAIL FROM reply. Default 5m.
    pub mail: Duration,
    /// Each RCPT TO reply. Default 5m.
    pub rcpt: Duration,
    /// The 354 reply to DATA. Default 2m.
    pub data_init: Duration,
    /// Writing each block of message data. Default 3m.
    pub data_block: Duration,
    /// The reply after the final dot. Default 10m.
    pub data_end: Duration,
}

impl Default for SmtpTimeouts {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(n * 60);
        SmtpTimeouts {
            connect: Duration::from_secs(30),
            greeting: m(5),
            ehlo: m(5),
            mail: m(5),
            rcpt: m(5),
            data_init: m(2),
            data_block: m(3),
            data_end: m(10),
        }
    }
}

/// A TLS security level, named as Postfix's `smtp_tls_security_level` names them (the older
/// tern names are accepted too). `delivery.tls` is the level of mail no receiver policy
/// covers; a route's `tls` replaces whatever would have been discovered (DANE, MTA-STS).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// `"may"` (or `"opportunistic"`): STARTTLS when offered, certificate not verified
    /// (RFC 7435); on a TLS failure, retry in plain text and remember the host for
    /// `broken_tls_retry`.
    Opportunistic,
    /// `"verify"`, `"secure"` (or `"required"`): no delivery without STARTTLS and a
    /// certificate valid for the host name.
    Required,
    /// `"none"` (or `"disabled"`): never STARTTLS.
    Disabled,
    /// `"encrypt"`: no delivery without STARTTLS; the certificate is not verified.
    Encrypt,
    /// `"dane"`: DANE (RFC 7672) where the MX answer and the host's TLSA records are
    /// DNSSEC-secure, otherwise `may`.
    Dane,
    /// `"dane-only"`: DANE or nothing: a host without secure usable TLSA records is not used.
    DaneOnly,
    /// `"mta-sts"`: the domain's MTA-STS policy (RFC 8461), otherwise `may`; no DANE.
    MtaSts,
}

impl TlsPolicy {
    /// The level's name in the config, the delivery log (`tls_policy`) and metrics.
    pub fn name(self) -> &'static str {
        match self {
            TlsPolicy::Opportunistic => "opportunistic",
            TlsPolicy::Required => "required",
            TlsPolicy::Disabled => "disabled",
            TlsPolicy::Encrypt => "encrypt",
            TlsPolicy::Dane => "dane",
            TlsPolicy::DaneOnly => "dane-only",
            TlsPolicy::MtaSts => "mta-sts",
        }
    }

    /// Whether a session without STARTTLS is refused.
    pub fn mandatory(self) -> bool {
        matches!(
            self,
            TlsPolicy::Required | TlsPolicy::Encrypt | TlsPolicy::Dane | TlsPolicy::DaneOnly
        )
    }
}

/// Credentials for a smarthost route. The password must be stored in a form we can send, so
/// it is read from a file (`password_file`) rather than written into the config.
#[derive(Clone, PartialEq, Eq)]
pub struct RouteAuth {
    pub username: String,
    pub password_file: PathBuf,
}

impl fmt::Debug for RouteAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RouteAuth")
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .finish()
    }
}

/// One DKIM signing key: mail whose From domain is `domain` is signed with it. Several
/// entries for one domain give several signatures (e.g. RSA and Ed25519).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimConfig {
    pub domain: String,
    pub selector: String,
    /// PEM private key: RSA (2048 bits or more) or Ed25519 (PKCS#8); the algorithm follows
    /// the key.
    pub key_path: PathBuf,
    /// Header fields to sign, lowercase. `From` is always included.
    pub headers: Vec<String>,
    /// Header fields signed once more than they occur, so none can be added in transit.
    pub oversign: Vec<String>,
    /// Key rotation: the key signs from this time on (unix seconds); `None`: from the start.
    pub active_from: Option<u64>,
    /// Key rotation: the key signs until this time (unix seconds); `None`: for good.
    pub retire_after: Option<u64>,
}

impl DkimConfig {
    /// Whether the key signs at `now` (unix seconds): within `[active_from, retire_after)`.
    pub fn active_at(&self, now: u64) -> bool {
        self.active_from.is_none_or(|t| t <= now) && self.retire_after.is_none_or(|t| now < t)
    }
}

/// An RFC 3339 time with an offset (a TOML datetime or a string), as unix seconds.
fn timestamp(v: &Value) -> Result<u64, String> {
    let text = match v {
        Value::Datetime(d) => d.to_string(),
        Value::String(s) => s.clone(),
        _ => return Err("expected an RFC 3339 time, e.g. 2027-01-15T00:00:00Z".to_owned()),
    };
    let t: jiff::Timestamp = text
        .parse()
        .map_err(|e| format!("{text:?}: expected an RFC 3339 time with an offset ({e})"))?;
    u64::try_from(t.as_second()).map_err(|_| format!("{text:?}: before 1970"))
}

/// Headers signed by default: the ones a reader sees or a filter judges.
pub const DEFAULT_DKIM_HEADERS: &[&str] = &[
    "from",
    "to",
    "cc",
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
];

/// Over-signed by default (RFC 6376 8.15 / 5.4).
pub const DEFAULT_DKIM_OVERSIGN: &[&str] = &[
    "from",
    "subject",
    "to",
    "date",
    "list-unsubscribe",
    "list-unsubscribe-post",
    "feedback-id",
];

pub(super) fn compile_delivery(r: &mut TableReader<'_>) -> DeliveryConfig {
    let d = DeliveryConfig::default();
    let positive_duration = |v: &Value| duration(v).and_then(nonzero);
    let positive_count = |v: &Value| count(v).and_then(nonzero);
    let retry_initial = r
        .get("retry_initial", positive_duration)
        .unwrap_or(d.retry_initial);
    let retry_max = r.get("retry_max", positive_duration).unwrap_or(d.retry_max);
    if retry_max < retry_initial {
        r.error("retry_max", "must not be shorter than retry_initial");
    }
    let retry_factor = r
        .get("retry_factor", |v| match count(v)? {
            n @ 1..=10 => Ok(n as u32),
            _ => Err("must be between 1 and 10".to_owned()),
        })
        .unwrap_or(d.retry_factor);
    let delay_notice_after = r
        .get("delay_notice_after", off_or(positive_duration))
        .unwrap_or(d.delay_notice_after);
    let timeouts = r.section("timeouts", compile_timeouts);
    DeliveryConfig {
        suspended: r
            .get("suspended", |v| {
                v.as_bool()
                    .ok_or_else(|| "expected true or false".to_owned())
            })
            .unwrap_or(d.suspended),
        retry_initial,
        retry_max,
        retry_factor,
        delay_notice_after,
        max_connections_per_destination: r
            .get("max_connections_per_destination", positive_count)
            .unwrap_or(d.max_connections_per_destination),
        max_messages_per_connection: r
            .get("max_messages_per_connection", positive_count)
            .unwrap_or(d.max_messages_per_connection),
        idle_timeout: r.get("idle_timeout", duration).unwrap_or(d.idle_timeout),
        max_idle_connections: r
            .get("max_idle_connections", count)
            .unwrap_or(d.max_idle_connections),
        tls: r.get("tls", default_tls_policy).unwrap_or(d.tls),
        broken_tls_retry: r
            .get("broken_tls_retry", duration)
            .unwrap_or(d.broken_tls_retry),
        timeouts,
        nameservers: r
            .list("nameservers", |v| {
                let s = string(v)?;
                s.parse::<SocketAddr>()
                    .or_else(|_| {
                        s.parse::<std::net::IpAddr>()
                            .map(|ip| SocketAddr::new(ip, 53))
                    })
                    .map_err(|_| format!("invalid nameserver {s:?} (expected IP or IP:port)"))
            })
            .unwrap_or(d.nameservers),
        allow_local_mx: r
            .get("allow_local_mx", |v| {
                v.as_bool()
                    .ok_or_else(|| "expected true or false".to_owned())
            })
            .unwrap_or(d.allow_local_mx),
        mta_sts: r
            .get("mta_sts", super::bounce::boolean)
            .unwrap_or(d.mta_sts),
        dane: r.get("dane", super::bounce::boolean).unwrap_or(d.dane),
        dnssec_trust_anchor: r.get("dnssec_trust_anchor", super::path),
        ca_file: r.get("ca_file", super::path),
        check_dkim_records: r
            .get("check_dkim_records", super::bounce::boolean)
            .unwrap_or(d.check_dkim_records),
        log_path: r.get("log_path", off_or(super::path)).unwrap_or(d.log_path),
        watchdog: r.get("watchdog", positive_duration).unwrap_or(d.watchdog),
    }
}

fn compile_timeouts(r: &mut TableReader<'_>) -> SmtpTimeouts {
    let d = SmtpTimeouts::default();
    let mut get = |key: &'static str, default: Duration| {
        r.get(key, |v| duration(v).and_then(nonzero))
            .unwrap_or(default)
    };
    SmtpTimeouts {
        connect: get("connect", d.connect),
        greeting: get("greeting", d.greeting),
        ehlo: get("ehlo", d.ehlo),
        mail: get("mail", d.mail),
        rcpt: get("rcpt", d.rcpt),
        data_init: get("data_init", d.data_init),
        data_block: get("data_block", d.data_block),
        data_end: get("data_end", d.data_end),
    }
}

/// A converter that also accepts the string `"off"`, as `None`.
fn off_or<T>(
    convert: impl Fn(&Value) -> Result<T, String>,
) -> impl Fn(&Value) -> Result<Option<T>, String> {
    move |v| match v.as_str() {
        Some("off") => Ok(None),
        _ => convert(v).map(Some),
    }
}

/// Any level, for a route's `tls`.
pub(super) fn tls_policy(v: &Value) -> Result<TlsPolicy, String> {
    match string(v)? {
        "may" | "opportunistic" => Ok(TlsPolicy::Opportunistic),
        "verify" | "secure" | "required" => Ok(TlsPolicy::Required),
        "none" | "disabled" => Ok(TlsPolicy::Disabled),
        "encrypt" => Ok(TlsPolicy::Encrypt),
        "dane" => Ok(TlsPolicy::Dane),
        "dane-only" => Ok(TlsPolicy::DaneOnly),
        "mta-sts" => Ok(TlsPolicy::MtaSts),
        other => Err(format!(
            "unknown TLS policy {other:?} (expected a level: \"none\", \"may\", \"encrypt\", \"dane\", \"dane-only\", \"mta-sts\", \"verify\" or \"secure\")"
        )),
    }
}

/// `delivery.tls`: the level of mail no receiver policy covers. DANE and MTA-STS are
/// switched on with `delivery.dane` / `delivery.mta_sts`, so they are not levels here.
fn default_tls_policy(v: &Value) -> Result<TlsPolicy, String> {
    match tls_policy(v)? {
        TlsPolicy::Dane | TlsPolicy::DaneOnly | TlsPolicy::MtaSts => Err(
            "DANE and MTA-STS are switched on with delivery.dane and delivery.mta_sts; use them on a route's tls".to_owned(),
        ),
        level => Ok(level),
    }
}

pub(super) fn compile_route_auth(r: &mut TableReader<'_>) -> Option<RouteAuth> {
    let username = r.require("username", |v| match string(v)? {
        "" => Err("must not be empty".to_owned()),
        u => Ok(u.to_owned()),
    });
    r.reject(
        "password",
        "write the password into a file readable only by tern and name it in password_file",
    );
    let password_file = r.require("password_file", path);
    Some(RouteAuth {
        username: username?,
        password_file: password_file?,
    })
}

pub(super) fn compile_dkim(r: &mut TableReader<'_>) -> Option<DkimConfig> {
    let domain = r.require("domain", |v| {
        let d = string(v)?;
        check_dns_name(d).map(|()| d.to_ascii_lowercase())
    });
    // A selector is DNS labels too, but all-digit ones (dates like 20240101) are common.
    let selector = r.require("selector", |v| {
        let s = string(v)?;
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        if s.split('.').all(label_ok) {
            Ok(s.to_owned())
        } else {
            Err(format!(
                "invalid selector {s:?}: dot-separated letters, digits and '-'"
            ))
        }
    });
    let key_path = r.require("key", path);
    let header_name = |v: &Value| {
        let h = string(v)?;
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
            return Err(format!("invalid header name {h:?}"));
        }
        Ok(h.to_ascii_lowercase())
    };
    let mut headers = r
        .list("headers", header_name)
        .unwrap_or_else(|| DEFAULT_DKIM_HEADERS.iter().map(|h| h.to_string()).collect());
    if !headers.iter().any(|h| h == "from") {
        headers.insert(0, "from".to_owned());
    }
    let oversign = r.list("oversign", header_name).unwrap_or_else(|| {
        DEFAULT_DKIM_OVERSIGN
            .iter()
            .map(|h| h.to_string())
            .collect()
    });
    let active_from = r.get("active_from", timestamp);
    let retire_after = r.get("retire_after", timestamp);
    if let (Some(from), Some(until)) = (active_from, retire_after) {
        if until <= from {
            r.error("retire_after", "must be later than active_from");
        }
    }
    Some(DkimConfig {
        domain: domain?,
        selector: selector?,
        key_path: key_path?,
        headers,
        oversign,
        active_from,
        retire_after,
    })
}
