//! Enqueue, the "cleanup" stage (floor 4): everything between a message the pre-enqueue
//! stages have finished with and the spool. Every path into the queue ends here: SMTP and
//! HTTP submissions (through [`crate::intake`]) and the DSNs the settler writes (as Postfix's
//! bounce goes through cleanup).
//!
//! It prepends the Received trace header, adds Date and Message-ID to authenticated
//! submissions that lack them, splits the recipients by destination domain (one envelope per
//! destination, so exactly one delivery worker ever owns an envelope), and commits all parts
//! in one atomic, fsync'd spool write. [`Enqueue::commit`] returns only once the message is
//! durable: that is what allows the session to say 250. Messages whose From domain has DKIM
//! keys are signed here, once, so retries never sign again. Committed parts are handed to the
//! scheduler. The source-IP pool (the request's, the `X-Tern-Pool` header's or the sender
//! domain's, [`Enqueue::choose_pool`]) is recorded in each envelope.
//!
//! Recipients at a bounce domain are not delivered: they are committed, in the same batch,
//! as one inbound record for the bounce processor ([`crate::feedback`]). With
//! `suppression.mode = "drop"`, suppressed recipients are taken out here (a `suppressed`
//! event each); a message left without recipients is committed as nothing at all but still
//! gets its queue id.
//!
//! A message with a send window (set by the send-time stage) is split one part per
//! recipient, each with the `not_before` the [`SendPlanner`] chose inside the window; the
//! scheduler does not attempt a part before it.
//!
//! Every collaborator is a required constructor argument: there is no partly wired enqueue.

use crate::config::SuppressionMode;
use crate::dkim::DkimSigners;
use crate::events::{Event, Kind as EventKind};
use crate::feedback::{encode_record, Feedback, InboundHead};
use crate::live::Live;
use crate::message::{rfc5322_date, CampaignReport, Prepared, SendWindow, Submission};
use crate::shaping::pools::{strip_pool_header, Pools};
use crate::telemetry::SuppressedAction;
use crate::tls::TlsInfo;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_queue::{Envelope, MessageId, Recipient, Shared, Source, Spool, SpoolError};
use tokio::sync::mpsc;
use tracing::warn;

/// A message that was just committed: its id, recipient domain and first due time.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub id: MessageId,
    pub domain: String,
    /// The source-IP pool recorded at enqueue, if any.
    pub pool: Option<String>,
    /// Its `next_due_ms`: later than now when it is held until a `not_before` time.
    pub due_ms: u64,
}

/// Chooses each recipient's send time inside a window (the send-time model implements it).
pub trait SendPlanner: Send + Sync {
    /// The send time (Unix ms) for `address`, for mail accepted at `now_ms`; an error sends at
    /// once.
    fn plan<'a>(
        &'a self,
        address: &'a str,
        now_ms: u64,
        window: SendWindow,
    ) -> Pin<Box<dyn Future<Output = Result<u64, String>> + Send + 'a>>;
}

/// What one acceptance commits: the parts of every submission the sidecar made of it, in one
/// spool batch.
#[derive(Default)]
struct Batch {
    ids: Vec<MessageId>,
    /// One entry per submission: its parts share its body (stored once).
    parts: Vec<Shared>,
    inbound: Vec<(MessageId, Vec<u8>)>,
    /// Recipients dropped as suppressed: address, reason, protocol (for their events).
    dropped: Vec<(String, String, &'static str)>,
}

/// What [`Enqueue::commit`] committed.
#[derive(Debug)]
pub struct Accepted {
    /// One id per spool part; the first is the queue id.
    pub ids: Vec<MessageId>,
    /// Per recipient, what the sidecar did (empty when the message took the plain path).
    pub sidecar: Vec<CampaignReport>,
}

#[derive(Clone)]
pub struct Enqueue {
    spool: Spool,
    hostname: String,
    max_age: Duration,
    /// Shared by every clone, so a config reload (key rotation) reaches them all.
    dkim: Arc<Live<DkimSigners>>,
    pools: Arc<Pools>,
    feedback: Feedback,
    scheduler: mpsc::UnboundedSender<Vec<NewMessage>>,
    planner: Arc<dyn SendPlanner>,
    /// Parts committed while the spool was still opening (at start, see tern_queue's intake
    /// journal): the suppression list lives in the spool, so their recipients could not be
    /// checked. Held back from the scheduler until [`Enqueue::screen_intake`] checks them;
    /// `None` once it has.
    unscreened: Arc<std::sync::Mutex<Option<Vec<NewMessage>>>>,
}

impl Enqueue {
    /// `hostname` names us in Received headers (`server.hostname`); `max_age` is the lifetime
    /// of a message (`spool.max_age`); committed parts go to `scheduler` (a closed channel is
    /// fine: the due loader finds the mail at the next start).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        spool: Spool,
        hostname: String,
        max_age: Duration,
        dkim: DkimSigners,
        pools: Arc<Pools>,
        feedback: Feedback,
        scheduler: mpsc::UnboundedSender<Vec<NewMessage>>,
        planner: Arc<dyn SendPlanner>,
    ) -> Enqueue {
        Enqueue {
            spool,
            hostname,
            max_age,
            dkim: Arc::new(Live::new(dkim)),
            pools,
            feedback,
            scheduler,
            planner,
            unscreened: Arc::new(std::sync::Mutex::new(Some(Vec::new()))),
        }
    }

    /// Checks the recipients of the mail taken while the spool was opening against the
    /// suppression list, now that it can be read, and only then hands that mail to the
    /// scheduler. The daemon calls it once the spool is open, before delivery starts, so no
    /// such message is attempted unchecked. A suppressed recipient is dropped as in
    /// `suppression.mode = "drop"` (a `suppressed` event; the 250 was given already, so
    /// "reject" cannot apply); a part left without recipients is removed.
    ///
    /// The same check covers mail an earlier run took while its spool was opening and then
    /// crashed before checking it (`Spool::earlier_intake`): the open moved it into the
    /// spool, where the due loader finds it once delivery starts, so it is checked here too.
    ///
    /// Then the spool's marks of all that mail go ([`Spool::intake_checked`]): until they do,
    /// a crash at any point (even after the journal's move, before this check) leaves the
    /// next start the same mail to check.
    pub async fn screen_intake(&self) {
        let earlier = self.spool.earlier_intake();
        let mut checked = earlier.clone();
        if !earlier.is_empty() {
            let count = earlier.len();
            let mut kept = 0;
            for id in earlier {
                kept += usize::from(self.screen_one(id).await);
            }
            tracing::info!(
                parts = count,
                kept,
                "mail taken while an earlier run's spool opened (it crashed before checking it): checked against the suppression list"
            );
        }
        let held = self
            .unscreened
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .unwrap_or_default();
        if !held.is_empty() {
            checked.extend(held.iter().map(|part| part.id));
            let count = held.len();
            let new = self.screen(held).await;
            tracing::info!(
                parts = count,
                kept = new.len(),
                "mail taken while the spool opened: checked against the suppression list"
            );
            let _ = self.scheduler.send(new);
        }
        if let Err(e) = self.spool.intake_checked(&checked).await {
            warn!(error = %e, parts = checked.len(), "cannot record the intake mail as checked: the next start checks it again");
        }
    }

    /// The parts of `new` still to deliver after [`Enqueue::screen_one`].
    async fn screen(&self, new: Vec<NewMessage>) -> Vec<NewMessage> {
        let mut kept = Vec::with_capacity(new.len());
        for part in new {
            if self.screen_one(part.id).await {
                kept.push(part);
            }
        }
        kept
    }

    /// See [`Enqueue::screen_intake`]: drops the suppressed recipients of the part `id`;
    /// false if none is left to deliver (the part is gone, or was removed here).
    async fn screen_one(&self, id: MessageId) -> bool {
        let feedback = &self.feedback;
        let mut env = match self.spool.envelope(id) {
            Ok(Some(env)) => env,
            Ok(None) => return false,
            Err(e) => {
                warn!(id = %id, error = %e, "cannot read a part to check it against the suppression list");
                return true;
            }
        };
        let mut events = Vec::new();
        env.recipients
            .retain(|r| match feedback.suppressions.check(&r.address) {
                Some(entry) => {
                    feedback.metrics.suppressed(SuppressedAction::Drop);
                    let mut e = Event::new(EventKind::Suppressed, &r.address, "smtp");
                    e.queue_id = Some(env.queue_id);
                    e.sender = Some(env.sender.clone());
                    e.detail = Some(format!("dropped: suppressed ({})", entry.reason));
                    events.push(e);
                    false
                }
                None => true,
            });
        if events.is_empty() {
            return true;
        }
        let left = !env.recipients.is_empty();
        let written = if left {
            self.spool.update(&env).await
        } else {
            self.spool.remove(id).await
        };
        let written = match written {
            Ok(()) => true,
            Err(e) => {
                warn!(id = %env.id, error = %e, "cannot drop suppressed recipients");
                false
            }
        };
        feedback.events.emit(events).await;
        // Not scheduled now if the drop was not written: the spool still names the
        // suppressed recipients (the due loader finds the part later, as before).
        left && written
    }

    /// `Err(SpoolError::Full)` when a message of `size` bytes would be refused for space now
    /// (the spool keeps `spool.min_free_space` free).
    pub fn room_for(&self, size: u64) -> Result<(), SpoolError> {
        self.spool.room_for(size)
    }

    /// Replaces the signing keys (config reload) for this enqueue and every clone of it;
    /// messages being signed finish with the keys they started with.
    pub fn set_dkim(&self, signers: DkimSigners) {
        self.dkim.set(signers);
    }

    /// The source-IP pool of a message: `requested` (an HTTP injection's, checked by the API),
    /// else the `X-Tern-Pool` header's (taken out of `content` here, before any stage strips
    /// control headers and before DKIM signs), else the sender domain's.
    pub fn choose_pool(
        &self,
        requested: Option<String>,
        content: &mut Vec<u8>,
        sender: &str,
    ) -> Option<String> {
        let header = strip_pool_header(content);
        requested.or_else(|| self.pools.at_ingest(header.as_deref(), sender))
    }

    /// Commits one message that needs no pre-enqueue stage (a DSN): its pool chosen as
    /// [`Enqueue::choose_pool`] does, sent at once. Returns the queue id.
    pub async fn accept(&self, mut sub: Submission) -> Result<MessageId, SpoolError> {
        let pool = self.choose_pool(sub.pool.take(), &mut sub.content, &sub.sender);
        Ok(self.commit(vec![Prepared::new(sub)], pool).await?.ids[0])
    }

    /// Makes every message the stages prepared from one submission durable in one spool
    /// batch under one queue id (the first of the returned ids), then hands the parts to the
    /// scheduler.
    pub async fn commit(
        &self,
        prepared: Vec<Prepared>,
        pool: Option<String>,
    ) -> Result<Accepted, SpoolError> {
        self.commit_traced(prepared, pool, None).await
    }

    /// [`Enqueue::commit`] of mail another tern node relayed with its `trace`: the message
    /// keeps its creation and expiry times, its attempt count and its next due time (not
    /// before now), and is not DKIM-signed again (the first node signed it).
    pub async fn commit_traced(
        &self,
        prepared: Vec<Prepared>,
        pool: Option<String>,
        trace: Option<crate::message::RelayTrace>,
    ) -> Result<Accepted, SpoolError> {
        let now = crate::clock::now();
        // Whether the suppression list could be read for this message (see `unscreened`).
        let screened = self.spool.is_open();
        let sender = prepared
            .first()
            .map(|p| p.submission.sender.clone())
            .unwrap_or_default();
        let mut batch = Batch::default();
        let mut reports = Vec::new();
        for message in prepared {
            reports.extend(message.reports);
            self.build_parts(
                message.submission,
                now,
                &pool,
                (message.window, message.campaign, message.hold),
                trace,
                &mut batch,
            )
            .await?;
        }
        if batch.ids.is_empty() {
            batch.ids.push(self.spool.next_id());
        }
        let new: Vec<NewMessage> = batch
            .parts
            .iter()
            .flat_map(|shared| &shared.envelopes)
            .filter(|env| !env.held)
            .map(|env| NewMessage {
                id: env.id,
                domain: env.destination.clone(),
                pool: env.pool.clone(),
                due_ms: env.next_due_ms,
            })
            .collect();
        let feedback = &self.feedback;
        let woke = !batch.inbound.is_empty();
        self.spool
            .commit_shared_with_inbound(batch.parts, batch.inbound)
            .await?;
        if woke {
            feedback.inbound.notify_one();
        }
        if !batch.dropped.is_empty() {
            let queue_id = batch.ids[0];
            let events = batch
                .dropped
                .into_iter()
                .map(|(address, reason, source)| {
                    let mut e = Event::new(EventKind::Suppressed, &address, source);
                    e.queue_id = Some(queue_id);
                    e.sender = Some(sender.clone());
                    e.detail = Some(format!("dropped: suppressed ({reason})"));
                    e
                })
                .collect();
            feedback.events.emit(events).await;
        }
        let new = if screened {
            new
        } else {
            let held = {
                let mut unscreened = self
                    .unscreened
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                match unscreened.as_mut() {
                    Some(held) => {
                        held.extend(new);
                        None
                    }
                    None => Some(new),
                }
            };
            match held {
                None => Vec::new(),
                // The screening already ran: check this one now.
                Some(new) => self.screen(new).await,
            }
        };
        // Only fails when the scheduler is gone (shutdown): the mail is durable and the
        // due loader picks it up at the next start.
        if !new.is_empty() {
            let _ = self.scheduler.send(new);
        }
        Ok(Accepted {
            ids: batch.ids,
            sidecar: reports,
        })
    }

    /// The spool parts of one submission (Received header, Date/Message-ID, DKIM, one part
    /// per destination domain, bounce-domain recipients as an inbound record, suppressed
    /// recipients dropped in drop mode, send times planned in `window` when given), added to
    /// `batch`; every part shares the first id ever pushed to `batch.ids` as its queue id.
    async fn build_parts(
        &self,
        mut sub: Submission,
        now: SystemTime,
        pool: &Option<String>,
        (window, campaign, hold): (Option<SendWindow>, Option<tern_queue::CampaignTag>, bool),
        trace: Option<crate::message::RelayTrace>,
        batch: &mut Batch,
    ) -> Result<(), SpoolError> {
        let now_ms = unix_ms(now);
        let feedback = &self.feedback;
        let (bounce_rcpts, rcpts): (Vec<Recipient>, Vec<Recipient>) =
            std::mem::take(&mut sub.recipients)
                .into_iter()
                .partition(|r| feedback.is_bounce_address(&r.address));
        let source = if sub.source.protocol == "HTTP" {
            "http"
        } else {
            "smtp"
        };
        let rcpts: Vec<Recipient> = if feedback.suppressions.mode() == SuppressionMode::Drop {
            rcpts
                .into_iter()
                .filter(|r| match feedback.suppressions.check(&r.address) {
                    Some(entry) => {
                        feedback.metrics.suppressed(SuppressedAction::Drop);
                        batch
                            .dropped
                            .push((r.address.clone(), entry.reason, source));
                        false
                    }
                    None => true,
                })
                .collect()
        } else {
            rcpts
        };
        let groups = split_by_destination(rcpts);
        // Planned here, or on the node that relayed it (its trace says so; a trace is honoured
        // only from a trusted client): either way its delivery records the awaited send.
        let send_time_planned = window.is_some() || trace.is_some_and(|t| t.send_time_planned);
        let groups = match window {
            Some(window) => plan_send_times(&self.planner, groups, now_ms, window).await,
            None => groups
                .into_iter()
                .map(|(domain, rcpts)| (domain, rcpts, 0))
                .collect(),
        };
        let first = batch.ids.len();
        batch
            .ids
            .extend(groups.iter().map(|_| self.spool.next_id()));
        if batch.ids.is_empty() {
            batch.ids.push(self.spool.next_id());
        }
        let queue_id = batch.ids[0];

        let only_rcpt = match groups.first() {
            Some((_, rcpts, _)) if groups.len() == 1 && rcpts.len() == 1 => {
                Some(rcpts[0].address.as_str())
            }
            _ => None,
        };
        let mut head = received_header(
            &self.hostname,
            &sub.source,
            sub.tls.as_ref(),
            queue_id,
            only_rcpt,
            now,
        );
        if sub.source.auth_user.is_some() {
            let present = header_presence(&sub.content);
            if !present.date {
                head.push_str(&format!("Date: {}\r\n", rfc5322_date(now)));
            }
            if !present.message_id {
                head.push_str(&format!("Message-ID: <{}@{}>\r\n", queue_id, self.hostname));
            }
        }
        let mut body = Vec::with_capacity(head.len() + sub.content.len() + 512);
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(&sub.content);
        let dkim = self.dkim.get();
        if !dkim.is_empty() && trace.is_none() {
            let (signature, message) = if dkim.is_cheap() {
                (dkim.sign(&body), body)
            } else {
                // An RSA signature takes about a millisecond: keep it off the async workers.
                let (dkim, message) = (dkim.clone(), body);
                tokio::task::spawn_blocking(move || (dkim.sign(&message), message))
                    .await
                    .map_err(|e| SpoolError::Sled(format!("DKIM signing task failed: {e}")))?
            };
            body = match signature {
                Some(signature) => {
                    let mut signed = Vec::with_capacity(signature.len() + message.len());
                    signed.extend_from_slice(signature.as_bytes());
                    signed.extend_from_slice(&message);
                    signed
                }
                None => message,
            };
        }

        if !bounce_rcpts.is_empty() {
            let head = InboundHead {
                sender: sub.sender.clone(),
                recipients: bounce_rcpts.into_iter().map(|r| r.address).collect(),
                queue_id,
            };
            batch
                .inbound
                .push((self.spool.next_id(), encode_record(&head, &body)));
        }
        let (created_ms, expires_ms, attempts, due_ms) = match trace {
            Some(t) => (t.created_ms.min(now_ms), t.expires_ms, t.attempts, t.due_ms),
            None => (
                now_ms,
                now_ms.saturating_add(self.max_age.as_millis() as u64),
                0,
                now_ms,
            ),
        };
        let size = body.len() as u64;
        // Every part (per destination, or per recipient with a send time) has the same
        // bytes: the spool stores them once for all of them.
        let mut envelopes = Vec::with_capacity(groups.len());
        for ((destination, recipients, not_before_ms), id) in
            groups.into_iter().zip(&batch.ids[first..])
        {
            let not_before_ms = not_before_ms.max(trace.map_or(0, |t| t.not_before_ms));
            let envelope = Envelope {
                id: *id,
                queue_id,
                sender: sub.sender.clone(),
                destination,
                recipients,
                env_id: sub.env_id.clone(),
                ret: sub.ret,
                body_type: sub.body_type,
                smtputf8: sub.smtputf8,
                size,
                created_ms,
                expires_ms,
                // A send time beyond expiry would never be attempted: expiry wins. Held mail
                // (a paused campaign) is due never (outcome::operator::NOT_DUE) until released.
                next_due_ms: if hold {
                    u64::MAX
                } else {
                    now_ms.max(due_ms).max(not_before_ms.min(expires_ms))
                },
                attempts,
                source: sub.source.clone(),
                held: hold,
                delay_notified: false,
                parked: false,
                pool: pool.clone(),
                not_before_ms,
                body_id: None,
                campaign: campaign.clone(),
                send_time_planned,
            };
            envelopes.push(envelope);
        }
        if !envelopes.is_empty() {
            batch.parts.push(Shared { envelopes, body });
        }
        Ok(())
    }
}

/// One part per recipient, each with the send time the model chose (different recipients
/// get different times, and an envelope has one due time). A model failure sends at once.
/// Recipients are planned in parallel (each plan records the send durably, and the group
/// commit merges those writes), in slices so a large message does not flood the spool.
async fn plan_send_times(
    planner: &Arc<dyn SendPlanner>,
    groups: BTreeMap<String, Vec<Recipient>>,
    now_ms: u64,
    window: SendWindow,
) -> Vec<(String, Vec<Recipient>, u64)> {
    const SLICE: usize = 64;
    let recipients: Vec<(String, Recipient)> = groups
        .into_iter()
        .flat_map(|(domain, rcpts)| rcpts.into_iter().map(move |r| (domain.clone(), r)))
        .collect();
    let mut parts = Vec::with_capacity(recipients.len());
    for slice in recipients.chunks(SLICE) {
        let mut tasks = tokio::task::JoinSet::new();
        for (i, (_, rcpt)) in slice.iter().enumerate() {
            let (planner, address) = (planner.clone(), rcpt.address.clone());
            tasks.spawn(async move { (i, planner.plan(&address, now_ms, window).await) });
        }
        let mut planned = vec![0; slice.len()];
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((i, Ok(at))) if at > now_ms => planned[i] = at,
                Ok((_, Ok(_))) => {}
                Ok((i, Err(err))) => {
                    warn!(recipient = %slice[i].1.address, error = %err, "no send time planned; sent at once");
                }
                Err(err) => warn!(error = %err, "send-time planning task failed; sent at once"),
            }
        }
        for ((domain, rcpt), at) in slice.iter().zip(planned) {
            parts.push((domain.clone(), vec![rcpt.clone()], at));
        }
    }
    parts
}

/// Groups recipients by lowercase domain, in a stable order.
fn split_by_destination(recipients: Vec<Recipient>) -> BTreeMap<String, Vec<Recipient>> {
    let mut groups: BTreeMap<String, Vec<Recipient>> = BTreeMap::new();
    for rcpt in recipients {
        let domain = rcpt
            .address
            .rsplit_once('@')
            .map(|(_, d)| d.to_ascii_lowercase())
            .unwrap_or_default();
        groups.entry(domain).or_default().push(rcpt);
    }
    groups
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The trace header (RFC 5321 4.4), with the RFC 3848 protocol keyword and TLS details.
fn received_header(
    hostname: &str,
    source: &Source,
    tls: Option<&TlsInfo>,
    id: MessageId,
    only_rcpt: Option<&str>,
    now: SystemTime,
) -> String {
    let mut h = format!(
        "Received: from {} ([{}])\r\n\tby {} (tern) with {} id {}",
        source.helo, source.client_ip, hostname, source.protocol, id
    );
    if let Some(tls) = tls {
        h.push_str(&format!(
            "\r\n\t(using {} with cipher {})",
            tls.version, tls.cipher
        ));
    }
    if let Some(rcpt) = only_rcpt {
        h.push_str(&format!("\r\n\tfor <{rcpt}>"));
    }
    h.push_str(&format!(";\r\n\t{}\r\n", rfc5322_date(now)));
    h
}

#[derive(Debug, Default, PartialEq, Eq)]
struct HeaderPresence {
    date: bool,
    message_id: bool,
}

/// Which of Date and Message-ID the header section (up to the first empty line) has.
fn header_presence(content: &[u8]) -> HeaderPresence {
    let mut present = HeaderPresence::default();
    for line in content.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = line[..colon].trim_ascii_end();
        present.date |= name.eq_ignore_ascii_case(b"date");
        present.message_id |= name.eq_ignore_ascii_case(b"message-id");
    }
    present
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_presence_stops_at_body() {
        let msg = b"Subject: x\r\nMESSAGE-ID : <a@b>\r\n\r\nDate: in the body\r\n";
        assert_eq!(
            header_presence(msg),
            HeaderPresence {
                date: false,
                message_id: true
            }
        );
    }

    #[test]
    fn split_groups_by_lowercase_domain() {
        let r = |a: &str| Recipient::new(a.to_string());
        let groups = split_by_destination(vec![r("a@X.test"), r("b@y.test"), r("c@x.test")]);
        let keys: Vec<_> = groups.keys().cloned().collect();
        assert_eq!(keys, ["x.test", "y.test"]);
        assert_eq!(groups["x.test"].len(), 2);
    }
}
