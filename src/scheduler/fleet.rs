//! Suspensions across a fleet (`[cluster]`): an operator who suspends delivery to a domain
//! (or all delivery) means the sender, not one node. The fleet's suspensions are a Redis hash
//! (`{p}:suspend`, destination or `*` -> the [`Suspension`] as JSON); a suspend or resume on
//! any node writes it, and every node reconciles its own suspensions (memory + spool, as
//! alone) with it every [`SYNC_EVERY`]: what the fleet has and this node lacks is set, what
//! this node has from the fleet and the fleet no longer has is resumed (its parked mail due).
//!
//! While Redis is away a node's own suspends and resumes apply to it at once and wait in
//! memory; they are written to the fleet (last writer wins) before its next reconcile. A
//! node restarted during an outage keeps its spool's suspensions but forgets the unsent
//! changes (documented in OPERATIONS.md).

use super::{Scheduler, Suspension};
use crate::cluster::Store;
use crate::telemetry::ClusterOutbox;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tracing::{debug, info};

/// How often a node reconciles its suspensions with the fleet's.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);

const ALL: &str = "*";

/// This node's link to the fleet's suspensions.
pub struct FleetSuspensions {
    store: Arc<Store>,
    /// Changes made here that the fleet has not taken yet: destination -> the suspension
    /// (`None`: resumed), in order.
    unsent: Mutex<Vec<(Option<String>, Option<Suspension>)>>,
}

fn field(destination: Option<&str>) -> String {
    destination.unwrap_or(ALL).to_owned()
}

impl FleetSuspensions {
    pub fn new(store: Arc<Store>) -> FleetSuspensions {
        FleetSuspensions {
            store,
            unsent: Mutex::new(Vec::new()),
        }
    }

    fn key(&self) -> String {
        self.store.key("suspend")
    }

    /// Tells the fleet of a suspend (`Some`) or resume (`None`) made on this node; kept for
    /// later if the store does not answer.
    pub async fn publish(&self, destination: Option<&str>, suspension: Option<&Suspension>) {
        let entry = (destination.map(str::to_owned), suspension.cloned());
        self.unsent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(entry);
        self.count();
        self.flush().await;
    }

    /// Writes the unsent changes in order; stops at the first failure.
    async fn flush(&self) -> bool {
        loop {
            let Some((destination, suspension)) = self
                .unsent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .first()
                .cloned()
            else {
                return true;
            };
            let cmd = match &suspension {
                Some(s) => {
                    let mut c = redis::cmd("HSET");
                    c.arg(self.key())
                        .arg(field(destination.as_deref()))
                        .arg(serde_json::to_string(s).unwrap_or_default());
                    c
                }
                None => {
                    let mut c = redis::cmd("HDEL");
                    c.arg(self.key()).arg(field(destination.as_deref()));
                    c
                }
            };
            if self.store.query::<i64>(&cmd).await.is_err() {
                return false;
            }
            self.unsent
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(0);
            self.count();
        }
    }

    /// `tern_cluster_outbox_depth{state="suspensions"}`: the unsent changes now.
    fn count(&self) {
        let n = self
            .unsent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len();
        self.store
            .metrics()
            .cluster()
            .outbox_is(ClusterOutbox::Suspensions, n as u64);
    }

    /// The fleet's active suspensions, after writing this node's unsent changes.
    async fn fetch(&self, now: u64) -> Result<BTreeMap<Option<String>, Suspension>, String> {
        if !self.flush().await {
            return Err("fleet store unreachable".to_owned());
        }
        let all: BTreeMap<String, String> = self
            .store
            .query(redis::cmd("HGETALL").arg(self.key()))
            .await?;
        let mut active = BTreeMap::new();
        for (field, json) in all {
            let Ok(s) = serde_json::from_str::<Suspension>(&json) else {
                continue;
            };
            if s.until_ms.is_some_and(|until| until <= now) {
                // Over: gone from the fleet too (any node may clear it).
                let _ = self
                    .store
                    .query::<i64>(redis::cmd("HDEL").arg(self.key()).arg(&field))
                    .await;
                continue;
            }
            active.insert(s.destination.clone(), s);
        }
        Ok(active)
    }
}

impl Scheduler {
    /// Reconciles this node's suspensions with the fleet's every [`SYNC_EVERY`] until
    /// shutdown. Only suspensions that came from the fleet are resumed when the fleet drops
    /// them; `delivery.suspended` (this node's config) is never touched.
    pub(super) async fn follow_fleet(&self, fleet: Arc<FleetSuspensions>) {
        let mut from_fleet: BTreeMap<Option<String>, Suspension> = BTreeMap::new();
        loop {
            tokio::select! {
                () = tokio::time::sleep(SYNC_EVERY) => {}
                () = self.inner.shutdown.cancelled() => return,
            }
            let now = crate::clock::now_ms();
            let fleet_now = match fleet.fetch(now).await {
                Ok(f) => f,
                Err(err) => {
                    debug!(error = %err, "fleet suspensions not reconciled");
                    continue;
                }
            };
            let mine: BTreeMap<Option<String>, Suspension> = self
                .inner
                .suspensions
                .list(now)
                .into_iter()
                .map(|s| (s.destination.clone(), s))
                .collect();
            for (destination, s) in &fleet_now {
                if mine.get(destination) != Some(s) {
                    info!(?destination, reason = %s.reason, "suspended by the fleet");
                    if let Err(err) = self
                        .inner
                        .suspensions
                        .set(&self.inner.spool, s.clone())
                        .await
                    {
                        debug!(error = %err, "cannot store a fleet suspension");
                    }
                }
            }
            for (destination, s) in &mine {
                let gone = !fleet_now.contains_key(destination);
                // Ours from the fleet (or the same one the fleet had): the fleet resumed it.
                if gone && (from_fleet.get(destination) == Some(s)) {
                    info!(?destination, "resumed by the fleet");
                    if let Err(err) = self.resume_local(destination.as_deref()).await {
                        debug!(error = %err, "cannot resume a fleet suspension");
                    }
                }
            }
            from_fleet = fleet_now;
        }
    }
}
