//! Process lifecycle: open the spool (which recovers it), start delivery (scheduler, router,
//! connection pool, delivery log), bind the listeners, serve, and on SIGTERM/SIGINT drain:
//! stop accepting, let sessions and delivery attempts finish within the grace period, flush
//! the spool, return.
//!
//! [`Daemon::start`] is what tests use in-process (listeners may be bound to port 0; the
//! real addresses are in [`Daemon::smtp_addresses`], the admin server's in
//! [`Daemon::admin_address`]); [`serve`] adds signals, sd_notify and the systemd watchdog.
//!
//! [`Daemon::reload`] applies a new config to the running daemon (SIGHUP in [`serve`]): it
//! validates everything that can fail first, then hands each part its new values (see
//! [`crate::reload`] for which keys are live); a reload that fails changes nothing.

use crate::admin::auth::Token;
use crate::admin::AdminState;
use crate::auth::Credentials;
use crate::config::{Config, ConfigErrors, Limits, RouteConfig};
use crate::delivery::client::ClientSettings;
use crate::delivery::pool::ConnectionPool;
use crate::delivery::worker::{VerpPolicy, Worker};
use crate::dkim::DkimSigners;
use crate::enqueue::Enqueue;
use crate::events::Events;
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::live::Live;
use crate::maillog::DeliveryLog;
use crate::message::Stage;
use crate::notify;
use crate::outcome::Settler;
use crate::policy::Policy;
use crate::reload::{self, ReloadReport};
use crate::routing::dns::HickoryResolver;
use crate::routing::route::Router;
use crate::scheduler::Scheduler;
use crate::sendtime::SendTime;
use crate::shaping::limiter::Backend;
use crate::shaping::shared::SharedStore;
use crate::shaping::Shaper;
use crate::sidecar::Sidecar;
use crate::smtp::server::{ConnectionLimits, Server};
use crate::smtp::session::SessionConfig;
use crate::suppression::Suppressions;
use crate::telemetry::Metrics;
use crate::telemetry::ReloadResult;
use crate::tls::{load_roots, SYSTEM_ROOTS};
use crate::verp::Verp;
use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tern_queue::{Spool, SpoolOptions};
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// Applies a reloaded `log.level` to the process's log filter (the subscriber is the
/// binary's, not the daemon's); returns why it could not.
pub type LogLevelReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// A running tern: listeners bound and serving.
pub struct Daemon {
    /// The config in effect: the last one loaded, with restart keys from the first.
    config: Mutex<Config>,
    spool: Spool,
    scheduler: Scheduler,
    router: Arc<Router>,
    worker: Arc<Worker>,
    settler: Arc<Settler>,
    enqueue: Enqueue,
    intake: Intake,
    feedback: Feedback,
    sidecar: Arc<Sidecar>,
    send_time: SendTime,
    server: Arc<Server>,
    /// The limits HTTP injection applies (the admin server's copy).
    admin_limits: Arc<Live<Limits>>,
    log_level: Option<LogLevelReloader>,
    shaper: Arc<Shaper>,
    pool: Arc<ConnectionPool>,
    delivery_log: DeliveryLog,
    smtp_addresses: Vec<SocketAddr>,
    admin_address: SocketAddr,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    /// The bounce processor and the webhook senders; they stop with `shutdown`.
    feedback_tasks: TaskTracker,
    /// The VERP key, read at start (`bounce.verp_key_file` is a restart key).
    verp: Option<Verp>,
    listeners: TaskTracker,
    admin: tokio::task::JoinHandle<()>,
    /// Stops the admin server; separate from `shutdown` so scrapes answer while draining.
    stop_admin: CancellationToken,
    /// Ends the sidecar's bandit batches (a last batch is stored before the spool's flush).
    stop_sidecar: CancellationToken,
    sidecar_batches: tokio::task::JoinHandle<()>,
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
        info!(messages = stats.messages, bytes = stats.bytes, path = %config.spool.path.display(),
            after_clean_close = spool.opened_after_clean_close(), "spool open");

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
        let metrics =
            Arc::new(Metrics::new().with_routes(config.routes.iter().map(|r| r.domain.as_str())));
        metrics.observe_spool(&spool);
        let dkim = DkimSigners::load(&config.dkim)
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .with_metrics(metrics.clone());
        let classifier = Arc::new(
            crate::bounce::classify::Classifier::load(&config)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let resolver = HickoryResolver::new(&config.delivery.nameservers)
            .context("delivery.nameservers: cannot set up the DNS resolver")?;
        let router = Arc::new(Router::new(
            &config.routes,
            config.delivery.tls,
            Arc::new(resolver),
        ));
        let pool = ConnectionPool::new(
            config.delivery.idle_timeout,
            config.delivery.max_messages_per_connection,
        );
        pool.spawn_reaper(shutdown.clone());
        let passwords = read_passwords(&config.routes).map_err(|e| anyhow::anyhow!("{e}"))?;
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
            classifier.clone(),
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
        let backend = match &config.shaping.shared {
            Some(shared) => Backend::Shared(SharedStore::connect(shared, metrics.clone()).await),
            None => Backend::Local,
        };
        let shaper = Shaper::new(&config, spool.clone(), backend, metrics.clone());
        let (new_mail, new_mail_rx) = tokio::sync::mpsc::unbounded_channel();
        let events = Events::new(
            spool.clone(),
            config.webhooks.len(),
            delivery_log.clone(),
            metrics.clone(),
        );
        let suppressions =
            Suppressions::new(spool.clone(), config.suppression.clone(), metrics.clone());
        let (counting, counted) = (events.clone(), suppressions.clone());
        tokio::task::spawn_blocking(move || {
            if let Err(err) = counting.count_backlogs() {
                warn!(error = %err, "cannot count the webhook outboxes for metrics");
            }
            if let Err(err) = counted.count_entries() {
                warn!(error = %err, "cannot count the suppression list for metrics");
            }
        });
        let send_time = SendTime::new(spool.clone(), config.sendtime.clone(), suppressions.clone());
        tokio::spawn(send_time.clone().refit_loop(shutdown.clone()));
        let mut sidecar = Sidecar::new(
            &config.sidecar,
            &config.server.hostname,
            spool.clone(),
            metrics.clone(),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
        sidecar.set_sink(Arc::new(send_time.clone()));
        let sidecar = Arc::new(sidecar);
        let stop_sidecar = CancellationToken::new();
        let sidecar_batches = tokio::spawn(sidecar.clone().run_batches(stop_sidecar.clone()));
        let feedback = Feedback::new(
            suppressions,
            events.clone(),
            config.bounce.domains.clone(),
            metrics.clone(),
        );
        let enqueue = Enqueue::new(
            spool.clone(),
            config.server.hostname.clone(),
            config.spool.max_age,
            dkim,
            shaper.pools().clone(),
            feedback.clone(),
            new_mail,
            Arc::new(send_time.clone()),
        );
        let stages: Vec<Arc<dyn Stage>> = vec![sidecar.clone(), Arc::new(send_time.clone())];
        let intake = Intake::new(stages, enqueue.clone());
        let verp = read_verp_key(&config)?;
        worker.set_verp(verp.clone().map(|v| VerpPolicy::from_config(v, &config)));
        let feedback_tasks = TaskTracker::new();
        for (i, hook) in config.webhooks.iter().enumerate() {
            let secret = std::fs::read(&hook.secret_file).with_context(|| {
                format!(
                    "webhooks[{i}].secret_file: cannot read {}",
                    hook.secret_file.display()
                )
            })?;
            let secret = secret.trim_ascii().to_vec();
            let tls = crate::events::webhook::connector(hook)
                .map_err(|e| anyhow::anyhow!("webhooks[{i}].ca_file: {e}"))?;
            feedback_tasks.spawn(crate::events::webhook::run(
                events.clone(),
                i,
                hook.clone(),
                tls,
                secret,
                shutdown.clone(),
            ));
        }
        feedback_tasks.spawn(
            crate::feedback::Processor {
                spool: spool.clone(),
                feedback: feedback.clone(),
                classifier: classifier.clone(),
                verp: verp.clone(),
            }
            .run(shutdown.clone()),
        );
        feedback_tasks.close();
        let settler = Arc::new(Settler::new(
            spool.clone(),
            enqueue.clone(),
            feedback.clone(),
            delivery_log.clone(),
            config.delivery.clone(),
            config.server.hostname.clone(),
            metrics.clone(),
            classifier,
        ));
        let scheduler = Scheduler::start(
            spool.clone(),
            router.clone(),
            worker.clone(),
            settler.clone(),
            shaper.clone(),
            config.delivery.clone(),
            metrics.clone(),
            new_mail_rx,
        )
        .context("spool.path: cannot read the stored suspensions")?;

        let session_config = session_config(&config, tls.is_some(), &intake, &feedback, &metrics);
        let sessions = TaskTracker::new();
        let server = Arc::new(Server {
            config: crate::live::Live::new(session_config),
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
        let admin_limits = Arc::new(Live::new(config.limits));
        let admin = tokio::spawn(crate::admin::serve(
            admin_socket,
            AdminState {
                metrics: metrics.clone(),
                spool: spool.clone(),
                scheduler: scheduler.clone(),
                intake: intake.clone(),
                feedback: feedback.clone(),
                hostname: config.server.hostname.clone(),
                sidecar: sidecar.clone(),
                send_time: send_time.clone(),
                limits: admin_limits.clone(),
                shaper: shaper.clone(),
                token,
            },
            stop_admin.clone(),
        ));
        let grace = config.server.shutdown_grace;
        Ok(Daemon {
            config: Mutex::new(config),
            spool,
            scheduler,
            router,
            worker,
            settler,
            enqueue,
            intake,
            feedback,
            sidecar,
            send_time,
            server,
            admin_limits,
            log_level: None,
            shaper,
            pool,
            delivery_log,
            smtp_addresses,
            admin_address,
            metrics,
            shutdown,
            feedback_tasks,
            verp,
            listeners,
            admin,
            stop_admin,
            stop_sidecar,
            sidecar_batches,
            sessions,
            grace,
        })
    }

    /// Makes [`Daemon::reload`] apply `log.level` through `reloader`.
    pub fn with_log_level_reloader(mut self, reloader: LogLevelReloader) -> Daemon {
        self.log_level = Some(reloader);
        self
    }

    /// Applies `new` to the running daemon. Everything that can fail (DKIM keys, smarthost
    /// password files) is checked first; on failure nothing changes, and the error names each
    /// key at fault. Restart keys that changed are kept at their running value and listed in
    /// the report (and logged). Counted in `tern_config_reloads_total`.
    pub fn reload(&self, new: Config) -> Result<ReloadReport, ConfigErrors> {
        let result = self.apply(new);
        match &result {
            Ok(report) => {
                self.metrics.config_reload(ReloadResult::Ok);
                for key in &report.restart_needed {
                    warn!(key, "config reload: {key} changed but needs a restart; the running value is kept");
                }
                info!(
                    restart_needed = report.restart_needed.len(),
                    "config reloaded"
                );
            }
            Err(errors) => {
                self.metrics.config_reload(ReloadResult::Failed);
                for e in &errors.0 {
                    error!("config reload refused, running config kept: {e}");
                }
            }
        }
        result
    }

    /// [`Daemon::reload`] from a file: parse errors are refused like any other.
    pub fn reload_file(&self, path: &Path) -> Result<ReloadReport, ConfigErrors> {
        match Config::load(path) {
            Ok(config) => self.reload(config),
            Err(errors) => {
                self.metrics.config_reload(ReloadResult::Failed);
                for e in &errors.0 {
                    error!(file = %path.display(), "config reload refused, running config kept: {e}");
                }
                Err(errors)
            }
        }
    }

    fn apply(&self, new: Config) -> Result<ReloadReport, ConfigErrors> {
        // Validate everything first: after this point nothing can fail.
        let mut errors = Vec::new();
        let dkim = DkimSigners::load(&new.dkim)
            .map_err(|e| errors.extend(e.0))
            .ok();
        let passwords = read_passwords(&new.routes)
            .map_err(|e| errors.extend(e.0))
            .ok();
        let (Some(dkim), Some(passwords)) = (dkim, passwords) else {
            return Err(ConfigErrors(errors));
        };

        let mut running = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let (config, restart_needed) = reload::merge(&running, new);
        self.router.set_routes(&config.routes, config.delivery.tls);
        self.metrics
            .set_routes(config.routes.iter().map(|r| r.domain.as_str()));
        self.worker.reconfigure(&config.delivery, passwords);
        self.worker.set_verp(
            self.verp
                .clone()
                .map(|v| VerpPolicy::from_config(v, &config)),
        );
        self.pool.set_limits(
            config.delivery.idle_timeout,
            config.delivery.max_messages_per_connection,
        );
        self.settler.reconfigure(config.delivery.clone());
        self.scheduler.reconfigure(config.delivery.clone());
        self.enqueue
            .set_dkim(dkim.with_metrics(self.metrics.clone()));
        self.send_time.set_config(config.sendtime.clone());
        let starttls = self.server.tls.is_some();
        self.server.config.set(session_config(
            &config,
            starttls,
            &self.intake,
            &self.feedback,
            &self.metrics,
        ));
        self.server.limits.set(
            config.limits.max_connections,
            config.limits.max_connections_per_ip,
        );
        self.admin_limits.set(config.limits);
        if config.log.level != running.log.level {
            if let Some(set_level) = &self.log_level {
                // The level was validated when the config compiled, so this should not fail;
                // if it does, logging keeps its old level and says so.
                if let Err(e) = set_level(&config.log.level) {
                    warn!(error = %e, "log.level: cannot apply {:?}", config.log.level);
                }
            }
        }
        *running = config;
        Ok(ReloadReport { restart_needed })
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

    /// The pre-enqueue stage (campaigns, bandit state, tracked engagement).
    pub fn sidecar(&self) -> &Arc<Sidecar> {
        &self.sidecar
    }

    /// Waits until every delivery-log line recorded so far is written to the file. The
    /// settler records an attempt's lines before it writes the spool, so after a spool change
    /// is seen, this makes that attempt's lines readable.
    pub async fn flush_delivery_log(&self) {
        self.delivery_log.flush().await;
    }

    /// Stops accepting, waits up to the grace period for sessions, flushes the spool.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.feedback_tasks.wait().await;
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
        self.stop_sidecar.cancel();
        if let Err(e) = self.sidecar_batches.await {
            warn!(error = %e, "sidecar batch task failed");
        }
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

/// What every session shares, built from a config.
fn session_config(
    config: &Config,
    starttls: bool,
    intake: &Intake,
    feedback: &Feedback,
    metrics: &Arc<Metrics>,
) -> SessionConfig {
    SessionConfig {
        hostname: config.server.hostname.clone(),
        limits: config.limits,
        policy: Policy::from_config(config),
        credentials: (!config.auth.users.is_empty())
            .then(|| Arc::new(Credentials::from_config(&config.auth))),
        starttls,
        intake: intake.clone(),
        feedback: feedback.clone(),
        metrics: metrics.clone(),
    }
}

/// Reads each smarthost's password file (`routes[i].auth.password_file`), trailing newline
/// removed; every unreadable file is reported with its key path.
/// The VERP signer when `bounce.verp_key_file` is set (VERP on or not: the bounce processor
/// verifies tokens of mail sent while it was on).
fn read_verp_key(config: &Config) -> anyhow::Result<Option<Verp>> {
    let Some(path) = &config.bounce.verp_key_file else {
        return Ok(None);
    };
    let key = std::fs::read(path)
        .with_context(|| format!("bounce.verp_key_file: cannot read {}", path.display()))?;
    let key = key.trim_ascii();
    if key.len() < 16 {
        anyhow::bail!(
            "bounce.verp_key_file: {} holds fewer than 16 bytes",
            path.display()
        );
    }
    let Some(domain) = config.bounce.domains.first() else {
        anyhow::bail!("bounce.domains: VERP needs a bounce domain");
    };
    Ok(Some(Verp::new(key, &config.bounce.verp_local, domain)))
}

fn read_passwords(routes: &[RouteConfig]) -> Result<HashMap<PathBuf, String>, ConfigErrors> {
    let mut passwords = HashMap::new();
    let mut errors = Vec::new();
    for (i, route) in routes.iter().enumerate() {
        if let Some(auth) = &route.auth {
            match std::fs::read_to_string(&auth.password_file) {
                Ok(password) => {
                    passwords.insert(
                        auth.password_file.clone(),
                        password.trim_end_matches(['\r', '\n']).to_string(),
                    );
                }
                Err(e) => errors.push(format!(
                    "routes[{i}].auth.password_file: cannot read {}: {e}",
                    auth.password_file.display()
                )),
            }
        }
    }
    if errors.is_empty() {
        Ok(passwords)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Runs the daemon until SIGTERM or SIGINT, with systemd notifications; SIGHUP reloads
/// `config_path`.
pub async fn serve(
    config: Config,
    config_path: &Path,
    log_level: Option<LogLevelReloader>,
) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut daemon = Daemon::start(config).await?;
    if let Some(reloader) = log_level {
        daemon = daemon.with_log_level_reloader(reloader);
    }
    if let Err(err) = notify::notify("READY=1") {
        warn!(error = %err, "sd_notify READY failed");
    }
    let stop_watchdog = CancellationToken::new();
    if let Some(interval) = notify::watchdog_interval() {
        tokio::spawn(watchdog(
            daemon.spool.clone(),
            interval,
            stop_watchdog.clone(),
        ));
    }
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: draining"); break }
            _ = int.recv() => { info!("SIGINT: draining"); break }
            _ = hup.recv() => {
                info!(file = %config_path.display(), "SIGHUP: reloading the config");
                let _ = notify::reloading();
                // Log rotation: the delivery log follows its path to a new file (also when the
                // config does not validate).
                daemon.delivery_log.reopen();
                // Errors are logged and counted by reload_file; the daemon keeps running.
                let _ = daemon.reload_file(config_path);
                let _ = notify::notify("READY=1");
            }
        }
    }
    let _ = notify::notify("STOPPING=1");
    stop_watchdog.cancel();
    daemon.shutdown().await
}

/// Pings the systemd watchdog every `interval` (half of `WatchdogSec=`) while the process is
/// healthy. It runs as a task on the main runtime, so a wedged runtime stops the pings; and it
/// skips them while the spool cannot make writes durable (poisoned, or a sync round running
/// longer than `interval`), so systemd restarts a tern that can no longer accept mail.
async fn watchdog(spool: Spool, interval: Duration, stop: CancellationToken) {
    loop {
        match spool.health(interval) {
            Ok(()) => {
                let _ = notify::notify("WATCHDOG=1");
            }
            Err(reason) => error!(%reason, "unhealthy: not pinging the systemd watchdog"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.cancelled() => return,
        }
    }
}
