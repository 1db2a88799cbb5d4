//! The keyspaces beside the messages, each under its own key prefix and
//! written through the same group commit (so durable on return, and atomic
//! with anything in the same call):
//!
//! - `S` + lowercase address -> value: the suppression list. It may hold
//!   millions of entries, so it has its own prefix (ordered by address, read
//!   page by page) rather than living in the small `M` keyspace;
//! - `I` + id -> value: inbound mail for a bounce domain, waiting for the
//!   bounce processor, which removes it once applied (so a crash re-processes
//!   it instead of losing it). Written in the same batch as the message's
//!   other parts by [`Spool::commit_with_inbound`];
//! - `V` + stream + 0x00 + seq -> value: event outboxes, one stream per
//!   consumer (webhook); seq is a spool id, so each stream is in emission
//!   order, also across restarts.
//!
//! The spool never interprets the values; recovery and the orphan sweep
//! never look at these prefixes.

use super::{insert, key, remove, Spool, SpoolError};
use crate::id::MessageId;
use crate::record::Envelope;

/// A batch of inbound records, oldest first.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InboundBatch {
    pub records: Vec<(MessageId, Vec<u8>)>,
    /// More records were left for the next batch.
    pub more: bool,
}

const SUPPRESSION: u8 = b'S';
const INBOUND: u8 = b'I';
const EVENTS: u8 = b'V';

impl Spool {
    /// Like [`Spool::commit`], plus inbound records, all in one atomic batch.
    pub async fn commit_with_inbound(
        &self,
        parts: Vec<(Envelope, Vec<u8>)>,
        inbound: Vec<(MessageId, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        let shared = parts
            .into_iter()
            .map(|(envelope, body)| super::Shared {
                envelopes: vec![envelope],
                body,
            })
            .collect();
        self.commit_shared_with_inbound(shared, inbound).await
    }

    /// `commit_shared` with inbound records in the same batch (see
    /// `commit_with_inbound`).
    pub async fn commit_shared_with_inbound(
        &self,
        parts: Vec<super::Shared>,
        inbound: Vec<(MessageId, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        self.commit_inner(
            parts,
            inbound
                .into_iter()
                .map(|(id, value)| insert(&key(INBOUND, id), value))
                .collect(),
        )
        .await
    }

    /// The oldest inbound records, at most `max_count` of them and, beyond
    /// the first, at most `max_bytes` in all: a record is a whole message, so
    /// a count alone would let a few large ones fill memory.
    pub fn inbound_batch(
        &self,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<InboundBatch, SpoolError> {
        let mut batch = InboundBatch::default();
        let mut bytes = 0;
        for item in self.opened()?.db.scan_prefix([INBOUND]) {
            let (k, v) = item?;
            let over = bytes + v.len() > max_bytes && !batch.records.is_empty();
            if batch.records.len() == max_count || over {
                batch.more = true;
                break;
            }
            bytes += v.len();
            batch.records.push((super::parse_id_key(&k)?, v.to_vec()));
        }
        Ok(batch)
    }

    /// Deletes an inbound record (absent is fine); returns once durable.
    pub async fn remove_inbound(&self, id: MessageId) -> Result<(), SpoolError> {
        self.write(vec![remove(&key(INBOUND, id))]).await
    }

    /// Stores (or replaces) suppression entries, keyed by their address as
    /// given (callers lowercase it); one durable write for all.
    pub async fn put_suppressions(
        &self,
        entries: Vec<(String, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        let ops = entries
            .into_iter()
            .map(|(address, value)| insert(&text_key(SUPPRESSION, &address), value))
            .collect();
        self.write(ops).await
    }

    /// Deletes suppression entries (absent ones are fine); one durable write.
    pub async fn remove_suppressions(&self, addresses: &[String]) -> Result<(), SpoolError> {
        let ops = addresses
            .iter()
            .map(|a| remove(&text_key(SUPPRESSION, a)))
            .collect();
        self.write(ops).await
    }

    /// One atomic durable write of suppression changes: entries stored (or
    /// replaced), entries deleted, records appended to the outbox `stream`
    /// (as [`Spool::push_events`] does, in order), and meta records stored.
    /// A replicated list writes its change and the record that carries it
    /// elsewhere in one batch, so a crash loses or repeats neither alone.
    pub async fn change_suppressions(
        &self,
        puts: Vec<(String, Vec<u8>)>,
        removes: &[String],
        outbox: Option<(&str, Vec<Vec<u8>>)>,
        meta: Vec<(String, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        let mut ops: Vec<super::Op> = puts
            .into_iter()
            .map(|(address, value)| insert(&text_key(SUPPRESSION, &address), value))
            .collect();
        ops.extend(removes.iter().map(|a| remove(&text_key(SUPPRESSION, a))));
        if let Some((stream, records)) = outbox {
            ops.extend(
                records
                    .into_iter()
                    .map(|e| insert(&event_key(stream, self.next_id().to_be_bytes()), e)),
            );
        }
        ops.extend(
            meta.into_iter()
                .map(|(name, value)| insert(&super::meta_key(&name), value)),
        );
        self.write(ops).await
    }

    /// The suppression entry of `address`, if any. Does not wait for sled:
    /// `SpoolError::Opening` while it opens (the SMTP dialogue asks at every
    /// RCPT, and must not wait).
    pub fn suppression(&self, address: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self
            .opened_now()
            .ok_or(SpoolError::Opening)?
            .db
            .get(text_key(SUPPRESSION, address))?
            .map(|v| v.to_vec()))
    }

    /// Up to `limit` suppression entries with an address greater than
    /// `after` (from the start if `None`), in address order.
    pub fn suppressions_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, SpoolError> {
        let start = match after {
            Some(a) => {
                let mut k = text_key(SUPPRESSION, a);
                k.push(0);
                k
            }
            None => vec![SUPPRESSION],
        };
        self.opened()?
            .db
            .range(start..vec![SUPPRESSION + 1])
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                let address = std::str::from_utf8(&k[1..])
                    .map_err(|_| super::corrupt(&k, "address is not UTF-8".into()))?;
                Ok((address.to_string(), v.to_vec()))
            })
            .collect()
    }

    /// How many suppression entries are stored. A scan of the keyspace: for a
    /// count at start, not for every request.
    pub fn count_suppressions(&self) -> Result<u64, SpoolError> {
        count(self.opened()?.db.scan_prefix([SUPPRESSION]))
    }

    /// How many events wait in the outbox `stream`. A scan, like
    /// [`Spool::count_suppressions`].
    pub fn count_events(&self, stream: &str) -> Result<u64, SpoolError> {
        count(self.opened()?.db.scan_prefix(event_key(stream, [])))
    }

    /// Appends events to the outbox `stream`, in order; returns once durable.
    pub async fn push_events(&self, stream: &str, events: Vec<Vec<u8>>) -> Result<(), SpoolError> {
        let ops = events
            .into_iter()
            .map(|e| insert(&event_key(stream, self.next_id().to_be_bytes()), e))
            .collect();
        self.write(ops).await
    }

    /// The oldest `limit` events of `stream`, with the sequence numbers that
    /// [`Spool::remove_events`] takes.
    pub fn events(&self, stream: &str, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, SpoolError> {
        let prefix = event_key(stream, []);
        self.opened()?
            .db
            .scan_prefix(&prefix)
            .take(limit)
            .map(|item| {
                let (k, v) = item?;
                let seq = k
                    .get(prefix.len()..)
                    .and_then(|s| <[u8; 8]>::try_from(s).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| super::corrupt(&k, "event key without sequence".into()))?;
                Ok((seq, v.to_vec()))
            })
            .collect()
    }

    /// Deletes delivered events of `stream`; returns once durable.
    pub async fn remove_events(&self, stream: &str, seqs: &[u64]) -> Result<(), SpoolError> {
        let ops = seqs
            .iter()
            .map(|s| remove(&event_key(stream, s.to_be_bytes())))
            .collect();
        self.write(ops).await
    }

    /// One durable write of `ops` through the group commit, once sled is open.
    pub(super) async fn write(&self, ops: Vec<super::Op>) -> Result<(), SpoolError> {
        if ops.is_empty() {
            return Ok(());
        }
        self.opened_async().await?;
        self.inner.group.check()?;
        let ticket = self.inner.group.enqueue(ops, super::Delta::default(), None);
        self.inner.group.wait_for(ticket).await
    }
}

fn count(iter: sled::Iter) -> Result<u64, SpoolError> {
    let mut n = 0;
    for item in iter.keys() {
        item?;
        n += 1;
    }
    Ok(n)
}

fn text_key(prefix: u8, text: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + text.len());
    k.push(prefix);
    k.extend_from_slice(text.as_bytes());
    k
}

fn event_key<const N: usize>(stream: &str, seq: [u8; N]) -> Vec<u8> {
    let mut k = text_key(EVENTS, stream);
    k.push(0);
    k.extend_from_slice(&seq);
    k
}

#[cfg(test)]
mod tests {
    use crate::{Envelope, Spool};

    #[tokio::test]
    async fn keyspaces_are_durable_ordered_and_separate() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        spool
            .put_suppressions(vec![
                ("b@x.test".into(), b"2".to_vec()),
                ("a@x.test".into(), b"1".to_vec()),
                ("c@x.test".into(), b"3".to_vec()),
            ])
            .await
            .unwrap();
        let page = spool.suppressions_after(Some("a@x.test"), 1).unwrap();
        assert_eq!(page, [("b@x.test".to_string(), b"2".to_vec())]);
        spool
            .remove_suppressions(&["b@x.test".into()])
            .await
            .unwrap();
        spool
            .change_suppressions(
                vec![("d@x.test".into(), b"4".to_vec())],
                &["c@x.test".into()],
                Some(("out", vec![b"o1".to_vec(), b"o2".to_vec()])),
                vec![("pos".into(), b"7".to_vec())],
            )
            .await
            .unwrap();
        assert_eq!(spool.suppression("c@x.test").unwrap(), None);
        assert_eq!(spool.suppression("d@x.test").unwrap(), Some(b"4".to_vec()));
        let out = spool.events("out", 10).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out[0].0 < out[1].0 && out[0].1 == b"o1");
        assert_eq!(spool.get_meta("pos").unwrap(), Some(b"7".to_vec()));
        spool
            .change_suppressions(
                vec![("c@x.test".into(), b"3".to_vec())],
                &["d@x.test".into()],
                None,
                Vec::new(),
            )
            .await
            .unwrap();
        spool
            .remove_events("out", &[out[0].0, out[1].0])
            .await
            .unwrap();
        assert_eq!(spool.suppression("b@x.test").unwrap(), None);
        assert_eq!(spool.suppressions_after(None, 10).unwrap().len(), 2);

        spool
            .push_events("w0", vec![b"e1".to_vec(), b"e2".to_vec()])
            .await
            .unwrap();
        spool
            .push_events("w1", vec![b"other".to_vec()])
            .await
            .unwrap();
        let events = spool.events("w0", 10).unwrap();
        assert_eq!(
            events.iter().map(|e| e.1.as_slice()).collect::<Vec<_>>(),
            [b"e1", b"e2"]
        );
        spool.remove_events("w0", &[events[0].0]).await.unwrap();

        let id = spool.next_id();
        spool
            .commit_with_inbound(
                Vec::<(Envelope, Vec<u8>)>::new(),
                vec![(id, b"bounce".to_vec())],
            )
            .await
            .unwrap();
        drop(spool);
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.events("w0", 10).unwrap()[0].1, b"e2");
        assert_eq!(spool.events("w1", 10).unwrap().len(), 1);
        assert_eq!(
            spool.inbound_batch(10, usize::MAX).unwrap().records,
            [(id, b"bounce".to_vec())]
        );
        assert_eq!(
            spool.stats().messages,
            0,
            "inbound records are not messages"
        );
        spool.remove_inbound(id).await.unwrap();
        assert!(spool
            .inbound_batch(10, usize::MAX)
            .unwrap()
            .records
            .is_empty());
    }
}
