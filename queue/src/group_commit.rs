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
//! Protocol: a writer queues its operations and gets a [`Ticket`]: a
//! sequence number (`written += 1`) and a cell the thread fills if the write
//! is refused. It waits until `resolved >= seq`, then the cell says whether
//! it was refused. The thread takes the queue and the current `written`,
//! runs a round and publishes `resolved = written`. Writers arriving during a
//! round are queued for the next one, which is how N concurrent commits share
//! one batch and one fsync.
//!
//! Free space ([`Space`]): sled 0.34 cannot survive running out of space (a
//! failed write leaves its log waiting forever: even dropping the database
//! hangs), so it is never allowed to get there. A commit is refused up front
//! (`SpoolError::Full`) when the file system has less than `min_free` left
//! besides twice the commit's size (by a reading at most 100 ms old; a refusal
//! is checked against a new one), and a whole round is refused, before
//! anything of it reaches sled, when less than half of `min_free` would be
//! left besides twice the round's size (always a new reading): the other half is for delivery
//! outcomes and sled's own files. Nothing refused was applied, so a refusal is
//! not a failure: the writers are told, their counter changes undone, and the
//! next round runs as usual once space is back. Recovery needs nothing else.
//!
//! Invariants:
//! - queued operations are applied in queue order, and one write's operations
//!   never straddle two rounds, so each write is atomic;
//! - `resolved` only advances after a round fully succeeded or was refused
//!   as a whole (refused writes had their cells filled first, so no writer of
//!   a refused round ever sees success);
//! - a failed round poisons the spool for good (`SpoolError::NotDurable`):
//!   after an fsync error the kernel may have dropped the dirty pages, so a
//!   later successful fsync proves nothing about earlier writes;
//! - the message and byte counters move when a write is queued and move back
//!   when it is refused; they are exact for everything queued and not refused;
//! - waiters sleep on a `tokio::sync::watch` channel that the std thread
//!   updates; nobody polls.
//!
//! For monitoring, without a metrics dependency: an optional observer
//! (`Spool::on_round`) is called on the thread after every successful round
//! with its size and duration, and `Spool::health` reports a poisoned spool
//! or a round that has been running too long (a stuck disk).

use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::SpoolError;
use crate::journal;

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
    /// Every write with a sequence number `<=` this is durable, or was
    /// refused (its ticket says so).
    resolved: u64,
    rounds: u64,
    /// Set once, on the first failed round; never cleared.
    failed: Option<Arc<str>>,
}

/// One sled operation: `Some(value)` inserts, `None` removes.
pub(crate) type Op = (sled::IVec, Option<sled::IVec>);

/// How a write changes the message and byte counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Delta {
    pub(crate) messages: i64,
    pub(crate) bytes: i64,
}

/// Filled by the sync thread if the write was refused (why).
pub(crate) type Refusal = Arc<OnceLock<Arc<str>>>;

/// A queued write: its sequence number and what the thread tells it.
pub(crate) struct Ticket {
    seq: u64,
    refused: Refusal,
}

impl Ticket {
    pub(crate) fn seq(&self) -> u64 {
        self.seq
    }

    /// What a later write computed from this one's result depends on.
    pub(crate) fn refusal(&self) -> Refusal {
        self.refused.clone()
    }
}

/// A write waiting for its round.
#[derive(Debug)]
struct Queued {
    ops: Vec<Op>,
    refused: Refusal,
    delta: Delta,
    /// Earlier writes whose results this one was computed from (an update
    /// of a message whose previous update is still queued; a remove that
    /// also counts down a shared body's references): refused with any of them.
    after: Vec<Refusal>,
}

#[derive(Debug, Default)]
struct Pending {
    /// The writes queued since the last round took the queue, in order.
    writes: Vec<Queued>,
    /// Sequence number of the latest queued write.
    written: u64,
    closing: bool,
    /// The sync thread sleeps on `wake` for the next write. Only then does a
    /// writer notify it: a notify is a futex syscall even with nobody
    /// waiting, and under load the thread is almost always mid-round.
    sync_idle: bool,
    /// sled, now open, for a thread still writing the intake journal.
    switch: Option<Switch>,
}

/// Handed to the sync thread when sled is open: it moves the journal and answers.
struct Switch {
    db: sled::Db,
    syncer: Syncer,
    counting: journal::Counting,
    answer: std::sync::mpsc::Sender<Result<journal::Moved, SpoolError>>,
}

impl std::fmt::Debug for Switch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch").finish_non_exhaustive()
    }
}

/// Where a round goes: the intake journal until sled is open, then sled.
pub(crate) enum Sink {
    Journal(journal::Writer),
    Sled(sled::Db, Syncer),
}

/// The free space the spool keeps: `min_free` bytes on its file system for
/// new mail, half of that for everything else (see the module doc).
#[derive(Debug)]
pub(crate) struct Space {
    dir: PathBuf,
    min_free: AtomicU64,
    /// The last reading and when it was taken: commits are admitted against a reading up to
    /// [`FRESH`] old (one statvfs per round instead of per message); the round itself always
    /// reads anew, which is what keeps sled from running out of space.
    last: Mutex<Option<(Instant, Reading)>>,
}

/// Free bytes and inodes (`None`: not counted) of a file system; `None`: unreadable.
type Reading = Option<(u64, Option<u64>)>;

/// Inodes a round must leave free (sled's blob files each take one).
const MIN_FREE_INODES: u64 = 64;
/// How old a reading commits may be admitted against.
const FRESH: Duration = Duration::from_millis(100);

impl Space {
    pub(crate) fn new(dir: &Path, min_free: u64) -> Space {
        Space {
            dir: dir.to_path_buf(),
            min_free: AtomicU64::new(min_free),
            last: Mutex::new(None),
        }
    }

    pub(crate) fn set_min_free(&self, min_free: u64) {
        self.min_free.store(min_free, Ordering::Relaxed);
    }

    /// Bytes available to tern on the spool's file system, and inodes
    /// (`None` where the file system has no inode limit); `None` if it
    /// cannot be read, in which case nothing is refused for space.
    pub(crate) fn free(&self) -> Reading {
        let reading = statvfs(&self.dir);
        *self.last.lock().unwrap_or_else(PoisonError::into_inner) = Some((Instant::now(), reading));
        reading
    }

    /// The last reading if it is recent, else a new one.
    fn recent(&self) -> Reading {
        let last = *self.last.lock().unwrap_or_else(PoisonError::into_inner);
        match last {
            Some((at, reading)) if at.elapsed() < FRESH => reading,
            _ => self.free(),
        }
    }

    /// `Err` (why) unless writing `bytes` leaves `keep` bytes free, by `reading`.
    fn fits(&self, reading: Reading, bytes: u64, keep: u64) -> Result<(), String> {
        let Some((free, inodes)) = reading else {
            return Ok(());
        };
        // sled writes a value to its log (or a blob file) and the pages that
        // point to it: twice the size is a safe estimate.
        let needed = keep.saturating_add(bytes.saturating_mul(2));
        if free < needed {
            return Err(format!(
                "{} MiB free in {}, {} MiB needed",
                free >> 20,
                self.dir.display(),
                needed.div_ceil(1 << 20)
            ));
        }
        if inodes.is_some_and(|i| i < MIN_FREE_INODES) {
            return Err(format!("no free inodes in {}", self.dir.display()));
        }
        Ok(())
    }

    /// Whether a new message of `bytes` may be committed. A refusal is checked against a
    /// new reading, so freed space counts at once.
    pub(crate) fn admit(&self, bytes: u64) -> Result<(), SpoolError> {
        let keep = self.min_free.load(Ordering::Relaxed);
        self.fits(self.recent(), bytes, keep)
            .or_else(|_| self.fits(self.free(), bytes, keep))
            .map_err(SpoolError::Full)
    }

    /// Whether a round of `bytes` may be applied, by a new reading.
    fn round_fits(&self, bytes: u64) -> Result<(), String> {
        let keep = self.min_free.load(Ordering::Relaxed) / 2;
        self.fits(self.free(), bytes, keep)
    }
}

/// Bytes available to unprivileged users on the file system of `dir`, and inodes (`None`
/// where the file system counts none); `None` if it cannot be read.
fn statvfs(dir: &Path) -> Reading {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs only writes into the struct we pass; a zeroed statvfs is a valid
    // value of that plain C struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    let bytes = (stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64);
    // btrfs and others report no inode counts at all.
    let inodes = (stat.f_files != 0).then_some(stat.f_favail as u64);
    Some((bytes, inodes))
}

/// Message count and body bytes, for `Spool::stats`.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    messages: AtomicI64,
    bytes: AtomicI64,
}

impl Tally {
    fn add(&self, delta: Delta) {
        self.messages.fetch_add(delta.messages, Ordering::Relaxed);
        self.bytes.fetch_add(delta.bytes, Ordering::Relaxed);
    }

    fn undo(&self, delta: Delta) {
        self.messages.fetch_sub(delta.messages, Ordering::Relaxed);
        self.bytes.fetch_sub(delta.bytes, Ordering::Relaxed);
    }

    /// (messages, bytes) now.
    pub(crate) fn get(&self) -> (u64, u64) {
        let get = |a: &AtomicI64| u64::try_from(a.load(Ordering::Relaxed)).unwrap_or(0);
        (get(&self.messages), get(&self.bytes))
    }
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
    space: Space,
    tally: Tally,
    /// Held by the sync thread while it applies and syncs a round, and by a backup for the
    /// whole copy: a backup sees the spool between two rounds, never inside one.
    pub(crate) quiet: Mutex<()>,
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
    /// `messages` and `bytes` are what the spool holds now.
    pub(crate) fn start(
        sink: Sink,
        space: Space,
        (messages, bytes): (u64, u64),
    ) -> Result<(Arc<GroupCommit>, JoinHandle<()>), SpoolError> {
        let group = Arc::new(GroupCommit::new(space, (messages, bytes)));
        let thread_group = Arc::clone(&group);
        let handle = std::thread::Builder::new()
            .name("tern-spool-sync".into())
            .spawn(move || thread_group.run(sink))
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

    /// The free space the spool keeps.
    pub(crate) fn space(&self) -> &Space {
        &self.space
    }

    /// Messages and body bytes, counting writes queued and not refused.
    pub(crate) fn tally(&self) -> (u64, u64) {
        self.tally.get()
    }

    /// The counters as they stand, negative when removes of messages that a
    /// running recovery has not counted yet outweigh new commits.
    pub(crate) fn tally_signed(&self) -> (i64, i64) {
        (
            self.tally.messages.load(Ordering::Relaxed),
            self.tally.bytes.load(Ordering::Relaxed),
        )
    }

    /// Adds what recovery counted: the messages and bytes present at open.
    pub(crate) fn add_recovered(&self, messages: u64, bytes: u64) {
        self.tally.add(Delta {
            messages: i64::try_from(messages).unwrap_or(i64::MAX),
            bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        });
    }

    /// Adds what a journal move wrote that nobody had counted (see `journal::Moved`).
    pub(crate) fn add_moved(&self, delta: Delta) {
        self.tally.add(delta);
    }

    /// Blocks until every write queued so far has been applied to sled (or
    /// refused); for an open that waits for recovery's repairs, where no
    /// async runtime may be at hand. Polls: it runs once, briefly.
    pub(crate) fn wait_applied_blocking(&self) -> Result<(), SpoolError> {
        let target = self.written();
        while self.applied() < target {
            self.check()?;
            std::thread::sleep(Duration::from_millis(1));
        }
        Ok(())
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

    /// Queues one write's operations for the next round, with how it changes
    /// the counters (applied now, undone if the write is refused) and the
    /// earlier writes it was computed from, if any (`after`: it is refused if
    /// any of them is), and returns its ticket, to pass to `wait_for`. Callers
    /// that must order writes against their own state call this while holding
    /// their lock.
    pub(crate) fn enqueue(
        &self,
        ops: impl IntoIterator<Item = Op>,
        delta: Delta,
        after: impl IntoIterator<Item = Refusal>,
    ) -> Ticket {
        let refused = Refusal::default();
        let (seq, sync_idle) = {
            let mut pending = self.lock_pending();
            pending.writes.push(Queued {
                ops: ops.into_iter().collect(),
                refused: refused.clone(),
                delta,
                after: after.into_iter().collect(),
            });
            self.tally.add(delta);
            pending.written += 1;
            (pending.written, pending.sync_idle)
        };
        if sync_idle {
            self.wake.notify_one();
        }
        Ticket { seq, refused }
    }

    /// Returns once every write queued so far is durable or refused (its
    /// writer told).
    pub(crate) async fn flush(&self) -> Result<(), SpoolError> {
        self.wait_resolved(self.written()).await
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

    /// Returns once the write of `ticket` is durable, or the error that
    /// prevented it (refused: nothing of it was applied).
    pub(crate) async fn wait_for(&self, ticket: Ticket) -> Result<(), SpoolError> {
        self.wait_resolved(ticket.seq).await?;
        match ticket.refused.get() {
            Some(why) => Err(SpoolError::Full(why.to_string())),
            None => Ok(()),
        }
    }

    /// Returns once the writes numbered up to `seq` are durable or refused.
    async fn wait_resolved(&self, seq: u64) -> Result<(), SpoolError> {
        let mut rx = self.progress.subscribe();
        loop {
            {
                let progress = rx.borrow_and_update();
                if progress.resolved >= seq {
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

    /// Hands the now open sled to a sync thread that writes the intake journal, and waits
    /// until it has moved every journal into sled (see `journal`); from then on rounds go to
    /// sled. Blocking; called by the thread that opened sled.
    pub(crate) fn switch_to_sled(
        &self,
        db: sled::Db,
        syncer: Syncer,
        counting: journal::Counting,
    ) -> Result<journal::Moved, SpoolError> {
        let (answer, moved) = std::sync::mpsc::channel();
        self.lock_pending().switch = Some(Switch {
            db,
            syncer,
            counting,
            answer,
        });
        self.wake.notify_one();
        moved.recv().unwrap_or_else(|_| {
            Err(SpoolError::NotDurable(
                "the spool sync thread ended before moving the intake journal".into(),
            ))
        })
    }

    /// The sync thread's loop.
    fn run(&self, mut sink: Sink) {
        // Without this, a panic in a round would leave writers waiting forever.
        let _on_panic = FailOnPanic(self);
        let mut resolved = 0;
        loop {
            let (writes, target, switch) = {
                let mut pending = self.lock_pending();
                while pending.written == resolved && !pending.closing && pending.switch.is_none() {
                    pending.sync_idle = true;
                    pending = self
                        .wake
                        .wait(pending)
                        .unwrap_or_else(PoisonError::into_inner);
                    pending.sync_idle = false;
                }
                let switch = pending.switch.take();
                if pending.written == resolved && switch.is_none() {
                    return; // closing, nothing left to sync
                }
                (std::mem::take(&mut pending.writes), pending.written, switch)
            };
            if let Some(Switch {
                db,
                mut syncer,
                counting,
                answer,
            }) = switch
            {
                // Before any write of this round: the journal's rounds came first.
                let moved = match &sink {
                    Sink::Journal(writer) => {
                        let dir = journal::dir(self.space.dir.as_path());
                        let counting = journal::Counting {
                            own: Some(writer.number()),
                            ..counting
                        };
                        let _quiet = self.quiet.lock().unwrap_or_else(PoisonError::into_inner);
                        journal::move_all(&db, &mut syncer, &dir, counting)
                    }
                    Sink::Sled(..) => Ok(journal::Moved::default()),
                };
                let failed = moved.as_ref().err().map(ToString::to_string);
                let _ = answer.send(moved);
                if let Some(e) = failed {
                    tracing::error!(error = %e, "spool: moving the intake journal into sled failed; refusing further writes");
                    self.fail(e);
                    return;
                }
                sink = Sink::Sled(db, syncer);
            }
            // Refused writes never reach sled; each writer is told before
            // `resolved` says its round is over.
            let ops = self.admit_round(writes);
            if ops.is_empty() {
                self.applied.store(target, Ordering::Release);
                resolved = target;
                self.progress.send_modify(|p| p.resolved = target);
                continue;
            }
            let started = Instant::now();
            let since_epoch = started.duration_since(self.epoch).as_nanos() as u64;
            self.round_started.store(since_epoch + 1, Ordering::Release);
            let result = match &mut sink {
                Sink::Sled(db, syncer) => {
                    let _quiet = self.quiet.lock().unwrap_or_else(PoisonError::into_inner);
                    apply(db, ops).and_then(|()| {
                        self.applied.store(target, Ordering::Release);
                        syncer.sync(db)
                    })
                }
                // Only commits (fresh keys) are queued before sled is open.
                Sink::Journal(writer) => writer.append(&ops),
            };
            let took = started.elapsed();
            self.round_started.store(0, Ordering::Release);
            if let Err(e) = result {
                tracing::error!(error = %e, "spool sync failed; refusing further writes");
                self.fail(e.to_string());
                return;
            }
            self.last_batch.store(target - resolved, Ordering::Relaxed);
            if let Some(observe) = self.observer.get() {
                observe(Round {
                    writes: target - resolved,
                    took,
                });
            }
            resolved = target;
            self.progress.send_modify(|p| {
                p.resolved = target;
                p.rounds += 1;
            });
        }
    }
}

impl GroupCommit {
    /// The shared state, before the sync thread starts.
    fn new(space: Space, (messages, bytes): (u64, u64)) -> GroupCommit {
        let tally = Tally::default();
        tally.add(Delta {
            messages: i64::try_from(messages).unwrap_or(i64::MAX),
            bytes: i64::try_from(bytes).unwrap_or(i64::MAX),
        });
        GroupCommit {
            pending: Mutex::new(Pending::default()),
            wake: Condvar::new(),
            progress: watch::Sender::new(Progress::default()),
            last_batch: AtomicU64::new(0),
            applied: AtomicU64::new(0),
            epoch: Instant::now(),
            round_started: AtomicU64::new(0),
            observer: OnceLock::new(),
            space,
            tally,
            quiet: Mutex::new(()),
        }
    }

    /// The operations of the writes that may be applied: all of them if the
    /// file system has room for the round, minus those computed from a write
    /// that was refused; none otherwise. Refused writes are told why and their
    /// counter changes undone.
    fn admit_round(&self, writes: Vec<Queued>) -> Vec<Op> {
        let bytes: u64 = writes
            .iter()
            .flat_map(|w| &w.ops)
            .map(|(k, v)| (k.len() + v.as_ref().map_or(0, |v| v.len())) as u64)
            .sum();
        let refuse = |write: &Queued, why: Arc<str>| {
            let _ = write.refused.set(why);
            self.tally.undo(write.delta);
        };
        if let Err(why) = self.space.round_fits(bytes) {
            tracing::warn!(reason = %why, writes = writes.len(), "spool full: writes refused");
            let why: Arc<str> = why.into();
            for write in &writes {
                refuse(write, why.clone());
            }
            return Vec::new();
        }
        let mut ops = Vec::with_capacity(writes.iter().map(|w| w.ops.len()).sum());
        for write in writes {
            // In queue order, so a chain of dependent writes is refused whole.
            match write.after.iter().find_map(|a| a.get()) {
                Some(why) => refuse(&write, why.clone()),
                None => ops.extend(write.ops),
            }
        }
        ops
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

    fn write(ops: usize, delta: Delta, after: Option<&Refusal>) -> (Queued, Refusal) {
        let refused = Refusal::default();
        let op: Op = (
            sled::IVec::from(&b"k"[..]),
            Some(sled::IVec::from(&b"v"[..])),
        );
        let queued = Queued {
            ops: vec![op; ops],
            refused: refused.clone(),
            delta,
            after: after.into_iter().cloned().collect(),
        };
        (queued, refused)
    }

    #[test]
    fn a_round_without_room_is_refused_whole_and_its_counts_undone() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupCommit::new(Space::new(dir.path(), u64::MAX / 4), (5, 500));
        let commit = Delta {
            messages: 1,
            bytes: 100,
        };
        group.tally.add(commit);
        let (a, a_refused) = write(3, commit, None);
        let (b, b_refused) = write(1, Delta::default(), None);
        assert!(group.admit_round(vec![a, b]).is_empty(), "nothing applied");
        let why = a_refused.get().expect("told");
        assert!(why.contains("MiB free in"), "{why}");
        assert!(b_refused.get().is_some());
        assert_eq!(group.tally(), (5, 500), "the queued commit is uncounted");

        group.space.set_min_free(0);
        let (c, c_refused) = write(2, Delta::default(), None);
        assert_eq!(group.admit_round(vec![c]).len(), 2);
        assert!(c_refused.get().is_none());
    }

    #[test]
    fn writes_computed_from_a_refused_write_are_refused_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let group = GroupCommit::new(Space::new(dir.path(), 0), (0, 0));
        // An update refused in an earlier round, and a chain queued after it.
        let earlier = Refusal::default();
        earlier.set("no room".into()).unwrap();
        let remove = Delta {
            messages: -1,
            bytes: -70,
        };
        group.tally.add(remove);
        let (second, second_refused) = write(2, remove, Some(&earlier));
        let (third, third_refused) = write(1, Delta::default(), Some(&second_refused));
        let (other, other_refused) = write(4, Delta::default(), None);
        let ops = group.admit_round(vec![second, third, other]);
        assert_eq!(ops.len(), 4, "only the independent write goes ahead");
        assert_eq!(second_refused.get().map(|r| &**r), Some("no room"));
        assert_eq!(third_refused.get().map(|r| &**r), Some("no room"));
        assert!(other_refused.get().is_none());
        assert_eq!(group.tally(), (0, 0), "the refused remove is counted back");
    }

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
