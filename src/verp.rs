//! VERP: envelope senders that name the message and recipient they were sent for, so an
//! asynchronous bounce maps back to both even when its body says nothing useful.
//!
//! Address form: `<local>+<token>+<rcpt local>=<rcpt domain>@<bounce domain>`, where the
//! token is lowercase base32 (no padding) of `id (8 bytes) || recipient index (2) || mac
//! (8)`, and mac is HMAC-SHA256 under the operator's key over `id || index || lowercase
//! recipient address`, truncated to 64 bits. The recipient address is carried in the local
//! part because the message (and its envelope) is usually gone from the spool by the time
//! a bounce arrives; the mac binds all three, so a forged or altered address is refused.
//! Everything is compared case-insensitively: some MTAs lowercase the addresses they bounce
//! to. Long recipient addresses make local parts beyond RFC 5321's 64 octets; common MTAs
//! accept them.

use aws_lc_rs::hmac;
use data_encoding::BASE32_NOPAD;
use std::fmt;
use tern_queue::MessageId;

const MAC_LEN: usize = 8;
const RAW_LEN: usize = 8 + 2 + MAC_LEN;

/// The signing key and the address parts of VERP senders.
#[derive(Clone)]
pub struct Verp {
    key: hmac::Key,
    local: String,
    domain: String,
}

impl fmt::Debug for Verp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Verp({}+...@{})", self.local, self.domain)
    }
}

/// What a valid VERP address says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerpTarget {
    /// The envelope (one destination part) the message was sent as.
    pub id: MessageId,
    /// The recipient's index in that envelope.
    pub index: u16,
    /// Lowercase.
    pub recipient: String,
}

impl Verp {
    /// `key` must have at least 16 bytes (checked by the daemon when it reads the key file).
    pub fn new(key: &[u8], local: &str, domain: &str) -> Verp {
        Verp {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
            local: local.to_ascii_lowercase(),
            domain: domain.to_ascii_lowercase(),
        }
    }

    /// The VERP sender for recipient `index` (`recipient`) of envelope `id`.
    pub fn sender(&self, id: MessageId, index: u16, recipient: &str) -> String {
        let recipient = recipient.to_lowercase();
        let mut raw = Vec::with_capacity(RAW_LEN);
        raw.extend_from_slice(&id_bytes(id));
        raw.extend_from_slice(&index.to_be_bytes());
        raw.extend_from_slice(&self.mac(&raw, &recipient));
        let token = BASE32_NOPAD.encode(&raw).to_ascii_lowercase();
        let carried = match recipient.rsplit_once('@') {
            Some((local, domain)) => format!("{local}={domain}"),
            None => recipient,
        };
        format!("{}+{token}+{carried}@{}", self.local, self.domain)
    }

    /// The target of a VERP address of ours; `None` for any other address and for a token
    /// whose mac does not verify (forged or altered).
    pub fn target(&self, address: &str) -> Option<VerpTarget> {
        let address = address.to_lowercase();
        let (local, domain) = address.rsplit_once('@')?;
        if domain != self.domain {
            return None;
        }
        let rest = local.strip_prefix(&self.local)?.strip_prefix('+')?;
        let (token, carried) = rest.split_once('+')?;
        let (rcpt_local, rcpt_domain) = carried.rsplit_once('=')?;
        let recipient = format!("{rcpt_local}@{rcpt_domain}");
        let raw = BASE32_NOPAD
            .decode(token.to_ascii_uppercase().as_bytes())
            .ok()?;
        if raw.len() != RAW_LEN {
            return None;
        }
        let (signed, mac) = raw.split_at(8 + 2);
        // Constant-time comparison of the truncated tag.
        let expected = self.mac(signed, &recipient);
        if aws_lc_rs::constant_time::verify_slices_are_equal(&expected, mac).is_err() {
            return None;
        }
        let id: MessageId = format!("{:016X}", u64::from_be_bytes(signed[..8].try_into().ok()?))
            .parse()
            .ok()?;
        let index = u16::from_be_bytes(signed[8..10].try_into().ok()?);
        Some(VerpTarget {
            id,
            index,
            recipient,
        })
    }

    /// Whether `address` is in our VERP form at all (valid or not): such addresses are only
    /// trusted when [`Verp::target`] verifies them.
    pub fn looks_like_verp(&self, address: &str) -> bool {
        let address = address.to_lowercase();
        address.rsplit_once('@').is_some_and(|(local, domain)| {
            domain == self.domain && local.starts_with(&format!("{}+", self.local))
        })
    }

    fn mac(&self, id_and_index: &[u8], recipient: &str) -> [u8; MAC_LEN] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(id_and_index);
        ctx.update(recipient.as_bytes());
        let tag = ctx.sign();
        let mut out = [0; MAC_LEN];
        out.copy_from_slice(&tag.as_ref()[..MAC_LEN]);
        out
    }
}

fn id_bytes(id: MessageId) -> [u8; 8] {
    // MessageId's text form is its 16 hex digits; that is its only public encoding.
    u64::from_str_radix(&id.to_string(), 16)
        .unwrap_or_default()
        .to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verp() -> Verp {
        Verp::new(b"0123456789abcdef0123", "bounces", "Bounce.Example.com")
    }

    #[test]
    fn round_trip_any_case() {
        let id: MessageId = "0006A1B2C3D4E5F6".parse().unwrap();
        let sender = verp().sender(id, 3, "Jane.Doe@Example.org");
        assert!(sender.starts_with("bounces+"), "{sender}");
        assert!(
            sender.ends_with("+jane.doe=example.org@bounce.example.com"),
            "{sender}"
        );
        let want = Some(VerpTarget {
            id,
            index: 3,
            recipient: "jane.doe@example.org".into(),
        });
        assert_eq!(verp().target(&sender), want);
        assert_eq!(verp().target(&sender.to_uppercase()), want);
    }

    #[test]
    fn forged_or_altered_tokens_are_refused() {
        let id: MessageId = "0006A1B2C3D4E5F6".parse().unwrap();
        let sender = verp().sender(id, 0, "a@example.org");
        // Another recipient under a genuine token.
        let other = sender.replace("+a=example.org@", "+b=example.org@");
        assert_eq!(verp().target(&other), None);
        // A flipped token character.
        let (head, tail) = sender.split_at(10);
        let flipped = format!(
            "{head}{}",
            tail.replacen(&tail[..1], if &tail[..1] == "a" { "b" } else { "a" }, 1)
        );
        assert_eq!(verp().target(&flipped), None);
        // The right shape under another key.
        let foreign = Verp::new(b"another key of 16+ bytes", "bounces", "bounce.example.com");
        assert_eq!(verp().target(&foreign.sender(id, 0, "a@example.org")), None);
        assert!(verp().looks_like_verp(&other));
        assert_eq!(verp().target("bounces@bounce.example.com"), None);
        assert_eq!(verp().target("bounces+zz+a=b@bounce.example.com"), None);
    }
}
