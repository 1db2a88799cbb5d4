//! A seeded simulator of a re-engagement audience, where the true open probability of every
//! send time is known, to evaluate send-time policies (`tern sidecar simulate --seed N`).
//!
//! Users: a UTC offset (10% unknown to the sender), an hour-of-week activity curve mixed
//! from five archetypes (early morning, commute/lunch, evening, night owl, weekend-heavy;
//! von Mises daily curves times a weekday/weekend factor, Dirichlet mixing, log-normal
//! per-hour noise), 10% drifting to another mix halfway through the history, an inbox-check
//! rate, a burial time constant (messages sink in the inbox), and an interest q from their
//! tier: 40% dormant, 45% casual, 15% active.
//!
//! Ground truth: P(open | send at s) = q·(1 − exp(−Σₖ r·λ(s+k)·exp(−(k+½)/τ))) over 72 hours,
//! computed exactly per hour. History (90 days, 0–30 sends, 80% at the sender's habitual
//! Tue/Thu 10:00 New York time: the confounder) is drawn from the same process; 35% of users
//! have Apple-MPP-like clients that log a machine open minutes after each delivery, and only
//! 80% of those are flagged, so the rest look human to every policy.
//!
//! Policies for the next campaign (a 24 h window from a send-now time at the sender's habit):
//! send now; the global best local hour-of-week by opens per send (click-to-send ratio);
//! each user's most frequent open hour (send now without opens); tern's model (the real
//! [`Priors::fit`] and [`choose`] on profiles built by the real [`Profile`] updates);
//! and the oracle (the true best hour). Metric: the true expected human open rate.
//!
//! Everything is drawn from one seeded RNG in a fixed order, so a seed gives one report.

use std::fmt;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::model::{choose, Priors};
use super::profile::{hour_of_week, Profile, HORIZON_H, SLOTS};
use crate::message::SendWindow;

const HOUR_MS: u64 = 3_600_000;
const DAY_MS: u64 = 24 * HOUR_MS;
/// Tuesday 2026-11-24 15:00 UTC = 10:00 in New York, the sender's habitual hour.
const CAMPAIGN_MS: u64 = 1_795_532_400_000;
const HISTORY_DAYS: u64 = 90;
const WINDOW_H: usize = 24;
/// The sender's clock: New York (UTC-5).
#[cfg(test)]
const SENDER_OFFSET_MIN: i32 = -300;

/// Archetypes: peak local hour, concentration κ, weekend factor.
const ARCHETYPES: [(f64, f64, f64); 5] = [
    (7.0, 4.0, 0.7),
    (12.5, 3.0, 0.6),
    (20.0, 4.0, 1.2),
    (23.5, 5.0, 1.1),
    (11.0, 2.0, 2.5),
];

/// UTC offsets (minutes) and their weights.
const ZONES: [(i32, u32); 10] = [
    (-480, 10),
    (-420, 5),
    (-360, 12),
    (-300, 25),
    (0, 10),
    (60, 15),
    (120, 5),
    (330, 6),
    (480, 6),
    (600, 6),
];

pub const POLICIES: [&str; 5] = ["send-now", "global-best", "mode-hour", "tern", "oracle"];
pub const BUCKETS: [&str; 4] = ["0", "1-4", "5-14", "15+"];

struct User {
    offset_min: i32,
    zone_known: bool,
    /// Checks per hour at each local hour-of-week: before the drift and after it.
    early: Box<[f64; SLOTS]>,
    late: Box<[f64; SLOTS]>,
    tau_h: f64,
    q: f64,
    mpp: bool,
}

impl User {
    /// P(a human open | sent at `t_ms`), with the activity curve of that time.
    fn p_open(&self, t_ms: u64) -> f64 {
        let curve = if t_ms < CAMPAIGN_MS - HISTORY_DAYS * DAY_MS / 2 {
            &self.early
        } else {
            &self.late
        };
        let s = hour_of_week(t_ms, self.offset_min);
        let x: f64 = (0..HORIZON_H)
            .map(|k| curve[(s + k) % SLOTS] * (-(k as f64 + 0.5) / self.tau_h).exp())
            .sum();
        self.q * (1.0 - (-x).exp())
    }

    /// Draws whether and when (hours after `t_ms`) a send at `t_ms` is opened by a human.
    fn draw_open(&self, t_ms: u64, rng: &mut StdRng) -> Option<u64> {
        if rng.gen::<f64>() >= self.q {
            return None;
        }
        let curve = if t_ms < CAMPAIGN_MS - HISTORY_DAYS * DAY_MS / 2 {
            &self.early
        } else {
            &self.late
        };
        let s = hour_of_week(t_ms, self.offset_min);
        (0..HORIZON_H as u64).find(|&k| {
            let x = curve[(s + k as usize) % SLOTS] * (-(k as f64 + 0.5) / self.tau_h).exp();
            rng.gen::<f64>() < 1.0 - (-x).exp()
        })
    }
}

fn normal(rng: &mut StdRng) -> f64 {
    let u1: f64 = rng.gen::<f64>().max(1e-300);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Marsaglia–Tsang.
fn gamma(shape: f64, rng: &mut StdRng) -> f64 {
    if shape < 1.0 {
        return gamma(shape + 1.0, rng) * rng.gen::<f64>().powf(1.0 / shape);
    }
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.gen();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

pub(super) fn beta(a: f64, b: f64, rng: &mut StdRng) -> f64 {
    let x = gamma(a, rng);
    x / (x + gamma(b, rng))
}

/// An hour-of-week curve of inbox checks per hour averaging `per_day / 24`.
fn activity_curve(per_day: f64, rng: &mut StdRng) -> Box<[f64; SLOTS]> {
    let weights: Vec<f64> = (0..ARCHETYPES.len()).map(|_| gamma(0.3, rng)).collect();
    let total: f64 = weights.iter().sum::<f64>().max(1e-12);
    let mut curve = Box::new([0.0; SLOTS]);
    for (slot, c) in curve.iter_mut().enumerate() {
        let (day, hour) = (slot / 24, (slot % 24) as f64 + 0.5);
        let weekend = day >= 5;
        let mut v = 0.0;
        for (w, &(peak, kappa, weekend_factor)) in weights.iter().zip(&ARCHETYPES) {
            let angle = std::f64::consts::TAU * (hour - peak) / 24.0;
            let daily = (kappa * (angle.cos() - 1.0)).exp();
            v += w / total * daily * if weekend { weekend_factor } else { 1.0 };
        }
        *c = v * (0.3 * normal(rng)).exp();
    }
    let mean = curve.iter().sum::<f64>() / SLOTS as f64;
    curve.iter_mut().for_each(|c| *c *= per_day / 24.0 / mean);
    curve
}

fn draw_user(rng: &mut StdRng) -> User {
    let total_w: u32 = ZONES.iter().map(|z| z.1).sum();
    let mut pick = rng.gen_range(0..total_w);
    let offset_min = ZONES
        .iter()
        .find(|z| {
            if pick < z.1 {
                true
            } else {
                pick -= z.1;
                false
            }
        })
        .map_or(0, |z| z.0);
    let per_day = rng.gen_range(2.0..8.0);
    let early = activity_curve(per_day, rng);
    let late = if rng.gen::<f64>() < 0.1 {
        activity_curve(per_day, rng)
    } else {
        early.clone()
    };
    let tier: f64 = rng.gen();
    let q = if tier < 0.40 {
        beta(1.0, 60.0, rng)
    } else if tier < 0.85 {
        beta(2.0, 10.0, rng)
    } else {
        beta(5.0, 6.0, rng)
    };
    User {
        offset_min,
        zone_known: rng.gen::<f64>() >= 0.1,
        early,
        late,
        tau_h: 6.0 * (0.5 * normal(rng)).exp(),
        q,
        mpp: rng.gen::<f64>() < 0.35,
    }
}

/// What the sender observed about one user: send times and human-looking open times.
struct History {
    sends: Vec<u64>,
    opens: Vec<u64>,
}

fn draw_history(user: &User, rng: &mut StdRng) -> History {
    let n = if rng.gen::<f64>() < 0.1 {
        0
    } else {
        rng.gen_range(1..=30)
    };
    let start = CAMPAIGN_MS - HISTORY_DAYS * DAY_MS;
    let mut sends: Vec<u64> = (0..n)
        .map(|_| {
            if rng.gen::<f64>() < 0.8 {
                // Tuesday or Thursday 10:00 sender time (the campaign time is a Tuesday then).
                let week = rng.gen_range(1..=12u64);
                let thursday = rng.gen::<bool>();
                CAMPAIGN_MS - week * 7 * DAY_MS + if thursday { 2 * DAY_MS } else { 0 }
            } else {
                start + rng.gen_range(0..HISTORY_DAYS * 24) * HOUR_MS
            }
        })
        .filter(|&t| t < CAMPAIGN_MS - 3 * DAY_MS)
        .collect();
    sends.sort_unstable();
    let mut opens = Vec::new();
    for &s in &sends {
        if user.mpp && rng.gen::<f64>() >= 0.8 {
            // An unflagged machine open, minutes after delivery: looks human.
            opens.push(s + rng.gen_range(0..15) * 60_000);
        }
        if let Some(k) = user.draw_open(s, rng) {
            opens.push(s + k * HOUR_MS + rng.gen_range(0..60) * 60_000);
        }
    }
    opens.sort_unstable();
    History { sends, opens }
}

fn bucket(sends: usize) -> usize {
    match sends {
        0 => 0,
        1..=4 => 1,
        5..=14 => 2,
        _ => 3,
    }
}

/// Expected human open rates per bucket (the last row is everyone) and policy.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub users: usize,
    /// `[bucket or all][policy]` mean true open probability.
    pub rates: Vec<[f64; 5]>,
    pub counts: Vec<usize>,
    /// Share of tern's sends moved by more than 12 hours.
    pub delayed_over_12h: f64,
}

impl Report {
    pub fn rate(&self, bucket: usize, policy: &str) -> f64 {
        let i = POLICIES
            .iter()
            .position(|p| *p == policy)
            .expect("a policy name");
        self.rates[bucket][i]
    }

    /// Everyone's row.
    pub fn all(&self) -> usize {
        BUCKETS.len()
    }

    pub fn uplift(&self, bucket: usize, policy: &str) -> f64 {
        self.rate(bucket, policy) / self.rate(bucket, "send-now") - 1.0
    }

    pub fn gap_captured(&self, bucket: usize, policy: &str) -> f64 {
        let now = self.rate(bucket, "send-now");
        (self.rate(bucket, policy) - now) / (self.rate(bucket, "oracle") - now)
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}, {} users; expected human open rate (uplift over send-now, share of the oracle's gap)",
            self.seed, self.users
        )?;
        write!(f, "{:<8} {:>6}", "history", "users")?;
        for p in POLICIES {
            write!(f, " {p:>25}")?;
        }
        writeln!(f)?;
        for (b, row) in self.rates.iter().enumerate() {
            let name = BUCKETS.get(b).copied().unwrap_or("all");
            write!(f, "{name:<8} {:>6}", self.counts[b])?;
            for (i, p) in POLICIES.iter().enumerate() {
                let cell = if i == 0 {
                    format!("{:.2}%", row[i] * 100.0)
                } else if *p == "oracle" {
                    format!("{:.2}% {:+.1}%", row[i] * 100.0, self.uplift(b, p) * 100.0)
                } else {
                    format!(
                        "{:.2}% {:+.1}% {:.0}%",
                        row[i] * 100.0,
                        self.uplift(b, p) * 100.0,
                        self.gap_captured(b, p) * 100.0
                    )
                };
                write!(f, " {cell:>25}")?;
            }
            writeln!(f)?;
        }
        let all = self.rates.len() - 1;
        writeln!(
            f,
            "tern captured {:.1}% of the oracle's gap over all users, {:+.1}% over send-now",
            self.gap_captured(all, "tern") * 100.0,
            self.uplift(all, "tern") * 100.0
        )?;
        writeln!(
            f,
            "tern moved {:.1}% of sends by more than 12 h",
            self.delayed_over_12h * 100.0
        )
    }
}

/// Runs the simulation: `users` users drawn from `seed`.
pub fn run(seed: u64, users: usize) -> Report {
    let mut rng = StdRng::seed_from_u64(seed);
    let population: Vec<User> = (0..users).map(|_| draw_user(&mut rng)).collect();
    let histories: Vec<History> = population
        .iter()
        .map(|u| draw_history(u, &mut rng))
        .collect();
    let hour = |h: usize| CAMPAIGN_MS + h as u64 * HOUR_MS;
    // The offset each policy may use: unknown zones are read as UTC.
    let seen_offset = |u: &User| if u.zone_known { u.offset_min } else { 0 };

    // Global best: human-looking opens within 72 h per send, by the send's local slot.
    let mut slot_sends = [0.0f64; SLOTS];
    let mut slot_opens = [0.0f64; SLOTS];
    for (u, h) in population.iter().zip(&histories) {
        for &s in &h.sends {
            let slot = hour_of_week(s, seen_offset(u));
            slot_sends[slot] += 1.0;
            slot_opens[slot] += h
                .opens
                .iter()
                .filter(|&&o| o >= s && o < s + HORIZON_H as u64 * HOUR_MS)
                .count() as f64;
        }
    }
    let pooled = slot_opens.iter().sum::<f64>() / slot_sends.iter().sum::<f64>().max(1.0);
    let ratio: Vec<f64> = (0..SLOTS)
        .map(|s| (slot_opens[s] + 10.0 * pooled) / (slot_sends[s] + 10.0))
        .collect();

    // tern: the real profile updates, fit and choice.
    let profiles: Vec<Profile> = population
        .iter()
        .zip(&histories)
        .map(|(u, h)| {
            let mut p = Profile {
                tz_offset_min: u.zone_known.then_some(u.offset_min),
                ..Profile::default()
            };
            let mut events: Vec<(u64, bool)> = h.sends.iter().map(|&t| (t, true)).collect();
            events.extend(h.opens.iter().map(|&t| (t, false)));
            events.sort_unstable();
            for (t, is_send) in events {
                if is_send {
                    p.record_send(t);
                } else {
                    p.record_engagement(t);
                }
            }
            p
        })
        .collect();
    let priors = Priors::fit(profiles.iter());
    let window = SendWindow {
        len_ms: WINDOW_H as u64 * HOUR_MS,
        quiet: None,
    };

    let groups = BUCKETS.len() + 1;
    let mut sums = vec![[0.0f64; 5]; groups];
    let mut counts = vec![0usize; groups];
    let mut delayed = 0usize;
    for ((u, h), p) in population.iter().zip(&histories).zip(&profiles) {
        let truth: Vec<f64> = (0..WINDOW_H).map(|i| u.p_open(hour(i))).collect();
        let best_of = |score: &dyn Fn(usize) -> f64| {
            (0..WINDOW_H).fold(0, |best, i| if score(i) > score(best) { i } else { best })
        };
        let global = if u.zone_known {
            best_of(&|i| ratio[hour_of_week(hour(i), u.offset_min)])
        } else {
            0
        };
        let mode = {
            let mut by_hour = [0usize; 24];
            for &o in &h.opens {
                by_hour[hour_of_week(o, seen_offset(u)) % 24] += 1;
            }
            let top = (0..24).max_by_key(|&x| (by_hour[x], 24 - x)).unwrap_or(0);
            if by_hour[top] == 0 {
                0
            } else {
                (0..WINDOW_H)
                    .find(|&i| hour_of_week(hour(i), seen_offset(u)) % 24 == top)
                    .unwrap_or(0)
            }
        };
        let tern = choose(&priors, p, CAMPAIGN_MS, window)
            .map_or(0, |t| ((t - CAMPAIGN_MS) / HOUR_MS) as usize);
        if tern > 12 {
            delayed += 1;
        }
        let oracle = best_of(&|i| truth[i]);
        let chosen = [0, global, mode, tern, oracle];
        for g in [bucket(h.sends.len()), BUCKETS.len()] {
            counts[g] += 1;
            for (sum, &i) in sums[g].iter_mut().zip(&chosen) {
                *sum += truth[i];
            }
        }
    }
    let rates = sums
        .iter()
        .zip(&counts)
        .map(|(s, &n)| s.map(|x| x / n.max(1) as f64))
        .collect();
    Report {
        seed,
        users,
        rates,
        counts,
        delayed_over_12h: delayed as f64 / users.max(1) as f64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn campaign_time_is_the_senders_tuesday_ten_oclock() {
        // Tuesday = day 1 of the week; 10:00 in UTC-5.
        assert_eq!(hour_of_week(CAMPAIGN_MS, SENDER_OFFSET_MIN), 24 + 10);
    }

    #[test]
    fn policies_are_ordered_on_a_fixed_seed() {
        let r = run(7, 6000);
        let all = r.all();
        for b in 0..=all {
            assert!(r.rate(b, "oracle") >= r.rate(b, "tern"), "bucket {b}");
        }
        // The targets that hold on the simulator (see docs/ARCHITECTURE.md for the table).
        assert!(r.uplift(all, "tern") >= 0.08, "{r}");
        assert!(
            r.uplift(all, "tern") - r.uplift(all, "global-best") >= 0.03,
            "{r}"
        );
        assert!(r.rate(all, "tern") > r.rate(all, "mode-hour"), "{r}");
        assert!(r.rate(all, "mode-hour") > r.rate(all, "send-now"), "{r}");
        // 51.1% at 6,000 users since zone-unknown recipients are weighed over the zones
        // (49.2% before, 47% before the dictionary prior).
        assert!(r.gap_captured(all, "tern") >= 0.50, "{r}");
        // No history: never below sending now.
        assert!(r.rate(0, "tern") >= r.rate(0, "send-now"), "{r}");
        // Deterministic per seed.
        assert_eq!(run(7, 300).rates, run(7, 300).rates);
    }
}
