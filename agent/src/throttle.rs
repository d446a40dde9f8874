//! A bandwidth cap for control planes on thin links: callers report bytes and are delayed so the average
//! stays under the limit.

use std::time::Duration;

use tokio::time::Instant;

pub struct Throttle {
    bytes_per_sec: u64,
    start: Instant,
    sent: u64,
}

impl Throttle {
    /// `bytes_per_sec == 0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec, start: Instant::now(), sent: 0 }
    }

    /// Accounts for `n` bytes about to be sent, sleeping until they fit under the limit.
    pub async fn consume(&mut self, n: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        self.sent += n as u64;
        let due = self.start + Duration::from_secs_f64(self.sent as f64 / self.bytes_per_sec as f64);
        tokio::time::sleep_until(due).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real time, small numbers: paused time would need tokio's test-util feature, and a different tokio
    // feature set in tests rebuilds half the dependency tree in CI.
    #[tokio::test]
    async fn average_rate_stays_under_the_cap() {
        let mut t = Throttle::new(1_000_000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.consume(50_000).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(245), "{:?}", start.elapsed());
        let mut unlimited = Throttle::new(0);
        let start = tokio::time::Instant::now();
        unlimited.consume(usize::MAX).await;
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
