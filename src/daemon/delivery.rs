//! The delivery subsystem: routing, the outbound connection pool, the delivery worker,
//! shaping, the settler and the scheduler that drives them.
//!
//! Started after intake and feedback (the settler commits DSNs through the enqueue and
//! reports outcomes to feedback). Shutdown lets attempts in flight finish within the grace
//! period (an abandoned attempt leaves its message pending in the spool), QUITs idle
//! connections, stores exact warm-up counts and flushes the delivery log.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_queue::Spool;
use tokio::sync::mpsc::UnboundedReceiver;
use tracing::warn;

use super::{Background, Reloaded, Subsystem};
use crate::bounce::classify::Classifier;
use crate::config::Config;
use crate::delivery::client::ClientSettings;
use crate::delivery::pool::{ConnectionPool, PoolLimits};
use crate::delivery::worker::{VerpPolicy, Worker};
use crate::enqueue::{Enqueue, NewMessage};
use crate::feedback::Feedback;
use crate::maillog::DeliveryLog;
use crate::origin::Origin;
use crate::outcome::Settler;
use crate::routing::dns::HickoryResolver;
use crate::routing::guard::AddressGuard;
use crate::routing::route::Router;
use crate::routing::sts::Sts;
use crate::scheduler::Scheduler;
use crate::shaping::Shaper;
use crate::telemetry::Metrics;
use crate::tls::{load_roots, SYSTEM_ROOTS};
use crate::tlsrpt::{TlsReporting, TlsReports};
use crate::verp::Verp;

pub struct Delivery {
    pub router: Arc<Router>,
    pub pool: Arc<ConnectionPool>,
    pub worker: Arc<Worker>,
    pub settler: Arc<Settler>,
    pub scheduler: Scheduler,
    pub shaper: Arc<Shaper>,
    pub log: DeliveryLog,
    /// The VERP key read at start (`bounce.verp_key_file` is a restart key).
    verp: Option<Verp>,
    /// The SMTP listeners' addresses (a restart key): never a delivery destination.
    listeners: Vec<std::net::SocketAddr>,
    /// TLS-RPT counts and report mails (with MTA-STS on).
    pub tls_reporting: Option<Arc<TlsReporting>>,
}

/// What the delivery subsystem is built from.
pub struct DeliveryParts {
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    pub log: DeliveryLog,
    pub shaper: Arc<Shaper>,
    pub enqueue: Enqueue,
    pub feedback: Feedback,
    pub classifier: Arc<Classifier>,
    pub verp: Option<Verp>,
    pub origin: Origin,
    pub passwords: HashMap<PathBuf, String>,
    pub new_mail: UnboundedReceiver<Vec<NewMessage>>,
    /// The bound SMTP listener addresses.
    pub listeners: Vec<std::net::SocketAddr>,
    /// The fleet's store (`[cluster]`): suspensions are the fleet's.
    pub cluster: Option<Arc<crate::cluster::Store>>,
}

impl Delivery {
    pub fn start(config: &Config, parts: DeliveryParts, bg: &Background) -> anyhow::Result<Self> {
        let resolver = HickoryResolver::new(&config.delivery.nameservers)
            .context("delivery.nameservers: cannot set up the DNS resolver")?;
        let resolver: Arc<dyn crate::routing::dns::Resolver> = Arc::new(resolver);
        let extra_roots = match &config.delivery.ca_file {
            Some(path) => Some(
                load_roots(path)
                    .with_context(|| format!("delivery.ca_file: cannot read {}", path.display()))?,
            ),
            None => None,
        };
        let mut router = Router::new(
            &config.routes,
            config.delivery.tls,
            resolver.clone(),
            AddressGuard::new(config.delivery.allow_local_mx, &parts.listeners),
        );
        // The validating resolver serves routes with tls = "dane"/"dane-only" whatever
        // delivery.dane says; delivery.dane turns DANE on for all other MX-routed mail.
        let trust_anchor = config.delivery.dnssec_trust_anchor.as_deref();
        let dane = crate::routing::dane::Dane::new(&config.delivery.nameservers, trust_anchor)
            .map_err(|e| match trust_anchor {
                Some(_) => anyhow::anyhow!("delivery.dnssec_trust_anchor: {e}"),
                None => anyhow::anyhow!("delivery.dane: cannot set up the DNSSEC resolver: {e}"),
            })?;
        router = router.with_dane(Arc::new(dane), config.delivery.dane);
        let mut tls_reporting = None;
        if config.delivery.mta_sts {
            router = router.with_sts(Arc::new(Sts::new(
                resolver.clone(),
                sts_connector(extra_roots.as_ref()),
            )));
        }
        if config.delivery.mta_sts || config.delivery.dane {
            tls_reporting = Some(Arc::new(TlsReporting::new(
                Arc::new(TlsReports::default()),
                resolver,
                config.server.hostname.clone(),
                sts_connector(extra_roots.as_ref()),
            )));
        }
        let router = Arc::new(router);
        let pool = ConnectionPool::new(
            pool_limits(&config.delivery),
            bg.tasks.clone(),
            parts.metrics.clone(),
        );
        pool.spawn_reaper(bg.stop.clone());
        // Verified TLS (routes with tls = "required", MTA-STS enforce) trusts the system's CA
        // bundle and delivery.ca_file.
        let mut roots = load_roots(Path::new(SYSTEM_ROOTS)).unwrap_or_else(|err| {
            warn!(path = SYSTEM_ROOTS, error = %err, "no CA bundle: required TLS will fail");
            rustls::RootCertStore::empty()
        });
        if let Some(extra) = &extra_roots {
            roots.roots.extend(extra.roots.iter().cloned());
        }
        let settings = ClientSettings::new(
            config.server.hostname.clone(),
            config.delivery.timeouts,
            roots,
        );
        let mut worker = Worker::new(
            router.clone(),
            pool.clone(),
            settings,
            &config.delivery,
            parts.passwords,
            parts.classifier.clone(),
            parts.origin,
            parts.metrics.clone(),
        );
        if let Some(reporting) = &tls_reporting {
            worker = worker.with_tls_reports(reporting.reports.clone());
            // Daily, just after midnight UTC: the reports of the days that ended.
            let (reporting, enqueue, stop) =
                (reporting.clone(), parts.enqueue.clone(), bg.stop.clone());
            bg.tasks.spawn(async move {
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(TlsReporting::until_next_run()) => {}
                        _ = stop.cancelled() => return,
                    }
                    for report in reporting.due(false).await {
                        if let Err(err) = enqueue.accept(report).await {
                            warn!(error = %err, "cannot queue a TLS report");
                        }
                    }
                }
            });
        }
        let worker = Arc::new(worker);
        worker.set_verp(
            parts
                .verp
                .clone()
                .map(|v| VerpPolicy::from_config(v, config)),
        );
        let settler = Arc::new(Settler::new(
            parts.spool.clone(),
            parts.enqueue,
            parts.feedback,
            parts.log.clone(),
            config.delivery.clone(),
            config.server.hostname.clone(),
            parts.metrics.clone(),
            parts.classifier,
        ));
        let scheduler = Scheduler::start(
            parts.spool,
            router.clone(),
            worker.clone(),
            settler.clone(),
            parts.shaper.clone(),
            config.delivery.clone(),
            parts.metrics,
            parts.new_mail,
            parts.cluster,
        )
        .context("spool.path: cannot read the stored suspensions")?;
        Ok(Delivery {
            router,
            pool,
            worker,
            settler,
            scheduler,
            shaper: parts.shaper,
            log: parts.log,
            verp: parts.verp,
            listeners: parts.listeners,
            tls_reporting,
        })
    }
}

/// The connection pool's part of `[delivery]`.
/// The TLS client of MTA-STS policy fetches: the public web PKI roots (policy hosts are
/// ordinary HTTPS servers), plus `delivery.ca_file`.
fn sts_connector(extra: Option<&rustls::RootCertStore>) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in webpki_root_certs::TLS_SERVER_ROOT_CERTS {
        // A root webpki cannot use is skipped; the others still count.
        let _ = roots.add(cert.clone());
    }
    if let Some(extra) = extra {
        roots.roots.extend(extra.roots.iter().cloned());
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("aws-lc-rs supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(tls))
}

fn pool_limits(config: &crate::config::DeliveryConfig) -> PoolLimits {
    PoolLimits {
        idle_timeout: config.idle_timeout,
        max_messages_per_connection: config.max_messages_per_connection,
        max_idle: config.max_idle_connections,
    }
}

impl Subsystem for Delivery {
    fn reconfigure(&self, reloaded: &Reloaded) {
        let config = &reloaded.config;
        self.router.set_routes(&config.routes, config.delivery.tls);
        self.router.set_guard(AddressGuard::new(
            config.delivery.allow_local_mx,
            &self.listeners,
        ));
        self.worker
            .reconfigure(&config.delivery, reloaded.passwords.clone());
        self.worker.set_verp(
            self.verp
                .clone()
                .map(|v| VerpPolicy::from_config(v, config)),
        );
        self.pool.set_limits(pool_limits(&config.delivery));
        self.settler.reconfigure(config.delivery.clone());
        self.scheduler.reconfigure(config.delivery.clone());
    }

    async fn shutdown(self, grace: Duration) {
        // Attempts in flight finish (their own timeouts bound them) or are abandoned: an
        // abandoned attempt leaves its message pending in the spool, to be retried.
        self.scheduler.shutdown(grace).await;
        self.pool.close_all().await;
        // Exact warm-up counts, so a restart neither loses nor gives back reservations.
        self.shaper.flush().await;
        self.log.flush().await;
    }
}
