//! Progress of a long transfer, for people: a bar (bytes, rate, ETA) when stderr is a terminal, plain
//! periodic lines otherwise, so that a pod's log stays readable. Never on stdout: `ferryctl`'s output and
//! pipes stay clean. Shared by `ferryctl backup download|verify` and `ferry-agent restore`.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is written when stderr is not a terminal: often enough to see that a
/// large transfer moves, rarely enough not to flood a log.
pub const LINE_EVERY: Duration = Duration::from_secs(5);

/// The bar: a name, a bar as wide as the terminal leaves room for, bytes done of total, rate and time left.
/// ASCII only.
const BAR_TEMPLATE: &str = "{msg} [{wide_bar}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}";
/// When the total is unknown: a spinner, bytes done, rate and time so far.
const SPINNER_TEMPLATE: &str = "{spinner} {msg} {bytes} {binary_bytes_per_sec} {elapsed}";

/// Where plain lines go when stderr is not a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lines {
    /// `eprintln!` (a CLI: its stderr is the operator's).
    Stderr,
    /// A `tracing` info event (a daemon or init container: its stderr is its log).
    Log,
}

/// The progress of one transfer of `total` bytes (0 when unknown).
pub struct Progress {
    what: String,
    total: u64,
    start: Instant,
    last_line: Instant,
    /// Bytes done at the last plain line, so the closing line is not a repeat.
    last_line_done: Option<u64>,
    done: u64,
    bar: Option<ProgressBar>,
    lines: Lines,
}

impl Progress {
    /// A bar if stderr is a terminal, else plain lines every [`LINE_EVERY`] to `lines`.
    pub fn new(what: impl Into<String>, total: u64, lines: Lines) -> Self {
        Self::with_bar(what, total, lines, std::io::stderr().is_terminal())
    }

    fn with_bar(what: impl Into<String>, total: u64, lines: Lines, bar: bool) -> Self {
        let what = what.into();
        let bar = bar.then(|| {
            let length = (total > 0).then_some(total);
            let b = ProgressBar::with_draw_target(length, ProgressDrawTarget::stderr());
            let template = if total > 0 { BAR_TEMPLATE } else { SPINNER_TEMPLATE };
            // The templates are constants: they parse, or the unit test below fails.
            if let Ok(style) = ProgressStyle::with_template(template) {
                b.set_style(style.progress_chars("=> ").tick_chars("|/-\\ "));
            }
            if total == 0 {
                // A spinner turns on its own: the transfer may report rarely.
                b.enable_steady_tick(Duration::from_millis(200));
            }
            b.set_message(what.clone());
            b
        });
        let now = Instant::now();
        Self { what, total, start: now, last_line: now, last_line_done: None, done: 0, bar, lines }
    }

    /// Bytes done so far.
    pub fn set(&mut self, done: u64) {
        self.done = done;
        match &self.bar {
            Some(b) => b.set_position(done),
            None if self.last_line.elapsed() >= LINE_EVERY => self.line(),
            None => {}
        }
    }

    /// The transfer is complete: the bar stays on screen at its end, or one last line is written.
    pub fn finish(mut self) {
        match self.bar.take() {
            Some(b) => b.finish(),
            None if self.last_line_done != Some(self.done) => self.line(),
            None => {}
        }
    }

    fn line(&mut self) {
        self.last_line = Instant::now();
        self.last_line_done = Some(self.done);
        let line = line(&self.what, self.done, self.total, self.start.elapsed());
        match self.lines {
            Lines::Stderr => eprintln!("{line}"),
            Lines::Log => tracing::info!(done_bytes = self.done, total_bytes = self.total, "{line}"),
        }
    }
}

impl Drop for Progress {
    /// A transfer that failed leaves its bar where it stopped (the error line follows it).
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.abandon();
        }
    }
}

/// One plain progress line, e.g. `download: 12.0 MiB of 40.0 MiB (30%), 5.2 MB/s, ETA 6s`.
pub fn line(what: &str, done: u64, total: u64, elapsed: Duration) -> String {
    let secs = elapsed.as_secs_f64().max(0.001);
    let rate = done as f64 / secs;
    let mut s = format!("{what}: {}", mib(done));
    if total > 0 {
        let pct = (done.min(total) as f64 * 100.0 / total as f64).floor();
        s.push_str(&format!(" of {} ({pct:.0}%)", mib(total)));
    }
    s.push_str(&format!(", {:.1} MB/s", rate / 1e6));
    if total > done && rate > 0.0 {
        let left = Duration::from_secs(((total - done) as f64 / rate).ceil() as u64);
        s.push_str(&format!(", ETA {}", humantime::format_duration(left)));
    }
    s
}

/// `1.5 MiB`: a size as people read it (binary units, one decimal; plain bytes below 1 KiB).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1_048_576.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_lines_say_bytes_rate_and_time_left() {
        let l = line("download", 10 * 1_048_576, 40 * 1_048_576, Duration::from_secs(2));
        assert_eq!(l, "download: 10.0 MiB of 40.0 MiB (25%), 5.2 MB/s, ETA 6s");
        let done = line("download", 40 * 1_048_576, 40 * 1_048_576, Duration::from_secs(8));
        assert_eq!(done, "download: 40.0 MiB of 40.0 MiB (100%), 5.2 MB/s");
        assert_eq!(line("x", 0, 0, Duration::ZERO), "x: 0.0 MiB, 0.0 MB/s");
    }

    #[test]
    fn the_bar_template_parses() {
        assert!(ProgressStyle::with_template(BAR_TEMPLATE).is_ok());
        assert!(ProgressStyle::with_template(SPINNER_TEMPLATE).is_ok());
        let mut p = Progress::with_bar("t", 100, Lines::Stderr, false);
        p.set(50);
        assert!(p.bar.is_none());
        p.finish();
    }
}
