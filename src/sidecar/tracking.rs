//! Built-in engagement tracking: signed tokens, link rewriting, and recording the opens and
//! clicks a token vouches for ([`Sidecar::track_open`], [`Sidecar::track_click`]); the HTTP
//! endpoints that call them (`GET /t/o/{token}`, `GET /t/c/{token}`, no bearer token) are
//! [`crate::admin::tracking`]'s.
//!
//! A token is `base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims)[..16])`. The
//! claims name the campaign, recipient, variant and Message-ID, the issue time (when the
//! message was rendered), and for a click the target URL. Invariants: an unsigned or altered
//! token is refused (404) and records nothing; so is a token issued longer ago than
//! `sidecar.tracking.max_age` (tokens of versions before issue times carry none: expired);
//! the redirect only goes to a URL that our own rendering put into a signed token, and those
//! come only from the rendered template's `href`s (generated text cannot contain URLs, see
//! [`super::guard`]); the open pixel never fails for a valid token.
//!
//! Replays: a hit counts (bandit reward, recent list, engagement sink, metrics) once per
//! message, recipient, kind (open, click) and source (human or machine: a prefetch must not
//! hide the person's own open); a repeat is still served (pixel, redirect) and recorded
//! nowhere. [`Replays`] remembers what was counted, bucketed by the token's issue hour so a
//! bucket is dropped once all its tokens have expired, and holds at most
//! `sidecar.tracking.replay_entries`: when full, the oldest hour is forgotten first (counted
//! in `tern_tracking_replay_evictions_total`; a replay of those counts again, as it does after
//! a restart: the memory is not stored).
//!
//! Machine opens: an open (or click) is flagged `machine` when its User-Agent is exactly
//! `Mozilla/5.0` (what Apple Mail Privacy Protection's prefetch proxy sends), when it comes
//! from Apple's 17.0.0.0/8 network (MPP prefetch egress), when the User-Agent is missing, or
//! when it names a known scanner or prefetcher (bot, crawler, spider, preview, scanner,
//! Barracuda, Proofpoint, Mimecast). The address is the one [`crate::admin::tracking`]
//! believes: the peer's, or behind `admin.trusted_proxies` the one the proxy appended to
//! `X-Forwarded-For`.

use std::collections::{BTreeMap, HashSet};
use std::hash::BuildHasher as _;
use std::net::IpAddr;
use std::sync::LazyLock;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use regex::Regex;
use serde::{Deserialize, Serialize};

use super::{Engagement, EngagementKind, Sidecar};
use crate::config::TrackingConfig;
use crate::telemetry::TrackingIgnored;

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
    /// Issue time, unix seconds (when the message was rendered). Tokens signed before
    /// versions that wrote it read as 0: long expired.
    #[serde(default)]
    pub t: u64,
}

/// Signs and checks tokens and rewrites rendered HTML.
pub struct Tracker {
    key: aws_lc_rs::hmac::Key,
    base_url: String,
    max_age: Duration,
}

const TAG_LEN: usize = 16;

impl Tracker {
    /// Reads the signing key from `secret_file`, creating it (32 random bytes, hex, mode
    /// 0600) when it does not exist.
    pub fn load(config: &TrackingConfig) -> Result<Tracker, String> {
        let secret = crate::secret_file::read_or_create(
            &config.secret_file,
            "sidecar.tracking.secret_file",
            32,
        )?;
        Ok(Tracker::new(
            &config.base_url,
            secret.as_bytes(),
            config.max_age,
        ))
    }

    /// Tokens are honoured for `max_age` after their issue time.
    pub fn new(base_url: &str, secret: &[u8], max_age: Duration) -> Tracker {
        Tracker {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
            base_url: base_url.trim_end_matches('/').to_owned(),
            max_age,
        }
    }

    /// Whether a token with these (verified) claims is past `max_age` at `now_s`.
    pub fn expired(&self, claims: &Claims, now_s: u64) -> bool {
        now_s > claims.t.saturating_add(self.max_age.as_secs())
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
    /// Records the open a valid open token vouches for, the first time it is seen; `None`
    /// (a 404, nothing recorded) for an unsigned, altered, foreign or expired token.
    pub fn track_open(&self, token: &str, user_agent: Option<String>, ip: IpAddr) -> Option<()> {
        let (_, hit) = self.hit(token, EngagementKind::Open, user_agent, ip)?;
        if let Some(event) = hit {
            self.engagement(event);
        }
        Some(())
    }

    /// Records the click a valid click token vouches for (the first time it is seen) and
    /// returns its target URL (only ever one our own rendering signed); `None` records
    /// nothing.
    pub fn track_click(
        &self,
        token: &str,
        user_agent: Option<String>,
        ip: IpAddr,
    ) -> Option<String> {
        let (url, hit) = self.hit(token, EngagementKind::Click, user_agent, ip)?;
        if let Some(event) = hit {
            self.engagement(event);
        }
        url
    }

    /// The checks of a hit, in order: signature and kind (and a web URL for a click), age,
    /// replay. `None`: refused (404); `Some((url, None))`: valid but counted already.
    fn hit(
        &self,
        token: &str,
        kind: EngagementKind,
        user_agent: Option<String>,
        ip: IpAddr,
    ) -> Option<(Option<String>, Option<Engagement>)> {
        let k = match kind {
            EngagementKind::Open => 'o',
            EngagementKind::Click => 'c',
        };
        let tracker = self.tracker();
        let claims = tracker.and_then(|t| t.verify(token)).filter(|c| {
            c.k == k
                && match kind {
                    EngagementKind::Open => c.u.is_none(),
                    EngagementKind::Click => c.u.as_deref().is_some_and(is_web_url),
                }
        });
        let (Some(tracker), Some(claims)) = (tracker, claims) else {
            self.metrics.tracking_ignored(TrackingIgnored::Invalid);
            return None;
        };
        let now_ms = crate::clock::now_ms();
        if tracker.expired(&claims, now_ms / 1000) {
            self.metrics.tracking_ignored(TrackingIgnored::Expired);
            return None;
        }
        let issued_s = claims.t;
        let event = engagement(kind, claims, user_agent, ip, now_ms);
        let (first, evicted) = self.replays.lock().expect("replays lock").first(
            &event,
            issued_s,
            now_ms / 1000,
            tracker.max_age,
        );
        if evicted > 0 {
            self.metrics.tracking_replay_evicted(evicted as u64);
        }
        let url = event.url.clone();
        if !first {
            self.metrics.tracking_ignored(TrackingIgnored::Replay);
            return Some((url, None));
        }
        Some((url, Some(event)))
    }
}

fn is_web_url(u: &str) -> bool {
    u.starts_with("https://") || u.starts_with("http://")
}

fn engagement(
    kind: EngagementKind,
    claims: Claims,
    user_agent: Option<String>,
    ip: IpAddr,
    at_ms: u64,
) -> Engagement {
    Engagement {
        kind,
        machine: is_machine(user_agent.as_deref(), ip),
        campaign: claims.c,
        recipient: claims.r,
        variant: claims.v,
        message_id: claims.m,
        url: claims.u,
        at_ms,
        user_agent,
    }
}

/// What tracking hits were counted already (see the module doc): fingerprints of (message,
/// recipient, kind, source), in buckets by the issue hour of their token.
pub struct Replays {
    /// Issue hour (unix seconds / 3600) -> fingerprints.
    hours: BTreeMap<u64, HashSet<u64>>,
    len: usize,
    capacity: usize,
    /// Keyed per process, so nobody outside can aim collisions at a fingerprint.
    hasher: std::hash::RandomState,
}

const HOUR: u64 = 3600;

impl Replays {
    /// Remembers at most `capacity` hits.
    pub fn new(capacity: usize) -> Replays {
        Replays {
            hours: BTreeMap::new(),
            len: 0,
            capacity: capacity.max(1),
            hasher: std::hash::RandomState::new(),
        }
    }

    /// Whether `event` (from a token issued at `issued_s`) is counted for the first time at
    /// `now_s`, remembering it; and how many remembered hits were forgotten early to make
    /// room. Hours whose every token is past `max_age` are dropped first (that is not early).
    pub fn first(
        &mut self,
        event: &Engagement,
        issued_s: u64,
        now_s: u64,
        max_age: Duration,
    ) -> (bool, usize) {
        // Tokens of hour h were issued before (h + 1) * HOUR, so all of them are expired once
        // now passes that plus max_age.
        let oldest_live = now_s.saturating_sub(max_age.as_secs()) / HOUR;
        while let Some(entry) = self.hours.first_entry() {
            if *entry.key() >= oldest_live {
                break;
            }
            self.len -= entry.remove().len();
        }
        let fingerprint = self.hasher.hash_one((
            &event.message_id,
            &event.recipient,
            event.kind == EngagementKind::Click,
            event.machine,
        ));
        let hour = issued_s / HOUR;
        if self
            .hours
            .get(&hour)
            .is_some_and(|set| set.contains(&fingerprint))
        {
            return (false, 0);
        }
        let mut evicted = 0;
        while self.len >= self.capacity {
            let Some(entry) = self.hours.first_entry() else {
                break;
            };
            let n = entry.remove().len();
            self.len -= n;
            evicted += n;
        }
        self.hours.entry(hour).or_default().insert(fingerprint);
        self.len += 1;
        (true, evicted)
    }

    /// Hits remembered.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
            t: 1_700_000_000,
        }
    }

    const KEY: &[u8] = b"0123456789abcdef0123456789abcdef";
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn tokens_verify_and_forgeries_do_not() {
        let t = Tracker::new("https://t.test", KEY, 90 * DAY);
        let token = t.sign(&claims());
        assert_eq!(t.verify(&token), Some(claims()));
        let (payload, tag) = token.split_once('.').unwrap();
        let mut forged = claims();
        forged.u = Some("https://evil.test".into());
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(t.verify(&format!("{forged_payload}.{tag}")), None);
        assert_eq!(t.verify(payload), None);
        let other = Tracker::new(
            "https://t.test",
            b"another key another key another!",
            90 * DAY,
        );
        assert_eq!(other.verify(&token), None);
    }

    #[test]
    fn rewrites_links_and_adds_the_pixel() {
        let t = Tracker::new("https://t.test", KEY, 90 * DAY);
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
    fn tokens_expire_max_age_after_their_issue_time() {
        let t = Tracker::new("https://t.test", KEY, 90 * DAY);
        let c = claims();
        let issued = c.t;
        assert!(!t.expired(&c, issued));
        assert!(!t.expired(&c, issued + 90 * 86_400));
        assert!(t.expired(&c, issued + 90 * 86_400 + 1));
        // A token of a version before issue times: its claims have none, so it reads as
        // issued at the epoch.
        let legacy = B64.encode(br#"{"k":"o","c":"winback","r":"a@x.test","v":null,"m":"<1@h>"}"#);
        let tag = aws_lc_rs::hmac::sign(&t.key, legacy.as_bytes());
        let token = format!("{legacy}.{}", B64.encode(&tag.as_ref()[..TAG_LEN]));
        let old = t.verify(&token).expect("signed");
        assert_eq!(old.t, 0);
        assert!(t.expired(&old, issued));
    }

    fn hit(message: &str, kind: EngagementKind, machine: bool) -> Engagement {
        Engagement {
            kind,
            campaign: "winback".into(),
            recipient: "a@x.test".into(),
            variant: None,
            message_id: message.into(),
            url: None,
            at_ms: 0,
            machine,
            user_agent: None,
        }
    }

    #[test]
    fn a_hit_counts_once_per_message_recipient_kind_and_source() {
        let mut r = Replays::new(100);
        let now = 1_700_000_000;
        let open = hit("<1@h>", EngagementKind::Open, false);
        assert_eq!(r.first(&open, now, now, 90 * DAY), (true, 0));
        assert_eq!(r.first(&open, now, now + 5, 90 * DAY), (false, 0));
        // Another kind, another source, another message, another recipient: each counts.
        assert!(
            r.first(
                &hit("<1@h>", EngagementKind::Click, false),
                now,
                now,
                90 * DAY
            )
            .0
        );
        assert!(
            r.first(
                &hit("<1@h>", EngagementKind::Open, true),
                now,
                now,
                90 * DAY
            )
            .0
        );
        assert!(
            r.first(
                &hit("<2@h>", EngagementKind::Open, false),
                now,
                now,
                90 * DAY
            )
            .0
        );
        let mut other = open.clone();
        other.recipient = "b@x.test".into();
        assert!(r.first(&other, now, now, 90 * DAY).0);
        assert_eq!(r.len(), 5);
    }

    #[test]
    fn hours_whose_tokens_expired_are_forgotten() {
        let mut r = Replays::new(100);
        let issued = 1_700_000_000;
        let open = hit("<1@h>", EngagementKind::Open, false);
        assert!(r.first(&open, issued, issued, DAY).0);
        // Still live an hour later (the token is good for a day).
        assert!(!r.first(&open, issued, issued + 3600, DAY).0);
        // Two days on, a hit of a fresh token drops the expired hour; nothing was evicted.
        let fresh = hit("<2@h>", EngagementKind::Open, false);
        let later = issued + 2 * 86_400;
        assert_eq!(r.first(&fresh, later, later, DAY), (true, 0));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn when_full_the_oldest_hour_goes_first_and_is_counted() {
        let mut r = Replays::new(3);
        let t0 = 1_700_000_000 / 3600 * 3600;
        let now = t0 + 3 * 3600;
        let old = hit("<old@h>", EngagementKind::Open, false);
        assert!(r.first(&old, t0, now, 90 * DAY).0);
        for (i, m) in ["<a@h>", "<b@h>"].iter().enumerate() {
            let issued = t0 + 3600 * (i as u64 + 1);
            assert!(
                r.first(&hit(m, EngagementKind::Open, false), issued, now, 90 * DAY)
                    .0
            );
        }
        // Full: the newest hit pushes out the oldest hour (one hit).
        let new = hit("<c@h>", EngagementKind::Open, false);
        assert_eq!(r.first(&new, now, now, 90 * DAY), (true, 1));
        assert_eq!(r.len(), 3);
        // The forgotten hit counts again; the others are still known.
        assert!(!r.first(&new, now, now, 90 * DAY).0);
        assert!(r.first(&old, t0, now, 90 * DAY).0);
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
