//! The `Feedback-ID` header of campaign mail: its value and how to read it back from a
//! returned copy.
//!
//! Gmail's feedback loop (Postmaster Tools) aggregates spam complaints per identifier of the
//! header `Feedback-ID: a:b:c:SenderId`: up to three optional identifiers and, right-most, a
//! mandatory sender id of 5 to 15 characters that stays the same across the mail stream; the
//! fields are read from the right, and the header only counts when the mail is DKIM-signed
//! after it was added, by a domain the sender verified. tern writes
//! `Feedback-ID: <campaign>:<variant>:<identity>:<sender_id>` (variant empty when the campaign
//! has none, identity the From domain), before the enqueue signs the message (the DKIM
//! default header list signs and over-signs `Feedback-ID`).
//!
//! Reports carry it back: an ARF complaint's returned message or headers, a DSN's returned
//! headers. [`find`] reads the campaign and variant from there. The value is not signed, so
//! what it names is only a claim: it must parse as tern writes it (exactly four fields, the
//! campaign and variant in the charsets and lengths campaign names and variant ids have, the
//! configured sender id), and the caller still checks that the campaign exists. So a hostile
//! report cannot make up label values of unbounded length or charset.
//!
//! Invariants: the search is linear in the message, looks only past the report's own header
//! section, at no more than [`MAX_CANDIDATES`] occurrences, and a value longer than
//! [`MAX_VALUE`] bytes is not read.

/// The header name, as written.
pub const HEADER: &str = "Feedback-ID";
/// Occurrences of the header name a returned message is searched for.
pub const MAX_CANDIDATES: usize = 8;
/// The longest value read (campaign 64 + variant 32 + identity 253 + sender id 15 + 3).
pub const MAX_VALUE: usize = 400;
/// Campaign names: 1 to 64 of these (as the campaign config takes them).
pub const CAMPAIGN_MAX: usize = 64;
/// Variant ids: 1 to 32 letters, digits or '_'.
pub const VARIANT_MAX: usize = 32;

/// What a `Feedback-ID` written by tern says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackId {
    pub campaign: String,
    pub variant: Option<String>,
}

/// Whether `s` is a campaign name as the config takes it.
pub fn is_campaign_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= CAMPAIGN_MAX
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// Whether `s` is a variant id as the config takes it.
pub fn is_variant_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= VARIANT_MAX
        && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Whether `s` is a sender id Gmail takes (5 to 15 characters) that needs no quoting.
pub fn is_sender_id(s: &str) -> bool {
    (5..=15).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The identity field: the domain of `from` (an address or a domain), lowercased, only
/// letters, digits, '.' and '-' (empty if nothing is left).
pub fn identity_of(from: &str) -> String {
    let domain = from.rsplit_once('@').map_or(from, |(_, d)| d);
    domain
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
        .take(253)
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The header line (with CRLF). `campaign` and `variant` are valid names (the campaign table
/// holds only those); `identity` goes through [`identity_of`].
pub fn header(campaign: &str, variant: Option<&str>, identity: &str, sender_id: &str) -> String {
    format!(
        "{HEADER}: {campaign}:{}:{}:{sender_id}\r\n",
        variant.unwrap_or(""),
        identity_of(identity)
    )
}

/// Parses one value as tern writes it for `sender_id`.
pub fn parse(value: &str, sender_id: &str) -> Option<FeedbackId> {
    if value.len() > MAX_VALUE {
        return None;
    }
    let fields: Vec<&str> = value.split(':').map(str::trim).collect();
    let [campaign, variant, identity, sender] = fields[..] else {
        return None;
    };
    let identity_ok = identity.len() <= 253
        && identity
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !sender.eq_ignore_ascii_case(sender_id)
        || !is_campaign_name(campaign)
        || !(variant.is_empty() || is_variant_id(variant))
        || !identity_ok
    {
        return None;
    }
    Some(FeedbackId {
        campaign: campaign.to_owned(),
        variant: (!variant.is_empty()).then(|| variant.to_owned()),
    })
}

/// The first `Feedback-ID` tern wrote (for `sender_id`) in the part of `message` after its
/// own header section: the copy an ARF report or a DSN returns (quoted copies with `> `
/// work too). A folded value is unfolded; one longer than [`MAX_VALUE`] is skipped.
pub fn find(message: &[u8], sender_id: &str) -> Option<FeedbackId> {
    let body = memchr::memmem::find(message, b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| memchr::memmem::find(message, b"\n\n").map(|i| i + 2))?;
    let lower = message[body..].to_ascii_lowercase();
    let name = b"feedback-id:";
    let mut seen = 0;
    for at in memchr::memmem::find_iter(&lower, name) {
        // At a line start, or after a quote marker.
        let line_start = lower[..at]
            .iter()
            .rev()
            .take_while(|&&b| b != b'\n')
            .all(|&b| b == b'>' || b == b' ');
        if !line_start {
            continue;
        }
        seen += 1;
        if seen > MAX_CANDIDATES {
            return None;
        }
        let rest = &message[body + at + name.len()..];
        let mut value = Vec::new();
        let mut lines = rest.split(|&b| b == b'\n');
        let mut first = true;
        for line in &mut lines {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if !first && !matches!(line.first(), Some(b' ' | b'\t')) {
                break;
            }
            first = false;
            // Unfolding removes the line break only (RFC 5322 2.2.3); fields are trimmed.
            value.extend_from_slice(line);
            if value.len() > MAX_VALUE {
                break;
            }
        }
        if let Some(id) = std::str::from_utf8(&value)
            .ok()
            .and_then(|v| parse(v, sender_id))
        {
            return Some(id);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "tern-test";

    #[test]
    fn what_is_written_is_read_back() {
        let line = header("spring-sale.v2", Some("b_1"), "News@Example.COM", SID);
        assert_eq!(
            line,
            "Feedback-ID: spring-sale.v2:b_1:example.com:tern-test\r\n"
        );
        let returned = format!("Subject: report\r\n\r\nFrom: x\r\n{line}\r\nbody\r\n");
        assert_eq!(
            find(returned.as_bytes(), SID),
            Some(FeedbackId {
                campaign: "spring-sale.v2".into(),
                variant: Some("b_1".into())
            })
        );
        let none = header("c", None, "example.com", SID);
        let returned = format!("X: y\n\n> {none}");
        assert_eq!(find(returned.as_bytes(), SID).unwrap().variant, None);
    }

    #[test]
    fn a_folded_value_is_unfolded() {
        let m = b"A: b\r\n\r\nFeedback-ID: camp:var:\r\n example.com:tern-test\r\nX: y\r\n";
        assert_eq!(find(m, SID).unwrap().campaign, "camp");
    }

    #[test]
    fn the_reports_own_header_and_other_senders_do_not_count() {
        // In the report's own header section only.
        let m = b"Feedback-ID: camp:a:example.com:tern-test\r\nX: y\r\n\r\nbody\r\n";
        assert_eq!(find(m, SID), None);
        // Another sender id (another ESP's stream).
        let m = b"X: y\r\n\r\nFeedback-ID: camp:a:example.com:other-esp\r\n";
        assert_eq!(find(m, SID), None);
        // Not at a line start.
        let m = b"X: y\r\n\r\nSee Feedback-ID: camp:a:example.com:tern-test\r\n";
        assert_eq!(find(m, SID), None);
    }

    #[test]
    fn hostile_values_are_refused() {
        let long = "c".repeat(CAMPAIGN_MAX + 1);
        let bad = [
            format!("{long}:a:example.com:{SID}"),
            format!("c:{}:example.com:{SID}", "v".repeat(VARIANT_MAX + 1)),
            format!("c\u{e9}:a:example.com:{SID}"),
            format!("c:a-b:example.com:{SID}"),
            format!("c:a:exa mple.com:{SID}"),
            format!("c:a:example.com:{SID}:extra"),
            format!("c:a:{SID}"),
            format!(":a:example.com:{SID}"),
            format!("c{{}}:a:example.com:{SID}"),
        ];
        for value in &bad {
            assert_eq!(parse(value, SID), None, "{value}");
            let m = format!("X: y\r\n\r\nFeedback-ID: {value}\r\n");
            assert_eq!(find(m.as_bytes(), SID), None, "{value}");
        }
        // A value past MAX_VALUE is not read even if its fields would be fine.
        let m = format!(
            "X: y\r\n\r\nFeedback-ID: c:a:{}:{SID}\r\n",
            "d".repeat(MAX_VALUE)
        );
        assert_eq!(find(m.as_bytes(), SID), None);
        // Only the first MAX_CANDIDATES occurrences are looked at.
        let mut m = String::from("X: y\r\n\r\n");
        for _ in 0..MAX_CANDIDATES {
            m.push_str("Feedback-ID: junk\r\n");
        }
        m.push_str(&header("c", Some("a"), "example.com", SID));
        assert_eq!(find(m.as_bytes(), SID), None);
    }

    #[test]
    fn sender_ids_are_as_gmail_takes_them() {
        assert!(is_sender_id("tern-mta"));
        assert!(!is_sender_id("tern"));
        assert!(!is_sender_id("a-sender-id-too-long"));
        assert!(!is_sender_id("tern:mta"));
    }
}
