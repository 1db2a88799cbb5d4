//! One-click unsubscribe (RFC 8058, RFC 2369): the headers on mail that asks for them, the
//! tokens in them, and what using one does.
//!
//! Mail asks with the inject API's `unsubscribe`, `X-Tern-Unsubscribe: one-click[; list=NAME]`
//! (removed with every other `X-Tern-*` header) or a campaign's `unsubscribe = true`. The
//! [`Unsubscribe`] stage (after the sidecar) then gives every recipient a message of its own
//! with
//!
//! ```text
//! List-Unsubscribe: <BASE/u/TOKEN>, <mailto:unsubscribe@BOUNCE-DOMAIN?subject=unsubscribe%20TOKEN>
//! List-Unsubscribe-Post: List-Unsubscribe=One-Click
//! ```
//!
//! prepended before DKIM signing (both are in the default signed and over-signed headers).
//! The token is `base64url(JSON claims) "." base64url(HMAC-SHA256(key, claims)[..16])`; the
//! claims name the recipient, the list (sender identity: the request's `list`, else the
//! campaign, else the sender's domain), the message (its Message-ID) and the issue time.
//!
//! Using it (`POST BASE/u/TOKEN` with `List-Unsubscribe=One-Click`, served by
//! [`crate::admin`] without a bearer token, or a mail to the `mailto:` address read by the
//! bounce processor) adds a suppression entry of reason `unsubscribe` (for that list with
//! `unsubscribe.scope = "list"`, for all mail with `"global"`) and emits an `unsubscribed`
//! event. Invariants: an unsigned, altered or expired (`unsubscribe.max_age`) token does
//! nothing; using a token again changes nothing and emits nothing (idempotent); the
//! addresses of the bounce domains are never given a link (they are never suppressed).

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tern_queue::{Recipient, SpoolError};
use tracing::warn;

use crate::config::{UnsubscribeConfig, UnsubscribeScope};
use crate::events::{Event, Events, Kind};
use crate::message::{Prepared, Stage, StageFuture};
use crate::suppression::{Entry, Suppressions, UNSUBSCRIBE_REASON};

/// What a token vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The recipient, lowercase.
    pub r: String,
    /// The list (sender identity).
    pub l: String,
    /// The message's Message-ID (empty when it had none).
    pub m: String,
    /// Issue time, unix seconds.
    pub t: u64,
    /// The sidecar campaign and variant the message was rendered for (for its events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub c: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<String>,
}

const TAG_LEN: usize = 16;
/// The local part of the `mailto:` address at the first bounce domain.
pub const MAILTO_LOCAL: &str = "unsubscribe";

/// Signs and checks tokens.
pub struct Tokens {
    key: aws_lc_rs::hmac::Key,
    max_age: Duration,
}

impl Tokens {
    pub fn new(secret: &[u8], max_age: Duration) -> Tokens {
        Tokens {
            key: aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, secret),
            max_age,
        }
    }

    /// A signed token for `claims`.
    pub fn sign(&self, claims: &Claims) -> String {
        let json = serde_json::to_vec(claims).unwrap_or_default();
        let tag = aws_lc_rs::hmac::sign(&self.key, &json);
        format!(
            "{}.{}",
            B64.encode(&json),
            B64.encode(&tag.as_ref()[..TAG_LEN])
        )
    }

    /// The claims of a token that is signed by our key and not older than `max_age` at
    /// `now_secs`.
    pub fn verify(&self, token: &str, now_secs: u64) -> Option<Claims> {
        // Bounded before decoding: a token is a few hundred bytes.
        if token.len() > 4096 {
            return None;
        }
        let (body, tag) = token.split_once('.')?;
        let json = B64.decode(body).ok()?;
        let tag = B64.decode(tag).ok()?;
        if tag.len() != TAG_LEN {
            return None;
        }
        let expected = aws_lc_rs::hmac::sign(&self.key, &json);
        // Constant time: the tag is a secret until it is right.
        if aws_lc_rs::constant_time::verify_slices_are_equal(&expected.as_ref()[..TAG_LEN], &tag)
            .is_err()
        {
            return None;
        }
        let claims: Claims = serde_json::from_slice(&json).ok()?;
        (now_secs.saturating_sub(claims.t) <= self.max_age.as_secs()).then_some(claims)
    }
}

/// Signs and checks tokens, adds the headers, and records unsubscribes.
pub struct Unsubscriber {
    tokens: Tokens,
    /// Without a trailing slash; `None`: no URL, only the mailto form.
    base_url: Option<String>,
    /// `unsubscribe@<first bounce domain>`, when there is one.
    mailto: Option<String>,
    scope: UnsubscribeScope,
    suppressions: Suppressions,
    events: Events,
    /// Lowercase bounce domains: their addresses get no link.
    bounce_domains: Vec<String>,
}

impl Unsubscriber {
    /// `base_url`: `unsubscribe.base_url`, else `sidecar.tracking.base_url`. `secret`: the
    /// signing key's text (`unsubscribe.key_file`).
    pub fn new(
        config: &UnsubscribeConfig,
        base_url: Option<String>,
        secret: &[u8],
        bounce_domains: &[String],
        suppressions: Suppressions,
        events: Events,
    ) -> Unsubscriber {
        Unsubscriber {
            tokens: Tokens::new(secret, config.max_age),
            base_url: base_url.map(|u| u.trim_end_matches('/').to_owned()),
            mailto: bounce_domains
                .first()
                .map(|d| format!("{MAILTO_LOCAL}@{}", d.to_ascii_lowercase())),
            scope: config.scope,
            suppressions,
            events,
            bounce_domains: bounce_domains
                .iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
        }
    }

    /// The claims of a valid token (see [`Tokens::verify`]).
    pub fn verify(&self, token: &str, now_secs: u64) -> Option<Claims> {
        self.tokens.verify(token, now_secs)
    }

    /// The `List-Unsubscribe` (and, with a URL, `List-Unsubscribe-Post`) header lines for
    /// `claims`; empty when there is neither a URL nor a bounce domain to offer.
    pub fn headers(&self, claims: &Claims) -> String {
        let token = self.tokens.sign(claims);
        let mut uris = Vec::new();
        if let Some(base) = &self.base_url {
            uris.push(format!("<{base}/u/{token}>"));
        }
        if let Some(mailto) = &self.mailto {
            uris.push(format!("<mailto:{mailto}?subject=unsubscribe%20{token}>"));
        }
        if uris.is_empty() {
            return String::new();
        }
        // Folded between the URIs: each stays well under the 998-octet line limit.
        let mut out = format!("List-Unsubscribe: {}\r\n", uris.join(",\r\n "));
        if self.base_url.is_some() {
            out.push_str("List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n");
        }
        out
    }

    /// The token in the subject of an unsubscribe mail (`unsubscribe TOKEN`), if it verifies.
    pub fn verify_subject(&self, subject: &str, now_secs: u64) -> Option<Claims> {
        subject
            .split_whitespace()
            .find(|w| w.contains('.') && w.len() > 20)
            .and_then(|t| self.verify(t, now_secs))
    }

    /// Records an unsubscribe: the suppression entry and the `unsubscribed` event, unless
    /// the recipient is unsubscribed already (then nothing; returns `false`). `via` is the
    /// event's source (`unsubscribe` for the URL, `mailto`).
    pub async fn unsubscribe(
        &self,
        claims: &Claims,
        via: &'static str,
    ) -> Result<bool, SpoolError> {
        let scope = match self.scope {
            UnsubscribeScope::List => Some(claims.l.clone()),
            UnsubscribeScope::Global => None,
        };
        let existing = match &scope {
            Some(list) => self.suppressions.check_scoped(&claims.r, list),
            None => self.suppressions.check(&claims.r),
        };
        if existing.is_some_and(|e| e.reason == UNSUBSCRIBE_REASON) {
            return Ok(false);
        }
        let now = crate::clock::now_ms();
        self.suppressions
            .add(vec![Entry {
                address: claims.r.clone(),
                reason: UNSUBSCRIBE_REASON.to_owned(),
                created_ms: now,
                expires_ms: None,
                source: (!claims.m.is_empty()).then(|| claims.m.clone()),
                scope,
            }])
            .await?;
        let mut event = Event::new(Kind::Unsubscribed, &claims.r, via);
        event.detail = Some(format!("list {}", claims.l));
        event.campaign = claims.c.clone();
        event.variant = claims.v.clone();
        self.events.emit(vec![event]).await;
        Ok(true)
    }

    /// The entry that keeps mail of `list` from `address` (see
    /// [`Suppressions::check_scoped`]).
    pub fn suppressed(&self, address: &str, list: &str) -> Option<Entry> {
        self.suppressions.check_scoped(address, list)
    }

    fn is_bounce_address(&self, address: &str) -> bool {
        address.rsplit_once('@').is_some_and(|(_, d)| {
            self.bounce_domains
                .iter()
                .any(|b| b.eq_ignore_ascii_case(d))
        })
    }

    /// The stage's work on one message: see the module doc.
    fn split(&self, mut message: Prepared) -> Vec<Prepared> {
        let Some(one_click) = message.submission.unsubscribe.take() else {
            return vec![message];
        };
        let sub = &mut message.submission;
        let list = list_name(
            one_click.list.as_deref(),
            message.reports.first().map(|r| r.campaign.as_str()),
            &sub.sender,
        );
        let message_id = header_value(&sub.content, "message-id").unwrap_or_default();
        let issued = crate::clock::now_ms() / 1000;
        let recipients: Vec<Recipient> = std::mem::take(&mut sub.recipients);
        // Recipients unsubscribed from this list are dropped here (reject mode refuses them
        // earlier where the list is known: the inject API, a one-recipient SMTP message).
        let mut dropped = Vec::new();
        let recipients: Vec<Recipient> = recipients
            .into_iter()
            .filter(|r| match self.suppressed(&r.address, &list) {
                Some(entry) => {
                    let source = if sub.source.protocol == "HTTP" {
                        "http"
                    } else {
                        "smtp"
                    };
                    let mut e = Event::new(Kind::Suppressed, &r.address, source);
                    e.sender = Some(sub.sender.clone());
                    e.detail = Some(format!(
                        "dropped: unsubscribed from list {list} ({})",
                        entry.reason
                    ));
                    dropped.push(e);
                    false
                }
                None => true,
            })
            .collect();
        if !dropped.is_empty() {
            self.events.emit_later(dropped);
        }
        let content = std::mem::take(&mut sub.content);
        let mut out = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            let mut one = sub.clone();
            let headers = if self.is_bounce_address(&rcpt.address) {
                String::new()
            } else {
                self.headers(&Claims {
                    r: crate::suppression::normalize(&rcpt.address),
                    l: list.clone(),
                    m: message_id.clone(),
                    t: issued,
                    c: message.campaign.as_ref().map(|t| t.campaign.clone()),
                    v: message.campaign.as_ref().and_then(|t| t.variant.clone()),
                })
            };
            let mut body = Vec::with_capacity(headers.len() + content.len());
            body.extend_from_slice(headers.as_bytes());
            body.extend_from_slice(&content);
            one.content = body;
            let reports = message
                .reports
                .iter()
                .filter(|r| crate::message::same_address(&r.recipient, &rcpt.address))
                .cloned()
                .collect();
            one.recipients = vec![rcpt];
            out.push(Prepared {
                submission: one,
                send_at: message.send_at,
                window: message.window,
                reports,
                campaign: message.campaign.clone(),
                hold: message.hold,
            });
        }
        out
    }
}

/// The list an unsubscribe applies to: the one asked for, else the campaign, else the
/// sender's domain (lowercase; `default` for the null sender).
pub fn list_name(asked: Option<&str>, campaign: Option<&str>, sender: &str) -> String {
    asked
        .or(campaign)
        .map(str::to_ascii_lowercase)
        .or_else(|| sender.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase()))
        .unwrap_or_else(|| "default".to_owned())
}

/// The unfolded value of the first `name` header (lowercase name) of `content`.
fn header_value(content: &[u8], name: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in content.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line[0] == b' ' || line[0] == b'\t' {
            if let Some(v) = value.as_mut() {
                if !v.is_empty() {
                    v.push(' ');
                }
                v.push_str(String::from_utf8_lossy(line).trim());
            }
            continue;
        }
        if value.is_some() {
            break;
        }
        if let Some(colon) = line.iter().position(|&b| b == b':') {
            if line[..colon].eq_ignore_ascii_case(name.as_bytes()) {
                value = Some(
                    String::from_utf8_lossy(&line[colon + 1..])
                        .trim()
                        .to_owned(),
                );
            }
        }
    }
    value
}

/// The stage (after the sidecar): see the module doc. Without an [`Unsubscriber`]
/// (no key could be read) mail that asks is sent without the headers.
pub struct Unsubscribe(pub Option<Arc<Unsubscriber>>);

impl Stage for Unsubscribe {
    fn apply(&self, mut message: Prepared) -> StageFuture<'_> {
        Box::pin(async move {
            match &self.0 {
                Some(unsubscriber) => unsubscriber.split(message),
                None => {
                    if message.submission.unsubscribe.take().is_some() {
                        warn!("one-click unsubscribe asked for but not set up: sent without");
                    }
                    vec![message]
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(t: u64) -> Claims {
        Claims {
            r: "reader@x.test".into(),
            l: "news".into(),
            m: "<1@x.test>".into(),
            t,
            c: None,
            v: None,
        }
    }

    #[test]
    fn tokens_verify_only_unaltered_under_our_key_and_until_they_expire() {
        let tokens = Tokens::new(b"key one of enough bytes", Duration::from_secs(100));
        let token = tokens.sign(&claims(1000));
        assert_eq!(tokens.verify(&token, 1000), Some(claims(1000)));
        assert_eq!(tokens.verify(&token, 1100), Some(claims(1000)));
        assert_eq!(tokens.verify(&token, 1101), None, "expired");
        let other = Tokens::new(b"key two of enough bytes", Duration::from_secs(100));
        assert_eq!(other.verify(&token, 1000), None, "another key");
        // Claims about someone else under the same tag.
        let (_, tag) = token.split_once('.').unwrap();
        let mut forged = claims(1000);
        forged.r = "victim@x.test".into();
        let forged = format!("{}.{tag}", B64.encode(serde_json::to_vec(&forged).unwrap()));
        assert_eq!(tokens.verify(&forged, 1000), None, "altered");
        assert_eq!(tokens.verify("garbage", 1000), None);
        assert_eq!(tokens.verify(&"a.".repeat(5000), 1000), None);
    }

    #[test]
    fn the_list_is_the_one_asked_for_else_the_campaign_else_the_sender_domain() {
        assert_eq!(list_name(Some("News"), Some("promo"), "a@b.test"), "news");
        assert_eq!(list_name(None, Some("Promo"), "a@b.test"), "promo");
        assert_eq!(list_name(None, None, "a@B.test"), "b.test");
        assert_eq!(list_name(None, None, ""), "default");
    }

    #[test]
    fn header_values_unfold_and_stop_at_the_body() {
        let m = b"Subject: a\r\nMessage-ID:\r\n <1@x.test>\r\nX: y\r\n\r\nMessage-ID: <no>\r\n";
        assert_eq!(header_value(m, "message-id").as_deref(), Some("<1@x.test>"));
        assert_eq!(header_value(m, "to"), None);
        assert_eq!(header_value(b"A: b\r\n\r\nTo: x\r\n", "to"), None);
    }
}
