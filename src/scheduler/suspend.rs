//! [`Suspensions`]: which destinations (recipient domains), or all delivery, are suspended,
//! until when and why; kept in memory for the scheduler's checks and persisted in the spool's
//! meta keyspace (`suspend/<domain>`, `suspend/*` for all delivery) so they survive a
//! restart.
//!
//! Invariants:
//! - the spool is written before memory changes, so an answered suspend or resume is
//!   durable;
//! - an entry whose `until_ms` has passed no longer suspends anything, whether or not
//!   [`Suspensions::take_expired`] has removed it yet;
//! - the `delivery.suspended` config flag is a suspension of all delivery that is not
//!   persisted (the config sets it again at every start); resuming all delivery clears it.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use tern_queue::{Spool, SpoolError};

const META_PREFIX: &str = "suspend/";
const ALL: &str = "*";

/// One suspension, as stored and as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspension {
    /// Lowercase recipient domain; `None` suspends all delivery.
    pub destination: Option<String>,
    /// Unix ms when it was set.
    pub since_ms: u64,
    /// Unix ms when it ends by itself; `None`: until resumed.
    pub until_ms: Option<u64>,
    pub reason: String,
}

impl Suspension {
    fn active(&self, now: u64) -> bool {
        self.until_ms.is_none_or(|until| now < until)
    }

    fn meta_name(destination: Option<&str>) -> String {
        format!("{META_PREFIX}{}", destination.unwrap_or(ALL))
    }
}

pub struct Suspensions {
    /// Keyed by destination, `None` (sorting first) for all delivery.
    active: Mutex<BTreeMap<Option<String>, Suspension>>,
}

impl Suspensions {
    /// Loads the persisted suspensions; a record that does not decode is logged and skipped
    /// (it cannot be trusted to say what to suspend).
    pub fn load(spool: &Spool) -> Result<Suspensions, SpoolError> {
        let mut active = BTreeMap::new();
        for (name, value) in spool.scan_meta(META_PREFIX)? {
            match serde_json::from_slice::<Suspension>(&value) {
                Ok(s) => {
                    active.insert(s.destination.clone(), s);
                }
                Err(err) => tracing::warn!(name, error = %err, "ignoring unreadable suspension"),
            }
        }
        Ok(Suspensions {
            active: Mutex::new(active),
        })
    }

    /// Stores and activates `s`, replacing any suspension of the same destination.
    pub async fn set(&self, spool: &Spool, s: Suspension) -> Result<(), SpoolError> {
        // Serialising plain strings and numbers cannot fail.
        let value = serde_json::to_vec(&s).unwrap_or_default();
        spool
            .put_meta(&Suspension::meta_name(s.destination.as_deref()), value)
            .await?;
        self.map().insert(s.destination.clone(), s);
        Ok(())
    }

    /// Ends the suspension of `destination` (`None`: of all delivery); returns it if there
    /// was one.
    pub async fn remove(
        &self,
        spool: &Spool,
        destination: Option<&str>,
    ) -> Result<Option<Suspension>, SpoolError> {
        spool
            .remove_meta(&Suspension::meta_name(destination))
            .await?;
        Ok(self.map().remove(&destination.map(str::to_string)))
    }

    /// The active suspension of all delivery, if any.
    pub fn all(&self, now: u64) -> Option<Suspension> {
        self.map().get(&None).filter(|s| s.active(now)).cloned()
    }

    /// The active suspension of `domain` (not counting one of all delivery).
    pub fn of(&self, domain: &str, now: u64) -> Option<Suspension> {
        self.map()
            .get(&Some(domain.to_string()))
            .filter(|s| s.active(now))
            .cloned()
    }

    /// Every active suspension, all delivery first, then by destination.
    pub fn list(&self, now: u64) -> Vec<Suspension> {
        self.map()
            .values()
            .filter(|s| s.active(now))
            .cloned()
            .collect()
    }

    /// Whether any timed suspension has ended and awaits [`Suspensions::take_expired`].
    pub fn any_expired(&self, now: u64) -> bool {
        self.map().values().any(|s| !s.active(now))
    }

    /// Removes and returns the suspensions whose time has run out (memory first, then the
    /// spool: a crash in between leaves a record that is inactive when loaded).
    pub async fn take_expired(
        &self,
        spool: &Spool,
        now: u64,
    ) -> Result<Vec<Suspension>, SpoolError> {
        let expired: Vec<Suspension> = {
            let mut map = self.map();
            let keys: Vec<_> = map
                .iter()
                .filter(|(_, s)| !s.active(now))
                .map(|(k, _)| k.clone())
                .collect();
            keys.into_iter().filter_map(|k| map.remove(&k)).collect()
        };
        for s in &expired {
            spool
                .remove_meta(&Suspension::meta_name(s.destination.as_deref()))
                .await?;
        }
        Ok(expired)
    }

    // Entries are replaced whole, so a poisoned lock still holds consistent data.
    fn map(&self) -> MutexGuard<'_, BTreeMap<Option<String>, Suspension>> {
        self.active.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
