//! Events for upstream apps: every recipient outcome (delivered, deferred, bounced, expired,
//! complaint, suppressed) as a JSON object, queued durably in one spool outbox per webhook
//! (`Spool::push_events`) and posted from there by [`webhook`] senders, which remove events
//! only once the endpoint answered 2xx. So an event is emitted once it is in the outbox:
//! crash or endpoint down, it is posted later (at least once; receivers deduplicate by
//! `event_id`).
//!
//! Bounded: an outbox holds at most its webhook's `max_backlog` events; past it the webhook's
//! sender (the one task that removes from that outbox, so the count stays exact) drops the
//! oldest, logs it and counts them in `tern_state_evictions_total{map="webhook_events"}`. An
//! endpoint that is down for good cannot fill the spool's disk. The count starts from a scan
//! of each outbox made in the background at start ([`Events::count_backlogs`]); events in an
//! outbox before the scan finished are only bounded from then on.
//!
//! Complaints, and recipients dropped at submission because they are suppressed, also get a
//! delivery log line here (the settler logs the delivery outcomes itself; a refusal at RCPT
//! has no message id and is logged as a tracing event).

pub mod tally;
pub mod webhook;

use crate::feedback_id::FeedbackId;
use crate::live::Live;
use crate::maillog::{AttemptOutcome, AttemptRecord, DeliveryLog};
use crate::taxonomy::Category;
use crate::telemetry::Metrics;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};
use tern_queue::{MessageId, Spool, SpoolError};
use tokio::sync::Notify;
use tokio_util::task::TaskTracker;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Complaint,
    Suppressed,
    /// The recipient used a one-click (or mailto) unsubscribe link.
    Unsubscribed,
    /// A campaign's open pixel was fetched (`machine`: by a prefetcher or scanner).
    Open,
    /// A campaign's tracked link was followed (`url`; `machine` as for opens).
    Click,
    /// The app reported a conversion (`POST /api/v1/events`).
    Conversion,
}

/// One event, as posted.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub event: Kind,
    /// Unix ms.
    pub ts: u64,
    pub recipient: String,
    /// The queue id (and envelope id) the event is about, when known.
    pub queue_id: Option<MessageId>,
    pub id: Option<MessageId>,
    pub sender: Option<String>,
    /// Enhanced status code, when there is one.
    pub status: Option<String>,
    pub category: Option<Category>,
    /// Whether the failure means the address should not be mailed again.
    pub hard: Option<bool>,
    /// Remote reply, bounce diagnostic, complaint feedback type or suppression reason.
    pub detail: Option<String>,
    /// Where it was learnt: `delivery` (an attempt), `bounce` (an asynchronous bounce),
    /// `arf`, `smtp` or `http` (refused or dropped at submission), `unsubscribe` (the
    /// one-click URL) or `mailto` (an unsubscribe mail), `tracking` (the open pixel and
    /// link redirects) or `api` (`POST /api/v1/events`).
    pub source: &'static str,
    /// The sidecar campaign and the variant the message was rendered as, when it was.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Opens and clicks: a prefetch or scanner rather than a person.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub machine: Option<bool>,
    /// Clicks: the link's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Delivery outcomes: send-time optimisation planned this send (the envelope says so);
    /// only these reach the [`DeliveryObserver`]. Not published.
    #[serde(skip)]
    pub send_time_planned: bool,
}

impl Event {
    pub fn new(event: Kind, recipient: &str, source: &'static str) -> Event {
        Event {
            event,
            ts: crate::clock::now_ms(),
            recipient: recipient.to_owned(),
            queue_id: None,
            id: None,
            sender: None,
            status: None,
            category: None,
            hard: None,
            detail: None,
            source,
            campaign: None,
            variant: None,
            machine: None,
            url: None,
            send_time_planned: false,
        }
    }

    /// Names the campaign and variant of the message the event is about.
    pub fn tag(&mut self, tag: Option<&tern_queue::CampaignTag>) {
        if let Some(t) = tag {
            self.campaign = Some(t.campaign.clone());
            self.variant = t.variant.clone();
        }
    }
}

/// Told each recipient's final delivery result (the send-time model records the sends it
/// planned when they are delivered). Called from [`Events::emit`]; must not block.
pub trait DeliveryObserver: Send + Sync {
    /// Mail reached `recipient`'s server at `at_ms`.
    fn delivered(&self, recipient: &str, at_ms: u64);
    /// Mail to `recipient` bounced or expired at `at_ms`.
    fn failed(&self, recipient: &str, at_ms: u64);
}

/// Where events go: the outbox of each webhook, and the delivery log.
#[derive(Clone)]
pub struct Events {
    spool: Spool,
    /// One outbox stream per webhook (`webhook/<index>`).
    streams: Arc<Vec<String>>,
    /// Events in each outbox (as far as counted: see the module doc).
    backlogs: Arc<Vec<AtomicI64>>,
    log: DeliveryLog,
    /// Wakes the webhook senders when events were queued.
    queued: Arc<Notify>,
    /// The outboxes' backlog gauges and the posts' results.
    metrics: Arc<Metrics>,
    /// Where [`Events::emit_later`] runs, so shutdown waits for it before the last flush.
    tasks: TaskTracker,
    /// The latest bounces, expiries and complaints, newest last (the console's list).
    recent: Arc<Mutex<VecDeque<Event>>>,
    /// Campaign events counted per campaign and variant (the campaign results).
    tally: Arc<tally::Tally>,
    /// The campaigns that exist and their variants (the sidecar publishes its table here):
    /// what a report's `Feedback-ID` may name.
    campaigns: Arc<Live<HashMap<String, Vec<String>>>>,
    /// Told of delivery outcomes (set once the send-time model exists).
    observer: Arc<std::sync::OnceLock<Arc<dyn DeliveryObserver>>>,
}

/// Bounces, expiries and complaints kept in memory for [`Events::recent_failures`].
pub const RECENT_FAILURES: usize = 1000;

impl Events {
    /// Events for `webhooks` outboxes (none: only the delivery log), reported to `metrics`:
    /// the backlog gauges move with every change from now on and get the stored counts from
    /// [`Events::count_backlogs`].
    /// `tasks` is the daemon's tracker of background work (shutdown waits for it).
    pub fn new(
        spool: Spool,
        webhooks: usize,
        log: DeliveryLog,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Events {
        for i in 0..webhooks {
            metrics.webhook_registered(i);
        }
        Events {
            tally: Arc::new(tally::Tally::load(spool.clone())),
            spool,
            streams: Arc::new((0..webhooks).map(stream_name).collect()),
            backlogs: Arc::new((0..webhooks).map(|_| AtomicI64::new(0)).collect()),
            log,
            queued: Arc::new(Notify::new()),
            metrics,
            tasks,
            recent: Arc::new(Mutex::new(VecDeque::with_capacity(RECENT_FAILURES))),
            campaigns: Arc::new(Live::new(HashMap::new())),
            observer: Default::default(),
        }
    }

    /// Sets who is told of delivery outcomes (every clone shares it); once.
    pub fn observe_deliveries(&self, observer: Arc<dyn DeliveryObserver>) {
        let _ = self.observer.set(observer);
    }

    /// The campaigns that exist now, each with its variant ids (the sidecar calls this
    /// whenever its campaign table changes).
    pub fn set_campaigns(&self, campaigns: HashMap<String, Vec<String>>) {
        self.campaigns.set(campaigns);
    }

    /// The campaign and variant a report's `Feedback-ID` names, as far as they exist: an
    /// unknown campaign names nothing (a forged or stale claim is not counted for any
    /// campaign), an unknown variant only the campaign. `holdout` is the variant of the
    /// bandit's holdout.
    pub fn known_campaign(&self, claim: &FeedbackId) -> Option<tern_queue::CampaignTag> {
        attribute(&self.campaigns.get(), claim)
    }

    /// The latest bounces, expiries and complaints (at most [`RECENT_FAILURES`]), newest
    /// first; in memory only (the delivery log and the webhooks have them all).
    pub fn recent_failures(&self) -> Vec<Event> {
        let recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.iter().rev().cloned().collect()
    }

    /// Forgets `address`'s events kept in memory (the privacy erasure of a recipient); returns
    /// how many there were. Events already in a webhook outbox are the receiver's to erase.
    pub fn forget_recipient(&self, address: &str) -> usize {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let before = recent.len();
        recent.retain(|e| !e.recipient.eq_ignore_ascii_case(address));
        before - recent.len()
    }

    fn remember_failures(&self, events: &[Event]) {
        let mut recent = self
            .recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for e in events
            .iter()
            .filter(|e| matches!(e.event, Kind::Bounced | Kind::Expired | Kind::Complaint))
        {
            if recent.len() == RECENT_FAILURES {
                recent.pop_front();
            }
            recent.push_back(e.clone());
        }
    }

    /// Adds what each outbox held at start to its backlog gauge: a scan of each outbox, run in
    /// the background so a large backlog (a receiver down for a day) does not delay start-up.
    /// Blocking. Events queued or posted during the scan may be counted twice or not at all
    /// until the next restart; the gauge is a guide, the outbox is the truth.
    pub fn count_backlogs(&self) -> Result<(), SpoolError> {
        for (i, stream) in self.streams.iter().enumerate() {
            let stored = self.spool.count_events(stream)?;
            self.backlog_moved(i, i64::try_from(stored).unwrap_or(i64::MAX));
        }
        Ok(())
    }

    /// What the events emitted so far say of `campaign`, per variant.
    pub fn campaign_counts(
        &self,
        campaign: &str,
    ) -> std::collections::BTreeMap<String, tally::Counts> {
        self.tally.counts(campaign)
    }

    /// Deliveries of campaign mail since the last call, per campaign and variant.
    pub fn take_campaign_sends(
        &self,
    ) -> std::collections::HashMap<String, std::collections::BTreeMap<String, u64>> {
        self.tally.take_sends()
    }

    /// Stores the campaign counts changed since they were last stored (at shutdown).
    pub async fn flush_campaign_counts(&self) {
        self.tally.flush().await;
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Events counted in webhook `index`'s outbox.
    pub(crate) fn backlog(&self, index: usize) -> i64 {
        self.backlogs[index].load(Ordering::Relaxed)
    }

    /// `events` were queued in (positive) or removed from (negative) webhook `index`'s
    /// outbox: its count and its gauge.
    pub(crate) fn backlog_moved(&self, index: usize, events: i64) {
        self.backlogs[index].fetch_add(events, Ordering::Relaxed);
        self.metrics.webhook_backlog_moved(index, events);
    }

    pub(crate) fn queued(&self) -> Arc<Notify> {
        self.queued.clone()
    }

    /// Queues `events` in every outbox (durably) and writes the log lines of complaint and
    /// suppressed events. A spool failure is logged: events are a report of outcomes that
    /// already happened, and must not undo them.
    pub async fn emit(&self, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.remember_failures(&events);
        if let Some(observer) = self.observer.get() {
            // Only sends the model planned: other mail's deliveries never touch a profile.
            for e in events
                .iter()
                .filter(|e| e.source == "delivery" && e.send_time_planned)
            {
                match e.event {
                    Kind::Delivered => observer.delivered(&e.recipient, e.ts),
                    Kind::Bounced | Kind::Expired => observer.failed(&e.recipient, e.ts),
                    _ => {}
                }
            }
        }
        if self.tally.count(&events) {
            self.tally.flush().await;
        }
        for e in &events {
            // A suppressed line is for mail refused or dropped at submission; an address
            // added to the list is no mail outcome (the line of the bounce that added it is
            // already there).
            let outcome = match e.event {
                Kind::Complaint => AttemptOutcome::Complaint,
                Kind::Suppressed if matches!(e.source, "smtp" | "http") => {
                    AttemptOutcome::Suppressed
                }
                _ => continue,
            };
            let id = e.id.or(e.queue_id);
            if let Some(id) = id {
                self.log.record(&AttemptRecord {
                    ts: UNIX_EPOCH + Duration::from_millis(e.ts),
                    id,
                    queue_id: e.queue_id.unwrap_or(id),
                    recipient: &e.recipient,
                    sender: e.sender.as_deref().unwrap_or(""),
                    host: None,
                    ip: None,
                    source_ip: None,
                    tls_version: None,
                    tls_cipher: None,
                    tls_policy: None,
                    reply: e.detail.as_deref().unwrap_or(""),
                    outcome,
                    attempt: 0,
                    delay_s: 0.0,
                    destination: e.source,
                    category: e.category,
                    campaign: e.campaign.as_deref(),
                    variant: e.variant.as_deref(),
                });
            } else {
                tracing::info!(event = ?e.event, recipient = %e.recipient, source = e.source, detail = ?e.detail, "event");
            }
        }
        if self.streams.is_empty() {
            return;
        }
        let encoded: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).unwrap_or_default())
            .collect();
        for (i, stream) in self.streams.iter().enumerate() {
            match self.spool.push_events(stream, encoded.clone()).await {
                Ok(()) => self.backlog_moved(i, i64::try_from(encoded.len()).unwrap_or(i64::MAX)),
                Err(err) => tracing::warn!(error = %err, stream, "cannot queue events"),
            }
        }
        self.queued.notify_waiters();
    }

    /// Emits on a task of its own, for callers that cannot wait (an SMTP RCPT reply). The
    /// task belongs to the daemon's tracker: shutdown waits for it before the spool's last
    /// flush, so an event emitted just before SIGTERM is in its outbox after the restart.
    pub fn emit_later(&self, events: Vec<Event>) {
        let this = self.clone();
        self.tasks.spawn(async move { this.emit(events).await });
    }
}

pub(crate) fn stream_name(index: usize) -> String {
    format!("webhook/{index}")
}

/// What `claim` names among `campaigns` (name -> variant ids): see [`Events::known_campaign`].
fn attribute(
    campaigns: &HashMap<String, Vec<String>>,
    claim: &FeedbackId,
) -> Option<tern_queue::CampaignTag> {
    let variants = campaigns.get(&claim.campaign)?;
    let variant = claim
        .variant
        .as_ref()
        .filter(|v| v.as_str() == "holdout" || variants.iter().any(|k| k == *v))
        .cloned();
    Some(tern_queue::CampaignTag {
        campaign: claim.campaign.clone(),
        variant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_names_only_campaigns_and_variants_that_exist() {
        let campaigns: HashMap<String, Vec<String>> =
            [("spring".to_owned(), vec!["a".to_owned(), "b".to_owned()])].into();
        let claim = |c: &str, v: Option<&str>| FeedbackId {
            campaign: c.to_owned(),
            variant: v.map(str::to_owned),
        };
        let tag = |c: &str, v: Option<&str>| tern_queue::CampaignTag {
            campaign: c.to_owned(),
            variant: v.map(str::to_owned),
        };
        assert_eq!(
            attribute(&campaigns, &claim("spring", Some("b"))),
            Some(tag("spring", Some("b")))
        );
        assert_eq!(
            attribute(&campaigns, &claim("spring", Some("holdout"))),
            Some(tag("spring", Some("holdout")))
        );
        // A variant the campaign does not have: the campaign only.
        assert_eq!(
            attribute(&campaigns, &claim("spring", Some("zz"))),
            Some(tag("spring", None))
        );
        assert_eq!(
            attribute(&campaigns, &claim("spring", None)),
            Some(tag("spring", None))
        );
        // A campaign that does not exist (or differs in case): nothing.
        assert_eq!(attribute(&campaigns, &claim("nosuch", Some("a"))), None);
        assert_eq!(attribute(&campaigns, &claim("Spring", Some("a"))), None);
    }
}
