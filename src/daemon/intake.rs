//! The intake subsystem: the pre-enqueue stages (the sidecar, send time), the enqueue they
//! feed, and their background work (the sidecar's bandit batches, the send-time refit loop).
//!
//! Shutdown stores the sidecar's last bandit batch; the refit loop stops with the daemon's
//! stop token and is waited for with the rest of the background tasks.

use std::sync::Arc;
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
use crate::message::Stage;
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

impl IntakeSystem {
    pub fn start(config: &Config, parts: IntakeParts, bg: &Background) -> anyhow::Result<Self> {
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
        let sidecar = Arc::new(
            Sidecar::new(
                &config.sidecar,
                &config.server.hostname,
                parts.spool.clone(),
                parts.metrics.clone(),
                Arc::new(send_time.clone()),
                parts.feedback.events.clone(),
                parts.cluster.clone(),
            )
            .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let stop_batches = CancellationToken::new();
        let batches = tokio::spawn(sidecar.clone().run_batches(stop_batches.clone()));
        let enqueue = Enqueue::new(
            parts.spool,
            config.server.hostname.clone(),
            config.spool.max_age,
            parts.dkim,
            parts.pools,
            parts.feedback,
            parts.new_mail,
            Arc::new(send_time.clone()),
        );
        // The order is the pipeline: the sidecar renders campaigns (and parses their send
        // time and unsubscribe request), the unsubscribe stage gives each recipient its own
        // List-Unsubscribe, then the send-time stage sets the window the enqueue plans in.
        let stages: Vec<Arc<dyn Stage>> = vec![
            sidecar.clone(),
            Arc::new(Unsubscribe(Some(parts.unsubscriber.clone()))),
            Arc::new(send_time.clone()),
        ];
        Ok(IntakeSystem {
            intake: Intake::new(stages, enqueue.clone()),
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
