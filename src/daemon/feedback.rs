//! The feedback subsystem: the suppression list, events and their webhook senders, and the
//! bounce processor that turns mail to the bounce domains into suppressions and events.
//!
//! Its tasks stop with the daemon's stop token; shutdown waits for them (a webhook batch in
//! flight ends, an inbound record being processed is finished or left for the next start).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tern_queue::Spool;
use tokio_util::task::TaskTracker;
use tracing::warn;

use super::{Background, Reloaded, Subsystem};
use crate::bounce::classify::Classifier;
use crate::config::Config;
use crate::events::Events;
use crate::feedback::loops::FeedbackLoops;
use crate::feedback::{Feedback, Processor};
use crate::maillog::DeliveryLog;
use crate::origin::Origin;
use crate::suppression::Suppressions;
use crate::telemetry::Metrics;
use crate::unsubscribe::Unsubscriber;
use crate::verp::Verp;

pub struct FeedbackSystem {
    pub feedback: Feedback,
    /// One-click unsubscribe: tokens, headers, and what using one does.
    pub unsubscriber: Arc<Unsubscriber>,
    /// The webhook senders and the bounce processor.
    tasks: TaskTracker,
}

impl FeedbackSystem {
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        config: &Config,
        spool: &Spool,
        log: &DeliveryLog,
        metrics: &Arc<Metrics>,
        classifier: Arc<Classifier>,
        verp: Option<Verp>,
        origin: Origin,
        cluster: Option<Arc<crate::cluster::Store>>,
        bg: &Background,
    ) -> anyhow::Result<Self> {
        let events = Events::new(
            spool.clone(),
            config.webhooks.len(),
            log.clone(),
            metrics.clone(),
            bg.tasks.clone(),
        );
        let suppressions = match cluster {
            // The fleet's list: this node's copy, its outbox pushed, the fleet's stream followed.
            Some(store) => {
                let pushed = Arc::new(tokio::sync::Notify::new());
                let list = Suppressions::replicated(
                    spool.clone(),
                    config.suppression.clone(),
                    metrics.clone(),
                    pushed.clone(),
                );
                crate::cluster::suppression::start(
                    store,
                    list.clone(),
                    pushed,
                    &bg.tasks,
                    bg.stop.clone(),
                );
                list
            }
            None => Suppressions::new(spool.clone(), config.suppression.clone(), metrics.clone()),
        };
        // A scan of every outbox and of the whole list: in the background, so a large backlog
        // or list does not delay the start.
        let (counting, counted) = (events.clone(), suppressions.clone());
        bg.tasks.spawn_blocking(move || {
            if let Err(err) = counting.count_backlogs() {
                warn!(error = %err, "cannot count the webhook outboxes for metrics");
            }
            if let Err(err) = counted.count_entries() {
                warn!(error = %err, "cannot count the suppression list for metrics");
            }
        });
        let feedback = Feedback::new(
            suppressions,
            events.clone(),
            config.bounce.domains.clone(),
            metrics.clone(),
        );
        let secret = crate::secret_file::read_or_create(
            &config.unsubscribe_key_path(),
            "unsubscribe.key_file",
            32,
        )
        .map_err(anyhow::Error::msg)?;
        let base_url = config
            .unsubscribe
            .base_url
            .clone()
            .or_else(|| config.sidecar.tracking.as_ref().map(|t| t.base_url.clone()));
        let unsubscriber = Arc::new(Unsubscriber::new(
            &config.unsubscribe,
            base_url,
            secret.as_bytes(),
            &config.bounce.domains,
            feedback.suppressions.clone(),
            feedback.events.clone(),
        ));
        let tasks = TaskTracker::new();
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
            tasks.spawn(crate::events::webhook::run(
                events.clone(),
                i,
                hook.clone(),
                tls,
                secret,
                bg.stop.clone(),
            ));
        }
        tasks.spawn(
            Processor {
                spool: spool.clone(),
                feedback: feedback.clone(),
                classifier,
                verp,
                origin,
                trust_window_days: config.bounce.trust_window.as_secs() / 86_400,
                max_recipients: config.limits.max_recipients,
                feedback_loops: FeedbackLoops::new(
                    &config.bounce.feedback_loops,
                    &config.delivery.nameservers,
                )
                .map_err(anyhow::Error::msg)?
                .map(Arc::new),
                hostname: config.server.hostname.to_ascii_lowercase(),
                unsubscriber: Some(unsubscriber.clone()),
                feedback_sender_id: config.sidecar.feedback_sender_id.clone(),
            }
            .run(bg.stop.clone()),
        );
        tasks.close();
        Ok(FeedbackSystem {
            feedback,
            unsubscriber,
            tasks,
        })
    }
}

impl Subsystem for FeedbackSystem {
    /// Webhooks, bounce domains and the suppression mode are restart keys: nothing here
    /// changes live.
    fn reconfigure(&self, _reloaded: &Reloaded) {}

    async fn shutdown(self, _grace: Duration) {
        self.tasks.wait().await;
    }
}
