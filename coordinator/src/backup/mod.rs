//! Backup jobs: [`Jobs`] starts them (one per cluster at a time, at most `--max-concurrent-backups` at once),
//! owns their task tracker and cancellation token, and reports every finished job — manual or scheduled — as
//! a [`JobOutcome`] on a channel (the scheduler listens). The job itself is in [`job`], the choice of member
//! in [`members`] (members whose backups keep being refused are out, [`quarantine`]), what retention deletes
//! afterwards in [`retention`].
//!
//! Shutdown is in three steps the daemon calls in order: [`Jobs::stop_starting`] (queued jobs give up, new ones
//! are refused), [`Jobs::drain`] (running jobs get the grace period), [`Jobs::cancel`] (the rest are cancelled:
//! their partial objects removed, their uploads aborted).

pub mod divergence;
mod job;
pub mod members;
pub mod quarantine;
pub mod retention;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::resources::{status, Timestamp};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use crate::agents::Agents;
use crate::config::Settings;
use crate::lock;
use crate::metrics::Metrics;
use crate::state::StateStore;
use crate::status::Status;
use crate::store::BackupStore;

/// Why a backup could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The cluster has a backup running or queued.
    #[error("a backup of cluster {0} is already running; wait for it (`ferryctl get etcdbackupstatus {0}`)")]
    AlreadyRunning(String),
    /// The coordinator is shutting down.
    #[error("the coordinator is shutting down: no new backup starts; apply again once it is back")]
    ShuttingDown,
    /// The cluster is being restored: its members are held, and its backups would be of half-restored data.
    #[error("cluster {0} is being restored; backups start again once the restore ended (`ferryctl get etcdrestorestatus {0}`)")]
    Restoring(String),
}

/// What asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Scheduled,
}

/// A finished job, as the scheduler needs to know it.
#[derive(Debug, Clone)]
pub struct JobOutcome {
    pub cluster: String,
    pub trigger: Trigger,
    /// `Ok(createdat)` of the stored backup, or why it failed.
    pub result: Result<Timestamp, String>,
    /// When the job ended.
    pub at: Timestamp,
}

/// What jobs work with.
pub struct JobDeps {
    pub agents: Agents,
    pub store: Arc<BackupStore>,
    pub status: Status,
    pub state: Arc<dyn StateStore>,
    pub metrics: Arc<Metrics>,
    pub settings: Settings,
}

/// The job runner; cheap to clone (a handle).
#[derive(Clone)]
pub struct Jobs {
    inner: Arc<Inner>,
}

struct Inner {
    deps: JobDeps,
    /// Clusters with a backup running or queued.
    running: Mutex<HashSet<String>>,
    /// Job slots: at most `max_concurrent_backups` backups transfer at once (fair: queued in order).
    slots: Arc<Semaphore>,
    /// Job tasks and their cleanup, joined at shutdown.
    tracker: TaskTracker,
    /// Cancelled when shutdown begins: queued jobs give up, new ones are refused.
    stop_starting: CancellationToken,
    /// Cancelled when the grace period is over: running jobs stop.
    cancel: CancellationToken,
    outcomes: mpsc::UnboundedSender<JobOutcome>,
    rotation: members::Rotation,
    /// Members whose backups the store keeps refusing.
    quarantine: quarantine::Quarantine,
}

/// Marks a cluster as backing up; the mark is removed when this is dropped.
struct RunningGuard {
    inner: Arc<Inner>,
    cluster: String,
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        lock(&self.inner.running).remove(&self.cluster);
    }
}

impl Jobs {
    /// A runner that sends every outcome to `outcomes`.
    pub fn new(deps: JobDeps, outcomes: mpsc::UnboundedSender<JobOutcome>) -> Self {
        let slots = deps.settings.max_concurrent_backups.max(1);
        Self {
            inner: Arc::new(Inner {
                deps,
                running: Mutex::new(HashSet::new()),
                slots: Arc::new(Semaphore::new(slots)),
                tracker: TaskTracker::new(),
                stop_starting: CancellationToken::new(),
                cancel: CancellationToken::new(),
                outcomes,
                rotation: members::Rotation::default(),
                quarantine: quarantine::Quarantine::default(),
            }),
        }
    }

    /// Starts a backup of `cluster` in the background; it waits for a free job slot first.
    pub fn start(&self, cluster: &str, trigger: Trigger) -> Result<(), StartError> {
        if self.inner.stop_starting.is_cancelled() {
            return Err(StartError::ShuttingDown);
        }
        if matches!(crate::restore::active(self.inner.deps.state.as_ref(), cluster), Ok(true)) {
            return Err(StartError::Restoring(cluster.to_string()));
        }
        let fresh = lock(&self.inner.running).insert(cluster.to_string());
        if !fresh {
            return Err(StartError::AlreadyRunning(cluster.to_string()));
        }
        let guard = RunningGuard { inner: self.inner.clone(), cluster: cluster.to_string() };
        let inner = self.inner.clone();
        let cluster = cluster.to_string();
        // A root span: the job outlives the request or tick that started it.
        let span = info_span!(parent: None, "backup", %cluster, ?trigger);
        self.inner.tracker.spawn(async move { run(inner, cluster, trigger, guard).await }.instrument(span));
        Ok(())
    }

    /// Whether `cluster` has a backup running or queued.
    pub fn is_running(&self, cluster: &str) -> bool {
        lock(&self.inner.running).contains(cluster)
    }

    /// Shutdown, step 1: no job starts any more (queued ones give up, `start` is refused).
    pub fn stop_starting(&self) {
        self.inner.stop_starting.cancel();
        self.inner.tracker.close();
    }

    /// Shutdown, step 2: waits up to `grace` for running jobs; `true` if all finished.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner.tracker.close();
        tokio::time::timeout(grace, self.inner.tracker.wait()).await.is_ok()
    }

    /// Shutdown, step 3: cancels what still runs and waits up to `deadline` for its cleanup (partial files
    /// removed, uploads aborted).
    pub async fn cancel(&self, deadline: Duration) -> bool {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(deadline, self.inner.tracker.wait()).await.is_ok()
    }
}

async fn run(inner: Arc<Inner>, cluster: String, trigger: Trigger, _guard: RunningGuard) {
    // Fair semaphore: queued backups start in the order they were queued (due order for scheduled ones).
    let slot = tokio::select! {
        s = inner.slots.clone().acquire_owned() => s,
        () = inner.stop_starting.cancelled() => {
            return info!("the coordinator is shutting down: the queued backup does not start");
        }
    };
    let Ok(_slot) = slot else { return };
    if inner.stop_starting.is_cancelled() {
        return info!("the coordinator is shutting down: the queued backup does not start");
    }
    let deps = &inner.deps;
    let attempt = Timestamp::now();
    let labels = Metrics::cluster(&cluster);
    deps.metrics.last_attempt.get_or_create(&labels).set(attempt.seconds as f64);
    let marked = deps.status.update(&cluster, |s| {
        s.status = status::RUNNING;
        s.error.clear();
        s.lastbackupattempt = Some(attempt);
        s.bytesdone = 0;
    });
    if let Err(e) = marked {
        warn!("failed to record backup status: {e:#}");
    }
    // Boxed: a queued backup (a whole round of 3 333 may queue) holds only the small wait above, not the
    // job's large state.
    let result = Box::pin(job::take_with_failover(&inner, &cluster)).await;
    let (recorded, outcome) = match &result {
        Ok(m) => {
            info!(backup_id = %m.id, size = m.backup.size, rawsize = m.backup.rawsize, member = %m.backup.member, "backup stored");
            let metrics = &deps.metrics;
            metrics.backups.get_or_create(&Metrics::result(&cluster, true)).inc();
            metrics.last_success.get_or_create(&labels).set(m.backup.createdat.seconds as f64);
            metrics.size.get_or_create(&labels).set(m.backup.size as i64);
            metrics.raw_size.get_or_create(&labels).set(m.backup.rawsize as i64);
            let secs = |t: Timestamp| t.seconds as f64 + f64::from(t.nanos) / 1e9;
            metrics.duration.observe((secs(m.backup.createdat) - secs(attempt)).max(0.0));
            if let Err(e) = retention::apply(deps, &cluster, &m.id, &inner.cancel).await {
                warn!("failed to apply retention: {e:#}");
            }
            let recorded = deps.status.update(&cluster, |s| {
                s.status = status::OK;
                s.error.clear();
                s.lastbackuptime = Some(m.backup.createdat);
                s.bytesdone = m.backup.rawsize;
                s.member = m.backup.member.clone();
            });
            (recorded, Ok(m.backup.createdat))
        }
        Err(e) => {
            warn!("backup failed: {e:#}");
            deps.metrics.backups.get_or_create(&Metrics::result(&cluster, false)).inc();
            let error = format!("{e:#}");
            let recorded = deps.status.update(&cluster, |s| {
                s.status = status::ERROR;
                s.error = error.clone();
            });
            (recorded, Err(error))
        }
    };
    if let Err(e) = recorded {
        warn!("failed to record backup status: {e:#}");
    }
    // The scheduler may have stopped (shutdown): then nobody needs the outcome.
    let _ = inner.outcomes.send(JobOutcome { cluster, trigger, result: outcome, at: Timestamp::now() });
}
