//! Automatic backups: the scheduler, a task that owns its per-cluster state outright.
//!
//! Per cluster it remembers the newest backup (read once from the store — in the background, so a slow or
//! unreachable store holds up only that cluster — then updated from every [`JobOutcome`], manual backups
//! included), a jitter offset drawn after each backup, and a failure backoff. Once a second it starts the
//! backups that are due, in due order; the job slots of [`Jobs`] make the rest queue in that order. When
//! [`plan`] is the pure part: when a backup is due.

pub mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use ferry_common::backoff::Backoff;
use ferry_common::resources::{BackupConfiguration, ProtoDuration, Resource, ResourceType, Spec, Timestamp};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

use self::plan::{Bounds, Plan};
use crate::agents::Agents;
use crate::backup::{JobOutcome, Jobs, Trigger};
use crate::drill::Drills;
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::store::{BackupStore, StoreError};

/// How often the scheduler looks for due backups.
const TICK: Duration = Duration::from_secs(1);
/// First retry delay after a failed backup; doubles per failure, capped at the cluster's period.
const RETRY_BASE: Duration = Duration::from_secs(30);
/// After a failed listing of a cluster's backups, wait this long before listing again.
const LOAD_RETRY: Duration = Duration::from_secs(10);
/// Period assumed for the backoff of a cluster whose configuration cannot be planned.
const DEFAULT_PERIOD: Duration = Duration::from_secs(3600);

/// What the scheduler works with.
pub struct SchedulerDeps {
    pub state: Arc<dyn StateStore>,
    pub store: Arc<BackupStore>,
    pub agents: Agents,
    pub jobs: Jobs,
    pub metrics: Arc<Metrics>,
    pub bounds: Bounds,
    pub drills: Drills,
}

/// Starts the scheduler task; it runs until `cancel` fires, taking job outcomes from `outcomes`.
pub fn spawn(
    deps: SchedulerDeps,
    outcomes: mpsc::UnboundedReceiver<JobOutcome>,
    cancel: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let SchedulerDeps { state, store, agents, jobs, metrics, bounds, drills } = deps;
    let scheduler = Scheduler::new(store, metrics, bounds);
    tokio::spawn(run(scheduler, state, agents, jobs, drills, outcomes, cancel).instrument(info_span!("scheduler")))
}

async fn run(
    mut s: Scheduler,
    state: Arc<dyn StateStore>,
    agents: Agents,
    jobs: Jobs,
    drills: Drills,
    mut outcomes: mpsc::UnboundedReceiver<JobOutcome>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The cluster records, decoded again only when the store says they changed.
    let mut cached: Option<(u64, ClusterConfigs)> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let generation = state.generation(ResourceType::Cluster);
                let fresh = matches!((&cached, generation), (Some((g, _)), Some(now)) if *g == now);
                if !fresh {
                    match cluster_configs(state.as_ref()) {
                        Ok(c) => cached = Some((generation.unwrap_or(0), c)),
                        Err(e) => {
                            warn!("failed to schedule backups: {e:#}");
                            continue;
                        }
                    }
                }
                let Some((_, clusters)) = &cached else { continue };
                let can_start = |c: &str| !jobs.is_running(c) && agents.any_reaches_etcd(c);
                for (at, cluster) in s.pass(Timestamp::now(), clusters, &can_start) {
                    match jobs.start(&cluster, Trigger::Scheduled) {
                        Ok(()) => info!(%cluster, due = %at.human(), "scheduled backup queued"),
                        Err(e) => warn!(%cluster, "failed to start scheduled backup: {e}"),
                    }
                }
                // Drills run in their own slot, one at a time: they never hold up a backup.
                let now = Timestamp::now();
                for cluster in s.drills_due(now, clusters, &|c| drills.last_drill(c), &|c| drills.retry_due(c, now)) {
                    if drills.try_start(&cluster) {
                        s.drill_started(&cluster, now);
                    }
                }
            }
            Some(o) = outcomes.recv() => s.outcome(o),
            Some(Ok((cluster, result))) = s.loads.join_next() => s.loaded(&cluster, result, Timestamp::now()),
            () = cancel.cancelled() => {
                s.stop().await;
                return;
            }
        }
    }
}

/// Every cluster and its backup configuration.
type ClusterConfigs = Vec<(String, Option<BackupConfiguration>)>;

fn cluster_configs(state: &dyn StateStore) -> Result<ClusterConfigs, crate::state::StateError> {
    Ok(state
        .list(ResourceType::Cluster)?
        .into_iter()
        .filter_map(|r| match r {
            Resource { metadata, spec: Spec::Cluster(spec) } => Some((metadata.id, spec.backupconfiguration)),
            _ => None,
        })
        .collect())
}

#[derive(Debug, Default, Clone)]
struct ClusterState {
    /// Read from the store once; until then the cluster is not scheduled.
    loaded: bool,
    /// A listing is under way.
    loading: bool,
    /// After a failed listing: not before this.
    load_retry_at: Option<Timestamp>,
    newest: Option<Timestamp>,
    jitter_ms: i64,
    failures: u32,
    retry_at: Option<Timestamp>,
    /// When the next restore drill is due (`None`: not known yet, read from the status first).
    drill_next: Option<Timestamp>,
    /// The drill interval last found invalid, so it is logged once.
    drill_invalid: Option<ProtoDuration>,
    /// The configuration last checked and its outcome: checking a cron schedule samples many runs, so it is
    /// redone only when the configuration changes (and an invalid one is logged once).
    checked: Option<(BackupConfiguration, Result<Plan, String>)>,
}

impl ClusterState {
    fn plan(&self) -> Option<&Plan> {
        self.checked.as_ref().and_then(|(_, r)| r.as_ref().ok())
    }
}

type Loaded = (String, Result<Option<Timestamp>, StoreError>);

/// The scheduler's state; only its task touches it.
struct Scheduler {
    clusters: HashMap<String, ClusterState>,
    store: Arc<BackupStore>,
    metrics: Arc<Metrics>,
    bounds: Bounds,
    /// Listings of clusters' newest backups, each in its own task.
    loads: JoinSet<Loaded>,
    loads_cancel: CancellationToken,
}

impl Scheduler {
    fn new(store: Arc<BackupStore>, metrics: Arc<Metrics>, bounds: Bounds) -> Self {
        Self {
            clusters: HashMap::new(),
            store,
            metrics,
            bounds,
            loads: JoinSet::new(),
            loads_cancel: CancellationToken::new(),
        }
    }

    /// One look at every cluster: returns the backups due now, in due order. Never waits: a cluster whose
    /// newest backup is not known yet gets a listing in the background and is looked at again once it is.
    fn pass(
        &mut self,
        now: Timestamp,
        clusters: &[(String, Option<BackupConfiguration>)],
        can_start: &dyn Fn(&str) -> bool,
    ) -> Vec<(Timestamp, String)> {
        // A deleted cluster: forget it and every metric series about it.
        let gone: Vec<String> =
            self.clusters.keys().filter(|c| !clusters.iter().any(|(n, _)| n == *c)).cloned().collect();
        for cluster in gone {
            self.clusters.remove(&cluster);
            self.metrics.remove_cluster(&cluster);
            info!(%cluster, "cluster deleted: its schedule and metrics are gone");
        }
        let mut due = Vec::new();
        for (cluster, cfg) in clusters {
            let st = self.clusters.entry(cluster.clone()).or_default();
            if !st.loaded && !st.loading && st.load_retry_at.is_none_or(|t| t <= now) {
                // Once per cluster, whether or not an agent is back and whether or not backups are automatic:
                // the newest backup in the store seeds the last-success gauge (so "backup too old" alerts work
                // right after a restart) and decides when the next is due, so a restart neither adds a backup
                // nor forgets one that was missed.
                st.loading = true;
                let (store, cancel, c) = (self.store.clone(), self.loads_cancel.clone(), cluster.clone());
                let span = info_span!("list_newest", cluster = %c);
                self.loads.spawn(
                    async move {
                        let newest = store.list(Some(&c), &cancel).await.map(|l| l.first().map(|m| m.backup.createdat));
                        (c, newest)
                    }
                    .instrument(span),
                );
            }
            // Every cluster's agent gauges exist from the start (0 until an agent connects), so "no agent
            // reaches etcd" alerts can fire for a cluster whose agents never came back after a restart.
            let labels = Metrics::cluster(cluster);
            let _ = self.metrics.agents_connected.get_or_create(&labels);
            let _ = self.metrics.etcd_reachable_agents.get_or_create(&labels);
            // Without an interval or schedule the configuration serves manual backups only.
            let Some(cfg) = cfg.as_ref().filter(|c| c.is_automatic()) else {
                // Automatic backups off: no interval to show (the FerryBackupTooOld alert keys on it).
                self.metrics.clear_interval(cluster);
                continue;
            };
            let plan = match &st.checked {
                Some((c, result)) if c == cfg => result.clone(),
                _ => {
                    let result = plan::plan(cfg, &self.bounds);
                    if let Err(e) = &result {
                        warn!(%cluster, "automatic backups paused: {e}");
                    }
                    st.checked = Some((cfg.clone(), result.clone()));
                    result
                }
            };
            let Ok(plan) = plan else {
                self.metrics.clear_interval(cluster);
                continue;
            };
            self.metrics.interval.get_or_create(&labels).set(plan.period(now).as_secs_f64());
            self.metrics.consecutive_failures.get_or_create(&labels).set(i64::from(st.failures));
            // Nothing to back up from (e.g. just after a restart, before the agents redial) or already running:
            // not a failure, and no backoff, so the backup starts the moment it can.
            if !st.loaded || !can_start(cluster) {
                continue;
            }
            if st.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            let at = match st.newest {
                // No backup yet: at once, no jitter.
                None => now,
                Some(_) => plan::shift(plan.due(st.newest, now), st.jitter_ms),
            };
            if at <= now {
                due.push((at, cluster.clone()));
            }
        }
        due.sort();
        due
    }

    /// The clusters whose restore drill is due now, in name order. `last_drill` reads when a cluster's latest
    /// drill ended (once per cluster, after a restart); `retry_due` says a drill is due sooner. A cluster is
    /// drilled only once it has a backup.
    fn drills_due(
        &mut self,
        now: Timestamp,
        clusters: &[(String, Option<BackupConfiguration>)],
        last_drill: &dyn Fn(&str) -> Option<Timestamp>,
        retry_due: &dyn Fn(&str) -> bool,
    ) -> Vec<String> {
        let mut due = Vec::new();
        for (cluster, cfg) in clusters {
            let Some(st) = self.clusters.get_mut(cluster) else { continue };
            let labels = Metrics::cluster(cluster);
            let Some(d) = cfg.as_ref().and_then(|c| c.drillinterval) else {
                self.metrics.drill_interval.remove(&labels);
                continue;
            };
            let period = match plan::drill_period(&d, &self.bounds) {
                Ok(p) => p,
                Err(e) => {
                    if st.drill_invalid != Some(d) {
                        warn!(%cluster, "restore drills paused: {e}");
                        st.drill_invalid = Some(d);
                    }
                    self.metrics.drill_interval.remove(&labels);
                    continue;
                }
            };
            st.drill_invalid = None;
            self.metrics.drill_interval.get_or_create(&labels).set(period.as_secs_f64());
            if !st.loaded || st.newest.is_none() {
                continue;
            }
            let next = *st
                .drill_next
                .get_or_insert_with(|| last_drill(cluster).map_or(now, |t| plan::shift(t, period.as_millis() as i64)));
            // A drill that could not compare its backup with another member comes back sooner.
            if next <= now || retry_due(cluster) {
                due.push(cluster.clone());
            }
        }
        due.sort();
        due
    }

    /// A drill of `cluster` started at `now`: the next is one period later.
    fn drill_started(&mut self, cluster: &str, now: Timestamp) {
        let Some(st) = self.clusters.get_mut(cluster) else { return };
        // From the start of this drill (the status records its end).
        let period = st
            .checked
            .as_ref()
            .and_then(|(c, _)| c.drillinterval)
            .and_then(|d| plan::drill_period(&d, &self.bounds).ok())
            .unwrap_or(DEFAULT_PERIOD);
        st.drill_next = Some(plan::shift(now, period.as_millis() as i64));
    }

    /// A cluster's listing finished.
    fn loaded(&mut self, cluster: &str, result: Result<Option<Timestamp>, StoreError>, now: Timestamp) {
        let st = self.clusters.entry(cluster.to_string()).or_default();
        st.loading = false;
        let newest = match result {
            Ok(n) => n,
            Err(e) => {
                warn!(%cluster, "cannot list backups to schedule the next one: {e:#}");
                st.load_retry_at = Some(plan::shift(now, LOAD_RETRY.as_millis() as i64));
                return;
            }
        };
        // A manifest dated in the future (written by an older Ferry from an agent's clock, or planted) would
        // put the next backup off until long after it: the coordinator's clock caps it.
        let newest = newest.map(|n| n.min(now));
        if let Some(n) = newest {
            // After a restart the gauge starts from the store, so "backup too old" alerts keep working.
            let g = self.metrics.last_success.get_or_create(&Metrics::cluster(cluster));
            if g.get() < n.seconds as f64 {
                g.set(n.seconds as f64);
            }
        }
        st.loaded = true;
        st.load_retry_at = None;
        st.newest = st.newest.max(newest);
        let period = st.newest.and_then(|n| st.plan().map(|p| p.period(n)));
        st.jitter_ms = period.map_or(0, |p| plan::jitter(p, &self.bounds));
    }

    /// A job finished: a success moves the next backup a period on, a failure backs off.
    fn outcome(&mut self, o: JobOutcome) {
        let st = self.clusters.entry(o.cluster.clone()).or_default();
        match o.result {
            Ok(created) => {
                st.newest = Some(st.newest.map_or(created, |n| n.max(created)));
                st.failures = 0;
                st.retry_at = None;
                st.jitter_ms = st.plan().map_or(0, |p| plan::jitter(p.period(created), &self.bounds));
            }
            Err(_) => {
                st.failures = st.failures.saturating_add(1);
                let period = st.plan().map_or(DEFAULT_PERIOD, |p| p.period(o.at));
                let backoff = Backoff { base: RETRY_BASE, max: period.max(RETRY_BASE), jitter: 0.0 };
                st.retry_at = Some(plan::shift(o.at, backoff.delay(st.failures).as_millis() as i64));
            }
        }
    }

    /// Cancels the listings under way and waits for them.
    async fn stop(&mut self) {
        self.loads_cancel.cancel();
        self.loads.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use ferry_common::resources::ProtoDuration;

    use super::*;
    use crate::store::Failures;

    fn hourly() -> Option<BackupConfiguration> {
        Some(BackupConfiguration { interval: Some(ProtoDuration { seconds: 3600, nanos: 0 }), ..Default::default() })
    }

    fn scheduler(failures: Failures) -> (Scheduler, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let store = BackupStore::local(dir.path()).unwrap().with_failures(failures);
        (Scheduler::new(Arc::new(store), Arc::new(Metrics::default()), Bounds::default()), dir)
    }

    async fn next_load(s: &mut Scheduler) {
        let (cluster, result) = tokio::time::timeout(Duration::from_secs(5), s.loads.join_next())
            .await
            .expect("a listing finished")
            .expect("a listing was under way")
            .expect("the listing task did not panic");
        s.loaded(&cluster, result, Timestamp::now());
    }

    #[tokio::test]
    async fn a_listing_that_hangs_holds_up_only_its_own_cluster() {
        let (mut s, _dir) = scheduler(Failures { hang_list: ["slow".to_string()].into(), ..Default::default() });
        let clusters = vec![("slow".to_string(), hourly()), ("fast".to_string(), hourly())];
        let started = std::time::Instant::now();
        assert!(s.pass(Timestamp::now(), &clusters, &|_| true).is_empty(), "nothing is known yet");
        assert!(started.elapsed() < Duration::from_secs(1), "the pass did not wait for the store");
        next_load(&mut s).await;
        let due = s.pass(Timestamp::now(), &clusters, &|_| true);
        assert_eq!(due.iter().map(|(_, c)| c.as_str()).collect::<Vec<_>>(), ["fast"], "{due:?}");
        s.stop().await;
    }

    #[tokio::test]
    async fn a_failed_listing_is_retried_later_not_every_tick() {
        let (mut s, _dir) =
            scheduler(Failures { fail_lists: std::sync::atomic::AtomicU32::new(1), ..Default::default() });
        let clusters = vec![("c".to_string(), hourly())];
        let now = Timestamp::now();
        s.pass(now, &clusters, &|_| true);
        next_load(&mut s).await;
        assert!(s.pass(now, &clusters, &|_| true).is_empty());
        assert!(s.loads.is_empty(), "no new listing before LOAD_RETRY");
        let later = plan::shift(now, LOAD_RETRY.as_millis() as i64 + 1000);
        s.pass(later, &clusters, &|_| true);
        next_load(&mut s).await;
        assert_eq!(s.pass(later, &clusters, &|_| true).len(), 1, "due at once: no backup yet");
    }

    #[tokio::test]
    async fn the_interval_gauge_goes_when_backups_are_turned_off_and_all_series_when_the_cluster_goes() {
        let (mut s, _dir) = scheduler(Failures::default());
        let metrics = s.metrics.clone();
        let has = |what: &str| metrics.render().lines().any(|l| l.starts_with(what) && l.contains("cluster=\"c\""));
        s.pass(Timestamp::now(), &[("c".to_string(), hourly())], &|_| false);
        assert!(has("ferry_backup_interval_seconds"));
        s.pass(Timestamp::now(), &[("c".to_string(), None)], &|_| false);
        assert!(!has("ferry_backup_interval_seconds"), "off: no interval");
        metrics.last_success.get_or_create(&Metrics::cluster("c")).set(1.0);
        s.pass(Timestamp::now(), &[("c".to_string(), hourly())], &|_| false);
        s.pass(Timestamp::now(), &[], &|_| false);
        assert!(!metrics.render().contains("cluster=\"c\""), "deleted: no series\n{}", metrics.render());
    }

    #[tokio::test]
    async fn failures_back_off_and_a_success_moves_the_next_backup_a_period_on() {
        let (mut s, _dir) = scheduler(Failures::default());
        let clusters = vec![("c".to_string(), hourly())];
        let now = Timestamp::now();
        s.pass(now, &clusters, &|_| false);
        let fail = |at| JobOutcome { cluster: "c".into(), trigger: Trigger::Scheduled, result: Err("x".into()), at };
        s.outcome(fail(now));
        assert_eq!(s.clusters["c"].retry_at, Some(plan::shift(now, 30_000)));
        s.outcome(fail(now));
        assert_eq!(s.clusters["c"].retry_at, Some(plan::shift(now, 60_000)));
        s.outcome(JobOutcome { cluster: "c".into(), trigger: Trigger::Manual, result: Ok(now), at: now });
        let st = &s.clusters["c"];
        assert_eq!((st.failures, st.retry_at, st.newest), (0, None, Some(now)));
    }
}
