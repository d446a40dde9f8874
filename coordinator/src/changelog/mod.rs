//! The continuous change log (point-in-time recovery): for each cluster with
//! `spec.backupconfiguration.pointintime.enabled`, one agent at a time watches etcd and stores every revision
//! in segments between full backups.
//!
//! [`ChangeLog`] owns the per-cluster index ([`index`]) and the watchers: a supervisor task chooses a
//! watcher like a backup's member (reachable, follower first, not a member that just failed), raises the
//! cluster's epoch durably before it hands it out, and runs the watch stream ([`watcher`]); only the current
//! epoch's segments are signed and indexed. A watcher that ends (its agent or member gone, a refused message)
//! is replaced at the next tick from the covered revision; one whose covered revision stands still while
//! the other members report etcd moving on is stopped and replaced. Gaps are recorded, counted and closed
//! by an immediate full backup. [`changes`] reads the log back for `ferryctl changes`.

pub mod changes;
pub mod index;
mod retention;
mod verify;
mod watcher;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_common::encryption::Identities;
use ferry_common::resources::{PointInTimeStatus, Resource, ResourceType, Spec, Timestamp};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use crate::agents::Agents;
use crate::backup::{Jobs, Trigger};
use crate::lock;
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::status::Status;
use crate::store::BackupStore;

use self::index::Head;

/// How often the supervisor looks at the clusters.
const TICK: Duration = Duration::from_secs(1);
/// Least time between two watchers of one cluster (a member whose watch fails at once is not hammered).
const REASSIGN_PAUSE: Duration = Duration::from_secs(2);
/// A watcher whose covered revision stands still this long while other members report etcd moving on is
/// replaced (well inside the 5 minutes of history Kubernetes' compaction leaves).
const STALL: Duration = Duration::from_secs(45);
/// How often each cluster's old segments are looked at.
const RETENTION_EVERY: Duration = Duration::from_secs(600);
/// How often each cluster is looked at for a new full backup to check the log against.
const VERIFY_EVERY: Duration = Duration::from_secs(60);
/// A member whose watch failed is passed over this long when another member can watch.
const FAILED_MEMBER_PAUSE: Duration = Duration::from_secs(60);

/// What a watcher is told to do with its segments.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub cut_after: Duration,
    pub cut_bytes: u64,
    pub spool_bytes: u64,
    pub zstd_level: i32,
}

impl Default for Settings {
    fn default() -> Self {
        Self { cut_after: Duration::from_secs(10), cut_bytes: 4 << 20, spool_bytes: 256 << 20, zstd_level: 3 }
    }
}

/// What the change log works with.
pub struct ChangeLogDeps {
    pub state: Arc<dyn StateStore>,
    pub agents: Agents,
    pub store: Arc<BackupStore>,
    pub status: Status,
    pub metrics: Arc<Metrics>,
    pub jobs: Jobs,
    /// Opens encrypted segments for `changes` (the coordinator's `--identity`).
    pub identities: Option<Identities>,
    pub settings: Settings,
    /// Where the log's check restores backups (the drills' scratch dir).
    pub scratch: std::path::PathBuf,
}

/// The change log; cheap to clone (a handle).
#[derive(Clone)]
pub struct ChangeLog {
    inner: Arc<Inner>,
}

struct Inner {
    deps: ChangeLogDeps,
    /// The running watcher of each cluster.
    running: Mutex<HashMap<String, Running>>,
    /// Each cluster's head, as last stored (the watcher is its only writer while it runs, the supervisor
    /// otherwise).
    heads: Mutex<HashMap<String, Head>>,
    /// When each cluster's last watcher ended, and the member, if it failed.
    ended: Mutex<HashMap<String, (Instant, Option<String>)>>,
    /// Clusters that need a full backup to close a gap.
    need_full: Mutex<HashSet<String>>,
    /// When each cluster's retention last ran.
    retained: Mutex<HashMap<String, Instant>>,
    /// When each cluster was last looked at for a log check; whether a check runs (one at a time).
    verified: Mutex<HashMap<String, Instant>>,
    verifying: std::sync::atomic::AtomicBool,
    /// Whether a point-in-time rebuild runs (one at a time).
    rebuilding: std::sync::atomic::AtomicBool,
    /// Cancels retention's store calls at shutdown.
    cancel: CancellationToken,
    rotation: crate::backup::members::Rotation,
    tracker: TaskTracker,
}

struct Running {
    epoch: u64,
    member: String,
    since: Instant,
    token: CancellationToken,
}

impl ChangeLog {
    pub fn new(deps: ChangeLogDeps) -> Self {
        Self {
            inner: Arc::new(Inner {
                deps,
                running: Mutex::new(HashMap::new()),
                heads: Mutex::new(HashMap::new()),
                ended: Mutex::new(HashMap::new()),
                need_full: Mutex::new(HashSet::new()),
                retained: Mutex::new(HashMap::new()),
                verified: Mutex::new(HashMap::new()),
                verifying: std::sync::atomic::AtomicBool::new(false),
                rebuilding: std::sync::atomic::AtomicBool::new(false),
                cancel: CancellationToken::new(),
                rotation: Default::default(),
                tracker: TaskTracker::new(),
            }),
        }
    }

    /// Runs the supervisor until `stop`; then stops every watcher and waits for them (bounded).
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.inner.reconcile(),
                () = stop.cancelled() => break,
            }
        }
        for r in lock(&self.inner.running).values() {
            r.token.cancel();
        }
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.inner.tracker.wait()).await;
    }

    /// The change log's head of `cluster` (for `changes`).
    pub fn head(&self, cluster: &str) -> Option<Head> {
        self.inner.head(cluster).ok().flatten()
    }

    pub(crate) fn deps(&self) -> &ChangeLogDeps {
        &self.inner.deps
    }

    /// The one slot for a point-in-time rebuild on this coordinator; `None` while another runs.
    pub(crate) fn rebuild_slot(&self) -> Option<RebuildSlot> {
        use std::sync::atomic::Ordering;
        let busy = &self.inner.rebuilding;
        (!busy.swap(true, Ordering::AcqRel)).then(|| RebuildSlot(self.inner.clone()))
    }
}

/// Held while a point-in-time rebuild runs.
pub(crate) struct RebuildSlot(Arc<Inner>);

impl Drop for RebuildSlot {
    fn drop(&mut self) {
        self.0.rebuilding.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Inner {
    fn head(&self, cluster: &str) -> Result<Option<Head>, crate::state::StateError> {
        if let Some(h) = lock(&self.heads).get(cluster) {
            return Ok(Some(h.clone()));
        }
        let h = index::load_head(self.deps.state.as_ref(), cluster)?;
        if let Some(h) = &h {
            lock(&self.heads).insert(cluster.to_string(), h.clone());
        }
        Ok(h)
    }

    /// Stores `head` and shows it in the status and metrics.
    fn save_head(
        &self,
        cluster: &str,
        head: &Head,
        watcher: &str,
        error: &str,
    ) -> Result<(), crate::state::StateError> {
        index::save_head(self.deps.state.as_ref(), cluster, head)?;
        lock(&self.heads).insert(cluster.to_string(), head.clone());
        self.show(cluster, head, watcher, error);
        Ok(())
    }

    fn show(&self, cluster: &str, head: &Head, watcher: &str, error: &str) {
        let labels = Metrics::cluster(cluster);
        let m = &self.deps.metrics;
        m.pitr_covered_revision.get_or_create(&labels).set(head.covered_revision);
        if let Some(t) = head.covered_time {
            m.pitr_covered_time.get_or_create(&labels).set(t.seconds as f64);
        }
        let shown = PointInTimeStatus {
            enabled: true,
            lineage: head.lineage,
            watcher: watcher.to_string(),
            epoch: head.epoch,
            startrevision: head.start_revision,
            starttime: head.start_time,
            coveredrevision: head.covered_revision,
            coveredtime: head.covered_time,
            segments: head.segments,
            storedbytes: head.stored_bytes,
            gaps: head.gaps.clone(),
            error: error.to_string(),
            verification: None,
        };
        let update = |s: &mut ferry_common::resources::EtcdBackupStatusSpec| {
            let verification = s.pointintime.take().and_then(|p| p.verification);
            s.pointintime = Some(PointInTimeStatus { verification, ..shown.clone() });
        };
        if let Err(e) = self.deps.status.update(cluster, update) {
            warn!(%cluster, "failed to record the change log's status: {e}");
        }
    }

    /// Records a gap and asks for a full backup to close it.
    fn gap(&self, cluster: &str, head: &mut Head, from: i64, to: i64, reason: String) {
        warn!(%cluster, from, to, %reason, "the change log lost revisions for good; a full backup closes the gap");
        head.gap(from, to, reason);
        self.deps.metrics.pitr_gaps.get_or_create(&Metrics::cluster(cluster)).inc();
        lock(&self.need_full).insert(cluster.to_string());
    }

    /// Clusters with the change log on, and their windows (seconds).
    fn enabled_clusters(&self) -> Vec<(String, i64)> {
        let clusters = match self.deps.state.list(ResourceType::Cluster) {
            Ok(c) => c,
            Err(e) => {
                warn!("change log: failed to read the clusters: {e}");
                return Vec::new();
            }
        };
        clusters
            .into_iter()
            .filter_map(|r: Resource| match r.spec {
                Spec::Cluster(c) => c
                    .backupconfiguration
                    .and_then(|b| b.pointintime)
                    .filter(|p| p.enabled)
                    .map(|p| (r.metadata.id, p.window_seconds())),
                _ => None,
            })
            .collect()
    }

    fn reconcile(self: &Arc<Self>) {
        let windows: HashMap<String, i64> = self.enabled_clusters().into_iter().collect();
        let enabled: HashSet<String> = windows.keys().cloned().collect();
        // Watchers of clusters turned off, deleted or being restored stop.
        {
            let running = lock(&self.running);
            for (cluster, r) in running.iter() {
                let restoring = crate::restore::active(self.deps.state.as_ref(), cluster).unwrap_or(false);
                if !enabled.contains(cluster) || restoring {
                    r.token.cancel();
                }
            }
        }
        for (cluster, window) in &windows {
            self.lag(cluster);
            self.close_gaps(cluster);
            self.retain(cluster, *window);
            self.verify(cluster);
            let running = lock(&self.running).get(cluster).map(|r| (r.member.clone(), r.since, r.token.clone()));
            match running {
                Some((member, since, token)) => self.check_stall(cluster, &member, since, &token),
                None => self.assign(cluster),
            }
        }
    }

    /// Deletes segments older than the window's base, every [`RETENTION_EVERY`] (in the background).
    fn retain(self: &Arc<Self>, cluster: &str, window: i64) {
        {
            let mut retained = lock(&self.retained);
            if retained.get(cluster).is_some_and(|t| t.elapsed() < RETENTION_EVERY) {
                return;
            }
            retained.insert(cluster.to_string(), Instant::now());
        }
        let inner = self.clone();
        let cluster = cluster.to_string();
        let span = info_span!(parent: None, "changelog_retention", %cluster);
        self.tracker.spawn(
            async move {
                if let Err(e) = retention::apply(&inner, &cluster, window, &inner.cancel).await {
                    warn!("change-log retention failed: {e:#}");
                }
            }
            .instrument(span),
        );
    }

    /// Checks the log against a new full backup, every [`VERIFY_EVERY`], one cluster at a time.
    fn verify(self: &Arc<Self>, cluster: &str) {
        use std::sync::atomic::Ordering;
        {
            let mut verified = lock(&self.verified);
            if verified.get(cluster).is_some_and(|t| t.elapsed() < VERIFY_EVERY) {
                return;
            }
            if self.verifying.swap(true, Ordering::SeqCst) {
                return;
            }
            verified.insert(cluster.to_string(), Instant::now());
        }
        let inner = self.clone();
        let cluster = cluster.to_string();
        let span = info_span!(parent: None, "changelog_check", %cluster);
        self.tracker.spawn(
            async move {
                let last = inner.deps.status.log_verification(&cluster).map(|v| v.tobackup).unwrap_or_default();
                let checked = verify::run(&inner, &cluster, &inner.deps.scratch, &last, &inner.cancel).await;
                inner.verifying.store(false, Ordering::SeqCst);
                let v = match checked {
                    Ok(Some(v)) => v,
                    Ok(None) => return,
                    Err(e) => return warn!("the change log's check could not run: {e:#}"),
                };
                let failed = v.result != ferry_common::resources::status::OK;
                if failed {
                    warn!(from = %v.frombackup, to = %v.tobackup, error = %v.error, "the change log does not rebuild the full backup");
                } else {
                    info!(from = %v.frombackup, to = %v.tobackup, keys = v.keys, "the change log rebuilds the full backup exactly");
                }
                inner.deps.metrics.pitr_verification_failed.get_or_create(&Metrics::cluster(&cluster)).set(i64::from(failed));
                let recorded = inner.deps.status.update(&cluster, |s| {
                    let p = s.pointintime.get_or_insert_with(Default::default);
                    p.verification = Some(v.clone());
                });
                if let Err(e) = recorded {
                    warn!("failed to record the change log's check: {e}");
                }
            }
            .instrument(span),
        );
    }

    /// A full backup for each cluster with an open gap, once none runs.
    fn close_gaps(&self, cluster: &str) {
        if !lock(&self.need_full).contains(cluster) || self.deps.jobs.is_running(cluster) {
            return;
        }
        match self.deps.jobs.start(cluster, Trigger::Manual) {
            Ok(()) => {
                info!(%cluster, "full backup started to close a gap in the change log");
                lock(&self.need_full).remove(cluster);
            }
            Err(e) => warn!(%cluster, "cannot start the full backup that closes the change log's gap yet: {e}"),
        }
    }

    /// `ferry_point_in_time_lag_seconds`: how long etcd's newest revision has waited to be covered.
    fn lag(&self, cluster: &str) {
        let Ok(Some(head)) = self.head(cluster) else { return };
        let highest = self.deps.agents.highest_revision(cluster).map_or(0, |(r, _)| r);
        let lag = match head.covered_time {
            Some(t) if highest > head.covered_revision => (Timestamp::now().seconds - t.seconds).max(0) as f64,
            _ => 0.0,
        };
        self.deps.metrics.pitr_lag.get_or_create(&Metrics::cluster(cluster)).set(lag);
    }

    fn check_stall(&self, cluster: &str, member: &str, since: Instant, token: &CancellationToken) {
        if since.elapsed() < STALL {
            return;
        }
        let Ok(Some(head)) = self.head(cluster) else { return };
        let others = self
            .deps
            .agents
            .live(cluster)
            .into_iter()
            .filter(|a| a.member != member)
            .filter_map(|a| a.facts.filter(|f| f.error.is_none()).map(|f| f.revision))
            .max();
        let stale = head.covered_time.is_none_or(|t| Timestamp::now().seconds - t.seconds > STALL.as_secs() as i64);
        if others.is_some_and(|r| r > head.covered_revision) && stale {
            warn!(%cluster, %member, covered = head.covered_revision, "the change log's watcher stands still while etcd moves on; replacing it");
            lock(&self.ended).insert(cluster.to_string(), (Instant::now(), Some(member.to_string())));
            token.cancel();
        }
    }

    fn assign(self: &Arc<Self>, cluster: &str) {
        let ended = lock(&self.ended).get(cluster).cloned();
        if ended.as_ref().is_some_and(|(at, _)| at.elapsed() < REASSIGN_PAUSE) {
            return;
        }
        if crate::restore::active(self.deps.state.as_ref(), cluster).unwrap_or(true) {
            return;
        }
        let live = self.deps.agents.live(cluster);
        let facts: Vec<_> = live
            .iter()
            .filter(|a| a.reaches_etcd())
            .filter_map(|a| Some((a.member.clone(), a.facts.clone()?)))
            .collect();
        let mut order = crate::backup::members::order_members(&facts, self.rotation.next(cluster));
        if let Some((at, Some(failed))) = &ended {
            if order.len() > 1 && at.elapsed() < FAILED_MEMBER_PAUSE {
                order.retain(|m| m != failed);
            }
        }
        let Some(member) = order.first().cloned() else {
            let head = self.head(cluster).ok().flatten().unwrap_or_default();
            self.show(cluster, &head, "", "no agent of the cluster is connected and reaches etcd");
            return;
        };
        let Some(agent) = live.into_iter().find(|a| a.member == member) else { return };
        let mut head = match self.head(cluster) {
            Ok(h) => h.unwrap_or_default(),
            Err(e) => return warn!(%cluster, "change log: failed to read its index: {e}"),
        };
        if let Some((restore_id, revision)) = self.restored_since(cluster, &head) {
            info!(%cluster, %restore_id, lineage = head.lineage + 1, from = revision + 1, "the cluster was restored: the change log goes on as a new lineage");
            head = head.fork(&restore_id, revision);
        }
        // The epoch is raised durably before anyone is told it: a coordinator restarted after a crash never
        // hands out an epoch twice.
        head.epoch += 1;
        if let Err(e) = self.save_head(cluster, &head, &member, "") {
            return warn!(%cluster, "change log: failed to raise the epoch: {e}");
        }
        let token = CancellationToken::new();
        let epoch = head.epoch;
        lock(&self.running).insert(
            cluster.to_string(),
            Running { epoch, member: member.clone(), since: Instant::now(), token: token.clone() },
        );
        let inner = self.clone();
        let cluster = cluster.to_string();
        let span = info_span!(parent: None, "changelog", %cluster, %member, epoch);
        self.tracker.spawn(
            async move {
                info!("change-log watcher assigned");
                let result = watcher::run(&inner, &cluster, &agent, epoch, &token).await;
                let failed = match &result {
                    Ok(()) => None,
                    Err(e) => {
                        warn!("change-log watcher ended: {e:#}");
                        let head = inner.head(&cluster).ok().flatten().unwrap_or_default();
                        inner.show(&cluster, &head, "", &format!("{e:#}"));
                        Some(agent.member.clone())
                    }
                };
                lock(&inner.ended).insert(cluster.clone(), (Instant::now(), failed));
                let mut running = lock(&inner.running);
                if running.get(&cluster).is_some_and(|r| r.epoch == epoch) {
                    running.remove(&cluster);
                }
            }
            .instrument(span),
        );
    }

    /// A restore of `cluster` that ended since the head's lineage began: its id and the revision the restored
    /// cluster was verified at (0 when it was not verified).
    fn restored_since(&self, cluster: &str, head: &Head) -> Option<(String, i64)> {
        let Ok(Some(Resource { spec: Spec::EtcdRestoreStatus(r), .. })) =
            self.deps.state.get(ResourceType::EtcdRestoreStatus, cluster)
        else {
            return None;
        };
        let ended = r.finishedat?;
        let fresh = !r.restoreid.is_empty() && r.restoreid != head.restore_id;
        // A restore that ended before this log began changed nothing the log holds.
        let after_start = head.start_time.is_none_or(|t| ended >= t) && head.start_revision != 0;
        let revision = r.verified.as_ref().map_or(0, |v| v.revision);
        (fresh && after_start).then_some((r.restoreid, revision))
    }

    /// Whether `epoch` is still `cluster`'s current one (a replaced watcher's late messages are refused).
    fn is_current(&self, cluster: &str, epoch: u64) -> bool {
        lock(&self.running).get(cluster).is_some_and(|r| r.epoch == epoch && !r.token.is_cancelled())
    }
}
