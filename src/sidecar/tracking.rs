//! Built-in engagement tracking: signed tokens, link rewriting, and recording the opens and
//! clicks a token vouches for ([`Sidecar::track_open`], [`Sidecar::track_click`]); the HTTP
//! endpoints that call them (`GET /t/o/{token}`, `GET /t/c/{token}`, no bearer token) are
//! [`crate::admin::tracking`]'s.
//!
//! A token is `base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims)[..16])`. The
//! claims name the campaign, recipient, variant and Message-ID, and for a click the target
//! URL. Invariants: an unsigned or altered token is refused (404) and records nothing; the
//! redirect only goes to a URL that our own rendering put into a signed token, and those come only
//! from the rendered template's `href`s (generated text cannot contain URLs, see
//! [`super::guard`]); the open pixel never fails for a valid token.
//!
//! Machine opens: an open (or click) is flagged `machine` when its User-Agent is exactly
//! `Mozilla/5.0` (what Apple Mail Privacy Protection's prefetch proxy sends), when it comes
//! from Apple's 17.0.0.0/8 network (MPP prefetch egress), when the User-Agent is missing, or
//! when it names a known scanner or prefetcher (bot, crawler, spider, preview, scanner,
//! Barracuda, Proofpoint, Mimecast). The address is the one [`crate::admin::tracking`]
//! believes: the peer's, or behind `admin.trusted_proxies` the one the proxy appended to
//! `X-Forwarded-For`.

use std::net::IpAddr;
use std::path::Path;
use std::sync::LazyLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::{Engagement, EngagementKind, Sidecar};

/// What a token vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// `o` (open) or `c` (click).
    pub k: char,
    pub c: String,
    pub r: String,
    pub v: Option<String>,
    pub m: String,
    /// Click target.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub u: Option<String>,
}

/// Signs and checks tokens and rewrites rendered HTML.
pub struct Tracker {
    key: aws_lc_rs::hmac::Key,
    base_url: String,
}

const TAG_LEN: usize = 16;

impl Tracker {
    /// Reads the signing key from `secret_file`, creating it (32 random bytes, hex, mode
    /// 0600) when it does not exist.
    pub fn load(base_url: &str, secret_file: &Path) -> Result<Tracker, String> {
        let secret =
            crate::secret_file::read_or_create(secret_file, "sidecar.tracking.secret_file", 32)?;
        Ok(Tracker::new(base_url, secret.as_bytes()))
    }

    pub fn new(base_url: &str, secret: &[u8]) -> Tracker {
        Tracker {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
            base_url: base_url.trim_end_matches('/').to_owned(),
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialize"));
        let tag = aws_lc_rs::hmac::sign(&self.key, payload.as_bytes());
        format!("{payload}.{}", B64.encode(&tag.as_ref()[..TAG_LEN]))
    }

    /// The claims of a token we signed; `None` for anything else.
    pub fn verify(&self, token: &str) -> Option<Claims> {
        let (payload, tag) = token.split_once('.')?;
        let tag = B64.decode(tag).ok()?;
        let full = aws_lc_rs::hmac::sign(&self.key, payload.as_bytes());
        // Constant-time comparison of the truncated tag.
        if tag.len() != TAG_LEN
            || aws_lc_rs::constant_time::verify_slices_are_equal(&full.as_ref()[..TAG_LEN], &tag)
                .is_err()
        {
            return None;
        }
        serde_json::from_slice(&B64.decode(payload).ok()?).ok()
    }

    /// Rewrites every `href="http(s)://..."` of `html` to the click redirect and adds the open
    /// pixel before `</body>` (or at the end).
    pub fn rewrite_html(&self, html: &str, base: &Claims) -> String {
        static HREF: LazyLock<Regex> = LazyLock::new(|| {
            Regex::new(r#"(?i)(href\s*=\s*")(https?://[^"]+)(")"#).expect("valid regex")
        });
        let mut out = HREF
            .replace_all(html, |c: &regex::Captures<'_>| {
                // The template's HTML-escaped URL, unescaped for the redirect.
                let url = c[2].replace("&amp;", "&");
                let claims = Claims {
                    k: 'c',
                    u: Some(url),
                    ..base.clone()
                };
                format!(
                    "{}{}/t/c/{}{}",
                    &c[1],
                    self.base_url,
                    self.sign(&claims),
                    &c[3]
                )
            })
            .into_owned();
        let pixel = format!(
            "<img src=\"{}/t/o/{}\" width=\"1\" height=\"1\" alt=\"\">",
            self.base_url,
            self.sign(&Claims {
                k: 'o',
                u: None,
                ..base.clone()
            })
        );
        match out.to_ascii_lowercase().rfind("</body>") {
            Some(i) => out.insert_str(i, &pixel),
            None => out.push_str(&pixel),
        }
        out
    }
}

impl Sidecar {
    /// Records the open a valid open token vouches for; `None` (nothing recorded) for an
    /// unsigned, altered or foreign token.
    pub fn track_open(&self, token: &str, user_agent: Option<String>, ip: IpAddr) -> Option<()> {
        let claims = checked(self, token, 'o')?;
        self.engagement(engagement(EngagementKind::Open, claims, user_agent, ip));
        Some(())
    }

    /// Records the click a valid click token vouches for and returns its target URL (only
    /// ever one our own rendering signed); `None` records nothing.
    pub fn track_click(
        &self,
        token: &str,
        user_agent: Option<String>,
        ip: IpAddr,
    ) -> Option<String> {
        let claims = checked(self, token, 'c')?;
        let url = claims.u.clone()?;
        self.engagement(engagement(EngagementKind::Click, claims, user_agent, ip));
        Some(url)
    }
}

fn checked(sidecar: &Sidecar, token: &str, kind: char) -> Option<Claims> {
    sidecar
        .tracker()?
        .verify(token)
        .filter(|c| c.k == kind && c.u.as_deref().is_none_or(is_web_url))
}

fn is_web_url(u: &str) -> bool {
    u.starts_with("https://") || u.starts_with("http://")
}

fn engagement(
    kind: EngagementKind,
    claims: Claims,
    user_agent: Option<String>,
    ip: IpAddr,
) -> Engagement {
    Engagement {
        kind,
        machine: is_machine(user_agent.as_deref(), ip),
        campaign: claims.c,
        recipient: claims.r,
        variant: claims.v,
        message_id: claims.m,
        url: claims.u,
        at_ms: crate::clock::now_ms(),
        user_agent,
    }
}

/// The machine-open heuristics of the module doc.
pub fn is_machine(user_agent: Option<&str>, ip: IpAddr) -> bool {
    let apple_network = match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 17,
        IpAddr::V6(v6) => v6.to_ipv4_mapped().is_some_and(|v4| v4.octets()[0] == 17),
    };
    let Some(ua) = user_agent.map(str::trim).filter(|u| !u.is_empty()) else {
        return true;
    };
    let lower = ua.to_ascii_lowercase();
    apple_network
        || ua == "Mozilla/5.0"
        || [
            "bot",
            "crawler",
            "spider",
            "preview",
            "scanner",
            "barracuda",
            "proofpoint",
            "mimecast",
        ]
        .iter()
        .any(|s| lower.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> Claims {
        Claims {
            k: 'o',
            c: "winback".into(),
            r: "a@x.test".into(),
            v: Some("b".into()),
            m: "<1@h>".into(),
            u: None,
        }
    }

    #[test]
    fn tokens_verify_and_forgeries_do_not() {
        let t = Tracker::new("https://t.test", b"0123456789abcdef0123456789abcdef");
        let token = t.sign(&claims());
        assert_eq!(t.verify(&token), Some(claims()));
        let (payload, tag) = token.split_once('.').unwrap();
        let mut forged = claims();
        forged.u = Some("https://evil.test".into());
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(t.verify(&format!("{forged_payload}.{tag}")), None);
        assert_eq!(t.verify(payload), None);
        let other = Tracker::new("https://t.test", b"another key another key another!");
        assert_eq!(other.verify(&token), None);
    }

    #[test]
    fn rewrites_links_and_adds_the_pixel() {
        let t = Tracker::new("https://t.test", b"0123456789abcdef0123456789abcdef");
        let html = t.rewrite_html(
            "<body><a href=\"https://shop.test/?a=1&amp;b=2\">x</a></body>",
            &claims(),
        );
        assert!(!html.contains("shop.test"), "{html}");
        let token = html
            .split("/t/c/")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap();
        let c = t.verify(token).unwrap();
        assert_eq!(c.u.as_deref(), Some("https://shop.test/?a=1&b=2"));
        assert!(html.ends_with("alt=\"\"></body>"), "{html}");
    }

    #[test]
    fn machine_heuristics() {
        let home: IpAddr = "198.51.100.7".parse().unwrap();
        let apple: IpAddr = "17.58.1.2".parse().unwrap();
        let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15";
        assert!(!is_machine(Some(iphone), home));
        assert!(is_machine(Some("Mozilla/5.0"), home));
        assert!(is_machine(Some(iphone), apple));
        assert!(is_machine(None, home));
        assert!(is_machine(Some("Barracuda Sentinel"), home));
    }
}
