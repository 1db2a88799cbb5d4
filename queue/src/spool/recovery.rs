//! Recovery after a crash, and the chunked scan behind `Spool::sweep_orphans`.
//!
//! After a crash the spool opens at once and takes new mail while this scan
//! runs on its own threads (`Spool::open_with` with
//! `SpoolOptions::recover_in_background`; otherwise open waits for it). The
//! scan counts the messages and bytes present at open and checks the due
//! index; nothing else waits for it: the scheduler reads the due index
//! directly, and the index is consistent because every change was one atomic
//! batch (the check and its repairs are a defence against damage, not part
//! of normal operation).
//!
//! It reads the envelopes (`E`) and the due index (`D`), never the bodies:
//! the bodies are most of the spool's bytes (5 GB for a million 5 KB
//! messages) and only the orphan sweep needs to look at them. It decodes only
//! the fields it needs.
//!
//! Counting beside live writes: ids up to `boundary` (the largest key id at
//! open) belong to the scan, larger ones are new commits that the group
//! commit's tally counts as they come. A remove of an old message also moves
//! the tally (down), so the scan must count every old message present *at
//! open*, including those removed before it reached them. Each envelope range
//! has a cursor (the last id counted, advanced under `Recovery::state`'s lock);
//! a remove of an old id the scan has not passed yet is noted with its size
//! (`Recovery::note_remove`), and if the scan then never sees that id it is
//! added at the end. When the scan finishes, what it counted is added to the
//! tally and from then on the tally alone is exact.
//!
//! Repairs go through the group commit under the spool's inflight lock, and
//! only for ids without a queued write, so they cannot race an update or a
//! remove (`Spool::repair_due`).
//!
//! Cost: sled keeps each leaf as a base page plus delta fragments scattered
//! over its log, so a scan is mostly small random reads (cold: about 1.2
//! million reads per million messages). Both prefixes are therefore split
//! into key ranges that `RECOVERY_THREADS` threads scan concurrently, which
//! keeps several reads in flight on a cold cache and uses every core on a
//! warm one. Memory: nothing per message, except the old ids removed while
//! the scan runs (16 bytes each); and sled's pages, see `touch`.

use std::collections::HashMap;
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::Deserialize;

use super::{corrupt, due_key, parse_due_key, parse_id_key, BODY, DUE, ENVELOPE};
use crate::error::SpoolError;
use crate::id::MessageId;

/// Threads that scan during recovery. More than cores on purpose: on a cold
/// cache they mostly wait for the disk.
const RECOVERY_THREADS: usize = 8;
/// Threads of a background scan: fewer, since the disk and the cores are
/// shared with the mail taken meanwhile (the deadline I/O scheduler serves
/// reads before writes, so many scan reads in flight delay a commit's fsync).
const BACKGROUND_THREADS: usize = 4;
/// The nice value of background scan threads: live mail first.
const BACKGROUND_NICE: i32 = 10;
/// Key ranges per prefix; many more than threads, so that a range dense in
/// messages (ids and due times cluster) does not leave the others idle.
const RECOVERY_RANGES: u64 = 64;

/// Tests slow the envelope scan down by this much per key, so that live
/// writes interleave with it.
#[cfg(test)]
pub(super) static SCAN_PAUSE_US: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(0);
/// Tests read how many removes recovery had to add back (removed before the
/// scan reached them).
#[cfg(test)]
pub(super) static UNSEEN_REMOVES: AtomicUsize = AtomicUsize::new(0);

/// What an open knows, or recovery learned.
pub(super) struct Recovered {
    pub(super) messages: u64,
    pub(super) bytes: u64,
    /// The largest id of an envelope, a queue id or a body: the id generator
    /// starts above it, so no new message can take the id of a body present
    /// now, even one without an envelope.
    pub(super) max_id: Option<MessageId>,
}

/// The fields of a stored envelope recovery needs. Unknown fields are
/// skipped without being built, which makes this several times cheaper than
/// decoding a whole `Envelope`.
#[derive(Deserialize)]
pub(super) struct RecoveryEntry {
    id: MessageId,
    size: u64,
    pub(super) next_due_ms: u64,
}

type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// An index entry the scan found wrong; `Spool::repair_due` re-checks it
/// against the current state before changing anything.
#[derive(Debug, Clone, Copy)]
pub(super) enum Suspect {
    /// The envelope `id` (due at `due` when read) may lack its due key.
    MissingDue { id: MessageId },
    /// The due key `due` + `id` may not match the envelope `id`.
    StaleDue { id: MessageId, due: u64 },
}

/// Where recovery stands, for `Spool::recovery`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryStatus {
    /// Opened after a clean close, or recovery finished: the counters are exact.
    Done {
        /// Index entries recovery repaired (0 after a clean close).
        repairs: u64,
        /// Envelopes recovery could not read (logged with their keys); they
        /// are not counted.
        corrupt: u64,
    },
    /// The scan is running: `stats()` counts what it has seen so far plus
    /// everything written since open.
    Running {
        /// Messages present at open counted so far.
        scanned: u64,
    },
    /// The scan stopped on an error (logged); counters stay approximate until
    /// the next start.
    Failed(String),
}

/// The state shared between the spool's writers and the recovery scan.
pub(super) struct Recovery {
    /// Ids up to this may have been present at open; the scan counts only them.
    boundary: Option<MessageId>,
    /// The first id of each envelope range, ascending (`state.cursors` has one
    /// cursor per range).
    starts: Vec<u64>,
    ranges: Vec<(u8, KeyRange)>,
    state: Mutex<ScanState>,
    stop: AtomicBool,
    done: tokio::sync::watch::Sender<bool>,
}

struct ScanState {
    /// Per envelope range: the last id counted; `u64::MAX` once the range is
    /// done. `None`: not started.
    cursors: Vec<Option<u64>>,
    /// Old ids removed before the scan passed them: size, and whether the
    /// scan saw (and so counted) them anyway.
    removed: HashMap<MessageId, (u64, bool)>,
    messages: u64,
    bytes: u64,
    repairs: u64,
    corrupt: u64,
    finished: Option<Result<(), String>>,
}

impl Recovery {
    /// Prepares a scan of the spool as it is now: splits both keyspaces into
    /// ranges (a few seeks, no scan).
    pub(super) fn prepare(db: &sled::Db) -> Result<Recovery, SpoolError> {
        let boundary = last_key_id(db)?;
        let (envelope_ranges, starts) = split(db, ENVELOPE)?;
        let (due_ranges, _) = split(db, DUE)?;
        let cursors = vec![None; envelope_ranges.len()];
        let ranges = envelope_ranges
            .into_iter()
            .map(|r| (ENVELOPE, r))
            .chain(due_ranges.into_iter().map(|r| (DUE, r)))
            .collect();
        Ok(Recovery {
            boundary,
            starts,
            ranges,
            state: Mutex::new(ScanState {
                cursors,
                removed: HashMap::new(),
                messages: 0,
                bytes: 0,
                repairs: 0,
                corrupt: 0,
                finished: None,
            }),
            stop: AtomicBool::new(false),
            done: tokio::sync::watch::Sender::new(false),
        })
    }

    /// A recovery that has nothing to do (a clean close, a new spool).
    pub(super) fn finished() -> Recovery {
        Recovery {
            boundary: None,
            starts: Vec::new(),
            ranges: Vec::new(),
            state: Mutex::new(ScanState {
                cursors: Vec::new(),
                removed: HashMap::new(),
                messages: 0,
                bytes: 0,
                repairs: 0,
                corrupt: 0,
                finished: Some(Ok(())),
            }),
            stop: AtomicBool::new(false),
            done: tokio::sync::watch::Sender::new(true),
        }
    }

    pub(super) fn boundary(&self) -> Option<MessageId> {
        self.boundary
    }

    fn state(&self) -> MutexGuard<'_, ScanState> {
        // Whole-field updates only: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Called by `Spool::remove` (under its inflight lock) before it queues the
    /// remove of `id`, whose envelope holds `size` bytes.
    pub(super) fn note_remove(&self, id: MessageId, size: u64) {
        if self.boundary.is_none_or(|b| id > b) {
            return;
        }
        let mut state = self.state();
        if state.finished.is_some() {
            return;
        }
        let raw = u64::from_be_bytes(id.to_be_bytes());
        let range = self
            .starts
            .partition_point(|&start| start <= raw)
            .saturating_sub(1);
        let passed = state
            .cursors
            .get(range)
            .copied()
            .flatten()
            .is_some_and(|c| c >= raw);
        if !passed {
            state.removed.entry(id).or_insert((size, false));
        }
    }

    /// Whether the scan is over (successfully or not).
    pub(super) fn is_over(&self) -> bool {
        *self.done.borrow()
    }

    pub(super) fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Returns once the scan is over.
    pub(super) async fn wait(&self) {
        let mut done = self.done.subscribe();
        // Err only if the sender is gone, which it is not while `self` lives.
        let _ = done.wait_for(|d| *d).await;
    }

    /// Messages and bytes counted so far (for approximate stats while it runs).
    pub(super) fn counted(&self) -> (u64, u64) {
        let state = self.state();
        (state.messages, state.bytes)
    }

    pub(super) fn status(&self) -> RecoveryStatus {
        let state = self.state();
        match &state.finished {
            None => RecoveryStatus::Running {
                scanned: state.messages,
            },
            Some(Ok(())) => RecoveryStatus::Done {
                repairs: state.repairs,
                corrupt: state.corrupt,
            },
            Some(Err(e)) => RecoveryStatus::Failed(e.clone()),
        }
    }

    /// Runs the scan: `RECOVERY_THREADS` threads over every range. `repair`
    /// re-checks and fixes a suspect index entry, returning whether it changed
    /// anything. `strict`: stop at the first unreadable envelope and return its
    /// error (an open that waits for recovery fails with it); otherwise log it,
    /// count it and go on. On success returns the messages and bytes present
    /// at open; the caller adds them to the tally and then calls `finish`.
    pub(super) fn run(
        &self,
        db: &sled::Db,
        strict: bool,
        repair: &(dyn Fn(Suspect) -> Result<bool, SpoolError> + Sync),
    ) -> Result<(u64, u64), SpoolError> {
        let next = AtomicUsize::new(0);
        let first_error: Mutex<Option<(usize, SpoolError)>> = Mutex::new(None);
        let jobs = &self.ranges;
        let threads = if strict {
            RECOVERY_THREADS
        } else {
            BACKGROUND_THREADS
        };
        std::thread::scope(|scope| {
            let threads: Vec<_> = (0..threads.min(jobs.len()))
                .map(|_| {
                    scope.spawn(|| loop {
                        if !strict {
                            yield_to_live_work();
                        }
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some((prefix, range)) = jobs.get(i) else {
                            break;
                        };
                        let result = match *prefix {
                            ENVELOPE => self.scan_envelopes(db, i, range.clone(), strict, repair),
                            _ => self.scan_dues(db, range.clone(), repair),
                        };
                        if let Err(e) = result {
                            let mut first =
                                first_error.lock().unwrap_or_else(PoisonError::into_inner);
                            if first.as_ref().is_none_or(|(j, _)| i < *j) {
                                *first = Some((i, e));
                            }
                            // The caller reports the first error; no need to go on.
                            next.store(jobs.len(), Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            // Joined here rather than by the scope: that also waits for the
            // threads' thread-local destructors, and sled's epoch garbage they may
            // run can hold the last handle on its files (and so the lock that a
            // reopen needs).
            for thread in threads {
                if let Err(panic) = thread.join() {
                    std::panic::resume_unwind(panic);
                }
            }
        });
        if let Some((_, e)) = first_error
            .into_inner()
            .unwrap_or_else(PoisonError::into_inner)
        {
            return Err(e);
        }
        if self.stop.load(Ordering::Relaxed) {
            return Err(SpoolError::Sled(
                "recovery stopped: the spool is closing".into(),
            ));
        }
        let mut state = self.state();
        let (mut messages, mut bytes) = (state.messages, state.bytes);
        for &(size, seen) in state.removed.values() {
            if !seen {
                messages += 1;
                bytes += size;
            }
        }
        #[cfg(test)]
        UNSEEN_REMOVES.fetch_add(
            state.removed.values().filter(|(_, seen)| !seen).count(),
            Ordering::Relaxed,
        );
        state.removed = HashMap::new();
        Ok((messages, bytes))
    }

    /// Marks the scan over; from now on removes are not noted.
    pub(super) fn finish(&self, result: Result<(), String>) {
        self.state().finished = Some(result);
        self.done.send_replace(true);
    }

    fn scan_envelopes(
        &self,
        db: &sled::Db,
        range_index: usize,
        range: KeyRange,
        strict: bool,
        repair: &(dyn Fn(Suspect) -> Result<bool, SpoolError> + Sync),
    ) -> Result<(), SpoolError> {
        for item in db.range(range) {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (key, value) = item?;
            touch(db, &key)?;
            #[cfg(test)]
            std::thread::sleep(std::time::Duration::from_micros(
                SCAN_PAUSE_US.load(Ordering::Relaxed),
            ));
            let id = parse_id_key(&key)?;
            if self.boundary.is_none_or(|b| id > b) {
                // New mail, written consistently and counted by the tally; and
                // every later key in this range is newer still.
                break;
            }
            let entry = serde_json::from_slice::<RecoveryEntry>(&value)
                .map_err(|e| corrupt(&key, format!("bad envelope JSON: {e}")))
                .and_then(|env| match env.id == id {
                    true => Ok(env),
                    false => Err(corrupt(&key, format!("envelope carries id {}", env.id))),
                });
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) if strict => return Err(e),
                Err(e) => {
                    tracing::error!(error = %e, "spool recovery: unreadable envelope, not counted");
                    self.state().corrupt += 1;
                    continue;
                }
            };
            {
                let mut state = self.state();
                if let Some((_, seen)) = state.removed.get_mut(&id) {
                    *seen = true;
                }
                state.cursors[range_index] = Some(u64::from_be_bytes(id.to_be_bytes()));
                state.messages += 1;
                state.bytes += entry.size;
            }
            if !db.contains_key(due_key(entry.next_due_ms, id))?
                && repair(Suspect::MissingDue { id })?
            {
                self.state().repairs += 1;
            }
        }
        self.state().cursors[range_index] = Some(u64::MAX);
        Ok(())
    }

    fn scan_dues(
        &self,
        db: &sled::Db,
        range: KeyRange,
        repair: &(dyn Fn(Suspect) -> Result<bool, SpoolError> + Sync),
    ) -> Result<(), SpoolError> {
        for item in db.range(range) {
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let (key, _) = item?;
            let (due, id) = parse_due_key(&key)?;
            let matches = match db.get(super::key(ENVELOPE, id))? {
                Some(value) => serde_json::from_slice::<RecoveryEntry>(&value)
                    .is_ok_and(|env| env.next_due_ms == due),
                None => false,
            };
            if !matches && repair(Suspect::StaleDue { id, due })? {
                self.state().repairs += 1;
            }
        }
        Ok(())
    }
}

/// Lowers the calling thread's CPU and I/O priority (best effort, Linux): a
/// background scan must not slow the mail taken beside it. Called on every
/// job; cheap (two syscalls).
fn yield_to_live_work() {
    // SAFETY: plain syscalls on the calling thread's own id; failures are ignored.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, BACKGROUND_NICE);
        // ioprio_set(IOPRIO_WHO_PROCESS, tid, best-effort class 2, lowest level 7).
        libc::syscall(libc::SYS_ioprio_set, 1, tid, (2 << 13) | 7);
    }
}

/// The largest id among the bodies and envelopes present: one seek to the
/// last of each, instead of reading them all.
pub(super) fn last_key_id(db: &sled::Db) -> Result<Option<MessageId>, SpoolError> {
    Ok(last_id(db, BODY)?.max(last_id(db, ENVELOPE)?))
}

fn last_id(db: &sled::Db, prefix: u8) -> Result<Option<MessageId>, SpoolError> {
    match db.scan_prefix([prefix]).next_back() {
        Some(item) => Ok(Some(parse_id_key(&item?.0)?)),
        None => Ok(None),
    }
}

/// Splits the keys under `prefix` into up to `RECOVERY_RANGES` ranges of
/// equal width in the 8 bytes after the prefix (the id of `E`, the due time
/// of `D`), between the first and the last key present; with the first
/// 8-byte value of each range (0 for the first).
fn split(db: &sled::Db, prefix: u8) -> Result<(Vec<KeyRange>, Vec<u64>), SpoolError> {
    let word = |key: &[u8]| -> Result<u64, SpoolError> {
        key.get(1..9)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| corrupt(key, "key is shorter than prefix + 8 bytes".into()))
    };
    let (Some(first), Some(last)) = (
        db.scan_prefix([prefix]).next().transpose()?,
        db.scan_prefix([prefix]).next_back().transpose()?,
    ) else {
        return Ok((Vec::new(), Vec::new()));
    };
    let (lo, hi) = (word(&first.0)?, word(&last.0)?);
    let bound = |x: u64| {
        let mut key = vec![prefix];
        key.extend_from_slice(&x.to_be_bytes());
        key
    };
    let n = RECOVERY_RANGES.min((hi - lo).saturating_add(1));
    let cut = |i: u64| lo + ((u128::from(hi - lo) * u128::from(i)) / u128::from(n)) as u64;
    let ranges = (0..n)
        .map(|i| {
            let start = match i {
                0 => Bound::Included(vec![prefix]),
                _ => Bound::Included(bound(cut(i))),
            };
            let end = match i + 1 {
                end if end == n => Bound::Excluded(vec![prefix + 1]),
                end => Bound::Excluded(bound(cut(end))),
            };
            (start, end)
        })
        .collect();
    let starts = (0..n).map(|i| if i == 0 { 0 } else { cut(i) }).collect();
    Ok((ranges, starts))
}

/// Looks `key` up again right after a scan read it, to keep sled's memory
/// near its `cache_capacity`.
///
/// sled 0.34 queues page accesses in 256 shards and only counts them against
/// the capacity (evicting the least recently used pages) when a shard has
/// queued 64. A scan accesses each leaf once, however many keys it holds, so
/// up to 256 x 64 freshly read leaves stay in memory uncounted: about 700 MB
/// of body leaves (8 to 16 bodies of 5 KB each), 200 MB of envelope leaves.
/// A lookup per key accesses the leaf once per key: the queues fill with
/// repeats of the same few leaves and the uncounted ones stay few. Measured
/// on a million 5 KB messages with a 256 MiB cache: reading every body peaks
/// at 350 MB instead of 890 MB, every envelope at 350 MB instead of 430 MB,
/// for at most 10% more time (the leaf is in memory).
fn touch(db: &sled::Db, key: &[u8]) -> Result<(), SpoolError> {
    db.contains_key(key)?;
    Ok(())
}

/// One step of the orphan sweep: ids of bodies and envelopes that did not
/// pair up in a stretch of the id space. Both are only candidates: the scan
/// is not a snapshot (see `Spool::settle_sweep_candidates`).
pub(super) struct SweepChunk {
    /// Bodies read.
    pub(super) bodies: u64,
    /// Bodies whose envelope was not there.
    pub(super) body_only: Vec<MessageId>,
    /// Envelopes whose body was not there.
    pub(super) envelope_only: Vec<MessageId>,
    /// Where the next chunk starts (after this id); `None` at the end.
    pub(super) last: Option<MessageId>,
}

/// Reads up to `limit` bodies with ids after `after`, and the envelopes in the
/// same id range (to the end of the envelopes if the bodies ran out), and
/// merges the two sorted id lists.
pub(super) fn sweep_chunk(
    db: &sled::Db,
    after: Option<MessageId>,
    limit: usize,
) -> Result<SweepChunk, SpoolError> {
    let from = |prefix: u8| match after {
        Some(id) => Bound::Excluded(super::key(prefix, id).to_vec()),
        None => Bound::Included(vec![prefix]),
    };
    let mut bodies = Vec::with_capacity(limit);
    for item in db.range((from(BODY), Bound::Excluded(vec![BODY + 1]))) {
        // The value is read (sled has no key-only scan) and dropped at once.
        let (key, _) = item?;
        touch(db, &key)?;
        bodies.push(parse_id_key(&key)?);
        if bodies.len() == limit {
            break;
        }
    }
    let last = (bodies.len() == limit).then(|| bodies[limit - 1]);
    let to = match last {
        Some(id) => Bound::Included(super::key(ENVELOPE, id).to_vec()),
        None => Bound::Excluded(vec![ENVELOPE + 1]),
    };
    let mut envelopes = Vec::new();
    for item in db.range((from(ENVELOPE), to)) {
        let (key, _) = item?;
        touch(db, &key)?;
        envelopes.push(parse_id_key(&key)?);
    }

    let mut chunk = SweepChunk {
        bodies: bodies.len() as u64,
        body_only: Vec::new(),
        envelope_only: Vec::new(),
        last,
    };
    let (mut b, mut e) = (bodies.iter().peekable(), envelopes.iter().peekable());
    loop {
        match (b.peek(), e.peek()) {
            (Some(&&body), Some(&&env)) if body == env => {
                b.next();
                e.next();
            }
            (Some(&&body), Some(&&env)) if body < env => {
                chunk.body_only.push(body);
                b.next();
            }
            (Some(&&body), None) => {
                chunk.body_only.push(body);
                b.next();
            }
            (_, Some(&&env)) => {
                chunk.envelope_only.push(env);
                e.next();
            }
            (None, None) => break,
        }
    }
    Ok(chunk)
}
