//! Envelope records: everything the MTA knows about a spooled message except
//! its body.
//!
//! Records are stored as JSON. Every field that is optional or was added after
//! the first version carries `#[serde(default)]`, so a newer tern reads old
//! records and new fields can be added without a migration. Unknown fields are
//! ignored for the same reason (an older tern reading newer records).
//!
//! One accepted message becomes one `Envelope` per destination domain (or per
//! recipient, when each has its own send time); all parts share `queue_id`, and
//! the first part has `id == queue_id`. Parts with the same content share one
//! stored body (`body_id`).

use serde::{Deserialize, Serialize};

use crate::id::MessageId;

/// Delivery state of one spooled message for one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: MessageId,
    /// Id reported to the client ("250 ... queued as"); shared by all parts.
    pub queue_id: MessageId,
    /// Reverse-path; "" is the null sender.
    pub sender: String,
    /// Lowercase recipient domain this envelope is for.
    pub destination: String,
    pub recipients: Vec<Recipient>,
    /// DSN ENVID, xtext-decoded.
    #[serde(default)]
    pub env_id: Option<String>,
    /// DSN RET.
    #[serde(default)]
    pub ret: Option<Ret>,
    #[serde(default)]
    pub body_type: BodyType,
    #[serde(default)]
    pub smtputf8: bool,
    /// Body length in bytes. The spool sets it from the body on commit and
    /// keeps it on update (the body is immutable), so it is always exact.
    pub size: u64,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms after which undelivered recipients expire.
    pub expires_ms: u64,
    /// Unix ms of the next delivery attempt; indexed by the spool.
    pub next_due_ms: u64,
    #[serde(default)]
    pub attempts: u32,
    pub source: Source,
    /// Held messages stay spooled but are not attempted.
    #[serde(default)]
    pub held: bool,
    /// A "delayed" DSN was sent for this envelope; at most one is.
    #[serde(default)]
    pub delay_notified: bool,
    /// `next_due_ms` was set by a destination suspension, not by the retry
    /// schedule: ending the suspension makes the message due at once. The
    /// settler clears it when it records an attempt.
    #[serde(default)]
    pub parked: bool,
    /// Source-IP pool chosen at ingest (control header or sender domain); `None`: the
    /// route's pool or the default one, decided when routing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Unix ms before which no attempt is made (0: none). Set at ingest by send-time
    /// optimisation; `next_due_ms` starts at it, and operator actions that make mail due
    /// "now" never move it earlier. Expiry still counts from `created_ms`.
    #[serde(default)]
    pub not_before_ms: u64,
    /// Where the body is stored when several parts of one message share it (the id of
    /// the part it was committed under); `None`: under this envelope's own id. The spool
    /// sets it at commit and keeps it on update; callers leave it `None`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_id: Option<MessageId>,
    /// The sidecar campaign this part was rendered for, and its variant: carried with the
    /// message so a delivery, a bounce or any event can be counted for them, and a paused
    /// campaign's held mail found again on resume.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<CampaignTag>,
    /// Send-time optimisation planned this part's send (whatever time it chose): its
    /// delivery or failure is reported to the send-time model, which records the send in
    /// the recipient's profile then. Other mail's deliveries never touch a profile.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub send_time_planned: bool,
}

/// A campaign and the variant a message was rendered as (`None`: the campaign has no
/// variants, or the message went out as submitted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignTag {
    pub campaign: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Envelope {
    /// The id the body is stored under.
    pub fn body_key_id(&self) -> MessageId {
        self.body_id.unwrap_or(self.id)
    }
}

/// One recipient of an envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: String,
    /// DSN ORCPT as given, e.g. "rfc822;x@y".
    #[serde(default)]
    pub orcpt: Option<String>,
    #[serde(default = "Notify::default_rfc3461")]
    pub notify: Notify,
    #[serde(default)]
    pub state: RecipientState,
    /// Last remote reply or local error text.
    #[serde(default)]
    pub last_reply: Option<String>,
    #[serde(default)]
    pub attempts: u32,
}

impl Recipient {
    /// A pending recipient without DSN parameters (RFC 3461 default NOTIFY).
    pub fn new(address: String) -> Self {
        Recipient {
            address,
            orcpt: None,
            notify: Notify::default_rfc3461(),
            state: RecipientState::Pending,
            last_reply: None,
            attempts: 0,
        }
    }
}

/// DSN NOTIFY flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notify {
    #[serde(default)]
    pub success: bool,
    #[serde(default)]
    pub failure: bool,
    #[serde(default)]
    pub delay: bool,
    #[serde(default)]
    pub never: bool,
}

impl Notify {
    /// What a recipient without a NOTIFY parameter gets (RFC 3461 §4.1 leaves
    /// it to the MTA; failure and delay is the common choice).
    pub fn default_rfc3461() -> Self {
        Notify {
            success: false,
            failure: true,
            delay: true,
            never: false,
        }
    }
}

/// DSN RET.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Ret {
    Full,
    Headers,
}

/// MAIL FROM BODY=.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BodyType {
    #[default]
    SevenBit,
    EightBitMime,
}

/// Per-recipient delivery state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RecipientState {
    #[default]
    Pending,
    Delivered,
    Bounced,
    Expired,
}

/// Where the message came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Source {
    pub client_ip: String,
    pub helo: String,
    #[serde(default)]
    pub auth_user: Option<String>,
    /// Received-header protocol, e.g. "ESMTPS".
    pub protocol: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_record_gets_defaults() {
        // What a first-version record (or a hand-written one) looks like:
        // only the required fields.
        let json = r#"{
            "id": "0006123ABCDEF012", "queue_id": "0006123ABCDEF012",
            "sender": "", "destination": "example.org",
            "recipients": [{"address": "a@example.org"}],
            "size": 10, "created_ms": 1, "expires_ms": 2, "next_due_ms": 3,
            "source": {"client_ip": "192.0.2.1", "helo": "h", "protocol": "ESMTP"},
            "field_from_the_future": 1
        }"#;
        let env: Envelope = serde_json::from_str(json).unwrap();
        assert_eq!(env.body_type, BodyType::SevenBit);
        assert!(!env.held && !env.smtputf8 && !env.parked);
        assert_eq!(env.ret, None);
        let rcpt = &env.recipients[0];
        assert_eq!(rcpt.notify, Notify::default_rfc3461());
        assert_eq!(rcpt.state, RecipientState::Pending);
        assert_eq!(rcpt.attempts, 0);
        // what the spool defaults to is what `Recipient::new` builds
        assert_eq!(*rcpt, Recipient::new("a@example.org".into()));
    }

    #[test]
    fn enums_use_stable_names() {
        assert_eq!(serde_json::to_string(&Ret::Headers).unwrap(), "\"headers\"");
        assert_eq!(
            serde_json::to_string(&BodyType::EightBitMime).unwrap(),
            "\"eight_bit_mime\""
        );
        assert_eq!(
            serde_json::to_string(&RecipientState::Expired).unwrap(),
            "\"expired\""
        );
    }
}
