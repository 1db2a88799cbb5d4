//! The state transition of one delivery attempt: from an envelope and the attempt's
//! per-recipient results to a [`Transition`], a plain value saying what should happen.
//!
//! This module owns the decisions: each recipient's new state, the next due time or the
//! message's removal, which recipients expire (status [`EXPIRED_STATUS`]), whether the one
//! delay notice is due, which DSNs go out with which recipients, what each result is logged
//! as and which bounces add a suppression entry. It does no I/O: no spool, no clock (`now` is
//! passed in), no metrics, no logging. The settler records the value (`Settler::record`) and
//! commits it (`Settler::commit`).
//!
//! Invariants (of the value returned):
//! - every recipient of the attempt is delivered, bounced, expired or still pending; one
//!   still pending has a due time from the retry schedule (`retry`), and no attempt is
//!   scheduled past expiry: a temporary failure at or after it expires the recipient;
//! - `done` exactly when no recipient of the envelope is pending any more;
//! - the delay notice is chosen at most once per message (`delay_notified`), never together
//!   with an expiry;
//! - no DSN for the null sender, and a DSN lists only recipients whose NOTIFY asks for its
//!   action ([`dsns`]); at most one DSN per action, most severe first.

use super::dsn::{self, Action};
use super::retry::{self, Deferral};
use crate::config::{DeliveryConfig, SuppressionConfig};
use crate::delivery::worker::{RcptOutcome, Verdict};
use crate::maillog::AttemptOutcome;
use crate::suppression::{self, Entry};
use crate::taxonomy::Category;
use tern_queue::{Envelope, RecipientState};

/// Enhanced status of a recipient that expired while still being retried (RFC 3463).
pub const EXPIRED_STATUS: &str = "4.4.7";

/// One recipient's result of the attempt, with the bounce category of its reply (`None` for
/// a delivery: there is nothing to classify).
#[derive(Debug, Clone, Copy)]
pub struct Classified<'a> {
    pub outcome: &'a RcptOutcome,
    pub category: Option<Category>,
}

/// What one attempt changes, for the settler to record and commit.
#[derive(Debug)]
pub struct Transition<'a> {
    /// The envelope as it is to be stored: attempt counters, recipient states and replies,
    /// next due time, `delay_notified`; no longer parked.
    pub envelope: Envelope,
    /// The time the transition was computed for (unix ms): log lines and suppression
    /// entries carry it.
    pub now: u64,
    /// One per result of the attempt, in the attempt's order.
    pub results: Vec<Settled<'a>>,
    /// The DSNs to queue, in order ([`dsns`]).
    pub dsns: Vec<Dsn>,
    /// No recipient is pending any more: the message is removed, not updated.
    pub done: bool,
}

/// One recipient's result as it is logged and published.
#[derive(Debug)]
pub struct Settled<'a> {
    /// Index in `Envelope::recipients`.
    pub index: usize,
    pub result: AttemptOutcome,
    pub status: &'a str,
    pub reply: &'a str,
    /// The bounce category for the log and the event: `None` for a delivery, `expired` for
    /// an expiry whatever the last reply said.
    pub category: Option<Category>,
    /// Set for a permanent failure.
    pub bounce: Option<Bounce>,
}

/// A permanent failure: whether it is hard, and the suppression entry it adds, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bounce {
    pub category: Category,
    pub hard: bool,
    pub suppress: Option<Entry>,
}

/// One recipient's line in a DSN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Index in `Envelope::recipients`.
    pub index: usize,
    pub action: Action,
    pub status: String,
    pub diagnostic: Option<String>,
}

/// One DSN to queue: its action and the recipients it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dsn {
    pub action: Action,
    pub reports: Vec<Report>,
}

/// Applies an attempt's results to `env` at `now` under the retry schedule (`delivery`) and
/// the suppression policy. The outcomes name distinct recipients; the caller skips an
/// attempt without any (nothing was tried).
pub fn settle<'a>(
    mut env: Envelope,
    outcomes: &[Classified<'a>],
    delivery: &DeliveryConfig,
    suppression: &SuppressionConfig,
    now: u64,
) -> Transition<'a> {
    env.attempts += 1;
    // This attempt's outcome decides the next due time, not a past suspension.
    env.parked = false;
    let mut reports = Vec::new();
    for &Classified { outcome, .. } in outcomes {
        let rcpt = &mut env.recipients[outcome.index];
        rcpt.attempts += 1;
        rcpt.last_reply = Some(outcome.reply.clone());
        let (state, action) = match outcome.verdict {
            Verdict::Delivered => (RecipientState::Delivered, Some(Action::Delivered)),
            Verdict::Permanent => (RecipientState::Bounced, Some(Action::Failed)),
            Verdict::Temporary => (RecipientState::Pending, None),
        };
        rcpt.state = state;
        if let Some(action) = action {
            reports.push(Report {
                index: outcome.index,
                action,
                status: outcome.status.clone(),
                diagnostic: Some(outcome.reply.clone()),
            });
        }
    }

    let pending: Vec<&RcptOutcome> = outcomes
        .iter()
        .map(|c| c.outcome)
        .filter(|o| o.verdict == Verdict::Temporary)
        .collect();
    if !pending.is_empty() {
        let expired = match retry::after_temporary_failure(&env, now, delivery) {
            Deferral::RetryAt(t) => {
                env.next_due_ms = t;
                false
            }
            Deferral::Expire => {
                for o in &pending {
                    env.recipients[o.index].state = RecipientState::Expired;
                    reports.push(Report {
                        index: o.index,
                        action: Action::Failed,
                        status: EXPIRED_STATUS.to_string(),
                        diagnostic: env.recipients[o.index].last_reply.clone(),
                    });
                }
                true
            }
        };
        if !expired && retry::delay_notice_due(&env, env.delay_notified, now, delivery) {
            env.delay_notified = true;
            for o in &pending {
                reports.push(Report {
                    index: o.index,
                    action: Action::Delayed,
                    status: o.status.clone(),
                    diagnostic: env.recipients[o.index].last_reply.clone(),
                });
            }
        }
    }

    let results = outcomes
        .iter()
        .map(|&Classified { outcome, category }| {
            let rcpt = &env.recipients[outcome.index];
            let result = match rcpt.state {
                RecipientState::Delivered => AttemptOutcome::Delivered,
                RecipientState::Bounced => AttemptOutcome::Bounced,
                RecipientState::Expired => AttemptOutcome::Expired,
                RecipientState::Pending => AttemptOutcome::Deferred,
            };
            let category = match result {
                AttemptOutcome::Expired => Some(Category::Expired),
                AttemptOutcome::Delivered => None,
                _ => category,
            };
            // A synchronous 5xx classified hard (e.g. 5.1.1 user unknown) suppresses the
            // address, as an asynchronous bounce would.
            let bounce = (result == AttemptOutcome::Bounced).then(|| {
                let category = category.unwrap_or(Category::Other);
                let hard = category.is_hard(Some(&outcome.status));
                let suppress = suppression::entry_for(
                    suppression,
                    &rcpt.address,
                    category,
                    hard,
                    true,
                    Some(env.queue_id.to_string()),
                    now,
                );
                Bounce {
                    category,
                    hard,
                    suppress,
                }
            });
            Settled {
                index: outcome.index,
                result,
                status: &outcome.status,
                reply: &outcome.reply,
                category,
                bounce,
            }
        })
        .collect();

    let done = env
        .recipients
        .iter()
        .all(|r| r.state != RecipientState::Pending);
    Transition {
        dsns: dsns(&env, reports),
        envelope: env,
        now,
        results,
        done,
    }
}

/// The DSNs `reports` call for: one per action, failed before delayed before delivered, each
/// with the reports of its action in their order. None for the null sender; a recipient
/// whose NOTIFY does not ask for its action is left out, and an action left without
/// recipients gets no DSN.
pub fn dsns(env: &Envelope, reports: Vec<Report>) -> Vec<Dsn> {
    if env.sender.is_empty() {
        return Vec::new();
    }
    let mut reports: Vec<Report> = reports
        .into_iter()
        .filter(|r| dsn::wanted(env, &env.recipients[r.index].address, r.action))
        .collect();
    let mut out = Vec::new();
    for action in [Action::Failed, Action::Delayed, Action::Delivered] {
        let (these, rest): (Vec<Report>, Vec<Report>) =
            reports.into_iter().partition(|r| r.action == action);
        reports = rest;
        if !these.is_empty() {
            out.push(Dsn {
                action,
                reports: these,
            });
        }
    }
    out
}
