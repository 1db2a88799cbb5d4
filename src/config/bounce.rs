//! `[bounce]` (the operator's rule file, bounce domains, VERP) and the bounce rule file
//! format itself, which the
//! shipped defaults (`config/bounce-rules.toml`) and an operator's file share:
//!
//! ```toml
//! [[rule]]
//! category = "invalid_recipient"   # a bounce::Category name; required
//! status = ["x.1.1", "5.1.10"]     # enhanced status patterns (x = any, prefix allowed)
//! text = ["user unknown"]          # case-insensitive substrings of the diagnostic
//! regex = "no (such|valid) user"   # case-insensitive regular expression
//! ```
//!
//! A rule needs at least one of `status`, `text` or `regex`; with `status` and text
//! conditions both must hold; `text` and `regex` together mean either. Errors are reported
//! per rule as `rule[i].key: ...`.

use std::path::PathBuf;
use std::time::Duration;

use super::reader::{self, string, TableReader};
use super::{check_dns_name, path};
use crate::taxonomy::{Category, Rule, StatusPattern};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BounceConfig {
    /// Extra classification rules, tried before the shipped ones. Default: none. The file is
    /// read and checked at start (and by `check-config`), like TLS and DKIM files.
    pub rules: Option<PathBuf>,
    /// Return-path domains (lowercase): RCPT to them is accepted from anyone, without relay
    /// permission, and such mail goes to bounce processing, never to delivery. Default none.
    pub domains: Vec<String>,
    /// VERP for all outgoing mail (a route's `verp` overrides it). Default false.
    pub verp: bool,
    /// Local part before the `+token` of VERP senders. Default `"bounces"`.
    pub verp_local: String,
    /// File holding the HMAC key that signs VERP tokens (at least 16 bytes; surrounding
    /// whitespace ignored). Required when VERP is on anywhere.
    pub verp_key_file: Option<PathBuf>,
    /// The key that signs the `X-Tern-Id` of outgoing mail (`crate::origin`); at least 16
    /// bytes. Default: `origin.key` beside the spool directory, created (32 random bytes,
    /// mode 0600) at the first start.
    pub origin_key_file: Option<PathBuf>,
    /// How long after sending a returned copy of a message may still tie a bounce or a
    /// complaint to it. Default 30 days.
    pub trust_window: Duration,
    /// Feedback-loop domains (lowercase): a complaint (ARF) DKIM-signed by one of them, or a
    /// subdomain, is believed for the addresses it names even when it cannot be tied to
    /// mail tern sent (providers that redact the returned copy). Default none.
    pub feedback_loops: Vec<String>,
}

impl Default for BounceConfig {
    fn default() -> Self {
        BounceConfig {
            rules: None,
            domains: Vec::new(),
            verp: false,
            verp_local: "bounces".to_owned(),
            verp_key_file: None,
            origin_key_file: None,
            trust_window: Duration::from_secs(30 * 86_400),
            feedback_loops: Vec::new(),
        }
    }
}

pub(super) fn boolean(v: &toml::Value) -> Result<bool, String> {
    v.as_bool()
        .ok_or_else(|| "expected true or false".to_owned())
}

/// `any_route_verp`: whether some `[[routes]]` entry turns VERP on, which needs the same keys.
pub(super) fn compile_bounce(r: &mut TableReader<'_>, any_route_verp: bool) -> BounceConfig {
    let d = BounceConfig::default();
    let rules = r.get("rules", path);
    let domains = r
        .list("domains", |v| {
            let name = string(v)?;
            check_dns_name(name).map(|()| name.to_ascii_lowercase())
        })
        .unwrap_or_default();
    let verp = r.get("verp", boolean).unwrap_or(d.verp);
    let verp_local = r
        .get("verp_local", |v| {
            let local = string(v)?;
            let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*-/=?^_`{|}~.".contains(c);
            if local.is_empty() || local.len() > 24 || !local.chars().all(atext) {
                Err("must be 1-24 characters of a plain local part, without '+'".to_owned())
            } else {
                Ok(local.to_owned())
            }
        })
        .unwrap_or(d.verp_local);
    let verp_key_file = r.get("verp_key_file", path);
    let origin_key_file = r.get("origin_key_file", path);
    let trust_window = r
        .get("trust_window", |v| {
            let window = reader::duration(v)?;
            if window < Duration::from_secs(86_400) || window > Duration::from_secs(365 * 86_400) {
                Err("must be between 1d and 365d".to_owned())
            } else {
                Ok(window)
            }
        })
        .unwrap_or(d.trust_window);
    let feedback_loops = r
        .list("feedback_loops", |v| {
            let name = string(v)?.trim_end_matches('.');
            check_dns_name(name).map(|()| name.to_ascii_lowercase())
        })
        .unwrap_or_default();
    if verp || any_route_verp {
        if domains.is_empty() {
            r.error(
                "domains",
                "VERP (bounce.verp or a route's verp) needs a bounce domain",
            );
        }
        if verp_key_file.is_none() {
            r.error(
                "verp_key_file",
                "VERP (bounce.verp or a route's verp) needs a key file",
            );
        }
    }
    BounceConfig {
        rules,
        domains,
        verp,
        verp_local,
        verp_key_file,
        origin_key_file,
        trust_window,
        feedback_loops,
    }
}

/// Compiles a rule file; `Err` holds every error, each with its `rule[i]` path.
pub fn compile_bounce_rules(text: &str) -> Result<Vec<Rule>, Vec<String>> {
    let table: toml::Table = text
        .parse()
        .map_err(|e| vec![super::syntax_error(text, &e)])?;
    reader::compile(table, |r| {
        r.tables("rule", compile_rule)
            .into_iter()
            .flatten()
            .collect()
    })
}

fn compile_rule(r: &mut TableReader<'_>) -> Option<Rule> {
    // A present but invalid condition is reported by its own key; only a rule without any
    // condition at all gets the "needs" error.
    let present = ["status", "text", "regex"].map(|k| r.contains(k));
    let category = r.require("category", |v| string(v)?.parse::<Category>());
    let status = r.list("status", |v| string(v)?.parse::<StatusPattern>());
    let text = r.list("text", |v| match string(v)? {
        "" => Err("must not be empty".to_owned()),
        t => Ok(t.to_lowercase()),
    });
    let regex = r.get("regex", |v| {
        regex::RegexBuilder::new(string(v)?)
            .case_insensitive(true)
            .size_limit(1 << 20)
            .build()
            .map_err(|e| e.to_string().replace('\n', " "))
    });
    let refused = [status.is_none(), text.is_none(), regex.is_none()];
    if present.iter().zip(refused).any(|(&p, r)| p && r) {
        return None;
    }
    let has_condition = status.as_ref().is_some_and(|s| !s.is_empty())
        || text.as_ref().is_some_and(|t| !t.is_empty())
        || regex.is_some();
    if !has_condition {
        r.error(
            "status",
            "a rule needs at least one of status, text or regex",
        );
        return None;
    }
    Some(Rule {
        category: category?,
        status: status.unwrap_or_default(),
        text: text.unwrap_or_default(),
        regex,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rule_error_names_its_index_and_key() {
        let errors = compile_bounce_rules(
            r#"
            [[rule]]
            category = "invalid_recipient"
            status = ["x.1.1"]

            [[rule]]
            category = "bogus"
            text = ["x"]

            [[rule]]
            category = "policy"

            [[rule]]
            category = "policy"
            status = ["5.q"]
            regex = "("
            colour = "red"
            "#,
        )
        .unwrap_err();
        let expect = [
            "rule[1].category: unknown category \"bogus\"",
            "rule[2].status: a rule needs at least one of status, text or regex",
            "rule[3].status[0]: invalid status pattern",
            "rule[3].regex: ",
            "rule[3].colour: unknown key",
        ];
        assert_eq!(errors.len(), expect.len(), "{errors:#?}");
        for (got, want) in errors.iter().zip(expect) {
            assert!(got.starts_with(want), "{got:?} should start with {want:?}");
        }
    }

    #[test]
    fn the_operator_file_is_a_config_key() {
        let config = crate::config::Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n[bounce]\nrules = \"/etc/tern/rules.toml\"\n",
        )
        .unwrap();
        assert_eq!(
            config.bounce.rules,
            Some(PathBuf::from("/etc/tern/rules.toml"))
        );
    }

    #[test]
    fn verp_needs_a_domain_and_a_key() {
        let err = crate::config::Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n[bounce]\nverp = true\nverp_local = \"a+b\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            [
                "bounce.verp_local: must be 1-24 characters of a plain local part, without '+'",
                "bounce.domains: VERP (bounce.verp or a route's verp) needs a bounce domain",
                "bounce.verp_key_file: VERP (bounce.verp or a route's verp) needs a key file",
            ]
        );
        let routed = crate::config::Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n[[routes]]\ndomain = \"a.test\"\nhosts = [\"127.0.0.1:25\"]\nverp = true\n",
        )
        .unwrap_err();
        assert_eq!(routed.0.len(), 2, "{routed:?}");
    }
}
