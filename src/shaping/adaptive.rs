//! Reading remote replies for shaping, and the AIMD rate that follows from them.
//!
//! A reply is *throttling* when it is 421, has an enhanced status 4.7.x, or is a 4xx whose
//! text contains a throttling pattern; it is a *block* when a 4xx/5xx text contains a block
//! pattern (reputation and blocklist rejections). Patterns are case-insensitive substrings:
//! the built-in ones below, plus `shaping.adaptive.throttle_patterns` / `block_patterns`.
//!
//! [`Aimd`] is pure (time is passed in): a throttle multiplies the rate by `decrease` (at most
//! once per window, never below `floor` times the configured rate); each full window without
//! throttling adds `increase` times the configured rate, up to the configured rate.

use crate::config::AdaptiveConfig;
use tokio::time::Instant;

/// Big providers' wording for "slow down" (Gmail 4.7.28, Yahoo TS0x, Microsoft 4.7.650...).
const THROTTLE_PATTERNS: &[&str] = &[
    "rate limit",
    "too many connections",
    "too many messages",
    "try again later",
    "temporarily deferred",
    "temporarily rate limited",
    "unusual rate",
    "4.7.28",
    "4.7.650",
    "[ts01]",
    "[ts02]",
    "throttl",
];

/// Reputation blocks and blocklists.
const BLOCK_PATTERNS: &[&str] = &[
    "spamhaus",
    "blocked",
    "blacklist",
    "blocklist",
    "poor reputation",
    "bad reputation",
    "banned",
    "5.7.606",
    "5.7.511",
    "s3150",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Signal {
    /// Delivered, or a failure that says nothing about our sending rate.
    Neutral,
    Throttle,
    Block,
}

pub struct Classifier {
    throttle: Vec<String>,
    block: Vec<String>,
}

impl Classifier {
    pub fn new(config: &AdaptiveConfig) -> Classifier {
        let with = |builtin: &[&str], extra: &[String]| {
            builtin
                .iter()
                .map(|s| s.to_string())
                .chain(extra.iter().cloned())
                .collect()
        };
        Classifier {
            throttle: with(THROTTLE_PATTERNS, &config.throttle_patterns),
            block: with(BLOCK_PATTERNS, &config.block_patterns),
        }
    }

    /// `reply` is the remote reply as text ("421 4.7.0 Try again later"), `status` its
    /// enhanced status code.
    pub fn classify(&self, reply: &str, status: &str) -> Signal {
        let code = reply.get(..3).and_then(|c| c.parse::<u16>().ok());
        let Some(code @ 400..=599) = code else {
            return Signal::Neutral;
        };
        let text = reply.to_ascii_lowercase();
        if self.block.iter().any(|p| text.contains(p.as_str())) {
            return Signal::Block;
        }
        if code >= 500 {
            return Signal::Neutral;
        }
        if code == 421
            || status.starts_with("4.7.")
            || self.throttle.iter().any(|p| text.contains(p.as_str()))
        {
            return Signal::Throttle;
        }
        Signal::Neutral
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
    use std::time::Duration;

    #[test]
    fn replies_are_classified() {
        let c = Classifier::new(&AdaptiveConfig {
            throttle_patterns: vec!["slow down please".into()],
            ..AdaptiveConfig::default()
        });
        assert_eq!(c.classify("250 2.0.0 Ok", "2.0.0"), Signal::Neutral);
        assert_eq!(c.classify("421 4.3.0 closing", "4.3.0"), Signal::Throttle);
        assert_eq!(
            c.classify("450 4.7.28 unusual rate of mail", "4.7.28"),
            Signal::Throttle
        );
        assert_eq!(
            c.classify("451 4.3.0 Please SLOW DOWN PLEASE", "4.3.0"),
            Signal::Throttle
        );
        assert_eq!(c.classify("451 4.3.0 disk full", "4.3.0"), Signal::Neutral);
        assert_eq!(
            c.classify("550 5.7.1 Service unavailable; listed by Spamhaus", "5.7.1"),
            Signal::Block
        );
        assert_eq!(
            c.classify("550 5.1.1 no such user", "5.1.1"),
            Signal::Neutral
        );
        assert_eq!(
            c.classify("550 5.7.1 try again later", "5.7.1"),
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
