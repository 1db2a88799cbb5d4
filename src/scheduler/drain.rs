//! Relaying a node's queue to another tern node over SMTP (`tern queue drain`, `POST
//! /api/v1/queue/drain`), so a node can be decommissioned without losing or bouncing mail.
//!
//! Each queued message (its pending recipients) goes in one transaction with its envelope as
//! it was: the sender, every recipient's NOTIFY and ORCPT, RET and ENVID (the peer must offer
//! DSN, as tern does; without it the drain stops), BODY=8BITMIME and SMTPUTF8; plus the
//! [`RelayTrace`] header (created, expiry, attempts, next due time, whether the send time was
//! planned) and, for campaign mail, the campaign and variant it was rendered for
//! ([`crate::message::RELAY_CAMPAIGN_HEADER`]), which the receiving tern honours from a
//! trusted client (its relay networks or AUTH) and takes out. A message is
//! removed here only after the peer accepted every one of its pending recipients (250 after
//! the data, which tern gives only once the mail is durable); a recipient the peer refused
//! stays here (its message is updated to the recipients still pending). A connection failure
//! stops the drain with everything not yet accepted still queued: running it again resumes.
//! Held messages are left alone (release them first).
//!
//! AUTH ([`Peer::auth`]): always after STARTTLS with a certificate that verifies for
//! [`Peer::name`] (the system's CAs, `delivery.ca_file`, [`Peer::ca_file`]); only to a
//! loopback peer may the operator waive the verification ([`Peer::loopback_unverified`]).
//! Credentials come from a file, never from the command line.
//!
//! On a running node ([`drain`] with the [`Scheduler`]), each message is first claimed
//! ([`Scheduler::claim`]: held, and any attempt in flight finished), so this node never
//! delivers a message the peer also has; one that cannot be relayed is given back
//! ([`Scheduler::unclaim`]). Intake keeps running: mail accepted meanwhile is drained too if
//! the scan reaches it, else delivered here as usual.
//!
//! Invariant: no message is removed before the peer's 250 for all its pending recipients, so
//! a crash or a failure at any point loses nothing; a crash between the peer's 250 and the
//! removal here sends that message twice (once more on the next run), never zero times.

use super::Scheduler;
use crate::config::{Config, SmtpTimeouts, TlsPolicy};
use crate::delivery::client::{self, BrokenTls, ClientSettings, OutboundMessage, Target};
use crate::message::RelayTrace;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tern_queue::{Envelope, RecipientState, Spool};

/// What a drain did.
#[derive(Debug, Default)]
pub struct Drained {
    pub messages: u64,
    pub recipients: u64,
    /// Recipients the peer refused (still queued here).
    pub refused: u64,
    pub held: u64,
}

/// The node the queue goes to, and how to log in there.
#[derive(Debug, Clone)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The name its certificate must be valid for (with AUTH); by default its address.
    pub name: String,
    /// User and password for AUTH, from [`read_credentials`].
    pub auth: Option<(String, String)>,
    /// More CAs (PEM) its certificate may chain to.
    pub ca_file: Option<PathBuf>,
    /// AUTH over TLS without a verified certificate, to a loopback peer only.
    pub loopback_unverified: bool,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            name: addr.ip().to_string(),
            auth: None,
            ca_file: None,
            loopback_unverified: false,
        }
    }
}

/// AUTH credentials from `path`: the user name on the first line, the password on the
/// second (the file's mode is the operator's to keep at 0600).
pub fn read_credentials(path: &Path) -> Result<(String, String), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut lines = text.lines();
    match (lines.next(), lines.next()) {
        (Some(user), Some(password)) if !user.is_empty() && !password.is_empty() => {
            Ok((user.to_owned(), password.to_owned()))
        }
        _ => Err(format!(
            "{}: want the user name on the first line and the password on the second",
            path.display()
        )),
    }
}

/// This node's side of a drain: its EHLO name, SMTP timeouts and extra CAs.
#[derive(Debug, Clone)]
pub struct Local {
    pub hostname: String,
    pub timeouts: SmtpTimeouts,
    /// `delivery.ca_file`.
    pub ca_file: Option<PathBuf>,
}

impl Local {
    pub fn of(config: &Config) -> Local {
        Local {
            hostname: config.server.hostname.clone(),
            timeouts: config.delivery.timeouts,
            ca_file: config.delivery.ca_file.clone(),
        }
    }
}

/// The client settings for `peer`: with AUTH, verified TLS against the system's CAs,
/// `delivery.ca_file` and the peer's own CA file.
fn settings(config: &Local, peer: &Peer) -> Result<ClientSettings, String> {
    let mut roots = rustls::RootCertStore::empty();
    if peer.auth.is_some() {
        if let Ok(system) = crate::tls::load_roots(Path::new(crate::tls::SYSTEM_ROOTS)) {
            roots.roots.extend(system.roots);
        }
        for file in [config.ca_file.as_deref(), peer.ca_file.as_deref()]
            .into_iter()
            .flatten()
        {
            let extra = crate::tls::load_roots(file)
                .map_err(|e| format!("CA file {}: {e}", file.display()))?;
            roots.roots.extend(extra.roots);
        }
    }
    let settings = ClientSettings::new(config.hostname.clone(), config.timeouts, roots);
    if peer.loopback_unverified {
        if !peer.addr.ip().is_loopback() {
            return Err(format!(
                "the certificate check is waived only for a loopback peer, not {}",
                peer.addr
            ));
        }
        return Ok(settings.with_unverified_auth_to_loopback());
    }
    Ok(settings)
}

/// Drains `spool` to `peer` over `connections` SMTP connections; on a running node,
/// `scheduler` claims each message first (see the module doc).
pub async fn drain(
    config: &Local,
    spool: Spool,
    peer: &Peer,
    destination: Option<String>,
    connections: usize,
    scheduler: Option<Scheduler>,
) -> Result<Drained, (Drained, String)> {
    let settings = Arc::new(settings(config, peer).map_err(|e| (Drained::default(), e))?);
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let broken = Arc::new(BrokenTls::new(Duration::from_secs(3600), metrics));
    let (tx, rx) = tokio::sync::mpsc::channel::<Envelope>(connections * 4);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let counts = Arc::new(Counts::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (settings, broken, rx, spool, counts, peer, scheduler) = (
            settings.clone(),
            broken.clone(),
            rx.clone(),
            spool.clone(),
            counts.clone(),
            peer.clone(),
            scheduler.clone(),
        );
        workers.spawn(async move {
            let auth = peer
                .auth
                .as_ref()
                .map(|(u, p)| (u.as_str(), p.as_str()));
            let target = Target {
                host: &peer.name,
                addr: peer.addr,
                source: None,
                tls: match (&peer.auth, peer.loopback_unverified) {
                    (Some(_), false) => TlsPolicy::Required,
                    (Some(_), true) => TlsPolicy::Encrypt,
                    (None, _) => TlsPolicy::Opportunistic,
                },
                auth,
            };
            let mut conn: Option<client::Connection> = None;
            loop {
                let Some(env) = rx.lock().await.recv().await else {
                    break;
                };
                // Live: out of this node's delivery first (or skipped: delivered, held).
                let env = match &scheduler {
                    Some(s) => match s.claim(env.id).await {
                        Ok(Some(env)) => env,
                        Ok(None) => continue,
                        Err(e) => return Err(format!("spool: {e}")),
                    },
                    None => env,
                };
                let give_back = |e: String| {
                    let scheduler = scheduler.clone();
                    async move {
                        if let Some(s) = scheduler {
                            if let Err(err) = s.unclaim(env.id).await {
                                tracing::warn!(id = %env.id, error = %err, "drain: cannot give a message back");
                            }
                        }
                        e
                    }
                };
                // One reconnect per message: a connection the peer closed is not a failure.
                let mut tries = 0;
                loop {
                    tries += 1;
                    let c = match conn.take() {
                        Some(c) if c.is_reusable() => c,
                        _ => match client::connect(&target, &settings, &broken).await {
                            Ok(c) => c,
                            Err(e) => {
                                let e = format!("connect to {}: {}", peer.addr, e.reply_text());
                                return Err(give_back(e).await);
                            }
                        },
                    };
                    match relay(c, &env, &spool, &counts).await {
                        Ok((c, all)) => {
                            if !all {
                                // Refused recipients stay here, delivered as usual.
                                give_back(String::new()).await;
                            }
                            conn = Some(c);
                            break;
                        }
                        Err(e) if tries < 2 => {
                            tracing::debug!(error = %e, "drain: retrying on a new connection");
                        }
                        Err(e) => return Err(give_back(e).await),
                    }
                }
            }
            if let Some(c) = conn {
                c.quit().await;
            }
            Ok::<(), String>(())
        });
    }
    // Only the workers hold the receiver: when they all stopped, sending fails (else a
    // full channel would wait for them forever).
    drop(rx);
    let mut held = 0;
    let mut failure = None;
    for env in spool.envelopes_after(None) {
        let env = match env {
            Ok(env) => env,
            Err(e) => {
                failure = Some(format!("spool: {e}"));
                break;
            }
        };
        if destination.as_ref().is_some_and(|d| *d != env.destination) {
            continue;
        }
        if env.held {
            held += 1;
            continue;
        }
        if !env
            .recipients
            .iter()
            .any(|r| r.state == RecipientState::Pending)
        {
            continue;
        }
        if tx.send(env).await.is_err() {
            break; // every worker stopped: their errors say why
        }
    }
    drop(tx);
    while let Some(done) = workers.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failure = failure.or(Some(e)),
            Err(e) => failure = failure.or(Some(e.to_string())),
        }
    }
    let drained = Drained {
        messages: counts.messages.load(Ordering::Relaxed),
        recipients: counts.recipients.load(Ordering::Relaxed),
        refused: counts.refused.load(Ordering::Relaxed),
        held,
    };
    match failure {
        None => Ok(drained),
        Some(e) => Err((drained, e)),
    }
}

#[derive(Default)]
struct Counts {
    messages: AtomicU64,
    recipients: AtomicU64,
    refused: AtomicU64,
}

/// One message to the peer; removed (or narrowed to the refused recipients) here after its
/// answer, and whether every pending recipient was taken. `Err`: the connection failed and
/// nothing about this message changed.
async fn relay(
    mut conn: client::Connection,
    env: &Envelope,
    spool: &Spool,
    counts: &Counts,
) -> Result<(client::Connection, bool), String> {
    if !conn.capabilities().dsn {
        return Err(
            "the peer does not offer DSN: RET, ENVID, NOTIFY and ORCPT would be lost".into(),
        );
    }
    let Some(body) = spool.body_of(env).map_err(|e| format!("spool: {e}"))? else {
        return Ok((conn, true)); // a damaged spool; the orphan sweep reports it
    };
    let pending: Vec<_> = env
        .recipients
        .iter()
        .filter(|r| r.state == RecipientState::Pending)
        .cloned()
        .collect();
    let trace = RelayTrace {
        created_ms: env.created_ms,
        expires_ms: env.expires_ms,
        attempts: env.attempts,
        // Claimed from this node's scheduler, the message is held here (due never, which
        // the peer read as "at expiry": live-drained mail sat on the peer until it expired).
        // On the peer it is due at once, as a release here would make it, and never before
        // its send time (`not_before_ms` travels too).
        due_ms: if env.held {
            env.not_before_ms
        } else {
            env.next_due_ms.min(env.expires_ms)
        },
        not_before_ms: env.not_before_ms,
        send_time_planned: env.send_time_planned,
    }
    .header();
    let prefix = match &env.campaign {
        Some(tag) => trace + &crate::message::relay_campaign_header(tag),
        None => trace,
    };
    let msg = OutboundMessage {
        sender: &env.sender,
        recipients: &pending,
        env_id: env.env_id.as_deref(),
        ret: env.ret,
        body_type: env.body_type,
        smtputf8: env.smtputf8,
        body: &body,
        prefix: prefix.as_bytes(),
    };
    let results = conn
        .send(&msg)
        .await
        .map_err(|e| format!("relay of {}: {}", env.id, e.reply_text()))?;
    let accepted: Vec<&str> = results
        .iter()
        .filter(|r| r.reply.is_positive())
        .map(|r| r.address.as_str())
        .collect();
    let all = accepted.len() == pending.len();
    if all {
        spool
            .remove(env.id)
            .await
            .map_err(|e| format!("spool: {e}"))?;
        counts.messages.fetch_add(1, Ordering::Relaxed);
    } else if !accepted.is_empty() {
        // The accepted ones are the peer's now: relayed, as a DSN would say.
        let mut narrowed = env.clone();
        for r in &mut narrowed.recipients {
            if accepted.contains(&r.address.as_str()) {
                r.state = RecipientState::Delivered;
                r.last_reply = Some("relayed by tern queue drain".to_owned());
            }
        }
        spool
            .update(&narrowed)
            .await
            .map_err(|e| format!("spool: {e}"))?;
    }
    counts
        .recipients
        .fetch_add(accepted.len() as u64, Ordering::Relaxed);
    counts
        .refused
        .fetch_add((pending.len() - accepted.len()) as u64, Ordering::Relaxed);
    Ok((conn, all))
}
