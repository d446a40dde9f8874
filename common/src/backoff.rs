//! The one backoff rule every retry loop in Ferry uses: exponential growth from a base, capped, optionally
//! jittered so that many clients that failed together do not come back together.

use std::time::Duration;

use rand::Rng;

/// How the delay before the next attempt grows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub base: Duration,
    /// No delay is longer than this.
    pub max: Duration,
    /// Each delay is drawn from `[delay × (1 − jitter), delay]`; 0 means exact delays.
    pub jitter: f64,
}

impl Backoff {
    /// The delay after `failures` consecutive failures (1 = the first): `base × 2^(failures − 1)`, capped at
    /// `max`, then jittered.
    pub fn delay(&self, failures: u32) -> Duration {
        // 2^20 × any sane base is past every cap; bounding the shift keeps the multiply from overflowing.
        let exp = failures.saturating_sub(1).min(20);
        let d = self.base.saturating_mul(1u32 << exp).min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return d;
        }
        d.mul_f64(rand::rng().random_range((1.0 - jitter)..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_jitter_stays_below() {
        let b = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(10), jitter: 0.0 };
        let d: Vec<u64> = (1..=6).map(|n| b.delay(n).as_secs()).collect();
        assert_eq!(d, [1, 2, 4, 8, 10, 10]);
        assert_eq!(b.delay(0), Duration::from_secs(1), "0 failures counts as the first");
        assert_eq!(b.delay(u32::MAX), Duration::from_secs(10));
        let j = Backoff { jitter: 0.5, ..b };
        for _ in 0..100 {
            let d = j.delay(3);
            assert!(d >= Duration::from_secs(2) && d <= Duration::from_secs(4), "{d:?}");
        }
    }
}
