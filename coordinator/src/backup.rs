//! Running a backup from the coordinator's side: pick a member, command its agent, receive the compressed
//! snapshot into the local store, and commit it only when the agent says etcd's hash matched and the bytes
//! received match what the agent sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::{
    expect_frame, write_frame, BackupJob, BackupTarget, JobMsg, JobReply, JobRequest, S3Target,
};
use ferry_common::resources::{status, EtcdBackupSpec, Timestamp};
use tracing::{info, info_span, warn, Instrument};

use crate::coordinator::{Coordinator, LiveAgent, RunningGuard};
use crate::local_store::PendingBackup;
use crate::s3_store::{S3Conn, S3Store};
use crate::store::{BackupStore, Manifest};

/// No message from the agent for this long aborts the job (it reports progress every second).
const STALL_TIMEOUT: Duration = Duration::from_secs(90);
/// Status progress is written at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Why a backup could not be started.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a backup of cluster {0} is already running; wait for it (`ferryctl get etcdbackupstatus {0}`)")]
    AlreadyRunning(String),
}

/// Starts a backup of `cluster` in the background.
pub fn start(coord: &Arc<Coordinator>, cluster: &str) -> Result<(), StartError> {
    let guard = coord.try_start(cluster).ok_or_else(|| StartError::AlreadyRunning(cluster.to_string()))?;
    let c = coord.clone();
    let cluster = cluster.to_string();
    // A root span: the job outlives the admin request that started it.
    let span = info_span!(parent: None, "backup", %cluster);
    coord.tasks.spawn(async move { run(c, cluster, guard).await }.instrument(span));
    Ok(())
}

async fn run(coord: Arc<Coordinator>, cluster: String, _guard: RunningGuard) {
    let attempt = Timestamp::now();
    let marked = coord.update_status(&cluster, |s| {
        s.status = status::RUNNING;
        s.error.clear();
        s.lastbackupattempt = Some(attempt);
        s.bytesdone = 0;
    });
    if let Err(e) = marked {
        warn!("failed to record backup status: {e:#}");
    }
    let result = take(&coord, &cluster).await;
    let recorded = match &result {
        Ok(m) => {
            info!(backup_id = %m.id, size = m.backup.size, rawsize = m.backup.rawsize, member = %m.backup.member, "backup stored");
            coord.update_status(&cluster, |s| {
                s.status = status::OK;
                s.error.clear();
                s.lastbackuptime = Some(m.backup.finishedat);
                s.bytesdone = m.backup.rawsize;
            })
        }
        Err(e) => {
            warn!("backup failed: {e:#}");
            coord.update_status(&cluster, |s| {
                s.status = status::ERROR;
                s.error = format!("{e:#}");
            })
        }
    };
    if let Err(e) = recorded {
        warn!("failed to record backup status: {e:#}");
    }
}

/// Picks the member to back up: reachable, and a follower before the leader so the leader keeps its capacity;
/// among equals the most caught-up.
fn choose(agents: &[LiveAgent]) -> Option<&LiveAgent> {
    agents.iter().filter(|a| a.facts.as_ref().is_some_and(|f| f.error.is_none())).min_by_key(|a| {
        let f = a.facts.as_ref().map(|f| (f.leader, u64::MAX - f.raft_applied_index)).unwrap_or((true, u64::MAX));
        (f, a.member.clone())
    })
}

/// Where this job's bytes land, decided before the agent is asked.
enum Destination {
    Local(PendingBackup),
    S3 { conn: Arc<S3Conn>, key: String, upload_id: Option<String> },
}

async fn take(coord: &Arc<Coordinator>, cluster: &str) -> Result<Manifest> {
    let agents = coord.live_agents(cluster);
    let agent = choose(&agents).ok_or_else(|| {
        if agents.is_empty() {
            anyhow!("no agent of cluster {cluster} is connected; check `ferryctl get agents`")
        } else {
            anyhow!("no connected agent of cluster {cluster} reaches its etcd member; check `ferryctl get agents`")
        }
    })?;
    let member = agent.member.clone();
    let now = Timestamp::now();
    let (id, mut dest, target) = match &coord.store {
        BackupStore::Local(local) => {
            let pending = local.begin(cluster, now).await?;
            (pending.id.clone(), Destination::Local(pending), BackupTarget::Coordinator)
        }
        BackupStore::S3(s3) => {
            s3.retry_pending_aborts().await;
            let conn = s3.conn()?;
            let id = s3.free_id(&conn, cluster, now, &coord.cancel).await?;
            let key = S3Store::object_key(&conn.spec, cluster, &id);
            let target = BackupTarget::S3(S3Target {
                config: conn.spec.clone(),
                key: key.clone(),
                part_size: coord.settings.part_size,
                parts_in_flight: coord.settings.parts_in_flight,
            });
            (id, Destination::S3 { conn, key, upload_id: None }, target)
        }
    };
    info!(%member, backup_id = %id, "backup started");
    let result = run_job(coord, cluster, agent, &id, &mut dest, target).await;
    if result.is_err() {
        if let (BackupStore::S3(s3), Destination::S3 { conn, key, upload_id }) = (&coord.store, &dest) {
            s3.discard(conn, key, upload_id.as_deref()).await;
        }
    }
    // A local partial file is removed when `dest` drops uncommitted.
    result
}

async fn run_job(
    coord: &Arc<Coordinator>,
    cluster: &str,
    agent: &LiveAgent,
    id: &str,
    dest: &mut Destination,
    target: BackupTarget,
) -> Result<Manifest> {
    let member = &agent.member;
    let (mut send, mut recv) =
        agent.conn.open_bi().await.with_context(|| format!("open job stream to agent {member}"))?;
    let job = BackupJob {
        backup_id: id.to_string(),
        zstd_level: coord.settings.zstd_level,
        target,
        upload_limit_bps: coord.settings.upload_limit_bps,
    };
    write_frame(&mut send, &JobRequest::Backup(job)).await.context("send job")?;

    let mut facts = None;
    let mut last_progress = Instant::now();
    loop {
        let msg: JobMsg = tokio::select! {
            m = tokio::time::timeout(STALL_TIMEOUT, expect_frame(&mut recv)) => m
                .map_err(|_| anyhow!("agent {member} sent nothing for {}s", STALL_TIMEOUT.as_secs()))?
                .with_context(|| format!("job stream from agent {member}"))?,
            _ = coord.cancel.cancelled() => bail!("the coordinator is shutting down"),
        };
        match msg {
            JobMsg::Started(f) => facts = Some(f),
            JobMsg::Data(d) => match dest {
                Destination::Local(pending) => pending.write(&d).await?,
                Destination::S3 { .. } => bail!("agent {member} sent data for an S3 backup"),
            },
            JobMsg::UploadStarted { upload_id: u } => match dest {
                Destination::S3 { upload_id, .. } => *upload_id = Some(u),
                Destination::Local(_) => bail!("agent {member} started an S3 upload for a local backup"),
            },
            JobMsg::Progress { raw_bytes } => {
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    coord.update_status(cluster, |s| s.bytesdone = raw_bytes)?;
                }
            }
            JobMsg::Failed { error } => bail!("agent {member}: {error}"),
            JobMsg::Finished(summary) => {
                let f = facts.clone().unwrap_or_default();
                let spec = EtcdBackupSpec {
                    cluster: cluster.to_string(),
                    createdat: summary.finished_at,
                    snapshot: String::new(),
                    size: summary.compressed_size,
                    rawsize: summary.raw_size,
                    member: member.clone(),
                    memberid: format!("{:x}", f.member_id),
                    etcdclusterid: format!("{:x}", f.cluster_id),
                    etcdversion: f.etcd_version,
                    revision: f.revision,
                    sha256: hex::encode(summary.compressed_sha256),
                    rawsha256: hex::encode(summary.raw_sha256),
                    zstdlevel: summary.zstd_level,
                    startedat: summary.started_at,
                    finishedat: summary.finished_at,
                };
                let committed = match dest {
                    Destination::Local(pending) => pending.commit(spec).await,
                    Destination::S3 { conn, key, .. } => {
                        let mut spec = spec;
                        spec.snapshot = key.clone();
                        let manifest = Manifest { format: 1, id: id.to_string(), backup: spec };
                        match &coord.store {
                            BackupStore::S3(s3) => {
                                s3.commit(conn, key, &manifest, &coord.cancel).await.map(|()| manifest)
                            }
                            BackupStore::Local(_) => Err(anyhow!("store changed during the job")),
                        }
                    }
                };
                return match committed {
                    Ok(m) => {
                        write_frame(&mut send, &JobReply::Committed).await.ok();
                        send.finish().ok();
                        Ok(m)
                    }
                    Err(e) => {
                        write_frame(&mut send, &JobReply::Failed { error: format!("{e:#}") }).await.ok();
                        send.finish().ok();
                        Err(e)
                    }
                };
            }
        }
    }
}
