//! The traffic-shaping sections: `[shaping]` (global caps, `[shaping.default]` limits,
//! `[[shaping.providers]]`, `[[shaping.domains]]`, `[shaping.adaptive]`, `[shaping.warmup]`)
//! and `[[pools]]` (source-IP pools).
//!
//! Only syntax, ranges and cross-references are checked here; what the values mean at run time
//! is `crate::shaping`'s business, except `shaping.adaptive.throttle_patterns` /
//! `block_patterns`: they are bounce classification rules
//! ([`AdaptiveConfig::classification_rules`]), since shaping reads replies by their category. Built-in provider definitions (Gmail, Microsoft, Yahoo/AOL,
//! Apple) are added here unless `shaping.builtin_providers = false`; a configured provider of
//! the same name replaces the built-in one.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::Duration;

use toml::Value;

use super::check_dns_name;
use super::reader::{count, duration, nonzero, string, TableReader};
use crate::taxonomy::{Category, Rule};

/// A message or connection rate, kept as events per second.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub per_second: f64,
}

impl Rate {
    pub fn per_minute(n: f64) -> Rate {
        Rate {
            per_second: n / 60.0,
        }
    }

    pub fn per_minute_value(self) -> f64 {
        self.per_second * 60.0
    }
}

/// Limits for one (source address, bucket) pair. `None` means "inherit" while merging and
/// "unlimited" once merged.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct LimitsConfig {
    /// Concurrent connections.
    pub max_connections: Option<usize>,
    /// Messages (transactions) per unit of time; GCRA, burst 1.
    pub rate: Option<Rate>,
    /// Messages over one connection before it is closed.
    pub max_messages_per_connection: Option<usize>,
    /// New connections opened per minute.
    pub connections_per_minute: Option<u32>,
}

impl LimitsConfig {
    /// `self` with every unset value taken from `base`.
    pub fn over(self, base: &LimitsConfig) -> LimitsConfig {
        LimitsConfig {
            max_connections: self.max_connections.or(base.max_connections),
            rate: self.rate.or(base.rate),
            max_messages_per_connection: self
                .max_messages_per_connection
                .or(base.max_messages_per_connection),
            connections_per_minute: self.connections_per_minute.or(base.connections_per_minute),
        }
    }
}

/// A mailbox provider: every destination whose MX hosts end in one of `mx` (or whose
/// recipient domain is one of `domains`) shares these limits.
#[derive(Debug, Clone, PartialEq)]
pub struct ProviderConfig {
    /// Lowercase; the bucket name and the metrics label.
    pub name: String,
    /// Lowercase MX host name suffixes, each starting with a dot (".google.com").
    pub mx: Vec<String>,
    /// Lowercase recipient domains known to be hosted there (for static routes, and before
    /// any MX lookup).
    pub domains: Vec<String>,
    pub limits: LimitsConfig,
}

/// Limits for the destination one recipient domain routes to.
#[derive(Debug, Clone, PartialEq)]
pub struct DomainLimits {
    pub domain: String,
    pub limits: LimitsConfig,
}

/// Additive-increase, multiplicative-decrease of the message rate per (source, bucket).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptiveConfig {
    /// A throttling reply multiplies the current rate by this. Default 0.5.
    pub decrease: f64,
    /// Each `window` without throttling adds this share of the configured rate. Default 0.05.
    pub increase: f64,
    /// Decreases are at most one per window, increases one per window. Default 30s.
    pub window: Duration,
    /// The rate never falls below this share of the configured rate. Default 0.05.
    pub floor: f64,
    /// A throttling reply also suspends the pair this long. Default 0s (no suspension).
    pub throttle_suspend: Duration,
    /// A blocking reply suspends the pair this long. Default 1h.
    pub block_suspend: Duration,
    /// Lowercase substrings that make a 4xx reply `rate_limited` (throttling): shorthand for
    /// an operator classification rule, see [`AdaptiveConfig::classification_rules`].
    pub throttle_patterns: Vec<String>,
    /// Lowercase substrings that make a 4xx or 5xx reply `spam_block` (a reputation block).
    pub block_patterns: Vec<String>,
}

impl AdaptiveConfig {
    /// `throttle_patterns` and `block_patterns` as bounce classification rules, tried after
    /// `bounce.rules` and before the shipped ones: shaping reads a reply through its category
    /// (rate_limited throttles, spam_block blocks), so these are classification, like every
    /// other reply wording.
    pub fn classification_rules(&self) -> Vec<Rule> {
        let rule = |category, classes: &[&str], text: &[String]| Rule {
            category,
            status: classes
                .iter()
                .map(|c| c.parse().expect("a reply class is a status pattern"))
                .collect(),
            text: text.to_vec(),
            regex: None,
        };
        let mut rules = Vec::new();
        // A block outranks a throttle, as a suspension outranks a rate cut. An empty text
        // list would match every reply of the class.
        if !self.block_patterns.is_empty() {
            rules.push(rule(Category::SpamBlock, &["4", "5"], &self.block_patterns));
        }
        if !self.throttle_patterns.is_empty() {
            rules.push(rule(Category::RateLimited, &["4"], &self.throttle_patterns));
        }
        rules
    }
}

impl Default for AdaptiveConfig {
    fn default() -> Self {
        AdaptiveConfig {
            decrease: 0.5,
            increase: 0.05,
            window: Duration::from_secs(30),
            floor: 0.05,
            throttle_suspend: Duration::ZERO,
            block_suspend: Duration::from_secs(3600),
            throttle_patterns: Vec::new(),
            block_patterns: Vec::new(),
        }
    }
}

/// What happens when a source has reached its warm-up cap for a provider today.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenCapped {
    /// Use another address of the pool that is not capped for that provider.
    Overflow,
    /// Keep the mail until the next day.
    Wait,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WarmupConfig {
    /// Daily caps per (source, provider) by day since the source's `warmup_start`; unlimited
    /// after the last. Default: a doubling curve from 50 to 51,200 over 11 days, then 100k/day
    /// twice, 200k/day twice.
    pub curve: Vec<u64>,
    /// IANA time zone in which days roll over at midnight. Default "UTC".
    pub time_zone: String,
    pub when_capped: WhenCapped,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        WarmupConfig {
            curve: vec![
                50, 100, 200, 400, 800, 1_600, 3_200, 6_400, 12_800, 25_600, 51_200, 100_000,
                100_000, 200_000, 200_000,
            ],
            time_zone: "UTC".to_owned(),
            when_capped: WhenCapped::Overflow,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShapingConfig {
    /// Outbound connections in all, every source and destination. Default unlimited.
    pub max_connections: Option<usize>,
    /// Outbound connections per source address. Default unlimited.
    pub max_connections_per_source: Option<usize>,
    /// Destinations (buckets) whose shaping state is kept; beyond it the state of those idle
    /// longest (no mail waiting, no connection, not suspended) is forgotten. Default 50,000.
    pub max_destinations: usize,
    /// Limits of every destination that is neither a provider nor has a domain rule, and the
    /// base that provider and domain limits inherit from.
    pub default: LimitsConfig,
    /// Configured providers, then the built-in ones not replaced by name.
    pub providers: Vec<ProviderConfig>,
    pub domains: Vec<DomainLimits>,
    pub adaptive: AdaptiveConfig,
    pub warmup: WarmupConfig,
    /// The cluster store (`shaping.shared`); `None`: every limit is this node's alone.
    pub shared: Option<SharedConfig>,
}

/// A Redis server shared by the nodes of one cluster: pair rates, connection counts and
/// warm-up counters are counted there, so the cluster keeps one limit.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedConfig {
    /// `redis://[user:password@]host[:port][/db]`.
    pub url: String,
    /// The password, from a file (`cluster.password_file` when the store is the cluster's).
    pub password_file: Option<std::path::PathBuf>,
    /// CAs for a `rediss://` store (`cluster.ca_file` when the store is the cluster's).
    pub ca_file: Option<std::path::PathBuf>,
    /// Nodes in the cluster: while the store is unreachable each node keeps 1/node_count of
    /// every shared limit. Default 1.
    pub node_count: u32,
    /// Prefix of every key, so several clusters can use one Redis. Default "tern".
    pub prefix: String,
    /// Longest wait for one store operation (or a connect) before falling back. Default 250ms.
    pub timeout: Duration,
    /// How often a node that fell back tries the store again. Default 5s.
    pub retry: Duration,
}

impl Default for ShapingConfig {
    fn default() -> Self {
        ShapingConfig {
            max_connections: None,
            max_connections_per_source: None,
            max_destinations: 50_000,
            default: LimitsConfig::default(),
            providers: builtin_providers(),
            domains: Vec::new(),
            adaptive: AdaptiveConfig::default(),
            warmup: WarmupConfig::default(),
            shared: None,
        }
    }
}

/// One local address of a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolAddress {
    /// Bound before connecting.
    pub address: IpAddr,
    /// Our EHLO name on connections from this address. Default: server.hostname.
    pub ehlo: Option<String>,
    /// First day of this address's warm-up; unset: warmed, no daily caps.
    pub warmup_start: Option<jiff::civil::Date>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// Unique; the value of `X-Tern-Pool` and of a route's `pool`.
    pub name: String,
    /// Mail from these sender domains (lowercase) uses this pool.
    pub senders: Vec<String>,
    /// At least one.
    pub addresses: Vec<PoolAddress>,
    /// The pool for mail that names none. At most one pool has it; without any, the first.
    pub default: bool,
}

fn builtin_providers() -> Vec<ProviderConfig> {
    let p =
        |name: &str, mx: &[&str], domains: &[&str], conns, per_minute, per_conn| ProviderConfig {
            name: name.to_owned(),
            mx: mx.iter().map(|s| s.to_string()).collect(),
            domains: domains.iter().map(|s| s.to_string()).collect(),
            limits: LimitsConfig {
                max_connections: Some(conns),
                rate: Some(Rate::per_minute(per_minute)),
                max_messages_per_connection: Some(per_conn),
                connections_per_minute: None,
            },
        };
    vec![
        p(
            "google",
            &[".google.com", ".googlemail.com"],
            &["gmail.com", "googlemail.com"],
            10,
            1200.0,
            100,
        ),
        p(
            "microsoft",
            &[".protection.outlook.com", ".hotmail.com", ".outlook.com"],
            &["outlook.com", "hotmail.com", "live.com", "msn.com"],
            8,
            600.0,
            50,
        ),
        p(
            "yahoo",
            &[".yahoodns.net"],
            &["yahoo.com", "aol.com", "ymail.com", "rocketmail.com"],
            5,
            300.0,
            20,
        ),
        p(
            "apple",
            &[".icloud.com", ".me.com"],
            &["icloud.com", "me.com", "mac.com"],
            5,
            300.0,
            50,
        ),
    ]
}

/// `"100/s"`, `"600/min"` (or `/m`), `"10000/h"`.
fn rate(v: &Value) -> Result<Rate, String> {
    let s = string(v)?;
    let invalid = || {
        format!("invalid rate {s:?} (expected a number, '/', and s, min or h, e.g. \"600/min\")")
    };
    let (n, unit) = s.split_once('/').ok_or_else(invalid)?;
    let n: f64 = n.trim().parse().map_err(|_| invalid())?;
    if !(n.is_finite() && n > 0.0) {
        return Err("must be greater than 0".to_owned());
    }
    let seconds = match unit.trim() {
        "s" | "sec" => 1.0,
        "m" | "min" => 60.0,
        "h" | "hour" => 3600.0,
        _ => return Err(invalid()),
    };
    Ok(Rate {
        per_second: n / seconds,
    })
}

fn fraction(v: &Value) -> Result<f64, String> {
    let x = v
        .as_float()
        .or_else(|| v.as_integer().map(|i| i as f64))
        .ok_or_else(|| "expected a number".to_owned())?;
    if x > 0.0 && x < 1.0 {
        Ok(x)
    } else {
        Err(format!("must be between 0 and 1 (exclusive), found {x}"))
    }
}

fn domain(v: &Value) -> Result<String, String> {
    let d = string(v)?;
    check_dns_name(d).map(|()| d.to_ascii_lowercase())
}

fn compile_limits(r: &mut TableReader<'_>) -> LimitsConfig {
    let positive = |v: &Value| count(v).and_then(nonzero);
    LimitsConfig {
        max_connections: r.get("max_connections", positive),
        rate: r.get("rate", rate),
        max_messages_per_connection: r.get("max_messages_per_connection", positive),
        connections_per_minute: r.get("connections_per_minute", |v| {
            positive(v).and_then(|n| u32::try_from(n).map_err(|_| "too large".to_owned()))
        }),
    }
}

/// The `[cluster]` Redis as shaping's default store.
pub(super) struct ClusterStore {
    pub url: String,
    pub password_file: Option<std::path::PathBuf>,
    pub ca_file: Option<std::path::PathBuf>,
    pub prefix: String,
}

pub(super) fn compile_shaping(
    r: &mut TableReader<'_>,
    cluster_store: Option<ClusterStore>,
) -> ShapingConfig {
    let d = ShapingConfig::default();
    let positive = |v: &Value| count(v).and_then(nonzero);
    let max_connections = r.get("max_connections", positive);
    let max_connections_per_source = r.get("max_connections_per_source", positive);
    let max_destinations = r
        .get("max_destinations", positive)
        .unwrap_or(d.max_destinations);
    let builtin = r
        .get("builtin_providers", |v| {
            v.as_bool()
                .ok_or_else(|| "expected true or false".to_owned())
        })
        .unwrap_or(true);
    let default = r.section("default", compile_limits);
    let mut names: HashMap<String, String> = HashMap::new();
    let mut providers: Vec<ProviderConfig> = r
        .tables("providers", |r| {
            let name = r.require("name", |v| match string(v)? {
                "" => Err("must not be empty".to_owned()),
                n if n
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                {
                    Ok(n.to_ascii_lowercase())
                }
                n => Err(format!("invalid name {n:?}: letters, digits, '-' and '_'")),
            });
            let mx = r
                .list("mx", |v| {
                    let s = string(v)?.trim_start_matches('.');
                    check_dns_name(s).map(|()| format!(".{}", s.to_ascii_lowercase()))
                })
                .unwrap_or_default();
            let domains = r.list("domains", domain).unwrap_or_default();
            if mx.is_empty() && domains.is_empty() {
                r.error("mx", "a provider needs at least one MX pattern or domain");
            }
            let limits = compile_limits(r);
            let name = name?;
            if let Some(first) = names.get(&name) {
                r.error(
                    "name",
                    format!("duplicate provider {name:?} (already defined by {first})"),
                );
            } else {
                names.insert(name.clone(), r.path_of("name"));
            }
            Some(ProviderConfig {
                name,
                mx,
                domains,
                limits,
            })
        })
        .into_iter()
        .flatten()
        .collect();
    if builtin {
        for p in d.providers {
            if !names.contains_key(&p.name) {
                providers.push(p);
            }
        }
    }
    let mut seen: HashMap<String, String> = HashMap::new();
    let domains = r
        .tables("domains", |r| {
            let d = r.require("domain", domain)?;
            if let Some(first) = seen.get(&d) {
                r.error(
                    "domain",
                    format!("duplicate domain rule {d:?} (already defined by {first})"),
                );
            } else {
                seen.insert(d.clone(), r.path_of("domain"));
            }
            Some(DomainLimits {
                domain: d,
                limits: compile_limits(r),
            })
        })
        .into_iter()
        .flatten()
        .collect();
    let adaptive = r.section("adaptive", compile_adaptive);
    let warmup = r.section("warmup", compile_warmup);
    let shared = compile_shared(r, cluster_store);
    ShapingConfig {
        max_connections,
        max_connections_per_source,
        max_destinations,
        default,
        providers,
        domains,
        adaptive,
        warmup,
        shared,
    }
}

/// `shaping.shared` and the keys that only mean something with it.
/// `cluster_store`: the `[cluster]` Redis (URL, password file, prefix), the default store.
fn compile_shared(
    r: &mut TableReader<'_>,
    cluster_store: Option<ClusterStore>,
) -> Option<SharedConfig> {
    const WITH_SHARED: [&str; 4] = [
        "node_count",
        "shared_prefix",
        "shared_timeout",
        "shared_retry",
    ];
    if !r.contains("shared") && cluster_store.is_none() {
        for key in WITH_SHARED {
            if r.contains(key) {
                r.error(key, "only meaningful with shaping.shared (a redis:// URL)");
            }
        }
    }
    let (default_url, password_file, ca_file, default_prefix) = match cluster_store {
        Some(c) if !r.contains("shared") => {
            (Some(c.url), c.password_file, c.ca_file, Some(c.prefix))
        }
        _ => (None, None, None, None),
    };
    let url = r.get("shared", |v| {
        let url = string(v)?;
        if !url.starts_with("redis://") {
            // Not echoed: the URL may carry a password.
            return Err("expected a redis:// URL".to_owned());
        }
        redis::Client::open(url).map_err(|e| format!("invalid Redis URL: {e}"))?;
        Ok(url.to_owned())
    });
    let node_count = r.get("node_count", |v| {
        let n = count(v).and_then(nonzero)?;
        u32::try_from(n).map_err(|_| "too large".to_owned())
    });
    let prefix = r.get("shared_prefix", |v| match string(v)? {
        "" => Err("must not be empty".to_owned()),
        p if p.bytes().all(|b| b.is_ascii_graphic()) => Ok(p.to_owned()),
        p => Err(format!(
            "invalid prefix {p:?}: printable ASCII without spaces"
        )),
    });
    let timeout = r.get("shared_timeout", |v| duration(v).and_then(nonzero));
    let retry = r.get("shared_retry", |v| duration(v).and_then(nonzero));
    let url = url.or(default_url)?;
    Some(SharedConfig {
        url,
        password_file,
        ca_file,
        node_count: node_count.unwrap_or(1),
        prefix: prefix
            .or(default_prefix)
            .unwrap_or_else(|| "tern".to_owned()),
        timeout: timeout.unwrap_or(Duration::from_millis(250)),
        retry: retry.unwrap_or(Duration::from_secs(5)),
    })
}

fn compile_adaptive(r: &mut TableReader<'_>) -> AdaptiveConfig {
    let d = AdaptiveConfig::default();
    let pattern = |v: &Value| match string(v)? {
        "" => Err("must not be empty".to_owned()),
        p => Ok(p.to_ascii_lowercase()),
    };
    AdaptiveConfig {
        decrease: r.get("decrease", fraction).unwrap_or(d.decrease),
        increase: r.get("increase", fraction).unwrap_or(d.increase),
        window: r
            .get("window", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.window),
        floor: r.get("floor", fraction).unwrap_or(d.floor),
        throttle_suspend: r
            .get("throttle_suspend", duration)
            .unwrap_or(d.throttle_suspend),
        block_suspend: r.get("block_suspend", duration).unwrap_or(d.block_suspend),
        throttle_patterns: r.list("throttle_patterns", pattern).unwrap_or_default(),
        block_patterns: r.list("block_patterns", pattern).unwrap_or_default(),
    }
}

fn compile_warmup(r: &mut TableReader<'_>) -> WarmupConfig {
    let d = WarmupConfig::default();
    let curve = r
        .list("curve", |v| count(v).and_then(nonzero).map(|n| n as u64))
        .unwrap_or(d.curve);
    let time_zone = r
        .get("time_zone", |v| {
            let tz = string(v)?;
            jiff::tz::TimeZone::get(tz)
                .map(|_| tz.to_owned())
                .map_err(|_| format!("unknown IANA time zone {tz:?}"))
        })
        .unwrap_or(d.time_zone);
    let when_capped = r
        .get("when_capped", |v| match string(v)? {
            "overflow" => Ok(WhenCapped::Overflow),
            "wait" => Ok(WhenCapped::Wait),
            other => Err(format!(
                "unknown value {other:?} (expected \"overflow\" or \"wait\")"
            )),
        })
        .unwrap_or(d.when_capped);
    WarmupConfig {
        curve,
        time_zone,
        when_capped,
    }
}

/// `names` collects pool names with their key paths (routes refer to them).
pub(super) fn compile_pool(
    r: &mut TableReader<'_>,
    names: &mut HashMap<String, String>,
    addresses: &mut HashMap<IpAddr, String>,
) -> Option<PoolConfig> {
    let name = r.require("name", |v| match string(v)? {
        "" => Err("must not be empty".to_owned()),
        n if n
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.') =>
        {
            Ok(n.to_owned())
        }
        n => Err(format!(
            "invalid pool name {n:?}: letters, digits, '.', '-' and '_'"
        )),
    });
    let senders = r.list("senders", domain).unwrap_or_default();
    let default = r
        .get("default", |v| {
            v.as_bool()
                .ok_or_else(|| "expected true or false".to_owned())
        })
        .unwrap_or(false);
    let list = r.require_tables("addresses", |r| {
        let address = r.require("address", |v| {
            string(v)?
                .parse::<IpAddr>()
                .map_err(|_| "expected an IP address".to_owned())
        })?;
        let ehlo = r.get("ehlo", |v| {
            let n = string(v)?;
            check_dns_name(n).map(|()| n.to_owned())
        });
        let warmup_start = r.get("warmup_start", |v| {
            let s = string(v)?;
            s.parse::<jiff::civil::Date>()
                .map_err(|_| format!("invalid date {s:?} (expected YYYY-MM-DD)"))
        });
        if let Some(first) = addresses.get(&address) {
            r.error(
                "address",
                format!("{address} is already in a pool ({first})"),
            );
        } else {
            addresses.insert(address, r.path_of("address"));
        }
        Some(PoolAddress {
            address,
            ehlo,
            warmup_start,
        })
    });
    let name = name?;
    if let Some(first) = names.get(&name) {
        r.error(
            "name",
            format!("duplicate pool {name:?} (already defined by {first})"),
        );
    } else {
        names.insert(name.clone(), r.path_of("name"));
    }
    let addresses: Vec<PoolAddress> = list.into_iter().flatten().collect();
    if addresses.is_empty() {
        return None;
    }
    Some(PoolConfig {
        name,
        senders,
        addresses,
        default,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigErrors};

    const BASE: &str = "[[listeners]]\naddress = \"127.0.0.1:2525\"\n";

    #[test]
    fn rates_parse_per_unit() {
        let r = |s: &str| rate(&Value::String(s.into()));
        assert_eq!(r("120/min").unwrap().per_second, 2.0);
        assert_eq!(r("5/s").unwrap().per_second, 5.0);
        assert_eq!(r("3600/h").unwrap().per_second, 1.0);
        assert!(r("0/s").is_err());
        assert!(r("10").is_err());
        assert!(r("10/day").is_err());
    }

    #[test]
    fn shaping_and_pools_compile() {
        let text = format!(
            "{BASE}
            [shaping]
            max_connections = 100
            [shaping.default]
            rate = \"60/min\"
            max_connections = 4
            [[shaping.providers]]
            name = \"google\"
            mx = [\"google.com\"]
            rate = \"10/s\"
            [[shaping.domains]]
            domain = \"Example.com\"
            max_messages_per_connection = 5
            [shaping.warmup]
            curve = [10, 20]
            time_zone = \"Europe/Berlin\"
            when_capped = \"wait\"
            [[pools]]
            name = \"bulk\"
            senders = [\"news.example.com\"]
            [[pools.addresses]]
            address = \"127.0.0.2\"
            ehlo = \"bulk.example.com\"
            warmup_start = \"2025-03-01\"
            [[routes]]
            domain = \"sink.test\"
            hosts = [\"127.0.0.1:2526\"]
            pool = \"bulk\"
            "
        );
        let c = Config::parse(&text).unwrap();
        let s = &c.shaping;
        assert_eq!(s.max_connections, Some(100));
        assert_eq!(s.default.max_connections, Some(4));
        assert_eq!(s.providers[0].name, "google");
        assert_eq!(s.providers[0].mx, [".google.com"]);
        assert_eq!(s.providers[0].limits.rate.unwrap().per_second, 10.0);
        assert_eq!(
            s.providers.len(),
            4,
            "google replaced, three built-ins added"
        );
        assert_eq!(s.domains[0].domain, "example.com");
        assert_eq!(s.warmup.curve, [10, 20]);
        assert_eq!(s.warmup.when_capped, WhenCapped::Wait);
        assert_eq!(
            c.pools[0].addresses[0].ehlo.as_deref(),
            Some("bulk.example.com")
        );
        assert_eq!(
            c.pools[0].addresses[0].warmup_start,
            Some(jiff::civil::date(2025, 3, 1))
        );
        assert_eq!(c.routes[0].pool.as_deref(), Some("bulk"));
    }

    #[test]
    fn adaptive_patterns_are_classification_rules() {
        let c = Config::parse(&format!(
            "{BASE}
            [shaping.adaptive]
            throttle_patterns = [\"Pace Yourself\"]
            block_patterns = [\"go away\"]
            "
        ))
        .unwrap();
        let rules = c.shaping.adaptive.classification_rules();
        let [block, throttle] = &rules[..] else {
            panic!("{rules:?}")
        };
        assert_eq!(throttle.category, Category::RateLimited);
        assert!(throttle.matches(Some("4.3.0"), "451 4.3.0 please pace yourself"));
        assert!(
            !throttle.matches(Some("5.3.0"), "550 5.3.0 please pace yourself"),
            "a 5xx is refused mail, not throttling"
        );
        assert_eq!(block.category, Category::SpamBlock);
        assert!(block.matches(Some("5.7.1"), "554 5.7.1 go away"));
        assert!(block.matches(Some("4.7.1"), "451 4.7.1 go away"));
        assert!(!block.matches(Some("2.0.0"), "250 2.0.0 ok, go away"));
        assert!(AdaptiveConfig::default().classification_rules().is_empty());
    }

    #[test]
    fn errors_name_their_keys() {
        let text = format!(
            "{BASE}
            [shaping.default]
            rate = \"fast\"
            [shaping.adaptive]
            decrease = 1.5
            [shaping.warmup]
            time_zone = \"Mars/Olympus\"
            [[pools]]
            name = \"a\"
            [[pools.addresses]]
            address = \"nope\"
            [[routes]]
            domain = \"x.test\"
            hosts = [\"127.0.0.1:25\"]
            pool = \"missing\"
            "
        );
        let ConfigErrors(errors) = Config::parse(&text).unwrap_err();
        let has = |prefix: &str| errors.iter().any(|e| e.starts_with(prefix));
        assert!(has("shaping.default.rate: invalid rate"), "{errors:?}");
        assert!(
            has("shaping.adaptive.decrease: must be between"),
            "{errors:?}"
        );
        assert!(has("shaping.warmup.time_zone: unknown IANA"), "{errors:?}");
        assert!(
            has("pools[0].addresses[0].address: expected an IP"),
            "{errors:?}"
        );
        assert!(
            has("routes[0].pool: unknown pool \"missing\""),
            "{errors:?}"
        );
    }

    #[test]
    fn the_shared_store_compiles_and_its_errors_name_their_keys() {
        let c = Config::parse(&format!(
            "{BASE}
            [shaping]
            shared = \"redis://127.0.0.1:6380/2\"
            node_count = 3
            shared_prefix = \"eu1\"
            shared_timeout = \"100ms\"
            shared_retry = \"2s\"
            "
        ))
        .unwrap();
        assert_eq!(
            c.shaping.shared,
            Some(SharedConfig {
                url: "redis://127.0.0.1:6380/2".into(),
                password_file: None,
                ca_file: None,
                node_count: 3,
                prefix: "eu1".into(),
                timeout: Duration::from_millis(100),
                retry: Duration::from_secs(2),
            })
        );
        let defaults = Config::parse(&format!(
            "{BASE}\n[shaping]\nshared = \"redis://localhost\"\n"
        ))
        .unwrap();
        let d = defaults.shaping.shared.unwrap();
        assert_eq!((d.node_count, d.prefix.as_str()), (1, "tern"));

        let errors = |body: &str| {
            Config::parse(&format!("{BASE}\n[shaping]\n{body}\n"))
                .unwrap_err()
                .0
        };
        let e = errors("shared = \"http://x\"");
        assert!(
            e[0].starts_with("shaping.shared: expected a redis:// URL"),
            "{e:?}"
        );
        let e = errors("node_count = 2");
        assert!(
            e[0].starts_with("shaping.node_count: only meaningful with shaping.shared"),
            "{e:?}"
        );
        let e = errors("shared = \"redis://h\"\nnode_count = 0\nshared_prefix = \"a b\"");
        assert!(
            e.iter().any(|e| e.starts_with("shaping.node_count:")),
            "{e:?}"
        );
        assert!(
            e.iter()
                .any(|e| e.starts_with("shaping.shared_prefix: invalid prefix")),
            "{e:?}"
        );
    }
}
