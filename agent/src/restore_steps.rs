//! The agent's side of an orchestrated restore: the steps the coordinator's plan sends over the link
//! (`JobRequest::Restore`), done through the member's gate (`gate.rs`) and data dir.
//!
//! Every step is idempotent: the coordinator resends the step it was at after a failover, and a step already
//! done answers `Done` again without doing it twice. The data dir is touched only while the gate reports etcd
//! held and its bbolt file unlocked, and only for the restore id the hold belongs to. A restored or joining
//! member serves clients only on the agent's loopback restore URL until the coordinator verified the cluster
//! and sends `Release`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use etcd_client::{Client, GetOptions, MemberAddOptions};
use ferry_common::protocol::{
    write_frame, ClusterMember, JoinFlags, MemberLayout, RebuildPlan, RestoreStep, RestoredMember, StepDone, StepMsg,
};
use ferry_common::snapshot::{RestoreAs, RevisionBump};
use quinn::{RecvStream, SendStream};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::etcd::{EtcdMember, EtcdTls};
use crate::gate::{GateControl, GateState};
use crate::restore::{existing_entries, read_marker, write_marker, Restored};
use crate::scratch::ScratchChoice;

/// How long the gate may take to stop or start etcd (its stop timeout is 30 s, then SIGKILL).
const GATE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one etcd call on the restore URL may take.
const RPC_TIMEOUT: Duration = Duration::from_secs(10);
/// `HashKV` and the key count read the whole database: seconds per GiB on a slow disk. Below the
/// coordinator's step timeout (90 s), so a slow member is reported as such, not as a silent agent.
const SCAN_TIMEOUT: Duration = Duration::from_secs(60);
/// `Progress` at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);
/// What `Wipe` writes as the restored backup in its marker.
const WIPED: &str = "(wiped to join)";

/// Where this member's gate and data are, from the agent's flags.
#[derive(Debug, Clone)]
pub struct RestoreSetup {
    pub gate_dir: PathBuf,
    pub data_dir: PathBuf,
    /// The loopback client URL etcd serves on while a restore is not verified (`--restore-client-url`).
    pub restore_url: String,
    pub scratch: ScratchChoice,
}

/// Runs one step on a job stream and answers it; never fails the link.
pub async fn run(
    etcd: EtcdMember,
    setup: Option<RestoreSetup>,
    lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    step: RestoreStep,
    mut send: SendStream,
    mut recv: RecvStream,
    cancel: CancellationToken,
) {
    let result = match setup {
        None => Err(anyhow::anyhow!(
            "this agent runs without --gate-dir and --data-dir, so it cannot take part in a restore; run etcd \
             under `ferry-agent gate` and give the agent both flags (docs/DEPLOY.md)"
        )
        .into()),
        Some(setup) => {
            // One step at a time per member: a step resent after a failover waits for the first to end.
            let _one = lock.lock().await;
            tokio::select! {
                r = step_on(&setup, &etcd, step, &mut send, &mut recv) => r,
                () = cancel.cancelled() => Err(anyhow::anyhow!("the agent is shutting down").into()),
            }
        }
    };
    let msg = match result {
        Ok(done) => StepMsg::Done(done),
        Err(StepFailure { error, touched }) => {
            tracing::warn!(touched, "restore step failed: {error:#}");
            StepMsg::Failed { error: format!("{error:#}"), touched }
        }
    };
    if let Err(e) = write_frame(&mut send, &msg).await {
        tracing::warn!("failed to answer the restore step: {e:#}");
    }
    let _ = send.finish();
}

/// A failed step: why, and whether the data dir changed before it failed.
struct StepFailure {
    error: anyhow::Error,
    touched: bool,
}

impl From<anyhow::Error> for StepFailure {
    fn from(error: anyhow::Error) -> Self {
        Self { error, touched: false }
    }
}

fn touched(error: anyhow::Error) -> StepFailure {
    StepFailure { error, touched: true }
}

async fn step_on(
    setup: &RestoreSetup,
    etcd: &EtcdMember,
    step: RestoreStep,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<StepDone, StepFailure> {
    let gate = GateControl::new(&setup.gate_dir);
    Ok(match step {
        RestoreStep::Describe => describe(setup, &gate)?,
        RestoreStep::Hold { restore_id } => {
            gate.hold(&restore_id, GATE_TIMEOUT).await?;
            info!(%restore_id, "etcd is held");
            StepDone::Held
        }
        RestoreStep::Rebuild(plan) => rebuild(setup, &gate, &plan, send, recv).await?,
        RestoreStep::Wipe { restore_id } => wipe(setup, &gate, &restore_id)?,
        RestoreStep::Start { restore_id, join } => start(setup, &gate, &restore_id, join).await?,
        RestoreStep::Check { restore_id: _, revision } => {
            StepDone::Checked(check(&mut client(setup, &gate, etcd).await?, revision).await?)
        }
        RestoreStep::AddLearner { restore_id: _, name, peer_urls } => {
            add_learner(&mut client(setup, &gate, etcd).await?, &name, &peer_urls).await?
        }
        RestoreStep::Promote { restore_id: _, name: _, peer_urls } => {
            promote(&mut client(setup, &gate, etcd).await?, &peer_urls).await?
        }
        RestoreStep::MoveLeaderAway { restore_id: _ } => {
            move_leader_away(&mut client(setup, &gate, etcd).await?).await?
        }
        RestoreStep::RemoveMember { restore_id: _, peer_urls } => {
            remove_member(&mut client(setup, &gate, etcd).await?, &peer_urls).await?
        }
        RestoreStep::Members { restore_id: _ } => {
            StepDone::Members(members(&mut client(setup, &gate, etcd).await?).await?)
        }
        RestoreStep::Release { restore_id } => {
            gate.release(&restore_id, GATE_TIMEOUT).await?;
            info!(%restore_id, "etcd runs with its own flags again");
            StepDone::Released
        }
    })
}

fn describe(setup: &RestoreSetup, gate: &GateControl) -> Result<StepDone> {
    let status = gate.status()?.with_context(|| {
        format!(
            "no gate has written {}/status.json: run etcd under `ferry-agent gate --gate-dir {}` (docs/DEPLOY.md)",
            setup.gate_dir.display(),
            setup.gate_dir.display()
        )
    })?;
    if status.etcd.name.is_empty() || status.etcd.initial_advertise_peer_urls.is_empty() {
        bail!(
            "etcd's command line under the gate names no --name or no --initial-advertise-peer-urls; a restore \
             plans the members from them: add both to etcd's flags"
        );
    }
    let command = gate.command()?;
    Ok(StepDone::Described(MemberLayout {
        etcd_name: status.etcd.name,
        peer_urls: status.etcd.initial_advertise_peer_urls,
        data_dir: setup.data_dir.display().to_string(),
        free_bytes: free_bytes(&setup.data_dir)?,
        held_by: command.hold.then_some(command.owner),
    }))
}

/// Free bytes on the file system holding `dir` (or its nearest existing parent).
fn free_bytes(dir: &Path) -> Result<u64> {
    let mut at = dir;
    while !at.exists() {
        at = at.parent().unwrap_or(Path::new("/"));
    }
    let st = rustix::fs::statvfs(at).with_context(|| format!("statvfs {}", at.display()))?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// The data dir may be touched: the gate holds etcd for this restore and etcd's lock on it is gone.
fn ensure_held_for(setup: &RestoreSetup, gate: &GateControl, restore_id: &str) -> Result<()> {
    let command = gate.command()?;
    if !command.hold || command.owner != restore_id {
        bail!(
            "etcd is not held for restore {restore_id} (the gate's command: hold {}, owner {:?}); nothing touched",
            command.hold,
            command.owner
        );
    }
    match gate.status()? {
        Some(s) if s.state == GateState::Held && s.applied_generation == command.generation => {}
        other => bail!("the gate has not stopped etcd yet (it reports {:?}); nothing touched", other.map(|s| s.state)),
    }
    if crate::restore::held_by_live_etcd(&setup.data_dir)? {
        bail!(
            "an etcd still holds {} open although the gate reports it stopped; nothing touched",
            setup.data_dir.display()
        );
    }
    Ok(())
}

fn done_for(dir: &Path, restore_id: &str) -> Option<Restored> {
    read_marker(dir).filter(|m| m.restore_id.as_deref() == Some(restore_id))
}

async fn rebuild(
    setup: &RestoreSetup,
    gate: &GateControl,
    plan: &RebuildPlan,
    send: &mut SendStream,
    recv: &mut RecvStream,
) -> Result<StepDone, StepFailure> {
    let dir = &setup.data_dir;
    if let Some(m) = done_for(dir, &plan.restore_id) {
        if m.restored != WIPED {
            info!(restore_id = %plan.restore_id, "already rebuilt for this restore");
            return Ok(StepDone::Rebuilt);
        }
    }
    ensure_held_for(setup, gate, &plan.restore_id)?;
    ferry_common::snapshot::check_can_bump().map_err(anyhow::Error::from)?;
    ferry_common::config::create_private_dir(dir).with_context(|| format!("create --data-dir {}", dir.display()))?;
    crate::scratch::remove_stale(dir);
    let existing = existing_entries(dir)?;
    let stamp = unix_now();
    // Asked for only now: the coordinator sends the backup after this.
    write_frame(send, &StepMsg::Progress { bytes: 0 }).await.context("ask for the backup")?;
    let (tx, mut rx) = tokio::sync::watch::channel(0u64);
    let received = {
        let fetch = crate::restore::receive(recv, dir, setup.scratch, None, stamp, Some(&tx));
        tokio::pin!(fetch);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        loop {
            tokio::select! {
                r = &mut fetch => break r,
                _ = tick.tick() => {
                    if rx.has_changed().unwrap_or(false) {
                        let bytes = *rx.borrow_and_update();
                        write_frame(send, &StepMsg::Progress { bytes }).await.context("send progress")?;
                    }
                }
            }
        }
    };
    let (backup, _highest, scratch) = received?;
    // Room for the restored database beside what is there (the old data is renamed, not freed).
    let free = free_bytes(dir)?;
    if free < backup.rawsize.saturating_add(backup.rawsize / 10) {
        return Err(anyhow::anyhow!(
            "{} has {free} bytes free, too few for the restored database ({} bytes and 10 % room); free space \
             or give etcd a larger disk, then restore again. Nothing was touched",
            dir.display(),
            backup.rawsize
        )
        .into());
    }
    let member = RestoreAs {
        name: plan.name.clone(),
        initial_cluster: plan.initial_cluster.clone(),
        initial_cluster_token: plan.initial_cluster_token.clone(),
        initial_advertise_peer_urls: plan.initial_advertise_peer_urls.clone(),
    };
    let marker = Restored {
        backup: backup.snapshot.clone(),
        from_cluster: Some(backup.cluster.clone()),
        initial_cluster_token: plan.initial_cluster_token.clone(),
        member: plan.name.clone(),
        restored: backup.snapshot.clone(),
        at: stamp,
        restore_id: Some(plan.restore_id.clone()),
    };
    let bump = Some(RevisionBump { by: plan.bump_by });
    let path = scratch.path().to_path_buf();
    let d = dir.clone();
    // Staging (etcd's tool into a hidden dir) leaves the data dir as it was; only the swap after it changes it.
    let (staging, marker) = tokio::task::spawn_blocking(move || {
        let _keep = scratch;
        crate::restore::stage(&d, &path, &member, bump, marker.at).map(|staging| (staging, marker))
    })
    .await
    .context("restore task")??;
    crate::restore::commit(dir, &existing, &staging, &marker).map_err(touched)?;
    Ok(StepDone::Rebuilt)
}

fn wipe(setup: &RestoreSetup, gate: &GateControl, restore_id: &str) -> Result<StepDone, StepFailure> {
    let dir = &setup.data_dir;
    if done_for(dir, restore_id).is_some() {
        return Ok(StepDone::Wiped);
    }
    ensure_held_for(setup, gate, restore_id)?;
    ferry_common::config::create_private_dir(dir).with_context(|| format!("create --data-dir {}", dir.display()))?;
    let stamp = unix_now();
    let existing = existing_entries(dir)?;
    crate::restore::move_aside(dir, &existing, stamp).map_err(touched)?;
    write_marker(
        dir,
        &Restored {
            backup: String::new(),
            from_cluster: None,
            initial_cluster_token: String::new(),
            member: String::new(),
            restored: WIPED.into(),
            at: stamp,
            restore_id: Some(restore_id.into()),
        },
    )
    .map_err(touched)?;
    info!(%restore_id, "data dir moved aside; the member joins as a new one");
    Ok(StepDone::Wiped)
}

async fn start(
    setup: &RestoreSetup,
    gate: &GateControl,
    restore_id: &str,
    join: Option<JoinFlags>,
) -> Result<StepDone> {
    if done_for(&setup.data_dir, restore_id).is_none() {
        bail!("the data dir was not rebuilt or wiped for restore {restore_id}; refusing to start etcd on other data");
    }
    let url = setup.restore_url.clone();
    let mut overrides =
        vec![("--listen-client-urls".to_string(), url.clone()), ("--advertise-client-urls".to_string(), url)];
    if let Some(j) = join {
        overrides.push(("--initial-cluster".into(), j.initial_cluster));
        overrides.push(("--initial-cluster-token".into(), j.initial_cluster_token));
        overrides.push(("--initial-cluster-state".into(), "existing".into()));
    }
    gate.start(restore_id, overrides, GATE_TIMEOUT).await?;
    info!(%restore_id, url = %setup.restore_url, "etcd started on its restored data; clients only on the restore URL");
    Ok(StepDone::Started)
}

/// A client of this member: on the restore URL while the gate runs it with overrides (a restored or joining
/// member), else on the agent's own etcd endpoint (a serving member helping a replacement).
async fn client(setup: &RestoreSetup, gate: &GateControl, etcd: &EtcdMember) -> Result<Client> {
    if gate.command()?.overrides.is_empty() {
        return etcd.separate_client().await;
    }
    let member = EtcdMember::connect(&setup.restore_url, &EtcdTls::default()).await?;
    member.separate_client().await
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    timed_within(RPC_TIMEOUT, what, f).await
}

async fn timed_within<T>(
    limit: Duration,
    what: &str,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    tokio::time::timeout(limit, f)
        .await
        .with_context(|| format!("etcd {what} timed out"))?
        .with_context(|| format!("etcd {what}"))
}

async fn check(c: &mut Client, revision: i64) -> Result<RestoredMember> {
    let st = timed("status", c.status()).await?;
    let header = st.header().context("etcd status carried no header")?;
    let mut out = RestoredMember {
        member_id: header.member_id(),
        cluster_id: header.cluster_id(),
        revision: header.revision(),
        has_leader: st.leader() != 0,
        learner: st.is_learner(),
        leader: st.leader() != 0 && st.leader() == header.member_id(),
        hash: None,
        keys: None,
    };
    if revision > 0 {
        // A restored member's revision is its compaction mark: etcd 3.4 refuses HashKV at exactly the compacted
        // revision, but hashes its current one (asked as 0), which is the same revision when nothing wrote.
        let asked = if revision == out.revision { 0 } else { revision };
        let h = timed_within(SCAN_TIMEOUT, "HashKV", c.hash_kv(asked)).await?;
        let hashed_at = h.header().map_or(0, |h| h.revision());
        if hashed_at != revision {
            bail!("etcd hashed revision {hashed_at}, not {revision}: something wrote to the restored member");
        }
        out.hash = Some(h.hash());
        let opts = GetOptions::new().with_all_keys().with_count_only().with_serializable();
        let opts = if asked == 0 { opts } else { opts.with_revision(revision) };
        let r = timed_within(SCAN_TIMEOUT, "count keys", c.get("", Some(opts))).await?;
        out.keys = Some(u64::try_from(r.count()).unwrap_or(0));
    }
    Ok(out)
}

fn same_urls(a: &[String], b: &str) -> bool {
    let mut a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut b: Vec<&str> = b.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    a.sort_unstable();
    b.sort_unstable();
    a == b
}

async fn add_learner(c: &mut Client, name: &str, peer_urls: &str) -> Result<StepDone> {
    let list = timed("member list", c.member_list()).await?;
    if list.members().iter().any(|m| same_urls(m.peer_urls(), peer_urls)) {
        return Ok(StepDone::MembershipChanged);
    }
    let urls: Vec<String> = peer_urls.split(',').map(|s| s.trim().to_string()).collect();
    timed("member add", c.member_add(urls, Some(MemberAddOptions::new().with_is_learner()))).await?;
    info!(%name, %peer_urls, "added as a learner");
    Ok(StepDone::MembershipChanged)
}

async fn promote(c: &mut Client, peer_urls: &str) -> Result<StepDone> {
    let list = timed("member list", c.member_list()).await?;
    let Some(m) = list.members().iter().find(|m| same_urls(m.peer_urls(), peer_urls)) else {
        bail!("no member with peer URLs {peer_urls} in the restored cluster");
    };
    if m.is_learner() {
        timed("member promote", c.member_promote(m.id())).await?;
        info!(%peer_urls, "learner promoted");
    }
    Ok(StepDone::MembershipChanged)
}

async fn move_leader_away(c: &mut Client) -> Result<StepDone> {
    let st = timed("status", c.status()).await?;
    let me = st.header().context("etcd status carried no header")?.member_id();
    if st.leader() != me {
        return Ok(StepDone::MembershipChanged);
    }
    let list = timed("member list", c.member_list()).await?;
    let Some(to) = list.members().iter().find(|m| m.id() != me && !m.is_learner()) else {
        bail!("this member leads and no other voting member can take over");
    };
    timed("move leader", c.move_leader(to.id())).await?;
    info!(to = %to.name(), "leadership moved away before this member is replaced");
    Ok(StepDone::MembershipChanged)
}

async fn remove_member(c: &mut Client, peer_urls: &str) -> Result<StepDone> {
    let list = timed("member list", c.member_list()).await?;
    if let Some(m) = list.members().iter().find(|m| same_urls(m.peer_urls(), peer_urls)) {
        timed("member remove", c.member_remove(m.id())).await?;
        info!(%peer_urls, "member removed");
    }
    Ok(StepDone::MembershipChanged)
}

async fn members(c: &mut Client) -> Result<Vec<ClusterMember>> {
    let list = timed("member list", c.member_list()).await?;
    Ok(list
        .members()
        .iter()
        .map(|m| ClusterMember {
            id: m.id(),
            name: m.name().to_string(),
            peer_urls: m.peer_urls().to_vec(),
            learner: m.is_learner(),
        })
        .collect())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}
