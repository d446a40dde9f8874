//! Backing off when etcd slows down during a backup. The agent's compression competes with etcd for the
//! node's cores; nice and the pod's CPU request decide most contended slices, but not all of them (etcd's
//! raft and fsync goroutines wake at random). So the agent watches etcd's own latency — a linearizable read
//! goes through raft's ReadIndex, the path a write's agreement takes — on a connection of its own, and
//! stops pulling the snapshot stream while that latency stands above `factor` × what it was before the
//! backup. The pause is bounded (a share of the backup's time): a snapshot holds a bbolt read transaction
//! open in etcd, so a backup must not stretch without end on an etcd that is slow for other reasons.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};

use crate::etcd::EtcdMember;
use crate::metrics::METRICS;

/// How often etcd's latency is sampled during a backup.
const PROBE_EVERY: Duration = Duration::from_millis(200);
/// Samples taken before the snapshot starts; their median is the baseline.
const BASELINE_PROBES: usize = 5;
/// One step of a pause; the flag is read again after each.
const PAUSE_STEP: Duration = Duration::from_millis(50);
/// At most this share of a backup's time is spent paused.
const MAX_PAUSED_SHARE: f64 = 0.5;
/// Below this, latency differences are scheduling noise, not a struggling etcd.
const NOISE_FLOOR: Duration = Duration::from_millis(2);
/// A probe slower than this counts as slow whatever the baseline.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A key nobody writes: the read's cost is raft's agreement, not data. A denied read (an agent user without
/// read access) has gone through the same agreement first, so it times as well.
const PROBE_KEY: &str = "\0ferry-latency-probe";

/// Time of one linearizable read, or `None` when etcd did not answer.
async fn probe(client: &mut Client) -> Option<Duration> {
    let t = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, client.get(PROBE_KEY, Some(GetOptions::new().with_count_only()))).await {
        Ok(Ok(_)) => Some(t.elapsed()),
        // etcd answered (a denial, a timeout): its time is etcd's time.
        Ok(Err(etcd_client::Error::GRpcStatus(_))) => Some(t.elapsed()),
        Ok(Err(_)) => None,
        Err(_) => Some(PROBE_TIMEOUT),
    }
}

/// The reader's side: waits while etcd is slow, within the pause budget.
pub struct Pacer {
    slow: Arc<AtomicBool>,
    started: Instant,
    paused: Duration,
    _probe: Option<crate::job::AbortOnDrop<()>>,
}

impl Pacer {
    /// A pacer that never waits.
    pub fn off() -> Self {
        Self { slow: Arc::new(AtomicBool::new(false)), started: Instant::now(), paused: Duration::ZERO, _probe: None }
    }

    /// Measures `etcd`'s latency now (the baseline) and starts watching it on a connection of its own (a
    /// paused snapshot stream fills its HTTP/2 connection's window, and a probe sharing it would wait behind
    /// that). `factor` ≤ 1, or a baseline that cannot be measured, turns the pacer off.
    pub async fn start(etcd: &EtcdMember, factor: f64) -> Self {
        if factor <= 1.0 {
            return Self::off();
        }
        let mut client = match etcd.separate_client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("no second etcd connection to watch its latency ({e:#}); backing off is off");
                return Self::off();
            }
        };
        let mut samples = Vec::with_capacity(BASELINE_PROBES);
        for _ in 0..BASELINE_PROBES {
            if let Some(d) = probe(&mut client).await {
                samples.push(d);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if samples.len() < BASELINE_PROBES / 2 + 1 {
            tracing::warn!("etcd's latency could not be measured before the backup; backing off is off for it");
            return Self::off();
        }
        samples.sort();
        let baseline = samples[samples.len() / 2];
        let threshold = baseline.mul_f64(factor).max(baseline + NOISE_FLOOR);
        tracing::debug!(?baseline, ?threshold, "etcd latency before the backup");
        let slow = Arc::new(AtomicBool::new(false));
        let flag = slow.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(PROBE_EVERY);
            loop {
                tick.tick().await;
                let latency = probe(&mut client).await;
                flag.store(latency.is_some_and(|l| l > threshold), Ordering::Relaxed);
            }
        });
        Self { slow, started: Instant::now(), paused: Duration::ZERO, _probe: Some(crate::job::AbortOnDrop(task)) }
    }

    /// Returns at once unless etcd is slow; then waits until it is not, or the pause budget is spent.
    pub async fn wait(&mut self) {
        while self.slow.load(Ordering::Relaxed) && self.paused < self.started.elapsed().mul_f64(MAX_PAUSED_SHARE) {
            tokio::time::sleep(PAUSE_STEP).await;
            self.paused += PAUSE_STEP;
            METRICS.backoff_seconds.inc_by(PAUSE_STEP.as_secs_f64());
        }
    }

    /// Time spent paused so far.
    pub fn paused(&self) -> Duration {
        self.paused
    }
}
