//! What one mailbox provider's own reply codes and wording mean, for the reason: the
//! provider tables of docs/BOUNCES.md ("Provider tables").
//!
//! Two kinds of fact live here:
//!
//! - **codes that name their provider** (Orange's `OFR_506` / `LPN007_416`, Cox's
//!   `AUP#CDRBL`, Spectrum's `AUP#In-1310`): the code alone decides the reason, wherever the
//!   reply was quoted ([`coded`]);
//! - **replies that mean something else at one provider** than they would elsewhere (a
//!   KDDI au `550 <a@b>: User unknown` names the address, its `550 : User unknown` is the
//!   recipient's reception filter; NTT docomo refuses unwanted senders at end of DATA with
//!   "Unknown user"): these need to know which provider answered ([`Provider`], from the
//!   recipient's domain and the hosts the notice names, [`detect`]).
//!
//! Invariants: pure functions, bounded work (a fixed list of host suffixes matched against a
//! bounded text; one scan per code label).

use super::reason::Reason;

/// A provider whose replies [`super::reason::reason_in`] reads differently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// KDDI au (ezweb.ne.jp, au.com, auone-net.jp).
    Kddi,
    /// NTT docomo (docomo.ne.jp).
    NttDocomo,
    /// Broadcom's (Symantec) MessageLabs inbound filtering.
    MessageLabs,
    /// Microsoft's consumer mail (Hotmail / Outlook.com) and Exchange Online.
    Microsoft,
}

/// Host and domain suffixes of each provider's receiving systems.
const HOSTS: &[(Provider, &[&str])] = &[
    (Provider::Kddi, &["ezweb.ne.jp", "au.com", "auone-net.jp"]),
    (Provider::NttDocomo, &["docomo.ne.jp"]),
    (Provider::MessageLabs, &["messagelabs.com"]),
    (
        Provider::Microsoft,
        &[
            "hotmail.com",
            "outlook.com",
            "live.com",
            "msn.com",
            "onmicrosoft.com",
        ],
    ),
];

/// The provider of one host or domain name (`mfsmax.docomo.ne.jp`, `ezweb.ne.jp`), by
/// suffix at a label boundary (`notau.com` is nobody's).
pub fn of_host(host: &str) -> Option<Provider> {
    let host = host.trim().trim_end_matches('.').to_ascii_lowercase();
    HOSTS.iter().find_map(|(provider, suffixes)| {
        suffixes
            .iter()
            .any(|s| host == *s || host.strip_suffix(s).is_some_and(|rest| rest.ends_with('.')))
            .then_some(*provider)
    })
}

/// The provider that answered for `recipient`: its domain first, then the host names the
/// report gives for it (a DSN's Remote-MTA and Reporting-MTA), the first one that names a
/// provider, else `notice`: the provider of the hosts the notice's text names
/// ([`in_text`], read once per message).
pub fn detect<'a>(
    recipient: &str,
    hosts: impl IntoIterator<Item = &'a str>,
    notice: Option<Provider>,
) -> Option<Provider> {
    let domain = recipient.rsplit_once('@').map(|(_, d)| d);
    domain
        .and_then(of_host)
        .or_else(|| hosts.into_iter().find_map(of_host))
        .or(notice)
}

/// The provider of the first host name in `text` that has one (`host mx.example said:`,
/// `[mx.example]`, `server-1.messagelabs.com`): every token that looks like a domain name
/// is tried. `text` should be the notice, not the returned message. One pass.
pub fn in_text(text: &str) -> Option<Provider> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '.' || c == '-'))
        .map(|t| t.trim_matches('.'))
        .filter(|t| t.len() > 3 && t.contains('.') && t.bytes().any(|b| b.is_ascii_alphabetic()))
        .find_map(of_host)
}

/// The reason a provider's own code in `text` (lowercase) names: Orange / Wanadoo's
/// `OFRnnn_ccc` / `LPNnnn_ccc` / `OUK_ccc` codes, Cox's `AUP#CODE`, Spectrum's
/// `AUP#In-nnnn`. `None` when no such code is there or its meaning is no cause ("please try
/// later").
pub fn coded(text: &str) -> Option<Reason> {
    orange(text)
        .or_else(|| cox(text))
        .or_else(|| spectrum(text))
}

/// Orange (France Telecom) reply codes: the three digits after the label's underscore
/// (`OFR_506`, `OFR005_505`, `LPN007_416`, `LPN000_630`).
fn orange(text: &str) -> Option<Reason> {
    const LABELS: &[&str] = &["ofr", "lpn", "ouk"];
    let code = LABELS.iter().find_map(|label| {
        text.match_indices(label).find_map(|(at, _)| {
            // A label of its own: not the tail of a word ("golpn").
            if text[..at]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric())
            {
                return None;
            }
            let rest = &text[at + label.len()..];
            let rest = rest.trim_start_matches(|c: char| c.is_ascii_alphanumeric());
            let digits = rest.strip_prefix('_')?;
            let code = digits.get(..3)?;
            let end = digits[3..].chars().next();
            (code.bytes().all(|b| b.is_ascii_digit()) && !end.is_some_and(|c| c.is_ascii_digit()))
                .then_some(code)
        })
    })?;
    Some(match code {
        "101" | "102" | "103" | "510" | "999" => Reason::Blocked,
        "104" => Reason::TooManyConn,
        "305" | "402" => Reason::SecurityError,
        "401" | "517" => Reason::AuthFailure,
        "403" | "405" | "415" | "421" => Reason::Rejected,
        "416" => Reason::UserUnknown,
        "417" => Reason::MailboxFull,
        "420" | "426" => Reason::Suspend,
        "505" => Reason::SystemError,
        "506" => Reason::SpamDetected,
        "514" => Reason::MesgTooBig,
        "630" => Reason::PolicyViolation,
        // 105, 107-109, 201, 423, 424, 513: "please try later" / "mail rejected", no cause.
        _ => return None,
    })
}

/// Cox's `AUP#` codes (cox.com's error-code page): letters, then digits for the IP and URL
/// blocklist variants.
fn cox(text: &str) -> Option<Reason> {
    let at = text.find("aup#")?;
    let code: String = text[at + 4..]
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric())
        .collect();
    Some(match code.as_str() {
        "cxbl" | "cdrbl" => Reason::Blocked,
        c if c.starts_with("ipbl") => Reason::Blocked,
        c if c.starts_with("urlbl") => Reason::SpamDetected,
        "cxdns" => Reason::RequirePtr,
        "cxsndr" => Reason::AuthFailure,
        "cxsmtp" => Reason::Rejected,
        "cxcnct" | "cxmxrt" => Reason::TooManyConn,
        "cxthrt" | "cxmj" => Reason::SecurityError,
        _ => return None,
    })
}

/// Spectrum (Charter) `AUP#In-nnnn` / `AUP#Out-nnnn` codes, by range (spectrum.net's
/// "understanding email error codes").
fn spectrum(text: &str) -> Option<Reason> {
    let at = text.find("aup#")?;
    let rest = text[at + 4..].trim_start_matches(|c: char| c.is_ascii_alphabetic() || c == '-');
    let digits = rest.get(..4)?;
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u16 = digits.parse().ok()?;
    Some(match n {
        1000 | 1200..=1250 => Reason::Blocked,
        1010..=1080 | 1500 | 1520 => Reason::Rejected,
        1090 => Reason::SystemError,
        1100..=1150 => Reason::RequirePtr,
        1160..=1190 | 1560 => Reason::PolicyViolation,
        1260 => Reason::NetworkError,
        1300..=1340 => Reason::TooManyConn,
        1350..=1490 | 1540 | 1550 | 1580 => Reason::Speeding,
        1530 => Reason::MesgTooBig,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn providers_by_domain_or_host_at_a_label_boundary() {
        assert_eq!(of_host("mfsmax.docomo.ne.jp"), Some(Provider::NttDocomo));
        assert_eq!(of_host("EZweb.ne.jp."), Some(Provider::Kddi));
        assert_eq!(of_host("notau.com"), None);
        assert_eq!(
            detect(
                "bob@example.org",
                ["mx.example.org", "eu-1.messagelabs.com"],
                None
            ),
            Some(Provider::MessageLabs)
        );
        // The recipient's own domain first, the notice's hosts last.
        assert_eq!(
            detect(
                "bob@au.com",
                ["bay-1.hotmail.com"],
                Some(Provider::NttDocomo)
            ),
            Some(Provider::Kddi)
        );
        assert_eq!(
            detect(
                "bob@example.org",
                ["mx.example.org"],
                Some(Provider::NttDocomo)
            ),
            Some(Provider::NttDocomo)
        );
        assert_eq!(detect("bob@example.org", ["mx.example.org"], None), None);
        assert_eq!(
            in_text("<a@b.example>: host mfsmax.docomo.ne.jp[192.0.2.1] said:"),
            Some(Provider::NttDocomo)
        );
        assert_eq!(in_text("<a@b.example>: host mx.b.example said: 550"), None);
    }

    #[test]
    fn codes_that_name_their_provider() {
        assert_eq!(
            coded("421 4.2.0 service refuse. please try later. ofr005_505 [505]"),
            Some(Reason::SystemError)
        );
        assert_eq!(
            coded("554 5.7.1 <x[192.0.2.1]>: client host rejected: #216 lpn lpn000_630"),
            Some(Reason::PolicyViolation)
        );
        assert_eq!(
            coded("mail rejete. mail rejected. ofr_506 [506]"),
            Some(Reason::SpamDetected)
        );
        // "Please try later" codes name no cause; digits that run on are no code.
        assert_eq!(coded("service refused, please try later. lpn006_107"), None);
        assert_eq!(coded("ofr_5061"), None);
        assert_eq!(
            coded("550 5.1.0 <a@b.example> sender rejected. aup#cdrbl"),
            Some(Reason::Blocked)
        );
        assert_eq!(coded("refused. aup#in-1310"), Some(Reason::TooManyConn));
        assert_eq!(coded("refused. aup#out-1540"), Some(Reason::Speeding));
        assert_eq!(coded("550 5.1.1 user unknown"), None);
    }
}
