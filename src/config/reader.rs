//! `TableReader`: compiles one TOML table key by key, collecting every error with its key path.
//!
//! Why not serde: typed deserialization with `deny_unknown_fields` stops at the first error, and an
//! operator fixing a config file wants to see all of them at once.
//!
//! Invariants: every key a compile function asks for is removed from its table, so whatever remains
//! when the reader is done is reported as an unknown key; every error lands in one shared list, in
//! the order found, as `key.path: message`.

use std::fmt::Display;
use std::time::Duration;

use toml::{Table, Value};

pub(super) struct TableReader<'e> {
    /// Key path of this table (`""` for the document root, `listeners[1]`, `limits`, …).
    path: String,
    /// Keys not yet taken.
    table: Table,
    /// Every key the compile code asked for, present or not: candidates for "did you mean".
    asked: Vec<&'static str>,
    errors: &'e mut Vec<String>,
}

/// Compiles a whole document; `Err` holds every error found, `Ok` only if there were none.
pub(super) fn compile<T>(
    table: Table,
    compile: impl FnOnce(&mut TableReader<'_>) -> T,
) -> Result<T, Vec<String>> {
    let mut errors = Vec::new();
    let mut root = TableReader {
        path: String::new(),
        table,
        asked: Vec::new(),
        errors: &mut errors,
    };
    let out = compile(&mut root);
    root.finish();
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

impl TableReader<'_> {
    /// Key path of `key` in this table, e.g. `limits.max_errors`.
    pub(super) fn path_of(&self, key: &str) -> String {
        join(&self.path, key)
    }

    /// Records an error against `key` of this table (the key need not be present).
    pub(super) fn error(&mut self, key: &str, msg: impl Display) {
        let path = self.path_of(key);
        self.errors.push(format!("{path}: {msg}"));
    }

    pub(super) fn contains(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn take(&mut self, key: &'static str) -> Option<Value> {
        self.asked.push(key);
        self.table.remove(key)
    }

    /// Optional key. `None` if absent, or if `convert` refuses it (the error is recorded).
    pub(super) fn get<T>(
        &mut self,
        key: &'static str,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        let value = self.take(key)?;
        convert(&value).map_err(|e| self.error(key, e)).ok()
    }

    /// Like [`get`](Self::get), but absence is an error too.
    pub(super) fn require<T>(
        &mut self,
        key: &'static str,
        convert: impl FnOnce(&Value) -> Result<T, String>,
    ) -> Option<T> {
        if self.missing(key, "missing required key") {
            return None;
        }
        self.get(key, convert)
    }

    /// Records `msg` against `key` if it is absent; returns whether it was.
    fn missing(&mut self, key: &'static str, msg: &str) -> bool {
        let missing = !self.contains(key);
        if missing {
            self.asked.push(key);
            self.error(key, msg);
        }
        missing
    }

    /// Takes a key that must not be there (e.g. a plaintext password); returns whether it was.
    pub(super) fn reject(&mut self, key: &'static str, why: &str) -> bool {
        let present = self.take(key).is_some();
        if present {
            self.error(key, why);
        }
        present
    }

    /// Array of scalars, each converted on its own; a bad element is reported at `key[i]`.
    /// `None` if absent or if any element was refused, so `Some(empty)` really means empty.
    pub(super) fn list<T>(
        &mut self,
        key: &'static str,
        mut convert: impl FnMut(&Value) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        let items = match self.take(key)? {
            Value::Array(items) => items,
            other => {
                self.error(key, expected("an array", &other));
                return None;
            }
        };
        let mut out = Vec::with_capacity(items.len());
        let mut all_ok = true;
        for (i, item) in items.iter().enumerate() {
            match convert(item) {
                Ok(v) => out.push(v),
                Err(e) => {
                    all_ok = false;
                    let path = format!("{}[{i}]", self.path_of(key));
                    self.errors.push(format!("{path}: {e}"));
                }
            }
        }
        all_ok.then_some(out)
    }

    /// Like [`list`](Self::list), but absent or empty is an error.
    pub(super) fn require_list<T>(
        &mut self,
        key: &'static str,
        convert: impl FnMut(&Value) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        if self.missing(key, "missing required key") {
            return None;
        }
        let items = self.list(key, convert)?;
        if items.is_empty() {
            self.error(key, "must not be empty");
            return None;
        }
        Some(items)
    }

    /// Sub-table `[key]`. A missing table compiles as an empty one, so every key gets its default.
    pub(super) fn section<T>(
        &mut self,
        key: &'static str,
        compile: impl FnOnce(&mut TableReader<'_>) -> T,
    ) -> T {
        let table = self.take_table(key).unwrap_or_default();
        self.child(self.path_of(key), table, compile)
    }

    /// Sub-table `[key]` whose absence means "feature off": `None` if missing.
    pub(super) fn optional_section<T>(
        &mut self,
        key: &'static str,
        compile: impl FnOnce(&mut TableReader<'_>) -> T,
    ) -> Option<T> {
        let table = self.take_table(key)?;
        Some(self.child(self.path_of(key), table, compile))
    }

    /// Array of tables `[[key]]`; element `i` compiles with path `key[i]`. Missing means empty.
    pub(super) fn tables<T>(
        &mut self,
        key: &'static str,
        compile: impl FnMut(&mut TableReader<'_>) -> T,
    ) -> Vec<T> {
        self.tables_inner(key, compile, false)
    }

    /// Like [`tables`](Self::tables), but there must be at least one entry.
    pub(super) fn require_tables<T>(
        &mut self,
        key: &'static str,
        compile: impl FnMut(&mut TableReader<'_>) -> T,
    ) -> Vec<T> {
        self.tables_inner(key, compile, true)
    }

    fn tables_inner<T>(
        &mut self,
        key: &'static str,
        mut compile: impl FnMut(&mut TableReader<'_>) -> T,
        required: bool,
    ) -> Vec<T> {
        let at_least_one = format!("at least one [[{key}]] entry is required");
        if required && self.missing(key, &at_least_one) {
            return Vec::new();
        }
        let items = match self.take(key) {
            None => return Vec::new(),
            Some(Value::Array(items)) if required && items.is_empty() => {
                self.error(key, at_least_one);
                return Vec::new();
            }
            Some(Value::Array(items)) => items,
            Some(other) => {
                self.error(
                    key,
                    expected(&format!("an array of tables ([[{key}]])"), &other),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.into_iter().enumerate() {
            let path = format!("{}[{i}]", self.path_of(key));
            match item {
                Value::Table(table) => out.push(self.child(path, table, &mut compile)),
                other => self
                    .errors
                    .push(format!("{path}: {}", expected("a table", &other))),
            }
        }
        out
    }

    /// Takes `key` as a table; a value of another type is an error and reads as absent.
    fn take_table(&mut self, key: &'static str) -> Option<Table> {
        match self.take(key)? {
            Value::Table(table) => Some(table),
            other => {
                self.error(key, expected("a table", &other));
                None
            }
        }
    }

    fn child<T>(
        &mut self,
        path: String,
        table: Table,
        compile: impl FnOnce(&mut TableReader<'_>) -> T,
    ) -> T {
        let mut child = TableReader {
            path,
            table,
            asked: Vec::new(),
            errors: &mut *self.errors,
        };
        let out = compile(&mut child);
        child.finish();
        out
    }

    /// Reports every key nobody asked for, with a hint when it looks like a typo of one that was.
    fn finish(self) {
        for key in self.table.keys() {
            let path = join(&self.path, key);
            match closest(key, &self.asked) {
                Some(known) => self
                    .errors
                    .push(format!("{path}: unknown key (did you mean `{known}`?)")),
                None => self.errors.push(format!("{path}: unknown key")),
            }
        }
    }
}

/// `parent.key`, quoting `key` when it is not a TOML bare key so the path stays unambiguous.
fn join(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    let key = if bare {
        key.to_owned()
    } else {
        format!("{key:?}")
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

/// The asked-for key within two edits of `key`, if any (and not so short that everything is close).
fn closest(key: &str, asked: &[&'static str]) -> Option<&'static str> {
    asked
        .iter()
        .map(|&known| (edit_distance(key, known), known))
        .filter(|&(d, known)| d <= 2 && d < known.len() / 2)
        .min()
        .map(|(_, known)| known)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, &cb) in b.iter().enumerate() {
            let substitute = prev[j] + usize::from(ca != cb);
            cur.push(substitute.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

fn expected(what: &str, found: &Value) -> String {
    format!("expected {what}, found {}", found.type_str())
}

// Converters for `get`/`require`/`list`: each checks one value and explains a refusal.

pub(super) fn string(v: &Value) -> Result<&str, String> {
    v.as_str().ok_or_else(|| expected("a string", v))
}

/// A non-negative integer.
pub(super) fn count(v: &Value) -> Result<usize, String> {
    let n = v.as_integer().ok_or_else(|| expected("an integer", v))?;
    usize::try_from(n).map_err(|_| format!("must not be negative, found {n}"))
}

/// Refuses zero (for limits and timeouts, where zero would mean "nothing ever works").
pub(super) fn nonzero<T: Default + PartialEq>(x: T) -> Result<T, String> {
    if x == T::default() {
        Err("must be greater than 0".to_owned())
    } else {
        Ok(x)
    }
}

/// A byte size: an integer number of bytes, or a string with a unit. KB/MB/GB are powers of
/// 1000, KiB/MiB/GiB powers of 1024; units are case-insensitive.
pub(super) fn size(v: &Value) -> Result<u64, String> {
    match v {
        Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| format!("must not be negative, found {n}"))
        }
        Value::String(s) => parse_size(s),
        other => Err(expected(
            "a size (integer bytes or a string like \"50MiB\")",
            other,
        )),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let invalid = || {
        format!(
            "invalid size {s:?} (expected a whole number with an optional unit B, KB, MB, GB, KiB, MiB or GiB, e.g. \"50MiB\")"
        )
    };
    let (number, unit) = split_number(s.trim());
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        _ => return Err(invalid()),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// A duration: a string with a unit, ms, s, m, h or d ("300s", "5m"). Bare integers are refused
/// because whether they mean seconds or milliseconds is exactly the kind of guess that bites.
pub(super) fn duration(v: &Value) -> Result<Duration, String> {
    let s = v
        .as_str()
        .ok_or_else(|| expected("a duration string like \"30s\", \"5m\" or \"1h\"", v))?;
    let invalid = || {
        format!("invalid duration {s:?} (expected a whole number with a unit ms, s, m, h or d, e.g. \"30s\" or \"5m\")")
    };
    let (number, unit) = split_number(s.trim());
    let n: u64 = number.parse().map_err(|_| invalid())?;
    let too_large = || format!("duration {s:?} is too large");
    match unit.trim() {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => n
            .checked_mul(60)
            .map(Duration::from_secs)
            .ok_or_else(too_large),
        "h" => n
            .checked_mul(3_600)
            .map(Duration::from_secs)
            .ok_or_else(too_large),
        "d" => n
            .checked_mul(86_400)
            .map(Duration::from_secs)
            .ok_or_else(too_large),
        _ => Err(invalid()),
    }
}

/// Splits leading ASCII digits from the rest: `"50MiB"` -> `("50", "MiB")`.
fn split_number(s: &str) -> (&str, &str) {
    s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &str) -> Value {
        Value::String(text.to_owned())
    }

    #[test]
    fn sizes() {
        assert_eq!(size(&Value::Integer(1234)), Ok(1234));
        assert_eq!(size(&s("512KB")), Ok(512_000));
        assert_eq!(size(&s("10MiB")), Ok(10 << 20));
        assert_eq!(size(&s("50 mb")), Ok(50_000_000));
        assert_eq!(size(&s("7")), Ok(7));
        assert!(size(&Value::Integer(-1)).unwrap_err().contains("negative"));
        assert!(size(&s("5 parsecs"))
            .unwrap_err()
            .starts_with("invalid size \"5 parsecs\""));
        assert!(size(&s("1.5MB")).is_err());
        assert!(size(&s("99999999999GiB"))
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn durations() {
        assert_eq!(duration(&s("300s")), Ok(Duration::from_secs(300)));
        assert_eq!(duration(&s("5m")), Ok(Duration::from_secs(300)));
        assert_eq!(duration(&s("1h")), Ok(Duration::from_secs(3600)));
        assert_eq!(duration(&s("5d")), Ok(Duration::from_secs(5 * 86_400)));
        assert_eq!(duration(&s("250ms")), Ok(Duration::from_millis(250)));
        assert!(duration(&Value::Integer(30))
            .unwrap_err()
            .contains("found integer"));
        assert!(duration(&s("5 minutes"))
            .unwrap_err()
            .starts_with("invalid duration"));
        assert!(duration(&s("m")).is_err());
    }

    #[test]
    fn typo_hint() {
        assert_eq!(
            closest("max_eror", &["max_errors", "max_recipients"]),
            Some("max_errors")
        );
        assert_eq!(closest("zzz", &["key", "cert"]), None);
    }

    #[test]
    fn paths_quote_non_bare_keys() {
        assert_eq!(join("", "limits"), "limits");
        assert_eq!(join("limits", "a b"), "limits.\"a b\"");
    }
}
