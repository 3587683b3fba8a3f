//! Retry policy: exponential backoff with full jitter and an attempt budget.

use std::time::Duration;

use rand::Rng;

use crate::error::{OutboxError, Result};

/// How a failing event is retried before it is dead-lettered.
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub base: Duration,
    /// Upper bound of any one delay.
    pub cap: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Attempts (publishes that failed with a retryable error) before the event is dead-lettered.
    pub max_attempts: u32,
    /// Randomise each delay in `[delay/2, delay]` so that many failing events do not retry in step.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            base: Duration::from_millis(200),
            cap: Duration::from_secs(15),
            multiplier: 2.0,
            max_attempts: 8,
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// Rejects policies that cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(OutboxError::Config(
                "max attempts must be at least 1".into(),
            ));
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            return Err(OutboxError::Config(
                "retry multiplier must be a number >= 1".into(),
            ));
        }
        if self.base.is_zero() || self.cap < self.base {
            return Err(OutboxError::Config(
                "retry base must be > 0 and retry cap at least the base".into(),
            ));
        }
        Ok(())
    }

    /// The un-jittered delay after failed attempt number `attempt` (1-based).
    pub fn nominal_delay(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(64) as i32);
        let secs = (self.base.as_secs_f64() * exp).min(self.cap.as_secs_f64());
        Duration::from_secs_f64(secs)
    }

    /// The delay to wait after failed attempt number `attempt`, jittered if configured.
    pub fn delay(&self, attempt: u32) -> Duration {
        let d = self.nominal_delay(attempt);
        if self.jitter && !d.is_zero() {
            let half = d.as_secs_f64() / 2.0;
            Duration::from_secs_f64(half + rand::rng().random_range(0.0..=half))
        } else {
            d
        }
    }

    /// The longest time between an event's first publish and its last retry: the broker's
    /// de-duplication window must be at least this long.
    pub fn horizon(&self) -> Duration {
        (1..self.max_attempts).map(|a| self.nominal_delay(a)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let p = RetryPolicy {
            jitter: false,
            ..Default::default()
        };
        assert_eq!(p.delay(1), Duration::from_millis(200));
        assert_eq!(p.delay(2), Duration::from_millis(400));
        assert_eq!(p.delay(20), Duration::from_secs(15));
    }

    #[test]
    fn jitter_stays_in_half_to_full() {
        let p = RetryPolicy::default();
        for a in 1..10 {
            let d = p.delay(a);
            let n = p.nominal_delay(a);
            assert!(d <= n && d >= n / 2, "{d:?} vs {n:?}");
        }
    }

    #[test]
    fn horizon_sums_delays_before_last_attempt() {
        let p = RetryPolicy {
            max_attempts: 3,
            jitter: false,
            ..Default::default()
        };
        assert_eq!(p.horizon(), Duration::from_millis(600));
        assert!(RetryPolicy {
            max_attempts: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
    }
}
