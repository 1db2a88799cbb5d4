//! The bounce reason in the field's shared vocabulary (sisimai's reason names: `userunknown`,
//! `mailboxfull`, `blocked`, ...), next to tern's own [`Category`], so that tern's output can
//! be compared with other parsers' and read by tools that speak those names.
//!
//! The category stays tern's own and alone decides suppression; the reason is a second
//! reading in the shared vocabulary, from wording that names one reason, the RFC 3463
//! meaning of a given code, the SMTP command the reply answered, and last the category
//! (its default and finer phrases). Where the vocabularies cut differently the reason
//! follows sisimai's cut: a "User unknown" after DATA is invalid_recipient (hard) and
//! `filtered`. The order is in [`reason_in`]; the tables are in docs/BOUNCES.md
//! ("Reasons"); this file is their implementation.
//!
//! Invariant: a pure function of (category, status, diagnostic, context); bounded work (the
//! text is cut to [`MAX_TEXT`] bytes and matched against fixed phrase lists).

use serde::Serialize;

use super::classify::truncate;
use super::provider::{self, Provider};
use crate::taxonomy::Category;

/// Diagnostic bytes looked at; real replies are far shorter.
const MAX_TEXT: usize = 4096;

/// sisimai's reason names (the ones a parsed bounce can have).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Reason {
    UserUnknown,
    Suspend,
    HasMoved,
    Filtered,
    HostUnknown,
    MailboxFull,
    MesgTooBig,
    ExceedLimit,
    NetworkError,
    Blocked,
    BadReputation,
    RequirePtr,
    SpamDetected,
    VirusDetected,
    ContentError,
    PolicyViolation,
    Rejected,
    NotCompliantRfc,
    SecurityError,
    AuthFailure,
    FailedStartTls,
    TooManyConn,
    Speeding,
    NoRelaying,
    Expired,
    Feedback,
    Vacation,
    Delivered,
    SystemError,
    SystemFull,
    MailerError,
    NotAccept,
    SyntaxError,
    OnHold,
    Undefined,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::UserUnknown => "userunknown",
            Reason::Suspend => "suspend",
            Reason::HasMoved => "hasmoved",
            Reason::Filtered => "filtered",
            Reason::HostUnknown => "hostunknown",
            Reason::MailboxFull => "mailboxfull",
            Reason::MesgTooBig => "mesgtoobig",
            Reason::ExceedLimit => "exceedlimit",
            Reason::NetworkError => "networkerror",
            Reason::Blocked => "blocked",
            Reason::BadReputation => "badreputation",
            Reason::RequirePtr => "requireptr",
            Reason::SpamDetected => "spamdetected",
            Reason::VirusDetected => "virusdetected",
            Reason::ContentError => "contenterror",
            Reason::PolicyViolation => "policyviolation",
            Reason::Rejected => "rejected",
            Reason::NotCompliantRfc => "notcompliantrfc",
            Reason::SecurityError => "securityerror",
            Reason::AuthFailure => "authfailure",
            Reason::FailedStartTls => "failedstarttls",
            Reason::TooManyConn => "toomanyconn",
            Reason::Speeding => "speeding",
            Reason::NoRelaying => "norelaying",
            Reason::Expired => "expired",
            Reason::Feedback => "feedback",
            Reason::Vacation => "vacation",
            Reason::Delivered => "delivered",
            Reason::SystemError => "systemerror",
            Reason::SystemFull => "systemfull",
            Reason::MailerError => "mailererror",
            Reason::NotAccept => "notaccept",
            Reason::SyntaxError => "syntaxerror",
            Reason::OnHold => "onhold",
            Reason::Undefined => "undefined",
        }
    }
}

/// The default reason of each category (the first column of the table in docs/BOUNCES.md).
pub fn default_for(category: Category) -> Reason {
    match category {
        Category::InvalidRecipient => Reason::UserUnknown,
        Category::DomainNotFound => Reason::HostUnknown,
        Category::MailboxFull => Reason::MailboxFull,
        Category::MessageTooLarge => Reason::MesgTooBig,
        Category::Network => Reason::NetworkError,
        Category::SpamBlock => Reason::Blocked,
        Category::Content => Reason::SpamDetected,
        Category::Policy => Reason::PolicyViolation,
        Category::AuthFailure => Reason::AuthFailure,
        Category::RateLimited => Reason::TooManyConn,
        Category::RelayDenied => Reason::NoRelaying,
        Category::Expired => Reason::Expired,
        Category::Complaint => Reason::Feedback,
        Category::AutoReply => Reason::Vacation,
        Category::Delivered => Reason::Delivered,
        Category::Other => Reason::Undefined,
    }
}

/// A finer reason within `category`: `(reason, status patterns, lowercase phrases)`; the
/// first entry whose status pattern or phrase matches wins. Status patterns are prefixes with
/// `x` for the class (`x.1.6`).
type Refinement = (Reason, &'static [&'static str], &'static [&'static str]);

const INVALID_RECIPIENT: &[Refinement] = &[
    (
        Reason::Filtered,
        &[],
        &[
            "recipient preferences",
            "filtered",
            "refused by the recipient's filter",
        ],
    ),
    (
        Reason::HasMoved,
        &["x.1.6"],
        &["has moved", "moved to", "no longer at this address"],
    ),
    (
        Reason::Suspend,
        &[],
        &[
            "suspend",
            "disabled",
            "deactivated",
            "inactive",
            "not active",
            "account expired",
            "account has expired",
            "blocked account",
            "account is locked",
            "locked out",
            "frozen",
        ],
    ),
];

const POLICY: &[Refinement] = &[
    (
        Reason::RequirePtr,
        &["x.7.25"],
        &[
            "reverse dns",
            "ptr record",
            "rdns",
            "reverse lookup",
            "no ptr",
            "not resolve your",
            "cannot find your hostname",
            "cannot resolve your",
            "reverse hostname",
        ],
    ),
    (
        Reason::Rejected,
        &["x.1.7", "x.1.8", "x.7.27"],
        &[
            "sender address rejected",
            "sender rejected",
            "sender domain",
            "sender is rejected",
            "domain of sender address",
            "from address rejected",
            "mail from",
            "sender verify failed",
            "sender verification",
            "sender not allowed",
            "envelope sender",
            "unknown sender",
        ],
    ),
    (
        Reason::NotCompliantRfc,
        &[],
        &[
            "rfc 5322",
            "rfc5322",
            "rfc 2822",
            "rfc2822",
            "not rfc compliant",
            "multiple",
        ],
    ),
    // "Message not accepted for policy reasons" (5.7.9 at Yahoo): a policy, not security.
    (Reason::PolicyViolation, &[], &["policy"]),
    (
        Reason::SecurityError,
        &["x.7.0", "x.7.6", "x.7.9"],
        &[
            "access denied",
            "not authorized",
            "authentication required",
            "must issue a starttls",
            "tls required",
            "encryption",
        ],
    ),
];

const SPAM_BLOCK: &[Refinement] = &[(Reason::BadReputation, &[], &["reputation"])];

const CONTENT: &[Refinement] = &[
    (
        Reason::VirusDetected,
        &[],
        &["virus", "malware", "infected", "trojan", "worm"],
    ),
    (
        Reason::ContentError,
        &["x.6"],
        &[
            "attachment",
            "mime",
            "header",
            "encoding",
            "invalid content",
        ],
    ),
];

const RATE_LIMITED: &[Refinement] = &[(
    Reason::Speeding,
    &[],
    &[
        "rate limit",
        "ratelimit",
        "rate-limit",
        "sending rate",
        "unusual rate",
        "slow down",
    ],
)];

const MESSAGE_TOO_LARGE: &[Refinement] = &[(
    Reason::ExceedLimit,
    &["x.2.3"],
    &["exceeds the size limit of the mailbox", "exceedlimit"],
)];

const DOMAIN_NOT_FOUND: &[Refinement] = &[
    (
        Reason::NotAccept,
        &["x.1.10"],
        &[
            "doesn't receive email",
            "does not accept mail",
            "no mx record",
            "null mx",
            "couldn't find a mail exchanger",
        ],
    ),
    (
        Reason::NetworkError,
        &[],
        &[
            "name server reply",
            "try again",
            "servfail",
            "dns error",
            "lookup failed",
        ],
    ),
];

const NETWORK: &[Refinement] = &[(
    Reason::FailedStartTls,
    &[],
    &["starttls", "tls handshake", "tls negotiation"],
)];

const OTHER: &[Refinement] = &[
    (
        Reason::Suspend,
        &[],
        &[
            "frozen",
            "account is locked",
            "suspend",
            "disabled",
            "deactivated",
            "inactive",
        ],
    ),
    (Reason::OnHold, &[], &["on hold"]),
    (
        Reason::SystemFull,
        &["x.3.1"],
        &[
            "system full",
            "disk full",
            "out of disk",
            "insufficient system storage",
        ],
    ),
    (
        Reason::SyntaxError,
        &["x.5.2", "x.5.4"],
        &[
            "syntax error",
            "command unrecognized",
            "unrecognized command",
        ],
    ),
    (
        Reason::NotAccept,
        &["x.1.10"],
        &["does not accept mail", "not accept mail", "null mx"],
    ),
    (
        Reason::MailerError,
        &[],
        &[
            "mailer error",
            "command failed",
            "command died",
            "program exited",
            "pipe to",
            "procmail",
            "exit code",
        ],
    ),
    (
        Reason::SystemError,
        &["x.3"],
        &[
            "system error",
            "internal error",
            "server error",
            "service unavailable",
            "currently unavailable",
            "transaction failed",
            "temporary failure",
            "local error",
            "configuration error",
            "loop",
            "too many hops",
        ],
    ),
];

/// The SMTP command a reply answered, as the notice tells (Postfix's "in reply to end of
/// DATA command", Exim's "after RCPT TO:", a Sendmail transcript's `>>> DATA`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The greeting or HELO/EHLO: the client host itself was refused.
    Helo,
    Mail,
    Rcpt,
    Data,
}

/// What the report says around one recipient's diagnostic.
#[derive(Debug, Clone, Copy, Default)]
pub struct Context {
    /// The report's action is `failed` (a final notice).
    pub failed: bool,
    pub phase: Option<Phase>,
    /// The status was given by the notice (a `Status:` field or a code in the reply), not
    /// inferred from the class and the category.
    pub explicit_status: bool,
    /// The diagnostic came from a local delivery program (`Diagnostic-Code: X-Unix; 75`).
    pub local_program: bool,
    /// The provider that answered, when its replies are read differently
    /// ([`super::provider`]).
    pub provider: Option<Provider>,
}

/// The reason an RFC 3463 code (with the IANA registry's later codes) means on its own, by
/// the standard meaning of its subject and detail: `x.1.1` bad destination mailbox ->
/// `userunknown`, `x.2.2` mailbox full -> `mailboxfull`, `x.7.13` user account disabled ->
/// `suspend`. `None` for a code that names no cause (`x.0.0`, `x.5.0`, ...). The inverse of
/// the inference table of `classify::inferred_status` (docs/BOUNCES.md "Status inference").
pub fn status_reason(status: &str) -> Option<Reason> {
    let mut parts = status.split('.');
    let class = parts.next()?;
    let subject: u16 = parts.next()?.parse().ok()?;
    let detail: u16 = parts.next()?.parse().ok()?;
    let temporary = class == "4";
    Some(match (subject, detail) {
        (1, 0 | 1 | 3) => Reason::UserUnknown,
        (1, 2) => Reason::HostUnknown,
        (1, 4) => Reason::Filtered,
        (1, 6) => Reason::HasMoved,
        (1, 7 | 8) => Reason::Rejected,
        (1, 9) => Reason::SystemError,
        (1, 10) => Reason::NotAccept,
        // Mailbox disabled, not accepting messages: the mailbox refused this message.
        (2, 0 | 1 | 4) => Reason::Filtered,
        (2, 2) => Reason::MailboxFull,
        (2, 3) => Reason::ExceedLimit,
        (3, 0 | 3 | 5) => Reason::SystemError,
        (3, 1) => Reason::SystemFull,
        (3, 2) => Reason::NotAccept,
        (3, 4) => Reason::MesgTooBig,
        (4, 1) if temporary => Reason::Expired,
        (4, 0 | 1 | 2 | 6 | 8) => Reason::NetworkError,
        (4, 3) => Reason::SystemError,
        (4, 4) if temporary => Reason::NetworkError,
        (4, 4) => Reason::HostUnknown,
        (4, 5) => Reason::SystemFull,
        (4, 7) => Reason::Expired,
        (5, 2 | 6) => Reason::SyntaxError,
        (5, 3) => Reason::TooManyConn,
        (5, 4 | 5) => Reason::SystemError,
        (6, _) => Reason::ContentError,
        (7, 1 | 2) if temporary => Reason::Blocked,
        (7, 0..=12 | 14 | 15 | 19) => Reason::SecurityError,
        (7, 13) => Reason::Suspend,
        (7, 16) => Reason::MesgTooBig,
        (7, 17 | 18) => Reason::HasMoved,
        (7, 20..=24 | 26 | 29) => Reason::AuthFailure,
        (7, 25) => Reason::RequirePtr,
        (7, 27) => Reason::NotAccept,
        (7, 28) => Reason::SpamDetected,
        (7, 30) => Reason::FailedStartTls,
        _ => return None,
    })
}

/// Codes whose meaning is too broad to decide a reason when the text says more (a `5.7.1`
/// is any refusal; a `5.1.1` beside "mailbox full" wording is the mailbox's state).
fn vague(reason: Reason) -> bool {
    matches!(
        reason,
        Reason::SystemError
            | Reason::SecurityError
            | Reason::Expired
            | Reason::NetworkError
            | Reason::HostUnknown
            | Reason::UserUnknown
            | Reason::Filtered
    )
}

/// Wording that names a reason whatever the category and the code, tried in order before
/// them (lowercase). Only phrases that say one thing: "blocked" alone is not here (a
/// blocked account is `suspend`, a blocked IP `blocked`), "quota" alone neither (a relay
/// quota is a block).
const WORDING: &[(Reason, &[&str])] = &[
    (
        Reason::MailerError,
        &[
            "procmail:",
            "mailer error",
            "command died with",
            "pipe to |",
        ],
    ),
    (
        Reason::MailboxFull,
        &[
            "mailbox is full",
            "mailbox full",
            "over quota",
            "overquota",
            "quota exceeded",
            "exceeded quota",
            "exceeds quota",
            "quota full",
            "mailbox exceeds",
            "mailbox has exceeded",
            "mailbox size limit",
            "mailbox exceeded",
            "mailbox exceeded the local limit",
            "exceeded the local limit",
            "full mailbox",
            "mailfolder is full",
            "insufficient storage",
            "disk quota",
            "diskspace quota",
            "not enough space",
            "not enough storage space",
            "does not have enough space",
        ],
    ),
    (
        Reason::ContentError,
        &["headers too large", "header too large", "too many headers"],
    ),
    (
        Reason::MesgTooBig,
        &[
            "message size exceeds",
            "max message size",
            "maximum message size",
            "message is too large",
            "message too large",
            "message too big",
            "size limit exceeded",
        ],
    ),
    (
        Reason::Suspend,
        &[
            "account has been disabled",
            "account is disabled",
            "account disabled",
            "disabled recipient",
            "mailbox disabled",
            "mailbox is disabled",
            "account has been suspended",
            "account is suspended",
            "account suspended",
            "temporary locked",
            "temporarily locked",
            "account is locked",
            "account is blocked",
            "recipient account is blocked",
            "account has been discontinued",
            "disabled or discontinued",
            "account is frozen",
        ],
    ),
    (
        Reason::HasMoved,
        &["has moved", "no longer at this address"],
    ),
    (
        Reason::NoRelaying,
        &[
            "relay access denied",
            "relaying denied",
            "not configured to relay",
            "relay not permitted",
            "not permitted to relay",
            "unable to relay",
            "relaying not allowed",
            "relay denied",
            "we do not relay",
            "no relaying",
            "relay prohibited",
            "as a relay",
            "allowed rcpthosts",
            // Amazon SES: the sending identity is not verified for the region.
            "email address is not verified",
        ],
    ),
    (
        Reason::SecurityError,
        &[
            "smtp authentication",
            "unauthenticated sender",
            "authentication is required",
            "must issue a starttls",
        ],
    ),
    (
        Reason::VirusDetected,
        &["virus", "malware", "infected", "trojan"],
    ),
    // Yahoo's TSS04 "deferred due to unexpected volume or user complaints": the sender's
    // standing with the provider's users.
    (Reason::BadReputation, &["reputation", "user complaints"]),
    (
        Reason::Filtered,
        &["recipient preferences", "refused by the recipient's filter"],
    ),
    (
        Reason::SpamDetected,
        &[
            "scored as spam",
            "considered spam",
            "detected as spam",
            "spam classification",
            "appears to be spam",
            "spam-like",
            "antispam",
            "anti-spam",
            "bulk email",
            "spam message",
            "spam content",
            "content rejected",
            "blacklisted url",
            "uribl",
            "surbl",
            // Orange: "Mail rejete. Mail rejected. OFR_506" (its code for spam).
            "ofr_506",
        ],
    ),
    (
        Reason::FailedStartTls,
        &[
            "does not support tls",
            "starttls",
            "tls negotiation",
            "tls handshake",
        ],
    ),
    (
        Reason::SystemFull,
        &[
            "insufficient disk space",
            "disk full",
            "system full",
            "out of disk",
        ],
    ),
    (
        Reason::AuthFailure,
        &[
            "spf",
            "dkim",
            "dmarc",
            "sender policy framework",
            "authentication information",
        ],
    ),
    (
        Reason::RequirePtr,
        &[
            "reverse dns",
            "ptr record",
            "rdns",
            "reverse lookup",
            "no ptr",
            "ip name lookup failed",
            "unverifyable sending ip",
            "unverifiable sending ip",
            "mismatches client ip",
            "cannot find your hostname",
            "cannot resolve your",
        ],
    ),
    (
        Reason::NotCompliantRfc,
        &[
            "rfc 5322",
            "rfc5322",
            "rfc 2822",
            "rfc2822",
            "not rfc compliant",
            "duplicate header",
        ],
    ),
    (
        Reason::PolicyViolation,
        &[
            // Gmail: "blocked because its content presents a potential security issue"
            // (Sendmail's DSN keeps the first line of the reply only).
            "content presents a potential",
            "policy reasons",
            "greylist",
            "graylist",
        ],
    ),
    (
        Reason::Rejected,
        &[
            "permission to post",
            "unroutable sender",
            "unrouteable sender",
            "purported responsible address",
            "all recipient addresses rejected",
            "sender address rejected",
            "sender verify failed",
            "domain of sender address",
            "from: domain is invalid",
        ],
    ),
    (
        Reason::NotAccept,
        &[
            "no smtp service",
            "does not accept mail",
            "not accepting network messages",
            "null mx",
            "doesn't receive email",
        ],
    ),
    (
        Reason::HostUnknown,
        &[
            "domain is not reachable",
            "domain may not exist",
            "name or service not known",
        ],
    ),
    (
        Reason::Blocked,
        &[
            "blacklisted",
            "blocklisted",
            "spamhaus",
            "spamcop",
            "dnsbl",
            "blocked using",
            "client host rejected",
            "client host blocked",
            "smtp server of your isp",
            "unwanted messages",
            "not accepting connections",
            "invalid ip for sending",
            "service refuse",
            // "You've reached your daily relay quota": the sending host, not a mailbox.
            "relay quota",
        ],
    ),
    // Any other mention of spam: the message was taken for it (a blocked host said so above).
    (Reason::SpamDetected, &["spam"]),
    (
        Reason::TooManyConn,
        &[
            "connection rate",
            "too many connections",
            "too many concurrent",
            "too many sessions",
        ],
    ),
    (
        Reason::Speeding,
        &[
            "receiving mail at a rate",
            "too many recipients this hour",
            "sending rate",
        ],
    ),
    (
        Reason::UserUnknown,
        &[
            "recipient address rejected: access denied",
            "user unknown",
            "unknown user",
            "no such user",
            "user not exist",
            "user doesn't exist",
            "user does not exist",
            "no such mailbox",
            "mailbox not found",
            "recipient not found",
            "unknown recipient",
            "invalid recipient",
            "doesn't have a",
            "address does not exist",
            "account that you tried to reach does not exist",
            "not a known user",
            "no mail box available",
            "no account by that name",
            "bad_recipient",
            "not an active address",
            "nonexistent user",
            "non-existent user",
            "unknown mailbox",
            "invalid mailbox",
        ],
    ),
];

/// The first [`WORDING`] entry with a phrase in `text` (lowercase), in one pass over the
/// text: the phrases of each entry are one alternative of a [`regex::RegexSet`], compiled
/// once (a phrase-by-phrase search costs a scan per phrase, about 200 of them).
fn worded(text: &str) -> Option<Reason> {
    static SET: std::sync::LazyLock<regex::RegexSet> = std::sync::LazyLock::new(|| {
        regex::RegexSet::new(WORDING.iter().map(|(_, phrases)| {
            phrases
                .iter()
                .map(|p| regex::escape(p))
                .collect::<Vec<_>>()
                .join("|")
        }))
        .expect("escaped literal phrases compile")
    });
    SET.matches(text)
        .into_iter()
        .next()
        .map(|index| WORDING[index].0)
}

/// A receiving system's own statement that its directory has no such recipient (not a
/// relayed reply), which is about the address whatever SMTP command the notice names.
const DIRECTORY: &[&str] = &[
    "recipient name is not recognized",
    "not listed in domino directory",
    "not listed in public name",
    "unknown user:",
    "invalid final delivery userid",
    "address couldn't be found",
    // Yahoo's "554 delivery error: dd This user doesn't have a yahoo.com account".
    "dd this user doesn't have a",
    "invalid recipient",
    "rcpt to response",
    "recipientnotfound",
    // Exchange Online's directory-based edge blocking (5.4.1).
    "recipient address rejected: access denied",
];

/// Wording of a network failure that a final notice names before its giving up.
const NETWORK_WORDING: &[&str] = &[
    "lost connection",
    "host name lookup failure",
    "name server",
    "mail loop",
    "routing loop",
    "hop count",
    "maximum allowed times",
    "establish an smtp connection",
    "network error",
];

/// Lowercase phrases of a final notice about a message that was retried until it gave up.
const GAVE_UP: &[&str] = &[
    "retry timeout exceeded",
    "failing for a long time",
    "will be retried",
    "could not be delivered for",
    "cannot send message for",
    "too long in the queue",
    "in the queue too long",
    "giving up",
    "delivery time expired",
    "message expired",
    "envelope expired",
    "did not accept our requests to connect",
    // au (KDDI): "Your message was not delivered within 0 days and 1 hours."
    "not delivered within",
    // "Delivery to the following recipients was aborted after 5.0 hour(s)".
    "aborted after",
];

/// Lowercase phrases of a timeout: in a final notice, retries that ran out of time.
const TIMED_OUT: &[&str] = &["timed out", "timeout"];

/// The reason of one recipient, from its category, its status, its diagnostic and what the
/// report says around it (see [`Context`]). In order, first answer wins:
///
/// 1. the category's own reason for complaints, auto-replies and deliveries; a local
///    delivery program's failure is `mailererror`;
/// 2. wording that names a reason (the [`WORDING`] table), whatever the category;
/// 3. an unknown recipient (by wording or category): `userunknown` when the code says the
///    mailbox is bad (x.1.1) or the reply answered RCPT TO; `rejected` when it answered
///    MAIL FROM; else `filtered` (the recipient was refused after it was accepted, or by a
///    mailbox state: x.2.x, DATA, or a notice that does not say);
/// 4. a given code whose meaning names a cause ([`status_reason`], unless [`vague`]);
/// 5. a client refused at HELO is `blocked`; a permanent refusal at MAIL FROM `rejected`;
/// 6. for network, other and expired failures: `networkerror` wording, else `expired` when
///    the notice gave up on retries or is final about a temporary error;
/// 7. the category's refinements ([`reason`]); for `other`, a vague given code's reason.
pub fn reason_in(
    category: Category,
    status: Option<&str>,
    diagnostic: &str,
    context: Context,
) -> Reason {
    if matches!(
        category,
        Category::Complaint | Category::AutoReply | Category::Delivered
    ) {
        return default_for(category);
    }
    let text = truncate(diagnostic, MAX_TEXT).to_ascii_lowercase();
    let given = status.filter(|_| context.explicit_status);
    let named = given.and_then(status_reason);
    let temporary = status.is_some_and(|s| s.starts_with('4'));
    // A provider's own code names the reason wherever it was quoted.
    if let Some(coded) = provider::coded(&text) {
        return coded;
    }
    let worded = worded(&text);
    let unknown_user = match worded {
        Some(Reason::UserUnknown) => true,
        // A message over the mailbox's own limit (x.2.3) rather than the system's.
        Some(Reason::MesgTooBig) if named == Some(Reason::ExceedLimit) => {
            return Reason::ExceedLimit;
        }
        Some(r) => return r,
        None if context.local_program && context.failed => return Reason::MailerError,
        None => {
            category == Category::InvalidRecipient
                && (named == Some(Reason::UserUnknown)
                    || reason(category, status, diagnostic) == Reason::UserUnknown)
        }
    };
    if unknown_user {
        let provider = context.provider;
        return match (named, context.phase) {
            (Some(Reason::UserUnknown), _) | (_, Some(Phase::Rcpt)) => Reason::UserUnknown,
            (_, Some(Phase::Mail)) if !temporary => Reason::Rejected,
            (Some(Reason::HostUnknown), _) => Reason::HostUnknown,
            // NTT docomo refuses a sender its user's reception settings do not allow at end
            // of DATA, with "550 Unknown user": the sender was rejected.
            (None, Some(Phase::Data)) if provider == Some(Provider::NttDocomo) => Reason::Rejected,
            // The receiving system's own directory lookup said so (an Exchange, Domino or
            // IMail notice, Gmail's "address couldn't be found"), whatever the command.
            _ if DIRECTORY.iter().any(|p| text.contains(p)) => Reason::UserUnknown,
            // Hotmail / Outlook.com's "mailbox unavailable" is its directory's answer.
            _ if provider == Some(Provider::Microsoft) && text.contains("mailbox unavailable") => {
                Reason::UserUnknown
            }
            (_, Some(Phase::Data)) | (Some(Reason::Filtered), None) => Reason::Filtered,
            // MessageLabs refuses unknown recipients of the domains it filters for before
            // their mail reaches them.
            (_, None) if provider == Some(Provider::MessageLabs) => Reason::UserUnknown,
            // KDDI au: `550 <a@b>: User unknown` (the address quoted) is an address that
            // does not exist, `550 : User unknown` the recipient's reception filter.
            (_, None) if provider == Some(Provider::Kddi) && names_recipient(&text) => {
                Reason::UserUnknown
            }
            // No command known: sisimai's reading of a refusal that may have come after
            // DATA.
            _ => Reason::Filtered,
        };
    }
    // au (KDDI)'s bare "550 <a@b>: Recipient address rejected." at RCPT names no other
    // cause: the address does not exist there.
    if context.provider == Some(Provider::Kddi)
        && !temporary
        && text
            .trim_end()
            .trim_end_matches('.')
            .ends_with("recipient address rejected")
    {
        return Reason::UserUnknown;
    }
    if let Some(named) = named.filter(|r| !vague(*r)) {
        return named;
    }
    match (category, context.phase) {
        (Category::Policy | Category::SpamBlock | Category::Other, Some(Phase::Helo)) => {
            return Reason::Blocked;
        }
        // Unless the text names a finer cause (a PTR record, a security requirement).
        (Category::InvalidRecipient | Category::Policy, Some(Phase::Mail)) if !temporary => {
            let refined = reason(category, status, diagnostic);
            return if refined == default_for(category) {
                Reason::Rejected
            } else {
                refined
            };
        }
        _ => {}
    }
    if matches!(
        category,
        Category::Network | Category::Other | Category::Expired
    ) {
        if NETWORK_WORDING.iter().any(|p| text.contains(p)) {
            return Reason::NetworkError;
        }
        // A given code that names a system error (x.3.x, x.4.3) is the cause; the notice's
        // giving up is only its consequence.
        if given.is_some_and(|s| status_matches("x.3", s) || status_matches("x.4.3", s)) {
            return Reason::SystemError;
        }
        let gave_up = GAVE_UP.iter().any(|p| text.contains(p)) || retried(&text);
        let timed_out = TIMED_OUT.iter().any(|p| text.contains(p));
        if (context.failed && (temporary || timed_out)) || gave_up {
            return Reason::Expired;
        }
    }
    let refined = reason(category, status, diagnostic);
    match (category, named) {
        (Category::Other, Some(named)) if refined == Reason::Undefined => named,
        // RFC 5321's 502-504 say the command or its parameter was not understood.
        (Category::Other, _)
            if refined == Reason::Undefined
                && super::classify::basic_in(&text).is_some_and(|c| (502..=504).contains(&c)) =>
        {
            Reason::SyntaxError
        }
        _ => refined,
    }
}

/// A reply that starts with its code and quotes an address in angle brackets right after
/// it (`550 <a@b.example>: User unknown`, `550 5.1.1 <a@b.example>...`).
fn names_recipient(text: &str) -> bool {
    let head = text.get(..text.len().min(64)).unwrap_or(text);
    super::classify::basic_in(head).is_some()
        && head
            .split_once('<')
            .is_some_and(|(_, rest)| rest.split('>').next().is_some_and(|a| a.contains('@')))
}

/// "failed 20 attempts", "after 5 attempts": a count of delivery attempts.
fn retried(text: &str) -> bool {
    text.match_indices(" attempts").any(|(at, _)| {
        text[..at]
            .rsplit(' ')
            .next()
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    })
}

/// The reason for a recipient of `category` with `status` and `diagnostic`.
pub fn reason(category: Category, status: Option<&str>, diagnostic: &str) -> Reason {
    let refinements: &[Refinement] = match category {
        Category::InvalidRecipient => INVALID_RECIPIENT,
        Category::Policy => POLICY,
        Category::SpamBlock => SPAM_BLOCK,
        Category::Content => CONTENT,
        Category::RateLimited => RATE_LIMITED,
        Category::MessageTooLarge => MESSAGE_TOO_LARGE,
        Category::Network => NETWORK,
        Category::DomainNotFound => DOMAIN_NOT_FOUND,
        Category::Other => OTHER,
        _ => &[],
    };
    let text = truncate(diagnostic, MAX_TEXT).to_ascii_lowercase();
    refinements
        .iter()
        .find(|(_, codes, phrases)| {
            status.is_some_and(|s| codes.iter().any(|c| status_matches(c, s)))
                || phrases.iter().any(|p| text.contains(p))
        })
        .map_or_else(|| default_for(category), |(r, _, _)| *r)
}

/// `x.1.6` matches `5.1.6` and `4.1.6`; `x.3` matches `5.3.0`, `4.3.2`.
fn status_matches(pattern: &str, status: &str) -> bool {
    let mut got = status.split('.');
    pattern
        .split('.')
        .all(|want| got.next().is_some_and(|part| want == "x" || want == part))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_category_has_a_default_and_refinements_stay_in_their_category() {
        for c in Category::ALL {
            let r = reason(c, None, "");
            assert_eq!(r, default_for(c), "{c}");
        }
        assert_eq!(
            reason(
                Category::InvalidRecipient,
                Some("5.1.1"),
                "Account disabled"
            ),
            Reason::Suspend
        );
        assert_eq!(
            reason(Category::InvalidRecipient, Some("5.1.6"), "gone"),
            Reason::HasMoved
        );
        assert_eq!(
            reason(Category::Policy, Some("5.1.8"), "550 5.1.8 bad sender"),
            Reason::Rejected
        );
        assert_eq!(
            reason(Category::Content, None, "virus found"),
            Reason::VirusDetected
        );
        // A phrase of another category's list does not apply.
        assert_eq!(
            reason(Category::MailboxFull, None, "account disabled"),
            Reason::MailboxFull
        );
        assert!(status_matches("x.3", "4.3.2") && !status_matches("x.3", "4.4.2"));
    }

    #[test]
    fn names_serialise_as_sisimai_spells_them() {
        for (r, name) in [
            (Reason::NotCompliantRfc, "notcompliantrfc"),
            (Reason::RequirePtr, "requireptr"),
            (Reason::FailedStartTls, "failedstarttls"),
            (Reason::MesgTooBig, "mesgtoobig"),
        ] {
            assert_eq!(r.as_str(), name);
            assert_eq!(serde_json::to_value(r).unwrap(), name);
        }
    }

    #[test]
    fn the_context_refines_within_the_category() {
        let failed = |phase| Context {
            failed: true,
            phase,
            explicit_status: true,
            local_program: false,
            provider: None,
        };
        assert_eq!(
            reason_in(
                Category::InvalidRecipient,
                Some("5.0.0"),
                "550 Unknown user a@b.example",
                failed(Some(Phase::Data))
            ),
            Reason::Filtered
        );
        assert_eq!(
            reason_in(
                Category::Policy,
                Some("5.7.1"),
                "550 5.7.1 refused",
                failed(Some(Phase::Mail))
            ),
            Reason::Rejected
        );
        // At MAIL FROM too, a finer cause the text names wins.
        assert_eq!(
            reason_in(
                Category::Policy,
                Some("5.7.1"),
                "554 5.7.1 Reverse DNS failed",
                failed(Some(Phase::Mail))
            ),
            Reason::RequirePtr
        );
        // Greylisting at MAIL FROM is temporary, no rejection of the sender.
        assert_eq!(
            reason_in(
                Category::Policy,
                Some("4.7.1"),
                "451 4.7.1 Greylisting",
                failed(Some(Phase::Mail))
            ),
            Reason::PolicyViolation
        );
        assert_eq!(
            reason_in(
                Category::Network,
                Some("4.4.1"),
                "connect to x: Connection timed out",
                failed(None)
            ),
            Reason::Expired
        );
        // The same timeout in a delay notice is still a network error.
        assert_eq!(
            reason_in(
                Category::Network,
                Some("4.4.1"),
                "connect to x: Connection timed out",
                Context::default()
            ),
            Reason::NetworkError
        );
        assert_eq!(
            reason_in(
                Category::DomainNotFound,
                Some("5.1.2"),
                "No MX record found for domain=x.example",
                failed(None)
            ),
            Reason::NotAccept
        );
    }

    fn given(phase: Option<Phase>) -> Context {
        Context {
            failed: true,
            phase,
            explicit_status: true,
            local_program: false,
            provider: None,
        }
    }

    #[test]
    fn status_codes_mean_their_rfc_3463_reason() {
        for (code, want) in [
            ("5.1.1", Some(Reason::UserUnknown)),
            ("5.1.2", Some(Reason::HostUnknown)),
            ("5.2.1", Some(Reason::Filtered)),
            ("5.2.2", Some(Reason::MailboxFull)),
            ("5.2.3", Some(Reason::ExceedLimit)),
            ("5.3.1", Some(Reason::SystemFull)),
            ("5.3.2", Some(Reason::NotAccept)),
            ("5.3.4", Some(Reason::MesgTooBig)),
            ("4.4.1", Some(Reason::Expired)),
            ("5.4.4", Some(Reason::HostUnknown)),
            ("4.4.4", Some(Reason::NetworkError)),
            ("4.4.5", Some(Reason::SystemFull)),
            ("5.4.7", Some(Reason::Expired)),
            ("5.6.0", Some(Reason::ContentError)),
            ("4.7.1", Some(Reason::Blocked)),
            ("5.7.1", Some(Reason::SecurityError)),
            ("5.7.13", Some(Reason::Suspend)),
            ("5.7.26", Some(Reason::AuthFailure)),
            ("5.7.25", Some(Reason::RequirePtr)),
            ("5.7.27", Some(Reason::NotAccept)),
            ("5.0.0", None),
            ("5.5.0", None),
            ("nonsense", None),
        ] {
            assert_eq!(status_reason(code), want, "{code}");
        }
        // A code that names a cause decides when the wording does not.
        assert_eq!(
            reason_in(
                Category::Other,
                Some("5.3.2"),
                "521 System not ready",
                given(None)
            ),
            Reason::NotAccept
        );
        assert_eq!(
            reason_in(
                Category::Other,
                Some("5.0.0"),
                "503 Bad sequence",
                given(None)
            ),
            Reason::SyntaxError
        );
    }

    #[test]
    fn wording_names_the_reason_whatever_the_category() {
        // A mailbox over quota with a 5.1.1 code is full, not unknown.
        assert_eq!(
            reason_in(
                Category::InvalidRecipient,
                Some("5.1.1"),
                "552 sorry, mailbox a@b.example is over quota temporarily (#5.1.1)",
                given(None)
            ),
            Reason::MailboxFull
        );
        assert_eq!(
            reason_in(
                Category::Content,
                Some("5.6.0"),
                "554 5.6.0 This message has been scored as spam",
                given(Some(Phase::Data))
            ),
            Reason::SpamDetected
        );
        assert_eq!(
            reason_in(
                Category::Network,
                Some("5.0.0"),
                "500 Remote server does not support TLS",
                given(None)
            ),
            Reason::FailedStartTls
        );
        assert_eq!(
            reason_in(
                Category::Other,
                Some("5.0.0"),
                "553 sorry, that domain isn't in my list of allowed rcpthosts",
                given(None)
            ),
            Reason::NoRelaying
        );
        // A disabled account is suspended, whatever code it came with.
        assert_eq!(
            reason_in(
                Category::Policy,
                Some("5.7.13"),
                "525 5.7.13 Disabled recipient address",
                given(Some(Phase::Rcpt))
            ),
            Reason::Suspend
        );
        // A local delivery program's exit code.
        let local = Context {
            local_program: true,
            ..given(None)
        };
        assert_eq!(
            reason_in(Category::Other, Some("5.0.0"), "75", local),
            Reason::MailerError
        );
    }

    #[test]
    fn an_unknown_user_is_userunknown_or_filtered_by_the_command_and_the_code() {
        let unknown =
            |status, text, phase| reason_in(Category::InvalidRecipient, status, text, given(phase));
        // The code says the mailbox is bad: userunknown even after DATA.
        assert_eq!(
            unknown(Some("5.1.1"), "550 5.1.1 User unknown", Some(Phase::Data)),
            Reason::UserUnknown
        );
        assert_eq!(
            unknown(Some("5.0.0"), "550 User unknown", Some(Phase::Rcpt)),
            Reason::UserUnknown
        );
        assert_eq!(
            unknown(Some("5.0.0"), "550 User unknown", Some(Phase::Data)),
            Reason::Filtered
        );
        // x.2.1 (mailbox disabled) with no command: the mailbox refused this message.
        assert_eq!(
            unknown(Some("5.2.1"), "550 5.2.1 User unknown", None),
            Reason::Filtered
        );
        // No command known: a refusal that may have come after DATA, even when it quotes
        // the address (at KDDI au it would not be: see the provider tables' test).
        assert_eq!(
            unknown(Some("5.0.0"), "550 <a@b.example>: User unknown", None),
            Reason::Filtered
        );
        assert_eq!(
            unknown(Some("5.0.0"), "550 : User unknown", None),
            Reason::Filtered
        );
        // The receiving system's own directory lookup.
        assert_eq!(
            unknown(
                None,
                "The recipient name is not recognized",
                Some(Phase::Data)
            ),
            Reason::UserUnknown
        );
        // Unknown-user wording in another category counts too.
        assert_eq!(
            reason_in(
                Category::Other,
                Some("5.0.0"),
                "550 <a@b.example>... User not exist",
                given(Some(Phase::Rcpt))
            ),
            Reason::UserUnknown
        );
    }

    #[test]
    fn provider_tables_read_their_providers_replies() {
        let at = |provider, category, status, text, phase| {
            reason_in(
                category,
                status,
                text,
                Context {
                    provider,
                    ..given(phase)
                },
            )
        };
        let unknown = Category::InvalidRecipient;
        // KDDI au: the quoted address is a nonexistent one, the empty one a filter.
        for (provider, want) in [
            (Some(Provider::Kddi), Reason::UserUnknown),
            (None, Reason::Filtered),
        ] {
            assert_eq!(
                at(
                    provider,
                    unknown,
                    Some("5.0.0"),
                    "550 <a@au.example>: User unknown",
                    None
                ),
                want
            );
        }
        assert_eq!(
            at(
                Some(Provider::Kddi),
                unknown,
                Some("5.0.0"),
                "550 : User unknown",
                None
            ),
            Reason::Filtered
        );
        assert_eq!(
            at(
                Some(Provider::Kddi),
                Category::Other,
                Some("5.0.0"),
                "550 <a@b.example>: Recipient address rejected.",
                Some(Phase::Rcpt)
            ),
            Reason::UserUnknown
        );
        // NTT docomo: "Unknown user" at end of DATA refuses the sender.
        let docomo = "550 Unknown user a@b.example";
        assert_eq!(
            at(
                Some(Provider::NttDocomo),
                unknown,
                Some("5.0.0"),
                docomo,
                Some(Phase::Data)
            ),
            Reason::Rejected
        );
        assert_eq!(
            at(None, unknown, Some("5.0.0"), docomo, Some(Phase::Data)),
            Reason::Filtered
        );
        // MessageLabs and Hotmail answer for their directories.
        assert_eq!(
            at(
                Some(Provider::MessageLabs),
                unknown,
                Some("5.0.0"),
                "550 a@b.example... No such user",
                None
            ),
            Reason::UserUnknown
        );
        let hotmail = "550 Requested action not taken: mailbox unavailable";
        assert_eq!(
            at(Some(Provider::Microsoft), unknown, None, hotmail, None),
            Reason::UserUnknown
        );
        assert_eq!(at(None, unknown, None, hotmail, None), Reason::Filtered);
        // A provider's own code wins over the wording ("service refuse" is a block).
        assert_eq!(
            at(
                None,
                Category::RateLimited,
                Some("4.2.0"),
                "421 4.2.0 Service refuse. Please try later. OFR005_505 [505]",
                None
            ),
            Reason::SystemError
        );
    }

    #[test]
    fn more_wording_that_names_a_reason() {
        for (category, text, want) in [
            (
                Category::SpamBlock,
                "552-5.7.0 This message was blocked because its content presents a potential",
                Reason::PolicyViolation,
            ),
            (
                Category::RateLimited,
                "421 4.7.0 [TSS04] Messages from 192.0.2.1 temporarily deferred due to \
                 unexpected volume or user complaints",
                Reason::BadReputation,
            ),
            (
                Category::Other,
                "554 x.example : You've reached your daily relay quota - 192.0.2.1",
                Reason::Blocked,
            ),
            (
                Category::Other,
                "Your message was not delivered within 0 days and 1 hours.",
                Reason::Expired,
            ),
        ] {
            assert_eq!(reason_in(category, None, text, given(None)), want, "{text}");
        }
    }

    #[test]
    fn final_notices_expire_unless_the_network_is_named() {
        let failed = given(None);
        assert_eq!(
            reason_in(
                Category::Other,
                Some("5.0.0"),
                "Delivery failed 20 attempts: a@b.example",
                failed
            ),
            Reason::Expired
        );
        assert_eq!(
            reason_in(
                Category::Network,
                Some("4.4.1"),
                "Host name lookup failure; message could not be delivered for 8 hours",
                failed
            ),
            Reason::NetworkError
        );
        assert!(retried("failed 20 attempts") && !retried("several attempts"));
    }
}
