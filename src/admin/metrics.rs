//! Every Prometheus metric tern exports, defined here and nowhere else.
//!
//! One [`Metrics`] value owns its own [`Registry`] (never prometheus' global default one), so
//! tests can make as many as they like. Label values are bounded by construction: rejection
//! reasons, delivery outcomes and DSN actions are enums, and a delivery's destination is its
//! static route key (`route:<domain>`, a configured, finite set) or `"other"` (MX destinations
//! are unbounded and never become label values).
//!
//! Spool figures are not pushed: [`Metrics::render`] reads [`Spool::stats`] and
//! [`Spool::commit_stats`] at scrape time.

use crate::config::RouteConfig;
use crate::delivery::log::AttemptOutcome;
use crate::outcome::dsn::Action;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;
use tern_queue::Spool;

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
}

impl Rejection {
    pub const ALL: [Rejection; 6] = [
        Rejection::RelayDenied,
        Rejection::Size,
        Rejection::Recipients,
        Rejection::Smuggling,
        Rejection::AuthFailed,
        Rejection::SpoolError,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::RelayDenied => "relay_denied",
            Rejection::Size => "size",
            Rejection::Recipients => "recipients",
            Rejection::Smuggling => "smuggling",
            Rejection::AuthFailed => "auth_failed",
            Rejection::SpoolError => "spool_error",
        }
    }
}

fn outcome_label(outcome: AttemptOutcome) -> &'static str {
    match outcome {
        AttemptOutcome::Delivered => "delivered",
        AttemptOutcome::Deferred => "deferred",
        AttemptOutcome::Bounced => "bounced",
        AttemptOutcome::Expired => "expired",
    }
}

fn action_label(action: Action) -> &'static str {
    match action {
        Action::Failed => "failed",
        Action::Delayed => "delayed",
        Action::Delivered => "delivered",
    }
}

pub struct Metrics {
    registry: Registry,
    /// Static route keys (`route:<domain>`): the only destinations used as label values.
    routes: HashSet<String>,

    smtp_connections: IntCounter,
    smtp_connections_rejected: IntCounter,
    smtp_sessions: IntGauge,

    messages_received: IntCounter,
    messages_rejected: IntCounterVec,

    spool_messages: IntGauge,
    spool_bytes: IntGauge,
    spool_commits: IntCounter,
    spool_syncs: IntCounter,
    /// Serializes the scrape-time copy of the spool's counters into ours.
    spool_sync: Mutex<()>,

    deliveries: IntCounterVec,
    delivery_attempt_seconds: Histogram,
    delivery_latency_seconds: Histogram,
    dsns_sent: IntCounterVec,
    tls_deliveries: IntCounter,

    // Shaping: labels are a configured source address (or "default") and a provider name,
    // static route key or "other".
    shaping_rate: GaugeVec,
    shaping_throttles: IntCounterVec,
    shaping_blocked: IntGaugeVec,
    warmup_sent: IntGaugeVec,
    warmup_cap: IntGaugeVec,
    shaping_wait_seconds: Histogram,
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
            routes: HashSet::new(),
            smtp_connections: counter(
                "tern_smtp_connections_total",
                "Inbound SMTP connections accepted by a listener, including those refused at the limit.",
            ),
            smtp_connections_rejected: counter(
                "tern_smtp_connections_rejected_total",
                "Inbound SMTP connections refused at the door (connection limits, 421).",
            ),
            smtp_sessions: gauge("tern_smtp_sessions", "Open inbound SMTP sessions."),
            messages_received: counter(
                "tern_messages_received_total",
                "Messages accepted over SMTP (250 after DATA/BDAT LAST).",
            ),
            messages_rejected: counter_vec(
                "tern_messages_rejected_total",
                "Inbound refusals by reason (recipients for relay_denied/recipients, attempts for auth_failed).",
                &["reason"],
            ),
            spool_messages: gauge(
                "tern_spool_messages",
                "Envelopes in the spool (one per message and destination domain).",
            ),
            spool_bytes: gauge("tern_spool_bytes", "Body bytes in the spool."),
            spool_commits: counter(
                "tern_spool_commits_total",
                "Spool writes (commit, update, remove) since the spool was opened.",
            ),
            spool_syncs: counter(
                "tern_spool_syncs_total",
                "Spool group-commit rounds (each one merged batch and its fsyncs) since open.",
            ),
            spool_sync: Mutex::new(()),
            deliveries: counter_vec(
                "tern_deliveries_total",
                "Recipient results of delivery attempts, by destination (static route key or \"other\") and outcome.",
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
            tls_deliveries: counter(
                "tern_tls_deliveries_total",
                "Delivered recipients whose attempt used TLS (share: this over deliveries{outcome=\"delivered\"}).",
            ),
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
            shaping_wait_seconds: histogram(
                "tern_shaping_wait_seconds",
                "Time a delivery worker waited for shaping (rate, suspension, connection slot).",
                vec![0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0],
            ),
            registry,
        };
        // Every fixed label value exists from the start, so rates work from the first scrape.
        for reason in Rejection::ALL {
            metrics
                .messages_rejected
                .with_label_values(&[reason.as_str()]);
        }
        for action in [Action::Failed, Action::Delayed, Action::Delivered] {
            metrics.dsns_sent.with_label_values(&[action_label(action)]);
        }
        metrics
    }

    /// Makes the static routes' keys (`route:<domain>`) usable as destination labels.
    pub fn with_routes(mut self, routes: &[RouteConfig]) -> Metrics {
        self.routes = routes
            .iter()
            .map(|r| format!("route:{}", r.domain))
            .collect();
        self
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

    pub fn message_received(&self) {
        self.messages_received.inc();
    }

    pub fn message_rejected(&self, reason: Rejection) {
        self.messages_rejected
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// One recipient's result; `destination` is the plan's destination key.
    pub fn delivery(&self, destination: &str, outcome: AttemptOutcome) {
        let destination = if self.routes.contains(destination) {
            destination
        } else {
            OTHER_DESTINATION
        };
        self.deliveries
            .with_label_values(&[destination, outcome_label(outcome)])
            .inc();
    }

    /// The label for destination key `key`: itself if it is a static route's, else "other".
    pub fn destination_label<'a>(&self, key: &'a str) -> &'a str {
        if self.routes.contains(key) {
            key
        } else {
            OTHER_DESTINATION
        }
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

    pub fn shaping_wait(&self, waited: Duration) {
        self.shaping_wait_seconds.observe(waited.as_secs_f64());
    }

    pub fn delivery_attempt(&self, took: Duration) {
        self.delivery_attempt_seconds.observe(took.as_secs_f64());
    }

    /// A delivered recipient: `latency` from acceptance, `tls` whether the attempt used TLS.
    pub fn delivered(&self, latency: Duration, tls: bool) {
        self.delivery_latency_seconds.observe(latency.as_secs_f64());
        if tls {
            self.tls_deliveries.inc();
        }
    }

    pub fn dsn_sent(&self, action: Action) {
        self.dsns_sent
            .with_label_values(&[action_label(action)])
            .inc();
    }

    /// The text exposition format, with the spool's figures read now.
    pub fn render(&self, spool: &Spool) -> String {
        {
            let _one_at_a_time = self.spool_sync.lock().unwrap_or_else(|e| e.into_inner());
            let stats = spool.stats();
            self.spool_messages
                .set(i64::try_from(stats.messages).unwrap_or(i64::MAX));
            self.spool_bytes
                .set(i64::try_from(stats.bytes).unwrap_or(i64::MAX));
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
    fn destinations_are_bounded() {
        let config = crate::config::Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n\n\
             [[routes]]\ndomain = \"sink.test\"\nhosts = [\"127.0.0.1:25\"]\n",
        )
        .unwrap();
        let metrics = Metrics::new().with_routes(&config.routes);
        metrics.delivery("route:sink.test", AttemptOutcome::Delivered);
        metrics.delivery("mx:a.test,b.test", AttemptOutcome::Deferred);
        metrics.delivery("mx:c.test", AttemptOutcome::Deferred);
        let text = metrics.encode();
        assert!(text.contains(
            "tern_deliveries_total{destination=\"route:sink.test\",outcome=\"delivered\"} 1\n"
        ));
        assert!(
            text.contains("tern_deliveries_total{destination=\"other\",outcome=\"deferred\"} 2\n")
        );
        assert!(!text.contains("mx:"));
        assert!(text.contains("tern_messages_rejected_total{reason=\"relay_denied\"} 0\n"));
    }
}
