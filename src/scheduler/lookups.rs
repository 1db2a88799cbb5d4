//! [`DomainLookups`]: MX lookups per recipient domain, so that one slow or dead domain cannot
//! take the routing capacity of the others.
//!
//! A domain whose name servers do not answer makes every lookup wait out the resolver's
//! timeout. Without a cap per domain, a burst of mail for it fills every routing slot and
//! mail for every other domain waits behind it. So:
//! - at most `per_domain` lookups of one domain run (or wait for a routing slot) at once; the
//!   rest of its mail waits here, holding no routing slot;
//! - a lookup that failed temporarily (a timeout, SERVFAIL) is remembered for `memory` while
//!   mail for the domain is still waiting: that mail fails at once with the same temporary
//!   error (and is retried on its schedule) instead of each message waiting out the timeout
//!   again.
//!
//! Invariants:
//! - a domain has an entry only while some task holds or waits for one of its slots (a
//!   [`DomainSlot`] counts itself in before it waits and out when dropped, also when its
//!   task is cancelled): the map never holds more domains than routing tasks in memory, and
//!   a remembered failure goes with the entry;
//! - a remembered failure is returned only within `memory` of when it was recorded; time is
//!   passed in, so the bookkeeping is tested without waiting.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::routing::route::RouteError;

pub struct DomainLookups {
    per_domain: usize,
    memory: Duration,
    domains: Mutex<HashMap<String, Entry>>,
}

struct Entry {
    slots: Arc<Semaphore>,
    /// Slots of this domain held or waited for.
    users: usize,
    /// The last temporary failure and when it happened.
    failed: Option<(Instant, RouteError)>,
}

/// A place among the lookups of one domain (once [`DomainLookups::acquire`] returned), or in
/// line for one; leaving it (drop) makes room for the next.
pub struct DomainSlot {
    owner: Arc<DomainLookups>,
    domain: String,
    _permit: Option<OwnedSemaphorePermit>,
}

impl DomainLookups {
    pub fn new(per_domain: usize, memory: Duration) -> Arc<DomainLookups> {
        Arc::new(DomainLookups {
            per_domain,
            memory,
            domains: Mutex::new(HashMap::new()),
        })
    }

    /// Waits for one of `domain`'s slots.
    pub async fn acquire(self: &Arc<Self>, domain: &str) -> DomainSlot {
        let mut slot = DomainSlot {
            owner: self.clone(),
            domain: domain.to_string(),
            _permit: None,
        };
        let slots = {
            let mut domains = self.lock();
            let entry = domains.entry(slot.domain.clone()).or_insert_with(|| Entry {
                slots: Arc::new(Semaphore::new(self.per_domain)),
                users: 0,
                failed: None,
            });
            entry.users += 1;
            entry.slots.clone()
        };
        // Never closed, so acquiring cannot fail.
        slot._permit = slots.acquire_owned().await.ok();
        slot
    }

    /// Domains with mail being routed or waiting to be.
    #[cfg(test)]
    fn domains(&self) -> usize {
        self.lock().len()
    }

    // Entries change by whole-field updates under the lock; a poisoned one is still whole.
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.domains.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl DomainSlot {
    /// The domain's temporary failure of less than `memory` ago, if any.
    pub fn recent_failure(&self, now: Instant) -> Option<RouteError> {
        let domains = self.owner.lock();
        let (at, err) = domains.get(&self.domain)?.failed.as_ref()?;
        (now.saturating_duration_since(*at) < self.owner.memory).then(|| err.clone())
    }

    /// Remembers a temporary failure of the domain's lookup, for the mail still waiting.
    pub fn failed(&self, err: &RouteError, now: Instant) {
        if let Some(entry) = self.owner.lock().get_mut(&self.domain) {
            entry.failed = Some((now, err.clone()));
        }
    }
}

impl Drop for DomainSlot {
    fn drop(&mut self) {
        let mut domains = self.owner.lock();
        if let Some(entry) = domains.get_mut(&self.domain) {
            entry.users -= 1;
            if entry.users == 0 {
                domains.remove(&self.domain);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    const MEMORY: Duration = Duration::from_secs(30);

    fn timeout() -> RouteError {
        RouteError::Temporary {
            status: "4.4.3",
            reason: "dead.test: timed out".into(),
        }
    }

    #[tokio::test]
    async fn one_domain_gets_at_most_its_share_and_others_go_ahead() {
        let lookups = DomainLookups::new(2, MEMORY);
        let a1 = lookups.acquire("dead.test").await;
        let _a2 = lookups.acquire("dead.test").await;
        // The third waits; it is in line (counted), not through.
        let mut third = Box::pin(lookups.acquire("dead.test"));
        assert!((&mut third).now_or_never().is_none());
        assert!(lookups.acquire("live.test").now_or_never().is_some());
        drop(a1);
        assert!(
            third.now_or_never().is_some(),
            "a freed slot goes to the next"
        );
    }

    #[tokio::test]
    async fn entries_live_only_while_used_also_when_a_waiter_gives_up() {
        let lookups = DomainLookups::new(1, MEMORY);
        let held = lookups.acquire("a.test").await;
        let waiting = lookups.acquire("a.test");
        let mut waiting = Box::pin(waiting);
        assert!((&mut waiting).now_or_never().is_none());
        let other = lookups.acquire("b.test").await;
        assert_eq!(lookups.domains(), 2);
        drop(waiting); // cancelled while in line
        drop(held);
        assert_eq!(lookups.domains(), 1);
        drop(other);
        assert_eq!(lookups.domains(), 0);
        // Many domains, one after the other: nothing piles up.
        for i in 0..1000 {
            drop(lookups.acquire(&format!("d{i}.test")).await);
        }
        assert_eq!(lookups.domains(), 0);
    }

    #[tokio::test]
    async fn a_failure_is_remembered_for_waiting_mail_and_only_for_a_while() {
        let lookups = DomainLookups::new(1, MEMORY);
        let now = Instant::now();
        let first = lookups.acquire("dead.test").await;
        let mut next = Box::pin(lookups.acquire("dead.test"));
        assert!((&mut next).now_or_never().is_none());
        first.failed(&timeout(), now);
        drop(first);
        let next = next.now_or_never().expect("its turn");
        assert_eq!(next.recent_failure(now + MEMORY / 2), Some(timeout()));
        assert_eq!(next.recent_failure(now + MEMORY), None, "too old");
        drop(next);
        // Gone with the entry: the next burst looks up again.
        let later = lookups.acquire("dead.test").await;
        assert_eq!(later.recent_failure(now), None);
    }
}
