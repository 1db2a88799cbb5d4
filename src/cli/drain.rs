//! `tern queue drain --to HOST:PORT [--destination D]`: hands the queue of a stopped node to
//! another tern node over SMTP, so the node can be decommissioned without losing or bouncing
//! mail.
//!
//! Each queued message (its pending recipients) goes in one transaction with its envelope as
//! it was: the sender, every recipient's NOTIFY and ORCPT, RET and ENVID (the peer must offer
//! DSN, as tern does; without it the drain stops), BODY=8BITMIME and SMTPUTF8; plus the
//! [`RELAY_HEADER`] trace (created, expiry, attempts, next due time), which the receiving tern
//! honours from a trusted client (its relay networks or AUTH) and takes out. A message is
//! removed here only after the peer accepted every one of its pending recipients (250 after
//! the data, which tern gives only once the mail is durable); a recipient the peer refused
//! stays here (its message is updated to the recipients still pending). A connection failure
//! stops the drain with everything not yet accepted still queued: running it again resumes.
//! Held messages are left alone (release them first).
//!
//! Invariant: no message is removed before the peer's 250 for all its pending recipients, so
//! a crash or a failure at any point loses nothing; a crash between the peer's 250 and the
//! removal here sends that message twice (once more on the next run), never zero times.

use super::check_config::load;
use super::{EX_DATAERR, EX_TEMPFAIL};
use crate::config::{Config, TlsPolicy};
use crate::delivery::client::{self, BrokenTls, ClientSettings, OutboundMessage, Target};
use crate::message::RelayTrace;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tern_queue::{Envelope, RecipientState, Spool, SpoolError};

/// What a drain did.
#[derive(Debug, Default)]
pub struct Drained {
    pub messages: u64,
    pub recipients: u64,
    /// Recipients the peer refused (still queued here).
    pub refused: u64,
    pub held: u64,
}

/// The command: opens the spool of the stopped daemon `config` names and drains it.
pub fn run(
    config: Option<&Path>,
    to: &str,
    destination: Option<&str>,
    connections: usize,
) -> ExitCode {
    let config = match load(config) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let Ok(peer) = to.parse::<SocketAddr>() else {
        eprintln!("tern: --to: {to:?} is not HOST:PORT with an IP address");
        return ExitCode::from(EX_DATAERR);
    };
    let spool = match Spool::open(&config.spool.path) {
        Ok(spool) => spool,
        Err(err @ SpoolError::InUse { .. }) => {
            eprintln!("tern: {err}");
            eprintln!("tern: stop the daemon first; the drain reads the spool directly");
            return ExitCode::from(EX_TEMPFAIL);
        }
        Err(err) => {
            eprintln!("tern: {err}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tern: {e}");
            return ExitCode::FAILURE;
        }
    };
    let started = Instant::now();
    let result = runtime.block_on(drain(
        &config,
        spool.clone(),
        peer,
        destination.map(str::to_ascii_lowercase),
        connections.max(1),
    ));
    if let Err(e) = runtime.block_on(spool.flush()) {
        eprintln!("tern: spool flush: {e}");
    }
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(d) => {
            println!(
                "drained {} messages ({} recipients) to {peer} in {secs:.1}s ({:.0} messages/s); {} recipients refused and kept, {} held messages left",
                d.messages,
                d.recipients,
                d.messages as f64 / secs.max(1e-9),
                d.refused,
                d.held,
            );
            if d.refused > 0 {
                ExitCode::from(EX_TEMPFAIL)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err((d, e)) => {
            eprintln!(
                "tern: drain stopped after {} messages: {e}; the rest is still queued, run it again",
                d.messages
            );
            ExitCode::from(EX_TEMPFAIL)
        }
    }
}

/// Drains `spool` to `peer` over `connections` SMTP connections.
pub async fn drain(
    config: &Config,
    spool: Spool,
    peer: SocketAddr,
    destination: Option<String>,
    connections: usize,
) -> Result<Drained, (Drained, String)> {
    let settings = Arc::new(ClientSettings::new(
        config.server.hostname.clone(),
        config.delivery.timeouts,
        rustls::RootCertStore::empty(),
    ));
    let metrics = Arc::new(crate::telemetry::Metrics::new());
    let broken = Arc::new(BrokenTls::new(Duration::from_secs(3600), metrics));
    let (tx, rx) = tokio::sync::mpsc::channel::<Envelope>(connections * 4);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let counts = Arc::new(Counts::default());
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..connections {
        let (settings, broken, rx, spool, counts) = (
            settings.clone(),
            broken.clone(),
            rx.clone(),
            spool.clone(),
            counts.clone(),
        );
        workers.spawn(async move {
            let target = Target {
                host: "peer",
                addr: peer,
                source: None,
                tls: TlsPolicy::Opportunistic,
                auth: None,
            };
            let mut conn: Option<client::Connection> = None;
            loop {
                let Some(env) = rx.lock().await.recv().await else {
                    break;
                };
                // One reconnect per message: a connection the peer closed is not a failure.
                let mut tries = 0;
                loop {
                    tries += 1;
                    let c = match conn.take() {
                        Some(c) if c.is_reusable() => c,
                        _ => client::connect(&target, &settings, &broken)
                            .await
                            .map_err(|e| format!("connect to {peer}: {}", e.reply_text()))?,
                    };
                    match relay(c, &env, &spool, &counts).await {
                        Ok(c) => {
                            conn = Some(c);
                            break;
                        }
                        Err(e) if tries < 2 => {
                            tracing::debug!(error = %e, "drain: retrying on a new connection");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            if let Some(c) = conn {
                c.quit().await;
            }
            Ok::<(), String>(())
        });
    }
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
/// answer. `Err`: the connection failed and nothing about this message changed.
async fn relay(
    mut conn: client::Connection,
    env: &Envelope,
    spool: &Spool,
    counts: &Counts,
) -> Result<client::Connection, String> {
    if !conn.capabilities().dsn {
        return Err(
            "the peer does not offer DSN: RET, ENVID, NOTIFY and ORCPT would be lost".into(),
        );
    }
    let Some(body) = spool.body_of(env).map_err(|e| format!("spool: {e}"))? else {
        return Ok(conn); // a damaged spool; the orphan sweep reports it
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
        due_ms: env.next_due_ms.min(env.expires_ms),
        not_before_ms: env.not_before_ms,
    }
    .header();
    let msg = OutboundMessage {
        sender: &env.sender,
        recipients: &pending,
        env_id: env.env_id.as_deref(),
        ret: env.ret,
        body_type: env.body_type,
        smtputf8: env.smtputf8,
        body: &body,
        prefix: trace.as_bytes(),
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
    if accepted.len() == pending.len() {
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
    Ok(conn)
}
