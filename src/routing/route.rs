//! Where mail for a recipient domain goes: the static route for that exact domain, else the
//! `"*"` route, else (for an address literal such as `[192.0.2.1]`) that address, else the
//! domain's MX hosts (RFC 5321 5.1) through the [`Resolver`].
//!
//! Invariants:
//! - A plan always has at least one hop; having none is a [`RouteError`].
//! - Permanent errors come only from authoritative answers (null MX, NXDOMAIN, a host with no
//!   address records). Anything that may heal is Temporary (4.4.3), so a DNS outage defers
//!   mail and never bounces it.
//! - The destination key depends only on where mail goes (the host set), never on the
//!   recipient domain, so domains sharing MX hosts share their connection limits, and one
//!   ready queue when their policies are the same ([`RoutePlan::queue_key`]: a domain with
//!   MTA-STS `enforce` or DANE waits on a queue of its own, as its messages must never leave
//!   with a neighbour's weaker plan).
//! - Addresses are resolved per hop when connecting, not when planning: only the hops actually
//!   tried cost a lookup, and each answer is as fresh as the resolver's cache allows.
//! - Addresses of hops the recipient's domain chose (MX, implicit MX, address literal) pass
//!   the [`AddressGuard`]: a refused address is never returned, and a hop left without one is
//!   a Temporary (4.4.4) failure naming the address and why. Static route hops are the
//!   operator's choice and are not checked.
//! - [`Router::static_plan`] answers without DNS: static routes and address literals never
//!   wait behind lookups of other domains.
//! - A plan's MX lookup takes at most [`PLAN_TIMEOUT`], whatever the resolver does; running
//!   out is Temporary (4.4.3).
//! - A config reload replaces the static routes and the default TLS policy as one snapshot
//!   ([`Router::set_routes`]); a plan already made keeps the route it was made with.

use std::collections::HashMap;

use super::dane::{Dane, DaneHost, Security};
use super::sts::{Mode as StsMode, Policy, Sts};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::Rng;

use super::dns::{DnsError, MxHost, MxLookup, Resolver};
use super::guard::AddressGuard;
use crate::config::{RouteAuth, RouteConfig, TlsPolicy};
use crate::live::Live;

const SMTP_PORT: u16 = 25;

/// The longest an MX lookup may take before the plan fails (temporarily). The resolver's own
/// timeouts end a lookup sooner against one dead server; this bounds the rest (several
/// servers, slow answers that each arrive just in time).
pub const PLAN_TIMEOUT: Duration = Duration::from_secs(15);

/// One host to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Host name for TLS SNI/verification and logs, or an IP literal (unbracketed).
    pub name: String,
    /// 25 for MX hosts.
    pub port: u16,
    /// Named by the operator (a static route): its addresses are used whatever they are.
    /// Otherwise the recipient's domain chose it, and its addresses pass the
    /// [`AddressGuard`].
    pub static_route: bool,
}

/// How to deliver to one recipient domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// Destination key: domains whose mail goes to the same host set share it (and one ready
    /// queue when their policies agree, [`RoutePlan::queue_key`]).
    /// MX routing: `"mx:"` + the sorted, comma-joined MX host names (for an implicit MX or an
    /// address literal, `"mx:"` + the domain); static routes: `"route:"` + the route's domain
    /// (`"*"` included).
    pub key: String,
    /// Hosts in the order to try: MX preference ascending with equal preferences shuffled on
    /// every plan (so connections spread), static route hosts in configured order.
    pub hops: Vec<Hop>,
    /// The TLS level: the route's, else the one discovered (DANE, MTA-STS enforce ->
    /// `Required`), else `delivery.tls`. Under `Dane`/`DaneOnly`, [`RoutePlan::dane`] says
    /// what each host requires.
    pub tls: TlsPolicy,
    pub auth: Option<RouteAuth>,
    /// What the delivery log (`tls_policy`) and metrics call the level and where it came
    /// from: `dane`, `mta-sts-enforce`, `mta-sts-testing`, or the level's name
    /// ([`TlsPolicy::name`]).
    pub tls_label: &'static str,
    /// DANE: what each host (by hop name) requires; a host not in it has no TLSA records
    /// (insecure, or none) and is sent `may` under `Dane`.
    pub dane: Option<Arc<HashMap<String, DaneHost>>>,
}

impl RoutePlan {
    /// The name of the ready queue this plan's mail waits on. A queue's messages leave with
    /// one plan (its most recent), so domains behind the same MX hosts share a queue only
    /// under the same policy: a plan whose TLS level differs from `plain` (the configured
    /// `delivery.tls`), came from the domain (MTA-STS, DANE), or whose hosts a policy
    /// narrowed gets a queue of its own (the destination key, then `|label|level|hosts`).
    /// Otherwise a domain with MTA-STS `enforce` would leave with a neighbour's plan and go
    /// over opportunistic TLS. Static routes have a key of their own already.
    pub fn queue_key(&self, plain: TlsPolicy) -> std::borrow::Cow<'_, str> {
        let plain_plan = self.dane.is_none() && self.tls == plain && self.tls_label == plain.name();
        if !self.key.starts_with("mx:") || plain_plan {
            return std::borrow::Cow::Borrowed(&self.key);
        }
        let mut hosts: Vec<&str> = self.hops.iter().map(|h| h.name.as_str()).collect();
        hosts.sort_unstable();
        std::borrow::Cow::Owned(format!(
            "{}|{}|{}|{}",
            self.key,
            self.tls_label,
            self.tls.name(),
            hosts.join(",")
        ))
    }

    /// What DANE requires of `host` under this plan; `None`: nothing.
    pub fn dane_host(&self, host: &str) -> Option<&DaneHost> {
        self.dane.as_ref()?.get(host)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Never deliverable: the reply to record in the DSN.
    #[error("{status} {reason}")]
    Permanent {
        status: &'static str,
        reason: String,
    },
    /// Retry later.
    #[error("{status} {reason}")]
    Temporary {
        status: &'static str,
        reason: String,
    },
}

/// NXDOMAIN and "no addresses" are 5.1.2 (bad destination system address); everything else
/// DNS can say is 4.4.3 (directory server failure).
impl From<DnsError> for RouteError {
    fn from(err: DnsError) -> Self {
        match err {
            DnsError::NxDomain(_) | DnsError::NoAddresses(_) => RouteError::Permanent {
                status: "5.1.2",
                reason: err.to_string(),
            },
            DnsError::Temporary(_) => RouteError::Temporary {
                status: "4.4.3",
                reason: err.to_string(),
            },
        }
    }
}

fn null_mx() -> RouteError {
    // RFC 7505 section 4.2's wording.
    RouteError::Permanent {
        status: "5.1.10",
        reason: "Recipient address has null MX".to_owned(),
    }
}

pub struct Router {
    routes: Live<StaticRoutes>,
    resolver: Arc<dyn Resolver>,
    guard: Live<AddressGuard>,
    /// MTA-STS policies of MX-routed domains (`delivery.mta_sts`); `None`: not applied.
    sts: Option<Arc<Sts>>,
    /// The DNSSEC-validating lookups for DANE; `None`: no DANE, whatever a route says.
    dane: Option<Arc<Dane>>,
    /// Discover DANE for MX-routed mail without a route level (`delivery.dane`).
    dane_default: bool,
}

/// The routing part of the config, compiled: what a reload swaps.
struct StaticRoutes {
    /// Routes by domain: static ones as finished plans (planning one is a clone), policy
    /// routes (no hosts) as their TLS level.
    exact: HashMap<String, Entry>,
    /// The `"*"` route.
    wildcard: Option<Entry>,
    default_tls: TlsPolicy,
}

enum Entry {
    Static(RoutePlan),
    /// MX routing under this level.
    Level(TlsPolicy),
}

impl StaticRoutes {
    fn compile(routes: &[RouteConfig], default_tls: TlsPolicy) -> StaticRoutes {
        let mut exact = HashMap::with_capacity(routes.len());
        let mut wildcard = None;
        for route in routes {
            let entry = if route.hosts.is_empty() {
                Entry::Level(route.tls.unwrap_or(default_tls))
            } else {
                let tls = route.tls.unwrap_or(default_tls);
                Entry::Static(RoutePlan {
                    key: format!("route:{}", route.domain),
                    hops: route.hosts.iter().map(|h| static_hop(h)).collect(),
                    tls,
                    auth: route.auth.clone(),
                    tls_label: tls.name(),
                    dane: None,
                })
            };
            if route.domain == "*" {
                wildcard = Some(entry);
            } else {
                exact.insert(route.domain.clone(), entry);
            }
        }
        StaticRoutes {
            exact,
            wildcard,
            default_tls,
        }
    }

    fn entry(&self, domain: &str) -> Option<&Entry> {
        self.exact.get(domain).or(self.wildcard.as_ref())
    }
}

impl Router {
    /// `routes` come from a compiled config: domains unique and lowercase, hosts valid
    /// `host:port` strings.
    /// `guard`: the addresses mail is never sent to when the recipient's domain chose the
    /// host.
    pub fn new(
        routes: &[RouteConfig],
        default_tls: TlsPolicy,
        resolver: Arc<dyn Resolver>,
        guard: AddressGuard,
    ) -> Router {
        Router {
            routes: Live::new(StaticRoutes::compile(routes, default_tls)),
            resolver,
            guard: Live::new(guard),
            sts: None,
            dane: None,
            dane_default: false,
        }
    }

    /// DANE lookups through `dane`: for every MX-routed domain when `by_default`
    /// (`delivery.dane`), and for routes whose level is `dane` or `dane-only` in any case.
    pub fn with_dane(mut self, dane: Arc<Dane>, by_default: bool) -> Router {
        self.dane = Some(dane);
        self.dane_default = by_default;
        self
    }

    /// The MTA-STS policy of `domain` if one is cached (no network).
    pub fn cached_sts_policy(&self, domain: &str) -> Option<Arc<Policy>> {
        self.sts.as_ref()?.cached(domain)
    }

    /// Applies MTA-STS policies (through `sts`) to MX-routed plans from now on.
    pub fn with_sts(mut self, sts: Arc<Sts>) -> Router {
        self.sts = Some(sts);
        self
    }

    /// Replaces the static routes and the default TLS policy (config reload); plans made
    /// from now on use them.
    pub fn set_routes(&self, routes: &[RouteConfig], default_tls: TlsPolicy) {
        self.routes.set(StaticRoutes::compile(routes, default_tls));
    }

    /// Replaces the address guard (config reload: `delivery.allow_local_mx`); lookups from
    /// now on use it.
    pub fn set_guard(&self, guard: AddressGuard) {
        self.guard.set(guard);
    }

    /// The plan for `domain` when it needs no DNS: a static route (or the `"*"` route), or an
    /// address literal. `None`: the domain's MX records decide ([`Router::plan`]).
    /// A static route under `dane`/`dane-only` needs TLSA lookups, so it is planned by
    /// [`Router::plan`] too.
    pub fn static_plan(&self, domain: &str) -> Option<RoutePlan> {
        let routes = self.routes.get();
        match routes.entry(domain) {
            Some(Entry::Static(plan)) if needs_dane(plan.tls) => return None,
            Some(Entry::Static(plan)) => return Some(plan.clone()),
            Some(Entry::Level(_)) => return None,
            None => {}
        }
        let ip = address_literal(domain)?;
        let tls = match routes.default_tls {
            // An address literal has no DNS name to hang TLSA or an MTA-STS policy on.
            TlsPolicy::Dane | TlsPolicy::MtaSts => TlsPolicy::Opportunistic,
            tls => tls,
        };
        Some(RoutePlan {
            key: format!("mx:{domain}"),
            hops: vec![Hop::smtp(ip.to_string())],
            tls,
            auth: None,
            tls_label: tls.name(),
            dane: None,
        })
    }

    /// Plans delivery for one recipient domain (lowercase).
    pub async fn plan(&self, domain: &str) -> Result<RoutePlan, RouteError> {
        if let Some(plan) = self.static_plan(domain) {
            return Ok(plan);
        }
        let level = match self.routes.get().entry(domain) {
            Some(Entry::Static(plan)) => {
                // dane / dane-only on a static route: TLSA records of its hosts.
                let mut plan = plan.clone();
                self.apply_dane(domain, &mut plan).await?;
                return Ok(plan);
            }
            Some(Entry::Level(level)) => Some(*level),
            None => None,
        };
        let lookup = tokio::time::timeout(PLAN_TIMEOUT, self.resolver.mx(domain))
            .await
            .map_err(|_| RouteError::Temporary {
                status: "4.4.3",
                reason: format!(
                    "{domain}: DNS lookup timed out after {} s",
                    PLAN_TIMEOUT.as_secs()
                ),
            })?;
        let (key, hops) = match lookup? {
            MxLookup::Records(hosts) => mx_hops(hosts, &mut rand::thread_rng())?,
            MxLookup::NullMx => return Err(null_mx()),
            // RFC 5321 5.1: the domain itself is the implicit MX. If it has no addresses
            // either, `addresses` reports that hop (and so the domain) as 5.1.2.
            MxLookup::NoMx => (format!("mx:{domain}"), vec![Hop::smtp(domain.to_owned())]),
        };
        let default_tls = self.routes.get().default_tls;
        let mut plan = RoutePlan {
            key,
            hops,
            tls: level.unwrap_or(default_tls),
            auth: None,
            tls_label: level.unwrap_or(default_tls).name(),
            dane: None,
        };
        match level {
            // The route's level replaces discovery.
            Some(TlsPolicy::Dane | TlsPolicy::DaneOnly) => {
                self.apply_dane(domain, &mut plan).await?;
            }
            Some(TlsPolicy::MtaSts) => {
                plan.tls = TlsPolicy::Opportunistic;
                self.apply_sts(domain, &mut plan).await?;
            }
            Some(_) => {}
            None => {
                // DANE takes precedence over MTA-STS (RFC 8461 2): only a domain without
                // usable DANE gets its MTA-STS policy applied.
                if self.dane_default && self.dane.is_some() {
                    plan.tls = TlsPolicy::Dane;
                    self.apply_dane(domain, &mut plan).await?;
                    if plan.dane.is_none() {
                        plan.tls = default_tls;
                        plan.tls_label = default_tls.name();
                    }
                }
                if plan.dane.is_none() {
                    self.apply_sts(domain, &mut plan).await?;
                }
            }
        }
        Ok(plan)
    }

    async fn apply_sts(&self, domain: &str, plan: &mut RoutePlan) -> Result<(), RouteError> {
        if let Some(sts) = &self.sts {
            if let Some(policy) = sts.policy(domain).await {
                apply_sts(domain, &policy, plan)?;
            }
        }
        Ok(())
    }

    /// DANE for a plan under `Dane` or `DaneOnly`: when the MX answer is secure (or, on a
    /// static route, for the named hosts), each host's TLSA verdict goes into `plan.dane`.
    /// No host with TLSA records leaves `plan.dane` `None` under `Dane` (the plan is then
    /// `may`); under `DaneOnly` the worker refuses every host without usable records
    /// (4.7.5, TLS-RPT `dane-required`). A bogus MX answer defers the domain (4.7.5).
    async fn apply_dane(&self, domain: &str, plan: &mut RoutePlan) -> Result<(), RouteError> {
        let only = plan.tls == TlsPolicy::DaneOnly;
        let refused = |reason: String| RouteError::Temporary {
            status: "4.7.5",
            reason,
        };
        let Some(dane) = &self.dane else {
            return if only {
                Err(refused(format!(
                    "{domain}: dane-only, but DANE is not available"
                )))
            } else {
                plan.tls = TlsPolicy::Opportunistic;
                Ok(())
            };
        };
        let static_route = plan.hops.iter().all(|h| h.static_route);
        if !static_route {
            match dane.mx_security(domain).await {
                Security::Secure => {}
                Security::Insecure if only => {
                    return Err(refused(format!(
                        "{domain}: dane-only, but the MX records are not DNSSEC-signed"
                    )))
                }
                Security::Insecure => {
                    plan.tls = TlsPolicy::Opportunistic;
                    return Ok(());
                }
                Security::Bogus(why) => {
                    return Err(refused(format!("{domain}: MX records: {why}")));
                }
            }
        }
        let mut hosts = HashMap::new();
        for hop in &plan.hops {
            if let Some(verdict) = dane.host(&hop.name, hop.port).await {
                hosts.insert(hop.name.clone(), verdict);
            }
        }
        if hosts.is_empty() && !only {
            plan.tls = TlsPolicy::Opportunistic;
            return Ok(());
        }
        plan.tls_label = if only { "dane-only" } else { "dane" };
        plan.dane = Some(Arc::new(hosts));
        Ok(())
    }

    /// Addresses of one hop, resolved lazily at connect time (literal IPs returned directly).
    ///
    /// `Permanent` (5.1.2) means only that *this hop* is unusable (no such name, no address
    /// records): the caller tries the next hop, and bounces only if every hop is permanently
    /// unusable. `Temporary` (4.4.3) means DNS could not answer: defer unless another hop
    /// delivers. `Temporary` (4.4.4) also means every address of a hop the recipient's domain
    /// chose is one the [`AddressGuard`] refuses; refused addresses are left out otherwise.
    pub async fn addresses(&self, hop: &Hop) -> Result<Vec<SocketAddr>, RouteError> {
        let addrs: Vec<SocketAddr> = match hop.name.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, hop.port)],
            Err(_) => self
                .resolver
                .addresses(&hop.name)
                .await?
                .into_iter()
                .map(|ip| SocketAddr::new(ip, hop.port))
                .collect(),
        };
        if hop.static_route {
            return Ok(addrs);
        }
        guarded(&hop.name, addrs, &self.guard.get())
    }

    pub fn resolver(&self) -> &Arc<dyn Resolver> {
        &self.resolver
    }
}

/// An `enforce` MTA-STS policy on an MX plan: only the MX hosts it names, each over TLS with a
/// verified certificate; none left defers (4.7.5). Other modes change nothing.
fn apply_sts(domain: &str, policy: &Policy, plan: &mut RoutePlan) -> Result<(), RouteError> {
    if policy.mode == StsMode::Testing {
        plan.tls_label = "mta-sts-testing";
    }
    if policy.mode != StsMode::Enforce {
        return Ok(());
    }
    plan.hops.retain(|hop| policy.allows(&hop.name));
    if plan.hops.is_empty() {
        return Err(RouteError::Temporary {
            status: "4.7.5",
            reason: format!("{domain}: no MX host matches its MTA-STS policy (mode enforce)"),
        });
    }
    plan.tls = TlsPolicy::Required;
    plan.tls_label = "mta-sts-enforce";
    Ok(())
}

fn needs_dane(tls: TlsPolicy) -> bool {
    matches!(tls, TlsPolicy::Dane | TlsPolicy::DaneOnly)
}

/// The addresses of `host` the guard lets through; none left is a temporary failure that
/// names the first refused address and why.
fn guarded(
    host: &str,
    mut addrs: Vec<SocketAddr>,
    guard: &AddressGuard,
) -> Result<Vec<SocketAddr>, RouteError> {
    let mut refused = None;
    addrs.retain(|&addr| match guard.check(addr) {
        Some(why) => {
            refused.get_or_insert((addr, why));
            false
        }
        None => true,
    });
    match refused {
        Some((addr, why)) if addrs.is_empty() => Err(RouteError::Temporary {
            status: "4.4.4",
            reason: format!(
                "{host}: not delivering to {} ({why}) found through the recipient's domain",
                addr.ip()
            ),
        }),
        _ => Ok(addrs),
    }
}

impl Hop {
    /// A host the recipient's domain chose (MX, implicit MX, address literal).
    fn smtp(name: String) -> Hop {
        Hop {
            name,
            port: SMTP_PORT,
            static_route: false,
        }
    }
}

/// A route's `host:port` (DNS name, IPv4 or `[IPv6]`, checked by the config compiler) as a
/// hop; IP addresses lose their brackets so `addresses` recognises them without a query.
fn static_hop(host_port: &str) -> Hop {
    if let Ok(addr) = host_port.parse::<SocketAddr>() {
        return Hop {
            name: addr.ip().to_string(),
            port: addr.port(),
            static_route: true,
        };
    }
    let invalid = "route hosts are validated by the config compiler";
    let (host, port) = host_port.rsplit_once(':').expect(invalid);
    Hop {
        name: host.to_ascii_lowercase(),
        port: port.parse().expect(invalid),
        static_route: true,
    }
}

/// The address of an RFC 5321 4.1.3 address literal: `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
fn address_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    match inner.split_at_checked(5) {
        Some((tag, v6)) if tag.eq_ignore_ascii_case("IPv6:") => {
            v6.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
        }
        _ => inner.parse::<Ipv4Addr>().ok().map(IpAddr::V4),
    }
}

/// The usable MX hosts in the order to try, and the destination key of their set. Works in
/// place on the resolver's vector: the only new allocation is the key.
fn mx_hops(mut hosts: Vec<MxHost>, rng: &mut impl Rng) -> Result<(String, Vec<Hop>), RouteError> {
    // The root means "no service here", so it is dropped; if nothing else is left the domain
    // has, in effect, a null MX.
    hosts.retain(|h| h.name != ".");
    if hosts.is_empty() {
        return Err(null_mx());
    }
    // An IP address is not a valid MX exchange (RFC 5321 5.1); it is skipped when real host
    // names exist, and otherwise used as given rather than bouncing mail over a fixable
    // misconfiguration.
    let is_ip = |h: &MxHost| h.name.parse::<IpAddr>().is_ok();
    if hosts.iter().any(|h| !is_ip(h)) {
        hosts.retain(|h| !is_ip(h));
    }
    // Sorted by name for the key; a host listed twice keeps its best preference.
    hosts.sort_unstable_by(|a, b| a.name.cmp(&b.name).then(a.preference.cmp(&b.preference)));
    hosts.dedup_by(|later, earlier| later.name == earlier.name);
    let mut key = String::with_capacity(3 + hosts.iter().map(|h| h.name.len() + 1).sum::<usize>());
    key.push_str("mx:");
    for (i, host) in hosts.iter().enumerate() {
        if i > 0 {
            key.push(',');
        }
        key.push_str(&host.name);
    }
    hosts.sort_unstable_by_key(|h| h.preference);
    for equal in hosts.chunk_by_mut(|a, b| a.preference == b.preference) {
        equal.shuffle(rng);
    }
    let hops = hosts.into_iter().map(|h| Hop::smtp(h.name)).collect();
    Ok((key, hops))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    fn hosts(list: &[(u16, &str)]) -> Vec<MxHost> {
        list.iter()
            .map(|&(preference, name)| MxHost {
                preference,
                name: name.to_owned(),
            })
            .collect()
    }

    fn names(hops: &[Hop]) -> Vec<&str> {
        hops.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn mx_hops_follow_preference_and_the_key_is_the_sorted_set() {
        let mut rng = StdRng::seed_from_u64(1);
        let (key, hops) = mx_hops(
            hosts(&[(20, "b.test"), (10, "c.test"), (30, "a.test")]),
            &mut rng,
        )
        .unwrap();
        assert_eq!(key, "mx:a.test,b.test,c.test");
        assert_eq!(names(&hops), ["c.test", "b.test", "a.test"]);
        assert!(hops.iter().all(|h| h.port == 25));
    }

    #[test]
    fn equal_preferences_are_shuffled_within_their_rank_only() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut firsts = std::collections::HashSet::new();
        for _ in 0..64 {
            let list = hosts(&[
                (10, "a.test"),
                (10, "b.test"),
                (10, "c.test"),
                (5, "z.test"),
            ]);
            let (key, hops) = mx_hops(list, &mut rng).unwrap();
            assert_eq!(key, "mx:a.test,b.test,c.test,z.test");
            assert_eq!(hops[0].name, "z.test");
            firsts.insert(hops[1].name.clone());
        }
        assert_eq!(firsts.len(), 3);
    }

    #[test]
    fn duplicate_hosts_keep_their_best_preference() {
        let mut rng = StdRng::seed_from_u64(1);
        let list = hosts(&[(30, "a.test"), (20, "b.test"), (10, "a.test")]);
        let (key, hops) = mx_hops(list, &mut rng).unwrap();
        assert_eq!(key, "mx:a.test,b.test");
        assert_eq!(names(&hops), ["a.test", "b.test"]);
    }

    #[test]
    fn root_and_ip_exchanges_are_ignored_next_to_real_hosts() {
        let mut rng = StdRng::seed_from_u64(1);
        let list = hosts(&[(0, "."), (5, "192.0.2.1"), (10, "mx.test")]);
        let (key, hops) = mx_hops(list, &mut rng).unwrap();
        assert_eq!(key, "mx:mx.test");
        assert_eq!(names(&hops), ["mx.test"]);

        let (key, hops) = mx_hops(hosts(&[(0, "."), (5, "192.0.2.1")]), &mut rng).unwrap();
        assert_eq!(key, "mx:192.0.2.1");
        assert_eq!(names(&hops), ["192.0.2.1"]);

        assert_eq!(mx_hops(hosts(&[(10, ".")]), &mut rng), Err(null_mx()));
    }

    #[test]
    fn static_hosts_parse_names_and_literals() {
        let hop = |name: &str, port| Hop {
            name: name.to_owned(),
            port,
            static_route: true,
        };
        assert_eq!(
            static_hop("Relay.Example.test:587"),
            hop("relay.example.test", 587)
        );
        assert_eq!(static_hop("192.0.2.7:25"), hop("192.0.2.7", 25));
        assert_eq!(static_hop("[2001:db8::1]:2525"), hop("2001:db8::1", 2525));
    }

    #[test]
    fn address_literals() {
        assert_eq!(
            address_literal("[192.0.2.1]"),
            Some(IpAddr::from([192, 0, 2, 1]))
        );
        assert_eq!(
            address_literal("[IPv6:2001:db8::1]"),
            Some("2001:db8::1".parse().unwrap())
        );
        assert_eq!(
            address_literal("[ipv6:::1]"),
            Some(IpAddr::from(Ipv6Addr::LOCALHOST))
        );
        assert_eq!(address_literal("[2001:db8::1]"), None);
        assert_eq!(address_literal("example.test"), None);
        assert_eq!(address_literal("[example.test]"), None);
    }

    /// A resolver whose name servers never answer.
    struct Silent;

    impl Resolver for Silent {
        fn mx<'a>(&'a self, _: &'a str) -> crate::routing::dns::DnsFuture<'a, MxLookup> {
            Box::pin(std::future::pending())
        }
        fn addresses<'a>(&'a self, _: &'a str) -> crate::routing::dns::DnsFuture<'a, Vec<IpAddr>> {
            Box::pin(std::future::pending())
        }
        fn txt<'a>(&'a self, _: &'a str) -> crate::routing::dns::TxtFuture<'a> {
            Box::pin(std::future::pending())
        }
    }

    fn silent_router(routes: &[RouteConfig]) -> Router {
        Router::new(
            routes,
            TlsPolicy::Opportunistic,
            Arc::new(Silent),
            AddressGuard::default(),
        )
    }

    #[test]
    fn domains_behind_one_mx_set_share_a_queue_only_under_the_same_policy() {
        let plan = |hosts: &[&str]| RoutePlan {
            key: "mx:a.example.net,b.example.net".into(),
            hops: hosts.iter().map(|h| Hop::smtp(h.to_string())).collect(),
            tls: TlsPolicy::Opportunistic,
            auth: None,
            tls_label: "opportunistic",
            dane: None,
        };
        let plain = plan(&["b.example.net", "a.example.net"]);
        assert_eq!(
            plain.queue_key(TlsPolicy::Opportunistic),
            "mx:a.example.net,b.example.net"
        );
        // MTA-STS enforce naming one of the two hosts: a queue of its own.
        let mut enforced = plan(&["a.example.net", "b.example.net"]);
        let policy = Policy {
            mode: StsMode::Enforce,
            mx: vec!["a.example.net".into()],
            max_age: 60,
        };
        apply_sts("d.example", &policy, &mut enforced).unwrap();
        let key = enforced.queue_key(TlsPolicy::Opportunistic);
        assert_eq!(
            key,
            "mx:a.example.net,b.example.net|mta-sts-enforce|required|a.example.net"
        );
        assert_ne!(key, plain.queue_key(TlsPolicy::Opportunistic));
        // Testing mode: same hosts and level, another label (reported apart).
        let mut testing = plan(&["a.example.net", "b.example.net"]);
        let policy = Policy {
            mode: StsMode::Testing,
            ..policy
        };
        apply_sts("d.example", &policy, &mut testing).unwrap();
        assert_ne!(
            testing.queue_key(TlsPolicy::Opportunistic),
            plain.queue_key(TlsPolicy::Opportunistic)
        );
        // A plan at another level than delivery.tls (a per-domain route level).
        let mut required = plan(&["a.example.net"]);
        required.tls = TlsPolicy::Required;
        required.tls_label = TlsPolicy::Required.name();
        assert_ne!(required.queue_key(TlsPolicy::Opportunistic), required.key);
        // DANE: its own queue even at the same level name.
        let mut dane = plan(&["a.example.net"]);
        dane.dane = Some(Arc::new(HashMap::new()));
        assert_ne!(dane.queue_key(TlsPolicy::Opportunistic), dane.key);
        // Static routes keep their key.
        let mut route = plan(&["a.example.net"]);
        route.key = "route:r.example".into();
        route.tls = TlsPolicy::Required;
        assert_eq!(route.queue_key(TlsPolicy::Opportunistic), "route:r.example");
    }

    #[test]
    fn an_enforced_mta_sts_policy_keeps_its_mx_hosts_and_requires_verified_tls() {
        let plan = |hosts: &[&str]| RoutePlan {
            key: "mx:x".into(),
            hops: hosts.iter().map(|h| Hop::smtp(h.to_string())).collect(),
            tls: TlsPolicy::Opportunistic,
            auth: None,
            tls_label: "opportunistic",
            dane: None,
        };
        let policy = |mode| Policy {
            mode,
            mx: vec!["*.example.net".into()],
            max_age: 60,
        };
        let mut p = plan(&["mx1.example.net", "rogue.example.org", "mx2.example.net"]);
        apply_sts("example.net", &policy(StsMode::Enforce), &mut p).unwrap();
        let names: Vec<&str> = p.hops.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["mx1.example.net", "mx2.example.net"]);
        assert_eq!(p.tls, TlsPolicy::Required);

        let mut p = plan(&["rogue.example.org"]);
        match apply_sts("example.net", &policy(StsMode::Enforce), &mut p) {
            Err(RouteError::Temporary { status, .. }) => assert_eq!(status, "4.7.5"),
            other => panic!("{other:?}"),
        }
        let mut p = plan(&["rogue.example.org"]);
        apply_sts("example.net", &policy(StsMode::Testing), &mut p).unwrap();
        assert_eq!(p.hops.len(), 1);
        assert_eq!(p.tls, TlsPolicy::Opportunistic);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lookup_that_never_ends_fails_temporarily_after_the_plan_timeout() {
        let router = silent_router(&[]);
        let started = tokio::time::Instant::now();
        let err = router.plan("dead.test").await.unwrap_err();
        assert_eq!(started.elapsed(), PLAN_TIMEOUT, "on the paused clock");
        assert_eq!(
            err,
            RouteError::Temporary {
                status: "4.4.3",
                reason: "dead.test: DNS lookup timed out after 15 s".into()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn static_routes_and_address_literals_never_ask_dns() {
        let route = RouteConfig {
            domain: "lab.test".into(),
            hosts: vec!["relay.lab.test:2525".into()],
            tls: None,
            auth: None,
            pool: None,
            verp: None,
        };
        let router = silent_router(&[route]);
        let started = tokio::time::Instant::now();
        assert_eq!(router.plan("lab.test").await.unwrap().key, "route:lab.test");
        assert_eq!(
            router.static_plan("[192.0.2.1]").unwrap().hops[0].name,
            "192.0.2.1"
        );
        assert!(router.static_plan("other.test").is_none());
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[test]
    fn dns_errors_map_to_enhanced_status_codes() {
        let status = |e: DnsError| match RouteError::from(e) {
            RouteError::Permanent { status, .. } | RouteError::Temporary { status, .. } => status,
        };
        assert_eq!(status(DnsError::NxDomain("x.test".into())), "5.1.2");
        assert_eq!(status(DnsError::NoAddresses("x.test".into())), "5.1.2");
        assert_eq!(status(DnsError::Temporary("SERVFAIL".into())), "4.4.3");
        assert_eq!(
            RouteError::from(DnsError::NxDomain("x.test".into())).to_string(),
            "5.1.2 x.test: no such domain"
        );
    }
}
