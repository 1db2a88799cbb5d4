//! Inbound bounce mail: what arrives for the bounce domains (`bounce.domains`).
//!
//! Ingest commits such recipients not as deliverable envelopes but as inbound records in
//! the spool (`Spool::commit_with_inbound`, in the same atomic batch as the message's other
//! parts, before the 250). The [`Processor`] task reads them, parses the message with
//! `crate::bounce`, applies the result (suppression list, events) and only then removes the
//! record: a crash mid-way re-processes it (suppression and events are idempotent enough:
//! an entry is rewritten, an event may repeat). Nothing is ever delivered or bounced from
//! here (no backscatter).
//!
//! Trust: anyone on the internet can mail the bounce domains, so nothing a report says is
//! believed unless it is tied to mail tern sent. A recipient in our VERP form is trusted only
//! if its token verifies (`crate::verp`); a forged or altered one makes the whole message
//! ignored. A verified token names the recipient even when the body is unreadable: a
//! null-sender message of kind `none` then counts as a bounce of category `other`, soft.
//! Without VERP, each address a DSN or ARF report names counts only when it passes the
//! mailbox syntax check and the returned copy carries an `X-Tern-Id` (`crate::origin`) that
//! binds that address to a message sent within `bounce.trust_window`; at most
//! `limits.max_recipients` addresses of one report are looked at. A complaint (ARF) is
//! also believed, for the addresses it names, when it is DKIM-signed by one of the
//! feedback-loop domains the operator configured (`bounce.feedback_loops`, see [`loops`]):
//! providers that redact the returned copy still count. Untied addresses are counted
//! (`tern_inbound_reports_total{trusted="false"}`) and change nothing. Addresses at the
//! bounce domains or at the server's own host name are never suppressed. A message that parses as neither bounce nor
//! complaint (and has a sender, i.e. is no bounce) is dropped with a log line; auto-replies
//! are dropped too. Parsing runs on a blocking thread. Records are loaded in batches bounded
//! by bytes as well as by count ([`INBOUND_BATCH_BYTES`]): each is a whole message, up to
//! `limits.max_message_size`, so a count alone would let a burst of large ones fill memory.
//!
//! Attribution: a DSN's or ARF report's returned copy carries the `Feedback-ID` tern wrote on
//! campaign mail ([`crate::feedback_id`]); its events get that campaign and variant (so the
//! campaign results count complaints and asynchronous bounces) when the campaign exists
//! ([`Events::known_campaign`]), else none. There is no other lookup: a VERP token or
//! `X-Tern-Id` names a part that is gone from the spool once delivered.
//!
//! [`Feedback`] bundles the handles the submission paths and the settler share: the
//! suppression list, the events, the bounce domains and the processor's wake-up.

pub mod loops;

use crate::bounce::classify::Classifier;
use crate::bounce::{self, Kind, ReportedAction};
use crate::events::{self, Event, Events};
use crate::origin::Origin;
use crate::suppression::Suppressions;
use crate::taxonomy::Category;
use crate::telemetry::Metrics;
use crate::unsubscribe::{Unsubscriber, MAILTO_LOCAL};
use crate::verp::Verp;
use loops::FeedbackLoops;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tern_queue::{InboundBatch, MessageId, Spool};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Records are looked for at least this often (besides the wake-up after each commit).
const POLL: Duration = Duration::from_secs(5);
/// Inbound records loaded at once: at most this many...
const INBOUND_BATCH: usize = 64;
/// ...and at most this many bytes beyond the first record (which may be as large as a
/// message may be).
pub const INBOUND_BATCH_BYTES: usize = 4 << 20;

/// Shared by the enqueue, the SMTP session, HTTP injection, the settler and
/// the admin API.
#[derive(Clone)]
pub struct Feedback {
    pub suppressions: Suppressions,
    pub events: Events,
    /// Suppressed recipients and processed inbound reports are counted here.
    pub metrics: Arc<Metrics>,
    /// Lowercase.
    pub bounce_domains: Arc<Vec<String>>,
    /// Wakes the processor after a commit with inbound records.
    pub inbound: Arc<Notify>,
}

impl Feedback {
    pub fn new(
        suppressions: Suppressions,
        events: Events,
        bounce_domains: Vec<String>,
        metrics: Arc<Metrics>,
    ) -> Feedback {
        Feedback {
            suppressions,
            events,
            metrics,
            bounce_domains: Arc::new(bounce_domains),
            inbound: Arc::new(Notify::new()),
        }
    }

    /// Whether `address` is at one of the bounce domains.
    pub fn is_bounce_address(&self, address: &str) -> bool {
        address.rsplit_once('@').is_some_and(|(_, d)| {
            self.bounce_domains
                .iter()
                .any(|b| b.eq_ignore_ascii_case(d))
        })
    }
}

/// The domain of the `From:` of the copy a report returns (the first `From:` line after
/// the report's own header section): the sending identity a complaint counts against.
fn returned_sender_domain(message: &[u8]) -> Option<String> {
    let body_start = memchr::memmem::find(message, b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| memchr::memmem::find(message, b"\n\n").map(|i| i + 2))?;
    let body = &message[body_start..];
    for line in body.split(|&b| b == b'\n') {
        if line.len() > 5 && line[..5].eq_ignore_ascii_case(b"from:") {
            let text = String::from_utf8_lossy(&line[5..]);
            let (_, domain) = text.rsplit_once('@')?;
            let domain: String = domain
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '.' || *c == '-')
                .collect();
            return (!domain.is_empty()).then(|| domain.to_ascii_lowercase());
        }
    }
    None
}

/// The head of an inbound record; the record is this JSON, a newline, and the message.
#[derive(Debug, Serialize, Deserialize)]
pub struct InboundHead {
    pub sender: String,
    pub recipients: Vec<String>,
    pub queue_id: MessageId,
}

pub fn encode_record(head: &InboundHead, message: &[u8]) -> Vec<u8> {
    let mut out = serde_json::to_vec(head).unwrap_or_default();
    out.push(b'\n');
    out.extend_from_slice(message);
    out
}

#[derive(Clone)]
pub struct Processor {
    pub spool: Spool,
    pub feedback: Feedback,
    pub classifier: Arc<Classifier>,
    pub verp: Option<Verp>,
    /// Checks the `X-Tern-Id` of returned copies.
    pub origin: Origin,
    /// `bounce.trust_window`, in days.
    pub trust_window_days: u64,
    /// `limits.max_recipients`: a report naming more is looked at only that far.
    pub max_recipients: usize,
    /// `bounce.feedback_loops`, when set: complaints these domains DKIM-sign are believed.
    pub feedback_loops: Option<Arc<FeedbackLoops>>,
    /// `server.hostname` (lowercase): its addresses are never suppressed, like the bounce
    /// domains'.
    pub hostname: String,
    /// Reads unsubscribe mail (to `unsubscribe@` the first bounce domain, the `mailto:` of
    /// List-Unsubscribe).
    pub unsubscriber: Option<Arc<Unsubscriber>>,
    /// `sidecar.feedback_sender_id`: a returned copy's `Feedback-ID` is tern's only with it.
    pub feedback_sender_id: String,
}

impl Processor {
    /// Whether `address` is one of tern's own: at a bounce domain or at `server.hostname`.
    fn is_own_address(&self, address: &str) -> bool {
        self.feedback.is_bounce_address(address)
            || address
                .rsplit_once('@')
                .is_some_and(|(_, d)| d.eq_ignore_ascii_case(&self.hostname))
    }

    /// Processes inbound records until `shutdown`; those left over from a previous run first.
    pub async fn run(self, shutdown: CancellationToken) {
        // The records are in the spool: not before it is open (the daemon takes mail sooner).
        tokio::select! {
            _ = self.spool.ready() => {}
            _ = shutdown.cancelled() => return,
        }
        loop {
            let batch = match self.spool.inbound_batch(INBOUND_BATCH, INBOUND_BATCH_BYTES) {
                Ok(batch) => batch,
                Err(err) => {
                    warn!(error = %err, "cannot read inbound bounce mail");
                    InboundBatch::default()
                }
            };
            let full = batch.more;
            for (id, record) in batch.records {
                self.process(id, &record).await;
                if let Err(err) = self.spool.remove_inbound(id).await {
                    warn!(%id, error = %err, "cannot remove processed bounce mail");
                }
            }
            if full {
                continue;
            }
            tokio::select! {
                _ = self.feedback.inbound.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => return,
            }
        }
    }

    async fn process(&self, id: MessageId, record: &[u8]) {
        let split = record.iter().position(|&b| b == b'\n');
        let head = split.and_then(|i| serde_json::from_slice::<InboundHead>(&record[..i]).ok());
        let (Some(head), Some(i)) = (head, split) else {
            warn!(%id, "inbound record without a readable head; dropped");
            return;
        };
        let message = record[i + 1..].to_vec();
        if let Some(unsubscriber) = &self.unsubscriber {
            let to_unsubscribe = head.recipients.iter().any(|r| {
                r.rsplit_once('@').is_some_and(|(local, _)| {
                    local.eq_ignore_ascii_case(MAILTO_LOCAL) && self.feedback.is_bounce_address(r)
                })
            });
            if to_unsubscribe {
                self.process_unsubscribe(unsubscriber, id, &message).await;
                return;
            }
        }
        // Who signed it matters only for complaints, and only when feedback loops are set.
        let feedback_loop = match &self.feedback_loops {
            Some(loops) if loops.may_vouch(&message) => loops.verified_source(&message).await,
            _ => None,
        };
        // Parsing is CPU work on untrusted input: on a blocking thread, off the async workers.
        let this = self.clone();
        let evaluated = tokio::task::spawn_blocking(move || {
            this.evaluate(&head, &message, feedback_loop.as_deref())
        })
        .await;
        let (events, entries) = match evaluated {
            Ok(result) => result,
            Err(err) => {
                warn!(%id, error = %err, "bounce evaluation failed; dropped");
                return;
            }
        };
        let list = &self.feedback.suppressions;
        if !entries.is_empty() {
            if let Err(err) = list.add(entries).await {
                warn!(%id, error = %err, "cannot update the suppression list");
            }
        }
        self.feedback.events.emit(events).await;
    }

    /// An unsubscribe mail: the token in its Subject (as the List-Unsubscribe `mailto:`
    /// put it there) names recipient and list; without a valid one it is dropped.
    async fn process_unsubscribe(
        &self,
        unsubscriber: &Unsubscriber,
        id: MessageId,
        message: &[u8],
    ) {
        let parsed = mail_parser::MessageParser::default().parse_headers(message);
        let subject = parsed.as_ref().and_then(|m| m.subject()).unwrap_or("");
        match unsubscriber.verify_subject(subject, crate::clock::now_ms() / 1000) {
            Some(claims) => {
                if let Err(err) = unsubscriber.unsubscribe(&claims, "mailto").await {
                    warn!(%id, error = %err, "cannot record an unsubscribe");
                }
            }
            None => info!(%id, "unsubscribe mail without a valid token; dropped"),
        }
    }

    /// What one inbound message means: the events to emit and the suppression entries to add.
    /// Only recipients tied to mail tern sent count (a verified VERP token, or an
    /// `X-Tern-Id` in the returned copy that binds the recipient), and those a complaint
    /// names when `feedback_loop` (the configured domain whose DKIM signature on the message
    /// verified) is set; the rest are counted as untrusted and change nothing.
    pub fn evaluate(
        &self,
        head: &InboundHead,
        message: &[u8],
        feedback_loop: Option<&str>,
    ) -> (Vec<Event>, Vec<crate::suppression::Entry>) {
        let mut targets = Vec::new();
        for rcpt in &head.recipients {
            if let Some(verp) = &self.verp {
                if verp.looks_like_verp(rcpt) {
                    match verp.target(rcpt) {
                        Some(target) => targets.push(target),
                        None => {
                            warn!(queue_id = %head.queue_id, recipient = %rcpt, "forged or altered VERP address; message ignored");
                            return (Vec::new(), Vec::new());
                        }
                    }
                }
            }
        }
        let report = bounce::parse(message, &self.classifier);
        let kind = report.kind.as_str();
        // The campaign and variant the returned copy's Feedback-ID names, if that campaign
        // exists (a forged or stale claim tags nothing).
        let campaign = (report.kind != Kind::Autoreply)
            .then(|| crate::feedback_id::find(message, &self.feedback_sender_id))
            .flatten()
            .and_then(|claim| {
                let known = self.feedback.events.known_campaign(&claim);
                if known.is_none() {
                    info!(queue_id = %head.queue_id, campaign = %claim.campaign,
                        "report names a campaign that does not exist; counted without one");
                }
                known
            });
        let metrics = &self.feedback.metrics;
        if report.recipients.is_empty() {
            metrics.inbound_report(kind, "none", !targets.is_empty());
        }
        let now = crate::clock::now_ms();
        let mut events = Vec::new();
        let mut entries = Vec::new();
        let null_sender = head.sender.is_empty();
        match report.kind {
            Kind::Autoreply => {
                for r in &report.recipients {
                    metrics.inbound_report(kind, r.category.as_str(), false);
                }
                info!(queue_id = %head.queue_id, "auto-reply to a bounce address; dropped");
            }
            Kind::None if !null_sender || targets.is_empty() => {
                info!(queue_id = %head.queue_id, "mail to a bounce address that is no bounce; dropped");
            }
            Kind::None => {
                // Unreadable, but a verified VERP address names message and recipient.
                for t in &targets {
                    let mut e = Event::new(events::Kind::Bounced, &t.recipient, "bounce");
                    e.id = Some(t.id);
                    e.tag(campaign.as_ref());
                    e.category = Some(Category::Other);
                    e.hard = Some(false);
                    e.detail = Some("unreadable bounce to a VERP address".into());
                    events.push(e);
                }
            }
            Kind::Dsn | Kind::Arf => {
                let complaint = report.kind == Kind::Arf;
                let source = if complaint { "arf" } else { "bounce" };
                // With VERP, the token says who it is about; the report says what happened.
                // Without, each address the report names must be tied to mail we sent by the
                // X-Tern-Id of the returned copy, or the report be a complaint signed by a
                // configured feedback loop; at most `max_recipients` are looked at.
                let vouched = if complaint { feedback_loop } else { None };
                let mut subjects: Vec<(
                    String,
                    Option<MessageId>,
                    Option<&bounce::BounceRecipient>,
                )> = Vec::new();
                if targets.is_empty() {
                    let mut untrusted = 0usize;
                    for r in report.recipients.iter().take(self.max_recipients) {
                        // The address we sent to, not where it was forwarded.
                        let address = r.sent_to().to_lowercase();
                        let valid = crate::rfc5321::address::check_mailbox(&address).is_ok();
                        let tied = valid
                            .then(|| {
                                self.origin
                                    .tie(message, &address, now, self.trust_window_days)
                            })
                            .flatten();
                        let trusted = tied.is_some() || (valid && vouched.is_some());
                        metrics.inbound_report(kind, r.category.as_str(), trusted);
                        if trusted {
                            subjects.push((address, tied, Some(r)));
                        } else {
                            untrusted += 1;
                        }
                    }
                    untrusted += report.recipients.len().saturating_sub(self.max_recipients);
                    if untrusted > 0 {
                        warn!(queue_id = %head.queue_id, kind, untrusted,
                            "report names recipients not tied to mail we sent; ignored for them");
                    }
                } else {
                    for r in &report.recipients {
                        metrics.inbound_report(kind, r.category.as_str(), true);
                    }
                    for t in &targets {
                        let r = report
                            .recipients
                            .iter()
                            .find(|r| {
                                r.address.eq_ignore_ascii_case(&t.recipient)
                                    || r.sent_to().eq_ignore_ascii_case(&t.recipient)
                            })
                            .or_else(|| report.recipients.first());
                        subjects.push((t.recipient.clone(), Some(t.id), r));
                    }
                }
                for (address, id, r) in subjects {
                    let (kind, category, hard, failed) = match r {
                        _ if complaint => {
                            (events::Kind::Complaint, Category::Complaint, true, true)
                        }
                        Some(r) => match r.action {
                            // A report that the message's lifetime ran out (4.4.7) is an
                            // expiry, like one tern's own queue reports.
                            ReportedAction::Failed if r.category == Category::Expired => {
                                (events::Kind::Expired, r.category, r.hard, true)
                            }
                            ReportedAction::Failed => {
                                (events::Kind::Bounced, r.category, r.hard, true)
                            }
                            ReportedAction::Delayed => {
                                (events::Kind::Deferred, r.category, false, false)
                            }
                            _ => continue,
                        },
                        None => (events::Kind::Bounced, Category::Other, false, true),
                    };
                    if failed && matches!(kind, events::Kind::Bounced | events::Kind::Complaint) {
                        let domain = address.rsplit_once('@').map_or("", |(_, d)| d);
                        let sender = complaint.then(|| returned_sender_domain(message)).flatten();
                        metrics.provider_feedback(domain, complaint, sender.as_deref());
                    }
                    let mut e = Event::new(kind, &address, source);
                    e.id = id;
                    e.tag(campaign.as_ref());
                    e.status = r.and_then(|r| r.status.clone());
                    e.category = Some(category);
                    e.hard = Some(hard);
                    e.detail = r.and_then(|r| r.diagnostic.clone());
                    events.push(e);
                    // The bounce domains themselves are never suppressed (that would switch
                    // bounce intake off), nor the server's own addresses.
                    if self.is_own_address(&address) {
                        continue;
                    }
                    let entry_source = match (id, vouched) {
                        (Some(id), _) => Some(id.to_string()),
                        (None, Some(domain)) => Some(format!("feedback loop {domain}")),
                        (None, None) => None,
                    };
                    if let Some(entry) = self.feedback.suppressions.entry_for(
                        &address,
                        category,
                        hard,
                        failed,
                        entry_source,
                        now,
                    ) {
                        let mut s = Event::new(events::Kind::Suppressed, &address, source);
                        s.id = id;
                        s.tag(campaign.as_ref());
                        s.category = Some(category);
                        s.detail = Some(format!("added to the suppression list ({category})"));
                        events.push(s);
                        entries.push(entry);
                    }
                }
            }
        }
        (events, entries)
    }
}
