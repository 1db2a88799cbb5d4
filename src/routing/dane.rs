//! DANE for SMTP (RFC 7672): the DNSSEC-validating lookups that decide whether a recipient
//! domain's MX hosts must be reached over TLS authenticated by TLSA records (RFC 6698/7671).
//!
//! [`Dane`] owns a second hickory resolver, with DNSSEC validation on, anchored at the root
//! KSKs (or at `delivery.dnssec_trust_anchor`), and asks it three things:
//! - [`Dane::mx_security`]: is the domain's MX answer secure, insecure, or bogus?
//! - [`Dane::host`]: for an MX host of a secure MX answer, are its address records secure,
//!   and if so, what do its `_port._tcp.host` TLSA records say?
//!
//! Invariants:
//! - Only secure answers turn DANE on. Insecure answers (an unsigned zone, or one below an
//!   insecure delegation) mean "no DANE" and delivery falls through to MTA-STS or the default;
//!   bogus or indeterminate ones (a signature that fails, a lookup that cannot complete) are
//!   never treated as insecure: the MX answer defers the domain, a host answer makes the host
//!   unusable ([`DaneHost::Bogus`]), since downgrading there is exactly what an attacker wants.
//! - Only DANE-TA(2) and DANE-EE(3) records with selector 0/1 and matching type 0/1/2 are
//!   usable (RFC 7672 3.1.3: PKIX-TA/EE are not for SMTP); a TLSA RRset with none usable still
//!   makes TLS mandatory, unauthenticated (RFC 7672 2.2).
//! - Host results are cached for their TTL clamped to [`MIN_TTL`]..[`MAX_TTL`] (failures for
//!   [`FAILURE_TTL`]), at most [`MAX_HOSTS`] entries: a cached host costs one map lookup, no
//!   DNS. MX answers are cached by hickory for their TTL.
//! - The TLSA base domain is the MX host name as given by the MX record (no CNAME expansion).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as WireError, NetError, NoRecords};
use hickory_resolver::proto::dnssec::{Proof, TrustAnchors};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::rdata::tlsa::{CertUsage, Matching, Selector};
use hickory_resolver::proto::rr::{Name, RData, Record, RecordType};
use hickory_resolver::TokioResolver;

/// Shortest and longest time a host's TLSA result is kept.
pub const MIN_TTL: Duration = Duration::from_secs(60);
pub const MAX_TTL: Duration = Duration::from_secs(3600);
/// How long a bogus or failed host lookup is kept before it is asked again.
pub const FAILURE_TTL: Duration = Duration::from_secs(30);
/// Hosts cached at most.
pub const MAX_HOSTS: usize = 100_000;
/// One validating lookup, all DNSKEY/DS fetches included.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);

/// How a DNSSEC-validated answer came out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Every record chains to the trust anchor.
    Secure,
    /// Provably unsigned (or no records, or a denial we need not tell apart).
    Insecure,
    /// Signatures that fail, missing ones where the chain says they must exist, or a lookup
    /// that could not be completed: never downgraded to insecure.
    Bogus(String),
}

/// One usable TLSA record (RFC 6698 2.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsaRecord {
    /// 2 (DANE-TA) or 3 (DANE-EE).
    pub usage: u8,
    /// 0 (full certificate) or 1 (SubjectPublicKeyInfo).
    pub selector: u8,
    /// 0 (exact), 1 (SHA-256) or 2 (SHA-512).
    pub matching: u8,
    pub data: Vec<u8>,
}

/// The TLSA RRset of one host, from a secure answer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsaSet {
    /// The usable records; empty: TLS is mandatory but not authenticated.
    pub usable: Vec<TlsaRecord>,
    /// Every record in presentation form (`3 1 1 ab12...`), for TLS-RPT's policy-string.
    pub text: Vec<String>,
}

/// What DANE requires of one MX host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DaneHost {
    /// Secure TLSA records: TLS mandatory, the certificate must match one of them.
    Tlsa(Arc<TlsaSet>),
    /// The host's DNSSEC answers were bogus or indeterminate: do not use the host.
    Bogus(String),
}

/// Host verdicts by (host, port), each with the time it expires.
type HostCache = HashMap<(String, u16), (Instant, Option<DaneHost>)>;

/// The validating resolver and its host cache.
pub struct Dane {
    resolver: TokioResolver,
    hosts: Mutex<HostCache>,
}

impl Dane {
    /// A validating resolver over `nameservers` (empty: /etc/resolv.conf), anchored at
    /// `trust_anchor` (a file of DNSKEY records in zone-file form) or the root KSKs.
    pub fn new(nameservers: &[SocketAddr], trust_anchor: Option<&Path>) -> io::Result<Dane> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(io::Error::other)?
        } else {
            TokioResolver::builder_with_config(super::dns::resolver_config(nameservers), provider)
        };
        if let Some(path) = trust_anchor {
            let anchors = load_trust_anchor(path)?;
            builder = builder.with_trust_anchor(Arc::new(anchors));
        }
        let options = builder.options_mut();
        options.validate = true;
        options.cache_size = 16 * 1024;
        options.timeout = Duration::from_secs(5);
        options.attempts = 1;
        options.use_hosts_file = hickory_resolver::config::ResolveHosts::Never;
        let resolver = builder.build().map_err(io::Error::other)?;
        Ok(Dane {
            resolver,
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// Whether `domain`'s MX answer (or the absence of one) is DNSSEC-secure.
    pub async fn mx_security(&self, domain: &str) -> Security {
        match self.validated(domain, RecordType::MX).await {
            Validated::Records(records, _) => records_security(&records),
            Validated::None => Security::Insecure,
            Validated::Failed(why) => Security::Bogus(why),
        }
    }

    /// What DANE requires of `host` on `port` (an MX host of a domain whose MX answer is
    /// secure); `None`: nothing (insecure addresses, or no TLSA records). Cached.
    pub async fn host(&self, host: &str, port: u16) -> Option<DaneHost> {
        let key = (host.to_owned(), port);
        let now = Instant::now();
        if let Some((until, cached)) = self.lock().get(&key) {
            if *until > now {
                return cached.clone();
            }
        }
        let (result, ttl) = self.look_up_host(host, port).await;
        let ttl = match &result {
            Some(DaneHost::Bogus(_)) => FAILURE_TTL,
            _ => ttl.clamp(MIN_TTL, MAX_TTL),
        };
        let mut hosts = self.lock();
        if hosts.len() >= MAX_HOSTS {
            hosts.retain(|_, (until, _)| *until > now);
            if hosts.len() >= MAX_HOSTS {
                hosts.clear();
            }
        }
        hosts.insert(key, (now + ttl, result.clone()));
        result
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HostCache> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn look_up_host(&self, host: &str, port: u16) -> (Option<DaneHost>, Duration) {
        // RFC 7672 2.2.2: TLSA records are only looked up for hosts whose address records
        // are secure.
        let mut addresses = self.validated(host, RecordType::A).await;
        if matches!(addresses, Validated::None) {
            addresses = self.validated(host, RecordType::AAAA).await;
        }
        match addresses {
            Validated::Records(records, _) => match records_security(&records) {
                Security::Secure => {}
                Security::Insecure => return (None, MAX_TTL),
                Security::Bogus(why) => return (Some(DaneHost::Bogus(why)), FAILURE_TTL),
            },
            Validated::None => return (None, MIN_TTL),
            Validated::Failed(why) => {
                return (
                    Some(DaneHost::Bogus(format!("{host} address: {why}"))),
                    FAILURE_TTL,
                )
            }
        }
        let name = format!("_{port}._tcp.{host}");
        match self.validated(&name, RecordType::TLSA).await {
            Validated::Records(records, ttl) => match records_security(&records) {
                Security::Secure => (Some(DaneHost::Tlsa(Arc::new(tlsa_set(&records)))), ttl),
                Security::Insecure => (None, ttl),
                Security::Bogus(why) => (Some(DaneHost::Bogus(why)), FAILURE_TTL),
            },
            Validated::None => (None, MIN_TTL),
            Validated::Failed(why) => {
                (Some(DaneHost::Bogus(format!("{name}: {why}"))), FAILURE_TTL)
            }
        }
    }

    /// The answer records of type `record_type` at `name` with their proofs, and the
    /// shortest TTL among them.
    async fn validated(&self, name: &str, record_type: RecordType) -> Validated {
        let Ok(mut fqdn) = Name::from_str_relaxed(name) else {
            return Validated::None;
        };
        fqdn.set_fqdn(true);
        let lookup = tokio::time::timeout(LOOKUP_TIMEOUT, self.resolver.lookup(fqdn, record_type));
        match lookup.await {
            Err(_) => Validated::Failed(format!("{name} {record_type}: DNSSEC lookup timed out")),
            Ok(Ok(lookup)) => {
                let records: Vec<Record> = Message::from(lookup)
                    .answers
                    .into_iter()
                    .filter(|r| r.record_type() == record_type)
                    .collect();
                if records.is_empty() {
                    return Validated::None;
                }
                let ttl = records.iter().map(|r| r.ttl).min().unwrap_or(0);
                Validated::Records(records, Duration::from_secs(u64::from(ttl)))
            }
            Ok(Err(err)) => classify(name, record_type, err),
        }
    }
}

enum Validated {
    Records(Vec<Record>, Duration),
    /// NXDOMAIN or no data, securely denied or not.
    None,
    Failed(String),
}

fn classify(name: &str, record_type: RecordType, err: NetError) -> Validated {
    match &err {
        NetError::Dns(WireError::NoRecordsFound(NoRecords { response_code, .. }))
            if matches!(
                *response_code,
                ResponseCode::NXDomain | ResponseCode::NoError
            ) =>
        {
            Validated::None
        }
        NetError::Dns(WireError::Nsec { proof, .. }) if *proof != Proof::Bogus => Validated::None,
        NetError::Dns(WireError::DnssecBogus) | NetError::Dns(WireError::Nsec { .. }) => {
            Validated::Failed(format!(
                "{name} {record_type}: DNSSEC validation failed (bogus)"
            ))
        }
        _ => Validated::Failed(format!("{name} {record_type}: {err}")),
    }
}

/// Secure only if every record is.
fn records_security(records: &[Record]) -> Security {
    if records.iter().any(|r| r.proof == Proof::Bogus) {
        return Security::Bogus("DNSSEC validation failed (bogus)".to_owned());
    }
    if records.iter().all(|r| r.proof == Proof::Secure) {
        Security::Secure
    } else {
        Security::Insecure
    }
}

fn tlsa_set(records: &[Record]) -> TlsaSet {
    let mut set = TlsaSet {
        usable: Vec::new(),
        text: Vec::new(),
    };
    for record in records {
        let RData::TLSA(tlsa) = &record.data else {
            continue;
        };
        set.text.push(tlsa.to_string());
        let usage = match tlsa.cert_usage {
            CertUsage::DaneTa => 2,
            CertUsage::DaneEe => 3,
            _ => continue,
        };
        let selector = match tlsa.selector {
            Selector::Full => 0,
            Selector::Spki => 1,
            _ => continue,
        };
        let matching = match tlsa.matching {
            Matching::Raw => 0,
            Matching::Sha256 => 1,
            Matching::Sha512 => 2,
            _ => continue,
        };
        set.usable.push(TlsaRecord {
            usage,
            selector,
            matching,
            data: tlsa.cert_data.clone(),
        });
    }
    set
}

/// DNSKEY records (zone-file form, e.g. `. 3600 IN DNSKEY 257 3 13 base64...`) as trust
/// anchors; an error names the file and says why.
pub fn load_trust_anchor(path: &Path) -> io::Result<TrustAnchors> {
    let anchors = TrustAnchors::from_file(path).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: not a list of DNSKEY records: {e}", path.display()),
        )
    })?;
    if anchors.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: no DNSKEY record for the root", path.display()),
        ));
    }
    Ok(anchors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::rr::rdata::TLSA;

    fn tlsa(usage: CertUsage, selector: Selector, matching: Matching) -> Record {
        let mut r = Record::from_rdata(
            Name::from_ascii("_25._tcp.mx.test.").unwrap(),
            300,
            RData::TLSA(TLSA::new(usage, selector, matching, vec![0xab, 0xcd])),
        );
        r.proof = Proof::Secure;
        r
    }

    #[test]
    fn only_dane_ta_and_dane_ee_records_are_usable_for_smtp() {
        let set = tlsa_set(&[
            tlsa(CertUsage::DaneEe, Selector::Spki, Matching::Sha256),
            tlsa(CertUsage::DaneTa, Selector::Full, Matching::Sha512),
            tlsa(CertUsage::PkixEe, Selector::Spki, Matching::Sha256),
            tlsa(CertUsage::PkixTa, Selector::Full, Matching::Raw),
            tlsa(CertUsage::DaneEe, Selector::Unassigned(7), Matching::Sha256),
        ]);
        let usable: Vec<(u8, u8, u8)> = set
            .usable
            .iter()
            .map(|r| (r.usage, r.selector, r.matching))
            .collect();
        assert_eq!(usable, [(3, 1, 1), (2, 0, 2)]);
        assert_eq!(set.text.len(), 5, "every record is reported");
        assert_eq!(set.text[0], "3 1 1 abcd");
    }

    #[test]
    fn an_rrset_is_secure_only_if_every_record_is() {
        let secure = tlsa(CertUsage::DaneEe, Selector::Spki, Matching::Sha256);
        let mut insecure = secure.clone();
        insecure.proof = Proof::Insecure;
        let mut bogus = secure.clone();
        bogus.proof = Proof::Bogus;
        assert_eq!(
            records_security(std::slice::from_ref(&secure)),
            Security::Secure
        );
        assert_eq!(
            records_security(&[secure.clone(), insecure]),
            Security::Insecure
        );
        assert!(matches!(
            records_security(&[secure, bogus]),
            Security::Bogus(_)
        ));
    }

    #[test]
    fn a_trust_anchor_file_must_hold_dnskey_records() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad");
        std::fs::write(&bad, "not a record\n").unwrap();
        let err = load_trust_anchor(&bad).err().expect("refused").to_string();
        assert!(err.contains("not a list of DNSKEY records"), "{err}");
    }
}
