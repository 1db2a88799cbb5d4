//! Message ids: time-ordered, unique 64-bit identifiers.
//!
//! Layout: `micros_since_unix_epoch << 8 | sequence`. The low 8 bits let 256
//! ids share one microsecond; beyond that the generator simply borrows from
//! the next microsecond, which keeps ids unique at the cost of running a hair
//! ahead of the clock under extreme load.
//!
//! Invariants:
//! - one `IdGenerator` never returns the same id twice and its ids strictly
//!   increase, even if the wall clock steps backwards;
//! - the spool seeds its generator with the largest id it holds, so the same
//!   holds across restarts as long as a message with that id is still spooled;
//! - the big-endian byte form sorts like the number, so sled key order is
//!   creation order.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Bits reserved for the per-microsecond sequence.
const SEQ_BITS: u32 = 8;

/// A spooled message's id. Shown as 16 uppercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MessageId(u64);

impl MessageId {
    /// Unix time in milliseconds at which this id was generated.
    pub fn created_ms(self) -> u64 {
        (self.0 >> SEQ_BITS) / 1000
    }

    pub(crate) fn to_be_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    pub(crate) fn from_be_bytes(bytes: [u8; 8]) -> Self {
        MessageId(u64::from_be_bytes(bytes))
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

// Debug shows the same hex as Display: ids appear in logs and assertion
// output, where the decimal form would be useless for grepping.
impl fmt::Debug for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MessageId({self})")
    }
}

/// Error for a string that is not 16 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message id {0:?}: expected 16 hex digits")]
pub struct ParseMessageIdError(String);

impl FromStr for MessageId {
    type Err = ParseMessageIdError;

    /// Accepts exactly 16 hex digits, either case (operators may type the id
    /// in lowercase); `from_str_radix` alone would also accept a sign.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseMessageIdError(s.to_string()));
        }
        u64::from_str_radix(s, 16)
            .map(MessageId)
            .map_err(|_| ParseMessageIdError(s.to_string()))
    }
}

impl Serialize for MessageId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MessageId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // A visitor rather than `String::deserialize`: the hex digits are
        // parsed where they lie, without allocating (recovery decodes two ids
        // per envelope for every spooled message).
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = MessageId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a message id of 16 hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<MessageId, E> {
                s.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Hex)
    }
}

/// Hands out strictly increasing `MessageId`s; lock-free and shareable.
#[derive(Debug)]
pub struct IdGenerator {
    last: AtomicU64,
}

impl IdGenerator {
    /// A generator whose ids are all greater than `floor` (the largest id
    /// already in use, or `None` for an empty spool).
    pub fn new(floor: Option<MessageId>) -> Self {
        IdGenerator {
            last: AtomicU64::new(floor.map_or(0, |id| id.0)),
        }
    }

    /// The largest id handed out (or the floor it started from), if any.
    pub(crate) fn last(&self) -> Option<MessageId> {
        match self.last.load(Ordering::Relaxed) {
            0 => None,
            last => Some(MessageId(last)),
        }
    }

    /// Makes every later id greater than `floor` too (the spool raises a
    /// generator that started before it knew its largest id).
    pub(crate) fn raise(&self, floor: Option<MessageId>) {
        if let Some(floor) = floor {
            self.last.fetch_max(floor.0, Ordering::Relaxed);
        }
    }

    /// The next id for the current wall-clock time.
    pub fn next(&self) -> MessageId {
        // A clock before 1970 is a broken host; treating it as 0 still yields
        // unique, increasing ids thanks to `max(last + 1, ..)`.
        let now_us = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| {
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX >> SEQ_BITS)
        });
        self.next_at(now_us)
    }

    /// `max(last + 1, now_us << 8)`, published atomically. Taking the time as
    /// a parameter lets tests step the clock backwards.
    pub(crate) fn next_at(&self, now_us: u64) -> MessageId {
        let from_clock = now_us << SEQ_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let candidate = from_clock.max(last + 1);
            match self.last.compare_exchange_weak(
                last,
                candidate,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return MessageId(candidate),
                Err(actual) => last = actual,
            }
        }
    }
}

#[cfg(test)]
pub(crate) fn id_at(now_us: u64, seq: u8) -> MessageId {
    MessageId((now_us << SEQ_BITS) | u64::from(seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Arc;

    #[test]
    fn hex_round_trip_and_format() {
        let id = MessageId(0x0006_123A_BCDE_F012);
        assert_eq!(id.to_string(), "0006123ABCDEF012");
        assert_eq!("0006123ABCDEF012".parse::<MessageId>(), Ok(id));
        assert_eq!("0006123abcdef012".parse::<MessageId>(), Ok(id));
        assert!("6123ABCDEF012".parse::<MessageId>().is_err());
        assert!("+006123ABCDEF012".parse::<MessageId>().is_err());
        assert!("0006123ABCDEF01G".parse::<MessageId>().is_err());
        assert_eq!(MessageId::from_be_bytes(id.to_be_bytes()), id);
    }

    #[test]
    fn serde_is_the_hex_string() {
        let id = MessageId(0x0006_123A_BCDE_F012);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, "\"0006123ABCDEF012\"");
        assert_eq!(serde_json::from_str::<MessageId>(&json).unwrap(), id);
        assert!(serde_json::from_str::<MessageId>("\"xyz\"").is_err());
    }

    #[test]
    fn embeds_creation_time() {
        let gen = IdGenerator::new(None);
        let id = gen.next_at(1_700_000_000_123_456);
        assert_eq!(id.created_ms(), 1_700_000_000_123);
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let id = gen.next();
        let after = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!((before..=after).contains(&id.created_ms()));
    }

    #[test]
    fn byte_order_is_numeric_order() {
        let gen = IdGenerator::new(None);
        let ids: Vec<MessageId> = (0..1000).map(|i| gen.next_at(1_000_000 + i / 3)).collect();
        for pair in ids.windows(2) {
            assert!(pair[0] < pair[1]);
            assert!(pair[0].to_be_bytes() < pair[1].to_be_bytes());
        }
    }

    #[test]
    fn monotonic_when_clock_steps_back() {
        let gen = IdGenerator::new(None);
        let a = gen.next_at(5_000_000);
        let b = gen.next_at(4_000_000);
        let c = gen.next_at(4_000_001);
        assert!(a < b && b < c, "{a} {b} {c}");
        // the seed acts as a floor too
        let seeded = IdGenerator::new(Some(c));
        assert!(seeded.next_at(1) > c);
    }

    #[test]
    fn unique_and_increasing_across_threads() {
        let gen = Arc::new(IdGenerator::new(None));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let gen = Arc::clone(&gen);
                std::thread::spawn(move || {
                    let ids: Vec<MessageId> = (0..20_000).map(|_| gen.next()).collect();
                    // each thread sees its own ids strictly increase
                    assert!(ids.windows(2).all(|w| w[0] < w[1]));
                    ids
                })
            })
            .collect();
        let mut all = HashSet::new();
        for h in handles {
            for id in h.join().unwrap() {
                assert!(all.insert(id), "duplicate id {id}");
            }
        }
        assert_eq!(all.len(), 80_000);
    }
}
