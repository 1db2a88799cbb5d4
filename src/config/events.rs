//! `[suppression]` (what happens to mail for a suppressed address, when soft entries expire)
//! and `[[webhooks]]` (where events are posted).

use std::path::PathBuf;
use std::time::Duration;

use super::path;
use super::reader::{count, duration, nonzero, string, TableReader};
use crate::taxonomy::Category;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SuppressionConfig {
    /// What a suppressed recipient gets. Default `reject`.
    pub mode: SuppressionMode,
    /// Failed (5xx) bounces of these categories suppress the address for `soft_expiry` only;
    /// hard ones (invalid recipient, domain not found with a 5.x.x status, complaints) suppress
    /// it until removed. Default `["mailbox_full"]`.
    pub soft_categories: Vec<Category>,
    /// How long a soft entry lasts. Default 7 days.
    pub soft_expiry: Duration,
}

impl Default for SuppressionConfig {
    fn default() -> Self {
        SuppressionConfig {
            mode: SuppressionMode::Reject,
            soft_categories: vec![Category::MailboxFull],
            soft_expiry: Duration::from_secs(7 * 86_400),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressionMode {
    /// `"reject"`: 550 5.7.1 at RCPT; HTTP injection answers 422 naming the recipients.
    Reject,
    /// `"drop"`: accepted, never delivered, a `suppressed` event per recipient.
    Drop,
}

/// `[unsubscribe]`: one-click unsubscribe (RFC 8058) for mail that asks for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnsubscribeConfig {
    /// Public base URL of the admin listener's `/u/` route; default
    /// `sidecar.tracking.base_url`. Without either, only the `mailto:` form is offered (and
    /// only with a bounce domain), and no List-Unsubscribe-Post.
    pub base_url: Option<String>,
    /// The token-signing key; default `unsubscribe.key` beside the spool directory, created
    /// (random, mode 0600) at the first start.
    pub key_file: Option<PathBuf>,
    /// What an unsubscribe suppresses. Default `list`.
    pub scope: UnsubscribeScope,
    /// How long a token is honoured after the message was sent. Default 365 days.
    pub max_age: Duration,
}

impl Default for UnsubscribeConfig {
    fn default() -> Self {
        UnsubscribeConfig {
            base_url: None,
            key_file: None,
            scope: UnsubscribeScope::List,
            max_age: Duration::from_secs(365 * 86_400),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsubscribeScope {
    /// `"list"`: the recipient gets no more mail of that list (sender identity); other mail
    /// (receipts, other lists) still goes.
    List,
    /// `"global"`: the recipient gets no more mail at all (a plain suppression entry).
    Global,
}

pub(super) fn compile_unsubscribe(r: &mut TableReader<'_>) -> UnsubscribeConfig {
    let d = UnsubscribeConfig::default();
    UnsubscribeConfig {
        base_url: r.get("base_url", |v| match string(v)? {
            u if u.starts_with("http://") || u.starts_with("https://") => {
                Ok(u.trim_end_matches('/').to_owned())
            }
            u => Err(format!("{u:?}: expected an http:// or https:// URL")),
        }),
        key_file: r.get("key_file", path),
        scope: r
            .get("scope", |v| match string(v)? {
                "list" => Ok(UnsubscribeScope::List),
                "global" => Ok(UnsubscribeScope::Global),
                other => Err(format!(
                    "unknown scope {other:?} (expected \"list\" or \"global\")"
                )),
            })
            .unwrap_or(d.scope),
        max_age: r
            .get("max_age", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.max_age),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    pub url: WebhookUrl,
    /// PEM bundle of CAs trusted for an `https://` URL besides the public (webpki) roots: a
    /// private CA. Optional.
    pub ca_file: Option<PathBuf>,
    /// File holding the HMAC-SHA256 secret of the `X-Tern-Signature` header. Required.
    pub secret_file: PathBuf,
    /// Events per POST at most. Default 100.
    pub batch_size: usize,
    /// How long a batch waits for more events before it is posted. Default 1s.
    pub interval: Duration,
    /// Events the outbox holds at most while the endpoint does not take them; past it the
    /// oldest are dropped (counted). Default 1,000,000.
    pub max_backlog: usize,
}

/// An `http://` or `https://host[:port]/path` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookUrl {
    /// `https://`: TLS, the server's certificate verified for `host`.
    pub tls: bool,
    /// `host` or `host:port`, as the Host header wants it.
    pub authority: String,
    pub host: String,
    pub port: u16,
    /// Starts with `/`.
    pub path: String,
}

impl std::fmt::Display for WebhookUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}{}", self.authority, self.path)
    }
}

impl WebhookUrl {
    /// The URL for logs: scheme and authority only. Webhook paths often carry the
    /// receiver's secret (Slack-style hook URLs), so a log line never shows them.
    pub fn redacted(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        let path = if self.path == "/" { "/" } else { "/..." };
        format!("{scheme}://{}{path}", self.authority)
    }
}

impl std::str::FromStr for WebhookUrl {
    type Err = String;
    fn from_str(url: &str) -> Result<WebhookUrl, String> {
        let (tls, rest) = match (url.strip_prefix("http://"), url.strip_prefix("https://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err("only http:// and https:// URLs are supported".to_owned()),
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (
                h,
                p.parse::<u16>()
                    .map_err(|_| format!("invalid port {p:?}"))?,
            ),
            _ => (authority, if tls { 443 } else { 80 }),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty()
            || path
                .chars()
                .any(|c| c.is_ascii_whitespace() || c.is_control())
        {
            return Err(format!("invalid URL {url:?}"));
        }
        Ok(WebhookUrl {
            tls,
            authority: authority.to_owned(),
            host: host.to_owned(),
            port,
            path: path.to_owned(),
        })
    }
}

pub(super) fn compile_suppression(r: &mut TableReader<'_>) -> SuppressionConfig {
    let d = SuppressionConfig::default();
    SuppressionConfig {
        mode: r
            .get("mode", |v| match string(v)? {
                "reject" => Ok(SuppressionMode::Reject),
                "drop" => Ok(SuppressionMode::Drop),
                other => Err(format!(
                    "unknown mode {other:?} (expected \"reject\" or \"drop\")"
                )),
            })
            .unwrap_or(d.mode),
        soft_categories: r
            .list("soft_categories", |v| string(v)?.parse::<Category>())
            .unwrap_or(d.soft_categories),
        soft_expiry: r
            .get("soft_expiry", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.soft_expiry),
    }
}

pub(super) fn compile_webhook(r: &mut TableReader<'_>) -> Option<WebhookConfig> {
    let url = r.require("url", |v| string(v)?.parse::<WebhookUrl>());
    let secret_file = r.require("secret_file", path);
    let ca_file = r.get("ca_file", path);
    if ca_file.is_some() && url.as_ref().is_some_and(|u| !u.tls) {
        r.error("ca_file", "only for an https:// url");
    }
    let batch_size = r
        .get("batch_size", |v| count(v).and_then(nonzero))
        .unwrap_or(100);
    let interval = r
        .get("interval", duration)
        .unwrap_or(Duration::from_secs(1));
    let max_backlog = r
        .get("max_backlog", |v| count(v).and_then(nonzero))
        .unwrap_or(1_000_000);
    Some(WebhookConfig {
        url: url?,
        ca_file,
        secret_file: secret_file?,
        batch_size,
        interval,
        max_backlog,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    #[test]
    fn suppression_and_webhooks() {
        let config = Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
             [suppression]\nmode = \"drop\"\nsoft_categories = [\"mailbox_full\", \"spam_block\"]\nsoft_expiry = \"2d\"\n\
             [[webhooks]]\nurl = \"http://127.0.0.1:9000/hook\"\nsecret_file = \"/etc/tern/hook.secret\"\nbatch_size = 5\ninterval = \"200ms\"\nmax_backlog = 7\n",
        )
        .unwrap();
        assert_eq!(config.suppression.mode, SuppressionMode::Drop);
        assert_eq!(
            config.suppression.soft_categories,
            [Category::MailboxFull, Category::SpamBlock]
        );
        assert_eq!(
            config.suppression.soft_expiry,
            Duration::from_secs(2 * 86_400)
        );
        let hook = &config.webhooks[0];
        assert_eq!(hook.url.to_string(), "http://127.0.0.1:9000/hook");
        assert_eq!((hook.url.host.as_str(), hook.url.port), ("127.0.0.1", 9000));
        assert_eq!(
            (hook.batch_size, hook.interval, hook.max_backlog),
            (5, Duration::from_millis(200), 7)
        );

        let err = Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
             [suppression]\nmode = \"bin\"\n[[webhooks]]\nurl = \"ftp://x.test/\"\n\
             [[webhooks]]\nurl = \"http://x.test/\"\nsecret_file = \"/s\"\nca_file = \"/ca.pem\"\n",
        )
        .unwrap_err();
        assert_eq!(
            err.0,
            [
                "suppression.mode: unknown mode \"bin\" (expected \"reject\" or \"drop\")",
                "webhooks[0].url: only http:// and https:// URLs are supported",
                "webhooks[0].secret_file: missing required key",
                "webhooks[1].ca_file: only for an https:// url",
            ]
        );

        let config = Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
             [[webhooks]]\nurl = \"https://hooks.example.com/tern\"\nsecret_file = \"/s\"\nca_file = \"/etc/tern/hooks-ca.pem\"\n",
        )
        .unwrap();
        let hook = &config.webhooks[0];
        assert!(hook.url.tls);
        assert_eq!(
            (hook.url.host.as_str(), hook.url.port),
            ("hooks.example.com", 443)
        );
        assert_eq!(hook.url.to_string(), "https://hooks.example.com/tern");
        assert_eq!(
            hook.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/tern/hooks-ca.pem"))
        );
    }
}
