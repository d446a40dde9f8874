//! A bandwidth cap: callers report bytes and are delayed so the average stays under the limit. It caps the
//! upload for control planes on thin links, and the read of etcd's snapshot at the rate `pacing.rs` sets.

use std::time::Duration;

use tokio::time::Instant;

pub struct Throttle {
    bytes_per_sec: u64,
    /// When the bytes accounted so far are due.
    due: Instant,
}

/// Time left unused (a pause, a slow consumer) is saved up for a burst afterwards only this far: a cap that
/// spares etcd must not turn into a full-speed catch-up.
const MAX_CREDIT: Duration = Duration::from_millis(100);
/// Callers run ahead of the limit by this much before they sleep: one timer and wake-up per 32 KiB etcd
/// message cost the agent a second of CPU per 1.5 GB read, and 5 ms at 40 MiB/s is a 200 KiB burst.
const MIN_SLEEP: Duration = Duration::from_millis(5);

impl Throttle {
    /// `bytes_per_sec == 0` means unlimited.
    pub fn new(bytes_per_sec: u64) -> Self {
        Self { bytes_per_sec, due: Instant::now() }
    }

    /// The limit from now on (0: none). Bytes already accounted keep their time: a cut charges nothing that was
    /// read before it, so it never turns into a long stop.
    pub fn set_rate(&mut self, bytes_per_sec: u64) {
        self.bytes_per_sec = bytes_per_sec;
    }

    /// The limit in force (0: none).
    pub fn rate(&self) -> u64 {
        self.bytes_per_sec
    }

    /// Accounts for `n` bytes about to be sent, sleeping until they fit under the limit.
    pub async fn consume(&mut self, n: usize) {
        if self.bytes_per_sec == 0 {
            return;
        }
        let now = Instant::now();
        let floor = now.checked_sub(MAX_CREDIT).unwrap_or(now);
        self.due = self.due.max(floor) + Duration::from_secs_f64(n as f64 / self.bytes_per_sec as f64);
        if self.due > now + MIN_SLEEP {
            tokio::time::sleep_until(self.due).await;
        }
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
        // A second idle: it buys no burst of a second's bytes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.consume(50_000).await;
        }
        assert!(start.elapsed() >= Duration::from_millis(145), "{:?}", start.elapsed());
    }

    #[tokio::test]
    async fn a_lower_rate_applies_to_what_follows_only() {
        // Read at full speed, then cut to 1 MB/s: 50 kB more take ~50 ms, not the 10 s that the 10 MB read
        // before would cost at the new rate.
        let mut t = Throttle::new(0);
        t.consume(10_000_000).await;
        t.set_rate(1_000_000);
        assert_eq!(t.rate(), 1_000_000);
        let start = tokio::time::Instant::now();
        for _ in 0..5 {
            t.consume(10_000).await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(45) && took < Duration::from_millis(500), "{took:?}");
        // And back to none: no wait at all.
        t.set_rate(0);
        let start = tokio::time::Instant::now();
        t.consume(10_000_000).await;
        assert!(start.elapsed() < Duration::from_millis(50));
    }
}
