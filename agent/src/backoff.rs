//! Watching etcd's latency during a backup, to read its snapshot only as fast as etcd can spare
//! (`pacing.rs` decides the rate; the reader applies it through its `Throttle`).
//!
//! The signal is etcd's own latency: a linearizable read goes through raft's ReadIndex and waits behind the
//! raft loop's WAL fsyncs and the apply of earlier writes, the path a write's agreement takes. It is timed on a
//! connection of its own (a snapshot stream held back by the reader fills its HTTP/2 connection's window, and a
//! probe sharing it would wait behind that), every 25 ms: the slow writes a snapshot read causes are 5–20 ms
//! blips, which a probe every 200 ms mostly missed (docs/PERFORMANCE.md). The answer's header carries etcd's
//! revision, which tells whether anyone is writing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, GetOptions};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::etcd::EtcdMember;
use crate::job::AbortOnDrop;
use crate::metrics::METRICS;
use crate::pacing::{self, Controller, Probe, Summary, WINDOW};

/// How often etcd's latency is sampled during a backup: 10 probes a window, 40 cheap reads a second.
const PROBE_EVERY: Duration = Duration::from_millis(25);
/// Probes taken before the snapshot opens, for the baseline (a high quantile of them: see `pacing.rs`).
const BASELINE_PROBES: usize = 10;
/// Between baseline probes: ~0.2 s in all, long enough to meet etcd's ordinary fsync waits.
const BASELINE_EVERY: Duration = Duration::from_millis(20);
/// The baseline may take this long at most; an etcd too slow for it is read at the floor.
const BASELINE_BUDGET: Duration = Duration::from_secs(2);
/// A probe slower than this counts as this slow; the window's judgment does not wait for it anyway.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// A key nobody writes: the read's cost is raft's agreement, not data. A denied read (an agent user without
/// read access) has gone through the same agreement first, so it times as well.
const PROBE_KEY: &str = "\0ferry-latency-probe";

/// How the agent paces its reads of etcd's snapshot (flags of the agent).
#[derive(Debug, Clone, Copy)]
pub struct PacingSettings {
    /// Slow down while etcd's latency stands above this × its latency before the backup (≤ 1: never adapt).
    pub sensitivity: f64,
    /// Bytes per second read at least while slowed down (raised so that no read takes over 2 minutes).
    pub floor_bps: u64,
    /// Bytes per second read at most (0: no ceiling; raised like the floor).
    pub ceiling_bps: u64,
}

/// A snapshot's read takes at most this long, whatever the floor and ceiling say: the snapshot holds a bbolt
/// read transaction open in etcd all along (pages freed meanwhile cannot be reused, so a busy database grows),
/// and a large database is read faster rather than for longer.
const MAX_LIMITED_READ: Duration = Duration::from_secs(120);

/// A limit for a snapshot of `total` bytes: `limit_bps`, raised so the read ends within [`MAX_LIMITED_READ`];
/// 0 (none) stays 0.
pub fn read_rate(limit_bps: u64, total: u64) -> u64 {
    if limit_bps == 0 {
        return 0;
    }
    limit_bps.max(total / MAX_LIMITED_READ.as_secs())
}

/// Time of one linearizable read, and etcd's revision; `None` when etcd did not answer.
async fn probe(mut client: Client) -> Option<(Duration, Option<i64>)> {
    let t = Instant::now();
    match tokio::time::timeout(PROBE_TIMEOUT, client.get(PROBE_KEY, Some(GetOptions::new().with_count_only()))).await {
        Ok(Ok(r)) => Some((t.elapsed(), r.header().map(|h| h.revision()))),
        // etcd answered (a denial, a timeout): its time is etcd's time.
        Ok(Err(etcd_client::Error::GRpcStatus(_))) => Some((t.elapsed(), None)),
        Ok(Err(_)) => None,
        Err(_) => Some((PROBE_TIMEOUT, None)),
    }
}

/// A backup's pacing before its snapshot opens: etcd's latency measured, nothing read yet.
pub struct Pacer {
    settings: PacingSettings,
    /// The probe connection, the latency above which etcd counts as slow and the baseline's probes (for etcd's
    /// revision); `None`: not adapting.
    watch: Option<(Client, Duration, Vec<Probe>)>,
    /// Adapting was asked for but etcd's latency could not be measured.
    blind: bool,
    cancel: CancellationToken,
}

impl Pacer {
    /// Measures `etcd`'s latency now, before the snapshot opens (the baseline), on a connection of its own.
    pub async fn prepare(etcd: &EtcdMember, settings: PacingSettings, cancel: CancellationToken) -> Self {
        let mut pacer = Self { settings, watch: None, blind: false, cancel };
        if settings.sensitivity <= 1.0 {
            return pacer;
        }
        pacer.blind = true;
        let client = match etcd.separate_client().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("no second etcd connection to watch its latency ({e:#}); reading at the floor");
                return pacer;
            }
        };
        let mut baseline = Vec::with_capacity(BASELINE_PROBES);
        let measure = async {
            for _ in 0..BASELINE_PROBES {
                if let Some((latency, revision)) = probe(client.clone()).await {
                    baseline.push(Probe { at: Instant::now(), latency, revision });
                }
                tokio::time::sleep(BASELINE_EVERY).await;
            }
        };
        tokio::select! {
            _ = tokio::time::timeout(BASELINE_BUDGET, measure) => {}
            () = pacer.cancel.cancelled() => return pacer,
        }
        match pacing::slow_above(&baseline, settings.sensitivity) {
            Some(slow_above) => {
                tracing::debug!(?slow_above, probes = baseline.len(), "etcd latency before the backup");
                pacer.watch = Some((client, slow_above, baseline));
                pacer.blind = false;
            }
            None => tracing::warn!(
                answered = baseline.len(),
                "etcd's latency could not be measured before the backup; reading its snapshot at the floor"
            ),
        }
        pacer
    }

    /// The snapshot's first message came: `total` bytes to read. Starts the pacing (and, when adapting,
    /// the probes).
    pub fn start(self, total: u64) -> RunningPacer {
        let floor = read_rate(self.settings.floor_bps, total);
        let ceiling = match read_rate(self.settings.ceiling_bps, total) {
            0 => None,
            c => Some(c),
        };
        let now = Instant::now();
        let (controller, client) = match self.watch {
            Some((client, slow_above, baseline)) => {
                (Controller::adaptive(ceiling, floor, slow_above, &baseline, now), Some(client))
            }
            // Blind, a ceiling below the floor wins; not adapting, the ceiling alone.
            None if self.blind => (Controller::fixed(Some(ceiling.map_or(floor, |c| c.min(floor))), now), None),
            None => (Controller::fixed(ceiling, now), None),
        };
        let shared =
            Arc::new(Shared { limit: AtomicU64::new(controller.limit().unwrap_or(0)), read: AtomicU64::new(0) });
        METRICS.read_limit.set(controller.limit().unwrap_or(0) as f64);
        let task = tokio::spawn(watch(controller, client, shared.clone(), self.cancel.clone()).in_current_span());
        RunningPacer { shared, stop: self.cancel, task: AbortOnDrop(task), started: now }
    }
}

/// What the reader and the watching task share.
struct Shared {
    /// Bytes/s; 0: no limit.
    limit: AtomicU64,
    /// Bytes read from etcd's snapshot so far.
    read: AtomicU64,
}

/// A backup's pacing while its snapshot is read.
pub struct RunningPacer {
    shared: Arc<Shared>,
    stop: CancellationToken,
    task: AbortOnDrop<Controller>,
    started: Instant,
}

/// What a backup's pacing did, for its log line.
#[derive(Debug)]
pub struct PacingReport {
    /// Bytes read from etcd's snapshot.
    pub read: u64,
    /// Since the snapshot's first message.
    pub elapsed: Duration,
    /// `None` when the watching task failed.
    pub summary: Option<Summary>,
    /// Whether the rate followed etcd's latency (not: adaptation off, or etcd's latency unknown).
    pub adapted: bool,
}

impl RunningPacer {
    /// The limit in force, bytes/s (0: none).
    pub fn limit(&self) -> u64 {
        self.shared.limit.load(Ordering::Relaxed)
    }

    /// `n` bytes read from etcd's snapshot.
    pub fn read(&self, n: usize) {
        self.shared.read.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The snapshot is read: stops the probes.
    pub async fn finish(mut self) -> PacingReport {
        self.stop.cancel();
        let controller = (&mut self.task.0).await.ok();
        PacingReport {
            read: self.shared.read.load(Ordering::Relaxed),
            elapsed: self.started.elapsed(),
            adapted: controller.as_ref().is_some_and(Controller::adapts),
            summary: controller.map(|c| c.summary()),
        }
    }
}

/// Probes etcd (when `client` is given), judges each window and publishes the limit; returns the controller
/// once cancelled. Without a client, it only keeps the rate gauges.
async fn watch(
    mut controller: Controller,
    client: Option<Client>,
    shared: Arc<Shared>,
    cancel: CancellationToken,
) -> Controller {
    type InFlight = std::pin::Pin<Box<dyn std::future::Future<Output = Option<(Duration, Option<i64>)>> + Send>>;
    let mut window = tokio::time::interval_at(tokio::time::Instant::now() + WINDOW, WINDOW);
    window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut in_flight: Option<(Instant, InFlight)> = None;
    let mut next_probe = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = cancel.cancelled() => return controller,
            _ = window.tick() => {
                let pending = in_flight.as_ref().map(|(since, _)| since.elapsed());
                let w = controller.end_window(Instant::now(), shared.read.load(Ordering::Relaxed), pending);
                tracing::trace!(
                    limit = w.limit.unwrap_or(0),
                    read_rate = w.read_rate,
                    worst_us = w.worst.map_or(0, |d| d.as_micros() as u64),
                    cut = w.cut,
                    "pacing window"
                );
                shared.limit.store(w.limit.unwrap_or(0), Ordering::Relaxed);
                METRICS.read_rate.set(w.read_rate as f64);
                METRICS.read_limit.set(w.limit.unwrap_or(0) as f64);
                if !w.slowed.is_zero() {
                    METRICS.backoff_seconds.inc_by(w.slowed.as_secs_f64());
                }
            }
            answer = async {
                match in_flight.as_mut() {
                    Some((_, f)) => f.await,
                    None => std::future::pending().await,
                }
            }, if in_flight.is_some() => {
                in_flight = None;
                if let Some((latency, revision)) = answer {
                    controller.probed(Probe { at: Instant::now(), latency, revision });
                }
            }
            () = tokio::time::sleep_until(next_probe), if in_flight.is_none() && client.is_some() => {
                if let Some(c) = &client {
                    in_flight = Some((Instant::now(), Box::pin(probe(c.clone()))));
                }
                // One probe at a time; the next starts a period after this one did, or at once if it was slower.
                next_probe = tokio::time::Instant::now() + PROBE_EVERY;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_snapshot_is_read_faster_than_the_limit_rather_than_for_longer() {
        let mib = 1u64 << 20;
        assert_eq!(read_rate(0, 8 << 30), 0, "no limit stays none");
        assert_eq!(read_rate(20 * mib, mib << 10), 20 * mib, "1 GiB at 20 MiB/s: 51 s");
        // 8 GiB at 20 MiB/s would hold etcd's read transaction for 410 s.
        assert_eq!(read_rate(20 * mib, 8 << 30), (8 << 30) / 120);
    }
}
