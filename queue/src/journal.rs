//! The intake journal: where commits go while sled is still opening.
//!
//! sled 0.34's `open` on a big spool takes seconds (5 million messages: 1.4-2.2 s loading its
//! page table and `SegmentAccountant::stabilize`), and nothing of it can be shortened from
//! outside. So a spool opened with `SpoolOptions::defer_open` starts its group commit at once
//! with this journal as the sink, and opens sled on a background thread. Each group-commit
//! round that happens before sled is open is appended to `<spool>/intake/<n>.journal` as one
//! frame, with one `write` and one `fdatasync` (invariant: no 250 before the message is
//! durable). Only commits reach the journal: they insert fresh keys only (new ids), which is
//! what makes a replay idempotent. Every other write waits for sled.
//!
//! Once sled is open, the sync thread itself moves every journal into sled before any other
//! write (`move_all`): frame by frame, each one `apply_batch`, then sled is made durable the
//! way a round is (`Syncer::sync`), then the files are deleted and the directory synced. Only
//! then is the spool "open" for everything else, so no delivery, update or remove of a moved
//! message can happen before its journal is gone.
//!
//! Frame: `len: u32 LE`, `crc: u32 LE` (CRC-32 of the four `len` bytes and the payload), the
//! payload: per operation `key_len: u32 LE`, key, `value_len: u32 LE`, value (inserts only).
//!
//! Invariants:
//! - a frame is one round, applied to sled as one batch: it is in sled whole or not at all, so
//!   "all its keys are present with its values" says it was moved, and a replay after a crash
//!   during the move skips it instead of writing it twice; "some present, or with other
//!   values" can only be ids reused by a clock stepped back past the spool's ids: the file is
//!   kept aside as damage and nothing is overwritten;
//! - a frame that is short, or fails its CRC and reaches the end of the file (or is followed
//!   by zeros only), is a round whose write never completed: never acknowledged, dropped and
//!   logged;
//! - any other unreadable frame is damage: the frames before it are moved, the file is renamed
//!   `<n>.journal.damaged` (kept for the operator, never deleted) and the error names the file
//!   and the frame's offset;
//! - every message a frame holds gets a mark (`U` + id) in the same batch as the frame (and
//!   a frame a cut-short move had written gets its marks when it is skipped): the mail was
//!   acknowledged before its owner could check it against what only the open spool holds,
//!   and the mark stays until the owner reports it checked (`Spool::intake_checked`), so a
//!   crash at any point, even after the journal is deleted, leaves the next open naming it
//!   (`Spool::earlier_intake`);
//! - memory during the move: one frame at a time.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::SpoolError;
use crate::group_commit::{sync_dir, Delta, Op, Syncer};
use crate::id::MessageId;

/// The journal directory inside a spool directory.
pub(crate) const DIR: &str = "intake";
const SUFFIX: &str = ".journal";
const HEADER: usize = 8;

/// The journal directory of the spool in `spool_dir`.
pub(crate) fn dir(spool_dir: &Path) -> PathBuf {
    spool_dir.join(DIR)
}

/// Appends rounds to one journal file; created on the first round.
#[derive(Debug)]
pub(crate) struct Writer {
    dir: PathBuf,
    /// This run's file number: above every file left by an earlier run.
    number: u64,
    file: Option<File>,
    /// Frames appended (for the log).
    pub(crate) frames: u64,
}

impl Writer {
    /// A writer for `dir`, numbering its file after every journal already there.
    pub(crate) fn new(dir: &Path) -> Result<Writer, SpoolError> {
        let number = list(dir)?.last().map_or(0, |(n, _)| n + 1);
        Ok(Writer {
            dir: dir.to_path_buf(),
            number,
            file: None,
            frames: 0,
        })
    }

    pub(crate) fn number(&self) -> u64 {
        self.number
    }

    /// Appends one round and makes it durable: one write, one fdatasync (plus, for the first
    /// round, the creation of the file and an fsync of the directory).
    pub(crate) fn append(&mut self, ops: &[Op]) -> Result<(), SpoolError> {
        let frame = encode_frame(ops)?;
        let path = path(&self.dir, self.number);
        if self.file.is_none() {
            fs::create_dir_all(&self.dir)
                .map_err(|e| SpoolError::io(format!("creating {}", self.dir.display()), e))?;
            let file = OpenOptions::new()
                .append(true)
                .create_new(true)
                .open(&path)
                .map_err(|e| SpoolError::io(format!("creating {}", path.display()), e))?;
            sync_dir(&self.dir)?;
            self.file = Some(file);
        }
        let file = self.file.as_mut().expect("created above");
        file.write_all(&frame)
            .and_then(|()| file.sync_data())
            .map_err(|e| SpoolError::io(format!("appending to {}", path.display()), e))?;
        self.frames += 1;
        Ok(())
    }
}

fn path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:08}{SUFFIX}"))
}

/// The journal files in `dir`, by number; none if the directory does not exist.
pub(crate) fn list(dir: &Path) -> Result<Vec<(u64, PathBuf)>, SpoolError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(SpoolError::io(format!("listing {}", dir.display()), e)),
    };
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| SpoolError::io(format!("listing {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(number) = name
            .to_str()
            .and_then(|n| n.strip_suffix(SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        else {
            continue; // set-aside files and anything else
        };
        files.push((number, entry.path()));
    }
    files.sort();
    Ok(files)
}

pub(crate) fn encode_frame(ops: &[Op]) -> Result<Vec<u8>, SpoolError> {
    let too_big = || SpoolError::Full("a journal frame is limited to 4 GiB".into());
    let size: usize = ops
        .iter()
        .map(|(k, v)| 8 + k.len() + v.as_ref().map_or(0, |v| v.len()))
        .sum();
    let len = u32::try_from(size).map_err(|_| too_big())?;
    let mut frame = Vec::with_capacity(HEADER + size);
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&[0; 4]);
    for (key, value) in ops {
        // Only commits reach the journal, and they only insert.
        let value = value.as_deref().unwrap_or_default();
        frame.extend_from_slice(&(key.len() as u32).to_le_bytes());
        frame.extend_from_slice(key);
        frame.extend_from_slice(&(value.len() as u32).to_le_bytes());
        frame.extend_from_slice(value);
    }
    let crc = checksum(&frame[..4], &frame[HEADER..]);
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
    Ok(frame)
}

fn checksum(len: &[u8], payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(len);
    hasher.update(payload);
    hasher.finalize()
}

fn decode_payload(payload: &[u8]) -> Option<Vec<Op>> {
    let mut ops = Vec::new();
    let mut rest = payload;
    let take = |rest: &mut &[u8]| -> Option<sled::IVec> {
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let bytes = rest.get(4..4 + len)?;
        let value = sled::IVec::from(bytes);
        *rest = &rest[4 + len..];
        Some(value)
    };
    while !rest.is_empty() {
        let key = take(&mut rest)?;
        let value = take(&mut rest)?;
        ops.push((key, Some(value)));
    }
    Some(ops)
}

/// How reading a journal file ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum End {
    /// Every byte was a good frame.
    Clean,
    /// The last frame, from `offset`, was never completed (dropped).
    TornTail { offset: u64 },
    /// An unreadable frame at `offset` with more data after it.
    Damaged { offset: u64, reason: String },
}

/// Calls `frame` with each good frame of the file at `path` (and its offset), one at a time,
/// and says how the file ended.
pub(crate) fn read(
    path: &Path,
    mut frame: impl FnMut(u64, Vec<Op>) -> Result<(), SpoolError>,
) -> Result<End, SpoolError> {
    let io_err = |e| SpoolError::io(format!("reading {}", path.display()), e);
    let file = File::open(path).map_err(io_err)?;
    let file_len = file.metadata().map_err(io_err)?.len();
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut offset = 0u64;
    loop {
        if offset == file_len {
            return Ok(End::Clean);
        }
        if file_len - offset < HEADER as u64 {
            return Ok(End::TornTail { offset });
        }
        let mut header = [0; HEADER];
        reader.read_exact(&mut header).map_err(io_err)?;
        let len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes"));
        let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
        let end = offset + HEADER as u64 + u64::from(len);
        if end > file_len {
            // Past the end: the round's write did not complete, or the length is damaged.
            // Either way nothing after it can be read; if only zeros follow, it was a round
            // whose data never reached the disk.
            return Ok(End::TornTail { offset });
        }
        let mut payload = vec![0; len as usize];
        reader.read_exact(&mut payload).map_err(io_err)?;
        let ops = if checksum(&header[..4], &payload) == crc {
            decode_payload(&payload)
        } else {
            None
        };
        let Some(ops) = ops else {
            if end == file_len || rest_is_zeros(&header, &payload, &mut reader).map_err(io_err)? {
                return Ok(End::TornTail { offset });
            }
            return Ok(End::Damaged {
                offset,
                reason: "frame fails its CRC-32".into(),
            });
        };
        frame(offset, ops)?;
        offset = end;
    }
}

/// Whether this frame and everything after it in the file are zeros (a file extended by a
/// write whose data never reached the disk).
fn rest_is_zeros(header: &[u8], payload: &[u8], reader: &mut impl Read) -> io::Result<bool> {
    if header.iter().chain(payload).any(|&b| b != 0) {
        return Ok(false);
    }
    let mut buf = [0; 64 * 1024];
    loop {
        match reader.read(&mut buf)? {
            0 => return Ok(true),
            n if buf[..n].iter().any(|&b| b != 0) => return Ok(false),
            _ => {}
        }
    }
}

/// What the spool knew at open, for counting what a move adds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Counting {
    /// The journal file of this run: its messages were counted when committed.
    pub(crate) own: Option<u64>,
    /// Opened after a clean close: nothing scans, so every moved message of an earlier run
    /// is counted here.
    pub(crate) clean: bool,
    /// After a crash, the recovery scan counts ids up to this (it starts after the move).
    pub(crate) boundary: Option<MessageId>,
}

/// What a move did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Moved {
    /// Journal files moved (or set aside).
    pub(crate) files: u64,
    /// Frames (group-commit rounds) written into sled.
    pub(crate) frames: u64,
    /// Frames already in sled (a crash during an earlier move), skipped.
    pub(crate) skipped: u64,
    /// Torn last frames dropped (rounds never acknowledged).
    pub(crate) torn: u64,
    /// Damaged files renamed aside: the new path and the offset of the bad frame.
    pub(crate) set_aside: Vec<(PathBuf, u64)>,
    /// Messages and bytes of earlier runs that nobody had counted.
    pub(crate) uncounted: Delta,
    /// The messages of earlier runs' journals (moved now or by a move a crash cut short):
    /// acknowledged while their run's spool was opening and maybe never checked against
    /// what only the open spool knows (the daemon's suppression list), since that run
    /// crashed before its check.
    pub(crate) earlier: Vec<MessageId>,
    /// The messages of this run's own journal.
    pub(crate) own: std::collections::HashSet<MessageId>,
}

/// The message an envelope key (`E` + 8-byte id) names; `None` for every other key.
fn envelope_id(key: &[u8]) -> Option<MessageId> {
    match key {
        [b'E', id @ ..] => Some(MessageId::from_be_bytes(id.try_into().ok()?)),
        _ => None,
    }
}

#[derive(Deserialize)]
struct Sized {
    size: u64,
}

/// Moves every journal in `dir` into sled, oldest first, and deletes the files; see the
/// module doc. Runs on the sync thread before any other write reaches sled.
pub(crate) fn move_all(
    db: &sled::Db,
    syncer: &mut Syncer,
    dir: &Path,
    counting: Counting,
) -> Result<Moved, SpoolError> {
    let mut moved = Moved::default();
    let files = list(dir)?;
    if files.is_empty() {
        return Ok(moved);
    }
    let mut done = Vec::new();
    for (number, path) in files {
        moved.files += 1;
        let count_here = counting.own != Some(number);
        // The offset of a frame whose ids are taken by other mail (see the module doc).
        let mut collision = None;
        let end = read(&path, |offset, ops| {
            if collision.is_some() {
                return Ok(());
            }
            // Moved before (a crash during an earlier move): every key is there with its
            // value, since a frame is applied whole. None there: not moved yet.
            let (mut same, mut absent) = (0, 0);
            for (key, value) in &ops {
                match db.get(key)? {
                    None => absent += 1,
                    Some(stored) if Some(&stored) == value.as_ref() => same += 1,
                    Some(_) => {}
                }
            }
            if absent != ops.len() && same != ops.len() {
                collision = Some(offset);
                return Ok(());
            }
            let ids = ops.iter().filter_map(|(key, _)| envelope_id(key));
            if count_here {
                moved.earlier.extend(ids.clone());
            } else {
                moved.own.extend(ids.clone());
            }
            if same == ops.len() {
                // Its marks too (a move from before the marks wrote none): its journal is
                // still here, so its mail cannot have been checked.
                let mut marks = sled::Batch::default();
                for id in ids {
                    marks.insert(&crate::spool::unchecked_key(id)[..], &[][..]);
                }
                db.apply_batch(marks)?;
                moved.skipped += 1;
                return Ok(());
            }
            if count_here {
                for (key, value) in &ops {
                    let Some(id) = envelope_id(key) else { continue };
                    let counted_by_scan =
                        !counting.clean && counting.boundary.is_some_and(|b| id <= b);
                    if !counted_by_scan {
                        let size = value
                            .as_deref()
                            .and_then(|v| serde_json::from_slice::<Sized>(v).ok())
                            .map_or(0, |s| s.size);
                        moved.uncounted.messages += 1;
                        moved.uncounted.bytes += size as i64;
                    }
                }
            }
            let mut batch = sled::Batch::default();
            // Each message's mark, in its own batch: until its owner reports it checked, the
            // next open names it (`Spool::earlier_intake`), whenever a crash comes.
            for id in ids.clone() {
                batch.insert(&crate::spool::unchecked_key(id)[..], &[][..]);
            }
            for (key, value) in ops {
                if let Some(value) = value {
                    batch.insert(key, value);
                }
            }
            db.apply_batch(batch)?;
            moved.frames += 1;
            Ok(())
        })?;
        let end = match collision {
            Some(offset) => End::Damaged {
                offset,
                reason:
                    "the frame's ids are taken by other mail in the spool (clock stepped back?)"
                        .into(),
            },
            None => end,
        };
        match end {
            End::Clean => done.push(path),
            End::TornTail { offset } => {
                tracing::warn!(file = %path.display(), offset,
                    "spool intake journal: dropping a torn last frame (a round never acknowledged)");
                moved.torn += 1;
                done.push(path);
            }
            End::Damaged { offset, reason } => {
                let aside = path.with_extension("journal.damaged");
                tracing::error!(file = %path.display(), offset, %reason, kept_as = %aside.display(),
                    "spool intake journal: damaged frame; the frames before it were moved, the file is kept aside");
                fs::rename(&path, &aside)
                    .map_err(|e| SpoolError::io(format!("renaming {} aside", path.display()), e))?;
                moved.set_aside.push((aside, offset));
            }
        }
    }
    // Durable in sled before the journal goes.
    syncer.sync(db)?;
    for path in done {
        fs::remove_file(&path)
            .map_err(|e| SpoolError::io(format!("removing {}", path.display()), e))?;
    }
    sync_dir(dir)?;
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(k: &[u8], v: &[u8]) -> Op {
        (k.into(), Some(v.into()))
    }

    fn frames(path: &Path) -> (Vec<(u64, Vec<Op>)>, End) {
        let mut got = Vec::new();
        let end = read(path, |offset, ops| {
            got.push((offset, ops));
            Ok(())
        })
        .unwrap();
        (got, end)
    }

    #[test]
    fn frames_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path()).unwrap();
        w.append(&[op(b"a", b"1"), op(b"bb", b"")]).unwrap();
        w.append(&[op(b"c", &[7; 3000])]).unwrap();
        let files = list(dir.path()).unwrap();
        assert_eq!(files.len(), 1);
        let (got, end) = frames(&files[0].1);
        assert_eq!(end, End::Clean);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, vec![op(b"a", b"1"), op(b"bb", b"")]);
        assert_eq!(got[1].1, vec![op(b"c", &[7; 3000])]);
        // A second writer numbers after the first file.
        assert_eq!(Writer::new(dir.path()).unwrap().number(), files[0].0 + 1);
    }

    #[test]
    fn a_short_or_failing_last_frame_is_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path()).unwrap();
        w.append(&[op(b"a", b"1")]).unwrap();
        let path = list(dir.path()).unwrap()[0].1.clone();
        let good = fs::metadata(&path).unwrap().len();
        let second = encode_frame(&[op(b"b", b"2222")]).unwrap();
        for cut in [3, HEADER, second.len() - 1] {
            let mut bytes = fs::read(&path).unwrap()[..good as usize].to_vec();
            bytes.extend_from_slice(&second[..cut]);
            fs::write(&path, &bytes).unwrap();
            let (got, end) = frames(&path);
            assert_eq!(got.len(), 1, "cut at {cut}");
            assert_eq!(end, End::TornTail { offset: good });
        }
        // Whole length, wrong bytes, at the end of the file.
        let mut bytes = fs::read(&path).unwrap()[..good as usize].to_vec();
        let mut bad = second.clone();
        *bad.last_mut().unwrap() ^= 1;
        bytes.extend_from_slice(&bad);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(frames(&path).1, End::TornTail { offset: good });
        // Zeros where a round should be (its data never reached the disk).
        let mut bytes = fs::read(&path).unwrap()[..good as usize].to_vec();
        bytes.extend_from_slice(&[0; 100]);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(frames(&path).1, End::TornTail { offset: good });
    }

    #[test]
    fn a_bad_frame_before_the_tail_is_damage_with_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::new(dir.path()).unwrap();
        w.append(&[op(b"a", b"1")]).unwrap();
        w.append(&[op(b"b", b"2")]).unwrap();
        w.append(&[op(b"c", b"3")]).unwrap();
        let path = list(dir.path()).unwrap()[0].1.clone();
        let first = encode_frame(&[op(b"a", b"1")]).unwrap().len();
        let mut bytes = fs::read(&path).unwrap();
        bytes[first + HEADER + 5] ^= 0x40;
        fs::write(&path, &bytes).unwrap();
        let (got, end) = frames(&path);
        assert_eq!(got.len(), 1);
        assert!(
            matches!(end, End::Damaged { offset, .. } if offset == first as u64),
            "{end:?}"
        );
    }
}
