//! tern-queue: tern's durable spool, and the only code in tern that touches
//! sled.
//!
//! Modules:
//! - `id`: `MessageId`, time-ordered unique ids, and their generator;
//! - `record`: `Envelope` and friends, stored as forward-compatible JSON;
//! - `spool`: `Spool`, the store (bodies, envelopes, due-time index, the
//!   suppression list, inbound bounce mail, event outboxes, and a
//!   small generic key-value "meta" keyspace: `put_meta`, `get_meta`,
//!   `remove_meta`, `scan_meta`) and its crash recovery;
//! - `group_commit`: the sync thread that makes writes durable with real
//!   fsyncs, sharing each round among all concurrent writers;
//! - `journal`: the intake journal, where commits are made durable while
//!   sled is still opening (`SpoolOptions::defer_open`), moved into sled
//!   once it is;
//! - `error`: `SpoolError`.
//!
//! Invariants the rest of tern relies on:
//! - a body is written once, at commit, and never rewritten; parts of one
//!   message may share it, and it is deleted with the last of them;
//! - an envelope and its due-index key change together in one atomic batch;
//! - nothing is returned from `commit`, `update` or `remove` before the
//!   change has been fsynced (sled's data file and any blob files); after a
//!   failed fsync every later write fails instead of pretending; the same
//!   holds for `put_meta` and `remove_meta`, which share the group commit,
//!   and for commits made while sled is still opening (fsynced in the intake
//!   journal, moved into sled before any other write reaches it);
//! - the spool's file system never runs full under it: a write that would
//!   leave less than `SpoolOptions::min_free_space` (half of it for writes
//!   other than commits) is refused with `SpoolError::Full` before anything
//!   of it is written, and writes succeed again once space is back.

mod error;
mod group_commit;
mod id;
mod journal;
mod record;
mod spool;

pub use error::SpoolError;
pub use group_commit::{CommitStats, Round};
pub use id::{IdGenerator, MessageId, ParseMessageIdError};
pub use record::{BodyType, CampaignTag, Envelope, Notify, Recipient, RecipientState, Ret, Source};
pub use spool::{
    restore, Body, Copied, InboundBatch, OrphanSweep, RecoveryStatus, Shared, Spool, SpoolOptions,
    SpoolStats,
};
