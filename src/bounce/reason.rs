//! The bounce reason in the field's shared vocabulary (sisimai's reason names: `userunknown`,
//! `mailboxfull`, `blocked`, ...), next to tern's own [`Category`], so that tern's output can
//! be compared with other parsers' and read by tools that speak those names.
//!
//! The reason is derived from the category, never the other way round: each category has one
//! default reason, and a few phrases or status codes within it name a finer one (a disabled
//! account is `suspend`, not `userunknown`; a sender refused at MAIL FROM is `rejected`, not
//! `policyviolation`). So the reason never contradicts the category, and operator rules that
//! move a reply to another category move its reason too. The table is in docs/BOUNCES.md
//! ("Reasons"); this file is its implementation.
//!
//! Invariant: a pure function of (category, status, diagnostic); bounded work (the text is
//! cut to [`MAX_TEXT`] bytes and matched against fixed phrase lists).

use serde::Serialize;

use super::classify::truncate;
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
        &["x.3", "x.0.0"],
        &[
            "system error",
            "internal error",
            "server error",
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
}

/// Lowercase phrases of a final notice about a message that was retried until it gave up.
const GAVE_UP: &[&str] = &[
    "retry timeout exceeded",
    "failing for a long time",
    "will be retried",
    "could not be delivered for",
    "cannot send message for",
    "too long in the queue",
    "giving up",
    "delivery time expired",
    "message expired",
];

/// Lowercase phrases of a timeout: in a final notice, retries that ran out of time.
const TIMED_OUT: &[&str] = &["timed out", "timeout"];

/// The reason with what the report says around the diagnostic (see [`Context`]): before the
/// refinements of [`reason`], an unknown or refusing recipient at DATA is `filtered` (the
/// address was accepted, the recipient's filter refused the message, as sisimai counts it);
/// a permanent refusal at MAIL FROM is `rejected`; a final notice whose error was a
/// temporary one (a 4.x.x status, a timeout) and any notice that says retries were given up
/// is `expired`.
pub fn reason_in(
    category: Category,
    status: Option<&str>,
    diagnostic: &str,
    context: Context,
) -> Reason {
    let text = truncate(diagnostic, MAX_TEXT).to_ascii_lowercase();
    match (category, context.phase) {
        (Category::InvalidRecipient, Some(Phase::Data)) => return Reason::Filtered,
        // Unless the text names a finer cause (a PTR record, a security requirement).
        (Category::InvalidRecipient | Category::Policy, Some(Phase::Mail))
            if !status.is_some_and(|s| s.starts_with('4')) =>
        {
            let refined = reason(category, status, diagnostic);
            return if refined == default_for(category) {
                Reason::Rejected
            } else {
                refined
            };
        }
        _ => {}
    }
    let temporary = status.is_some_and(|s| s.starts_with('4'));
    let gave_up = GAVE_UP.iter().any(|p| text.contains(p));
    let timed_out = TIMED_OUT.iter().any(|p| text.contains(p));
    if matches!(
        category,
        Category::Network | Category::Other | Category::Expired
    ) && ((context.failed && (temporary || timed_out)) || gave_up)
    {
        return Reason::Expired;
    }
    reason(category, status, diagnostic)
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
}
