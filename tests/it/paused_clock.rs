//! Support for the test binaries that run the daemon on tokio's paused clock
//! (`tests/*_clock.rs`, which include this file with `#[path]`; see tests/retry_clock.rs for
//! the technique): holding off auto-advance, letting real time pass without moving the
//! virtual clock, and counting delivery attempts at a sink.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use crate::sink::Sink;

/// Keeps tokio from auto-advancing while the daemon waits on real I/O: a blocking task runs
/// until the returned sender is dropped (then await the handle).
pub fn hold_clock() -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (stop, hold) = std::sync::mpsc::channel::<()>();
    let holder = tokio::task::spawn_blocking(move || {
        let _ = hold.recv();
    });
    (stop, holder)
}

/// Lets real time pass (daemon I/O, fsyncs) without moving the virtual clock.
pub async fn pause_real(d: Duration) {
    tokio::task::spawn_blocking(move || std::thread::sleep(d))
        .await
        .unwrap();
}

/// Waits in real time, off the runtime's thread, until `done` holds; panics after 20 s.
pub async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "waited 20 s (real) for {what}");
        pause_real(Duration::from_millis(2)).await;
    }
}

/// RCPT commands for `address` the sink has seen: one per delivery attempt.
pub fn attempts_seen(sink: &Sink, address: &str) -> usize {
    let needle = format!("RCPT TO:<{address}>");
    sink.session_logs()
        .iter()
        .flat_map(|s| s.commands.iter())
        .filter(|c| c.line.starts_with(&needle))
        .count()
}
