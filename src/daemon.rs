//! Process lifecycle: open the spool (which recovers it), bind the listeners, serve, and on
//! SIGTERM/SIGINT drain: stop accepting, let sessions finish within the grace period, flush
//! the spool, return.
//!
//! [`Daemon::start`] is what tests use in-process (listeners may be bound to port 0; the
//! real addresses are in [`Daemon::smtp_addresses`]); [`serve`] adds signals and sd_notify.

use crate::auth::Credentials;
use crate::config::Config;
use crate::ingest::Ingest;
use crate::notify;
use crate::policy::Policy;
use crate::smtp::server::{ConnectionLimits, Server};
use crate::smtp::session::SessionConfig;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tern_queue::Spool;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A running tern: listeners bound and serving.
pub struct Daemon {
    spool: Spool,
    smtp_addresses: Vec<SocketAddr>,
    shutdown: CancellationToken,
    listeners: TaskTracker,
    sessions: TaskTracker,
    grace: Duration,
}

impl Daemon {
    /// Opens the spool, binds every listener and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        config.check_files().map_err(|e| anyhow::anyhow!("{e}"))?;
        let tls = config
            .tls_server_config()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map(tokio_rustls::TlsAcceptor::from);
        let spool_path = config.spool.path.clone();
        let spool = tokio::task::spawn_blocking(move || Spool::open(&spool_path))
            .await?
            .with_context(|| format!("spool.path: cannot open {}", config.spool.path.display()))?;
        let stats = spool.stats();
        info!(messages = stats.messages, bytes = stats.bytes, path = %config.spool.path.display(), "spool open");

        let credentials = (!config.auth.users.is_empty())
            .then(|| Arc::new(Credentials::from_config(&config.auth)));
        let session_config = Arc::new(SessionConfig {
            hostname: config.server.hostname.clone(),
            limits: config.limits,
            policy: Policy::from_config(&config),
            credentials,
            starttls: tls.is_some(),
            ingest: Ingest::new(
                spool.clone(),
                config.server.hostname.clone(),
                config.spool.max_age,
            ),
        });
        let shutdown = CancellationToken::new();
        let sessions = TaskTracker::new();
        let server = Arc::new(Server {
            config: session_config,
            tls,
            limits: ConnectionLimits::new(
                config.limits.max_connections,
                config.limits.max_connections_per_ip,
            ),
            shutdown: shutdown.clone(),
            sessions: sessions.clone(),
        });

        // Bind everything before serving anything, so a bad address fails the start cleanly.
        let mut bound = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            let socket = TcpListener::bind(listener.address).await.with_context(|| {
                format!("listeners[{i}].address: cannot bind {}", listener.address)
            })?;
            bound.push((socket, listener.mode));
        }
        let listeners = TaskTracker::new();
        let mut smtp_addresses = Vec::new();
        for (socket, mode) in bound {
            smtp_addresses.push(socket.local_addr()?);
            listeners.spawn(server.clone().serve(socket, mode));
        }
        listeners.close();
        Ok(Daemon {
            spool,
            smtp_addresses,
            shutdown,
            listeners,
            sessions,
            grace: config.server.shutdown_grace,
        })
    }

    pub fn smtp_addresses(&self) -> &[SocketAddr] {
        &self.smtp_addresses
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Stops accepting, waits up to the grace period for sessions, flushes the spool.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.listeners.wait().await;
        self.sessions.close();
        if tokio::time::timeout(self.grace, self.sessions.wait())
            .await
            .is_err()
        {
            // Sessions still open have not been told 250 for any unfinished message, so
            // dropping them loses nothing that was accepted.
            warn!(
                remaining = self.sessions.len(),
                "grace period over, closing remaining sessions"
            );
        }
        self.spool.flush().await.context("final spool flush")?;
        info!("stopped");
        Ok(())
    }
}

/// Runs the daemon until SIGTERM or SIGINT, with systemd notifications.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let daemon = Daemon::start(config).await?;
    if let Err(err) = notify::notify("READY=1") {
        warn!(error = %err, "sd_notify READY failed");
    }
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: draining"),
        _ = int.recv() => info!("SIGINT: draining"),
    }
    let _ = notify::notify("STOPPING=1");
    daemon.shutdown().await
}
