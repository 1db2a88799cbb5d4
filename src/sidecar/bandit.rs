//! The variant bandit: Bernoulli Thompson sampling over a campaign's variants.
//!
//! Each variant has a Beta(1 + rewards, 1 + sends - rewards) posterior. A send draws one
//! sample per variant and takes the largest, except for a `holdout` share (the campaign's
//! own content, never optimised, so lift can be measured) and an `exploration` share
//! (a uniformly random variant: Thompson sampling alone can lock onto an arm when arms are
//! close). Sends and rewards collect in a pending batch and reach the posteriors only in
//! [`Bandit::apply_batch`], as engagement arrives hours after the send anyway.
//! Invariant: posteriors change only in `apply_batch`; a reward is counted once per message.

use std::collections::{BTreeMap, HashSet};

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::config::{BanditConfig, CampaignBandit, Strategy};

/// The arm name of the holdout share.
pub const HOLDOUT: &str = "holdout";

/// How one campaign picks variants: `[sidecar.bandit]` with the campaign's own
/// `[sidecar.campaigns.bandit]` over it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Policy {
    pub strategy: Strategy,
    pub exploration: f64,
    pub holdout: f64,
    /// Applied sends every variant has before Thompson sampling exploits.
    pub min_sends: u64,
}

impl Policy {
    pub fn of(global: &BanditConfig, campaign: Option<&CampaignBandit>) -> Policy {
        Policy {
            strategy: campaign.map_or(Strategy::Thompson, |c| c.strategy),
            exploration: campaign
                .and_then(|c| c.exploration)
                .unwrap_or(global.exploration),
            holdout: campaign.and_then(|c| c.holdout).unwrap_or(global.holdout),
            min_sends: campaign.map_or(0, |c| c.min_sends),
        }
    }
}

/// Posterior counts of one variant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    pub sends: f64,
    pub rewards: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Bandit {
    /// Applied counts, per variant id (the holdout too, for reports).
    pub arms: BTreeMap<String, Arm>,
    #[serde(skip)]
    pending: BTreeMap<String, Arm>,
    /// Messages already rewarded in the pending batch.
    #[serde(skip)]
    rewarded: HashSet<String>,
}

impl Bandit {
    pub fn new(variants: &[String]) -> Bandit {
        let mut bandit = Bandit::default();
        bandit.ensure(variants);
        bandit
    }

    /// Adds arms for `variants` not known yet (state loaded from the spool may predate them)
    /// and drops arms no longer configured.
    pub fn ensure(&mut self, variants: &[String]) {
        for v in variants {
            self.arms.entry(v.clone()).or_default();
        }
        self.arms
            .retain(|k, _| k == HOLDOUT || variants.iter().any(|v| v == k));
    }

    /// Picks a variant for one send (`HOLDOUT` with probability `policy.holdout`); the send
    /// counts once delivered ([`Bandit::sent`]). An even split for the `exploration` share,
    /// always with the `fixed` strategy, and until every variant has `min_sends` applied
    /// sends; Thompson sampling otherwise. `variants` must not be empty.
    pub fn choose(&mut self, variants: &[String], policy: &Policy, rng: &mut impl Rng) -> String {
        let Policy {
            strategy,
            exploration,
            holdout,
            min_sends,
        } = *policy;
        let warming = variants
            .iter()
            .any(|v| self.arms.get(v).map_or(0.0, |a| a.sends) < min_sends as f64);
        let roll: f64 = rng.gen();
        let chosen = if roll < holdout {
            HOLDOUT.to_owned()
        } else if strategy == Strategy::Fixed
            || warming
            || roll < holdout + exploration * (1.0 - holdout)
        {
            variants[rng.gen_range(0..variants.len())].clone()
        } else {
            let mut best = (f64::NEG_INFINITY, 0);
            for (i, v) in variants.iter().enumerate() {
                let arm = self.arms.get(v).copied().unwrap_or_default();
                let failures = (arm.sends - arm.rewards).max(0.0);
                let x = beta(rng, 1.0 + arm.rewards, 1.0 + failures);
                if x > best.0 {
                    best = (x, i);
                }
            }
            variants[best.1].clone()
        };
        chosen
    }

    /// Counts `n` delivered sends of `variant` in the pending batch (sends are counted when
    /// the receiver took the message, not when the variant was chosen).
    pub fn sent(&mut self, variant: &str, n: f64) {
        if variant == HOLDOUT || self.arms.contains_key(variant) {
            self.pending.entry(variant.to_owned()).or_default().sends += n;
        }
    }

    /// Records a human engagement (open or click) of `message`, sent as `variant`.
    pub fn reward(&mut self, variant: &str, message: &str) {
        if self.rewarded.insert(message.to_owned()) {
            self.pending.entry(variant.to_owned()).or_default().rewards += 1.0;
        }
    }

    /// Takes the pending batch (sends and rewards per arm) without applying it: a fleet adds
    /// it to the shared counts and then [`Bandit::set_arms`] to their totals.
    pub fn take_batch(&mut self) -> BTreeMap<String, Arm> {
        self.rewarded.clear();
        std::mem::take(&mut self.pending)
    }

    /// Adds `batch` (from [`Bandit::take_batch`]) to the posteriors.
    pub fn add(&mut self, batch: &BTreeMap<String, Arm>) {
        for (v, p) in batch {
            let arm = self.arms.entry(v.clone()).or_default();
            arm.sends += p.sends;
            arm.rewards += p.rewards;
        }
    }

    /// Replaces the posteriors of the arms in `totals` (the fleet's shared counts).
    pub fn set_arms(&mut self, totals: BTreeMap<String, Arm>) {
        for (v, arm) in totals {
            if let Some(mine) = self.arms.get_mut(&v) {
                *mine = arm;
            }
        }
    }

    /// Folds the pending batch into the posteriors; returns whether anything changed.
    pub fn apply_batch(&mut self) -> bool {
        let changed = !self.pending.is_empty();
        for (v, p) in std::mem::take(&mut self.pending) {
            let arm = self.arms.entry(v).or_default();
            arm.sends += p.sends;
            arm.rewards += p.rewards;
        }
        self.rewarded.clear();
        changed
    }
}

/// A Beta(a, b) sample from two Gamma samples.
fn beta(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    let x = gamma(rng, a);
    let y = gamma(rng, b);
    if x + y > 0.0 {
        x / (x + y)
    } else {
        0.5
    }
}

/// A Gamma(shape, 1) sample (Marsaglia and Tsang, 2000; shape >= 1 here since every
/// Beta parameter is 1 plus a count).
fn gamma(rng: &mut impl Rng, shape: f64) -> f64 {
    let d = shape - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let (x, v) = loop {
            let x = normal(rng);
            let v = 1.0 + c * x;
            if v > 0.0 {
                break (x, v * v * v);
            }
        };
        let u: f64 = rng.gen();
        if u < 1.0 - 0.0331 * x.powi(4) || u.ln() < 0.5 * x * x + d * (1.0 - v + v.ln()) {
            return d * v;
        }
    }
}

/// A standard normal sample (Box-Muller).
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.gen_range(f64::MIN_POSITIVE..1.0);
    let u2: f64 = rng.gen();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    /// Simulated Bernoulli arms: the bandit's expected regret against always sending the best
    /// arm, and the best arm's share early and late.
    fn simulate(
        seed: u64,
        probs: &[f64],
        batches: usize,
        per_batch: usize,
    ) -> (f64, f64, f64, f64) {
        let mut rng = StdRng::seed_from_u64(seed);
        let names: Vec<String> = (0..probs.len()).map(|i| format!("v{i}")).collect();
        let mut bandit = Bandit::new(&names);
        let best = probs.iter().cloned().fold(0.0, f64::max);
        let best_name = &names[probs.iter().position(|&p| p == best).unwrap()];
        let (mut regret, mut holdouts, mut first, mut last) = (0.0, 0.0, 0.0, 0.0);
        let mut msg = 0u64;
        for b in 0..batches {
            let mut best_sends = 0.0;
            for _ in 0..per_batch {
                let v = bandit.choose(&names, &policy(Strategy::Thompson, 0.1, 0.05, 0), &mut rng);
                bandit.sent(&v, 1.0);
                if v == HOLDOUT {
                    holdouts += 1.0;
                    continue;
                }
                let p = probs[names.iter().position(|n| *n == v).unwrap()];
                regret += best - p;
                if &v == best_name {
                    best_sends += 1.0;
                }
                msg += 1;
                if rng.gen::<f64>() < p {
                    bandit.reward(&v, &msg.to_string());
                }
            }
            bandit.apply_batch();
            if b == 0 {
                first = best_sends / per_batch as f64;
            }
            last = best_sends / per_batch as f64;
        }
        (regret, holdouts / (batches * per_batch) as f64, first, last)
    }

    #[test]
    fn best_arm_share_grows_and_regret_beats_uniform() {
        let probs = [0.02, 0.03, 0.05, 0.035];
        let (batches, per_batch) = (40, 500);
        for seed in [1, 2, 3] {
            let (regret, holdout, first, last) = simulate(seed, &probs, batches, per_batch);
            let sends = (batches * per_batch) as f64 * (1.0 - holdout);
            let mean = probs.iter().sum::<f64>() / probs.len() as f64;
            let uniform = sends * (0.05 - mean);
            assert!(
                last > first + 0.3,
                "seed {seed}: best share {first} -> {last}"
            );
            assert!(
                regret < uniform * 0.5,
                "seed {seed}: regret {regret} vs uniform {uniform}"
            );
            assert!(
                (holdout - 0.05).abs() < 0.01,
                "seed {seed}: holdout share {holdout}"
            );
        }
    }

    #[test]
    fn rewards_count_once_per_message_and_only_in_batches() {
        let names = vec!["a".to_owned()];
        let mut bandit = Bandit::new(&names);
        let mut rng = StdRng::seed_from_u64(7);
        let v = bandit.choose(&names, &policy(Strategy::Thompson, 0.0, 0.0, 0), &mut rng);
        assert!(!bandit.apply_batch(), "a choice is no send");
        bandit.sent(&v, 1.0);
        bandit.reward(&v, "m1");
        bandit.reward(&v, "m1");
        assert_eq!(bandit.arms["a"], Arm::default());
        assert!(bandit.apply_batch());
        assert_eq!(
            bandit.arms["a"],
            Arm {
                sends: 1.0,
                rewards: 1.0
            }
        );
    }

    fn policy(strategy: Strategy, exploration: f64, holdout: f64, min_sends: u64) -> Policy {
        Policy {
            strategy,
            exploration,
            holdout,
            min_sends,
        }
    }

    /// A bandit whose posteriors favour `a` strongly (a Thompson pick is almost always `a`).
    fn lopsided() -> (Vec<String>, Bandit) {
        let names: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut bandit = Bandit::new(&names);
        bandit.set_arms(BTreeMap::from([
            (
                "a".to_owned(),
                Arm {
                    sends: 1000.0,
                    rewards: 300.0,
                },
            ),
            (
                "b".to_owned(),
                Arm {
                    sends: 1000.0,
                    rewards: 10.0,
                },
            ),
            (
                "c".to_owned(),
                Arm {
                    sends: 1000.0,
                    rewards: 10.0,
                },
            ),
        ]));
        (names, bandit)
    }

    /// Counts per arm over `n` draws.
    fn draws(
        bandit: &mut Bandit,
        names: &[String],
        p: &Policy,
        n: usize,
        seed: u64,
    ) -> BTreeMap<String, usize> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = BTreeMap::new();
        for _ in 0..n {
            *out.entry(bandit.choose(names, p, &mut rng)).or_default() += 1;
        }
        out
    }

    /// Whether `k` of `n` is within 4.5 standard deviations of a Binomial(n, p) mean (a false
    /// failure about once in 150,000 runs; the seeds are fixed anyway).
    fn binomial_ok(k: usize, n: usize, p: f64) -> bool {
        let (mean, sd) = (n as f64 * p, (n as f64 * p * (1.0 - p)).sqrt());
        (k as f64 - mean).abs() <= 4.5 * sd
    }

    #[test]
    fn the_holdout_share_is_binomial_whatever_the_strategy() {
        let n = 20_000;
        for (seed, holdout) in [(1, 0.05), (2, 0.2), (3, 0.5)] {
            for strategy in [Strategy::Thompson, Strategy::Fixed] {
                let (names, mut bandit) = lopsided();
                let got = draws(
                    &mut bandit,
                    &names,
                    &policy(strategy, 0.1, holdout, 0),
                    n,
                    seed,
                );
                let k = got.get(HOLDOUT).copied().unwrap_or(0);
                assert!(
                    binomial_ok(k, n, holdout),
                    "{strategy:?} holdout {holdout}: {k} of {n}"
                );
            }
        }
        let (names, mut bandit) = lopsided();
        let none = draws(
            &mut bandit,
            &names,
            &policy(Strategy::Thompson, 0.1, 0.0, 0),
            n,
            4,
        );
        assert_eq!(none.get(HOLDOUT), None);
    }

    #[test]
    fn fixed_splits_evenly_and_thompson_exploits() {
        let n = 30_000;
        let (names, mut bandit) = lopsided();
        let fixed = draws(
            &mut bandit,
            &names,
            &policy(Strategy::Fixed, 0.0, 0.1, 0),
            n,
            5,
        );
        for v in &names {
            // Each variant gets 0.9 / 3 of the sends.
            assert!(binomial_ok(fixed[v], n, 0.3), "fixed {v}: {fixed:?}");
        }
        let (names, mut bandit) = lopsided();
        let thompson = draws(
            &mut bandit,
            &names,
            &policy(Strategy::Thompson, 0.0, 0.0, 0),
            n,
            6,
        );
        assert!(thompson["a"] > n * 99 / 100, "{thompson:?}");
    }

    #[test]
    fn min_sends_keeps_an_even_split_until_every_variant_has_them() {
        let n = 30_000;
        let (names, mut bandit) = lopsided();
        // c has 1000 applied sends: below 5000 the split stays even.
        let warming = draws(
            &mut bandit,
            &names,
            &policy(Strategy::Thompson, 0.0, 0.0, 5000),
            n,
            7,
        );
        for v in &names {
            assert!(binomial_ok(warming[v], n, 1.0 / 3.0), "{v}: {warming:?}");
        }
        let (names, mut bandit) = lopsided();
        let past = draws(
            &mut bandit,
            &names,
            &policy(Strategy::Thompson, 0.0, 0.0, 1000),
            n,
            8,
        );
        assert!(past["a"] > n * 99 / 100, "{past:?}");
    }

    #[test]
    fn a_campaigns_settings_override_the_global_ones_key_by_key() {
        let global = BanditConfig::default();
        assert_eq!(
            Policy::of(&global, None),
            policy(Strategy::Thompson, 0.1, 0.05, 0)
        );
        let own = CampaignBandit {
            strategy: Strategy::Fixed,
            exploration: None,
            holdout: Some(0.25),
            min_sends: 100,
        };
        assert_eq!(
            Policy::of(&global, Some(&own)),
            policy(Strategy::Fixed, 0.1, 0.25, 100)
        );
    }

    #[test]
    fn beta_samples_have_the_right_mean() {
        let mut rng = StdRng::seed_from_u64(3);
        let n = 20_000;
        let mean = (0..n).map(|_| beta(&mut rng, 3.0, 7.0)).sum::<f64>() / n as f64;
        assert!((mean - 0.3).abs() < 0.01, "{mean}");
    }
}
