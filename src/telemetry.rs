//! Every Prometheus metric tern exports, defined here and nowhere else.
//!
//! One [`Metrics`] value owns its own [`Registry`] (never prometheus' global default one), so
//! tests can make as many as they like. Label values are bounded by construction: rejection
//! reasons, delivery outcomes and DSN actions are enums, and a delivery's destination is its
//! static route key (`route:<domain>`, a configured, finite set) or `"other"` (MX destinations
//! are unbounded and never become label values).
//!
//! Spool figures are not pushed: [`Metrics::render`] reads [`Spool::stats`] and
//! [`Spool::commit_stats`] at scrape time, and the ready-queue depths it is given (keyed by
//! destination key) are folded into bounded labels then. Group-commit rounds are observed on
//! the spool's sync thread ([`Metrics::observe_spool`]). DKIM label values are signing
//! domains, which only come from configured `[[dkim]]` keys.
//!
//! Bounce processing and feedback: suppression-list reasons are bounce categories or
//! `manual`, inbound report kinds and categories are enums, and a webhook's label is its
//! index in the config (`webhooks[i]`). The suppression list size and the webhook backlogs
//! are gauges moved by every change since start, plus what a background scan at start counted
//! ([`Metrics::suppression_counted`], [`Metrics::webhook_backlog_moved`]).
//!
//! The set of static routes is replaced by a config reload ([`Metrics::set_routes`]); label
//! values of routes that are gone stay in the output with their last values (a Prometheus
//! counter must never vanish and come back), and new routes get label values from then on.
//!
//! Floor 0: this module imports nothing of the crate. Its label values are its own enums
//! ([`Outcome`], [`DsnAction`], ...); domain types convert into them at the call site.

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Serialize;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_queue::{Round, Spool};

/// Destination label for everything that is not a static route.
const OTHER_DESTINATION: &str = "other";

/// Why a message (or a recipient, or a client's attempt to submit) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// RCPT from a client neither in a relay network nor authenticated.
    RelayDenied,
    /// Over `limits.max_message_size`, declared (MAIL SIZE=) or actual.
    Size,
    /// Over `limits.max_recipients` (452).
    Recipients,
    /// Bare CR, bare LF or NUL in the content (SMTP smuggling).
    Smuggling,
    /// AUTH with wrong credentials.
    AuthFailed,
    /// The spool could not commit the message (451).
    SpoolError,
    /// The spool's file system lacks the free space `spool.min_free_space` keeps
    /// (452 4.3.1, HTTP 507).
    SpoolFull,
    /// A command that does not parse: unknown verb, bad syntax or parameter, bad address.
    Syntax,
    /// A recipient on the suppression list (reject mode).
    Suppressed,
    /// A header section over `limits.max_header_size` (552 5.3.4).
    HeaderSize,
    /// More `Received` headers than `limits.max_hops`: a mail loop (554 5.4.6).
    Loop,
    /// A connection over `limits.max_connection_rate_per_ip` (421 4.7.0 at the door).
    ConnectionRate,
    /// AUTH from a client or for a user with too many recent failures (454 4.7.0).
    AuthThrottled,
    /// Mail to a bounce domain over `limits.max_bounce_rate_per_ip` (450 4.7.1).
    BounceRate,
    /// DATA/BDAT while `limits.max_inflight_bytes` is spent (452 4.3.1).
    Inflight,
}

impl Rejection {
    pub const ALL: [Rejection; 15] = [
        Rejection::RelayDenied,
        Rejection::Size,
        Rejection::Recipients,
        Rejection::Smuggling,
        Rejection::AuthFailed,
        Rejection::SpoolError,
        Rejection::SpoolFull,
        Rejection::Syntax,
        Rejection::Suppressed,
        Rejection::HeaderSize,
        Rejection::Loop,
        Rejection::ConnectionRate,
        Rejection::AuthThrottled,
        Rejection::BounceRate,
        Rejection::Inflight,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::RelayDenied => "relay_denied",
            Rejection::Size => "size",
            Rejection::Recipients => "recipients",
            Rejection::Smuggling => "smuggling",
            Rejection::AuthFailed => "auth_failed",
            Rejection::SpoolError => "spool_error",
            Rejection::SpoolFull => "spool_full",
            Rejection::Syntax => "syntax",
            Rejection::Suppressed => "suppressed",
            Rejection::HeaderSize => "header_size",
            Rejection::Loop => "loop",
            Rejection::ConnectionRate => "connection_rate",
            Rejection::AuthThrottled => "auth_throttled",
            Rejection::BounceRate => "bounce_rate",
            Rejection::Inflight => "inflight_bytes",
        }
    }
}

/// Why the server ended an SMTP session (the client did not quit): the `reason` label of
/// `tern_smtp_disconnects_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disconnect {
    /// No command within `limits.command_timeout`.
    CommandTimeout,
    /// No content within `limits.data_timeout`, or a BDAT transaction idle that long.
    DataTimeout,
    /// The client did not take a reply within `limits.command_timeout`.
    WriteTimeout,
    /// The session lasted `limits.session_timeout`.
    SessionTimeout,
    /// Message content slower than `limits.min_data_rate`.
    TooSlow,
}

impl Disconnect {
    pub const ALL: [Disconnect; 5] = [
        Disconnect::CommandTimeout,
        Disconnect::DataTimeout,
        Disconnect::WriteTimeout,
        Disconnect::SessionTimeout,
        Disconnect::TooSlow,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Disconnect::CommandTimeout => "command_timeout",
            Disconnect::DataTimeout => "data_timeout",
            Disconnect::WriteTimeout => "write_timeout",
            Disconnect::SessionTimeout => "session_timeout",
            Disconnect::TooSlow => "too_slow",
        }
    }
}

/// A table of per-client state at the SMTP edge, as the `table` label of
/// `tern_smtp_client_evictions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientTable {
    ConnectionRate,
    BounceRate,
    AuthClient,
    AuthUser,
}

impl ClientTable {
    pub const ALL: [ClientTable; 4] = [
        ClientTable::ConnectionRate,
        ClientTable::BounceRate,
        ClientTable::AuthClient,
        ClientTable::AuthUser,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ClientTable::ConnectionRate => "connection_rate",
            ClientTable::BounceRate => "bounce_rate",
            ClientTable::AuthClient => "auth_client",
            ClientTable::AuthUser => "auth_user",
        }
    }
}

/// How a message came in: the `protocol` label of `tern_messages_received_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// SMTP or ESMTP, with or without TLS and AUTH.
    Smtp,
    /// `POST /api/v1/inject` on the admin API.
    Http,
}

impl Protocol {
    pub const ALL: [Protocol; 2] = [Protocol::Smtp, Protocol::Http];

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Smtp => "smtp",
            Protocol::Http => "http",
        }
    }
}

/// What became of a recipient, as the `outcome` label of `tern_deliveries_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Delivered,
    Deferred,
    Bounced,
    Expired,
    Deleted,
    Complaint,
    Suppressed,
}

fn outcome_label(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Delivered => "delivered",
        Outcome::Deferred => "deferred",
        Outcome::Bounced => "bounced",
        Outcome::Expired => "expired",
        Outcome::Deleted => "deleted",
        Outcome::Complaint => "complaint",
        Outcome::Suppressed => "suppressed",
    }
}

impl Outcome {
    /// Every outcome, in the order of [`RateMinute::counts`].
    pub const ALL: [Outcome; 7] = [
        Outcome::Delivered,
        Outcome::Deferred,
        Outcome::Bounced,
        Outcome::Expired,
        Outcome::Deleted,
        Outcome::Complaint,
        Outcome::Suppressed,
    ];

    pub fn as_str(self) -> &'static str {
        outcome_label(self)
    }

    fn index(self) -> usize {
        Outcome::ALL
            .iter()
            .position(|&o| o == self)
            .unwrap_or_default()
    }
}

/// Minutes of recipient outcomes kept per destination label (the console's rate charts).
pub const RATE_MINUTES: u64 = 60;

/// One minute of recipient outcomes of one destination label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct RateMinute {
    /// Minutes since the epoch.
    pub minute: u64,
    /// Per outcome, in the order of [`Outcome::ALL`].
    pub counts: [u64; 7],
}

/// Recipient outcomes per destination label (provider, static route or `other`) per minute
/// over the last [`RATE_MINUTES`]: what `tern_deliveries_total` counts, kept as a short
/// history for the console (Prometheus keeps the long one). Bounded: labels are bounded
/// (see [`ComplaintWindow`]), each keeps one slot per minute.
#[derive(Default)]
struct RateWindow {
    by_label: HashMap<String, [RateMinute; RATE_MINUTES as usize]>,
}

impl RateWindow {
    fn add(&mut self, label: &str, minute: u64, outcome: Outcome) {
        if !self.by_label.contains_key(label) {
            self.by_label.insert(
                label.to_owned(),
                [RateMinute::default(); RATE_MINUTES as usize],
            );
        }
        let slots = self.by_label.get_mut(label).expect("inserted above");
        let slot = &mut slots[(minute % RATE_MINUTES) as usize];
        if slot.minute != minute {
            *slot = RateMinute {
                minute,
                counts: [0; 7],
            };
        }
        slot.counts[outcome.index()] += 1;
    }

    /// Per label (in name order), the [`RATE_MINUTES`] minutes up to `minute`, oldest first,
    /// minutes without outcomes at zero.
    fn history(&self, minute: u64) -> Vec<(String, Vec<RateMinute>)> {
        let mut out: Vec<(String, Vec<RateMinute>)> = self
            .by_label
            .iter()
            .map(|(label, slots)| {
                let series = (minute + 1 - RATE_MINUTES.min(minute + 1)..=minute)
                    .map(|m| {
                        let slot = slots[(m % RATE_MINUTES) as usize];
                        if slot.minute == m {
                            slot
                        } else {
                            RateMinute {
                                minute: m,
                                counts: [0; 7],
                            }
                        }
                    })
                    .collect();
                (label.clone(), series)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }
}

/// Minutes since the epoch, now.
fn minute_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 60)
}

/// The action of a sent DSN (RFC 3464 `Action:`), as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnAction {
    Failed,
    Delayed,
    Delivered,
}

fn action_label(action: DsnAction) -> &'static str {
    match action {
        DsnAction::Failed => "failed",
        DsnAction::Delayed => "delayed",
        DsnAction::Delivered => "delivered",
    }
}

/// The static route keys a reload replaces; readers take one snapshot per use.
struct RouteKeys(std::sync::RwLock<Arc<HashSet<String>>>);

impl RouteKeys {
    fn get(&self) -> Arc<HashSet<String>> {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set(&self, keys: HashSet<String>) {
        *self
            .0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
    }
}

/// A shaping provider as the metrics see it: a destination is the provider's when the
/// recipient domain is one of `domains` or an MX host name ends with one of `mx_suffixes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderLabel {
    pub name: String,
    /// Lowercase, e.g. `.google.com`.
    pub mx_suffixes: Vec<String>,
    /// Lowercase recipient domains, e.g. `gmail.com`.
    pub domains: Vec<String>,
}

/// Delivered recipients and trusted complaints per (destination label, sender identity) in
/// hourly buckets over the last day: the complaint rate Gmail and Yahoo hold bulk senders to
/// (0.3%). Bounded: labels are providers, static routes and `other`; identities are the
/// configured signing domains and `other`.
#[derive(Default)]
struct ComplaintWindow {
    /// (label, identity) -> one bucket per hour of the day.
    counts: HashMap<(String, String), [HourBucket; 24]>,
}

/// (hour since the epoch, delivered, complaints).
type HourBucket = (u64, u64, u64);

impl ComplaintWindow {
    fn add(&mut self, label: &str, identity: &str, hour: u64, delivered: u64, complaints: u64) {
        let buckets = self
            .counts
            .entry((label.to_owned(), identity.to_owned()))
            .or_insert([(0, 0, 0); 24]);
        let bucket = &mut buckets[(hour % 24) as usize];
        if bucket.0 != hour {
            *bucket = (hour, 0, 0);
        }
        bucket.1 += delivered;
        bucket.2 += complaints;
    }

    /// (label, identity, complaints / delivered over the 24 hours up to `hour`); a key with
    /// complaints but no deliveries counts its complaints over one delivery.
    fn rates(&self, hour: u64) -> Vec<(&str, &str, f64)> {
        self.counts
            .iter()
            .map(|((label, identity), buckets)| {
                let (delivered, complaints) = buckets
                    .iter()
                    .filter(|b| b.0 + 24 > hour && b.0 <= hour)
                    .fold((0, 0), |(d, c), b| (d + b.1, c + b.2));
                let rate = complaints as f64 / delivered.max(1) as f64;
                (label.as_str(), identity.as_str(), rate)
            })
            .collect()
    }
}

fn lock_window(window: &Mutex<ComplaintWindow>) -> std::sync::MutexGuard<'_, ComplaintWindow> {
    window
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Hours since the epoch, now.
fn hour_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 3600)
}

/// How a config reload ended, as a label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    Ok,
    Failed,
}

impl ReloadResult {
    fn as_str(self) -> &'static str {
        match self {
            ReloadResult::Ok => "ok",
            ReloadResult::Failed => "failed",
        }
    }
}

/// Campaigns exported as gauges at most (the first that are not archived, by name).
pub const CAMPAIGNS_EXPORTED: usize = 20;
/// Variants exported per campaign at most.
pub const VARIANTS_EXPORTED: usize = 16;

/// One variant's campaign results for the gauges.
#[derive(Debug, Clone, Default)]
pub struct CampaignGauges {
    pub campaign: String,
    pub variant: String,
    pub counts: Vec<(&'static str, u64)>,
    /// (rate, mean, low, high, probability best).
    pub rates: Vec<(&'static str, f64, f64, f64, f64)>,
}

pub struct Metrics {
    registry: Registry,
    /// Static route keys (`route:<domain>`): destinations used as label values as they are.
    routes: RouteKeys,
    /// Shaping providers: the other destinations used as label values (by provider name).
    providers: std::sync::RwLock<Arc<Vec<ProviderLabel>>>,
    /// Sender identities (lowercase domains) used as label values; the rest is `other`.
    identities: std::sync::RwLock<Arc<HashSet<String>>>,
    complaint_window: Mutex<ComplaintWindow>,
    rate_window: Mutex<RateWindow>,
    complaint_rate: GaugeVec,
    delivery_failures: IntCounterVec,
    provider_feedback: IntCounterVec,

    ready: IntGauge,
    smtp_connections: IntCounter,
    smtp_connections_rejected: IntCounter,
    smtp_sessions: IntGauge,
    smtp_disconnects: IntCounterVec,
    smtp_inflight_bytes: IntGauge,
    smtp_client_evictions: IntCounterVec,

    messages_received: IntCounterVec,
    messages_rejected: IntCounterVec,

    spool_messages: IntGauge,
    spool_recovering: IntGauge,
    spool_bytes: IntGauge,
    spool_free_bytes: IntGauge,
    spool_commits: IntCounter,
    spool_syncs: IntCounter,
    /// Serializes the scrape-time copy of the spool's counters into ours.
    spool_sync: Mutex<()>,

    deliveries: IntCounterVec,
    delivery_attempt_seconds: Histogram,
    delivery_latency_seconds: Histogram,
    dsns_sent: IntCounterVec,
    tls_deliveries: IntCounterVec,
    tls_policy_sessions: IntCounterVec,

    ready_queue_depth: IntGaugeVec,
    /// Serializes scrapes: `ready_queue_depth` is rebuilt by each one.
    depth_sync: Mutex<()>,
    spool_batch_writes: Histogram,
    spool_round_seconds: Histogram,
    dkim_signatures: IntCounterVec,
    dkim_failures: IntCounterVec,
    dkim_published: IntGaugeVec,
    config_reloads: IntCounterVec,
    config_last_reload: Gauge,
    // Shaping: labels are a configured source address (or "default") and a provider name,
    // static route key or "other".
    shaping_rate: GaugeVec,
    shaping_throttles: IntCounterVec,
    shaping_blocked: IntGaugeVec,
    warmup_sent: IntGaugeVec,
    warmup_cap: IntGaugeVec,
    shaping_wait_seconds: Histogram,
    /// Registered only by a node with `shaping.shared` (a 0 would read as an outage elsewhere).
    shared_store: OnceLock<SharedStoreMetrics>,
    /// Registered only by a fleet node (`[cluster]`), like `shared_store`.
    cluster: OnceLock<ClusterMetrics>,
    sidecar_content: IntCounterVec,
    /// Campaign results (set at scrape time; at most [`CAMPAIGNS_EXPORTED`] campaigns).
    campaign_events: IntGaugeVec,
    campaign_rate: GaugeVec,
    campaign_best: GaugeVec,
    sidecar_engagements: IntCounterVec,
    sidecar_model_requests: IntCounterVec,
    sidecar_model_tokens: IntCounterVec,
    sidecar_model_seconds: Histogram,
    sidecar_generations: IntCounterVec,
    admin_connections: IntGauge,
    admin_refused: IntCounterVec,
    tracking_ignored: IntCounterVec,
    tracking_replay_evictions: IntCounter,
    suppression_entries: IntGauge,
    suppression_changes: IntCounterVec,
    suppressed_recipients: IntCounterVec,
    inbound_reports: IntCounterVec,
    webhook_posts: IntCounterVec,
    state_evictions: IntCounterVec,
    webhook_backlog: IntGaugeVec,
}

/// What happened to a recipient on the suppression list: refused (`suppression.mode =
/// "reject"`, 550 5.7.1) or accepted and dropped (`"drop"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SuppressedAction {
    Reject,
    Drop,
}

impl SuppressedAction {
    fn as_str(self) -> &'static str {
        match self {
            SuppressedAction::Reject => "reject",
            SuppressedAction::Drop => "drop",
        }
    }
}

/// A bounded map of state kept per destination, host or client: the `map` label of
/// `tern_state_evictions_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateMap {
    /// Shaping state of destinations (buckets, their lanes and pairs) idle for longest.
    ShapingDestinations,
    /// Hosts remembered as having broken TLS, soonest to expire first.
    BrokenTlsHosts,
    /// Idle outbound connections kept for reuse, oldest first.
    IdleConnections,
    /// Events dropped from a webhook outbox over its `max_backlog`, oldest first.
    WebhookEvents,
}

impl StateMap {
    const ALL: [StateMap; 4] = [
        StateMap::ShapingDestinations,
        StateMap::BrokenTlsHosts,
        StateMap::IdleConnections,
        StateMap::WebhookEvents,
    ];

    fn as_str(self) -> &'static str {
        match self {
            StateMap::ShapingDestinations => "shaping_destinations",
            StateMap::BrokenTlsHosts => "broken_tls_hosts",
            StateMap::IdleConnections => "idle_connections",
            StateMap::WebhookEvents => "webhook_events",
        }
    }
}

/// How one webhook post ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookResult {
    /// 2xx: the batch was removed from the outbox.
    Ok,
    /// Any other HTTP status.
    Status,
    /// Connection or protocol error.
    Error,
    /// No answer within the request timeout.
    Timeout,
}

impl WebhookResult {
    const ALL: [WebhookResult; 4] = [
        WebhookResult::Ok,
        WebhookResult::Status,
        WebhookResult::Error,
        WebhookResult::Timeout,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WebhookResult::Ok => "ok",
            WebhookResult::Status => "status",
            WebhookResult::Error => "error",
            WebhookResult::Timeout => "timeout",
        }
    }
}

/// Why the admin listener turned a client away: the `reason` label of
/// `tern_admin_refused_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// Over `admin.max_connections`: answered 503 and closed.
    Connections,
    /// No whole request head within `admin.header_timeout`: closed.
    HeaderTimeout,
    /// An answer that made no progress for `admin.write_timeout` (the client does not read): closed.
    WriteTimeout,
    /// A request body over its limit: 413.
    BodySize,
}

impl AdminRefusal {
    const ALL: [AdminRefusal; 4] = [
        AdminRefusal::Connections,
        AdminRefusal::HeaderTimeout,
        AdminRefusal::WriteTimeout,
        AdminRefusal::BodySize,
    ];

    fn as_str(self) -> &'static str {
        match self {
            AdminRefusal::Connections => "connections",
            AdminRefusal::HeaderTimeout => "header_timeout",
            AdminRefusal::WriteTimeout => "write_timeout",
            AdminRefusal::BodySize => "body_size",
        }
    }
}

/// Why a tracking hit (`/t/o/`, `/t/c/`) recorded nothing: the `reason` label of
/// `tern_tracking_ignored_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingIgnored {
    /// Unsigned, altered, of the wrong kind, or tracking is off: 404.
    Invalid,
    /// Signed, but issued longer ago than `sidecar.tracking.max_age`: 404.
    Expired,
    /// The same message, recipient, kind and source counted already: served, not counted.
    Replay,
}

impl TrackingIgnored {
    const ALL: [TrackingIgnored; 3] = [
        TrackingIgnored::Invalid,
        TrackingIgnored::Expired,
        TrackingIgnored::Replay,
    ];

    fn as_str(self) -> &'static str {
        match self {
            TrackingIgnored::Invalid => "invalid",
            TrackingIgnored::Expired => "expired",
            TrackingIgnored::Replay => "replay",
        }
    }
}

/// What waits in a fleet node's outbox for the fleet's store: the `state` label of
/// `tern_cluster_outbox_depth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterOutbox {
    /// Suppression list changes (durable, in the spool).
    Suppressions,
    /// Suspends and resumes made while the store was away (in memory).
    Suspensions,
}

impl ClusterOutbox {
    const ALL: [ClusterOutbox; 2] = [ClusterOutbox::Suppressions, ClusterOutbox::Suspensions];

    fn as_str(self) -> &'static str {
        match self {
            ClusterOutbox::Suppressions => "suppressions",
            ClusterOutbox::Suspensions => "suspensions",
        }
    }
}

/// Why a call to the fleet's store failed: the `kind` label of `tern_cluster_errors_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterError {
    /// No connection could be opened (refused, TLS, AUTH, no answer to PING).
    Connect,
    /// No answer within `cluster.timeout` (ours, or the Redis client's own response
    /// timeout).
    Timeout,
    /// The connection failed under a command.
    Command,
    /// Redis answered with an error (a script's, CROSSSLOT, ...): the connection is fine.
    Reply,
}

impl ClusterError {
    const ALL: [ClusterError; 4] = [
        ClusterError::Connect,
        ClusterError::Timeout,
        ClusterError::Command,
        ClusterError::Reply,
    ];

    fn as_str(self) -> &'static str {
        match self {
            ClusterError::Connect => "connect",
            ClusterError::Timeout => "timeout",
            ClusterError::Command => "command",
            ClusterError::Reply => "reply",
        }
    }
}

/// A fleet node's replication figures (see [`Metrics::cluster`]). The follower's lag is
/// computed at scrape time from when its copy was last known to be current: the end of a
/// stream read that returned less than a full page (nothing more was waiting), or any time
/// a blocking read begun in that state is still waiting (news would wake it at once).
pub struct ClusterMetrics {
    pub up: IntGauge,
    outbox: IntGaugeVec,
    lag_seconds: Gauge,
    resyncs: IntCounterVec,
    changes: IntCounterVec,
    errors: IntCounterVec,
    /// Unix milliseconds when the copy was last known current (registration: start).
    current_at: std::sync::atomic::AtomicU64,
    /// A blocking read begun with the copy current is waiting.
    waiting_current: std::sync::atomic::AtomicBool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl ClusterMetrics {
    /// `n` more (positive) or fewer (negative) changes wait in `outbox`.
    pub fn outbox_moved(&self, outbox: ClusterOutbox, n: i64) {
        self.outbox.with_label_values(&[outbox.as_str()]).add(n);
    }

    /// Exactly `n` changes wait in `outbox` (a count corrects the moves).
    pub fn outbox_is(&self, outbox: ClusterOutbox, n: u64) {
        self.outbox
            .with_label_values(&[outbox.as_str()])
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn outbox_depth(&self, outbox: ClusterOutbox) -> i64 {
        self.outbox.with_label_values(&[outbox.as_str()]).get()
    }

    /// `n` suppression changes of this node taken by the store.
    pub fn pushed(&self, n: u64) {
        self.changes.with_label_values(&["pushed"]).inc_by(n);
    }

    /// `n` suppression changes of the fleet applied to this node's copy.
    pub fn applied(&self, n: u64) {
        self.changes.with_label_values(&["applied"]).inc_by(n);
    }

    /// A resync of the copy with the store (`merge` or `authoritative`).
    pub fn resynced(&self, mode: &'static str) {
        self.resyncs.with_label_values(&[mode]).inc();
    }

    pub fn error(&self, kind: ClusterError) {
        self.errors.with_label_values(&[kind.as_str()]).inc();
    }

    /// The follower starts a stream read; `current`: its last read left nothing waiting.
    pub fn follower_reading(&self, current: bool) {
        use std::sync::atomic::Ordering;
        if current {
            self.current_at.store(unix_ms(), Ordering::Release);
        }
        self.waiting_current.store(current, Ordering::Release);
    }

    /// The follower's read ended; `current`: it returned everything that was waiting.
    pub fn follower_read(&self, current: bool) {
        use std::sync::atomic::Ordering;
        if current {
            self.current_at.store(unix_ms(), Ordering::Release);
        }
        self.waiting_current.store(false, Ordering::Release);
    }

    /// Seconds since the copy was last known current (0 while it is).
    pub fn lag(&self) -> f64 {
        use std::sync::atomic::Ordering;
        if self.waiting_current.load(Ordering::Acquire) {
            return 0.0;
        }
        let at = self.current_at.load(Ordering::Acquire);
        unix_ms().saturating_sub(at) as f64 / 1000.0
    }
}

/// See [`Metrics::shared_store`].
pub struct SharedStoreMetrics {
    pub up: IntGauge,
    pub fallbacks: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// All metrics, registered, at zero; no static routes (every destination is "other").
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry.register(Box::new(c.clone())).expect("unique");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let gauge_vec = |name: &str, help: &str| {
            let g = GaugeVec::new(Opts::new(name, help), &["source", "provider"])
                .expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let int_gauge_vec = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["source", "provider"])
                .expect("valid metric");
            registry.register(Box::new(g.clone())).expect("unique");
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            registry.register(Box::new(h.clone())).expect("unique");
            h
        };
        let metrics = Metrics {
            routes: RouteKeys(std::sync::RwLock::new(Arc::new(HashSet::new()))),
            providers: std::sync::RwLock::new(Arc::new(Vec::new())),
            identities: std::sync::RwLock::new(Arc::new(HashSet::new())),
            complaint_window: Mutex::new(ComplaintWindow::default()),
            rate_window: Mutex::new(RateWindow::default()),
            complaint_rate: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tern_complaint_rate",
                        "Trusted complaints over delivered recipients in the last 24 hours, by destination (provider, static route or \"other\") and sender identity (a signing domain or \"other\"); Gmail and Yahoo want it under 0.003.",
                    ),
                    &["destination", "sender"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            delivery_failures: counter_vec(
                "tern_delivery_failures_total",
                "Recipients deferred, bounced or expired, by destination (provider, static route or \"other\"), outcome and category.",
                &["destination", "outcome", "category"],
            ),
            provider_feedback: counter_vec(
                "tern_provider_feedback_total",
                "Trusted asynchronous bounces and complaints, by destination (the provider of the recipient's domain, or \"other\") and kind (bounce, complaint).",
                &["destination", "kind"],
            ),
            ready: gauge(
                "tern_ready",
                "1 while GET /readyz answers 200 (spool healthy, every listener accepting, not draining); set at each check and scrape.",
            ),
            smtp_connections: counter(
                "tern_smtp_connections_total",
                "Inbound SMTP connections accepted by a listener, including those refused at the limit.",
            ),
            smtp_connections_rejected: counter(
                "tern_smtp_connections_rejected_total",
                "Inbound SMTP connections refused at the door (connection limits, 421).",
            ),
            smtp_sessions: gauge("tern_smtp_sessions", "Open inbound SMTP sessions."),
            smtp_disconnects: counter_vec(
                "tern_smtp_disconnects_total",
                "SMTP sessions the server ended with 421 4.4.2, by reason: command_timeout, data_timeout (also an idle BDAT transaction), write_timeout (the client took no reply), session_timeout, too_slow (under limits.min_data_rate).",
                &["reason"],
            ),
            smtp_inflight_bytes: gauge(
                "tern_smtp_inflight_bytes",
                "Bytes SMTP sessions hold for messages in progress (limited by limits.max_inflight_bytes).",
            ),
            smtp_client_evictions: counter_vec(
                "tern_smtp_client_evictions_total",
                "Live per-client entries dropped because their table was full (65,536 clients), by table: connection_rate, bounce_rate, auth_client, auth_user.",
                &["table"],
            ),
            messages_received: counter_vec(
                "tern_messages_received_total",
                "Messages accepted, by protocol: smtp (250 after DATA/BDAT LAST) or http (200 from POST /api/v1/inject).",
                &["protocol"],
            ),
            messages_rejected: counter_vec(
                "tern_messages_rejected_total",
                "Inbound refusals by reason (recipients for relay_denied/recipients/bounce_rate, attempts for auth_failed/auth_throttled, connections for connection_rate).",
                &["reason"],
            ),
            spool_messages: gauge(
                "tern_spool_messages",
                "Envelopes in the spool (one per message and destination domain).",
            ),
            spool_recovering: gauge(
                "tern_spool_recovering",
                "1 while the spool's crash-recovery scan runs in the background (mail is taken meanwhile; tern_spool_messages and tern_spool_bytes are estimates until it ends), else 0.",
            ),
            spool_bytes: gauge("tern_spool_bytes", "Body bytes in the spool."),
            spool_free_bytes: gauge(
                "tern_spool_free_bytes",
                "Free bytes on the spool's file system (new mail is refused below spool.min_free_space).",
            ),
            spool_commits: counter(
                "tern_spool_commits_total",
                "Spool writes (commit, update, remove) since the spool was opened.",
            ),
            spool_syncs: counter(
                "tern_spool_syncs_total",
                "Spool group-commit rounds (each one merged batch and its fsyncs) since open.",
            ),
            campaign_events: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tern_campaign_events",
                        "Campaign results: events per campaign, variant and kind (sends = delivered, bounces, human_opens, machine_opens, clicks, unsubscribes, complaints, conversions), as GET /api/v1/campaigns/{name}/results counts them; the first 20 campaigns that are not archived, by name, 16 variants each.",
                    ),
                    &["campaign", "variant", "kind"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            campaign_rate: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tern_campaign_rate",
                        "Campaign results: each rate's Beta posterior per campaign and variant (rate = open, click, conversion, unsubscribe, complaint, bounce; stat = mean, low, high: the 95% credible interval).",
                    ),
                    &["campaign", "variant", "rate", "stat"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            campaign_best: {
                let g = GaugeVec::new(
                    Opts::new(
                        "tern_campaign_best_probability",
                        "Campaign results: the probability that the variant has the best rate of its campaign (highest open, click and conversion rate; lowest unsubscribe, complaint and bounce rate).",
                    ),
                    &["campaign", "variant", "rate"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            sidecar_content: counter_vec(
                "tern_sidecar_content_total",
                "Sidecar results per recipient: model, cache, shared (generated once per campaign, variant and segment) or default content, or why the defaults rendered (disabled, breaker_open, timeout, connect, status, malformed, guardrail, segment_limit), or unknown_campaign / template_error (sent as submitted).",
                &["result"],
            ),
            sidecar_engagements: counter_vec(
                "tern_sidecar_engagements_total",
                "Opens and clicks counted by the tracking endpoints, human or machine (prefetch, scanner): the first hit of each message, recipient, kind and source (replays are in tern_tracking_ignored_total).",
                &["kind", "source"],
            ),
            sidecar_model_requests: counter_vec(
                "tern_sidecar_model_requests_total",
                "HTTP requests to the content model (each attempt, retries included), by outcome: ok, connect, timeout, status (not 200), malformed (not the JSON asked for).",
                &["outcome"],
            ),
            sidecar_model_tokens: counter_vec(
                "tern_sidecar_model_tokens_total",
                "Tokens the content model reported in its answers' usage field, by kind (prompt, completion).",
                &["kind"],
            ),
            sidecar_model_seconds: histogram(
                "tern_sidecar_model_request_seconds",
                "Latency of one HTTP request to the content model (connection included when a new one was needed), any outcome.",
                vec![0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 30.0],
            ),
            sidecar_generations: counter_vec(
                "tern_sidecar_generations_total",
                "Slot generations by scope (coarse: once per campaign, variant and segment, shared by its recipients; recipient: one recipient's own) and result (model, failed, over_budget: a recipient generation refused by the campaign's calls per hour, the coarse text used instead).",
                &["scope", "result"],
            ),
            admin_connections: gauge(
                "tern_admin_connections",
                "Connections open on the admin listener (API, /metrics, tracking endpoints).",
            ),
            admin_refused: counter_vec(
                "tern_admin_refused_total",
                "Clients the admin listener turned away: connections (over admin.max_connections, 503), header_timeout (no request head within admin.header_timeout, closed), body_size (413).",
                &["reason"],
            ),
            tracking_ignored: counter_vec(
                "tern_tracking_ignored_total",
                "Tracking hits that recorded nothing: invalid (404), expired (older than sidecar.tracking.max_age, 404), replay (counted already; served).",
                &["reason"],
            ),
            tracking_replay_evictions: counter(
                "tern_tracking_replay_evictions_total",
                "Remembered opens and clicks forgotten before their tokens expired, to stay within sidecar.tracking.replay_entries (a replay of those counts again).",
            ),
            spool_sync: Mutex::new(()),
            deliveries: counter_vec(
                "tern_deliveries_total",
                "Recipient results of delivery attempts, by destination (provider, static route key or \"other\") and outcome.",
                &["destination", "outcome"],
            ),
            delivery_attempt_seconds: histogram(
                "tern_delivery_attempt_seconds",
                "Duration of one delivery attempt of one envelope.",
                vec![
                    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                ],
            ),
            delivery_latency_seconds: histogram(
                "tern_delivery_latency_seconds",
                "Time from acceptance to delivery, per delivered recipient.",
                vec![
                    0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0,
                    432000.0,
                ],
            ),
            dsns_sent: counter_vec(
                "tern_dsns_sent_total",
                "Delivery status notifications queued, by action.",
                &["action"],
            ),
            tls_deliveries: counter_vec(
                "tern_tls_deliveries_total",
                "Delivered recipients whose attempt used TLS, by destination (share: this over deliveries{outcome=\"delivered\"}).",
                &["destination"],
            ),
            tls_policy_sessions: counter_vec(
                "tern_tls_policy_sessions_total",
                "New outbound connections by the TLS policy they were under (dane, dane-only, mta-sts-enforce, mta-sts-testing, or a level: required, encrypt, opportunistic, disabled) and result (ok, or the RFC 8460 failure type: tlsa-invalid, dnssec-invalid, dane-required, certificate-not-trusted, starttls-not-supported, ...).",
                &["policy", "result"],
            ),
            ready_queue_depth: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tern_ready_queue_depth",
                        "Messages ready for delivery in memory, by destination (provider, static route key or \"other\"), at scrape time.",
                    ),
                    &["destination"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            depth_sync: Mutex::new(()),
            spool_batch_writes: histogram(
                "tern_spool_commit_batch_writes",
                "Writes (commit, update, remove) merged into one group-commit round.",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0],
            ),
            spool_round_seconds: histogram(
                "tern_spool_flush_seconds",
                "Duration of one group-commit round: the merged batch, sled's flush and the fsyncs.",
                vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
                ],
            ),
            dkim_signatures: counter_vec(
                "tern_dkim_signatures_total",
                "DKIM signatures made, by signing domain (a configured [[dkim]] domain) and algorithm.",
                &["domain", "algorithm"],
            ),
            dkim_failures: counter_vec(
                "tern_dkim_signing_failures_total",
                "DKIM signatures that could not be made (the message went out without that signature).",
                &["domain", "algorithm"],
            ),
            dkim_published: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tern_dkim_key_published",
                        "1 when DNS publishes the configured key at SELECTOR._domainkey.DOMAIN (checked at start and daily; a retired key may be gone), 0 when it is missing or another key (alert on 0).",
                    ),
                    &["domain", "selector"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            config_reloads: counter_vec(
                "tern_config_reloads_total",
                "Config reloads (SIGHUP) by result: ok (applied) or failed (old config kept).",
                &["result"],
            ),
            config_last_reload: {
                let g = Gauge::new(
                    "tern_config_last_reload_success_timestamp_seconds",
                    "Unix time of the last successful config load (start or reload).",
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            shaping_rate: gauge_vec(
                "tern_shaping_rate_per_minute",
                "Current (adaptive) message rate per source and provider, messages per minute.",
            ),
            shaping_throttles: counter_vec(
                "tern_shaping_throttles_total",
                "Throttling replies (421, 4.7.x, provider wording) per source and provider.",
                &["source", "provider"],
            ),
            shaping_blocked: int_gauge_vec(
                "tern_shaping_blocked",
                "1 while a source is suspended for a provider after a blocking reply (alert on it).",
            ),
            warmup_sent: int_gauge_vec(
                "tern_warmup_sent_today",
                "Messages sent today by a warming-up source to a provider.",
            ),
            warmup_cap: int_gauge_vec(
                "tern_warmup_cap_today",
                "Today's warm-up cap of a source for a provider (-1: warm, no cap).",
            ),
            suppression_entries: gauge(
                "tern_suppression_entries",
                "Entries stored in the suppression list (expired soft entries count until replaced or removed).",
            ),
            suppression_changes: counter_vec(
                "tern_suppression_changes_total",
                "Suppression list entries added (new addresses) and removed, by reason (a bounce category or manual).",
                &["change", "reason"],
            ),
            suppressed_recipients: counter_vec(
                "tern_suppressed_recipients_total",
                "Recipients on the suppression list at submission, by action: reject (550 5.7.1) or drop.",
                &["action"],
            ),
            inbound_reports: counter_vec(
                "tern_inbound_reports_total",
                "Recipients reported by processed inbound mail to the bounce domains, by kind (dsn, arf, autoreply, none), category (none: a message naming no recipient) and trusted (true: tied to mail tern sent by a VERP token or an X-Tern-Id, so it changed state; false: counted only).",
                &["kind", "category", "trusted"],
            ),
            state_evictions: counter_vec(
                "tern_state_evictions_total",
                "Entries dropped from a bounded map to stay within its bound, by map: shaping_destinations (idle destinations' shaping state), broken_tls_hosts, idle_connections (QUIT), webhook_events (oldest events of an outbox over max_backlog).",
                &["map"],
            ),
            webhook_posts: counter_vec(
                "tern_webhook_posts_total",
                "Event batches posted to a webhook (its index in the config), by result: ok (2xx), status, error, timeout.",
                &["webhook", "result"],
            ),
            webhook_backlog: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "tern_webhook_backlog",
                        "Events waiting in a webhook's outbox (its index in the config).",
                    ),
                    &["webhook"],
                )
                .expect("valid metric");
                registry.register(Box::new(g.clone())).expect("unique");
                g
            },
            shared_store: OnceLock::new(),
            cluster: OnceLock::new(),
            shaping_wait_seconds: histogram(
                "tern_shaping_wait_seconds",
                "Time a delivery worker waited for shaping (rate, suspension, connection slot).",
                vec![0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0],
            ),
            registry,
        };
        for result in [ReloadResult::Ok, ReloadResult::Failed] {
            metrics.config_reloads.with_label_values(&[result.as_str()]);
        }
        metrics.config_loaded();
        // Every fixed label value exists from the start, so rates work from the first scrape.
        for reason in Rejection::ALL {
            metrics
                .messages_rejected
                .with_label_values(&[reason.as_str()]);
        }
        for reason in Disconnect::ALL {
            metrics
                .smtp_disconnects
                .with_label_values(&[reason.as_str()]);
        }
        for table in ClientTable::ALL {
            metrics
                .smtp_client_evictions
                .with_label_values(&[table.as_str()]);
        }
        for intake in Protocol::ALL {
            metrics
                .messages_received
                .with_label_values(&[intake.as_str()]);
        }
        for map in StateMap::ALL {
            metrics.state_evictions.with_label_values(&[map.as_str()]);
        }
        for action in [DsnAction::Failed, DsnAction::Delayed, DsnAction::Delivered] {
            metrics.dsns_sent.with_label_values(&[action_label(action)]);
        }
        for action in [SuppressedAction::Reject, SuppressedAction::Drop] {
            metrics
                .suppressed_recipients
                .with_label_values(&[action.as_str()]);
        }
        for reason in AdminRefusal::ALL {
            metrics.admin_refused.with_label_values(&[reason.as_str()]);
        }
        for reason in TrackingIgnored::ALL {
            metrics
                .tracking_ignored
                .with_label_values(&[reason.as_str()]);
        }
        metrics
    }

    /// The suppression list's size as counted by the start-up scan, added to the changes
    /// made since start.
    pub fn suppression_counted(&self, entries: u64) {
        self.suppression_entries
            .add(i64::try_from(entries).unwrap_or(i64::MAX));
    }

    /// `added` new entries with `reason` (replacing an entry adds none).
    pub fn suppression_added(&self, reason: &str, added: u64) {
        self.suppression_changes
            .with_label_values(&["add", reason])
            .inc_by(added);
        self.suppression_entries
            .add(i64::try_from(added).unwrap_or(i64::MAX));
    }

    pub fn suppression_removed(&self, reason: &str) {
        self.suppression_changes
            .with_label_values(&["remove", reason])
            .inc();
        self.suppression_entries.dec();
    }

    pub fn suppressed(&self, action: SuppressedAction) {
        self.suppressed_recipients
            .with_label_values(&[action.as_str()])
            .inc();
    }

    /// One recipient of a processed inbound message (`category` `none` for a message that
    /// names nobody).
    pub fn inbound_report(&self, kind: &str, category: &str, trusted: bool) {
        let trusted = if trusted { "true" } else { "false" };
        self.inbound_reports
            .with_label_values(&[kind, category, trusted])
            .inc();
    }

    /// Webhook `index` exists: its backlog gauge and every result label show from now on.
    pub fn webhook_registered(&self, index: usize) {
        let label = index.to_string();
        self.webhook_backlog.with_label_values(&[&label]);
        for result in WebhookResult::ALL {
            self.webhook_posts
                .with_label_values(&[&label, result.as_str()]);
        }
    }

    /// `events` were queued in (positive) or removed from (negative) webhook `index`'s outbox.
    pub fn webhook_backlog_moved(&self, index: usize, events: i64) {
        self.webhook_backlog
            .with_label_values(&[&index.to_string()])
            .add(events);
    }

    /// `entries` were dropped from `map` to keep it within its bound.
    pub fn state_evicted(&self, map: StateMap, entries: u64) {
        self.state_evictions
            .with_label_values(&[map.as_str()])
            .inc_by(entries);
    }

    /// Evictions from `map` so far.
    pub fn state_evictions(&self, map: StateMap) -> u64 {
        self.state_evictions
            .with_label_values(&[map.as_str()])
            .get()
    }

    pub fn webhook_post(&self, index: usize, result: WebhookResult) {
        self.webhook_posts
            .with_label_values(&[&index.to_string(), result.as_str()])
            .inc();
    }

    /// Makes the static routes' keys (`route:<domain>`) usable as destination labels.
    pub fn with_routes<'a>(self, route_domains: impl IntoIterator<Item = &'a str>) -> Metrics {
        self.set_routes(route_domains);
        self
    }

    /// Replaces the set of destination label values (config reload): the domains of the
    /// static routes.
    pub fn set_routes<'a>(&self, route_domains: impl IntoIterator<Item = &'a str>) {
        self.routes.set(
            route_domains
                .into_iter()
                .map(|domain| format!("route:{domain}"))
                .collect(),
        );
    }

    /// Records group-commit rounds of `spool` (batch size and duration) from now on.
    pub fn observe_spool(self: &Arc<Self>, spool: &Spool) {
        let metrics = Arc::clone(self);
        spool.on_round(move |round: Round| {
            metrics.spool_batch_writes.observe(round.writes as f64);
            metrics
                .spool_round_seconds
                .observe(round.took.as_secs_f64());
        });
    }

    /// A config reload ended with `result`.
    pub fn config_reload(&self, result: ReloadResult) {
        self.config_reloads
            .with_label_values(&[result.as_str()])
            .inc();
        if result == ReloadResult::Ok {
            self.config_loaded();
        }
    }

    fn config_loaded(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.config_last_reload.set(now.as_secs_f64());
    }

    /// A DKIM signature made for `domain` (a configured signing domain).
    pub fn dkim_signed(&self, domain: &str, algorithm: &str) {
        self.dkim_signatures
            .with_label_values(&[domain, algorithm])
            .inc();
    }

    /// The result of the DNS check of one configured key (domain and selector come from
    /// `[[dkim]]`, a bounded set).
    pub fn dkim_key_published(&self, domain: &str, selector: &str, ok: bool) {
        self.dkim_published
            .with_label_values(&[domain, selector])
            .set(i64::from(ok));
    }

    pub fn dkim_failed(&self, domain: &str, algorithm: &str) {
        self.dkim_failures
            .with_label_values(&[domain, algorithm])
            .inc();
    }

    /// The bounded label for destination key `key` (`route:<domain>` or `mx:<hosts>`) of
    /// mail to recipient `domain` when known: a static route's key as it is, the name of the
    /// shaping provider the domain or an MX host belongs to, else `other`.
    fn destination<'a>(
        &self,
        routes: &HashSet<String>,
        key: &'a str,
        domain: Option<&str>,
    ) -> Cow<'a, str> {
        if routes.contains(key) {
            return Cow::Borrowed(key);
        }
        let providers = self
            .providers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let hosts = key.strip_prefix("mx:").unwrap_or("");
        let matches = |p: &ProviderLabel| {
            domain.is_some_and(|d| p.domains.iter().any(|x| x.eq_ignore_ascii_case(d)))
                || hosts.split(',').filter(|h| !h.is_empty()).any(|h| {
                    let h = h.trim_end_matches('.');
                    p.domains.iter().any(|x| x.eq_ignore_ascii_case(h))
                        || p.mx_suffixes.iter().any(|s| {
                            h.len() >= s.len() && h[h.len() - s.len()..].eq_ignore_ascii_case(s)
                        })
                })
        };
        match providers.iter().find(|p| matches(p)) {
            Some(p) => Cow::Owned(p.name.clone()),
            None => Cow::Borrowed(OTHER_DESTINATION),
        }
    }

    /// The label of destination key `key` for mail to recipient `domain` (see
    /// [`Metrics::delivery`]).
    pub fn label<'a>(&self, key: &'a str, domain: Option<&str>) -> Cow<'a, str> {
        self.destination(&self.routes.get(), key, domain)
    }

    /// The shaping providers whose names label destinations from now on (configured and
    /// built-in; a provider name never collides with a `route:` key).
    pub fn set_providers(&self, providers: Vec<ProviderLabel>) {
        *self
            .providers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(providers);
    }

    /// The sender identities (signing domains) that label the complaint rate; other senders
    /// are `other`.
    pub fn set_sender_identities<'a>(&self, domains: impl IntoIterator<Item = &'a str>) {
        *self
            .identities
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(
            domains
                .into_iter()
                .map(|d| d.to_ascii_lowercase())
                .collect(),
        );
    }

    /// The identity label of a sender address or domain.
    fn identity(&self, sender: &str) -> String {
        let domain = sender
            .rsplit_once('@')
            .map_or(sender, |(_, d)| d)
            .to_ascii_lowercase();
        let known = self
            .identities
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&domain);
        if known {
            domain
        } else {
            OTHER_DESTINATION.to_owned()
        }
    }

    pub fn smtp_connection(&self) {
        self.smtp_connections.inc();
    }

    pub fn smtp_connection_rejected(&self) {
        self.smtp_connections_rejected.inc();
    }

    /// Counts an open session until the guard is dropped.
    pub fn smtp_session(&self) -> SessionGuard {
        self.smtp_sessions.inc();
        SessionGuard(self.smtp_sessions.clone())
    }

    /// The server ended a session (421 4.4.2) for `reason`.
    pub fn smtp_disconnect(&self, reason: Disconnect) {
        self.smtp_disconnects
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Bytes reserved (positive) or released (negative) for messages in progress.
    pub fn smtp_inflight_moved(&self, bytes: i64) {
        self.smtp_inflight_bytes.add(bytes);
    }

    /// A live entry of a full per-client table was dropped to make room.
    pub fn smtp_client_evicted(&self, table: ClientTable) {
        self.smtp_client_evictions
            .with_label_values(&[table.as_str()])
            .inc();
    }

    /// Live entries dropped from `table` so far.
    pub fn smtp_client_evictions(&self, table: ClientTable) -> u64 {
        self.smtp_client_evictions
            .with_label_values(&[table.as_str()])
            .get()
    }

    pub fn message_received(&self, intake: Protocol) {
        self.messages_received
            .with_label_values(&[intake.as_str()])
            .inc();
    }

    pub fn message_rejected(&self, reason: Rejection) {
        self.messages_rejected
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// One sidecar result; `result` is one of the fixed codes named in the metric's help.
    /// Replaces the campaign results gauges with `rows` (the caller bounds them):
    /// (campaign, variant, counts by kind, rates as (rate, mean, low, high, best)).
    pub fn set_campaign_results(&self, rows: &[CampaignGauges]) {
        self.campaign_events.reset();
        self.campaign_rate.reset();
        self.campaign_best.reset();
        for row in rows {
            for (kind, n) in &row.counts {
                self.campaign_events
                    .with_label_values(&[row.campaign.as_str(), row.variant.as_str(), kind])
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            for &(rate, mean, low, high, best) in &row.rates {
                for (stat, v) in [("mean", mean), ("low", low), ("high", high)] {
                    self.campaign_rate
                        .with_label_values(&[
                            row.campaign.as_str(),
                            row.variant.as_str(),
                            rate,
                            stat,
                        ])
                        .set(v);
                }
                self.campaign_best
                    .with_label_values(&[row.campaign.as_str(), row.variant.as_str(), rate])
                    .set(best);
            }
        }
    }

    pub fn sidecar_content(&self, result: &'static str) {
        self.sidecar_content.with_label_values(&[result]).inc();
    }

    /// One HTTP request to the content model: its outcome code and how long it took.
    pub fn sidecar_model_request(&self, outcome: &'static str, took: std::time::Duration) {
        self.sidecar_model_requests
            .with_label_values(&[outcome])
            .inc();
        self.sidecar_model_seconds.observe(took.as_secs_f64());
    }

    /// Token usage the model reported for one answer.
    pub fn sidecar_model_tokens(&self, prompt: u64, completion: u64) {
        self.sidecar_model_tokens
            .with_label_values(&["prompt"])
            .inc_by(prompt);
        self.sidecar_model_tokens
            .with_label_values(&["completion"])
            .inc_by(completion);
    }

    /// One slot generation (`scope` coarse or recipient; `result` a fixed code in the help).
    pub fn sidecar_generation(&self, scope: &'static str, result: &'static str) {
        self.sidecar_generations
            .with_label_values(&[scope, result])
            .inc();
    }

    /// One tracked open or click.
    pub fn sidecar_engagement(&self, click: bool, machine: bool) {
        let kind = if click { "click" } else { "open" };
        let source = if machine { "machine" } else { "human" };
        self.sidecar_engagements
            .with_label_values(&[kind, source])
            .inc();
    }

    pub fn tracking_ignored(&self, reason: TrackingIgnored) {
        self.tracking_ignored
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// `entries` remembered tracking hits forgotten early (the replay memory was full).
    pub fn tracking_replay_evicted(&self, entries: u64) {
        self.tracking_replay_evictions.inc_by(entries);
    }

    /// A connection opened (`true`) or closed on the admin listener.
    pub fn admin_connection(&self, opened: bool) {
        if opened {
            self.admin_connections.inc();
        } else {
            self.admin_connections.dec();
        }
    }

    pub fn admin_refused(&self, reason: AdminRefusal) {
        self.admin_refused
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// One recipient's result; `label` is what [`Metrics::label`] made of the destination.
    pub fn delivery(&self, label: &str, outcome: Outcome) {
        self.deliveries
            .with_label_values(&[label, outcome_label(outcome)])
            .inc();
        self.rate_window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .add(label, minute_now(), outcome);
    }

    /// The recipient outcomes of the last [`RATE_MINUTES`] minutes per destination label
    /// (labels in name order, minutes oldest first).
    pub fn rate_history(&self) -> Vec<(String, Vec<RateMinute>)> {
        self.rate_window
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .history(minute_now())
    }

    /// A recipient deferred, bounced or expired, with the category of its reply.
    pub fn delivery_failure(&self, label: &str, outcome: Outcome, category: &str) {
        self.delivery_failures
            .with_label_values(&[label, outcome_label(outcome), category])
            .inc();
    }

    /// A trusted asynchronous bounce (`complaint` false) or complaint about a recipient at
    /// `domain`; a complaint also counts against `sender` (the sending domain of the
    /// complained-about message, when known) in the complaint rate.
    pub fn provider_feedback(&self, domain: &str, complaint: bool, sender: Option<&str>) {
        let label = self.destination(&self.routes.get(), "", Some(domain));
        let kind = if complaint { "complaint" } else { "bounce" };
        self.provider_feedback
            .with_label_values(&[label.as_ref(), kind])
            .inc();
        if complaint {
            let identity = self.identity(sender.unwrap_or(""));
            lock_window(&self.complaint_window).add(&label, &identity, hour_now(), 0, 1);
        }
    }

    /// The label for destination key `key`: itself if it is a static route's, else "other"
    /// (shaping names provider buckets itself).
    pub fn destination_label<'a>(&self, key: &'a str) -> Cow<'a, str> {
        self.destination(&self.routes.get(), key, None)
    }

    pub fn shaping_rate(&self, source: &str, provider: &str, per_minute: f64) {
        self.shaping_rate
            .with_label_values(&[source, provider])
            .set(per_minute);
    }

    pub fn shaping_throttle(&self, source: &str, provider: &str) {
        self.shaping_throttles
            .with_label_values(&[source, provider])
            .inc();
    }

    pub fn shaping_blocked(&self, source: &str, provider: &str, blocked: bool) {
        self.shaping_blocked
            .with_label_values(&[source, provider])
            .set(i64::from(blocked));
    }

    /// The shared shaping store's health: `tern_shaping_shared_backend_up` and
    /// `tern_shaping_shared_fallbacks_total`, registered on first use.
    pub fn shared_store(&self) -> &SharedStoreMetrics {
        self.shared_store.get_or_init(|| {
            let up = IntGauge::new(
                "tern_shaping_shared_backend_up",
                "1 while the shared shaping store (shaping.shared) answers; 0 while this node keeps local limits divided by shaping.node_count.",
            )
            .expect("valid metric");
            let fallbacks = IntCounter::new(
                "tern_shaping_shared_fallbacks_total",
                "Times this node lost the shared shaping store and fell back to local limits.",
            )
            .expect("valid metric");
            self.registry
                .register(Box::new(up.clone()))
                .expect("unique");
            self.registry
                .register(Box::new(fallbacks.clone()))
                .expect("unique");
            SharedStoreMetrics { up, fallbacks }
        })
    }

    /// A fleet node's figures (`tern_cluster_*`), registered on first use: a node without
    /// `[cluster]` exports none of them.
    pub fn cluster(&self) -> &ClusterMetrics {
        self.cluster.get_or_init(|| {
            let register = |c: Box<dyn prometheus::core::Collector>| {
                self.registry.register(c).expect("unique");
            };
            let up = IntGauge::new(
                "tern_cluster_up",
                "1 while the fleet's store (cluster.url) answers; 0 while this node checks its own copy of the suppression list and keeps its changes in the outbox.",
            )
            .expect("valid metric");
            let outbox = IntGaugeVec::new(
                Opts::new(
                    "tern_cluster_outbox_depth",
                    "Changes of this node waiting for the fleet's store, by state: suppressions (durable outbox in the spool), suspensions (in memory).",
                ),
                &["state"],
            )
            .expect("valid metric");
            let lag_seconds = Gauge::new(
                "tern_cluster_follower_lag_seconds",
                "Seconds since this node's copy of the suppression list was last known to hold every change of the fleet's stream (0 while it does; grows while the store is away or the node catches up).",
            )
            .expect("valid metric");
            let resyncs = IntCounterVec::new(
                Opts::new(
                    "tern_cluster_resyncs_total",
                    "Paged resyncs of this node's suppression copy with the store, by mode: merge (a new node, or a store that lost its data), authoritative (the node fell behind the stream's cap).",
                ),
                &["mode"],
            )
            .expect("valid metric");
            let changes = IntCounterVec::new(
                Opts::new(
                    "tern_cluster_suppression_changes_total",
                    "Suppression list changes, by direction: pushed (this node's, taken by the store), applied (the fleet's stream, applied to this node's copy; its own included).",
                ),
                &["direction"],
            )
            .expect("valid metric");
            let errors = IntCounterVec::new(
                Opts::new(
                    "tern_cluster_errors_total",
                    "Failed calls to the fleet's store, by kind: connect, timeout (cluster.timeout), command (the connection failed), reply (Redis answered an error).",
                ),
                &["kind"],
            )
            .expect("valid metric");
            register(Box::new(up.clone()));
            register(Box::new(outbox.clone()));
            register(Box::new(lag_seconds.clone()));
            register(Box::new(resyncs.clone()));
            register(Box::new(changes.clone()));
            register(Box::new(errors.clone()));
            for state in ClusterOutbox::ALL {
                outbox.with_label_values(&[state.as_str()]);
            }
            for mode in ["merge", "authoritative"] {
                resyncs.with_label_values(&[mode]);
            }
            for direction in ["pushed", "applied"] {
                changes.with_label_values(&[direction]);
            }
            for kind in ClusterError::ALL {
                errors.with_label_values(&[kind.as_str()]);
            }
            ClusterMetrics {
                up,
                outbox,
                lag_seconds,
                resyncs,
                changes,
                errors,
                current_at: std::sync::atomic::AtomicU64::new(unix_ms()),
                waiting_current: std::sync::atomic::AtomicBool::new(false),
            }
        })
    }

    /// Warm-up progress; `cap` `None` once the source is warm.
    pub fn warmup(&self, source: &str, provider: &str, sent: u64, cap: Option<u64>) {
        let labels = [source, provider];
        self.warmup_sent
            .with_label_values(&labels)
            .set(i64::try_from(sent).unwrap_or(i64::MAX));
        self.warmup_cap
            .with_label_values(&labels)
            .set(cap.map_or(-1, |c| i64::try_from(c).unwrap_or(i64::MAX)));
    }

    /// The verdict of the last readiness check (`/readyz`, or a scrape).
    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }

    pub fn shaping_wait(&self, waited: Duration) {
        self.shaping_wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn delivery_attempt(&self, took: Duration) {
        self.delivery_attempt_seconds.observe(took.as_secs_f64());
    }

    /// A new outbound connection under TLS policy `policy` (a `RoutePlan::tls_label`) that
    /// met it (`result` "ok") or failed with an RFC 8460 result type. Both label sets are
    /// small and fixed.
    pub fn tls_policy_session(&self, policy: &str, result: &str) {
        self.tls_policy_sessions
            .with_label_values(&[policy, result])
            .inc();
    }

    /// A delivered recipient: `latency` from acceptance, `tls` whether the attempt used TLS,
    /// `label` the destination's, `sender` the envelope sender (its domain is the identity
    /// of the complaint rate).
    pub fn delivered(&self, latency: Duration, tls: bool, label: &str, sender: &str) {
        self.delivery_latency_seconds.observe(latency.as_secs_f64());
        if tls {
            self.tls_deliveries.with_label_values(&[label]).inc();
        }
        let identity = self.identity(sender);
        lock_window(&self.complaint_window).add(label, &identity, hour_now(), 1, 0);
    }

    pub fn dsn_sent(&self, action: DsnAction) {
        self.dsns_sent
            .with_label_values(&[action_label(action)])
            .inc();
    }

    /// The text exposition format, with the spool's figures and the ready-queue depths
    /// (`(destination key, depth)`, as the scheduler gives
    /// them) read now. Every static route and "other" is exported, at 0 when it has no mail.
    pub fn render(&self, spool: &Spool, depths: &[(String, usize)]) -> String {
        // Held until encoded: another scrape's reset must not show up in this one.
        let _one_at_a_time = self.depth_sync.lock().unwrap_or_else(|e| e.into_inner());
        {
            let routes = self.routes.get();
            let providers = self
                .providers
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .clone();
            let mut by_label: HashMap<Cow<'_, str>, i64> = routes
                .iter()
                .map(|r| Cow::Borrowed(r.as_str()))
                .chain(providers.iter().map(|p| Cow::Borrowed(p.name.as_str())))
                .chain([Cow::Borrowed(OTHER_DESTINATION)])
                .map(|label| (label, 0))
                .collect();
            for (key, depth) in depths {
                *by_label
                    .entry(self.destination(&routes, key, None))
                    .or_default() += i64::try_from(*depth).unwrap_or(i64::MAX);
            }
            // Routes removed by a reload drop out of this gauge (it is a snapshot, not a count).
            self.ready_queue_depth.reset();
            for (label, depth) in by_label {
                self.ready_queue_depth
                    .with_label_values(&[label.as_ref()])
                    .set(depth);
            }
        }
        {
            let window = lock_window(&self.complaint_window);
            for (label, identity, rate) in window.rates(hour_now()) {
                self.complaint_rate
                    .with_label_values(&[label, identity])
                    .set(rate);
            }
        }
        if let Some(cluster) = self.cluster.get() {
            cluster.lag_seconds.set(cluster.lag());
        }
        {
            let _one_at_a_time = self.spool_sync.lock().unwrap_or_else(|e| e.into_inner());
            let stats = spool.stats();
            self.spool_recovering.set(i64::from(matches!(
                spool.recovery(),
                tern_queue::RecoveryStatus::Running { .. }
            )));
            self.spool_messages
                .set(i64::try_from(stats.messages).unwrap_or(i64::MAX));
            self.spool_bytes
                .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
            if let Some(free) = spool.free_space() {
                self.spool_free_bytes
                    .set(i64::try_from(free).unwrap_or(i64::MAX));
            }
            let commits = spool.commit_stats();
            catch_up(&self.spool_commits, commits.writes);
            catch_up(&self.spool_syncs, commits.syncs);
        }
        self.encode()
    }

    fn encode(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding into memory");
        String::from_utf8(out).expect("the text format is UTF-8")
    }
}

/// Brings a counter up to a total kept elsewhere (counters only go up).
fn catch_up(counter: &IntCounter, total: u64) {
    let current = counter.get();
    if total > current {
        counter.inc_by(total - current);
    }
}

/// Decrements `tern_smtp_sessions` when the session ends.
pub struct SessionGuard(IntGauge);

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_window_keeps_an_hour_per_label_and_forgets_older_minutes() {
        let mut w = RateWindow::default();
        w.add("google", 1000, Outcome::Delivered);
        w.add("google", 1000, Outcome::Delivered);
        w.add("google", 1030, Outcome::Deferred);
        w.add("other", 1059, Outcome::Bounced);
        let h = w.history(1059);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].0, "google");
        let google = &h[0].1;
        assert_eq!(google.len(), RATE_MINUTES as usize);
        assert_eq!(google[0].minute, 1000);
        assert_eq!(google[0].counts[Outcome::Delivered.index()], 2);
        assert_eq!(google[30].counts[Outcome::Deferred.index()], 1);
        assert_eq!(h[1].1[59].counts[Outcome::Bounced.index()], 1);
        // An hour on, minute 1000's slot is reused and the old count is gone.
        w.add("google", 1060, Outcome::Delivered);
        let google = &w.history(1060)[0].1;
        assert_eq!(google[0].minute, 1001);
        assert_eq!(google[59].counts[Outcome::Delivered.index()], 1);
        let total: u64 = google.iter().map(|m| m.counts.iter().sum::<u64>()).sum();
        assert_eq!(total, 2, "{google:?}");
        // Early clock (tests, a bad clock): no underflow.
        assert_eq!(w.history(3)[0].1.len(), 4);
    }

    /// The shipped Grafana dashboard queries only metrics that exist (histogram series by
    /// their family name), and every metric family has a panel.
    #[test]
    fn the_grafana_dashboard_uses_only_exported_metrics_and_every_one() {
        let (used, seen) = metrics_used(include_str!("../contrib/grafana/tern-dashboard.json"));
        assert!(used > 20, "the dashboard queries the metrics ({used} uses)");
        let mut missing: Vec<&str> = families()
            .into_iter()
            .filter(|f| !seen.contains(*f))
            .collect();
        missing.sort();
        assert!(missing.is_empty(), "metrics without a panel: {missing:?}");
    }

    #[test]
    fn the_alert_rules_use_only_exported_metrics() {
        let (used, seen) = metrics_used(include_str!("../contrib/prometheus/tern-alerts.yml"));
        assert!(used >= 10, "the rules query the metrics ({used} uses)");
        for family in [
            "tern_complaint_rate",
            "tern_dkim_key_published",
            "tern_ready",
        ] {
            assert!(seen.contains(family), "no alert on {family}");
        }
    }

    /// Every metric family this file defines. Vectors without children are not in a gather,
    /// so the names come from the definitions in this file.
    fn families() -> HashSet<&'static str> {
        let source = include_str!("telemetry.rs");
        source
            .match_indices("\"tern_")
            .filter_map(|(i, _)| source[i + 1..].split('"').next())
            .filter(|name| name.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
            .filter(|name| !name.ends_with('_'))
            .collect()
    }

    /// How many metric references `text` makes, and the families it uses; panics on a name
    /// this file does not define.
    fn metrics_used(text: &str) -> (usize, HashSet<String>) {
        let families = families();
        let mut used = 0;
        let mut seen = HashSet::new();
        for (i, _) in text.match_indices("tern_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if name == "tern_" || text[..i].ends_with("\"uid\": \"") || name.starts_with("tern-") {
                continue;
            }
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| families.contains(f)))
                .unwrap_or(&name);
            assert!(families.contains(family), "unknown metric {name}");
            seen.insert(family.to_owned());
            used += 1;
        }
        (used, seen)
    }

    #[test]
    fn destinations_are_bounded() {
        let metrics = Metrics::new().with_routes(["sink.test"]);
        for key in ["route:sink.test", "mx:a.test,b.test", "mx:c.test"] {
            let outcome = if key.starts_with("route:") {
                Outcome::Delivered
            } else {
                Outcome::Deferred
            };
            metrics.delivery(&metrics.label(key, None), outcome);
        }
        let text = metrics.encode();
        assert!(text.contains(
            "tern_deliveries_total{destination=\"route:sink.test\",outcome=\"delivered\"} 1\n"
        ));
        assert!(
            text.contains("tern_deliveries_total{destination=\"other\",outcome=\"deferred\"} 2\n")
        );
        assert!(!text.contains("mx:"));
        assert!(text.contains("tern_messages_rejected_total{reason=\"relay_denied\"} 0\n"));
        assert!(text.contains("tern_messages_received_total{protocol=\"http\"} 0\n"));
    }

    fn google() -> ProviderLabel {
        ProviderLabel {
            name: "google".into(),
            mx_suffixes: vec![".google.com".into()],
            domains: vec!["gmail.com".into()],
        }
    }

    #[test]
    fn providers_label_their_destinations_by_mx_host_or_recipient_domain() {
        let metrics = Metrics::new().with_routes(["sink.test"]);
        metrics.set_providers(vec![google()]);
        assert_eq!(
            metrics.label("mx:alt1.gmail-smtp-in.l.GOOGLE.com,x.test", None),
            "google"
        );
        assert_eq!(
            metrics.label("mx:mx.example.com", Some("gmail.com")),
            "google"
        );
        assert_eq!(metrics.label("mx:gmail.com", None), "google");
        assert_eq!(metrics.label("mx:google.com.evil.test", None), "other");
        assert_eq!(metrics.label("mx:notgoogle.com", None), "other");
        assert_eq!(
            metrics.label("route:sink.test", Some("gmail.com")),
            "route:sink.test"
        );
        // Every provider is exported in the depth gauge, at 0 without mail.
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let text = metrics.render(&spool, &[("mx:gmail-smtp-in.l.google.com".into(), 3)]);
        assert!(
            text.contains("tern_ready_queue_depth{destination=\"google\"} 3\n"),
            "{text}"
        );
        assert!(
            text.contains("tern_ready_queue_depth{destination=\"other\"} 0\n"),
            "{text}"
        );
    }

    #[test]
    fn the_complaint_rate_is_complaints_over_deliveries_of_the_last_day() {
        let metrics = Metrics::new();
        metrics.set_providers(vec![google()]);
        metrics.set_sender_identities(["news.example"]);
        for _ in 0..1000 {
            metrics.delivered(Duration::ZERO, true, "google", "app@news.example");
        }
        metrics.delivered(Duration::ZERO, false, "google", "app@unsigned.example");
        for _ in 0..4 {
            metrics.provider_feedback("gmail.com", true, Some("news.example"));
        }
        metrics.provider_feedback("gmail.com", false, None);
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let text = metrics.render(&spool, &[]);
        assert!(
            text.contains(
                "tern_complaint_rate{destination=\"google\",sender=\"news.example\"} 0.004\n"
            ),
            "{text}"
        );
        assert!(
            text.contains("tern_complaint_rate{destination=\"google\",sender=\"other\"} 0\n"),
            "{text}"
        );
        assert!(text.contains("tern_tls_deliveries_total{destination=\"google\"} 1000\n"));
        assert!(text.contains(
            "tern_provider_feedback_total{destination=\"google\",kind=\"complaint\"} 4\n"
        ));
        assert!(text
            .contains("tern_provider_feedback_total{destination=\"google\",kind=\"bounce\"} 1\n"));
        // Buckets older than a day fall out of the window.
        let mut window = ComplaintWindow::default();
        window.add("google", "x", 100, 10, 5);
        window.add("google", "x", 110, 990, 0);
        assert_eq!(window.rates(110), vec![("google", "x", 0.005)]);
        assert_eq!(window.rates(123), vec![("google", "x", 0.005)]);
        assert_eq!(window.rates(124), vec![("google", "x", 0.0)]);
    }
}
