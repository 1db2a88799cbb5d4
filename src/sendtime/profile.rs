//! One recipient's engagement history, compact and decayed: what the model learns from.
//!
//! Per hour-of-week slot (168, Monday 00:00 = 0, in the recipient's local time) three decayed
//! counts: sends, the *exposure* those sends created (how visible a message still was in each
//! later hour: a send adds `visibility(k)` to the slot k hours on, for 72 hours), and human
//! engagements (opens and clicks, by the hour they happened). Plus a decayed engagement total
//! and the last engagement and send times for the score.
//!
//! Invariants:
//! - Counts are stored as of `updated_ms`; every update first decays them to the event's time
//!   (half-life [`HALF_LIFE_MS`]), so raw events are never kept. An event older than
//!   `updated_ms` is added with its own decay weight instead, so out-of-order events count
//!   as much as in-order ones.
//! - Machine opens never reach a profile (the caller filters them).
//! - The encoding is versioned ([`VERSION`]); an unknown version reads as "no history".
//!   Version 1 (without `first_ms`) still reads, with the last send standing in for it;
//!   versions 1 and 2 (without the engagement model's and the lifecycle's fields) read with
//!   those empty; version 3 (without the sends awaiting delivery) reads with none awaited.
//! - A send tern planned is recorded when it is delivered, at the delivery time (the plan
//!   only queues its arm in [`Profile::awaiting`]); a planned send that bounces or expires is
//!   never recorded as a send.
//! - [`Profile::snapshot`] holds the engagement model's features as they were just before the
//!   latest send, and [`Profile::last_send_opened`] whether a human engagement followed it
//!   within [`HORIZON_H`]: one honest (features, outcome) pair per recipient for the refit
//!   ([`super::engagement`]), never features that already saw the outcome.

/// Hour-of-week slots.
pub const SLOTS: usize = 168;
/// Hours after a send during which it can still be opened (the exposure kernel's length).
pub const HORIZON_H: usize = 72;
/// How fast a message gets buried in the inbox: visibility after k hours is exp(-k/τ).
pub const BURIAL_TAU_H: f64 = 6.0;
/// Counts lose half their weight in this time (about 90 days).
pub const HALF_LIFE_MS: u64 = 90 * 86_400_000;
const HOUR_MS: i64 = 3_600_000;
/// Opens this soon after a send are not taken as a sign of when the recipient reads: privacy
/// proxies that do not say so prefetch within minutes of delivery (15 rather than 10: on the
/// simulator, whose unflagged prefetches land 0-14 minutes after delivery, 10 let a third of
/// them through as reads at the sender's hour, and lost 1-2 points of the oracle's gap).
pub const MACHINE_SUSPECT_MS: u64 = 15 * 60_000;
const VERSION: u8 = 4;
/// Planned sends awaiting delivery kept at most (the oldest is forgotten past it: a send
/// that never reports back must not hold a slot for ever).
pub const MAX_AWAITING: usize = 8;
/// Bytes of a version-1 record (version 2 adds `first_ms`, 8 bytes).
#[cfg(test)]
const V1_LEN: usize = 2 + 4 + 3 * 8 + 4 + 4 + 2 + 4 * 4 + SLOTS * 12;

/// Visibility of a message k hours after it was sent (the mid-hour value).
pub fn visibility(k: usize) -> f64 {
    (-(k as f64 + 0.5) / BURIAL_TAU_H).exp()
}

/// Hour-of-week (Monday 00:00 = 0) of unix ms `t_ms` at UTC offset `offset_min`.
pub fn hour_of_week(t_ms: u64, offset_min: i32) -> usize {
    let local_h = (t_ms as i64 + offset_min as i64 * 60_000).div_euclid(HOUR_MS);
    // 1970-01-01 00:00 UTC was a Thursday: hour 72 of its week.
    (local_h + 72).rem_euclid(SLOTS as i64) as usize
}

#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// UTC offset of the recipient's local time, as last reported; `None`: unknown (slots
    /// are then UTC hours).
    pub tz_offset_min: Option<i32>,
    /// Unix ms the counts are decayed to.
    pub updated_ms: u64,
    /// Unix ms of the earliest event recorded (when a never-engaged recipient's dormancy
    /// starts); 0 without any.
    pub first_ms: u64,
    pub sends: [f32; SLOTS],
    pub exposure: [f32; SLOTS],
    pub engagements: [f32; SLOTS],
    /// Decayed count of human engagements (the frequency part of the score).
    pub engagement_total: f32,
    pub last_engaged_ms: u64,
    pub last_send_ms: u64,
    /// Machine opens seen (not decayed; never used by the model, reported only).
    pub machine_opens: u32,
    /// The send at `last_send_ms` was engaged with already (its exposure is cut there).
    pub last_send_engaged: bool,
    /// Which arm the latest planned send was in, for lift measurement.
    pub last_send_arm: Option<Arm>,
    /// Planned sends and those engaged with (within 72 h), per arm: `[control, model]`.
    pub arm_sends: [u32; 2],
    pub arm_engaged: [u32; 2],
    /// Sends since the last human engagement (all sends when never engaged).
    pub sends_since_engaged: u32,
    /// Raw counts for the recipients API's history (not decayed; opens and clicks are the
    /// human ones).
    pub send_count: u32,
    pub open_count: u32,
    pub click_count: u32,
    pub last_click_ms: u64,
    /// The engagement model's features just before the latest send (see the module doc).
    pub snapshot: Option<super::engagement::Features>,
    /// A human engagement came within [`HORIZON_H`] of the latest send.
    pub last_send_opened: bool,
    /// The re-engagement lifecycle's record (see [`super::lifecycle`]).
    pub winback: super::lifecycle::WinBack,
    /// Sends tern planned and has not seen delivered or failed yet, oldest first, with their
    /// arm: a send is recorded at its delivery ([`Profile::record_delivery`]), not when
    /// planned (at most [`MAX_AWAITING`]; version 4).
    pub awaiting: Vec<Arm>,
}

/// The two arms of the send-time experiment: sent at once (control) or when the model chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arm {
    Control = 0,
    Model = 1,
}

impl Default for Profile {
    fn default() -> Self {
        Profile {
            tz_offset_min: None,
            updated_ms: 0,
            first_ms: 0,
            sends: [0.0; SLOTS],
            exposure: [0.0; SLOTS],
            engagements: [0.0; SLOTS],
            engagement_total: 0.0,
            last_engaged_ms: 0,
            last_send_ms: 0,
            machine_opens: 0,
            last_send_engaged: false,
            last_send_arm: None,
            arm_sends: [0; 2],
            arm_engaged: [0; 2],
            sends_since_engaged: 0,
            send_count: 0,
            open_count: 0,
            click_count: 0,
            last_click_ms: 0,
            snapshot: None,
            last_send_opened: false,
            winback: Default::default(),
            awaiting: Vec::new(),
        }
    }
}

fn decay(dt_ms: u64) -> f32 {
    0.5f64.powf(dt_ms as f64 / HALF_LIFE_MS as f64) as f32
}

impl Profile {
    fn offset(&self) -> i32 {
        self.tz_offset_min.unwrap_or(0)
    }

    /// Decays the counts to `t_ms` if it is later; returns the weight an event at `t_ms`
    /// gets (1, or less for an event older than the counts).
    fn advance(&mut self, t_ms: u64) -> f32 {
        if self.first_ms == 0 || t_ms < self.first_ms {
            self.first_ms = t_ms;
        }
        if t_ms <= self.updated_ms {
            return decay(self.updated_ms - t_ms);
        }
        if self.updated_ms > 0 {
            let f = decay(t_ms - self.updated_ms);
            for a in [&mut self.sends, &mut self.exposure, &mut self.engagements] {
                a.iter_mut().for_each(|x| *x *= f);
            }
            self.engagement_total *= f;
        }
        self.updated_ms = t_ms;
        1.0
    }

    /// A message was sent (or is scheduled) at `t_ms`.
    pub fn record_send(&mut self, t_ms: u64) {
        if t_ms >= self.last_send_ms {
            // Features as of just before this send, for the engagement model's next refit.
            self.snapshot = Some(super::engagement::features(self, t_ms));
            self.last_send_opened = false;
        }
        self.sends_since_engaged = self.sends_since_engaged.saturating_add(1);
        self.send_count = self.send_count.saturating_add(1);
        let w = self.advance(t_ms);
        let s = hour_of_week(t_ms, self.offset());
        self.sends[s] += w;
        for k in 0..HORIZON_H {
            self.exposure[(s + k) % SLOTS] += w * visibility(k) as f32;
        }
        if t_ms >= self.last_send_ms {
            self.last_send_ms = t_ms;
            self.last_send_engaged = false;
            self.last_send_arm = None;
        }
    }

    /// A send tern planned itself at `t_ms`, in `arm` of the experiment.
    pub fn record_planned_send(&mut self, t_ms: u64, arm: Arm) {
        self.record_send(t_ms);
        self.arm_sends[arm as usize] = self.arm_sends[arm as usize].saturating_add(1);
        if self.last_send_ms == t_ms {
            self.last_send_arm = Some(arm);
        }
    }

    /// A send tern planned (in `arm`) is on its way: it is recorded when delivered.
    pub fn await_delivery(&mut self, arm: Arm) {
        if self.awaiting.len() >= MAX_AWAITING {
            self.awaiting.remove(0);
        }
        self.awaiting.push(arm);
    }

    /// A message reached the recipient's server at `t_ms`: the oldest planned send awaiting
    /// delivery is recorded then, in its arm. False (nothing changes) when tern planned none:
    /// mail sent at once without a plan is not the model's to learn from here.
    pub fn record_delivery(&mut self, t_ms: u64) -> bool {
        if self.awaiting.is_empty() {
            return false;
        }
        let arm = self.awaiting.remove(0);
        self.record_planned_send(t_ms, arm);
        true
    }

    /// A planned send failed for good (bounced or expired): it is no send; false when none
    /// was awaited.
    pub fn record_failure(&mut self) -> bool {
        if self.awaiting.is_empty() {
            return false;
        }
        self.awaiting.remove(0);
        true
    }

    /// A human open or click at `t_ms`.
    ///
    /// The first engagement after the latest send ends that send's exposure: a message that
    /// was opened cannot be opened for the first time later, so the hours after it must not
    /// count as hours the recipient saw mail and ignored it. An open within
    /// [`MACHINE_SUSPECT_MS`] of the send counts for the score and the experiment's arm but
    /// neither for the hours nor as the send's first open: that is when unflagged
    /// privacy-proxy prefetches land, and they say nothing about when the recipient reads
    /// (nor that the recipient has seen the message).
    pub fn record_engagement(&mut self, t_ms: u64) {
        let w = self.advance(t_ms);
        let since_send = t_ms.checked_sub(self.last_send_ms);
        let in_horizon = since_send.is_some_and(|d| d < HORIZON_H as u64 * HOUR_MS as u64)
            && self.last_send_ms > 0;
        let suspect = since_send.is_some_and(|d| d < MACHINE_SUSPECT_MS);
        if in_horizon {
            self.last_send_opened = true;
        }
        if t_ms >= self.last_send_ms {
            self.sends_since_engaged = 0;
        }
        self.open_count = self.open_count.saturating_add(1);
        if in_horizon {
            // The experiment credits the first engagement of any kind, once.
            if let Some(arm) = self.last_send_arm.take() {
                self.arm_engaged[arm as usize] = self.arm_engaged[arm as usize].saturating_add(1);
            }
        }
        if in_horizon && !suspect && !self.last_send_engaged {
            self.last_send_engaged = true;
            let s = hour_of_week(self.last_send_ms, self.offset());
            let sw = decay(self.updated_ms - self.last_send_ms);
            let opened_k = (since_send.unwrap_or(0) / HOUR_MS as u64) as usize;
            for k in opened_k + 1..HORIZON_H {
                let e = &mut self.exposure[(s + k) % SLOTS];
                *e = (*e - sw * visibility(k) as f32).max(0.0);
            }
        }
        if !suspect {
            self.engagements[hour_of_week(t_ms, self.offset())] += w;
        }
        self.engagement_total += w;
        self.last_engaged_ms = self.last_engaged_ms.max(t_ms);
    }

    /// A human click at `t_ms`: an engagement ([`Profile::record_engagement`]) counted as a
    /// click, not an open, in the history.
    pub fn record_click(&mut self, t_ms: u64) {
        self.record_engagement(t_ms);
        self.open_count = self.open_count.saturating_sub(1);
        self.click_count = self.click_count.saturating_add(1);
        self.last_click_ms = self.last_click_ms.max(t_ms);
    }

    /// The decayed engagement total as of `t_ms` (not before the counts' time).
    pub fn engagement_total_at(&self, t_ms: u64) -> f64 {
        self.engagement_total as f64 * decay(t_ms.saturating_sub(self.updated_ms)) as f64
    }

    /// The decayed send total as of `t_ms`.
    pub fn sends_at(&self, t_ms: u64) -> f64 {
        self.total_sends() * decay(t_ms.saturating_sub(self.updated_ms)) as f64
    }

    pub fn total_sends(&self) -> f64 {
        self.sends.iter().map(|&x| x as f64).sum()
    }

    pub fn total_exposure(&self) -> f64 {
        self.exposure.iter().map(|&x| x as f64).sum()
    }

    pub fn total_engagements(&self) -> f64 {
        self.engagements.iter().map(|&x| x as f64).sum()
    }

    /// Whether anything was ever recorded.
    pub fn has_history(&self) -> bool {
        self.updated_ms > 0
    }

    /// When the recipient's current dormancy started: their last human engagement, or,
    /// never engaged, their first record (mail they never engaged with does not make them
    /// less dormant).
    pub fn dormant_since(&self) -> u64 {
        if self.last_engaged_ms > 0 {
            self.last_engaged_ms
        } else {
            self.first_ms
        }
    }

    /// Engagement score in [0, 100] at `now_ms`: frequency (decayed engagements, saturating)
    /// times recency (halved every 30 days since the last human engagement). 0 without any.
    pub fn score(&self, now_ms: u64) -> f64 {
        if self.last_engaged_ms == 0 {
            return 0.0;
        }
        let freq =
            self.engagement_total as f64 * decay(now_ms.saturating_sub(self.updated_ms)) as f64;
        let days = now_ms.saturating_sub(self.last_engaged_ms) as f64 / 86_400_000.0;
        let recency = 0.5f64.powf(days / 30.0);
        (100.0 * (1.0 - (-freq / 3.0).exp()) * recency).clamp(0.0, 100.0)
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + 8 * 4 + SLOTS * 12);
        out.push(VERSION);
        match self.tz_offset_min {
            Some(o) => {
                out.push(1);
                out.extend_from_slice(&o.to_le_bytes());
            }
            None => {
                out.push(0);
                out.extend_from_slice(&0i32.to_le_bytes());
            }
        }
        for v in [self.updated_ms, self.last_engaged_ms, self.last_send_ms] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.engagement_total.to_le_bytes());
        out.extend_from_slice(&self.machine_opens.to_le_bytes());
        out.push(self.last_send_engaged as u8);
        out.push(self.last_send_arm.map_or(0, |a| a as u8 + 1));
        for v in self.arm_sends.iter().chain(&self.arm_engaged) {
            out.extend_from_slice(&v.to_le_bytes());
        }
        for a in [&self.sends, &self.exposure, &self.engagements] {
            for x in a.iter() {
                out.extend_from_slice(&x.to_le_bytes());
            }
        }
        out.extend_from_slice(&self.first_ms.to_le_bytes());
        for v in [
            self.sends_since_engaged,
            self.send_count,
            self.open_count,
            self.click_count,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.last_click_ms.to_le_bytes());
        match &self.snapshot {
            Some(f) => {
                out.push(1);
                for x in f.0 {
                    out.extend_from_slice(&x.to_le_bytes());
                }
            }
            None => out.push(0),
        }
        out.push(self.last_send_opened as u8);
        self.winback.encode(&mut out);
        out.push(self.awaiting.len() as u8);
        out.extend(self.awaiting.iter().map(|&a| a as u8));
        out
    }

    /// `None` for bytes this version cannot read (treated as no history by the store).
    pub fn decode(bytes: &[u8]) -> Option<Profile> {
        let mut r = Reader(bytes);
        let version = r.take::<1>()?[0];
        if !(1..=VERSION).contains(&version) {
            return None;
        }
        let has_tz = r.take::<1>()?[0] == 1;
        let tz = i32::from_le_bytes(r.take()?);
        let mut p = Profile {
            tz_offset_min: has_tz.then_some(tz),
            updated_ms: u64::from_le_bytes(r.take()?),
            last_engaged_ms: u64::from_le_bytes(r.take()?),
            last_send_ms: u64::from_le_bytes(r.take()?),
            engagement_total: f32::from_le_bytes(r.take()?),
            machine_opens: u32::from_le_bytes(r.take()?),
            last_send_engaged: r.take::<1>()?[0] == 1,
            last_send_arm: match r.take::<1>()?[0] {
                1 => Some(Arm::Control),
                2 => Some(Arm::Model),
                _ => None,
            },
            ..Profile::default()
        };
        for v in p.arm_sends.iter_mut() {
            *v = u32::from_le_bytes(r.take()?);
        }
        for v in p.arm_engaged.iter_mut() {
            *v = u32::from_le_bytes(r.take()?);
        }
        for a in [&mut p.sends, &mut p.exposure, &mut p.engagements] {
            for x in a.iter_mut() {
                *x = f32::from_le_bytes(r.take()?);
            }
        }
        p.first_ms = if version == 1 {
            p.last_send_ms
        } else {
            u64::from_le_bytes(r.take()?)
        };
        if version >= 3 {
            p.sends_since_engaged = u32::from_le_bytes(r.take()?);
            p.send_count = u32::from_le_bytes(r.take()?);
            p.open_count = u32::from_le_bytes(r.take()?);
            p.click_count = u32::from_le_bytes(r.take()?);
            p.last_click_ms = u64::from_le_bytes(r.take()?);
            if r.take::<1>()?[0] == 1 {
                let mut f = [0f32; super::engagement::FEATURES];
                for x in f.iter_mut() {
                    *x = f32::from_le_bytes(r.take()?);
                }
                p.snapshot = Some(super::engagement::Features(f));
            }
            p.last_send_opened = r.take::<1>()?[0] == 1;
            p.winback = super::lifecycle::WinBack::decode(&mut r)?;
        }
        if version >= 4 {
            let n = r.take::<1>()?[0] as usize;
            if n > MAX_AWAITING {
                return None;
            }
            for _ in 0..n {
                p.awaiting.push(match r.take::<1>()?[0] {
                    0 => Arm::Control,
                    1 => Arm::Model,
                    _ => return None,
                });
            }
        }
        r.0.is_empty().then_some(p)
    }
}

pub(super) struct Reader<'a>(pub(super) &'a [u8]);

impl Reader<'_> {
    pub(super) fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let (head, rest) = self.0.split_first_chunk::<N>()?;
        self.0 = rest;
        Some(*head)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hour_of_week_starts_monday() {
        // 1970-01-05 00:00 UTC was a Monday.
        assert_eq!(hour_of_week(4 * 86_400_000, 0), 0);
        assert_eq!(hour_of_week(0, 0), 72);
        // Monday 00:30 at UTC+1 is Sunday 23:30 UTC.
        assert_eq!(hour_of_week(4 * 86_400_000 - 1_800_000, 60), 0);
    }

    #[test]
    fn counts_halve_after_the_half_life_and_encode_round_trips() {
        let mut p = Profile {
            tz_offset_min: Some(-300),
            ..Profile::default()
        };
        p.record_send(1_000);
        p.record_engagement(1_000 + 3_600_000);
        p.record_send(1_000 + HALF_LIFE_MS);
        assert!((p.total_sends() - 1.5).abs() < 1e-4, "{}", p.total_sends());
        assert!((p.total_engagements() - 0.5).abs() < 1e-3);
        // An old event added late weighs what it would have after decay.
        p.record_engagement(1_000 + 3_600_000);
        assert!((p.total_engagements() - 1.0).abs() < 1e-3);
        let back = Profile::decode(&p.encode()).unwrap();
        assert_eq!(back, p);
        // Arms: an engagement after a planned send is credited to its arm, once.
        p.record_planned_send(2_000 + HALF_LIFE_MS, Arm::Control);
        p.record_engagement(2_000 + HALF_LIFE_MS + 3_600_000);
        p.record_engagement(2_000 + HALF_LIFE_MS + 7_200_000);
        p.record_planned_send(3_000 + HALF_LIFE_MS + 7_200_000, Arm::Model);
        assert_eq!((p.arm_sends, p.arm_engaged), ([1, 1], [1, 0]));
        assert_eq!(Profile::decode(&p.encode()).unwrap(), p);
        assert_eq!(Profile::decode(&[9, 1, 2]), None);
        assert_eq!(p.first_ms, 1_000);
        // A version-1 record (no first_ms) still reads.
        // Versions 1 and 2 are the version-3 record cut before first_ms and after it.
        let mut v1 = p.encode();
        v1.truncate(V1_LEN);
        v1[0] = 1;
        let mut v2 = p.encode();
        v2.truncate(V1_LEN + 8);
        v2[0] = 2;
        let older = Profile::decode(&v2).unwrap();
        assert_eq!(
            (older.first_ms, older.send_count, older.snapshot),
            (p.first_ms, 0, None)
        );
        let old = Profile::decode(&v1).unwrap();
        assert_eq!(old.first_ms, p.last_send_ms);
        assert_eq!(old.sends, p.sends);
        assert_eq!(Profile::decode(&p.encode()[..100]), None);
    }

    #[test]
    fn planned_sends_are_recorded_when_delivered_and_bounces_never() {
        let mut p = Profile {
            tz_offset_min: Some(0),
            ..Profile::default()
        };
        p.await_delivery(Arm::Model);
        p.await_delivery(Arm::Control);
        assert_eq!(
            (p.total_sends(), p.last_send_ms),
            (0.0, 0),
            "not at plan time"
        );
        let v4 = p.encode();
        assert_eq!(Profile::decode(&v4).unwrap(), p);
        // Version 3 is version 4 without the awaited sends' count and arms.
        let mut v3 = v4[..v4.len() - 3].to_vec();
        v3[0] = 3;
        assert!(Profile::decode(&v3).unwrap().awaiting.is_empty());
        // A count past the bound does not read.
        let mut bad = v4.clone();
        let n = bad.len() - 3;
        bad[n] = MAX_AWAITING as u8 + 1;
        assert_eq!(Profile::decode(&bad), None);
        // The first planned send is delivered three hours late: recorded then, in its arm.
        let delivered = 10 * 86_400_000 + 3 * 3_600_000;
        assert!(p.record_delivery(delivered));
        assert_eq!((p.last_send_ms, p.arm_sends), (delivered, [0, 1]));
        assert_eq!(p.sends[hour_of_week(delivered, 0)], 1.0);
        // The second bounces: no send.
        assert!(p.record_failure());
        assert_eq!((p.send_count, p.arm_sends), (1, [0, 1]));
        // Nothing awaited: a delivery of mail tern did not plan changes nothing.
        let before = p.clone();
        assert!(!p.record_delivery(delivered + 1));
        assert!(!p.record_failure());
        assert_eq!(p, before);
        // Bounded: the oldest awaited send is forgotten.
        for _ in 0..MAX_AWAITING + 3 {
            p.await_delivery(Arm::Model);
        }
        assert_eq!(p.awaiting.len(), MAX_AWAITING);
    }

    #[test]
    fn score_rewards_recent_frequent_engagement() {
        let day = 86_400_000;
        let now = 400 * day;
        let mut recent = Profile::default();
        let mut old = Profile::default();
        for i in 0..5 {
            recent.record_engagement(now - i * day);
            old.record_engagement(now - 200 * day - i * day);
        }
        assert_eq!(Profile::default().score(now), 0.0);
        assert!(recent.score(now) > 70.0, "{}", recent.score(now));
        assert!(old.score(now) < 5.0, "{}", old.score(now));
    }
}
