//! The backoff policy every external call uses between attempts: exponential
//! growth from `base`, capped at `cap`, with "equal jitter" (half the delay
//! fixed, half random) so that retrying clients spread out without ever
//! retrying immediately. Randomness comes in as a number in `[0, 1)` so the
//! policy stays pure and testable.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
    /// Attempts in all, the first included.
    pub max_attempts: u32,
}

impl Backoff {
    pub const fn new(base: Duration, cap: Duration, max_attempts: u32) -> Self {
        Self {
            base,
            cap,
            max_attempts,
        }
    }

    /// The delay after failed attempt number `attempt` (1-based), given a
    /// uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        let exp = self.base.saturating_mul(
            1u32.checked_shl(attempt.saturating_sub(1).min(31))
                .unwrap_or(u32::MAX),
        );
        let ceiling = exp.min(self.cap);
        let half = ceiling / 2;
        half + half.mul_f64(unit.clamp(0.0, 1.0))
    }

    /// Whether another attempt follows failed attempt number `attempt`.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_then_cap_and_stay_within_jitter_bounds() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2), 6);
        assert_eq!(b.delay(1, 0.0), Duration::from_millis(50));
        assert_eq!(b.delay(1, 0.999_999).as_millis(), 99);
        assert_eq!(b.delay(3, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay(10, 0.0), Duration::from_secs(1));
        assert!(b.delay(40, 0.5) <= Duration::from_secs(2));
        assert!(b.should_retry(5));
        assert!(!b.should_retry(6));
    }
}
