//! Automatic backups: a loop that, once a second, starts the backups that are due.
//!
//! Per cluster it remembers the newest backup (read once from the store, then updated by every backup,
//! manual ones included), a jitter offset drawn after each backup, and a failure backoff. Due backups are
//! started in due order; `--max-concurrent-backups` job slots (a fair semaphore) make the rest queue in
//! that order.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Result;
use ferry_common::resources::{BackupConfiguration, Resource, ResourceType, Spec, Timestamp};
use tracing::{info, warn};

use crate::backup::{self, Trigger};
use crate::coordinator::{lock, Coordinator};
use crate::metrics::Metrics;
use crate::schedule::{self, Bounds, Plan};

/// How often the loop looks for due backups.
const TICK: Duration = Duration::from_secs(1);
/// First retry delay after a failed automatic backup; doubles per failure, capped at the cluster's period.
const RETRY_BASE: Duration = Duration::from_secs(30);
/// Retry delay for reading a cluster's newest backup from a store that failed to answer.
const SEED_RETRY: Duration = Duration::from_secs(30);

#[derive(Debug, Default, Clone)]
struct ClusterState {
    /// The newest backup was read from the store (and the metrics seeded from it), for every cluster at
    /// start, whether or not an agent is connected; until then the cluster is not scheduled.
    seeded: bool,
    /// When to retry reading the store after it failed (so an outage does not log every tick).
    seed_retry_at: Option<Timestamp>,
    /// The jitter of the next backup was drawn (needs the cluster's plan, so after seeding).
    loaded: bool,
    newest: Option<Timestamp>,
    jitter_ms: i64,
    failures: u32,
    retry_at: Option<Timestamp>,
    /// The configuration last checked and its outcome: checking a cron schedule samples many runs, so it is
    /// redone only when the configuration changes (and an invalid one is logged once).
    checked: Option<(BackupConfiguration, Result<Plan, String>)>,
}

#[derive(Default)]
pub struct Scheduler {
    clusters: Mutex<HashMap<String, ClusterState>>,
    rotation: Mutex<HashMap<String, usize>>,
}

impl Scheduler {
    /// A backup of `cluster` was stored (manual or scheduled): the next one is due a period after it.
    pub fn backup_succeeded(&self, cluster: &str, finished: Timestamp, plan: Option<&Plan>, bounds: &Bounds) {
        let mut all = lock(&self.clusters);
        let st = all.entry(cluster.to_string()).or_default();
        st.newest = Some(st.newest.map_or(finished, |n| n.max(finished)));
        st.failures = 0;
        st.retry_at = None;
        st.jitter_ms = plan.map_or(0, |p| schedule::jitter(p.period(finished), bounds));
    }

    /// A backup of `cluster` failed on every member: retry later, backing off.
    pub fn backup_failed(&self, cluster: &str, now: Timestamp, period: Duration) {
        let mut all = lock(&self.clusters);
        let st = all.entry(cluster.to_string()).or_default();
        st.failures = st.failures.saturating_add(1);
        let delay = RETRY_BASE.saturating_mul(1 << st.failures.min(10).saturating_sub(1)).min(period.max(RETRY_BASE));
        st.retry_at = Some(schedule::shift(now, delay.as_millis() as i64));
    }

    /// Rotates the choice among equally good members.
    pub fn next_rotation(&self, cluster: &str) -> usize {
        let mut r = lock(&self.rotation);
        let n = r.entry(cluster.to_string()).or_default();
        *n = n.wrapping_add(1);
        *n
    }
}

/// Once per cluster (retried while the store fails): reads its newest backup from the store and seeds the
/// per-cluster gauges from it, at start and whether or not an agent reaches etcd, so that alerts on backup age,
/// on a cluster never backed up and on agents that never come back work right after a coordinator restart.
async fn seed(coord: &Arc<Coordinator>, cluster: &str, now: Timestamp) {
    let pending = lock(&coord.scheduler.clusters)
        .get(cluster)
        .is_none_or(|st| !st.seeded && st.seed_retry_at.is_none_or(|t| t <= now));
    if !pending {
        return;
    }
    let labels = Metrics::cluster(cluster);
    // Absent series would keep "== 0" alerts silent for a cluster whose agents never reconnect.
    let _ = coord.metrics.agents_connected.get_or_create(&labels);
    let _ = coord.metrics.etcd_reachable_agents.get_or_create(&labels);
    let newest = match coord.store.list(Some(cluster), &coord.cancel).await {
        Ok(list) => list.first().map(|m| (m.backup.createdat, m.backup.finishedat)),
        Err(e) => {
            warn!(%cluster, "failed to list backups to seed metrics and schedule (retrying in {SEED_RETRY:?}): {e:#}");
            let mut all = lock(&coord.scheduler.clusters);
            all.entry(cluster.to_string()).or_default().seed_retry_at =
                Some(schedule::shift(now, SEED_RETRY.as_millis() as i64));
            return;
        }
    };
    if let Some((_, finished)) = newest {
        let g = coord.metrics.last_success.get_or_create(&labels);
        if g.get() < finished.seconds as f64 {
            g.set(finished.seconds as f64);
        }
    }
    let mut all = lock(&coord.scheduler.clusters);
    let st = all.entry(cluster.to_string()).or_default();
    st.seeded = true;
    st.newest = st.newest.max(newest.map(|(created, _)| created));
}

/// Runs until the coordinator is cancelled.
pub async fn run(coord: Arc<Coordinator>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = coord.cancel.cancelled() => return,
        }
        if let Err(e) = pass(&coord).await {
            warn!("failed to schedule backups: {e:#}");
        }
    }
}

async fn pass(coord: &Arc<Coordinator>) -> Result<()> {
    let now = Timestamp::now();
    let bounds = &coord.settings.bounds;
    let mut due = Vec::new();
    let mut existing = HashSet::new();
    for r in coord.state.list(ResourceType::Cluster)? {
        let Resource { metadata, spec: Spec::Cluster(spec) } = r else { continue };
        let cluster = metadata.id;
        existing.insert(cluster.clone());
        seed(coord, &cluster, now).await;
        let Some(cfg) = spec.backupconfiguration else {
            coord.metrics.automatic_backups_off(&cluster);
            continue;
        };
        let checked = {
            let mut all = lock(&coord.scheduler.clusters);
            let st = all.entry(cluster.clone()).or_default();
            match &st.checked {
                Some((c, result)) if *c == cfg => result.clone(),
                _ => {
                    let result = schedule::plan(&cfg, bounds);
                    if let Err(e) = &result {
                        warn!(%cluster, "automatic backups paused: {e}");
                    }
                    st.checked = Some((cfg, result.clone()));
                    result
                }
            }
        };
        let Ok(plan) = checked else { continue };
        let labels = Metrics::cluster(&cluster);
        coord.metrics.interval.get_or_create(&labels).set(plan.period(now).as_secs_f64());
        // Present (from 0) while automatic backups are on, like the interval.
        let _ = coord.metrics.consecutive_failures.get_or_create(&labels);
        if coord.is_running(&cluster) {
            continue;
        }
        // Nobody to back up from (e.g. just after a restart, before the agents redial): not a failure, and no
        // backoff, so the backup starts the moment an agent that reaches etcd is back. Agents that stay away
        // show in `get agents` and in the FerryBackupTooOld alert.
        if !coord.live_agents(&cluster).iter().any(|a| a.facts.as_ref().is_some_and(|f| f.error.is_none())) {
            continue;
        }
        {
            // The newest backup in the store (read by `seed`) decides when the next is due, so a restart
            // neither adds a backup nor forgets one that was missed.
            let mut all = lock(&coord.scheduler.clusters);
            let st = all.entry(cluster.clone()).or_default();
            if !st.seeded {
                continue;
            }
            if !st.loaded {
                st.loaded = true;
                st.jitter_ms = st.newest.map_or(0, |n| schedule::jitter(plan.period(n), bounds));
            }
        }
        let st = lock(&coord.scheduler.clusters).get(&cluster).cloned().unwrap_or_default();
        if st.retry_at.is_some_and(|t| t > now) {
            continue;
        }
        let at = match st.newest {
            // No backup yet: at once, no jitter.
            None => now,
            Some(_) => schedule::shift(plan.due(st.newest, now), st.jitter_ms),
        };
        if at <= now {
            due.push((at, cluster));
        }
    }
    // Deleted clusters: their series go, so no alert fires for a cluster that no longer exists.
    let deleted: Vec<String> =
        lock(&coord.scheduler.clusters).keys().filter(|c| !existing.contains(*c)).cloned().collect();
    for cluster in deleted {
        lock(&coord.scheduler.clusters).remove(&cluster);
        coord.metrics.forget_cluster(&cluster);
        info!(%cluster, "cluster deleted: its metrics are removed");
    }
    due.sort();
    for (at, cluster) in due {
        match backup::start(coord, &cluster, Trigger::Scheduled) {
            Ok(()) => info!(%cluster, due = %at.human(), "scheduled backup queued"),
            Err(e) => warn!(%cluster, "failed to start scheduled backup: {e}"),
        }
    }
    Ok(())
}
