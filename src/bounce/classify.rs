//! The one bounce taxonomy: [`Category`], and the [`Classifier`] that maps an enhanced status
//! code and a diagnostic text to a category, for parsed bounces and live SMTP replies alike.
//! It is the only reader of reply wording: the delivery worker classifies each failed
//! recipient's reply once ([`Classifier::classify_attempt`]), and traffic shaping, the
//! delivery log, events and suppression all use that category.
//!
//! Rules are tried in order and the first that matches wins: an operator's rules (from
//! `bounce.rules`) first, then those `shaping.adaptive.throttle_patterns` / `block_patterns`
//! make (rate_limited / spam_block), then the defaults shipped in `config/bounce-rules.toml`
//! (embedded in the binary). The default file is ordered so that codes that name a cause
//! (5.1.1, 5.2.2, 5.7.26, ...) decide first, then text patterns, then generic codes (a bare
//! live 421, 5.7.1, 5.0.0, 4.x.x): a generic code says little, the text says more ("5.7.1 ...
//! blocked using Spamhaus" is a spam block, "5.7.1 Relay access denied" a relay denial).
//!
//! `hard` means "this address is bad, stop sending to it": only invalid_recipient and
//! domain_not_found with a permanent (5.x.x) status, and every complaint. A mailbox that is
//! full, or a message refused for our reputation or content, is not the address's fault.
//!
//! | category | hard | sisimai | PowerMTA | Momentum |
//! |---|---|---|---|---|
//! | invalid_recipient | if 5.x.x | UserUnknown, Suspend, HasMoved | bad-mailbox, inactive-mailbox | 10 Invalid Recipient |
//! | domain_not_found | if 5.x.x | HostUnknown | bad-domain | 21 DNS Failure |
//! | mailbox_full | no | MailboxFull | quota-issues | 22 Mailbox Full |
//! | message_too_large | no | MesgTooBig / EmailTooLarge | content-related | 23 Too Large |
//! | network | no | NetworkError | bad-connection, no-answer-from-host | 24 Timeout |
//! | spam_block | no | Blocked, BadReputation | spam-related | 51 Spam Block |
//! | content | no | SpamDetected, VirusDetected, ContentError | content-related, virus-related | 52 Spam Content, 53 Prohibited Attachment |
//! | policy | no | PolicyViolation, Rejected, RequirePTR, NotCompliantRFC | policy-related, invalid-sender | 50 Mail Block |
//! | auth_failure | no | AuthFailure | policy-related | 50 Mail Block |
//! | rate_limited | no | Speeding, TooManyConn, RateLimited | policy-related | 70 Transient Failure |
//! | relay_denied | no | NoRelaying | relaying-issues | 54 Relay Denied |
//! | expired | no | Expired | message-expired | 24 Timeout |
//! | complaint | yes | Feedback | (feedback loop) | (FBL) |
//! | auto_reply | no | Vacation | - | 60 Auto-Reply |
//! | delivered | no | Delivered | - | - |
//! | other | no | Undefined, SystemError, MailerError | other, protocol-errors, routing-errors | 1 Undetermined, 40 Generic Bounce |
//!
//! `docs/BOUNCES.md` has the same table with the reasoning.

use crate::taxonomy::{Category, Rule};

/// The default rules, compiled once per [`Classifier::defaults`].
const DEFAULT_RULES: &str = include_str!("../../config/bounce-rules.toml");

/// Diagnostic text beyond this many bytes is not searched: real replies are far shorter, and
/// it bounds the work per recipient.
const MAX_TEXT: usize = 4096;

/// The result of classifying one reply or one bounced recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classification {
    /// The enhanced status given, else derived from the text or the basic code; `None` only
    /// when there was nothing to derive it from.
    pub status: Option<String>,
    pub category: Category,
    pub hard: bool,
}

/// Ordered rules: operator rules, then the defaults.
#[derive(Debug, Clone)]
pub struct Classifier {
    rules: Vec<Rule>,
}

impl Classifier {
    /// The shipped rules only.
    pub fn defaults() -> Classifier {
        Classifier::with_rules(Vec::new())
    }

    /// `operator` rules, tried before the shipped ones.
    pub fn with_rules(mut operator: Vec<Rule>) -> Classifier {
        let defaults = crate::config::compile_bounce_rules(DEFAULT_RULES)
            .expect("config/bounce-rules.toml compiles (unit-tested)");
        operator.extend(defaults);
        Classifier { rules: operator }
    }

    /// The classifier for `config`: `bounce.rules` (if any), then the rules of
    /// `shaping.adaptive.throttle_patterns` / `block_patterns`, before the defaults. Errors
    /// name the key, the file and the rule index.
    pub fn load(config: &crate::config::Config) -> Result<Classifier, crate::config::ConfigErrors> {
        let mut rules = match &config.bounce.rules {
            None => Vec::new(),
            Some(path) => {
                let prefix = format!("bounce.rules ({})", path.display());
                let text = std::fs::read_to_string(path)
                    .map_err(|e| crate::config::ConfigErrors(vec![format!("{prefix}: {e}")]))?;
                crate::config::compile_bounce_rules(&text).map_err(|errors| {
                    crate::config::ConfigErrors(
                        errors
                            .into_iter()
                            .map(|e| format!("{prefix}: {e}"))
                            .collect(),
                    )
                })?
            }
        };
        rules.extend(config.shaping.adaptive.classification_rules());
        Ok(Classifier::with_rules(rules))
    }

    /// The category of `text` with enhanced status `status` (already derived).
    pub fn category(&self, status: Option<&str>, text: &str) -> Category {
        let text = truncate(text, MAX_TEXT).to_lowercase();
        self.rules
            .iter()
            .find(|r| r.matches(status, &text))
            .map_or(Category::Other, |r| r.category)
    }

    /// Classifies a failure: status from `enhanced`, else from `text`, else from `basic`
    /// (its class with .0.0), else `fallback`.
    pub fn classify(
        &self,
        enhanced: Option<&str>,
        basic: Option<u16>,
        text: &str,
        fallback: Option<&str>,
    ) -> Classification {
        let status = enhanced
            .filter(|s| is_enhanced(s))
            .map(str::to_owned)
            .or_else(|| status_in(text))
            .or_else(|| basic.or_else(|| basic_in(text)).and_then(generic_status))
            .or_else(|| fallback.map(str::to_owned));
        let category = self.category(status.as_deref(), text);
        Classification {
            hard: category.is_hard(status.as_deref()),
            status,
            category,
        }
    }

    /// Classifies a synchronous SMTP reply (as the delivery path sees it).
    pub fn classify_reply(&self, basic: u16, enhanced: Option<&str>, text: &str) -> Classification {
        self.classify(enhanced, Some(basic), text, None)
    }

    /// Classifies one recipient's failed delivery attempt: `reply` is the remote reply as one
    /// line ("451 4.7.0 Try again later", its code first) or the text of a local failure (no
    /// connection, DNS, TLS: no code), `status` the enhanced status the attempt gave it.
    pub fn classify_attempt(&self, status: &str, reply: &str) -> Classification {
        match basic_in(reply.get(..4).unwrap_or(reply)) {
            Some(basic) => self.classify_reply(basic, Some(status), reply),
            None => self.classify(Some(status), None, reply, None),
        }
    }
}

impl Classifier {
    /// Classifies one recipient of a returned notice: as [`Classifier::classify`], then, when
    /// the notice gave no enhanced status and its text holds none (the status is only the
    /// class of a basic reply code or of the action), the status is inferred from the
    /// category by [`inferred_status`].
    pub fn classify_notice(
        &self,
        enhanced: Option<&str>,
        text: &str,
        fallback: Option<&str>,
    ) -> Classification {
        let mut c = self.classify(enhanced, None, text, fallback);
        let specific = enhanced.is_some_and(is_enhanced) || status_in(text).is_some();
        if !specific {
            if let Some(inferred) = c
                .status
                .as_deref()
                .and_then(|s| inferred_status(c.category, s))
            {
                c.hard = c.category.is_hard(Some(&inferred));
                c.status = Some(inferred);
            }
        }
        c
    }
}

/// The status of a notice without an RFC 3463 code, from the class it has (of the reply
/// code, else of the action) and the category of its text: the table in docs/BOUNCES.md
/// ("Status inference"). `None`: keep the class-only status.
pub fn inferred_status(category: Category, class_status: &str) -> Option<String> {
    let class = class_status.chars().next()?;
    if class == '2' {
        return None;
    }
    let detail = match category {
        Category::InvalidRecipient => "1.1",
        Category::DomainNotFound => "1.2",
        Category::MailboxFull => "2.2",
        Category::MessageTooLarge => "3.4",
        Category::Expired => "4.7",
        Category::RelayDenied | Category::SpamBlock | Category::AuthFailure => "7.1",
        Category::Network if class == '4' => "4.1",
        _ => return None,
    };
    Some(format!("{class}.{detail}"))
}

/// The status a report gives, unless it is only a class (`5.0.0`) and `diagnostic` holds a
/// more specific code of the same class: Courier and Google write `Status: 5.0.0` beside
/// `550 5.1.1 ... User unknown`, and the reply says what happened.
pub fn specific_status(given: Option<&str>, diagnostic: &str) -> Option<String> {
    let given = given.filter(|s| is_enhanced(s))?;
    let generic = |s: &str| s.ends_with(".0.0");
    // The remote server's own code at the head of its reply ("550 5.7.1 IP address
    // blacklisted") over a Status field of the same class that says something else
    // (Sendmail's `Status: 5.1.1` from a pipelined RCPT reply): the reply is the server's
    // word, the field a summary. Not over `x.4.7`: the message's lifetime ended, whatever
    // the last reply said.
    if !given.ends_with(".4.7") {
        if let Some(found) = reply_status(diagnostic) {
            if found.as_bytes()[0] == given.as_bytes()[0] && !generic(found) {
                return Some(found.to_owned());
            }
        }
    }
    if generic(given) {
        if let Some(found) = status_in(diagnostic) {
            if found.as_bytes()[0] == given.as_bytes()[0] && !generic(&found) {
                return Some(found);
            }
        }
    }
    Some(given.to_owned())
}

/// The enhanced code right after the basic code that opens a reply: `5.7.1` of
/// `550 5.7.1 ...` or `550-5.7.1 ...`, when both have the same class.
fn reply_status(reply: &str) -> Option<&str> {
    let reply = reply.trim_start();
    let basic = reply.get(..3)?;
    if !basic.bytes().all(|b| b.is_ascii_digit())
        || !matches!(reply.as_bytes().get(3), Some(b' ' | b'-'))
    {
        return None;
    }
    let code = reply[4..].split_whitespace().next()?;
    (is_enhanced(code) && code.as_bytes()[0] == basic.as_bytes()[0]).then_some(code)
}

/// `x.y.z` with class 2, 4 or 5 and 1-3 digit subject and detail (RFC 3463).
pub fn is_enhanced(s: &str) -> bool {
    let mut parts = s.split('.');
    let ok = |p: Option<&str>, max: usize| {
        p.is_some_and(|p| !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit()))
    };
    matches!(s.as_bytes().first(), Some(b'2' | b'4' | b'5'))
        && ok(parts.next(), 1)
        && ok(parts.next(), 3)
        && ok(parts.next(), 3)
        && parts.next().is_none()
}

/// The first enhanced status code in `text` that stands alone (not part of an IP address
/// or version number): `550 5.1.1`, `(#5.1.1)`, `RESOLVER.ADR.RecipNotFound 5.1.1`. One
/// right after a basic code of the same class (`550 5.1.1`, `550-'5.2.2`) is preferred.
pub fn status_in(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut first = None;
    let mut i = 0;
    while i < bytes.len() {
        if matches!(bytes[i], b'2' | b'4' | b'5') && standalone_start(bytes, i) {
            if let Some(len) = enhanced_len(&bytes[i..]) {
                let end = i + len;
                if !bytes.get(end).is_some_and(|b| {
                    b.is_ascii_digit()
                        || (*b == b'.' && bytes.get(end + 1).is_some_and(u8::is_ascii_digit))
                }) {
                    let code = &text[i..end];
                    // "550 5.1.1" / "550-5.1.1" / "550-'5.2.2" (a reply quoted inside a
                    // relay's own message): the reply's own status.
                    let quote = usize::from(i >= 1 && matches!(bytes[i - 1], b'\'' | b'"'));
                    let at = i - quote;
                    if at >= 4
                        && matches!(bytes[at - 1], b' ' | b'-')
                        && bytes[at - 4] == bytes[i]
                        && bytes[at - 3..at - 1].iter().all(u8::is_ascii_digit)
                    {
                        return Some(code.to_owned());
                    }
                    first.get_or_insert_with(|| code.to_owned());
                }
                i = end;
                continue;
            }
        }
        i += 1;
    }
    first
}

fn standalone_start(bytes: &[u8], i: usize) -> bool {
    i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'.')
}

/// Length of an enhanced code at the start of `b`, if one is there.
fn enhanced_len(b: &[u8]) -> Option<usize> {
    let digits = |from: usize, max: usize| {
        let n = b[from.min(b.len())..]
            .iter()
            .take_while(|c| c.is_ascii_digit())
            .count();
        (1..=max).contains(&n).then_some(n)
    };
    if b.get(1) != Some(&b'.') {
        return None;
    }
    let subject = digits(2, 3)?;
    let dot = 2 + subject;
    if b.get(dot) != Some(&b'.') {
        return None;
    }
    let detail = digits(dot + 1, 3)?;
    Some(dot + 1 + detail)
}

/// The first basic reply code (4xx or 5xx) in `text` that stands alone and is followed by a
/// space, `-` or `:` (or ends the text): `550 ...`, `Remote host said: 554: ...`, `#550`.
pub fn basic_in(text: &str) -> Option<u16> {
    let bytes = text.as_bytes();
    (0..bytes.len().saturating_sub(2)).find_map(|i| {
        let code = &bytes[i..i + 3];
        let ok = matches!(code[0], b'4' | b'5')
            && code[1..].iter().all(u8::is_ascii_digit)
            && standalone_start(bytes, i)
            && bytes
                .get(i + 3)
                .is_none_or(|b| matches!(b, b' ' | b'-' | b':'));
        ok.then(|| {
            (code[0] - b'0') as u16 * 100 + (code[1] - b'0') as u16 * 10 + (code[2] - b'0') as u16
        })
    })
}

/// `550` -> `5.0.0`, `421` -> `4.0.0`; other classes have no failure status.
fn generic_status(basic: u16) -> Option<String> {
    match basic / 100 {
        2 => Some("2.0.0".to_owned()),
        4 => Some("4.0.0".to_owned()),
        5 => Some("5.0.0".to_owned()),
        _ => None,
    }
}

/// At most `max` bytes of `s`, cut at a character boundary.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notices_without_a_code_get_the_status_of_their_category() {
        let c = Classifier::defaults();
        let got = |text: &str, fallback| c.classify_notice(None, text, Some(fallback)).status;
        assert_eq!(got("User unknown", "5.0.0").as_deref(), Some("5.1.1"));
        assert_eq!(got("550 mailbox full", "5.0.0").as_deref(), Some("5.2.2"));
        assert_eq!(got("Host not found", "5.0.0").as_deref(), Some("5.1.2"));
        assert_eq!(
            got("Connection timed out", "4.0.0").as_deref(),
            Some("4.4.1")
        );
        // A code in the text or given wins; an unclassified text keeps its class.
        assert_eq!(
            got("550 5.7.1 User unknown", "5.0.0").as_deref(),
            Some("5.7.1")
        );
        assert_eq!(
            c.classify_notice(Some("5.0.0"), "User unknown", None)
                .status
                .as_deref(),
            Some("5.0.0")
        );
        assert_eq!(got("something odd", "5.0.0").as_deref(), Some("5.0.0"));
        assert_eq!(inferred_status(Category::Delivered, "2.0.0"), None);
    }
    use crate::config::compile_bounce_rules;

    fn c() -> Classifier {
        Classifier::defaults()
    }

    fn cat(enhanced: Option<&str>, basic: u16, text: &str) -> Category {
        c().classify_reply(basic, enhanced, text).category
    }

    #[test]
    fn default_rules_compile_and_reach_every_reply_category() {
        let rules = compile_bounce_rules(DEFAULT_RULES).unwrap();
        let used: std::collections::HashSet<Category> = rules.iter().map(|r| r.category).collect();
        // Complaints and auto-replies are recognised by the parser, never from a reply;
        // `other` is what no rule matched.
        for c in Category::ALL {
            let by_parser = [Category::Complaint, Category::AutoReply, Category::Other];
            assert_eq!(used.contains(&c), !by_parser.contains(&c), "{c}");
        }
    }

    #[test]
    fn code_only() {
        use Category::*;
        let cases = [
            ("5.1.1", 550, InvalidRecipient),
            ("5.1.2", 550, DomainNotFound),
            ("5.1.10", 550, InvalidRecipient),
            ("5.2.2", 552, MailboxFull),
            ("4.2.2", 452, MailboxFull),
            ("5.3.4", 552, MessageTooLarge),
            ("5.7.26", 550, AuthFailure),
            ("5.7.23", 550, AuthFailure),
            ("4.4.7", 450, Expired),
            ("4.4.1", 421, Network),
            ("5.7.1", 550, Policy),
            ("4.7.0", 421, Policy),
            ("5.5.0", 550, Other),
            ("2.0.0", 250, Delivered),
        ];
        for (status, basic, want) in cases {
            assert_eq!(cat(Some(status), basic, ""), want, "{status}");
        }
    }

    #[test]
    fn text_only_derives_the_status() {
        let r = c().classify(
            None,
            None,
            "Sorry, no mailbox here by that name. (#5.1.1)",
            None,
        );
        assert_eq!(r.status.as_deref(), Some("5.1.1"));
        assert_eq!(r.category, Category::InvalidRecipient);
        assert!(r.hard);

        let r = c().classify(None, None, "554 delivery error: mailbox is full", None);
        assert_eq!(r.status.as_deref(), Some("5.0.0"));
        assert_eq!(r.category, Category::MailboxFull);
        assert!(!r.hard);

        let r = c().classify(None, None, "connection timed out", Some("4.0.0"));
        assert_eq!(r.status.as_deref(), Some("4.0.0"));
        assert_eq!(r.category, Category::Network);

        let r = c().classify(None, None, "no idea", None);
        assert_eq!(
            (r.status, r.category, r.hard),
            (None, Category::Other, false)
        );
    }

    #[test]
    fn a_replys_own_code_beats_a_differing_status_field_except_an_expiry() {
        let got = |given, reply| specific_status(Some(given), reply);
        assert_eq!(
            got("5.1.1", "550 5.7.1 IP address blacklisted by recipient").as_deref(),
            Some("5.7.1")
        );
        assert_eq!(
            got("5.0.0", "550-5.2.2 Over quota").as_deref(),
            Some("5.2.2")
        );
        // The message's lifetime ended: the expiry stays.
        assert_eq!(
            got("4.4.7", "450 4.7.1 Access denied").as_deref(),
            Some("4.4.7")
        );
        // A code of another class, or not at the head of the reply, is no such word.
        assert_eq!(got("5.1.1", "450 4.7.1 later").as_deref(), Some("5.1.1"));
        assert_eq!(
            got("5.1.1", "Recipient rejected (550 5.7.1 policy)").as_deref(),
            Some("5.1.1")
        );
    }

    #[test]
    fn exchange_online_directory_blocking_is_a_hard_unknown_recipient() {
        let c = Classifier::defaults();
        let reply = "550 5.4.1 Recipient address rejected: Access denied. AS(201806281) \
                     [x.eop-nam02.prod.protection.outlook.com]";
        let got = c.classify_notice(Some("5.4.1"), reply, Some("5.0.0"));
        assert_eq!(got.category, Category::InvalidRecipient);
        assert!(got.hard);
        // Another 5.4.1 reply, or a temporary one, keeps its own reading.
        let other = c.classify_notice(Some("5.4.1"), "550 5.4.1 No answer from host", None);
        assert_ne!(other.category, Category::InvalidRecipient);
        let later = c.classify_notice(
            Some("4.4.1"),
            "451 4.4.1 Recipient address rejected: Access denied",
            None,
        );
        assert!(!later.hard);
    }

    #[test]
    fn text_overrides_generic_codes() {
        use Category::*;
        assert_eq!(cat(Some("5.0.0"), 550, "User unknown"), InvalidRecipient);
        assert_eq!(
            cat(
                Some("5.5.0"),
                550,
                "Requested action not taken: mailbox unavailable"
            ),
            InvalidRecipient
        );
        assert_eq!(
            cat(
                Some("5.7.1"),
                554,
                "Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org"
            ),
            SpamBlock
        );
        assert_eq!(
            cat(Some("5.7.1"), 554, "<a@b.example>: Relay access denied"),
            RelayDenied
        );
        assert_eq!(
            cat(Some("4.7.0"), 421, "Too many connections from your IP"),
            RateLimited
        );
        assert_eq!(cat(Some("4.2.1"), 450, "The user you are trying to contact is receiving mail at a rate that prevents additional messages"), RateLimited);
        assert_eq!(
            cat(Some("5.7.1"), 550, "Message rejected: DMARC policy"),
            AuthFailure
        );
        assert_eq!(
            cat(Some("5.1.10"), 550, "Recipient address has null MX"),
            DomainNotFound
        );
        assert_eq!(
            cat(None, 552, "Message size exceeds fixed maximum message size"),
            MessageTooLarge
        );
        assert_eq!(
            cat(None, 554, "Message rejected as spam by Content Filtering"),
            Content
        );
    }

    /// The wording traffic shaping recognised with its own patterns before it read the
    /// category: still throttling and blocks, whatever the (4xx or 5xx) code.
    #[test]
    fn provider_throttle_and_block_wording_is_rate_limited_and_spam_block() {
        let throttle = [
            "rate limit",
            "too many connections",
            "too many messages",
            "try again later",
            "temporarily deferred",
            "temporarily rate limited",
            "unusual rate",
            "4.7.28",
            "4.7.650",
            "[TS01]",
            "[TS02]",
            "throttl",
        ];
        let block = [
            "spamhaus",
            "blocked",
            "blacklist",
            "blocklist",
            "poor reputation",
            "bad reputation",
            "banned",
            "5.7.606",
            "5.7.511",
            "S3150",
        ];
        let replies = [
            (451, "4.0.0"),
            (450, "4.7.1"),
            (421, "4.3.0"),
            (554, "5.7.1"),
        ];
        for (phrases, want) in [
            (&throttle[..], Category::RateLimited),
            (&block[..], Category::SpamBlock),
        ] {
            for phrase in phrases {
                for (code, status) in replies {
                    let reply = format!("{code} {status} Mail from 192.0.2.1: {phrase}");
                    assert_eq!(cat(Some(status), code, &reply), want, "{reply}");
                }
            }
        }
        // A 421 that names no cause closes the channel on our traffic.
        assert_eq!(
            cat(Some("4.3.0"), 421, "421 4.3.0 closing"),
            Category::RateLimited
        );
        assert_eq!(
            cat(Some("4.4.2"), 421, "421 4.4.2 Connection timed out"),
            Category::Network
        );
        // Vague "later" wording with a named cause is that cause.
        assert_eq!(
            cat(Some("4.7.1"), 450, "450 4.7.1 Greylisted, try again later"),
            Category::Policy
        );
        assert_eq!(
            cat(
                Some("4.2.2"),
                452,
                "452 4.2.2 Mailbox full, try again later"
            ),
            Category::MailboxFull
        );
    }

    #[test]
    fn specific_codes_beat_text() {
        // A 5.1.1 is a missing mailbox whatever words come with it.
        assert_eq!(
            cat(Some("5.1.1"), 550, "blocked: user unknown"),
            Category::InvalidRecipient
        );
    }

    #[test]
    fn status_derivation() {
        assert_eq!(
            status_in("host 10.4.5.6 said: 550 5.1.1 unknown").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(status_in("host [10.4.5.6] refused"), None);
        assert_eq!(
            status_in("x 4.7.0 then 550 5.7.1 y").as_deref(),
            Some("5.7.1")
        );
        assert_eq!(
            status_in("5.1.0 - Unknown address error 550-'5.2.2 <a@b.test>... Mailbox Full'")
                .as_deref(),
            Some("5.2.2")
        );
        assert_eq!(
            specific_status(Some("5.0.0"), "550 5.1.1 <a@b.test>: unknown").as_deref(),
            Some("5.1.1")
        );
        assert_eq!(
            specific_status(Some("5.0.0"), "421 4.4.2 timed out").as_deref(),
            Some("5.0.0")
        );
        assert_eq!(basic_in("Remote host said: 554: delivery error"), Some(554));
        assert_eq!(basic_in("host [192.0.2.25]: 451-try later"), Some(451));
        assert_eq!(basic_in("port 25000 refused"), None);
        assert!(is_enhanced("5.1.10") && !is_enhanced("6.1.1") && !is_enhanced("5.1"));
    }

    #[test]
    fn hard_means_the_address_is_bad() {
        let r = c().classify_reply(550, Some("5.1.1"), "user unknown");
        assert!(r.hard);
        let r = c().classify_reply(
            450,
            Some("4.1.1"),
            "Recipient address rejected: unverified address",
        );
        assert_eq!(r.category, Category::InvalidRecipient);
        assert!(!r.hard, "a 4xx is never a reason to suppress");
        let r = c().classify_reply(552, Some("5.2.2"), "mailbox full");
        assert!(!r.hard);
    }

    #[test]
    fn operator_rules_come_before_the_defaults() {
        let rules = compile_bounce_rules(
            r#"
            [[rule]]
            category = "mailbox_full"
            status = ["5.1.1"]
            text = ["quota"]

            [[rule]]
            category = "spam_block"
            regex = "ref(erence)? code [a-z]{3}-\\d+"
            "#,
        )
        .unwrap();
        let c = Classifier::with_rules(rules);
        assert_eq!(
            c.classify_reply(550, Some("5.1.1"), "user over QUOTA")
                .category,
            Category::MailboxFull
        );
        assert_eq!(
            c.classify_reply(550, Some("5.1.1"), "user unknown")
                .category,
            Category::InvalidRecipient
        );
        assert_eq!(
            c.classify_reply(550, Some("5.0.0"), "Refused, Reference code ABC-123")
                .category,
            Category::SpamBlock
        );
    }
}
