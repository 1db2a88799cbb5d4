//! Send-time optimisation: engagement events in, a per-recipient `not_before` out.
//!
//! - [`profile`]: one recipient's decayed hour-of-week counts (the event store's record).
//! - [`model`]: priors (global, empirical Bayes, k-means segments, a dictionary of daily
//!   shapes), the activity estimate and the choice of a send time in a window.
//! - [`hook`]: the `X-Tern-Send-Time` control header, for the send-time stage.
//! - [`simulate`]: the seeded audience simulator behind `tern sidecar simulate`.
//! - [`engagement`]: the engagement model (the probability of a human open of the next
//!   send, a logistic fit at refit time).
//! - [`lifecycle`]: active, at risk, dormant, win-back, sunset; the win-back series.
//! - [`lifecycle_sim`]: the dormant-and-won-back population behind
//!   `tern sidecar simulate --lifecycle`.
//!
//! [`SendTime`] is the service the daemon shares (it is the send-time stage and the enqueue's `SendPlanner`, the
//! events API and the tracking endpoints feed it, and its refit applies the sunset policy:
//! recipients dormant beyond `sendtime.sunset_after` join the suppression list). Profiles live in the spool's meta keyspace under
//! `sendtime/<address>` (lowercased), about 2 KB each, updated in place per event; raw events
//! are not kept. The priors are refitted from all profiles at start and every
//! `sendtime.refit_interval` and kept in memory.
//!
//! Tracked opens and clicks (the sidecar's tracking endpoints, through [`EngagementSink`])
//! are written in batches: they wait up to [`FLUSH_AFTER`] (or until [`MAX_PENDING`] are
//! waiting) and then go to [`SendTime::record_batch`] together, one read-modify-write per
//! recipient however many hits that recipient had, so a burst of hits costs one background
//! task and one write per recipient instead of one of each per hit.
//!
//! Invariants: machine opens never change a profile; a profile is read-modified-written
//! under its address's lock, so concurrent events for one recipient are all counted; a
//! failure to plan never refuses mail (the caller sends it at once); every pending event is
//! written by a task on the daemon's tracker (shutdown waits for it).
//!
//! [`EngagementSink`]: crate::sidecar::EngagementSink

pub mod engagement;
pub mod hook;
pub mod lifecycle;
pub mod lifecycle_sim;
pub mod model;
pub mod profile;
pub mod simulate;

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tern_queue::{Spool, SpoolError};
use tokio_util::task::TaskTracker;

pub use crate::config::SendTimeConfig;
use crate::enqueue::SendPlanner;
use crate::live::Live;
use crate::message::{CampaignReport, Prepared, SendAt, SendWindow, Stage, StageFuture};
use crate::suppression::{Entry, Suppressions, SUNSET_REASON};
use engagement::EngagementModel;
use lifecycle::{State, Thresholds};
use model::{choose, Priors};
use profile::{Arm, Profile};

const META_PREFIX: &str = "sendtime/";
const LOCK_STRIPES: usize = 64;
/// Profile writes in flight at once for one batch of events or one message's recipients.
const PARALLEL_WRITES: usize = 64;
/// How long a tracked event waits for others to share its batch.
pub const FLUSH_AFTER: Duration = Duration::from_millis(500);
/// Tracked events waiting at most; one more starts a batch at once.
pub const MAX_PENDING: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Open,
    Click,
    /// A message reached the recipient at `time_ms` (for mail tern did not schedule itself).
    Send,
    /// Tern delivered mail to the recipient at `time_ms` (from the delivery path, never the
    /// events API): a send tern planned is recorded now.
    #[serde(skip_deserializing)]
    Delivered,
    /// Mail to the recipient bounced or expired (from the delivery path): a send tern planned
    /// is dropped, not recorded.
    #[serde(skip_deserializing)]
    Failed,
}

/// One engagement event, as the events API takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: EventKind,
    pub recipient: String,
    pub time_ms: u64,
    /// An automatic open (e.g. Apple Mail Privacy Protection prefetch): counted, never learnt.
    pub machine: bool,
    pub tz_offset_min: Option<i32>,
}

/// Why a recipient got the `not_before` they got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Chosen by the model (possibly "now" if now is best).
    Model,
    /// In the control share: sent at once so lift can be measured.
    Control,
    /// No time zone known and nothing to weigh zones by (no history and no zone-known
    /// recipients at the last refit): sent at once.
    NoZone,
}

/// The send-time experiment, summed over every profile at the last refit: planned sends
/// and those engaged with within 72 h, per arm (`[control, model]`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lift {
    pub sends: [u64; 2],
    pub engaged: [u64; 2],
}

#[derive(Clone)]
pub struct SendTime {
    inner: Arc<Inner>,
}

struct Inner {
    spool: Spool,
    /// Where the sunset policy suppresses dormant recipients.
    suppressions: Suppressions,
    config: Live<SendTimeConfig>,
    priors: Live<Priors>,
    engagement: Live<EngagementModel>,
    lift: Live<Lift>,
    locks: Vec<tokio::sync::Mutex<()>>,
    /// Where events recorded in the background run (shutdown waits for them).
    tasks: TaskTracker,
    /// Tracked events not yet written (see the module doc).
    pending: std::sync::Mutex<Pending>,
    /// The fleet's store (`[cluster]`): profiles live there, one per recipient for the whole
    /// fleet; this node's spool holds only what it recorded while the store was away.
    cluster: Option<Arc<crate::cluster::Store>>,
}

/// Compare-and-set of one profile: KEYS[1] is replaced by ARGV[2] only if it still holds
/// ARGV[1] ('' for absent); 1 if replaced. Profiles change by read-modify-write in Rust
/// (decay, hour-of-week buckets), so concurrent writers on several nodes retry.
const PROFILE_CAS: &str = r"
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
";

/// Attempts of one compare-and-set before the change goes to the local profile.
const CAS_ATTEMPTS: usize = 16;
/// The refit lease: one node of a fleet refits at a time; a node that died holding it frees
/// it after this long.
const REFIT_LEASE: Duration = Duration::from_secs(600);
/// Profiles per page of a fleet refit's scan.
const SCAN_PAGE: usize = 1000;

#[derive(Default)]
struct Pending {
    events: Vec<Event>,
    /// A task will take `events` after [`FLUSH_AFTER`].
    flush_scheduled: bool,
}

fn meta_name(address: &str) -> String {
    format!("{META_PREFIX}{}", address.to_ascii_lowercase())
}

/// The fleet store's key of `address`'s profile.
fn profile_key(store: &crate::cluster::Store, address: &str) -> String {
    store.key(&format!("prof:{}", address.to_ascii_lowercase()))
}

/// `s` with the characters a Redis glob pattern treats specially escaped.
fn redis_glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl SendTime {
    /// `suppressions` is the daemon's list (sunset suppressions are counted in its metrics);
    /// `tasks` the daemon's tracker of background work.
    pub fn new(
        spool: Spool,
        config: SendTimeConfig,
        suppressions: Suppressions,
        tasks: TaskTracker,
        cluster: Option<Arc<crate::cluster::Store>>,
    ) -> SendTime {
        SendTime {
            inner: Arc::new(Inner {
                spool,
                suppressions,
                config: Live::new(config),
                priors: Live::new(Priors::default()),
                engagement: Live::new(EngagementModel::default()),
                lift: Live::new(Lift::default()),
                locks: (0..LOCK_STRIPES)
                    .map(|_| tokio::sync::Mutex::new(()))
                    .collect(),
                tasks,
                pending: Default::default(),
                cluster,
            }),
        }
    }

    pub fn config(&self) -> Arc<SendTimeConfig> {
        self.inner.config.get()
    }

    /// A config reload: new windows, shares and periods apply to the next decision.
    pub fn set_config(&self, config: SendTimeConfig) {
        self.inner.config.set(config);
    }

    pub fn priors(&self) -> Arc<Priors> {
        self.inner.priors.get()
    }

    /// The engagement model as of the last refit.
    pub fn engagement_model(&self) -> Arc<EngagementModel> {
        self.inner.engagement.get()
    }

    /// `address`'s profile, engagement prediction and lifecycle state at `now_ms`; `None`
    /// without a profile.
    pub async fn recipient(
        &self,
        address: &str,
        now_ms: u64,
    ) -> Result<Option<(Profile, f64, State)>, SpoolError> {
        let Some(p) = self.profile(address).await? else {
            return Ok(None);
        };
        let prediction = self.engagement_model().predict(&p, now_ms);
        let sunset = self
            .inner
            .suppressions
            .check(address)
            .is_some_and(|e| e.reason == SUNSET_REASON);
        let state = lifecycle::state(
            &p,
            prediction,
            sunset,
            now_ms,
            &Thresholds::from(&*self.config()),
        );
        Ok(Some((p, prediction, state)))
    }

    /// Erases `address`'s profile (this node's and, in a fleet, the shared one): the privacy
    /// erasure of `DELETE /api/v1/recipients/{address}`. A suppression entry is kept (it is
    /// what keeps the address from being mailed). Returns whether a profile existed.
    pub async fn erase(&self, address: &str) -> Result<bool, SpoolError> {
        let _guard = self.lock(address).lock().await;
        let mut existed = self.local_profile(address)?.is_some();
        self.inner.spool.remove_meta(&meta_name(address)).await?;
        if let Some(store) = &self.inner.cluster {
            match store
                .query::<i64>(redis::cmd("DEL").arg(profile_key(store, address)))
                .await
            {
                Ok(n) => existed |= n > 0,
                Err(e) => {
                    return Err(SpoolError::Sled(format!(
                        "the fleet store did not erase the shared profile: {e}"
                    )))
                }
            }
        }
        Ok(existed)
    }

    /// Whether mail from a sender identity with a win-back campaign, to `address` now, is to
    /// be the next win-back send (see [`lifecycle::winback_due`]); if so the send is recorded
    /// in the series at once (under the address's lock, so concurrent messages cannot both
    /// take one slot).
    pub async fn take_winback_send(&self, address: &str, now_ms: u64) -> Result<bool, SpoolError> {
        // A suppressed address is not mailed at all: no series send is spent on it.
        if self.inner.suppressions.check(address).is_some() {
            return Ok(false);
        }
        let model = self.engagement_model();
        let thresholds = Thresholds::from(&*self.config());
        let due = std::sync::atomic::AtomicBool::new(false);
        self.update(address, |p| {
            let state = lifecycle::state(p, model.predict(p, now_ms), false, now_ms, &thresholds);
            let yes = lifecycle::winback_due(state, p, now_ms, &thresholds);
            due.store(yes, std::sync::atomic::Ordering::Relaxed);
            if yes {
                lifecycle::record_winback_send(p, now_ms);
            }
            yes
        })
        .await?;
        Ok(due.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn lock(&self, address: &str) -> &tokio::sync::Mutex<()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::hash::DefaultHasher::new();
        address.to_ascii_lowercase().hash(&mut h);
        &self.inner.locks[h.finish() as usize % LOCK_STRIPES]
    }

    /// The stored profile; `None` if there is none (or it is of an unreadable version). In a
    /// fleet, the shared one (this node's own while the store is away).
    pub async fn profile(&self, address: &str) -> Result<Option<Profile>, SpoolError> {
        if let Some(store) = &self.inner.cluster {
            if let Ok(bytes) = store
                .query::<Option<Vec<u8>>>(redis::cmd("GET").arg(profile_key(store, address)))
                .await
            {
                return Ok(bytes.and_then(|b| Profile::decode(&b)));
            }
        }
        self.local_profile(address)
    }

    fn local_profile(&self, address: &str) -> Result<Option<Profile>, SpoolError> {
        Ok(self
            .inner
            .spool
            .get_meta(&meta_name(address))?
            .and_then(|b| Profile::decode(&b)))
    }

    async fn update(
        &self,
        address: &str,
        change: impl Fn(&mut Profile) -> bool,
    ) -> Result<(), SpoolError> {
        let _guard = self.lock(address).lock().await;
        if let Some(store) = &self.inner.cluster {
            if self.update_shared(store, address, &change).await {
                return Ok(());
            }
        }
        let mut p = self.local_profile(address)?.unwrap_or_default();
        if change(&mut p) {
            self.inner
                .spool
                .put_meta(&meta_name(address), p.encode())
                .await?;
        }
        Ok(())
    }

    /// The change applied to the fleet's profile by compare-and-set; false if the store did
    /// not take it (unreachable, or too contended), and the caller keeps it locally.
    async fn update_shared(
        &self,
        store: &crate::cluster::Store,
        address: &str,
        change: &impl Fn(&mut Profile) -> bool,
    ) -> bool {
        let key = profile_key(store, address);
        for _ in 0..CAS_ATTEMPTS {
            let Ok(old) = store
                .query::<Option<Vec<u8>>>(redis::cmd("GET").arg(&key))
                .await
            else {
                return false;
            };
            let old = old.unwrap_or_default();
            let mut p = Profile::decode(&old).unwrap_or_default();
            if !change(&mut p) {
                return true;
            }
            match store
                .query::<i64>(
                    redis::cmd("EVAL")
                        .arg(PROFILE_CAS)
                        .arg(1)
                        .arg(&key)
                        .arg(old)
                        .arg(p.encode()),
                )
                .await
            {
                Ok(1) => return true,
                Ok(_) => continue,
                Err(_) => return false,
            }
        }
        tracing::warn!(
            address,
            "engagement profile too contended in the fleet store"
        );
        false
    }

    /// Whether `event` counts as human engagement (machine opens never do).
    pub fn is_engagement(event: &Event) -> bool {
        matches!(event.kind, EventKind::Open | EventKind::Click) && !event.machine
    }

    /// Records events durably: one read-modify-write per recipient (their events applied in
    /// order), recipients in parallel so the spool's group commit merges their writes.
    pub async fn record_batch(&self, events: Vec<Event>) -> Result<(), SpoolError> {
        let mut by_address: std::collections::HashMap<String, Vec<Event>> = Default::default();
        for e in events {
            by_address
                .entry(e.recipient.to_ascii_lowercase())
                .or_default()
                .push(e);
        }
        let permits = Arc::new(tokio::sync::Semaphore::new(PARALLEL_WRITES));
        let mut tasks = tokio::task::JoinSet::new();
        for (address, events) in by_address {
            let (this, permits) = (self.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire().await;
                this.update(&address, |p| {
                    // Deliveries of mail tern did not plan change nothing (and write nothing).
                    let mut changed = false;
                    for e in &events {
                        if let Some(tz) = e.tz_offset_min {
                            p.tz_offset_min = Some(tz);
                            changed = true;
                        }
                        match e.kind {
                            EventKind::Delivered => changed |= p.record_delivery(e.time_ms),
                            EventKind::Failed => changed |= p.record_failure(),
                            EventKind::Send => {
                                p.record_send(e.time_ms);
                                changed = true;
                            }
                            EventKind::Click if !e.machine => {
                                p.record_click(e.time_ms);
                                changed = true;
                            }
                            _ if SendTime::is_engagement(e) => {
                                p.record_engagement(e.time_ms);
                                changed = true;
                            }
                            _ => {
                                p.machine_opens = p.machine_opens.saturating_add(1);
                                changed = true;
                            }
                        }
                    }
                    changed
                })
                .await?;
                Ok::<_, SpoolError>(
                    events
                        .iter()
                        .any(SendTime::is_engagement)
                        .then_some(address),
                )
            });
        }
        let mut engaged = Vec::new();
        while let Some(done) = tasks.join_next().await {
            if let Some(address) =
                done.map_err(|e| SpoolError::Sled(format!("event task failed: {e}")))??
            {
                engaged.push(address);
            }
        }
        self.lift_sunset(engaged).await
    }

    /// A recipient who engages again is active: a `sunset` suppression of theirs is lifted
    /// (any other reason stays: a complaint or an unsubscribe is the recipient's word).
    async fn lift_sunset(&self, engaged: Vec<String>) -> Result<(), SpoolError> {
        let suppressions = &self.inner.suppressions;
        let keys: Vec<String> = engaged
            .into_iter()
            .filter(|a| {
                suppressions
                    .check(a)
                    .is_some_and(|e| e.reason == SUNSET_REASON && e.scope.is_none())
            })
            .collect();
        if !keys.is_empty() {
            let n = suppressions.remove(&keys).await?;
            tracing::info!(recipients = n, "engaged again: sunset suppressions lifted");
        }
        Ok(())
    }

    /// The window of `[sendtime]`: `window` long, minus `quiet_hours`.
    pub fn default_window(&self) -> SendWindow {
        let config = self.config();
        SendWindow {
            len_ms: config.window.as_millis() as u64,
            quiet: config.quiet_hours,
        }
    }

    /// Chooses `address`'s send time in `window` for mail accepted at `now_ms` and notes in
    /// the profile that a planned send (and its arm) awaits delivery. The result is a unix ms, `now_ms` for "at once".
    pub async fn plan(
        &self,
        address: &str,
        now_ms: u64,
        window: SendWindow,
    ) -> Result<(u64, Reason), SpoolError> {
        let config = self.config();
        let profile = self.profile(address).await?.unwrap_or_default();
        let (at, reason) = {
            let mut rng = rand::thread_rng();
            if rng.gen::<f64>() < config.control_share {
                (now_ms, Reason::Control)
            } else {
                match choose(&self.priors(), &profile, now_ms, window) {
                    // Spread sends over the hour (a whole audience landing at :00 is a burst
                    // the receiving side defers), but never past the window's end.
                    Some(start) if start > now_ms => {
                        let room = (now_ms + window.len_ms - start).min(3_600_000) / 60_000;
                        (
                            start + rng.gen_range(0..room.max(1)) * 60_000,
                            Reason::Model,
                        )
                    }
                    Some(_) => (now_ms, Reason::Model),
                    None => (now_ms, Reason::NoZone),
                }
            }
        };
        let arm = if reason == Reason::Control {
            Arm::Control
        } else {
            Arm::Model
        };
        // Recorded as a send when delivered (see [`Profile::record_delivery`]): a deferred
        // send's exposure starts when it arrives, and a bounced one is no send.
        self.update(address, |p| {
            p.await_delivery(arm);
            true
        })
        .await?;
        Ok((at, reason))
    }

    /// Refits the priors from every profile (on a blocking thread: it reads them all) and,
    /// with `sendtime.sunset_after` set, suppresses the recipients dormant for longer
    /// ([`SendTime::sunset`]). Returns how many recipients with history it saw.
    pub async fn refit(&self) -> Result<usize, SpoolError> {
        if let Some(store) = self.inner.cluster.clone() {
            match self.refit_shared(&store).await {
                Ok(n) => return Ok(n),
                Err(e) => {
                    tracing::warn!(error = %e, "send-time refit from the fleet store failed: refitting from this node's profiles");
                }
            }
        }
        let spool = self.inner.spool.clone();
        let config = self.config();
        let fitted = tokio::task::spawn_blocking(move || -> Result<Fitted, SpoolError> {
            let mut profiles = Vec::new();
            for (name, v) in spool.scan_meta(META_PREFIX)? {
                if let Some(p) = Profile::decode(&v) {
                    profiles.push((name[META_PREFIX.len()..].to_string(), p));
                }
            }
            Ok(fit_all(&profiles, &config, crate::clock::now_ms()))
        })
        .await
        .map_err(|e| SpoolError::Sled(format!("send-time refit task failed: {e}")))??;
        self.install(fitted).await
    }

    /// Installs a refit's results and suppresses the recipients it found sunset.
    async fn install(&self, fitted: Fitted) -> Result<usize, SpoolError> {
        let n = fitted.priors.recipients;
        self.inner.priors.set(fitted.priors);
        self.inner.engagement.set(fitted.engagement);
        self.inner.lift.set(fitted.lift);
        self.sunset(fitted.sunset).await?;
        Ok(n)
    }

    /// The refit of a fleet node: under the fleet's refit lease (one node at a time; a node
    /// that finds it taken waits for it), from every shared profile, read page by page
    /// (SCAN + MGET). The fit itself runs on a blocking thread.
    async fn refit_shared(&self, store: &crate::cluster::Store) -> Result<usize, String> {
        let lease = store.key("lease:refit");
        let holder = format!("{}:{:016x}", store.node(), rand::random::<u64>());
        loop {
            let taken: Option<String> = store
                .query(
                    redis::cmd("SET")
                        .arg(&lease)
                        .arg(&holder)
                        .arg("NX")
                        .arg("PX")
                        .arg(REFIT_LEASE.as_millis() as u64),
                )
                .await?;
            if taken.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let result = self.refit_from_store(store).await;
        // Given back only if still ours (it may have expired and gone to another node).
        let _ = store
            .query::<i64>(
                redis::cmd("EVAL")
                    .arg("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
                    .arg(1)
                    .arg(&lease)
                    .arg(&holder),
            )
            .await;
        result
    }

    async fn refit_from_store(&self, store: &crate::cluster::Store) -> Result<usize, String> {
        let prefix = profile_key(store, "");
        let mut cursor = 0u64;
        let mut profiles = Vec::new();
        loop {
            let (next, keys): (u64, Vec<String>) = store
                .query_in_slot(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(format!("{}*", redis_glob_escape(&prefix)))
                        .arg("COUNT")
                        .arg(SCAN_PAGE),
                )
                .await?;
            if !keys.is_empty() {
                let values: Vec<Option<Vec<u8>>> =
                    store.query(redis::cmd("MGET").arg(&keys)).await?;
                for (key, value) in keys.iter().zip(values) {
                    if let Some(p) = value.and_then(|v| Profile::decode(&v)) {
                        profiles.push((key[prefix.len()..].to_string(), p));
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let config = self.config();
        let fitted = tokio::task::spawn_blocking(move || {
            fit_all(&profiles, &config, crate::clock::now_ms())
        })
        .await
        .map_err(|e| format!("send-time refit task failed: {e}"))?;
        self.install(fitted).await.map_err(|e| e.to_string())
    }

    /// The sunset policy: suppresses `dormant` recipients (those [`fit_all`] found in state
    /// sunset: dormant past `sendtime.sunset_after` outside a win-back series, or at the end
    /// of a failed series) with reason `sunset` (until an
    /// operator removes the entry), so the suppression policy (reject or drop) stops
    /// mailing them. A recipient already suppressed keeps their entry (a complaint stays a
    /// complaint). Returns how many were added.
    async fn sunset(&self, dormant: Vec<String>) -> Result<usize, SpoolError> {
        let suppressions = &self.inner.suppressions;
        let now = crate::clock::now_ms();
        let entries: Vec<Entry> = dormant
            .into_iter()
            .filter(|address| suppressions.check(address).is_none())
            .map(|address| Entry {
                address,
                reason: SUNSET_REASON.to_owned(),
                created_ms: now,
                expires_ms: None,
                source: None,
                scope: None,
            })
            .collect();
        let added = entries.len();
        if added > 0 {
            suppressions.add(entries).await?;
            tracing::info!(recipients = added, "sunset: dormant recipients suppressed");
        }
        Ok(added)
    }

    /// The control and model arms as of the last refit.
    pub fn lift(&self) -> Arc<Lift> {
        self.inner.lift.get()
    }

    /// Refits now and then every `sendtime.refit_interval` until `stop`.
    pub async fn refit_loop(self, stop: tokio_util::sync::CancellationToken) {
        // The profiles are in the spool: not before it is open (the daemon takes mail sooner).
        tokio::select! {
            _ = self.inner.spool.ready() => {}
            _ = stop.cancelled() => return,
        }
        loop {
            if let Err(err) = self.refit().await {
                tracing::warn!(error = %err, "send-time priors not refitted");
            }
            let every = self.config().refit_interval;
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stop.cancelled() => return,
            }
        }
    }

    /// Records one event in the background (for callers that cannot wait, like the tracking
    /// endpoints), in the next batch (see the module doc); a failure is logged.
    fn record_later(&self, event: Event) {
        let (full, schedule) = {
            let mut pending = self.inner.pending.lock().expect("pending lock");
            pending.events.push(event);
            if pending.events.len() >= MAX_PENDING {
                (Some(std::mem::take(&mut pending.events)), false)
            } else {
                (None, !std::mem::replace(&mut pending.flush_scheduled, true))
            }
        };
        let this = self.clone();
        if let Some(batch) = full {
            self.inner
                .tasks
                .spawn(async move { this.write_pending(batch).await });
        } else if schedule {
            self.inner.tasks.spawn(async move {
                tokio::time::sleep(FLUSH_AFTER).await;
                let batch = {
                    let mut pending = this.inner.pending.lock().expect("pending lock");
                    pending.flush_scheduled = false;
                    std::mem::take(&mut pending.events)
                };
                this.write_pending(batch).await;
            });
        }
    }

    async fn write_pending(&self, batch: Vec<Event>) {
        if batch.is_empty() {
            return;
        }
        let events = batch.len();
        if let Err(err) = self.record_batch(batch).await {
            tracing::warn!(error = %err, events, "engagement events not recorded");
        }
    }

    /// Recipients whose last human engagement (or, never engaged, whose first record) is
    /// older than `dormant_after` at `now_ms`, at most `limit`, in address order.
    pub fn dormant(
        &self,
        dormant_after: Duration,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, Profile)>, SpoolError> {
        let cutoff = now_ms.saturating_sub(dormant_after.as_millis() as u64);
        Ok(self
            .inner
            .spool
            .scan_meta(META_PREFIX)?
            .into_iter()
            .filter_map(|(name, v)| {
                let p = Profile::decode(&v)?;
                (p.dormant_since() < cutoff).then(|| (name[META_PREFIX.len()..].to_string(), p))
            })
            .take(limit)
            .collect())
    }
}

/// What a refit computes from every profile.
struct Fitted {
    priors: Priors,
    engagement: EngagementModel,
    lift: Lift,
    /// Recipients whose lifecycle state is sunset (suppressed or not yet).
    sunset: Vec<String>,
}

/// The refit's pure part: the priors, the engagement model (from each profile's latest
/// resolved send), the lift, and who is sunset under the new model.
fn fit_all(profiles: &[(String, Profile)], config: &SendTimeConfig, now_ms: u64) -> Fitted {
    let mut lift = Lift::default();
    for (_, p) in profiles {
        for arm in 0..2 {
            lift.sends[arm] += p.arm_sends[arm] as u64;
            lift.engaged[arm] += p.arm_engaged[arm] as u64;
        }
    }
    let examples: Vec<_> = profiles
        .iter()
        .filter_map(|(_, p)| engagement::example(p, now_ms))
        .collect();
    let engagement = EngagementModel::fit(&examples);
    let thresholds = Thresholds::from(config);
    let sunset = profiles
        .iter()
        .filter(|(_, p)| {
            lifecycle::state(p, engagement.predict(p, now_ms), false, now_ms, &thresholds)
                == State::Sunset
        })
        .map(|(a, _)| a.clone())
        .collect();
    Fitted {
        priors: Priors::fit(profiles.iter().map(|(_, p)| p)),
        engagement,
        lift,
        sunset,
    }
}

/// The send-time stage, after the sidecar: a message the sidecar prepared keeps the send time
/// it parsed (with its campaign's quiet hours, or `sendtime.quiet_hours` without a campaign);
/// any other has its `X-Tern-Send-Time` header taken out here and, for `optimize`, gets the
/// configured default window. [`crate::enqueue`] then plans each recipient in the window.
/// Recipients in a campaign's bandit holdout get no window ([`without_holdout`]).
impl Stage for SendTime {
    fn apply(&self, mut message: Prepared) -> StageFuture<'_> {
        let window = match message.send_at {
            Some(SendAt::Now) => None,
            Some(SendAt::Optimize {
                window,
                quiet_hours,
            }) => Some(SendWindow {
                len_ms: window.as_millis() as u64,
                quiet: if !message.reports.is_empty() {
                    quiet_hours
                } else {
                    self.default_window().quiet
                },
            }),
            None => hook::take_send_time_header(&mut message.submission.content)
                .then(|| self.default_window()),
        };
        message.window = window;
        Box::pin(std::future::ready(without_holdout(message)))
    }
}

fn in_holdout(report: &CampaignReport) -> bool {
    report.variant.as_deref() == Some(crate::sidecar::bandit::HOLDOUT)
}

/// `message` with the recipients in its campaign's bandit holdout sent at once: the holdout
/// is the campaign's control group, so it must get neither the generated content nor a
/// planned send time (its open rate is what the campaign's optimisation, send time included,
/// is measured against). A message rendered for the holdout loses its window; one whose
/// recipients are mixed (those whose template failed share one message as submitted) is
/// split, the holdout's part without the window. Their sends still count in the campaign's
/// results (the delivery event carries the campaign and variant either way).
pub fn without_holdout(mut message: Prepared) -> Vec<Prepared> {
    let rendered_for_holdout = message.campaign.as_ref().and_then(|c| c.variant.as_deref())
        == Some(crate::sidecar::bandit::HOLDOUT);
    if message.window.is_none() || !message.reports.iter().any(in_holdout) && !rendered_for_holdout
    {
        return vec![message];
    }
    if rendered_for_holdout || message.reports.iter().all(in_holdout) {
        message.window = None;
        return vec![message];
    }
    let (holdout_reports, reports): (Vec<_>, Vec<_>) = std::mem::take(&mut message.reports)
        .into_iter()
        .partition(in_holdout);
    let held: std::collections::HashSet<&str> = holdout_reports
        .iter()
        .map(|r| r.recipient.as_str())
        .collect();
    let (holdout_rcpts, rcpts): (Vec<_>, Vec<_>) =
        std::mem::take(&mut message.submission.recipients)
            .into_iter()
            .partition(|r| held.contains(r.address.as_str()));
    let mut holdout = Prepared {
        submission: message.submission.clone(),
        send_at: message.send_at,
        window: None,
        reports: holdout_reports,
        campaign: message.campaign.clone(),
        hold: message.hold,
    };
    holdout.submission.recipients = holdout_rcpts;
    message.submission.recipients = rcpts;
    message.reports = reports;
    [message, holdout]
        .into_iter()
        .filter(|m| !m.submission.recipients.is_empty())
        .collect()
}

impl SendPlanner for SendTime {
    fn plan<'a>(
        &'a self,
        address: &'a str,
        now_ms: u64,
        window: SendWindow,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u64, String>> + Send + 'a>> {
        Box::pin(async move {
            SendTime::plan(self, address, now_ms, window)
                .await
                .map(|(at, _)| at)
                .map_err(|e| e.to_string())
        })
    }
}

/// The delivery path's outcomes: a delivered send tern planned is recorded in the profile at
/// its delivery time, a bounced or expired one is dropped (batched like tracked events).
impl crate::events::DeliveryObserver for SendTime {
    fn delivered(&self, recipient: &str, at_ms: u64) {
        self.record_later(Event {
            kind: EventKind::Delivered,
            recipient: recipient.to_owned(),
            time_ms: at_ms,
            machine: false,
            tz_offset_min: None,
        });
    }

    fn failed(&self, recipient: &str, at_ms: u64) {
        self.record_later(Event {
            kind: EventKind::Failed,
            recipient: recipient.to_owned(),
            time_ms: at_ms,
            machine: false,
            tz_offset_min: None,
        });
    }
}

/// Built-in tracking's opens and clicks land in the same profiles as `POST /api/v1/events`
/// (a machine open is counted there and never learnt from, like any other).
impl crate::sidecar::EngagementSink for SendTime {
    fn record(&self, e: crate::sidecar::Engagement) {
        self.record_later(Event {
            kind: match e.kind {
                crate::sidecar::EngagementKind::Open => EventKind::Open,
                crate::sidecar::EngagementKind::Click => EventKind::Click,
            },
            recipient: e.recipient,
            time_ms: e.at_ms,
            machine: e.machine,
            tz_offset_min: None,
        });
    }

    fn take_winback_send<'a>(
        &'a self,
        recipient: &'a str,
        now_ms: u64,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            self.take_winback_send(recipient, now_ms)
                .await
                .unwrap_or_else(|e| {
                    // Mail goes out as submitted rather than not at all.
                    tracing::warn!(error = %e, recipient, "lifecycle not read: no win-back send");
                    false
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::{Engagement, EngagementKind, EngagementSink as _};

    fn machine_open(recipient: &str) -> Engagement {
        Engagement {
            kind: EngagementKind::Open,
            campaign: "c".into(),
            recipient: recipient.into(),
            variant: None,
            message_id: "<1@h>".into(),
            url: None,
            at_ms: 1_700_000_000_000,
            machine: true,
            user_agent: None,
        }
    }

    fn campaign_message(variants: &[(&str, Option<&str>)], tag: Option<&str>) -> Prepared {
        let mut m = Prepared::new(crate::message::Submission {
            sender: "news@example.com".into(),
            recipients: variants
                .iter()
                .map(|(a, _)| tern_queue::Recipient::new(a.to_string()))
                .collect(),
            env_id: None,
            ret: None,
            body_type: tern_queue::BodyType::SevenBit,
            smtputf8: false,
            source: tern_queue::Source {
                client_ip: "127.0.0.1".into(),
                helo: "h".into(),
                auth_user: None,
                protocol: "http".into(),
            },
            tls: None,
            content: b"Subject: s\r\n\r\nb\r\n".to_vec(),
            sidecar: None,
            pool: None,
            trusted: true,
            unsubscribe: None,
        });
        m.window = Some(SendWindow {
            len_ms: 3_600_000,
            quiet: None,
        });
        m.reports = variants
            .iter()
            .map(|(a, v)| CampaignReport {
                recipient: a.to_string(),
                campaign: "c".into(),
                variant: v.map(str::to_owned),
                content: "default",
                reason: None,
            })
            .collect();
        m.campaign = Some(tern_queue::CampaignTag {
            campaign: "c".into(),
            variant: tag.map(str::to_owned),
        });
        m
    }

    fn addresses(m: &Prepared) -> Vec<&str> {
        m.submission
            .recipients
            .iter()
            .map(|r| r.address.as_str())
            .collect()
    }

    #[test]
    fn the_bandits_holdout_gets_no_send_time_window() {
        // Rendered for the holdout: sent at once.
        let out = without_holdout(campaign_message(
            &[("h@x.test", Some("holdout"))],
            Some("holdout"),
        ));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].window, None);
        // Rendered for a variant: keeps its window.
        let out = without_holdout(campaign_message(&[("a@x.test", Some("a"))], Some("a")));
        assert_eq!(out.len(), 1);
        assert!(out[0].window.is_some());
        // Mixed (sent as submitted after a template error): split, the holdout's part at once,
        // each part with its own recipients and reports.
        let out = without_holdout(campaign_message(
            &[
                ("a@x.test", Some("a")),
                ("h@x.test", Some("holdout")),
                ("b@x.test", None),
                ("i@x.test", Some("holdout")),
            ],
            None,
        ));
        assert_eq!(out.len(), 2);
        assert!(out[0].window.is_some());
        assert_eq!(addresses(&out[0]), ["a@x.test", "b@x.test"]);
        assert_eq!(out[0].reports.len(), 2);
        assert_eq!(out[1].window, None);
        assert_eq!(addresses(&out[1]), ["h@x.test", "i@x.test"]);
        assert!(out[1].reports.iter().all(in_holdout));
        assert_eq!(out[1].campaign, out[0].campaign);
        // No window asked for: nothing to take away.
        let mut now = campaign_message(&[("h@x.test", Some("holdout"))], None);
        now.window = None;
        assert_eq!(without_holdout(now).len(), 1);
    }

    #[tokio::test]
    async fn tracked_hits_are_written_once_per_recipient_per_batch() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let suppressions = Suppressions::new(
            spool.clone(),
            Default::default(),
            Arc::new(crate::telemetry::Metrics::new()),
        );
        let tasks = TaskTracker::new();
        let send_time = SendTime::new(
            spool.clone(),
            Default::default(),
            suppressions,
            tasks.clone(),
            None,
        );
        let before = spool.commit_stats().writes;
        let recipients = ["a@x.test", "b@x.test", "c@x.test", "d@x.test"];
        for _ in 0..10 {
            for r in recipients {
                send_time.record(machine_open(r));
            }
        }
        tasks.close();
        tasks.wait().await;
        // Forty hits: one batch, one write per recipient, every hit counted.
        assert_eq!(spool.commit_stats().writes - before, 4);
        for r in recipients {
            assert_eq!(
                send_time.profile(r).await.unwrap().unwrap().machine_opens,
                10,
                "{r}"
            );
        }
    }
}
