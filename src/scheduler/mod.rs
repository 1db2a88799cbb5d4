//! The scheduler: which message is attempted when, and by which worker.
//!
//! Mail reaches a [`ReadyQueue`] two ways: new mail straight from ingest (the channel given to
//! [`Scheduler::start`]), and deferred mail from the spool's due index, loaded by the due
//! loader only once it falls due within [`LOAD_HORIZON`] (invariant: memory holds only what is
//! due soon), and never more than `MAX_IN_MEMORY` messages at once: what does not fit waits
//! in the spool for a later pass. The window arithmetic (`LoadWindow`, `State::admit`,
//! `State::take_due`) is pure; the loader adds the spool read. Each message is routed when it
//! becomes ready; its ready queue is the route's destination key, so domains served by the
//! same MX hosts share one queue and one set of connections.
//!
//! Routing needs an MX lookup unless a static route (or an address literal) answers; static
//! plans never wait for DNS or for a routing slot. Lookups run at most [`MAX_ROUTING`] at
//! once, and at most [`MAX_ROUTING_PER_DOMAIN`] of one recipient domain ([`lookups`]), so a
//! slow or dead domain holds a few routing slots, never all of them; while its mail waits, a
//! temporary failure of its lookup is remembered for [`LOOKUP_FAILURE_MEMORY`] and that mail
//! is deferred at once.
//!
//! Each ready queue has at most `max_connections_per_destination` workers. A worker pops
//! messages one by one and delivers them over one connection it keeps between messages, so a
//! busy destination sees few, long-lived connections. A watchdog restarts the workers of a
//! queue that has mail and made no progress for `delivery.watchdog`.
//!
//! Suspensions ([`suspend`]): while all delivery is suspended nothing is loaded, routed or
//! attempted, and mail stays in the spool's due index untouched. A message of a suspended
//! destination that reaches routing or a worker is *parked* instead: its due time becomes the
//! suspension's end ([`NOT_DUE`] if none) and it leaves memory, so it is neither attempted,
//! nor counted as an attempt, nor reloaded until then. When the suspension ends (resumed, or
//! its time ran out) the destination's parked messages are made due at once.
//!
//! Operator actions on messages ([`Operation`]) are carried out by the settler under the
//! message's lock (see `outcome::operator`); the scheduler only pulls timers forward and
//! wakes the due loader where they make mail due.
//!
//! Invariants:
//! - A message id is in memory (`State::in_memory`) from the moment it is queued or loaded
//!   until its outcome is written to the spool; the due loader skips such ids, so no message
//!   is ever attempted twice at once.
//! - Workers never touch sled directly: reads and writes go through the spool API.
//! - `[delivery]` is a [`Live`] snapshot: a reload ([`Scheduler::reconfigure`]) changes the
//!   worker limit for queues from their next enqueue and the watchdog period from its next
//!   tick; workers already running are not stopped.

pub mod drain;
pub mod fleet;
mod lookups;
mod ready;
pub mod suspend;

pub use ready::ReadyQueue;
pub use suspend::{Suspension, Suspensions};

use crate::clock::now_ms;
use crate::config::DeliveryConfig;
use crate::delivery::client::{Connection, Lease};
use crate::delivery::worker::{Outbound, Worker};
use crate::enqueue::NewMessage;
use crate::live::Live;
use crate::outcome::operator::NOT_DUE;
use crate::outcome::Settler;
use crate::routing::route::{RouteError, RoutePlan, Router};
use crate::shaping::{Admission, Lane, Pair, Shaper};
use crate::telemetry::Metrics;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};
use tern_queue::{Envelope, MessageId, Spool, SpoolError};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

/// Deferred mail is loaded into memory this long before it is due.
pub const LOAD_HORIZON: Duration = Duration::from_secs(60);
/// The due loader looks at the spool at least this often.
const LOAD_INTERVAL: Duration = Duration::from_secs(5);
/// At most this many messages are held in memory (ready, timed or in flight); beyond it the
/// due loader waits, so a huge backlog due at once is worked through in slices.
const MAX_IN_MEMORY: usize = 200_000;
/// Messages being routed (DNS lookups) at the same time.
const MAX_ROUTING: usize = 256;
/// Lookups of one recipient domain at the same time: a domain whose name servers hang holds
/// at most this many of the [`MAX_ROUTING`] slots.
const MAX_ROUTING_PER_DOMAIN: usize = 4;
/// How long a temporary lookup failure of a domain answers for its other waiting mail.
const LOOKUP_FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// What an operator can do to a spooled message (see `outcome::operator`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// Make a deferred message due now.
    Retry,
    Hold,
    Release,
    /// Fail every pending recipient and send the DSN.
    Bounce,
    /// Remove without a DSN.
    Delete,
}

#[derive(Clone)]
pub struct Scheduler {
    inner: Arc<Inner>,
}

struct Inner {
    spool: Spool,
    router: Arc<Router>,
    worker: Arc<Worker>,
    settler: Arc<Settler>,
    shaper: Arc<Shaper>,
    config: Live<DeliveryConfig>,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    /// The `delivery.suspended` config flag, until an operator resumes all delivery. While
    /// it (or a suspension of all delivery) is set, nothing is loaded, routed or attempted.
    suspended: AtomicBool,
    suspensions: Suspensions,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    /// Wakes the due loader early (a timer earlier than its current sleep was added).
    wake_loader: tokio::sync::Notify,
    /// Bounds the MX lookups in flight.
    routing: tokio::sync::Semaphore,
    /// Bounds them per recipient domain.
    lookups: Arc<lookups::DomainLookups>,
    /// The fleet's suspensions (`[cluster]`): suspends and resumes made here go there too.
    fleet: Option<Arc<fleet::FleetSuspensions>>,
}

#[derive(Default)]
struct State {
    queues: HashMap<String, ReadyQueue>,
    in_memory: HashSet<MessageId>,
    /// Messages loaded from the spool that are not due yet, by due time.
    timers: BTreeSet<(u64, MessageId)>,
}

impl State {
    /// Takes in entries of the due index, earliest first, up to `room` of them: each goes
    /// into memory on a timer for its due time. An id already in memory is skipped and not
    /// counted; entries beyond `room` stay in the spool for a later pass. Returns how many
    /// were taken in.
    fn admit(&mut self, due: Vec<(u64, MessageId)>, room: usize) -> usize {
        let mut loaded = 0;
        for (t, id) in due {
            if loaded == room {
                break;
            }
            if self.in_memory.insert(id) {
                self.timers.insert((t, id));
                loaded += 1;
            }
        }
        loaded
    }

    /// Removes the timers due at `now` and returns their ids, earliest first; later ones
    /// keep waiting.
    fn take_due(&mut self, now: u64) -> Vec<MessageId> {
        let mut due = Vec::new();
        while let Some(&(t, id)) = self.timers.first() {
            if t > now {
                break;
            }
            self.timers.pop_first();
            due.push(id);
        }
        due
    }
}

/// One pass of the due loader: it reads the due index up to `horizon` ([`LOAD_HORIZON`]
/// ahead), at most `limit` entries, and takes in at most `room` of them, so memory never
/// holds more than [`MAX_IN_MEMORY`] messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LoadWindow {
    horizon: u64,
    room: usize,
    /// Ids already in memory are skipped, so the read asks for that many more than there is
    /// room.
    limit: usize,
}

impl LoadWindow {
    /// The window at `now` with `in_memory` messages in memory; `None` when memory is full
    /// and the pass loads nothing.
    fn at(now: u64, in_memory: usize) -> Option<LoadWindow> {
        let room = MAX_IN_MEMORY.saturating_sub(in_memory);
        if room == 0 {
            return None;
        }
        Some(LoadWindow {
            horizon: horizon(now),
            room,
            limit: room + in_memory,
        })
    }
}

/// The latest due time loaded (or kept) in memory at `now`.
fn horizon(now: u64) -> u64 {
    now + LOAD_HORIZON.as_millis() as u64
}

/// Whether a message due at `due` is close enough at `now` to wait in memory on a timer
/// rather than in the spool's due index.
fn due_soon(due: u64, now: u64) -> bool {
    due <= horizon(now)
}

/// The ready queue of a route plan: its destination key, prefixed by the source-IP pool's
/// name when pools are configured (`pool`), so pools never share connections.
fn queue_key(pool: Option<&str>, plan_key: &str) -> String {
    match pool {
        Some(pool) => format!("{pool}/{plan_key}"),
        None => plan_key.to_string(),
    }
}

impl Scheduler {
    /// Loads the stored suspensions and starts the due loader, the new-mail intake and the
    /// watchdog.
    // One argument per collaborator; wired once, by the daemon.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        spool: Spool,
        router: Arc<Router>,
        worker: Arc<Worker>,
        settler: Arc<Settler>,
        shaper: Arc<Shaper>,
        config: DeliveryConfig,
        metrics: Arc<Metrics>,
        new_mail: mpsc::UnboundedReceiver<Vec<NewMessage>>,
        cluster: Option<Arc<crate::cluster::Store>>,
    ) -> Result<Scheduler, SpoolError> {
        let suspensions = Suspensions::load(&spool)?;
        let suspended = AtomicBool::new(config.suspended);
        let inner = Arc::new(Inner {
            spool,
            router,
            worker,
            settler,
            shaper,
            config: Live::new(config),
            metrics,
            state: Mutex::new(State::default()),
            suspended,
            suspensions,
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
            wake_loader: tokio::sync::Notify::new(),
            routing: tokio::sync::Semaphore::new(MAX_ROUTING),
            lookups: lookups::DomainLookups::new(MAX_ROUTING_PER_DOMAIN, LOOKUP_FAILURE_MEMORY),
            fleet: cluster.map(|store| Arc::new(fleet::FleetSuspensions::new(store))),
        });
        let scheduler = Scheduler { inner };
        let s = scheduler.clone();
        scheduler
            .inner
            .tasks
            .spawn(async move { s.intake(new_mail).await });
        let s = scheduler.clone();
        scheduler
            .inner
            .tasks
            .spawn(async move { s.due_loader().await });
        let s = scheduler.clone();
        scheduler
            .inner
            .tasks
            .spawn(async move { s.watchdog().await });
        if let Some(fleet) = scheduler.inner.fleet.clone() {
            let s = scheduler.clone();
            scheduler
                .inner
                .tasks
                .spawn(async move { s.follow_fleet(fleet).await });
        }
        Ok(scheduler)
    }

    /// Stops dispatching and waits (up to `grace`) for workers to finish their message.
    pub async fn shutdown(&self, grace: Duration) {
        self.inner.shutdown.cancel();
        self.inner.tasks.close();
        if tokio::time::timeout(grace, self.inner.tasks.wait())
            .await
            .is_err()
        {
            warn!("delivery workers still busy after the grace period");
        }
    }

    /// Applies a reloaded `[delivery]`. `suspended` is not taken from it: whether delivery is
    /// suspended is run-time state.
    pub fn reconfigure(&self, config: DeliveryConfig) {
        self.inner.config.set(config);
    }

    /// Messages in memory: ready, waiting for their due time, or in flight.
    pub fn in_memory(&self) -> usize {
        self.state().in_memory.len()
    }

    /// Ready-queue depth per destination key.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        self.state()
            .queues
            .iter()
            .map(|(k, q)| (k.clone(), q.len()))
            .collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    async fn intake(&self, mut new_mail: mpsc::UnboundedReceiver<Vec<NewMessage>>) {
        loop {
            let batch = tokio::select! {
                batch = new_mail.recv() => match batch { Some(b) => b, None => return },
                _ = self.inner.shutdown.cancelled() => return,
            };
            if self.all_suspended() {
                // Durable already; the due loader finds it once delivery resumes.
                continue;
            }
            let now = now_ms();
            for msg in batch {
                if msg.due_ms > now {
                    // Scheduled for later (send-time optimisation): it waits in the spool's
                    // due index like deferred mail, and the loader takes it in when due.
                    continue;
                }
                if self.state().in_memory.insert(msg.id) {
                    self.spawn_route(msg.id, msg.domain, msg.pool);
                }
            }
        }
    }

    /// Routes on a task of its own: a DNS lookup that takes its full timeout must not hold up
    /// mail for other domains.
    fn spawn_route(&self, id: MessageId, domain: String, pool: Option<String>) {
        let s = self.clone();
        self.inner
            .tasks
            .spawn(async move { s.route(id, &domain, pool.as_deref()).await });
    }

    /// The route plan of `domain`: a static one at once, else an MX lookup within the
    /// routing limits. At most [`MAX_ROUTING`] lookups run at once, so a backlog that falls
    /// due together (after a restart, say) does not fire a DNS query per message all at the
    /// same moment, and at most [`MAX_ROUTING_PER_DOMAIN`] of them are for one domain.
    async fn plan(&self, domain: &str) -> Result<RoutePlan, RouteError> {
        let router = &self.inner.router;
        if let Some(plan) = router.static_plan(domain) {
            return Ok(plan);
        }
        let slot = self.inner.lookups.acquire(domain).await;
        if let Some(err) = slot.recent_failure(tokio::time::Instant::now()) {
            return Err(err);
        }
        // The semaphore is never closed, so acquiring cannot fail.
        let _routing = self.inner.routing.acquire().await;
        let plan = router.plan(domain).await;
        if let Err(err @ RouteError::Temporary { .. }) = &plan {
            slot.failed(err, tokio::time::Instant::now());
        }
        plan
    }

    /// Routes a message that is in memory and due, and puts it on its ready queue. A routing
    /// failure is an outcome like any other: the settler defers or bounces the message.
    /// The ready queue is the destination key, prefixed by the source-IP pool when pools are
    /// configured, so pools never share connections.
    async fn route(&self, id: MessageId, domain: &str, pool: Option<&str>) {
        if self.hold_back(id, domain).await {
            self.release(id);
            return;
        }
        match self.plan(domain).await {
            Ok(plan) => {
                let shaper = &self.inner.shaper;
                let pool = shaper.pools().resolve(pool, domain);
                let lane = shaper.lane(&pool, domain, &plan);
                let configured = shaper.pools().configured();
                let plain = self.inner.config.get().tls;
                let key = queue_key(
                    configured.then_some(pool.name.as_str()),
                    &plan.queue_key(plain),
                );
                self.enqueue(id, plan, key, lane)
            }
            Err(err) => {
                debug!(%id, domain, error = %err, "routing failed");
                let next_due = self.inner.settler.route_failed(id, &err).await;
                self.reschedule(id, next_due);
            }
        }
    }

    fn enqueue(&self, id: MessageId, plan: RoutePlan, key: String, lane: Arc<Lane>) {
        let mut state = self.state();
        let queue = state
            .queues
            .entry(key.clone())
            .or_insert_with(|| ReadyQueue::new(key.clone()));
        queue.lane = Some(lane);
        queue.push(id, plan);
        let max = self.inner.config.get().max_connections_per_destination;
        let spawn = queue.workers_wanted(max);
        for _ in 0..spawn {
            queue.worker_started();
        }
        drop(state);
        for _ in 0..spawn {
            self.spawn_worker(key.clone());
        }
    }

    fn spawn_worker(&self, key: String) {
        let s = self.clone();
        self.inner.tasks.spawn(async move { s.work(key).await });
    }

    /// One worker: delivers messages from one ready queue over one connection at a time.
    async fn work(&self, key: String) {
        let lane = self.state().queues.get(&key).and_then(|q| q.lane.clone());
        // The shaping pair (source, bucket) the current connection belongs to.
        let mut pair: Option<Arc<Pair>> = None;
        let mut connection = None;
        let mut settling: Option<tokio::task::JoinHandle<()>> = None;
        loop {
            let next = {
                let mut state = self.state();
                let next = match state.queues.get_mut(&key) {
                    Some(q) if !self.inner.shutdown.is_cancelled() => q.pop(),
                    _ => None,
                };
                if next.is_none() {
                    // Stopping under the same lock as the empty pop: a message queued right
                    // after sees this worker gone and starts a new one.
                    if let Some(q) = state.queues.get_mut(&key) {
                        q.worker_stopped();
                        if q.is_idle() {
                            state.queues.remove(&key);
                        }
                    }
                }
                next
            };
            let Some((id, plan)) = next else { break };
            let mut stored = self.inner.spool.envelope(id);
            if let Ok(Some(envelope)) = &stored {
                // Not before its scheduled time, whichever path brought it here.
                if envelope.held
                    || envelope.not_before_ms > now_ms()
                    || self.hold_back(id, &envelope.destination).await
                {
                    stored = Ok(None);
                }
            }
            let attempted = match stored {
                Ok(Some(envelope)) => match self.inner.spool.body_of(&envelope) {
                    Ok(Some(body)) => {
                        // At most one outcome per worker is unrecorded while the next message
                        // is sent: a crash repeats at most two deliveries per connection.
                        if let Some(previous) = settling.take() {
                            let _ = previous.await;
                        }
                        // Domains behind the same hosts share this queue, and so this
                        // worker's connection; one opened under a weaker policy than this
                        // message's domain asks goes back to the pool instead.
                        if let Some(conn) =
                            connection.take_if(|c| !self.inner.worker.fits(c, &plan))
                        {
                            self.inner.worker.park(conn).await;
                        }
                        let outbound = match &lane {
                            // Shutdown does not wait for a shaping wait: the message stays
                            // due in the spool.
                            Some(lane) => tokio::select! {
                                shaped = self.shape(&key, lane, &plan, &mut pair, &mut connection) => shaped,
                                _ = self.inner.shutdown.cancelled() => {
                                    self.release(id);
                                    continue;
                                }
                            },
                            None => Ok(Outbound::default()),
                        };
                        let outbound = match outbound {
                            Ok(outbound) => outbound,
                            Err(due) => {
                                self.put_back(envelope, due).await;
                                if let Some(q) = self.state().queues.get_mut(&key) {
                                    q.progressed();
                                }
                                continue;
                            }
                        };
                        let started = Instant::now();
                        let mut attempt = self
                            .inner
                            .worker
                            .attempt(&envelope, &body, &plan, &mut connection, outbound)
                            .await;
                        self.inner.metrics.delivery_attempt(started.elapsed());
                        if let Some(pair) = &pair {
                            self.inner.shaper.observe(pair, &mut attempt);
                            let max = pair.max_messages_per_connection();
                            if connection
                                .as_ref()
                                .zip(max)
                                .is_some_and(|(c, max)| c.messages_sent() >= max)
                            {
                                if let Some(conn) = connection.take() {
                                    conn.quit().await;
                                }
                            }
                        }
                        // The outcome is recorded on a task of its own, so this worker's
                        // connection carries the next message while the spool write waits
                        // for its fsync round. The id stays in memory until the write is
                        // done, so the due loader cannot pick the message up meanwhile.
                        let s = self.clone();
                        settling = Some(self.inner.tasks.spawn(async move {
                            let next_due = s
                                .inner
                                .settler
                                .settle(envelope, &body, &plan, attempt)
                                .await;
                            s.reschedule(id, next_due);
                        }));
                        true
                    }
                    Ok(None) => {
                        warn!(%id, "envelope without body; skipped");
                        false
                    }
                    Err(err) => {
                        warn!(%id, error = %err, "cannot read body");
                        false
                    }
                },
                Ok(None) => false, // removed, held or held back meanwhile
                Err(err) => {
                    warn!(%id, error = %err, "cannot read envelope");
                    false
                }
            };
            if !attempted {
                self.release(id);
            }
            if let Some(q) = self.state().queues.get_mut(&key) {
                q.progressed();
            }
        }
        if let Some(conn) = connection {
            self.inner.worker.park(conn).await;
        }
    }

    /// Shaping before one message: picks the pair for a new connection, waits for its rate
    /// and suspension, and for a connection slot when a connection must be opened. `Err` is
    /// the due time to put the message back on (a long wait, or a warm-up cap).
    async fn shape(
        &self,
        key: &str,
        lane: &Lane,
        plan: &RoutePlan,
        pair: &mut Option<Arc<Pair>>,
        connection: &mut Option<Connection>,
    ) -> Result<Outbound, u64> {
        let shaper = &self.inner.shaper;
        loop {
            let p = match pair {
                Some(p) if connection.is_some() => p.clone(),
                _ => {
                    let p = lane.choose();
                    *pair = Some(p.clone());
                    p
                }
            };
            self.shaping_wait(key, true);
            let admission = shaper.admit(lane, &p).await;
            self.shaping_wait(key, false);
            match admission {
                Admission::Go => {}
                Admission::SwitchTo(other) => {
                    if let Some(conn) = connection.take() {
                        self.inner.worker.park(conn).await;
                    }
                    *pair = Some(other.0);
                    continue;
                }
                Admission::Later(due) => return Err(due),
            }
            let worker = &self.inner.worker;
            if connection.is_none() {
                // An idle connection of this pair to one of the plan's hosts (perhaps opened
                // for another domain behind them) already holds a slot: no new one.
                *connection = worker.take_pooled(plan, p.source.ip, Some(p.key())).await;
            }
            let lease: Option<Box<dyn Lease>> = if connection.is_none() {
                self.shaping_wait(key, true);
                // Only the pair's longest-idle connection makes room: the others may still
                // be reused by the hosts they are open to.
                let slot = shaper
                    .open_slot(&p, |pair| {
                        worker.evict_idle_oldest(|c| {
                            c.lease().is_some_and(|l| l.group() == pair.key())
                        });
                    })
                    .await;
                self.shaping_wait(key, false);
                Some(Box::new(slot))
            } else {
                None
            };
            return Ok(Outbound {
                source: p.source.ip,
                ehlo: p.source.ehlo.clone(),
                lease,
            });
        }
    }

    fn shaping_wait(&self, key: &str, waiting: bool) {
        if let Some(q) = self.state().queues.get_mut(key) {
            q.shaping_wait(waiting);
        }
    }

    /// Puts a message that shaping holds back on a due time; not an attempt.
    async fn put_back(&self, mut envelope: Envelope, due: u64) {
        let id = envelope.id;
        envelope.next_due_ms = due;
        match self.inner.spool.update(&envelope).await {
            Ok(()) => self.reschedule(id, Some(due)),
            Err(err) => {
                warn!(%id, error = %err, "cannot put back a message held by shaping");
                self.release(id);
            }
        }
    }

    /// After an attempt: a retry due within the horizon stays in memory on a timer (and the
    /// loader is woken, as it may be sleeping past it); anything else leaves memory and is
    /// found again in the spool's due index.
    fn reschedule(&self, id: MessageId, next_due: Option<u64>) {
        let now = now_ms();
        match next_due {
            Some(due) if due_soon(due, now) && !self.inner.shutdown.is_cancelled() => {
                self.state().timers.insert((due, id));
                self.inner.wake_loader.notify_one();
            }
            _ => self.release(id),
        }
    }

    /// The message's outcome is in the spool: it may be loaded again when next due.
    fn release(&self, id: MessageId) {
        self.state().in_memory.remove(&id);
    }

    /// Loads deferred mail that falls due within the horizon and releases timers when due.
    async fn due_loader(&self) {
        loop {
            let now = now_ms();
            self.load_due(now);
            let due = self.state().take_due(now);
            for id in due {
                match self.inner.spool.envelope(id) {
                    // The index entry the timer came from may predate the last attempt's
                    // outcome: the envelope's own due time decides.
                    Ok(Some(env)) if env.next_due_ms > now => {
                        if due_soon(env.next_due_ms, now) {
                            self.state().timers.insert((env.next_due_ms, id));
                        } else {
                            self.release(id);
                        }
                    }
                    Ok(Some(env)) if !env.held => self.spawn_route(id, env.destination, env.pool),
                    Ok(_) => self.release(id),
                    Err(err) => {
                        warn!(%id, error = %err, "cannot read envelope");
                        self.release(id);
                    }
                }
            }
            let next_timer = self.state().timers.first().map(|&(t, _)| t);
            let sleep = next_timer
                .map(|t| Duration::from_millis(t.saturating_sub(now_ms())))
                .unwrap_or(LOAD_INTERVAL)
                .min(LOAD_INTERVAL);
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = self.inner.wake_loader.notified() => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
        }
    }

    fn load_due(&self, now: u64) {
        if self.inner.suspensions.any_expired(now) {
            let s = self.clone();
            self.inner
                .tasks
                .spawn(async move { s.end_expired_suspensions(now).await });
        }
        if self.all_suspended() {
            return;
        }
        let Some(window) = LoadWindow::at(now, self.in_memory()) else {
            return;
        };
        let due = match self.inner.spool.due_before(window.horizon, window.limit) {
            Ok(due) => due,
            Err(err) => {
                warn!(error = %err, "cannot read the due index");
                return;
            }
        };
        let loaded = self.state().admit(due, window.room);
        if loaded > 0 {
            debug!(loaded, "deferred mail loaded");
        }
    }

    /// Whether all delivery is suspended now (config flag or an operator's suspension).
    fn all_suspended(&self) -> bool {
        self.inner.suspended.load(Ordering::Relaxed)
            || self.inner.suspensions.all(now_ms()).is_some()
    }

    /// Whether a message that is about to be routed or attempted must wait because of a
    /// suspension. A suspended destination's message is parked (see the module doc); under
    /// a suspension of all delivery it simply stays in the spool as it is.
    async fn hold_back(&self, id: MessageId, domain: &str) -> bool {
        if self.all_suspended() {
            return true;
        }
        let Some(suspension) = self.inner.suspensions.of(domain, now_ms()) else {
            return false;
        };
        let until = suspension.until_ms.unwrap_or(NOT_DUE);
        if let Err(err) = self.inner.settler.park(id, until).await {
            // Still not attempted; the due index brings it back and it is parked then.
            warn!(%id, error = %err, "cannot park message of a suspended destination");
        }
        true
    }

    /// Suspends delivery to `destination` (a recipient domain), or all delivery, until
    /// `until_ms` or until resumed. Replaces an earlier suspension of the same destination.
    pub async fn suspend(
        &self,
        destination: Option<String>,
        until_ms: Option<u64>,
        reason: String,
    ) -> Result<Suspension, SpoolError> {
        let suspension = Suspension {
            destination,
            since_ms: now_ms(),
            until_ms,
            reason,
        };
        self.inner
            .suspensions
            .set(&self.inner.spool, suspension.clone())
            .await?;
        if let Some(fleet) = &self.inner.fleet {
            fleet
                .publish(suspension.destination.as_deref(), Some(&suspension))
                .await;
        }
        Ok(suspension)
    }

    /// Ends the suspension of `destination` (`None`: of all delivery, including the
    /// `delivery.suspended` config flag); its parked mail is due at once. Returns whether
    /// there was an active suspension.
    pub async fn resume(&self, destination: Option<&str>) -> Result<bool, SpoolError> {
        let was_active = self.resume_local(destination).await?;
        if let Some(fleet) = &self.inner.fleet {
            fleet.publish(destination, None).await;
        }
        Ok(was_active)
    }

    /// [`Scheduler::resume`] on this node only.
    async fn resume_local(&self, destination: Option<&str>) -> Result<bool, SpoolError> {
        let now = now_ms();
        let removed = self
            .inner
            .suspensions
            .remove(&self.inner.spool, destination)
            .await?;
        let mut was_active = removed.is_some_and(|s| s.until_ms.is_none_or(|u| now < u));
        match destination {
            None => was_active |= self.inner.suspended.swap(false, Ordering::Relaxed),
            Some(domain) => {
                self.unpark(domain).await?;
            }
        }
        self.inner.wake_loader.notify_one();
        Ok(was_active)
    }

    /// Active suspensions; the config flag shows as a suspension of all delivery.
    pub fn suspensions(&self) -> Vec<Suspension> {
        let mut list = self.inner.suspensions.list(now_ms());
        if self.inner.suspended.load(Ordering::Relaxed)
            && list.first().is_none_or(|s| s.destination.is_some())
        {
            list.insert(
                0,
                Suspension {
                    destination: None,
                    since_ms: 0,
                    until_ms: None,
                    reason: "delivery.suspended is set in the configuration".to_string(),
                },
            );
        }
        list
    }

    async fn end_expired_suspensions(&self, now: u64) {
        let expired = match self
            .inner
            .suspensions
            .take_expired(&self.inner.spool, now)
            .await
        {
            Ok(expired) => expired,
            Err(err) => {
                warn!(error = %err, "cannot remove ended suspensions");
                return;
            }
        };
        for suspension in expired {
            debug!(destination = ?suspension.destination, "suspension ended");
            if let Some(domain) = suspension.destination {
                if let Err(err) = self.unpark(&domain).await {
                    warn!(destination = %domain, error = %err, "cannot unpark mail");
                }
            }
        }
        self.inner.wake_loader.notify_one();
    }

    /// Makes the parked mail of `domain` due now. Scans the spool's envelopes (on a blocking
    /// thread): suspensions end rarely, and parked mail is not indexed by destination.
    async fn unpark(&self, domain: &str) -> Result<usize, SpoolError> {
        let spool = self.inner.spool.clone();
        let wanted = domain.to_string();
        let ids = tokio::task::spawn_blocking(move || -> Result<Vec<MessageId>, SpoolError> {
            Ok(spool
                .list()?
                .into_iter()
                .filter(|env| env.parked && env.destination == wanted)
                .map(|env| env.id)
                .collect())
        })
        .await
        .map_err(|e| SpoolError::Sled(format!("spool scan interrupted: {e}")))??;
        let mut unparked = 0;
        for id in ids {
            if self.inner.settler.unpark(id).await? {
                unparked += 1;
            }
        }
        Ok(unparked)
    }

    /// Applies an operator's action to each message; returns how many it changed (messages
    /// gone meanwhile, or already in the wanted state, do not count).
    pub async fn operate(&self, op: Operation, ids: &[MessageId]) -> Result<usize, SpoolError> {
        let settler = &self.inner.settler;
        let mut changed = Vec::new();
        for &id in ids {
            let done = match op {
                Operation::Retry => settler.retry_now(id).await?,
                Operation::Hold => settler.hold(id).await?,
                Operation::Release => settler.release(id).await?,
                Operation::Bounce => settler.bounce(id).await?,
                Operation::Delete => settler.delete(id).await?,
            };
            if done {
                changed.push(id);
            }
        }
        if matches!(op, Operation::Retry | Operation::Release) && !changed.is_empty() {
            // A message waiting on a timer would otherwise wait for its old due time.
            let now = now_ms();
            let wanted: HashSet<MessageId> = changed.iter().copied().collect();
            let mut state = self.state();
            let moved: Vec<(u64, MessageId)> = state
                .timers
                .iter()
                .filter(|(t, id)| *t > now && wanted.contains(id))
                .copied()
                .collect();
            for entry in moved {
                state.timers.remove(&entry);
                state.timers.insert((now, entry.1));
            }
            drop(state);
            self.inner.wake_loader.notify_one();
        }
        Ok(changed.len())
    }

    /// Takes message `id` out of this node's delivery for a live drain: holds it (under its
    /// lock, so no new attempt starts), then waits until no attempt of it is in flight (an
    /// attempt begun before the hold ends and writes its outcome first). Returns the
    /// envelope as it is then; `None` when it is gone (delivered meanwhile) or was held
    /// already (an operator's hold: left alone).
    pub async fn claim(&self, id: MessageId) -> Result<Option<Envelope>, SpoolError> {
        if !self.inner.settler.hold(id).await? {
            return Ok(None);
        }
        loop {
            {
                let mut state = self.state();
                // On a timer: not in flight; out of memory now, held, never reloaded.
                let timer = state.timers.iter().find(|(_, t)| *t == id).copied();
                if let Some(entry) = timer {
                    state.timers.remove(&entry);
                    state.in_memory.remove(&id);
                }
                // Waiting in a ready queue: not in flight either; taken out.
                if state.in_memory.contains(&id) && state.queues.values_mut().any(|q| q.take(id)) {
                    state.in_memory.remove(&id);
                }
                if !state.in_memory.contains(&id) {
                    break;
                }
            }
            // In flight (until its outcome is written) or being routed.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.inner.spool.envelope(id)
    }

    /// The `[delivery]` config in force (a reload replaces it).
    pub fn delivery_config(&self) -> Arc<DeliveryConfig> {
        self.inner.config.get()
    }

    /// Gives a claimed message back to delivery (the drain could not relay it): released,
    /// due at once.
    pub async fn unclaim(&self, id: MessageId) -> Result<(), SpoolError> {
        self.inner.settler.release(id).await?;
        self.inner.wake_loader.notify_one();
        Ok(())
    }

    /// Reports queues that have mail but made no progress for a while, and starts a worker
    /// where the queue is below its worker limit (a queue with mail and no worker at all is
    /// the case this exists for). The timer restarts after each report, so a slow destination
    /// is reported once per period, and never gets more than its limit of workers.
    async fn watchdog(&self) {
        loop {
            // Read each round, so a reload applies from the next tick.
            let config = self.inner.config.get();
            let (period, max) = (config.watchdog, config.max_connections_per_destination);
            tokio::select! {
                _ = tokio::time::sleep((period / 4).max(Duration::from_millis(100))) => {}
                _ = self.inner.shutdown.cancelled() => return,
            }
            let mut restart = Vec::new();
            {
                let mut state = self.state();
                let now = Instant::now();
                for q in state.queues.values_mut() {
                    if !q.is_stuck(now, period) {
                        continue;
                    }
                    warn!(
                        destination = %q.key(),
                        waiting = q.len(),
                        workers = q.workers(),
                        "no delivery progress"
                    );
                    q.progressed();
                    if q.workers() < max {
                        q.worker_started();
                        restart.push(q.key().to_string());
                    }
                }
            }
            for key in restart {
                self.spawn_worker(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_700_000_000_000;
    const WINDOW_MS: u64 = 60_000;

    fn id(n: u64) -> MessageId {
        format!("{n:016X}").parse().unwrap()
    }

    #[test]
    fn load_window_reaches_a_minute_ahead_and_fills_memory_up_to_the_cap() {
        assert_eq!(MAX_IN_MEMORY, 200_000);
        assert_eq!(
            LoadWindow::at(NOW, 0),
            Some(LoadWindow {
                horizon: NOW + WINDOW_MS,
                room: 200_000,
                limit: 200_000,
            })
        );
        // Nearly full: room for the rest only, but the read asks past the ids in memory.
        assert_eq!(
            LoadWindow::at(NOW, 199_990),
            Some(LoadWindow {
                horizon: NOW + WINDOW_MS,
                room: 10,
                limit: 200_000,
            })
        );
        assert_eq!(LoadWindow::at(NOW, 200_000), None, "full: nothing loaded");
        assert_eq!(LoadWindow::at(NOW, 200_001), None);
    }

    #[test]
    fn only_what_falls_due_within_the_window_waits_in_memory() {
        assert!(due_soon(NOW - 1, NOW), "overdue");
        assert!(due_soon(NOW + WINDOW_MS, NOW), "the window's end is inside");
        assert!(
            !due_soon(NOW + WINDOW_MS + 1, NOW),
            "later: left in the spool"
        );
    }

    #[test]
    fn admit_takes_in_at_most_the_room_and_leaves_the_rest_for_the_next_pass() {
        let mut state = State::default();
        state.in_memory.insert(id(2)); // in flight: skipped, not counted
        let due = vec![
            (NOW, id(1)),
            (NOW, id(2)),
            (NOW + 10, id(3)),
            (NOW + 20, id(4)),
        ];
        assert_eq!(state.admit(due.clone(), 2), 2);
        assert_eq!(
            state.timers.iter().copied().collect::<Vec<_>>(),
            [(NOW, id(1)), (NOW + 10, id(3))],
            "the earliest two, on timers for their due time"
        );
        assert!(
            !state.in_memory.contains(&id(4)),
            "beyond the room: not loaded"
        );

        // The next pass reads the index again: what is in memory is skipped, the rest loads.
        assert_eq!(state.admit(due, 2), 1);
        assert!(state.in_memory.contains(&id(4)));
        assert!(state.timers.contains(&(NOW + 20, id(4))));
        assert!(!state.timers.iter().any(|&(_, i)| i == id(2)));
        assert_eq!(state.admit(Vec::new(), 5), 0);
    }

    #[test]
    fn take_due_releases_only_timers_due_by_now_earliest_first() {
        let mut state = State::default();
        for (t, n) in [(NOW + 1, 3), (NOW, 2), (NOW - 5, 1), (NOW + WINDOW_MS, 4)] {
            state.timers.insert((t, id(n)));
        }
        assert_eq!(state.take_due(NOW), [id(1), id(2)]);
        assert_eq!(state.take_due(NOW), [], "taken once");
        assert_eq!(
            state.timers.iter().copied().collect::<Vec<_>>(),
            [(NOW + 1, id(3)), (NOW + WINDOW_MS, id(4))]
        );
        assert_eq!(state.take_due(NOW + WINDOW_MS), [id(3), id(4)]);
        assert!(state.timers.is_empty());
    }

    #[test]
    fn one_ready_queue_per_destination_and_pool() {
        assert_eq!(queue_key(None, "mx:a.example"), "mx:a.example");
        assert_eq!(queue_key(Some("bulk"), "mx:a.example"), "bulk/mx:a.example");
        assert_ne!(
            queue_key(Some("bulk"), "mx:a.example"),
            queue_key(Some("transactional"), "mx:a.example"),
            "pools never share a queue"
        );
    }
}

#[cfg(test)]
mod classification_tests {
    //! The scheduler hands each attempt to shaping, then to the settler: both must read one
    //! classification of each reply.

    use crate::bounce::classify::Classifier;
    use crate::config::{Config, TlsPolicy};
    use crate::delivery::client::RemoteReply;
    use crate::delivery::worker::{Attempt, RcptOutcome, Verdict};
    use crate::routing::route::{Hop, RoutePlan};
    use crate::shaping::limiter::Backend;
    use crate::shaping::{PairView, Shaper};
    use crate::taxonomy::Category;
    use crate::telemetry::Metrics;
    use std::sync::Arc;

    fn reply(code: u16, status: &str, text: &str) -> RemoteReply {
        RemoteReply {
            code,
            status: Some(status.into()),
            text: text.into(),
        }
    }

    /// Local-only shaping over `config`; its spool lives as long as the directory.
    fn shaper(config: &Config) -> (Arc<Shaper>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let spool = tern_queue::Spool::open(dir.path()).unwrap();
        let shaper = Shaper::new(config, spool, Backend::Local, Arc::new(Metrics::new()));
        (shaper, dir)
    }

    fn config(extra: &str) -> Config {
        Config::parse(&format!(
            "[[listeners]]\naddress = \"127.0.0.1:2525\"\n{extra}"
        ))
        .unwrap()
    }

    /// One recipient's `reply` on a fresh pair (to `domain`), as the scheduler runs it:
    /// classified by the worker, observed by shaping, logged by the settler. Returns what
    /// shaping then shows for the pair and the category the settler logs.
    fn run(
        shaper: &Shaper,
        classifier: &Classifier,
        domain: &str,
        reply: &RemoteReply,
    ) -> (PairView, Option<Category>) {
        let host = format!("mx.{domain}");
        let plan = RoutePlan {
            key: format!("mx:{host}"),
            hops: vec![Hop {
                name: host,
                port: 25,
                static_route: false,
            }],
            tls: TlsPolicy::Opportunistic,
            auth: None,
            tls_label: "opportunistic",
            dane: None,
        };
        let pool = shaper.pools().resolve(None, domain);
        let pair = shaper.lane(&pool, domain, &plan).choose();
        let mut attempt = Attempt {
            outcomes: vec![RcptOutcome::of_reply(0, reply, classifier)],
            ..Attempt::default()
        };
        shaper.observe(&pair, &mut attempt);
        let outcome = &attempt.outcomes[0];
        // What the settler hands its transition (which logs it unless the message expired).
        let logged = (outcome.verdict != Verdict::Delivered).then_some(outcome.category);
        let view = shaper.views(Some(&plan.key)).remove(0);
        (view, logged)
    }

    #[test]
    fn shaping_and_the_settler_read_one_classification_of_a_reply() {
        let (shaper, _dir) = shaper(&config(""));
        let classifier = Classifier::defaults();
        let cases = [
            (
                reply(451, "4.7.0", "Too many messages, try again later"),
                Category::RateLimited,
            ),
            (reply(421, "4.3.0", "closing"), Category::RateLimited),
            (
                reply(554, "5.7.1", "Client host blocked using zen.spamhaus.org"),
                Category::SpamBlock,
            ),
            (
                reply(550, "5.1.1", "User unknown"),
                Category::InvalidRecipient,
            ),
            (reply(452, "4.2.2", "Mailbox full"), Category::MailboxFull),
            (
                reply(550, "5.7.1", "try again later"),
                Category::RateLimited,
            ),
        ];
        for (i, (reply, want)) in cases.iter().enumerate() {
            let (view, logged) = run(&shaper, &classifier, &format!("d{i}.test"), reply);
            // What the settler alone computed before the worker classified.
            let fresh = classifier
                .classify_reply(reply.code, reply.status.as_deref(), &reply.to_string())
                .category;
            assert_eq!((logged, fresh), (Some(*want), *want), "{reply}");
            let temporary = reply.code < 500;
            assert_eq!(
                view.throttles > 0,
                *want == Category::RateLimited && temporary,
                "{reply}: {view:?}"
            );
            assert_eq!(view.blocked, *want == Category::SpamBlock, "{reply}");
        }
    }

    #[test]
    fn an_operator_rule_decides_whether_shaping_throttles() {
        let custom = reply(451, "4.3.0", "Please pace yourself, friend");
        let (shaper, _dir) = shaper(&config("[shaping.default]\nrate = \"600/min\"\n"));

        let (view, logged) = run(&shaper, &Classifier::defaults(), "plain.test", &custom);
        assert_eq!((view.throttles, logged), (0, Some(Category::Other)));
        assert_eq!(view.current_rate_per_minute, Some(600.0));

        // `bounce.rules`: the operator classifies the wording rate_limited.
        let dir = tempfile::tempdir().unwrap();
        let rules = dir.path().join("rules.toml");
        std::fs::write(
            &rules,
            "[[rule]]\ncategory = \"rate_limited\"\ntext = [\"pace yourself\"]\n",
        )
        .unwrap();
        let with_rules = config(&format!(
            "[bounce]\nrules = {:?}\n",
            rules.to_str().unwrap()
        ));
        let classifier = Classifier::load(&with_rules).unwrap();
        let (view, logged) = run(&shaper, &classifier, "ruled.test", &custom);
        assert_eq!((view.throttles, logged), (1, Some(Category::RateLimited)));
        assert_eq!(view.current_rate_per_minute, Some(300.0), "the rate is cut");
        assert_eq!(
            view.trigger_reply.as_deref(),
            Some("451 4.3.0 Please pace yourself, friend")
        );

        // `shaping.adaptive.throttle_patterns`: the same, as shorthand.
        let patterns = config("[shaping.adaptive]\nthrottle_patterns = [\"Pace Yourself\"]\n");
        let classifier = Classifier::load(&patterns).unwrap();
        let (view, logged) = run(&shaper, &classifier, "patterned.test", &custom);
        assert_eq!((view.throttles, logged), (1, Some(Category::RateLimited)));
    }
}
