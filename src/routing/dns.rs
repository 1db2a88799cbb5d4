//! The DNS boundary of delivery: the [`Resolver`] trait (MX and address lookups, the one seam
//! where tests may substitute a fake) and [`HickoryResolver`], its implementation over
//! hickory-resolver.
//!
//! Invariants:
//! - Answers are classified, never guessed. Only an authoritative "does not exist" (NXDOMAIN)
//!   becomes [`DnsError::NxDomain`], and only NOERROR without records becomes
//!   [`MxLookup::NoMx`] / [`DnsError::NoAddresses`]. Everything else (SERVFAIL, REFUSED,
//!   timeouts, network errors, malformed replies) is [`DnsError::Temporary`], because a
//!   permanent answer bounces mail and a DNS outage must not.
//! - Host names are returned lowercase, in ASCII (A-label) form, without the trailing dot; the
//!   root exchange of a null MX is the only exception and is spelled `"."`.
//! - Queries are always sent fully qualified, so resolv.conf search domains never turn a
//!   recipient domain into some local name.
//! - Caching is hickory's: positive answers live for their record TTL, negative ones for the
//!   SOA's negative TTL.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::time::Duration;

use hickory_resolver::config::{NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as WireError, NetError, NoRecords};
use hickory_resolver::proto::op::{Message, ResponseCode};
use hickory_resolver::proto::rr::{Name, RData, RecordType};
use hickory_resolver::TokioResolver;

/// One MX record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MxHost {
    pub preference: u16,
    /// Lowercase, no trailing dot; `"."` for the root (a null MX entry).
    pub name: String,
}

/// The answer to an MX query.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MxLookup {
    /// At least one record with a real exchange (root entries among them are kept as `"."`).
    Records(Vec<MxHost>),
    /// Every exchange is the root: the domain accepts no mail (RFC 7505).
    NullMx,
    /// The domain exists but has no MX records: the implicit MX is the domain itself (RFC 5321
    /// 5.1).
    NoMx,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    #[error("{0}: no such domain")]
    NxDomain(String),
    #[error("{0}: no address records")]
    NoAddresses(String),
    #[error("DNS temporary failure: {0}")]
    Temporary(String),
}

pub type DnsFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, DnsError>> + Send + 'a>>;

/// TXT records of a name (`Ok(None)`: none), or why the lookup failed for now.
pub type TxtFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Option<Vec<String>>, String>> + Send + 'a>>;

/// MX and address lookups. Boxed futures keep the trait object-safe, so the router holds an
/// `Arc<dyn Resolver>` and tests can swap the implementation.
pub trait Resolver: Send + Sync + 'static {
    fn mx<'a>(&'a self, domain: &'a str) -> DnsFuture<'a, MxLookup>;
    /// A and AAAA records, IPv4 first. An IP literal is returned as is, without a query.
    fn addresses<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>>;
    /// The TXT records of `name` (each record's strings joined); `Ok(None)` when there are
    /// none; `Err` (a reason) on a temporary failure.
    fn txt<'a>(&'a self, name: &'a str) -> TxtFuture<'a>;
}

/// Entries in hickory's response cache; one entry is one (name, type) answer.
const CACHE_SIZE: u64 = 16 * 1024;
/// Per-query timeout and tries per query: a dead server costs at most `TIMEOUT * TRIES`
/// before the attempt is deferred with a temporary error.
const TIMEOUT: Duration = Duration::from_secs(5);
const TRIES: usize = 2;

/// Exactly `nameservers`, each over UDP and TCP on its own port (`delivery.nameservers`);
/// also what other DNS clients of the config (mail-auth's) are built on.
pub fn resolver_config(nameservers: &[SocketAddr]) -> ResolverConfig {
    let servers = nameservers
        .iter()
        .map(|addr| {
            let mut server = NameServerConfig::udp_and_tcp(addr.ip());
            for connection in &mut server.connections {
                connection.port = addr.port();
            }
            server
        })
        .collect();
    ResolverConfig::from_name_servers(servers)
}

/// [`Resolver`] over hickory's Tokio resolver (UDP, TCP on truncation, TTL-honouring cache).
pub struct HickoryResolver {
    inner: TokioResolver,
}

impl HickoryResolver {
    /// `nameservers` empty: the system configuration (/etc/resolv.conf); otherwise exactly these
    /// servers, each over UDP and TCP on its port. Fails only if the system configuration
    /// cannot be read.
    pub fn new(nameservers: &[SocketAddr]) -> io::Result<Self> {
        let provider = TokioRuntimeProvider::default();
        let mut builder = if nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(io::Error::other)?
        } else {
            TokioResolver::builder_with_config(resolver_config(nameservers), provider)
        };
        let options = builder.options_mut();
        options.cache_size = CACHE_SIZE;
        options.timeout = TIMEOUT;
        // hickory counts retries after the first try.
        options.attempts = TRIES - 1;
        // Mail goes where DNS says (like Postfix's smtp_host_lookup = dns); /etc/hosts is not
        // consulted, a static route is the way to override a destination.
        options.use_hosts_file = ResolveHosts::Never;
        let inner = builder.build().map_err(io::Error::other)?;
        Ok(HickoryResolver { inner })
    }

    /// The TXT records of `name`, each record's character-strings joined; `Ok(None)` when
    /// the name or its TXT records do not exist; `Err` on a temporary failure.
    pub async fn txt_records(&self, name: &str) -> Result<Option<Vec<String>>, String> {
        let name = fqdn(name).map_err(|e| e.to_string())?;
        match self.records(&name, RecordType::TXT).await {
            Ok(answers) => Ok(Some(
                answers
                    .iter()
                    .filter_map(|data| match data {
                        RData::TXT(txt) => Some(
                            txt.txt_data
                                .iter()
                                .map(|part| String::from_utf8_lossy(part))
                                .collect::<String>(),
                        ),
                        _ => None,
                    })
                    .collect(),
            )),
            Err(Failure::NoData | Failure::NxDomain) => Ok(None),
            Err(Failure::Temporary(why)) => Err(why),
        }
    }

    async fn records(&self, name: &Name, record_type: RecordType) -> Result<Vec<RData>, Failure> {
        match self.inner.lookup(name.clone(), record_type).await {
            Ok(lookup) => Ok(Message::from(lookup)
                .answers
                .into_iter()
                .map(|r| r.data)
                .collect()),
            Err(e) => Err(classify(e)),
        }
    }
}

impl Resolver for HickoryResolver {
    fn txt<'a>(&'a self, name: &'a str) -> TxtFuture<'a> {
        Box::pin(self.txt_records(name))
    }

    fn mx<'a>(&'a self, domain: &'a str) -> DnsFuture<'a, MxLookup> {
        Box::pin(async move {
            let name = fqdn(domain)?;
            match self.records(&name, RecordType::MX).await {
                Ok(answers) => Ok(mx_lookup(&answers)),
                Err(Failure::NoData) => Ok(MxLookup::NoMx),
                Err(Failure::NxDomain) => Err(DnsError::NxDomain(domain.to_owned())),
                Err(Failure::Temporary(why)) => {
                    Err(DnsError::Temporary(format!("{domain}: {why}")))
                }
            }
        })
    }

    fn addresses<'a>(&'a self, host: &'a str) -> DnsFuture<'a, Vec<IpAddr>> {
        Box::pin(async move {
            if let Ok(ip) = host.parse::<IpAddr>() {
                return Ok(vec![ip]);
            }
            let name = fqdn(host)?;
            // Two queries of our own rather than hickory's lookup_ip: it reports only the
            // first error when both fail, which could turn "A: NOERROR, AAAA: SERVFAIL" into
            // a permanent "no addresses".
            let (v4, v6) = tokio::join!(
                self.records(&name, RecordType::A),
                self.records(&name, RecordType::AAAA)
            );
            merge_addresses(host, v4, v6)
        })
    }
}

/// A failed (or empty) lookup, as far as delivery cares.
#[derive(Debug, PartialEq)]
enum Failure {
    /// NOERROR: the name exists but has no records of the type asked for.
    NoData,
    NxDomain,
    Temporary(String),
}

fn classify(err: NetError) -> Failure {
    match &err {
        NetError::Dns(WireError::NoRecordsFound(NoRecords { response_code, .. })) => {
            match *response_code {
                ResponseCode::NXDomain => Failure::NxDomain,
                ResponseCode::NoError => Failure::NoData,
                _ => Failure::Temporary(err.to_string()),
            }
        }
        _ => Failure::Temporary(err.to_string()),
    }
}

/// The query name, fully qualified. A string that is not a valid domain name can never
/// resolve, so it is reported as not existing rather than retried.
fn fqdn(domain: &str) -> Result<Name, DnsError> {
    let mut name =
        Name::from_str_relaxed(domain).map_err(|_| DnsError::NxDomain(domain.to_owned()))?;
    name.set_fqdn(true);
    Ok(name)
}

/// Classifies the answer section of an MX query (which may also hold CNAMEs).
fn mx_lookup(answers: &[RData]) -> MxLookup {
    let hosts: Vec<MxHost> = answers
        .iter()
        .filter_map(|data| match data {
            RData::MX(mx) => Some(MxHost {
                preference: mx.preference,
                name: host_name(&mx.exchange),
            }),
            _ => None,
        })
        .collect();
    if hosts.is_empty() {
        MxLookup::NoMx
    } else if hosts.iter().all(|h| h.name == ".") {
        MxLookup::NullMx
    } else {
        MxLookup::Records(hosts)
    }
}

fn host_name(name: &Name) -> String {
    if name.is_root() {
        return ".".to_owned();
    }
    let mut ascii = name.to_ascii();
    if ascii.ends_with('.') {
        ascii.pop();
    }
    ascii.make_ascii_lowercase();
    ascii
}

/// Joins the A and AAAA answers (IPv4 first). Any address is success; otherwise a temporary
/// failure on either side wins over a negative answer, so the hop is only given up when both
/// queries were answered.
fn merge_addresses(
    host: &str,
    v4: Result<Vec<RData>, Failure>,
    v6: Result<Vec<RData>, Failure>,
) -> Result<Vec<IpAddr>, DnsError> {
    let ips: Vec<IpAddr> = [&v4, &v6]
        .into_iter()
        .flat_map(|r| r.iter().flatten())
        .filter_map(RData::ip_addr)
        .collect();
    if !ips.is_empty() {
        return Ok(ips);
    }
    match (v4, v6) {
        (Err(Failure::Temporary(why)), _) | (_, Err(Failure::Temporary(why))) => {
            Err(DnsError::Temporary(format!("{host}: {why}")))
        }
        (Err(Failure::NxDomain), _) | (_, Err(Failure::NxDomain)) => {
            Err(DnsError::NxDomain(host.to_owned()))
        }
        _ => Err(DnsError::NoAddresses(host.to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::rdata::{A, AAAA, CNAME, MX};
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn mx(preference: u16, exchange: &str) -> RData {
        RData::MX(MX::new(preference, Name::from_ascii(exchange).unwrap()))
    }

    fn host(preference: u16, name: &str) -> MxHost {
        MxHost {
            preference,
            name: name.to_owned(),
        }
    }

    #[test]
    fn mx_answers_are_lowercased_without_trailing_dot() {
        let answers = [
            RData::CNAME(CNAME(Name::from_ascii("alias.test.").unwrap())),
            mx(10, "MX1.Example.TEST."),
            mx(20, "mx2.example.test."),
        ];
        assert_eq!(
            mx_lookup(&answers),
            MxLookup::Records(vec![
                host(10, "mx1.example.test"),
                host(20, "mx2.example.test")
            ])
        );
    }

    #[test]
    fn null_mx_only_when_every_exchange_is_the_root() {
        assert_eq!(mx_lookup(&[mx(0, ".")]), MxLookup::NullMx);
        assert_eq!(
            mx_lookup(&[mx(0, "."), mx(10, "mx.test.")]),
            MxLookup::Records(vec![host(0, "."), host(10, "mx.test")])
        );
        assert_eq!(mx_lookup(&[]), MxLookup::NoMx);
    }

    #[test]
    fn negative_answers_are_classified_by_response_code() {
        let query = Query::query(Name::from_ascii("x.test.").unwrap(), RecordType::MX);
        let no_records = |code| classify(NoRecords::new(Box::new(query.clone()), code).into());
        assert_eq!(no_records(ResponseCode::NXDomain), Failure::NxDomain);
        assert_eq!(no_records(ResponseCode::NoError), Failure::NoData);
        assert!(matches!(
            no_records(ResponseCode::ServFail),
            Failure::Temporary(_)
        ));
        let servfail = NetError::Dns(WireError::ResponseCode(ResponseCode::ServFail));
        assert!(matches!(classify(servfail), Failure::Temporary(_)));
        assert!(matches!(classify(NetError::Timeout), Failure::Temporary(_)));
    }

    #[test]
    fn addresses_put_ipv4_first_and_use_any_half_that_answered() {
        let v4 = RData::A(A(Ipv4Addr::new(192, 0, 2, 1)));
        let v6 = RData::AAAA(AAAA(Ipv6Addr::LOCALHOST));
        assert_eq!(
            merge_addresses("h", Ok(vec![v4.clone()]), Ok(vec![v6.clone()])),
            Ok(vec![
                IpAddr::from(Ipv4Addr::new(192, 0, 2, 1)),
                IpAddr::from(Ipv6Addr::LOCALHOST)
            ])
        );
        assert_eq!(
            merge_addresses("h", Err(Failure::Temporary("x".into())), Ok(vec![v6])),
            Ok(vec![IpAddr::from(Ipv6Addr::LOCALHOST)])
        );
    }

    #[test]
    fn a_temporary_failure_is_never_reported_as_no_addresses() {
        let temporary = || Err(Failure::Temporary("SERVFAIL".into()));
        assert!(matches!(
            merge_addresses("h", Ok(vec![]), temporary()),
            Err(DnsError::Temporary(_))
        ));
        assert!(matches!(
            merge_addresses("h", temporary(), Err(Failure::NxDomain)),
            Err(DnsError::Temporary(_))
        ));
        assert_eq!(
            merge_addresses("h", Err(Failure::NxDomain), Err(Failure::NxDomain)),
            Err(DnsError::NxDomain("h".into()))
        );
        assert_eq!(
            merge_addresses("h", Err(Failure::NoData), Ok(vec![])),
            Err(DnsError::NoAddresses("h".into()))
        );
    }

    #[test]
    fn names_that_cannot_exist_are_nxdomain() {
        assert_eq!(fqdn("a..b").unwrap_err(), DnsError::NxDomain("a..b".into()));
        assert!(fqdn("example.test").unwrap().is_fqdn());
    }
}
