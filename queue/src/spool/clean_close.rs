//! The clean-close record and the checkpoint after a close: what lets a
//! spool that was closed cleanly open in about a second, however many
//! messages it holds.
//!
//! Two costs make a start slow with a million messages (measured,
//! benches/spool_scale.sh): sled 0.34 writes its page-table snapshot only
//! when it opens a database, so an open replays the whole log written since
//! the previous open (7 s warm, 13 s cold after a 1M fill); and recovery's
//! scan of every envelope and due key (6-9 s on 2 cores). After a clean
//! close neither is needed:
//! - on the last handle's drop, once the sync thread has made every write
//!   durable, the spool stores its counters and the largest id it handed out
//!   under the key `C` (outside every keyspace) and fsyncs. At open, a valid
//!   `C` replaces the scan: the index is consistent because every change was
//!   one atomic batch and the process stopped between batches;
//! - then, with sled closed, it opens and closes sled once more, which writes
//!   the snapshot, so the replay happens at shutdown (where the log is still
//!   in the page cache) instead of at the next start.
//!
//! Invariants:
//! - `C` exists only while no `Spool` has the directory open: open removes it
//!   and makes the removal durable before it returns (so before any write);
//!   a crash therefore always leads to the full scan of `recovery`;
//! - `C` is written only if every write was durable (the spool is not
//!   poisoned); anything unreadable in it means the full scan, never an error;
//! - the checkpoint is an optimisation only: if it cannot open sled (another
//!   handle still holds the lock) the next open just replays the log.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::recovery::Recovered;
use crate::error::SpoolError;
use crate::group_commit::Syncer;
use crate::id::MessageId;

/// The key of the record; no keyspace prefix starts with it.
pub(super) const KEY: &[u8] = b"C";

#[derive(Serialize, Deserialize)]
struct Record {
    messages: u64,
    bytes: u64,
    max_id: Option<MessageId>,
}

/// Removes the record, returning what it says if it is valid. The caller
/// must make the removal durable before anything else is written.
pub(super) fn take(db: &sled::Db) -> Result<Option<Recovered>, SpoolError> {
    let Some(value) = db.remove(KEY)? else {
        return Ok(None);
    };
    match serde_json::from_slice::<Record>(&value) {
        Ok(record) => Ok(Some(Recovered {
            messages: record.messages,
            bytes: record.bytes,
            max_id: record.max_id,
        })),
        Err(e) => {
            tracing::warn!(error = %e, "spool: unreadable clean-close record; scanning instead");
            Ok(None)
        }
    }
}

/// Stores the record and makes it durable. Call only after the last write
/// was made durable, with nothing else writing.
pub(super) fn write(db: &sled::Db, dir: &Path, state: &Recovered) -> Result<(), SpoolError> {
    let record = Record {
        messages: state.messages,
        bytes: state.bytes,
        max_id: state.max_id,
    };
    let value = serde_json::to_vec(&record).expect("the record serializes");
    db.insert(KEY, value)?;
    Syncer::open(dir)?.sync(db)
}

/// Drop guard that reopens sled once after the spool's own handle is gone,
/// so sled writes its snapshot; armed only after the record was written.
/// It must be the last field of the spool's state, so it drops after the
/// `sled::Db`.
pub(super) struct Checkpoint {
    dir: PathBuf,
    cache_size: u64,
    armed: bool,
}

impl Checkpoint {
    pub(super) fn new(dir: &Path, cache_size: u64) -> Checkpoint {
        Checkpoint {
            dir: dir.to_path_buf(),
            cache_size,
            armed: false,
        }
    }

    /// The spool's directory.
    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(super) fn arm(&mut self) {
        self.armed = true;
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (dir, started) = (&self.dir, Instant::now());
        match super::open_sled(dir, self.cache_size) {
            Ok(db) => {
                drop(db);
                tracing::info!(
                    path = %dir.display(),
                    ms = started.elapsed().as_millis() as u64,
                    "spool checkpointed: the next open skips sled's log replay"
                );
            }
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e,
                    "spool checkpoint skipped; the next open replays sled's log");
            }
        }
    }
}
