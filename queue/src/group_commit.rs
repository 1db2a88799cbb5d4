//! Group commit: one dedicated thread applies the writes of many writers as
//! one sled batch and makes them durable with real fsyncs.
//!
//! Why one merged batch: sled 0.34's `apply_batch` takes a process-wide
//! exclusive lock and seals the current IO buffer before and after the batch,
//! and `flush()` holds the shared side of that lock while it waits for the
//! disk. Batches applied by each writer therefore serialise behind every
//! flush and each cost their own buffer write; merged, a round costs one
//! `apply_batch` whatever the number of writers.
//!
//! Why our own fsyncs: sled's `flush()` ends in `sync_file_range` on Linux,
//! which survives a process crash but not a power loss (no drive-cache flush,
//! no metadata), and the `<spool>/blobs/<lsn>` files that hold large pages are
//! never fsynced by sled at all. Each round therefore:
//!
//! 1. applies the queued operations as one `apply_batch` (atomic);
//! 2. fsyncs every blob file it has not synced at its current length, then the
//!    `blobs` directory if a new name appeared (blobs before the log, so no
//!    durable log entry points at a blob that is not durable);
//! 3. calls sled's `flush()` to write out its log buffers;
//! 4. fdatasyncs sled's data file `<spool>/db` through a handle of our own
//!    (fsync applies to the inode, whichever descriptor is used).
//!
//! Protocol: a writer queues its operations and gets a sequence number
//! (`written += 1`), then waits until `durable >= seq`. The thread takes the
//! queue and the current `written`, runs a round and publishes
//! `durable = written`. Writers arriving during a round are queued for the
//! next one, which is how N concurrent commits share one batch and one fsync.
//!
//! Invariants:
//! - queued operations are applied in queue order, and one write's operations
//!   never straddle two rounds, so each write is atomic;
//! - `durable` only advances after a round fully succeeded;
//! - a failed round poisons the spool for good (`SpoolError::NotDurable`):
//!   after an fsync error the kernel may have dropped the dirty pages, so a
//!   later successful fsync proves nothing about earlier writes;
//! - waiters sleep on a `tokio::sync::watch` channel that the std thread
//!   updates; nobody polls.
//!
//! For monitoring, without a metrics dependency: an optional observer
//! (`Spool::on_round`) is called on the thread after every successful round
//! with its size and duration, and `Spool::health` reports a poisoned spool
//! or a round that has been running too long (a stuck disk).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::SpoolError;

/// Counters for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    /// Writes (commit, update, remove) queued since open.
    pub writes: u64,
    /// Completed rounds (each: one merged batch, one flush, the fsyncs).
    pub syncs: u64,
    /// Writes covered by the most recent round.
    pub last_batch: u64,
}

/// One successful round, as reported to the round observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Round {
    /// Writes merged into the round's batch.
    pub writes: u64,
    /// Applying the batch plus the flush and fsyncs.
    pub took: Duration,
}

/// Called on the sync thread after each round; must be cheap and never block.
pub(crate) type RoundObserver = Box<dyn Fn(Round) + Send + Sync>;

/// What writers wait on.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// Every write with a sequence number `<=` this is durable.
    durable: u64,
    rounds: u64,
    /// Set once, on the first failed round; never cleared.
    failed: Option<Arc<str>>,
}

/// One sled operation: `Some(value)` inserts, `None` removes.
pub(crate) type Op = (sled::IVec, Option<sled::IVec>);

#[derive(Debug, Default)]
struct Pending {
    /// Operations queued since the last round took the queue, in write order.
    ops: Vec<Op>,
    /// Sequence number of the latest queued write.
    written: u64,
    closing: bool,
}

/// State shared between the writers and the sync thread.
pub(crate) struct GroupCommit {
    pending: Mutex<Pending>,
    wake: Condvar,
    progress: watch::Sender<Progress>,
    last_batch: AtomicU64,
    /// Every write numbered up to this has been applied to sled (perhaps not
    /// yet durably).
    applied: AtomicU64,
    /// Reference point for `round_started`.
    epoch: Instant,
    /// Nanoseconds after `epoch` at which the running round started, plus
    /// one; 0 while no round runs.
    round_started: AtomicU64,
    observer: OnceLock<RoundObserver>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("progress", &*self.progress.borrow())
            .field("applied", &self.applied)
            .finish_non_exhaustive()
    }
}

impl GroupCommit {
    /// Starts the sync thread. It owns `syncer` and a handle on the database.
    pub(crate) fn start(
        db: sled::Db,
        syncer: Syncer,
    ) -> Result<(Arc<GroupCommit>, JoinHandle<()>), SpoolError> {
        let group = Arc::new(GroupCommit {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress::default()),
            last_batch: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            epoch: Instant::now(),
            round_started: AtomicU64::new(0),
            observer: OnceLock::new(),
        });
        let thread_group = Arc::clone(&group);
        let handle = std::thread::Builder::new()
            .name("tern-spool-sync".into())
            .spawn(move || thread_group.run(&db, syncer))
            .map_err(|e| SpoolError::io("starting the spool sync thread", e))?;
        Ok((group, handle))
    }

    /// Fails fast once the spool is poisoned, so no new data is written that
    /// could never be acknowledged.
    pub(crate) fn check(&self) -> Result<(), SpoolError> {
        match &self.progress.borrow().failed {
            Some(reason) => Err(SpoolError::NotDurable(reason.to_string())),
            None => Ok(()),
        }
    }

    /// Installs the round observer; false if one is already installed.
    pub(crate) fn observe(&self, observer: RoundObserver) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// `Err` with the reason when the spool is poisoned, or when a round has
    /// been running for longer than `stall` (the disk is not answering).
    pub(crate) fn health(&self, stall: Duration) -> Result<(), String> {
        if let Some(reason) = &self.progress.borrow().failed {
            return Err(format!("spool writes failed: {reason}"));
        }
        let started = self.round_started.load(Ordering::Acquire);
        if started != 0 {
            let running = self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_nanos(started - 1));
            if running > stall {
                return Err(format!(
                    "a spool sync round has been running for {:.1} s",
                    running.as_secs_f64()
                ));
            }
        }
        Ok(())
    }

    /// Queues one write's operations for the next round and returns the
    /// write's sequence number, to pass to `wait_for`. Callers that must order
    /// writes against their own state call this while holding their lock.
    pub(crate) fn enqueue(&self, ops: impl IntoIterator<Item = Op>) -> u64 {
        let seq = {
            let mut pending = self.lock_pending();
            pending.ops.extend(ops);
            pending.written += 1;
            pending.written
        };
        self.wake.notify_one();
        seq
    }

    /// Returns once every write queued so far is durable.
    pub(crate) async fn flush(&self) -> Result<(), SpoolError> {
        self.wait_for(self.written()).await
    }

    /// Asks the thread to finish: it runs a last round if writes are pending
    /// (e.g. from a commit whose future was dropped) and exits.
    pub(crate) fn close(&self) {
        self.lock_pending().closing = true;
        self.wake.notify_one();
    }

    pub(crate) fn stats(&self) -> CommitStats {
        let writes = self.lock_pending().written;
        CommitStats {
            writes,
            syncs: self.progress.borrow().rounds,
            last_batch: self.last_batch.load(Ordering::Relaxed),
        }
    }

    /// Sequence number of the latest queued write.
    pub(crate) fn written(&self) -> u64 {
        self.lock_pending().written
    }

    /// Sequence number up to which writes are visible in sled.
    pub(crate) fn applied(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    pub(crate) fn rounds(&self) -> u64 {
        self.progress.borrow().rounds
    }

    /// Returns once the write numbered `seq` is durable, or the error that
    /// prevented it.
    pub(crate) async fn wait_for(&self, seq: u64) -> Result<(), SpoolError> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let progress = rx.borrow_and_update();
                if progress.durable >= seq {
                    return Ok(());
                }
                if let Some(reason) = &progress.failed {
                    return Err(SpoolError::NotDurable(reason.to_string()));
                }
            }
            // The sender lives in `self`, so it outlives this borrow; an
            // error here would mean the channel is gone, never "durable".
            if rx.changed().await.is_err() {
                return Err(SpoolError::NotDurable(
                    "the spool sync thread is gone".into(),
                ));
            }
        }
    }

    // The counters stay meaningful even if a holder panicked.
    fn lock_pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn fail(&self, reason: String) {
        self.progress.send_modify(|p| {
            if p.failed.is_none() {
                p.failed = Some(reason.into());
            }
        });
    }

    /// The sync thread's loop.
    fn run(&self, db: &sled::Db, mut syncer: Syncer) {
        // Without this, a panic in a round would leave writers waiting forever.
        let _on_panic = FailOnPanic(self);
        let mut durable = 0;
        loop {
            let (ops, target) = {
                let mut pending = self.lock_pending();
                while pending.written == durable && !pending.closing {
                    pending = self
                        .wake
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                if pending.written == durable {
                    return; // closing, nothing left to sync
                }
                (std::mem::take(&mut pending.ops), pending.written)
            };
            let started = Instant::now();
            let since_epoch = started.duration_since(self.epoch).as_nanos() as u64;
            self.round_started.store(since_epoch + 1, Ordering::Release);
            let result = apply(db, ops).and_then(|()| {
                self.applied.store(target, Ordering::Release);
                syncer.sync(db)
            });
            let took = started.elapsed();
            self.round_started.store(0, Ordering::Release);
            if let Err(e) = result {
                tracing::error!(error = %e, "spool sync failed; refusing further writes");
                self.fail(e.to_string());
                return;
            }
            self.last_batch.store(target - durable, Ordering::Relaxed);
            if let Some(observe) = self.observer.get() {
                observe(Round {
                    writes: target - durable,
                    took,
                });
            }
            durable = target;
            self.progress.send_modify(|p| {
                p.durable = target;
                p.rounds += 1;
            });
        }
    }
}

fn apply(db: &sled::Db, ops: Vec<Op>) -> Result<(), SpoolError> {
    let mut batch = sled::Batch::default();
    // `Batch` keeps the last operation per key, which is what applying the
    // queue in order would leave.
    for (key, value) in ops {
        match value {
            Some(value) => batch.insert(key, value),
            None => batch.remove(key),
        }
    }
    Ok(db.apply_batch(batch)?)
}

struct FailOnPanic<'a>(&'a GroupCommit);

impl Drop for FailOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.fail("the spool sync thread panicked".into());
        }
    }
}

/// The file-level part of a round. Used directly (synchronously) by
/// `Spool::open` before the thread starts, then owned by the thread.
#[derive(Debug)]
pub(crate) struct Syncer {
    db_path: PathBuf,
    db_file: File,
    blobs_dir: PathBuf,
    /// Blob file name -> length at which we fsynced it. A blob seen while
    /// sled was still writing it has a shorter length than its final one, so
    /// comparing lengths makes the next round sync it again. Names sled has
    /// deleted drop out when the directory is listed.
    synced_blobs: HashMap<OsString, u64>,
}

impl Syncer {
    /// Opens our own handle on sled's data file; call after sled opened the
    /// spool (sled creates the file and the blobs directory).
    pub(crate) fn open(dir: &Path) -> Result<Syncer, SpoolError> {
        let db_path = dir.join("db");
        // Write access is not needed for fsync on Linux but is on some other
        // systems; the handle is never written through.
        let db_file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&db_path)
            .map_err(|e| SpoolError::io(format!("opening {}", db_path.display()), e))?;
        Ok(Syncer {
            db_path,
            db_file,
            blobs_dir: dir.join("blobs"),
            synced_blobs: HashMap::new(),
        })
    }

    /// Makes everything applied to sled so far durable: blobs, sled's
    /// buffers, sled's data file.
    pub(crate) fn sync(&mut self, db: &sled::Db) -> Result<(), SpoolError> {
        self.sync_blobs()?;
        db.flush()?;
        self.db_file
            .sync_data()
            .map_err(|e| SpoolError::io(format!("fsync of {}", self.db_path.display()), e))
    }

    fn sync_blobs(&mut self) -> Result<(), SpoolError> {
        let blobs_dir = &self.blobs_dir;
        let io_err =
            |what: &str, path: &Path, e| SpoolError::io(format!("{what} {}", path.display()), e);
        let entries = fs::read_dir(blobs_dir).map_err(|e| io_err("listing", blobs_dir, e))?;
        let mut current = HashMap::with_capacity(self.synced_blobs.len());
        let mut new_name = false;
        for entry in entries {
            let entry = entry.map_err(|e| io_err("listing", blobs_dir, e))?;
            let path = entry.path();
            // sled deletes blobs it no longer needs; one can vanish between
            // listing and opening, and then there is nothing to sync.
            let len = match entry.metadata() {
                Ok(meta) => meta.len(),
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_err("reading metadata of", &path, e)),
            };
            let name = entry.file_name();
            match self.synced_blobs.get(&name) {
                Some(&synced_len) if synced_len == len => {}
                known => {
                    match File::open(&path) {
                        Ok(file) => file.sync_data().map_err(|e| io_err("fsync of", &path, e))?,
                        Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_err("opening", &path, e)),
                    }
                    new_name |= known.is_none();
                }
            }
            current.insert(name, len);
        }
        if new_name {
            sync_dir(blobs_dir)?;
        }
        self.synced_blobs = current;
        Ok(())
    }
}

/// fsyncs a directory so the names created in it survive a power loss.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| SpoolError::io(format!("fsync of directory {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn blob_bookkeeping_follows_length_and_deletion() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path())
            .flush_every_ms(None)
            .open()
            .unwrap();
        let mut syncer = Syncer::open(dir.path()).unwrap();
        syncer.sync(&db).unwrap();
        assert!(syncer.synced_blobs.is_empty());

        // A blob caught half-written, as sled may be writing it during a round.
        let blob = dir.path().join("blobs").join("4242");
        let mut file = File::create(&blob).unwrap();
        file.write_all(b"head").unwrap();
        syncer.sync(&db).unwrap();
        assert_eq!(syncer.synced_blobs.get(&OsString::from("4242")), Some(&4));

        // Finished later: the new length must be synced (and recorded) again.
        file.write_all(b"and the rest").unwrap();
        syncer.sync(&db).unwrap();
        assert_eq!(syncer.synced_blobs.get(&OsString::from("4242")), Some(&16));

        // Deleted by sled: forgotten.
        fs::remove_file(&blob).unwrap();
        syncer.sync(&db).unwrap();
        assert!(syncer.synced_blobs.is_empty());
    }
}
