//! What a recipient's result says about our sending rate, and the AIMD rate that follows.
//!
//! Shaping reads no reply text: it takes the bounce category the delivery worker gave the
//! result (`RcptOutcome::category`, the same the delivery log and suppression use), so which
//! wording throttles or blocks is decided by the classification rules (`config/bounce-rules.toml`,
//! `bounce.rules`, and `shaping.adaptive.throttle_patterns` / `block_patterns`). A temporary
//! `rate_limited` failure is *throttling*; a `spam_block` failure, temporary or permanent, is a
//! *block* ([`signal`]).
//!
//! [`Aimd`] is pure (time is passed in): a throttle multiplies the rate by `decrease` (at most
//! once per window, never below `floor` times the configured rate); each full window without
//! throttling adds `increase` times the configured rate, up to the configured rate.

use crate::config::AdaptiveConfig;
use crate::delivery::worker::Verdict;
use crate::taxonomy::Category;
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// Delivered, or a failure that says nothing about our sending rate.
    Neutral,
    Throttle,
    Block,
}

/// The signal of one recipient's result. A permanent `rate_limited` failure refused the
/// message; it does not ask us to slow down.
pub fn signal(verdict: Verdict, category: Category) -> Signal {
    match (verdict, category) {
        (Verdict::Delivered, _) => Signal::Neutral,
        (_, Category::SpamBlock) => Signal::Block,
        (Verdict::Temporary, Category::RateLimited) => Signal::Throttle,
        _ => Signal::Neutral,
    }
}

/// The adaptive message rate of one pair, in messages per second.
#[derive(Debug, Clone)]
pub struct Aimd {
    /// The configured rate: the ceiling.
    pub max: f64,
    pub current: f64,
    last_change: Instant,
}

impl Aimd {
    pub fn new(max: f64, now: Instant) -> Aimd {
        Aimd {
            max,
            current: max,
            last_change: now,
        }
    }

    /// A throttling reply; returns the new rate when it changed.
    pub fn throttled(&mut self, config: &AdaptiveConfig, now: Instant) -> Option<f64> {
        let floor = self.max * config.floor;
        // Replies to messages already in flight when the first one came say nothing new.
        if self.current < self.max && now.duration_since(self.last_change) < config.window {
            return None;
        }
        let next = (self.current * config.decrease).max(floor);
        self.last_change = now;
        (next != self.current).then(|| {
            self.current = next;
            next
        })
    }

    /// A success; returns the new rate when a full window passed since the last change.
    pub fn succeeded(&mut self, config: &AdaptiveConfig, now: Instant) -> Option<f64> {
        if self.current >= self.max || now.duration_since(self.last_change) < config.window {
            return None;
        }
        self.current = (self.current + self.max * config.increase).min(self.max);
        self.last_change = now;
        Some(self.current)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delivery::client::RemoteReply;
    use crate::delivery::worker::RcptOutcome;
    use std::time::Duration;

    /// The replies shaping's own patterns used to classify, now read through the bounce
    /// taxonomy (an operator pattern included): the same signals.
    #[test]
    fn replies_are_classified() {
        let c = crate::bounce::classify::Classifier::with_rules(
            AdaptiveConfig {
                throttle_patterns: vec!["slow down please".into()],
                ..AdaptiveConfig::default()
            }
            .classification_rules(),
        );
        // As the delivery worker sees and classifies it.
        let classify = |reply: &str, status: &str| {
            let (code, rest) = reply.split_once(' ').unwrap();
            let text = rest.strip_prefix(status).unwrap().trim_start();
            let reply = RemoteReply {
                code: code.parse().unwrap(),
                status: Some(status.into()),
                text: text.into(),
            };
            let o = RcptOutcome::of_reply(0, &reply, &c);
            signal(o.verdict, o.category)
        };
        assert_eq!(classify("250 2.0.0 Ok", "2.0.0"), Signal::Neutral);
        assert_eq!(classify("421 4.3.0 closing", "4.3.0"), Signal::Throttle);
        assert_eq!(
            classify("450 4.7.28 unusual rate of mail", "4.7.28"),
            Signal::Throttle
        );
        assert_eq!(
            classify("451 4.3.0 Please SLOW DOWN PLEASE", "4.3.0"),
            Signal::Throttle
        );
        assert_eq!(classify("451 4.3.0 disk full", "4.3.0"), Signal::Neutral);
        assert_eq!(
            classify("550 5.7.1 Service unavailable; listed by Spamhaus", "5.7.1"),
            Signal::Block
        );
        assert_eq!(classify("550 5.1.1 no such user", "5.1.1"), Signal::Neutral);
        assert_eq!(
            classify("550 5.7.1 try again later", "5.7.1"),
            Signal::Neutral,
            "throttling wording on a 5xx is not throttling"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn multiplicative_decrease_additive_increase() {
        let config = AdaptiveConfig {
            window: Duration::from_secs(10),
            ..AdaptiveConfig::default()
        };
        let mut a = Aimd::new(10.0, Instant::now());
        assert_eq!(a.throttled(&config, Instant::now()), Some(5.0));
        assert_eq!(
            a.throttled(&config, Instant::now()),
            None,
            "once per window"
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(a.succeeded(&config, Instant::now()), Some(5.5));
        assert_eq!(a.succeeded(&config, Instant::now()), None);
        for _ in 0..20 {
            tokio::time::advance(Duration::from_secs(10)).await;
            a.throttled(&config, Instant::now());
        }
        assert_eq!(a.current, 0.5, "never below the floor");
        for _ in 0..40 {
            tokio::time::advance(Duration::from_secs(10)).await;
            a.succeeded(&config, Instant::now());
        }
        assert_eq!(a.current, 10.0, "back to the configured rate, not above");
    }
}
