//! Resolving a point in a cluster's history to what rebuilds it: the lineage it is in, full backups at or
//! before it whose revision the log continues from, and the chained segments through it. Everything that
//! would make the rebuilt state wrong is refused here, before a byte is read: a point outside the covered
//! window, a gap between the base and the point, a segment missing from the chain.

use ferry_common::protocol::{PlanSegment, PointInTime, PointInTimePlan};
use ferry_common::resources::{ChangeLogGap, Timestamp};
use tokio_util::sync::CancellationToken;

use super::{check_chain, open_segment_blocking, SegmentReadError};
use crate::changelog::index::{self, Head, SegmentEntry};
use crate::changelog::ChangeLog;
use crate::store::{Manifest, StoreError};

/// Full backups a plan offers, newest first (a snapshot's true revision can pass the point; then the next).
const MAX_BASES: usize = 3;

/// Why a point cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error("cluster {0} has no change log; turn it on with spec.backupconfiguration.pointintime.enabled (only points after that are restorable)")]
    NoLog(String),
    /// The point is outside what the log covers: the message names the window.
    #[error("{0}")]
    Outside(String),
    /// A gap (or a missing segment) lies between the nearest full backup and the point.
    #[error("{0}")]
    Gap(String),
    /// No full backup the log continues from.
    #[error("{0}")]
    NoBase(String),
    #[error("{0}")]
    Segment(#[from] SegmentReadError),
    #[error("state store: {0}")]
    State(#[from] crate::state::StateError),
    #[error("backup store: {0}")]
    Store(#[from] StoreError),
}

/// One lineage of the log, as a plan looks at it.
#[derive(Debug, Clone)]
struct Lineage {
    lineage: u32,
    start_revision: i64,
    covered_revision: i64,
    covered_time_ms: i64,
    gaps: Vec<ChangeLogGap>,
}

fn ms(t: Option<Timestamp>) -> i64 {
    t.map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos / 1_000_000)).unwrap_or(0)
}

/// `2026-12-07T03:00:00Z` for Unix ms.
pub fn human_ms(t: i64) -> String {
    Timestamp { seconds: t.div_euclid(1000), nanos: (t.rem_euclid(1000) * 1_000_000) as i32 }.human()
}

fn lineages(head: &Head) -> Vec<Lineage> {
    let mut out: Vec<Lineage> = head
        .earlier
        .iter()
        .filter(|e| e.start_revision > 0)
        .map(|e| Lineage {
            lineage: e.lineage,
            start_revision: e.start_revision,
            covered_revision: e.covered_revision,
            covered_time_ms: ms(e.covered_time),
            gaps: e.gaps.clone(),
        })
        .collect();
    if head.start_revision > 0 {
        out.push(Lineage {
            lineage: head.lineage,
            start_revision: head.start_revision,
            covered_revision: head.covered_revision,
            covered_time_ms: ms(head.covered_time),
            gaps: head.gaps.clone(),
        });
    }
    out
}

fn window(l: &Lineage, segments: &[SegmentEntry]) -> String {
    let first = segments.iter().find(|s| s.lineage == l.lineage);
    let from = first.map(|s| format!(" ({})", human_ms(s.first_time_ms))).unwrap_or_default();
    format!(
        "revisions {}..={}{from} through {}",
        l.start_revision,
        l.covered_revision,
        if l.covered_time_ms > 0 { human_ms(l.covered_time_ms) } else { "now".into() }
    )
}

fn windows(ls: &[Lineage], segments: &[SegmentEntry]) -> String {
    let all: Vec<String> = ls.iter().map(|l| format!("lineage {}: {}", l.lineage, window(l, segments))).collect();
    all.join("; ")
}

impl ChangeLog {
    /// Resolves `at` for `cluster`; with `through_covered`, the plan also lists the segments after the point
    /// through the covered revision (what a restore to it would undo).
    pub async fn plan(
        &self,
        cluster: &str,
        at: PointInTime,
        through_covered: bool,
        cancel: &CancellationToken,
    ) -> Result<PointInTimePlan, PlanError> {
        let deps = self.deps();
        let head = self.head(cluster).filter(|h| h.start_revision > 0 || !h.earlier.is_empty());
        let Some(head) = head else { return Err(PlanError::NoLog(cluster.to_string())) };
        let all = lineages(&head);
        if all.is_empty() {
            return Err(PlanError::NoLog(cluster.to_string()));
        }
        let segments = index::segments(deps.state.as_ref(), cluster)?;
        let (lineage, revision, time_ms) = match at {
            PointInTime::Latest => {
                let l = all.last().cloned().ok_or_else(|| PlanError::NoLog(cluster.to_string()))?;
                let (r, t) = (l.covered_revision, l.covered_time_ms);
                (l, r, t)
            }
            PointInTime::Revision(n) | PointInTime::BeforeRevision(n) => {
                let n = if matches!(at, PointInTime::BeforeRevision(_)) { n - 1 } else { n };
                // Revisions of lineages never overlap: a restore bumps the revision above any seen.
                let Some(l) = all.iter().rev().find(|l| l.start_revision - 1 <= n && n <= l.covered_revision) else {
                    return Err(PlanError::Outside(format!(
                        "revision {n} is outside what the change log of {cluster} covers ({}); pick a revision inside it (`ferryctl changes {cluster}` lists them)",
                        windows(&all, &segments)
                    )));
                };
                let t = segments
                    .iter()
                    .find(|s| s.lineage == l.lineage && s.last_revision >= n && s.first_revision <= n)
                    .map(|s| s.last_time_ms)
                    .unwrap_or(0);
                (l.clone(), n, t)
            }
            PointInTime::Time(t) => self.at_time(cluster, &all, &segments, t, cancel).await?,
        };
        if let Some(g) = lineage.gaps.iter().find(|g| g.fromrevision <= revision && revision <= g.torevision) {
            return Err(PlanError::Gap(format!(
                "revision {revision} of {cluster} is inside a gap of the change log (revisions {}..={}: {}); no state inside a gap can be rebuilt: pick a point before revision {} or after {}",
                g.fromrevision, g.torevision, g.reason, g.fromrevision, g.torevision
            )));
        }
        let backups = deps.store.list(Some(cluster), cancel).await?;
        let bases = bases(&backups, &lineage, revision);
        if bases.is_empty() {
            let why = match lineage.gaps.iter().filter(|g| g.torevision < revision).max_by_key(|g| g.torevision) {
                Some(g) if backups.iter().any(|m| m.backup.revision <= revision && m.backup.revision < g.fromrevision) => format!(
                    "a gap of the change log (revisions {}..={}: {}) lies between the newest full backup at or before it and the point{}; pick a point before revision {}",
                    g.fromrevision,
                    g.torevision,
                    g.reason,
                    if g.closedby.is_empty() { String::new() } else { format!(" (backup {} closed it: points after its revision can be rebuilt)", g.closedby) },
                    g.fromrevision
                ),
                _ => format!(
                    "no full backup of {cluster} at or before revision {revision} that the log continues from (lineage {} starts at revision {}); a full backup is the base every point is rebuilt from",
                    lineage.lineage, lineage.start_revision
                ),
            };
            return Err(PlanError::NoBase(format!(
                "revision {revision} of {cluster} cannot be rebuilt: {why} (the change log covers {})",
                windows(&all, &segments)
            )));
        }
        let from = bases.iter().map(|m| m.backup.revision).min().unwrap_or(revision) + 1;
        let through = if through_covered { lineage.covered_revision } else { revision };
        let chosen: Vec<PlanSegment> = segments
            .iter()
            .filter(|s| s.lineage == lineage.lineage && s.last_revision >= from && s.first_revision <= through)
            .map(PlanSegment::from)
            .collect();
        let missing = |a: i64, b: i64| {
            PlanError::Gap(format!(
                "the change log of {cluster} misses revisions {a}..={b} (no stored segment holds them); points after revision {b} need a full backup taken after it"
            ))
        };
        if from <= revision {
            match chosen.first() {
                Some(s) if s.first_revision <= from => {}
                Some(s) => return Err(missing(from, s.first_revision - 1)),
                None => return Err(missing(from, revision)),
            }
            let last = chosen.iter().map(|s| s.last_revision).max().unwrap_or(0);
            if last < revision {
                return Err(missing(last + 1, revision));
            }
        }
        check_chain(&chosen).map_err(PlanError::Gap)?;
        Ok(PointInTimePlan {
            cluster: cluster.to_string(),
            revision,
            time_ms,
            lineage: lineage.lineage,
            bases: bases.into_iter().map(|m| crate::api::backups::backup_resource(m.clone())).collect(),
            segments: chosen,
            covered_revision: lineage.covered_revision,
            covered_time_ms: lineage.covered_time_ms,
        })
    }

    /// The lineage and newest revision received at or before `t`.
    async fn at_time(
        &self,
        cluster: &str,
        all: &[Lineage],
        segments: &[SegmentEntry],
        t: i64,
        cancel: &CancellationToken,
    ) -> Result<(Lineage, i64, i64), PlanError> {
        let deps = self.deps();
        let outside = |what: &str| {
            PlanError::Outside(format!(
                "{} is {what} what the change log of {cluster} covers ({}); pick a time inside it",
                human_ms(t),
                windows(all, segments)
            ))
        };
        // The newest lineage whose first change is at or before `t`.
        let start_ms = |l: &Lineage| segments.iter().find(|s| s.lineage == l.lineage).map(|s| s.first_time_ms);
        let Some(l) = all.iter().rev().find(|l| start_ms(l).is_some_and(|s| s <= t)) else {
            return Err(outside("before"));
        };
        if l.covered_time_ms > 0 && t > l.covered_time_ms {
            let newest = all.last().is_some_and(|n| n.lineage == l.lineage);
            return Err(if newest {
                PlanError::Outside(format!(
                    "{} is after what the change log of {cluster} covers yet (through revision {} at {}); use latest, or wait for the log to catch up",
                    human_ms(t),
                    l.covered_revision,
                    human_ms(l.covered_time_ms)
                ))
            } else {
                outside("between two lineages of (the cluster was being restored), outside")
            });
        }
        let Some(s) = segments.iter().rfind(|s| s.lineage == l.lineage && s.first_time_ms <= t) else {
            return Err(outside("before"));
        };
        if s.last_time_ms <= t {
            // Nothing changed between this segment's last revision and `t`: the covered time proves it.
            return Ok((l.clone(), s.last_revision, s.last_time_ms));
        }
        let stored = deps.store.read_segment(cluster, &s.name, cancel).await?;
        let opened =
            open_segment_blocking(&PlanSegment::from(s), stored, deps.identities.as_ref()).await.map_err(|e| match e {
                SegmentReadError::Encrypted(_) => PlanError::Outside(format!(
                    "the change log of {cluster} is encrypted and this coordinator has no --identity to find the revision at {}; give a revision instead, or ask a coordinator started with --identity",
                    human_ms(t)
                )),
                other => other.into(),
            })?;
        let found = opened.revisions.iter().rev().find(|r| r.time_ms <= t).map(|r| (r.revision, r.time_ms));
        let (revision, time) = found.unwrap_or((s.first_revision - 1, s.first_time_ms));
        Ok((l.clone(), revision, time))
    }
}

/// Full backups of `lineage` at or before `revision` that the log continues from, newest first.
fn bases<'a>(backups: &'a [Manifest], l: &Lineage, revision: i64) -> Vec<&'a Manifest> {
    let mut v: Vec<&Manifest> = backups
        .iter()
        .filter(|m| {
            let r = m.backup.revision;
            r <= revision
                && r + 1 >= l.start_revision
                && !l.gaps.iter().any(|g| g.torevision > r && g.fromrevision <= revision)
        })
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse((m.backup.revision, m.backup.createdat)));
    v.truncate(MAX_BASES);
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::resources::EtcdBackupSpec;

    fn backup(id: &str, revision: i64) -> Manifest {
        Manifest {
            format: 1,
            id: id.into(),
            backup: EtcdBackupSpec {
                cluster: "c".into(),
                createdat: Timestamp::default(),
                snapshot: String::new(),
                size: 1,
                rawsize: 1,
                member: "m1".into(),
                memberid: String::new(),
                etcdclusterid: String::new(),
                etcdversion: String::new(),
                revision,
                sha256: String::new(),
                rawsha256: String::new(),
                zstdlevel: 3,
                startedat: Timestamp::default(),
                finishedat: Timestamp::default(),
                encryption: None,
                derivedfrom: None,
            },
            deployment: None,
            verification: None,
        }
    }

    fn gap(from: i64, to: i64) -> ChangeLogGap {
        ChangeLogGap { fromrevision: from, torevision: to, ..Default::default() }
    }

    fn segment(name: &str, first: i64, last: i64, sha: &str, prev: &str) -> PlanSegment {
        PlanSegment {
            name: name.into(),
            first_revision: first,
            last_revision: last,
            size: 1,
            sha256: sha.into(),
            prev_sha256: prev.into(),
            encrypted: false,
            first_time_ms: 0,
            last_time_ms: 0,
        }
    }

    /// A base must be at or before the point, the log must continue from it (its revision + 1 at or after the
    /// lineage's start) and no gap may lie between it and the point; the newest come first.
    #[test]
    fn bases_are_the_newest_full_backups_the_log_continues_from_without_a_gap() {
        let backups = [backup("old", 5), backup("a", 20), backup("b", 40), backup("c", 60), backup("late", 90)];
        let l = Lineage { lineage: 0, start_revision: 10, covered_revision: 100, covered_time_ms: 0, gaps: vec![] };
        let ids = |v: Vec<&Manifest>| v.into_iter().map(|m| m.id.clone()).collect::<Vec<_>>();
        assert_eq!(ids(bases(&backups, &l, 70)), ["c", "b", "a"], "old is before the log, late after the point");
        assert_eq!(ids(bases(&backups, &l, 9)), Vec::<String>::new());
        let with_gap = Lineage { gaps: vec![gap(45, 50)], ..l.clone() };
        assert_eq!(ids(bases(&backups, &with_gap, 70)), ["c"], "a and b are behind the gap");
        assert_eq!(ids(bases(&backups, &with_gap, 44)), ["b", "a"]);
        assert!(bases(&backups, &Lineage { gaps: vec![gap(61, 65)], ..l }, 70).is_empty());
    }

    #[test]
    fn a_chain_joins_only_when_each_segment_names_the_one_before_and_starts_after_it() {
        let a = segment("a", 1, 10, "h1", "00");
        let b = segment("b", 11, 20, "h2", "h1");
        assert!(check_chain(&[a.clone(), b.clone()]).is_ok());
        let hole = segment("b", 12, 20, "h2", "h1");
        assert!(check_chain(&[a.clone(), hole]).is_err_and(|e| e.contains("misses revisions 11..=11")));
        let foreign = segment("b", 11, 20, "h2", "hx");
        assert!(check_chain(&[a, foreign]).is_err_and(|e| e.contains("does not name")));
    }
}
