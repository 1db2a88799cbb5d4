//! Per-client accounting at the SMTP edge, after Postfix's anvil: open connections (in total
//! and per client), the connection rate per client, the rate of mail to the bounce domains
//! per client, and AUTH failures per client and per user name.
//!
//! A client is its address, with IPv6 grouped by `limits.ipv6_prefix` ([`client_key`]): one
//! subscriber holds a whole /64, so counting single IPv6 addresses would count nothing.
//! Rates are GCRA ([`gcra`]): a burst of `count`, then `count` per `window`, spread evenly;
//! a refused event does not count, so a client that keeps knocking still gets the steady rate.
//! AUTH failures are counted before the password is checked ([`Anvil::auth_attempt`]), so
//! parallel attempts cannot run past the limit while their verifications are queued.
//!
//! Invariants:
//! - Every table is bounded: entries that carry no state any more (a rate whose burst is
//!   whole again, failures older than `limits.auth_lockout`) are swept at most once a
//!   second; a table full of live entries (65,536 clients) drops one to make room and counts
//!   it (`tern_smtp_client_evictions_total`). The open-connection counts hold one entry per
//!   client with a connection open, so at most `limits.max_connections`.
//! - The limits are the caller's snapshot (a session's config): a reload changes them for
//!   new decisions and keeps the state.
//! - Every method takes `now`: the decisions are pure functions of the state and the time.

use crate::config::{Limits, WindowRate};
use crate::telemetry::{ClientTable, Metrics};
use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::time::Instant;

/// Live entries a per-client table holds at most.
const TABLE_CAP: usize = 65_536;
/// Tables smaller than this are not swept (a sweep would free next to nothing).
const SWEEP_MIN: usize = 1024;
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// User names longer than this are counted by their first this many bytes.
const MAX_USER_KEY: usize = 256;

/// The address a client is counted under: IPv4 (IPv4-mapped IPv6 too) as it is, IPv6 masked
/// to its first `ipv6_prefix` bits.
pub fn client_key(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(ipv6_prefix.min(128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// One more event under `rate` for a key whose theoretical arrival time is `tat` (`None`:
/// never seen, or forgotten): the new `tat` if the event fits, `None` if it is over the rate.
pub fn gcra(tat: Option<Instant>, now: Instant, rate: WindowRate) -> Option<Instant> {
    let interval = rate.window / rate.count;
    let next = tat.map_or(now, |t| t.max(now)) + interval;
    (next.saturating_duration_since(now) <= rate.window).then_some(next)
}

/// The wait before answering the `failures`-th failed AUTH: `auth_failure_delay` doubled
/// for each earlier failure, at most `command_timeout` (a client waits no longer for a reply).
pub fn failure_delay(failures: u32, limits: &Limits) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    limits
        .auth_failure_delay
        .saturating_mul(1 << doublings)
        .min(limits.command_timeout)
}

/// Recent AUTH failures of one client or one user name.
#[derive(Debug, Clone, Copy)]
struct Failures {
    count: u32,
    last: Instant,
}

impl Failures {
    /// Failures that still count at `now` (all of them are forgotten `lockout` after the last).
    fn current(&self, now: Instant, lockout: Duration) -> u32 {
        if now.saturating_duration_since(self.last) >= lockout {
            0
        } else {
            self.count
        }
    }
}

/// A map of per-client state, bounded as the module docs say.
struct Table<K, V> {
    map: HashMap<K, V>,
    cap: usize,
    next_sweep: Instant,
    label: ClientTable,
}

impl<K: Hash + Eq + Clone, V> Table<K, V> {
    fn new(label: ClientTable, cap: usize) -> Table<K, V> {
        Table {
            map: HashMap::new(),
            cap,
            next_sweep: Instant::now(),
            label,
        }
    }

    /// Makes room before `key` is inserted: sweeps entries that are `stale`, and if the
    /// table is still full drops an arbitrary live one.
    fn make_room(&mut self, key: &K, now: Instant, stale: impl Fn(&V) -> bool, metrics: &Metrics) {
        if self.map.contains_key(key) {
            return;
        }
        if self.map.len() >= SWEEP_MIN.min(self.cap) && now >= self.next_sweep {
            self.map.retain(|_, v| !stale(v));
            self.next_sweep = now + SWEEP_EVERY;
            if self.map.capacity() > 4 * self.map.len().max(SWEEP_MIN) {
                self.map.shrink_to_fit();
            }
        }
        if self.map.len() >= self.cap {
            if let Some(victim) = self.map.keys().next().cloned() {
                self.map.remove(&victim);
                metrics.smtp_client_evicted(self.label);
            }
        }
    }
}

/// Why a connection was refused at the door.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// `limits.max_connections` are open.
    Busy,
    /// `limits.max_connections_per_ip` are open from this client.
    PerClient,
    /// Over `limits.max_connection_rate_per_ip`.
    Rate,
}

struct Connections {
    total: usize,
    /// Open connections per client key; an entry exists only while one is open.
    open: HashMap<IpAddr, usize>,
    /// GCRA theoretical arrival time per client key.
    rate: Table<IpAddr, Instant>,
}

struct Auth {
    clients: Table<IpAddr, Failures>,
    users: Table<String, Failures>,
}

/// The per-client state shared by every session of the daemon; it outlives config reloads.
pub struct Anvil {
    metrics: Arc<Metrics>,
    connections: Mutex<Connections>,
    bounce: Mutex<Table<IpAddr, Instant>>,
    auth: Mutex<Auth>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Anvil {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Anvil> {
        Anvil::with_cap(metrics, TABLE_CAP)
    }

    fn with_cap(metrics: Arc<Metrics>, cap: usize) -> Arc<Anvil> {
        Arc::new(Anvil {
            metrics,
            connections: Mutex::new(Connections {
                total: 0,
                open: HashMap::new(),
                rate: Table::new(ClientTable::ConnectionRate, cap),
            }),
            bounce: Mutex::new(Table::new(ClientTable::BounceRate, cap)),
            auth: Mutex::new(Auth {
                clients: Table::new(ClientTable::AuthClient, cap),
                users: Table::new(ClientTable::AuthUser, cap),
            }),
        })
    }

    /// A slot for one connection from `ip`, released when dropped. The connection rate is
    /// not applied to `rate_exempt` clients (the relay networks: upstream applications open
    /// connections as fast as they like); the connection caps are.
    pub fn admit(
        self: &Arc<Self>,
        ip: IpAddr,
        limits: &Limits,
        rate_exempt: bool,
        now: Instant,
    ) -> Result<ConnectionSlot, Refused> {
        let key = client_key(ip, limits.ipv6_prefix);
        let mut c = lock(&self.connections);
        if c.total >= limits.max_connections {
            return Err(Refused::Busy);
        }
        let open = c.open.get(&key).copied().unwrap_or(0);
        if open >= limits.max_connections_per_ip {
            return Err(Refused::PerClient);
        }
        if !rate_exempt {
            let tat = c.rate.map.get(&key).copied();
            let Some(tat) = gcra(tat, now, limits.max_connection_rate_per_ip) else {
                return Err(Refused::Rate);
            };
            c.rate.make_room(&key, now, |t| *t <= now, &self.metrics);
            c.rate.map.insert(key, tat);
        }
        c.total += 1;
        c.open.insert(key, open + 1);
        Ok(ConnectionSlot {
            anvil: self.clone(),
            key,
        })
    }

    pub fn open_connections(&self) -> usize {
        lock(&self.connections).total
    }

    /// Whether one more message from `ip` to the bounce domains fits
    /// `limits.max_bounce_rate_per_ip` (and counts it if so).
    pub fn bounce_mail(&self, ip: IpAddr, limits: &Limits, now: Instant) -> bool {
        let key = client_key(ip, limits.ipv6_prefix);
        let mut table = lock(&self.bounce);
        let tat = table.map.get(&key).copied();
        let Some(tat) = gcra(tat, now, limits.max_bounce_rate_per_ip) else {
            return false;
        };
        table.make_room(&key, now, |t| *t <= now, &self.metrics);
        table.map.insert(key, tat);
        true
    }

    /// Whether `ip` has used up its AUTH failures (before it names a user).
    pub fn auth_locked(&self, ip: IpAddr, limits: &Limits, now: Instant) -> bool {
        let key = client_key(ip, limits.ipv6_prefix);
        let auth = lock(&self.auth);
        auth.clients.map.get(&key).is_some_and(|f| {
            f.current(now, limits.auth_lockout) as usize >= limits.max_auth_failures
        })
    }

    /// Starts one AUTH attempt of `user` from `ip`: `None` if the client or the user has
    /// used up its failures (answer 454 without checking the password), else the attempt is
    /// counted as a failure until [`Anvil::auth_succeeded`] takes it back, and the number of
    /// failures (this one included) that the delay of a failure is reckoned from.
    pub fn auth_attempt(
        &self,
        ip: IpAddr,
        user: &str,
        limits: &Limits,
        now: Instant,
    ) -> Option<u32> {
        let client = client_key(ip, limits.ipv6_prefix);
        let user = user_key(user);
        let (max, lockout) = (limits.max_auth_failures, limits.auth_lockout);
        let mut auth = lock(&self.auth);
        let by_client = auth
            .clients
            .map
            .get(&client)
            .map_or(0, |f| f.current(now, lockout));
        let by_user = auth
            .users
            .map
            .get(user)
            .map_or(0, |f| f.current(now, lockout));
        if by_client as usize >= max || by_user as usize >= max {
            return None;
        }
        let stale = |f: &Failures| f.current(now, lockout) == 0;
        auth.clients.make_room(&client, now, stale, &self.metrics);
        auth.clients.map.insert(
            client,
            Failures {
                count: by_client + 1,
                last: now,
            },
        );
        let user = user.to_owned();
        auth.users.make_room(&user, now, stale, &self.metrics);
        auth.users.map.insert(
            user,
            Failures {
                count: by_user + 1,
                last: now,
            },
        );
        Some(by_client.max(by_user) + 1)
    }

    /// The attempt [`Anvil::auth_attempt`] counted succeeded: it is no failure. Earlier
    /// failures stay counted (a guesser with one valid account does not wipe its slate).
    pub fn auth_succeeded(&self, ip: IpAddr, user: &str, limits: &Limits) {
        let client = client_key(ip, limits.ipv6_prefix);
        let mut auth = lock(&self.auth);
        if let Some(f) = auth.clients.map.get_mut(&client) {
            f.count = f.count.saturating_sub(1);
        }
        if let Some(f) = auth.users.map.get_mut(user_key(user)) {
            f.count = f.count.saturating_sub(1);
        }
    }
}

/// The key of a user name: its first [`MAX_USER_KEY`] bytes (on a character boundary), so
/// a client cannot make the table hold long strings.
fn user_key(user: &str) -> &str {
    if user.len() <= MAX_USER_KEY {
        return user;
    }
    let mut end = MAX_USER_KEY;
    while !user.is_char_boundary(end) {
        end -= 1;
    }
    &user[..end]
}

/// One open connection, counted until dropped.
pub struct ConnectionSlot {
    anvil: Arc<Anvil>,
    key: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut c = lock(&self.anvil.connections);
        c.total -= 1;
        if let Some(n) = c.open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                c.open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rate(count: u32, secs: u64) -> WindowRate {
        WindowRate {
            count,
            window: Duration::from_secs(secs),
        }
    }

    fn limits() -> Limits {
        Limits {
            max_connections: 3,
            max_connections_per_ip: 2,
            max_connection_rate_per_ip: rate(100, 10),
            ..Limits::default()
        }
    }

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn ipv6_clients_are_grouped_by_prefix() {
        assert_eq!(client_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa:bbbb:cccc:dddd"), 64),
            ip("2001:db8:1:2::")
        );
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1"), 48),
            ip("2001:db8:1::")
        );
        assert_eq!(client_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(client_key(ip("2001:db8::1"), 1), ip("::"));
        assert_eq!(client_key(ip("::1"), 64), ip("::"));
    }

    #[test]
    fn gcra_allows_a_burst_then_the_steady_rate() {
        let (r, t0) = (rate(5, 10), Instant::now());
        let mut tat = None;
        for _ in 0..5 {
            tat = Some(gcra(tat, t0, r).expect("the burst fits"));
        }
        assert_eq!(gcra(tat, t0, r), None, "the sixth at once is over");
        // One more every window / count = 2 s.
        assert_eq!(gcra(tat, t0 + MS(1999), r), None);
        let next = gcra(tat, t0 + MS(2000), r).expect("2 s later one fits");
        assert_eq!(gcra(Some(next), t0 + MS(2000), r), None);
        // A key idle for a whole window has its burst back.
        assert!(gcra(Some(next), t0 + MS(12_000), r).is_some());
        let mut tat = Some(next);
        for _ in 0..5 {
            tat = Some(gcra(tat, t0 + MS(12_000), r).unwrap());
        }
        assert_eq!(gcra(tat, t0 + MS(12_000), r), None);
    }

    #[test]
    fn connection_caps_count_and_release() {
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let (l, now) = (limits(), Instant::now());
        let (a, b) = (ip("127.0.0.1"), ip("127.0.0.2"));
        let s1 = anvil.admit(a, &l, false, now).unwrap();
        let _s2 = anvil.admit(a, &l, false, now).unwrap();
        assert_eq!(
            anvil.admit(a, &l, false, now).err(),
            Some(Refused::PerClient)
        );
        let _s3 = anvil.admit(b, &l, false, now).unwrap();
        assert_eq!(anvil.admit(b, &l, false, now).err(), Some(Refused::Busy));
        drop(s1);
        let _s4 = anvil
            .admit(a, &l, false, now)
            .expect("slot released by drop");
        assert_eq!(anvil.open_connections(), 3);
    }

    #[test]
    fn ipv6_neighbours_share_the_per_client_cap_and_rate() {
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let mut l = limits();
        l.max_connections = 100;
        let now = Instant::now();
        let _a = anvil.admit(ip("2001:db8:0:1::1"), &l, false, now).unwrap();
        let _b = anvil.admit(ip("2001:db8:0:1::2"), &l, false, now).unwrap();
        assert_eq!(
            anvil
                .admit(ip("2001:db8:0:1:ffff::3"), &l, false, now)
                .err(),
            Some(Refused::PerClient),
            "three addresses of one /64 are one client"
        );
        let _c = anvil
            .admit(ip("2001:db8:0:2::1"), &l, false, now)
            .expect("the next /64 is another client");
        l.ipv6_prefix = 128;
        let _d = anvil
            .admit(ip("2001:db8:0:1::3"), &l, false, now)
            .expect("with /128 every address is its own client");

        // The rate is per /64 too.
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let mut l = limits();
        l.max_connection_rate_per_ip = rate(2, 10);
        for host in ["2001:db8::1", "2001:db8::2"] {
            drop(anvil.admit(ip(host), &l, false, now).unwrap());
        }
        assert_eq!(
            anvil.admit(ip("2001:db8::3"), &l, false, now).err(),
            Some(Refused::Rate)
        );
        assert!(anvil.admit(ip("2001:db8:0:9::1"), &l, false, now).is_ok());
    }

    #[test]
    fn connection_rate_spares_exempt_clients_and_refusals_do_not_count() {
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let mut l = limits();
        l.max_connection_rate_per_ip = rate(3, 3);
        let (c, t0) = (ip("192.0.2.1"), Instant::now());
        for _ in 0..3 {
            drop(anvil.admit(c, &l, false, t0).unwrap());
        }
        for _ in 0..10 {
            assert_eq!(anvil.admit(c, &l, false, t0).err(), Some(Refused::Rate));
        }
        // A second later one more fits, however often it knocked meanwhile.
        drop(anvil.admit(c, &l, false, t0 + MS(1000)).unwrap());
        for _ in 0..10 {
            drop(anvil.admit(c, &l, true, t0).expect("exempt from the rate"));
        }
        assert_eq!(anvil.open_connections(), 0);
    }

    #[test]
    fn bounce_mail_rate_per_client() {
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let mut l = limits();
        l.max_bounce_rate_per_ip = rate(2, 60);
        let t0 = Instant::now();
        assert!(anvil.bounce_mail(ip("192.0.2.1"), &l, t0));
        assert!(anvil.bounce_mail(ip("192.0.2.1"), &l, t0));
        assert!(!anvil.bounce_mail(ip("192.0.2.1"), &l, t0));
        assert!(anvil.bounce_mail(ip("192.0.2.2"), &l, t0));
        assert!(anvil.bounce_mail(ip("192.0.2.1"), &l, t0 + Duration::from_secs(30)));
    }

    #[test]
    fn auth_failures_lock_the_client_and_the_user_for_a_while() {
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let mut l = limits();
        l.max_auth_failures = 3;
        l.auth_lockout = Duration::from_secs(600);
        let (guesser, t0) = (ip("192.0.2.1"), Instant::now());
        assert!(!anvil.auth_locked(guesser, &l, t0));
        assert_eq!(anvil.auth_attempt(guesser, "alice", &l, t0), Some(1));
        assert_eq!(anvil.auth_attempt(guesser, "bob", &l, t0), Some(2));
        assert_eq!(anvil.auth_attempt(guesser, "carol", &l, t0), Some(3));
        assert!(anvil.auth_locked(guesser, &l, t0));
        assert_eq!(anvil.auth_attempt(guesser, "dave", &l, t0), None);
        // Refused attempts do not extend the lock: it ends lockout after the last failure.
        let later = t0 + Duration::from_secs(600);
        assert!(!anvil.auth_locked(guesser, &l, later));
        assert_eq!(anvil.auth_attempt(guesser, "dave", &l, later), Some(1));

        // The user is locked whatever client asks: guesses spread over many addresses.
        for i in 1..=3u8 {
            let c = IpAddr::from([198, 51, 100, i]);
            assert!(anvil.auth_attempt(c, "erin", &l, t0).is_some());
        }
        assert_eq!(anvil.auth_attempt(ip("203.0.113.9"), "erin", &l, t0), None);
    }

    #[test]
    fn a_success_takes_back_only_its_own_attempt() {
        let anvil = Anvil::new(Arc::new(Metrics::new()));
        let mut l = limits();
        l.max_auth_failures = 3;
        let (c, t0) = (ip("192.0.2.1"), Instant::now());
        assert_eq!(anvil.auth_attempt(c, "alice", &l, t0), Some(1));
        assert_eq!(anvil.auth_attempt(c, "alice", &l, t0), Some(2));
        anvil.auth_succeeded(c, "alice", &l);
        // Two attempts in flight at once count as two until they end.
        assert_eq!(anvil.auth_attempt(c, "alice", &l, t0), Some(2));
        assert_eq!(anvil.auth_attempt(c, "alice", &l, t0), Some(3));
        assert_eq!(anvil.auth_attempt(c, "alice", &l, t0), None);
    }

    #[test]
    fn failure_delays_double_up_to_the_command_timeout() {
        let mut l = limits();
        l.auth_failure_delay = Duration::from_secs(1);
        l.command_timeout = Duration::from_secs(300);
        let delays: Vec<u64> = (1..=10).map(|n| failure_delay(n, &l).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(failure_delay(u32::MAX, &l), Duration::from_secs(300));
        l.auth_failure_delay = Duration::ZERO;
        assert_eq!(failure_delay(5, &l), Duration::ZERO);
    }

    #[test]
    fn full_tables_sweep_stale_entries_then_evict_and_count() {
        let metrics = Arc::new(Metrics::new());
        let anvil = Anvil::with_cap(metrics.clone(), 4);
        let mut l = limits();
        l.max_connections = 100;
        l.max_connection_rate_per_ip = rate(1, 1);
        let t0 = Instant::now();
        let table_len = || lock(&anvil.connections).rate.map.len();
        for i in 0..4u8 {
            drop(
                anvil
                    .admit(IpAddr::from([192, 0, 2, i]), &l, false, t0)
                    .unwrap(),
            );
        }
        // All four are live: a fifth client evicts one of them.
        drop(anvil.admit(ip("192.0.2.200"), &l, false, t0).unwrap());
        assert_eq!(table_len(), 4);
        let evicted = |m: &Metrics| m.smtp_client_evictions(ClientTable::ConnectionRate);
        assert_eq!(evicted(&metrics), 1);
        // Two seconds on, every entry is stale: a sweep removes them all, nothing is evicted.
        let later = t0 + Duration::from_secs(2);
        drop(anvil.admit(ip("192.0.2.201"), &l, false, later).unwrap());
        assert_eq!(table_len(), 1);
        assert_eq!(evicted(&metrics), 1, "stale entries are swept, not evicted");

        assert_eq!(user_key(&"é".repeat(200)).len(), 256);
        assert_eq!(user_key("alice"), "alice");
    }
}
