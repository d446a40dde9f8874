//! `ferryctl backup now CLUSTER [--wait]`: the seed's manual backup (an `EtcdManualBackups` resource with
//! `backupat` = now) without writing YAML; with `--wait`, follows the cluster's `EtcdBackupStatuses` with a
//! live progress line until the new backup is listed or fails.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use ferry_common::config::FerryConfig;
use ferry_common::progress::{Lines, Progress};
use ferry_common::protocol::{AdminRequest, AdminResponse, ApplyOutcome};
use ferry_common::resources::{
    status, EtcdBackupStatusSpec, EtcdManualBackupSpec, Resource, ResourceType, Selector, Spec, Timestamp,
    LABEL_CLUSTER,
};

use super::request::{call, get, is_server_failure, WorkFailed};

/// How often `--wait` asks for the cluster's status: the status moves at the agent's progress ticks (about
/// once a second), and each poll is one short request.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// The `EtcdManualBackups` resource `apply -f` would take for "back up `cluster` now".
pub fn manual_backup(cluster: &str, at: Timestamp) -> Resource {
    Resource::new(cluster, Spec::EtcdManualBackup(EtcdManualBackupSpec { backupat: at }))
}

/// Asks for a backup of `cluster` now; with `wait`, follows it for at most that long.
pub async fn run(cfg: &FerryConfig, cluster: &str, wait: Option<Duration>) -> Result<()> {
    // Whole seconds, as the coordinator requires (`nanos` must be 0).
    let at = Timestamp { seconds: Timestamp::now().seconds, nanos: 0 };
    let outcomes = match call(cfg, AdminRequest::Apply { resources: vec![manual_backup(cluster, at)] }).await? {
        AdminResponse::Applied(o) => o,
        other => bail!("unexpected response {other:?}"),
    };
    if outcomes.iter().any(|o| matches!(o, ApplyOutcome::Unchanged { .. })) {
        println!("a backup of cluster {cluster} was already requested this second; following it");
    } else {
        println!("backup of cluster {cluster} requested at {}", at.human());
    }
    let Some(timeout) = wait else {
        println!("follow it with `ferryctl get -w etcdbackupstatus {cluster}`");
        return Ok(());
    };
    follow(cfg, cluster, at, timeout).await
}

/// Polls the cluster's status until the backup asked for `at` is stored (then prints it) or failed.
async fn follow(cfg: &FerryConfig, cluster: &str, at: Timestamp, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    let mut progress: Option<(String, Progress)> = None;
    let mut last_error = None;
    loop {
        if Instant::now() >= deadline {
            let why = last_error.map(|e| format!(" (last error: {e})")).unwrap_or_default();
            return Err(WorkFailed(format!(
                "the backup of cluster {cluster} did not finish within {}{why}; it may still be running: `ferryctl get etcdbackupstatus {cluster}`",
                humantime::format_duration(timeout)
            ))
            .into());
        }
        match get(cfg, ResourceType::EtcdBackupStatus, Some(cluster.into()), None).await {
            Ok(rs) => {
                last_error = None;
                let st = rs.into_iter().find_map(|r| match r.spec {
                    Spec::EtcdBackupStatus(s) => Some(s),
                    _ => None,
                });
                // A status from before our request is an earlier backup's: ours is still queued.
                if let Some(st) = st.filter(|s| s.lastbackupattempt.is_some_and(|t| t.seconds >= at.seconds)) {
                    match st.status {
                        status::RUNNING => track(cfg, cluster, &st, &mut progress).await,
                        status::OK => {
                            if let Some((_, p)) = progress.take() {
                                p.finish();
                            }
                            return report_stored(cfg, cluster, at).await;
                        }
                        status::ERROR => {
                            drop(progress.take());
                            return Err(
                                WorkFailed(format!("the backup of cluster {cluster} failed: {}", st.error)).into()
                            );
                        }
                        _ => {}
                    }
                }
            }
            // The coordinator restarting or the network blinking does not end the wait; the deadline does.
            Err(e) if is_server_failure(&e) => last_error = Some(format!("{e:#}")),
            Err(e) => return Err(e),
        }
        tokio::time::sleep(POLL_EVERY.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Updates the live line: which member, bytes done (of about the member's DB size), rate.
async fn track(cfg: &FerryConfig, cluster: &str, st: &EtcdBackupStatusSpec, progress: &mut Option<(String, Progress)>) {
    if st.member.is_empty() {
        return;
    }
    if progress.as_ref().is_none_or(|(m, _)| *m != st.member) {
        // A new member (the first, or a failover): its DB size is about the snapshot's size.
        let total = db_size(cfg, cluster, &st.member).await;
        let p = Progress::new(format!("backup of {cluster} from {}", st.member), total, Lines::Stderr);
        *progress = Some((st.member.clone(), p));
    }
    if let Some((_, p)) = progress {
        p.set(st.bytesdone);
    }
}

/// The member's last reported DB size, 0 if unknown.
async fn db_size(cfg: &FerryConfig, cluster: &str, member: &str) -> u64 {
    match get(cfg, ResourceType::Agent, Some(format!("{cluster}/{member}")), None).await {
        Ok(rs) => rs
            .iter()
            .find_map(|r| match &r.spec {
                Spec::Agent(a) => Some(a.dbsize.max(0) as u64),
                _ => None,
            })
            .unwrap_or(0),
        Err(_) => 0,
    }
}

/// The backup is stored: name it, as `get etcdbackup` lists it.
async fn report_stored(cfg: &FerryConfig, cluster: &str, at: Timestamp) -> Result<()> {
    let selector = Selector { key: LABEL_CLUSTER.into(), value: cluster.into() };
    let backups = get(cfg, ResourceType::EtcdBackup, None, Some(selector)).await?;
    let newest = backups
        .iter()
        .filter_map(|r| match &r.spec {
            Spec::EtcdBackup(b) if b.createdat.seconds >= at.seconds => Some((r.metadata.id.as_str(), b)),
            _ => None,
        })
        .max_by_key(|(_, b)| b.createdat);
    let Some((id, b)) = newest else {
        return Err(WorkFailed(format!(
            "the backup of cluster {cluster} finished but is not listed (removed by retention already?); see `ferryctl get etcdbackup --selector {LABEL_CLUSTER}={cluster}`"
        ))
        .into());
    };
    println!(
        "backup {id} stored: {} bytes ({} raw) from member {} at revision {}",
        b.size, b.rawsize, b.member, b.revision
    );
    Ok(())
}
