//! Campaign results: per variant, what the events say (sends delivered, bounces, human and
//! machine opens, clicks, unsubscribes, complaints, conversions; counted by
//! [`crate::events::tally`]) and, for each rate, the Beta posterior's mean and 95% credible
//! interval and the probability that the variant is best.
//!
//! Each rate is k of n with a uniform prior: Beta(1 + k, 1 + n - k); the interval is the
//! posterior's 2.5% and 97.5% quantiles (statrs' inverse CDF). "Best" is the highest rate,
//! except for the bad ones (bounce, unsubscribe, complaint) where it is the lowest; its
//! probability is estimated from [`DRAWS`] joint draws of the posteriors (rand_distr's Beta)
//! with a fixed seed, so the same counts always give the same answer. Rates over sends are
//! open, click, unsubscribe, complaint and conversion; the bounce rate is over every attempt
//! that ended (sends + bounces). k is capped at n (an open of mail whose delivery is not
//! counted yet cannot make a rate above 1).

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_distr::Distribution;
use serde::Serialize;
use statrs::distribution::{Beta, ContinuousCDF};

use crate::events::tally::Counts;

/// Monte Carlo draws for the probability of being best.
pub const DRAWS: usize = 10_000;
const SEED: u64 = 17;

/// The rates reported, with whether higher is better.
pub const RATES: [(&str, bool); 6] = [
    ("open", true),
    ("click", true),
    ("conversion", true),
    ("unsubscribe", false),
    ("complaint", false),
    ("bounce", false),
];

/// One rate of one variant.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    /// Successes and trials it is computed from.
    pub k: u64,
    pub n: u64,
    /// Posterior mean.
    pub mean: f64,
    /// 95% credible interval.
    pub low: f64,
    pub high: f64,
    /// Probability that this variant has the best rate (among the variants reported).
    pub best: f64,
}

/// One variant's results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VariantResults {
    pub variant: String,
    #[serde(flatten)]
    pub counts: Counts,
    pub rates: BTreeMap<&'static str, Rate>,
}

fn trials(name: &str, c: &Counts) -> (u64, u64) {
    let n = c.sends;
    let k = match name {
        "open" => c.human_opens,
        "click" => c.clicks,
        "conversion" => c.conversions,
        "unsubscribe" => c.unsubscribes,
        "complaint" => c.complaints,
        _ => return (c.bounces, c.sends + c.bounces),
    };
    (k.min(n), n)
}

/// The results of `variants` (in this order) from their counts.
pub fn compute(variants: &[(String, Counts)]) -> Vec<VariantResults> {
    let mut out: Vec<VariantResults> = variants
        .iter()
        .map(|(v, c)| VariantResults {
            variant: v.clone(),
            counts: *c,
            rates: BTreeMap::new(),
        })
        .collect();
    for (name, higher_is_better) in RATES {
        let params: Vec<(u64, u64, f64, f64)> = variants
            .iter()
            .map(|(_, c)| {
                let (k, n) = trials(name, c);
                (k, n, 1.0 + k as f64, 1.0 + (n - k) as f64)
            })
            .collect();
        let best = best_probabilities(&params, higher_is_better);
        for ((r, (k, n, a, b)), best) in out.iter_mut().zip(params).zip(best) {
            let beta = Beta::new(a, b).expect("parameters are at least 1");
            r.rates.insert(
                name,
                Rate {
                    k,
                    n,
                    mean: a / (a + b),
                    low: beta.inverse_cdf(0.025),
                    high: beta.inverse_cdf(0.975),
                    best,
                },
            );
        }
    }
    out
}

/// For each posterior Beta(a, b) in `params`, the share of joint draws in which it is the
/// best (ties split).
fn best_probabilities(params: &[(u64, u64, f64, f64)], higher_is_better: bool) -> Vec<f64> {
    if params.is_empty() {
        return Vec::new();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    let dists: Vec<rand_distr::Beta<f64>> = params
        .iter()
        .map(|&(_, _, a, b)| rand_distr::Beta::new(a, b).expect("parameters are at least 1"))
        .collect();
    let mut wins = vec![0.0; params.len()];
    let mut draw = vec![0.0; params.len()];
    for _ in 0..DRAWS {
        for (x, d) in draw.iter_mut().zip(&dists) {
            let v = d.sample(&mut rng);
            *x = if higher_is_better { v } else { -v };
        }
        let top = draw.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let tied = draw.iter().filter(|&&x| x == top).count() as f64;
        for (w, &x) in wins.iter_mut().zip(&draw) {
            if x == top {
                *w += 1.0 / tied;
            }
        }
    }
    wins.into_iter().map(|w| w / DRAWS as f64).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(sends: u64, opens: u64) -> Counts {
        Counts {
            sends,
            human_opens: opens,
            ..Counts::default()
        }
    }

    #[test]
    fn posterior_mean_and_interval_match_the_beta_distribution() {
        let r = compute(&[("a".into(), counts(100, 20))]);
        let open = r[0].rates["open"];
        assert_eq!((open.k, open.n), (20, 100));
        // Beta(21, 81): mean 21/102; its 95% interval is about [0.134, 0.290].
        assert!((open.mean - 21.0 / 102.0).abs() < 1e-12);
        assert!((open.low - 0.1344).abs() < 0.002, "{open:?}");
        assert!((open.high - 0.2903).abs() < 0.002, "{open:?}");
        assert_eq!(open.best, 1.0, "one variant is always best");
        // No data: the uniform prior.
        let none = compute(&[("a".into(), Counts::default())])[0].rates["click"];
        assert_eq!(none.mean, 0.5);
        assert!((none.low - 0.025).abs() < 1e-9 && (none.high - 0.975).abs() < 1e-9);
    }

    #[test]
    fn the_clearly_better_variant_is_most_probably_best_and_probabilities_sum_to_one() {
        let r = compute(&[
            ("a".into(), counts(1000, 100)),
            ("b".into(), counts(1000, 150)),
            ("c".into(), counts(1000, 100)),
        ]);
        let best: Vec<f64> = r.iter().map(|v| v.rates["open"].best).collect();
        assert!(best[1] > 0.99, "{best:?}");
        assert!((best.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{best:?}");
        // Equal counts: about even, and deterministic (seeded).
        let again = compute(&[
            ("a".into(), counts(1000, 100)),
            ("b".into(), counts(1000, 150)),
            ("c".into(), counts(1000, 100)),
        ]);
        assert_eq!(r, again);
        assert!((best[0] - best[2]).abs() < 0.01, "{best:?}");
        // Lower is better for complaints: fewer complaints wins.
        let mut few = counts(1000, 0);
        few.complaints = 1;
        let mut many = counts(1000, 0);
        many.complaints = 20;
        let r = compute(&[("few".into(), few), ("many".into(), many)]);
        assert!(r[0].rates["complaint"].best > 0.99);
    }

    #[test]
    fn rates_never_exceed_one_and_bounces_count_against_attempts() {
        let mut c = counts(2, 5);
        c.bounces = 2;
        let r = compute(&[("a".into(), c)]);
        assert_eq!((r[0].rates["open"].k, r[0].rates["open"].n), (2, 2));
        assert_eq!((r[0].rates["bounce"].k, r[0].rates["bounce"].n), (2, 4));
    }
}
