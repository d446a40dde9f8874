//! Which backups a retention policy keeps: a pure function of the backups and the policy.
//!
//! Kept: the newest `keeplast`; plus, for each of the last `hourly` hours, `daily` days and `weekly` weeks
//! (UTC, weeks starting Monday) *that have backups*, the newest backup of that period; and always the newest
//! backup. Counting periods that have backups (as restic does) rather than calendar periods back from now
//! means a coordinator that was down for a week deletes nothing because time passed without new backups.

use std::collections::HashSet;

use anyhow::{Context as _, Result};
use ferry_common::resources::{Resource, ResourceType, Retention, Spec, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::JobDeps;
use crate::metrics::Metrics;
use crate::store::StoreError;

/// Applies `cluster`'s retention policy (if it has one) after a successful backup: a deletion removes the
/// manifest first, then the object, so nothing half-deleted is listed. `verified` is the backup just
/// committed, which the coordinator itself checked: it is never deleted, whatever dates other manifests carry;
/// nor is the newest backup that passed a restore drill without a warning.
pub(super) async fn apply(deps: &JobDeps, cluster: &str, verified: &str, cancel: &CancellationToken) -> Result<()> {
    let config = match deps.state.get(ResourceType::Cluster, cluster)? {
        Some(Resource { spec: Spec::Cluster(c), .. }) => c.backupconfiguration,
        _ => None,
    };
    let window = config.as_ref().and_then(|b| b.pointintime).filter(|p| p.enabled).map(|p| p.window_seconds());
    let Some(policy) = config.and_then(|b| b.retention) else { return Ok(()) };
    // The newest backup a restore drill proved (without a key-count warning) is kept whatever its age: it may
    // be the last one known to hold the cluster as it should be.
    let proved = deps.status.drill(cluster).map(|d| d.lastpassedbackup).unwrap_or_default();
    // The store lists only this deployment's backups: another deployment sharing the bucket keeps its own.
    let all = deps.store.list(Some(cluster), cancel).await?;
    let listed: Vec<(String, Timestamp)> = all.iter().map(|m| (m.id.clone(), m.backup.createdat)).collect();
    let members: Vec<(String, String)> = all.iter().map(|m| (m.id.clone(), m.backup.member.clone())).collect();
    let doomed = keep_two_members(to_delete(&listed, &policy), &listed, &members);
    // The change log's window starts from this backup: without it the window is not restorable.
    let base = window.and_then(|w| point_in_time_base(&listed, w, Timestamp::now())).unwrap_or_default();
    for id in doomed.into_iter().filter(|id| id != verified && *id != proved && *id != base) {
        let Some(m) = all.iter().find(|m| m.id == id) else { continue };
        // A deposed leader (stopped past its lease, then resumed) deletes nothing: checked before each delete.
        deps.state.still_leading().context("retention stops: this replica no longer leads")?;
        match deps.store.delete(m, cancel).await {
            Ok(()) => {}
            Err(e @ StoreError::Foreign(_)) => {
                warn!(backup_id = %id, "retention skips a backup: {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        deps.metrics.retention_deleted.get_or_create(&Metrics::cluster(cluster)).inc();
        info!(backup_id = %id, createdat = %m.backup.createdat.human(), ?policy, "retention deleted backup");
    }
    Ok(())
}

/// The backup a point-in-time window of `window_seconds` starts from: the newest one at least that old
/// (`None` while every backup is younger: then nothing is old enough to be a base and the log is kept whole).
pub fn point_in_time_base(backups: &[(String, Timestamp)], window_seconds: i64, now: Timestamp) -> Option<String> {
    let cutoff = now.seconds.saturating_sub(window_seconds);
    backups
        .iter()
        .filter(|(_, t)| t.seconds <= cutoff)
        .max_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)))
        .map(|(id, _)| id.clone())
}

/// Ids to delete, given `(id, createdat)` of every listed (successful) backup of one cluster.
pub fn to_delete(backups: &[(String, Timestamp)], policy: &Retention) -> Vec<String> {
    let mut sorted: Vec<&(String, Timestamp)> = backups.iter().collect();
    sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let mut keep: HashSet<&str> = HashSet::new();
    if let Some(newest) = sorted.first() {
        keep.insert(&newest.0);
    }
    for b in sorted.iter().take(policy.keeplast as usize) {
        keep.insert(&b.0);
    }
    let hour = |t: &Timestamp| t.seconds.div_euclid(3600);
    let day = |t: &Timestamp| t.seconds.div_euclid(86400);
    // 1970-01-01 was a Thursday; shifting by 3 days makes weeks start on Monday.
    let week = |t: &Timestamp| (t.seconds.div_euclid(86400) + 3).div_euclid(7);
    for (count, period) in
        [(policy.hourly, &hour as &dyn Fn(&Timestamp) -> i64), (policy.daily, &day), (policy.weekly, &week)]
    {
        let mut seen = HashSet::new();
        for b in &sorted {
            if seen.len() >= count as usize {
                break;
            }
            // Newest first: the first backup seen in a period is that period's newest.
            if seen.insert(period(&b.1)) {
                keep.insert(&b.0);
            }
        }
    }
    sorted.iter().filter(|b| !keep.contains(b.0.as_str())).map(|b| b.0.clone()).collect()
}

/// `doomed` less the newest backup of a second member, when every backup kept came from one member and
/// another member's exists: a stolen node whose backups are always chosen (or that lies its way to being
/// chosen) cannot make retention keep only what it sent (issue 26). `members` is `(id, member)`.
pub fn keep_two_members(
    mut doomed: Vec<String>,
    backups: &[(String, Timestamp)],
    members: &[(String, String)],
) -> Vec<String> {
    let member_of = |id: &str| members.iter().find(|(i, _)| i == id).map(|(_, m)| m.as_str());
    let kept: HashSet<&str> = backups
        .iter()
        .map(|(id, _)| id.as_str())
        .filter(|id| !doomed.iter().any(|d| d == id))
        .filter_map(member_of)
        .collect();
    if kept.len() != 1 {
        return doomed;
    }
    let mut by_age: Vec<&(String, Timestamp)> = backups.iter().collect();
    by_age.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| b.0.cmp(&a.0)));
    let other = by_age.iter().find(|(id, _)| member_of(id).is_some_and(|m| !kept.contains(m)));
    if let Some((id, _)) = other {
        doomed.retain(|d| d != id);
    }
    doomed
}

/// Checks a policy: one that keeps nothing but the newest backup is almost certainly a mistake.
pub fn check(policy: &Retention) -> Result<(), String> {
    if policy.keeplast == 0 && policy.hourly == 0 && policy.daily == 0 && policy.weekly == 0 {
        return Err("retention keeps nothing (all of keeplast, hourly, daily, weekly are 0); set at least one, or remove retention to keep every backup".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3600;
    const D: i64 = 86400;

    #[test]
    fn the_newest_backup_of_a_second_member_is_kept_too() {
        let b = vec![at("m1-3", 300), at("m1-2", 200), at("m2-1", 100), at("m3-0", 50)];
        let members: Vec<(String, String)> =
            b.iter().map(|(id, _)| (id.clone(), id.split('-').next().unwrap_or_default().to_string())).collect();
        let keep2 = Retention { keeplast: 2, ..Default::default() };
        let doomed = keep_two_members(to_delete(&b, &keep2), &b, &members);
        assert_eq!(sorted(doomed), ["m3-0"], "m2's newest stays beside m1's two");
        // Two members kept already: the policy alone decides.
        let keep3 = Retention { keeplast: 3, ..Default::default() };
        assert_eq!(sorted(keep_two_members(to_delete(&b, &keep3), &b, &members)), ["m3-0"]);
        // One member only: nothing to add.
        let solo: Vec<(String, String)> = b.iter().map(|(id, _)| (id.clone(), "m1".to_string())).collect();
        assert_eq!(sorted(keep_two_members(to_delete(&b, &keep2), &b, &solo)), ["m2-1", "m3-0"]);
    }

    fn at(id: &str, seconds: i64) -> (String, Timestamp) {
        (id.to_string(), Timestamp { seconds, nanos: 0 })
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    #[test]
    fn the_point_in_time_base_is_the_newest_backup_older_than_the_window() {
        let b = vec![at("b0", 10 * H), at("b1", 20 * H), at("b2", 30 * H)];
        let now = Timestamp { seconds: 40 * H, nanos: 0 };
        assert_eq!(point_in_time_base(&b, 15 * H, now).as_deref(), Some("b1"));
        assert_eq!(point_in_time_base(&b, 10 * H, now).as_deref(), Some("b2"), "exactly the window's age counts");
        assert_eq!(point_in_time_base(&b, 31 * H, now), None, "every backup within the window: no base yet");
        assert_eq!(point_in_time_base(&b, 7 * D, now), None);
    }

    #[test]
    fn keeplast_keeps_the_newest_n() {
        let b: Vec<_> = (0..5).map(|i| at(&format!("b{i}"), 1_000_000 + i * 60)).collect();
        let r = Retention { keeplast: 2, ..Default::default() };
        assert_eq!(sorted(to_delete(&b, &r)), ["b0", "b1", "b2"]);
    }

    #[test]
    fn the_newest_backup_is_never_deleted() {
        let b = vec![at("old", 1_000_000), at("new", 2_000_000)];
        assert_eq!(to_delete(&b, &Retention::default()), ["old"]);
        assert!(to_delete(&[at("only", 5)], &Retention::default()).is_empty());
    }

    #[test]
    fn hourly_daily_weekly_keep_the_newest_of_each_period() {
        // Monday 2026-11-16 00:00 UTC.
        let monday = 1_794_787_200;
        let b = vec![
            at("mon-00:10", monday + 600),
            at("mon-00:50", monday + 3000),     // newest of hour 0 on Monday
            at("mon-01:20", monday + H + 1200), // newest of hour 1 on Monday
            at("tue-09:00", monday + D + 9 * H),
            at("tue-23:00", monday + D + 23 * H), // newest of Tuesday
            at("last-sun", monday - D + 5 * H),   // the week before
            at("last-sat", monday - 2 * D),
        ];
        let hourly = Retention { hourly: 2, ..Default::default() };
        // The two newest hours with backups: Tuesday 23h and Tuesday 9h.
        assert_eq!(sorted(to_delete(&b, &hourly)), ["last-sat", "last-sun", "mon-00:10", "mon-00:50", "mon-01:20"]);
        let daily = Retention { daily: 3, ..Default::default() };
        // Newest of Tuesday, Monday and the Sunday before.
        assert_eq!(sorted(to_delete(&b, &daily)), ["last-sat", "mon-00:10", "mon-00:50", "tue-09:00"]);
        let weekly = Retention { weekly: 2, ..Default::default() };
        // Newest of this week (Tue 23h) and of last week (Sunday).
        assert_eq!(sorted(to_delete(&b, &weekly)), ["last-sat", "mon-00:10", "mon-00:50", "mon-01:20", "tue-09:00"]);
        let combined = Retention { keeplast: 1, hourly: 1, daily: 2, weekly: 2 };
        assert_eq!(sorted(to_delete(&b, &combined)), ["last-sat", "mon-00:10", "mon-00:50", "tue-09:00"]);
    }

    #[test]
    fn empty_policies_are_refused() {
        assert!(check(&Retention::default()).is_err());
        assert!(check(&Retention { daily: 7, ..Default::default() }).is_ok());
    }
}
