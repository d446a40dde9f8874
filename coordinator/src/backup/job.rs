//! One backup job from the coordinator's side: pick a member, command its agent, receive the compressed
//! snapshot into the store's pending object (or let the agent upload it), and commit it only when the agent
//! says etcd's hash matched and what arrived matches what the agent sent.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::protocol::{
    expect_frame, write_frame, BackupJob, BackupTarget, EtcdFacts, JobMsg, JobReply, JobRequest, UploadedPart,
    COMMIT_TIMEOUT, MAX_PARTS,
};
use ferry_common::resources::{BackupEncryption, EtcdBackupSpec, MemberCheck, Timestamp};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::divergence::{self, Divergence};
use super::members::order_members;
use super::Inner;
use crate::agents::LiveAgent;
use crate::limits::job_timeout;
use crate::store::{Manifest, Pending, StoreError, UploadSettings};

/// No message from the agent for this long aborts the job (it reports progress every second).
const STALL_TIMEOUT: Duration = Duration::from_secs(90);
/// How far a backup's declared revision may lie above the highest one the cluster's agents reported (they
/// report every 10 s; writes in between raise it): half the restore's smallest bump margin, so a lying
/// member can never take a restore below the revisions watchers saw.
const REVISION_SLACK: i64 = ferry_common::snapshot::BUMP_MARGIN_MIN / 2;
/// How long a backup waits for an agent of its cluster to (re)connect: agents move to a new leader within
/// seconds of a failover, and a manual backup's request is good for a minute.
const AGENT_WAIT: Duration = Duration::from_secs(60);
/// How often it looks while it waits.
const AGENT_POLL: Duration = Duration::from_millis(250);
/// The smallest snapshot size limit a cluster gets, whatever its members report (a new, nearly empty etcd).
const MIN_SIZE_LIMIT: u64 = 64 << 20;
/// Status progress is written at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How long a job may go without byte progress: for S3 one part at the upload cap on top.
fn byte_stall_timeout(base: Duration, target: &BackupTarget, upload_limit_bps: u64) -> Duration {
    match target {
        BackupTarget::S3(u) if upload_limit_bps > 0 => {
            base + Duration::from_secs(u.part_size / upload_limit_bps.max(1))
        }
        _ => base,
    }
}

/// Tries each candidate member in turn; fails only when every one failed.
pub(super) async fn take_with_failover(inner: &Inner, cluster: &str) -> Result<Manifest> {
    let deps = &inner.deps;
    let agents = wait_for_agents(inner, cluster).await?;
    let reachable: Vec<LiveAgent> =
        agents.iter().filter(|a| a.facts.as_ref().is_some_and(|f| f.error.is_none())).cloned().collect();
    let check = divergence::check(&reachable, &inner.cancel).await;
    record_member_check(inner, cluster, &reachable, &check);
    let facts: Vec<(String, EtcdFacts)> = agents
        .iter()
        .filter(|a| !check.is_diverged(&a.member))
        .filter_map(|a| a.facts.clone().map(|f| (a.member.clone(), f)))
        .collect();
    let mut order = prefer_agreeing(order_members(&facts, inner.rotation.next(cluster)), &check.agreeing);
    let mut out = Vec::new();
    order.retain(|m| match inner.quarantine.out_for(cluster, m) {
        Some(left) => {
            out.push(format!("{m} (for another {} min)", left.as_secs().div_ceil(60)));
            false
        }
        None => {
            deps.metrics.member_out_of_rotation.remove(&crate::metrics::Metrics::member(cluster, m));
            true
        }
    });
    if order.is_empty() && !out.is_empty() {
        bail!(
            "every member of cluster {cluster} that could back up is out of rotation after {} refused backups in a \
             row: {} (a node sending backups the store refuses may be compromised; see the coordinator's log)",
            super::quarantine::STRIKES,
            out.join(", ")
        );
    }
    if order.is_empty() {
        if !check.diverged.is_empty() {
            bail!("no member of cluster {cluster} to back up from: {}", check.summary());
        }
        if agents.is_empty() {
            bail!("no agent of cluster {cluster} is connected; check `ferryctl get agents`");
        }
        bail!("no connected agent of cluster {cluster} reaches its etcd member; check `ferryctl get agents`");
    }
    let mut failures = Vec::new();
    for member in &order {
        if inner.cancel.is_cancelled() {
            bail!("the coordinator is shutting down; the backup is cancelled");
        }
        // The agent may have gone since the order was made; its replacement connection counts.
        let Some(agent) = deps.agents.live(cluster).into_iter().find(|a| &a.member == member) else {
            failures.push(format!("{member}: disconnected"));
            continue;
        };
        deps.status.update(cluster, |s| s.member = member.clone())?;
        match take(inner, cluster, &agent, &check.db_sizes).await {
            Ok(m) => {
                inner.quarantine.committed(cluster, member);
                return Ok(m);
            }
            Err(e) => {
                warn!(%member, "backup from this member failed: {e:#}");
                if refused(&e) && inner.quarantine.refused(cluster, member) {
                    warn!(
                        %member,
                        "out of rotation for {} min: the store refused its last {} backups",
                        super::quarantine::OUT_FOR.as_secs() / 60,
                        super::quarantine::STRIKES
                    );
                    deps.metrics
                        .member_out_of_rotation
                        .get_or_create(&deps.metrics.member_series(cluster, member))
                        .set(1);
                }
                failures.push(format!("{member}: {e:#}"));
            }
        }
    }
    bail!("the backup failed on every member: {}", failures.join("; "))
}

/// The cluster's live agents, once one is connected and has reported: a backup started while its agents are between
/// coordinators (a leader just failed over, a coordinator just restarted) waits for them, up to
/// [`AGENT_WAIT`], saying so in the status, rather than failing at once. Agents that are connected but cannot
/// reach etcd are a real failure and are not waited for.
async fn wait_for_agents(inner: &Inner, cluster: &str) -> Result<Vec<LiveAgent>> {
    let deps = &inner.deps;
    let deadline = tokio::time::Instant::now() + AGENT_WAIT;
    let mut waited = false;
    let agents = loop {
        let agents = deps.agents.live(cluster);
        // An agent that just connected has not reported yet: it is still arriving, not failing.
        if agents.iter().any(|a| a.facts.is_some()) || tokio::time::Instant::now() >= deadline {
            break agents;
        }
        if !waited {
            waited = true;
            info!("no agent of the cluster is connected; waiting up to {}s for one", AGENT_WAIT.as_secs());
            deps.status.update(cluster, |s| {
                s.waiting = format!(
                    "no agent of cluster {cluster} is connected (agents move to a new coordinator leader within \
                     seconds); waiting up to {}s",
                    AGENT_WAIT.as_secs()
                )
            })?;
        }
        tokio::select! {
            () = tokio::time::sleep(AGENT_POLL) => {}
            () = inner.cancel.cancelled() => bail!("the coordinator is shutting down; the backup is cancelled"),
        }
    };
    if waited {
        deps.status.update(cluster, |s| s.waiting.clear())?;
    }
    Ok(agents)
}

/// Puts a member check into the cluster's status and metrics, and logs a divergence.
fn record_member_check(inner: &Inner, cluster: &str, checked: &[LiveAgent], check: &Divergence) {
    let deps = &inner.deps;
    let members: Vec<(String, bool)> =
        checked.iter().map(|a| (a.member.clone(), check.is_diverged(&a.member))).collect();
    deps.metrics.set_member_check(cluster, &members, check.unreachable.len(), check.compared());
    let summary = check.summary();
    if !summary.is_empty() {
        warn!(revision = check.revision, "members disagree: {summary}");
    }
    for (member, why) in &check.unreachable {
        warn!(%member, "member not compared: {why}");
    }
    let unreachable = check.unreachable.iter().map(|(m, why)| format!("{m}: {why}"));
    let message =
        summary.split("; ").filter(|s| !s.is_empty()).map(str::to_string).chain(unreachable).collect::<Vec<_>>();
    let recorded = deps.status.update_cluster(cluster, |st| {
        st.membercheck = Some(MemberCheck {
            time: Some(Timestamp::now()),
            revision: check.revision,
            diverged: check.diverged.iter().map(|(m, _)| m.clone()).collect(),
            unreachable: check.unreachable.iter().map(|(m, _)| m.clone()).collect(),
            message: message.join("; "),
        });
    });
    if let Err(e) = recorded {
        warn!("failed to record the member check: {e:#}");
    }
}

/// `fresh`: the database sizes the members' answers to the member check carried, by member.
async fn take(inner: &Inner, cluster: &str, agent: &LiveAgent, fresh: &[(String, i64)]) -> Result<Manifest> {
    let deps = &inner.deps;
    let member = agent.member.clone();
    let upload = UploadSettings { part_size: deps.settings.part_size, parts_in_flight: deps.settings.parts_in_flight };
    let mut pending = deps.store.begin(cluster, Timestamp::now(), upload, &inner.cancel).await?;
    let backup_id = pending.id().to_string();
    info!(%member, %backup_id, "backup started");
    // The members' median DB size, not the chosen member's word: one member claiming a huge DB cannot hold
    // its cluster's backup (and a job slot) for hours.
    let db_size = median_db_size(deps, cluster, fresh).unwrap_or_else(|| agent.facts.as_ref().map_or(0, |f| f.db_size));
    let limit = job_timeout(db_size, deps.settings.upload_limit_bps);
    let streamed = match tokio::time::timeout(limit, stream(inner, cluster, agent, fresh, &mut pending)).await {
        Ok(r) => r,
        Err(_) => Err(anyhow!("the backup from {member} did not finish within {}s", limit.as_secs())),
    };
    let (spec, parts, mut send) = match streamed {
        Ok(done) => done,
        Err(e) => {
            // In the background (but joined at shutdown): with S3 down, cleanup retries would hold up the status
            // and the next member.
            inner.tracker.spawn(pending.abort().in_current_span());
            // Whichever step noticed the shutdown first (a store write says only "cancelled"), say why.
            if inner.cancel.is_cancelled() {
                bail!("the coordinator is shutting down; the backup is cancelled");
            }
            return Err(e);
        }
    };
    let committed = commit_within(pending, spec, parts, &inner.cancel, COMMIT_TIMEOUT).await;
    // The agent learns that it failed, never why: the reason names sizes and hashes the coordinator computed
    // over what is stored, which would teach a lying agent what to declare next time.
    let reply = match &committed {
        Ok(_) => JobReply::Committed,
        Err(_) => JobReply::Failed {
            error: format!(
                "the coordinator did not commit backup {backup_id}; the reason is in its status \
                 (`ferryctl get etcdbackupstatus {cluster} -o yaml`) and log"
            ),
        },
    };
    write_frame(&mut send, &reply).await.ok();
    send.finish().ok();
    committed
}

/// Commits `pending`, giving up after `limit` (the agent waits a little longer for the reply): the commit is
/// then cancelled, which discards what it had, rather than dropped half-way.
async fn commit_within(
    pending: Pending,
    spec: EtcdBackupSpec,
    parts: Vec<UploadedPart>,
    cancel: &CancellationToken,
    limit: Duration,
) -> Result<Manifest> {
    let token = cancel.child_token();
    let commit = pending.commit(spec, parts, &token);
    tokio::pin!(commit);
    tokio::select! {
        r = &mut commit => r.map_err(anyhow::Error::from),
        () = tokio::time::sleep(limit) => {
            token.cancel();
            let _ = commit.await;
            Err(anyhow!("the backup store did not commit within {}s; the backup is discarded", limit.as_secs()))
        }
    }
}

/// Runs the job on the agent up to its `Finished`: returns what to commit (the spec, and for S3 the parts to
/// complete the upload with) and the stream to answer on.
async fn stream(
    inner: &Inner,
    cluster: &str,
    agent: &LiveAgent,
    fresh: &[(String, i64)],
    pending: &mut Pending,
) -> Result<(EtcdBackupSpec, Vec<UploadedPart>, quinn::SendStream)> {
    let deps = &inner.deps;
    let cancel = &inner.cancel;
    let member = &agent.member;
    let (mut send, mut recv) =
        agent.conn.open_bi().await.with_context(|| format!("open job stream to agent {member}"))?;
    let target = pending.target();
    // Public keys only: the agent can seal this backup and never open it.
    let recipients = crate::encryption::recipients_for(deps.state.as_ref(), cluster)?;
    // A coordinator whose identity opens them checks the backup whole before it is listed.
    if let Some(ids) = deps.settings.identities.as_ref().filter(|ids| ids.check_opens(&recipients).is_ok()) {
        pending.open_with(ids.clone())?;
    }
    // The snapshot must hold the etcd members most of the cluster's connected agents report (issue 26: a
    // member could have another cluster's backup committed as its own).
    let reported: Vec<u64> =
        deps.agents.live(cluster).iter().filter_map(|a| a.facts.as_ref().map(|f| f.member_id)).collect();
    pending.expect_members(reported)?;
    let byte_stall = byte_stall_timeout(deps.settings.byte_stall_timeout, &target, deps.settings.upload_limit_bps);
    let job = BackupJob {
        backup_id: pending.id().to_string(),
        zstd_level: deps.settings.zstd_level,
        target,
        upload_limit_bps: deps.settings.upload_limit_bps,
        recipients: recipients.clone(),
    };
    write_frame(&mut send, &JobRequest::Backup(job)).await.context("send job")?;

    let mut facts = None;
    let mut last_progress = Instant::now();
    // Moved only by snapshot bytes (data, or the next part), never by progress messages.
    let mut bytes_deadline = tokio::time::Instant::now() + byte_stall;
    let mut highest_part = 0u32;
    let mut part_requests = 0u32;
    loop {
        let msg: JobMsg = tokio::select! {
            m = tokio::time::timeout(STALL_TIMEOUT, expect_frame(&mut recv)) => m
                .map_err(|_| anyhow!("agent {member} sent nothing for {}s", STALL_TIMEOUT.as_secs()))?
                .with_context(|| format!("job stream from agent {member}"))?,
            () = tokio::time::sleep_until(bytes_deadline) => {
                bail!("agent {member} sent no snapshot data for {}s; the backup is abandoned", byte_stall.as_secs())
            }
            () = cancel.cancelled() => bail!("the coordinator is shutting down; the backup is cancelled"),
        };
        match msg {
            JobMsg::Started(f) => facts = Some(f),
            JobMsg::Data(d) => {
                pending.write(&d, cancel).await.map_err(|e| wrong_path(e, member))?;
                if !d.is_empty() {
                    bytes_deadline = tokio::time::Instant::now() + byte_stall;
                }
            }
            JobMsg::PartUrl { number, digest } => {
                // Parts are asked for in order; a part may be asked for again (its URL expired), but not
                // without end.
                part_requests += 1;
                if number == 0 || number > highest_part + 1 || part_requests > 2 * MAX_PARTS {
                    bail!("agent {member} asked for part {number} after part {highest_part}: not in order");
                }
                if number > highest_part {
                    highest_part = number;
                    bytes_deadline = tokio::time::Instant::now() + byte_stall;
                }
                let request = pending.part_url(number, digest, cancel).await.map_err(|e| wrong_path(e, member))?;
                write_frame(&mut send, &JobReply::PartUrl { number, request }).await.context("send part URL")?;
            }
            JobMsg::Progress { raw_bytes } => {
                if last_progress.elapsed() >= PROGRESS_EVERY {
                    last_progress = Instant::now();
                    deps.status.update(cluster, |s| s.bytesdone = raw_bytes)?;
                }
            }
            JobMsg::Failed { error } => bail!("agent {member}: {error}"),
            JobMsg::Finished(summary) => {
                let f = facts.clone().unwrap_or_default();
                // The coordinator's clock dates the backup: schedule, retention and alerts never depend on an
                // agent's. The agent's own times are kept as it reported them.
                let createdat = Timestamp::now();
                // Encrypted: the stored object is the age file; the zstd stream is what it opens to.
                let (size, sha256, encryption) = match (summary.sealed, recipients.is_empty()) {
                    (Some(sealed), false) => (
                        sealed.size,
                        hex::encode(sealed.sha256),
                        Some(BackupEncryption {
                            recipients: recipients.clone(),
                            zstdsize: summary.compressed_size,
                            zstdsha256: hex::encode(summary.compressed_sha256),
                        }),
                    ),
                    (None, true) => (summary.compressed_size, hex::encode(summary.compressed_sha256), None),
                    (None, false) => bail!("agent {member} did not encrypt the backup although the job asked it to"),
                    (Some(_), true) => bail!("agent {member} encrypted a backup the job did not ask to encrypt"),
                };
                // The revision a restore bumps from: never above what the cluster's members reported.
                if let Some((highest, _)) = deps.agents.highest_revision(cluster) {
                    if f.revision > highest.saturating_add(REVISION_SLACK) {
                        bail!(
                            "agent {member} declared revision {} for its snapshot, more than {REVISION_SLACK} above \
                             the highest revision cluster {cluster} was seen at ({highest}); not believed",
                            f.revision
                        );
                    }
                }
                let spec = EtcdBackupSpec {
                    cluster: cluster.to_string(),
                    createdat,
                    snapshot: String::new(),
                    size,
                    rawsize: summary.raw_size,
                    member: member.clone(),
                    memberid: format!("{:x}", f.member_id),
                    etcdclusterid: format!("{:x}", f.cluster_id),
                    etcdversion: f.etcd_version.chars().take(64).collect(),
                    revision: f.revision,
                    sha256,
                    rawsha256: hex::encode(summary.raw_sha256),
                    zstdlevel: summary.zstd_level,
                    startedat: summary.started_at,
                    finishedat: summary.finished_at,
                    encryption,
                    derivedfrom: None,
                };
                // The local store stopped such a stream as it came in; an S3 upload is refused here, before any
                // read-back (`--verify-upload full`) or drill would decompress it.
                // Twice the database size the cluster's members report (their median), never above the
                // store's limit: a member declaring 2 GiB for a 66 KB upload would make every drill write that.
                let reported = median_db_size(deps, cluster, fresh)
                    .map_or(u64::MAX, |m| (m.max(0) as u64).saturating_mul(2).max(MIN_SIZE_LIMIT));
                if summary.raw_size > reported {
                    bail!(
                        "agent {member} reports a {}-byte snapshot, more than twice the database size its cluster's \
                         members report ({} bytes at the median); not believed",
                        summary.raw_size,
                        reported / 2
                    );
                }
                let max = deps.store.max_snapshot_size();
                if summary.raw_size > max {
                    bail!(
                        "agent {member} reports a {}-byte snapshot, above the coordinator's limit of {max} bytes \
                         (--max-snapshot-size-mib)",
                        summary.raw_size
                    );
                }
                if summary.parts.len() as u32 > highest_part {
                    bail!("agent {member} reported {} parts but asked for {highest_part}", summary.parts.len());
                }
                return Ok((spec, summary.parts, send));
            }
        }
    }
}

/// The median of the DB sizes the cluster's connected agents report (`None` without a report), each member's
/// from its answer to the member check when it gave one (seconds old, where a report can be 10 s old: a
/// database that doubled in between is not a lie).
fn median_db_size(deps: &super::JobDeps, cluster: &str, fresh: &[(String, i64)]) -> Option<i64> {
    let live = deps.agents.live(cluster);
    let sizes = live.iter().filter_map(|a| {
        let answered = fresh.iter().find(|(m, _)| *m == a.member).map(|(_, s)| *s);
        answered.or(a.facts.as_ref().map(|f| f.db_size))
    });
    median(sizes.collect())
}

/// `order` with the members the check compared and found agreeing first (in their order): a member that could
/// not be compared (it skipped, or forgot its compactions on a restart) may hold diverged data nobody saw.
fn prefer_agreeing(order: Vec<String>, agreeing: &[String]) -> Vec<String> {
    let (mut first, rest): (Vec<String>, Vec<String>) = order.into_iter().partition(|m| agreeing.contains(m));
    first.extend(rest);
    first
}

/// The median of `values` (the lower middle one of an even count: a liar among two is not believed upward).
fn median(mut values: Vec<i64>) -> Option<i64> {
    values.sort_unstable();
    values.get(values.len().checked_sub(1)? / 2).copied()
}

/// Whether the store refused what the member sent (a strike against it), as opposed to failing to store it.
fn refused(e: &anyhow::Error) -> bool {
    e.chain().any(|c| matches!(c.downcast_ref::<StoreError>(), Some(StoreError::Mismatch(_))))
}

/// An agent sent something its job's store does not take: the agent's fault, named.
fn wrong_path(e: StoreError, member: &str) -> anyhow::Error {
    match e {
        StoreError::WrongPath { .. } => anyhow!("agent {member} sent something its job did not ask for: {e}"),
        e => e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_compared_and_agreeing_come_first_in_their_order() {
        let order = ["b", "c", "a"].map(String::from).to_vec();
        assert_eq!(prefer_agreeing(order.clone(), &["a".into(), "c".into()]), ["c", "a", "b"]);
        assert_eq!(prefer_agreeing(order.clone(), &[]), order, "nobody compared: unchanged");
    }

    #[test]
    fn the_median_db_size_ignores_one_liar() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![5]), Some(5));
        assert_eq!(median(vec![100, i64::MAX]), Some(100));
        assert_eq!(median(vec![i64::MAX, 90, 100]), Some(100));
    }

    /// The coordinator's side of the commit deadline: a store that never commits is given up on after the
    /// limit (in the daemon `COMMIT_TIMEOUT`, shorter than the agent's `COMMIT_REPLY_WAIT`), and what it had
    /// is discarded.
    #[tokio::test]
    async fn a_commit_that_hangs_is_given_up_within_the_limit() {
        use crate::store::{BackupStore, Failures};
        assert!(ferry_common::protocol::COMMIT_REPLY_WAIT > COMMIT_TIMEOUT);
        let dir = tempfile::tempdir().unwrap();
        let store =
            BackupStore::local(dir.path()).unwrap().with_failures(Failures { hang_commit: true, ..Default::default() });
        let cancel = CancellationToken::new();
        let upload = UploadSettings { part_size: 8 << 20, parts_in_flight: 4 };
        let mut pending = store.begin("c", Timestamp::now(), upload, &cancel).await.unwrap();
        pending.write(b"data", &cancel).await.unwrap();
        let started = Instant::now();
        let limit = Duration::from_millis(300);
        let now = Timestamp::now();
        let spec = EtcdBackupSpec {
            cluster: "c".into(),
            createdat: now,
            snapshot: String::new(),
            size: 4,
            rawsize: 4,
            member: "m".into(),
            memberid: String::new(),
            etcdclusterid: String::new(),
            etcdversion: String::new(),
            revision: 1,
            sha256: String::new(),
            rawsha256: String::new(),
            zstdlevel: 3,
            startedat: now,
            finishedat: now,
            encryption: None,
            derivedfrom: None,
        };
        let r = tokio::time::timeout(Duration::from_secs(5), commit_within(pending, spec, Vec::new(), &cancel, limit))
            .await;
        let err = r.expect("commit_within returns by itself").unwrap_err();
        assert!(format!("{err}").contains("did not commit within"), "{err}");
        assert!(started.elapsed() >= limit && started.elapsed() < Duration::from_secs(3));
        let left: Vec<_> = std::fs::read_dir(dir.path().join("c")).unwrap().collect();
        assert!(left.is_empty(), "nothing is left of the discarded backup: {left:?}");
    }
}
