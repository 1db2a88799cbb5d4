//! A seeded simulator of an audience that goes dormant and can be won back, to evaluate the
//! engagement model and the lifecycle against the sunset-only policy
//! (`tern sidecar simulate --lifecycle --seed N`).
//!
//! Ground truth (hidden from the policies): every user has an interest q (the chance of a
//! human open of a send) from a tier: 40% low (Beta(1, 40), mean 2.4%), 40% casual
//! (Beta(2, 6), 25%), 20% loyal (Beta(6, 2), 75%): a list where a fifth of the readers make
//! most of the opens. 60% of users lapse in a random week of the first year: their open
//! chance drops to 3% of q; a lapsed user is *recoverable* (half of them) or *gone*. A
//! regular send reactivates a recoverable lapsed user with probability 1% (a lapsed reader
//! seldom comes back on their own) (never a gone one);
//! a win-back send with 25% (a gone one 1%). A reactivated user opens that send and is back
//! at 80% of their old interest (and may lapse again: 1% a week). Complaints per delivered
//! send: 0.05% from an engaged user, 0.2% from a recoverable lapsed one, 0.4% from a gone
//! one; a complaint suppresses the address. A win-back mail is a re-permission prompt: a lapsed
//! reader it does not win back unsubscribes with probability 10% (gone) or 3% (recoverable),
//! which suppresses the address too.
//!
//! The sender mails everyone not suppressed once a week for 78 weeks. Before each weekly
//! send the real refit runs: [`EngagementModel::fit`] on the real profiles' examples, then
//! [`lifecycle::state`] for everyone, and the sunset suppressions. The two policies differ
//! only in what a dormant user is sent: *sunset-only* keeps sending the newsletter until
//! `sunset_after`; *lifecycle* turns the sends that [`lifecycle::winback_due`] allows into
//! win-back sends and sunsets after a failed series. Both use the same thresholds
//! (`[sendtime]` defaults, dormant after 90 days, sunset after 180).
//!
//! Reported: the engagement model's Brier score and AUC on every send from week 13 (the
//! prediction made just before the send against whether it was opened) beside the base
//! rate's Brier; per policy the users who were ever dormant (state dormant or win-back at a
//! weekly check) and later opened (reactivated), complaints, sends, and sends to a
//! suppressed address (counted by an audit of the send log against the suppression log:
//! must be 0).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::engagement::{self, EngagementModel};
use super::lifecycle::{self, State, Thresholds};
use super::profile::Profile;
use crate::config::SendTimeConfig;

const HOUR_MS: u64 = 3_600_000;
const WEEK_MS: u64 = 7 * 24 * HOUR_MS;
/// Monday 2026-01-05 10:00 UTC.
const START_MS: u64 = 1_767_607_200_000;
pub const WEEKS: u64 = 78;
const EVAL_FROM_WEEK: u64 = 13;

const LAPSE_SHARE: f64 = 0.6;
const LAPSED_INTEREST: f64 = 0.03;
const RECOVERABLE_SHARE: f64 = 0.5;
const REACTIVATE_REGULAR: f64 = 0.01;
const REACTIVATE_WINBACK: f64 = 0.25;
const REACTIVATE_WINBACK_GONE: f64 = 0.01;
const RELAPSE_PER_WEEK: f64 = 0.01;
/// A win-back mail is a re-permission prompt ("still want these?"): a lapsed reader it does
/// not win back unsubscribes with this chance (gone) or the next (recoverable).
const UNSUBSCRIBE_WINBACK_GONE: f64 = 0.10;
const UNSUBSCRIBE_WINBACK_RECOVERABLE: f64 = 0.03;
const COMPLAINT_ENGAGED: f64 = 0.0005;
const COMPLAINT_RECOVERABLE: f64 = 0.002;
const COMPLAINT_GONE: f64 = 0.004;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    SunsetOnly,
    Lifecycle,
}

struct User {
    q: f64,
    lapse_week: Option<u64>,
    recoverable: bool,
}

/// Hidden state during a run.
#[derive(Clone, Copy)]
struct Hidden {
    q: f64,
    lapsed: bool,
}

fn draw_users(seed: u64, n: usize) -> Vec<User> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let tier: f64 = rng.gen();
            let q = if tier < 0.40 {
                super::simulate::beta(1.0, 40.0, &mut rng)
            } else if tier < 0.80 {
                super::simulate::beta(2.0, 6.0, &mut rng)
            } else {
                super::simulate::beta(6.0, 2.0, &mut rng)
            };
            User {
                q,
                lapse_week: (rng.gen::<f64>() < LAPSE_SHARE).then(|| rng.gen_range(0..52)),
                recoverable: rng.gen::<f64>() < RECOVERABLE_SHARE,
            }
        })
        .collect()
}

/// One policy's run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Outcome {
    pub sends: u64,
    pub winback_sends: u64,
    pub opens: u64,
    pub complaints: u64,
    pub unsubscribes: u64,
    pub ever_dormant: u64,
    /// Users ever dormant who opened a send after that.
    pub reactivated: u64,
    pub sunset: u64,
    /// Sends to an address suppressed before them (the audit; must be 0).
    pub suppressed_mailed: u64,
    /// (prediction, opened) of every send from week [`EVAL_FROM_WEEK`].
    predictions: Vec<(f64, bool)>,
    /// (the true open probability, opened) of the same sends: the best any model can do.
    truth: Vec<(f64, bool)>,
}

fn thresholds() -> Thresholds {
    Thresholds::from(&SendTimeConfig {
        dormant_after: Duration::from_secs(90 * 86_400),
        sunset_after: Some(Duration::from_secs(180 * 86_400)),
        ..SendTimeConfig::default()
    })
}

fn run_policy(users: &[User], seed: u64, policy: Policy) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed_11fe);
    let t = thresholds();
    let mut profiles: Vec<Profile> = vec![Profile::default(); users.len()];
    let mut hidden: Vec<Hidden> = users
        .iter()
        .map(|u| Hidden {
            q: u.q,
            lapsed: false,
        })
        .collect();
    // The suppression list (user -> week suppressed) and the send log, audited at the end.
    let mut suppressed: HashMap<usize, u64> = HashMap::new();
    let mut send_log: Vec<(usize, u64)> = Vec::new();
    let mut ever_dormant = vec![false; users.len()];
    let mut reactivated = vec![false; users.len()];
    let mut out = Outcome::default();
    for week in 0..WEEKS {
        let now = START_MS + week * WEEK_MS;
        // The refit: the model from every profile's resolved latest send, then the sunset.
        let examples: Vec<_> = profiles
            .iter()
            .filter_map(|p| engagement::example(p, now))
            .collect();
        let model = EngagementModel::fit(&examples);
        let mut states = Vec::with_capacity(users.len());
        for (i, p) in profiles.iter().enumerate() {
            let prediction = model.predict(p, now);
            let state = lifecycle::state(p, prediction, suppressed.contains_key(&i), now, &t);
            if state == State::Sunset && !suppressed.contains_key(&i) {
                suppressed.insert(i, week);
                out.sunset += 1;
            }
            states.push((prediction, state));
        }
        for (i, u) in users.iter().enumerate() {
            let h = &mut hidden[i];
            if u.lapse_week == Some(week)
                || (!h.lapsed
                    && week > 0
                    && rng.gen::<f64>() < RELAPSE_PER_WEEK
                    && u.lapse_week.is_some_and(|l| week > l))
            {
                h.lapsed = true;
            }
            // Never mail a suppressed address (the audit below checks this independently).
            if suppressed.contains_key(&i) {
                continue;
            }
            let (prediction, state) = states[i];
            if matches!(state, State::Dormant | State::WinBack) {
                ever_dormant[i] = true;
            }
            let p = &mut profiles[i];
            let winback = policy == Policy::Lifecycle && lifecycle::winback_due(state, p, now, &t);
            if winback {
                lifecycle::record_winback_send(p, now);
                out.winback_sends += 1;
            }
            p.record_send(now);
            send_log.push((i, week));
            out.sends += 1;
            let chance = match (winback, u.recoverable) {
                (true, true) => REACTIVATE_WINBACK,
                (true, false) => REACTIVATE_WINBACK_GONE,
                (false, true) => REACTIVATE_REGULAR,
                (false, false) => 0.0,
            };
            let true_p = if h.lapsed {
                chance + (1.0 - chance) * h.q * LAPSED_INTEREST
            } else {
                h.q
            };
            let opened = if h.lapsed {
                if rng.gen::<f64>() < chance {
                    h.lapsed = false;
                    h.q = u.q * 0.8;
                    true
                } else {
                    let unsubscribe = match (winback, u.recoverable) {
                        (false, _) => 0.0,
                        (true, false) => UNSUBSCRIBE_WINBACK_GONE,
                        (true, true) => UNSUBSCRIBE_WINBACK_RECOVERABLE,
                    };
                    if rng.gen::<f64>() < unsubscribe {
                        out.unsubscribes += 1;
                        suppressed.insert(i, week + 1);
                    }
                    rng.gen::<f64>() < h.q * LAPSED_INTEREST
                }
            } else {
                rng.gen::<f64>() < h.q
            };
            if week >= EVAL_FROM_WEEK {
                out.predictions.push((prediction, opened));
                out.truth.push((true_p, opened));
            }
            if opened {
                p.record_engagement(now + rng.gen_range(1..48) * HOUR_MS);
                out.opens += 1;
                if ever_dormant[i] {
                    reactivated[i] = true;
                }
            }
            let complaint = match (h.lapsed, u.recoverable) {
                (false, _) => COMPLAINT_ENGAGED,
                (true, true) => COMPLAINT_RECOVERABLE,
                (true, false) => COMPLAINT_GONE,
            };
            if rng.gen::<f64>() < complaint {
                out.complaints += 1;
                suppressed.insert(i, week + 1);
            }
        }
    }
    out.suppressed_mailed = send_log
        .iter()
        .filter(|(i, week)| suppressed.get(i).is_some_and(|from| week >= from))
        .count() as u64;
    out.ever_dormant = ever_dormant.iter().filter(|&&d| d).count() as u64;
    out.reactivated = reactivated.iter().filter(|&&r| r).count() as u64;
    out
}

#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub users: usize,
    pub brier: f64,
    pub base_brier: f64,
    /// The Brier score of the true probabilities (the floor).
    pub oracle_brier: f64,
    pub auc: f64,
    pub sunset_only: Outcome,
    pub lifecycle: Outcome,
}

impl Report {
    /// The model's Brier score improvement over the base rate's (0.2 = 20% lower).
    pub fn brier_gain(&self) -> f64 {
        1.0 - self.brier / self.base_brier
    }

    /// Reactivated dormant users, lifecycle over sunset-only (0.25 = 25% more).
    pub fn reactivation_gain(&self) -> f64 {
        self.lifecycle.reactivated as f64 / self.sunset_only.reactivated.max(1) as f64 - 1.0
    }
}

/// Runs both policies on `users` users drawn from `seed`.
pub fn run(seed: u64, users: usize) -> Report {
    let population = draw_users(seed, users);
    let sunset_only = run_policy(&population, seed, Policy::SunsetOnly);
    let lifecycle = run_policy(&population, seed, Policy::Lifecycle);
    let pairs = &sunset_only.predictions;
    let rate = pairs.iter().filter(|p| p.1).count() as f64 / pairs.len().max(1) as f64;
    let base: Vec<(f64, bool)> = pairs.iter().map(|&(_, y)| (rate, y)).collect();
    Report {
        seed,
        users,
        brier: engagement::brier(pairs),
        base_brier: engagement::brier(&base),
        oracle_brier: engagement::brier(&sunset_only.truth),
        auc: engagement::auc(pairs),
        sunset_only,
        lifecycle,
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {}, {} users, {WEEKS} weekly sends; engagement model on {} sends from week {EVAL_FROM_WEEK}: \
             Brier {:.4} (base rate {:.4}, {:.1}% lower; the true probabilities {:.4}), AUC {:.3}",
            self.seed,
            self.users,
            self.sunset_only.predictions.len(),
            self.brier,
            self.base_brier,
            self.brier_gain() * 100.0,
            self.oracle_brier,
            self.auc
        )?;
        writeln!(
            f,
            "{:<12} {:>8} {:>8} {:>8} {:>12} {:>12} {:>8} {:>11} {:>17}",
            "policy",
            "sends",
            "winback",
            "opens",
            "ever dormant",
            "reactivated",
            "sunset",
            "complaints",
            "suppressed mailed"
        )?;
        for (name, o) in [
            ("sunset-only", &self.sunset_only),
            ("lifecycle", &self.lifecycle),
        ] {
            writeln!(
                f,
                "{name:<12} {:>8} {:>8} {:>8} {:>12} {:>12} {:>8} {:>11} {:>17}",
                o.sends,
                o.winback_sends,
                o.opens,
                o.ever_dormant,
                o.reactivated,
                o.sunset,
                o.complaints,
                o.suppressed_mailed
            )?;
        }
        writeln!(
            f,
            "lifecycle: {:+.1}% reactivated dormant users, complaints {} vs {}, unsubscribes {} vs {}",
            self.reactivation_gain() * 100.0,
            self.lifecycle.complaints,
            self.sunset_only.complaints,
            self.lifecycle.unsubscribes,
            self.sunset_only.unsubscribes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_and_the_lifecycle_meet_their_targets_on_three_seeds() {
        for seed in 1..=3 {
            let r = run(seed, 1500);
            assert!(r.brier_gain() >= 0.20, "{r}");
            assert!(r.auc >= 0.75, "{r}");
            eprintln!("{r}");
            assert!(r.reactivation_gain() >= 0.25, "{r}");
            assert!(r.lifecycle.complaints <= r.sunset_only.complaints, "{r}");
            assert_eq!(r.lifecycle.suppressed_mailed, 0, "{r}");
            assert_eq!(r.sunset_only.suppressed_mailed, 0, "{r}");
            // The series is capped: never more win-back sends than 3 per sunset or reactivation.
            assert!(r.lifecycle.winback_sends > 0, "{r}");
            assert_eq!(r.sunset_only.winback_sends, 0);
        }
        // Deterministic per seed.
        assert_eq!(run(5, 200).lifecycle, run(5, 200).lifecycle);
    }
}
