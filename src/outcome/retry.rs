//! The retry schedule: when a temporarily failed message is tried again, when it expires,
//! and when its sender is told that it is late.
//!
//! Everything here is a pure function of the envelope, the config and `now` (unix ms) passed
//! in by the caller; nothing reads a clock, so the schedule is tested without waiting.
//!
//! Invariants:
//! - delays grow geometrically from `retry_initial` by `retry_factor` and never exceed
//!   `retry_max`, for any attempt count (no overflow, no panic);
//! - no attempt is ever scheduled after `expires_ms`: the last retry is pulled in to happen
//!   exactly at expiry, and a failure at or after expiry expires the message.

use std::time::Duration;

use tern_queue::Envelope;

use crate::config::DeliveryConfig;

/// Delay before the next attempt after `attempts` failures so far (`attempts` >= 1; 0 is
/// treated as 1): `retry_initial * retry_factor^(attempts - 1)`, capped at `retry_max`.
pub fn retry_delay(attempts: u32, cfg: &DeliveryConfig) -> Duration {
    let mut delay = cfg.retry_initial.min(cfg.retry_max);
    // Multiplying step by step and stopping at the cap bounds the loop: with a factor of 2 or
    // more the delay reaches any cap (or saturates at Duration::MAX) within ~100 steps, so
    // even u32::MAX attempts cost almost nothing; a factor of 1 keeps the delay constant.
    for _ in 1..attempts {
        if delay >= cfg.retry_max || cfg.retry_factor <= 1 {
            break;
        }
        delay = delay.saturating_mul(cfg.retry_factor).min(cfg.retry_max);
    }
    delay
}

/// What to do with a message after a temporary failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deferral {
    /// Try again at this unix ms.
    RetryAt(u64),
    /// The message is out of time: its pending recipients expire (and get a DSN).
    Expire,
}

/// The next step after a temporary failure at `now_ms`.
///
/// `env.attempts` must already count the attempt that just failed (the caller records the
/// attempt, then asks when to retry), so the first failure waits `retry_initial`.
///
/// At or after `expires_ms` the message expires. Before it, the retry is due after
/// [`retry_delay`], but never later than `expires_ms`: an attempt that would fall beyond
/// expiry is moved to the expiry instant instead of being dropped, so every message gets one
/// last try at the end of its lifetime before it is given up.
pub fn after_temporary_failure(env: &Envelope, now_ms: u64, cfg: &DeliveryConfig) -> Deferral {
    if now_ms >= env.expires_ms {
        return Deferral::Expire;
    }
    let delay_ms = u64::try_from(retry_delay(env.attempts, cfg).as_millis()).unwrap_or(u64::MAX);
    Deferral::RetryAt(now_ms.saturating_add(delay_ms).min(env.expires_ms))
}

/// Whether the one "delayed" DSN for this message is due at `now_ms`: delay notices are
/// enabled, none was sent yet, and the message has waited at least `delay_notice_after`
/// since it arrived. Which recipients asked for it (NOTIFY=DELAY) is the DSN builder's call.
pub fn delay_notice_due(
    env: &Envelope,
    delay_notice_sent: bool,
    now_ms: u64,
    cfg: &DeliveryConfig,
) -> bool {
    match cfg.delay_notice_after {
        Some(after) if !delay_notice_sent => {
            u128::from(now_ms.saturating_sub(env.created_ms)) >= after.as_millis()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_queue::{BodyType, Recipient, Source};

    const MIN: u64 = 60_000;

    fn envelope(created_ms: u64, expires_ms: u64, attempts: u32) -> Envelope {
        Envelope {
            id: "0006123ABCDEF012".parse().unwrap(),
            queue_id: "0006123ABCDEF012".parse().unwrap(),
            sender: "s@example.org".into(),
            destination: "example.net".into(),
            recipients: vec![Recipient::new("r@example.net".into())],
            env_id: None,
            ret: None,
            body_type: BodyType::SevenBit,
            smtputf8: false,
            size: 1,
            created_ms,
            expires_ms,
            next_due_ms: created_ms,
            attempts,
            source: Source {
                client_ip: "192.0.2.1".into(),
                helo: "h".into(),
                auth_user: None,
                protocol: "ESMTP".into(),
            },
            held: false,
            delay_notified: false,
            parked: false,
            pool: None,
            not_before_ms: 0,
            body_id: None,
            campaign: None,
            send_time_planned: false,
        }
    }

    fn minutes(attempts: u32, cfg: &DeliveryConfig) -> u64 {
        retry_delay(attempts, cfg).as_secs() / 60
    }

    #[test]
    fn default_schedule_doubles_up_to_four_hours() {
        let cfg = DeliveryConfig::default();
        let schedule: Vec<u64> = (1..=9).map(|n| minutes(n, &cfg)).collect();
        assert_eq!(schedule, [5, 10, 20, 40, 80, 160, 240, 240, 240]);
        assert_eq!(minutes(0, &cfg), 5, "0 attempts is treated as the first");
    }

    #[test]
    fn cap_and_factor() {
        let cfg = DeliveryConfig {
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(1000),
            retry_factor: 3,
            ..DeliveryConfig::default()
        };
        let secs: Vec<u64> = (1..=6).map(|n| retry_delay(n, &cfg).as_secs()).collect();
        assert_eq!(secs, [60, 180, 540, 1000, 1000, 1000]);

        let constant = DeliveryConfig {
            retry_factor: 1,
            ..cfg.clone()
        };
        assert_eq!(retry_delay(50, &constant), Duration::from_secs(60));
    }

    #[test]
    fn huge_attempt_counts_stay_capped() {
        let mut cfg = DeliveryConfig::default();
        assert_eq!(retry_delay(u32::MAX, &cfg), cfg.retry_max);
        // A cap far beyond what doubling reaches quickly: the multiplication saturates
        // instead of overflowing.
        cfg.retry_initial = Duration::from_nanos(1);
        cfg.retry_max = Duration::MAX;
        cfg.retry_factor = 10;
        assert_eq!(retry_delay(u32::MAX, &cfg), Duration::MAX);
        let env = envelope(0, u64::MAX, u32::MAX);
        assert_eq!(
            after_temporary_failure(&env, 1, &cfg),
            Deferral::RetryAt(u64::MAX)
        );
    }

    #[test]
    fn retry_is_scheduled_after_the_delay() {
        let cfg = DeliveryConfig::default();
        let env = envelope(0, 1000 * MIN, 1);
        assert_eq!(
            after_temporary_failure(&env, 7 * MIN, &cfg),
            Deferral::RetryAt(12 * MIN)
        );
        let env = envelope(0, 1000 * MIN, 3);
        assert_eq!(
            after_temporary_failure(&env, 100 * MIN, &cfg),
            Deferral::RetryAt(120 * MIN)
        );
    }

    #[test]
    fn last_retry_happens_at_expiry_then_expires() {
        let cfg = DeliveryConfig::default();
        let env = envelope(0, 100 * MIN, 7); // next delay 240m, far beyond expiry
        assert_eq!(
            after_temporary_failure(&env, 90 * MIN, &cfg),
            Deferral::RetryAt(100 * MIN)
        );
        assert_eq!(
            after_temporary_failure(&env, 100 * MIN, &cfg),
            Deferral::Expire
        );
        assert_eq!(
            after_temporary_failure(&env, 101 * MIN, &cfg),
            Deferral::Expire
        );
    }

    #[test]
    fn delay_notice() {
        let cfg = DeliveryConfig::default(); // 4h
        let env = envelope(10 * MIN, 10_000 * MIN, 3);
        assert!(!delay_notice_due(
            &env,
            false,
            10 * MIN + 240 * MIN - 1,
            &cfg
        ));
        assert!(delay_notice_due(&env, false, 10 * MIN + 240 * MIN, &cfg));
        assert!(!delay_notice_due(&env, true, 10 * MIN + 300 * MIN, &cfg));
        // a clock behind the arrival time is not a reason to notify
        assert!(!delay_notice_due(&env, false, 0, &cfg));
        let off = DeliveryConfig {
            delay_notice_after: None,
            ..cfg
        };
        assert!(!delay_notice_due(&env, false, u64::MAX, &off));
    }
}
