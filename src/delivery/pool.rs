//! Idle outbound connections kept for reuse, per (source address, remote address).
//!
//! Invariants:
//! - Only connections that ended their last transaction cleanly are kept
//!   ([`Connection::is_reusable`]), and only while they have carried fewer than
//!   `max_messages_per_connection` transactions.
//! - A connection is handed out only to a target asking for the same host name, source, TLS
//!   policy and AUTH user it was opened with: reuse never weakens a route's TLS or AUTH
//!   setting. Domains that share an MX host share its connections (the key is the address,
//!   not the recipient domain); the delivery worker adds the DANE records and the shaping
//!   group to the match ([`ConnectionPool::take_where`]).
//! - Nothing idle longer than `idle_timeout` is handed out, nor a connection the server has
//!   spoken on (or closed) while it was idle.
//! - The pool holds no lock across an await: connections leaving it are closed outside it.
//! - At most `delivery.max_idle_connections` connections idle at once, whatever the number
//!   of destinations: putting one more QUITs the one idle longest (counted in
//!   `tern_state_evictions_total{map="idle_connections"}`).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Connection, Target};
use crate::live::Live;
use crate::telemetry::{Metrics, StateMap};

/// What a config reload may change.
#[derive(Debug, Clone, Copy)]
pub struct PoolLimits {
    pub idle_timeout: Duration,
    pub max_messages_per_connection: usize,
    /// Idle connections kept at most (each is a socket, and a shaping slot while it idles).
    pub max_idle: usize,
}

type Key = (Option<IpAddr>, SocketAddr);

struct Idle {
    conn: Connection,
    since: Instant,
}

/// The idle outbound SMTP connections, shared by every delivery worker. (A source-IP pool is
/// `crate::shaping::pools::Pool`; this is not one.)
pub struct ConnectionPool {
    /// A config reload replaces them.
    limits: Live<PoolLimits>,
    /// Per key, oldest first: reuse takes from the back (most recently used), which keeps
    /// the fewest connections warm and lets the rest age out.
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// Where evicted connections are QUIT in the background (shutdown waits for them).
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

impl ConnectionPool {
    /// `tasks` runs the QUITs of evicted connections (the daemon's tracker of background work).
    pub fn new(
        limits: PoolLimits,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Arc<ConnectionPool> {
        Arc::new(ConnectionPool {
            limits: Live::new(limits),
            idle: Mutex::new(HashMap::new()),
            tasks,
            metrics,
        })
    }

    /// Applies reloaded `delivery.idle_timeout`, `delivery.max_messages_per_connection` and
    /// `delivery.max_idle_connections` (a lower bound applies at the next put).
    pub fn set_limits(&self, limits: PoolLimits) {
        self.limits.set(limits);
    }

    /// The most recently used idle connection for `target` (its source and address) that
    /// suits it. Expired connections and ones the server has spoken on are dropped on the
    /// way (without QUIT: the server has likely given up on them already).
    pub fn take(&self, target: &Target<'_>) -> Option<Connection> {
        self.take_where(target, |_| true)
    }

    /// [`ConnectionPool::take`], of the connections that `also` accepts too (the DANE records
    /// they were checked against, the shaping group their lease counts in).
    pub fn take_where(
        &self,
        target: &Target<'_>,
        also: impl Fn(&Connection) -> bool,
    ) -> Option<Connection> {
        let mut idle = self.lock();
        let key = (target.source, target.addr);
        let list = idle.get_mut(&key)?;
        let now = Instant::now();
        let idle_timeout = self.limits.get().idle_timeout;
        // Everything older than the newest expired one has expired too.
        if let Some(last_expired) = list
            .iter()
            .rposition(|i| now.duration_since(i.since) >= idle_timeout)
        {
            list.drain(..=last_expired);
        }
        let found = loop {
            let Some(pos) = list
                .iter()
                .rposition(|i| i.conn.suits(target) && also(&i.conn))
            else {
                break None;
            };
            let entry = list.remove(pos);
            if !entry.conn.peer_spoke() {
                break Some(entry.conn);
            }
        };
        if list.is_empty() {
            idle.remove(&key);
        }
        found
    }

    /// Returns a connection after use. It is kept only if reusable and under the message
    /// limit; otherwise it is closed here (QUIT if it is still in step).
    pub async fn put(&self, conn: Connection) {
        let limits = *self.limits.get();
        if !conn.is_reusable() || conn.messages_sent() >= limits.max_messages_per_connection {
            conn.quit().await;
            return;
        }
        let key = (conn.source(), conn.addr());
        let evicted = {
            let mut idle = self.lock();
            idle.entry(key).or_default().push(Idle {
                conn,
                since: Instant::now(),
            });
            let mut total: usize = idle.values().map(Vec::len).sum();
            let mut evicted = Vec::new();
            while total > limits.max_idle {
                evicted.extend(take_oldest(&mut idle));
                total -= 1;
            }
            evicted
        };
        if !evicted.is_empty() {
            self.metrics
                .state_evicted(StateMap::IdleConnections, evicted.len() as u64);
            self.tasks.spawn(quit_all(evicted));
        }
    }

    pub fn idle_count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    /// QUITs every connection idle for `older_than` or longer.
    pub async fn close_idle(&self, older_than: Duration) {
        let now = Instant::now();
        let mut expired = Vec::new();
        {
            let mut idle = self.lock();
            for list in idle.values_mut() {
                let keep = list
                    .iter()
                    .position(|i| now.duration_since(i.since) < older_than);
                let end = keep.unwrap_or(list.len());
                expired.extend(list.drain(..end).map(|i| i.conn));
            }
            idle.retain(|_, list| !list.is_empty());
        }
        quit_all(expired).await;
    }

    /// Takes every idle connection `which` selects out of the pool and QUITs them on a task
    /// of their own (a shaping cap needs their places back).
    pub fn evict(&self, which: impl Fn(&Connection) -> bool) {
        let mut evicted = Vec::new();
        {
            let mut idle = self.lock();
            for list in idle.values_mut() {
                let (out, keep): (Vec<Idle>, Vec<Idle>) =
                    list.drain(..).partition(|i| which(&i.conn));
                *list = keep;
                evicted.extend(out.into_iter().map(|i| i.conn));
            }
            idle.retain(|_, list| !list.is_empty());
        }
        if !evicted.is_empty() {
            self.tasks.spawn(quit_all(evicted));
        }
    }

    /// Takes the one connection idle longest of those `which` selects out of the pool and
    /// QUITs it on a task of its own (a shaping cap needs one place back: the others may
    /// still be reused by the domains they serve). Whether one was found.
    pub fn evict_oldest(&self, which: impl Fn(&Connection) -> bool) -> bool {
        let evicted = {
            let mut idle = self.lock();
            let oldest = idle
                .iter()
                .filter_map(|(key, list)| {
                    let pos = list.iter().position(|i| which(&i.conn))?;
                    Some((*key, pos, list[pos].since))
                })
                .min_by_key(|(_, _, since)| *since);
            oldest.and_then(|(key, pos, _)| {
                let list = idle.get_mut(&key)?;
                let entry = list.remove(pos);
                if list.is_empty() {
                    idle.remove(&key);
                }
                Some(entry.conn)
            })
        };
        match evicted {
            Some(conn) => {
                self.tasks.spawn(quit_all(vec![conn]));
                true
            }
            None => false,
        }
    }

    /// QUITs every idle connection (shutdown).
    pub async fn close_all(&self) {
        let all: Vec<Connection> = self
            .lock()
            .drain()
            .flat_map(|(_, list)| list.into_iter().map(|i| i.conn))
            .collect();
        quit_all(all).await;
    }

    /// A task that QUITs connections idle longer than `idle_timeout`, until `shutdown`, on
    /// the pool's tracker. Connections still idle then are left to
    /// [`ConnectionPool::close_all`].
    pub fn spawn_reaper(self: &Arc<Self>, shutdown: CancellationToken) {
        let pool = Arc::clone(self);
        self.tasks.spawn(async move {
            loop {
                // Read each round, so a reloaded idle_timeout applies from the next one.
                let idle_timeout = pool.limits.get().idle_timeout;
                // Checking twice per timeout closes a connection at most 1.5 timeouts after
                // its use.
                let period = (idle_timeout / 2).max(Duration::from_millis(10));
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(period) => pool.close_idle(idle_timeout).await,
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Idle>>> {
        // The map stays consistent even if a holder panicked: every change is one call.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Takes the connection idle longest out of `idle` (each list is oldest first).
fn take_oldest(idle: &mut HashMap<Key, Vec<Idle>>) -> Option<Connection> {
    let key = *idle
        .iter()
        .filter_map(|(key, list)| Some((key, list.first()?.since)))
        .min_by_key(|(_, since)| *since)?
        .0;
    let list = idle.get_mut(&key)?;
    let oldest = list.remove(0);
    if list.is_empty() {
        idle.remove(&key);
    }
    Some(oldest.conn)
}

/// QUITs concurrently: each QUIT may wait for its short timeout.
async fn quit_all(conns: Vec<Connection>) {
    let mut tasks = JoinSet::new();
    for conn in conns {
        tasks.spawn(conn.quit());
    }
    while tasks.join_next().await.is_some() {}
}
