//! The fleet's suppression list in Redis, and each node's copy of it in its spool.
//!
//! In Redis (`{p}` is the fleet's hash tag, see [`super::Store::key`]):
//! - `{p}:sup`: a hash, entry key ([`crate::suppression::key_for`]) -> entry JSON: the list;
//! - `{p}:sup:log`: a stream of every change (field `op`: an [`Op`] as JSON), capped near
//!   [`LOG_LEN`] entries: what a node follows to keep its copy current;
//! - `{p}:sup:hw`: a hash, writer -> the outbox sequence number of the last change of that
//!   writer applied: a replayed change (the node crashed between Redis's answer and removing
//!   the outbox record, or the answer was lost) is skipped, so nothing is applied twice. A
//!   writer is the node's name and its spool's random id ([`WRITER`], made once), so two
//!   nodes misconfigured with one name still never hide each other's changes;
//! - `{p}:sup:epoch`: a random value set when the list is first written; a different (or
//!   missing) one means Redis lost its data (restarted without persistence, flushed).
//!
//! Two tasks per node:
//! - the pusher takes the outbox ([`crate::suppression::OUTBOX`]) oldest first, a batch per
//!   [`PUSH`] script call (hash, stream and high-water mark in one atomic step), and removes
//!   the batch from the outbox after Redis answered. While Redis is down the outbox grows in
//!   the spool and nothing else changes;
//! - the follower reads the stream from the position stored in the spool (blocking reads of
//!   up to [`BLOCK`], so a change reaches every node well within a second) and applies each
//!   batch to the copy with the new position in the same spool write. On (re)connecting it
//!   checks the epoch and the stream: a new node, or a Redis that lost its data, merges both
//!   ways (entries only this node has are pushed, entries only Redis has are copied); a node
//!   that fell behind the stream's cap takes Redis's list as the truth (paged: HSCAN for
//!   Redis's entries, the local list page by page against HMGET), then follows from the
//!   position it read before the scan. Nothing loads the whole list into memory.
//!
//! Ordering: every node applies the stream in its order, its own changes included, so the
//! copies converge to the same list whatever order the nodes wrote in.

use super::{Conn, Store};
use crate::suppression::{Entry, Op, Suppressions, OUTBOX};
use crate::telemetry::ClusterOutbox;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// The stream keeps about this many changes; a node further behind resyncs by paged scans.
pub const LOG_LEN: u64 = 100_000;
/// Outbox records per push.
const PUSH_BATCH: usize = 256;
/// Changes per stream read, entries per scan page.
const PAGE: usize = 1000;
/// How long a stream read waits for news.
pub(super) const BLOCK: Duration = Duration::from_millis(500);
/// The spool meta names of the copy's state: the stream position and the epoch it follows.
const POSITION: &str = "cluster/suppressions/position";
/// The spool's random id as a writer of the fleet's list (see the module doc).
const WRITER: &str = "cluster/suppressions/writer";
const EPOCH: &str = "cluster/suppressions/epoch";

/// KEYS: list hash, stream, high-water hash. ARGV: node, stream cap, then per change its
/// outbox sequence number (20 digits, so string order is number order), key, entry JSON ('':
/// removal) and op JSON. Changes at or below the node's high-water mark were applied before.
const PUSH: &str = r"
local hw = redis.call('HGET', KEYS[3], ARGV[1]) or ''
local applied = 0
for i = 3, #ARGV, 4 do
  local seq = ARGV[i]
  if seq > hw then
    if ARGV[i + 2] ~= '' then
      redis.call('HSET', KEYS[1], ARGV[i + 1], ARGV[i + 2])
    else
      redis.call('HDEL', KEYS[1], ARGV[i + 1])
    end
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', ARGV[i + 3])
    hw = seq
    applied = applied + 1
  end
end
redis.call('HSET', KEYS[3], ARGV[1], hw)
return applied
";

/// Starts the pusher and the follower of `list` (made with [`Suppressions::replicated`] and
/// `pushed`) on `tasks`, until `stop`.
pub fn start(
    store: Arc<Store>,
    list: Suppressions,
    pushed: Arc<Notify>,
    tasks: &TaskTracker,
    stop: CancellationToken,
) {
    tasks.spawn(push_loop(store.clone(), list.clone(), pushed, stop.clone()));
    tasks.spawn(follow_loop(store, list, stop));
}

async fn push_loop(
    store: Arc<Store>,
    list: Suppressions,
    pushed: Arc<Notify>,
    stop: CancellationToken,
) {
    let retry = store.config().retry;
    let writer = loop {
        match writer_id(&list).await {
            Ok(id) => break format!("{}/{id}", store.node()),
            Err(err) => {
                warn!(error = %err, "cannot read or store the spool's writer id");
                sleep_or_stop(retry, &stop).await;
                if stop.is_cancelled() {
                    return;
                }
            }
        }
    };
    let metrics = store.metrics().cluster();
    // What a previous run left waiting (a scan, once); short reads below keep it exact.
    let spool = list.spool().clone();
    if let Ok(Ok(n)) = tokio::task::spawn_blocking(move || spool.count_events(OUTBOX)).await {
        metrics.outbox_is(ClusterOutbox::Suppressions, n);
    }
    while !stop.is_cancelled() {
        let batch = match list.spool().events(OUTBOX, PUSH_BATCH) {
            Ok(batch) => {
                if batch.len() < PUSH_BATCH {
                    // The whole outbox: exact (corrects a move that raced this read).
                    metrics.outbox_is(ClusterOutbox::Suppressions, batch.len() as u64);
                }
                batch
            }
            Err(err) => {
                warn!(error = %err, "cannot read the suppression outbox");
                sleep_or_stop(retry, &stop).await;
                continue;
            }
        };
        if batch.is_empty() {
            tokio::select! {
                () = pushed.notified() => {}
                () = tokio::time::sleep(retry) => {}
                () = stop.cancelled() => {}
            }
            continue;
        }
        match push(&store, &writer, &batch).await {
            Ok(applied) => {
                debug!(sent = batch.len(), applied, "suppression changes pushed");
                let seqs: Vec<u64> = batch.iter().map(|(seq, _)| *seq).collect();
                metrics.pushed(seqs.len() as u64);
                match list.spool().remove_events(OUTBOX, &seqs).await {
                    Ok(()) => metrics.outbox_moved(
                        ClusterOutbox::Suppressions,
                        -i64::try_from(seqs.len()).unwrap_or(i64::MAX),
                    ),
                    Err(err) => {
                        warn!(error = %err, "cannot remove pushed suppression changes");
                        sleep_or_stop(retry, &stop).await;
                    }
                }
            }
            Err(err) => {
                debug!(error = %err, waiting = batch.len(), "suppression changes wait");
                sleep_or_stop(retry, &stop).await;
            }
        }
    }
}

/// One [`PUSH`] call for `batch` (outbox records); how many were new to Redis.
async fn push(store: &Store, writer: &str, batch: &[(u64, Vec<u8>)]) -> Result<u64, String> {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(PUSH)
        .arg(3)
        .arg(store.key("sup"))
        .arg(store.key("sup:log"))
        .arg(store.key("sup:hw"))
        .arg(writer)
        .arg(LOG_LEN);
    for (seq, record) in batch {
        let Ok(op) = serde_json::from_slice::<Op>(record) else {
            // Unreadable: written by a future version, or damaged; skipped (high-water only).
            cmd.arg(format!("{seq:020}")).arg("").arg("").arg("{}");
            continue;
        };
        let entry = match &op {
            Op::Put(e) => serde_json::to_string(e).unwrap_or_default(),
            Op::Del(_) => String::new(),
        };
        cmd.arg(format!("{seq:020}"))
            .arg(op.key())
            .arg(entry)
            .arg(record.as_slice());
    }
    store.query(&cmd).await
}

async fn follow_loop(store: Arc<Store>, list: Suppressions, stop: CancellationToken) {
    let retry = store.config().retry;
    let metrics = store.metrics().cluster();
    let mut conn: Option<Conn> = None;
    // The last read returned everything that was waiting: the copy is current.
    let mut current = false;
    while !stop.is_cancelled() {
        let mut c = match conn.take() {
            Some(c) => c,
            None => match connect(&store, &list).await {
                Ok(c) => c,
                Err(err) => {
                    debug!(error = %err, "suppression follower waits for the fleet store");
                    sleep_or_stop(retry, &stop).await;
                    continue;
                }
            },
        };
        metrics.follower_reading(current);
        let read = tokio::select! {
            r = follow_once(&store, &list, &mut c) => r,
            () = stop.cancelled() => return,
        };
        current = matches!(read, Ok(n) if n < PAGE);
        metrics.follower_read(current);
        match read {
            Ok(_) => conn = Some(c),
            Err(err) => {
                debug!(error = %err, "suppression follower lost the fleet store");
                sleep_or_stop(retry, &stop).await;
            }
        }
    }
}

/// A connection of the follower's own, with the copy brought up to the stream first.
async fn connect(store: &Store, list: &Suppressions) -> Result<Conn, String> {
    let mut conn = store.connect().await?;
    catch_up(store, list, &mut conn).await?;
    Ok(conn)
}

/// Reads and applies one batch of the stream (waiting up to [`BLOCK`] for it); how many
/// stream entries it read.
async fn follow_once(store: &Store, list: &Suppressions, conn: &mut Conn) -> Result<usize, String> {
    let position = position(list)?.unwrap_or_else(|| "0-0".to_owned());
    let mut cmd = redis::cmd("XREAD");
    cmd.arg("COUNT")
        .arg(PAGE)
        .arg("BLOCK")
        .arg(BLOCK.as_millis() as u64)
        .arg("STREAMS")
        .arg(store.key("sup:log"))
        .arg(&position);
    let reply: Option<redis::streams::StreamReadReply> = store.run(conn, &cmd, BLOCK).await?;
    let Some(reply) = reply else { return Ok(0) };
    let mut ops = Vec::new();
    let mut last = None;
    let mut read = 0;
    for key in reply.keys {
        for id in key.ids {
            read += 1;
            if let Some(op) = id
                .get::<Vec<u8>>("op")
                .and_then(|b| serde_json::from_slice::<Op>(&b).ok())
            {
                ops.push(op);
            }
            last = Some(id.id);
        }
    }
    if let Some(last) = last {
        let n = ops.len();
        list.apply(ops, vec![(POSITION.to_owned(), last.into_bytes())])
            .await
            .map_err(|e| format!("spool: {e}"))?;
        store.metrics().cluster().applied(n as u64);
        debug!(n, "suppression changes applied from the fleet");
    }
    Ok(read)
}

/// The spool's writer id, made (random) and stored the first time.
async fn writer_id(list: &Suppressions) -> Result<String, String> {
    if let Some(id) = meta(list, WRITER)? {
        return Ok(id);
    }
    let id = format!("{:016x}", rand::random::<u64>());
    list.spool()
        .put_meta(WRITER, id.clone().into_bytes())
        .await
        .map_err(|e| format!("spool: {e}"))?;
    Ok(id)
}

fn position(list: &Suppressions) -> Result<Option<String>, String> {
    meta(list, POSITION)
}

fn meta(list: &Suppressions, name: &str) -> Result<Option<String>, String> {
    list.spool()
        .get_meta(name)
        .map(|v| v.map(|b| String::from_utf8_lossy(&b).into_owned()))
        .map_err(|e| format!("spool: {e}"))
}

/// A stream id `ms-seq` as numbers, for comparison.
fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

/// Brings the copy up to the stream on (re)connecting: nothing to do when the copy's
/// position is still in the stream; a merge both ways for a new node or a Redis that lost
/// its data; Redis's list as the truth for a node that fell behind the stream's cap.
async fn catch_up(store: &Store, list: &Suppressions, conn: &mut Conn) -> Result<(), String> {
    let fresh: String = rand::random::<u64>().to_string();
    let set: Option<String> = store
        .run(
            conn,
            redis::cmd("SET")
                .arg(store.key("sup:epoch"))
                .arg(&fresh)
                .arg("NX")
                .arg("GET"),
            Duration::ZERO,
        )
        .await?;
    let epoch = set.unwrap_or(fresh);
    let (last_id, max_deleted) = stream_info(store, conn).await?;
    let ours = meta(list, EPOCH)?;
    let position = position(list)?;
    let mode = match (&ours, &position) {
        (Some(e), Some(p)) if *e == epoch => {
            if stream_id(p) >= stream_id(&max_deleted) {
                return Ok(());
            }
            Resync::Authoritative
        }
        _ => Resync::Merge,
    };
    info!(
        ?mode,
        node = store.node(),
        "suppression list: resync with the fleet store"
    );
    let mut scanned = 0u64;
    // Redis's entries into the copy, page by page.
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<(String, String)>) = store
            .run(
                conn,
                redis::cmd("HSCAN")
                    .arg(store.key("sup"))
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(PAGE),
                Duration::ZERO,
            )
            .await?;
        let ops: Vec<Op> = page
            .iter()
            .filter_map(|(_, json)| serde_json::from_str::<Entry>(json).ok())
            .map(Op::Put)
            .collect();
        scanned += ops.len() as u64;
        list.apply(ops, Vec::new())
            .await
            .map_err(|e| format!("spool: {e}"))?;
        if next == 0 {
            break;
        }
        cursor = next;
    }
    // The copy's entries Redis does not have: pushed (merge) or removed (Redis is right).
    let mut after: Option<String> = None;
    let (mut pushed, mut removed) = (0u64, 0u64);
    loop {
        let page = list
            .spool()
            .suppressions_after(after.as_deref(), PAGE)
            .map_err(|e| format!("spool: {e}"))?;
        let Some((last, _)) = page.last() else { break };
        after = Some(last.clone());
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(store.key("sup"));
        for (key, _) in &page {
            cmd.arg(key);
        }
        let there: Vec<Option<String>> = store.run(conn, &cmd, Duration::ZERO).await?;
        let missing: Vec<&(String, Vec<u8>)> = page
            .iter()
            .zip(&there)
            .filter(|(_, t)| t.is_none())
            .map(|(p, _)| p)
            .collect();
        match mode {
            Resync::Merge => {
                let entries: Vec<Entry> = missing
                    .iter()
                    .filter_map(|(_, bytes)| serde_json::from_slice(bytes).ok())
                    .collect();
                pushed += entries.len() as u64;
                if !entries.is_empty() {
                    // Through the outbox, like any change of this node.
                    list.add(entries).await.map_err(|e| format!("spool: {e}"))?;
                }
            }
            Resync::Authoritative => {
                let ops: Vec<Op> = missing.iter().map(|(k, _)| Op::Del(k.clone())).collect();
                removed += ops.len() as u64;
                list.apply(ops, Vec::new())
                    .await
                    .map_err(|e| format!("spool: {e}"))?;
            }
        }
        if page.len() < PAGE {
            break;
        }
    }
    list.apply(
        Vec::new(),
        vec![
            (POSITION.to_owned(), last_id.into_bytes()),
            (EPOCH.to_owned(), epoch.into_bytes()),
        ],
    )
    .await
    .map_err(|e| format!("spool: {e}"))?;
    store.metrics().cluster().resynced(mode.as_str());
    info!(
        ?mode,
        scanned, pushed, removed, "suppression list: resync with the fleet store done"
    );
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum Resync {
    /// Both ways: a new node, or a Redis that lost its data.
    Merge,
    /// Redis's list is the truth: this node fell behind the stream's cap.
    Authoritative,
}

impl Resync {
    /// The `mode` label of `tern_cluster_resyncs_total`.
    fn as_str(self) -> &'static str {
        match self {
            Resync::Merge => "merge",
            Resync::Authoritative => "authoritative",
        }
    }
}

/// The stream's last id and the highest id trimmed away (both "0-0" for no stream).
async fn stream_info(store: &Store, conn: &mut Conn) -> Result<(String, String), String> {
    // A fleet's first start has no stream yet: asked first, so no error reply is counted.
    let exists: i64 = store
        .run(
            conn,
            redis::cmd("EXISTS").arg(store.key("sup:log")),
            Duration::ZERO,
        )
        .await?;
    if exists == 0 {
        return Ok(("0-0".into(), "0-0".into()));
    }
    let mut cmd = redis::cmd("XINFO");
    cmd.arg("STREAM").arg(store.key("sup:log"));
    let reply: Result<redis::Value, String> = store.run(conn, &cmd, Duration::ZERO).await;
    let value = match reply {
        Ok(v) => v,
        Err(e) if e.contains("no such key") => return Ok(("0-0".into(), "0-0".into())),
        Err(e) => return Err(e),
    };
    let fields: Vec<redis::Value> = match value {
        redis::Value::Array(items) => items,
        redis::Value::Map(pairs) => pairs.into_iter().flat_map(|(k, v)| [k, v]).collect(),
        other => return Err(format!("XINFO STREAM: unexpected reply {other:?}")),
    };
    let mut last = "0-0".to_owned();
    let mut deleted = "0-0".to_owned();
    for pair in fields.chunks(2) {
        let [k, v] = pair else { continue };
        let name: String = redis::from_redis_value_ref(k).unwrap_or_default();
        let value: String = redis::from_redis_value_ref(v).unwrap_or_default();
        match name.as_str() {
            "last-generated-id" => last = value,
            "max-deleted-entry-id" => deleted = value,
            _ => {}
        }
    }
    Ok((last, deleted))
}

async fn sleep_or_stop(d: Duration, stop: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(d) => {}
        () = stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_compare_as_numbers() {
        assert!(stream_id("1700000000000-10") > stream_id("1700000000000-9"));
        assert!(stream_id("1700000000001-0") > stream_id("1700000000000-99"));
        assert_eq!(stream_id("0-0"), (0, 0));
    }
}
