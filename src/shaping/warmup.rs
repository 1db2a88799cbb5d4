//! Warm-up caps: how many messages one source address may send to one provider today.
//!
//! Day N of an address is the number of days since its `warmup_start`, counted in the
//! configured time zone (days roll over at local midnight); its cap is `curve[N]`, and after
//! the curve's end the address is warm (no cap). Before its start date an address is on day 0.
//!
//! Counters are persisted in the spool's meta keyspace (`warmup/<source>/<provider>` ->
//! `"<date> <count>"`). To stay exact without a spool write per message, counts are reserved
//! in blocks: "reserved up to N" is durable before message N is sent, so after a crash the
//! counter resumes from the reservation (never over the cap, possibly a little under); a clean
//! shutdown ([`WarmCounter::flush`]) writes the exact count.
//!
//! With the cluster store ([`super::shared`]) the cap is the cluster's: each message also
//! needs a place reserved (in blocks) in the store's counter for the day, and the local
//! count (still persisted) is this node's part of it. While the store is unreachable this
//! node may send its share of the cap, `cap / node_count` (at least 1), counting what it
//! already sent today.

use super::shared::SharedStore;
use jiff::civil::Date;
use jiff::tz::TimeZone;
use std::sync::Arc;
use tern_queue::Spool;
use tracing::warn;

/// Reservations cover a tenth of the day's cap, between 1 and 100 messages.
fn block(cap: u64) -> u64 {
    (cap / 10).clamp(1, 100)
}

/// The calendar: time zone and curve.
pub struct Calendar {
    tz: TimeZone,
    curve: Vec<u64>,
}

impl Calendar {
    pub fn new(tz: &str, curve: Vec<u64>) -> Calendar {
        Calendar {
            // The config reader checked the name.
            tz: TimeZone::get(tz).unwrap_or(TimeZone::UTC),
            curve,
        }
    }

    /// The local date at `ms` (unix milliseconds).
    pub fn date(&self, ms: u64) -> Date {
        jiff::Timestamp::from_millisecond(ms as i64)
            .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
            .to_zoned(self.tz.clone())
            .date()
    }

    /// Unix milliseconds of the next local midnight after `ms`.
    pub fn next_midnight_ms(&self, ms: u64) -> u64 {
        let tomorrow = self.date(ms).tomorrow().unwrap_or(self.date(ms));
        tomorrow
            .to_zoned(self.tz.clone())
            .map(|z| z.timestamp().as_millisecond() as u64)
            .unwrap_or(ms + 86_400_000)
    }

    /// (day index, cap) for an address that started on `start`; cap `None` once warm.
    pub fn cap(&self, start: Date, today: Date) -> (i64, Option<u64>) {
        let day = start
            .until(today)
            .map(|s| s.get_days() as i64)
            .unwrap_or(0)
            .max(0);
        (day, self.curve.get(day as usize).copied())
    }
}

/// What [`WarmCounter::take`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Counted (or no cap today).
    Sent,
    /// Today's cap is used up until this time (unix ms).
    CappedUntil(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct WarmState {
    pub day: i64,
    pub cap: Option<u64>,
    pub sent_today: u64,
}

#[derive(Default)]
struct Count {
    date: Date,
    sent: u64,
    reserved: u64,
    /// Places reserved in the cluster store and not used yet.
    remote_left: u64,
    /// The cluster store said today's cap is used up.
    cluster_capped: bool,
}

/// The counter of one (source, provider).
pub struct WarmCounter {
    name: String,
    start: Date,
    calendar: Arc<Calendar>,
    spool: Spool,
    shared: Option<Arc<SharedStore>>,
    count: tokio::sync::Mutex<Count>,
}

impl WarmCounter {
    /// Loads the persisted count (a reservation after a crash, exact after a clean stop).
    pub fn load(
        spool: Spool,
        calendar: Arc<Calendar>,
        source: &str,
        provider: &str,
        start: Date,
        now_ms: u64,
        shared: Option<Arc<SharedStore>>,
    ) -> WarmCounter {
        let name = format!("warmup/{source}/{provider}");
        let today = calendar.date(now_ms);
        let stored = spool
            .get_meta(&name)
            .unwrap_or_else(|err| {
                warn!(name, error = %err, "cannot read warm-up counter; starting from 0");
                None
            })
            .and_then(|v| {
                let text = String::from_utf8(v).ok()?;
                let (date, n) = text.split_once(' ')?;
                Some((date.parse::<Date>().ok()?, n.parse::<u64>().ok()?))
            });
        let sent = match stored {
            Some((date, n)) if date == today => n,
            _ => 0,
        };
        WarmCounter {
            name,
            start,
            calendar,
            spool,
            shared,
            count: tokio::sync::Mutex::new(Count {
                date: today,
                sent,
                reserved: sent,
                ..Count::default()
            }),
        }
    }

    /// Counts one message if today's cap allows it.
    pub async fn take(&self, now_ms: u64) -> Take {
        let mut count = self.count.lock().await;
        let today = self.calendar.date(now_ms);
        if count.date != today {
            *count = Count {
                date: today,
                ..Count::default()
            };
        }
        let (_, cap) = self.calendar.cap(self.start, today);
        let Some(cap) = cap else {
            return Take::Sent;
        };
        let capped = Take::CappedUntil(self.calendar.next_midnight_ms(now_ms));
        let mut limit = cap;
        if let Some(store) = &self.shared {
            if count.remote_left == 0 && !count.cluster_capped {
                let date = today.to_string();
                if let Some(got) = store
                    .reserve_warmup(&self.name, &date, cap, block(cap))
                    .await
                {
                    count.remote_left = got;
                    count.cluster_capped = got == 0;
                }
            }
            if count.cluster_capped {
                return capped;
            }
            if count.remote_left > 0 {
                count.remote_left -= 1;
            } else {
                limit = self.share(cap);
            }
        }
        if count.sent >= limit {
            return capped;
        }
        if count.sent >= count.reserved {
            let reserved = (count.sent + block(cap)).min(cap);
            let value = format!("{today} {reserved}").into_bytes();
            if let Err(err) = self.spool.put_meta(&self.name, value).await {
                // Without a durable reservation a crash could exceed the cap: wait instead.
                warn!(name = %self.name, error = %err, "cannot reserve warm-up count");
                return Take::CappedUntil(now_ms + 60_000);
            }
            count.reserved = reserved;
        }
        count.sent += 1;
        Take::Sent
    }

    /// Whether today's cap is used up (without counting anything).
    pub fn capped(&self, now_ms: u64) -> bool {
        let Ok(count) = self.count.try_lock() else {
            return false;
        };
        let today = self.calendar.date(now_ms);
        let (_, cap) = self.calendar.cap(self.start, today);
        count.date == today
            && count.remote_left == 0
            && cap.is_some_and(|cap| {
                count.cluster_capped
                    || count.sent >= self.shared.as_ref().map_or(cap, |_| self.share(cap))
            })
    }

    /// What this node may send of `cap` today without asking the store: all of it while the
    /// store is up (which then counts), its share while the store is unreachable.
    fn share(&self, cap: u64) -> u64 {
        match &self.shared {
            Some(store) if !store.is_up() => (cap / u64::from(store.node_count())).max(1),
            _ => cap,
        }
    }

    pub fn state(&self, now_ms: u64) -> WarmState {
        let today = self.calendar.date(now_ms);
        let (day, cap) = self.calendar.cap(self.start, today);
        let sent_today = match self.count.try_lock() {
            Ok(c) if c.date == today => c.sent,
            Ok(_) => 0,
            // Being counted right now; the reservation bounds it.
            Err(_) => 0,
        };
        WarmState {
            day,
            cap,
            sent_today,
        }
    }

    /// Writes the exact count (clean shutdown).
    pub async fn flush(&self) {
        let count = self.count.lock().await;
        if count.reserved == count.sent {
            return;
        }
        let value = format!("{} {}", count.date, count.sent).into_bytes();
        if let Err(err) = self.spool.put_meta(&self.name, value).await {
            warn!(name = %self.name, error = %err, "cannot write warm-up count");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_roll_over_at_local_midnight() {
        let cal = Calendar::new("Europe/Berlin", vec![10, 20]);
        // 2025-03-01 23:30 UTC is already March 2 in Berlin (UTC+1).
        let ms = jiff::Timestamp::from_second(1_740_871_800)
            .unwrap()
            .as_millisecond() as u64;
        assert_eq!(
            cal.date(ms),
            jiff::civil::date(2025, 3, 1).tomorrow().unwrap()
        );
        let midnight = cal.next_midnight_ms(ms);
        assert_eq!(cal.date(midnight), jiff::civil::date(2025, 3, 3));
        assert_eq!(cal.date(midnight - 1), jiff::civil::date(2025, 3, 2));
        let start = jiff::civil::date(2025, 3, 1);
        assert_eq!(cal.cap(start, jiff::civil::date(2025, 2, 1)), (0, Some(10)));
        assert_eq!(cal.cap(start, jiff::civil::date(2025, 3, 2)), (1, Some(20)));
        assert_eq!(cal.cap(start, jiff::civil::date(2025, 3, 3)), (2, None));
    }

    #[tokio::test]
    async fn reservations_survive_a_crash_and_a_clean_stop_is_exact() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let cal = Arc::new(Calendar::new("UTC", vec![50]));
        let now = crate::clock::now_ms();
        let start = cal.date(now);
        let counter = WarmCounter::load(spool.clone(), cal.clone(), "s", "p", start, now, None);
        for _ in 0..7 {
            assert_eq!(counter.take(now).await, Take::Sent);
        }
        // A crash: the reservation (one block of 5, then another) is what a restart sees.
        let crashed = WarmCounter::load(spool.clone(), cal.clone(), "s", "p", start, now, None);
        assert_eq!(crashed.state(now).sent_today, 10);
        counter.flush().await;
        let clean = WarmCounter::load(spool.clone(), cal.clone(), "s", "p", start, now, None);
        assert_eq!(clean.state(now).sent_today, 7);
        for _ in 7..50 {
            assert_eq!(clean.take(now).await, Take::Sent);
        }
        assert_eq!(
            clean.take(now).await,
            Take::CappedUntil(cal.next_midnight_ms(now))
        );
        assert!(clean.capped(now));
        assert_eq!(
            clean.take(cal.next_midnight_ms(now)).await,
            Take::Sent,
            "a new day"
        );
    }
}
