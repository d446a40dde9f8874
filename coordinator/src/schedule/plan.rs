//! When a cluster's next automatic backup is due: the pure part of scheduling, kept apart from the loop
//! that acts on it so it can be tested without clocks or clusters.
//!
//! The next backup is due one interval (or the next cron time) after the *newest existing backup*, not after
//! the coordinator started: a restart causes no extra backup, and one missed while the coordinator was down
//! is due at once. A cluster with no backup yet is due at once.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use ferry_common::resources::{BackupConfiguration, ProtoDuration, Timestamp};
use rand::Rng;

pub use crate::config::Bounds;

/// A parsed, checked backup configuration.
#[derive(Debug, Clone)]
pub enum Plan {
    Interval(Duration),
    Cron(Box<Cron>),
}

fn human(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// Cron occurrences sampled to check a schedule's spacing against the bounds.
const CRON_SAMPLES: usize = 64;

/// Checks a configuration against the bounds; the error says what is wrong and which bounds apply.
pub fn plan(cfg: &BackupConfiguration, b: &Bounds) -> Result<Plan, String> {
    let bounds = format!(
        "the coordinator allows {} to {} (--min-backup-interval, --max-backup-interval)",
        human(b.min_interval),
        human(b.max_interval)
    );
    match (&cfg.interval, cfg.schedule.trim()) {
        (Some(_), s) if !s.is_empty() => Err("set either backupconfiguration.interval or .schedule, not both".into()),
        (None, "") => Err("backupconfiguration is empty: give it an interval (e.g. {seconds: 3600, nanos: 0}) or a cron schedule for automatic backups, or only encryption, retention or drillinterval for manual backups; `backupconfiguration: null` turns it off".into()),
        (Some(i), _) => {
            if i.seconds < 0 || !(0..1_000_000_000).contains(&i.nanos) {
                return Err(format!("backupconfiguration.interval {{seconds: {}, nanos: {}}} is not a valid duration", i.seconds, i.nanos));
            }
            let d = Duration::new(i.seconds as u64, i.nanos as u32);
            if d < b.min_interval || d > b.max_interval {
                return Err(format!("backup interval {} is out of bounds: {bounds}", human(d)));
            }
            Ok(Plan::Interval(d))
        }
        (None, expr) => {
            let cron = Cron::from_str(expr).map_err(|e| format!("backupconfiguration.schedule {expr:?} is not a cron expression: {e}"))?;
            // The gaps between consecutive runs must all lie within the bounds.
            let mut t = Utc::now();
            let mut prev: Option<DateTime<Utc>> = None;
            for _ in 0..CRON_SAMPLES {
                let next = cron
                    .find_next_occurrence(&t, false)
                    .map_err(|e| format!("backupconfiguration.schedule {expr:?} never fires: {e}"))?;
                if let Some(p) = prev {
                    let gap = (next - p).to_std().unwrap_or_default();
                    if gap < b.min_interval || gap > b.max_interval {
                        return Err(format!(
                            "backupconfiguration.schedule {expr:?} runs {} apart at times, out of bounds: {bounds}",
                            human(gap)
                        ));
                    }
                }
                prev = Some(next);
                t = next;
            }
            Ok(Plan::Cron(Box::new(cron)))
        }
    }
}

/// Checks a restore drill interval against `--min-drill-interval`.
pub fn drill_period(d: &ProtoDuration, b: &Bounds) -> Result<Duration, String> {
    if d.seconds < 0 || !(0..1_000_000_000).contains(&d.nanos) {
        return Err(format!(
            "backupconfiguration.drillinterval {{seconds: {}, nanos: {}}} is not a valid duration",
            d.seconds, d.nanos
        ));
    }
    let d = Duration::new(d.seconds as u64, d.nanos as u32);
    if d < b.min_drill_interval {
        return Err(format!(
            "restore drill interval {} is shorter than the coordinator allows ({}, --min-drill-interval)",
            human(d),
            human(b.min_drill_interval)
        ));
    }
    Ok(d)
}

/// Bounds of a change log's window (`backupconfiguration.pointintime.window`): under an hour the log barely
/// outlives the full backup it starts from; over 400 days (a year and a margin) it only grows the store.
pub const MIN_POINT_IN_TIME_WINDOW: Duration = Duration::from_secs(3600);
pub const MAX_POINT_IN_TIME_WINDOW: Duration = Duration::from_secs(400 * 86_400);

/// Checks a change log's window against [`MIN_POINT_IN_TIME_WINDOW`] and [`MAX_POINT_IN_TIME_WINDOW`]; the
/// error says what is wrong, and the caller names the field and the fix in its own syntax.
pub fn point_in_time_window(w: &ProtoDuration) -> Result<Duration, String> {
    if w.nanos != 0 {
        return Err(format!("has nanos {}; whole seconds only", w.nanos));
    }
    let (min, max) = (MIN_POINT_IN_TIME_WINDOW, MAX_POINT_IN_TIME_WINDOW);
    let secs = u64::try_from(w.seconds).map_err(|_| format!("is negative ({}s)", w.seconds))?;
    let d = Duration::from_secs(secs);
    if d < min {
        return Err(format!("{} is shorter than {}", window_human(d), window_human(min)));
    }
    if d > max {
        return Err(format!("{} is longer than {}", window_human(d), window_human(max)));
    }
    Ok(d)
}

/// A window as it would be written: whole days as `400d` (humantime says `1year 1month 4days 7h 26m 24s`).
fn window_human(d: Duration) -> String {
    match d.as_secs() {
        s if s >= 86_400 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        _ => human(d),
    }
}

fn to_chrono(t: Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32).unwrap_or_default()
}

fn from_chrono(t: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

impl Plan {
    /// The nominal time between backups (for jitter and timeouts): the interval, or the gap after `after`.
    pub fn period(&self, after: Timestamp) -> Duration {
        match self {
            Self::Interval(d) => *d,
            Self::Cron(c) => {
                let a = to_chrono(after);
                let n1 = c.find_next_occurrence(&a, false).unwrap_or(a);
                let n2 = c.find_next_occurrence(&n1, false).unwrap_or(n1);
                (n2 - n1).to_std().unwrap_or_default()
            }
        }
    }

    /// When the backup after `newest` is due, before jitter; `None` (no backup yet) means now.
    pub fn due(&self, newest: Option<Timestamp>, now: Timestamp) -> Timestamp {
        let Some(newest) = newest else { return now };
        match self {
            Self::Interval(d) => {
                let t = Duration::new(newest.seconds.max(0) as u64, newest.nanos.max(0) as u32) + *d;
                Timestamp { seconds: t.as_secs() as i64, nanos: t.subsec_nanos() as i32 }
            }
            Self::Cron(c) => c.find_next_occurrence(&to_chrono(newest), false).map(from_chrono).unwrap_or(now),
        }
    }
}

/// A random offset for one scheduled backup, so that many clusters on the same interval do not fire together:
/// up to ±`jitter_fraction` of the period, capped at `max_jitter`.
pub fn jitter(period: Duration, b: &Bounds) -> i64 {
    let max = period.mul_f64(b.jitter_fraction.clamp(0.0, 0.5)).min(b.max_jitter).as_millis() as i64;
    if max == 0 {
        return 0;
    }
    rand::rng().random_range(-max..=max)
}

/// `t` moved by `ms` milliseconds.
pub fn shift(t: Timestamp, ms: i64) -> Timestamp {
    let total = t.seconds as i128 * 1000 + (t.nanos / 1_000_000) as i128 + ms as i128;
    Timestamp { seconds: total.div_euclid(1000) as i64, nanos: (total.rem_euclid(1000) * 1_000_000) as i32 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every(secs: i64) -> BackupConfiguration {
        BackupConfiguration { interval: Some(ProtoDuration { seconds: secs, nanos: 0 }), ..Default::default() }
    }

    #[test]
    fn point_in_time_windows_outside_an_hour_to_400_days_are_refused() {
        let w = |seconds, nanos| point_in_time_window(&ProtoDuration { seconds, nanos });
        assert_eq!(w(3600, 0), Ok(Duration::from_secs(3600)));
        assert!(w(7 * 86_400, 0).is_ok());
        assert!(w(400 * 86_400, 0).is_ok());
        let e = w(3599, 0).unwrap_err();
        assert!(e.contains("59m 59s") && e.contains("shorter than 1h"), "{e}");
        let e = w(401 * 86_400, 0).unwrap_err();
        assert_eq!(e, "401d is longer than 400d");
        assert!(w(-1, 0).unwrap_err().contains("negative"));
        assert!(w(7200, 5).unwrap_err().contains("nanos 5"));
    }

    #[test]
    fn intervals_outside_the_bounds_are_refused_naming_them() {
        let b = Bounds::default();
        assert!(plan(&every(3600), &b).is_ok());
        let e = plan(&every(60), &b).unwrap_err();
        assert!(e.contains("1m") && e.contains("out of bounds") && e.contains("1h") && e.contains("1day"), "{e}");
        assert!(plan(&every(2 * 86400), &b).is_err());
        assert!(plan(&BackupConfiguration::default(), &b).is_err());
        let both = BackupConfiguration { schedule: "0 * * * *".into(), ..every(3600) };
        assert!(plan(&both, &b).unwrap_err().contains("not both"));
    }

    #[test]
    fn cron_schedules_are_parsed_and_their_spacing_checked() {
        let b = Bounds::default();
        let six_hourly = BackupConfiguration { schedule: "0 */6 * * *".into(), ..Default::default() };
        let p = plan(&six_hourly, &b).unwrap();
        assert_eq!(p.period(Timestamp::now()), Duration::from_secs(6 * 3600));
        let every_minute = BackupConfiguration { schedule: "* * * * *".into(), ..Default::default() };
        assert!(plan(&every_minute, &b).unwrap_err().contains("out of bounds"));
        let junk = BackupConfiguration { schedule: "every day".into(), ..Default::default() };
        assert!(plan(&junk, &b).unwrap_err().contains("not a cron expression"));
    }

    #[test]
    fn next_backup_is_due_one_interval_after_the_newest() {
        let p = Plan::Interval(Duration::from_secs(3600));
        let now = Timestamp { seconds: 10_000, nanos: 0 };
        assert_eq!(p.due(None, now), now, "no backup yet: due at once");
        assert_eq!(p.due(Some(Timestamp { seconds: 9_000, nanos: 0 }), now).seconds, 12_600);
        // Missed while down: due in the past, so taken at once.
        assert!(p.due(Some(Timestamp { seconds: 1_000, nanos: 0 }), now) < now);
    }

    #[test]
    fn drill_intervals_below_the_minimum_are_refused() {
        let b = Bounds::default();
        assert_eq!(drill_period(&ProtoDuration { seconds: 86400, nanos: 0 }, &b), Ok(Duration::from_secs(86400)));
        let e = drill_period(&ProtoDuration { seconds: 60, nanos: 0 }, &b).unwrap_err();
        assert!(e.contains("--min-drill-interval"), "{e}");
    }

    #[test]
    fn jitter_is_bounded_and_spreads() {
        let b = Bounds::default();
        let hour = Duration::from_secs(3600);
        let values: Vec<i64> = (0..200).map(|_| jitter(hour, &b)).collect();
        assert!(values.iter().all(|v| v.abs() <= 180_000), "±5% of 1h is ±3m");
        let distinct: std::collections::HashSet<_> = values.iter().map(|v| v / 1000).collect();
        assert!(distinct.len() > 50, "jitter should spread backups over many seconds");
        let day = Duration::from_secs(86400);
        assert!((0..200).all(|_| jitter(day, &b).abs() <= 300_000), "capped at 5 minutes");
        assert_eq!(shift(Timestamp { seconds: 10, nanos: 0 }, -1500), Timestamp { seconds: 8, nanos: 500_000_000 });
    }
}
