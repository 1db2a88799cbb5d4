//! Source-IP pools: which local addresses (and EHLO names) a message is sent from.
//!
//! The pool is chosen per message, first match wins:
//! 0. the `pool` field of an HTTP injection (`POST /api/v1/inject`; an unknown name is a 400);
//! 1. the control header `X-Tern-Pool: <name>` (removed at ingest, before DKIM signing, so it
//!    never leaves tern). An unknown name is logged and ignored: the message falls back to the
//!    rules below rather than being refused, since a typo in one header must not stop a
//!    campaign that the sender cannot see failing;
//! 2. the sender's domain (`senders` of a pool);
//!    (both recorded in the envelope's `pool` at ingest)
//! 3. the route's `pool` (decided when the message is routed);
//! 4. the default pool (`default = true`, else the first).
//!
//! Without `[[pools]]` there is one implicit pool with one unbound source that uses
//! `server.hostname` in EHLO.

use crate::config::{PoolConfig, RouteConfig};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

pub const POOL_HEADER: &str = "x-tern-pool";
/// The implicit pool's name.
pub const IMPLICIT: &str = "default";

/// One local address mail is sent from.
#[derive(Debug)]
pub struct Source {
    /// `None`: the implicit pool's unbound source.
    pub ip: Option<IpAddr>,
    pub ehlo: Option<String>,
    pub warmup_start: Option<jiff::civil::Date>,
    /// For logs, metrics and the API: the address, or "default".
    pub label: String,
}

#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub sources: Vec<Arc<Source>>,
}

pub struct Pools {
    pools: HashMap<String, Arc<Pool>>,
    by_sender: HashMap<String, String>,
    by_route: HashMap<String, String>,
    default: Arc<Pool>,
    configured: bool,
}

impl Pools {
    pub fn new(config: &[PoolConfig], routes: &[RouteConfig]) -> Pools {
        let mut pools = HashMap::new();
        let mut by_sender = HashMap::new();
        for p in config {
            let pool = Arc::new(Pool {
                name: p.name.clone(),
                sources: p
                    .addresses
                    .iter()
                    .map(|a| {
                        Arc::new(Source {
                            ip: Some(a.address),
                            ehlo: a.ehlo.clone(),
                            warmup_start: a.warmup_start,
                            label: a.address.to_string(),
                        })
                    })
                    .collect(),
            });
            for s in &p.senders {
                by_sender.entry(s.clone()).or_insert_with(|| p.name.clone());
            }
            pools.insert(p.name.clone(), pool);
        }
        let default = config
            .iter()
            .find(|p| p.default)
            .or(config.first())
            .and_then(|p| pools.get(&p.name).cloned())
            .unwrap_or_else(|| {
                Arc::new(Pool {
                    name: IMPLICIT.to_owned(),
                    sources: vec![Arc::new(Source {
                        ip: None,
                        ehlo: None,
                        warmup_start: None,
                        label: IMPLICIT.to_owned(),
                    })],
                })
            });
        let by_route = routes
            .iter()
            .filter_map(|r| Some((r.domain.clone(), r.pool.clone()?)))
            .collect();
        Pools {
            pools,
            by_sender,
            by_route,
            default,
            configured: !config.is_empty(),
        }
    }

    /// Whether `name` is a configured pool.
    pub fn contains(&self, name: &str) -> bool {
        self.pools.contains_key(name)
    }

    /// The configured pools' names, sorted ("none" without `[[pools]]`).
    pub fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.pools.keys().map(String::as_str).collect();
        names.sort_unstable();
        if names.is_empty() {
            names.push("none");
        }
        names
    }

    /// Whether `[[pools]]` exist (ready queues are then keyed by pool too).
    pub fn configured(&self) -> bool {
        self.configured
    }

    /// The pool ingest records: the header's (if known) or the sender domain's.
    pub fn at_ingest(&self, header: Option<&str>, sender: &str) -> Option<String> {
        if let Some(name) = header {
            if self.pools.contains_key(name) {
                return Some(name.to_owned());
            }
            tracing::warn!(pool = name, "X-Tern-Pool names no configured pool; ignored");
        }
        let domain = sender.rsplit_once('@')?.1.to_ascii_lowercase();
        self.by_sender.get(&domain).cloned()
    }

    /// The pool a message is sent from: its recorded one, else its route's, else the default.
    pub fn resolve(&self, recorded: Option<&str>, domain: &str) -> Arc<Pool> {
        recorded
            .and_then(|n| self.pools.get(n))
            .or_else(|| {
                self.by_route
                    .get(domain)
                    .or_else(|| self.by_route.get("*"))
                    .and_then(|n| self.pools.get(n))
            })
            .cloned()
            .unwrap_or_else(|| self.default.clone())
    }

    pub fn all_sources(&self) -> Vec<Arc<Source>> {
        let mut all: Vec<_> = self
            .pools
            .values()
            .flat_map(|p| p.sources.iter().cloned())
            .collect();
        if !self.configured {
            all.extend(self.default.sources.iter().cloned());
        }
        all
    }
}

/// Removes every `X-Tern-Pool` field (with its folded continuation lines) from the header
/// section of `content`; returns the first one's value.
pub fn strip_pool_header(content: &mut Vec<u8>) -> Option<String> {
    crate::message::take_header_first_line(content, POOL_HEADER)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pool_header_is_removed_with_its_continuations() {
        let mut m =
            b"From: a@b\r\nX-Tern-Pool: bulk\r\n  more\r\nSubject: hi\r\n\r\nX-Tern-Pool: body\r\n"
                .to_vec();
        assert_eq!(strip_pool_header(&mut m).as_deref(), Some("bulk"));
        assert_eq!(
            m,
            b"From: a@b\r\nSubject: hi\r\n\r\nX-Tern-Pool: body\r\n".to_vec()
        );
        let mut plain = b"Subject: x\r\n\r\nbody\r\n".to_vec();
        assert_eq!(strip_pool_header(&mut plain), None);
        assert_eq!(plain, b"Subject: x\r\n\r\nbody\r\n".to_vec());
    }
}
