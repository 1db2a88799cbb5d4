//! The re-engagement lifecycle: each recipient's state from the engagement model's
//! prediction and their history, and the win-back series (pure; [`super::SendTime`] applies
//! it at refit and when the sidecar asks).
//!
//! ```text
//! active --prediction < at_risk_below--> at_risk
//!   --no engagement for dormant_after, or prediction < dormant_below after
//!     dormant_min_sends unanswered sends--> dormant
//!   --mail from an identity with a win-back campaign--> win_back (series send 1 of winback_sends)
//!   --a human open or click--> active (reactivated; a `sunset` suppression is lifted)
//!   --winback_sends sends, winback_interval after the last, no engagement--> sunset (suppressed;
//!     with sunset_after set, not before it: dormant until then, without a second series)
//! dormant for longer than sunset_after without a series running --> sunset (as without win-back)
//! ```
//!
//! Invariants: a series is never longer than `winback_sends` sends nor denser than one per
//! `winback_interval`; a recipient is in a series from its first send until they engage
//! (`last_engaged_ms >= started_ms`) or it fails; the record lives in the recipient's
//! profile, so it is shared by a fleet with the profile and erased with it.

use super::profile::{Profile, Reader};
use crate::config::SendTimeConfig;

/// The lifecycle record kept in a profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WinBack {
    /// Unix ms of the current (or last) series' first send; 0: never in one.
    pub started_ms: u64,
    /// Sends of that series so far.
    pub sends: u8,
    /// Unix ms of its latest send.
    pub last_ms: u64,
    /// Series that ended in an engagement, ever.
    pub reactivations: u16,
}

impl WinBack {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.started_ms.to_le_bytes());
        out.push(self.sends);
        out.extend_from_slice(&self.last_ms.to_le_bytes());
        out.extend_from_slice(&self.reactivations.to_le_bytes());
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Option<WinBack> {
        Some(WinBack {
            started_ms: u64::from_le_bytes(r.take()?),
            sends: r.take::<1>()?[0],
            last_ms: u64::from_le_bytes(r.take()?),
            reactivations: u16::from_le_bytes(r.take()?),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Active,
    AtRisk,
    Dormant,
    WinBack,
    /// Suppressed with reason `sunset`, or due to be at the next refit.
    Sunset,
}

/// The thresholds of `[sendtime]` the states use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    pub at_risk_below: f64,
    pub dormant_below: f64,
    pub dormant_min_sends: u32,
    pub dormant_after_ms: u64,
    /// `None`: no sunset of dormant recipients outside a win-back series.
    pub sunset_after_ms: Option<u64>,
    pub winback_sends: u8,
    pub winback_interval_ms: u64,
}

impl From<&SendTimeConfig> for Thresholds {
    fn from(c: &SendTimeConfig) -> Thresholds {
        Thresholds {
            at_risk_below: c.at_risk_below,
            dormant_below: c.dormant_below,
            dormant_min_sends: c.dormant_min_sends,
            dormant_after_ms: c.dormant_after.as_millis() as u64,
            sunset_after_ms: c.sunset_after.map(|d| d.as_millis() as u64),
            winback_sends: c.winback_sends,
            winback_interval_ms: c.winback_interval.as_millis() as u64,
        }
    }
}

/// Whether a series is running: started, and no engagement since.
pub fn in_series(p: &Profile) -> bool {
    p.winback.started_ms > 0 && p.last_engaged_ms < p.winback.started_ms
}

/// Whether the recipient engaged after the start of their latest series.
pub fn reactivated(p: &Profile) -> bool {
    p.winback.started_ms > 0 && p.last_engaged_ms >= p.winback.started_ms
}

/// `p`'s state at `now_ms` with engagement `prediction`; `sunset_suppressed`: the
/// suppression list holds a `sunset` entry for them.
pub fn state(
    p: &Profile,
    prediction: f64,
    sunset_suppressed: bool,
    now_ms: u64,
    t: &Thresholds,
) -> State {
    if sunset_suppressed {
        return State::Sunset;
    }
    let quiet_for = now_ms.saturating_sub(p.dormant_since());
    if in_series(p) {
        let w = &p.winback;
        let failed = w.sends >= t.winback_sends && now_ms >= w.last_ms + t.winback_interval_ms;
        // A failed series sunsets, but never before `sunset_after` (the operator's own
        // limit): until then the recipient stays dormant and gets no second series.
        return match (failed, t.sunset_after_ms) {
            (false, _) => State::WinBack,
            (true, Some(after)) if quiet_for <= after => State::Dormant,
            (true, _) => State::Sunset,
        };
    }
    if t.sunset_after_ms
        .is_some_and(|after| p.has_history() && quiet_for > after)
    {
        return State::Sunset;
    }
    let dormant = (p.has_history() && quiet_for > t.dormant_after_ms)
        || (prediction < t.dormant_below && p.sends_since_engaged >= t.dormant_min_sends);
    if dormant {
        State::Dormant
    } else if prediction < t.at_risk_below {
        State::AtRisk
    } else {
        State::Active
    }
}

/// Whether mail from an identity with a win-back campaign, at `now_ms`, should be the next
/// win-back send: the recipient is dormant (a series starts) or in a series whose next
/// send is due.
pub fn winback_due(state: State, p: &Profile, now_ms: u64, t: &Thresholds) -> bool {
    match state {
        // Dormant after a failed series: no second one.
        State::Dormant => !in_series(p),
        State::WinBack => {
            p.winback.sends < t.winback_sends && now_ms >= p.winback.last_ms + t.winback_interval_ms
        }
        _ => false,
    }
}

/// Records a win-back send at `now_ms` (the first of a new series unless one is running).
pub fn record_winback_send(p: &mut Profile, now_ms: u64) {
    if !in_series(p) {
        if reactivated(p) {
            p.winback.reactivations = p.winback.reactivations.saturating_add(1);
        }
        p.winback = WinBack {
            started_ms: now_ms,
            sends: 0,
            last_ms: 0,
            reactivations: p.winback.reactivations,
        };
    }
    p.winback.sends = p.winback.sends.saturating_add(1);
    p.winback.last_ms = now_ms;
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: u64 = 86_400_000;
    const T0: u64 = 1_700_000_000_000;

    fn thresholds() -> Thresholds {
        Thresholds::from(&SendTimeConfig {
            sunset_after: Some(std::time::Duration::from_secs(365 * 86_400)),
            ..SendTimeConfig::default()
        })
    }

    fn engaged_then_silent(silent_days: u64) -> Profile {
        let mut p = Profile::default();
        p.record_send(T0);
        p.record_engagement(T0 + 3_600_000);
        for w in 0..silent_days / 7 {
            p.record_send(T0 + (w + 1) * 7 * DAY);
        }
        p
    }

    #[test]
    fn states_follow_prediction_and_history() {
        let t = thresholds();
        let p = engaged_then_silent(14);
        assert_eq!(state(&p, 0.2, false, T0 + 15 * DAY, &t), State::Active);
        assert_eq!(state(&p, 0.02, false, T0 + 15 * DAY, &t), State::AtRisk);
        // Low prediction but too few unanswered sends: at risk, not dormant.
        assert_eq!(state(&p, 0.001, false, T0 + 15 * DAY, &t), State::AtRisk);
        let p = engaged_then_silent(70);
        assert_eq!(state(&p, 0.001, false, T0 + 71 * DAY, &t), State::Dormant);
        // Silent beyond dormant_after (180d) whatever the prediction.
        assert_eq!(state(&p, 0.5, false, T0 + 200 * DAY, &t), State::Dormant);
        // Beyond sunset_after without a series: sunset, as without win-back.
        assert_eq!(state(&p, 0.5, false, T0 + 400 * DAY, &t), State::Sunset);
        assert_eq!(state(&p, 0.5, true, T0 + 15 * DAY, &t), State::Sunset);
    }

    #[test]
    fn a_series_is_paced_capped_and_ends_in_reactivation_or_sunset() {
        let t = thresholds();
        let mut p = engaged_then_silent(70);
        let mut now = T0 + 71 * DAY;
        let mut sent = 0;
        // Mail every day for 60 days: at most 3 series sends, a week apart.
        for _ in 0..60 {
            let s = state(&p, 0.001, false, now, &t);
            assert_ne!(s, State::Active);
            if winback_due(s, &p, now, &t) {
                if sent > 0 {
                    assert!(now >= p.winback.last_ms + t.winback_interval_ms);
                }
                record_winback_send(&mut p, now);
                sent += 1;
            }
            now += DAY;
        }
        assert_eq!(sent, 3);
        // Failed: sunset, but not before sunset_after (365d); dormant until then, no new
        // series; without sunset_after at once.
        assert_eq!(state(&p, 0.001, false, now, &t), State::Dormant);
        assert!(!winback_due(State::Dormant, &p, now, &t));
        assert_eq!(state(&p, 0.001, false, T0 + 400 * DAY, &t), State::Sunset);
        let no_sunset_after = Thresholds {
            sunset_after_ms: None,
            ..t
        };
        assert_eq!(
            state(&p, 0.001, false, now, &no_sunset_after),
            State::Sunset
        );
        // An engagement at any point of a series: active again, counted once.
        let mut q = engaged_then_silent(70);
        record_winback_send(&mut q, T0 + 71 * DAY);
        assert_eq!(state(&q, 0.001, false, T0 + 72 * DAY, &t), State::WinBack);
        q.record_engagement(T0 + 73 * DAY);
        assert!(reactivated(&q));
        assert_eq!(state(&q, 0.3, false, T0 + 74 * DAY, &t), State::Active);
        assert_eq!(
            super::super::profile::Profile::decode(&q.encode()).unwrap(),
            q
        );
        // Dormant again later: a new series, the reactivation counted.
        record_winback_send(&mut q, T0 + 300 * DAY);
        assert_eq!(
            (q.winback.sends, q.winback.reactivations),
            (1, 1),
            "{:?}",
            q.winback
        );
    }
}
