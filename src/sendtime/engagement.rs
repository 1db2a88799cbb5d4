//! The engagement model: per recipient, the probability that the next send gets a human
//! open or click within [`HORIZON_H`](super::profile::HORIZON_H) hours.
//!
//! Features come from the profile alone ([`features`]): whether the recipient ever engaged,
//! days since the last engagement and since the first record, the decayed engagement and
//! send totals, the smoothed log-odds of engaging, and the sends since the last engagement
//! (logarithms throughout: the effects are multiplicative). The model is
//! a logistic regression fitted at refit time by Newton's method (iteratively reweighted
//! least squares, a light ridge penalty) on one example per recipient: the features their
//! profile had just before its latest send ([`Profile::snapshot`]) and whether that send was
//! engaged with ([`Profile::last_send_opened`]), counted only once the send's horizon has
//! passed (an engaged send is known sooner than an ignored one: counting it early would bias
//! the fit upward).
//!
//! Calibration: a logistic fit with an intercept matches the mean predicted to the observed
//! rate on its training data, and with features this smooth its deciles follow (unit tests
//! below and `tern sidecar simulate --lifecycle` measure it: Brier score and AUC). Eight
//! parameters and a few thousand examples need no numerics crate: the Newton step solves an
//! 8x8 system by Gaussian elimination.
//!
//! Before a fit (fewer than [`MIN_EXAMPLES`] examples or one class missing) [`predict`]
//! falls back to a Beta-Binomial estimate with recency decay: (engagements + 0.5) /
//! (sends + 5), halved every 90 days since the last engagement.
//!
//! [`predict`]: EngagementModel::predict

use super::profile::{Profile, HORIZON_H};

/// Features kept per snapshot.
pub const FEATURES: usize = 7;
/// Examples needed (with at least [`MIN_CLASS`] of each outcome) for a fit.
pub const MIN_EXAMPLES: usize = 50;
const MIN_CLASS: usize = 5;
const NEWTON_ROUNDS: usize = 30;
/// Ridge penalty on the weights (not the intercept), per example.
const RIDGE: f64 = 1e-3;
const DAY_MS: f64 = 86_400_000.0;
const HORIZON_MS: u64 = HORIZON_H as u64 * 3_600_000;

/// One recipient's features at a moment (f32: they are stored in the profile).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Features(pub [f32; FEATURES]);

/// The features of `p` at `t_ms` (before anything at `t_ms` is recorded).
pub fn features(p: &Profile, t_ms: u64) -> Features {
    let days = |from: u64| {
        if from == 0 {
            0.0
        } else {
            t_ms.saturating_sub(from) as f64 / DAY_MS
        }
    };
    let never = p.last_engaged_ms == 0;
    let eng = p.engagement_total_at(t_ms);
    let sends = p.sends_at(t_ms);
    Features([
        f32::from(u8::from(never)),
        if never {
            0.0
        } else {
            days(p.last_engaged_ms).ln_1p() as f32
        },
        days(p.first_ms).ln_1p() as f32,
        eng.ln_1p() as f32,
        sends.ln_1p() as f32,
        // The smoothed log-odds of engaging with a send (engagements can outnumber sends:
        // a click and an open of one message).
        ((eng + 0.5) / ((sends - eng).max(0.0) + 1.0)).ln() as f32,
        (p.sends_since_engaged as f64).ln_1p() as f32,
    ])
}

/// The fitted model (`None`: not fitted, the Beta-Binomial fallback answers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngagementModel {
    /// Intercept first, then one weight per feature.
    pub weights: Option<[f64; FEATURES + 1]>,
    /// Examples of the last fit and their observed engagement rate.
    pub examples: usize,
    pub base_rate: f64,
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn row(f: &Features) -> [f64; FEATURES + 1] {
    let mut x = [1.0; FEATURES + 1];
    for (xi, fi) in x[1..].iter_mut().zip(f.0) {
        *xi = fi as f64;
    }
    x
}

/// The training example of a profile at `now_ms`: its snapshot and outcome, once the
/// outcome is known (the send's horizon passed).
pub fn example(p: &Profile, now_ms: u64) -> Option<(Features, bool)> {
    let f = p.snapshot?;
    (p.last_send_ms > 0 && p.last_send_ms + HORIZON_MS <= now_ms).then_some((f, p.last_send_opened))
}

impl EngagementModel {
    /// Fits on `examples` (see the module doc); too few gives the unfitted model.
    pub fn fit(examples: &[(Features, bool)]) -> EngagementModel {
        let n = examples.len();
        let positives = examples.iter().filter(|e| e.1).count();
        let base_rate = if n == 0 {
            0.0
        } else {
            positives as f64 / n as f64
        };
        if n < MIN_EXAMPLES || positives < MIN_CLASS || n - positives < MIN_CLASS {
            return EngagementModel {
                weights: None,
                examples: n,
                base_rate,
            };
        }
        const K: usize = FEATURES + 1;
        let rows: Vec<([f64; K], f64)> = examples
            .iter()
            .map(|(f, y)| (row(f), f64::from(u8::from(*y))))
            .collect();
        let mut w = [0.0; K];
        w[0] = (base_rate / (1.0 - base_rate)).ln();
        let ridge = RIDGE * n as f64;
        for _ in 0..NEWTON_ROUNDS {
            let mut h = [[0.0; K]; K];
            let mut g = [0.0; K];
            for (x, y) in &rows {
                let p = sigmoid(dot(&w, x));
                let s = (p * (1.0 - p)).max(1e-9);
                for i in 0..K {
                    g[i] += (y - p) * x[i];
                    for j in 0..K {
                        h[i][j] += s * x[i] * x[j];
                    }
                }
            }
            for i in 1..K {
                g[i] -= ridge * w[i];
                h[i][i] += ridge;
            }
            let Some(step) = solve(h, g) else { break };
            let mut largest = 0.0f64;
            for i in 0..K {
                w[i] += step[i];
                largest = largest.max(step[i].abs());
            }
            if largest < 1e-8 {
                break;
            }
        }
        EngagementModel {
            weights: w.iter().all(|x| x.is_finite()).then_some(w),
            examples: n,
            base_rate,
        }
    }

    /// The probability that a send at `now_ms` is engaged with by a human.
    pub fn predict(&self, p: &Profile, now_ms: u64) -> f64 {
        self.predict_features(&features(p, now_ms))
    }

    /// The prediction from features already computed.
    pub fn predict_features(&self, f: &Features) -> f64 {
        match &self.weights {
            Some(w) => sigmoid(dot(w, &row(f))),
            None => {
                // The features are ln(1 + x): undo that for days, engagements and sends.
                let [_, days, _, eng, sends, ..] = f.0.map(|x| (x as f64).exp_m1());
                (eng + 0.5) / (sends + 5.0) * 0.5f64.powf(days / 90.0)
            }
        }
    }
}

fn dot(a: &[f64; FEATURES + 1], b: &[f64; FEATURES + 1]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Solves `a x = b` by Gaussian elimination with partial pivoting; `None` if singular.
fn solve<const K: usize>(mut a: [[f64; K]; K], mut b: [f64; K]) -> Option<[f64; K]> {
    for col in 0..K {
        let pivot = (col..K).max_by(|&i, &j| a[i][col].abs().total_cmp(&a[j][col].abs()))?;
        if a[pivot][col].abs() < 1e-12 {
            return None;
        }
        a.swap(col, pivot);
        b.swap(col, pivot);
        let pivot_row = a[col];
        for r in col + 1..K {
            let f = a[r][col] / pivot_row[col];
            for (x, p) in a[r][col..].iter_mut().zip(&pivot_row[col..]) {
                *x -= f * p;
            }
            b[r] -= f * b[col];
        }
    }
    let mut x = [0.0; K];
    for r in (0..K).rev() {
        let s: f64 = (r + 1..K).map(|c| a[r][c] * x[c]).sum();
        x[r] = (b[r] - s) / a[r][r];
    }
    Some(x)
}

/// Brier score of `predictions` against `outcomes` (mean squared error).
pub fn brier(pairs: &[(f64, bool)]) -> f64 {
    if pairs.is_empty() {
        return 0.0;
    }
    pairs
        .iter()
        .map(|(p, y)| (p - f64::from(u8::from(*y))).powi(2))
        .sum::<f64>()
        / pairs.len() as f64
}

/// Area under the ROC curve (the probability that a random positive is ranked above a
/// random negative; ties count half). 0.5 without both classes.
pub fn auc(pairs: &[(f64, bool)]) -> f64 {
    let mut sorted: Vec<(f64, bool)> = pairs.to_vec();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_sum, mut i) = (0.0, 0);
    while i < sorted.len() {
        let mut j = i;
        while j < sorted.len() && sorted[j].0 == sorted[i].0 {
            j += 1;
        }
        // Tied scores share the mean of ranks i+1..=j.
        let mean_rank = (i + 1 + j) as f64 / 2.0;
        rank_sum += mean_rank * sorted[i..j].iter().filter(|x| x.1).count() as f64;
        i = j;
    }
    let pos = sorted.iter().filter(|x| x.1).count() as f64;
    let neg = sorted.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    const DAY: u64 = 86_400_000;

    /// A synthetic audience: each user has a hidden open probability that decays by a hidden
    /// factor per weekly send; profiles are built by the real updates. Returns (profile at
    /// the end, the true probability of the next send).
    fn audience(seed: u64, users: usize) -> Vec<(Profile, f64)> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..users)
            .map(|_| {
                let mut q: f64 = rng.gen::<f64>().powi(2) * 0.6;
                let fade: f64 = if rng.gen::<bool>() {
                    1.0
                } else {
                    rng.gen_range(0.7..0.95)
                };
                let mut p = Profile::default();
                let start = 1_700_000_000_000 + rng.gen_range(0..7) * DAY;
                let weeks = rng.gen_range(4..30);
                for w in 0..weeks {
                    let t = start + w * 7 * DAY;
                    p.record_send(t);
                    if rng.gen::<f64>() < q {
                        p.record_engagement(t + rng.gen_range(1..48) * 3_600_000);
                    }
                    q *= fade;
                }
                (p, q)
            })
            .collect()
    }

    fn training(seed: u64, users: usize) -> Vec<(Features, bool)> {
        let now = 1_700_000_000_000 + 400 * DAY;
        audience(seed, users)
            .iter()
            .filter_map(|(p, _)| example(p, now))
            .collect()
    }

    #[test]
    fn fit_is_calibrated_and_beats_the_base_rate_on_fresh_users() {
        let model = EngagementModel::fit(&training(1, 4000));
        assert!(model.weights.is_some());
        // Fresh users: their next send, drawn from the hidden probability.
        let mut rng = StdRng::seed_from_u64(99);
        let test = audience(2, 4000);
        let pairs: Vec<(f64, bool)> = test
            .iter()
            .map(|(p, q)| {
                let t = p.last_send_ms + 7 * DAY;
                (model.predict(p, t), rng.gen::<f64>() < *q)
            })
            .collect();
        let rate = pairs.iter().filter(|x| x.1).count() as f64 / pairs.len() as f64;
        let base: Vec<(f64, bool)> = pairs.iter().map(|&(_, y)| (rate, y)).collect();
        // The best any model could do: the hidden probability itself.
        let mut rng = StdRng::seed_from_u64(99);
        let oracle: Vec<(f64, bool)> = test
            .iter()
            .map(|(_, q)| (*q, rng.gen::<f64>() < *q))
            .collect();
        let (b, b0, best) = (brier(&pairs), brier(&base), brier(&oracle));
        eprintln!(
            "Brier {b:.4}, base rate {b0:.4}, oracle {best:.4}, AUC {:.3}",
            auc(&pairs)
        );
        assert!(
            b0 - b > 0.7 * (b0 - best),
            "Brier {b:.4} vs base rate {b0:.4}, oracle {best:.4}"
        );
        assert!(auc(&pairs) > 0.75, "AUC {}", auc(&pairs));
        // Calibration: in each fifth of the predictions, mean predicted ≈ observed.
        let mut sorted = pairs.clone();
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        for chunk in sorted.chunks(sorted.len() / 5) {
            let mean_p = chunk.iter().map(|x| x.0).sum::<f64>() / chunk.len() as f64;
            let observed = chunk.iter().filter(|x| x.1).count() as f64 / chunk.len() as f64;
            assert!(
                (mean_p - observed).abs() < 0.04,
                "bin predicted {mean_p:.3}, observed {observed:.3}"
            );
        }
    }

    #[test]
    fn too_few_examples_fall_back_and_the_fallback_decays_with_recency() {
        let model = EngagementModel::fit(&training(3, 20));
        assert_eq!(model.weights, None);
        let mut p = Profile::default();
        let t0 = 1_700_000_000_000;
        for w in 0..10 {
            p.record_send(t0 + w * 7 * DAY);
            p.record_engagement(t0 + w * 7 * DAY + 3_600_000);
        }
        let soon = model.predict(&p, t0 + 70 * DAY);
        let later = model.predict(&p, t0 + 250 * DAY);
        assert!(soon > 0.4 && later < soon / 2.0, "{soon} {later}");
        // One class only: no fit either.
        let all_yes: Vec<(Features, bool)> = training(4, 200)
            .into_iter()
            .map(|(f, _)| (f, true))
            .collect();
        assert_eq!(EngagementModel::fit(&all_yes).weights, None);
    }

    #[test]
    fn an_unfinished_send_is_not_an_example_yet() {
        let mut p = Profile::default();
        let t = 1_700_000_000_000;
        p.record_send(t);
        assert_eq!(example(&p, t + 3_600_000), None, "horizon not passed");
        assert!(example(&p, t + HORIZON_MS).is_some_and(|(_, y)| !y));
        p.record_engagement(t + 7_200_000);
        assert!(example(&p, t + HORIZON_MS).is_some_and(|(_, y)| y));
        // The snapshot predates the engagement that answered the send.
        assert_eq!(
            p.snapshot.unwrap().0[0],
            1.0,
            "never engaged before the send"
        );
    }

    #[test]
    fn auc_and_brier_on_known_cases() {
        let perfect = [(0.9, true), (0.8, true), (0.2, false), (0.1, false)];
        assert_eq!(auc(&perfect), 1.0);
        let reversed = [(0.1, true), (0.9, false)];
        assert_eq!(auc(&reversed), 0.0);
        let tied = [(0.5, true), (0.5, false)];
        assert_eq!(auc(&tied), 0.5);
        assert!((brier(&[(1.0, false), (1.0, true)]) - 0.5).abs() < 1e-12);
    }
}
