//! Operator actions on one spooled message (hold, release, retry now, bounce, delete) and the
//! parking a destination suspension does, serialised with the recording of attempt outcomes.
//!
//! The race this module closes: an attempt reads its envelope when it starts and the settler
//! writes its outcome when it ends, possibly minutes later, while the operator may act on the
//! message in between. Every read-modify-write of a stored envelope, here and in the
//! settler's `apply`, runs under that message's lock ([`MessageLocks`]) and re-reads the
//! envelope under it. Hence:
//! - an attempt whose message was deleted or bounced meanwhile finds it gone: its delivery-log
//!   lines are written (they happened) but no DSN is sent and nothing is written back, so the
//!   message is neither resurrected nor bounced twice;
//! - a hold placed during an attempt survives the attempt's write;
//! - a message whose outcome was recorded first (delivered, say) is simply no longer there
//!   for the operator and is not counted as affected.
//!
//! Held and parked messages get [`NOT_DUE`] as their due time, which no due-index query
//! reaches: they cost nothing until released or unparked (no reloading loop).
//!
//! Hold semantics follow Postfix's hold queue: held mail is never attempted and never expires
//! while held (expiry is only judged after a failed attempt); once released it is due at once,
//! and a message past its lifetime then expires at its first temporary failure.

use super::dsn::Action;
use super::transition::{self, Report};
use super::Settler;
use crate::clock::now_ms;
use crate::maillog::{AttemptOutcome, AttemptRecord};
use crate::taxonomy::Category;
use std::hash::{Hash, Hasher};
use std::time::{Duration, UNIX_EPOCH};
use tern_queue::{Envelope, MessageId, RecipientState, SpoolError};
use tokio::sync::{Mutex, MutexGuard};
use tracing::info;

/// Due time of held and indefinitely parked messages: later than any due-index query.
pub const NOT_DUE: u64 = u64::MAX;

/// RFC 3463 has no code for "cancelled by the operator"; X.0.0 (other undefined status) is
/// the honest one, the diagnostic says what happened.
pub const OPERATOR_BOUNCE_STATUS: &str = "5.0.0";
pub const OPERATOR_BOUNCE_TEXT: &str = "bounced by the administrator";
const OPERATOR_DELETE_TEXT: &str = "deleted by the administrator";

/// Striped per-message locks: a fixed set of mutexes, a message maps to one by its id. Two
/// messages may share a stripe (they then wait for each other briefly); nobody holds two
/// stripes at once, so there is no deadlock.
pub struct MessageLocks {
    stripes: Box<[Mutex<()>]>,
}

const STRIPES: usize = 64;

impl Default for MessageLocks {
    fn default() -> Self {
        MessageLocks {
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
        }
    }
}

impl MessageLocks {
    pub async fn lock(&self, id: MessageId) -> MutexGuard<'_, ()> {
        let mut hasher = std::hash::DefaultHasher::new();
        id.hash(&mut hasher);
        self.stripes[hasher.finish() as usize % STRIPES]
            .lock()
            .await
    }
}

impl Settler {
    /// Holds the message: it stays spooled, is not attempted and does not expire. Returns
    /// whether it changed (false: gone, or held already).
    pub async fn hold(&self, id: MessageId) -> Result<bool, SpoolError> {
        self.modify(id, |env| {
            if env.held {
                return false;
            }
            env.held = true;
            env.parked = false;
            env.next_due_ms = NOT_DUE;
            true
        })
        .await
    }

    /// Releases a held message; it is due at once (not before its `not_before_ms`).
    pub async fn release(&self, id: MessageId) -> Result<bool, SpoolError> {
        let now = now_ms();
        self.modify(id, |env| {
            if !env.held {
                return false;
            }
            env.held = false;
            env.next_due_ms = now.max(env.not_before_ms);
            true
        })
        .await
    }

    /// Makes a deferred (or parked) message due now. Held mail stays held: release it.
    /// A message scheduled for later (`not_before_ms`) stays scheduled: "retry" is about
    /// failed attempts, and sending before the chosen time would defeat the schedule.
    pub async fn retry_now(&self, id: MessageId) -> Result<bool, SpoolError> {
        let now = now_ms();
        self.modify(id, |env| {
            let due = now.max(env.not_before_ms);
            if env.held || env.next_due_ms <= due {
                return false;
            }
            env.next_due_ms = due;
            env.parked = false;
            true
        })
        .await
    }

    /// Parks a message of a suspended destination until `until` ([`NOT_DUE`]: until
    /// resumed). Not an attempt: counters and expiry are untouched.
    pub async fn park(&self, id: MessageId, until: u64) -> Result<bool, SpoolError> {
        self.modify(id, |env| {
            if env.held || (env.parked && env.next_due_ms == until) {
                return false;
            }
            env.parked = true;
            env.next_due_ms = until;
            true
        })
        .await
    }

    /// Ends the parking of a message whose destination was resumed: due at once.
    pub async fn unpark(&self, id: MessageId) -> Result<bool, SpoolError> {
        let now = now_ms();
        self.modify(id, |env| {
            if !env.parked || env.held {
                return false;
            }
            env.parked = false;
            env.next_due_ms = now.max(env.not_before_ms);
            true
        })
        .await
    }

    /// Fails every pending recipient permanently ([`OPERATOR_BOUNCE_STATUS`]), sends the DSN
    /// (NOTIFY honoured, none for the null sender) and only then removes the message. Returns
    /// false if it is gone.
    pub async fn bounce(&self, id: MessageId) -> Result<bool, SpoolError> {
        let _guard = self.locks.lock(id).await;
        let Some(mut env) = self.spool.envelope(id)? else {
            return Ok(false);
        };
        let body = self.spool.body_of(&env)?.ok_or(SpoolError::NotFound(id))?;
        let reply = format!("{OPERATOR_BOUNCE_STATUS} {OPERATOR_BOUNCE_TEXT}");
        let mut reports = Vec::new();
        for (index, rcpt) in env.recipients.iter_mut().enumerate() {
            if rcpt.state != RecipientState::Pending {
                continue;
            }
            rcpt.state = RecipientState::Bounced;
            rcpt.last_reply = Some(reply.clone());
            reports.push(Report {
                index,
                action: Action::Failed,
                status: OPERATOR_BOUNCE_STATUS.to_string(),
                diagnostic: Some(OPERATOR_BOUNCE_TEXT.to_string()),
            });
        }
        for report in &reports {
            self.record_operator_action(&env, report.index, AttemptOutcome::Bounced, &reply);
        }
        let bounced = reports.len();
        // DSN first: a crash before the removal repeats the bounce, never loses it.
        let dsns = transition::dsns(&env, reports);
        self.send_dsns(&env, &body, None, &dsns).await?;
        self.spool.remove(id).await?;
        info!(%id, recipients = bounced, "bounced by the administrator");
        Ok(true)
    }

    /// Removes the message without a DSN; each pending recipient is logged as deleted.
    pub async fn delete(&self, id: MessageId) -> Result<bool, SpoolError> {
        let _guard = self.locks.lock(id).await;
        let Some(env) = self.spool.envelope(id)? else {
            return Ok(false);
        };
        for (index, rcpt) in env.recipients.iter().enumerate() {
            if rcpt.state == RecipientState::Pending {
                self.record_operator_action(
                    &env,
                    index,
                    AttemptOutcome::Deleted,
                    OPERATOR_DELETE_TEXT,
                );
            }
        }
        self.spool.remove(id).await?;
        info!(%id, "deleted by the administrator");
        Ok(true)
    }

    /// Reads, changes (if `change` says it did) and writes one envelope under its lock.
    async fn modify(
        &self,
        id: MessageId,
        change: impl FnOnce(&mut Envelope) -> bool,
    ) -> Result<bool, SpoolError> {
        let _guard = self.locks.lock(id).await;
        let Some(mut env) = self.spool.envelope(id)? else {
            return Ok(false);
        };
        if !change(&mut env) {
            return Ok(false);
        }
        self.spool.update(&env).await?;
        Ok(true)
    }

    /// A delivery-log line and a metric for an operator's action on one recipient.
    fn record_operator_action(
        &self,
        env: &Envelope,
        index: usize,
        outcome: AttemptOutcome,
        reply: &str,
    ) {
        let now = now_ms();
        let rcpt = &env.recipients[index];
        let label = self.metrics.label(&env.destination, Some(&env.destination));
        self.metrics.delivery(&label, outcome.into());
        self.log.record(&AttemptRecord {
            ts: UNIX_EPOCH + Duration::from_millis(now),
            id: env.id,
            queue_id: env.queue_id,
            recipient: &rcpt.address,
            sender: &env.sender,
            host: None,
            ip: None,
            source_ip: None,
            tls_version: None,
            tls_cipher: None,
            tls_policy: None,
            reply,
            outcome,
            attempt: rcpt.attempts,
            delay_s: now.saturating_sub(env.created_ms) as f64 / 1000.0,
            destination: &env.destination,
            // The receiver said nothing: an operator's bounce is no evidence about the address.
            category: (outcome == AttemptOutcome::Bounced).then_some(Category::Other),
            campaign: env.campaign.as_ref().map(|t| t.campaign.as_str()),
            variant: env.campaign.as_ref().and_then(|t| t.variant.as_deref()),
        });
    }
}
