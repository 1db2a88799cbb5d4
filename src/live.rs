//! [`Live`]: a value that a config reload may replace while the daemon runs.
//!
//! Readers take a snapshot ([`Live::get`], an `Arc` clone under a read lock held for a few
//! nanoseconds) once per unit of work (a session, an attempt, a routing decision) and use it
//! to the end of that unit, so one session or attempt never sees half of an old config and
//! half of a new one. [`Live::set`] swaps in a new value; snapshots already taken keep the
//! old one alive until they are dropped.

use std::sync::{Arc, PoisonError, RwLock};

pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    pub fn new(value: T) -> Live<T> {
        Live(RwLock::new(Arc::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the value for every later [`Live::get`].
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(value);
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Live<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.get().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_outlive_a_swap() {
        let live = Live::new(1);
        let before = live.get();
        live.set(2);
        assert_eq!(*before, 1);
        assert_eq!(*live.get(), 2);
    }
}
