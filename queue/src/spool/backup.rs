//! Consistent copies of a spool: [`Spool::backup`] from a running spool (writes wait for the
//! copy: it sees the spool between two group-commit rounds, so every message is whole and
//! every acknowledged write is in it), [`restore`] from a backup into an empty spool
//! directory of a stopped node.
//!
//! The copy is logical (every key and value read through sled and written into a new
//! database, then flushed and the directory synced), so it is compact and independent of
//! sled's file layout; it costs a read of the whole spool and a write of its live data.

use std::path::Path;

use super::{open_sled, sync_dir, Spool, SpoolError};

/// What a copy wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Copied {
    /// Keys (envelopes, bodies, indexes, the other keyspaces).
    pub keys: u64,
    /// Bytes of keys and values.
    pub bytes: u64,
}

/// Keys per write batch of the copy.
const BATCH: usize = 4096;
/// sled's cache for the copy's target.
const CACHE: u64 = 64 * 1024 * 1024;

impl Spool {
    /// Copies the spool into `dir` (which must not exist, or be empty) as it is between two
    /// group-commit rounds. Blocking; writes wait until it returns (their commits queue up
    /// and go in the first round after it).
    pub fn backup(&self, dir: &Path) -> Result<Copied, SpoolError> {
        // After sled opened, which is after the intake journal was moved into it: the copy
        // holds every acknowledged commit.
        let db = &self.opened()?.db;
        let _quiet = self
            .inner
            .group
            .quiet
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        copy(db, dir)
    }
}

/// Copies the backup in `from` into `to` (the spool directory of a stopped node; it must not
/// exist, or be empty). The backup itself is only read.
pub fn restore(from: &Path, to: &Path) -> Result<Copied, SpoolError> {
    if !from.join("db").exists() {
        return Err(SpoolError::io(
            format!("reading the backup {}", from.display()),
            std::io::Error::new(std::io::ErrorKind::NotFound, "no spool backup there"),
        ));
    }
    let source = open_sled(from, CACHE)?;
    copy(&source, to)
}

fn copy(db: &sled::Db, dir: &Path) -> Result<Copied, SpoolError> {
    let empty = match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
        Err(e) => return Err(SpoolError::io(format!("reading {}", dir.display()), e)),
    };
    if !empty {
        return Err(SpoolError::io(
            format!("copying the spool into {}", dir.display()),
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "the directory is not empty",
            ),
        ));
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| SpoolError::io(format!("creating {}", dir.display()), e))?;
    let target = open_sled(dir, CACHE)?;
    let mut copied = Copied::default();
    let mut batch = sled::Batch::default();
    let mut in_batch = 0;
    for item in db.iter() {
        let (key, value) = item?;
        copied.keys += 1;
        copied.bytes += (key.len() + value.len()) as u64;
        batch.insert(key, value);
        in_batch += 1;
        if in_batch == BATCH {
            target.apply_batch(std::mem::take(&mut batch))?;
            in_batch = 0;
        }
    }
    target.apply_batch(batch)?;
    target.flush()?;
    drop(target);
    sync_dir(dir)?;
    Ok(copied)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Recipient, Source};
    use crate::Envelope;

    fn envelope(spool: &Spool, i: u64) -> (Envelope, Vec<u8>) {
        let id = spool.next_id();
        let body = format!("Subject: {i}\r\n\r\nbody\r\n").into_bytes();
        let env = Envelope {
            id,
            queue_id: id,
            sender: "a@x.test".into(),
            destination: "y.test".into(),
            recipients: vec![Recipient::new(format!("r{i}@y.test"))],
            env_id: None,
            ret: None,
            body_type: Default::default(),
            smtputf8: false,
            size: body.len() as u64,
            created_ms: 1,
            expires_ms: u64::MAX,
            next_due_ms: 5,
            attempts: 0,
            source: Source {
                client_ip: "127.0.0.1".into(),
                helo: "h".into(),
                auth_user: None,
                protocol: "ESMTP".into(),
            },
            held: false,
            delay_notified: false,
            parked: false,
            pool: None,
            not_before_ms: 0,
            body_id: None,
            campaign: None,
            send_time_planned: false,
        };
        (env, body)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_backup_of_a_busy_spool_holds_whole_messages_and_restores() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        for i in 0..200 {
            spool.commit(vec![envelope(&spool, i)]).await.unwrap();
        }
        // Writers keep committing while the backup runs.
        let writing = spool.clone();
        let writer = tokio::spawn(async move {
            for i in 200..2200 {
                writing.commit(vec![envelope(&writing, i)]).await.unwrap();
            }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let backup = dir.path().join("backup");
        let copied = {
            let (spool, backup) = (spool.clone(), backup.clone());
            tokio::task::spawn_blocking(move || spool.backup(&backup))
                .await
                .unwrap()
                .unwrap()
        };
        writer.await.unwrap();
        assert!(copied.keys > 0 && copied.bytes > 0);
        // Not into a directory that holds something.
        let again = {
            let (spool, backup) = (spool.clone(), backup.clone());
            tokio::task::spawn_blocking(move || spool.backup(&backup))
                .await
                .unwrap()
        };
        assert!(again.is_err());
        drop(spool);

        let restored = dir.path().join("restored");
        let copied_again = restore(&backup, &restored).unwrap();
        assert_eq!(copied_again, copied, "the restore copies the backup whole");
        let spool = Spool::open(&restored).unwrap();
        let envelopes: Vec<Envelope> = spool
            .envelopes_after(None)
            .collect::<Result<_, _>>()
            .unwrap();
        assert!(
            (200..2200).contains(&envelopes.len()),
            "{} messages: the ones before the backup, some of the later ones",
            envelopes.len()
        );
        for env in &envelopes {
            assert!(
                spool.body_of(env).unwrap().is_some(),
                "{} has its body",
                env.id
            );
        }
        assert_eq!(spool.stats().messages, envelopes.len() as u64);
    }
}
