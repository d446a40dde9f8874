//! Revision times on the coordinator's clock: its time at the last anchor plus this process's monotonic time
//! since. The agent's own wall clock never places a change.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use ferry_common::resources::Timestamp;

#[derive(Clone)]
pub struct Clock(Arc<Mutex<(i64, Instant)>>);

fn millis(t: Timestamp) -> i64 {
    t.seconds.saturating_mul(1000).saturating_add(i64::from(t.nanos) / 1_000_000)
}

impl Clock {
    /// The coordinator's `time`, as of `at`.
    pub fn new(time: Timestamp, at: Instant) -> Self {
        Self(Arc::new(Mutex::new((millis(time), at))))
    }

    /// The coordinator's time now, Unix ms.
    pub fn now_ms(&self) -> i64 {
        let (ms, at) = *self.0.lock().unwrap_or_else(PoisonError::into_inner);
        ms.saturating_add(at.elapsed().as_millis() as i64)
    }

    /// The coordinator's clock said `time` just now.
    pub fn anchor(&self, time: Timestamp) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = (millis(time), Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_count_from_the_anchor() {
        let at = Instant::now() - std::time::Duration::from_millis(1500);
        let c = Clock::new(Timestamp { seconds: 100, nanos: 250_000_000 }, at);
        let now = c.now_ms();
        assert!((101_750..102_750).contains(&now), "{now}");
        c.anchor(Timestamp { seconds: 5, nanos: 0 });
        assert!((5_000..5_500).contains(&c.now_ms()));
    }
}
