//! The delivery log: one JSON line per delivery attempt per recipient.
//!
//! Callers serialize their record and hand the line to a dedicated writer thread through a
//! bounded channel, so a slow or full disk never stalls a delivery: when the channel is full
//! the line is dropped and counted ([`DeliveryLog::dropped`]). The log is a record for
//! operators, not a source of truth (the spool is), so lines are not fsynced.
//!
//! Invariants:
//! - each line is written with a single `write` on a file opened with O_APPEND, so lines from
//!   this or another process never interleave within a line, and a rotated file (renamed by
//!   logrotate) keeps receiving lines until [`DeliveryLog::reopen`] switches to the new one;
//! - lines leave in the order `record` was called (one channel, one writer);
//! - [`DeliveryLog::flush`] returns only after every line recorded before it is written;
//! - a line reaches the file within about [`LINGER`] (5 ms) of being recorded, unless the disk is slow.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::taxonomy::Category;
use serde::{Serialize, Serializer};
use tern_queue::MessageId;
use tokio::sync::{mpsc, oneshot};

/// Lines that may wait for the writer. At ~400 bytes a line this bounds the backlog to a few
/// MB while absorbing bursts of tens of thousands of attempts per second.
const CHANNEL_CAPACITY: usize = 8192;

/// How long the writer rests after a write before looking for more lines: lines recorded
/// meanwhile wait at most this long and share one write. 8192 lines in 5 ms is over 1.6M lines
/// a second, far beyond any delivery rate, so the rest never fills the channel.
const LINGER: std::time::Duration = std::time::Duration::from_millis(5);

/// How the attempt ended for this recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    Delivered,
    /// Temporary failure; will be retried.
    Deferred,
    /// Permanent failure.
    Bounced,
    /// Temporary failure past the message's lifetime.
    Expired,
    /// Removed by the operator without a DSN (`POST /api/v1/queue/delete`); not an attempt.
    Deleted,
    /// A complaint (ARF report) about mail to this recipient came back; not an attempt.
    Complaint,
    /// Refused or dropped because the recipient is on the suppression list; not an attempt.
    Suppressed,
}

impl From<AttemptOutcome> for crate::telemetry::Outcome {
    fn from(outcome: AttemptOutcome) -> Self {
        use crate::telemetry::Outcome;
        match outcome {
            AttemptOutcome::Delivered => Outcome::Delivered,
            AttemptOutcome::Deferred => Outcome::Deferred,
            AttemptOutcome::Bounced => Outcome::Bounced,
            AttemptOutcome::Expired => Outcome::Expired,
            AttemptOutcome::Deleted => Outcome::Deleted,
            AttemptOutcome::Complaint => Outcome::Complaint,
            AttemptOutcome::Suppressed => Outcome::Suppressed,
        }
    }
}

/// One log line. Absent values are written as `null`, so every line has every key.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptRecord<'a> {
    /// When the attempt ended; written as RFC 3339 UTC with milliseconds.
    #[serde(serialize_with = "rfc3339_ms")]
    pub ts: SystemTime,
    pub id: MessageId,
    pub queue_id: MessageId,
    pub recipient: &'a str,
    pub sender: &'a str,
    /// Remote host name.
    pub host: Option<&'a str>,
    /// Remote address and port.
    pub ip: Option<SocketAddr>,
    pub source_ip: Option<IpAddr>,
    pub tls_version: Option<&'a str>,
    pub tls_cipher: Option<&'a str>,
    /// The TLS policy the attempt was under (`mta-sts-enforce`, `mta-sts-testing`,
    /// `required`, `opportunistic`, `disabled`); `null` for lines of no attempt.
    pub tls_policy: Option<&'a str>,
    /// The remote reply, or the local error text.
    pub reply: &'a str,
    pub outcome: AttemptOutcome,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// Seconds since the message arrived.
    pub delay_s: f64,
    /// The destination (queue key) the attempt was made for.
    pub destination: &'a str,
    /// Why it failed, for deferred, bounced and expired attempts (`crate::bounce::classify`,
    /// the taxonomy bounces are parsed into); `null` when delivered.
    pub category: Option<Category>,
    /// The sidecar campaign and variant the message was rendered for (absent for other mail).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub campaign: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variant: Option<&'a str>,
}

/// Handle to the delivery log; clones share one writer.
#[derive(Clone)]
pub struct DeliveryLog {
    /// `None` when logging is disabled.
    shared: Option<Arc<Shared>>,
}

struct Shared {
    tx: mpsc::Sender<Command>,
    dropped: AtomicU64,
    /// Set by `reopen`, acted on by the writer before its next write.
    reopen: AtomicBool,
}

enum Command {
    Line(Vec<u8>),
    /// Wakes the writer so a pending reopen happens even when no lines arrive.
    Wake,
    /// Answered once everything queued before it is written.
    Flush(oneshot::Sender<()>),
}

impl DeliveryLog {
    /// Opens (creating if needed) the log at `path` and starts its writer thread; `None`
    /// gives a disabled log whose records cost nothing. Opening here, not on the thread,
    /// makes a bad path a startup error.
    pub fn open(path: Option<&Path>) -> io::Result<DeliveryLog> {
        let Some(path) = path else {
            return Ok(DeliveryLog { shared: None });
        };
        let file = open_append(path)?;
        let (tx, rx) = mpsc::channel(CHANNEL_CAPACITY);
        let shared = Arc::new(Shared {
            tx,
            dropped: AtomicU64::new(0),
            reopen: AtomicBool::new(false),
        });
        let writer = Writer {
            path: path.to_owned(),
            file,
            shared: Arc::downgrade(&shared),
            failing: false,
        };
        std::thread::Builder::new()
            .name("delivery-log".into())
            .spawn(move || writer.run(rx))?;
        Ok(DeliveryLog {
            shared: Some(shared),
        })
    }

    /// A log that writes nothing.
    pub fn disabled() -> DeliveryLog {
        DeliveryLog { shared: None }
    }

    /// Queues one line for `rec`. Never blocks: with the writer behind, the line is dropped
    /// and counted.
    pub fn record(&self, rec: &AttemptRecord<'_>) {
        let Some(shared) = &self.shared else {
            return;
        };
        let mut line = match serde_json::to_vec(rec) {
            Ok(line) => line,
            Err(e) => {
                // These field types always serialize; should a future field not, the line
                // is lost rather than the attempt disturbed.
                tracing::warn!(error = %e, "delivery log: record not serializable");
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
        };
        line.push(b'\n');
        if shared.tx.try_send(Command::Line(line)).is_err() {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Waits until every line recorded so far is written (or lost to a write error).
    pub async fn flush(&self) {
        let Some(shared) = &self.shared else {
            return;
        };
        let (done, written) = oneshot::channel();
        if shared.tx.send(Command::Flush(done)).await.is_ok() {
            // An error means the writer is gone, so nothing more will be written anyway.
            let _ = written.await;
        }
    }

    /// Closes and reopens the file by path before the next write, for log rotation.
    pub fn reopen(&self) {
        if let Some(shared) = &self.shared {
            shared.reopen.store(true, Ordering::Relaxed);
            // A full channel needs no wake-up: the writer is busy and will see the flag.
            let _ = shared.tx.try_send(Command::Wake);
        }
    }

    /// Lines lost so far: the writer was behind, or writing failed.
    pub fn dropped(&self) -> u64 {
        self.shared
            .as_ref()
            .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    let mut options = OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    {
        // Recipient and sender addresses are personal data: not world-readable.
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o640);
    }
    options.open(path)
}

/// The writer thread's state.
struct Writer {
    path: PathBuf,
    file: File,
    /// Weak, so that the thread does not keep the handles' state alive; the channel closing
    /// (every handle dropped) is what ends the thread.
    shared: std::sync::Weak<Shared>,
    /// Whether the last write failed; errors are logged once per failing stretch.
    failing: bool,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        let mut batch = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            // A reopen whose wake-up did not fit in a full channel is caught here.
            self.reopen_if_asked();
            let mut done = Vec::new();
            let mut next = Some(first);
            // Take whatever else is queued, so a burst costs few writes.
            while let Some(cmd) = next {
                match cmd {
                    Command::Line(line) => self.add(&mut batch, line),
                    Command::Wake => {
                        // Lines before the wake-up belong to the old file, later ones to the
                        // new: write the batch, then switch.
                        self.write(&mut batch);
                        self.reopen_if_asked();
                    }
                    Command::Flush(reply) => done.push(reply),
                }
                next = rx.try_recv().ok();
            }
            let wrote = !batch.is_empty();
            self.write(&mut batch);
            for reply in done {
                let _ = reply.send(());
            }
            if wrote {
                // Under load a line arrives every few microseconds: waking for each costs a
                // context switch on both sides (it was one per 1.7 messages at 50 sessions).
                // Resting a moment lets the next lines gather into one batch and one write.
                std::thread::sleep(LINGER);
            }
        }
    }

    /// Appends `line` to the batch, writing the batch first if it would grow large, so one
    /// write stays a reasonable size and always ends at a line boundary.
    fn add(&mut self, batch: &mut Vec<u8>, line: Vec<u8>) {
        const MAX_BATCH: usize = 64 * 1024;
        if !batch.is_empty() && batch.len() + line.len() > MAX_BATCH {
            self.write(batch);
        }
        batch.extend_from_slice(&line);
    }

    fn write(&mut self, batch: &mut Vec<u8>) {
        if batch.is_empty() {
            return;
        }
        match self.file.write_all(batch) {
            Ok(()) => self.failing = false,
            Err(e) => {
                let lines = batch.iter().filter(|&&b| b == b'\n').count() as u64;
                if let Some(shared) = self.shared.upgrade() {
                    shared.dropped.fetch_add(lines, Ordering::Relaxed);
                }
                if !self.failing {
                    tracing::warn!(path = %self.path.display(), error = %e, "delivery log: write failed");
                }
                self.failing = true;
            }
        }
        batch.clear();
    }

    fn reopen_if_asked(&mut self) {
        let asked = self
            .shared
            .upgrade()
            .is_some_and(|s| s.reopen.swap(false, Ordering::Relaxed));
        if !asked {
            return;
        }
        match open_append(&self.path) {
            Ok(file) => self.file = file,
            // Keep writing to the old file rather than lose lines.
            Err(e) => {
                tracing::warn!(path = %self.path.display(), error = %e, "delivery log: reopen failed")
            }
        }
    }
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-27T20:13:09.042Z`.
fn rfc3339_ms<S: Serializer>(t: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    // mail-parser's civil-date conversion is already linked in; it has second precision,
    // the milliseconds are added here.
    let d = mail_parser::DateTime::from_timestamp(since_epoch.as_secs() as i64);
    serializer.collect_str(&format_args!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        d.year,
        d.month,
        d.day,
        d.hour,
        d.minute,
        d.second,
        since_epoch.subsec_millis()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record<'a>(recipient: &'a str, outcome: AttemptOutcome, attempt: u32) -> AttemptRecord<'a> {
        AttemptRecord {
            // 2026-11-27 20:13:09.042 UTC
            ts: UNIX_EPOCH + Duration::from_millis(1_795_810_389_042),
            id: "0006123ABCDEF012".parse().unwrap(),
            queue_id: "0006123ABCDEF011".parse().unwrap(),
            recipient,
            sender: "s@example.org",
            host: Some("mx.example.net"),
            ip: Some("192.0.2.9:25".parse().unwrap()),
            source_ip: Some("198.51.100.1".parse().unwrap()),
            tls_version: Some("TLSv1.3"),
            tls_cipher: Some("TLS13_AES_256_GCM_SHA384"),
            tls_policy: Some("opportunistic"),
            reply: "250 2.0.0 Ok\r\nwith \"quotes\"",
            outcome,
            attempt,
            delay_s: 1.5,
            destination: "example.net",
            category: (outcome != AttemptOutcome::Delivered).then_some(Category::MailboxFull),
            campaign: None,
            variant: None,
        }
    }

    #[tokio::test]
    async fn records_become_json_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.log");
        let log = DeliveryLog::open(Some(&path)).unwrap();
        let outcomes = [
            AttemptOutcome::Delivered,
            AttemptOutcome::Deferred,
            AttemptOutcome::Bounced,
            AttemptOutcome::Expired,
        ];
        for (i, outcome) in outcomes.into_iter().enumerate() {
            log.record(&record(&format!("r{i}@example.net"), outcome, i as u32 + 1));
        }
        let mut plain = record("p@example.net", AttemptOutcome::Deferred, 1);
        plain.host = None;
        plain.ip = None;
        plain.tls_version = None;
        plain.tls_cipher = None;
        log.clone().record(&plain);
        log.flush().await;

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 5);
        let first = &lines[0];
        assert_eq!(first["ts"], "2026-11-27T20:13:09.042Z");
        assert_eq!(first["id"], "0006123ABCDEF012");
        assert_eq!(first["queue_id"], "0006123ABCDEF011");
        assert_eq!(first["recipient"], "r0@example.net");
        assert_eq!(first["sender"], "s@example.org");
        assert_eq!(first["host"], "mx.example.net");
        assert_eq!(first["ip"], "192.0.2.9:25");
        assert_eq!(first["source_ip"], "198.51.100.1");
        assert_eq!(first["tls_version"], "TLSv1.3");
        assert_eq!(first["tls_cipher"], "TLS13_AES_256_GCM_SHA384");
        assert_eq!(first["reply"], "250 2.0.0 Ok\r\nwith \"quotes\"");
        assert_eq!(first["attempt"], 1);
        assert_eq!(first["delay_s"], 1.5);
        assert_eq!(first["destination"], "example.net");
        assert_eq!(first["category"], serde_json::Value::Null);
        assert_eq!(lines[1]["category"], "mailbox_full");
        let outcomes: Vec<_> = lines
            .iter()
            .map(|l| l["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            outcomes,
            ["delivered", "deferred", "bounced", "expired", "deferred"]
        );
        let last = &lines[4];
        assert_eq!(last["recipient"], "p@example.net");
        assert!(last["host"].is_null() && last["ip"].is_null() && last["tls_version"].is_null());
        assert_eq!(log.dropped(), 0);
    }

    #[tokio::test]
    async fn reopen_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("delivery.log");
        let rotated = dir.path().join("delivery.log.1");
        let log = DeliveryLog::open(Some(&path)).unwrap();
        log.record(&record("before@example.net", AttemptOutcome::Delivered, 1));
        log.flush().await;
        std::fs::rename(&path, &rotated).unwrap();
        log.record(&record(
            "still-old@example.net",
            AttemptOutcome::Delivered,
            1,
        ));
        log.reopen();
        log.record(&record("after@example.net", AttemptOutcome::Delivered, 1));
        log.flush().await;

        let old = std::fs::read_to_string(&rotated).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert!(old.contains("before@") && !old.contains("after@"));
        assert!(new.contains("after@") && !new.contains("before@"));
        // The line recorded before reopen() may land in either file, but exactly once.
        assert_eq!(
            old.matches("still-old@").count() + new.matches("still-old@").count(),
            1
        );
    }

    #[tokio::test]
    async fn disabled_log_drops_quietly() {
        let log = DeliveryLog::open(None).unwrap();
        log.record(&record("r@example.net", AttemptOutcome::Delivered, 1));
        log.reopen();
        log.flush().await;
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn full_channel_counts_drops_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let log = DeliveryLog::open(Some(&dir.path().join("delivery.log"))).unwrap();
        // Far more than the channel holds, recorded faster than any disk: some may be
        // dropped, none may block, and every line is either written or counted.
        let n = CHANNEL_CAPACITY * 4;
        for i in 0..n {
            log.record(&record("r@example.net", AttemptOutcome::Deferred, i as u32));
        }
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(log.flush());
        let written = std::fs::read_to_string(dir.path().join("delivery.log"))
            .unwrap()
            .lines()
            .count() as u64;
        assert_eq!(written + log.dropped(), n as u64);
    }
}
