//! Relay access and per-message limits.
//!
//! Every decision is a [`Reply`] for the client, never an error: `Ok(())` means go on.
//! Relay is allowed for authenticated sessions and for clients inside a configured relay
//! network; everyone else gets 554 5.7.1 at RCPT time, before any data is read (the bounce
//! domains excepted: the session lets anyone mail them). A recipient on the suppression
//! list gets 550 5.7.1 in reject mode ([`suppressed`]). The refusals of the SMTP edge's own
//! limits are here too ([`too_much_in_flight`], [`bounce_rate_exceeded`]), so SMTP and the
//! tests speak one wording.

use crate::config::{Config, SuppressionMode};
use crate::events::{Event, Kind};
use crate::feedback::Feedback;
use crate::rfc5321::reply::Reply;
use crate::telemetry::SuppressedAction;
use ipnet::IpNet;
use std::net::IpAddr;

#[derive(Debug, Clone)]
pub struct Policy {
    relay_networks: Vec<IpNet>,
    pub max_recipients: usize,
    pub max_message_size: u64,
}

impl Policy {
    pub fn from_config(config: &Config) -> Policy {
        Policy {
            relay_networks: config.relay.networks.clone(),
            max_recipients: config.limits.max_recipients,
            max_message_size: config.limits.max_message_size,
        }
    }

    pub fn in_relay_network(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.relay_networks.iter().any(|net| net.contains(&client))
    }

    /// The SIZE declared on MAIL FROM (0 when absent).
    pub fn declared_size(&self, size: u64) -> Result<(), Reply> {
        if size > self.max_message_size {
            return Err(size_exceeded());
        }
        Ok(())
    }

    /// One more recipient for a transaction that already has `accepted` of them.
    pub fn recipient(
        &self,
        client: IpAddr,
        authenticated: bool,
        accepted: usize,
    ) -> Result<(), Reply> {
        if accepted >= self.max_recipients {
            return Err(Reply::new(452, "4.5.3", "Error: too many recipients"));
        }
        if !(authenticated || self.in_relay_network(client)) {
            return Err(Reply::new(554, "5.7.1", "Relay access denied"));
        }
        Ok(())
    }
}

/// In `suppression.mode = "reject"`: the refusal for a suppressed `address`, with a
/// `suppressed` event (emitted in the background; `source` is `smtp` or `http`). In drop
/// mode the enqueue drops the recipient instead, so this answers `None`.
pub fn suppressed(feedback: &Feedback, address: &str, source: &'static str) -> Option<Reply> {
    if feedback.suppressions.mode() != SuppressionMode::Reject {
        return None;
    }
    let entry = feedback.suppressions.check(address)?;
    feedback.metrics.suppressed(SuppressedAction::Reject);
    let mut event = Event::new(Kind::Suppressed, address, source);
    event.detail = Some(format!("rejected: suppressed ({})", entry.reason));
    feedback.events.emit_later(vec![event]);
    Some(Reply::new(550, "5.7.1", "Recipient suppressed"))
}

/// Like [`suppressed`], for mail of list `list` (one-click unsubscribe): an entry for all
/// mail or one for that list refuses it.
pub fn suppressed_for_list(
    feedback: &Feedback,
    address: &str,
    list: &str,
    source: &'static str,
) -> Option<Reply> {
    if feedback.suppressions.mode() != SuppressionMode::Reject {
        return None;
    }
    let entry = feedback.suppressions.check_scoped(address, list)?;
    feedback.metrics.suppressed(SuppressedAction::Reject);
    let mut event = Event::new(Kind::Suppressed, address, source);
    event.detail = Some(format!(
        "rejected: suppressed for list {list} ({})",
        entry.reason
    ));
    feedback.events.emit_later(vec![event]);
    Some(Reply::new(550, "5.7.1", "Recipient suppressed"))
}

/// The refusal of a header section over `limits.max_header_size`.
pub fn header_size_exceeded() -> Reply {
    Reply::new(552, "5.3.4", "Message header size exceeds fixed limit")
}

/// The refusal of a message with more `Received` headers than `limits.max_hops` (RFC 5321
/// 6.3: a loop).
pub fn too_many_hops() -> Reply {
    Reply::new(554, "5.4.6", "Too many hops: mail loop detected")
}

/// The refusal of DATA/BDAT while the bytes buffered by all sessions are at
/// `limits.max_inflight_bytes` (or of a message that would take them past it): the client
/// tries again later.
pub fn too_much_in_flight() -> Reply {
    Reply::new(
        452,
        "4.3.1",
        "Insufficient system resources: too much mail in transit, try again later",
    )
}

/// The refusal of one more message to the bounce domains from a client over
/// `limits.max_bounce_rate_per_ip`.
pub fn bounce_rate_exceeded() -> Reply {
    Reply::new(
        450,
        "4.7.1",
        "Too much mail to this domain from your address, try again later",
    )
}

/// The reply for a message over the size limit, declared or actual.
pub fn size_exceeded() -> Reply {
    Reply::new(
        552,
        "5.3.4",
        "Message size exceeds fixed maximum message size",
    )
}

/// IPv4-mapped IPv6 clients (dual-stack listeners) are matched as IPv4.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            relay_networks: vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()],
            max_recipients: 2,
            max_message_size: 1000,
        }
    }

    #[test]
    fn relay_networks_and_auth() {
        let p = policy();
        assert!(p.recipient("127.0.0.9".parse().unwrap(), false, 0).is_ok());
        assert!(p
            .recipient("::ffff:127.0.0.1".parse().unwrap(), false, 0)
            .is_ok());
        let denied = p
            .recipient("192.0.2.1".parse().unwrap(), false, 0)
            .unwrap_err();
        assert_eq!((denied.code, denied.status), (554, Some("5.7.1")));
        assert!(p.recipient("192.0.2.1".parse().unwrap(), true, 0).is_ok());
    }

    #[test]
    fn limits() {
        let p = policy();
        let r = p
            .recipient("127.0.0.1".parse().unwrap(), false, 2)
            .unwrap_err();
        assert_eq!((r.code, r.status), (452, Some("4.5.3")));
        assert!(p.declared_size(1000).is_ok());
        assert_eq!(p.declared_size(1001).unwrap_err().code, 552);
    }
}
