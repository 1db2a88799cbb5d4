//! The global budget of bytes SMTP sessions may hold for messages in progress
//! (`limits.max_inflight_bytes`).
//!
//! A session reserves before its message buffer grows ([`Reservation::grow_to`]), never after,
//! so the buffers of all sessions together never exceed the budget: when it is spent, a new
//! DATA/BDAT is refused and a message that cannot grow is refused, instead of memory growing
//! with the number of clients sending at once. A reservation is given back when it is dropped,
//! which is when the message has been spooled or refused, or its session has ended.
//!
//! Invariant: `used` is the sum of all live reservations (the `tern_smtp_inflight_bytes`
//! gauge follows it). The maximum is the caller's snapshot of the config, so a reload applies
//! to the next reservation; what is held stays held.

use crate::telemetry::Metrics;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Budget {
    used: AtomicUsize,
    metrics: Arc<Metrics>,
}

impl Budget {
    pub fn new(metrics: Arc<Metrics>) -> Arc<Budget> {
        Arc::new(Budget {
            used: AtomicUsize::new(0),
            metrics,
        })
    }

    /// A reservation of `bytes`, or `None` if that would take the total over `max`.
    pub fn reserve(self: &Arc<Self>, bytes: usize, max: u64) -> Option<Reservation> {
        self.take(bytes, max).then(|| Reservation {
            budget: self.clone(),
            bytes,
        })
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn take(&self, bytes: usize, max: u64) -> bool {
        let max = usize::try_from(max).unwrap_or(usize::MAX);
        let taken = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |used| {
                used.checked_add(bytes).filter(|&total| total <= max)
            })
            .is_ok();
        if taken && bytes > 0 {
            self.metrics.smtp_inflight_moved(bytes as i64);
        }
        taken
    }

    fn give_back(&self, bytes: usize) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::Relaxed);
            self.metrics.smtp_inflight_moved(-(bytes as i64));
        }
    }
}

/// Bytes one message buffer may hold; given back when dropped.
pub struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Grows the reservation to `bytes` (no-op if it holds that much already); false, and
    /// unchanged, if the budget cannot spare the difference under `max`.
    pub fn grow_to(&mut self, bytes: usize, max: u64) -> bool {
        if bytes <= self.bytes {
            return true;
        }
        if !self.budget.take(bytes - self.bytes, max) {
            return false;
        }
        self.bytes = bytes;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

/// Makes room in `buffer` for `incoming` more bytes, reserving before it grows: doubling
/// while the budget allows (so a message costs a handful of reservations), else exactly what
/// is needed. Nothing is stored beyond `max_size` (the decoders stop there), so no room is
/// made beyond it. False when the budget cannot spare it: the buffer is left as it was.
pub fn make_room(
    buffer: &mut Vec<u8>,
    reservation: &mut Reservation,
    incoming: usize,
    max_size: usize,
    budget_max: u64,
) -> bool {
    let want = buffer.len().saturating_add(incoming).min(max_size);
    if want <= buffer.capacity() {
        return true;
    }
    let doubled = want.max(buffer.capacity().saturating_mul(2)).min(max_size);
    if !reservation.grow_to(doubled, budget_max) && !reservation.grow_to(want, budget_max) {
        return false;
    }
    // Never past what is reserved: the allocation is what the budget counts.
    buffer.reserve_exact(reservation.bytes() - buffer.len());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_never_exceed_the_budget_and_are_given_back() {
        let budget = Budget::new(Arc::new(Metrics::new()));
        let mut a = budget.reserve(600, 1000).unwrap();
        assert!(budget.reserve(500, 1000).is_none(), "600 + 500 > 1000");
        let b = budget.reserve(400, 1000).unwrap();
        assert_eq!(budget.used(), 1000);
        assert!(!a.grow_to(601, 1000));
        assert_eq!((a.bytes(), budget.used()), (600, 1000));
        drop(b);
        assert!(a.grow_to(1000, 1000));
        assert!(a.grow_to(10, 1000), "shrinking is a no-op");
        assert_eq!(budget.used(), 1000);
        drop(a);
        assert_eq!(budget.used(), 0);
        // A reload may lower the maximum: what is held stays, nothing new fits.
        let held = budget.reserve(800, 1000).unwrap();
        assert!(budget.reserve(1, 500).is_none());
        drop(held);
        assert!(budget.reserve(1, 500).is_some());
    }

    #[test]
    fn buffers_grow_within_their_reservation() {
        let budget = Budget::new(Arc::new(Metrics::new()));
        let mut r = budget.reserve(16, 100).unwrap();
        let mut buf = Vec::with_capacity(16);
        buf.extend_from_slice(&[1; 16]);
        // Doubling to 32 fits.
        assert!(make_room(&mut buf, &mut r, 10, 1000, 100));
        assert_eq!((r.bytes(), buf.capacity()), (32, 32));
        buf.extend_from_slice(&[2; 16]);
        // 90 bytes needed, more than double: exactly 90 is reserved.
        assert!(make_room(&mut buf, &mut r, 58, 1000, 100));
        assert_eq!(r.bytes(), 90);
        assert!(buf.capacity() >= 90 && buf.capacity() <= r.bytes());
        buf.resize(90, 3);
        // Past the budget: refused, nothing changes.
        assert!(!make_room(&mut buf, &mut r, 20, 1000, 100));
        assert_eq!((r.bytes(), budget.used()), (90, 90));
        // Past the message size limit nothing is stored, so no room is needed.
        assert!(make_room(&mut buf, &mut r, 1_000_000, 90, 100));
        assert_eq!(r.bytes(), 90);
    }

    #[test]
    fn another_sessions_reservation_leaves_exactly_the_rest() {
        let budget = Budget::new(Arc::new(Metrics::new()));
        let _other = budget.reserve(70, 100).unwrap();
        let mut r = budget.reserve(10, 100).unwrap();
        let mut buf = vec![0; 10];
        assert_eq!(buf.capacity(), 10);
        // 30 bytes needed take the budget's last 20; one more byte does not fit.
        assert!(make_room(&mut buf, &mut r, 20, 1000, 100));
        assert_eq!(r.bytes(), 30);
        buf.resize(30, 0);
        assert!(!make_room(&mut buf, &mut r, 1, 1000, 100));
    }
}
