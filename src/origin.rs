//! Proof that a message came from this tern: the `X-Tern-Id` header the enqueue puts on every
//! part it commits. A bounce or complaint that returns the message (or only its headers)
//! carries it back, and [`Origin::tie`] checks that it names mail tern really sent, to the
//! recipient the report is about, within a window. Nothing is stored: the header is signed,
//! so the check needs only the key, and storage stays bounded whatever the volume.
//!
//! Value: lowercase base32 (no padding) of `version (1) || part id (8) || day (2) || n (1) ||
//! mac_1 .. mac_n`, where day is the number of days since 1970-01-01 (UTC) the part was
//! committed and mac_i is HMAC-SHA256 under the key over `id || day || lowercase recipient
//! address i`, truncated to 48 bits. At most [`MAX_BOUND`] recipients of a part are bound (a
//! bulk part usually has one; larger parts are tied by VERP). The macs bind id, day and
//! recipient together: a header copied from one recipient's mail cannot vouch for another
//! address, and an altered day or id does not verify.
//!
//! Invariants: a value that does not decode, names a day outside the window or carries no
//! mac for the recipient ties nothing; the search through a returned message is linear in
//! its size and looks at no more than [`MAX_CANDIDATES`] header occurrences.

use aws_lc_rs::hmac;
use data_encoding::BASE32_NOPAD;
use tern_queue::MessageId;

/// The header name, as written.
pub const HEADER: &str = "X-Tern-Id";
/// Recipients of one part that get a mac of their own.
pub const MAX_BOUND: usize = 16;
/// Occurrences of the header name a returned message is searched for.
pub const MAX_CANDIDATES: usize = 8;

const VERSION: u8 = 1;
const MAC_LEN: usize = 6;
const HEAD_LEN: usize = 1 + 8 + 2 + 1;
const DAY_MS: u64 = 86_400_000;

/// The signing key of `X-Tern-Id` values.
#[derive(Clone)]
pub struct Origin {
    key: hmac::Key,
}

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Origin(..)")
    }
}

impl Origin {
    /// `key` must have at least 16 bytes (the daemon checks the key file).
    pub fn new(key: &[u8]) -> Origin {
        Origin {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
    }

    /// The header line (with CRLF) for part `id`, committed at `now_ms`, to `recipients`.
    pub fn header<'a>(
        &self,
        id: MessageId,
        now_ms: u64,
        recipients: impl IntoIterator<Item = &'a str>,
    ) -> String {
        format!("{HEADER}: {}\r\n", self.value(id, now_ms, recipients))
    }

    /// The header value for part `id`, committed at `now_ms`, to `recipients` (the first
    /// [`MAX_BOUND`] are bound).
    pub fn value<'a>(
        &self,
        id: MessageId,
        now_ms: u64,
        recipients: impl IntoIterator<Item = &'a str>,
    ) -> String {
        let day = day_of(now_ms);
        let macs: Vec<[u8; MAC_LEN]> = recipients
            .into_iter()
            .take(MAX_BOUND)
            .map(|r| self.mac(id, day, r))
            .collect();
        let mut raw = Vec::with_capacity(HEAD_LEN + macs.len() * MAC_LEN);
        raw.push(VERSION);
        raw.extend_from_slice(&id_bytes(id));
        raw.extend_from_slice(&day.to_be_bytes());
        raw.push(macs.len() as u8);
        for mac in &macs {
            raw.extend_from_slice(mac);
        }
        BASE32_NOPAD.encode(&raw).to_ascii_lowercase()
    }

    /// The part a header value names, when it verifies for `recipient` and its day is at
    /// most `window_days` before `now_ms`'s (and not after it).
    pub fn verify(
        &self,
        value: &str,
        recipient: &str,
        now_ms: u64,
        window_days: u64,
    ) -> Option<MessageId> {
        let raw = BASE32_NOPAD
            .decode(value.trim().to_ascii_uppercase().as_bytes())
            .ok()?;
        if raw.len() < HEAD_LEN || raw[0] != VERSION {
            return None;
        }
        let id: MessageId = format!("{:016x}", u64::from_be_bytes(raw[1..9].try_into().ok()?))
            .parse()
            .ok()?;
        let day = u16::from_be_bytes(raw[9..11].try_into().ok()?);
        let n = raw[11] as usize;
        if raw.len() != HEAD_LEN + n * MAC_LEN {
            return None;
        }
        let today = day_of(now_ms);
        if day > today || u64::from(today - day) > window_days {
            return None;
        }
        let want = self.mac(id, day, recipient);
        raw[HEAD_LEN..]
            .chunks_exact(MAC_LEN)
            .any(|mac| aws_lc_rs::constant_time::verify_slices_are_equal(mac, &want).is_ok())
            .then_some(id)
    }

    /// Searches a returned message (a DSN with the original headers, an ARF report with the
    /// original message, a bounce quoting it) for an `X-Tern-Id` that ties `recipient` to mail
    /// tern sent within `window_days`; returns the part it names.
    pub fn tie(
        &self,
        message: &[u8],
        recipient: &str,
        now_ms: u64,
        window_days: u64,
    ) -> Option<MessageId> {
        candidates(message)
            .into_iter()
            .find_map(|value| self.verify(value, recipient, now_ms, window_days))
    }

    fn mac(&self, id: MessageId, day: u16, recipient: &str) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(&id_bytes(id));
        ctx.update(&day.to_be_bytes());
        ctx.update(recipient.to_lowercase().as_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }
}

/// MessageId's text form is its 16 hex digits; that is its only public encoding.
fn id_bytes(id: MessageId) -> [u8; 8] {
    u64::from_str_radix(&id.to_string(), 16)
        .unwrap_or_default()
        .to_be_bytes()
}

fn day_of(ms: u64) -> u16 {
    u16::try_from(ms / DAY_MS).unwrap_or(u16::MAX)
}

/// The values after each `X-Tern-Id:` (any case, at most [`MAX_CANDIDATES`]): the run of
/// base32 characters that follows, on the same line (quoted copies may be prefixed by `> `;
/// the value itself is never folded).
fn candidates(message: &[u8]) -> Vec<&str> {
    let finder = memchr::memmem::Finder::new(b"-tern-id:");
    let mut out = Vec::new();
    let lower: Vec<u8> = message.to_ascii_lowercase();
    for at in finder.find_iter(&lower) {
        if out.len() == MAX_CANDIDATES {
            break;
        }
        // "x" before the match, and a line start (or a quote marker) before that.
        if at == 0 || lower[at - 1] != b'x' {
            continue;
        }
        let start = at + "-tern-id:".len();
        let rest = &message[start..];
        let rest = &rest[rest
            .iter()
            .take_while(|b| **b == b' ' || **b == b'\t')
            .count()..];
        let len = rest
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        if let Ok(value) = std::str::from_utf8(&rest[..len]) {
            if !value.is_empty() {
                out.push(value);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_796_000_000_000;

    fn origin() -> Origin {
        Origin::new(b"0123456789abcdef0123456789abcdef")
    }

    #[test]
    fn a_value_ties_each_bound_recipient_and_no_other() {
        let o = origin();
        let id: MessageId = "0123456789abcdef".parse().unwrap();
        let v = o.value(id, NOW, ["a@x.test", "B@y.test"]);
        assert_eq!(o.verify(&v, "a@x.test", NOW, 30), Some(id));
        assert_eq!(o.verify(&v, "b@Y.TEST", NOW, 30), Some(id));
        assert_eq!(o.verify(&v, "c@x.test", NOW, 30), None);
        assert_eq!(
            o.verify(&v.to_ascii_uppercase(), "a@x.test", NOW, 30),
            Some(id)
        );
    }

    #[test]
    fn another_key_an_altered_value_or_an_old_day_ties_nothing() {
        let o = origin();
        let id: MessageId = "000000000000002a".parse().unwrap();
        let v = o.value(id, NOW, ["a@x.test"]);
        assert_eq!(
            Origin::new(b"another key of at least 16 bytes").verify(&v, "a@x.test", NOW, 30),
            None
        );
        // Flip one character of the id part.
        let mut altered = v.clone().into_bytes();
        altered[3] = if altered[3] == b'a' { b'b' } else { b'a' };
        assert_eq!(
            o.verify(std::str::from_utf8(&altered).unwrap(), "a@x.test", NOW, 30),
            None
        );
        assert_eq!(o.verify(&v, "a@x.test", NOW + 30 * DAY_MS, 30), Some(id));
        assert_eq!(o.verify(&v, "a@x.test", NOW + 31 * DAY_MS, 30), None);
        // From the future (a clock far behind, or a made-up day).
        assert_eq!(o.verify(&v, "a@x.test", NOW - DAY_MS, 30), None);
        assert_eq!(o.verify("", "a@x.test", NOW, 30), None);
        assert_eq!(o.verify("!!!", "a@x.test", NOW, 30), None);
    }

    #[test]
    fn only_the_first_sixteen_recipients_are_bound() {
        let o = origin();
        let rcpts: Vec<String> = (0..20).map(|i| format!("r{i}@x.test")).collect();
        let v = o.value(
            "0000000000000007".parse().unwrap(),
            NOW,
            rcpts.iter().map(String::as_str),
        );
        assert!(o.verify(&v, "r15@x.test", NOW, 30).is_some());
        assert!(o.verify(&v, "r16@x.test", NOW, 30).is_none());
    }

    #[test]
    fn a_returned_message_is_searched_for_the_header() {
        let o = origin();
        let id: MessageId = "0000000000000063".parse().unwrap();
        let header = o.header(id, NOW, ["user@sink.test"]);
        let dsn = format!(
            "From: MAILER-DAEMON@sink.test\r\nContent-Type: multipart/report; boundary=b\r\n\r\n\
             --b\r\nContent-Type: text/rfc822-headers\r\n\r\n{header}Subject: hi\r\n\r\n--b--\r\n"
        );
        assert_eq!(o.tie(dsn.as_bytes(), "user@sink.test", NOW, 30), Some(id));
        assert_eq!(o.tie(dsn.as_bytes(), "victim@sink.test", NOW, 30), None);
        let quoted = format!("> {}", header.to_ascii_lowercase());
        assert_eq!(
            o.tie(quoted.as_bytes(), "user@sink.test", NOW, 30),
            Some(id)
        );
        assert_eq!(o.tie(b"no header here", "user@sink.test", NOW, 30), None);
    }
}
