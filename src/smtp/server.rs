//! SMTP listeners: accept loop, connection limits, TLS handshakes, graceful shutdown.
//!
//! Connection limits are enforced at the door: over the total or per-IP limit a client
//! gets `421 4.7.0` and is disconnected before a session exists (that reply too is written
//! within `limits.command_timeout`). On shutdown the accept
//! loops stop, idle sessions are told `421 4.3.2`, and sessions inside a transaction may
//! finish it; the [`TaskTracker`] lets the daemon wait for them within its grace period.
//!
//! A config reload swaps the [`SessionConfig`] and the connection limits: a connection takes
//! one snapshot of the session config when it is accepted and keeps it to the end (across
//! STARTTLS too), so open sessions are never disturbed; new connections get the new one.

use super::session::{Session, SessionConfig, SessionEnd, SessionState};
use crate::config::ListenerMode;
use crate::live::Live;
use crate::rfc5321::reply::Reply;
use crate::tls::TlsInfo;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
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
    pub limits: Arc<ConnectionLimits>,
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
                accepted = listener.accept() => accepted,
                _ = self.shutdown.cancelled() => break,
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
        let Some(_slot) = self.limits.admit(peer.ip()) else {
            debug!(%peer, "connection limit reached");
            metrics.smtp_connection_rejected();
            let reply = Reply::new(
                421,
                "4.7.0",
                format!("{} Too many connections, try again later", config.hostname),
            );
            // The reply fits any socket buffer; the bound is for a peer whose window is closed.
            let bye = async {
                stream.write_all(&reply.to_wire()).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(config.limits.command_timeout, bye).await;
            return;
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

/// Counts open connections, in total and per client IP.
pub struct ConnectionLimits {
    /// `limits.max_connections`; a reload may change it (connections over a lowered limit
    /// stay open, new ones wait until the count is under it).
    max_total: AtomicUsize,
    /// `limits.max_connections_per_ip`, likewise.
    max_per_ip: AtomicUsize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

impl ConnectionLimits {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            open: Mutex::new((0, HashMap::new())),
        })
    }

    /// A slot for one connection, released when dropped; `None` if a limit is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<ConnectionSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let per_ip = open.1.get(&ip).copied().unwrap_or(0);
        if open.0 >= self.max_total.load(Ordering::Relaxed)
            || per_ip >= self.max_per_ip.load(Ordering::Relaxed)
        {
            return None;
        }
        open.0 += 1;
        open.1.insert(ip, per_ip + 1);
        Some(ConnectionSlot {
            limits: self.clone(),
            ip,
        })
    }

    /// Applies reloaded limits to connections admitted from now on.
    pub fn set(&self, max_total: usize, max_per_ip: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_ip.store(max_per_ip, Ordering::Relaxed);
    }

    pub fn open_connections(&self) -> usize {
        self.open.lock().unwrap_or_else(|e| e.into_inner()).0
    }
}

pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|e| e.into_inner());
        open.0 -= 1;
        if let Some(n) = open.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_and_release() {
        let limits = ConnectionLimits::new(3, 2);
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let s1 = limits.admit(a).unwrap();
        let _s2 = limits.admit(a).unwrap();
        assert!(limits.admit(a).is_none(), "per-IP limit");
        let _s3 = limits.admit(b).unwrap();
        assert!(limits.admit(b).is_none(), "total limit");
        drop(s1);
        let _s4 = limits.admit(a).expect("slot released by drop");
        assert_eq!(limits.open_connections(), 3);
    }
}
