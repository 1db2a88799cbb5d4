//! What a config reload (SIGHUP) may change while tern runs, and what it reports.
//!
//! Live keys (applied to new sessions, new attempts and new routing decisions; sessions and
//! attempts already running finish with the values they started with): `[[routes]]`,
//! `[limits]` (session limits and timeouts, the connection caps and rates, `ipv6_prefix`, the
//! AUTH throttle, `max_inflight_bytes`, the bounce-mail rate: the SMTP edge keeps its
//! per-client state and the bytes it holds, and applies the new values to its next
//! decisions), `[relay]`, `[auth]`, `[[dkim]]` (keys re-read from disk: rotation),
//! `[delivery]` except the keys below (so `delivery.allow_local_mx` from the next connection,
//! `delivery.max_idle_connections` from the next idle connection), `spool.min_free_space`
//! (writes from then on), and `log.level`. `shaping.max_destinations` and
//! `webhooks[].max_backlog` restart with their sections.
//!
//! Restart keys ([`RESTART_KEYS`]): sockets, files and threads opened once at start. A changed
//! value is reported ("needs a restart") and the running value is kept, so the effective
//! config after a reload is the new file with these keys taken from the running one
//! ([`merge`]).
//!
//! Invariant: a reload is all or nothing. The caller validates everything that can fail
//! (parse, DKIM keys, smarthost password files, the modes of secret files) before anything
//! is applied; a failed reload
//! leaves the whole running config in place.

use crate::config::Config;

/// Every key that only takes effect at start, as written in the config file.
pub const RESTART_KEYS: &[&str] = &[
    "server.hostname",
    "server.shutdown_grace",
    "listeners",
    "tls",
    "spool.path",
    "spool.max_age",
    "spool.cache_size",
    "admin.address",
    "admin.token_file",
    "admin.max_connections",
    "delivery.suspended",
    "delivery.nameservers",
    "delivery.log_path",
    "delivery.mta_sts",
    "delivery.dane",
    "delivery.dnssec_trust_anchor",
    "delivery.ca_file",
    "delivery.check_dkim_records",
    "log.format",
    "bounce.rules",
    "shaping",
    "pools",
    "bounce.domains",
    "bounce.verp",
    "bounce.verp_local",
    "bounce.verp_key_file",
    "bounce.origin_key_file",
    "bounce.trust_window",
    "bounce.feedback_loops",
    "suppression",
    "unsubscribe",
    "webhooks",
    "sidecar",
    "cluster",
];

/// What a successful reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadReport {
    /// Keys whose new value was ignored because it needs a restart (from [`RESTART_KEYS`]).
    pub restart_needed: Vec<&'static str>,
}

/// The config to run after a reload: `new`, with every restart key set back to its `running`
/// value; and the restart keys whose value differed.
pub fn merge(running: &Config, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut kept = Vec::new();
    // Moves the running value into `new` when they differ, naming the key.
    macro_rules! keep {
        ($key:literal, $($field:tt)+) => {
            if new.$($field)+ != running.$($field)+ {
                new.$($field)+ = running.$($field)+.clone();
                kept.push($key);
            }
        };
    }
    keep!("server.hostname", server.hostname);
    keep!("server.shutdown_grace", server.shutdown_grace);
    keep!("listeners", listeners);
    keep!("tls", tls);
    keep!("spool.path", spool.path);
    keep!("spool.max_age", spool.max_age);
    keep!("spool.cache_size", spool.cache_size);
    keep!("admin.address", admin.address);
    keep!("admin.token_file", admin.token_file);
    // The connection slots are counted from the first value.
    keep!("admin.max_connections", admin.max_connections);
    keep!("delivery.suspended", delivery.suspended);
    keep!("delivery.nameservers", delivery.nameservers);
    keep!("delivery.log_path", delivery.log_path);
    keep!("delivery.mta_sts", delivery.mta_sts);
    keep!("delivery.dane", delivery.dane);
    keep!("delivery.dnssec_trust_anchor", delivery.dnssec_trust_anchor);
    keep!("delivery.ca_file", delivery.ca_file);
    keep!("delivery.check_dkim_records", delivery.check_dkim_records);
    keep!("log.format", log.format);
    keep!("bounce.rules", bounce.rules);
    keep!("shaping", shaping);
    keep!("pools", pools);
    keep!("bounce.domains", bounce.domains);
    keep!("bounce.verp", bounce.verp);
    keep!("bounce.verp_local", bounce.verp_local);
    keep!("bounce.verp_key_file", bounce.verp_key_file);
    keep!("bounce.origin_key_file", bounce.origin_key_file);
    keep!("bounce.trust_window", bounce.trust_window);
    keep!("bounce.feedback_loops", bounce.feedback_loops);
    keep!("suppression", suppression);
    keep!("unsubscribe", unsubscribe);
    keep!("webhooks", webhooks);
    // The bandit's posteriors and the model client's breaker and cache live with the stage.
    keep!("sidecar", sidecar);
    // The connection to the fleet's Redis and the replication tasks are opened once.
    keep!("cluster", cluster);
    (new, kept)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const BASE: &str = "[server]\nhostname = \"a.test\"\n\
        [[listeners]]\naddress = \"127.0.0.1:2525\"\n\
        [limits]\nmax_errors = 20\n";

    #[test]
    fn restart_keys_keep_the_running_value_and_are_named() {
        let running = Config::parse(BASE).unwrap();
        let new = Config::parse(
            "[server]\nhostname = \"b.test\"\n\
             [[listeners]]\naddress = \"127.0.0.1:2526\"\n\
             [limits]\nmax_errors = 3\nmax_connection_rate_per_ip = \"5/1s\"\n\
             session_timeout = \"1m\"\nmax_inflight_bytes = \"1GiB\"\n\
             [spool]\npath = \"/elsewhere\"\n\
             [log]\nformat = \"json\"\nlevel = \"debug\"\n",
        )
        .unwrap();
        let (effective, kept) = merge(&running, new);
        assert_eq!(
            kept,
            ["server.hostname", "listeners", "spool.path", "log.format"]
        );
        assert_eq!(effective.server.hostname, "a.test");
        assert_eq!(effective.listeners, running.listeners);
        assert_eq!(effective.spool.path, running.spool.path);
        assert_eq!(effective.log.format, running.log.format);
        // Live keys take the new value.
        assert_eq!(effective.limits.max_errors, 3);
        assert_eq!(effective.limits.max_connection_rate_per_ip.count, 5);
        assert_eq!(effective.limits.session_timeout, Duration::from_secs(60));
        assert_eq!(effective.limits.max_inflight_bytes, 1 << 30);
        assert_eq!(effective.log.level, "debug");
    }

    #[test]
    fn an_unchanged_file_needs_no_restart() {
        let running = Config::parse(BASE).unwrap();
        let (effective, kept) = merge(&running, Config::parse(BASE).unwrap());
        assert!(kept.is_empty(), "{kept:?}");
        assert_eq!(effective, running);
    }

    #[test]
    fn every_restart_key_is_checked() {
        // The macro list and RESTART_KEYS must not drift apart.
        let source = include_str!("reload.rs");
        for key in RESTART_KEYS {
            assert!(
                source.contains(&format!("keep!(\"{key}\"")),
                "{key} is in RESTART_KEYS but merge() does not check it"
            );
        }
        assert_eq!(source.matches("    keep!(\"").count(), RESTART_KEYS.len());
    }
}
