//! Per campaign and variant counts of the events emitted: the numbers
//! `GET /api/v1/campaigns/{name}/results` reports, counted where every event passes
//! ([`super::Events::emit`]), so the results cannot disagree with what the webhooks got.
//!
//! Counted: `delivered` as a send (a 2xx from the receiver, not a plan), `bounced` and
//! `expired` as bounces, `complaint`, `unsubscribed`, `open` (human and machine apart),
//! `click` (human only; a scanner's click is no interest), `conversion`. Events without a
//! campaign are not counted. Deliveries since the last [`Tally::take_sends`] are also kept
//! apart for the bandit, which learns from delivered sends only.
//!
//! Stored in the spool (meta `campaign/results/<campaign>`) at most every
//! [`FLUSH_EVERY`] and at shutdown ([`Tally::flush`]): a crash loses at most that much of the
//! counts (the webhooks' outboxes and the delivery log keep every event). Bounded: counts
//! are kept for at most [`MAX_CAMPAIGNS`] campaigns (the oldest-created beyond it are not
//! counted, and said so once in the log) and [`MAX_VARIANTS`] variants each.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tern_queue::Spool;

use super::{Event, Kind};

/// Spool meta names of the stored counts.
pub const RESULTS_META: &str = "campaign/results/";
/// How often changed counts are written to the spool at most.
pub const FLUSH_EVERY: Duration = Duration::from_secs(2);
/// Campaigns counted at most.
pub const MAX_CAMPAIGNS: usize = 10_000;
/// Variants counted per campaign at most (a campaign has a handful; events come from
/// tokens and the app, so the bound is against bad input, not real campaigns).
pub const MAX_VARIANTS: usize = 64;
/// The variant name counts of mail without a variant are kept under.
pub const NO_VARIANT: &str = "-";

/// What happened to the mail of one variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Delivered (a 2xx from the receiver).
    pub sends: u64,
    /// Bounced or expired.
    pub bounces: u64,
    pub human_opens: u64,
    pub machine_opens: u64,
    /// Human clicks.
    pub clicks: u64,
    pub unsubscribes: u64,
    pub complaints: u64,
    pub conversions: u64,
}

impl Counts {
    /// Adds the counts of `other` (stored counts loaded after some were counted).
    fn merge(&mut self, other: &Counts) {
        self.sends += other.sends;
        self.bounces += other.bounces;
        self.human_opens += other.human_opens;
        self.machine_opens += other.machine_opens;
        self.clicks += other.clicks;
        self.unsubscribes += other.unsubscribes;
        self.complaints += other.complaints;
        self.conversions += other.conversions;
    }

    /// Adds `event` (of this variant); whether it counted.
    fn add(&mut self, event: &Event) -> bool {
        let machine = event.machine == Some(true);
        let field = match event.event {
            Kind::Delivered => &mut self.sends,
            Kind::Bounced | Kind::Expired => &mut self.bounces,
            Kind::Open if machine => &mut self.machine_opens,
            Kind::Open => &mut self.human_opens,
            Kind::Click if machine => return false,
            Kind::Click => &mut self.clicks,
            Kind::Unsubscribed => &mut self.unsubscribes,
            Kind::Complaint => &mut self.complaints,
            Kind::Conversion => &mut self.conversions,
            Kind::Deferred | Kind::Suppressed => return false,
        };
        *field += 1;
        true
    }
}

#[derive(Default)]
struct State {
    /// Per campaign, per variant.
    counts: HashMap<String, BTreeMap<String, Counts>>,
    /// Campaigns changed since the last flush.
    dirty: HashSet<String>,
    /// Deliveries not yet taken by the bandit, per campaign and variant.
    sends: HashMap<String, BTreeMap<String, u64>>,
    last_flush: Option<Instant>,
    /// Whether the campaign bound was met (logged once).
    full: bool,
    /// Whether the stored counts were read (they are merged into what was counted before:
    /// the daemon starts taking mail while the spool is still opening).
    loaded: bool,
}

pub struct Tally {
    spool: Spool,
    state: Mutex<State>,
}

impl Tally {
    /// The counts stored in `spool` (unreadable records are logged and start from zero);
    /// read now if the spool is open, else on first need once it is (counts made meanwhile
    /// are kept and added to them).
    pub fn load(spool: Spool) -> Tally {
        let tally = Tally {
            spool,
            state: Mutex::new(State::default()),
        };
        if tally.spool.is_open() {
            tally.load_stored();
        }
        tally
    }

    /// Merges the stored counts into the state, once; call only with the spool open.
    fn load_stored(&self) {
        if self.state().loaded {
            return;
        }
        let stored = match self.spool.scan_meta(RESULTS_META) {
            Ok(stored) => stored,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored campaign results");
                Vec::new()
            }
        };
        let mut state = self.state();
        if state.loaded {
            return;
        }
        state.loaded = true;
        for (key, bytes) in stored {
            let name = key[RESULTS_META.len()..].to_owned();
            match serde_json::from_slice::<BTreeMap<String, Counts>>(&bytes) {
                Ok(counts) => {
                    let per_variant = state.counts.entry(name).or_default();
                    for (variant, stored) in counts {
                        per_variant.entry(variant).or_default().merge(&stored);
                    }
                }
                Err(e) => {
                    tracing::warn!(campaign = %name, error = %e, "stored campaign results unreadable: counted from zero")
                }
            }
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts the campaign events among `events`; whether a flush is due.
    pub fn count(&self, events: &[Event]) -> bool {
        let mut state = self.state();
        for e in events {
            let Some(campaign) = &e.campaign else {
                continue;
            };
            let variant = e.variant.as_deref().unwrap_or(NO_VARIANT);
            let known = state.counts.contains_key(campaign);
            if !known && state.counts.len() >= MAX_CAMPAIGNS {
                if !state.full {
                    state.full = true;
                    tracing::warn!(
                        campaign = %campaign,
                        "campaign results: {MAX_CAMPAIGNS} campaigns counted already; further ones are not"
                    );
                }
                continue;
            }
            let per_variant = state.counts.entry(campaign.clone()).or_default();
            if !per_variant.contains_key(variant) && per_variant.len() >= MAX_VARIANTS {
                continue;
            }
            if per_variant.entry(variant.to_owned()).or_default().add(e) {
                state.dirty.insert(campaign.clone());
                if e.event == Kind::Delivered {
                    *state
                        .sends
                        .entry(campaign.clone())
                        .or_default()
                        .entry(variant.to_owned())
                        .or_default() += 1;
                }
            }
        }
        !state.dirty.is_empty() && state.last_flush.is_none_or(|t| t.elapsed() >= FLUSH_EVERY)
    }

    /// The counts of `campaign`, per variant (empty before any event).
    pub fn counts(&self, campaign: &str) -> BTreeMap<String, Counts> {
        if self.spool.is_open() {
            self.load_stored();
        }
        self.state()
            .counts
            .get(campaign)
            .cloned()
            .unwrap_or_default()
    }

    /// Deliveries since the last call, per campaign and variant (the bandit's sends).
    pub fn take_sends(&self) -> HashMap<String, BTreeMap<String, u64>> {
        std::mem::take(&mut self.state().sends)
    }

    /// Writes the changed campaigns' counts to the spool.
    pub async fn flush(&self) {
        // Never write a campaign's counts before the stored ones were added to them.
        if let Err(e) = self.spool.ready().await {
            tracing::warn!(error = %e, "cannot store the campaign results");
            return;
        }
        self.load_stored();
        let changed: Vec<(String, Vec<u8>)> = {
            let mut state = self.state();
            state.last_flush = Some(Instant::now());
            let dirty = std::mem::take(&mut state.dirty);
            dirty
                .into_iter()
                .filter_map(|c| {
                    let bytes = serde_json::to_vec(state.counts.get(&c)?).ok()?;
                    Some((c, bytes))
                })
                .collect()
        };
        for (campaign, bytes) in changed {
            if let Err(e) = self
                .spool
                .put_meta(&format!("{RESULTS_META}{campaign}"), bytes)
                .await
            {
                tracing::warn!(campaign = %campaign, error = %e, "cannot store the campaign results");
                self.state().dirty.insert(campaign);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: Kind, variant: Option<&str>, machine: Option<bool>) -> Event {
        let mut e = Event::new(kind, "r@x.test", "test");
        e.campaign = Some("c".into());
        e.variant = variant.map(str::to_owned);
        e.machine = machine;
        e
    }

    #[tokio::test]
    async fn counts_each_kind_apart_survive_a_reload_and_hand_sends_to_the_bandit_once() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let tally = Tally::load(spool.clone());
        let events = vec![
            event(Kind::Delivered, Some("a"), None),
            event(Kind::Delivered, Some("a"), None),
            event(Kind::Delivered, None, None),
            event(Kind::Bounced, Some("a"), None),
            event(Kind::Expired, Some("a"), None),
            event(Kind::Open, Some("a"), Some(false)),
            event(Kind::Open, Some("a"), Some(true)),
            event(Kind::Click, Some("a"), Some(false)),
            event(Kind::Click, Some("a"), Some(true)),
            event(Kind::Unsubscribed, Some("a"), None),
            event(Kind::Complaint, Some("a"), None),
            event(Kind::Conversion, Some("a"), None),
            event(Kind::Deferred, Some("a"), None),
            Event::new(Kind::Delivered, "plain@x.test", "delivery"),
        ];
        assert!(tally.count(&events), "the first change is flushed at once");
        let a = tally.counts("c")["a"];
        assert_eq!(
            a,
            Counts {
                sends: 2,
                bounces: 2,
                human_opens: 1,
                machine_opens: 1,
                clicks: 1,
                unsubscribes: 1,
                complaints: 1,
                conversions: 1,
            }
        );
        assert_eq!(tally.counts("c")[NO_VARIANT].sends, 1);
        let sends = tally.take_sends();
        assert_eq!(sends["c"]["a"], 2);
        assert!(tally.take_sends().is_empty());
        tally.flush().await;
        assert!(
            !tally.count(&[event(Kind::Open, Some("a"), None)]),
            "not due again yet"
        );
        let reloaded = Tally::load(spool);
        assert_eq!(reloaded.counts("c")["a"].sends, 2);
    }

    #[test]
    fn variants_per_campaign_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let tally = Tally::load(Spool::open(dir.path()).unwrap());
        let events: Vec<Event> = (0..MAX_VARIANTS + 10)
            .map(|i| event(Kind::Delivered, Some(&format!("v{i}")), None))
            .collect();
        tally.count(&events);
        assert_eq!(tally.counts("c").len(), MAX_VARIANTS);
    }
}
