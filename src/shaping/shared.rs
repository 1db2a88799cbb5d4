//! The cluster store (`shaping.shared`): a Redis server that several tern nodes sending for
//! one operator share, so the cluster keeps one limit per (source, bucket) pair instead of one
//! per node.
//!
//! What is shared, each by one Lua script (atomic in Redis, timed by Redis `TIME`, so the
//! nodes' clocks do not matter):
//! - message and new-connection rates: GCRA with burst 1 (the local limiter allows what 2.5 ms of the rate earns)
//!   (`<prefix>:rate:<pair>`, `<prefix>:connrate:<pair>` hold the theoretical arrival time).
//!   A node takes message tokens in small batches (about 50 ms of the rate, at most 32) and
//!   spaces them locally, so a busy pair costs a round trip per batch, not per message;
//! - connection slots: leases in a sorted set (`<prefix>:conns:<pair>`, member = lease id,
//!   score = expiry). Leases are renewed while held ([`LEASE_TTL`] / 3) and expire if their
//!   node dies, so a dead node's connections free themselves;
//! - warm-up daily counters (`<prefix>:warm:warmup/<source>/<provider>:<date>`), reserved in
//!   blocks like the spool counters (see [`super::warmup`]); the date is the node's, in the
//!   configured time zone.
//!
//! Invariants:
//! - No call waits longer than `shaping.shared_timeout`. Any error or timeout switches this
//!   node to fallback: local limits divided by `shaping.node_count` (rates, connection caps,
//!   warm-up caps), logged once at warn, `tern_shaping_shared_backend_up` 0, the fallback
//!   counter incremented. A task reconnects every `shaping.shared_retry` and switches back
//!   (logged at info, the gauge 1). Mail is never refused or bounced because of the store.
//! - Tokens and leases a node already holds stay valid through an outage: they were counted
//!   in the store when taken.

use super::limiter::{LocalPair, BURST_WINDOW};
use super::lock;
use crate::config::SharedConfig;
use crate::telemetry::Metrics;
use redis::aio::MultiplexedConnection;
use redis::{FromRedisValue, Script, ScriptInvocation};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock, Weak};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

/// How long a connection lease lives in the store without renewal (its node died).
pub const LEASE_TTL: Duration = Duration::from_secs(30);

/// GCRA, burst 1, `n` tokens at once: granted (0) when the theoretical arrival time (TAT) is
/// at most ARGV[3] microseconds ahead, which then moves `n` intervals on from
/// max(TAT, now); else the wait in microseconds. The small tolerance absorbs the timer and
/// network lateness of a waiting caller, so a busy pair keeps to the grid instead of losing
/// that lateness on every token; the long-run rate still never exceeds one per interval.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local n = tonumber(ARGV[2])
local tolerance = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat - now > tolerance then return tat - now - tolerance end
redis.call('SET', KEYS[1], string.format('%.0f', math.max(tat, now) + n * interval),
  'PX', math.ceil(n * interval / 1000) + 1000)
return 0
";

/// The GCRA tolerance: a quarter of the interval, at most 5 ms, and never under the local
/// limiter's burst window: a shorter wait costs a whole timer tick (see `limiter::BURST_WINDOW`).
fn tolerance(interval: Duration) -> Duration {
    (interval / 4).clamp(BURST_WINDOW, Duration::from_millis(5))
}

/// A connection lease: expired leases are dropped, then one is added unless the set (plus
/// ARGV[3] connections the caller holds outside it) is at the cap.
const ACQUIRE: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) + tonumber(ARGV[3]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[4])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return 1
";

/// Renews leases: KEYS[i] holds lease ARGV[i + 2]; ARGV[1] is the TTL in ms. ARGV[2] '1':
/// only leases still in the set (a lease given back meanwhile stays gone); '0' after an
/// outage: every lease this node holds is counted again, expired or not.
const RENEW: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if ARGV[2] == '1' then
    redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 2])
  else
    redis.call('ZADD', key, now + ttl, ARGV[i + 2])
  end
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
";

/// Reserves up to ARGV[2] of today's warm-up cap ARGV[1]; returns how many (0: used up).
const WARM: &str = r"
local n = tonumber(redis.call('GET', KEYS[1]) or '0')
local cap = tonumber(ARGV[1])
if n >= cap then return 0 end
local got = math.min(tonumber(ARGV[2]), cap - n)
redis.call('INCRBY', KEYS[1], got)
redis.call('EXPIRE', KEYS[1], 172800)
return got
";

struct Scripts {
    gcra: Script,
    acquire: Script,
    renew: Script,
    warm: Script,
}

fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        gcra: Script::new(GCRA),
        acquire: Script::new(ACQUIRE),
        renew: Script::new(RENEW),
        warm: Script::new(WARM),
    })
}

/// One node's handle on the cluster store, and its health.
pub struct SharedStore {
    client: redis::Client,
    /// The open connection while the store is up.
    conn: RwLock<Option<MultiplexedConnection>>,
    up: AtomicBool,
    config: SharedConfig,
    metrics: Arc<Metrics>,
    /// Leases this node holds: lease id -> sorted-set key.
    leases: Mutex<HashMap<String, String>>,
    /// This node's lease ids are "<node>:<n>".
    node: u64,
    next_lease: AtomicU64,
    /// The daemon's tracker of background work: lease renewal and lease releases run on it,
    /// so shutdown waits for them.
    tasks: TaskTracker,
}

impl SharedStore {
    /// Connects (waiting at most `shaping.shared_timeout`; a node that cannot reach the store
    /// starts on fallback limits) and starts the task that renews leases and reconnects, on
    /// `tasks`, until `stop`.
    pub async fn connect(
        config: &SharedConfig,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Arc<SharedStore> {
        // The config reader checked the URL, and the start the password file; should the file
        // have gone since, the store refuses us and this node keeps its share of the limits.
        let client = crate::cluster::single_client(
            &config.url,
            config.password_file.as_deref(),
            config.ca_file.as_deref(),
            "shaping.shared",
        )
        .or_else(|e| {
            warn!(error = %e, "shaping.shared: connecting without the password");
            redis::Client::open(config.url.as_str()).map_err(|e| e.to_string())
        })
        .expect("checked shaping.shared");
        let store = Arc::new(SharedStore {
            client,
            conn: RwLock::new(None),
            up: AtomicBool::new(false),
            config: config.clone(),
            metrics,
            leases: Mutex::new(HashMap::new()),
            node: rand::random(),
            next_lease: AtomicU64::new(0),
            tasks,
        });
        store.metrics.shared_store().up.set(0);
        if let Err(err) = store.reconnect().await {
            store.metrics.shared_store().fallbacks.inc();
            warn!(url = %store.url_for_logs(), error = %err, node_count = store.config.node_count,
                "shared shaping store unreachable: local limits divided by shaping.node_count");
        }
        store.tasks.spawn(maintain(Arc::downgrade(&store), stop));
        store
    }

    /// The URL without its password (logs must not carry it).
    fn url_for_logs(&self) -> String {
        redacted(&self.config.url)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn node_count(&self) -> u32 {
        self.config.node_count
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}:{kind}:{name}", self.config.prefix)
    }

    /// Opens a connection and checks it with PING; on success the store is up.
    async fn reconnect(&self) -> Result<(), String> {
        let attempt = async {
            let mut conn = self.client.get_multiplexed_async_connection().await?;
            redis::cmd("PING").query_async::<()>(&mut conn).await?;
            Ok::<_, redis::RedisError>(conn)
        };
        let conn = tokio::time::timeout(self.config.timeout, attempt)
            .await
            .map_err(|_| format!("no answer within {:?}", self.config.timeout))?
            .map_err(|e| e.to_string())?;
        *self.conn.write().unwrap_or_else(PoisonError::into_inner) = Some(conn);
        self.up.store(true, Ordering::Release);
        self.metrics.shared_store().up.set(1);
        info!(url = %self.url_for_logs(), "shared shaping store up: cluster-wide limits");
        Ok(())
    }

    /// Switches to fallback (once per outage).
    fn fall_back(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            let m = self.metrics.shared_store();
            m.up.set(0);
            m.fallbacks.inc();
            warn!(url = %self.url_for_logs(), error = why, node_count = self.config.node_count,
                "shared shaping store lost: local limits divided by shaping.node_count");
        }
    }

    /// Runs one script; `None` (and fallback) on any error or timeout, or while down.
    async fn eval<T: FromRedisValue>(&self, invocation: &ScriptInvocation<'_>) -> Option<T> {
        if !self.is_up() {
            return None;
        }
        let mut conn = self
            .conn
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        match tokio::time::timeout(self.config.timeout, invocation.invoke_async(&mut conn)).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(err)) => {
                self.fall_back(&err.to_string());
                None
            }
            Err(_) => {
                self.fall_back("timed out");
                None
            }
        }
    }

    /// GCRA for `n` tokens at `interval`: `Some(None)` granted, `Some(Some(wait))` not yet.
    async fn gcra(&self, key: &str, interval: Duration, n: u32) -> Option<Option<Duration>> {
        let micros = interval.as_micros().max(1) as u64;
        let mut inv = scripts().gcra.prepare_invoke();
        inv.key(key)
            .arg(micros)
            .arg(n)
            .arg(tolerance(interval).as_micros() as u64);
        let wait: u64 = self.eval(&inv).await?;
        Some((wait > 0).then(|| Duration::from_micros(wait)))
    }

    /// A lease on one of `cap` connection slots; `held_outside` are this pair's connections
    /// that hold no lease (opened during an outage).
    async fn acquire(&self, key: &str, cap: usize, held_outside: usize) -> Option<Option<String>> {
        let id = format!(
            "{:016x}:{}",
            self.node,
            self.next_lease.fetch_add(1, Ordering::Relaxed)
        );
        let mut inv = scripts().acquire.prepare_invoke();
        inv.key(key)
            .arg(cap)
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(held_outside)
            .arg(&id);
        let got: u8 = self.eval(&inv).await?;
        if got == 0 {
            return Some(None);
        }
        lock(&self.leases).insert(id.clone(), key.to_owned());
        Some(Some(id))
    }

    /// Gives a lease back (in the background: called when a connection is dropped).
    fn release(self: &Arc<Self>, id: String) {
        let Some(key) = lock(&self.leases).remove(&id) else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return; // no runtime left: the lease expires
        }
        let store = self.clone();
        self.tasks.spawn(async move {
            if !store.is_up() {
                return; // it expires
            }
            let conn = store
                .conn
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(mut conn) = conn {
                let zrem = redis::cmd("ZREM").arg(&key).arg(&id).to_owned();
                let done =
                    tokio::time::timeout(store.config.timeout, zrem.query_async::<()>(&mut conn))
                        .await;
                match done {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => store.fall_back(&err.to_string()),
                    Err(_) => store.fall_back("timed out"),
                }
            }
        });
    }

    /// Renews every lease this node holds; `existing`: only those still in the store.
    async fn renew(&self, existing: bool) {
        let leases: Vec<(String, String)> = lock(&self.leases)
            .iter()
            .map(|(id, key)| (id.clone(), key.clone()))
            .collect();
        if leases.is_empty() {
            return;
        }
        let mut invocation = scripts().renew.prepare_invoke();
        invocation
            .arg(LEASE_TTL.as_millis() as u64)
            .arg(if existing { "1" } else { "0" });
        for (id, key) in &leases {
            invocation.key(key).arg(id);
        }
        let _: Option<u64> = self.eval(&invocation).await;
    }

    /// Reserves up to `block` of `cap` warm-up messages of counter `name` on `date`.
    pub async fn reserve_warmup(
        &self,
        name: &str,
        date: &str,
        cap: u64,
        block: u64,
    ) -> Option<u64> {
        let key = self.key("warm", &format!("{name}:{date}"));
        let mut inv = scripts().warm.prepare_invoke();
        inv.key(key).arg(cap).arg(block);
        self.eval(&inv).await
    }
}

/// `url` with the user-info part ("user:password@") replaced by "***@".
fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host_start = rest.find('/').unwrap_or(rest.len());
    match rest[..host_start].rfind('@') {
        Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
        None => url.to_owned(),
    }
}

/// Renews leases while up; reconnects while down. Ends with the store or at `stop`.
async fn maintain(store: Weak<SharedStore>, stop: CancellationToken) {
    loop {
        let pause = match store.upgrade() {
            Some(s) if s.is_up() => LEASE_TTL / 3,
            Some(s) => s.config.retry,
            None => return,
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.cancelled() => return,
        }
        let Some(store) = store.upgrade() else {
            return;
        };
        if store.is_up() {
            store.renew(true).await;
        } else if store.reconnect().await.is_ok() {
            // Leases taken before the outage may have expired meanwhile: count them again.
            store.renew(false).await;
        }
    }
}

/// Pre-paid message tokens of one pair on this node.
struct Batch {
    interval: Duration,
    left: u32,
    /// When the next token may be used.
    next: Instant,
    /// The end of the time the batch paid for; tokens left after it are dropped.
    paid_until: Instant,
}

/// One open connection of a shared pair on this node.
enum Held {
    /// A lease in the store.
    Lease(String),
    /// Counted only here: no cap, or opened during an outage.
    Local,
}

/// A pair's counters in the cluster store, with this node's fallback.
pub struct SharedPair {
    store: Arc<SharedStore>,
    rate_key: String,
    conn_rate_key: String,
    conns_key: String,
    /// Fallback rate limiters (at the rate divided by the node count).
    local: LocalPair,
    batch: Mutex<Option<Batch>>,
    held: Mutex<Vec<Held>>,
}

/// Tokens per batch: about 50 ms of the rate, 1 to 32.
fn batch_size(per_second: f64) -> u32 {
    (per_second * 0.05).clamp(1.0, 32.0) as u32
}

impl SharedPair {
    pub fn new(store: Arc<SharedStore>, pair: &str) -> SharedPair {
        SharedPair {
            rate_key: store.key("rate", pair),
            conn_rate_key: store.key("connrate", pair),
            conns_key: store.key("conns", pair),
            store,
            local: LocalPair::default(),
            batch: Mutex::new(None),
            held: Mutex::new(Vec::new()),
        }
    }

    fn nodes(&self) -> f64 {
        f64::from(self.store.node_count())
    }

    pub async fn take_message(&self, per_second: f64) -> Result<(), Duration> {
        let interval = Duration::from_secs_f64(1.0 / per_second.max(1e-6));
        let now = Instant::now();
        {
            let mut batch = lock(&self.batch);
            if let Some(b) = batch.as_mut() {
                if b.interval == interval && b.left > 0 && now < b.paid_until {
                    if b.next > now + tolerance(interval) {
                        return Err(b.next - now - tolerance(interval));
                    }
                    b.left -= 1;
                    // On the grid the store paid for; the batch's end bounds any catch-up.
                    b.next += interval;
                    return Ok(());
                }
            }
        }
        if self.store.is_up() {
            let n = batch_size(per_second);
            match self.store.gcra(&self.rate_key, interval, n).await {
                Some(None) => {
                    let now = Instant::now();
                    *lock(&self.batch) = Some(Batch {
                        interval,
                        left: n - 1,
                        next: now + interval,
                        paid_until: now + interval * n,
                    });
                    return Ok(());
                }
                Some(Some(wait)) => return Err(wait),
                None => {}
            }
        }
        self.local.take_message(per_second / self.nodes())
    }

    pub async fn take_connection(&self, per_minute: u32) -> Result<(), Duration> {
        if self.store.is_up() {
            let interval = Duration::from_secs_f64(60.0 / f64::from(per_minute.max(1)));
            match self.store.gcra(&self.conn_rate_key, interval, 1).await {
                Some(None) => return Ok(()),
                Some(Some(wait)) => return Err(wait),
                None => {}
            }
        }
        let share = (per_minute / self.store.node_count()).max(1);
        self.local.take_connection(share)
    }

    pub async fn try_open(&self, cap: Option<usize>) -> bool {
        let Some(cap) = cap else {
            lock(&self.held).push(Held::Local);
            return true;
        };
        if self.store.is_up() {
            let outside = lock(&self.held)
                .iter()
                .filter(|h| matches!(h, Held::Local))
                .count();
            match self.store.acquire(&self.conns_key, cap, outside).await {
                Some(Some(id)) => {
                    lock(&self.held).push(Held::Lease(id));
                    return true;
                }
                Some(None) => return false,
                None => {}
            }
        }
        let share = (cap / self.store.node_count() as usize).max(1);
        let mut held = lock(&self.held);
        if held.len() < share {
            held.push(Held::Local);
            true
        } else {
            false
        }
    }

    pub fn close(&self) {
        let mut held = lock(&self.held);
        // Connections are interchangeable: give back an unleased place first.
        let at = held
            .iter()
            .position(|h| matches!(h, Held::Local))
            .or_else(|| held.len().checked_sub(1));
        if let Some(Held::Lease(id)) = at.map(|i| held.swap_remove(i)) {
            drop(held);
            self.store.release(id);
        }
    }

    pub fn open_connections(&self) -> usize {
        lock(&self.held).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_urls_carry_no_password() {
        assert_eq!(
            redacted("redis://user:secret@10.0.0.5:6379/2"),
            "redis://***@10.0.0.5:6379/2"
        );
        assert_eq!(redacted("redis://:secret@h"), "redis://***@h");
        assert_eq!(redacted("redis://h:6379/0"), "redis://h:6379/0");
    }

    #[test]
    fn batches_cover_about_50_ms_and_the_tolerance_stays_small() {
        assert_eq!(batch_size(20.0), 1);
        assert_eq!(batch_size(200.0), 10);
        assert_eq!(batch_size(100_000.0), 32);
        assert_eq!(
            tolerance(Duration::from_millis(50)),
            Duration::from_millis(5)
        );
        assert_eq!(
            tolerance(Duration::from_millis(12)),
            Duration::from_millis(3)
        );
        assert_eq!(tolerance(Duration::from_micros(60)), BURST_WINDOW);
    }
}
