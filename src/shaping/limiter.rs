//! The counters a cluster of nodes shares: message and new-connection rate tokens (GCRA) and
//! open-connection counts, per (source address, bucket).
//!
//! [`Backend`] says where they are kept: [`Backend::Local`] in this process ([`LocalPair`]),
//! [`Backend::Shared`] in the cluster store ([`super::shared`], with local fallback). The
//! shaper calls one [`Counters`] per pair and does not care which. Limits are passed in on
//! every call rather than stored, so an adaptive rate change needs no call of its own.
//!
//! Time is tokio's ([`TokioClock`]), so tests on tokio's paused clock drive the limiters.

use super::shared::{SharedPair, SharedStore};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// governor's clock reading tokio's time, as the distance from a process-wide anchor
/// (governor implements `Reference` for `Duration`).
#[derive(Debug, Clone, Copy, Default)]
pub struct TokioClock;

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        static ANCHOR: OnceLock<tokio::time::Instant> = OnceLock::new();
        let anchor = *ANCHOR.get_or_init(tokio::time::Instant::now);
        tokio::time::Instant::now().saturating_duration_since(anchor)
    }
}

type Gcra = RateLimiter<NotKeyed, InMemoryState, TokioClock, NoOpMiddleware<Duration>>;

/// Where pairs' counters are kept.
#[derive(Clone)]
pub enum Backend {
    /// In this process: no store, no network on the path.
    Local,
    /// In the cluster store (`shaping.shared`).
    Shared(Arc<SharedStore>),
}

impl Backend {
    /// The counters of one pair; `key` names it uniquely and stably ("<source>|<bucket>").
    pub fn pair(&self, key: &str) -> Counters {
        match self {
            Backend::Local => Counters::Local(LocalPair::default()),
            Backend::Shared(store) => Counters::Shared(SharedPair::new(store.clone(), key)),
        }
    }

    /// The cluster store, if any (warm-up counters use it too).
    pub fn store(&self) -> Option<&Arc<SharedStore>> {
        match self {
            Backend::Local => None,
            Backend::Shared(store) => Some(store),
        }
    }
}

/// One pair's counters.
pub enum Counters {
    Local(LocalPair),
    Shared(SharedPair),
}

impl Counters {
    /// Takes a message token at `per_second`; `Err` is how long until one is free.
    pub async fn take_message(&self, per_second: f64) -> Result<(), Duration> {
        match self {
            Counters::Local(l) => l.take_message(per_second),
            Counters::Shared(s) => s.take_message(per_second).await,
        }
    }

    /// Takes a new-connection token at `per_minute`.
    pub async fn take_connection(&self, per_minute: u32) -> Result<(), Duration> {
        match self {
            Counters::Local(l) => l.take_connection(per_minute),
            Counters::Shared(s) => s.take_connection(per_minute).await,
        }
    }

    /// Counts one more open connection unless `cap` are open already.
    pub async fn try_open(&self, cap: Option<usize>) -> bool {
        match self {
            Counters::Local(l) => l.try_open(cap),
            Counters::Shared(s) => s.try_open(cap).await,
        }
    }

    /// One connection counted by `try_open` closed.
    pub fn close(&self) {
        match self {
            Counters::Local(l) => l.close(),
            Counters::Shared(s) => s.close(),
        }
    }

    /// This node's open connections of the pair.
    pub fn open_connections(&self) -> usize {
        match self {
            Counters::Local(l) => l.open_connections(),
            Counters::Shared(s) => s.open_connections(),
        }
    }
}

/// A pair's counters in this process (also a shared pair's fallback rate limiters).
#[derive(Default)]
pub struct LocalPair {
    /// The limiter and the rate it was built for; rebuilt when the rate changes.
    messages: Mutex<Option<(f64, Gcra)>>,
    connections: Mutex<Option<(f64, Gcra)>>,
    open: AtomicUsize,
}

/// How much of a rate may come at once: what it earns in this time. A caller that must wait
/// sleeps on tokio's timer, which wakes on whole milliseconds, so a wait shorter than that
/// costs a millisecond or more: with a burst of one, a rate of thousands per second lost a
/// fifth of its messages to the rounding (relay-bench with 16,667/s configured: 19% fewer
/// messages/s than unshaped). Rates under 400/s keep a burst of one: events spread evenly.
pub(super) const BURST_WINDOW: Duration = Duration::from_micros(2_500);

/// A GCRA limiter for `per_second`, with the burst that `BURST_WINDOW` earns (at least one).
fn gcra(per_second: f64) -> Gcra {
    let per_second = per_second.max(1e-6);
    let period = Duration::from_secs_f64(1.0 / per_second);
    let burst = (per_second * BURST_WINDOW.as_secs_f64()).floor() as u32;
    let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
        .expect("a positive period")
        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
    RateLimiter::direct_with_clock(quota, TokioClock)
}

fn take(slot: &Mutex<Option<(f64, Gcra)>>, per_second: f64) -> Result<(), Duration> {
    let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
    if slot.as_ref().is_none_or(|(r, _)| *r != per_second) {
        *slot = Some((per_second, gcra(per_second)));
    }
    let (_, limiter) = slot.as_ref().expect("set above");
    limiter
        .check()
        .map_err(|not_until| not_until.wait_time_from(TokioClock.now()))
}

impl LocalPair {
    pub fn take_message(&self, per_second: f64) -> Result<(), Duration> {
        take(&self.messages, per_second)
    }

    pub fn take_connection(&self, per_minute: u32) -> Result<(), Duration> {
        take(&self.connections, f64::from(per_minute) / 60.0)
    }

    pub fn try_open(&self, cap: Option<usize>) -> bool {
        take_slot(&self.open, cap)
    }

    pub fn close(&self) {
        give_slot(&self.open);
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// Counts one more open connection in `open` unless that would exceed `cap` (`None`:
/// unlimited); false when full.
pub(super) fn take_slot(open: &AtomicUsize, cap: Option<usize>) -> bool {
    let cap = cap.unwrap_or(usize::MAX);
    open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < cap).then_some(n + 1)
    })
    .is_ok()
}

/// Counts one connection less in `open` (never below zero).
pub(super) fn give_slot(open: &AtomicUsize) {
    let _ = open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn gcra_spaces_messages_evenly_on_tokio_time() {
        let pair = LocalPair::default();
        assert!(pair.take_message(2.0).is_ok());
        let wait = pair.take_message(2.0).unwrap_err();
        assert!(wait > Duration::from_millis(450) && wait <= Duration::from_millis(500));
        tokio::time::advance(wait).await;
        assert!(pair.take_message(2.0).is_ok());
        // A rate change takes effect at once.
        tokio::time::advance(Duration::from_millis(100)).await;
        assert!(pair.take_message(100.0).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn fast_rates_allow_what_the_burst_window_earns_and_hold_over_time() {
        // 100/s: no burst, events spread evenly.
        let slow = LocalPair::default();
        assert!(slow.take_message(100.0).is_ok());
        assert!(slow.take_message(100.0).is_err());
        // 16,000/s: 40 at once (2.5 ms of the rate), then spaced.
        let fast = LocalPair::default();
        let at_once = (0..100)
            .take_while(|_| fast.take_message(16_000.0).is_ok())
            .count();
        assert_eq!(at_once, 40);
        // Over a simulated minute of callers that sleep on the timer (whole milliseconds),
        // the rate holds: the burst only lets waits be shorter than a tick.
        let minute = LocalPair::default();
        let start = tokio::time::Instant::now();
        let mut sent = 0u64;
        while start.elapsed() < Duration::from_secs(60) {
            match minute.take_message(16_000.0) {
                Ok(()) => sent += 1,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
        let rate = sent as f64 / 60.0;
        assert!((15_200.0..=16_100.0).contains(&rate), "{rate}/s");
    }

    #[test]
    fn connection_counts_respect_the_cap() {
        let pair = LocalPair::default();
        assert!(pair.try_open(Some(2)));
        assert!(pair.try_open(Some(2)));
        assert!(!pair.try_open(Some(2)));
        pair.close();
        assert_eq!(pair.open_connections(), 1);
        assert!(pair.try_open(Some(2)));
        assert!(pair.try_open(None));
    }
}
