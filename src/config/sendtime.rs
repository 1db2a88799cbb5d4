//! `[sendtime]`: send-time optimisation (see `crate::sendtime`).

use std::time::Duration;

use super::reader::{count, duration, nonzero, string, TableReader};
use toml::Value;

/// `[sendtime]` in the config; see `config/tern.toml`.
#[derive(Debug, Clone, PartialEq)]
pub struct SendTimeConfig {
    /// How far ahead a send may be moved (`sendtime.window`).
    pub window: Duration,
    /// Local hours `from..to` in which no send starts (`sendtime.quiet_hours`).
    pub quiet_hours: Option<(u8, u8)>,
    /// Share of optimised recipients sent at once as a control group (`sendtime.control_share`).
    pub control_share: f64,
    /// How often the priors are refitted from all profiles (`sendtime.refit_interval`).
    pub refit_interval: Duration,
    /// Recipients without a human engagement for this long are dormant
    /// (`sendtime.dormant_after`).
    pub dormant_after: Duration,
    /// Recipients dormant for longer than this are suppressed with reason `sunset`
    /// (`sendtime.sunset_after`); `None`: no sunset policy.
    pub sunset_after: Option<Duration>,
    /// The lifecycle (see `crate::sendtime::lifecycle`): a predicted engagement below this
    /// makes an active recipient at risk (`sendtime.at_risk_below`).
    pub at_risk_below: f64,
    /// A prediction below this after `dormant_min_sends` unanswered sends makes a recipient
    /// dormant before `dormant_after` (`sendtime.dormant_below`).
    pub dormant_below: f64,
    /// (`sendtime.dormant_min_sends`).
    pub dormant_min_sends: u32,
    /// Win-back sends per series at most (`sendtime.winback_sends`).
    pub winback_sends: u8,
    /// Time between win-back sends, and after the last before the series has failed
    /// (`sendtime.winback_interval`).
    pub winback_interval: Duration,
}

impl Default for SendTimeConfig {
    fn default() -> Self {
        SendTimeConfig {
            window: Duration::from_secs(24 * 3600),
            quiet_hours: Some((22, 7)),
            control_share: 0.1,
            refit_interval: Duration::from_secs(3600),
            dormant_after: Duration::from_secs(180 * 86_400),
            sunset_after: None,
            at_risk_below: 0.05,
            dormant_below: 0.01,
            dormant_min_sends: 5,
            winback_sends: 3,
            winback_interval: Duration::from_secs(7 * 86_400),
        }
    }
}

fn probability(v: &Value) -> Result<f64, String> {
    match v {
        Value::Float(f) if (0.0..1.0).contains(f) => Ok(*f),
        Value::Integer(0) => Ok(0.0),
        _ => Err("expected a probability from 0 up to (not including) 1".to_string()),
    }
}

pub(super) fn compile_sendtime(r: &mut TableReader<'_>) -> SendTimeConfig {
    let d = SendTimeConfig::default();
    let c = SendTimeConfig {
        window: r
            .get("window", |v| {
                duration(v).and_then(nonzero).and_then(|w| {
                    if w > Duration::from_secs(7 * 86_400) {
                        Err("at most 7d: the model sees one week".to_string())
                    } else {
                        Ok(w)
                    }
                })
            })
            .unwrap_or(d.window),
        quiet_hours: r.get("quiet_hours", quiet_hours).unwrap_or(d.quiet_hours),
        control_share: r
            .get("control_share", |v| match v {
                Value::Float(f) if (0.0..=1.0).contains(f) => Ok(*f),
                Value::Integer(i) if (0..=1).contains(i) => Ok(*i as f64),
                _ => Err("expected a number from 0 to 1".to_string()),
            })
            .unwrap_or(d.control_share),
        refit_interval: r
            .get("refit_interval", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.refit_interval),
        dormant_after: r
            .get("dormant_after", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.dormant_after),
        sunset_after: r
            .get("sunset_after", |v| match v {
                Value::String(s) if s == "none" => Ok(None),
                _ => duration(v).and_then(nonzero).map(Some),
            })
            .unwrap_or(d.sunset_after),
        at_risk_below: r
            .get("at_risk_below", probability)
            .unwrap_or(d.at_risk_below),
        dormant_below: r
            .get("dormant_below", probability)
            .unwrap_or(d.dormant_below),
        dormant_min_sends: r
            .get("dormant_min_sends", |v| {
                count(v)
                    .and_then(nonzero)
                    .map(|n| n.min(u32::MAX as usize) as u32)
            })
            .unwrap_or(d.dormant_min_sends),
        winback_sends: r
            .get("winback_sends", |v| match count(v)? {
                n @ 1..=20 => Ok(n as u8),
                n => Err(format!("{n}: expected 1 to 20 sends")),
            })
            .unwrap_or(d.winback_sends),
        winback_interval: r
            .get("winback_interval", |v| duration(v).and_then(nonzero))
            .unwrap_or(d.winback_interval),
    };
    if c.dormant_below > c.at_risk_below {
        r.error(
            "dormant_below",
            format!(
                "{} is above at_risk_below ({}): dormant must be the lower threshold",
                c.dormant_below, c.at_risk_below
            ),
        );
    }
    c
}

/// "22-7" (local hours from..to, wrapping past midnight) or "none".
fn quiet_hours(v: &Value) -> Result<Option<(u8, u8)>, String> {
    let s = string(v)?;
    if s == "none" {
        return Ok(None);
    }
    let bad =
        || format!("expected \"FROM-TO\" hours 0-23 (e.g. \"22-7\") or \"none\", found {s:?}");
    let (from, to) = s.split_once('-').ok_or_else(bad)?;
    let hour = |h: &str| h.trim().parse::<u8>().ok().filter(|h| *h < 24);
    match (hour(from), hour(to)) {
        (Some(f), Some(t)) if f != t => Ok(Some((f, t))),
        _ => Err(bad()),
    }
}
