//! When a session's next read must have returned, and what it means when it has not: the
//! pure core of the session's timeouts (no I/O, no clock of its own: every function is
//! given `now`).
//!
//! A read waits for the earliest of the deadlines that apply to it:
//! - waiting for a command: `command_timeout` from now; with a BDAT transaction open, also
//!   `data_timeout` after its last chunk (an idle transaction does not keep its buffer) and
//!   the end of its data-rate window;
//! - reading message content: `data_timeout` from now and the end of the data-rate window;
//! - always: the session's own deadline, `session_timeout` after it was accepted.
//!
//! Invariant: a deadline that has already passed fires before any further read, so a client
//! that keeps the session busy (pipelining without pause) meets it too.

use crate::config::Limits;
use std::time::Duration;
use tokio::time::Instant;

/// Which deadline a read met.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// No command within `command_timeout`.
    Command,
    /// No content within `data_timeout`.
    Data,
    /// A BDAT transaction had no chunk for `data_timeout`.
    BdatIdle,
    /// The session lasted `session_timeout`.
    Session,
    /// A data-rate window ended: [`DataRate::record`] decides whether the client was too slow.
    RateWindow,
}

/// The deadline of a read that waits for a command. `bdat` is the open BDAT transaction's
/// last chunk time and rate, if there is one.
pub fn for_command(
    now: Instant,
    limits: &Limits,
    session_end: Instant,
    bdat: Option<(Instant, &DataRate)>,
) -> (Instant, Expiry) {
    let mut next = earliest(
        (now + limits.command_timeout, Expiry::Command),
        (session_end, Expiry::Session),
    );
    if let Some((last_chunk, rate)) = bdat {
        next = earliest(next, (last_chunk + limits.data_timeout, Expiry::BdatIdle));
        next = earliest(next, (rate.window_end(), Expiry::RateWindow));
    }
    next
}

/// The deadline of a read of message content (DATA, or a BDAT chunk).
pub fn for_data(
    now: Instant,
    limits: &Limits,
    session_end: Instant,
    rate: &DataRate,
) -> (Instant, Expiry) {
    let next = earliest(
        (now + limits.data_timeout, Expiry::Data),
        (session_end, Expiry::Session),
    );
    earliest(next, (rate.window_end(), Expiry::RateWindow))
}

/// The earlier of two deadlines; on a tie the first (the more specific reason comes first).
fn earliest(a: (Instant, Expiry), b: (Instant, Expiry)) -> (Instant, Expiry) {
    if b.0 < a.0 {
        b
    } else {
        a
    }
}

/// The minimum data rate of one message: bytes received in consecutive windows of
/// `min_data_rate_window`, each of which must bring `min_data_rate` bytes per second on
/// average. A window only counts once it is over, so a message that ends within its first
/// window is never judged.
#[derive(Debug, Clone)]
pub struct DataRate {
    start: Instant,
    window: Duration,
    /// Bytes a whole window must bring.
    needed: u64,
    bytes: u64,
}

impl DataRate {
    pub fn new(now: Instant, limits: &Limits) -> DataRate {
        let window = limits.min_data_rate_window;
        let needed = (u128::from(limits.min_data_rate) * window.as_millis() / 1000)
            .try_into()
            .unwrap_or(u64::MAX);
        DataRate {
            start: now,
            window,
            needed,
            bytes: 0,
        }
    }

    pub fn window_end(&self) -> Instant {
        self.start + self.window
    }

    /// Counts `bytes` received at `now` (0 when a window ended with nothing new). False when
    /// the window that is over by `now` brought too little: the client is too slow.
    pub fn record(&mut self, now: Instant, bytes: usize) -> bool {
        self.bytes = self.bytes.saturating_add(bytes as u64);
        if now < self.window_end() {
            return true;
        }
        if self.bytes < self.needed {
            return false;
        }
        self.start = now;
        self.bytes = 0;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(600),
            min_data_rate: 1000,
            min_data_rate_window: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn command_waits_are_bounded_by_the_command_timeout_and_the_session() {
        let (l, t0) = (limits(), Instant::now());
        assert_eq!(
            for_command(t0, &l, t0 + S(3600), None),
            (t0 + S(300), Expiry::Command)
        );
        // Near its end, the session's deadline comes first.
        assert_eq!(
            for_command(t0, &l, t0 + S(20), None),
            (t0 + S(20), Expiry::Session)
        );
        // A deadline in the past is returned as it is: the caller fires it without reading.
        let (at, why) = for_command(t0 + S(30), &l, t0 + S(20), None);
        assert!(at <= t0 + S(30) && why == Expiry::Session);
    }

    #[test]
    fn an_open_bdat_transaction_is_bounded_by_its_rate_and_data_timeout() {
        let (mut l, t0) = (limits(), Instant::now());
        let rate = DataRate::new(t0, &l);
        // The rate window (10 s) ends before the data timeout and the command timeout.
        assert_eq!(
            for_command(t0, &l, t0 + S(3600), Some((t0, &rate))),
            (t0 + S(10), Expiry::RateWindow)
        );
        // With a long window, the idle transaction ends data_timeout after its last chunk,
        // however many commands (NOOP) came since.
        l.min_data_rate_window = S(3600);
        l.data_timeout = S(60);
        let rate = DataRate::new(t0, &l);
        assert_eq!(
            for_command(t0 + S(50), &l, t0 + S(7200), Some((t0, &rate))),
            (t0 + S(60), Expiry::BdatIdle)
        );
    }

    #[test]
    fn content_reads_are_bounded_by_the_data_timeout_rate_window_and_session() {
        let (mut l, t0) = (limits(), Instant::now());
        let rate = DataRate::new(t0, &l);
        assert_eq!(
            for_data(t0, &l, t0 + S(3600), &rate),
            (t0 + S(10), Expiry::RateWindow)
        );
        l.data_timeout = S(5);
        assert_eq!(
            for_data(t0, &l, t0 + S(3600), &rate),
            (t0 + S(5), Expiry::Data)
        );
        assert_eq!(
            for_data(t0, &l, t0 + S(1), &rate),
            (t0 + S(1), Expiry::Session)
        );
    }

    #[test]
    fn data_rate_judges_whole_windows_only() {
        let (l, t0) = (limits(), Instant::now());
        let mut rate = DataRate::new(t0, &l);
        // Within the first window nothing is judged, however little arrived.
        assert!(rate.record(t0 + S(1), 1));
        assert!(rate.record(t0 + S(9), 0));
        // 10 s at 1000 B/s need 10,000 bytes: 1 + 9,999 is enough, and a new window starts.
        assert!(rate.record(t0 + S(10), 9_999));
        assert_eq!(rate.window_end(), t0 + S(20));
        // The next window brings 9,999 bytes: too slow when it ends.
        assert!(rate.record(t0 + S(15), 9_999));
        assert!(!rate.record(t0 + S(20), 0));
    }

    #[test]
    fn a_fast_message_is_never_too_slow() {
        let (l, t0) = (limits(), Instant::now());
        let mut rate = DataRate::new(t0, &l);
        for i in 0..100u64 {
            assert!(rate.record(t0 + Duration::from_millis(i * 300), 16 * 1024));
        }
    }
}
