//! One delivery attempt of one envelope: get a connection to one of the route's hosts
//! (the worker's own, an idle pooled one, or a new one, trying hosts in order), run the
//! transaction, and classify each pending recipient's result.
//!
//! Invariants:
//! - Only pending recipients are attempted; the result has exactly one entry per pending
//!   recipient, so the settler can account for every one.
//! - Each failed result is classified here, once, by the bounce taxonomy
//!   ([`RcptOutcome::category`]; a delivery is `delivered`): shaping, the delivery log, events
//!   and suppression all read that one category.
//! - A connection that failed mid-transaction is never reused; one that was reused and failed
//!   before any recipient was accepted is replaced once, since idle connections are often
//!   closed by the far end without notice.
//! - Every transaction carries an `X-Tern-Id` header (added on the wire, not stored) that
//!   ties a returned copy to its recipients ([`crate::origin`]).
//! - An attempt takes one snapshot of the reloadable settings ([`AttemptSettings`]) and uses it
//!   throughout; a config reload affects the next attempt.

use crate::bounce::classify::Classifier;
use crate::config::{DeliveryConfig, TlsPolicy};
use crate::delivery::client::{
    self, AttemptError, BrokenTls, ClientSettings, Connection, Lease, OutboundMessage, RemoteReply,
    Target, TlsChecks,
};
use crate::delivery::pool::ConnectionPool;
use crate::live::Live;
use crate::origin::Origin;
use crate::routing::dane::{DaneHost, TlsaSet};
use crate::routing::route::{RouteError, RoutePlan, Router};
use crate::routing::sts::Mode as StsMode;
use crate::taxonomy::Category;
use crate::telemetry::Metrics;
use crate::tls::TlsInfo;
use crate::tlsrpt::{ReportPolicy, TlsReports};
use crate::verp::Verp;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use tern_queue::{Envelope, Recipient, RecipientState};
use tracing::debug;

/// How a recipient's attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    Permanent,
    Temporary,
}

/// The result for one recipient: its index in `Envelope::recipients`, the verdict, the
/// enhanced status code and the reply (remote or local) that explains it, and its category.
#[derive(Debug, Clone)]
pub struct RcptOutcome {
    pub index: usize,
    pub verdict: Verdict,
    pub status: String,
    pub reply: String,
    /// The bounce category of `reply` with `status` ([`Classifier::classify_attempt`]);
    /// `delivered` for a delivery, without consulting the rules.
    pub category: Category,
}

impl RcptOutcome {
    /// Recipient `index`'s result from a remote reply, classified.
    pub fn of_reply(index: usize, reply: &RemoteReply, classifier: &Classifier) -> RcptOutcome {
        let (verdict, status) = (verdict_of(reply.code), status_of(reply));
        let reply = reply.to_string();
        let category = match verdict {
            Verdict::Delivered => Category::Delivered,
            _ => classifier.classify_attempt(&status, &reply).category,
        };
        RcptOutcome {
            index,
            verdict,
            status,
            reply,
            category,
        }
    }
}

/// What one attempt did, for the settler and the delivery log.
#[derive(Debug, Clone, Default)]
pub struct Attempt {
    pub outcomes: Vec<RcptOutcome>,
    pub host: Option<String>,
    pub addr: Option<SocketAddr>,
    pub source: Option<IpAddr>,
    pub tls: Option<TlsInfo>,
    /// The TLS policy the attempt was under ([`RoutePlan::tls_label`]): `dane`, `dane-only`,
    /// `mta-sts-enforce`, `mta-sts-testing`, or a level (`required`, `encrypt`,
    /// `opportunistic`, `disabled`, ...).
    pub tls_policy: Option<&'static str>,
}

/// Where new connections come from: the local address to bind, its EHLO name, and the lease
/// a new connection holds for as long as it lives (a shaping connection slot).
#[derive(Default)]
pub struct Outbound {
    pub source: Option<IpAddr>,
    pub ehlo: Option<String>,
    pub lease: Option<Box<dyn Lease>>,
}

pub struct Worker {
    router: Arc<Router>,
    pool: Arc<ConnectionPool>,
    /// Classifies every failed recipient's reply (`bounce.rules` and the shaping patterns
    /// over the shipped rules; a restart key, so never replaced).
    classifier: Arc<Classifier>,
    settings: Live<AttemptSettings>,
    broken_tls: BrokenTls,
    /// VERP senders and where they apply; `None`: never.
    verp: Live<Option<VerpPolicy>>,
    /// Signs the `X-Tern-Id` each transaction carries (`crate::origin`).
    origin: Origin,
    /// TLS sessions with MX hosts of domains with an MTA-STS policy, for TLS-RPT.
    tls_reports: Option<Arc<TlsReports>>,
    /// `tern_tls_policy_sessions_total`.
    metrics: Arc<Metrics>,
}

/// Which mail gets VERP senders: `bounce.verp`, overridden per static route (`routes[].verp`;
/// a route's plan key is `route:<domain>`).
#[derive(Clone, Debug)]
pub struct VerpPolicy {
    pub verp: Verp,
    pub global: bool,
    pub routes: HashMap<String, bool>,
}

impl VerpPolicy {
    pub fn from_config(verp: Verp, config: &crate::config::Config) -> VerpPolicy {
        VerpPolicy {
            verp,
            global: config.bounce.verp,
            routes: config
                .routes
                .iter()
                .filter_map(|r| Some((r.domain.clone(), r.verp?)))
                .collect(),
        }
    }

    fn applies(&self, plan_key: &str) -> bool {
        plan_key
            .strip_prefix("route:")
            .and_then(|domain| self.routes.get(domain).copied())
            .unwrap_or(self.global)
    }
}

/// What a config reload may change about attempts.
pub struct AttemptSettings {
    pub client: ClientSettings,
    pub max_messages_per_connection: usize,
    /// Smarthost passwords, read from their files at start (and at each reload).
    pub passwords: HashMap<PathBuf, String>,
}

impl Worker {
    // One argument per collaborator; wired once, by the daemon.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        router: Arc<Router>,
        pool: Arc<ConnectionPool>,
        settings: ClientSettings,
        config: &DeliveryConfig,
        passwords: HashMap<PathBuf, String>,
        classifier: Arc<Classifier>,
        origin: Origin,
        metrics: Arc<Metrics>,
    ) -> Worker {
        Worker {
            router,
            pool,
            classifier,
            settings: Live::new(AttemptSettings {
                client: settings,
                max_messages_per_connection: config.max_messages_per_connection,
                passwords,
            }),
            broken_tls: BrokenTls::new(config.broken_tls_retry, metrics.clone()),
            metrics,
            verp: Live::new(None),
            origin,
            tls_reports: None,
        }
    }

    /// Counts TLS sessions with MTA-STS domains' MX hosts in `reports` (TLS-RPT).
    pub fn with_tls_reports(mut self, reports: Arc<TlsReports>) -> Worker {
        self.tls_reports = Some(reports);
        self
    }

    /// Sets (or replaces, on reload: route overrides are live) the VERP policy.
    pub fn set_verp(&self, policy: Option<VerpPolicy>) {
        self.verp.set(policy);
    }

    /// Applies a reloaded `[delivery]` (timeouts, connection reuse, broken-TLS memory) and
    /// re-read smarthost passwords; attempts already running finish with what they started
    /// with.
    pub fn reconfigure(&self, config: &DeliveryConfig, passwords: HashMap<PathBuf, String>) {
        let current = self.settings.get();
        let mut client = current.client.clone();
        client.timeouts = config.timeouts;
        self.settings.set(AttemptSettings {
            client,
            max_messages_per_connection: config.max_messages_per_connection,
            passwords,
        });
        self.broken_tls.set_retry_after(config.broken_tls_retry);
    }

    /// Attempts the pending recipients of `env` over `connection` (kept for the next
    /// message when it is still usable).
    pub async fn attempt(
        &self,
        env: &Envelope,
        body: &[u8],
        plan: &RoutePlan,
        connection: &mut Option<Connection>,
        outbound: Outbound,
    ) -> Attempt {
        let mut attempt = self
            .attempt_all(env, body, plan, connection, outbound)
            .await;
        attempt.tls_policy = Some(plan.tls_label);
        attempt
    }

    async fn attempt_all(
        &self,
        env: &Envelope,
        body: &[u8],
        plan: &RoutePlan,
        connection: &mut Option<Connection>,
        mut outbound: Outbound,
    ) -> Attempt {
        let pending: Vec<(usize, Recipient)> = env
            .recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RecipientState::Pending)
            .map(|(i, r)| (i, r.clone()))
            .collect();
        if pending.is_empty() {
            return Attempt::default();
        }
        // VERP: one transaction per recipient, each with its own sender, over the same
        // connection while it stays usable. The null sender (DSNs) is never rewritten.
        let verp = self.verp.get();
        if let Some(policy) =
            Option::as_ref(&verp).filter(|p| !env.sender.is_empty() && p.applies(&plan.key))
        {
            let mut total = Attempt::default();
            for (index, rcpt) in pending {
                let sender = policy.verp.sender(env.id, index as u16, &rcpt.address);
                let one = self
                    .attempt_as(
                        env,
                        body,
                        plan,
                        connection,
                        &mut outbound,
                        &sender,
                        vec![(index, rcpt)],
                    )
                    .await;
                total.outcomes.extend(one.outcomes);
                total.host = one.host.or(total.host);
                total.addr = one.addr.or(total.addr);
                total.source = one.source.or(total.source);
                total.tls = one.tls.or(total.tls);
            }
            return total;
        }
        self.attempt_as(
            env,
            body,
            plan,
            connection,
            &mut outbound,
            &env.sender,
            pending,
        )
        .await
    }

    /// One transaction from `sender` to the `pending` recipients.
    // The attempt's parts, passed through from `attempt`.
    #[allow(clippy::too_many_arguments)]
    async fn attempt_as(
        &self,
        env: &Envelope,
        body: &[u8],
        plan: &RoutePlan,
        connection: &mut Option<Connection>,
        outbound: &mut Outbound,
        sender: &str,
        pending: Vec<(usize, Recipient)>,
    ) -> Attempt {
        let recipients: Vec<Recipient> = pending.iter().map(|(_, r)| r.clone()).collect();
        // Ties a returned copy (a bounce, a complaint) to this transaction's recipients.
        let prefix = self.origin.header(
            env.id,
            crate::clock::now_ms(),
            recipients.iter().map(|r| r.address.as_str()),
        );
        let message = OutboundMessage {
            sender,
            recipients: &recipients,
            env_id: env.env_id.as_deref(),
            ret: env.ret,
            body_type: env.body_type,
            smtputf8: env.smtputf8,
            body,
            prefix: prefix.as_bytes(),
        };

        let settings = self.settings.get();
        // The kept connection may have been opened for another domain behind the same hosts:
        // it carries this message only if it meets this plan's policy (the scheduler checks
        // first, so that a replacement gets a shaping slot; this is the last line).
        if let Some(conn) = connection.take_if(|c| !self.fits(c, plan)) {
            self.pool.put(conn).await;
        }
        // A kept connection gets one chance; if it fails before anything was accepted, a
        // fresh connection is tried once.
        let mut reused = connection.is_some();
        loop {
            let conn = match connection.take() {
                Some(conn) => conn,
                None => match self
                    .connect(plan, &settings, outbound, &env.destination)
                    .await
                {
                    Ok(conn) => conn,
                    Err(failure) => return failure.for_all(&pending, &self.classifier),
                },
            };
            let mut conn = conn;
            let result = conn.send(&message).await;
            let mut attempt = Attempt {
                outcomes: Vec::new(),
                host: Some(conn.host().to_string()),
                addr: Some(conn.addr()),
                source: conn.source(),
                tls: conn.tls().cloned(),
                tls_policy: None,
            };
            match result {
                Ok(replies) => {
                    attempt.outcomes = pending
                        .iter()
                        .zip(replies)
                        .map(|((index, _), r)| {
                            RcptOutcome::of_reply(*index, &r.reply, &self.classifier)
                        })
                        .collect();
                    if conn.is_reusable()
                        && conn.messages_sent() < settings.max_messages_per_connection
                    {
                        *connection = Some(conn);
                    } else {
                        conn.quit().await;
                    }
                    return attempt;
                }
                Err(err) if reused && !err.is_permanent() => {
                    debug!(host = conn.host(), error = %err, "reused connection failed; reconnecting");
                    reused = false;
                    // Its replacement takes over its shaping slot.
                    if outbound.lease.is_none() {
                        outbound.lease = conn.take_lease();
                    }
                }
                Err(err) => {
                    let failure = Failure::from_attempt_error(&err);
                    attempt.outcomes = failure.for_all(&pending, &self.classifier).outcomes;
                    return attempt;
                }
            }
        }
    }

    /// Closes idle pooled connections that `which` selects.
    pub fn evict_idle(&self, which: impl Fn(&Connection) -> bool) {
        self.pool.evict(which);
    }

    /// Closes the one idle pooled connection that `which` selects and that has idled
    /// longest; whether there was one.
    pub fn evict_idle_oldest(&self, which: impl Fn(&Connection) -> bool) -> bool {
        self.pool.evict_oldest(which)
    }

    /// Whether `conn` (open, from another message, perhaps of another domain) may carry a
    /// message under `plan`. Strict: its host is one of the plan's hosts (an MTA-STS policy
    /// lists which), DANE does not refuse that host, and it was opened with exactly the TLS
    /// level, DANE records and AUTH user the plan asks of that host. A connection opened for
    /// a domain with a weaker policy never carries mail of a domain with a stricter one.
    pub fn fits(&self, conn: &Connection, plan: &RoutePlan) -> bool {
        let Some(hop) = plan
            .hops
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(conn.host()))
        else {
            return false;
        };
        let (tls, tlsa, refused) = dane_target(plan, &hop.name);
        if refused.is_some() {
            return false;
        }
        let settings = self.settings.get();
        let target = Target {
            host: &hop.name,
            addr: conn.addr(),
            source: conn.source(),
            tls,
            auth: password_of(plan, &settings),
        };
        conn.suits_checked(&target, tlsa)
    }

    /// An idle pooled connection to one of `plan`'s hosts (in plan order) that suits it
    /// strictly ([`Worker::fits`]), opened from `source` and counted in the shaping group
    /// `group` (`None`: not shaped). Several domains behind one MX host share its
    /// connections this way, without taking another shaping slot.
    pub async fn take_pooled(
        &self,
        plan: &RoutePlan,
        source: Option<IpAddr>,
        group: Option<&str>,
    ) -> Option<Connection> {
        if self.pool.idle_count() == 0 {
            return None;
        }
        let settings = self.settings.get();
        let auth = password_of(plan, &settings);
        for hop in &plan.hops {
            let (tls, tlsa, refused) = dane_target(plan, &hop.name);
            if refused.is_some() {
                continue;
            }
            let Ok(addrs) = self.router.addresses(hop).await else {
                continue;
            };
            for addr in addrs {
                let target = Target {
                    host: &hop.name,
                    addr,
                    source,
                    tls,
                    auth,
                };
                let conn = self
                    .pool
                    .take_where(&target, |c| pooled_match(c, tlsa, group));
                if conn.is_some() {
                    return conn;
                }
            }
        }
        None
    }

    /// Returns a worker's connection to the pool when the worker stops.
    pub async fn park(&self, conn: Connection) {
        self.pool.put(conn).await;
    }

    /// Connects to the first usable host of the plan: pooled connections first, then new
    /// ones, hosts in plan order, each host's addresses in order.
    async fn connect(
        &self,
        plan: &RoutePlan,
        settings: &AttemptSettings,
        outbound: &mut Outbound,
        domain: &str,
    ) -> Result<Connection, Failure> {
        // TLS-RPT counts sessions with the MX hosts of domains that have a policy: their
        // TLSA records under DANE, else their MTA-STS policy.
        let sts = self
            .tls_reports
            .as_ref()
            .filter(|_| plan.dane.is_none())
            .and_then(|_| self.router.cached_sts_policy(domain))
            .filter(|p| p.mode != StsMode::None);
        // MTA-STS `testing`: the certificate is checked and the result reported, not enforced.
        let report_peer = sts.as_ref().is_some_and(|p| p.mode == StsMode::Testing)
            && plan.tls != TlsPolicy::Required;
        let password = password_of(plan, settings);
        // The message bounces only if every host failed permanently: one host that is merely
        // down (or a DNS lookup that timed out) makes the whole attempt temporary.
        let mut failures = Failures::default();
        for hop in &plan.hops {
            // What DANE makes of this host: its TLSA records, or a reason not to use it.
            let (tls, tlsa, refused) = dane_target(plan, &hop.name);
            let report_policy = match (&self.tls_reports, plan.dane.is_some(), &sts) {
                (Some(_), true, _) => Some(ReportPolicy::Tlsa {
                    mx: hop.name.clone(),
                    records: tlsa.cloned().unwrap_or_default(),
                }),
                (Some(_), false, Some(policy)) => Some(ReportPolicy::Sts(policy.clone())),
                _ => None,
            };
            let report = |result: Result<(), (&str, &str)>| {
                let label = match result {
                    Ok(()) => "ok",
                    Err((result_type, _)) => result_type,
                };
                self.metrics.tls_policy_session(plan.tls_label, label);
                if let (Some(reports), Some(policy)) = (&self.tls_reports, &report_policy) {
                    match result {
                        Ok(()) => reports.success(domain, policy, &hop.name),
                        Err((result_type, ip)) => {
                            reports.failure(domain, policy, result_type, &hop.name, ip)
                        }
                    }
                }
            };
            if let Some((result_type, reason)) = refused {
                report(Err((result_type, "")));
                failures.add(Failure::temporary("4.7.5", reason));
                continue;
            }
            let addrs = match self.router.addresses(hop).await {
                Ok(addrs) => addrs,
                Err(err) => {
                    failures.add(Failure::from_route_error(&err));
                    continue;
                }
            };
            for addr in addrs {
                let target = Target {
                    host: &hop.name,
                    addr,
                    source: outbound.source,
                    tls,
                    auth: password,
                };
                // A new connection's lease names its shaping group: a pooled one must count
                // in the same group.
                let group = outbound.lease.as_ref().map(|l| l.group());
                if let Some(conn) = self
                    .pool
                    .take_where(&target, |c| pooled_match(c, tlsa, group))
                {
                    return Ok(conn);
                }
                let ehlo = outbound
                    .ehlo
                    .as_deref()
                    .unwrap_or(&settings.client.ehlo_name);
                let checks = TlsChecks { tlsa, report_peer };
                let connected = client::connect_checked(
                    &target,
                    &settings.client,
                    &self.broken_tls,
                    ehlo,
                    checks,
                )
                .await;
                let ip = addr.ip().to_string();
                match &connected {
                    Ok(conn) if conn.tls().is_some() => match conn.peer_check() {
                        Some(Err(detail)) => report(Err((certificate_result_type(detail), &ip))),
                        _ => report(Ok(())),
                    },
                    Ok(_) if tls != TlsPolicy::Disabled => {
                        report(Err(("starttls-not-supported", &ip)))
                    }
                    // Plain text as asked: nothing to report, only to count.
                    Ok(_) => self.metrics.tls_policy_session(plan.tls_label, "ok"),
                    Err(err) => {
                        if let Some(result_type) = tls_result_type(err) {
                            report(Err((result_type, &ip)));
                        }
                    }
                }
                match connected {
                    Ok(mut conn) => {
                        if let Some(lease) = outbound.lease.take() {
                            conn.set_lease(lease);
                        }
                        return Ok(conn);
                    }
                    Err(err) => {
                        debug!(host = %hop.name, %addr, error = %err, "connect failed");
                        let try_next = err.try_next_host();
                        failures.add(Failure::from_attempt_error(&err));
                        if !try_next {
                            return Err(failures.verdict());
                        }
                    }
                }
            }
        }
        Err(failures.verdict())
    }
}

/// The AUTH user and password `plan` asks for, if its password file was read.
fn password_of<'a>(
    plan: &'a RoutePlan,
    settings: &'a AttemptSettings,
) -> Option<(&'a str, &'a str)> {
    plan.auth.as_ref().and_then(|a| {
        settings
            .passwords
            .get(&a.password_file)
            .map(|p| (a.username.as_str(), p.as_str()))
    })
}

/// Whether a pooled connection was checked against exactly `tlsa` and counts in the shaping
/// group `group` (`None`: any, as when shaping is off).
fn pooled_match(conn: &Connection, tlsa: Option<&Arc<TlsaSet>>, group: Option<&str>) -> bool {
    let same_group = match group {
        Some(group) => conn.lease().is_some_and(|l| l.group() == group),
        None => true,
    };
    same_group && conn.checked_against(tlsa)
}

/// A host's TLS level, its TLSA records, and why DANE refuses it (result type, reason).
type DaneTarget<'p> = (
    TlsPolicy,
    Option<&'p Arc<TlsaSet>>,
    Option<(&'static str, String)>,
);

/// The TLS level of a connection to `host` under `plan`, its TLSA records under DANE, and
/// (RFC 8460 result type, deferral reason) when DANE says the host must not be used: its
/// DNSSEC answers were bogus (`dnssec-invalid`), or `dane-only` found no usable TLSA
/// records (`dane-required`).
fn dane_target<'p>(plan: &'p RoutePlan, host: &str) -> DaneTarget<'p> {
    let only = plan.tls == TlsPolicy::DaneOnly;
    match (plan.tls, plan.dane_host(host)) {
        (_, Some(DaneHost::Bogus(why))) => (
            plan.tls,
            None,
            Some((
                "dnssec-invalid",
                format!("{host}: not used, its DANE lookups failed DNSSEC validation: {why}"),
            )),
        ),
        (TlsPolicy::Dane | TlsPolicy::DaneOnly, Some(DaneHost::Tlsa(set)))
            if !only || !set.usable.is_empty() =>
        {
            (plan.tls, Some(set), None)
        }
        (TlsPolicy::DaneOnly, _) => (
            plan.tls,
            None,
            Some((
                "dane-required",
                format!("{host}: dane-only, but the host has no usable DNSSEC-signed TLSA records"),
            )),
        ),
        (TlsPolicy::Dane, None) => (TlsPolicy::Opportunistic, None, None),
        (tls, _) => (tls, None, None),
    }
}

/// The RFC 8460 result type of a certificate check's failure (rustls's error text).
fn certificate_result_type(detail: &str) -> &'static str {
    if detail.contains(crate::delivery::dane::NO_MATCH) {
        "tlsa-invalid"
    } else if detail.contains("NotValidForName") || detail.contains("not valid for name") {
        "certificate-host-mismatch"
    } else if detail.contains("Expired") || detail.contains("expired") {
        "certificate-expired"
    } else if detail.contains("UnknownIssuer") {
        "certificate-not-trusted"
    } else {
        "validation-failure"
    }
}

/// The RFC 8460 result type of a failed connection, when the failure is about TLS.
fn tls_result_type(err: &AttemptError) -> Option<&'static str> {
    match err {
        AttemptError::NoStartTls => Some("starttls-not-supported"),
        AttemptError::Tls { detail } => Some(certificate_result_type(detail)),
        _ => None,
    }
}

/// The failures of one connection round, across hosts.
#[derive(Default)]
struct Failures {
    temporary: Option<Failure>,
    permanent: Option<Failure>,
}

impl Failures {
    fn add(&mut self, failure: Failure) {
        let slot = match failure.verdict {
            Verdict::Permanent => &mut self.permanent,
            _ => &mut self.temporary,
        };
        *slot = Some(failure);
    }

    /// The last temporary failure if there was any, else the last permanent one.
    fn verdict(self) -> Failure {
        self.temporary
            .or(self.permanent)
            .unwrap_or_else(|| Failure::temporary("4.4.4", "no host to deliver to".to_string()))
    }
}

/// The reply's enhanced status, or the generic one of its class when the server gave none.
fn status_of(reply: &RemoteReply) -> String {
    reply.status.clone().unwrap_or_else(|| {
        match reply.code / 100 {
            2 => "2.0.0",
            5 => "5.0.0",
            _ => "4.0.0",
        }
        .to_string()
    })
}

fn verdict_of(code: u16) -> Verdict {
    match code {
        200..=299 => Verdict::Delivered,
        500..=599 => Verdict::Permanent,
        _ => Verdict::Temporary,
    }
}

/// A failure that applies to every pending recipient (no connection, or a lost one).
#[derive(Debug, Clone)]
pub struct Failure {
    verdict: Verdict,
    status: String,
    reply: String,
}

impl Failure {
    fn temporary(status: &str, reply: String) -> Failure {
        Failure {
            verdict: Verdict::Temporary,
            status: status.to_string(),
            reply,
        }
    }

    pub fn from_route_error(err: &RouteError) -> Failure {
        match err {
            RouteError::Permanent { status, reason } => Failure {
                verdict: Verdict::Permanent,
                status: status.to_string(),
                reply: reason.clone(),
            },
            RouteError::Temporary { status, reason } => Failure::temporary(status, reason.clone()),
        }
    }

    fn from_attempt_error(err: &AttemptError) -> Failure {
        Failure {
            verdict: if err.is_permanent() {
                Verdict::Permanent
            } else {
                Verdict::Temporary
            },
            status: err.status().to_string(),
            reply: err.reply_text(),
        }
    }

    /// The failure as every pending recipient's result, classified once.
    pub fn for_all(&self, pending: &[(usize, Recipient)], classifier: &Classifier) -> Attempt {
        let category = classifier
            .classify_attempt(&self.status, &self.reply)
            .category;
        Attempt {
            outcomes: pending
                .iter()
                .map(|(index, _)| RcptOutcome {
                    index: *index,
                    verdict: self.verdict,
                    status: self.status.clone(),
                    reply: self.reply.clone(),
                    category,
                })
                .collect(),
            ..Attempt::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_route_override_beats_the_global_switch() {
        let config = crate::config::Config::parse(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n\
             [[routes]]\ndomain = \"on.test\"\nhosts = [\"127.0.0.1:25\"]\nverp = true\n\
             [[routes]]\ndomain = \"off.test\"\nhosts = [\"127.0.0.1:25\"]\nverp = false\n\
             [bounce]\ndomains = [\"b.test\"]\nverp_key_file = \"/k\"\n",
        )
        .unwrap();
        let policy = VerpPolicy::from_config(Verp::new(&[7; 16], "bounces", "b.test"), &config);
        assert!(policy.applies("route:on.test"));
        assert!(!policy.applies("route:off.test"));
        assert!(!policy.applies("mx:mx.example.test"), "bounce.verp is off");
        let global = VerpPolicy {
            global: true,
            ..policy
        };
        assert!(!global.applies("route:off.test"));
        assert!(global.applies("mx:mx.example.test"));
    }
}
