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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tern_queue::{BodyType, Notify, Recipient, Ret, Source};

    const MIN: u64 = 60_000;
    const HOUR: u64 = 60 * MIN;

    /// An envelope created at 0 that expires after five days, with these recipients.
    fn envelope(sender: &str, recipients: &[&str]) -> Envelope {
        Envelope {
            id: "0006123ABCDEF012".parse().unwrap(),
            queue_id: "0006123ABCDEF012".parse().unwrap(),
            sender: sender.into(),
            destination: "example.net".into(),
            recipients: recipients
                .iter()
                .map(|a| Recipient::new((*a).into()))
                .collect(),
            env_id: None,
            ret: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            size: 1,
            created_ms: 0,
            expires_ms: 120 * HOUR,
            next_due_ms: 0,
            attempts: 0,
            source: Source {
                client_ip: "192.0.2.1".into(),
                helo: "h".into(),
                auth_user: None,
                protocol: "ESMTP".into(),
            },
            held: false,
            delay_notified: false,
            parked: false,
            pool: None,
            not_before_ms: 0,
            body_id: None,
            campaign: None,
            send_time_planned: false,
        }
    }

    fn outcome(index: usize, verdict: Verdict, status: &str, reply: &str) -> RcptOutcome {
        RcptOutcome {
            index,
            verdict,
            status: status.into(),
            reply: reply.into(),
            // What the worker's classification gives these replies (see `classified`).
            category: match status {
                "4.2.2" => Category::MailboxFull,
                "5.1.1" => Category::InvalidRecipient,
                _ => Category::Other,
            },
        }
    }

    fn delivered(index: usize) -> RcptOutcome {
        outcome(index, Verdict::Delivered, "2.0.0", "250 2.0.0 ok")
    }

    fn deferred(index: usize) -> RcptOutcome {
        outcome(index, Verdict::Temporary, "4.2.2", "452 4.2.2 mailbox full")
    }

    fn unknown_user(index: usize) -> RcptOutcome {
        outcome(index, Verdict::Permanent, "5.1.1", "550 5.1.1 no such user")
    }

    /// Classifies as the settler does for these replies: delivered none, 4.2.2 mailbox full,
    /// 5.1.1 invalid recipient, anything else other.
    fn classified(outcomes: &[RcptOutcome]) -> Vec<Classified<'_>> {
        outcomes
            .iter()
            .map(|outcome| Classified {
                outcome,
                category: match outcome.status.as_str() {
                    "2.0.0" => None,
                    "4.2.2" => Some(Category::MailboxFull),
                    "5.1.1" => Some(Category::InvalidRecipient),
                    _ => Some(Category::Other),
                },
            })
            .collect()
    }

    fn run<'a>(env: Envelope, outcomes: &'a [RcptOutcome], now: u64) -> Transition<'a> {
        settle(
            env,
            &classified(outcomes),
            &DeliveryConfig::default(),
            &SuppressionConfig::default(),
            now,
        )
    }

    fn states(t: &Transition<'_>) -> Vec<RecipientState> {
        t.envelope.recipients.iter().map(|r| r.state).collect()
    }

    fn results(t: &Transition<'_>) -> Vec<AttemptOutcome> {
        t.results.iter().map(|r| r.result).collect()
    }

    /// Each DSN as its action and the indices of the recipients it reports.
    fn dsn_set(t: &Transition<'_>) -> Vec<(Action, Vec<usize>)> {
        t.dsns
            .iter()
            .map(|d| (d.action, d.reports.iter().map(|r| r.index).collect()))
            .collect()
    }

    #[test]
    fn temporary_failure_retries_at_the_schedules_next_step() {
        let cfg = DeliveryConfig::default();
        let outcomes = [deferred(0)];
        let mut env = envelope("s@example.org", &["r@example.net"]);
        env.parked = true;
        let t = run(env, &outcomes, 10 * MIN);
        // First failure: retry_initial (5 minutes) later.
        assert_eq!(t.envelope.next_due_ms, 10 * MIN + 5 * MIN);
        assert_eq!(t.envelope.attempts, 1);
        assert!(!t.envelope.parked, "the attempt ends a past parking");
        assert_eq!(states(&t), [RecipientState::Pending]);
        assert_eq!(results(&t), [AttemptOutcome::Deferred]);
        assert_eq!(t.results[0].category, Some(Category::MailboxFull));
        assert!(t.results[0].bounce.is_none(), "a deferral never suppresses");
        let rcpt = &t.envelope.recipients[0];
        assert_eq!(rcpt.attempts, 1);
        assert_eq!(rcpt.last_reply.as_deref(), Some("452 4.2.2 mailbox full"));
        assert!(t.dsns.is_empty());
        assert!(!t.done);

        // Fourth failure: the schedule's fourth step, retry_delay(4) = 40 minutes.
        let mut env = t.envelope;
        env.attempts = 3;
        let t = run(env, &outcomes, 100 * MIN);
        assert_eq!(
            t.envelope.next_due_ms,
            100 * MIN + retry::retry_delay(4, &cfg).as_millis() as u64
        );
        assert_eq!(t.envelope.next_due_ms, 140 * MIN);
        assert_eq!(t.envelope.recipients[0].attempts, 2);
    }

    #[test]
    fn temporary_failure_past_expiry_expires_with_4_4_7_and_a_failed_dsn() {
        let outcomes = [deferred(0)];
        let env = envelope("s@example.org", &["r@example.net"]);
        let expires = env.expires_ms;
        let due_before = env.next_due_ms;
        // Long past the delay-notice delay too: an expiry is not also a delay notice.
        let t = run(env, &outcomes, expires);
        assert_eq!(states(&t), [RecipientState::Expired]);
        assert_eq!(results(&t), [AttemptOutcome::Expired]);
        assert_eq!(t.results[0].category, Some(Category::Expired));
        assert_eq!(t.envelope.next_due_ms, due_before, "no retry scheduled");
        assert!(!t.envelope.delay_notified);
        assert!(t.done);
        assert_eq!(
            t.dsns,
            [Dsn {
                action: Action::Failed,
                reports: vec![Report {
                    index: 0,
                    action: Action::Failed,
                    status: EXPIRED_STATUS.into(),
                    diagnostic: Some("452 4.2.2 mailbox full".into()),
                }],
            }]
        );
        assert_eq!(EXPIRED_STATUS, "4.4.7");

        let bounce = envelope("", &["r@example.net"]);
        let t = run(bounce, &outcomes, expires + 1);
        assert_eq!(states(&t), [RecipientState::Expired]);
        assert!(t.done);
        assert!(t.dsns.is_empty(), "no DSN for the null sender");
    }

    #[test]
    fn delay_notice_is_chosen_once_after_the_configured_delay() {
        let cfg = DeliveryConfig {
            delay_notice_after: Some(Duration::from_secs(4 * 3600)),
            ..DeliveryConfig::default()
        };
        let go = |env: Envelope, outcomes: &[RcptOutcome], now: u64| {
            let t = settle(
                env,
                &classified(outcomes),
                &cfg,
                &SuppressionConfig::default(),
                now,
            );
            let notified = t.envelope.delay_notified;
            (t.envelope, t.dsns, notified)
        };
        let outcomes = [deferred(0), delivered(1)];
        let env = envelope("s@example.org", &["late@example.net", "ok@example.net"]);

        let (_, dsns, notified) = go(env.clone(), &outcomes, 4 * HOUR - 1);
        assert!(dsns.is_empty() && !notified, "not before the delay");

        let (env, dsns, notified) = go(env, &outcomes, 4 * HOUR);
        assert!(notified);
        assert_eq!(
            dsns,
            [Dsn {
                action: Action::Delayed,
                reports: vec![Report {
                    index: 0,
                    action: Action::Delayed,
                    status: "4.2.2".into(),
                    diagnostic: Some("452 4.2.2 mailbox full".into()),
                }],
            }],
            "only the deferred recipient is reported"
        );

        let (_, dsns, notified) = go(env, &[deferred(0)], 6 * HOUR);
        assert!(notified);
        assert!(dsns.is_empty(), "one delay notice per message");
    }

    #[test]
    fn permanent_failure_gives_a_failed_dsn_with_the_bounced_recipients() {
        let outcomes = [unknown_user(0), unknown_user(2)];
        let env = envelope(
            "s@example.org",
            &["a@example.net", "b@example.net", "c@example.net"],
        );
        let t = run(env, &outcomes, 5 * MIN);
        assert_eq!(
            states(&t),
            [
                RecipientState::Bounced,
                RecipientState::Pending, // not part of this attempt
                RecipientState::Bounced
            ]
        );
        assert_eq!(results(&t), [AttemptOutcome::Bounced; 2]);
        assert_eq!(dsn_set(&t), [(Action::Failed, vec![0, 2])]);
        let report = &t.dsns[0].reports[1];
        assert_eq!(report.status, "5.1.1");
        assert_eq!(report.diagnostic.as_deref(), Some("550 5.1.1 no such user"));
        assert!(!t.done, "b is still pending");

        let t = run(
            envelope("s@example.org", &["a@example.net"]),
            &outcomes[..1],
            5 * MIN,
        );
        assert!(t.done);
    }

    #[test]
    fn mixed_attempt_gives_each_recipient_its_state_and_dsn() {
        let mut env = envelope(
            "s@example.org",
            &["ok@example.net", "later@example.net", "gone@example.net"],
        );
        // The delivered recipient asked for success notices too.
        env.recipients[0].notify = Notify {
            success: true,
            failure: true,
            delay: false,
            never: false,
        };
        let outcomes = [delivered(0), deferred(1), unknown_user(2)];
        let t = run(env, &outcomes, 30 * MIN);
        assert_eq!(
            states(&t),
            [
                RecipientState::Delivered,
                RecipientState::Pending,
                RecipientState::Bounced
            ]
        );
        assert_eq!(
            results(&t),
            [
                AttemptOutcome::Delivered,
                AttemptOutcome::Deferred,
                AttemptOutcome::Bounced
            ]
        );
        assert_eq!(
            t.results.iter().map(|r| r.category).collect::<Vec<_>>(),
            [
                None,
                Some(Category::MailboxFull),
                Some(Category::InvalidRecipient)
            ]
        );
        // Failed first, then delivered; the deferral is not reported (no delay notice yet).
        assert_eq!(
            dsn_set(&t),
            [(Action::Failed, vec![2]), (Action::Delivered, vec![0])]
        );
        assert_eq!(t.envelope.next_due_ms, 35 * MIN);
        assert!(!t.done);
        assert_eq!(t.envelope.attempts, 1);
    }

    #[test]
    fn hard_invalid_recipient_bounce_is_marked_for_suppression() {
        let env = envelope("s@example.org", &["Gone@Example.net", "x@example.net"]);
        let queue_id = env.queue_id.to_string();
        let outcomes = [
            unknown_user(0),
            outcome(1, Verdict::Permanent, "5.7.1", "550 5.7.1 rejected"),
        ];
        let t = run(env, &outcomes, 7 * MIN);
        let hard = t.results[0].bounce.as_ref().unwrap();
        assert_eq!(hard.category, Category::InvalidRecipient);
        assert!(hard.hard);
        assert_eq!(
            hard.suppress,
            Some(Entry {
                address: "gone@example.net".into(),
                reason: "invalid_recipient".into(),
                created_ms: 7 * MIN,
                expires_ms: None,
                source: Some(queue_id),
                scope: None,
            })
        );
        let other = t.results[1].bounce.as_ref().unwrap();
        assert!(!other.hard);
        assert_eq!(
            other.suppress, None,
            "a bounce of category other is no evidence"
        );
    }

    #[test]
    fn soft_category_bounce_is_suppressed_for_the_soft_expiry() {
        let env = envelope("s@example.org", &["full@example.net"]);
        let outcomes = [outcome(0, Verdict::Permanent, "4.2.2", "552 mailbox full")];
        let policy = SuppressionConfig::default();
        let t = settle(
            env,
            &classified(&outcomes),
            &DeliveryConfig::default(),
            &policy,
            MIN,
        );
        let bounce = t.results[0].bounce.as_ref().unwrap();
        assert!(!bounce.hard);
        let entry = bounce.suppress.as_ref().unwrap();
        assert_eq!(entry.reason, "mailbox_full");
        assert_eq!(
            entry.expires_ms,
            Some(MIN + policy.soft_expiry.as_millis() as u64)
        );
    }

    #[test]
    fn notify_decides_which_recipients_a_dsn_reports() {
        let never = Notify {
            success: false,
            failure: false,
            delay: false,
            never: true,
        };
        let failure_only = Notify {
            delay: false,
            ..Notify::default_rfc3461()
        };
        let mut env = envelope("s@example.org", &["n@example.net", "f@example.net"]);
        env.recipients[0].notify = never;
        env.recipients[1].notify = failure_only;
        let bounced = [unknown_user(0), unknown_user(1)];
        let t = run(env.clone(), &bounced, MIN);
        assert_eq!(dsn_set(&t), [(Action::Failed, vec![1])], "NOTIFY=NEVER");
        assert_eq!(
            states(&t),
            [RecipientState::Bounced, RecipientState::Bounced]
        );

        let late = [deferred(0), deferred(1)];
        let t = run(env, &late, 5 * HOUR);
        assert!(t.dsns.is_empty(), "nobody asked for delay notices");
        assert!(
            t.envelope.delay_notified,
            "the notice was due all the same: not chosen again"
        );
    }

    #[test]
    fn dsn_built_from_the_transition_keeps_envid_and_ret() {
        let mut env = envelope("s@example.org", &["gone@example.net"]);
        env.env_id = Some("env-42".into());
        env.ret = Some(Ret::Full);
        let outcomes = [unknown_user(0)];
        let t = run(env, &outcomes, MIN);
        assert_eq!(t.envelope.env_id.as_deref(), Some("env-42"));
        assert_eq!(t.envelope.ret, Some(Ret::Full));
        let original = b"Subject: hi\r\n\r\nthe body\r\n";
        let planned = &t.dsns[0];
        let message = dsn::build(&dsn::DsnRequest {
            reporting_mta: "mx.example.org",
            envelope: &t.envelope,
            original,
            recipients: planned
                .reports
                .iter()
                .map(|r| dsn::DsnRecipient {
                    address: &t.envelope.recipients[r.index].address,
                    orcpt: None,
                    action: r.action,
                    status: r.status.clone(),
                    remote_mta: None,
                    diagnostic: r.diagnostic.as_deref(),
                    last_attempt_ms: None,
                    will_retry_until_ms: None,
                })
                .collect(),
            now: std::time::UNIX_EPOCH,
        })
        .unwrap();
        let text = String::from_utf8(message).unwrap();
        assert!(text.contains("Original-Envelope-Id: env-42"));
        assert!(text.contains("the body"), "RET=FULL returns the body");
    }
}
