//! Recovery at open, and the chunked scan behind `Spool::sweep_orphans`.
//!
//! Recovery reads the envelopes (`E`) and the due index (`D`), never the
//! bodies: the bodies are most of the spool's bytes (5 GB for a million 5 KB
//! messages) and only the orphan sweep needs to look at them. It decodes only
//! the four envelope fields it needs.
//!
//! Cost: sled keeps each leaf as a base page plus delta fragments scattered
//! over its log, so a scan is mostly small random reads (cold: about 1.2
//! million reads per million messages). Both prefixes are therefore split
//! into key ranges that `RECOVERY_THREADS` threads scan concurrently, which
//! keeps several reads in flight on a cold cache and uses every core on a
//! warm one. Memory: 16 bytes per envelope and per due key while it runs
//! (vectors sorted by id, merged at the end), all freed before `open`
//! returns; and sled's pages, see `touch`.

use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Deserialize;

use super::{corrupt, due_key, parse_due_key, parse_id_key, BODY, DUE, ENVELOPE};
use crate::error::SpoolError;
use crate::id::MessageId;

/// Threads that scan during recovery. More than cores on purpose: on a cold
/// cache they mostly wait for the disk.
const RECOVERY_THREADS: usize = 8;
/// Key ranges per prefix; many more than threads, so that a range dense in
/// messages (ids and due times cluster) does not leave the others idle.
const RECOVERY_RANGES: u64 = 64;

/// What recovery learned.
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
/// decoding a whole `Envelope`; a record that is not JSON, or lacks one of
/// these, still fails the open. Other damage shows when the envelope is read.
#[derive(Deserialize)]
struct RecoveryEntry {
    id: MessageId,
    queue_id: MessageId,
    size: u64,
    next_due_ms: u64,
}

type KeyRange = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// What one thread found in one key range.
enum Part {
    Envelopes {
        /// (id, next_due_ms), in id order.
        due_of: Vec<(MessageId, u64)>,
        messages: u64,
        bytes: u64,
        max_id: Option<MessageId>,
    },
    /// (id, due) of each due key.
    Dues(Vec<(MessageId, u64)>),
}

pub(super) fn recover(db: &sled::Db) -> Result<Recovered, SpoolError> {
    let jobs: Vec<(u8, KeyRange)> = split(db, ENVELOPE)?
        .into_iter()
        .map(|range| (ENVELOPE, range))
        .chain(split(db, DUE)?.into_iter().map(|range| (DUE, range)))
        .collect();
    let parts = scan_parallel(db, &jobs)?;

    let mut rec = Recovered {
        messages: 0,
        bytes: 0,
        max_id: None,
    };
    // Envelope parts come first and in key order, so this is in id order.
    let mut due_of: Vec<(MessageId, u64)> = Vec::new();
    let mut dues: Vec<(MessageId, u64)> = Vec::new();
    for part in parts {
        match part {
            Part::Envelopes {
                due_of: part,
                messages,
                bytes,
                max_id,
            } => {
                rec.messages += messages;
                rec.bytes += bytes;
                rec.max_id = rec.max_id.max(max_id);
                due_of.extend(part);
            }
            Part::Dues(part) => dues.extend(part),
        }
    }
    // One seek to the last body, instead of reading them all.
    rec.max_id = rec.max_id.max(last_id(db, BODY)?);

    // Merge the due keys, sorted by id, with the envelopes: each envelope
    // needs exactly the key `D + next_due_ms + id`.
    dues.sort_unstable();
    let mut repair = sled::Batch::default();
    let mut repairs = 0u64;
    let mut stale = |id: MessageId, due: u64, repair: &mut sled::Batch| {
        tracing::warn!(%id, due, "spool recovery: removing stale due-index entry");
        repair.remove(&due_key(due, id)[..]);
        repairs += 1;
    };
    let mut keys = dues.iter().copied().peekable();
    let mut missing = Vec::new();
    for &(id, due) in &due_of {
        let mut indexed = false;
        while let Some((key_id, key_due)) = keys.next_if(|&(key_id, _)| key_id <= id) {
            if key_id == id && key_due == due {
                indexed = true;
            } else {
                stale(key_id, key_due, &mut repair);
            }
        }
        if !indexed {
            missing.push((id, due));
        }
    }
    for (id, due) in keys {
        stale(id, due, &mut repair);
    }
    for (id, due) in missing {
        tracing::warn!(%id, due, "spool recovery: re-creating missing due-index entry");
        repair.insert(&due_key(due, id)[..], &[][..]);
        repairs += 1;
    }
    drop((due_of, dues));
    if repairs > 0 {
        db.apply_batch(repair)?;
        tracing::warn!(repairs, "spool recovery repaired the index");
    }
    Ok(rec)
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
/// of `D`), between the first and the last key present.
fn split(db: &sled::Db, prefix: u8) -> Result<Vec<KeyRange>, SpoolError> {
    let word = |key: &[u8]| -> Result<u64, SpoolError> {
        key.get(1..9)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| corrupt(key, "key is shorter than prefix + 8 bytes".into()))
    };
    let (Some(first), Some(last)) = (
        db.scan_prefix([prefix]).next().transpose()?,
        db.scan_prefix([prefix]).next_back().transpose()?,
    ) else {
        return Ok(Vec::new());
    };
    let (lo, hi) = (word(&first.0)?, word(&last.0)?);
    let bound = |x: u64| {
        let mut key = vec![prefix];
        key.extend_from_slice(&x.to_be_bytes());
        key
    };
    let n = RECOVERY_RANGES.min((hi - lo).saturating_add(1));
    let cut = |i: u64| lo + ((u128::from(hi - lo) * u128::from(i)) / u128::from(n)) as u64;
    Ok((0..n)
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
        .collect())
}

/// Scans every job's range on `RECOVERY_THREADS` threads; returns the parts
/// in job order, or the error of the first failing job in that order.
fn scan_parallel(db: &sled::Db, jobs: &[(u8, KeyRange)]) -> Result<Vec<Part>, SpoolError> {
    let next = AtomicUsize::new(0);
    let results: Vec<Mutex<Option<Result<Part, SpoolError>>>> =
        jobs.iter().map(|_| Mutex::new(None)).collect();
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..RECOVERY_THREADS.min(jobs.len()))
            .map(|_| {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((prefix, range)) = jobs.get(i) else {
                        break;
                    };
                    let part = match *prefix {
                        ENVELOPE => scan_envelopes(db, range.clone()),
                        _ => scan_dues(db, range.clone()),
                    };
                    let failed = part.is_err();
                    *results[i].lock().unwrap_or_else(|e| e.into_inner()) = Some(part);
                    if failed {
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
    let mut parts = Vec::with_capacity(jobs.len());
    for result in results {
        match result.into_inner().unwrap_or_else(|e| e.into_inner()) {
            Some(part) => parts.push(part?),
            // skipped after an earlier job failed; that error comes first
            None => continue,
        }
    }
    Ok(parts)
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

fn scan_envelopes(db: &sled::Db, range: KeyRange) -> Result<Part, SpoolError> {
    let (mut due_of, mut messages, mut bytes, mut max_id) = (Vec::new(), 0, 0, None);
    for item in db.range(range) {
        let (key, value) = item?;
        touch(db, &key)?;
        let id = parse_id_key(&key)?;
        let env: RecoveryEntry = serde_json::from_slice(&value)
            .map_err(|e| corrupt(&key, format!("bad envelope JSON: {e}")))?;
        if env.id != id {
            return Err(corrupt(&key, format!("envelope carries id {}", env.id)));
        }
        messages += 1;
        bytes += env.size;
        max_id = max_id.max(Some(id.max(env.queue_id)));
        due_of.push((id, env.next_due_ms));
    }
    Ok(Part::Envelopes {
        due_of,
        messages,
        bytes,
        max_id,
    })
}

fn scan_dues(db: &sled::Db, range: KeyRange) -> Result<Part, SpoolError> {
    let mut dues = Vec::new();
    for item in db.range(range) {
        let (key, _) = item?;
        let (due, id) = parse_due_key(&key)?;
        dues.push((id, due));
    }
    Ok(Part::Dues(dues))
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
