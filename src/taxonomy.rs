//! The failure taxonomy (floor 1): [`Category`], why a message was not delivered, and the
//! [`Rule`] that maps an enhanced status and a diagnostic text onto one. Config compiles rule
//! files into these values; [`crate::bounce::classify`] applies them to parsed bounces and
//! live SMTP replies alike; shaping, suppression, events and the delivery log speak in
//! categories. Imports nothing of the crate.

use regex::Regex;
use serde::Serialize;
use std::fmt;
use std::str::FromStr;

/// Why a message was not delivered (or, for complaints and auto-replies, what came back).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    InvalidRecipient,
    MailboxFull,
    DomainNotFound,
    SpamBlock,
    Policy,
    Content,
    RateLimited,
    AuthFailure,
    MessageTooLarge,
    RelayDenied,
    Network,
    Expired,
    Complaint,
    AutoReply,
    Delivered,
    Other,
}

impl Category {
    pub const ALL: [Category; 16] = [
        Category::InvalidRecipient,
        Category::MailboxFull,
        Category::DomainNotFound,
        Category::SpamBlock,
        Category::Policy,
        Category::Content,
        Category::RateLimited,
        Category::AuthFailure,
        Category::MessageTooLarge,
        Category::RelayDenied,
        Category::Network,
        Category::Expired,
        Category::Complaint,
        Category::AutoReply,
        Category::Delivered,
        Category::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::InvalidRecipient => "invalid_recipient",
            Category::MailboxFull => "mailbox_full",
            Category::DomainNotFound => "domain_not_found",
            Category::SpamBlock => "spam_block",
            Category::Policy => "policy",
            Category::Content => "content",
            Category::RateLimited => "rate_limited",
            Category::AuthFailure => "auth_failure",
            Category::MessageTooLarge => "message_too_large",
            Category::RelayDenied => "relay_denied",
            Category::Network => "network",
            Category::Expired => "expired",
            Category::Complaint => "complaint",
            Category::AutoReply => "auto_reply",
            Category::Delivered => "delivered",
            Category::Other => "other",
        }
    }

    /// Whether the address should not be mailed again (see the module table).
    pub fn is_hard(self, status: Option<&str>) -> bool {
        match self {
            Category::InvalidRecipient | Category::DomainNotFound => {
                status.is_some_and(|s| s.starts_with('5'))
            }
            Category::Complaint => true,
            _ => false,
        }
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Category {
    type Err = String;
    fn from_str(s: &str) -> Result<Category, String> {
        Category::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Category::ALL.iter().map(|c| c.as_str()).collect();
                format!("unknown category {s:?} (one of {})", names.join(", "))
            })
    }
}

/// An enhanced status code pattern: up to three dot-separated components, each a number or
/// `x` (any); a shorter pattern matches as a prefix: `5.1.1`, `x.1.1`, `5.7`, `4`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusPattern(Vec<Option<u16>>);

impl FromStr for StatusPattern {
    type Err = String;
    fn from_str(s: &str) -> Result<StatusPattern, String> {
        let parts: Vec<&str> = s.split('.').collect();
        if parts.len() > 3 || parts.iter().any(|p| p.is_empty()) {
            return Err(format!(
                "invalid status pattern {s:?}: like \"5.1.1\", \"x.1.1\" or \"5.7\""
            ));
        }
        parts
            .iter()
            .map(|p| match *p {
                "x" | "X" => Ok(None),
                n if n.len() <= 3 && n.bytes().all(|b| b.is_ascii_digit()) => {
                    Ok(Some(n.parse().unwrap_or_default()))
                }
                _ => Err(format!(
                    "invalid status pattern {s:?}: components are numbers or x"
                )),
            })
            .collect::<Result<_, _>>()
            .map(StatusPattern)
    }
}

impl StatusPattern {
    pub fn matches(&self, status: &str) -> bool {
        let mut got = status.split('.');
        self.0.iter().all(|want| {
            let Some(part) = got.next().and_then(|p| p.parse::<u16>().ok()) else {
                return false;
            };
            want.is_none_or(|w| w == part)
        })
    }
}

/// One rule: every condition given must hold (status, and text or regex); at least one is
/// given (checked when the rule file is compiled).
#[derive(Debug, Clone)]
pub struct Rule {
    pub category: Category,
    /// The status must match one of these, if any are given.
    pub status: Vec<StatusPattern>,
    /// Lowercase substrings; the text must contain one of them, if any are given.
    pub text: Vec<String>,
    /// Case-insensitive; with `text` as well, either may match.
    pub regex: Option<Regex>,
}

impl Rule {
    pub fn matches(&self, status: Option<&str>, lower_text: &str) -> bool {
        if !self.status.is_empty() {
            let Some(status) = status else { return false };
            if !self.status.iter().any(|p| p.matches(status)) {
                return false;
            }
        }
        if self.text.is_empty() && self.regex.is_none() {
            return true;
        }
        self.text.iter().any(|t| lower_text.contains(t.as_str()))
            || self.regex.as_ref().is_some_and(|r| r.is_match(lower_text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_patterns() {
        let p: StatusPattern = "x.1.1".parse().unwrap();
        assert!(p.matches("5.1.1") && p.matches("4.1.1") && !p.matches("5.1.10"));
        let p: StatusPattern = "5.7".parse().unwrap();
        assert!(p.matches("5.7.26") && !p.matches("4.7.0"));
        assert!("5.1.1.1".parse::<StatusPattern>().is_err());
        assert!("5.a".parse::<StatusPattern>().is_err());
    }
}
