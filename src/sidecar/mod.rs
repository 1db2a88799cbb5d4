//! The sidecar: the pre-enqueue stage that turns a campaign request into per-recipient mail.
//!
//! [`Sidecar::apply`] is the first stage [`crate::intake`] runs, before the Received header
//! and DKIM signing. It strips every `X-Tern-*` control header ([`control`]), and for a message
//! that names a campaign (header `X-Tern-Campaign` or the `sidecar` field of
//! `POST /api/v1/inject`) renders the campaign's minijinja templates once per recipient:
//! the [`bandit`] picks the variant, [`generate`] gets the named slots from the [`model`]
//! (once per campaign, variant and segment, shared; cleaned by [`guard`]) within the
//! deadline, [`tracking`] rewrites links and adds the open pixel. The
//! send-time request comes out typed ([`SendAt`](crate::message::SendAt)); [`crate::sendtime`] (engagement events, the
//! per-recipient send-time model, the simulator) turns `Optimize` into each recipient's
//! `not_before`.
//!
//! Invariants: mail without control headers or a `sidecar` request never gets here (the
//! stage checks [`wanted`], a scan of the header section); the stage never fails a message:
//! an unknown campaign, bad data, a template error, a model failure or a missed deadline all
//! fall back (plain message or the slots' defaults) and say why; the message's own headers
//! (From, To, List-Unsubscribe, List-Unsubscribe-Post, ...) are kept byte for byte, only
//! Subject and the MIME body are replaced and every campaign message gets exactly one
//! `Feedback-ID` of tern's ([`crate::feedback_id`], a submitted one removed); generated text
//! reaches only its slot. The events always know the campaign table's names and variants
//! (published at start and with every change), so a report's `Feedback-ID` is believed only
//! for a campaign that exists.

pub mod bandit;
pub mod campaigns;
pub mod control;
pub mod generate;
pub mod guard;
pub mod model;
pub mod results;
pub mod tracking;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mail_builder::headers::text::Text;
use mail_builder::headers::Header as _;
use mail_builder::mime::MimePart;
use rand::Rng as _;
use serde::Serialize;
use serde_json::{Map, Value};
use tern_queue::{CampaignTag, Recipient, Spool};
use tracing::{debug, info, warn};

use crate::config::{BanditConfig, SidecarConfig};
use crate::events::{Event, Events, Kind};
use crate::live::Live;
use crate::message::{CampaignReport, OneClick, Prepared, SendAt, Stage, StageFuture, Submission};
use crate::telemetry::Metrics;
use campaigns::{Campaign, CampaignError, CampaignInfo, Change, State};
use generate::{Generated, Generator, Want};
use model::Model;
use tracking::{Claims, Replays, Tracker};

/// Whether `sub` needs the stage at all (the plain path's only cost is this header scan).
pub fn wanted(sub: &Submission) -> bool {
    sub.sidecar.is_some() || control::has_control_headers(&sub.content)
}

/// An open or a click from the tracking endpoints (`POST /api/v1/events` feeds the event
/// store directly).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Engagement {
    pub kind: EngagementKind,
    pub campaign: String,
    pub recipient: String,
    pub variant: Option<String>,
    pub message_id: String,
    pub url: Option<String>,
    pub at_ms: u64,
    /// A prefetch or scanner, not a person: never counts as engagement.
    pub machine: bool,
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EngagementKind {
    Open,
    Click,
}

/// Where engagement goes beyond the bandit and the recent list (the send-time event store
/// implements it, so tracked opens and clicks shape profiles and scores).
pub trait EngagementSink: Send + Sync {
    fn record(&self, event: Engagement);

    /// Whether mail from a sender identity with a win-back campaign, to `recipient` at
    /// `now_ms`, is the next send of their win-back series (and if so it is counted in the
    /// series). The send-time service answers from the lifecycle; the default: never.
    fn take_winback_send<'a>(
        &'a self,
        recipient: &'a str,
        now_ms: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        let _ = (recipient, now_ms);
        Box::pin(std::future::ready(false))
    }
}

/// Win-back sends asked of the lifecycle at once (one profile read-modify-write each).
const WINBACK_PARALLEL: usize = 256;

/// The sender identity of a message: its first From address, lowercased.
pub fn from_identity(content: &[u8]) -> Option<String> {
    let message = mail_parser::MessageParser::new().parse_headers(content)?;
    let address = message.from()?.first()?.address()?;
    Some(address.to_ascii_lowercase())
}

/// The most recent events in memory (for operators' and tests' inspection).
#[derive(Default)]
pub struct RecentEngagement {
    events: Mutex<std::collections::VecDeque<Engagement>>,
}

impl RecentEngagement {
    const KEEP: usize = 10_000;

    pub fn events(&self) -> Vec<Engagement> {
        self.events
            .lock()
            .expect("events lock")
            .iter()
            .cloned()
            .collect()
    }
}

impl RecentEngagement {
    /// Forgets `address`'s events; returns how many there were.
    pub fn forget(&self, address: &str) -> usize {
        let mut events = self.events.lock().expect("events lock");
        let before = events.len();
        events.retain(|e| !e.recipient.eq_ignore_ascii_case(address));
        before - events.len()
    }
}

impl EngagementSink for RecentEngagement {
    fn record(&self, event: Engagement) {
        let mut events = self.events.lock().expect("events lock");
        if events.len() == Self::KEEP {
            events.pop_front();
        }
        events.push_back(event);
    }
}

pub struct Sidecar {
    /// Config and API campaigns; a change swaps the whole table ([`campaigns`]).
    campaigns: Live<campaigns::Table>,
    /// Campaign changes, one at a time (stored, then swapped in).
    changes: tokio::sync::Mutex<()>,
    /// Whether `[sidecar.tracking]` is configured (an API campaign may ask for tracking).
    tracking_on: bool,
    generator: Generator,
    deadline: Duration,
    tracker: Option<Tracker>,
    /// Tracking hits counted already (a replay is served, not counted).
    replays: Mutex<Replays>,
    bandit_config: BanditConfig,
    bandits: Mutex<HashMap<String, bandit::Bandit>>,
    sink: Arc<dyn EngagementSink>,
    /// Opens and clicks become events (webhooks, campaign results); delivered campaign mail
    /// comes back from them as the bandit's sends.
    events: Events,
    /// The last results computed per campaign, with the counts they came from.
    results_cache: Mutex<ResultsCache>,
    recent: RecentEngagement,
    hostname: String,
    spool: Spool,
    metrics: Arc<Metrics>,
    /// The fleet's store (`[cluster]`): bandit counts are shared there.
    cluster: Option<Arc<crate::cluster::Store>>,
    /// Per campaign, batches the fleet's store has not confirmed yet, oldest first, each with
    /// the id that makes adding it idempotent.
    unsent: Mutex<HashMap<String, Vec<UnsentBatch>>>,
    /// `sidecar.feedback_sender_id`: the last field of every `Feedback-ID`.
    feedback_sender_id: String,
}

/// What the events may attribute a report to: each campaign's name and variant ids.
fn published(table: &campaigns::Table) -> HashMap<String, Vec<String>> {
    table
        .iter()
        .map(|(name, c)| (name.clone(), c.variants.clone()))
        .collect()
}

/// Per campaign: the counts per variant and the results computed from them.
type ResultsCache = HashMap<
    String,
    (
        Vec<(String, crate::events::tally::Counts)>,
        Vec<results::VariantResults>,
    ),
>;

/// A bandit batch the fleet's store has not confirmed: its id and its counts per arm.
type UnsentBatch = (String, BTreeMap<String, bandit::Arm>);

/// Adds a bandit batch to a campaign's shared counts once (KEYS[2] marks the batch id done
/// for a day), then returns the counts. ARGV: field, delta pairs.
const SHARED_BATCH: &str = r"
if redis.call('SET', KEYS[2], '1', 'NX', 'EX', 86400) then
  for i = 1, #ARGV, 2 do redis.call('HINCRBYFLOAT', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return redis.call('HGETALL', KEYS[1])
";

/// Spool meta names of the bandits' posteriors.
const BANDIT_META: &str = "sidecar/bandit/";

impl Sidecar {
    /// Compiles the campaigns, loads the tracking key and the bandits' stored posteriors.
    /// Tracked engagement goes to `sink` (the send-time event store) as well as the recent
    /// list. Errors name the config key.
    pub fn new(
        config: &SidecarConfig,
        hostname: &str,
        spool: Spool,
        metrics: Arc<Metrics>,
        sink: Arc<dyn EngagementSink>,
        events: Events,
        cluster: Option<Arc<crate::cluster::Store>>,
    ) -> Result<Sidecar, String> {
        let campaigns = campaigns::load(&config.campaigns, &spool, config.tracking.is_some())?;
        let mut bandits = HashMap::new();
        for c in campaigns.values() {
            if let Some(b) = load_bandit(&spool, c)? {
                bandits.insert(c.config.name.clone(), b);
            }
        }
        let model = config
            .model
            .clone()
            .map(|m| Model::new(m, metrics.clone()).map(Arc::new))
            .transpose()?;
        let generator = Generator::new(model, metrics.clone());
        // Configured segments are generated now, ahead of the campaign's first message.
        if tokio::runtime::Handle::try_current().is_ok() {
            for c in campaigns.values() {
                for segment in &c.config.segments {
                    let policy = bandit::Policy::of(&config.bandit, c.config.bandit.as_ref());
                    generator.prefetch(&c.config, c.version, policy.holdout > 0.0, segment);
                }
            }
        }
        let tracker = config.tracking.as_ref().map(Tracker::load).transpose()?;
        let replays = Replays::new(config.tracking.as_ref().map_or(1, |t| t.replay_entries));
        events.set_campaigns(published(&campaigns));
        Ok(Sidecar {
            campaigns: Live::new(campaigns),
            changes: tokio::sync::Mutex::new(()),
            tracking_on: config.tracking.is_some(),
            deadline: config.model.as_ref().map_or(Duration::ZERO, |m| m.deadline),
            generator,
            tracker,
            replays: Mutex::new(replays),
            bandit_config: config.bandit.clone(),
            bandits: Mutex::new(bandits),
            sink,
            events,
            results_cache: Mutex::new(HashMap::new()),
            recent: RecentEngagement::default(),
            hostname: hostname.to_owned(),
            spool,
            metrics,
            cluster,
            unsent: Mutex::new(HashMap::new()),
            feedback_sender_id: config.feedback_sender_id.clone(),
        })
    }

    /// The most recent engagement events (at most 10,000).
    pub fn recent_engagement(&self) -> Vec<Engagement> {
        self.recent.events()
    }

    /// Forgets `address`'s tracked opens and clicks kept in memory (the privacy erasure of a
    /// recipient); returns how many there were.
    pub fn forget_recipient(&self, address: &str) -> usize {
        self.recent.forget(address)
    }

    /// The longest a message waits in the stage for generated text.
    pub fn render_deadline(&self) -> Duration {
        self.deadline
    }

    pub fn tracker(&self) -> Option<&Tracker> {
        self.tracker.as_ref()
    }

    /// The win-back campaign of the message's sender identity (its From address, else its
    /// From domain), if a campaign that is not archived names it in `winback_for`.
    fn winback_campaign(&self, content: &[u8]) -> Option<Arc<Campaign>> {
        let table = self.campaigns.get();
        let names_one =
            |c: &Arc<Campaign>| c.state != State::Archived && c.config.winback_for.is_some();
        if !table.values().any(names_one) {
            return None;
        }
        let from = from_identity(content)?;
        let domain = from.rsplit_once('@').map(|(_, d)| d)?;
        let of = |identity: &str| {
            table
                .values()
                .filter(|c| names_one(c))
                .find(|c| {
                    c.config
                        .winback_for
                        .as_deref()
                        .is_some_and(|w| w.eq_ignore_ascii_case(identity))
                })
                .cloned()
        };
        of(&from).or_else(|| of(domain))
    }

    /// Whether the stage has work on `sub`: a campaign request, control headers, or mail
    /// from a sender identity with a win-back campaign.
    pub fn wants(&self, sub: &Submission) -> bool {
        wanted(sub) || self.winback_campaign(&sub.content).is_some()
    }

    /// Whether mail may name campaign `name` now: it exists and is not archived.
    pub fn has_campaign(&self, name: &str) -> bool {
        self.campaigns
            .get()
            .get(name)
            .is_some_and(|c| c.state != State::Archived)
    }

    /// Every campaign (name order): config and API ones, with state and version.
    pub fn campaign_list(&self) -> Vec<CampaignInfo> {
        let mut out: Vec<CampaignInfo> = self.campaigns.get().values().map(|c| c.info()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// What the events say of campaign `name`, per variant, with each rate's posterior
    /// ([`results`]): its variants in definition order, then the holdout and any other
    /// variant events named (an earlier version's, `-` for mail without one). `None`: no
    /// such campaign.
    pub fn campaign_results(&self, name: &str) -> Option<CampaignResults> {
        let info = self.campaign_info(name)?;
        let mut counts = self.events.campaign_counts(name);
        let table = self.campaigns.get();
        let configured = table
            .get(name)
            .map(|c| c.variants.clone())
            .unwrap_or_default();
        let mut variants: Vec<(String, crate::events::tally::Counts)> = configured
            .iter()
            .map(|v| (v.clone(), counts.remove(v).unwrap_or_default()))
            .collect();
        if configured.is_empty() && !counts.contains_key(crate::events::tally::NO_VARIANT) {
            variants.push((
                crate::events::tally::NO_VARIANT.to_owned(),
                Default::default(),
            ));
        }
        if let Some(h) = counts.remove(bandit::HOLDOUT) {
            variants.push((bandit::HOLDOUT.to_owned(), h));
        }
        variants.extend(counts);
        // The Monte Carlo part is not free: the same counts give the same results.
        let computed = {
            let cache = self.results_cache.lock().expect("results lock");
            cache
                .get(name)
                .filter(|(input, _)| *input == variants)
                .map(|(_, r)| r.clone())
        };
        let computed = computed.unwrap_or_else(|| {
            let r = results::compute(&variants);
            let mut cache = self.results_cache.lock().expect("results lock");
            if cache.len() >= 1_000 {
                cache.clear();
            }
            cache.insert(name.to_owned(), (variants, r.clone()));
            r
        });
        let bandit = table.get(name).map(|c| self.policy(c));
        Some(CampaignResults {
            campaign: info.name,
            state: info.state,
            version: info.version,
            bandit,
            variants: computed,
        })
    }

    /// Sets the campaign results gauges: the first
    /// [`CAMPAIGNS_EXPORTED`](crate::telemetry::CAMPAIGNS_EXPORTED) campaigns that are not
    /// archived (by name), their first
    /// [`VARIANTS_EXPORTED`](crate::telemetry::VARIANTS_EXPORTED) variants.
    pub fn export_results(&self) {
        use crate::telemetry::{CampaignGauges, CAMPAIGNS_EXPORTED, VARIANTS_EXPORTED};
        let mut rows = Vec::new();
        for info in self
            .campaign_list()
            .into_iter()
            .filter(|c| c.state != State::Archived)
            .take(CAMPAIGNS_EXPORTED)
        {
            let Some(r) = self.campaign_results(&info.name) else {
                continue;
            };
            for v in r.variants.into_iter().take(VARIANTS_EXPORTED) {
                let c = v.counts;
                rows.push(CampaignGauges {
                    campaign: r.campaign.clone(),
                    variant: v.variant,
                    counts: vec![
                        ("sends", c.sends),
                        ("bounces", c.bounces),
                        ("human_opens", c.human_opens),
                        ("machine_opens", c.machine_opens),
                        ("clicks", c.clicks),
                        ("unsubscribes", c.unsubscribes),
                        ("complaints", c.complaints),
                        ("conversions", c.conversions),
                    ],
                    rates: v
                        .rates
                        .iter()
                        .map(|(name, x)| (*name, x.mean, x.low, x.high, x.best))
                        .collect(),
                });
            }
        }
        self.metrics.set_campaign_results(&rows);
    }

    /// One campaign as the API shows it.
    pub fn campaign_info(&self, name: &str) -> Option<CampaignInfo> {
        self.campaigns.get().get(name).map(|c| c.info())
    }

    /// Creates, updates, pauses, resumes or archives a campaign (`name`: `None` only for
    /// [`Change::Create`]): validated as the config file is, stored durably, then swapped
    /// into the table the stage reads. An update starts the new version's generation of the
    /// campaign's named segments and forgets the old version's text.
    pub async fn change_campaign(
        &self,
        name: Option<&str>,
        change: Change,
    ) -> Result<CampaignInfo, CampaignError> {
        let _one = self.changes.lock().await;
        let table = self.campaigns.get();
        let campaign = campaigns::plan(
            &table,
            name,
            change,
            self.tracking_on,
            crate::clock::now_ms(),
        )?;
        let bandit = load_bandit(&self.spool, &campaign).map_err(CampaignError::Spool)?;
        campaigns::store(&self.spool, &campaign).await?;
        let info = campaign.info();
        let campaign = Arc::new(campaign);
        {
            let mut bandits = self.bandits.lock().expect("bandit lock");
            match (bandits.get_mut(&info.name), bandit) {
                (Some(b), _) => b.ensure(&campaign.variants),
                (None, Some(b)) => {
                    bandits.insert(info.name.clone(), b);
                }
                (None, None) => {}
            }
        }
        let mut next = (*table).clone();
        next.insert(info.name.clone(), campaign.clone());
        self.events.set_campaigns(published(&next));
        self.campaigns.set(next);
        self.generator.forget(&info.name, Some(campaign.version));
        if campaign.state != State::Archived {
            for segment in &campaign.config.segments {
                self.generator.prefetch(
                    &campaign.config,
                    campaign.version,
                    self.policy(&campaign).holdout > 0.0,
                    segment,
                );
            }
        }
        Ok(info)
    }

    /// The campaign's send-time request parsed (for the API's 400 before anything is queued).
    pub fn send_time(&self, campaign: Option<&str>, text: &str) -> Result<SendAt, String> {
        let table = self.campaigns.get();
        let c = campaign.and_then(|c| table.get(c));
        control::parse_send_time(
            text,
            c.map_or(Duration::from_secs(86_400), |c| c.config.send_window),
            c.and_then(|c| c.config.quiet_hours),
        )
    }

    /// Records an engagement: a human one rewards the variant it was sent as (in the pending
    /// batch), then it goes to the recent list and the sink.
    pub fn engagement(&self, event: Engagement) {
        self.metrics
            .sidecar_engagement(event.kind == EngagementKind::Click, event.machine);
        if !event.machine {
            if let Some(variant) = &event.variant {
                if let Some(b) = self
                    .bandits
                    .lock()
                    .expect("bandit lock")
                    .get_mut(&event.campaign)
                {
                    b.reward(variant, &event.message_id);
                }
            }
        }
        let mut e = Event::new(
            match event.kind {
                EngagementKind::Open => Kind::Open,
                EngagementKind::Click => Kind::Click,
            },
            &event.recipient,
            "tracking",
        );
        e.ts = event.at_ms;
        e.campaign = Some(event.campaign.clone());
        e.variant = event.variant.clone();
        e.machine = Some(event.machine);
        e.url = event.url.clone();
        e.detail = Some(format!("message {}", event.message_id));
        self.events.emit_later(vec![e]);
        self.recent.record(event.clone());
        self.sink.record(event);
    }

    /// Folds pending sends and rewards into the posteriors and stores them in the spool. In
    /// a fleet the batch is added to the shared counts instead (HINCRBYFLOAT, one hash per
    /// campaign) and the posteriors become the fleet's totals; a batch Redis did not take
    /// counts here at once and is added there with the next batch that gets through.
    pub async fn apply_bandit_batch(&self) {
        // Sends are the campaign mail delivered since the last batch (a 2xx from the
        // receiver), not the variants chosen: bounced or still queued mail taught nothing.
        let delivered = self.events.take_campaign_sends();
        {
            let mut bandits = self.bandits.lock().expect("bandit lock");
            for (campaign, variants) in delivered {
                if let Some(b) = bandits.get_mut(&campaign) {
                    for (variant, n) in variants {
                        b.sent(&variant, n as f64);
                    }
                }
            }
        }
        if let Some(store) = &self.cluster {
            return self.apply_shared_batch(store).await;
        }
        let changed: Vec<(String, Vec<u8>)> = {
            let mut bandits = self.bandits.lock().expect("bandit lock");
            bandits
                .iter_mut()
                .filter_map(|(name, b)| {
                    b.apply_batch()
                        .then(|| (name.clone(), serde_json::to_vec(&*b).expect("serialize")))
                })
                .collect()
        };
        for (name, state) in changed {
            if let Err(e) = self
                .spool
                .put_meta(&format!("{BANDIT_META}{name}"), state)
                .await
            {
                warn!(campaign = %name, error = %e, "cannot store the bandit state");
            }
        }
    }

    async fn apply_shared_batch(&self, store: &crate::cluster::Store) {
        let names: Vec<String> = {
            let mut bandits = self.bandits.lock().expect("bandit lock");
            let mut unsent = self.unsent.lock().expect("bandit lock");
            for (name, b) in bandits.iter_mut() {
                let batch = b.take_batch();
                if !batch.is_empty() {
                    let id = format!("{}:{:016x}", store.node(), rand::random::<u64>());
                    unsent.entry(name.clone()).or_default().push((id, batch));
                }
            }
            bandits.keys().cloned().collect()
        };
        for name in names {
            let key = store.key(&format!("bandit:{name}"));
            let waiting = self
                .unsent
                .lock()
                .expect("bandit lock")
                .get(&name)
                .cloned()
                .unwrap_or_default();
            // The oldest batch first; with none waiting, only the totals are read.
            let mut totals = None;
            let mut failed = None;
            for (id, batch) in waiting
                .iter()
                .map(|(i, b)| (Some(i), b))
                .chain(waiting.is_empty().then_some((None, &BTreeMap::new())))
            {
                let mut cmd = redis::cmd("EVAL");
                cmd.arg(SHARED_BATCH)
                    .arg(2)
                    .arg(&key)
                    .arg(store.key(&format!("bandit:done:{}", id.map_or("-", |s| s))));
                for (v, arm) in batch {
                    cmd.arg(format!("{v}:sends")).arg(arm.sends);
                    cmd.arg(format!("{v}:rewards")).arg(arm.rewards);
                }
                match store.query::<HashMap<String, f64>>(&cmd).await {
                    Ok(t) => {
                        totals = Some(t);
                        if let Some(id) = id {
                            if let Some(w) = self.unsent.lock().expect("bandit lock").get_mut(&name)
                            {
                                w.retain(|(i, _)| i != id);
                            }
                        }
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            let state = {
                let mut bandits = self.bandits.lock().expect("bandit lock");
                let Some(b) = bandits.get_mut(&name) else {
                    continue;
                };
                if let Some(totals) = totals {
                    let mut arms: BTreeMap<String, bandit::Arm> = BTreeMap::new();
                    for (field, value) in totals {
                        if let Some((v, what)) = field.rsplit_once(':') {
                            let arm = arms.entry(v.to_owned()).or_default();
                            match what {
                                "sends" => arm.sends = value,
                                "rewards" => arm.rewards = value,
                                _ => {}
                            }
                        }
                    }
                    b.set_arms(arms);
                }
                if let Some(e) = failed {
                    // Counted here now, so this node's choices move; the fleet's counts
                    // get the batches when the store answers again (then replace these).
                    warn!(campaign = %name, error = %e, "bandit counts not shared yet");
                    for (_, batch) in self
                        .unsent
                        .lock()
                        .expect("bandit lock")
                        .get(&name)
                        .into_iter()
                        .flatten()
                    {
                        b.add(batch);
                    }
                }
                serde_json::to_vec(&*b).expect("serialize")
            };
            if let Err(e) = self
                .spool
                .put_meta(&format!("{BANDIT_META}{name}"), state)
                .await
            {
                warn!(campaign = %name, error = %e, "cannot store the bandit state");
            }
        }
    }

    /// Runs [`Sidecar::apply_bandit_batch`] every `sidecar.bandit.batch_interval` until the
    /// token is cancelled (and once more then).
    pub async fn run_batches(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.bandit_config.batch_interval);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => self.apply_bandit_batch().await,
                _ = stop.cancelled() => break,
            }
        }
        self.apply_bandit_batch().await;
        self.events.flush_campaign_counts().await;
    }

    /// Every configured campaign (name order) with its variant ids (config order).
    pub fn campaigns(&self) -> Vec<(String, Vec<String>)> {
        let mut out: Vec<(String, Vec<String>)> = self
            .campaigns
            .get()
            .iter()
            .map(|(name, c)| (name.clone(), c.variants.clone()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The bandit's applied counts of a campaign (sends, rewards per variant).
    pub fn bandit_arms(&self, campaign: &str) -> BTreeMap<String, bandit::Arm> {
        self.bandits
            .lock()
            .expect("bandit lock")
            .get(campaign)
            .map(|b| b.arms.clone())
            .unwrap_or_default()
    }

    /// The stage: see the module doc.
    /// Whether campaign `name` asks for one-click unsubscribe headers.
    pub fn campaign_unsubscribes(&self, name: &str) -> bool {
        self.campaigns
            .get()
            .get(name)
            .is_some_and(|c| c.config.unsubscribe)
    }

    /// The list a one-click unsubscribe of this mail would apply to, when it asks for one:
    /// `one_click` (the API field or header), or `campaign` when that campaign asks.
    pub fn unsubscribe_list(
        &self,
        one_click: Option<&OneClick>,
        campaign: Option<&str>,
        sender: &str,
    ) -> Option<String> {
        let asks = one_click.is_some() || campaign.is_some_and(|c| self.campaign_unsubscribes(c));
        asks.then(|| {
            crate::unsubscribe::list_name(
                one_click.and_then(|o| o.list.as_deref()),
                campaign,
                sender,
            )
        })
    }

    pub async fn apply(&self, mut sub: Submission) -> Vec<Prepared> {
        let request = sub.sidecar.take().unwrap_or_default();
        let (control, content) = control::strip(&sub.content);
        sub.content = content;
        if sub.unsubscribe.is_none() {
            if let Some(value) = &control.unsubscribe {
                match OneClick::parse(value) {
                    Ok(one_click) => sub.unsubscribe = Some(one_click),
                    Err(e) => {
                        warn!(error = %e, "invalid X-Tern-Unsubscribe: no unsubscribe headers")
                    }
                }
            }
        }
        let campaign_name = request.campaign.or(control.campaign);
        let table = self.campaigns.get();
        let campaign = match campaign_name.as_deref() {
            None => None,
            Some(name) => match table.get(name) {
                Some(c) if c.state != State::Archived => Some(c),
                _ => {
                    warn!(campaign = name, "unknown campaign: sent as a plain message");
                    self.metrics.sidecar_content("unknown_campaign");
                    None
                }
            },
        };
        let send_time = match request.send_time.or(control.send_time) {
            None => SendAt::Now,
            Some(text) => self
                .send_time(campaign.map(|c| c.config.name.as_str()), &text)
                .unwrap_or_else(|e| {
                    warn!(error = %e, "invalid X-Tern-Send-Time: sending now");
                    SendAt::Now
                }),
        };
        if let Some(c) = campaign {
            if c.config.unsubscribe && sub.unsubscribe.is_none() {
                sub.unsubscribe = Some(OneClick::default());
            }
        }
        let mut common = request.data;
        if let Some(data) = control.data {
            match serde_json::from_str::<Map<String, Value>>(&data) {
                Ok(d) => common.extend(d),
                Err(e) => {
                    warn!(error = %e, "X-Tern-Data is not a JSON object: ignored")
                }
            }
        }
        let mut out = Vec::new();
        if let Some(winback) = self.winback_campaign(&sub.content) {
            if campaign.is_none_or(|c| c.config.name != winback.config.name) {
                let due = self.take_winback_sends(&mut sub).await;
                if !due.is_empty() {
                    let mut one = sub.clone();
                    one.recipients = due;
                    if winback.config.unsubscribe && one.unsubscribe.is_none() {
                        one.unsubscribe = Some(OneClick::default());
                    }
                    // Win-back mail is always sent at the recipient's best time.
                    let at = SendAt::Optimize {
                        window: winback.config.send_window,
                        quiet_hours: winback.config.quiet_hours,
                    };
                    self.metrics.sidecar_content("winback");
                    out.extend(
                        self.render_campaign(&winback, one, &common, &request.recipients, at)
                            .await,
                    );
                }
                if sub.recipients.is_empty() {
                    return out;
                }
            }
        }
        let Some(campaign) = campaign else {
            out.push(Prepared {
                submission: sub,
                send_at: Some(send_time),
                window: None,
                reports: Vec::new(),
                campaign: None,
                hold: false,
            });
            return out;
        };
        out.extend(
            self.render_campaign(campaign, sub, &common, &request.recipients, send_time)
                .await,
        );
        out
    }

    /// Takes the recipients of `sub` whose next win-back send this is out of it.
    async fn take_winback_sends(&self, sub: &mut Submission) -> Vec<Recipient> {
        let now = crate::clock::now_ms();
        let recipients = std::mem::take(&mut sub.recipients);
        let mut due = Vec::new();
        for chunk in recipients.chunks(WINBACK_PARALLEL) {
            let answers = futures_join(
                chunk
                    .iter()
                    .map(|r| self.sink.take_winback_send(&r.address, now)),
            )
            .await;
            for (r, yes) in chunk.iter().zip(answers) {
                if yes {
                    info!(rcpt = %r.address, "win-back send");
                    due.push(r.clone());
                } else {
                    sub.recipients.push(r.clone());
                }
            }
        }
        due
    }

    /// Renders `campaign` for each recipient of `sub` (see the module doc).
    async fn render_campaign(
        &self,
        campaign: &Campaign,
        mut sub: Submission,
        common: &Map<String, Value>,
        per_recipient: &HashMap<String, Map<String, Value>>,
        send_time: SendAt,
    ) -> Vec<Prepared> {
        let started = tokio::time::Instant::now();
        let deadline = started + self.deadline;
        // A paused campaign's mail is rendered and spooled held, released on resume.
        let hold = campaign.state == State::Paused;

        // Per recipient: data, variant, then all model calls at once under one deadline.
        let recipients = std::mem::take(&mut sub.recipients);
        let mut jobs = Vec::with_capacity(recipients.len());
        for rcpt in recipients {
            let mut data = common.clone();
            if let Some(own) = per_recipient.get(&rcpt.address) {
                data.extend(own.clone());
            }
            let variant = self.choose_variant(campaign);
            jobs.push((rcpt, data, variant));
        }
        let generated = self.generate_all(campaign, &jobs, deadline).await;

        // The submitted content is not copied per recipient: a rendered message keeps only
        // its headers (read once here), and the recipients whose template failed share one
        // message with the content as submitted.
        let submitted = std::mem::take(&mut sub.content);
        let (kept_head, kept_id) = kept_headers(&submitted);
        // The Feedback-ID's identity field: the From domain, read once per submission.
        let identity = from_identity(&submitted).unwrap_or_default();
        let kept = (kept_head, kept_id, identity);
        let mut as_submitted = Vec::new();
        let mut as_submitted_reports = Vec::new();
        let mut out = Vec::with_capacity(jobs.len() + 1);
        for ((rcpt, data, variant), generated) in jobs.into_iter().zip(generated) {
            // Rendering a large submission is CPU work: let the model's connections and
            // other sessions run between recipients.
            tokio::task::consume_budget().await;
            let Generated {
                slots,
                content,
                reason,
            } = generated;
            let report = CampaignReport {
                recipient: rcpt.address.clone(),
                campaign: campaign.config.name.clone(),
                variant: variant.clone(),
                content,
                reason,
            };
            self.metrics.sidecar_content(reason.unwrap_or(content));
            let mut one = sub.clone();
            match self.render(campaign, &kept, &rcpt, &data, &slots, variant.as_deref()) {
                Ok(message) => {
                    one.content = message;
                    one.body_type = if one.content.is_ascii() {
                        tern_queue::BodyType::SevenBit
                    } else {
                        tern_queue::BodyType::EightBitMime
                    };
                }
                Err(e) => {
                    // The message as submitted (control headers stripped) still goes out.
                    warn!(campaign = %campaign.config.name, error = %e, "template failed: sent as submitted");
                    self.metrics.sidecar_content("template_error");
                    as_submitted.push(rcpt);
                    as_submitted_reports.push(report);
                    continue;
                }
            }
            // Debug, not info: one line per recipient of a campaign is 10M lines a day at the
            // volume tern is for, and cost 5% of the sidecar's ingest rate at info
            // (benches/sidecar_ingest.sh, log level warn vs info). The inject answer, the
            // delivery log and the events carry the same campaign and variant.
            debug!(
                campaign = %report.campaign,
                rcpt = %report.recipient,
                variant = report.variant.as_deref().unwrap_or("-"),
                content = report.content,
                reason = report.reason.unwrap_or("-"),
                waited_ms = started.elapsed().as_millis() as u64,
                "sidecar rendered"
            );
            one.recipients = vec![rcpt];
            out.push(Prepared {
                submission: one,
                send_at: Some(send_time),
                window: None,
                campaign: Some(CampaignTag {
                    campaign: report.campaign.clone(),
                    variant: report.variant.clone(),
                }),
                reports: vec![report],
                hold,
            });
        }
        if !as_submitted.is_empty() {
            // Sent as submitted, but still a campaign's: its own Feedback-ID replaces any.
            let mut content = self.feedback_id(campaign, None, &kept.2).into_bytes();
            content.extend(without_feedback_id(&submitted));
            sub.content = content;
            sub.recipients = as_submitted;
            out.push(Prepared {
                submission: sub,
                send_at: Some(send_time),
                window: None,
                reports: as_submitted_reports,
                // Sent as submitted: no variant was rendered.
                campaign: Some(CampaignTag {
                    campaign: campaign.config.name.clone(),
                    variant: None,
                }),
                hold,
            });
        }
        out
    }

    /// The `Feedback-ID` line of `campaign`'s mail as `variant` from `identity` (the From
    /// address).
    fn feedback_id(&self, campaign: &Campaign, variant: Option<&str>, identity: &str) -> String {
        crate::feedback_id::header(
            &campaign.config.name,
            variant,
            identity,
            &self.feedback_sender_id,
        )
    }

    /// How `campaign` picks variants: `[sidecar.bandit]` under its own settings.
    fn policy(&self, campaign: &Campaign) -> bandit::Policy {
        bandit::Policy::of(&self.bandit_config, campaign.config.bandit.as_ref())
    }

    fn choose_variant(&self, campaign: &Campaign) -> Option<String> {
        if campaign.variants.is_empty() {
            return None;
        }
        let mut bandits = self.bandits.lock().expect("bandit lock");
        let b = bandits.get_mut(&campaign.config.name)?;
        Some(b.choose(
            &campaign.variants,
            &self.policy(campaign),
            &mut rand::thread_rng(),
        ))
    }

    /// Slot texts for every job, in order: each distinct shared (campaign, variant,
    /// segment) key is waited for once, per-recipient generations run side by side, all
    /// under one deadline. A shared segment seen here starts the generation of every variant.
    async fn generate_all(
        &self,
        campaign: &Campaign,
        jobs: &[(Recipient, Map<String, Value>, Option<String>)],
        deadline: tokio::time::Instant,
    ) -> Vec<Generated> {
        let mut distinct: HashMap<Want, usize> = HashMap::new();
        let mut wants = Vec::new();
        let index: Vec<usize> = jobs
            .iter()
            .map(|(_, data, variant)| {
                let want = Generator::want(&campaign.config, variant.as_deref(), data);
                let next = wants.len();
                *distinct.entry(want.clone()).or_insert_with(|| {
                    wants.push(want);
                    next
                })
            })
            .collect();
        // Per-recipient campaigns generate their coarse text only when over budget.
        let segments: std::collections::HashSet<&str> = wants
            .iter()
            .filter_map(|w| match w {
                Want::Coarse { segment, .. } => Some(segment.as_str()),
                Want::Recipient { .. } => None,
            })
            .collect();
        for segment in segments {
            self.generator.prefetch(
                &campaign.config,
                campaign.version,
                self.policy(campaign).holdout > 0.0,
                segment,
            );
        }
        let resolved = futures_join(wants.iter().map(|w| {
            self.generator
                .resolve(&campaign.config, campaign.version, w, deadline)
        }))
        .await;
        index.into_iter().map(|i| resolved[i].clone()).collect()
    }

    /// The message for one recipient: the submitted headers minus Subject and MIME headers,
    /// a Message-ID if missing, Subject, Feedback-ID (campaign and variant, for attribution)
    /// and the rendered body.
    fn render(
        &self,
        campaign: &Campaign,
        (kept_head, kept_message_id, identity): &(Vec<u8>, Option<String>, String),
        rcpt: &Recipient,
        data: &Map<String, Value>,
        slots: &BTreeMap<String, String>,
        variant: Option<&str>,
    ) -> Result<Vec<u8>, String> {
        let mut head = kept_head.clone();
        let message_id = match kept_message_id.clone() {
            Some(id) => id,
            None => {
                let id = format!(
                    "<{:016x}{:08x}.sc@{}>",
                    crate::clock::now_ms(),
                    rand::thread_rng().gen::<u32>(),
                    self.hostname
                );
                head.extend_from_slice(format!("Message-ID: {id}\r\n").as_bytes());
                id
            }
        };
        let mut recipient = data.clone();
        recipient.insert("address".into(), rcpt.address.clone().into());
        let ctx: minijinja::Value = serde_json::from_value(serde_json::json!({
            "recipient": recipient,
            "data": data,
            "slots": slots,
            "campaign": campaign.config.name,
            "variant": variant,
        }))
        .map_err(|e| format!("template data: {e}"))?;
        let pick = |part: &str| match variant {
            Some(v) if campaign.env.get_template(&format!("{v}/{part}")).is_ok() => {
                format!("{v}/{part}")
            }
            _ => part.to_owned(),
        };
        let render = |name: &str| {
            campaign
                .env
                .get_template(name)
                .and_then(|t| t.render(&ctx))
                .map_err(|e| format!("{name}: {e}"))
        };
        let subject = guard::header_text(&render(&pick("subject"))?);
        let text = render(&pick("text"))?;
        let html = match &campaign.config.html {
            None => None,
            Some(_) => {
                let html = render("body.html")?;
                Some(match (&self.tracker, campaign.config.tracking) {
                    (Some(t), true) => t.rewrite_html(
                        &html,
                        &Claims {
                            k: 'o',
                            c: campaign.config.name.clone(),
                            r: rcpt.address.clone(),
                            v: variant.map(str::to_owned),
                            m: message_id.clone(),
                            u: None,
                            t: crate::clock::now_ms() / 1000,
                        },
                    ),
                    _ => html,
                })
            }
        };
        head.extend_from_slice(b"Subject: ");
        Text::new(subject).write_header(&mut head, "Subject: ".len());
        // Feedback-ID (Gmail's feedback loop, and how complaints and bounces that come back
        // by mail find their campaign and variant): added here, before the enqueue signs.
        head.extend_from_slice(self.feedback_id(campaign, variant, identity).as_bytes());
        head.extend_from_slice(b"MIME-Version: 1.0\r\n");
        let text = crlf(&text);
        let part = match html {
            None => MimePart::new("text/plain", text),
            Some(html) => MimePart::new(
                "multipart/alternative",
                vec![
                    MimePart::new("text/plain", text),
                    MimePart::new("text/html", crlf(&html)),
                ],
            ),
        };
        part.write_part(&mut head);
        Ok(head)
    }
}

/// `GET /api/v1/campaigns/{name}/results`.
#[derive(Debug, Clone, Serialize)]
pub struct CampaignResults {
    pub campaign: String,
    pub state: State,
    pub version: u64,
    /// How the campaign picks variants (`[sidecar.bandit]` under its own `bandit`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandit: Option<bandit::Policy>,
    pub variants: Vec<results::VariantResults>,
}

/// The stored bandit of a campaign with variants (`None` without variants).
fn load_bandit(spool: &Spool, c: &Campaign) -> Result<Option<bandit::Bandit>, String> {
    if c.variants.is_empty() {
        return Ok(None);
    }
    let stored = spool
        .get_meta(&format!("{BANDIT_META}{}", c.config.name))
        .map_err(|e| format!("spool.path: cannot read the bandit state: {e}"))?
        .and_then(|b| serde_json::from_slice::<bandit::Bandit>(&b).ok());
    let mut b = stored.unwrap_or_default();
    b.ensure(&c.variants);
    Ok(Some(b))
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut futures: Vec<_> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, slot) in futures.iter_mut().zip(out.iter_mut()) {
            if slot.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|o| o.expect("every future finished"))
        .collect()
}

/// The header section of `message` without Subject, MIME-Version and Content-* (with their
/// continuation lines), and the Message-ID if there is one.
fn kept_headers(message: &[u8]) -> (Vec<u8>, Option<String>) {
    let mut out = Vec::with_capacity(1024);
    let mut message_id = None;
    let mut keep = true;
    for line in message.split_inclusive(|&b| b == b'\n') {
        let bare = line.strip_suffix(b"\n").unwrap_or(line);
        let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
        if bare.is_empty() {
            break;
        }
        if !matches!(bare[0], b' ' | b'\t') {
            let name_end = bare.iter().position(|&b| b == b':').unwrap_or(bare.len());
            let name = String::from_utf8_lossy(&bare[..name_end])
                .trim()
                .to_ascii_lowercase();
            keep = !(name == "subject"
                || name == "mime-version"
                || name.starts_with("content-")
                || name == "feedback-id");
            if name == "message-id" {
                message_id = Some(
                    String::from_utf8_lossy(&bare[name_end + 1..])
                        .trim()
                        .to_owned(),
                );
            }
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    (out, message_id)
}

/// `message` without its `Feedback-ID` header fields (a campaign message carries only the
/// one tern writes: Gmail counts one per message).
fn without_feedback_id(message: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len());
    let mut keep = true;
    let mut in_head = true;
    for line in message.split_inclusive(|&b| b == b'\n') {
        if in_head {
            let bare = line.strip_suffix(b"\n").unwrap_or(line);
            let bare = bare.strip_suffix(b"\r").unwrap_or(bare);
            if bare.is_empty() {
                in_head = false;
                keep = true;
            } else if !matches!(bare[0], b' ' | b'\t') {
                keep = !(bare.len() >= 12 && bare[..12].eq_ignore_ascii_case(b"feedback-id:"));
            }
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out
}

/// CRLF line ends (templates are written with LF).
fn crlf(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + text.len() / 32);
    for line in text.split_inclusive('\n') {
        let line = line
            .strip_suffix('\n')
            .map_or(line, |l| l.strip_suffix('\r').unwrap_or(l));
        out.push_str(line);
        out.push_str("\r\n");
    }
    out
}

/// The sidecar as the first pre-enqueue stage: mail that does not ask for it
/// ([`wanted`]) passes unchanged.
impl Stage for Sidecar {
    fn apply(&self, message: Prepared) -> StageFuture<'_> {
        Box::pin(async move {
            if message.send_at.is_some() || !self.wants(&message.submission) {
                return vec![message];
            }
            Sidecar::apply(self, message.submission).await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_headers_drop_subject_mime_and_feedback_id() {
        let msg = b"From: a@b\r\nSubject: old\r\n folded\r\nList-Unsubscribe: <https://u.test/x>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nContent-Type: text/plain\r\nFeedback-ID: forged:x:y:tern-mta\r\nMessage-ID: <m@h>\r\n\r\nbody\r\n";
        let (head, id) = kept_headers(msg);
        assert_eq!(
            String::from_utf8(head).unwrap(),
            "From: a@b\r\nList-Unsubscribe: <https://u.test/x>\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\nMessage-ID: <m@h>\r\n"
        );
        assert_eq!(id.as_deref(), Some("<m@h>"));
    }

    #[test]
    fn a_submitted_feedback_id_is_dropped_from_the_head_only() {
        let msg = b"From: a@b\r\nFEEDBACK-ID: x:y:z:w\r\n folded\r\nTo: c@d\r\n\r\nFeedback-ID: quoted in the body\r\n";
        assert_eq!(
            String::from_utf8(without_feedback_id(msg)).unwrap(),
            "From: a@b\r\nTo: c@d\r\n\r\nFeedback-ID: quoted in the body\r\n"
        );
    }

    #[test]
    fn crlf_line_ends() {
        assert_eq!(crlf("a\nb\r\nc"), "a\r\nb\r\nc\r\n");
    }
}
