//! How fast a backup reads etcd's snapshot: a controller fed with etcd's own latency.
//!
//! Serving the snapshot costs etcd CPU and disk reads; read flat out on a small node, it puts etcd's slowest
//! writes at several times their idle latency (docs/PERFORMANCE.md). A fixed cap spares etcd but slows every
//! backup, also those of an etcd nobody writes to. So the read starts at full speed (or at the operator's
//! ceiling); every window in which etcd answered slowly while it was being written to halves the rate, and
//! every further quiet window raises it by a quarter (AIMD, as TCP shares a link). It never goes below a floor,
//! which keeps the snapshot's read transaction short, and never stops.
//!
//! Pure: it is fed times, probe results and byte counts, and reads no clock, so its tests are exact.
//! `backoff.rs` runs the probes and applies the rate.

use std::time::{Duration, Instant};

/// The controller judges etcd once per window: a quarter second holds ~10 probes, and is short enough that a
/// few windows take a full-speed read down to the floor before many writes feel it.
pub const WINDOW: Duration = Duration::from_millis(250);
/// A slow window multiplies the rate by this.
const DECREASE: f64 = 0.5;
/// A quiet window multiplies it by this, up to the ceiling: from the floor back to ~200 MiB/s in ~3 s.
const INCREASE: f64 = 1.25;
/// Quiet windows in a row before the rate rises: the window right after a cut still holds what was read before
/// it, so only the next one tells whether the lower rate is quiet.
const QUIET_WINDOWS_TO_RAISE: u32 = 2;
/// A window read at least this share of its limit was held back by it (the throttle is exact on average).
const HELD_AT: f64 = 0.9;
/// Below this, a latency rise is scheduling noise, not a struggling etcd.
const NOISE_FLOOR: Duration = Duration::from_millis(2);
/// etcd counts as written to for this long after its revision last moved. Why writes matter at all: etcd's
/// answers slow down under our own read even when nobody writes, and then nobody waits for them (Kubernetes
/// reads through the API server's watch cache), so an idle etcd is read at full speed. Kubernetes' own steady
/// writes (leases renewed every 2–10 s) keep a live control plane's etcd "written to".
const WRITE_MEMORY: Duration = Duration::from_secs(5);
/// The baseline is this quantile of the probes before the backup: the median would call every window slow
/// whose worst probe met one of etcd's ordinary fsync waits.
const BASELINE_QUANTILE: f64 = 0.9;
/// Fewer answered baseline probes than this and the latency is unknown.
const MIN_BASELINE_PROBES: usize = 6;

/// One linearizable read of etcd and what it saw.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// When the answer came.
    pub at: Instant,
    pub latency: Duration,
    /// The store's revision in the answer's header; `None` when etcd answered without one (a denied read, a
    /// timeout), which is then taken as "may be written to".
    pub revision: Option<i64>,
}

/// The latency above which etcd counts as slow: `factor` × a high quantile of the probes taken before the
/// backup, and at least [`NOISE_FLOOR`] above it. `None` when too few probes answered.
pub fn slow_above(baseline: &[Probe], factor: f64) -> Option<Duration> {
    if baseline.len() < MIN_BASELINE_PROBES {
        return None;
    }
    let mut l: Vec<Duration> = baseline.iter().map(|p| p.latency).collect();
    l.sort();
    let i = ((l.len() as f64 * BASELINE_QUANTILE).ceil() as usize).clamp(1, l.len()) - 1;
    Some(l[i].mul_f64(factor).max(l[i] + NOISE_FLOOR))
}

/// What one window ended with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// The read limit from now on, bytes/s; `None`: none (as fast as the pipeline goes).
    pub limit: Option<u64>,
    /// Bytes/s read during the window.
    pub read_rate: u64,
    /// Time of the window spent held below the top rate: limited below it, and reading at the limit.
    pub slowed: Duration,
    /// The slowest probe of the window (or the one still in flight); `None`: no answer.
    pub worst: Option<Duration>,
    /// Whether the window cut the rate.
    pub cut: bool,
}

/// What a whole backup's pacing did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Time spent held below the top rate (the ceiling, or no limit): limited below it, reading at the limit.
    pub slowed: Duration,
    /// Slow windows that cut the rate.
    pub cuts: u32,
    /// The lowest limit in force; `None`: never limited.
    pub min_limit: Option<u64>,
}

/// The read-rate controller of one backup.
#[derive(Debug)]
pub struct Controller {
    /// The rate it starts at and returns to: the ceiling, or `None` (no limit).
    top: Option<u64>,
    floor: u64,
    /// `None`: not adapting, the limit stays at `top`.
    slow_above: Option<Duration>,
    limit: Option<u64>,
    window_start: Instant,
    window_read_from: u64,
    /// The slowest probe answered in this window.
    window_worst: Option<Duration>,
    quiet_streak: u32,
    /// The fastest window read so far: the pipeline's own speed, above which a limit binds nothing.
    peak_rate: u64,
    revision: Option<i64>,
    last_write: Option<Instant>,
    slowed: Duration,
    cuts: u32,
    min_limit: Option<u64>,
}

impl Controller {
    /// A limit that never changes (`None`: none).
    pub fn fixed(limit: Option<u64>, now: Instant) -> Self {
        Self::new(limit, limit.unwrap_or(0), None, now)
    }

    /// Starts at `ceiling` (`None`: no limit) and adapts between it and `floor` (raised to the ceiling if
    /// above it), judging windows against `slow_above`. `baseline`: the probes taken before the backup, for
    /// etcd's revision.
    pub fn adaptive(ceiling: Option<u64>, floor: u64, slow_above: Duration, baseline: &[Probe], now: Instant) -> Self {
        let floor = ceiling.map_or(floor, |c| floor.min(c)).max(1);
        let mut c = Self::new(ceiling, floor, Some(slow_above), now);
        for p in baseline {
            c.note_revision(p);
        }
        c
    }

    fn new(top: Option<u64>, floor: u64, slow_above: Option<Duration>, now: Instant) -> Self {
        Self {
            top,
            floor,
            slow_above,
            limit: top,
            window_start: now,
            window_read_from: 0,
            window_worst: None,
            quiet_streak: 0,
            peak_rate: 0,
            revision: None,
            last_write: None,
            slowed: Duration::ZERO,
            cuts: 0,
            min_limit: top,
        }
    }

    /// The limit in force, bytes/s; `None`: none.
    pub fn limit(&self) -> Option<u64> {
        self.limit
    }

    /// Whether it adapts at all.
    pub fn adapts(&self) -> bool {
        self.slow_above.is_some()
    }

    /// A probe answered.
    pub fn probed(&mut self, p: Probe) {
        self.window_worst = self.window_worst.max(Some(p.latency));
        self.note_revision(&p);
    }

    fn note_revision(&mut self, p: &Probe) {
        match (p.revision, self.revision) {
            (Some(r), Some(before)) if r <= before => {}
            (Some(r), before) => {
                if before.is_some() {
                    self.last_write = Some(p.at);
                }
                self.revision = Some(r);
            }
            (None, _) => self.last_write = Some(p.at),
        }
    }

    fn written_to(&self, now: Instant) -> bool {
        self.last_write.is_some_and(|t| now.saturating_duration_since(t) <= WRITE_MEMORY)
    }

    /// Ends the window at `now`: `read` is every byte read since the start, `pending` how long the probe still
    /// in flight has waited (it counts as at least that slow). Returns the new limit and what the window saw.
    pub fn end_window(&mut self, now: Instant, read: u64, pending: Option<Duration>) -> Window {
        let span = now.saturating_duration_since(self.window_start);
        let read_rate = if span.is_zero() {
            0
        } else {
            (read.saturating_sub(self.window_read_from) as f64 / span.as_secs_f64()) as u64
        };
        self.peak_rate = self.peak_rate.max(read_rate);
        // Held back only if the read reached the limit: one the pipeline does not reach holds nothing back.
        let held = self.limit != self.top && self.limit.is_some_and(|l| read_rate as f64 >= l as f64 * HELD_AT);
        let slowed = if held { span } else { Duration::ZERO };
        self.slowed += slowed;
        let worst = self.window_worst.max(pending);
        let cut = match (self.slow_above, worst) {
            // Not adapting, or no answer at all in this window (the probes failed): hold.
            (None, _) | (_, None) => false,
            (Some(t), Some(w)) if w > t && self.written_to(now) => {
                self.cut(read_rate);
                true
            }
            (Some(_), Some(_)) => {
                self.quiet();
                false
            }
        };
        self.window_start = now;
        self.window_read_from = read;
        self.window_worst = None;
        Window { limit: self.limit, read_rate, slowed, worst, cut }
    }

    fn cut(&mut self, read_rate: u64) {
        // From what was actually read: halving a limit the pipeline did not reach would change nothing.
        let from = self.limit.map_or(read_rate, |l| l.min(read_rate.max(self.floor)));
        let mut to = ((from as f64 * DECREASE) as u64).max(self.floor);
        if let Some(top) = self.top {
            to = to.min(top);
        }
        self.limit = Some(to);
        self.min_limit = Some(self.min_limit.map_or(to, |m| m.min(to)));
        self.cuts += 1;
        self.quiet_streak = 0;
    }

    fn quiet(&mut self) {
        self.quiet_streak += 1;
        if self.quiet_streak < QUIET_WINDOWS_TO_RAISE {
            return;
        }
        let Some(limit) = self.limit else { return };
        let raised = ((limit as f64 * INCREASE) as u64).max(limit + 1);
        self.limit = match self.top {
            Some(top) => Some(raised.min(top)),
            // Above anything this backup ever read at, the limit binds nothing.
            None if raised > self.peak_rate => None,
            None => Some(raised),
        };
    }

    /// What the backup's pacing did so far.
    pub fn summary(&self) -> Summary {
        Summary { slowed: self.slowed, cuts: self.cuts, min_limit: self.min_limit }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const FLOOR: u64 = 20 * MIB;
    /// The pipeline's own speed in these tests.
    const FULL: u64 = 200 * MIB;

    /// Drives a controller window by window with a fake clock and a reader that reads at the limit (or at
    /// `FULL` without one).
    struct Sim {
        c: Controller,
        now: Instant,
        read: u64,
        revision: i64,
    }

    impl Sim {
        fn new(ceiling: Option<u64>) -> Self {
            let now = Instant::now();
            let baseline: Vec<Probe> = (0..10)
                .map(|i| Probe { at: now, latency: Duration::from_micros(300 + 50 * i), revision: Some(100) })
                .collect();
            let slow = slow_above(&baseline, 2.0).expect("ten probes");
            Self { c: Controller::adaptive(ceiling, FLOOR, slow, &baseline, now), now, read: 0, revision: 100 }
        }

        /// One window: ten probes of `latency` each, etcd written to or not; returns the limit after it.
        fn window(&mut self, latency: Duration, writes: bool) -> Option<u64> {
            let rate = self.c.limit().unwrap_or(FULL).min(FULL);
            for _ in 0..10 {
                self.now += WINDOW / 10;
                if writes {
                    self.revision += 5;
                }
                self.c.probed(Probe { at: self.now, latency, revision: Some(self.revision) });
            }
            self.read += (rate as f64 * WINDOW.as_secs_f64()) as u64;
            self.c.end_window(self.now, self.read, None).limit
        }
    }

    const QUIET: Duration = Duration::from_micros(400);
    const SLOW: Duration = Duration::from_millis(15);

    #[test]
    fn the_threshold_is_a_high_quantile_of_the_baseline_plus_a_noise_floor() {
        let now = Instant::now();
        let probe = |ms: u64| Probe { at: now, latency: Duration::from_millis(ms), revision: Some(1) };
        let base: Vec<Probe> = [1, 1, 1, 1, 1, 1, 1, 1, 3, 50].map(probe).to_vec();
        // The second slowest of ten (one outlier ignored), + 2 ms.
        assert_eq!(slow_above(&base, 1.5), Some(Duration::from_millis(5)));
        // A slow disk: the factor decides.
        let base: Vec<Probe> = [10; 10].map(probe).to_vec();
        assert_eq!(slow_above(&base, 2.0), Some(Duration::from_millis(20)));
        assert_eq!(slow_above(&base[..5], 2.0), None, "too few answers");
    }

    #[test]
    fn an_etcd_nobody_writes_to_is_read_at_full_speed_even_when_it_answers_slowly() {
        let mut s = Sim::new(None);
        for _ in 0..40 {
            assert_eq!(s.window(SLOW, false), None);
        }
        assert_eq!(s.c.summary(), Summary { slowed: Duration::ZERO, cuts: 0, min_limit: None });
    }

    #[test]
    fn a_busy_etcd_that_stays_fast_is_read_at_full_speed() {
        let mut s = Sim::new(None);
        for _ in 0..40 {
            assert_eq!(s.window(QUIET, true), None);
        }
        let mut s = Sim::new(Some(40 * MIB));
        for _ in 0..40 {
            assert_eq!(s.window(QUIET, true), Some(40 * MIB), "the operator's ceiling holds");
        }
    }

    #[test]
    fn rising_latency_cuts_the_rate_to_the_floor_within_a_few_windows() {
        let mut s = Sim::new(None);
        let limits: Vec<Option<u64>> = (0..6).map(|_| s.window(SLOW, true)).collect();
        assert_eq!(limits[0], Some(FULL / 2), "halved from what was read");
        assert_eq!(limits[1], Some(FULL / 4));
        assert_eq!(limits[3], Some(FLOOR), "{limits:?}");
        assert_eq!(limits[5], Some(FLOOR));
        let summary = s.c.summary();
        assert_eq!(summary.cuts, 6);
        assert_eq!(summary.min_limit, Some(FLOOR));
        assert_eq!(summary.slowed, WINDOW * 5, "every window after the first was below full speed");
    }

    #[test]
    fn a_limit_above_what_the_pipeline_manages_is_not_counted_as_slowing_it() {
        let now = Instant::now();
        let baseline: Vec<Probe> = (0..10).map(|_| Probe { at: now, latency: QUIET, revision: None }).collect();
        let slow = slow_above(&baseline, 2.0).expect("ten probes");
        let mut c = Controller::adaptive(None, FLOOR, slow, &baseline, now);
        // The pipeline reads 5 MiB/s; etcd stays slow: cut to the floor, which is above that.
        let mut read = 0;
        for i in 1..=8u32 {
            read += 5 * MIB / 4;
            c.probed(Probe { at: now + WINDOW * i, latency: SLOW, revision: None });
            let w = c.end_window(now + WINDOW * i, read, None);
            assert_eq!(w.limit, Some(FLOOR));
            assert_eq!(w.slowed, Duration::ZERO);
            assert!(w.cut);
        }
        assert_eq!(c.summary().slowed, Duration::ZERO);
    }

    #[test]
    fn the_floor_holds_however_long_etcd_stays_slow() {
        let mut s = Sim::new(Some(100 * MIB));
        for _ in 0..1000 {
            let limit = s.window(Duration::from_secs(1), true).expect("limited");
            assert!(limit >= FLOOR, "{limit}");
        }
        // A ceiling below the floor wins: the read is never faster than the operator allows.
        let mut s = Sim::new(Some(10 * MIB));
        for _ in 0..20 {
            assert_eq!(s.window(SLOW, true), Some(10 * MIB));
        }
    }

    #[test]
    fn a_probe_that_does_not_come_back_counts_as_slow() {
        let mut s = Sim::new(None);
        s.window(QUIET, true);
        s.now += WINDOW;
        // No answer in this window, one probe in flight for 200 ms.
        let w = s.c.end_window(s.now, s.read, Some(Duration::from_millis(200)));
        assert!(w.limit.is_some_and(|l| l < FULL), "{w:?}");
        // No answer and nothing in flight (the probes fail at once): nothing to judge by, the rate holds.
        let before = s.c.limit();
        s.now += WINDOW;
        assert_eq!(s.c.end_window(s.now, s.read, None).limit, before);
    }

    #[test]
    fn the_rate_recovers_once_etcd_is_quiet_again() {
        let mut s = Sim::new(None);
        for _ in 0..8 {
            s.window(SLOW, true);
        }
        assert_eq!(s.c.limit(), Some(FLOOR));
        // The first quiet window holds; then a quarter more each.
        assert_eq!(s.window(QUIET, true), Some(FLOOR));
        assert_eq!(s.window(QUIET, true), Some(FLOOR * 5 / 4));
        let mut windows = 2;
        while s.window(QUIET, true).is_some() {
            windows += 1;
            assert!(windows < 20, "still limited after {windows} quiet windows: {:?}", s.c.limit());
        }
        // Back to no limit once above anything the pipeline ever read at; a slow window starts it over.
        assert_eq!(s.window(SLOW, true), Some(FULL / 2));

        // With a ceiling: back up to it, never above.
        let mut s = Sim::new(Some(60 * MIB));
        for _ in 0..8 {
            s.window(SLOW, true);
        }
        for _ in 0..20 {
            s.window(QUIET, true);
        }
        assert_eq!(s.c.limit(), Some(60 * MIB));
    }

    #[test]
    fn writes_resuming_make_latency_count_again() {
        let mut s = Sim::new(None);
        // The baseline's revision did not move: nobody writes, slow answers do not matter.
        assert_eq!(s.window(SLOW, false), None);
        assert_eq!(s.window(SLOW, true), Some(FULL / 2));
        // Writes stop: latency still counts for a while (a write may be queued behind the slow one)...
        for _ in 0..(WRITE_MEMORY.as_millis() / WINDOW.as_millis() - 1) {
            assert!(s.window(SLOW, false).is_some());
        }
        // ...then no longer, and the rate recovers.
        for _ in 0..40 {
            s.window(SLOW, false);
        }
        assert_eq!(s.c.limit(), None);
    }

    #[test]
    fn an_etcd_that_answers_without_a_revision_counts_as_written_to() {
        let now = Instant::now();
        let baseline: Vec<Probe> = (0..10).map(|_| Probe { at: now, latency: QUIET, revision: None }).collect();
        let slow = slow_above(&baseline, 2.0).expect("ten probes");
        let mut c = Controller::adaptive(None, FLOOR, slow, &baseline, now);
        let at = now + WINDOW;
        c.probed(Probe { at, latency: SLOW, revision: None });
        assert!(c.end_window(at, FULL / 4, None).limit.is_some());
    }

    #[test]
    fn a_fixed_limit_never_moves() {
        let now = Instant::now();
        for limit in [None, Some(40 * MIB)] {
            let mut c = Controller::fixed(limit, now);
            assert!(!c.adapts());
            for i in 1..20u32 {
                c.probed(Probe { at: now + WINDOW * i, latency: SLOW, revision: None });
                assert_eq!(c.end_window(now + WINDOW * i, u64::from(i) * MIB, None).limit, limit);
            }
            assert_eq!(c.summary().slowed, Duration::ZERO);
        }
    }
}
