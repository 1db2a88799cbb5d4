//! The suppression list: addresses tern does not mail, stored in the spool's own keyspace
//! (`Spool::put_suppressions` and friends, group-committed), keyed by the lowercase address.
//!
//! Entries come from hard bounces (synchronous 5xx classified hard, asynchronous DSNs),
//! complaints (ARF), soft failed bounces of `suppression.soft_categories` (with an expiry),
//! the send-time sunset policy (reason `sunset`: recipients dormant beyond
//! `sendtime.sunset_after`), and the operator (API, CLI, CSV import). Policy asks [`Suppressions::check`] at RCPT and
//! at HTTP injection. An expired entry is treated as absent; it stays stored until it is
//! replaced or removed (the list API does not show it).
//!
//! Scope: an entry without a scope applies to all mail (checked at RCPT); a scoped entry
//! (reason `unsubscribe` with `unsubscribe.scope = "list"`) applies only to mail of that
//! list (sender identity), checked where the list is known ([`Suppressions::check_scoped`]).
//! Its key is the address, [`SCOPE_SEPARATOR`] and the scope, so a point lookup finds
//! either kind and the list scan shows both.
//!
//! CSV form (import and export): `address,reason,created_ms,expires_ms,source,scope` with a
//! header line; `expires_ms`, `source` and `scope` may be empty (and `scope` absent).
//!
//! Replicated (`[cluster]`, [`Suppressions::replicated`]): the list in the spool is this
//! node's copy of the fleet's shared list, still the only thing checks read. Every change
//! made here is written together with an [`Op`] in the outbox stream [`OUTBOX`] (one atomic
//! spool write), which `crate::cluster` pushes to Redis in order and removes once Redis has
//! it; changes other nodes made come back through [`Suppressions::apply`], which writes the
//! local copy only. A change is therefore never lost to an outage (the outbox waits) and
//! never applied twice in Redis (each op carries its outbox sequence number).

use crate::config::{SuppressionConfig, SuppressionMode};
use crate::taxonomy::Category;
use crate::telemetry::{ClusterOutbox, Metrics};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tern_queue::{Spool, SpoolError};

/// One suppressed address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Lowercase.
    pub address: String,
    /// A bounce category name (`invalid_recipient`, `complaint`, ...) or `manual`.
    pub reason: String,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms after which the entry no longer applies; `None`: until removed.
    #[serde(default)]
    pub expires_ms: Option<u64>,
    /// The queue id of the message whose bounce or complaint added it, if any.
    #[serde(default)]
    pub source: Option<String>,
    /// The list (sender identity) it applies to; `None`: all mail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
}

/// Between the address and the scope in a scoped entry's key: a control character, which no
/// address that passes the mailbox check contains.
pub const SCOPE_SEPARATOR: char = '\u{1f}';

/// The key of the entry for `address` (normalized) in `scope`.
pub fn key_for(address: &str, scope: Option<&str>) -> String {
    let address = normalize(address);
    match scope {
        Some(scope) => format!("{address}{SCOPE_SEPARATOR}{}", scope.to_ascii_lowercase()),
        None => address,
    }
}

impl Entry {
    /// Its key in the list.
    pub fn key(&self) -> String {
        key_for(&self.address, self.scope.as_deref())
    }

    pub fn active(&self, now_ms: u64) -> bool {
        self.expires_ms.is_none_or(|t| now_ms < t)
    }
}

pub const CSV_HEADER: &str = "address,reason,created_ms,expires_ms,source,scope";

/// One change of the list, as the outbox and the fleet's stream carry it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Stores (or replaces) the entry.
    Put(Entry),
    /// Removes the entry with this key ([`key_for`]).
    Del(String),
}

impl Op {
    /// The key of the entry it changes.
    pub fn key(&self) -> String {
        match self {
            Op::Put(e) => e.key(),
            Op::Del(k) => k.clone(),
        }
    }
}

/// The spool's outbox stream of changes made on this node, waiting for the fleet's store.
pub const OUTBOX: &str = "cluster/suppressions";

#[derive(Clone)]
pub struct Suppressions {
    spool: Spool,
    config: Arc<SuppressionConfig>,
    /// Counts additions and removals (`tern_suppression_*`).
    metrics: Arc<Metrics>,
    /// Set when the list is the local copy of a fleet's list: each change also goes into the
    /// outbox [`OUTBOX`], and this wakes its pusher.
    outbox: Option<Arc<tokio::sync::Notify>>,
}

impl Suppressions {
    /// The list in `spool`, reported to `metrics`: the size gauge moves with every change
    /// from now on and gets the stored count from [`Suppressions::count_entries`].
    pub fn new(spool: Spool, config: SuppressionConfig, metrics: Arc<Metrics>) -> Suppressions {
        Suppressions {
            spool,
            config: Arc::new(config),
            metrics,
            outbox: None,
        }
    }

    /// Like [`Suppressions::new`], for a node of a fleet: every change made through
    /// [`Suppressions::add`] and [`Suppressions::remove`] is also queued in the outbox, in the
    /// same spool write, and `pushed` is notified (the fleet's pusher waits on it).
    pub fn replicated(
        spool: Spool,
        config: SuppressionConfig,
        metrics: Arc<Metrics>,
        pushed: Arc<tokio::sync::Notify>,
    ) -> Suppressions {
        Suppressions {
            outbox: Some(pushed),
            ..Suppressions::new(spool, config, metrics)
        }
    }

    /// The spool that holds the list (and the outbox).
    pub fn spool(&self) -> &Spool {
        &self.spool
    }

    /// Adds the list's size at start to the size gauge: a scan, run in the background so a
    /// list of millions does not delay start-up. Blocking. Entries added or removed during the
    /// scan may be counted twice or not at all until the next restart.
    pub fn count_entries(&self) -> Result<(), SpoolError> {
        self.metrics
            .suppression_counted(self.spool.count_suppressions()?);
        Ok(())
    }

    pub fn mode(&self) -> SuppressionMode {
        self.config.mode
    }

    /// The active entry for `address`, if any. A read error counts as "not suppressed"
    /// (logged): mail is never refused because the list could not be read.
    pub fn check(&self, address: &str) -> Option<Entry> {
        self.check_key(&normalize(address))
    }

    /// The active entry that keeps mail of list `scope` from `address`: one for all mail, or
    /// one for that list.
    pub fn check_scoped(&self, address: &str, scope: &str) -> Option<Entry> {
        self.check(address)
            .or_else(|| self.check_key(&key_for(address, Some(scope))))
    }

    fn check_key(&self, key: &str) -> Option<Entry> {
        match self.spool.suppression(key) {
            Ok(Some(bytes)) => serde_json::from_slice::<Entry>(&bytes)
                .ok()
                .filter(|e| e.active(crate::clock::now_ms())),
            Ok(None) => None,
            // The spool is still opening at start: mail taken meanwhile is screened once it
            // is open, before delivery starts (`Enqueue::screen_intake`).
            Err(SpoolError::Opening) => None,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the suppression list");
                None
            }
        }
    }

    /// Adds (or replaces) entries; one durable write.
    pub async fn add(&self, entries: Vec<Entry>) -> Result<(), SpoolError> {
        // Addresses not on the list yet, by reason: what the size gauge grows by.
        let mut new: Vec<(String, u64)> = Vec::new();
        let mut records = Vec::with_capacity(entries.len());
        for mut e in entries {
            e.address = normalize(&e.address);
            let key = e.key();
            let fresh = self.spool.suppression(&key)?.is_none()
                && !records.iter().any(|(k, _, _)| k == &key);
            if fresh {
                match new.iter_mut().find(|(r, _)| r == &e.reason) {
                    Some((_, n)) => *n += 1,
                    None => new.push((e.reason.clone(), 1)),
                }
            }
            let json = serde_json::to_vec(&e).unwrap_or_default();
            records.push((key, json, e));
        }
        let outbox: Vec<Vec<u8>> = match &self.outbox {
            Some(_) => records
                .iter()
                .map(|(_, _, e)| serde_json::to_vec(&Op::Put(e.clone())).unwrap_or_default())
                .collect(),
            None => Vec::new(),
        };
        let puts = records.into_iter().map(|(k, json, _)| (k, json)).collect();
        self.write(puts, &[], outbox).await?;
        for (reason, n) in new {
            self.metrics.suppression_added(&reason, n);
        }
        Ok(())
    }

    /// One spool write of local changes, with their outbox records when replicated.
    async fn write(
        &self,
        puts: Vec<(String, Vec<u8>)>,
        removes: &[String],
        outbox: Vec<Vec<u8>>,
    ) -> Result<(), SpoolError> {
        match &self.outbox {
            Some(pushed) => {
                let waiting = i64::try_from(outbox.len()).unwrap_or(i64::MAX);
                self.spool
                    .change_suppressions(puts, removes, Some((OUTBOX, outbox)), Vec::new())
                    .await?;
                self.metrics
                    .cluster()
                    .outbox_moved(ClusterOutbox::Suppressions, waiting);
                pushed.notify_one();
                Ok(())
            }
            None => {
                if !puts.is_empty() {
                    self.spool.put_suppressions(puts).await?;
                }
                if !removes.is_empty() {
                    self.spool.remove_suppressions(removes).await?;
                }
                Ok(())
            }
        }
    }

    /// Applies changes that came from the fleet's store to this node's copy, in order, with
    /// `meta` (the stream position they bring the copy to) in the same write; nothing goes
    /// to the outbox. Applying a change twice leaves the same list.
    pub async fn apply(
        &self,
        ops: Vec<Op>,
        meta: Vec<(String, Vec<u8>)>,
    ) -> Result<(), SpoolError> {
        // Only the last change of each key counts within one write.
        let mut last: std::collections::HashMap<String, Op> = std::collections::HashMap::new();
        for op in ops {
            let mut op = op;
            if let Op::Put(e) = &mut op {
                e.address = normalize(&e.address);
            }
            last.insert(op.key(), op);
        }
        let mut puts = Vec::new();
        let mut removes = Vec::new();
        for (key, op) in last {
            let existing = self.spool.suppression(&key)?;
            match op {
                Op::Put(e) => {
                    let json = serde_json::to_vec(&e).unwrap_or_default();
                    if existing.as_deref() == Some(&json[..]) {
                        continue;
                    }
                    if existing.is_none() {
                        self.metrics.suppression_added(&e.reason, 1);
                    }
                    puts.push((key, json));
                }
                Op::Del(_) => {
                    if let Some(bytes) = existing {
                        self.metrics.suppression_removed(&reason_of(&bytes));
                        removes.push(key);
                    }
                }
            }
        }
        self.spool
            .change_suppressions(puts, &removes, None, meta)
            .await
    }

    /// Removes entries by key (an address for an entry without scope, [`key_for`] for a
    /// scoped one); returns how many of them existed.
    pub async fn remove(&self, keys: &[String]) -> Result<usize, SpoolError> {
        let keys: Vec<String> = keys.iter().map(|k| normalize(k)).collect();
        let mut reasons = Vec::new();
        for k in &keys {
            if let Some(bytes) = self.spool.suppression(k)? {
                reasons.push(reason_of(&bytes));
            }
        }
        let outbox = match &self.outbox {
            // Every key, present here or not: another node's copy may still hold it.
            Some(_) => keys
                .iter()
                .map(|k| serde_json::to_vec(&Op::Del(k.clone())).unwrap_or_default())
                .collect(),
            None => Vec::new(),
        };
        self.write(Vec::new(), &keys, outbox).await?;
        for reason in &reasons {
            self.metrics.suppression_removed(reason);
        }
        Ok(reasons.len())
    }

    /// Active entries after the address `after`, in address order, matching `reason` and the
    /// address substring `contains` when given; at most `limit`. Returns the entries and the
    /// cursor for the next page (`None` at the end).
    pub fn list(
        &self,
        after: Option<&str>,
        limit: usize,
        reason: Option<&str>,
        contains: Option<&str>,
    ) -> Result<(Vec<Entry>, Option<String>), SpoolError> {
        const CHUNK: usize = 1024;
        let now = crate::clock::now_ms();
        let contains = contains.map(str::to_lowercase);
        let mut cursor = after.map(normalize);
        let mut out = Vec::new();
        loop {
            let chunk = self.spool.suppressions_after(cursor.as_deref(), CHUNK)?;
            let end = chunk.len() < CHUNK;
            for (address, bytes) in chunk {
                cursor = Some(address);
                let Ok(entry) = serde_json::from_slice::<Entry>(&bytes) else {
                    continue;
                };
                if entry.active(now)
                    && reason.is_none_or(|r| entry.reason == r)
                    && contains
                        .as_deref()
                        .is_none_or(|c| entry.address.contains(c))
                {
                    out.push(entry);
                    if out.len() == limit {
                        return Ok((out, cursor));
                    }
                }
            }
            if end {
                return Ok((out, None));
            }
        }
    }

    /// The policy that decides which bounces add an entry (see [`entry_for`]).
    pub fn config(&self) -> &SuppressionConfig {
        &self.config
    }

    /// The entry a bounce or complaint adds under this list's policy ([`entry_for`]).
    pub fn entry_for(
        &self,
        address: &str,
        category: Category,
        hard: bool,
        failed: bool,
        source: Option<String>,
        now_ms: u64,
    ) -> Option<Entry> {
        entry_for(
            &self.config,
            address,
            category,
            hard,
            failed,
            source,
            now_ms,
        )
    }
}

/// The entry a bounce or complaint adds under `config`, if it adds one: hard results until
/// removed, failed results of a soft category for `soft_expiry`. Pure: nothing is stored.
pub fn entry_for(
    config: &SuppressionConfig,
    address: &str,
    category: Category,
    hard: bool,
    failed: bool,
    source: Option<String>,
    now_ms: u64,
) -> Option<Entry> {
    let expires_ms = if hard {
        None
    } else if failed && config.soft_categories.contains(&category) {
        Some(now_ms.saturating_add(config.soft_expiry.as_millis() as u64))
    } else {
        return None;
    };
    Some(Entry {
        address: normalize(address),
        reason: category.as_str().to_owned(),
        created_ms: now_ms,
        expires_ms,
        source,
        scope: None,
    })
}

/// The reason of a stored entry, for the metrics (`manual` when unreadable).
fn reason_of(bytes: &[u8]) -> String {
    serde_json::from_slice::<Entry>(bytes)
        .map(|e| e.reason)
        .ok()
        .filter(|r| valid_reason(r))
        .unwrap_or_else(|| "manual".to_owned())
}

/// Addresses are compared lowercase: local parts are case-insensitive at every mailbox
/// provider that matters, and a list that misses `Jane@` after suppressing `jane@` is worse.
pub fn normalize(address: &str) -> String {
    address.trim().trim_matches(['<', '>']).to_lowercase()
}

/// The reason of entries the send-time sunset policy adds (recipients dormant too long).
pub const SUNSET_REASON: &str = "sunset";

/// The reason of entries a one-click (or mailto) unsubscribe adds.
pub const UNSUBSCRIBE_REASON: &str = "unsubscribe";

/// Whether `reason` may label an entry: a bounce category, `manual`, `sunset` or
/// `unsubscribe`.
pub fn valid_reason(reason: &str) -> bool {
    reason == "manual"
        || reason == SUNSET_REASON
        || reason == UNSUBSCRIBE_REASON
        || reason.parse::<Category>().is_ok()
}

pub fn to_csv_line(e: &Entry) -> String {
    format!(
        "{},{},{},{},{},{}",
        csv_field(&e.address),
        csv_field(&e.reason),
        e.created_ms,
        e.expires_ms.map(|t| t.to_string()).unwrap_or_default(),
        csv_field(e.source.as_deref().unwrap_or("")),
        csv_field(e.scope.as_deref().unwrap_or("")),
    )
}

/// One CSV cell. A cell a spreadsheet would run as a formula (it begins with `=`, `+`, `-`,
/// `@`, a tab or a CR) gets a leading `'` (OWASP's CSV-injection advice), which
/// [`parse_csv`] takes off again, so an export imports back unchanged.
fn csv_field(s: &str) -> String {
    let s = if s.starts_with(FORMULA_STARTS) {
        format!("'{s}")
    } else {
        s.to_owned()
    };
    if s.contains([',', '"', '\n', '\r', '\t']) || s.starts_with('\'') {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// What a spreadsheet takes for the start of a formula.
const FORMULA_STARTS: [char; 6] = ['=', '+', '-', '@', '\t', '\r'];

/// A cell as exported, without the `'` that [`csv_field`] put before a formula start.
fn uncell(s: &str) -> &str {
    match s.strip_prefix('\'') {
        Some(rest) if rest.starts_with(FORMULA_STARTS) => rest,
        _ => s,
    }
}

/// Parses CSV in the export form (header optional; only `address` is required per line:
/// `reason` defaults to `manual`, `created_ms` to `now_ms`). Errors name the line.
pub fn parse_csv(text: &str, now_ms: u64) -> Result<Vec<Entry>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim_end_matches('\r');
        if line.trim().is_empty() || (n == 0 && line.starts_with("address")) {
            continue;
        }
        let fields = split_csv(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let field = |i: usize| {
            fields
                .get(i)
                .map(|s| uncell(s.trim()))
                .filter(|s| !s.is_empty())
        };
        let address = field(0).ok_or(format!("line {}: missing address", n + 1))?;
        if !address.contains('@') {
            return Err(format!("line {}: {address:?} is not an address", n + 1));
        }
        let reason = field(1).unwrap_or("manual");
        if !valid_reason(reason) {
            return Err(format!("line {}: unknown reason {reason:?}", n + 1));
        }
        let number = |i: usize, name: &str| -> Result<Option<u64>, String> {
            field(i)
                .map(|v| {
                    v.parse::<u64>()
                        .map_err(|_| format!("line {}: {name} {v:?} is not a number", n + 1))
                })
                .transpose()
        };
        out.push(Entry {
            address: normalize(address),
            reason: reason.to_owned(),
            created_ms: number(2, "created_ms")?.unwrap_or(now_ms),
            expires_ms: number(3, "expires_ms")?,
            source: field(4).map(str::to_owned),
            scope: field(5).map(str::to_ascii_lowercase),
        });
    }
    Ok(out)
}

fn split_csv(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut cur = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            (true, '"') => quoted = false,
            (false, '"') if cur.is_empty() => quoted = true,
            (false, ',') => fields.push(std::mem::take(&mut cur)),
            (_, c) => cur.push(c),
        }
    }
    if quoted {
        return Err("unterminated quote".into());
    }
    fields.push(cur);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_cells_are_defused_on_export_and_restored_on_import() {
        let e = Entry {
            address: "=cmd|' /c calc'!a0@x.test".into(),
            reason: "manual".into(),
            created_ms: 1,
            expires_ms: None,
            source: Some("@SUM(1+1)".into()),
            scope: None,
        };
        let line = to_csv_line(&e);
        assert!(line.starts_with("\"'=cmd"), "{line}");
        assert!(!line.contains(",@SUM"), "{line}");
        let back = parse_csv(&line, 0).unwrap();
        assert_eq!(back[0].address, e.address);
        assert_eq!(back[0].source, e.source);
        for start in ["+", "-", "@"] {
            let cell = csv_field(&format!("{start}1"));
            assert!(cell.starts_with('\'') || cell.starts_with("\"'"), "{cell}");
        }
        assert_eq!(csv_field("plain@x.test"), "plain@x.test");
    }
    use std::time::Duration;

    #[test]
    fn csv_round_trip() {
        let entries = vec![
            Entry {
                address: "a@x.test".into(),
                reason: "complaint".into(),
                created_ms: 5,
                expires_ms: None,
                source: Some("0006A1B2C3D4E5F6".into()),
                scope: None,
            },
            Entry {
                address: "\"odd,local\"@x.test".into(),
                reason: "mailbox_full".into(),
                created_ms: 6,
                expires_ms: Some(99),
                source: None,
                scope: None,
            },
        ];
        let mut text = format!("{CSV_HEADER}\n");
        for e in &entries {
            text.push_str(&to_csv_line(e));
            text.push('\n');
        }
        assert_eq!(parse_csv(&text, 0).unwrap(), entries);
        assert_eq!(
            parse_csv("B@X.test\n", 7).unwrap()[0],
            Entry {
                address: "b@x.test".into(),
                reason: "manual".into(),
                created_ms: 7,
                expires_ms: None,
                source: None,
                scope: None,
            }
        );
        assert_eq!(
            parse_csv("a@x.test,bogus\n", 0).unwrap_err(),
            "line 1: unknown reason \"bogus\""
        );
    }

    #[tokio::test]
    async fn soft_entries_expire_hard_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let list = Suppressions::new(
            spool,
            SuppressionConfig {
                soft_expiry: Duration::from_secs(60),
                ..SuppressionConfig::default()
            },
            Arc::new(Metrics::new()),
        );
        let now = crate::clock::now_ms();
        let soft = list
            .entry_for(
                "Full@X.test",
                Category::MailboxFull,
                false,
                true,
                None,
                now - 61_000,
            )
            .unwrap();
        assert_eq!(soft.expires_ms, Some(now - 1_000));
        let hard = list
            .entry_for(
                "gone@x.test",
                Category::InvalidRecipient,
                true,
                true,
                None,
                now,
            )
            .unwrap();
        assert!(list
            .entry_for("x@x.test", Category::SpamBlock, false, true, None, now)
            .is_none());
        list.add(vec![soft.clone(), hard.clone()]).await.unwrap();
        assert_eq!(list.check("full@x.test"), None, "expired");
        assert_eq!(list.check("GONE@x.test"), Some(hard.clone()));
        let fresh = list
            .entry_for("full@x.test", Category::MailboxFull, false, true, None, now)
            .unwrap();
        assert!(fresh.active(now + 59_000) && !fresh.active(now + 60_000));
        let (page, next) = list.list(None, 10, None, None).unwrap();
        assert_eq!((page, next), (vec![hard], None));
        assert_eq!(list.remove(&["gone@x.test".into()]).await.unwrap(), 1);
        assert_eq!(list.check("gone@x.test"), None);
    }
}
