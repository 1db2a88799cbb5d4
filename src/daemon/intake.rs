//! The intake subsystem: the pre-enqueue stages (the sidecar, send time), the enqueue they
//! feed, and their background work (the sidecar's bandit batches, the send-time refit loop).
//!
//! Shutdown stores the sidecar's last bandit batch; the refit loop stops with the daemon's
//! stop token and is waited for with the rest of the background tasks.
//!
//! Built in two steps, because the SMTP listeners take mail before the spool's sled is open
//! (tern_queue's intake journal): [`IntakeSystem::begin`] makes the intake the sessions use
//! (send time, enqueue, the stages) without reading the spool; [`IntakeStart::finish`], once
//! the spool is open, builds the sidecar (its campaigns and bandits are stored in the spool)
//! and puts it in its place in the stages. A trusted submission (the only kind the stages
//! touch) that reaches the sidecar's stage before then waits for it.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tern_queue::Spool;
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{Background, Reloaded, Subsystem};
use crate::config::Config;
use crate::dkim::DkimSigners;
use crate::enqueue::{Enqueue, NewMessage};
use crate::feedback::Feedback;
use crate::intake::Intake;
use crate::message::{Prepared, Stage, StageFuture};
use crate::sendtime::SendTime;
use crate::shaping::pools::Pools;
use crate::sidecar::Sidecar;
use crate::telemetry::Metrics;
use crate::unsubscribe::{Unsubscribe, Unsubscriber};

pub struct IntakeSystem {
    pub intake: Intake,
    pub enqueue: Enqueue,
    pub sidecar: Arc<Sidecar>,
    pub send_time: SendTime,
    /// Ends the sidecar's bandit batches (a last batch is stored then).
    stop_batches: CancellationToken,
    batches: tokio::task::JoinHandle<()>,
}

/// What the intake subsystem is built from.
pub struct IntakeParts {
    pub spool: Spool,
    pub metrics: Arc<Metrics>,
    pub dkim: DkimSigners,
    pub pools: Arc<Pools>,
    pub feedback: Feedback,
    pub unsubscriber: Arc<Unsubscriber>,
    pub new_mail: UnboundedSender<Vec<NewMessage>>,
    /// The fleet's store (`[cluster]`): engagement profiles and bandit counts are shared.
    pub cluster: Option<Arc<crate::cluster::Store>>,
}

/// The intake before the sidecar exists: the sessions can use `intake` already.
pub struct IntakeStart {
    pub intake: Intake,
    pub enqueue: Enqueue,
    pub send_time: SendTime,
    parts: SidecarParts,
    sidecar: Arc<OnceLock<Arc<Sidecar>>>,
    built: tokio::sync::watch::Sender<bool>,
}

/// The sidecar's place among the stages: the sidecar itself once it is built.
struct SidecarStage {
    sidecar: Arc<OnceLock<Arc<Sidecar>>>,
    /// `true` once `sidecar` is set (or `Err`: the start failed), for messages that wait.
    built: tokio::sync::watch::Receiver<bool>,
    /// A config campaign re-routes some sender identity's mail (`winback_for`): then all
    /// mail waits for the sidecar, since only it can tell whose.
    config_winback: bool,
}

impl Stage for SidecarStage {
    fn apply(&self, message: Prepared) -> StageFuture<'_> {
        // The steady state: straight to the sidecar.
        if let Some(sidecar) = self.sidecar.get() {
            return Stage::apply(&**sidecar, message);
        }
        // Before the sidecar exists (the spool still opening), mail that asks for no
        // campaign goes on at once: the first 250 must not wait for sled. Win-back campaigns
        // created through the API are stored in the spool, so mail of their identities taken
        // in that window is not re-routed (see docs/OPERATIONS.md).
        if !self.config_winback && !crate::sidecar::wanted(&message.submission) {
            return Box::pin(std::future::ready(vec![message]));
        }
        let mut built = self.built.clone();
        Box::pin(async move {
            // Err: the daemon did not finish starting; the message goes on, as with any
            // stage that cannot do its work.
            let _ = built.wait_for(|b| *b).await;
            match self.sidecar.get() {
                Some(sidecar) => Stage::apply(&**sidecar, message).await,
                None => vec![message],
            }
        })
    }
}

impl IntakeSystem {
    /// The first step (see the module doc): reads nothing from the spool.
    pub fn begin(config: &Config, parts: IntakeParts, bg: &Background) -> IntakeStart {
        let send_time = SendTime::new(
            parts.spool.clone(),
            config.sendtime.clone(),
            parts.feedback.suppressions.clone(),
            bg.tasks.clone(),
            parts.cluster.clone(),
        );
        parts
            .feedback
            .events
            .observe_deliveries(Arc::new(send_time.clone()));
        bg.tasks
            .spawn(send_time.clone().refit_loop(bg.stop.clone()));
        let IntakeParts {
            spool,
            metrics,
            dkim,
            pools,
            feedback,
            unsubscriber,
            new_mail,
            cluster,
        } = parts;
        let events = feedback.events.clone();
        let enqueue = Enqueue::new(
            spool.clone(),
            config.server.hostname.clone(),
            config.spool.max_age,
            dkim,
            pools,
            feedback,
            new_mail,
            Arc::new(send_time.clone()),
        );
        let sidecar = Arc::new(OnceLock::new());
        let (built_tx, built) = tokio::sync::watch::channel(false);
        // The order is the pipeline: the sidecar renders campaigns (and parses their send
        // time and unsubscribe request), the unsubscribe stage gives each recipient its own
        // List-Unsubscribe, then the send-time stage sets the window the enqueue plans in.
        let stages: Vec<Arc<dyn Stage>> = vec![
            Arc::new(SidecarStage {
                sidecar: sidecar.clone(),
                built,
                config_winback: config
                    .sidecar
                    .campaigns
                    .iter()
                    .any(|c| c.winback_for.is_some()),
            }),
            Arc::new(Unsubscribe(Some(unsubscriber))),
            Arc::new(send_time.clone()),
        ];
        IntakeStart {
            intake: Intake::new(stages, enqueue.clone()),
            enqueue,
            send_time,
            parts: SidecarParts {
                spool,
                metrics,
                events,
                cluster,
            },
            sidecar,
            built: built_tx,
        }
    }
}

/// What the sidecar is built from, kept until the spool is open.
struct SidecarParts {
    spool: Spool,
    metrics: Arc<Metrics>,
    events: crate::events::Events,
    cluster: Option<Arc<crate::cluster::Store>>,
}

impl IntakeStart {
    /// The second step, once the spool is open: the sidecar, in its place in the stages.
    pub fn finish(self, config: &Config) -> anyhow::Result<IntakeSystem> {
        let IntakeStart {
            intake,
            enqueue,
            send_time,
            parts,
            sidecar: place,
            built,
        } = self;
        let sidecar = Arc::new(
            Sidecar::new(
                &config.sidecar,
                &config.server.hostname,
                parts.spool.clone(),
                parts.metrics.clone(),
                Arc::new(send_time.clone()),
                parts.events.clone(),
                parts.cluster.clone(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let _ = place.set(sidecar.clone());
        built.send_replace(true);
        let stop_batches = CancellationToken::new();
        let batches = tokio::spawn(sidecar.clone().run_batches(stop_batches.clone()));
        Ok(IntakeSystem {
            intake,
            enqueue,
            sidecar,
            send_time,
            stop_batches,
            batches,
        })
    }
}

impl Subsystem for IntakeSystem {
    fn reconfigure(&self, reloaded: &Reloaded) {
        if let Some(dkim) = reloaded.take_dkim() {
            self.enqueue.set_dkim(dkim);
        }
        self.send_time.set_config(reloaded.config.sendtime.clone());
    }

    async fn shutdown(self, _grace: Duration) {
        self.stop_batches.cancel();
        if let Err(e) = self.batches.await {
            warn!(error = %e, "sidecar batch task failed");
        }
    }
}
