//! Traffic shaping: how fast, how wide and from which address mail leaves for each
//! destination.
//!
//! - A **bucket** is what limits apply to: a provider (`[[shaping.providers]]`, matched by MX
//!   host suffix or by recipient domain; built-in: google, microsoft, yahoo, apple, see
//!   `config/tern.toml` for their limits) or, for everything else, the destination key of the
//!   route plan (the MX host set or static route). So all domains hosted by one provider share
//!   its limits. A bucket's limits are the provider's (or, for a non-provider destination, the
//!   `[[shaping.domains]]` rule of the first domain seen routing there) over
//!   `[shaping.default]`.
//! - A **pair** is (source address, bucket): the unit of every limit: open connections (cap),
//!   new connections per minute, messages per time (GCRA through [`limiter`], burst: what 2.5 ms of the rate earns, at least 1), messages
//!   per connection, the adaptive rate ([`adaptive`]), suspension, warm-up ([`warmup`]). The
//!   global and per-source connection caps apply on top.
//! - A **lane** is (pool, bucket): the pairs one ready queue may use ([`pools`]).
//!
//! The scheduler's worker asks [`Shaper::admit`] before each message (it waits there with
//! `tokio::time::sleep`, or is told to put the message back on a due time when the wait is
//! long: mail is never bounced for shaping), opens connections only with a [`ConnSlot`] from
//! [`Shaper::open_slot`] (the slot is the connection's delivery [`Lease`], so it lives inside
//! the connection, also while it idles in the pool), and reports every attempt to
//! [`Shaper::observe`].
//!
//! Invariants:
//! - A pair's open connections never exceed its cap: a slot is taken before connecting and
//!   released only when the connection is dropped.
//! - Blocking replies never bounce mail: their permanent outcomes are made temporary, so the
//!   message is retried once the suspension ends (possibly from another address).
//! - Memory is bounded: past `shaping.max_destinations` buckets, the state of the
//!   non-provider buckets idle longest is forgotten (their lanes, pairs and limits; a later
//!   message starts from the configured limits again), counted in
//!   `tern_state_evictions_total{map="shaping_destinations"}`. Only a bucket at rest goes: no
//!   ready queue or worker holds its lanes, no pair has an open connection (idle pooled ones
//!   included) or a suspension running. Lanes are created and evicted under one lock, so a
//!   bucket is never half forgotten while a new lane for it is made.
//! - State a cluster shares (rates, connection counts, warm-up counts) sits behind
//!   [`limiter::Backend`]: local, or the cluster store ([`shared`], `shaping.shared`) with a
//!   fallback to local limits divided by `shaping.node_count`. Warm-up counters are also in
//!   the spool. Adaptive rates, suspensions and the global and per-source caps are per node.

pub mod adaptive;
pub mod limiter;
pub mod pools;
pub mod shared;
pub mod warmup;

use crate::clock::now_ms;
use crate::config::{AdaptiveConfig, Config, LimitsConfig, ProviderConfig, WhenCapped};
use crate::delivery::client::Lease;
use crate::delivery::worker::{Attempt, Verdict};
use crate::routing::route::RoutePlan;
use crate::telemetry::{Metrics, StateMap};
use adaptive::{Aimd, Signal};
use limiter::{Backend, Counters};
use pools::{Pool, Pools, Source};
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;
use tern_queue::Spool;
use tokio::time::Instant;
use tracing::{info, warn};
use warmup::{Calendar, Take, WarmCounter, WarmState};

/// Waits longer than this put the message back on a due time instead of holding a worker.
pub const LONG_WAIT: Duration = Duration::from_secs(60);

/// The limits of one bucket.
#[derive(Debug)]
pub struct Bucket {
    pub name: String,
    /// Metrics label: the provider name, a static route key, or "other".
    pub label: String,
    pub provider: bool,
    pub limits: LimitsConfig,
    /// When mail was last routed to it, on the shaper's use counter: the least recently
    /// used go first.
    last_used: AtomicU64,
}

/// A connection cap shared by many pairs (global, per source).
#[derive(Default)]
struct Cap {
    open: AtomicUsize,
    cap: Option<usize>,
}

impl Cap {
    fn try_open(&self) -> bool {
        limiter::take_slot(&self.open, self.cap)
    }

    fn close(&self) {
        limiter::give_slot(&self.open);
    }
}

/// The caps above pairs and the wake-up for workers waiting for a slot.
struct Gates {
    global: Cap,
    per_source: HashMap<String, Cap>,
    freed: tokio::sync::Notify,
}

impl Gates {
    fn source(&self, label: &str) -> Option<&Cap> {
        self.per_source.get(label)
    }
}

#[derive(Default)]
struct PairState {
    aimd: Option<Aimd>,
    suspended_until: Option<Instant>,
    suspended_until_ms: Option<u64>,
    blocked: bool,
    /// The last reply that changed the rate or suspended the pair, and when (unix ms).
    trigger: Option<(String, u64)>,
    throttles: u64,
}

/// One (source, bucket).
pub struct Pair {
    /// `source|bucket`: the key of its counters, and the group its connections' leases name.
    key: String,
    pub source: Arc<Source>,
    pub bucket: Arc<Bucket>,
    counters: Counters,
    warm: Option<WarmCounter>,
    gates: Arc<Gates>,
    state: Mutex<PairState>,
}

impl Pair {
    fn state(&self) -> MutexGuard<'_, PairState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `source|bucket`, unique per pair: the [`Lease::group`] of its connection slots.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Messages allowed over one connection.
    pub fn max_messages_per_connection(&self) -> Option<usize> {
        self.bucket.limits.max_messages_per_connection
    }

    fn suspended(&self, now: Instant) -> Option<Instant> {
        self.state().suspended_until.filter(|&t| t > now)
    }

    /// Nothing of it would be lost by forgetting it: no open connection (idle pooled ones
    /// hold theirs) and no suspension running.
    fn at_rest(&self, now: Instant) -> bool {
        self.counters.open_connections() == 0 && self.suspended(now).is_none()
    }

    fn capped(&self, now_ms: u64) -> bool {
        self.warm.as_ref().is_some_and(|w| w.capped(now_ms))
    }

    async fn try_open(&self) -> bool {
        if !self.gates.global.try_open() {
            return false;
        }
        if let Some(cap) = self.gates.source(&self.source.label) {
            if !cap.try_open() {
                self.gates.global.close();
                return false;
            }
        }
        if !self
            .counters
            .try_open(self.bucket.limits.max_connections)
            .await
        {
            self.close_gates();
            return false;
        }
        true
    }

    fn close_gates(&self) {
        if let Some(cap) = self.gates.source(&self.source.label) {
            cap.close();
        }
        self.gates.global.close();
    }
}

/// A counted open connection of a pair; dropping it (with the connection) frees the place.
/// The connection carries it as its [`Lease`], whose group is the pair's key.
pub struct ConnSlot {
    pair: Arc<Pair>,
}

impl ConnSlot {
    pub fn pair(&self) -> &Arc<Pair> {
        &self.pair
    }
}

impl Lease for ConnSlot {
    fn group(&self) -> &str {
        self.pair.key()
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.pair.counters.close();
        self.pair.close_gates();
        self.pair.gates.freed.notify_waiters();
    }
}

/// The pairs one ready queue may use: its pool's sources for its bucket.
pub struct Lane {
    pub pool: Arc<Pool>,
    pub bucket: Arc<Bucket>,
    pairs: Vec<Arc<Pair>>,
}

impl Lane {
    /// The pair for a new connection: not suspended, not capped by warm-up, fewest open
    /// connections; else the first (whose admission then waits or defers).
    pub fn choose(&self) -> Arc<Pair> {
        let (now, ms) = (Instant::now(), now_ms());
        self.pairs
            .iter()
            .filter(|p| p.suspended(now).is_none() && !p.capped(ms))
            .min_by_key(|p| p.counters.open_connections())
            .unwrap_or(&self.pairs[0])
            .clone()
    }

    /// Another pair of the pool that is neither capped nor suspended (warm-up overflow).
    fn overflow_from(&self, capped: &Pair) -> Option<Arc<Pair>> {
        let (now, ms) = (Instant::now(), now_ms());
        self.pairs
            .iter()
            .filter(|p| !std::ptr::eq(p.as_ref(), capped))
            .filter(|p| p.suspended(now).is_none() && !p.capped(ms))
            .min_by_key(|p| p.counters.open_connections())
            .cloned()
    }
}

/// What the worker does with the message in hand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Send it now.
    Go,
    /// Send it from this other pair (warm-up overflow): a new connection.
    SwitchTo(PairHandle),
    /// Put it back; due at this time (unix ms). Not an attempt.
    Later(u64),
}

/// An `Arc<Pair>` that compares by identity (for [`Admission`]).
#[derive(Clone)]
pub struct PairHandle(pub Arc<Pair>);

impl PartialEq for PairHandle {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for PairHandle {}
impl std::fmt::Debug for PairHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}|{}", self.0.source.label, self.0.bucket.name)
    }
}

/// What the API shows of one pair: "why is this destination slow".
#[derive(Debug, Clone, Serialize)]
pub struct PairView {
    pub bucket: String,
    pub provider: bool,
    pub source: String,
    pub configured_rate_per_minute: Option<f64>,
    pub current_rate_per_minute: Option<f64>,
    pub connections: usize,
    pub max_connections: Option<usize>,
    pub max_messages_per_connection: Option<usize>,
    pub connections_per_minute: Option<u32>,
    /// RFC 3339.
    pub suspended_until: Option<String>,
    pub blocked: bool,
    /// The reply that last cut the rate or suspended the pair.
    pub trigger_reply: Option<String>,
    pub trigger_at: Option<String>,
    pub throttles: u64,
    pub warmup: Option<WarmState>,
}

pub struct Shaper {
    pools: Arc<Pools>,
    providers: Vec<ProviderConfig>,
    default: LimitsConfig,
    domains: HashMap<String, LimitsConfig>,
    adaptive: AdaptiveConfig,
    when_capped: WhenCapped,
    calendar: Arc<Calendar>,
    spool: Spool,
    backend: Backend,
    metrics: Arc<Metrics>,
    gates: Arc<Gates>,
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
    /// Locked first when more than one of these maps is (making and forgetting lanes).
    lanes: Mutex<HashMap<(String, String), Arc<Lane>>>,
    /// Every pair created (and not forgotten), by "source|bucket".
    pairs: Mutex<HashMap<String, Arc<Pair>>>,
    /// `shaping.max_destinations`: buckets kept before idle ones are forgotten.
    max_destinations: usize,
    /// The bucket count at which the next sweep runs: a sweep that could not forget enough
    /// (everything in use) is not repeated for every new destination.
    sweep_at: AtomicUsize,
    /// Counts routing decisions: the clock of `Bucket::last_used`.
    uses: AtomicU64,
}

fn rfc3339(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl Shaper {
    pub fn new(
        config: &Config,
        spool: Spool,
        backend: Backend,
        metrics: Arc<Metrics>,
    ) -> Arc<Shaper> {
        let s = &config.shaping;
        let pools = Arc::new(Pools::new(&config.pools, &config.routes));
        let per_source = pools
            .all_sources()
            .iter()
            .map(|src| {
                let cap = Cap {
                    cap: s.max_connections_per_source,
                    ..Cap::default()
                };
                (src.label.clone(), cap)
            })
            .collect();
        Arc::new(Shaper {
            pools,
            providers: s.providers.clone(),
            default: s.default,
            domains: s
                .domains
                .iter()
                .map(|d| (d.domain.clone(), d.limits))
                .collect(),
            adaptive: s.adaptive.clone(),
            when_capped: s.warmup.when_capped,
            calendar: Arc::new(Calendar::new(&s.warmup.time_zone, s.warmup.curve.clone())),
            spool,
            backend,
            metrics,
            gates: Arc::new(Gates {
                global: Cap {
                    cap: s.max_connections,
                    ..Cap::default()
                },
                per_source,
                freed: tokio::sync::Notify::new(),
            }),
            buckets: Mutex::new(HashMap::new()),
            lanes: Mutex::new(HashMap::new()),
            pairs: Mutex::new(HashMap::new()),
            max_destinations: s.max_destinations,
            sweep_at: AtomicUsize::new(s.max_destinations + 1),
            uses: AtomicU64::new(0),
        })
    }

    pub fn pools(&self) -> &Arc<Pools> {
        &self.pools
    }

    /// The provider whose domains hold `domain` or whose MX patterns match a hop of `plan`.
    fn provider(&self, domain: &str, plan: &RoutePlan) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| {
            p.domains.iter().any(|d| d == domain)
                || plan.hops.iter().any(|h| {
                    let host = h.name.to_ascii_lowercase();
                    p.mx.iter().any(|suffix| host.ends_with(suffix.as_str()))
                })
        })
    }

    /// The lane for mail to `domain` (routed by `plan`) from `pool`.
    pub fn lane(&self, pool: &Arc<Pool>, domain: &str, plan: &RoutePlan) -> Arc<Lane> {
        let provider = self.provider(domain, plan);
        let name = provider.map_or_else(|| plan.key.clone(), |p| p.name.clone());
        let key = (pool.name.clone(), name.clone());
        // Held while a lane is made, so a sweep never forgets its bucket meanwhile.
        let mut lanes = lock(&self.lanes);
        if let Some(lane) = lanes.get(&key) {
            self.touch(&lane.bucket);
            return lane.clone();
        }
        let bucket = lock(&self.buckets)
            .entry(name.clone())
            .or_insert_with(|| {
                let (limits, label) = match provider {
                    Some(p) => (p.limits.over(&self.default), p.name.clone()),
                    None => (
                        self.domains
                            .get(domain)
                            .map_or(self.default, |l| l.over(&self.default)),
                        self.metrics.destination_label(&name).into_owned(),
                    ),
                };
                Arc::new(Bucket {
                    name: name.clone(),
                    label,
                    provider: provider.is_some(),
                    limits,
                    last_used: AtomicU64::new(0),
                })
            })
            .clone();
        self.touch(&bucket);
        let pairs = pool
            .sources
            .iter()
            .map(|source| self.pair(source, &bucket))
            .collect();
        let lane = Arc::new(Lane {
            pool: pool.clone(),
            bucket,
            pairs,
        });
        lanes.insert(key, lane.clone());
        self.sweep(&mut lanes);
        lane
    }

    fn touch(&self, bucket: &Bucket) {
        let now = self.uses.fetch_add(1, Ordering::Relaxed);
        bucket.last_used.store(now, Ordering::Relaxed);
    }

    /// Forgets the buckets idle longest, with their lanes and pairs, once there are more than
    /// `max_destinations`: down to nine tenths of it, so sweeps are rare. Called with the
    /// lanes locked.
    fn sweep(&self, lanes: &mut HashMap<(String, String), Arc<Lane>>) {
        let mut buckets = lock(&self.buckets);
        if buckets.len() < self.sweep_at.load(Ordering::Relaxed) {
            return;
        }
        let mut pairs = lock(&self.pairs);
        let now = Instant::now();
        // A bucket is busy if a queue or worker holds one of its lanes (the map holds each
        // lane once) or one of its pairs is not at rest.
        let busy: HashSet<&str> = lanes
            .values()
            .filter(|lane| Arc::strong_count(lane) > 1)
            .map(|lane| lane.bucket.name.as_str())
            .chain(
                pairs
                    .values()
                    .filter(|pair| !pair.at_rest(now))
                    .map(|pair| pair.bucket.name.as_str()),
            )
            .collect();
        let idle = buckets
            .values()
            .filter(|b| !b.provider && !busy.contains(b.name.as_str()))
            .map(|b| (b.last_used.load(Ordering::Relaxed), b.name.clone()));
        let excess = buckets.len().saturating_sub(self.max_destinations * 9 / 10);
        let forget: HashSet<String> = least_recently_used(idle, excess).into_iter().collect();
        drop(busy);
        lanes.retain(|_, lane| !forget.contains(&lane.bucket.name));
        // What something still holds stays (and keeps its bucket); the next lane reuses it.
        pairs.retain(|_, pair| {
            !(forget.contains(&pair.bucket.name) && Arc::strong_count(pair) == 1)
        });
        let before = buckets.len();
        buckets.retain(|name, bucket| !(forget.contains(name) && Arc::strong_count(bucket) == 1));
        let forgotten = before - buckets.len();
        self.metrics
            .state_evicted(StateMap::ShapingDestinations, forgotten as u64);
        self.sweep_at.store(
            (buckets.len() + self.max_destinations / 10 + 1).max(self.max_destinations + 1),
            Ordering::Relaxed,
        );
        if forgotten > 0 {
            info!(
                forgotten,
                kept = buckets.len(),
                "shaping state of idle destinations forgotten"
            );
        }
    }

    /// Destinations whose shaping state is kept now.
    pub fn destinations(&self) -> usize {
        lock(&self.buckets).len()
    }

    fn pair(&self, source: &Arc<Source>, bucket: &Arc<Bucket>) -> Arc<Pair> {
        let key = format!("{}|{}", source.label, bucket.name);
        let mut pairs = lock(&self.pairs);
        if let Some(p) = pairs.get(&key) {
            return p.clone();
        }
        // Warm-up applies to providers: that is where reputation is judged per address.
        let warm = match (source.warmup_start, bucket.provider) {
            (Some(start), true) => Some(WarmCounter::load(
                self.spool.clone(),
                self.calendar.clone(),
                &source.label,
                &bucket.name,
                start,
                now_ms(),
                self.backend.store().cloned(),
            )),
            _ => None,
        };
        let rate = bucket.limits.rate.map(|r| r.per_second);
        if let Some(rate) = rate {
            self.metrics
                .shaping_rate(&source.label, &bucket.label, rate * 60.0);
        }
        let pair = Arc::new(Pair {
            key: key.clone(),
            source: source.clone(),
            bucket: bucket.clone(),
            counters: self.backend.pair(&key),
            warm,
            gates: self.gates.clone(),
            state: Mutex::new(PairState {
                aimd: rate.map(|r| Aimd::new(r, Instant::now())),
                ..PairState::default()
            }),
        });
        pairs.insert(key, pair.clone());
        pair
    }

    /// Waits until `pair` may send one more message, or says to switch pairs or put the
    /// message back. Waits count as "shaping wait" in the metrics.
    pub async fn admit(&self, lane: &Lane, pair: &Arc<Pair>) -> Admission {
        let started = Instant::now();
        let admission = self.admit_inner(lane, pair).await;
        self.metrics.shaping_wait(started.elapsed());
        admission
    }

    async fn admit_inner(&self, lane: &Lane, pair: &Arc<Pair>) -> Admission {
        loop {
            let now = Instant::now();
            if let Some(until) = pair.suspended(now) {
                // Another address of the pool may still send (a block is per address).
                if let Some(p) = lane.overflow_from(pair) {
                    return Admission::SwitchTo(PairHandle(p));
                }
                let wait = until - now;
                if wait > LONG_WAIT {
                    return Admission::Later(now_ms() + wait.as_millis() as u64);
                }
                tokio::time::sleep(wait).await;
                continue;
            }
            if pair.capped(now_ms()) {
                if let Some(p) = self.overflow(lane, pair) {
                    return Admission::SwitchTo(PairHandle(p));
                }
            }
            let rate = pair.state().aimd.as_ref().map(|a| a.current);
            if let Some(rate) = rate {
                if let Err(wait) = pair.counters.take_message(rate).await {
                    if wait > LONG_WAIT {
                        return Admission::Later(now_ms() + wait.as_millis() as u64);
                    }
                    tokio::time::sleep(wait).await;
                    continue;
                }
            }
            if let Some(warm) = &pair.warm {
                let ms = now_ms();
                let taken = warm.take(ms).await;
                let state = warm.state(ms);
                self.metrics.warmup(
                    &pair.source.label,
                    &pair.bucket.label,
                    state.sent_today,
                    state.cap,
                );
                if let Take::CappedUntil(until) = taken {
                    if let Some(p) = self.overflow(lane, pair) {
                        return Admission::SwitchTo(PairHandle(p));
                    }
                    return Admission::Later(until);
                }
            }
            return Admission::Go;
        }
    }

    fn overflow(&self, lane: &Lane, capped: &Pair) -> Option<Arc<Pair>> {
        match self.when_capped {
            WhenCapped::Overflow => lane.overflow_from(capped),
            WhenCapped::Wait => None,
        }
    }

    /// A counted place for one new connection of `pair`; waits for one. `evict` closes idle
    /// pooled connections of the pair, whose places would otherwise stay taken until they
    /// time out.
    pub async fn open_slot(&self, pair: &Arc<Pair>, evict: impl Fn(&Arc<Pair>)) -> ConnSlot {
        let started = Instant::now();
        let mut evicted = false;
        loop {
            let freed = self.gates.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if pair.try_open().await {
                let slot = ConnSlot { pair: pair.clone() };
                if let Some(per_minute) = pair.bucket.limits.connections_per_minute {
                    while let Err(wait) = pair.counters.take_connection(per_minute).await {
                        tokio::time::sleep(wait).await;
                    }
                }
                self.metrics.shaping_wait(started.elapsed());
                return slot;
            }
            if !evicted {
                evicted = true;
                evict(pair);
                continue;
            }
            // A periodic look as well: a cap shared with other pairs may free up without this
            // pair's idle connections being the reason.
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
            evicted = false;
        }
    }

    /// Reads the results of an attempt by their categories ([`adaptive::signal`]): adapts
    /// the rate, suspends on throttling or blocks (and then makes permanent outcomes
    /// temporary: a block is about us, not the message).
    pub fn observe(&self, pair: &Pair, attempt: &mut Attempt) {
        let mut worst = (Signal::Neutral, None);
        let mut delivered = false;
        for o in &attempt.outcomes {
            delivered |= o.verdict == Verdict::Delivered;
            let signal = adaptive::signal(o.verdict, o.category);
            if signal > worst.0 {
                worst = (signal, Some(o.reply.clone()));
            }
        }
        let now = Instant::now();
        let (source, bucket) = (&pair.source.label, &pair.bucket.name);
        let mut state = pair.state();
        match worst {
            (Signal::Block, Some(reply)) => {
                let until = now + self.adaptive.block_suspend;
                let until_ms = now_ms() + self.adaptive.block_suspend.as_millis() as u64;
                warn!(source, bucket, %reply, until = %rfc3339(until_ms), "blocked: pair suspended");
                state.suspended_until = Some(until);
                state.suspended_until_ms = Some(until_ms);
                state.blocked = true;
                state.trigger = Some((reply, now_ms()));
                self.metrics
                    .shaping_blocked(&pair.source.label, &pair.bucket.label, true);
                for o in &mut attempt.outcomes {
                    if o.verdict == Verdict::Permanent {
                        o.verdict = Verdict::Temporary;
                    }
                }
            }
            (Signal::Throttle, Some(reply)) => {
                state.throttles += 1;
                self.metrics
                    .shaping_throttle(&pair.source.label, &pair.bucket.label);
                let old = state.aimd.as_ref().map(|a| a.current);
                let new = state
                    .aimd
                    .as_mut()
                    .and_then(|a| a.throttled(&self.adaptive, now));
                if let (Some(old), Some(new)) = (old, new) {
                    info!(source, bucket, old_per_minute = old * 60.0, new_per_minute = new * 60.0, %reply, "throttled: rate cut");
                    self.metrics
                        .shaping_rate(&pair.source.label, &pair.bucket.label, new * 60.0);
                    state.trigger = Some((reply.clone(), now_ms()));
                }
                if !self.adaptive.throttle_suspend.is_zero() {
                    let until_ms = now_ms() + self.adaptive.throttle_suspend.as_millis() as u64;
                    info!(source, bucket, %reply, until = %rfc3339(until_ms), "throttled: pair suspended");
                    state.suspended_until = Some(now + self.adaptive.throttle_suspend);
                    state.suspended_until_ms = Some(until_ms);
                    state.trigger = Some((reply, now_ms()));
                }
            }
            _ if delivered => {
                if state.blocked && state.suspended_until.is_none_or(|t| t <= now) {
                    state.blocked = false;
                    self.metrics
                        .shaping_blocked(&pair.source.label, &pair.bucket.label, false);
                }
                let old = state.aimd.as_ref().map(|a| a.current);
                if let Some(new) = state
                    .aimd
                    .as_mut()
                    .and_then(|a| a.succeeded(&self.adaptive, now))
                {
                    info!(
                        source,
                        bucket,
                        old_per_minute = old.unwrap_or(0.0) * 60.0,
                        new_per_minute = new * 60.0,
                        "sustained success: rate raised"
                    );
                    self.metrics
                        .shaping_rate(&pair.source.label, &pair.bucket.label, new * 60.0);
                }
            }
            _ => {}
        }
    }

    /// Every pair that has seen traffic, or only those of one bucket.
    pub fn views(&self, bucket: Option<&str>) -> Vec<PairView> {
        let now = Instant::now();
        let ms = now_ms();
        let mut views: Vec<PairView> = lock(&self.pairs)
            .values()
            .filter(|p| bucket.is_none_or(|b| p.bucket.name == b))
            .map(|p| {
                let state = p.state();
                let suspended = state.suspended_until.is_some_and(|t| t > now);
                let l = &p.bucket.limits;
                PairView {
                    bucket: p.bucket.name.clone(),
                    provider: p.bucket.provider,
                    source: p.source.label.clone(),
                    configured_rate_per_minute: l.rate.map(|r| r.per_minute_value()),
                    current_rate_per_minute: state.aimd.as_ref().map(|a| a.current * 60.0),
                    connections: p.counters.open_connections(),
                    max_connections: l.max_connections,
                    max_messages_per_connection: l.max_messages_per_connection,
                    connections_per_minute: l.connections_per_minute,
                    suspended_until: suspended
                        .then_some(state.suspended_until_ms)
                        .flatten()
                        .map(rfc3339),
                    blocked: state.blocked && suspended,
                    trigger_reply: state.trigger.as_ref().map(|t| t.0.clone()),
                    trigger_at: state.trigger.as_ref().map(|t| rfc3339(t.1)),
                    throttles: state.throttles,
                    warmup: p.warm.as_ref().map(|w| w.state(ms)),
                }
            })
            .collect();
        views.sort_by(|a, b| (&a.bucket, &a.source).cmp(&(&b.bucket, &b.source)));
        views
    }

    /// Writes exact warm-up counts (clean shutdown).
    pub async fn flush(&self) {
        let pairs: Vec<Arc<Pair>> = lock(&self.pairs).values().cloned().collect();
        for p in pairs {
            if let Some(w) = &p.warm {
                w.flush().await;
            }
        }
    }
}

/// The `count` names used longest ago (smallest `last_used` first); ties in name order, so
/// the choice does not depend on map order.
fn least_recently_used(
    candidates: impl Iterator<Item = (u64, String)>,
    count: usize,
) -> Vec<String> {
    let mut candidates: Vec<(u64, String)> = candidates.collect();
    if count < candidates.len() {
        candidates.select_nth_unstable(count);
        candidates.truncate(count);
    }
    candidates.into_iter().map(|(_, name)| name).collect()
}

/// Locks `m`; shaping's maps and counters stay usable even if a holder panicked (every update
/// is a whole insert or a counter step).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TlsPolicy;
    use crate::routing::route::Hop;

    fn plan(host: &str) -> RoutePlan {
        RoutePlan {
            key: format!("mx:{host}"),
            hops: vec![Hop {
                name: host.to_owned(),
                port: 25,
                static_route: false,
            }],
            tls: TlsPolicy::Opportunistic,
            auth: None,
            tls_label: "opportunistic",
            dane: None,
        }
    }

    /// A local-only shaper for `extra` config; the spool lives as long as the directory.
    fn shaper(extra: &str) -> (Arc<Shaper>, tempfile::TempDir) {
        let config = Config::parse(&format!(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n{extra}"
        ))
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let shaper = Shaper::new(&config, spool, Backend::Local, Arc::new(Metrics::new()));
        (shaper, dir)
    }

    #[tokio::test]
    async fn a_connection_slot_is_a_lease_naming_its_pair() {
        let (shaper, _dir) = shaper("");
        let pool = shaper.pools().resolve(None, "a.test");
        let a = shaper.lane(&pool, "a.test", &plan("mx.a.test")).choose();
        let b = shaper.lane(&pool, "b.test", &plan("mx.b.test")).choose();
        let slot: Box<dyn Lease> = Box::new(shaper.open_slot(&a, |_| {}).await);
        assert_eq!(slot.group(), a.key());
        assert_ne!(slot.group(), b.key());
        assert_eq!(a.counters.open_connections(), 1);
        drop(slot);
        assert_eq!(
            a.counters.open_connections(),
            0,
            "dropping the lease frees the place"
        );
    }
    /// Mail to ever new domains (one MX host set each) past `shaping.max_destinations`: the
    /// state of the destinations idle longest is forgotten, so the maps stay bounded, and
    /// each forgotten one is counted. Destinations in use, suspended or with a connection
    /// open, and providers, are kept.
    #[tokio::test]
    async fn destinations_past_the_bound_forget_the_idle_ones_longest_unused() {
        let (shaper, _dir) = shaper("[shaping]\nmax_destinations = 10\n");
        let pool = shaper.pools().resolve(None, "x.test");
        let lane = |i: usize| {
            let host = format!("mx.d{i}.test");
            shaper.lane(&pool, &format!("d{i}.test"), &plan(&host))
        };
        // Held by a ready queue, a suspended pair, an open connection, a provider.
        let queued = lane(0);
        let suspended = lane(1).choose();
        suspended.state().suspended_until = Some(Instant::now() + Duration::from_secs(600));
        let connected = shaper.open_slot(&lane(2).choose(), |_| {}).await;
        let gmail = shaper.lane(&pool, "gmail.com", &plan("gmail-smtp-in.l.google.com"));
        for i in 3..40 {
            lane(i);
            assert!(shaper.destinations() <= 10, "{}", shaper.destinations());
            assert!(lock(&shaper.lanes).len() <= 10);
            assert!(lock(&shaper.pairs).len() <= 10);
        }
        let kept: HashSet<String> = lock(&shaper.buckets).keys().cloned().collect();
        for name in [
            "mx:mx.d0.test",
            "mx:mx.d1.test",
            "mx:mx.d2.test",
            "google",
            "mx:mx.d39.test",
        ] {
            assert!(kept.contains(name), "{name} forgotten: {kept:?}");
        }
        assert!(
            !kept.contains("mx:mx.d3.test"),
            "the one idle longest stays: {kept:?}"
        );
        let forgotten = 41 - kept.len() as u64; // 40 destinations and the provider
        assert_eq!(
            shaper
                .metrics
                .state_evictions(StateMap::ShapingDestinations),
            forgotten
        );
        // A forgotten destination comes back with its configured limits.
        let again = lane(3);
        assert_eq!(again.bucket.name, "mx:mx.d3.test");
        assert!(again.pairs[0].at_rest(Instant::now()));
        drop((queued, connected, gmail));
    }
}
