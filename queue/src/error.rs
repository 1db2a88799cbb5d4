//! `SpoolError`: every way a spool operation can fail, worded for the
//! operator who reads it in a log line or on the CLI.
//!
//! Invariant: no sled type appears here; sled errors are flattened to text so
//! callers never depend on the storage engine.

use std::io;
use std::path::PathBuf;

use crate::id::MessageId;

/// Errors from the spool.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The storage engine (sled) reported an error.
    #[error("spool database error: {0}")]
    Sled(String),

    /// A file system operation failed; `what` says which one and on what path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    /// A stored record could not be decoded.
    #[error("corrupt spool record {key}: {reason}")]
    Corrupt { key: String, reason: String },

    /// Another process (or another `Spool` in this process) holds the lock.
    #[error("spool at {} is in use by another process (is tern running?)", path.display())]
    InUse { path: PathBuf },

    /// A read that does not wait found sled still opening (a spool opened
    /// with `SpoolOptions::defer_open`; see `Spool::ready`).
    #[error("the spool is still opening")]
    Opening,

    /// The message is not (or no longer) in the spool.
    #[error("message {0} is not in the spool")]
    NotFound(MessageId),

    /// The spool's file system has too little free space for this write
    /// (`SpoolOptions::min_free_space`); nothing of it was written. Not a
    /// failure of the spool: writes succeed again once space is freed.
    #[error("not enough free space for the spool ({0}); writes resume once space is freed")]
    Full(String),

    /// A flush or fsync failed. After that the kernel may have dropped dirty
    /// pages, so no later write can be called durable: the spool refuses
    /// further writes until the process restarts and recovers from disk.
    #[error(
        "spool writes could not be made durable ({0}); \
         no further writes are accepted until tern is restarted"
    )]
    NotDurable(String),
}

impl SpoolError {
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        SpoolError::Io {
            what: what.into(),
            source,
        }
    }
}

impl From<sled::Error> for SpoolError {
    fn from(e: sled::Error) -> Self {
        SpoolError::Sled(e.to_string())
    }
}
