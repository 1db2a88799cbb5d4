//! Process lifecycle: the daemon as a composition of subsystems, each with a start, a
//! `reconfigure` (SIGHUP) and a `shutdown` that waits for every task it started.
//!
//! Start, in two phases. First, without waiting for the spool's sled to open (tern_queue's
//! `defer_open`: commits go to its intake journal meanwhile): feedback (suppression list,
//! events, webhooks, bounce processor; their tasks wait for the spool), intake (send time,
//! enqueue, the stages with the sidecar's place kept), the SMTP [`listeners`], which serve
//! from then on. Then, once the spool is open: the sidecar (campaigns and bandits are stored
//! in the spool), the screening of mail taken meanwhile against the suppression list
//! (`Enqueue::screen_intake`), delivery (routing, pool, worker, shaping, settler, scheduler)
//! and the [`admin`] server. Every socket is bound before anything is served, so a bad
//! address fails the start cleanly. Invariant: nothing the listeners use reads the spool
//! before it is open (the first 250 must not wait for sled: issue 19).
//!
//! Shutdown (SIGTERM/SIGINT in [`serve`]): stop accepting, let feedback tasks end, sessions
//! finish within the grace period, delivery attempts finish, the sidecar store its last
//! batch, the admin server stop; then every background task of the [`Background`] tracker
//! (events emitted later, engagement recorded later, the orphan sweep, the refit loop, the
//! pool reaper) is waited for before the delivery log and the spool get their final flush.
//! No task the daemon starts is detached.
//!
//! [`Daemon::start`] is what tests use in-process (listeners may be bound to port 0; the
//! real addresses are in [`Daemon::smtp_addresses`], the admin server's in
//! [`Daemon::admin_address`]); [`serve`] adds signals, sd_notify and the systemd watchdog.
//!
//! [`Daemon::reload`] applies a new config to the running daemon (SIGHUP in [`serve`]): it
//! validates everything that can fail first, then hands each subsystem its new values (see
//! [`crate::reload`] for which keys are live); a reload that fails changes nothing.

mod admin;
mod delivery;
mod feedback;
mod intake;
mod listeners;

use crate::auth::Credentials;
use crate::bounce::classify::Classifier;
use crate::config::{Config, ConfigErrors, RouteConfig};
use crate::dkim::DkimSigners;
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::maillog::DeliveryLog;
use crate::notify;
use crate::origin::Origin;
use crate::policy::Policy;
use crate::reload::{self, ReloadReport};
use crate::scheduler::Scheduler;
use crate::shaping::limiter::Backend;
use crate::shaping::shared::SharedStore;
use crate::shaping::Shaper;
use crate::sidecar::Sidecar;
use crate::smtp::session::{SessionConfig, Shared};
use crate::telemetry::{Metrics, ReloadResult};
use crate::verp::Verp;
use anyhow::Context;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tern_queue::{Spool, SpoolOptions};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use self::admin::Admin;
use self::delivery::{Delivery, DeliveryParts};
use self::feedback::FeedbackSystem;
use self::intake::{IntakeParts, IntakeSystem};
use self::listeners::Listeners;

/// Applies a reloaded `log.level` to the process's log filter (the subscriber is the
/// binary's, not the daemon's); returns why it could not.
pub type LogLevelReloader = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Work that runs beside the subsystems: every task is tracked, and `stop` asks the
/// long-running ones to end. Shutdown waits for all of them before the spool's last flush.
#[derive(Clone)]
pub struct Background {
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
}

/// A config that passed validation, with what was loaded from the files it names.
pub struct Reloaded {
    pub config: Config,
    /// The new signing keys, taken once by the subsystem that signs.
    dkim: Mutex<Option<DkimSigners>>,
    pub passwords: HashMap<PathBuf, String>,
}

impl Reloaded {
    fn take_dkim(&self) -> Option<DkimSigners> {
        self.dkim
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

/// One part of the running daemon.
trait Subsystem {
    /// Applies a validated config (only the keys that reload live; see [`crate::reload`]).
    /// Cannot fail: everything that could was checked before.
    fn reconfigure(&self, reloaded: &Reloaded);

    /// Stops and waits for every task it started (at most about `grace` for work in flight).
    async fn shutdown(self, grace: Duration);
}

/// A running tern: listeners bound and serving.
pub struct Daemon {
    /// The config in effect: the last one loaded, with restart keys from the first.
    config: Mutex<Config>,
    spool: Spool,
    metrics: Arc<Metrics>,
    background: Background,
    feedback: FeedbackSystem,
    intake: IntakeSystem,
    delivery: Delivery,
    listeners: Listeners,
    admin: Admin,
    log_level: Option<LogLevelReloader>,
    grace: Duration,
}

impl Daemon {
    /// Opens the spool, binds every listener and starts serving.
    ///
    /// In two phases: the SMTP listeners serve as soon as they are bound, while the spool's
    /// sled is still opening (new mail goes to its intake journal); everything that reads the
    /// spool (the sidecar's campaigns, delivery, the admin server) starts once it is open.
    /// Returns when both are done.
    pub async fn start(config: Config) -> anyhow::Result<Daemon> {
        Daemon::start_opening(config, None, None).await
    }

    /// [`Daemon::start`] with sled's open held back by `delay` (tern_queue's test-only hook);
    /// `on_listening` gets the SMTP addresses as soon as they serve, so tests can see the
    /// daemon take mail while the spool opens. Tests only.
    #[doc(hidden)]
    pub async fn start_with_spool_open_delay(
        config: Config,
        delay: Duration,
        on_listening: tokio::sync::oneshot::Sender<Vec<SocketAddr>>,
    ) -> anyhow::Result<Daemon> {
        Daemon::start_opening(config, Some(delay), Some(on_listening)).await
    }

    async fn start_opening(
        config: Config,
        open_delay: Option<Duration>,
        on_listening: Option<tokio::sync::oneshot::Sender<Vec<SocketAddr>>>,
    ) -> anyhow::Result<Daemon> {
        config.check_files().map_err(|e| anyhow::anyhow!("{e}"))?;
        let spool_path = config.spool.path.clone();
        let spool_options = SpoolOptions {
            cache_size: config.spool.cache_size,
            min_free_space: config.spool.min_free_space,
            // After a crash, take mail at once and count the spool behind (see
            // tern_queue's recovery module): a 1M-message spool would otherwise refuse
            // mail for the ~10 s of the scan.
            recover_in_background: true,
            // Nor wait for sled's own open (seconds at millions of messages): commits go to
            // the intake journal until it is open (see tern_queue's journal module).
            defer_open: true,
            open_delay_for_tests: open_delay,
        };
        // Returns at once: sled opens on a thread of its own (see the second phase below).
        let spool =
            tokio::task::spawn_blocking(move || Spool::open_with(&spool_path, &spool_options))
                .await?
                .with_context(|| {
                    format!("spool.path: cannot open {}", config.spool.path.display())
                })?;

        let bg = Background {
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
        };
        let metrics =
            Arc::new(Metrics::new().with_routes(config.routes.iter().map(|r| r.domain.as_str())));
        metrics.observe_spool(&spool);
        metrics.set_providers(provider_labels(&config));
        spawn_dkim_check(&config, metrics.clone(), &bg);
        metrics.set_sender_identities(config.dkim.iter().map(|d| d.domain.as_str()));
        let dkim =
            DkimSigners::load(&config.dkim, metrics.clone()).map_err(|e| anyhow::anyhow!("{e}"))?;
        let classifier = Arc::new(Classifier::load(&config).map_err(|e| anyhow::anyhow!("{e}"))?);
        let passwords = read_passwords(&config.routes).map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(dir) = config.delivery.log_path.as_deref().and_then(Path::parent) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("delivery.log_path: cannot create {}", dir.display()))?;
        }
        let log = DeliveryLog::open(config.delivery.log_path.as_deref()).with_context(|| {
            format!(
                "delivery.log_path: cannot open {:?}",
                config.delivery.log_path
            )
        })?;
        let verp = read_verp_key(&config)?;
        let origin = read_origin_key(&config)?;
        let backend = match &config.shaping.shared {
            Some(shared) => Backend::Shared(
                SharedStore::connect(shared, metrics.clone(), bg.tasks.clone(), bg.stop.clone())
                    .await,
            ),
            None => Backend::Local,
        };
        let shaper = Shaper::new(&config, spool.clone(), backend, metrics.clone());

        let cluster = config
            .cluster
            .as_ref()
            .map(|c| crate::cluster::Store::new(c, metrics.clone()).map(Arc::new))
            .transpose()
            .map_err(anyhow::Error::msg)?;
        let feedback = FeedbackSystem::start(
            &config,
            &spool,
            &log,
            &metrics,
            classifier.clone(),
            verp.clone(),
            origin.clone(),
            cluster.clone(),
            &bg,
        )?;
        let (new_mail, new_mail_rx) = tokio::sync::mpsc::unbounded_channel();
        let intake = IntakeSystem::begin(
            &config,
            IntakeParts {
                spool: spool.clone(),
                metrics: metrics.clone(),
                dkim,
                pools: shaper.pools().clone(),
                feedback: feedback.feedback.clone(),
                unsubscriber: feedback.unsubscriber.clone(),
                new_mail,
                cluster: cluster.clone(),
            },
            &bg,
        );
        // Bind everything before serving anything, so a bad address fails the start cleanly;
        // the SMTP listeners before delivery starts, which never connects to them.
        let bound = Listeners::bind(&config).await?;
        let listening = bound
            .addresses()
            .context("listeners: cannot read the bound addresses")?;
        let (admin_socket, token) = Admin::bind(&config).await?;
        // First phase over: the SMTP listeners serve now, before sled is open. Mail is made
        // durable in the spool's intake journal until then; nothing they use reads the spool
        // (the suppression list answers "not yet", and `screen_intake` checks that mail below).
        let listeners = Listeners::start(
            &config,
            bound,
            intake.intake.clone(),
            feedback.feedback.clone(),
            metrics.clone(),
            &bg,
        )?;
        if let Some(tell) = on_listening {
            let _ = tell.send(listeners.addresses().to_vec());
        }
        info!("accepting mail; the spool is opening");
        // Second phase: everything that reads the spool, once sled is open and the journal
        // moved into it.
        if let Err(e) = spool.ready().await {
            bg.stop.cancel();
            listeners.shutdown(Duration::ZERO).await;
            return Err(anyhow::Error::new(e).context(format!(
                "spool.path: cannot open {}",
                config.spool.path.display()
            )));
        }
        let stats = spool.stats();
        info!(messages = stats.messages, bytes = stats.bytes, path = %config.spool.path.display(),
            after_clean_close = spool.opened_after_clean_close(), recovery = ?spool.recovery(),
            "spool open");
        // Reads every body once, so it runs in the background (on blocking threads, in chunks)
        // instead of delaying the start; it is safe alongside commits and deliveries, and stops
        // at shutdown (the next start sweeps again).
        let (sweeping, stop_sweep) = (spool.clone(), bg.stop.clone());
        bg.tasks.spawn(async move {
            // After crash recovery's scan (both read the whole spool). Stopped between chunks,
            // never dropped mid-chunk: a chunk left running on a blocking thread would hold
            // sled past shutdown, and the clean close's checkpoint needs sled's lock.
            tokio::select! {
                _ = sweeping.recovered() => {}
                _ = stop_sweep.cancelled() => return,
            }
            if let Err(err) = sweeping
                .sweep_orphans_while(|| !stop_sweep.is_cancelled())
                .await
            {
                warn!(error = %err, "spool orphan sweep failed");
            }
        });
        let intake = intake.finish(&config)?;
        // Before delivery starts: nothing taken while the spool opened is attempted before it
        // was checked against the suppression list.
        intake.enqueue.screen_intake().await;
        let delivery = Delivery::start(
            &config,
            DeliveryParts {
                spool: spool.clone(),
                metrics: metrics.clone(),
                log,
                shaper,
                enqueue: intake.enqueue.clone(),
                feedback: feedback.feedback.clone(),
                classifier,
                verp,
                origin,
                passwords,
                new_mail: new_mail_rx,
                listeners: listening,
                cluster: cluster.clone(),
            },
            &bg,
        )?;
        let admin = Admin::start(
            admin_socket,
            crate::admin::AdminState {
                metrics: metrics.clone(),
                spool: spool.clone(),
                scheduler: delivery.scheduler.clone(),
                intake: intake.intake.clone(),
                feedback: feedback.feedback.clone(),
                hostname: config.server.hostname.clone(),
                sidecar: intake.sidecar.clone(),
                unsubscriber: feedback.unsubscriber.clone(),
                tls_reporting: delivery.tls_reporting.clone(),
                send_time: intake.send_time.clone(),
                limits: Arc::new(crate::live::Live::new(config.limits)),
                edge: Arc::new(crate::live::Live::new(config.admin.clone())),
                shaper: delivery.shaper.clone(),
                token,
                readiness: crate::admin::health::Readiness::new(
                    spool.clone(),
                    bg.stop.clone(),
                    listeners.accepting(),
                    listeners.addresses().len(),
                    metrics.clone(),
                ),
            },
        )?;
        let grace = config.server.shutdown_grace;
        Ok(Daemon {
            config: Mutex::new(config),
            spool,
            metrics,
            background: bg,
            feedback,
            intake,
            delivery,
            listeners,
            admin,
            log_level: None,
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
        // Validate everything first: after this point nothing can fail. DKIM keys and
        // smarthost passwords are re-read, so their modes are checked again too.
        let mut errors = new
            .check_secret_files()
            .err()
            .map(|e| e.0)
            .unwrap_or_default();
        let dkim = DkimSigners::load(&new.dkim, self.metrics.clone())
            .map_err(|e| errors.extend(e.0))
            .ok();
        let passwords = read_passwords(&new.routes)
            .map_err(|e| errors.extend(e.0))
            .ok();
        let (Some(dkim), Some(passwords), true) = (dkim, passwords, errors.is_empty()) else {
            return Err(ConfigErrors(errors));
        };

        let mut running = self.config.lock().unwrap_or_else(PoisonError::into_inner);
        let (config, restart_needed) = reload::merge(&running, new);
        let reloaded = Reloaded {
            config,
            dkim: Mutex::new(Some(dkim)),
            passwords,
        };
        self.metrics
            .set_routes(reloaded.config.routes.iter().map(|r| r.domain.as_str()));
        self.metrics
            .set_sender_identities(reloaded.config.dkim.iter().map(|d| d.domain.as_str()));
        self.spool
            .set_min_free_space(reloaded.config.spool.min_free_space);
        self.feedback.reconfigure(&reloaded);
        self.intake.reconfigure(&reloaded);
        self.delivery.reconfigure(&reloaded);
        self.listeners.reconfigure(&reloaded);
        self.admin.reconfigure(&reloaded);
        let config = reloaded.config;
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
        self.listeners.addresses()
    }

    /// Where the admin HTTP server (`GET /metrics`) listens.
    pub fn admin_address(&self) -> SocketAddr {
        self.admin.address()
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.delivery.scheduler
    }

    /// The pre-enqueue campaign stage (campaigns, bandit state, tracked engagement).
    pub fn sidecar(&self) -> &Arc<Sidecar> {
        &self.intake.sidecar
    }

    /// The suppression list and events, as the sessions, the settler and the API use them.
    pub fn feedback(&self) -> &Feedback {
        &self.feedback.feedback
    }

    /// Waits until every delivery-log line recorded so far is written to the file. The
    /// settler records an attempt's lines before it writes the spool, so after a spool change
    /// is seen, this makes that attempt's lines readable.
    pub async fn flush_delivery_log(&self) {
        self.delivery.log.flush().await;
    }

    /// Stops accepting, lets every subsystem drain within the grace period, waits for every
    /// background task, then flushes the delivery log and the spool.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        let grace = self.grace;
        self.background.stop.cancel();
        self.feedback.shutdown(grace).await;
        self.listeners.shutdown(grace).await;
        let log = self.delivery.log.clone();
        self.delivery.shutdown(grace).await;
        self.intake.shutdown(grace).await;
        // Scrapes and API calls answered while the rest drained; the admin server stops
        // before the background tasks are waited for, so none can start after the wait.
        self.admin.shutdown(grace).await;
        self.background.tasks.close();
        if tokio::time::timeout(grace, self.background.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                remaining = self.background.tasks.len(),
                "background tasks still running after the grace period"
            );
        }
        log.flush().await;
        self.spool.flush().await.context("final spool flush")?;
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
    shared: &Shared,
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
        shared: shared.clone(),
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

/// How often the daemon checks that DNS publishes its DKIM keys.
const DKIM_CHECK_EVERY: Duration = Duration::from_secs(86_400);

/// Checks at start and then daily that DNS publishes each `[[dkim]]` key of the start
/// config (`tern_dkim_key_published`); a key that is not is logged as an error: receivers
/// fail its signatures.
fn spawn_dkim_check(config: &Config, metrics: Arc<Metrics>, bg: &Background) {
    if config.dkim.is_empty() || !config.delivery.check_dkim_records {
        return;
    }
    let keys = config.dkim.clone();
    let nameservers = config.delivery.nameservers.clone();
    let stop = bg.stop.clone();
    bg.tasks.spawn(async move {
        let resolver = match crate::routing::dns::HickoryResolver::new(&nameservers) {
            Ok(resolver) => resolver,
            Err(err) => {
                warn!(error = %err, "no resolver for the DKIM key check");
                return;
            }
        };
        loop {
            let now = crate::clock::now_ms() / 1000;
            let checks = crate::dkim::check_published(&keys, now, |name| {
                let resolver = &resolver;
                async move { resolver.txt_records(&name).await }
            })
            .await;
            for check in &checks {
                metrics.dkim_key_published(&check.domain, &check.selector, check.ok());
                if !check.ok() {
                    tracing::error!(domain = %check.domain, selector = %check.selector,
                        result = ?check.published, "DKIM key not published as configured (tern dkim check)");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(DKIM_CHECK_EVERY) => {}
                _ = stop.cancelled() => return,
            }
        }
    });
}

/// The shaping providers (configured and built-in) as destination labels of the metrics.
fn provider_labels(config: &Config) -> Vec<crate::telemetry::ProviderLabel> {
    config
        .shaping
        .providers
        .iter()
        .map(|p| crate::telemetry::ProviderLabel {
            name: p.name.clone(),
            mx_suffixes: p.mx.iter().map(|s| s.to_ascii_lowercase()).collect(),
            domains: p.domains.iter().map(|d| d.to_ascii_lowercase()).collect(),
        })
        .collect()
}

/// The key of the `X-Tern-Id` header (`bounce.origin_key_file`, by default `origin.key`
/// beside the spool directory), created at the first start.
fn read_origin_key(config: &Config) -> anyhow::Result<Origin> {
    let secret =
        crate::secret_file::read_or_create(&config.origin_key_path(), "bounce.origin_key_file", 32)
            .map_err(anyhow::Error::msg)?;
    Ok(Origin::new(secret.as_bytes()))
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
    let pinging = notify::watchdog_interval().map(|interval| {
        tokio::spawn(watchdog(
            daemon.spool.clone(),
            interval,
            stop_watchdog.clone(),
        ))
    });
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM: draining"); break }
            _ = int.recv() => { info!("SIGINT: draining"); break }
            _ = hup.recv() => {
                info!(file = %config_path.display(), "SIGHUP: reloading the config");
                let _ = notify::reloading();
                // Log rotation: the delivery log follows its path to a new file (also when the
                // config does not validate).
                daemon.delivery.log.reopen();
                // Errors are logged and counted by reload_file; the daemon keeps running.
                let _ = daemon.reload_file(config_path);
                let _ = notify::notify("READY=1");
            }
        }
    }
    let _ = notify::notify("STOPPING=1");
    stop_watchdog.cancel();
    if let Some(pinging) = pinging {
        let _ = pinging.await;
    }
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
