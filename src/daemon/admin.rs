//! The admin subsystem: the HTTP server for `/metrics`, the `/api/v1` API and the public
//! tracking endpoints.
//!
//! It has its own stop token, separate from the daemon's: scrapes and API calls answer while
//! the rest drains, and the server stops after the other subsystems, within the grace
//! period (its graceful shutdown waits for open HTTP connections).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Reloaded, Subsystem};
use crate::admin::auth::Token;
use crate::admin::AdminState;
use crate::config::{AdminConfig, Config, Limits};
use crate::live::Live;

pub struct Admin {
    address: SocketAddr,
    /// The limits HTTP injection applies (a reload replaces them).
    limits: Arc<Live<Limits>>,
    /// `[admin]` as the listener reads it (a reload replaces it).
    edge: Arc<Live<AdminConfig>>,
    stop: CancellationToken,
    server: tokio::task::JoinHandle<()>,
}

impl Admin {
    /// Binds `admin.address` (errors name the key) and reads or creates the API token.
    pub async fn bind(config: &Config) -> anyhow::Result<(TcpListener, Option<Token>)> {
        let token = config
            .admin
            .token_file
            .as_deref()
            .map(Token::load_or_create)
            .transpose()?;
        let socket = TcpListener::bind(config.admin.address)
            .await
            .with_context(|| format!("admin.address: cannot bind {}", config.admin.address))?;
        Ok((socket, token))
    }

    /// Serves `state` on `socket`; `state.limits` is what a reload replaces.
    pub fn start(socket: TcpListener, state: AdminState) -> anyhow::Result<Self> {
        let address = socket.local_addr()?;
        let limits = state.limits.clone();
        let edge = state.edge.clone();
        let stop = CancellationToken::new();
        let server = tokio::spawn(crate::admin::serve(socket, state, stop.clone()));
        Ok(Admin {
            address,
            limits,
            edge,
            stop,
            server,
        })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }
}

impl Subsystem for Admin {
    fn reconfigure(&self, reloaded: &Reloaded) {
        self.limits.set(reloaded.config.limits);
        self.edge.set(reloaded.config.admin.clone());
    }

    async fn shutdown(self, grace: Duration) {
        self.stop.cancel();
        let mut server = self.server;
        if tokio::time::timeout(grace, &mut server).await.is_err() {
            warn!("admin server still busy after the grace period, aborting it");
            server.abort();
        }
    }
}
