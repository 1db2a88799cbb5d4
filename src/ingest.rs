//! The "cleanup" stage between a finished SMTP transaction and the spool.
//!
//! A message with `X-Tern-*` control headers or a sidecar request first goes through the
//! [`sidecar`] stage (one submission per recipient comes back); others skip it. Then it prepends the Received trace header, adds Date and Message-ID to authenticated
//! submissions that lack them, splits the recipients by destination domain (one envelope per
//! destination, so exactly one delivery worker ever owns an envelope), and commits all parts
//! in one atomic, fsync'd spool write. [`Ingest::accept`] returns only once the message is
//! durable: that is what allows the session to say 250. Messages whose From domain has DKIM
//! keys are signed here, once, so retries never sign again. Committed parts are handed to the
//! scheduler. The `X-Tern-Pool` control header is removed before signing, and the source-IP
//! pool (that header's or the sender domain's) is recorded in each envelope.
//!
//! Recipients at a bounce domain are not delivered: they are committed, in the same batch,
//! as one inbound record for the bounce processor (`crate::inbound`). With
//! `suppression.mode = "drop"`, suppressed recipients are taken out here (a `suppressed`
//! event each); a message left without recipients is committed as nothing at all but still
//! gets its queue id.
//!
//! Mail carrying `X-Tern-Send-Time: optimize` (the header is always removed) is split one part
//! per recipient, each with the `not_before` the send-time model chose inside the window (the
//! campaign's `send_window` and `quiet_hours` when a campaign applied, else the header's
//! window and `[sendtime]`); the scheduler does not attempt a part before it.

use crate::admin::metrics::SuppressedAction;
use crate::config::{SuppressionConfig, SuppressionMode};
use crate::delivery::dkim::DkimSigners;
use crate::delivery::log::DeliveryLog;
use crate::events::{Event, Events, Kind as EventKind};
use crate::inbound::{encode_record, Feedback, InboundHead};
use crate::live::Live;
use crate::scheduler::NewMessage;
use crate::shaping::pools::{strip_pool_header, Pools};
use crate::sidecar::sendtime::model::Window;
use crate::sidecar::sendtime::SendTime as SendTimeModel;
use crate::sidecar::{self, SendTime, Sidecar};
use crate::suppression::Suppressions;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tern_queue::{BodyType, Envelope, MessageId, Recipient, Ret, Source, Spool, SpoolError};
use tokio::sync::mpsc;
use tracing::warn;

/// TLS parameters of a connection, for Received headers and the delivery log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

impl TlsInfo {
    /// The negotiated version (e.g. `TLSv1.3`) and cipher suite of an inbound or outbound
    /// rustls connection.
    pub fn of<D>(conn: &rustls::ConnectionCommon<D>) -> TlsInfo {
        TlsInfo {
            version: conn
                .protocol_version()
                .and_then(|v| v.as_str())
                .unwrap_or("TLS")
                .replace('_', "."),
            cipher: conn
                .negotiated_cipher_suite()
                .and_then(|c| c.suite().as_str())
                .unwrap_or("unknown")
                .to_string(),
        }
    }
}

/// One accepted SMTP transaction or HTTP injection, ready for the spool.
#[derive(Debug, Clone)]
pub struct Submission {
    /// Reverse-path; empty for the null sender.
    pub sender: String,
    pub recipients: Vec<Recipient>,
    pub env_id: Option<String>,
    pub ret: Option<Ret>,
    pub body_type: BodyType,
    pub smtputf8: bool,
    pub source: Source,
    pub tls: Option<TlsInfo>,
    /// The message as received: headers and body, CRLF line ends, no dot-stuffing.
    pub content: Vec<u8>,
    /// The sidecar request of an HTTP injection (SMTP asks with `X-Tern-*` headers).
    pub sidecar: Option<crate::sidecar::Request>,
    /// The source-IP pool an HTTP injection asked for (checked against the configured pools
    /// by the API); it wins over `X-Tern-Pool` and the sender domain.
    pub pool: Option<String>,
}

/// What one acceptance commits: the parts of every submission the sidecar made of it, in one
/// spool batch.
#[derive(Default)]
struct Batch {
    ids: Vec<MessageId>,
    parts: Vec<(Envelope, Vec<u8>)>,
    inbound: Vec<(MessageId, Vec<u8>)>,
    /// Recipients dropped as suppressed: address, reason, protocol (for their events).
    dropped: Vec<(String, String, &'static str)>,
}

/// What [`Ingest::accept_report`] committed.
#[derive(Debug)]
pub struct Accepted {
    /// One id per spool part; the first is the queue id.
    pub ids: Vec<MessageId>,
    /// Per recipient, what the sidecar did (empty when the message took the plain path).
    pub sidecar: Vec<crate::sidecar::Report>,
}

#[derive(Clone)]
pub struct Ingest {
    spool: Spool,
    hostname: String,
    max_age: Duration,
    /// Shared by every clone, so a config reload (key rotation) reaches them all.
    dkim: Arc<Live<DkimSigners>>,
    scheduler: Option<mpsc::UnboundedSender<Vec<NewMessage>>>,
    pools: Option<Arc<Pools>>,
    feedback: Feedback,
    send_time: Option<SendTimeModel>,
    sidecar: Option<Arc<Sidecar>>,
}

impl Ingest {
    pub fn new(spool: Spool, hostname: String, max_age: Duration) -> Ingest {
        let feedback = Feedback::new(
            Suppressions::new(spool.clone(), SuppressionConfig::default()),
            Events::new(spool.clone(), 0, DeliveryLog::disabled()),
            Vec::new(),
        );
        Ingest {
            spool,
            hostname,
            max_age,
            dkim: Arc::new(Live::new(DkimSigners::none())),
            scheduler: None,
            pools: None,
            feedback,
            send_time: None,
            sidecar: None,
        }
    }

    /// Uses these bounce domains, suppression list and events (default: none, an empty list
    /// in reject mode, events only logged).
    pub fn with_feedback(mut self, feedback: Feedback) -> Ingest {
        self.feedback = feedback;
        self
    }

    pub fn feedback(&self) -> &Feedback {
        &self.feedback
    }

    /// Honours `X-Tern-Send-Time: optimize` with this model (without one the header is
    /// still removed, and the mail goes at once).
    pub fn with_send_time(mut self, send_time: SendTimeModel) -> Ingest {
        self.send_time = Some(send_time);
        self
    }

    pub fn send_time(&self) -> Option<&SendTimeModel> {
        self.send_time.as_ref()
    }

    /// Runs the sidecar stage on messages that ask for it (control headers or a request).
    pub fn with_sidecar(mut self, sidecar: Arc<Sidecar>) -> Ingest {
        self.sidecar = Some(sidecar);
        self
    }

    pub fn sidecar(&self) -> Option<&Arc<Sidecar>> {
        self.sidecar.as_ref()
    }

    /// Signs accepted mail with these keys (when its From domain has any).
    pub fn with_dkim(self, signers: DkimSigners) -> Ingest {
        self.set_dkim(signers);
        self
    }

    /// Replaces the signing keys (config reload) for this ingest and every clone of it;
    /// messages being signed finish with the keys they started with.
    pub fn set_dkim(&self, signers: DkimSigners) {
        self.dkim.set(signers);
    }

    /// Hands every committed message to the scheduler through `tx`.
    pub fn with_scheduler(mut self, tx: mpsc::UnboundedSender<Vec<NewMessage>>) -> Ingest {
        self.scheduler = Some(tx);
        self
    }

    /// Chooses source-IP pools for accepted mail (`X-Tern-Pool`, sender domain).
    pub fn with_pools(mut self, pools: Arc<Pools>) -> Ingest {
        self.pools = Some(pools);
        self
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// The name in our Received headers (`server.hostname`).
    pub fn hostname(&self) -> &str {
        &self.hostname
    }

    /// Makes the submission durable and returns the queue id reported to the client.
    pub async fn accept(&self, sub: Submission) -> Result<MessageId, SpoolError> {
        Ok(self.accept_parts(sub).await?[0])
    }

    /// Like [`Ingest::accept`], but returns the id of every part (one per destination
    /// domain, in commit order); the first is the queue id.
    pub async fn accept_parts(&self, sub: Submission) -> Result<Vec<MessageId>, SpoolError> {
        Ok(self.accept_report(sub).await?.ids)
    }

    /// Like [`Ingest::accept_parts`], with the sidecar's per-recipient report. A message that
    /// asks for the sidecar becomes one submission per recipient, all committed together
    /// under one queue id.
    pub async fn accept_report(&self, mut sub: Submission) -> Result<Accepted, SpoolError> {
        let now = crate::clock::now();
        // Read before the sidecar stage, which strips every X-Tern-* header; gone before DKIM
        // signs the headers either way.
        let pool_header = strip_pool_header(&mut sub.content);
        let pool = sub.pool.take().or_else(|| {
            self.pools
                .as_ref()
                .and_then(|p| p.at_ingest(pool_header.as_deref(), &sub.sender))
        });
        let sender = sub.sender.clone();
        let mut batch = Batch::default();
        let mut reports = Vec::new();
        match &self.sidecar {
            Some(stage) if sidecar::wanted(&sub) => {
                for prepared in stage.apply(sub).await {
                    let window = self.send_window(prepared.send_time, prepared.report.is_some());
                    reports.extend(prepared.report);
                    self.build_parts(prepared.submission, now, &pool, window, &mut batch)
                        .await?;
                }
            }
            _ => {
                // Without a sidecar stage the send-time header is still honoured and removed.
                let optimize = sidecar::sendtime::hook::take_send_time_header(&mut sub.content);
                let window = self
                    .send_time
                    .as_ref()
                    .filter(|_| optimize)
                    .map(|m| m.default_window());
                self.build_parts(sub, now, &pool, window, &mut batch)
                    .await?;
            }
        }
        let new: Vec<NewMessage> = batch
            .parts
            .iter()
            .map(|(env, _)| NewMessage {
                id: env.id,
                domain: env.destination.clone(),
                pool: env.pool.clone(),
                due_ms: env.next_due_ms,
            })
            .collect();
        let feedback = &self.feedback;
        let woke = !batch.inbound.is_empty();
        self.spool
            .commit_with_inbound(batch.parts, batch.inbound)
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
        if let Some(tx) = &self.scheduler {
            // Only fails when the scheduler is gone (shutdown): the mail is durable and the
            // due loader picks it up at the next start.
            let _ = tx.send(new);
        }
        Ok(Accepted {
            ids: batch.ids,
            sidecar: reports,
        })
    }

    /// The window a sidecar-prepared message is planned in: `None` unless it asked to be
    /// optimised (and the model runs). A campaign's `send_window` and `quiet_hours` apply as
    /// configured; without a campaign the header's window with `sendtime.quiet_hours`.
    fn send_window(&self, send_time: SendTime, campaign: bool) -> Option<Window> {
        let SendTime::Optimize {
            window,
            quiet_hours,
        } = send_time
        else {
            return None;
        };
        let model = self.send_time.as_ref()?;
        Some(Window {
            len_ms: window.as_millis() as u64,
            quiet: if campaign {
                quiet_hours
            } else {
                model.default_window().quiet
            },
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
        window: Option<Window>,
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
        let groups = match (&self.send_time, window) {
            (Some(send_time), Some(window)) => {
                plan_send_times(send_time, groups, now_ms, window).await
            }
            _ => groups
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
        if !dkim.is_empty() {
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
        let expires_ms = now_ms.saturating_add(self.max_age.as_millis() as u64);
        let last = groups.len().saturating_sub(1);
        let mut body = Some(body);
        for (i, ((destination, recipients, not_before_ms), id)) in
            groups.into_iter().zip(&batch.ids[first..]).enumerate()
        {
            // The last part takes the buffer itself; the others get their own copy, since
            // every envelope owns exactly one body.
            let part_body = if i == last {
                body.take().unwrap_or_default()
            } else {
                body.clone().unwrap_or_default()
            };
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
                size: part_body.len() as u64,
                created_ms: now_ms,
                expires_ms,
                // A send time beyond expiry would never be attempted: expiry wins.
                next_due_ms: now_ms.max(not_before_ms.min(expires_ms)),
                attempts: 0,
                source: sub.source.clone(),
                held: false,
                delay_notified: false,
                parked: false,
                pool: pool.clone(),
                not_before_ms,
            };
            batch.parts.push((envelope, part_body));
        }
        Ok(())
    }
}

/// One part per recipient, each with the send time the model chose (different recipients
/// get different times, and an envelope has one due time). A model failure sends at once.
/// Recipients are planned in parallel (each plan records the send durably, and the group
/// commit merges those writes), in slices so a large message does not flood the spool.
async fn plan_send_times(
    send_time: &SendTimeModel,
    groups: BTreeMap<String, Vec<Recipient>>,
    now_ms: u64,
    window: Window,
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
            let (send_time, address) = (send_time.clone(), rcpt.address.clone());
            tasks.spawn(async move { (i, send_time.plan(&address, now_ms, window).await) });
        }
        let mut planned = vec![0; slice.len()];
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((i, Ok((at, _)))) if at > now_ms => planned[i] = at,
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

/// RFC 5322 date-time in UTC, e.g. `Fri, 27 Nov 2026 20:13:09 +0000`.
pub fn rfc5322_date(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Proleptic Gregorian (year, month, day) for a count of days since 1970-01-01
/// (the well-known era-based conversion).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        let t = UNIX_EPOCH + Duration::from_secs(1_795_810_389); // 2026-11-27 20:13:09 UTC
        assert_eq!(rfc5322_date(t), "Fri, 27 Nov 2026 20:13:09 +0000");
        assert_eq!(rfc5322_date(UNIX_EPOCH), "Thu, 1 Jan 1970 00:00:00 +0000");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc5322_date(leap), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

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
