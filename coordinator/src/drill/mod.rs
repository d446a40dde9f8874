//! Restore drills: proof on a schedule that a cluster's newest backup restores. The scheduler decides when
//! ([`Drills::try_start`]); a drill reads the object back from the store through every check a restore makes
//! (sizes, both sha256, etcd's trailing hash, bbolt's meta page), restores it with etcd's own tool into a
//! scratch dir under `STATE_DIR/drills`, reads revision and key counts from a throw-away etcd
//! ([`crate::restore_check`]), compares the per-resource counts with the previous drill of another backup
//! ([`compare`]), compares the restored key space's etcd hash with another member's ([`agree`]: only then is
//! the backup "last passed"), records the result in the cluster's status and metrics, and deletes the scratch
//! dir.
//!
//! One drill at a time per coordinator, in its own task: drills never take a backup job slot, so they never
//! delay a backup.

pub mod agree;
pub mod compare;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::DATA_CHUNK;
use ferry_common::resources::{status, DrillStatus, Timestamp, DRILL_WARNING};
use ferry_common::snapshot::{BackgroundWriter, SnapshotError, VerifyingWriter};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use self::agree::Agreement;
use crate::agents::LiveAgent;
use crate::lock;
use crate::metrics::Metrics;
use crate::restore_check::{restore_read_and_hash, Restored};
use crate::status::Status;
use crate::store::{BackupStore, Manifest};

/// A drill that could not compare the backup with another member runs again this soon (the next
/// compaction, whose hash the members' etcd keeps, comes within Kubernetes' 5 minutes).
const RETRY_UNCOMPARED: Duration = Duration::from_secs(300);

/// How long the throw-away etcd may take to answer.
const ETCD_ANSWER_TIMEOUT: Duration = Duration::from_secs(60);

/// What drills work with.
pub struct DrillDeps {
    pub store: Arc<BackupStore>,
    pub status: Status,
    pub metrics: Arc<Metrics>,
    /// Scratch dirs are made here (`STATE_DIR/drills`, 0700): a restored copy of a cluster's data never
    /// lands in a shared temp dir.
    pub scratch: PathBuf,
    /// The coordinator's `--identity`, to open encrypted backups (without it, their drills fail and say so).
    pub identities: Option<ferry_common::encryption::Identities>,
    /// When a resource's key count dropped enough to warn (`--drill-key-drop-percent`, `--drill-key-drop-min-keys`).
    pub key_drop: compare::KeyDrop,
    /// The connected agents: other members' etcd hashes to compare a restored backup with.
    pub agents: crate::agents::Agents,
}

/// The drill runner; cheap to clone (a handle).
#[derive(Clone)]
pub struct Drills {
    inner: Arc<Inner>,
}

struct Inner {
    deps: DrillDeps,
    /// The cluster being drilled; one drill at a time.
    running: Mutex<Option<String>>,
    /// Clusters whose last drill could not compare the backup with another member: drilled again at this time.
    retry: Mutex<HashMap<String, Timestamp>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Clears the running mark when the drill ends, however it ends.
struct RunningGuard(Arc<Inner>);

impl Drop for RunningGuard {
    fn drop(&mut self) {
        *lock(&self.0.running) = None;
    }
}

impl Drills {
    pub fn new(deps: DrillDeps) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        // Scratch dirs left by a crash hold a copy of a cluster's data: gone at start.
        let _ = std::fs::remove_dir_all(&deps.scratch);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(&deps.scratch)
            .with_context(|| format!("create {}", deps.scratch.display()))?;
        Ok(Self {
            inner: Arc::new(Inner {
                deps,
                running: Mutex::new(None),
                retry: Mutex::default(),
                tracker: TaskTracker::new(),
                cancel: CancellationToken::new(),
            }),
        })
    }

    /// Starts a drill of `cluster`'s newest backup unless a drill is running; whether it started.
    pub fn try_start(&self, cluster: &str) -> bool {
        if self.inner.cancel.is_cancelled() {
            return false;
        }
        {
            let mut running = lock(&self.inner.running);
            if running.is_some() {
                return false;
            }
            *running = Some(cluster.to_string());
        }
        lock(&self.inner.retry).remove(cluster);
        let guard = RunningGuard(self.inner.clone());
        let inner = self.inner.clone();
        let cluster = cluster.to_string();
        let span = info_span!(parent: None, "drill", %cluster);
        self.inner.tracker.spawn(
            async move {
                let _guard = guard;
                drill(&inner, &cluster).await;
            }
            .instrument(span),
        );
        true
    }

    /// When `cluster`'s latest drill ended, from its status; also seeds the last-success gauge after a
    /// restart, so "no drill passed" alerts keep working.
    pub fn last_drill(&self, cluster: &str) -> Option<Timestamp> {
        let d = self.inner.deps.status.drill(cluster)?;
        if let Some(t) = d.lastsuccesstime {
            let g = self.inner.deps.metrics.drill_last_success.get_or_create(&Metrics::cluster(cluster));
            if g.get() < t.seconds as f64 {
                g.set(t.seconds as f64);
            }
        }
        d.time
    }

    /// Whether `cluster`'s last drill could not compare its backup with another member and is due again by
    /// `now` (sooner than its interval).
    pub fn retry_due(&self, cluster: &str, now: Timestamp) -> bool {
        lock(&self.inner.retry).get(cluster).is_some_and(|t| *t <= now)
    }

    /// Whether a drill is running.
    pub fn is_running(&self) -> bool {
        lock(&self.inner.running).is_some()
    }

    /// Shutdown: cancels a running drill and waits up to `deadline` for it to clean up.
    pub async fn stop(&self, deadline: Duration) -> bool {
        self.inner.cancel.cancel();
        self.inner.tracker.close();
        tokio::time::timeout(deadline, self.inner.tracker.wait()).await.is_ok()
    }
}

async fn drill(inner: &Inner, cluster: &str) {
    let deps = &inner.deps;
    let started = Instant::now();
    // Not raced against shutdown here: the drill stops itself at its next step and returns only once its
    // throw-away etcd is dead and its scratch dir gone, so `Drills::stop` waits for exactly that.
    let result = restore_newest(deps, cluster, &inner.cancel).await;
    if inner.cancel.is_cancelled() {
        return info!("the coordinator is shutting down; the drill is cancelled");
    }
    let secs = started.elapsed().as_secs_f64();
    let labels = Metrics::cluster(cluster);
    let m = &deps.metrics;
    let now = Timestamp::now();
    let (backup, outcome) = match result {
        Ok(None) => return info!("no backup to drill yet"),
        Ok(Some((id, restored))) => (id, Ok(restored)),
        Err((id, e)) => (id, Err(e)),
    };
    let recorded = deps.status.update_cluster(cluster, |st| {
        let previous = st.drill.take().unwrap_or_default();
        let mut d = DrillStatus {
            time: Some(now),
            backup: backup.clone(),
            durationseconds: secs,
            lastpassedbackup: previous.lastpassedbackup.clone(),
            lastsuccesstime: previous.lastsuccesstime,
            baselinebackup: previous.baselinebackup.clone(),
            baselineresources: previous.baselineresources.clone(),
            ..Default::default()
        };
        match &outcome {
            Ok(Drilled { restored: r, agreement }) => {
                // The baseline is the latest passed drill of *another* backup: drilling the same backup again
                // keeps comparing with what came before it.
                if previous.backup != backup && previous.result != status::ERROR && !previous.backup.is_empty() {
                    d.baselinebackup = previous.backup.clone();
                    d.baselineresources = previous.resources.clone();
                }
                d.revision = r.revision;
                d.keys = r.keys;
                d.resources = r.resources.clone();
                d.warning = deps.key_drop.drops(&d.baselineresources, &r.resources).join("; ");
                let agreed = match agreement {
                    Agreement::Agreed(line) => {
                        d.agreement = line.clone();
                        true
                    }
                    // Restores, but nobody vouched for its content yet: not the one retention keeps above all.
                    Agreement::NotCompared(why) | Agreement::Differs(why) => {
                        d.agreement = format!(
                            "not compared with another member ({why}); not yet the last passed backup, the drill \
                             repeats within {} minutes",
                            RETRY_UNCOMPARED.as_secs() / 60
                        );
                        false
                    }
                };
                if d.warning.is_empty() {
                    d.result = status::OK;
                    if agreed {
                        d.lastpassedbackup = backup.clone();
                    }
                } else {
                    d.result = DRILL_WARNING;
                    d.warning = format!("fewer keys than the drill of {}: {}", d.baselinebackup, d.warning);
                }
                d.lastsuccesstime = Some(now);
            }
            Err(e) => {
                d.result = status::ERROR;
                d.error = format!("{e:#}");
            }
        }
        st.drill = Some(d);
    });
    if let Err(e) = recorded {
        warn!("failed to record the drill: {e:#}");
    }
    m.drill_duration.observe(secs);
    if let Ok(Drilled { agreement: Agreement::NotCompared(_), .. }) = &outcome {
        lock(&inner.retry).insert(cluster.to_string(), plan_shift(now, RETRY_UNCOMPARED));
    }
    match outcome {
        Ok(Drilled { restored: r, .. }) => {
            let warned = deps.status.drill(cluster).is_some_and(|d| d.result == DRILL_WARNING);
            info!(backup_id = %backup, revision = r.revision, keys = r.keys, secs, warned, "restore drill passed");
            m.drill_last_success.get_or_create(&labels).set(now.seconds as f64);
            m.drill_keys.get_or_create(&labels).set(r.keys as i64);
            m.drill_failing.get_or_create(&labels).set(0);
            m.drill_key_drop.get_or_create(&labels).set(i64::from(warned));
            let result = if warned { "warning" } else { "success" };
            m.drills.get_or_create(&Metrics::result_named(cluster, result)).inc();
        }
        Err(e) => {
            warn!(backup_id = %backup, "restore drill failed: {e:#}");
            m.drill_failing.get_or_create(&labels).set(1);
            m.drills.get_or_create(&Metrics::result_named(cluster, "error")).inc();
        }
    }
}

fn plan_shift(t: Timestamp, by: Duration) -> Timestamp {
    crate::schedule::plan::shift(t, by.as_millis() as i64)
}

type DrillResult = Result<Option<(String, Drilled)>, (String, anyhow::Error)>;

/// Restores the newest backup; `Ok(None)` when there is none. Errors carry the backup id.
async fn restore_newest(deps: &DrillDeps, cluster: &str, cancel: &CancellationToken) -> DrillResult {
    let newest = deps.store.list(Some(cluster), cancel).await.map_err(|e| (String::new(), anyhow!(e)))?;
    let Some(manifest) = newest.into_iter().next() else { return Ok(None) };
    let id = manifest.id.clone();
    info!(backup_id = %id, "restore drill started");
    let limit = crate::limits::job_timeout(manifest.backup.rawsize.min(i64::MAX as u64) as i64, 0);
    match tokio::time::timeout(limit, restore(deps, &manifest, cancel)).await {
        Ok(Ok(r)) => Ok(Some((id, r))),
        Ok(Err(e)) => Err((id, e)),
        Err(_) => Err((id, anyhow!("the drill did not finish within {}s", limit.as_secs()))),
    }
}

/// Room a drill needs in its scratch dir: the decompressed snapshot, the data dir restored from it (about as
/// large), and the throw-away etcd's WAL and logs.
fn scratch_needed(rawsize: u64) -> u64 {
    rawsize.saturating_mul(2).saturating_add(64 << 20)
}

/// Fails, saying how much is missing, when the scratch dir cannot hold a drill of `rawsize`: checked before
/// anything is written, so a full disk is reported as one and never as a corrupted backup.
fn check_scratch_room(dir: &std::path::Path, rawsize: u64) -> Result<()> {
    let st = rustix::fs::statvfs(dir).with_context(|| format!("check the free space of {}", dir.display()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    let needed = scratch_needed(rawsize);
    if free < needed {
        bail!(
            "the drill needs about {} MiB in its scratch dir {} (twice the backup's {} MiB, plus 64 MiB) but only {} \
             MiB are free: give drills more room (--drill-scratch-dir on a volume of its own); the backup itself was \
             not judged",
            needed >> 20,
            dir.display(),
            rawsize >> 20,
            free >> 20
        );
    }
    Ok(())
}

/// A failure of the drill's own copy: an I/O error on this host is said to be one, not blamed on the backup.
fn checks_failed(e: SnapshotError) -> anyhow::Error {
    match e {
        e @ SnapshotError::Io { .. } => {
            anyhow!(e).context("the drill could not write its scratch copy (an I/O error on the coordinator's host, not a fault of the backup)")
        }
        e => anyhow!(e).context("the stored backup fails its checks"),
    }
}

/// Reads a backup from the store into `snapshot` (etcd's snapshot file) through every check a restore makes.
pub async fn fetch(
    store: &BackupStore,
    identities: Option<&ferry_common::encryption::Identities>,
    manifest: &Manifest,
    snapshot: &std::path::Path,
    cancel: &CancellationToken,
) -> Result<()> {
    // The checks and zstd run on a blocking thread, fed through a small queue.
    let w = VerifyingWriter::create(snapshot, &manifest.backup, true, identities).map_err(checks_failed)?;
    let mut writer = BackgroundWriter::spawn(w);
    let read = async {
        let mut object = store.open(manifest, cancel).await.context("open the backup object")?;
        let mut buf = vec![0u8; DATA_CHUNK];
        while let Some(piece) = object.next(&mut buf).await.context("read the backup object")? {
            if let Err(e) = writer.write(piece.into()).await {
                return Ok(Some(e));
            }
        }
        anyhow::Ok(None)
    };
    let read = tokio::select! {
        r = read => r,
        () = cancel.cancelled() => Err(anyhow!("cancelled")),
    };
    // A check failure is the more telling error when both failed.
    let (checked, read) = match read {
        Ok(Some(e)) => (Err(e), Ok(())),
        Ok(None) => (writer.finish().await, Ok(())),
        Err(e) => (writer.finish().await, Err(e)),
    };
    if cancel.is_cancelled() {
        bail!("cancelled");
    }
    checked.map_err(checks_failed)?;
    read
}

async fn restore(deps: &DrillDeps, manifest: &Manifest, cancel: &CancellationToken) -> Result<Drilled> {
    check_scratch_room(&deps.scratch, manifest.backup.rawsize)?;
    let scratch = tempfile::Builder::new()
        .prefix(&format!("{}-", manifest.backup.cluster))
        .tempdir_in(&deps.scratch)
        .context("create a scratch dir")?;
    let snapshot = scratch.path().join("snapshot.db");
    fetch(&deps.store, deps.identities.as_ref(), manifest, &snapshot, cancel).await?;
    // Compared with the members that did not take the backup: the one that did could lie twice.
    let others: Vec<LiveAgent> = deps
        .agents
        .live(&manifest.backup.cluster)
        .into_iter()
        .filter(|a| a.member != manifest.backup.member && a.reaches_etcd())
        .collect();
    let compactions = agree::compactions(&others);
    // The blocking restore owns the scratch dir and deletes it only once its throw-away etcd is dead. If this
    // future is dropped (the drill's time limit), the guard stops the restore at its next step.
    let stop = cancel.child_token();
    let _stop_if_dropped = stop.clone().drop_guard();
    let (restored, hashes) = tokio::task::spawn_blocking(move || {
        let r = restore_read_and_hash(&snapshot, scratch.path(), ETCD_ANSWER_TIMEOUT, &stop, &compactions);
        drop(scratch);
        r
    })
    .await
    .context("the restore check panicked")??;
    if restored.revision < manifest.backup.revision {
        bail!(
            "the restored etcd is at revision {} but the manifest says the snapshot began at {}",
            restored.revision,
            manifest.backup.revision
        );
    }
    let agreement = tokio::select! {
        a = agree::compare(&others, &hashes) => a,
        () = cancel.cancelled() => bail!("cancelled"),
    };
    let agreement = match agreement {
        Agreement::Differs(why) => bail!("{why} (the backup was taken by member {})", manifest.backup.member),
        Agreement::NotCompared(why) => {
            // A state error is no proof of one member: then the backup is not vouched for.
            if deps.agents.members(&manifest.backup.cluster).is_ok_and(|m| m.len() <= 1) {
                Agreement::Agreed("not compared: the cluster has one member, nothing to compare with".into())
            } else {
                Agreement::NotCompared(why)
            }
        }
        agreed => agreed,
    };
    Ok(Drilled { restored, agreement })
}

/// A drill's findings: what restored, and whether another member's etcd holds the same.
struct Drilled {
    restored: Restored,
    agreement: Agreement,
}

#[cfg(test)]
mod scratch_tests {
    use super::*;

    /// A drill that cannot fit is refused before it writes a byte, and says it is a matter of room.
    #[test]
    fn a_drill_that_does_not_fit_its_scratch_dir_says_so_before_starting() {
        let dir = tempfile::tempdir().unwrap();
        check_scratch_room(dir.path(), 1 << 20).unwrap();
        let e = format!("{:#}", check_scratch_room(dir.path(), u64::MAX / 4).unwrap_err());
        assert!(e.contains("MiB are free") && e.contains("--drill-scratch-dir") && e.contains("not judged"), "{e}");
        assert_eq!(scratch_needed(100 << 20), (200 << 20) + (64 << 20));
    }
}
