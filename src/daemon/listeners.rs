//! The SMTP subsystem: the bound listeners, the shared session config and the sessions.
//!
//! Every socket is bound before any is served ([`Listeners::bind`]), so a bad address fails
//! the start cleanly. Shutdown stops the accept loops, then waits up to the grace period for
//! sessions; sessions still open then have not been told 250 for an unfinished message, so
//! dropping them loses nothing that was accepted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{session_config, Background, Reloaded, Subsystem};
use crate::config::{Config, ListenerMode};
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::live::Live;
use crate::smtp::server::Server;
use crate::smtp::session::Shared;
use crate::telemetry::Metrics;

/// Sockets bound and not yet served.
pub struct Bound(Vec<(TcpListener, ListenerMode)>);

impl Bound {
    /// The bound addresses (port 0 resolved): delivery never connects to them.
    pub fn addresses(&self) -> std::io::Result<Vec<SocketAddr>> {
        self.0
            .iter()
            .map(|(socket, _)| socket.local_addr())
            .collect()
    }
}

pub struct Listeners {
    server: Arc<Server>,
    intake: Intake,
    feedback: Feedback,
    metrics: Arc<Metrics>,
    /// Per-client accounting, the inflight budget and the password checks: kept across
    /// reloads, which rebuild the session config around them.
    shared: Shared,
    addresses: Vec<SocketAddr>,
    accepting: TaskTracker,
    sessions: TaskTracker,
}

impl Listeners {
    /// Binds every `listeners[i].address`; errors name the key.
    pub async fn bind(config: &Config) -> anyhow::Result<Bound> {
        let mut bound = Vec::new();
        for (i, listener) in config.listeners.iter().enumerate() {
            let socket = TcpListener::bind(listener.address).await.with_context(|| {
                format!("listeners[{i}].address: cannot bind {}", listener.address)
            })?;
            bound.push((socket, listener.mode));
        }
        Ok(Bound(bound))
    }

    pub fn start(
        config: &Config,
        bound: Bound,
        intake: Intake,
        feedback: Feedback,
        metrics: Arc<Metrics>,
        bg: &Background,
    ) -> anyhow::Result<Self> {
        let tls = config
            .tls_server_config()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .map(tokio_rustls::TlsAcceptor::from);
        let sessions = TaskTracker::new();
        // One argon2 check per core at a time (each holds 19 MiB with the default cost).
        let verifications = std::thread::available_parallelism().map_or(1, |n| n.get());
        let shared = Shared::new(metrics.clone(), verifications);
        let server = Arc::new(Server {
            config: Live::new(session_config(
                config,
                tls.is_some(),
                &intake,
                &feedback,
                &metrics,
                &shared,
            )),
            tls,
            shutdown: bg.stop.clone(),
            sessions: sessions.clone(),
        });
        let accepting = TaskTracker::new();
        let mut addresses = Vec::new();
        for (socket, mode) in bound.0 {
            addresses.push(socket.local_addr()?);
            accepting.spawn(server.clone().serve(socket, mode));
        }
        accepting.close();
        Ok(Listeners {
            server,
            intake,
            feedback,
            metrics,
            shared,
            addresses,
            accepting,
            sessions,
        })
    }

    pub fn addresses(&self) -> &[SocketAddr] {
        &self.addresses
    }

    /// The accept loops, one per listener while it accepts (for `/readyz`).
    pub fn accepting(&self) -> TaskTracker {
        self.accepting.clone()
    }
}

impl Subsystem for Listeners {
    fn reconfigure(&self, reloaded: &Reloaded) {
        let config = &reloaded.config;
        self.server.config.set(session_config(
            config,
            self.server.tls.is_some(),
            &self.intake,
            &self.feedback,
            &self.metrics,
            &self.shared,
        ));
    }

    async fn shutdown(self, grace: Duration) {
        self.accepting.wait().await;
        self.sessions.close();
        if tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.sessions.len(),
                "grace period over, closing remaining sessions"
            );
        }
    }
}
