//! Bounce, complaint and auto-reply parsing: one raw inbound message in, a [`Report`] out
//! (what kind of message it is and, per recipient, what happened and why, classified by the
//! one taxonomy in [`classify`]).
//!
//! - [`classify`]: the categories, the rules (shipped + operator) and the classifier, also
//!   used for live SMTP replies on the delivery path.
//! - [`fields`]: `Name: value` field groups (delivery-status and feedback-report bodies).
//! - [`text`]: the human-readable text of bounces from MTAs that send no RFC 3464 DSN.
//! - [`autoreply`]: vacation / out-of-office detection.
//! - [`reason`]: the reason in sisimai's vocabulary, derived from the category.
//! - [`provider`]: what one provider's own codes and replies mean, for the reason.
//! - [`ses`]: Amazon SES JSON notifications (bare, in an SNS envelope, or as a mail body).
//!
//! Order of the checks, first match wins: an ARF feedback report (RFC 5965, or Microsoft's
//! older JMRP form) -> kind `arf`;
//! a delivery-status part (RFC 3464, `message/` or `text/delivery-status`) with recipient
//! groups -> `dsn`; a bounce marker phrase in the text of a message from a mailer daemon (or
//! with a bounce subject) -> `dsn`; an auto-reply -> `autoreply`; else `none`. So a bounce
//! of an auto-reply is a bounce, and a vacation reply is never taken for one.
//!
//! Decisions (also in docs/BOUNCES.md): a complaint's recipients are the `Original-Rcpt-To`
//! addresses (else the reported message's `To`), action `delivered`, diagnostic the feedback
//! type, category `complaint`, hard. An auto-reply's one recipient is the responder (its
//! `From`), action `delivered`, diagnostic its subject, category `auto_reply`, soft.
//!
//! Invariants: never panics on any input; work is bounded: at most [`MAX_INPUT`] bytes are
//! parsed (line endings normalised to LF first, so LF, CRLF and CR-only inputs give the same
//! report), at most [`MAX_RECIPIENTS`] recipients are reported.

pub mod autoreply;
pub mod classify;
pub mod fields;
pub mod provider;
pub mod reason;
pub mod ses;
pub mod text;

use std::borrow::Cow;

use mail_parser::{Message, MessageParser, MimeHeaders, PartType};
use serde::Serialize;

use self::classify::Classifier;
use self::reason::Reason;
use crate::taxonomy::Category;

/// Bytes of a message that are parsed; the rest (in practice: the tail of a returned
/// original) is ignored. Everything a bounce says comes well before this.
pub const MAX_INPUT: usize = 1 << 20;
pub const MAX_RECIPIENTS: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Dsn,
    Arf,
    Autoreply,
    None,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Dsn => "dsn",
            Kind::Arf => "arf",
            Kind::Autoreply => "autoreply",
            Kind::None => "none",
        }
    }
}

/// The RFC 3464 `Action` of a recipient in a report that came back (the DSNs tern writes use
/// [`crate::outcome::dsn::Action`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportedAction {
    Failed,
    Delayed,
    Delivered,
    Relayed,
    Expanded,
}

impl ReportedAction {
    pub(crate) fn parse(value: &str) -> Option<ReportedAction> {
        let word = value.split_whitespace().next()?.to_ascii_lowercase();
        Some(match word.as_str() {
            "failed" => ReportedAction::Failed,
            "delayed" => ReportedAction::Delayed,
            "delivered" => ReportedAction::Delivered,
            "relayed" => ReportedAction::Relayed,
            "expanded" => ReportedAction::Expanded,
            _ => return None,
        })
    }

    /// The status to assume when a report gives none.
    pub(crate) fn default_status(self) -> &'static str {
        match self {
            ReportedAction::Failed => "5.0.0",
            ReportedAction::Delayed => "4.0.0",
            _ => "2.0.0",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ReportedAction::Failed => "failed",
            ReportedAction::Delayed => "delayed",
            ReportedAction::Delivered => "delivered",
            ReportedAction::Relayed => "relayed",
            ReportedAction::Expanded => "expanded",
        }
    }
}

/// What one message says; `recipients` is empty for kind `none`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    pub kind: Kind,
    pub recipients: Vec<BounceRecipient>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BounceRecipient {
    /// Local part as given, domain lowercased, no `rfc822;` type, no angle brackets.
    pub address: String,
    /// The DSN's Original-Recipient, only when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_recipient: Option<String>,
    /// Enhanced status (RFC 3463), given or derived; `null` for complaints and auto-replies.
    pub status: Option<String>,
    pub action: ReportedAction,
    /// The remote server's text (or the feedback type / auto-reply subject).
    pub diagnostic: Option<String>,
    pub category: Category,
    /// The reason in sisimai's vocabulary, refined from `category` (docs/BOUNCES.md).
    pub reason: Reason,
    pub hard: bool,
}

impl BounceRecipient {
    /// The address the sender used: the DSN's Original-Recipient when it has one (before
    /// forwarding or alias expansion), else `address`. What a suppression is about.
    pub fn sent_to(&self) -> &str {
        self.original_recipient.as_deref().unwrap_or(&self.address)
    }
}

impl Report {
    fn none() -> Report {
        Report {
            kind: Kind::None,
            recipients: Vec::new(),
        }
    }
}

/// Parses one raw message. Never fails: what is not understood is kind `none`.
pub fn parse(raw: &[u8], classifier: &Classifier) -> Report {
    let raw = &raw[..raw.len().min(MAX_INPUT)];
    // An Amazon SES notification posted as JSON rather than mailed.
    if raw.trim_ascii_start().starts_with(b"{") {
        return ses::parse(&String::from_utf8_lossy(raw), classifier).unwrap_or_else(Report::none);
    }
    let normalized = normalize(raw);
    let Some(message) = MessageParser::new().parse(&normalized[..]) else {
        return Report::none();
    };
    let body = message.body_text(0).unwrap_or(Cow::Borrowed(""));
    if let Some(report) = arf(&message) {
        return report;
    }
    if let Some(report) = dsn(&message, &body, classifier) {
        return report;
    }
    if let Some(report) = ses::parse(&body, classifier).filter(|r| !r.recipients.is_empty()) {
        return report;
    }
    if looks_like_bounce(&message) {
        if text::has_marker(&body) {
            return text_bounce(&message, &body, classifier, false);
        }
        // No marker phrase: a notice whose recipients stand next to a failure cue, unless
        // it is a person's auto-reply.
        if daemon_sender(&message) || !autoreply::is_autoreply(&message) {
            let report = text_bounce(&message, &body, classifier, true);
            if !report.recipients.is_empty() {
                return report;
            }
        }
    }
    // RFC 3834 asks responders for a null return path too, so only the sender decides here.
    if !daemon_sender(&message) && autoreply::is_autoreply(&message) {
        return auto_reply(&message);
    }
    Report::none()
}

/// LF, CRLF and CR-only line endings all become LF.
pub fn normalize(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\r' => {
                out.push(b'\n');
                if raw.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// `rfc822; <Bob@Example.NET>` -> `Bob@example.net`.
pub fn clean_address(value: &str) -> String {
    let value = match value.split_once(';') {
        Some((kind, rest)) if !kind.trim().contains(char::is_whitespace) => rest,
        _ => value,
    };
    let value = value.trim();
    let value = value
        .strip_prefix('<')
        .and_then(|v| v.strip_suffix('>'))
        .unwrap_or(value)
        .trim();
    text::normalize(value)
}

/// `smtp; 550 5.1.1 ...` -> `550 5.1.1 ...`, multi-line prefixes dropped, spaces collapsed.
pub(crate) fn clean_diagnostic(value: &str) -> Option<String> {
    let value = match value.split_once(';') {
        Some((kind, rest)) if kind.len() <= 24 && !kind.trim().contains(char::is_whitespace) => {
            rest
        }
        _ => value,
    };
    let value = text::tidy(value);
    (!value.is_empty()).then(|| text::join_reply_lines(&value))
}

fn part_text<'a>(part: &'a mail_parser::MessagePart<'a>) -> Cow<'a, str> {
    String::from_utf8_lossy(part.contents())
}

fn is_part_type(part: &mail_parser::MessagePart<'_>, types: &[(&str, &str)]) -> bool {
    types.iter().any(|(t, s)| part.is_content_type(t, s))
}

/// An RFC 5965 feedback report. Parsed here rather than with mail-auth's `Feedback`, which
/// keeps only one `Original-Rcpt-To` and drops reports with feedback types it does not know
/// (RFC 5965 allows new ones).
fn arf(message: &Message<'_>) -> Option<Report> {
    let Some(report) = message
        .parts
        .iter()
        .find(|p| p.is_content_type("message", "feedback-report"))
    else {
        return jmrp(message);
    };
    let group = fields::groups(&part_text(report))
        .into_iter()
        .next()
        .unwrap_or_default();
    let feedback_type = fields::get(&group, "feedback-type").map(|t| t.to_ascii_lowercase());
    let mut addresses: Vec<String> = fields::all(&group, "original-rcpt-to")
        .map(clean_address)
        .filter(|a| !a.is_empty())
        .collect();
    if addresses.is_empty() {
        addresses = reported_to(message);
    }
    addresses.dedup();
    Some(complaint(addresses, feedback_type))
}

pub(crate) fn complaint(mut addresses: Vec<String>, feedback_type: Option<String>) -> Report {
    addresses.truncate(MAX_RECIPIENTS);
    Report {
        kind: Kind::Arf,
        recipients: addresses
            .into_iter()
            .map(|address| BounceRecipient {
                address,
                original_recipient: None,
                status: None,
                action: ReportedAction::Delivered,
                diagnostic: feedback_type.clone(),
                category: Category::Complaint,
                reason: Reason::Feedback,
                hard: Category::Complaint.is_hard(None),
            })
            .collect(),
    }
}

/// Microsoft's JMRP complaint (Outlook.com / Hotmail feedback loop), which predates ARF: a
/// plain multipart message whose attached `message/rfc822` is the reported one, carrying
/// the complaining mailbox in `X-HmXmrOriginalRecipient`.
fn jmrp(message: &Message<'_>) -> Option<Report> {
    let address = message.parts.iter().find_map(|part| match &part.body {
        PartType::Message(inner) => inner
            .header_raw("X-HmXmrOriginalRecipient")
            .map(clean_address)
            .filter(|a| text::is_address(a)),
        _ => None,
    })?;
    Some(complaint(vec![address], Some("abuse".to_owned())))
}

/// The `To` addresses of the message a feedback report is about (a `message/rfc822` or
/// `text/rfc822-headers` part).
fn reported_to(message: &Message<'_>) -> Vec<String> {
    let to_of = |m: &Message<'_>| -> Vec<String> {
        m.to()
            .map(|to| {
                to.iter()
                    .filter_map(|a| a.address())
                    .map(text::normalize)
                    .collect()
            })
            .unwrap_or_default()
    };
    for part in &message.parts {
        match &part.body {
            PartType::Message(inner) => return to_of(inner),
            _ if part.is_content_type("text", "rfc822-headers") => {
                let headers = part.contents();
                if let Some(inner) = MessageParser::new().parse_headers(headers) {
                    return to_of(&inner);
                }
            }
            _ => {}
        }
    }
    Vec::new()
}

/// An RFC 3464 DSN; `None` without a status part or without recipient groups in it.
fn dsn(message: &Message<'_>, body: &str, classifier: &Classifier) -> Option<Report> {
    const STATUS_TYPES: &[(&str, &str)] = &[
        ("message", "delivery-status"),
        ("text", "delivery-status"),
        ("message", "global-delivery-status"),
    ];
    let mut recipients = Vec::new();
    // The SMTP phase the text tells, read once for all groups.
    let mut phase: Option<Option<reason::Phase>> = None;
    let mut rcpt_refused: Option<Vec<String>> = None;
    let mut notice_provider: Option<Option<provider::Provider>> = None;
    for part in message
        .parts
        .iter()
        .filter(|p| is_part_type(p, STATUS_TYPES))
    {
        let groups = fields::groups(&part_text(part));
        // The per-message group's Reporting-MTA: the receiving side's host when the bounce
        // came back from the recipient's provider.
        let reporting_mta: Vec<String> = groups
            .iter()
            .filter_map(|g| fields::get(g, "reporting-mta"))
            .map(mta_host)
            .collect();
        for group in groups {
            if !is_recipient_group(&group) {
                continue;
            }
            // A group whose recipient is no internet address (a gateway's X.400 name, a
            // local delivery's file path) is about the next address of X-Failed-Recipients
            // not reported yet, if the bounce has one; it never reports a non-address.
            let address = recipient_address(&group).or_else(|| {
                failed_recipients(message)
                    .into_iter()
                    .find(|a| !recipients.iter().any(|r: &BounceRecipient| &r.address == a))
            });
            let Some(address) = address else { continue };
            if recipients.len() == MAX_RECIPIENTS {
                break;
            }
            let status = fields::get(&group, "status")
                .and_then(|s| s.split_whitespace().next())
                .filter(|s| classify::is_enhanced(s));
            let diagnostic = fields::get(&group, "diagnostic-code")
                .and_then(clean_diagnostic)
                .or_else(|| text::diagnostic_for(body, &address))
                .or_else(|| {
                    // A text about one recipient that names it otherwise (a file path).
                    text::parse(body)
                        .filter(|t| t.recipients.len() <= 1)
                        .and_then(|t| t.diagnostic)
                });
            let text = diagnostic.as_deref().unwrap_or("");
            let action = fields::get(&group, "action")
                .and_then(ReportedAction::parse)
                .unwrap_or_else(|| implied_action(status, text));
            let status = classify::specific_status(status, text);
            let c =
                classifier.classify_notice(status.as_deref(), text, Some(action.default_status()));
            let refused = rcpt_refused.get_or_insert_with(|| text::refused_at_rcpt(body));
            let own_phase = refused
                .iter()
                .any(|a| a.eq_ignore_ascii_case(&address))
                .then_some(reason::Phase::Rcpt);
            let remote_mta = fields::get(&group, "remote-mta").map(mta_host);
            let provider = provider::detect(
                &address,
                remote_mta
                    .iter()
                    .map(String::as_str)
                    .chain(reporting_mta.iter().map(String::as_str)),
                *notice_provider.get_or_insert_with(|| provider::in_text(text::notice(body))),
            );
            let context = reason::Context {
                failed: action == ReportedAction::Failed,
                phase: own_phase.or(*phase.get_or_insert_with(|| text::smtp_phase(body))),
                explicit_status: status.is_some() || classify::status_in(text).is_some(),
                local_program: fields::get(&group, "diagnostic-code").is_some_and(|d| {
                    d.trim_start()
                        .get(..6)
                        .is_some_and(|t| t.eq_ignore_ascii_case("x-unix"))
                }),
                provider,
            };
            // The Status field's comment ("5.2.1 (mailbox disabled, not accepting messages)")
            // is the reporting MTA's reading of the reply: words for the reason too.
            let comment = fields::get(&group, "status")
                .and_then(|s| s.split_once(char::is_whitespace))
                .map(|(_, c)| c.trim())
                .filter(|c| !c.is_empty());
            let worded = match comment {
                Some(comment) => Cow::Owned(format!("{text} {comment}")),
                None => Cow::Borrowed(text),
            };
            let reason = reason::reason_in(c.category, c.status.as_deref(), &worded, context);
            recipients.push(BounceRecipient {
                reason,
                original_recipient: fields::get(&group, "original-recipient")
                    .map(clean_address)
                    .filter(|a| !a.is_empty()),
                address,
                status: c.status,
                action,
                diagnostic,
                category: c.category,
                hard: c.hard,
            });
        }
    }
    (!recipients.is_empty()).then_some(Report {
        kind: Kind::Dsn,
        recipients,
    })
}

/// `dns; mx.example.net (192.0.2.1)` -> `mx.example.net`.
fn mta_host(value: &str) -> String {
    let value = value.split_once(';').map_or(value, |(_, host)| host);
    value
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_matches(['[', ']'])
        .to_ascii_lowercase()
}

const RECIPIENT_FIELDS: [&str; 3] = [
    "final-recipient",
    "x-actual-recipient",
    "original-recipient",
];

/// A per-recipient group (not the per-message one, which has no recipient field).
fn is_recipient_group(group: &fields::Group) -> bool {
    RECIPIENT_FIELDS
        .iter()
        .any(|f| fields::get(group, f).is_some())
}

/// The action of a status group that has no Action field (Exchange leaves it out of some
/// NDRs): a 2.x.x status was delivered; a 4.x.x one is a delay unless it is x.4.7 ("delivery
/// time expired", final by definition) or the server's reply was permanent (`550 4.4.7
/// QUEUE.Expired`); anything else failed.
fn implied_action(status: Option<&str>, diagnostic: &str) -> ReportedAction {
    let permanent_reply = classify::basic_in(diagnostic).is_some_and(|code| code >= 500);
    match status.map(|s| (s.as_bytes()[0], s)) {
        Some((b'2', _)) => ReportedAction::Delivered,
        Some((b'4', s)) if !s.ends_with(".4.7") && !permanent_reply => ReportedAction::Delayed,
        _ => ReportedAction::Failed,
    }
}

/// The recipient a status group is about: the first of Final-Recipient, X-Actual-Recipient
/// and Original-Recipient that is an internet address (a gateway's Final-Recipient may be an
/// X.400 one).
fn recipient_address(group: &fields::Group) -> Option<String> {
    let internet = |value: &str| match value.split_once(';') {
        Some((kind, _)) => kind.trim().eq_ignore_ascii_case("rfc822"),
        None => true,
    };
    RECIPIENT_FIELDS
        .iter()
        .filter_map(|f| fields::get(group, f))
        .find(|v| internet(v) && text::is_address(&clean_address(v)))
        .map(clean_address)
}

/// A bounce known only from its text (no usable status part). `unmarked`: the text has no
/// marker phrase, so only recipients next to a failure cue count (the caller drops a report
/// without recipients then).
fn text_bounce(
    message: &Message<'_>,
    body: &str,
    classifier: &Classifier,
    unmarked: bool,
) -> Report {
    let always = own_addresses(message, ALWAYS_OWN);
    let weak = own_addresses(message, &["To", "Cc", "Delivered-To"]);
    let exclude = text::Exclude {
        always: &always,
        weak: &weak,
    };
    let parsed = text::parse_with(body, &exclude, unmarked).unwrap_or_default();
    let action = if parsed.delayed {
        ReportedAction::Delayed
    } else {
        ReportedAction::Failed
    };
    let mut found = parsed.recipients;
    if found.is_empty() {
        // Exim names the failed addresses in a header field too; with one of them, the
        // text's one reply is about it.
        found = failed_recipients(message)
            .into_iter()
            .map(|a| (a, None))
            .collect();
    }
    // X-Failed-Recipients (Exim) is authoritative: text recipients it does not name are
    // addresses quoted in the text.
    let failed = failed_recipients(message);
    if !failed.is_empty() && !found.is_empty() {
        let named: Vec<_> = found
            .iter()
            .filter(|(a, _)| failed.iter().any(|f| f.eq_ignore_ascii_case(a)))
            .cloned()
            .collect();
        found = if named.is_empty() {
            failed.into_iter().map(|a| (a, None)).collect()
        } else {
            named
        };
    }
    if found.is_empty() && (!unmarked || text::has_failure_cue(body)) {
        // A notice that names nobody (a Google Groups or mail.ru notice, an old Sendmail
        // transcript about the host only): the one recipient of the returned message.
        found = returned_recipient(message, body)
            .filter(|a| !exclude.any(a))
            .map(|a| (a, None))
            .into_iter()
            .collect();
    }
    // One recipient whose own lines hold no reply, in a notice that quotes one elsewhere
    // ("Could not be delivered because of 550 5.1.1 User unknown" above "The following
    // recipients were affected:"): the notice's reply is about it.
    let has_code = |d: &str| classify::basic_in(d).is_some() || classify::status_in(d).is_some();
    if let [(_, diagnostic)] = found.as_mut_slice() {
        let own_code = diagnostic.as_deref().is_some_and(has_code);
        let section_code = parsed.diagnostic.as_deref().is_some_and(has_code);
        if diagnostic.is_none() || (!own_code && section_code) {
            diagnostic.clone_from(&parsed.diagnostic);
        }
    }
    let phase = text::smtp_phase(body);
    let rcpt_refused = text::refused_at_rcpt(body);
    let notice_provider = provider::in_text(text::notice(body));
    let group_notice = list_refusal(body);
    Report {
        kind: Kind::Dsn,
        recipients: found
            .into_iter()
            .map(|(address, diagnostic)| {
                if group_notice {
                    return list_refused(address, diagnostic, action);
                }
                let c = classifier.classify_notice(
                    None,
                    diagnostic.as_deref().unwrap_or(""),
                    Some(action.default_status()),
                );
                let reason = reason::reason_in(
                    c.category,
                    c.status.as_deref(),
                    diagnostic.as_deref().unwrap_or(""),
                    reason::Context {
                        failed: action == ReportedAction::Failed,
                        phase: if rcpt_refused
                            .iter()
                            .any(|a| a.eq_ignore_ascii_case(&address))
                        {
                            Some(reason::Phase::Rcpt)
                        } else {
                            phase
                        },
                        explicit_status: diagnostic
                            .as_deref()
                            .is_some_and(|d| classify::status_in(d).is_some()),
                        local_program: false,
                        provider: provider::detect(&address, [], notice_provider),
                    },
                );
                BounceRecipient {
                    address,
                    original_recipient: None,
                    status: c.status,
                    action,
                    diagnostic,
                    category: c.category,
                    reason,
                    hard: c.hard,
                }
            })
            .collect(),
    }
}

/// A mailing list service's own notice that it did not take a post (Google Groups: "the
/// group you tried to contact may not exist, or you may not have permission to post", in
/// the sender's language, always with a link to the Groups help pages).
fn list_refusal(body: &str) -> bool {
    let head = classify::truncate(body, 8 * 1024);
    head.contains("groups.google.com/")
}

/// A recipient of a [`list_refusal`]: the list refused the sender's post. Category policy
/// (soft: the list exists or not, the sender may not post; no mailbox to suppress), reason
/// `rejected`, status the class of a permanent refusal by policy.
fn list_refused(
    address: String,
    diagnostic: Option<String>,
    action: ReportedAction,
) -> BounceRecipient {
    BounceRecipient {
        address,
        original_recipient: None,
        status: Some(if action == ReportedAction::Delayed {
            "4.0.0".to_owned()
        } else {
            "5.0.0".to_owned()
        }),
        action,
        diagnostic,
        category: Category::Policy,
        reason: Reason::Rejected,
        hard: false,
    }
}

/// Header fields whose addresses are never a failed recipient of the bounce's report.
const ALWAYS_OWN: &[&str] = &[
    "From",
    "Return-Path",
    "Sender",
    "Reply-To",
    "Errors-To",
    "List-Post",
    "List-Help",
    "List-Unsubscribe",
    "List-Subscribe",
    "List-Owner",
];

/// The bounce's own addresses in the header fields `names` (for List-* fields, their
/// `mailto:` URIs).
fn own_addresses(message: &Message<'_>, names: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for name in names {
        let Some(value) = message.header_raw(*name) else {
            continue;
        };
        for token in value.split(|c: char| c.is_whitespace() || matches!(c, ',' | '<' | '>')) {
            let token = token.strip_prefix("mailto:").unwrap_or(token);
            let token = token.split('?').next().unwrap_or(token).trim_matches('"');
            if text::is_address(token) {
                out.push(text::normalize(token));
            }
        }
        if out.len() > 64 {
            break;
        }
    }
    out
}

/// The one recipient of the returned message (its `To`, from an attached `message/rfc822`
/// or `text/rfc822-headers` part, else from the header block quoted in the text); `None`
/// when it has several or none.
fn returned_recipient(message: &Message<'_>, body: &str) -> Option<String> {
    let one = |list: Vec<String>| (list.len() == 1).then(|| list.into_iter().next()).flatten();
    let to_of = |m: &Message<'_>| -> Vec<String> {
        m.to()
            .map(|to| {
                to.iter()
                    .filter_map(|a| a.address())
                    .filter(|a| text::is_address(a))
                    .map(text::normalize)
                    .collect()
            })
            .unwrap_or_default()
    };
    for part in &message.parts {
        match &part.body {
            PartType::Message(inner) => return one(to_of(inner)),
            _ if part.is_content_type("text", "rfc822-headers") => {
                let inner = MessageParser::new().parse_headers(part.contents())?;
                return one(to_of(&inner));
            }
            _ => {}
        }
    }
    one(text::returned_to(body))
}

/// The addresses of Exim's `X-Failed-Recipients` header field.
fn failed_recipients(message: &Message<'_>) -> Vec<String> {
    message
        .header_raw("X-Failed-Recipients")
        .map(|list| {
            list.split(',')
                .map(clean_address)
                .filter(|a| text::is_address(a))
                .take(MAX_RECIPIENTS)
                .collect()
        })
        .unwrap_or_default()
}

fn auto_reply(message: &Message<'_>) -> Report {
    let responder = message
        .from()
        .and_then(|f| f.first())
        .and_then(|a| a.address())
        .map(text::normalize);
    Report {
        kind: Kind::Autoreply,
        recipients: responder
            .into_iter()
            .map(|address| BounceRecipient {
                address,
                original_recipient: None,
                status: None,
                action: ReportedAction::Delivered,
                diagnostic: message.subject().map(text::tidy),
                category: Category::AutoReply,
                reason: Reason::Vacation,
                hard: false,
            })
            .collect(),
    }
}

/// From a mailer daemon or postmaster, or with a null return path.
fn from_daemon(message: &Message<'_>) -> bool {
    daemon_sender(message)
        || message
            .header_raw("Return-Path")
            .is_some_and(|r| r.trim() == "<>")
}

/// The `From` is a mailer daemon or postmaster, or the null address (`From: <>`).
fn daemon_sender(message: &Message<'_>) -> bool {
    if message.header_raw("From").is_some_and(|f| f.trim() == "<>") {
        return true;
    }
    let from = message.from().and_then(|f| f.first());
    let address = from
        .and_then(|a| a.address())
        .unwrap_or("")
        .to_ascii_lowercase();
    let name = from
        .and_then(|a| a.name())
        .unwrap_or("")
        .to_ascii_lowercase();
    let local = address.split('@').next().unwrap_or("");
    [
        "mailer-daemon",
        "mailer_daemon",
        "maildaemon",
        "postmaster",
        "mail-daemon",
    ]
    .iter()
    .any(|d| local.contains(d))
        || name.contains("mail delivery")
        || name.contains("mailer-daemon")
}

/// The sender or the header fields say "bounce", so bounce phrases in the text are trusted
/// (a person quoting a bounce in a normal message is not one).
fn looks_like_bounce(message: &Message<'_>) -> bool {
    const SUBJECTS: &[&str] = &[
        "undeliver",
        "undelivered",
        "delivery status notification",
        "mail delivery failed",
        "delivery failure",
        "failure notice",
        "returned mail",
        "delivery failed",
        "not delivered",
        "message status - undeliverable",
        "delivery has failed",
        "nondeliverable",
        "non remis",
        "unzustellbar",
        "delivery delayed",
        "delayed mail",
        "warning: could not send message",
        "returned mail",
        "mail error",
        "error notification",
        "メールエラー",
        "エラーメール",
        "不達",
    ];
    let subject = message.subject().unwrap_or("").to_lowercase();
    from_daemon(message)
        || SUBJECTS.iter().any(|s| subject.contains(s))
        || message.header_raw("X-Failed-Recipients").is_some()
}
