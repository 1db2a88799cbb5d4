//! Mailbox syntax for addresses no SMTP parser has seen (HTTP injection, addresses named in
//! bounce and complaint reports):
//! RFC 5321 4.1.2 `Local-part "@" ( Domain / address-literal )`, with RFC 6531's UTF-8
//! allowed in atoms and domain labels, and the RFC 5321 4.5.3.1 length limits.
//!
//! Invariant: an address this accepts can be written in `MAIL FROM:<...>` / `RCPT TO:<...>`
//! as it is (no space, control character, angle bracket or unbalanced quote).

use std::net::{Ipv4Addr, Ipv6Addr};

/// Checks `address`; the error says what is wrong, for a 400 that names the field.
pub fn check_mailbox(address: &str) -> Result<(), &'static str> {
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Err("must be local-part@domain");
    };
    if local.is_empty() {
        return Err("empty local part");
    }
    if local.len() > 64 {
        return Err("local part longer than 64 octets");
    }
    if address.len() > 254 {
        return Err("longer than 254 octets");
    }
    if !(dot_string(local) || quoted_string(local)) {
        return Err("invalid local part");
    }
    if !(domain_name(domain) || address_literal(domain)) {
        return Err("invalid domain");
    }
    Ok(())
}

fn atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

fn dot_string(s: &str) -> bool {
    s.split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(atext))
}

fn quoted_string(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('"').and_then(|rest| rest.strip_suffix('"')) else {
        return false;
    };
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(' '..='~') => {}
                _ => return false,
            },
            '"' => return false,
            ' '..='~' => {}
            c if !c.is_ascii() => {}
            _ => return false,
        }
    }
    true
}

fn domain_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
        })
}

fn address_literal(s: &str) -> bool {
    let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) else {
        return false;
    };
    match inner.strip_prefix("IPv6:") {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok(),
        None => inner.parse::<Ipv4Addr>().is_ok(),
    }
}

#[cfg(test)]
mod tests {
    use super::check_mailbox;

    #[test]
    fn accepts_rfc5321_mailboxes() {
        for ok in [
            "a@b.test",
            "first.last+tag@sub.example.com",
            "\"with space\"@example.com",
            "\"q\\\"uote\"@example.com",
            "user@[192.0.2.1]",
            "user@[IPv6:2001:db8::1]",
            "jöran@bücher.test",
            "x@localhost",
        ] {
            assert_eq!(check_mailbox(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn refuses_what_would_break_an_smtp_command() {
        for bad in [
            "",
            "no-at-sign",
            "@b.test",
            "a@",
            "a b@c.test",
            "a@b c.test",
            "<a@b.test>",
            "a..b@c.test",
            ".a@c.test",
            "a@-b.test",
            "a@b..test",
            "a@[300.1.1.1]",
            "\"unterminated@c.test",
            "a\r\n@c.test",
            "a@c.test\r\nRCPT TO:<x@y>",
        ] {
            assert!(check_mailbox(bad).is_err(), "{bad:?}");
        }
        assert!(check_mailbox(&format!("{}@b.test", "a".repeat(65))).is_err());
    }
}
