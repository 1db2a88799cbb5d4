//! What happens after an attempt: per-recipient results applied to the spool, retries,
//! expiry and delivery status notifications.
//!
//! - [`retry`]: the retry schedule (pure functions of attempts and config).
//! - [`dsn`]: RFC 3464 delivery status notifications.
//! - [`transition`]: what one attempt's results change (states, retry or expiry, delay
//!   notice, DSNs, suppressions), as a plain value; pure.
//! - [`Settler`]: applies one attempt's results to its envelope: the transition, then the
//!   recording of what happened (log lines, metrics, events, suppressions), then the commit
//!   (DSNs, then the spool write).
//! - [`operator`]: the operator's actions on a message (hold, release, retry now, bounce,
//!   delete) and suspension parking, serialised with `Settler::apply` by per-message locks.
//!
//! Invariants:
//! - Every recipient ends in exactly one of delivered, bounced or expired; a temporary
//!   failure keeps it pending with a later due time until the message expires.
//! - DSNs are committed to the spool (through ingest, like any mail) before the envelope that
//!   caused them is updated or removed: a crash in between can repeat a DSN, never lose one.
//! - Never a DSN for a message with a null sender.
//! - An outcome is written only to the envelope still stored, under the message's lock: a
//!   message deleted or bounced during its attempt stays gone and gets no second DSN.
//! - Each outcome is an event (`crate::events`), emitted once the DSNs are queued and before
//!   the spool write; a permanent failure classified hard (or of a soft suppression
//!   category) adds the recipient to the suppression list first.
//! - An attempt's delivery-log lines and metrics are recorded before its envelope is
//!   re-read, so they are written even when its outcome is not.
//! - A result's category is the one the delivery worker gave it (`RcptOutcome::category`, the
//!   same that shaping read): the settler never classifies a reply again. Routing failures,
//!   which have no attempt, are classified where their results are made.

pub mod dsn;
pub mod operator;
pub mod retry;
pub mod transition;

use crate::bounce::classify::Classifier;
use crate::clock::now_ms;
use crate::config::DeliveryConfig;
use crate::delivery::worker::{Attempt, Failure, Verdict};
use crate::enqueue::Enqueue;
use crate::events::{Event, Kind as EventKind};
use crate::feedback::Feedback;
use crate::live::Live;
use crate::maillog::{AttemptOutcome, AttemptRecord, DeliveryLog};
use crate::message::Submission;
use crate::routing::route::{RouteError, RoutePlan};
use crate::suppression::Entry;
use crate::telemetry::Metrics;
use dsn::{Action, DsnRecipient, DsnRequest};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};
use tern_queue::{BodyType, Envelope, MessageId, Recipient, RecipientState, Source, Spool};
use tracing::{debug, info, warn};
use transition::{Classified, Dsn, Transition};

pub struct Settler {
    spool: Spool,
    /// DSNs are committed through it, like any mail.
    enqueue: Enqueue,
    /// Hard bounces suppress; outcomes become events.
    feedback: Feedback,
    log: DeliveryLog,
    /// Retry schedule and delay notices; a config reload replaces it.
    config: Live<DeliveryConfig>,
    hostname: String,
    metrics: Arc<Metrics>,
    locks: operator::MessageLocks,
    /// For routing failures only: attempts arrive classified.
    classifier: Arc<Classifier>,
}

/// What an attempt publishes once its DSNs are durable: one event per result, and the
/// suppression entries its bounces add, each with its event.
struct Publication {
    events: Vec<Event>,
    suppress: Vec<(Entry, Event)>,
}

impl Settler {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spool: Spool,
        enqueue: Enqueue,
        feedback: Feedback,
        log: DeliveryLog,
        config: DeliveryConfig,
        hostname: String,
        metrics: Arc<Metrics>,
        classifier: Arc<Classifier>,
    ) -> Settler {
        Settler {
            spool,
            enqueue,
            feedback,
            log,
            config: Live::new(config),
            hostname,
            metrics,
            locks: operator::MessageLocks::default(),
            classifier,
        }
    }

    /// Applies a reloaded `[delivery]` (retry schedule, delay notices) to later outcomes.
    pub fn reconfigure(&self, config: DeliveryConfig) {
        self.config.set(config);
    }

    /// A message whose domain could not be routed: every pending recipient gets the routing
    /// error as its result. Returns the next due time, as [`Settler::settle`] does.
    pub async fn route_failed(&self, id: MessageId, err: &RouteError) -> Option<u64> {
        let env = match self.spool.envelope(id) {
            Ok(Some(env)) => env,
            Ok(None) => return None,
            Err(e) => {
                warn!(%id, error = %e, "cannot read envelope");
                return None;
            }
        };
        let body = match self.spool.body_of(&env) {
            Ok(Some(body)) => body,
            Ok(None) => {
                warn!(%id, "envelope without body");
                return None;
            }
            Err(e) => {
                warn!(%id, error = %e, "cannot read body");
                return None;
            }
        };
        let pending: Vec<(usize, Recipient)> = env
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RecipientState::Pending)
            .map(|(i, r)| (i, r.clone()))
            .collect();
        let attempt = Failure::from_route_error(err).for_all(&pending, &self.classifier);
        self.apply(env, &body, &env_destination(err), attempt).await
    }

    /// Applies an attempt's results: states, retry time or expiry, DSNs, log, spool write.
    /// Returns the message's next due time if it is still pending, so the scheduler can keep
    /// an imminent retry in memory.
    pub async fn settle(
        &self,
        env: Envelope,
        body: &[u8],
        plan: &RoutePlan,
        attempt: Attempt,
    ) -> Option<u64> {
        self.apply(env, body, &plan.key, attempt).await
    }

    /// The three steps of an attempt's outcome: the pure transition
    /// ([`transition::settle`]), the recording of what happened ([`Settler::record`]) and the
    /// commit ([`Settler::commit`]).
    async fn apply(
        &self,
        env: Envelope,
        body: &[u8],
        destination: &str,
        attempt: Attempt,
    ) -> Option<u64> {
        if attempt.outcomes.is_empty() {
            return None;
        }
        let now = now_ms();
        let classified: Vec<Classified<'_>> = attempt
            .outcomes
            .iter()
            .map(|outcome| Classified {
                outcome,
                category: (outcome.verdict != Verdict::Delivered).then_some(outcome.category),
            })
            .collect();
        let transition = transition::settle(
            env,
            &classified,
            &self.config.get(),
            self.feedback.suppressions.config(),
            now,
        );
        let publication = self.record(&transition, &attempt, destination);
        self.commit(transition, body, attempt.host.as_deref(), publication)
            .await
    }

    /// Records what the attempt did: metrics and delivery-log lines at once (they happened,
    /// whatever becomes of the spool write), and returns the events and suppression entries
    /// to publish once the DSNs are durable.
    fn record(
        &self,
        transition: &Transition<'_>,
        attempt: &Attempt,
        destination: &str,
    ) -> Publication {
        let env = &transition.envelope;
        let now = transition.now;
        let mut events = Vec::with_capacity(transition.results.len());
        let mut suppress = Vec::new();
        // One label per envelope: its provider, static route or "other".
        let label = self.metrics.label(destination, Some(&env.destination));
        for settled in &transition.results {
            let rcpt = &env.recipients[settled.index];
            let result = settled.result;
            self.metrics.delivery(&label, result.into());
            if result == AttemptOutcome::Delivered {
                self.metrics.delivered(
                    Duration::from_millis(now.saturating_sub(env.created_ms)),
                    attempt.tls.is_some(),
                    &label,
                    &env.sender,
                );
            } else {
                let category = settled.category.map_or("other", |c| c.as_str());
                self.metrics
                    .delivery_failure(&label, result.into(), category);
            }
            self.log.record(&AttemptRecord {
                ts: UNIX_EPOCH + Duration::from_millis(now),
                id: env.id,
                queue_id: env.queue_id,
                recipient: &rcpt.address,
                sender: &env.sender,
                host: attempt.host.as_deref(),
                ip: attempt.addr,
                source_ip: attempt.source,
                tls_version: attempt.tls.as_ref().map(|t| t.version.as_str()),
                tls_cipher: attempt.tls.as_ref().map(|t| t.cipher.as_str()),
                tls_policy: attempt.tls_policy,
                reply: settled.reply,
                outcome: result,
                attempt: rcpt.attempts,
                delay_s: now.saturating_sub(env.created_ms) as f64 / 1000.0,
                destination,
                category: settled.category,
                campaign: env.campaign.as_ref().map(|t| t.campaign.as_str()),
                variant: env.campaign.as_ref().and_then(|t| t.variant.as_deref()),
            });
            let mut event = Event::new(event_kind(result), &rcpt.address, "delivery");
            event.id = Some(env.id);
            event.queue_id = Some(env.queue_id);
            event.sender = Some(env.sender.clone());
            event.status = Some(settled.status.to_string());
            event.category = settled.category;
            event.detail = Some(settled.reply.to_string());
            event.tag(env.campaign.as_ref());
            event.send_time_planned = env.send_time_planned;
            if let Some(bounce) = &settled.bounce {
                event.hard = Some(bounce.hard);
                if let Some(entry) = &bounce.suppress {
                    let category = bounce.category;
                    let mut s = Event::new(EventKind::Suppressed, &rcpt.address, "delivery");
                    s.id = Some(env.id);
                    s.queue_id = Some(env.queue_id);
                    s.category = Some(category);
                    s.detail = Some(format!("added to the suppression list ({category})"));
                    s.tag(env.campaign.as_ref());
                    suppress.push((entry.clone(), s));
                }
            }
            events.push(event);
        }
        Publication { events, suppress }
    }

    /// Adds the suppression entries, then emits the events (a suppression's event only if
    /// it was stored).
    async fn publish(&self, id: MessageId, publication: Publication) {
        let Publication {
            mut events,
            suppress,
        } = publication;
        let feedback = &self.feedback;
        if !suppress.is_empty() {
            let (entries, added): (Vec<_>, Vec<_>) = suppress.into_iter().unzip();
            match feedback.suppressions.add(entries).await {
                Ok(()) => events.extend(added),
                Err(err) => warn!(%id, error = %err, "cannot update the suppression list"),
            }
        }
        feedback.events.emit(events).await;
    }

    /// Commits the transition under the message's lock: DSNs first, then the events and
    /// suppressions, then the envelope's update or removal. Returns the next due time if the
    /// message is still pending.
    async fn commit(
        &self,
        transition: Transition<'_>,
        body: &[u8],
        remote: Option<&str>,
        publication: Publication,
    ) -> Option<u64> {
        let Transition {
            envelope: mut env,
            dsns,
            done,
            ..
        } = transition;
        // From here on the stored envelope is what counts: the operator may have acted on the
        // message while it was in flight (see `operator`).
        let _guard = self.locks.lock(env.id).await;
        match self.spool.envelope(env.id) {
            Ok(Some(stored)) => {
                if stored.held {
                    env.held = true;
                    env.next_due_ms = operator::NOT_DUE;
                }
            }
            Ok(None) => {
                info!(id = %env.id, "message removed by the operator during its attempt; outcome not recorded");
                return None;
            }
            Err(err) => {
                warn!(id = %env.id, error = %err, "cannot read envelope; outcome not recorded");
                return None;
            }
        }
        if let Err(err) = self.send_dsns(&env, body, remote, &dsns).await {
            // The envelope is left as it was: the attempt is repeated later and the DSN with
            // it, rather than reporting nothing.
            warn!(id = %env.id, error = %err, "cannot queue DSN; outcome not recorded");
            return None;
        }

        // Before the spool write: a crash after it would otherwise lose them; a crash before
        // it repeats the attempt and its events (at least once).
        self.publish(env.id, publication).await;

        let written = if done {
            self.spool.remove(env.id).await
        } else {
            self.spool.update(&env).await
        };
        match written {
            Err(err) => {
                warn!(id = %env.id, error = %err, "cannot record delivery outcome");
                None
            }
            Ok(()) if done => {
                debug!(id = %env.id, "message done");
                None
            }
            Ok(()) => Some(env.next_due_ms),
        }
    }

    /// Queues the planned DSNs ([`transition::dsns`]) in order, each committed to the spool
    /// before the next.
    async fn send_dsns(
        &self,
        env: &Envelope,
        body: &[u8],
        remote: Option<&str>,
        dsns: &[Dsn],
    ) -> Result<(), tern_queue::SpoolError> {
        if dsns.is_empty() {
            return Ok(());
        }
        let now = UNIX_EPOCH + Duration::from_millis(now_ms());
        for planned in dsns {
            let action = planned.action;
            let recipients: Vec<DsnRecipient<'_>> = planned
                .reports
                .iter()
                .map(|r| {
                    let rcpt = &env.recipients[r.index];
                    DsnRecipient {
                        address: &rcpt.address,
                        orcpt: rcpt.orcpt.as_deref(),
                        action,
                        status: r.status.clone(),
                        remote_mta: remote,
                        diagnostic: r.diagnostic.as_deref(),
                        last_attempt_ms: Some(now_ms()),
                        will_retry_until_ms: (action == Action::Delayed).then_some(env.expires_ms),
                    }
                })
                .collect();
            let request = DsnRequest {
                reporting_mta: &self.hostname,
                envelope: env,
                original: body,
                recipients,
                now,
            };
            let Some(message) = dsn::build(&request) else {
                continue;
            };
            let id = self
                .enqueue
                .accept(self.dsn_submission(env, message))
                .await?;
            info!(original = %env.id, dsn = %id, ?action, "DSN queued");
            self.metrics.dsn_sent(action.into());
        }
        Ok(())
    }

    fn dsn_submission(&self, env: &Envelope, message: Vec<u8>) -> Submission {
        Submission {
            sender: String::new(),
            recipients: vec![Recipient::new(env.sender.clone())],
            env_id: None,
            ret: None,
            // A DSN about UTF-8 addresses is 8-bit content; it needs SMTPUTF8 itself only when
            // it goes to a UTF-8 address.
            body_type: if message.is_ascii() {
                BodyType::SevenBit
            } else {
                BodyType::EightBitMime
            },
            smtputf8: !env.sender.is_ascii(),
            source: Source {
                client_ip: "127.0.0.1".to_string(),
                helo: self.hostname.clone(),
                auth_user: None,
                protocol: "local".to_string(),
            },
            tls: None,
            content: message,
            sidecar: None,
            unsubscribe: None,
            pool: None,
            trusted: true,
        }
    }
}

/// The event an attempt's result is published as.
fn event_kind(result: AttemptOutcome) -> EventKind {
    match result {
        AttemptOutcome::Delivered => EventKind::Delivered,
        AttemptOutcome::Deferred => EventKind::Deferred,
        AttemptOutcome::Expired => EventKind::Expired,
        AttemptOutcome::Complaint => EventKind::Complaint,
        AttemptOutcome::Suppressed => EventKind::Suppressed,
        AttemptOutcome::Bounced | AttemptOutcome::Deleted => EventKind::Bounced,
    }
}

/// The destination named in the delivery log for mail that could not be routed.
fn env_destination(err: &RouteError) -> String {
    match err {
        RouteError::Permanent { .. } => "unroutable".to_string(),
        RouteError::Temporary { .. } => "routing-deferred".to_string(),
    }
}
