//! `[cluster]`: the Redis server (or Redis Cluster) that the nodes of one fleet share for the
//! suppression list, engagement profiles and bandit counts (see `crate::cluster`). Absent:
//! every node is alone, exactly as before.
//!
//! Relation to `shaping.shared`: when `[cluster]` is set and `shaping.shared` is not, shaping
//! uses the cluster's Redis too (same URL, password file and prefix), unless `redis_cluster`
//! is on: shaping's scripts touch keys of several pairs at once, which Redis Cluster does not
//! allow across slots, so a Redis Cluster fleet names a standalone `shaping.shared`.

use std::path::PathBuf;
use std::time::Duration;

use super::bounce::boolean;
use super::path;
use super::reader::{duration, nonzero, string, TableReader};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterConfig {
    /// `redis://host[:port][/db]` or `rediss://` (TLS, the system's CA roots). Required.
    pub url: String,
    /// The URL is one node of a Redis Cluster (the client discovers the rest). Default false.
    pub redis_cluster: bool,
    /// File with the Redis password (AUTH), mode 0600. Optional (the URL must not carry one).
    pub password_file: Option<PathBuf>,
    /// PEM bundle of the CAs a `rediss://` server's certificate must chain to, instead of the
    /// system's roots (a private CA). Optional; only with `rediss://`.
    pub ca_file: Option<PathBuf>,
    /// This node's name in the fleet (log lines, the origin of each shared write, leases).
    /// Default `server.hostname`. Unique per node.
    pub node: String,
    /// Prefix of every key (several fleets on one Redis). Default "tern".
    pub prefix: String,
    /// Longest wait for one Redis call or connect before this node works alone. Default 250ms.
    pub timeout: Duration,
    /// How often a node that lost Redis tries again. Default 1s.
    pub retry: Duration,
}

pub(super) fn compile_cluster(r: &mut TableReader<'_>, hostname: &str) -> Option<ClusterConfig> {
    let url = r.require("url", |v| {
        let url = string(v)?;
        // Not echoed: the URL may carry a password.
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err("expected a redis:// or rediss:// URL".to_owned());
        }
        let info = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|e| format!("invalid Redis URL: {e}"))?;
        if info.redis_settings().password().is_some() {
            return Err("the URL must not carry a password: use cluster.password_file".to_owned());
        }
        Ok(url.to_owned())
    });
    let redis_cluster = r.get("redis_cluster", boolean).unwrap_or(false);
    let password_file = r.get("password_file", path);
    let ca_file = r.get("ca_file", path);
    if ca_file.is_some() && url.as_ref().is_some_and(|u| !u.starts_with("rediss://")) {
        r.error("ca_file", "only meaningful with a rediss:// URL");
    }
    let node = r
        .get("node", |v| {
            let node = string(v)?;
            let ok = |c: char| c.is_ascii_alphanumeric() || "._-".contains(c);
            if node.is_empty() || node.len() > 64 || !node.chars().all(ok) {
                Err("must be 1-64 characters of letters, digits, '.', '_' or '-'".to_owned())
            } else {
                Ok(node.to_owned())
            }
        })
        .unwrap_or_else(|| hostname.to_owned());
    let prefix = r
        .get("prefix", |v| match string(v)? {
            "" => Err("must not be empty".to_owned()),
            p if p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_graphic() && b != b'{' && b != b'}') =>
            {
                Ok(p.to_owned())
            }
            p => Err(format!(
                "invalid prefix {p:?}: at most 64 printable ASCII characters, no spaces or braces"
            )),
        })
        .unwrap_or_else(|| "tern".to_owned());
    let timeout = r
        .get("timeout", |v| duration(v).and_then(nonzero))
        .unwrap_or(Duration::from_millis(250));
    let retry = r
        .get("retry", |v| duration(v).and_then(nonzero))
        .unwrap_or(Duration::from_secs(1));
    Some(ClusterConfig {
        url: url?,
        redis_cluster,
        password_file,
        ca_file,
        node,
        prefix,
        timeout,
        retry,
    })
}
