//! `Spool`: the durable message store, on one sled tree.
//!
//! Key layout (all ids big-endian, so key order is time order):
//! - `B` + id            -> body bytes; written once at commit, never rewritten.
//!   Parts of one message committed together share one body, stored under the
//!   first part's id (`Envelope::body_id` names it in every sharing envelope)
//! - `R` + id            -> u64 BE: how many envelopes share the body `B` + id;
//!   present only for shared bodies
//! - `E` + id            -> envelope JSON (`record::Envelope`)
//! - `D` + due_ms + id   -> empty; the due-time index
//! - `M` + name (UTF-8)  -> value bytes; the meta keyspace: small durable
//!   records that are not messages (destination suspensions now, traffic
//!   shaping's warm-up counters later). Owners namespace their names with a
//!   prefix (`suspend/...`); the spool never interprets them, and recovery and
//!   the orphan sweep never look at them
//! - `S`, `I`, `V`: the suppression list, inbound bounce mail and event
//!   outboxes (see `keyspaces`)
//! - `C` -> the clean-close record, present only while the spool is closed
//!   (see `clean_close`)
//!
//! Invariants:
//! - a shared body lives exactly as long as an envelope that names it: its
//!   `R` count is the number of such envelopes, written with them at commit;
//!   each remove counts it down in the same batch that deletes the envelope,
//!   and the one that takes it to zero deletes the body and the count. Removes
//!   of envelopes sharing a body are ordered like updates (`Inflight::refs`);
//! - every change is applied within one sled `apply_batch` (`group_commit`
//!   merges concurrent writes into one batch per round), so an envelope and
//!   its due key (and, at commit, its body) appear, move and disappear
//!   together;
//! - the `D` key of an envelope is always `D + next_due_ms + id` of the stored
//!   envelope. Update and remove derive the old key from the stored envelope,
//!   or from `Inflight` when a write to the same message is queued but not yet
//!   applied; both are read and the new write queued under one lock, so
//!   concurrent updates cannot orphan a due key;
//! - commit, update and remove return only after a group-commit round applied
//!   the change and made it durable; reads see applied changes only, so a
//!   message whose commit has not returned is not found yet;
//! - memory does not grow with the spool: only counters and the writes of
//!   the current rounds are held;
//! - `stats()` counts exactly the envelopes present and the sum of their
//!   `size`, which the spool itself sets from the body (a shared body counts
//!   once per envelope: `bytes` is what delivery will send, not disk use);
//! - the spool never lets its file system run full: a commit is refused
//!   (`SpoolError::Full`, nothing written) when less than
//!   `SpoolOptions::min_free_space` would be left, every other write when
//!   less than half of it would be (see `group_commit`); writes succeed again
//!   by themselves once space is freed.
//!
//! Opening after a clean close (the last handle dropped with every write
//! durable) takes the counters from the record that close left and skips
//! both the scan and sled's log replay (`clean_close`): about a second for a
//! million messages. After a crash, opening runs recovery (`recovery`): a
//! scan that counts the messages and bytes present, and deletes due keys that
//! do not match their envelope and re-creates missing ones (a message without
//! one would never be attempted). The id generator is seeded from the last
//! body and envelope keys (two seeks). With
//! `SpoolOptions::recover_in_background` (the daemon) open returns at once and
//! the scan runs beside live writes, counting exactly (see `recovery`); until
//! it ends `stats()` is an estimate and `recovery()` says `Running`.
//! Otherwise open waits for it. It reads the envelopes and the due index,
//! never the bodies: per million messages 6-9 s on 2 cores, plus sled's
//! replay of its log (measured, benches/spool_scale.sh). Bodies without an
//! envelope cannot arise from normal operation (a message's keys are written
//! and removed in one batch); `sweep_orphans` finds and deletes them, meant to
//! run in the background after open (and after recovery) since it reads every
//! body.
//!
//! With `SpoolOptions::defer_open` (the daemon) open does not even wait for
//! sled: it returns a handle whose commits are made durable in the intake
//! journal until a background thread has opened sled and the sync thread has
//! moved the journal into it (see `journal`). Until then reads block (off the
//! tokio worker: `block_in_place`), the suppression lookup answers
//! `SpoolError::Opening`, and every other write waits (`Spool::ready`);
//! `recovery()` says `Running`. Every open, deferred or not, first moves the
//! journals a crashed run left.
//!
//! Memory: sled's page cache (`SpoolOptions::cache_size`), plus sled's page
//! table, about 110 MB per million messages; recovery holds nothing per
//! message (16 bytes per old message removed while it runs).

use std::collections::HashMap;
use std::fmt::{self, Write as _};
use std::fs;
use std::ops::Deref;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use serde::Deserialize;

use crate::error::SpoolError;
use crate::group_commit::{
    sync_dir, CommitStats, Delta, GroupCommit, Op, Refusal, Round, Sink, Space, Syncer,
};
use crate::id::{IdGenerator, MessageId};
use crate::journal;
use crate::record::Envelope;
use clean_close::Checkpoint;
pub use recovery::RecoveryStatus;
use recovery::{Recovered, Recovery, Suspect};

const BODY: u8 = b'B';
const ENVELOPE: u8 = b'E';
const DUE: u8 = b'D';
const META: u8 = b'M';
const REFS: u8 = b'R';
/// A mark per message the intake journal's move put into sled, written in the move's own
/// batch and removed once its owner checked it ([`Spool::intake_checked`]); see
/// [`Spool::earlier_intake`].
pub(crate) const UNCHECKED: u8 = b'U';

/// The key of `id`'s [`UNCHECKED`] mark.
pub(crate) fn unchecked_key(id: MessageId) -> [u8; 9] {
    key(UNCHECKED, id)
}

/// Bodies per chunk of `sweep_orphans` (about 5 MB of 5 KB bodies).
const SWEEP_CHUNK: usize = 1024;

/// How often, and how long apart, opening retries while the lock is held
/// (about half a second in all).
const OPEN_RETRIES: u32 = 25;
const OPEN_RETRY_PAUSE: std::time::Duration = std::time::Duration::from_millis(20);

/// How a spool is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolOptions {
    /// Bytes of pages sled keeps in memory (its `cache_capacity`; sled's own
    /// default is 1 GiB). Default 128 MiB.
    ///
    /// sled's memory is this, plus its page table (about 110 MB per million
    /// messages), plus pages it has read but not yet counted (it counts
    /// accesses in batches; see `recovery::touch`). Measured with a million
    /// deferred 5 KB messages: 370 MB resident after open with 128 MiB, at
    /// most 540 MB while `sweep_orphans` reads every body; with 256 MiB, 510
    /// and 720 MB.
    pub cache_size: u64,
    /// Free bytes the spool's file system must keep: a commit that would
    /// leave less (twice its size counted) is refused with
    /// `SpoolError::Full`; other writes may use half of it. Default 256 MiB.
    pub min_free_space: u64,
    /// After a crash, return from open at once and run recovery's scan on
    /// background threads (the daemon: it takes mail while recovering; see
    /// `Spool::recovery`). Default false: open waits for the scan and fails
    /// if an envelope is unreadable (the CLI, tests).
    pub recover_in_background: bool,
    /// Return from open before sled is open, and open it on a background
    /// thread (the daemon: sled's own open takes seconds on a spool of
    /// millions of messages). Until it is open, commits are made durable in
    /// the intake journal (`<spool>/intake/`; see `journal`) and moved into
    /// sled once it is; reads block and other writes wait until then
    /// (`Spool::ready`). Default false.
    pub defer_open: bool,
    /// Tests only: sleep this long before opening sled, to hold a spool in
    /// its intake phase. Never set in the product.
    #[doc(hidden)]
    pub open_delay_for_tests: Option<std::time::Duration>,
}

impl Default for SpoolOptions {
    fn default() -> Self {
        SpoolOptions {
            cache_size: 128 << 20,
            min_free_space: 256 << 20,
            recover_in_background: false,
            defer_open: false,
            open_delay_for_tests: None,
        }
    }
}

/// What `Spool::sweep_orphans` found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OrphanSweep {
    /// Bodies looked at.
    pub bodies: u64,
    /// Bodies without an envelope, deleted.
    pub removed: u64,
    /// Envelopes without a body, left in place (and logged as errors):
    /// delivery finds no body and handles it; deleting the envelope would
    /// lose the record that the message existed.
    pub missing_bodies: u64,
}

/// Envelopes committed with one body they share (see `Spool::commit_shared`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shared {
    pub envelopes: Vec<Envelope>,
    pub body: Vec<u8>,
}

/// Message count and body bytes currently spooled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolStats {
    pub messages: u64,
    pub bytes: u64,
}

/// A message body as stored; derefs to the bytes without copying them.
#[derive(Clone, PartialEq, Eq)]
pub struct Body(sled::IVec);

impl Deref for Body {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Body({} bytes)", self.0.len())
    }
}

/// Handle on an open spool; clones share it. When the last clone is dropped
/// the sync thread runs a final round, stops, and sled releases its lock.
///
/// With `SpoolOptions::defer_open` the handle exists before sled is open:
/// commits go to the intake journal (see `journal`), reads block until sled
/// is open, other writes wait for it (`Spool::ready`).
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

struct Inner {
    ids: Arc<IdGenerator>,
    group: Arc<GroupCommit>,
    flusher: Option<JoinHandle<()>>,
    /// The thread opening sled (deferred open only).
    opener: Option<JoinHandle<()>>,
    opening: Arc<Opening>,
    /// Last, so that it drops after the `sled::Db` in `opening`.
    checkpoint: Checkpoint,
}

/// sled's side of the spool, once open (and the intake journal moved).
struct Opened {
    db: sled::Db,
    inflight: Arc<Mutex<Inflight>>,
    after_clean_close: bool,
    recovery: Arc<Recovery>,
    /// The background recovery scan, if one was started.
    recovering: Mutex<Option<JoinHandle<()>>>,
    /// Damaged intake journals the open renamed aside, with the offset of
    /// the bad frame.
    set_aside: Vec<(std::path::PathBuf, u64)>,
    /// Messages moved from intake journals and not checked since, but this run's own (see
    /// [`Spool::earlier_intake`]).
    earlier_intake: Vec<MessageId>,
}

/// Set once, by whoever opens sled: sled's side, or why it could not open.
struct Opening {
    state: OnceLock<Result<Opened, String>>,
    /// `true` once `state` is set, for async waiters.
    ready: tokio::sync::watch::Sender<bool>,
}

impl Opening {
    fn set(&self, state: Result<Opened, String>) {
        let _ = self.state.set(state);
        self.ready.send_replace(true);
    }
}

/// What a stored envelope implies for its due key, the byte count and its
/// body's key.
#[derive(Clone, Copy)]
struct Entry {
    next_due_ms: u64,
    size: u64,
    body_id: Option<MessageId>,
}

/// The fields of a stored envelope that update and remove need; decoding
/// only these skips building the rest.
#[derive(Deserialize)]
struct StoredEntry {
    next_due_ms: u64,
    size: u64,
    #[serde(default)]
    body_id: Option<MessageId>,
}

/// Updates and removes queued but perhaps not yet applied to sled: message
/// id -> (sequence number of its latest such write, entry after it or `None`
/// if removed, and what says whether that write was refused). Entries whose
/// write has been applied (or refused) are pruned, since sled then answers
/// the same.
///
/// `refs` does the same for the reference counts of shared bodies: body id ->
/// (sequence number of the latest queued write of its count, the count after
/// it, its refusal).
#[derive(Default)]
struct Inflight {
    latest: HashMap<MessageId, (u64, Option<Entry>, Refusal)>,
    refs: HashMap<MessageId, (u64, u64, Refusal)>,
    pruned_at: u64,
}

impl Inflight {
    /// Forgets writes that sled has applied (or refused), all those numbered
    /// up to `applied`: sled answers the same for them now.
    fn prune(&mut self, applied: u64) {
        if applied > self.pruned_at {
            self.latest.retain(|_, (seq, _, _)| *seq > applied);
            self.refs.retain(|_, (seq, _, _)| *seq > applied);
            self.pruned_at = applied;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // An open still running finishes first (with the journal's move), so that every
        // acknowledged commit is in sled before the clean close.
        if let Some(handle) = self.opener.take() {
            if handle.join().is_err() {
                tracing::error!("spool open thread panicked");
            }
        }
        let opened = self.opening.state.get().and_then(|o| o.as_ref().ok());
        if let Some(opened) = opened {
            // The scan may still queue repairs: stop it before the sync thread.
            opened.recovery.request_stop();
            let recovering = opened
                .recovering
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(handle) = recovering {
                if handle.join().is_err() {
                    tracing::error!("spool recovery thread panicked");
                }
            }
        }
        self.group.close();
        if let Some(handle) = self.flusher.take() {
            if handle.join().is_err() {
                tracing::error!("spool sync thread panicked");
            }
        }
        // Every write is durable now, unless a round failed: only then may
        // the next open trust the counters instead of scanning. Never before
        // sled was open (the journal then holds the commits; the next open
        // moves them).
        let Some(opened) = opened else {
            return;
        };
        if self.group.check().is_err() {
            return;
        }
        // Nor while recovery had not finished counting.
        if !matches!(opened.recovery.status(), RecoveryStatus::Done { .. }) {
            return;
        }
        let (messages, bytes) = self.group.tally();
        let state = Recovered {
            messages,
            bytes,
            max_id: self.ids.last(),
        };
        match clean_close::write(&opened.db, self.checkpoint.dir(), &state) {
            Ok(()) => self.checkpoint.arm(),
            Err(e) => {
                tracing::warn!(error = %e, "spool: could not record the clean close; the next open scans")
            }
        }
    }
}

/// Opens sled on `dir`. After a `Spool` in this process is dropped, sled's IO
/// threads can hold its file lock for a moment longer; an open right then
/// would see "in use". Another process that really holds the spool still
/// gets `InUse`, after this short wait.
fn open_sled(dir: &Path, cache_size: u64) -> Result<sled::Db, SpoolError> {
    let config = sled::Config::new()
        .path(dir)
        .cache_capacity(cache_size)
        // Our sync thread flushes whenever a writer waits; sled's own
        // periodic flusher would only add redundant fsyncs.
        .flush_every_ms(None);
    let mut attempts = 0;
    loop {
        match config.open().map_err(|e| open_error(e, dir)) {
            Err(SpoolError::InUse { .. }) if attempts < OPEN_RETRIES => {
                attempts += 1;
                std::thread::sleep(OPEN_RETRY_PAUSE);
            }
            other => return other,
        }
    }
}

/// Runs `wait` (a wait for sled's open) so that, on a worker of a
/// multi-threaded tokio runtime, the worker's other tasks move to another
/// thread meanwhile instead of stalling behind it.
fn wait_off_runtime<T>(wait: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(wait)
        }
        _ => wait(),
    }
}

/// Everything opening sled needs; `run` on the opening thread (or inline).
struct OpenSled {
    dir: std::path::PathBuf,
    options: SpoolOptions,
    fresh: bool,
    created_dir: bool,
    group: Arc<GroupCommit>,
    ids: Arc<IdGenerator>,
    started: Instant,
}

impl OpenSled {
    /// Opens sled, takes the clean-close record or prepares recovery, hands
    /// sled to the sync thread (which moves the intake journals into it),
    /// and starts (or, without `recover_in_background`, runs) the scan.
    fn run(self) -> Result<Opened, SpoolError> {
        let OpenSled {
            dir,
            options,
            fresh,
            created_dir,
            group,
            ids,
            started,
        } = self;
        let dir = dir.as_path();
        if let Some(delay) = options.open_delay_for_tests {
            std::thread::sleep(delay);
        }
        let db = open_sled(dir, options.cache_size)?;
        let sled_ms = started.elapsed().as_millis() as u64;
        let mut syncer = Syncer::open(dir)?;
        let (recovered, recovery, after_clean_close) = match clean_close::take(&db)? {
            Some(mut recovered) => {
                // Ids written without the generator (none in normal
                // operation) must not be handed out again either.
                recovered.max_id = recovered.max_id.max(recovery::last_key_id(&db)?);
                (recovered, Recovery::finished(), true)
            }
            // A crash (or a new spool): the counters come from the scan below.
            None => {
                let recovery = Recovery::prepare(&db)?;
                let recovered = Recovered {
                    messages: 0,
                    bytes: 0,
                    max_id: recovery.boundary(),
                };
                (recovered, recovery, false)
            }
        };
        // Makes the clean-close record's removal durable before any write, or
        // recovery's repairs, and any blobs a crashed previous run had not
        // synced yet.
        syncer.sync(&db)?;
        if fresh {
            sync_new_spool(dir, created_dir)?;
        }
        ids.raise(recovered.max_id);
        // The journals (this run's commits so far, and any an earlier run
        // left) go into sled before anything else touches it.
        let moved = group.switch_to_sled(
            db.clone(),
            syncer,
            journal::Counting {
                own: None,
                clean: after_clean_close,
                boundary: recovery.boundary(),
            },
        )?;
        // A journal of an earlier run may hold ids above everything else.
        ids.raise(recovery::last_key_id(&db)?);
        // What earlier runs took while their spool opened and never checked: the marks their
        // moves wrote (a run that crashed after its move, before its check, left its journal
        // deleted but its marks), and the frames moved now or by a move a crash cut short
        // (journals of a version before the marks have none). This run's own are its
        // owner's to check.
        let mut earlier: std::collections::BTreeSet<MessageId> =
            moved.earlier.iter().copied().collect();
        for item in db.scan_prefix([UNCHECKED]) {
            let (k, _) = item?;
            let id = parse_id_key(&k)?;
            if !moved.own.contains(&id) {
                earlier.insert(id);
            }
        }
        group.add_recovered(recovered.messages, recovered.bytes);
        group.add_moved(moved.uncounted);
        if moved.files > 0 {
            tracing::info!(
                files = moved.files,
                frames = moved.frames,
                skipped = moved.skipped,
                torn = moved.torn,
                set_aside = moved.set_aside.len(),
                "spool: intake journal moved into sled"
            );
        }
        let recovery = Arc::new(recovery);
        let inflight = Arc::new(Mutex::new(Inflight::default()));
        let mut recovering = None;
        if !recovery.is_over() {
            let scan = RecoveryScan {
                db: db.clone(),
                group: Arc::clone(&group),
                inflight: Arc::clone(&inflight),
                recovery: Arc::clone(&recovery),
            };
            if options.recover_in_background {
                recovering = Some(
                    std::thread::Builder::new()
                        .name("tern-spool-recovery".into())
                        .spawn(move || {
                            // Errors are logged and kept in the status.
                            let _ = scan.run(false, started);
                        })
                        .map_err(|e| SpoolError::io("starting the spool recovery thread", e))?,
                );
            } else {
                scan.run(true, started)?;
            }
        }
        tracing::info!(
            path = %dir.display(),
            messages = recovered.messages,
            bytes = recovered.bytes,
            after_clean_close,
            recovering = recovering.is_some(),
            sled_ms,
            total_ms = started.elapsed().as_millis() as u64,
            "spool opened"
        );
        Ok(Opened {
            db,
            inflight,
            after_clean_close,
            recovery,
            recovering: Mutex::new(recovering),
            set_aside: moved.set_aside,
            earlier_intake: earlier.into_iter().collect(),
        })
    }
}

impl fmt::Debug for Spool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Spool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl Spool {
    /// Opens (creating if needed) the spool in `dir` with default options and
    /// runs recovery; see `open_with`.
    pub fn open(dir: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(dir, &SpoolOptions::default())
    }

    /// Opens (creating if needed) the spool in `dir` and runs recovery.
    ///
    /// Blocking: sled replays its log, recovery scans the envelopes and the
    /// due index (not the bodies: see `sweep_orphans`), and it fsyncs. It
    /// starts a dedicated std thread for group commit, so no tokio runtime is
    /// needed (the CLI can call it), though it may be called from inside one.
    ///
    /// With `SpoolOptions::defer_open` it returns at once instead and opens
    /// sled on a background thread; commits go to the intake journal until
    /// then (see `Spool::ready`). Every open first moves the journals an
    /// earlier run left into sled.
    pub fn open_with(dir: &Path, options: &SpoolOptions) -> Result<Spool, SpoolError> {
        let created_dir = !dir.exists();
        let fresh = !dir.join("db").exists();
        fs::create_dir_all(dir).map_err(|e| {
            SpoolError::io(format!("creating spool directory {}", dir.display()), e)
        })?;
        let started = Instant::now();
        let writer = journal::Writer::new(&journal::dir(dir))?;
        let (group, flusher) = GroupCommit::start(
            Sink::Journal(writer),
            Space::new(dir, options.min_free_space),
            (0, 0),
        )?;
        // Ids are clock-based until sled says what it holds; then raised above that.
        let ids = Arc::new(IdGenerator::new(None));
        let opening = Arc::new(Opening {
            state: OnceLock::new(),
            ready: tokio::sync::watch::Sender::new(false),
        });
        let open = OpenSled {
            dir: dir.to_path_buf(),
            options: options.clone(),
            fresh,
            created_dir,
            group: Arc::clone(&group),
            ids: Arc::clone(&ids),
            started,
        };
        let mut opener = None;
        if options.defer_open {
            let opening = Arc::clone(&opening);
            opener = Some(
                std::thread::Builder::new()
                    .name("tern-spool-open".into())
                    .spawn(move || {
                        let result = open.run().map_err(|e| {
                            tracing::error!(error = %e, "spool: sled did not open; commits stay in the intake journal, every other spool operation fails");
                            e.to_string()
                        });
                        opening.set(result);
                    })
                    .map_err(|e| SpoolError::io("starting the spool open thread", e))?,
            );
        } else {
            match open.run() {
                Ok(opened) => opening.set(Ok(opened)),
                Err(e) => {
                    // Release sled's lock before reporting: the sync thread holds a handle.
                    group.close();
                    if flusher.join().is_err() {
                        tracing::error!("spool sync thread panicked");
                    }
                    return Err(e);
                }
            }
        }
        Ok(Spool {
            inner: Arc::new(Inner {
                ids,
                group,
                flusher: Some(flusher),
                opener,
                opening,
                checkpoint: Checkpoint::new(dir, options.cache_size),
            }),
        })
    }

    /// sled's side, waiting (blocking the thread) until it is open; the
    /// error if it could not open.
    fn opened(&self) -> Result<&Opened, SpoolError> {
        let state = match self.inner.opening.state.get() {
            Some(state) => state,
            None => wait_off_runtime(|| self.inner.opening.state.wait()),
        };
        match state {
            Ok(opened) => Ok(opened),
            Err(e) => Err(SpoolError::Sled(format!("the spool did not open: {e}"))),
        }
    }

    /// sled's side if it is open now.
    fn opened_now(&self) -> Option<&Opened> {
        self.inner.opening.state.get().and_then(|o| o.as_ref().ok())
    }

    /// Returns once sled is open and the intake journal moved into it (at
    /// once unless the spool was opened with `SpoolOptions::defer_open`), or
    /// the error that kept it from opening. Every operation but `commit`
    /// waits for this; async writers wait here rather than block a thread.
    pub async fn ready(&self) -> Result<(), SpoolError> {
        let mut ready = self.inner.opening.ready.subscribe();
        // The sender lives in `self`.
        let _ = ready.wait_for(|r| *r).await;
        self.opened().map(|_| ())
    }

    async fn opened_async(&self) -> Result<&Opened, SpoolError> {
        // The steady state: one load, no channel.
        if let Some(opened) = self.opened_now() {
            return Ok(opened);
        }
        self.ready().await?;
        self.opened()
    }

    /// Whether sled is open (the intake journal moved); false while a
    /// deferred open runs, and if it failed.
    pub fn is_open(&self) -> bool {
        self.opened_now().is_some()
    }

    /// Damaged intake journals this open found and renamed aside
    /// (`<n>.journal.damaged`, kept for the operator), each with the offset
    /// of its first bad frame; the frames before it were moved. Empty while
    /// sled is opening.
    pub fn journal_set_aside(&self) -> Vec<(std::path::PathBuf, u64)> {
        self.opened_now()
            .map(|o| o.set_aside.clone())
            .unwrap_or_default()
    }

    /// The messages earlier runs took into their intake journal and never reported checked
    /// ([`Spool::intake_checked`]): each was acknowledged before that run's spool was open,
    /// so whatever its owner checks only once the spool is open (the daemon: the
    /// suppression list) it may never have checked. That run crashed while its spool was
    /// opening, during the move, or after the move and before its check: the move writes a
    /// mark per message in the same batch as the message, so no crash point loses it. Empty
    /// while sled is opening, and never names this run's own intake (its owner knows its
    /// own mail, and reports it checked too).
    pub fn earlier_intake(&self) -> Vec<MessageId> {
        self.opened_now()
            .map(|o| o.earlier_intake.clone())
            .unwrap_or_default()
    }

    /// Removes the marks of intake mail its owner has now checked ([`Spool::earlier_intake`]
    /// and this run's own); ids without one are fine. Durable like any write: a crash before
    /// it only means the next start checks the same mail again.
    pub async fn intake_checked(&self, ids: &[MessageId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let ops = ids.iter().map(|id| remove(&unchecked_key(*id))).collect();
        self.write(ops).await
    }

    /// Where crash recovery stands: `Done` after a clean close or once the
    /// scan finished (the counters are exact), `Running` while a background
    /// scan runs or sled is still opening (`stats()` is an estimate that
    /// grows to the truth), `Failed` also when sled could not open.
    pub fn recovery(&self) -> RecoveryStatus {
        match self.inner.opening.state.get() {
            Some(Ok(opened)) => opened.recovery.status(),
            Some(Err(e)) => RecoveryStatus::Failed(e.clone()),
            None => RecoveryStatus::Running { scanned: 0 },
        }
    }

    /// Returns once crash recovery's scan is over (at once if none runs);
    /// also if sled could not open.
    pub async fn recovered(&self) {
        if let Ok(opened) = self.opened_async().await {
            opened.recovery.wait().await
        }
    }

    /// Whether the last process to use this spool closed it cleanly, so open
    /// took the counters from its record instead of scanning (see
    /// `clean_close`); false after a crash, for a new spool and while sled
    /// is still opening.
    pub fn opened_after_clean_close(&self) -> bool {
        self.opened_now().is_some_and(|o| o.after_clean_close)
    }

    /// A fresh id, greater than every id issued before by this spool.
    pub fn next_id(&self) -> MessageId {
        self.inner.ids.next()
    }

    /// Stores the parts of one accepted message (one envelope per
    /// destination, each with its body) in one atomic batch; returns once
    /// durable. Ids must come from `next_id`. Each envelope's `size` is set to
    /// its body's length. `SpoolError::Full` when the file system lacks the
    /// room (nothing is written then). The write is queued on the first poll: dropping the
    /// future after that does not cancel it, it only stops waiting for it
    /// (the same holds for `update` and `remove`).
    pub async fn commit(&self, parts: Vec<(Envelope, Vec<u8>)>) -> Result<(), SpoolError> {
        let shared = parts
            .into_iter()
            .map(|(envelope, body)| Shared {
                envelopes: vec![envelope],
                body,
            })
            .collect();
        self.commit_inner(shared, Vec::new()).await
    }

    /// Like `commit`, for parts that share bodies: each `Shared` stores its
    /// body once, under its first envelope's id, however many envelopes it
    /// has (one message to a thousand domains holds one copy of its body, on
    /// disk and in the batch).
    pub async fn commit_shared(&self, parts: Vec<Shared>) -> Result<(), SpoolError> {
        self.commit_inner(parts, Vec::new()).await
    }

    async fn commit_inner(&self, parts: Vec<Shared>, mut ops: Vec<Op>) -> Result<(), SpoolError> {
        self.inner.group.check()?;
        let mut messages: u64 = 0;
        let mut bytes: u64 = 0;
        ops.reserve(parts.iter().map(|p| p.envelopes.len() * 2 + 2).sum());
        for Shared { envelopes, body } in parts {
            let Some(first) = envelopes.first().map(|e| e.id) else {
                continue;
            };
            let sharers = envelopes.len() as u64;
            let shared = sharers > 1;
            for mut env in envelopes {
                env.size = body.len() as u64;
                env.body_id = shared.then_some(first);
                messages += 1;
                bytes += env.size;
                ops.push(insert(&due_key(env.next_due_ms, env.id), Vec::new()));
                ops.push(insert(&key(ENVELOPE, env.id), encode(&env)?));
            }
            if shared {
                ops.push(insert(&key(REFS, first), sharers.to_be_bytes().to_vec()));
            }
            ops.push(insert(&key(BODY, first), body));
        }
        let size: u64 = ops
            .iter()
            .map(|(k, v)| (k.len() + v.as_ref().map_or(0, |v| v.len())) as u64)
            .sum();
        self.inner.group.space().admit(size)?;
        // Until this is applied, update and remove answer NotFound for these
        // ids, so `Inflight` need not know them.
        let ticket = self.inner.group.enqueue(
            ops,
            Delta {
                messages: messages as i64,
                bytes: bytes as i64,
            },
            None,
        );
        self.inner.group.wait_for(ticket).await
    }

    /// The stored envelope, if any.
    pub fn envelope(&self, id: MessageId) -> Result<Option<Envelope>, SpoolError> {
        let key = key(ENVELOPE, id);
        match self.opened()?.db.get(key)? {
            Some(value) => decode(&key, &value).map(Some),
            None => Ok(None),
        }
    }

    /// The body of message `id`, if any, wherever it is stored (its own or
    /// a shared one). Read from sled on each call (not cached here).
    pub fn body(&self, id: MessageId) -> Result<Option<Body>, SpoolError> {
        if let Some(body) = self.opened()?.db.get(key(BODY, id))? {
            return Ok(Some(Body(body)));
        }
        match self.envelope(id)? {
            Some(env) if env.body_id.is_some_and(|b| b != id) => self.body_of(&env),
            _ => Ok(None),
        }
    }

    /// The body of `env` (one read, for a caller that holds the envelope).
    pub fn body_of(&self, env: &Envelope) -> Result<Option<Body>, SpoolError> {
        Ok(self
            .opened()?
            .db
            .get(key(BODY, env.body_key_id()))?
            .map(Body))
    }

    /// Rewrites the envelope `env.id` and moves its due key to
    /// `env.next_due_ms`, atomically; returns once durable. `size` keeps the
    /// stored value (the body never changes).
    pub async fn update(&self, env: &Envelope) -> Result<(), SpoolError> {
        self.opened_async().await?;
        self.inner.group.check()?;
        let id = env.id;
        let ticket = {
            let mut inflight = self.inflight()?;
            let (old, after) = self.current(&mut inflight, id)?;
            let old = old.ok_or(SpoolError::NotFound(id))?;
            let json = encode(&Envelope {
                size: old.size,
                body_id: old.body_id,
                ..env.clone()
            })?;
            let mut ops = Vec::with_capacity(3);
            if old.next_due_ms != env.next_due_ms {
                ops.push(remove(&due_key(old.next_due_ms, id)));
                ops.push(insert(&due_key(env.next_due_ms, id), Vec::new()));
            }
            ops.push(insert(&key(ENVELOPE, id), json));
            let ticket = self.inner.group.enqueue(ops, Delta::default(), after);
            let new = Entry {
                next_due_ms: env.next_due_ms,
                size: old.size,
                body_id: old.body_id,
            };
            inflight
                .latest
                .insert(id, (ticket.seq(), Some(new), ticket.refusal()));
            ticket
        };
        self.inner.group.wait_for(ticket).await
    }

    /// Deletes envelope, due key and body atomically (a shared body only
    /// with the last envelope that names it); returns once durable.
    pub async fn remove(&self, id: MessageId) -> Result<(), SpoolError> {
        self.opened_async().await?;
        self.inner.group.check()?;
        let ticket = {
            let mut inflight = self.inflight()?;
            let (old, after) = self.current(&mut inflight, id)?;
            let old = old.ok_or(SpoolError::NotFound(id))?;
            self.opened()?.recovery.note_remove(id, old.size);
            let mut ops = vec![
                remove(&key(ENVELOPE, id)),
                remove(&due_key(old.next_due_ms, id)),
            ];
            let mut depends = Vec::from_iter(after);
            let mut refs = None;
            match old.body_id {
                None => ops.push(remove(&key(BODY, id))),
                Some(body) => {
                    let (count, after) = self.references(&mut inflight, body)?;
                    depends.extend(after);
                    let left = count.saturating_sub(1);
                    if left == 0 {
                        ops.push(remove(&key(BODY, body)));
                        ops.push(remove(&key(REFS, body)));
                    } else {
                        ops.push(insert(&key(REFS, body), left.to_be_bytes().to_vec()));
                    }
                    refs = Some((body, left));
                }
            }
            let ticket = self.inner.group.enqueue(
                ops,
                Delta {
                    messages: -1,
                    bytes: -(old.size as i64),
                },
                depends,
            );
            inflight
                .latest
                .insert(id, (ticket.seq(), None, ticket.refusal()));
            if let Some((body, left)) = refs {
                inflight
                    .refs
                    .insert(body, (ticket.seq(), left, ticket.refusal()));
            }
            ticket
        };
        self.inner.group.wait_for(ticket).await
    }

    /// How many envelopes share the body `body` as far as writes go (the
    /// newest queued count if not yet applied, else sled's), with that
    /// queued write's refusal cell. A missing count (a damaged spool) counts
    /// as one, so the body goes with the envelope being removed.
    fn references(
        &self,
        inflight: &mut Inflight,
        body: MessageId,
    ) -> Result<(u64, Option<Refusal>), SpoolError> {
        self.prune(inflight);
        match inflight.refs.get(&body) {
            Some((_, count, refused)) if refused.get().is_none() => {
                return Ok((*count, Some(refused.clone())));
            }
            Some(_) => {
                inflight.refs.remove(&body);
            }
            None => {}
        }
        let key = key(REFS, body);
        Ok(match self.opened()?.db.get(key)? {
            Some(value) => match <[u8; 8]>::try_from(&value[..]) {
                Ok(bytes) => (u64::from_be_bytes(bytes), None),
                Err(_) => return Err(corrupt(&key, "reference count is not 8 bytes".into())),
            },
            None => (1, None),
        })
    }

    /// Forgets inflight writes that sled has applied (or refused): sled
    /// answers the same for them now.
    fn prune(&self, inflight: &mut Inflight) {
        inflight.prune(self.inner.group.applied());
    }

    /// The latest state of `id` as far as writes go: the newest queued update
    /// or remove if one is not yet applied (and not refused), else what sled
    /// holds; with that queued write's refusal cell, which a write computed
    /// from it must depend on. Every write numbered up to `applied()` is in
    /// sled or was refused, so after pruning, an id missing from `inflight`
    /// has no unapplied write (the caller holds the lock that adding one
    /// requires).
    fn current(
        &self,
        inflight: &mut Inflight,
        id: MessageId,
    ) -> Result<(Option<Entry>, Option<Refusal>), SpoolError> {
        self.prune(inflight);
        match inflight.latest.get(&id) {
            Some((_, entry, refused)) if refused.get().is_none() => {
                return Ok((*entry, Some(refused.clone())));
            }
            // Refused: sled has the truth.
            Some(_) => {
                inflight.latest.remove(&id);
            }
            None => {}
        }
        let key = key(ENVELOPE, id);
        let Some(value) = self.opened()?.db.get(key)? else {
            return Ok((None, None));
        };
        let stored: StoredEntry = serde_json::from_slice(&value)
            .map_err(|e| corrupt(&key, format!("bad envelope JSON: {e}")))?;
        Ok((
            Some(Entry {
                next_due_ms: stored.next_due_ms,
                size: stored.size,
                body_id: stored.body_id,
            }),
            None,
        ))
    }

    /// Stores `value` under the meta name `name`, replacing any previous
    /// value; returns once durable (it goes through group commit like every
    /// other write).
    pub async fn put_meta(&self, name: &str, value: Vec<u8>) -> Result<(), SpoolError> {
        self.opened_async().await?;
        self.inner.group.check()?;
        let ticket =
            self.inner
                .group
                .enqueue([insert(&meta_key(name), value)], Delta::default(), None);
        self.inner.group.wait_for(ticket).await
    }

    /// The value stored under the meta name `name`, if any.
    pub fn get_meta(&self, name: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self.opened()?.db.get(meta_key(name))?.map(|v| v.to_vec()))
    }

    /// Deletes the meta name `name` (absent is fine); returns once durable.
    pub async fn remove_meta(&self, name: &str) -> Result<(), SpoolError> {
        self.opened_async().await?;
        self.inner.group.check()?;
        let ticket = self
            .inner
            .group
            .enqueue([remove(&meta_key(name))], Delta::default(), None);
        self.inner.group.wait_for(ticket).await
    }

    /// Every meta record whose name starts with `prefix`, in name order.
    pub fn scan_meta(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, SpoolError> {
        self.opened()?
            .db
            .scan_prefix(meta_key(prefix))
            .map(|item| {
                let (key, value) = item?;
                let name = std::str::from_utf8(&key[1..])
                    .map_err(|_| corrupt(&key, "meta name is not UTF-8".into()))?;
                Ok((name.to_string(), value.to_vec()))
            })
            .collect()
    }

    /// Up to `limit` `(due_ms, id)` with `due_ms <= t_ms`, earliest first
    /// (ties in id order).
    pub fn due_before(&self, t_ms: u64, limit: usize) -> Result<Vec<(u64, MessageId)>, SpoolError> {
        let lo = due_key(0, MessageId::from_be_bytes([0; 8])).to_vec();
        let hi = match t_ms.checked_add(1) {
            Some(end) => due_key(end, MessageId::from_be_bytes([0; 8])).to_vec(),
            None => vec![DUE + 1], // every due key sorts below this
        };
        self.opened()?
            .db
            .range(lo..hi)
            .take(limit)
            .map(|item| parse_due_key(&item?.0))
            .collect()
    }

    /// Every envelope, in id (= creation) order. Loads them all; meant for the
    /// CLI and tests, not for the delivery path (use `due_before`).
    pub fn list(&self) -> Result<Vec<Envelope>, SpoolError> {
        self.opened()?
            .db
            .scan_prefix([ENVELOPE])
            .map(|item| {
                let (key, value) = item?;
                decode(&key, &value)
            })
            .collect()
    }

    /// Envelopes in id order, starting after `after` (from the first if `None`). Reads
    /// lazily: a caller that stops early (a page of a listing) reads no further. Not a
    /// snapshot: writes made meanwhile may or may not show.
    pub fn envelopes_after(
        &self,
        after: Option<MessageId>,
    ) -> impl Iterator<Item = Result<Envelope, SpoolError>> + '_ {
        use std::ops::Bound;
        let from = match after {
            Some(id) => Bound::Excluded(key(ENVELOPE, id).to_vec()),
            None => Bound::Included(vec![ENVELOPE]),
        };
        let (failed, range) = match self.opened() {
            Ok(opened) => (
                None,
                Some(
                    opened
                        .db
                        .range::<Vec<u8>, _>((from, Bound::Excluded(vec![ENVELOPE + 1]))),
                ),
            ),
            Err(e) => (Some(Err(e)), None),
        };
        failed
            .into_iter()
            .chain(range.into_iter().flatten().map(|item| {
                let (key, value) = item?;
                decode(&key, &value)
            }))
    }

    /// Deletes every body that has no envelope, and logs (and counts) every
    /// envelope that has no body; returns once the deletions are durable.
    ///
    /// Neither can arise from normal operation, since a message's keys are
    /// written and removed in one batch, but a damaged spool may hold them.
    /// This reads every body once (sled has no key-only scan), so it is not
    /// part of `open`: run it in the background after open. It works in
    /// chunks on tokio's blocking threads, concurrently with commits, updates
    /// and removes, and never deletes a body whose message exists or is being
    /// committed: a candidate is only deleted if it still has no envelope once
    /// every write queued when it was found has been applied (the ids of new
    /// commits are all greater than any body present at open).
    pub async fn sweep_orphans(&self) -> Result<OrphanSweep, SpoolError> {
        // Not beside recovery's scan: both read the whole spool, one at a
        // time is faster and lighter.
        self.recovered().await;
        self.sweep_orphans_in_chunks(SWEEP_CHUNK, || true).await
    }

    /// `sweep_orphans` that asks `go_on` before each chunk and ends early when
    /// it says no (a daemon stopping: the next start sweeps again). Unlike
    /// dropping the future, this returns only once no chunk is running, so
    /// no blocking thread still holds sled (the clean close after it needs
    /// sled's lock). Does not wait for recovery: the caller does.
    pub async fn sweep_orphans_while(
        &self,
        go_on: impl Fn() -> bool,
    ) -> Result<OrphanSweep, SpoolError> {
        self.sweep_orphans_in_chunks(SWEEP_CHUNK, go_on).await
    }

    async fn sweep_orphans_in_chunks(
        &self,
        chunk_len: usize,
        go_on: impl Fn() -> bool,
    ) -> Result<OrphanSweep, SpoolError> {
        let started = Instant::now();
        let mut report = OrphanSweep::default();
        let mut after = None;
        loop {
            if !go_on() {
                tracing::info!(bodies = report.bodies, "spool orphan sweep stopped");
                return Ok(report);
            }
            let db = self.opened()?.db.clone();
            let chunk =
                tokio::task::spawn_blocking(move || recovery::sweep_chunk(&db, after, chunk_len))
                    .await
                    .map_err(|e| match e.try_into_panic() {
                        Ok(panic) => std::panic::resume_unwind(panic),
                        Err(e) => SpoolError::Sled(format!("orphan sweep interrupted: {e}")),
                    })??;
            report.bodies += chunk.bodies;
            if !chunk.body_only.is_empty() || !chunk.envelope_only.is_empty() {
                self.settle_sweep_candidates(&chunk, &mut report).await?;
            }
            match chunk.last {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        tracing::info!(
            bodies = report.bodies,
            removed = report.removed,
            missing_bodies = report.missing_bodies,
            ms = started.elapsed().as_millis() as u64,
            "spool orphan sweep done"
        );
        Ok(report)
    }

    /// Decides about what one sweep chunk found unpaired. The scan is not a
    /// snapshot: it may have seen a commit's body and not (yet) its envelope,
    /// or a remove half-way. Every write whose effect the scan can have seen
    /// was queued by now, so once all writes queued so far are applied a
    /// pairing that is still missing is real. After that no write can add the
    /// envelope of such a body (commits only use new ids, and update needs an
    /// existing envelope), so deleting it cannot race.
    async fn settle_sweep_candidates(
        &self,
        chunk: &recovery::SweepChunk,
        report: &mut OrphanSweep,
    ) -> Result<(), SpoolError> {
        let group = &self.inner.group;
        group.flush().await?;
        let db = &self.opened()?.db;
        let mut ops = Vec::new();
        for &id in &chunk.body_only {
            // A shared body outlives the envelope it was committed under
            // while its count says other envelopes name it.
            if !db.contains_key(key(ENVELOPE, id))?
                && !db.contains_key(key(REFS, id))?
                && db.contains_key(key(BODY, id))?
            {
                tracing::warn!(%id, "spool: removing body without envelope");
                ops.push(remove(&key(BODY, id)));
            }
        }
        for &id in &chunk.envelope_only {
            let body_id = match self.envelope(id)? {
                Some(env) => env.body_key_id(),
                None => continue,
            };
            if !db.contains_key(key(BODY, body_id))? {
                // Left in place: delivery will find no body and handle it.
                tracing::error!(%id, "spool: envelope has no body");
                report.missing_bodies += 1;
            }
        }
        if !ops.is_empty() {
            report.removed += ops.len() as u64;
            let ticket = group.enqueue(ops, Delta::default(), None);
            group.wait_for(ticket).await?;
        }
        Ok(())
    }

    /// Messages and body bytes spooled now, counting writes still waiting
    /// for their sync round (exact; kept in memory).
    ///
    /// While a background recovery runs (`recovery()` is `Running`), this is
    /// what the scan has counted so far plus everything written since open.
    pub fn stats(&self) -> SpoolStats {
        let recovery = self.opened_now().map(|o| &o.recovery);
        if recovery.is_some_and(|r| r.is_over()) {
            let (messages, bytes) = self.inner.group.tally();
            return SpoolStats { messages, bytes };
        }
        let (messages, bytes) = self.inner.group.tally_signed();
        // While sled opens: only what was committed since.
        let (scanned, scanned_bytes) = recovery.map_or((0, 0), |r| r.counted());
        let add = |a: i64, b: u64| u64::try_from(a.saturating_add(b as i64)).unwrap_or(0);
        SpoolStats {
            messages: add(messages, scanned),
            bytes: add(bytes, scanned_bytes),
        }
    }

    /// Free bytes on the spool's file system now; `None` if it cannot be
    /// read.
    pub fn free_space(&self) -> Option<u64> {
        self.inner.group.space().free().map(|(bytes, _)| bytes)
    }

    /// Replaces `SpoolOptions::min_free_space` (a config reload); writes from
    /// now on are measured against it.
    pub fn set_min_free_space(&self, bytes: u64) {
        self.inner.group.space().set_min_free(bytes);
    }

    /// `Err(SpoolError::Full)` if a message of `size` bytes would be refused
    /// for space now (an SMTP server asks at MAIL FROM).
    pub fn room_for(&self, size: u64) -> Result<(), SpoolError> {
        self.inner.group.check()?;
        self.inner.group.space().admit(size)
    }

    /// Completed sync rounds (flush + fsyncs) since open.
    pub fn durable_syncs(&self) -> u64 {
        self.inner.group.rounds()
    }

    /// Group-commit counters since open.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.group.stats()
    }

    /// Calls `observer` on the sync thread after every successful group-commit
    /// round (for metrics: batch size and duration). It must be cheap and never
    /// block. One observer per spool: returns false if one is already set.
    pub fn on_round(&self, observer: impl Fn(Round) + Send + Sync + 'static) -> bool {
        self.inner.group.observe(Box::new(observer))
    }

    /// `Err` with the reason if writes can no longer become durable: the spool
    /// is poisoned by a failed round, or a round has been running longer than
    /// `stall`. Cheap; meant for health checks such as the systemd watchdog.
    pub fn health(&self, stall: std::time::Duration) -> Result<(), String> {
        self.inner.group.health(stall)
    }

    /// Returns once everything written so far is durable.
    pub async fn flush(&self) -> Result<(), SpoolError> {
        self.inner.group.flush().await
    }

    // `Inflight` only changes by whole-entry inserts and `retain`, which
    // cannot leave it half-updated, so a poisoned lock is still usable.
    fn inflight(&self) -> Result<MutexGuard<'_, Inflight>, SpoolError> {
        Ok(lock_inflight(&self.opened()?.inflight))
    }
}

fn lock_inflight(inflight: &Mutex<Inflight>) -> MutexGuard<'_, Inflight> {
    inflight.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What the recovery scan needs of the spool: reads, and writes through the
/// group commit ordered by the inflight lock. Not a `Spool`: the spool's
/// drop waits for this thread.
struct RecoveryScan {
    db: sled::Db,
    group: Arc<GroupCommit>,
    inflight: Arc<Mutex<Inflight>>,
    recovery: Arc<Recovery>,
}

impl RecoveryScan {
    /// Scans, adds what it counted to the tally, and marks recovery over.
    /// `strict`: fail on an unreadable envelope (and wait until the repairs
    /// are applied, for an open that waits).
    fn run(self, strict: bool, opened: Instant) -> Result<(), SpoolError> {
        let started = Instant::now();
        let result = self
            .recovery
            .run(&self.db, strict, &|suspect| self.repair_due(suspect));
        match result {
            Ok((messages, bytes)) => {
                self.group.add_recovered(messages, bytes);
                self.recovery.finish(Ok(()));
                if strict {
                    self.group.wait_applied_blocking()?;
                }
                let status = self.recovery.status();
                tracing::info!(
                    messages,
                    bytes,
                    ?status,
                    scan_ms = started.elapsed().as_millis() as u64,
                    since_open_ms = opened.elapsed().as_millis() as u64,
                    "spool recovery done"
                );
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "spool recovery failed; counters are estimates until the next start");
                self.recovery.finish(Err(e.to_string()));
                Err(e)
            }
        }
    }

    /// Re-checks a due-index entry the scan found wrong, under the inflight
    /// lock, and queues the fix; whether it queued one. An id with a queued
    /// write is left alone: update and remove keep its keys consistent.
    fn repair_due(&self, suspect: Suspect) -> Result<bool, SpoolError> {
        let mut inflight = lock_inflight(&self.inflight);
        inflight.prune(self.group.applied());
        let id = match suspect {
            Suspect::MissingDue { id } | Suspect::StaleDue { id, .. } => id,
        };
        if inflight.latest.contains_key(&id) {
            return Ok(false);
        }
        let stored_due = match self.db.get(key(ENVELOPE, id))? {
            Some(value) => match serde_json::from_slice::<recovery::RecoveryEntry>(&value) {
                Ok(env) => Some(env.next_due_ms),
                // Unreadable (counted as corrupt): its keys stay as they are,
                // for delivery to find and report.
                Err(_) => return Ok(false),
            },
            None => None,
        };
        let op = match suspect {
            Suspect::MissingDue { id } => match stored_due {
                Some(due) if !self.db.contains_key(due_key(due, id))? => {
                    tracing::warn!(%id, due, "spool recovery: re-creating missing due-index entry");
                    insert(&due_key(due, id), Vec::new())
                }
                _ => return Ok(false),
            },
            Suspect::StaleDue { id, due } => match stored_due {
                Some(stored) if stored == due => return Ok(false),
                _ if !self.db.contains_key(due_key(due, id))? => return Ok(false),
                _ => {
                    tracing::warn!(%id, due, "spool recovery: removing stale due-index entry");
                    remove(&due_key(due, id))
                }
            },
        };
        // Not waited for: a repair lost in a crash is found again by the next
        // recovery.
        self.group.enqueue([op], Delta::default(), None);
        Ok(true)
    }
}

fn insert(key: &[u8], value: Vec<u8>) -> Op {
    (key.into(), Some(value.into()))
}

fn remove(key: &[u8]) -> Op {
    (key.into(), None)
}

/// Sled reports a held lock as an `Io` error with this text (sled 0.34,
/// `Config::try_lock`); there is no dedicated variant to match on.
fn open_error(e: sled::Error, dir: &Path) -> SpoolError {
    match e {
        sled::Error::Io(ref io) if io.to_string().contains("could not acquire lock") => {
            SpoolError::InUse {
                path: dir.to_path_buf(),
            }
        }
        other => SpoolError::Sled(format!("opening spool at {}: {other}", dir.display())),
    }
}

/// On first creation: sled's `conf` file is written without fsync, and the
/// names sled created (and the spool directory itself) are only durable once
/// their directories are synced.
fn sync_new_spool(dir: &Path, created_dir: bool) -> Result<(), SpoolError> {
    let conf = dir.join("conf");
    fs::File::open(&conf)
        .and_then(|f| f.sync_all())
        .map_err(|e| SpoolError::io(format!("fsync of {}", conf.display()), e))?;
    sync_dir(&dir.join("blobs"))?;
    sync_dir(dir)?;
    if created_dir {
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
    }
    Ok(())
}

fn key(prefix: u8, id: MessageId) -> [u8; 9] {
    let mut k = [0; 9];
    k[0] = prefix;
    k[1..].copy_from_slice(&id.to_be_bytes());
    k
}

fn meta_key(name: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + name.len());
    k.push(META);
    k.extend_from_slice(name.as_bytes());
    k
}

fn due_key(due_ms: u64, id: MessageId) -> [u8; 17] {
    let mut k = [0; 17];
    k[0] = DUE;
    k[1..9].copy_from_slice(&due_ms.to_be_bytes());
    k[9..].copy_from_slice(&id.to_be_bytes());
    k
}

fn parse_id_key(key: &[u8]) -> Result<MessageId, SpoolError> {
    key.get(1..)
        .and_then(|rest| <[u8; 8]>::try_from(rest).ok())
        .map(MessageId::from_be_bytes)
        .ok_or_else(|| corrupt(key, "key is not prefix + 8-byte id".into()))
}

fn parse_due_key(key: &[u8]) -> Result<(u64, MessageId), SpoolError> {
    match (key.get(1..9), key.get(9..)) {
        (Some(due), Some(id)) if id.len() == 8 => Ok((
            u64::from_be_bytes(due.try_into().expect("8 bytes")),
            MessageId::from_be_bytes(id.try_into().expect("8 bytes")),
        )),
        _ => Err(corrupt(
            key,
            "due key is not D + 8-byte time + 8-byte id".into(),
        )),
    }
}

fn encode(env: &Envelope) -> Result<Vec<u8>, SpoolError> {
    // Serialising these plain structs cannot fail; map it anyway rather than
    // panic in the commit path.
    serde_json::to_vec(env).map_err(|e| SpoolError::Corrupt {
        key: format!("E{}", env.id),
        reason: format!("cannot encode envelope: {e}"),
    })
}

fn decode(key: &[u8], value: &[u8]) -> Result<Envelope, SpoolError> {
    serde_json::from_slice(value).map_err(|e| corrupt(key, format!("bad envelope JSON: {e}")))
}

/// Names a key for operators: its prefix letter, then the rest in hex.
fn corrupt(key: &[u8], reason: String) -> SpoolError {
    let mut name = String::new();
    if let Some((&prefix, rest)) = key.split_first() {
        name.push(char::from(prefix));
        for b in rest {
            // writing to a String cannot fail
            let _ = write!(name, "{b:02X}");
        }
    }
    SpoolError::Corrupt { key: name, reason }
}

mod backup;
mod clean_close;
pub use backup::{restore, Copied};
mod keyspaces;
pub use keyspaces::InboundBatch;
mod recovery;
#[cfg(test)]
mod tests;
