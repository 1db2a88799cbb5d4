//! SMTP listeners: accept loop, connection limits, TLS handshakes, graceful shutdown.
//!
//! Connection limits are enforced at the door ([`super::anvil::Anvil::admit`]): over the
//! total or per-client limit, or over the connection rate of a client outside the relay
//! networks, a client gets `421 4.7.0` and is disconnected before a session exists (that
//! reply too is written within `limits.command_timeout`). On shutdown the accept
//! loops stop, idle sessions are told `421 4.3.2`, and sessions inside a transaction may
//! finish it; the [`TaskTracker`] lets the daemon wait for them within its grace period.
//!
//! A config reload swaps the [`SessionConfig`] and the connection limits: a connection takes
//! one snapshot of the session config when it is accepted and keeps it to the end (across
//! STARTTLS too), so open sessions are never disturbed; new connections get the new one.

use super::anvil::Refused;
use super::session::{Session, SessionConfig, SessionEnd, SessionState};
use crate::config::ListenerMode;
use crate::live::Live;
use crate::rfc5321::reply::Reply;
use crate::telemetry::Rejection;
use crate::tls::TlsInfo;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the accept loops share.
pub struct Server {
    pub config: Live<SessionConfig>,
    pub tls: Option<TlsAcceptor>,
    pub shutdown: CancellationToken,
    pub sessions: TaskTracker,
}

impl Server {
    /// Runs one listener until shutdown.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mode: ListenerMode) {
        let local = listener.local_addr().ok();
        info!(address = ?local, ?mode, "listening");
        loop {
            let accepted = tokio::select! {
                // Shutdown first: once it is signalled, a connection waiting in the backlog is
                // never taken (an unbiased select picks either when both are ready).
                biased;
                _ = self.shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let server = self.clone();
            self.sessions.spawn(async move {
                server.connection(stream, peer, mode).await;
            });
        }
        info!(address = ?local, "listener stopped");
    }

    async fn connection(&self, mut stream: TcpStream, peer: SocketAddr, mode: ListenerMode) {
        let config = self.config.get();
        let metrics = config.metrics.clone();
        metrics.smtp_connection();
        let exempt = config.policy.in_relay_network(peer.ip());
        let anvil = &config.shared.anvil;
        let _slot = match anvil.admit(peer.ip(), &config.limits, exempt, Instant::now()) {
            Ok(slot) => slot,
            Err(refused) => {
                debug!(%peer, ?refused, "connection refused at the door");
                metrics.smtp_connection_rejected();
                let text = if refused == Refused::Rate {
                    metrics.message_rejected(Rejection::ConnectionRate);
                    "Too many connections from your address, slow down"
                } else {
                    "Too many connections, try again later"
                };
                let reply = Reply::new(421, "4.7.0", format!("{} {text}", config.hostname));
                // The reply fits any socket buffer; the bound is for a peer whose window is closed.
                let bye = async {
                    stream.write_all(&reply.to_wire()).await?;
                    stream.shutdown().await
                };
                let _ = tokio::time::timeout(config.limits.command_timeout, bye).await;
                return;
            }
        };
        let _session = metrics.smtp_session();
        let result = match mode {
            ListenerMode::Smtp => self.plain_session(stream, peer, config).await,
            ListenerMode::ImplicitTls => match self.handshake(stream).await {
                Ok((tls_stream, info)) => {
                    let mut session =
                        Session::new(tls_stream, config, self.shutdown.clone(), peer, Some(info));
                    match session.greet().await {
                        Ok(()) => session.run().await.map(drop),
                        Err(e) => Err(e),
                    }
                }
                Err(err) => Err(err),
            },
        };
        if let Err(err) = result {
            debug!(%peer, error = %err, "session ended with an I/O error");
        }
    }

    async fn plain_session(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        config: Arc<SessionConfig>,
    ) -> io::Result<()> {
        let mut session = Session::new(stream, config.clone(), self.shutdown.clone(), peer, None);
        session.greet().await?;
        if session.run().await? != SessionEnd::StartTls {
            return Ok(());
        }
        let (stream, state) = session.into_upgrade();
        let (tls_stream, info) = self.handshake(stream).await?;
        self.resume_tls(tls_stream, state, info, config).await
    }

    async fn resume_tls<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
        mut state: SessionState,
        info: TlsInfo,
        config: Arc<SessionConfig>,
    ) -> io::Result<()> {
        state.set_tls(info);
        let mut session = Session::resume(stream, config, self.shutdown.clone(), state);
        // STARTTLS is not offered on a TLS session, so this cannot ask to upgrade again.
        session.run().await.map(drop)
    }

    async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: S,
    ) -> io::Result<(tokio_rustls::server::TlsStream<S>, TlsInfo)> {
        let acceptor = self
            .tls
            .clone()
            .ok_or_else(|| io::Error::other("TLS requested but not configured"))?;
        let tls = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let info = TlsInfo::of(tls.get_ref().1);
        Ok((tls, info))
    }
}
