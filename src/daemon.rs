//! Process lifecycle: open the spool (which recovers it), start delivery (scheduler, router,
//! connection pool, delivery log), bind the listeners, serve, and on SIGTERM/SIGINT drain:
//! stop accepting, let sessions and delivery attempts finish within the grace period, flush
//! the spool, return.
//!
//! [`Daemon::start`] is what tests use in-process (listeners may be bound to port 0; the
//! real addresses are in [`Daemon::smtp_addresses`], the admin server's in
//! [`Daemon::admin_address`]); [`serve`] adds signals and sd_notify.

use crate::admin::auth::Token;
use crate::admin::metrics::Metrics;
use crate::admin::AdminState;
use crate::auth::Credentials;
use crate::config::Config;
use crate::delivery::client::{load_roots, ClientSettings, SYSTEM_ROOTS};
use crate::delivery::dkim::DkimSigners;
use crate::delivery::dns::HickoryResolver;
use crate::delivery::log::DeliveryLog;
use crate::delivery::pool::Pool;
use crate::delivery::route::Router;
use crate::delivery::worker::Worker;
use crate::ingest::Ingest;
use crate::notify;
use crate::outcome::Settler;
use crate::policy::Policy;
use crate::scheduler::Scheduler;
use crate::shaping::Shaper;
use crate::smtp::server::{ConnectionLimits, Server};
use crate::smtp::session::SessionConfig;
use anyhow::Context;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tern_queue::{Spool, SpoolOptions};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// A running tern: listeners bound and serving.
pub struct Daemon {
    spool: Spool,
    scheduler: Scheduler,
    shaper: Arc<Shaper>,
    pool: Arc<Pool>,
    delivery_log: DeliveryLog,
    smtp_addresses: Vec<SocketAddr>,
    admin_address: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    listeners: TaskTracker,
    admin: tokio::task::JoinHandle<()>,
    /// Stops the admin server; separate from `shutdown` so scrapes answer while draining.
    stop_admin: CancellationToken,
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
        let spool_options = SpoolOptions {
            cache_size: config.spool.cache_size,
        };
        let spool =
            tokio::task::spawn_blocking(move || Spool::open_with(&spool_path, &spool_options))
                .await?
                .with_context(|| {
                    format!("spool.path: cannot open {}", config.spool.path.display())
                })?;
        let stats = spool.stats();
        info!(messages = stats.messages, bytes = stats.bytes, path = %config.spool.path.display(), "spool open");

        let shutdown = CancellationToken::new();
        // Reads every body once, so it runs in the background (on blocking threads, in chunks)
        // instead of delaying the start; it is safe alongside commits and deliveries, and stops
        // at shutdown (the next start sweeps again).
        let (sweeping, stop_sweep) = (spool.clone(), shutdown.clone());
        tokio::spawn(async move {
            tokio::select! {
                result = sweeping.sweep_orphans() => if let Err(err) = result {
                    warn!(error = %err, "spool orphan sweep failed");
                },
                _ = stop_sweep.cancelled() => {}
            }
        });
        let metrics = Arc::new(Metrics::new().with_routes(&config.routes));
        let dkim = Arc::new(DkimSigners::load(&config.dkim).map_err(|e| anyhow::anyhow!("{e}"))?);
        let resolver = HickoryResolver::new(&config.delivery.nameservers)
            .context("delivery.nameservers: cannot set up the DNS resolver")?;
        let router = Arc::new(Router::new(
            &config.routes,
            config.delivery.tls,
            Arc::new(resolver),
        ));
        let pool = Pool::new(
            config.delivery.idle_timeout,
            config.delivery.max_messages_per_connection,
        );
        pool.spawn_reaper(shutdown.clone());
        let mut passwords = std::collections::HashMap::new();
        for (i, route) in config.routes.iter().enumerate() {
            if let Some(auth) = &route.auth {
                let password = std::fs::read_to_string(&auth.password_file).with_context(|| {
                    format!(
                        "routes[{i}].auth.password_file: cannot read {}",
                        auth.password_file.display()
                    )
                })?;
                passwords.insert(
                    auth.password_file.clone(),
                    password.trim_end_matches(['\r', '\n']).to_string(),
                );
            }
        }
        // Verified TLS (routes with tls = "required") trusts the system's CA bundle.
        let roots = load_roots(Path::new(SYSTEM_ROOTS)).unwrap_or_else(|err| {
            warn!(path = SYSTEM_ROOTS, error = %err, "no CA bundle: required TLS will fail");
            rustls::RootCertStore::empty()
        });
        let settings = ClientSettings::new(
            config.server.hostname.clone(),
            config.delivery.timeouts,
            roots,
        );
        let worker = Arc::new(Worker::new(
            router.clone(),
            pool.clone(),
            settings,
            &config.delivery,
            passwords,
        ));
        if let Some(dir) = config.delivery.log_path.as_deref().and_then(Path::parent) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("delivery.log_path: cannot create {}", dir.display()))?;
        }
        let delivery_log =
            DeliveryLog::open(config.delivery.log_path.as_deref()).with_context(|| {
                format!(
                    "delivery.log_path: cannot open {:?}",
                    config.delivery.log_path
                )
            })?;
        let shaper = Shaper::new(
            &config,
            spool.clone(),
            Arc::new(crate::shaping::limiter::Local),
            metrics.clone(),
        );
        let (new_mail, new_mail_rx) = tokio::sync::mpsc::unbounded_channel();
        let ingest = Ingest::new(
            spool.clone(),
            config.server.hostname.clone(),
            config.spool.max_age,
        )
        .with_dkim(dkim)
        .with_pools(shaper.pools().clone())
        .with_scheduler(new_mail);
        let settler = Arc::new(Settler::new(
            spool.clone(),
            ingest.clone(),
            delivery_log.clone(),
            config.delivery.clone(),
            config.server.hostname.clone(),
            metrics.clone(),
        ));
        let scheduler = Scheduler::start(
            spool.clone(),
            router,
            worker,
            settler,
            shaper.clone(),
            config.delivery.clone(),
            metrics.clone(),
            new_mail_rx,
        );

        let credentials = (!config.auth.users.is_empty())
            .then(|| Arc::new(Credentials::from_config(&config.auth)));
        let session_config = Arc::new(SessionConfig {
            hostname: config.server.hostname.clone(),
            limits: config.limits,
            policy: Policy::from_config(&config),
            credentials,
            starttls: tls.is_some(),
            ingest: ingest.clone(),
            metrics: metrics.clone(),
        });
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
        let token = config
            .admin
            .token_file
            .as_deref()
            .map(Token::load_or_create)
            .transpose()?;
        let admin_socket = TcpListener::bind(config.admin.address)
            .await
            .with_context(|| format!("admin.address: cannot bind {}", config.admin.address))?;
        let admin_address = admin_socket.local_addr()?;
        let listeners = TaskTracker::new();
        let mut smtp_addresses = Vec::new();
        for (socket, mode) in bound {
            smtp_addresses.push(socket.local_addr()?);
            listeners.spawn(server.clone().serve(socket, mode));
        }
        listeners.close();
        let stop_admin = CancellationToken::new();
        let admin = tokio::spawn(crate::admin::serve(
            admin_socket,
            AdminState {
                metrics: metrics.clone(),
                spool: spool.clone(),
                scheduler: scheduler.clone(),
                ingest,
                shaper: shaper.clone(),
                token,
            },
            stop_admin.clone(),
        ));
        Ok(Daemon {
            spool,
            scheduler,
            shaper,
            pool,
            delivery_log,
            smtp_addresses,
            admin_address,
            metrics,
            shutdown,
            listeners,
            admin,
            stop_admin,
            sessions,
            grace: config.server.shutdown_grace,
        })
    }

    pub fn smtp_addresses(&self) -> &[SocketAddr] {
        &self.smtp_addresses
    }

    /// Where the admin HTTP server (`GET /metrics`) listens.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin_address
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
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
        // Attempts in flight finish (their own timeouts bound them) or are abandoned: an
        // abandoned attempt leaves its message pending in the spool, to be retried.
        self.scheduler.shutdown(self.grace).await;
        self.pool.close_all().await;
        // Exact warm-up counts, so a restart neither loses nor gives back reservations.
        self.shaper.flush().await;
        self.delivery_log.flush().await;
        self.spool.flush().await.context("final spool flush")?;
        // Scrapes answer while draining; the admin server stops last, within the grace period
        // (its graceful shutdown waits for open HTTP connections).
        self.stop_admin.cancel();
        let mut admin = self.admin;
        if tokio::time::timeout(self.grace, &mut admin).await.is_err() {
            warn!("admin server still busy after the grace period, aborting it");
            admin.abort();
        }
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
