//! Idle outbound connections kept for reuse, per (source address, remote address).
//!
//! Invariants:
//! - Only connections that ended their last transaction cleanly are kept
//!   ([`Connection::is_reusable`]), and only while they have carried fewer than
//!   `max_messages_per_connection` transactions.
//! - A connection is handed out only to a target asking for the same host name, TLS policy
//!   and AUTH user it was opened with: reuse never weakens a route's TLS or AUTH setting.
//! - Nothing idle longer than `idle_timeout` is handed out, nor a connection the server has
//!   spoken on (or closed) while it was idle.
//! - The pool holds no lock across an await: connections leaving it are closed outside it.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{Connection, Target};
use crate::live::Live;

type Key = (Option<IpAddr>, SocketAddr);

struct Idle {
    conn: Connection,
    since: Instant,
}

/// The idle outbound SMTP connections, shared by every delivery worker. (A source-IP pool is
/// `crate::shaping::pools::Pool`; this is not one.)
pub struct ConnectionPool {
    /// `(idle_timeout, max_messages_per_connection)`; a config reload replaces them.
    limits: Live<(Duration, usize)>,
    /// Per key, oldest first: reuse takes from the back (most recently used), which keeps
    /// the fewest connections warm and lets the rest age out.
    idle: Mutex<HashMap<Key, Vec<Idle>>>,
    /// Where evicted connections are QUIT in the background (shutdown waits for them).
    tasks: TaskTracker,
}

impl ConnectionPool {
    /// `tasks` runs the QUITs of evicted connections (the daemon's tracker of background work).
    pub fn new(
        idle_timeout: Duration,
        max_messages_per_connection: usize,
        tasks: TaskTracker,
    ) -> Arc<ConnectionPool> {
        Arc::new(ConnectionPool {
            limits: Live::new((idle_timeout, max_messages_per_connection)),
            idle: Mutex::new(HashMap::new()),
            tasks,
        })
    }

    /// Applies reloaded `delivery.idle_timeout` and `delivery.max_messages_per_connection`.
    pub fn set_limits(&self, idle_timeout: Duration, max_messages_per_connection: usize) {
        self.limits.set((idle_timeout, max_messages_per_connection));
    }

    /// The most recently used idle connection for `target` (its source and address) that
    /// suits it. Expired connections and ones the server has spoken on are dropped on the
    /// way (without QUIT: the server has likely given up on them already).
    pub fn take(&self, target: &Target<'_>) -> Option<Connection> {
        let mut idle = self.lock();
        let key = (target.source, target.addr);
        let list = idle.get_mut(&key)?;
        let now = Instant::now();
        let (idle_timeout, _) = *self.limits.get();
        // Everything older than the newest expired one has expired too.
        if let Some(last_expired) = list
            .iter()
            .rposition(|i| now.duration_since(i.since) >= idle_timeout)
        {
            list.drain(..=last_expired);
        }
        let found = loop {
            let Some(pos) = list.iter().rposition(|i| i.conn.suits(target)) else {
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
        let (_, max_messages) = *self.limits.get();
        if !conn.is_reusable() || conn.messages_sent() >= max_messages {
            conn.quit().await;
            return;
        }
        let key = (conn.source(), conn.addr());
        self.lock().entry(key).or_default().push(Idle {
            conn,
            since: Instant::now(),
        });
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
                let (idle_timeout, _) = *pool.limits.get();
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

/// QUITs concurrently: each QUIT may wait for its short timeout.
async fn quit_all(conns: Vec<Connection>) {
    let mut tasks = JoinSet::new();
    for conn in conns {
        tasks.spawn(conn.quit());
    }
    while tasks.join_next().await.is_some() {}
}
