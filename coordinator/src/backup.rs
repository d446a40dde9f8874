//! Running a backup from the coordinator's side: pick a member, command its agent, receive the compressed
//! snapshot into the local store, and commit it only when the agent says etcd's hash matched and the bytes
//! received match what the agent sent.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::EtcdFacts;
use ferry_common::protocol::{
    expect_frame, write_frame, BackupJob, BackupTarget, JobMsg, JobReply, JobRequest, S3Target,
};
use ferry_common::resources::{status, EtcdBackupSpec, Resource, ResourceType, Spec, Timestamp};
use tracing::{info, info_span, warn, Instrument};

use crate::coordinator::{Coordinator, LiveAgent, RunningGuard};
use crate::local_store::PendingBackup;
use crate::metrics::Metrics;
use crate::retention;
use crate::s3_store::{S3Conn, S3Store};
use crate::schedule::{self, Plan};
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

/// What asked for a backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Manual,
    Scheduled,
}

/// Members whose raft applied index trails the cluster's highest by more than this are tried last.
const APPLIED_INDEX_TOLERANCE: u64 = 1000;
/// Every job gets at least this long, plus time for its DB size at `ASSUMED_RATE`.
const JOB_TIMEOUT_BASE: Duration = Duration::from_secs(600);
/// A pessimistic end-to-end rate for sizing job timeouts (bytes per second).
const ASSUMED_RATE: u64 = 4 * 1024 * 1024;

/// Starts a backup of `cluster` in the background; it waits for a free job slot first.
pub fn start(coord: &Arc<Coordinator>, cluster: &str, trigger: Trigger) -> Result<(), StartError> {
    let guard = coord.try_start(cluster).ok_or_else(|| StartError::AlreadyRunning(cluster.to_string()))?;
    let c = coord.clone();
    let cluster = cluster.to_string();
    // A root span: the job outlives the request or tick that started it.
    let span = info_span!(parent: None, "backup", %cluster, ?trigger);
    coord.tasks.spawn(async move { run(c, cluster, guard).await }.instrument(span));
    Ok(())
}

async fn run(coord: Arc<Coordinator>, cluster: String, _guard: RunningGuard) {
    // Fair semaphore: queued backups start in the order they were queued (due order for scheduled ones).
    let Ok(_slot) = coord.job_slots.clone().acquire_owned().await else { return };
    let attempt = Timestamp::now();
    let labels = Metrics::cluster(&cluster);
    coord.metrics.last_attempt.get_or_create(&labels).set(attempt.seconds as f64);
    let marked = coord.update_status(&cluster, |s| {
        s.status = status::RUNNING;
        s.error.clear();
        s.lastbackupattempt = Some(attempt);
        s.bytesdone = 0;
    });
    if let Err(e) = marked {
        warn!("failed to record backup status: {e:#}");
    }
    let plan = cluster_plan(&coord, &cluster);
    let result = take_with_failover(&coord, &cluster).await;
    let recorded = match &result {
        Ok(m) => {
            info!(backup_id = %m.id, size = m.backup.size, rawsize = m.backup.rawsize, member = %m.backup.member, "backup stored");
            coord.scheduler.backup_succeeded(&cluster, m.backup.createdat, plan.as_ref(), &coord.settings.bounds);
            let metrics = &coord.metrics;
            metrics.backups.get_or_create(&Metrics::result(&cluster, true)).inc();
            metrics.consecutive_failures.get_or_create(&labels).set(0);
            metrics.last_success.get_or_create(&labels).set(m.backup.finishedat.seconds as f64);
            metrics.size.get_or_create(&labels).set(m.backup.size as i64);
            metrics.raw_size.get_or_create(&labels).set(m.backup.rawsize as i64);
            let secs = |t: Timestamp| t.seconds as f64 + f64::from(t.nanos) / 1e9;
            metrics.duration.observe((secs(m.backup.finishedat) - secs(attempt)).max(0.0));
            if let Err(e) = apply_retention(&coord, &cluster).await {
                warn!("failed to apply retention: {e:#}");
            }
            coord.update_status(&cluster, |s| {
                s.status = status::OK;
                s.error.clear();
                s.lastbackuptime = Some(m.backup.finishedat);
                s.bytesdone = m.backup.rawsize;
                s.member = m.backup.member.clone();
            })
        }
        Err(e) => {
            warn!("backup failed: {e:#}");
            let period = plan.as_ref().map_or(Duration::from_secs(3600), |p| p.period(Timestamp::now()));
            coord.scheduler.backup_failed(&cluster, Timestamp::now(), period);
            coord.metrics.backups.get_or_create(&Metrics::result(&cluster, false)).inc();
            // A gauge, not a rate: the scheduler's backoff spaces failures out, but the streak only grows.
            coord.metrics.consecutive_failures.get_or_create(&labels).inc();
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

/// The cluster's automatic-backup plan, if it has a valid one.
fn cluster_plan(coord: &Coordinator, cluster: &str) -> Option<Plan> {
    match coord.state.get(ResourceType::Cluster, cluster) {
        Ok(Some(Resource { spec: Spec::Cluster(c), .. })) => {
            c.backupconfiguration.and_then(|b| schedule::plan(&b, &coord.settings.bounds).ok())
        }
        _ => None,
    }
}

/// Orders members for a backup: reachable members close to the highest applied index first — followers
/// before the leader (so the leader keeps its capacity), rotating among followers — then the lagging ones.
pub fn order_members(members: &[(String, EtcdFacts)], rotation: usize) -> Vec<String> {
    let healthy: Vec<&(String, EtcdFacts)> = members.iter().filter(|(_, f)| f.error.is_none()).collect();
    let highest = healthy.iter().map(|(_, f)| f.raft_applied_index).max().unwrap_or(0);
    let close = |f: &EtcdFacts| highest.saturating_sub(f.raft_applied_index) <= APPLIED_INDEX_TOLERANCE;
    let mut followers: Vec<&String> = healthy.iter().filter(|(_, f)| close(f) && !f.leader).map(|(m, _)| m).collect();
    followers.sort();
    if !followers.is_empty() {
        let n = rotation % followers.len();
        followers.rotate_left(n);
    }
    let leaders = healthy.iter().filter(|(_, f)| close(f) && f.leader).map(|(m, _)| m);
    let mut lagging: Vec<&(String, EtcdFacts)> = healthy.iter().copied().filter(|(_, f)| !close(f)).collect();
    lagging.sort_by_key(|(m, f)| (std::cmp::Reverse(f.raft_applied_index), m.clone()));
    followers.into_iter().chain(leaders).chain(lagging.into_iter().map(|(m, _)| m)).cloned().collect()
}

/// How long one job may take: generous for its DB size, so large clusters are not cut off.
pub fn job_timeout(db_size: i64, upload_limit_bps: u64) -> Duration {
    let rate = if upload_limit_bps > 0 { upload_limit_bps.min(ASSUMED_RATE) } else { ASSUMED_RATE };
    JOB_TIMEOUT_BASE + Duration::from_secs(db_size.max(0) as u64 / rate.max(1))
}

/// Tries each candidate member in turn; fails only when every one failed.
async fn take_with_failover(coord: &Arc<Coordinator>, cluster: &str) -> Result<Manifest> {
    let agents = coord.live_agents(cluster);
    let facts: Vec<(String, EtcdFacts)> =
        agents.iter().filter_map(|a| a.facts.clone().map(|f| (a.member.clone(), f))).collect();
    let order = order_members(&facts, coord.scheduler.next_rotation(cluster));
    if order.is_empty() {
        if agents.is_empty() {
            bail!("no agent of cluster {cluster} is connected; check `ferryctl get agents`");
        }
        bail!("no connected agent of cluster {cluster} reaches its etcd member; check `ferryctl get agents`");
    }
    let mut failures = Vec::new();
    for member in &order {
        // The agent may have gone since the order was made; its replacement connection counts.
        let Some(agent) = coord.live_agents(cluster).into_iter().find(|a| &a.member == member) else {
            failures.push(format!("{member}: disconnected"));
            continue;
        };
        coord.update_status(cluster, |s| s.member = member.clone())?;
        match take(coord, cluster, &agent).await {
            Ok(m) => return Ok(m),
            Err(e) => {
                warn!(%member, "backup from this member failed: {e:#}");
                failures.push(format!("{member}: {e:#}"));
            }
        }
    }
    bail!("the backup failed on every member: {}", failures.join("; "))
}

async fn apply_retention(coord: &Arc<Coordinator>, cluster: &str) -> Result<()> {
    let policy = match coord.state.get(ResourceType::Cluster, cluster)? {
        Some(Resource { spec: Spec::Cluster(c), .. }) => c.backupconfiguration.and_then(|b| b.retention),
        _ => None,
    };
    let Some(policy) = policy else { return Ok(()) };
    let all = coord.store.list(Some(cluster), &coord.cancel).await?;
    let listed: Vec<(String, Timestamp)> = all.iter().map(|m| (m.id.clone(), m.backup.createdat)).collect();
    for id in retention::to_delete(&listed, &policy) {
        let Some(m) = all.iter().find(|m| m.id == id) else { continue };
        coord.store.delete(m).await?;
        coord.count_retention_deletion(cluster);
        info!(backup_id = %id, createdat = %m.backup.createdat.human(), ?policy, "retention deleted backup");
    }
    Ok(())
}

/// Where this job's bytes land, decided before the agent is asked.
enum Destination {
    Local(Box<PendingBackup>),
    S3 { conn: Arc<S3Conn>, key: String, upload_id: Option<String> },
}

async fn take(coord: &Arc<Coordinator>, cluster: &str, agent: &LiveAgent) -> Result<Manifest> {
    let member = agent.member.clone();
    let now = Timestamp::now();
    let (id, mut dest, target) = match &coord.store {
        BackupStore::Local(local) => {
            let pending = local.begin(cluster, now).await?;
            (pending.id.clone(), Destination::Local(Box::new(pending)), BackupTarget::Coordinator)
        }
        BackupStore::S3(s3) => {
            s3.retry_pending_aborts().await;
            let conn = s3.conn()?;
            let id = s3.free_id(&conn, cluster, now, &coord.cancel).await?;
            let key = S3Store::object_key(&conn.spec, cluster, &id);
            let target = BackupTarget::S3(Box::new(S3Target {
                config: conn.spec.clone(),
                key: key.clone(),
                part_size: coord.settings.part_size,
                parts_in_flight: coord.settings.parts_in_flight,
            }));
            (id, Destination::S3 { conn, key, upload_id: None }, target)
        }
    };
    info!(%member, backup_id = %id, "backup started");
    let db_size = agent.facts.as_ref().map_or(0, |f| f.db_size);
    let limit = job_timeout(db_size, coord.settings.upload_limit_bps);
    let result = match tokio::time::timeout(limit, run_job(coord, cluster, agent, &id, &mut dest, target)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("the backup from {member} did not finish within {}s", limit.as_secs())),
    };
    if result.is_err() {
        if let Destination::S3 { conn, key, upload_id } = dest {
            // In the background: with S3 down, cleanup retries would hold up the status (and the next member).
            let c = coord.clone();
            coord.tasks.spawn(
                async move {
                    if let BackupStore::S3(s3) = &c.store {
                        s3.discard(&conn, &key, upload_id.as_deref()).await;
                    }
                }
                .in_current_span(),
            );
            return result;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn m(name: &str, applied: u64, leader: bool) -> (String, EtcdFacts) {
        (name.into(), EtcdFacts { raft_applied_index: applied, leader, ..Default::default() })
    }

    #[test]
    fn followers_come_before_the_leader_and_rotate() {
        let members = vec![m("a", 100, true), m("b", 100, false), m("c", 99, false)];
        let first = order_members(&members, 0);
        assert_eq!(first.last().unwrap(), "a", "the leader is the last choice: {first:?}");
        let second = order_members(&members, 1);
        assert_ne!(first[0], second[0], "equal followers take turns");
        assert_eq!(second.last().unwrap(), "a");
    }

    #[test]
    fn lagging_and_unreachable_members_are_last_or_out() {
        let mut down = m("d", 100, false);
        down.1.error = Some("connection refused".into());
        let members = vec![m("a", 5000, true), m("b", 10, false), down];
        assert_eq!(order_members(&members, 0), ["a", "b"], "a lagging follower comes after the leader");
    }

    #[test]
    fn job_timeout_grows_with_db_size() {
        assert_eq!(job_timeout(0, 0), JOB_TIMEOUT_BASE);
        assert!(job_timeout(8 << 30, 0) > job_timeout(1 << 30, 0));
        assert!(job_timeout(1 << 30, 1 << 20) > job_timeout(1 << 30, 0), "a bandwidth cap needs more time");
    }
}
