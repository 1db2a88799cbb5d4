//! The time tern schedules mail by: milliseconds since the Unix epoch.
//!
//! Arrival, due, retry and expiry times are all read here, so one clock orders them. It is the
//! system's wall clock. A test binary may instead make the whole process follow the tokio
//! runtime's clock ([`follow_runtime_clock`]): then time is the wall clock at that moment
//! plus the runtime's elapsed time, so retry and expiry can be tested over days of simulated
//! time on tokio's paused clock. The daemon never calls it.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Set once by [`follow_runtime_clock`]: the runtime instant and the wall time it stands for.
static RUNTIME_ANCHOR: OnceLock<(tokio::time::Instant, u64)> = OnceLock::new();

/// Now, in unix milliseconds.
pub fn now_ms() -> u64 {
    match RUNTIME_ANCHOR.get() {
        Some((instant, wall_ms)) => wall_ms + instant.elapsed().as_millis() as u64,
        None => system_ms(),
    }
}

/// Now, as a `SystemTime` (for Date headers and logs), on the same clock as [`now_ms`].
pub fn now() -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(now_ms())
}

/// Makes [`now_ms`] follow the current tokio runtime's clock from here on, for the rest of
/// the process. For tests on a paused runtime; call it inside that runtime before anything
/// reads the clock.
pub fn follow_runtime_clock() {
    RUNTIME_ANCHOR.get_or_init(|| (tokio::time::Instant::now(), system_ms()));
}

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
