//! Orchestrated restores: an `EtcdRestores` resource restores a whole cluster through the members' gates.
//!
//! The leader runs one task per cluster with an unfinished restore. The task is the only writer of the
//! cluster's `EtcdRestoreStatuses`, and everything it does follows that status: the plan (fixed once, in one
//! transaction, before anything is touched), then each member's last step done. A new leader (or this one
//! after a restart) reads the status and carries on from there; agents answer a step already done as done, so
//! no step happens twice. The order guards against two clusters serving at once: every planned member is
//! held before any data dir changes, restored members serve clients only on a loopback URL until the whole
//! cluster is verified, and only then are they released to their own flags.

pub mod plan;
mod steps;

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_common::protocol::{JoinFlags, MemberLayout, RebuildPlan, RestoreStep, RestoredMember, StepDone};
use ferry_common::resources::{
    restore_mode, restore_phase, ClusterSpec, EtcdRestoreSpec, EtcdRestoreStatusSpec, MemberRestoreStatus, Resource,
    ResourceType, RestorePlanned, RestoreVerified, Spec, Timestamp,
};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, info_span, warn, Instrument};

use crate::agents::{Agents, LiveAgent};
use crate::api::Api;
use crate::backup::{Jobs, Trigger};
use crate::metrics::Metrics;
use crate::state::{StateError, StateStore};
use crate::store::Manifest;
use steps::StepError;

/// How often the owner looks for restores to run.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// How long a restore waits for a planned member's agent to come back before it fails naming it.
const MEMBER_WAIT: Duration = Duration::from_secs(300);
/// How often a failed step is tried before the restore fails.
const STEP_ATTEMPTS: u32 = 3;
/// A step other than the rebuild: the gate stops etcd within 30 s (then kills it).
const STEP_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the restored cluster may take to become healthy and agree.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a learner may take to catch up before it is promoted.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(300);
/// How long etcd may refuse a membership change (it does for a few seconds after a leader election).
const MEMBERSHIP_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a wait for etcd (a member healthy, the cluster verified, a membership change accepted) asks
/// again: each ask is one cheap status call on the member's node, and every poll interval lost is restore time.
const POLL: Duration = Duration::from_millis(250);
/// How often a restore that has not ended is looked for: its resource's generation is checked every
/// [`SCAN_TICK`] (a new `ferryctl restore` starts within it), the whole list read every [`SCAN_EVERY`].
const SCAN_TICK: Duration = Duration::from_millis(200);

/// The steps a member goes through, as `MemberRestoreStatus::step` records them.
mod step {
    pub(super) const HELD: &str = "held";
    pub(super) const REMOVED: &str = "removed";
    pub(super) const REBUILT: &str = "rebuilt";
    pub(super) const WIPED: &str = "wiped";
    pub(super) const ADDED: &str = "added";
    pub(super) const STARTED: &str = "started";
    pub(super) const JOINED: &str = "joined";
    pub(super) const RELEASED: &str = "released";
    /// In order: a member at a later step has done every earlier one.
    pub(super) const ORDER: [&str; 8] = [HELD, REMOVED, WIPED, REBUILT, ADDED, STARTED, JOINED, RELEASED];
}

fn step_rank(s: &str) -> usize {
    step::ORDER.iter().position(|x| *x == s).map_or(0, |i| i + 1)
}

/// What the owner works with.
pub struct RestoreDeps {
    pub state: Arc<dyn StateStore>,
    pub agents: Agents,
    pub api: Arc<Api>,
    pub jobs: Jobs,
    pub metrics: Arc<Metrics>,
}

/// The id of the restore an `EtcdRestores` resource asks for: its cluster and creation time, so that a new
/// resource (after the old one was deleted) is a new restore and the same one read again is not.
pub fn restore_id(r: &Resource) -> String {
    let t = r.metadata.created.unwrap_or_default();
    format!("{}-{}{:03}", r.metadata.id, t.seconds, t.nanos / 1_000_000)
}

/// Whether `cluster` has a restore that has not ended (one asked for and not yet planned counts).
pub fn active(state: &dyn StateStore, cluster: &str) -> Result<bool, StateError> {
    let Some(r) = state.get(ResourceType::EtcdRestore, cluster)? else {
        return Ok(false);
    };
    Ok(match state.get(ResourceType::EtcdRestoreStatus, cluster)? {
        Some(Resource { spec: Spec::EtcdRestoreStatus(s), .. }) if s.restoreid == restore_id(&r) => {
            !restore_phase::is_final(&s.phase)
        }
        _ => true,
    })
}

/// The cluster's restore status, if any.
pub fn status_of(state: &dyn StateStore, cluster: &str) -> Result<Option<EtcdRestoreStatusSpec>, StateError> {
    Ok(match state.get(ResourceType::EtcdRestoreStatus, cluster)? {
        Some(Resource { spec: Spec::EtcdRestoreStatus(s), .. }) => Some(s),
        _ => None,
    })
}

/// Runs until `cancel`: starts a task for every cluster whose restore has not ended.
pub async fn run(deps: RestoreDeps, cancel: CancellationToken) {
    let deps = Arc::new(deps);
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut last_full: Option<std::time::Instant> = None;
    let tasks = TaskTracker::new();
    let mut seen: Option<u64> = None;
    loop {
        // Between full scans only a new or changed restore is looked for, at once.
        let generation = deps.state.generation(ResourceType::EtcdRestore);
        // A store that cannot tell (the state etcd) is read at the full scans only, as before.
        let changed = generation.is_some() && generation != seen;
        seen = generation;
        let full = last_full.is_none_or(|t| t.elapsed() >= SCAN_EVERY);
        if !changed && !full {
            tokio::select! {
                () = tokio::time::sleep(SCAN_TICK) => continue,
                () = cancel.cancelled() => break,
            }
        }
        if full {
            last_full = Some(std::time::Instant::now());
            if let Err(e) = bootstrap(&deps) {
                warn!("failed to start a new cluster's restore: {e}");
            }
        }
        match deps.state.list(ResourceType::EtcdRestore) {
            Ok(list) => {
                for r in list {
                    let cluster = r.metadata.id.clone();
                    if !matches!(active(deps.state.as_ref(), &cluster), Ok(true)) {
                        continue;
                    }
                    if !crate::lock(&running).insert(cluster.clone()) {
                        continue;
                    }
                    let (deps, running, cancel) = (deps.clone(), running.clone(), cancel.clone());
                    let span = info_span!("restore", %cluster, restore_id = %restore_id(&r));
                    tasks.spawn(
                        async move {
                            let mut d = Driver::new(deps, r, cancel);
                            d.run().await;
                            crate::lock(&running).remove(&cluster);
                        }
                        .instrument(span),
                    );
                }
            }
            Err(e) => warn!("failed to list restores: {e}"),
        }
        tokio::select! {
            () = tokio::time::sleep(SCAN_TICK) => {}
            () = cancel.cancelled() => break,
        }
    }
    tasks.close();
    tasks.wait().await;
}

/// New clusters whose template says `restoreFrom`: once the expected members' agents are connected and none
/// reaches a running etcd (their gates hold it from the first start), their restore is created — once: a
/// cluster that ever had a restore status is never bootstrapped again.
fn bootstrap(deps: &RestoreDeps) -> Result<(), StateError> {
    for r in deps.state.list(ResourceType::Cluster)? {
        let Spec::Cluster(ClusterSpec { restorefrom: Some(from), .. }) = &r.spec else { continue };
        let cluster = r.metadata.id.as_str();
        if deps.state.get(ResourceType::EtcdRestoreStatus, cluster)?.is_some()
            || deps.state.get(ResourceType::EtcdRestore, cluster)?.is_some()
        {
            continue;
        }
        let live = deps.agents.live(cluster);
        if live.len() < from.members as usize {
            continue;
        }
        if live.iter().any(|a| a.reaches_etcd()) {
            // An etcd already serves: this is no new cluster waiting for its data. Never overwritten.
            continue;
        }
        let spec = EtcdRestoreSpec {
            backup: from.backup.clone(),
            mode: from.mode.clone(),
            confirm: cluster.to_string(),
            fromcluster: from.cluster.clone(),
            ..Default::default()
        };
        let mut created = false;
        deps.state.transact(&mut |tx| {
            created = false;
            if tx.get(ResourceType::EtcdRestore, cluster)?.is_none()
                && tx.get(ResourceType::EtcdRestoreStatus, cluster)?.is_none()
            {
                tx.put(Resource::new(cluster, Spec::EtcdRestore(spec.clone())))?;
                created = true;
            }
            Ok(())
        })?;
        if created {
            info!(%cluster, from = %from.cluster, backup = %from.backup, "a new cluster's members are here: restoring it from its template's restoreFrom");
        }
    }
    Ok(())
}

/// Why a restore stopped before its end.
enum Stop {
    /// Leadership lost or shutting down: the next leader carries on.
    Cancelled,
    /// The restore was deleted (allowed only before it held anything, or after it ended).
    Superseded,
    /// The restore failed; the message says why and what state the members are in.
    Failed(String),
}

impl From<StateError> for Stop {
    fn from(e: StateError) -> Self {
        // A state store that cannot be written (or a lost lease) stops this leader's work; a new leader
        // goes on from the last status written.
        warn!("restore paused: the state store failed: {e}");
        Stop::Cancelled
    }
}

struct Driver {
    deps: Arc<RestoreDeps>,
    cluster: String,
    spec: EtcdRestoreSpec,
    id: String,
    st: EtcdRestoreStatusSpec,
    cancel: CancellationToken,
    /// A step failed after changing a data dir (in memory: a new leader goes by the steps recorded, and keeps
    /// members held whenever one is past `held`).
    touched: bool,
}

impl Driver {
    fn new(deps: Arc<RestoreDeps>, r: Resource, cancel: CancellationToken) -> Self {
        let id = restore_id(&r);
        let spec = match r.spec {
            Spec::EtcdRestore(s) => s,
            _ => EtcdRestoreSpec::default(),
        };
        Self { deps, cluster: r.metadata.id, spec, id, st: EtcdRestoreStatusSpec::default(), cancel, touched: false }
    }

    async fn run(&mut self) {
        match status_of(self.deps.state.as_ref(), &self.cluster) {
            Ok(Some(s)) if s.restoreid == self.id => self.st = s,
            Ok(_) => {
                self.st = EtcdRestoreStatusSpec {
                    restoreid: self.id.clone(),
                    phase: restore_phase::PENDING.into(),
                    startedat: Some(Timestamp::now()),
                    ..Default::default()
                };
                if self.save().is_err() {
                    return;
                }
                info!(spec = ?self.spec, "restore requested");
            }
            Err(e) => return warn!("failed to read the restore status: {e}"),
        }
        let m = self.deps.metrics.clone();
        let l = crate::metrics::Metrics::cluster(&self.cluster);
        m.restore_in_progress.get_or_create(&l).set(1);
        m.restore_failed.get_or_create(&l).set(0);
        if let Some(t) = self.st.startedat {
            m.restore_started.get_or_create(&l).set(t.seconds as f64);
        }
        let result = self.steps().await;
        m.restore_in_progress.get_or_create(&l).set(0);
        match result {
            Ok(()) => {}
            Err(Stop::Cancelled) => info!("restore paused; the coordinator that leads next carries it on"),
            Err(Stop::Superseded) => info!("restore deleted before it held any member; it stops here"),
            Err(Stop::Failed(why)) => {
                warn!("restore failed: {why}");
                m.restore_failed.get_or_create(&l).set(1);
                self.st.phase = restore_phase::FAILED.into();
                self.st.error = why;
                self.st.waiting.clear();
                self.st.finishedat = Some(Timestamp::now());
                let _ = self.save();
            }
        }
    }

    /// Writes the status, in one transaction with the check that the restore is still the one asked for: a
    /// restore deleted while pending (to be applied again, e.g. with a member declared lost) stops here and
    /// never overwrites its successor's status.
    fn save(&mut self) -> Result<(), Stop> {
        self.deps.state.still_leading()?;
        let (cluster, id) = (self.cluster.clone(), self.id.clone());
        let r = Resource::new(&self.cluster, Spec::EtcdRestoreStatus(self.st.clone()));
        let mut current = true;
        self.deps.state.transact(&mut |tx| {
            current = tx.get(ResourceType::EtcdRestore, &cluster)?.is_some_and(|r| restore_id(&r) == id);
            if current {
                tx.put(r.clone())?;
            }
            Ok(())
        })?;
        if current {
            Ok(())
        } else {
            Err(Stop::Superseded)
        }
    }

    /// Whether the restore was deleted (or replaced) since it started.
    fn superseded(&self) -> bool {
        !matches!(
            self.deps.state.get(ResourceType::EtcdRestore, &self.cluster),
            Ok(Some(r)) if restore_id(&r) == self.id
        )
    }

    /// The restore is over: `done`, when.
    fn finish(&mut self) -> Result<(), Stop> {
        self.st.phase = restore_phase::DONE.into();
        self.st.waiting.clear();
        self.st.finishedat = Some(Timestamp::now());
        self.save()
    }

    fn set_phase(&mut self, phase: &str) -> Result<(), Stop> {
        if self.st.phase != phase {
            info!(phase, "restore phase");
            self.st.phase = phase.into();
            self.st.waiting.clear();
            self.save()?;
        }
        Ok(())
    }

    fn plan(&self) -> Result<&RestorePlanned, Stop> {
        self.st.plan.as_ref().ok_or_else(|| Stop::Failed("the restore has no plan".into()))
    }

    async fn steps(&mut self) -> Result<(), Stop> {
        if self.st.phase == restore_phase::PENDING || self.st.plan.is_none() {
            self.make_plan().await?;
        }
        let mode = self.plan()?.mode.clone();
        if mode == restore_mode::REPLACE_MEMBER {
            self.replace_member().await?;
            self.finish()?;
            info!("member replaced: removed, wiped, added back, caught up, promoted and serving");
            return Ok(());
        }
        if step_rank_all(&self.st) < step_rank(step::HELD) {
            self.set_phase(restore_phase::HOLDING)?;
            self.hold_all().await?;
        }
        if mode == restore_mode::ALL_MEMBERS {
            self.set_phase(restore_phase::RESTORING)?;
            self.rebuild_all().await?;
            self.start_all().await?;
        } else {
            self.set_phase(restore_phase::RESTORING)?;
            self.seed().await?;
            self.set_phase(restore_phase::JOINING)?;
            self.join_others().await?;
        }
        self.set_phase(restore_phase::VERIFYING)?;
        let verified = self.verify().await?;
        self.st.verified = Some(verified);
        self.save()?;
        self.release_all().await?;
        self.finish()?;
        let took = self.st.finishedat.unwrap_or_default().seconds - self.st.startedat.unwrap_or_default().seconds;
        let l = crate::metrics::Metrics::cluster(&self.cluster);
        self.deps.metrics.restore_duration.get_or_create(&l).set(took as f64);
        info!(seconds = took, "restore done: every member verified and serving");
        // A backup of the restored cluster at once (the old backups are of the old cluster's history), as soon
        // as an agent reports its released member reachable (agents report every few seconds).
        let released = self.st.finishedat.unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Every planned member's agent must have reported its restored member: with older facts (the old
        // cluster's member ids) the backup's member check would take the restored snapshot for a foreign one.
        let planned = self.planned_members()?;
        let reported = |agents: &Agents| {
            let live = agents.live(&self.cluster);
            planned.iter().all(|m| live.iter().any(|a| a.member == *m && a.last_heard > released && a.reaches_etcd()))
        };
        while !reported(&self.deps.agents) && tokio::time::Instant::now() < deadline {
            self.pause(Duration::from_millis(500)).await?;
        }
        if let Err(e) = self.deps.jobs.start(&self.cluster, Trigger::Manual) {
            warn!("failed to start the backup after the restore: {e}");
        }
        Ok(())
    }

    /// Waits for a planned member's agent, failing after [`MEMBER_WAIT`].
    async fn agent(&mut self, member: &str) -> Result<LiveAgent, Stop> {
        let deadline = tokio::time::Instant::now() + MEMBER_WAIT;
        loop {
            if let Some(a) = self.deps.agents.live(&self.cluster).into_iter().find(|a| a.member == member) {
                return Ok(a);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "member {member}'s agent did not come back within {}s; {}",
                    MEMBER_WAIT.as_secs(),
                    self.left_as()
                )));
            }
            let waiting = format!("member {member}'s agent is not connected");
            if self.st.waiting != waiting {
                self.st.waiting = waiting;
                self.save()?;
            }
            self.pause(Duration::from_secs(1)).await?;
        }
    }

    async fn pause(&self, d: Duration) -> Result<(), Stop> {
        tokio::select! {
            () = tokio::time::sleep(d) => {}
            () = self.cancel.cancelled() => return Err(Stop::Cancelled),
        }
        if self.superseded() {
            return Err(Stop::Superseded);
        }
        Ok(())
    }

    /// Whether any member's data dir changed (a step past `held`, or a failed step that says so).
    fn any_touched(&self) -> bool {
        self.touched || self.st.members.iter().any(|m| step_rank(&m.step) > step_rank(step::HELD))
    }

    /// In words, where a failure leaves the members.
    fn left_as(&self) -> String {
        if self.any_touched() {
            "the members stay held (etcd stopped, or serving only on the restore URL); apply a new restore \
             (`ferryctl restore`) to try again"
                .into()
        } else {
            "no data dir was touched".into()
        }
    }

    /// One step on one member, retried while the agent is away or answers a failure (up to a few times).
    async fn step(&mut self, member: &str, make: &(dyn Fn() -> RestoreStep + Sync)) -> Result<StepDone, Stop> {
        let mut failures = 0;
        loop {
            let agent = self.agent(member).await?;
            self.deps.state.still_leading()?;
            match steps::ask(&agent, make(), STEP_TIMEOUT).await {
                Ok(d) => return Ok(d),
                Err(StepError::Lost(e)) => {
                    self.st.waiting = format!("member {member}: {e}");
                    self.save()?;
                }
                Err(StepError::Failed { error: e, .. }) => {
                    failures += 1;
                    if failures >= STEP_ATTEMPTS {
                        return Err(Stop::Failed(format!("member {member}: {e}")));
                    }
                    self.st.waiting = format!("member {member} (attempt {failures} failed): {e}");
                    self.save()?;
                }
            }
            self.pause(Duration::from_secs(2)).await?;
        }
    }

    fn member_status(&mut self, member: &str) -> &mut MemberRestoreStatus {
        if let Some(i) = self.st.members.iter().position(|m| m.member == member) {
            return &mut self.st.members[i];
        }
        self.st.members.push(MemberRestoreStatus { member: member.into(), ..Default::default() });
        let last = self.st.members.len() - 1;
        &mut self.st.members[last]
    }

    fn at_least(&self, member: &str, s: &str) -> bool {
        self.st.members.iter().any(|m| m.member == member && step_rank(&m.step) >= step_rank(s))
    }

    fn record(&mut self, member: &str, s: &str) -> Result<(), Stop> {
        let m = self.member_status(member);
        m.step = s.into();
        m.error.clear();
        self.st.waiting.clear();
        self.save()?;
        info!(%member, step = s, "member step done");
        Ok(())
    }

    fn planned_members(&self) -> Result<Vec<String>, Stop> {
        Ok(self.plan()?.members.iter().map(|m| m.member.clone()).collect())
    }

    async fn make_plan(&mut self) -> Result<(), Stop> {
        let spec = self.spec.clone();
        plan::mode(&spec).map_err(Stop::Failed)?;
        let known = crate::api::cluster_members(self.deps.state.as_ref(), &self.cluster)?;
        if plan::mode(&spec).map_err(Stop::Failed)? == restore_mode::REPLACE_MEMBER {
            return self.plan_replacement(known).await;
        }
        let planned: Vec<String> = known.into_iter().filter(|m| !spec.lostmembers.contains(m)).collect();
        let manifest =
            self.deps.api.resolve_restore(&self.cluster, &spec).await.map_err(|e| Stop::Failed(e.to_string()))?;
        let mut layouts = BTreeMap::new();
        for member in &planned {
            let layout = self.describe(member).await?;
            layouts.insert(member.clone(), layout);
        }
        // A new cluster restored from another's backup: both clusters' histories count for the bump.
        let from = if spec.fromcluster.is_empty() { self.cluster.clone() } else { spec.fromcluster.clone() };
        let mut highest = 0;
        for c in [&self.cluster, &from] {
            highest = highest.max(self.deps.agents.highest_revision(c).map_or(0, |(r, _)| r));
            highest = highest.max(crate::status::highest_recorded(self.deps.state.as_ref(), c)?);
        }
        let keys = crate::status::drilled_keys(self.deps.state.as_ref(), &from, &manifest.id)?;
        let p = plan::make(&plan::PlanInput {
            restore_id: &self.id,
            spec: &spec,
            layouts: &layouts,
            backup_id: &manifest.id,
            backup_revision: manifest.backup.revision,
            backup_rawsize: manifest.backup.rawsize,
            backup_keys: keys,
            highest_revision: highest,
            now: Timestamp::now(),
        })
        .map_err(Stop::Failed)?;
        let mut p = p;
        p.backupcluster = spec.fromcluster.clone();
        self.store_plan(p)
    }

    /// The member as its gate describes it.
    async fn describe(&mut self, member: &str) -> Result<MemberLayout, Stop> {
        match self.step(member, &|| RestoreStep::Describe).await? {
            StepDone::Described(l) => Ok(l),
            other => Err(Stop::Failed(format!("member {member} answered {other:?} to Describe"))),
        }
    }

    /// Stores `p` unless a plan is there already (then that one is kept), in one transaction.
    fn store_plan(&mut self, p: RestorePlanned) -> Result<(), Stop> {
        // Fixed once: written only if no plan is there yet (a second leader racing this one keeps the first).
        let (cluster, id) = (self.cluster.clone(), self.id.clone());
        let mut stored = None;
        self.deps.state.transact(&mut |tx| {
            stored = None;
            // Deleted meanwhile (allowed while pending): no plan, nothing will be held.
            if tx.get(ResourceType::EtcdRestore, &cluster)?.is_none_or(|r| restore_id(&r) != id) {
                return Ok(());
            }
            let mut st = match tx.get(ResourceType::EtcdRestoreStatus, &cluster)? {
                Some(Resource { spec: Spec::EtcdRestoreStatus(s), .. }) if s.restoreid == id => s,
                _ => EtcdRestoreStatusSpec {
                    restoreid: id.clone(),
                    startedat: Some(Timestamp::now()),
                    ..Default::default()
                },
            };
            if st.plan.is_none() {
                st.plan = Some(p.clone());
                st.phase = restore_phase::PLANNED.into();
                st.waiting.clear();
                st.members = p
                    .members
                    .iter()
                    .map(|m| MemberRestoreStatus { member: m.member.clone(), ..Default::default() })
                    .collect();
                tx.put(Resource::new(&cluster, Spec::EtcdRestoreStatus(st.clone())))?;
            }
            stored = Some(st);
            Ok(())
        })?;
        match stored {
            Some(st) => self.st = st,
            None => return Err(Stop::Superseded),
        }
        let p = self.plan()?;
        info!(
            backup = %p.backup,
            mode = %p.mode,
            members = ?p.members.iter().map(|m| &m.member).collect::<Vec<_>>(),
            bump = p.bumpby,
            highest_revision = p.highestrevision,
            "restore planned"
        );
        Ok(())
    }

    /// `replace-member`: the target as its gate describes it, and a healthy other member to help.
    async fn plan_replacement(&mut self, known: Vec<String>) -> Result<(), Stop> {
        let target = self.spec.member.clone();
        // Asked now, not taken from the last reports (up to 10 s old): a member that just died must not count.
        let others: Vec<String> =
            self.deps.agents.live(&self.cluster).into_iter().map(|a| a.member).filter(|m| *m != target).collect();
        let mut healthy = Vec::new();
        for m in others {
            if matches!(self.check(&m, 0).await, Ok(c) if c.has_leader && !c.learner) {
                healthy.push(m);
            }
        }
        if healthy.len() * 2 <= known.len() {
            return Err(Stop::Failed(format!(
                "cluster {} would lose quorum without {target}: {} of its {} members are healthy besides it; \
                 restore the cluster instead (`ferryctl restore`). Nothing was touched",
                self.cluster,
                healthy.len(),
                known.len()
            )));
        }
        let mut helpers = healthy;
        helpers.sort();
        let helper = helpers[0].clone();
        let layout = self.describe(&target).await?;
        let layouts = BTreeMap::from([(target.clone(), layout)]);
        let mut p = plan::make(&plan::PlanInput {
            restore_id: &self.id,
            spec: &self.spec,
            layouts: &layouts,
            backup_id: "",
            backup_revision: 0,
            backup_rawsize: 0,
            backup_keys: 0,
            highest_revision: 0,
            now: Timestamp::now(),
        })
        .map_err(Stop::Failed)?;
        p.helper = helper;
        self.store_plan(p)
    }

    /// `replace-member`: leadership moved away, the member held, removed from the cluster (by the helper),
    /// its data dir moved aside, added back as a learner, started to join, promoted once caught up, checked,
    /// and released to its own flags.
    async fn replace_member(&mut self) -> Result<(), Stop> {
        let p = self.plan()?.clone();
        let (target, helper) = (p.members[0].clone(), p.helper.clone());
        let member = target.member.clone();
        let id = self.id.clone();
        self.set_phase(restore_phase::HOLDING)?;
        if !self.at_least(&member, step::HELD) {
            let i = id.clone();
            self.step(&member, &move || RestoreStep::MoveLeaderAway { restore_id: i.clone() }).await?;
            let i = id.clone();
            self.step(&member, &move || RestoreStep::Hold { restore_id: i.clone() }).await?;
            self.record(&member, step::HELD)?;
        }
        self.set_phase(restore_phase::JOINING)?;
        if !self.at_least(&member, step::REMOVED) {
            let remove = RestoreStep::RemoveMember { restore_id: id.clone(), peer_urls: target.peerurls.clone() };
            self.retry_on(&helper, &member, remove, "being removed", MEMBERSHIP_TIMEOUT).await?;
            self.record(&member, step::REMOVED)?;
        }
        if !self.at_least(&member, step::WIPED) {
            let i = id.clone();
            self.step(&member, &move || RestoreStep::Wipe { restore_id: i.clone() }).await?;
            self.record(&member, step::WIPED)?;
        }
        if !self.at_least(&member, step::ADDED) {
            let add = RestoreStep::AddLearner {
                restore_id: id.clone(),
                name: target.etcdname.clone(),
                peer_urls: target.peerurls.clone(),
            };
            self.retry_on(&helper, &member, add, "being added as a learner", MEMBERSHIP_TIMEOUT).await?;
            self.record(&member, step::ADDED)?;
        }
        if !self.at_least(&member, step::STARTED) {
            let i = id.clone();
            let members = match self.step(&helper, &move || RestoreStep::Members { restore_id: i.clone() }).await? {
                StepDone::Members(m) => m,
                other => return Err(Stop::Failed(format!("member {helper} answered {other:?} to Members"))),
            };
            let wanted: Vec<&str> = target.peerurls.split(',').map(str::trim).collect();
            let initial_cluster = members
                .iter()
                .flat_map(|m| {
                    let is_target = m.peer_urls.iter().all(|u| wanted.contains(&u.as_str()));
                    let name = if is_target { target.etcdname.clone() } else { m.name.clone() };
                    m.peer_urls.iter().map(move |u| format!("{name}={u}")).collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
                .join(",");
            let join = JoinFlags { initial_cluster, initial_cluster_token: p.initialclustertoken.clone() };
            self.start(&member, Some(join)).await?;
        }
        if !self.at_least(&member, step::JOINED) {
            let promote = RestoreStep::Promote {
                restore_id: id.clone(),
                name: target.etcdname.clone(),
                peer_urls: target.peerurls.clone(),
            };
            self.retry_on(&helper, &member, promote, "catching up", PROMOTE_TIMEOUT).await?;
            self.record(&member, step::JOINED)?;
        }
        self.set_phase(restore_phase::VERIFYING)?;
        let deadline = tokio::time::Instant::now() + VERIFY_TIMEOUT;
        loop {
            let problem = match (self.check(&member, 0).await, self.check(&helper, 0).await) {
                (Ok(t), Ok(h)) if t.has_leader && !t.learner && t.cluster_id == h.cluster_id => break,
                (Ok(t), Ok(h)) => format!(
                    "member {member}: leader {}, learner {}, cluster {:x} (the cluster is {:x})",
                    t.has_leader, t.learner, t.cluster_id, h.cluster_id
                ),
                (Err(e), _) | (_, Err(e)) => e,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Failed(format!("the replaced member did not verify: {problem}; it stays held")));
            }
            if self.st.waiting != problem {
                self.st.waiting = problem;
                self.save()?;
            }
            self.pause(POLL).await?;
        }
        let i = id.clone();
        self.step(&member, &move || RestoreStep::Release { restore_id: i.clone() }).await?;
        self.record(&member, step::RELEASED)
    }

    /// One attempt of a step on several members at once (each on its own node, so in parallel); the members
    /// it succeeded on are recorded at `done`. The others are left to the one-by-one path with its retries.
    async fn at_once(
        &mut self,
        members: &[String],
        done: &str,
        make: &(dyn Fn() -> RestoreStep + Sync),
    ) -> Result<(), Stop> {
        self.deps.state.still_leading()?;
        let live = self.deps.agents.live(&self.cluster);
        let mut set = tokio::task::JoinSet::new();
        for m in members.iter().filter(|m| !self.at_least(m, done)) {
            if let Some(a) = live.iter().find(|a| a.member == *m).cloned() {
                let step = make();
                set.spawn(async move { (a.member.clone(), steps::ask(&a, step, STEP_TIMEOUT).await) });
            }
        }
        let mut ok = Vec::new();
        while let Some(joined) = set.join_next().await {
            if let Ok((m, Ok(_))) = joined {
                ok.push(m);
            }
        }
        // Recorded in plan order, so that the status reads the same whatever answered first.
        for m in members.iter().filter(|m| ok.contains(m)) {
            self.record(m, done)?;
        }
        Ok(())
    }

    /// Hold and release order: one attempt of the step on every follower at once (when the leader is known and
    /// there are several), then the planned members for the one-by-one path with its retries, the leader last
    /// (a member already at `done` is skipped there).
    async fn followers_first(
        &mut self,
        leader: Option<String>,
        done: &str,
        make: &(dyn Fn() -> RestoreStep + Sync),
    ) -> Result<Vec<String>, Stop> {
        let mut members = self.planned_members()?;
        let followers: Vec<String> = members.iter().filter(|m| Some(*m) != leader.as_ref()).cloned().collect();
        if leader.is_some() && followers.len() > 1 {
            self.at_once(&followers, done, make).await?;
        }
        members.sort_by_key(|m| Some(m) == leader.as_ref());
        Ok(members)
    }

    async fn hold_all(&mut self) -> Result<(), Stop> {
        // The followers at once, then the leader: a leader stopped while its peers stop too spends seconds trying
        // to hand its leadership over (measured: 6 s for the last of three held at once, ~1.3 s each in turn),
        // one whose followers are already gone has nobody to hand it to and stops at once.
        let id = self.id.clone();
        let leader =
            self.deps.agents.live(&self.cluster).into_iter().find(|a| a.facts.as_ref().is_some_and(|f| f.leader));
        let i = id.clone();
        let hold = move || RestoreStep::Hold { restore_id: i.clone() };
        for member in self.followers_first(leader.map(|a| a.member), step::HELD, &hold).await? {
            if self.at_least(&member, step::HELD) {
                continue;
            }
            let id = id.clone();
            match self.step(&member, &move || RestoreStep::Hold { restore_id: id.clone() }).await {
                Ok(_) => self.record(&member, step::HELD)?,
                Err(Stop::Failed(e)) => {
                    // Nothing touched yet: the members held so far run their old data again.
                    self.release_held().await;
                    return Err(Stop::Failed(format!(
                        "{e}; the members held so far were released, no data dir was touched"
                    )));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Best effort, after a failure before any data dir was touched.
    async fn release_held(&mut self) {
        let id = self.id.clone();
        let held: Vec<String> =
            self.st.members.iter().filter(|m| m.step == step::HELD).map(|m| m.member.clone()).collect();
        for member in held {
            if let Some(a) = self.deps.agents.live(&self.cluster).into_iter().find(|a| a.member == member) {
                let r = steps::ask(&a, RestoreStep::Release { restore_id: id.clone() }, STEP_TIMEOUT).await;
                if let Err(e) = r {
                    warn!(%member, "failed to release the member after the failed restore: {e}");
                } else {
                    self.member_status(&member).step.clear();
                }
            }
        }
        let _ = self.save();
    }

    fn rebuild_plan(&self, member: &str, initial_cluster: &str) -> Result<RebuildPlan, Stop> {
        let p = self.plan()?;
        let m = p
            .members
            .iter()
            .find(|m| m.member == member)
            .ok_or_else(|| Stop::Failed(format!("{member} is not planned")))?;
        Ok(RebuildPlan {
            restore_id: self.id.clone(),
            name: m.etcdname.clone(),
            initial_cluster: initial_cluster.into(),
            initial_cluster_token: p.initialclustertoken.clone(),
            initial_advertise_peer_urls: m.peerurls.clone(),
            bump_by: p.bumpby,
        })
    }

    /// The planned backup's manifest (of the cluster it belongs to), and how long one member's rebuild of it
    /// may take.
    async fn planned_backup(&self) -> Result<(Manifest, Duration), Stop> {
        let p = self.plan()?;
        let from = if p.backupcluster.is_empty() { self.cluster.as_str() } else { p.backupcluster.as_str() };
        let manifest = self.deps.api.resolve(from, &p.backup).await.map_err(|e| Stop::Failed(e.to_string()))?;
        let limit = Duration::from_secs(600 + 2 * manifest.backup.size / (1 << 20));
        Ok((manifest, limit))
    }

    /// Records `member` rebuilt: the whole backup fetched, the fetched-bytes gauge, the step.
    fn rebuilt(&mut self, member: &str, size: u64) -> Result<(), Stop> {
        self.member_status(member).bytes = size;
        let fetched: u64 = self.st.members.iter().map(|m| m.bytes).sum();
        let l = crate::metrics::Metrics::cluster(&self.cluster);
        self.deps.metrics.restore_bytes.get_or_create(&l).set(i64::try_from(fetched).unwrap_or(i64::MAX));
        self.record(member, step::REBUILT)
    }

    async fn rebuild(
        &mut self,
        member: &str,
        initial_cluster: &str,
        manifest: &Manifest,
        limit: Duration,
    ) -> Result<(), Stop> {
        if self.at_least(member, step::REBUILT) {
            return Ok(());
        }
        let plan = self.rebuild_plan(member, initial_cluster)?;
        let mut failures = 0;
        loop {
            let agent = self.agent(member).await?;
            self.deps.state.still_leading()?;
            let bytes = std::sync::atomic::AtomicU64::new(0);
            let mut progress = |b: u64| bytes.store(b, std::sync::atomic::Ordering::Relaxed);
            let r = steps::rebuild(&agent, plan.clone(), &self.deps.api, manifest, &mut progress, limit).await;
            self.member_status(member).bytes = bytes.load(std::sync::atomic::Ordering::Relaxed);
            match r {
                Ok(_) => return self.rebuilt(member, manifest.backup.size),
                Err(StepError::Lost(e)) => {
                    self.st.waiting = format!("member {member}: {e}");
                    self.save()?;
                }
                Err(StepError::Failed { error: e, touched }) => {
                    failures += 1;
                    self.member_status(member).error = e.clone();
                    if touched {
                        self.touched = true;
                    }
                    if failures >= STEP_ATTEMPTS {
                        let why = format!("member {member} could not be rebuilt: {e}");
                        if !self.any_touched() {
                            // Every data dir is as it was: the members run their old data again.
                            self.release_held().await;
                            return Err(Stop::Failed(format!(
                                "{why}; no data dir was touched and the held members were released"
                            )));
                        }
                        return Err(Stop::Failed(format!("{why}; {}", self.left_as())));
                    }
                    self.save()?;
                }
            }
            self.pause(Duration::from_secs(2)).await?;
        }
    }

    async fn rebuild_all(&mut self) -> Result<(), Stop> {
        let initial = self.plan()?.initialcluster.clone();
        let members = self.planned_members()?;
        // Every member fetches and rebuilds at once (each on its own node); what fails is retried one by one.
        let (manifest, limit) = self.planned_backup().await?;
        self.deps.state.still_leading()?;
        let live = self.deps.agents.live(&self.cluster);
        let mut set = tokio::task::JoinSet::new();
        for m in members.iter().filter(|m| !self.at_least(m, step::REBUILT)) {
            let Some(agent) = live.iter().find(|a| a.member == *m).cloned() else { continue };
            let plan = self.rebuild_plan(m, &initial)?;
            let (api, manifest) = (self.deps.api.clone(), manifest.clone());
            set.spawn(async move {
                let mut progress = |_: u64| {};
                let r = steps::rebuild(&agent, plan, &api, &manifest, &mut progress, limit).await;
                (agent.member.clone(), r)
            });
        }
        let mut ok = Vec::new();
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok((m, Ok(_))) => ok.push(m),
                Ok((m, Err(StepError::Failed { error, touched }))) => {
                    self.touched |= touched;
                    self.member_status(&m).error = error;
                }
                _ => {}
            }
        }
        for m in members.iter().filter(|m| ok.contains(m)) {
            self.rebuilt(m, manifest.backup.size)?;
        }
        for member in members {
            self.rebuild(&member, &initial, &manifest, limit).await?;
        }
        Ok(())
    }

    async fn start(&mut self, member: &str, join: Option<JoinFlags>) -> Result<(), Stop> {
        if self.at_least(member, step::STARTED) {
            return Ok(());
        }
        let id = self.id.clone();
        self.step(member, &move || RestoreStep::Start { restore_id: id.clone(), join: join.clone() }).await?;
        self.record(member, step::STARTED)
    }

    async fn start_all(&mut self) -> Result<(), Stop> {
        let members = self.planned_members()?;
        let id = self.id.clone();
        self.at_once(&members, step::STARTED, &move || RestoreStep::Start { restore_id: id.clone(), join: None })
            .await?;
        for member in self.planned_members()? {
            self.start(&member, None).await?;
        }
        Ok(())
    }

    /// `seed-join`: the seed is rebuilt alone and started; the others' data dirs are moved aside.
    async fn seed(&mut self) -> Result<(), Stop> {
        let members = self.planned_members()?;
        let initial = self.plan()?.initialcluster.clone();
        let seed = members[0].clone();
        if !self.at_least(&seed, step::REBUILT) {
            let (manifest, limit) = self.planned_backup().await?;
            self.rebuild(&seed, &initial, &manifest, limit).await?;
        }
        self.start(&seed, None).await?;
        let id = self.id.clone();
        for member in &members[1..] {
            if self.at_least(member, step::WIPED) {
                continue;
            }
            let id = id.clone();
            self.step(member, &move || RestoreStep::Wipe { restore_id: id.clone() }).await?;
            self.record(member, step::WIPED)?;
        }
        Ok(())
    }

    /// `seed-join`: each other member is added to the seed's cluster as a learner, started to join it, and
    /// promoted once it caught up, one at a time.
    async fn join_others(&mut self) -> Result<(), Stop> {
        let members = self.planned_members()?;
        let seed = members[0].clone();
        self.wait_healthy(&seed).await?;
        for (n, member) in members.iter().enumerate().skip(1) {
            if self.at_least(member, step::JOINED) {
                continue;
            }
            let p = self.plan()?;
            let m = p.members[n].clone();
            let token = p.initialclustertoken.clone();
            let initial_cluster = plan::joining_cluster(p, n);
            let id = self.id.clone();
            if !self.at_least(member, step::ADDED) {
                // etcd refuses membership changes for a few seconds after a leader is elected ("unhealthy
                // cluster"): retried until it takes them.
                let add = RestoreStep::AddLearner {
                    restore_id: id.clone(),
                    name: m.etcdname.clone(),
                    peer_urls: m.peerurls.clone(),
                };
                self.retry_on(&seed, member, add, "being added as a learner", MEMBERSHIP_TIMEOUT).await?;
                self.record(member, step::ADDED)?;
            }
            self.start(member, Some(JoinFlags { initial_cluster, initial_cluster_token: token })).await?;
            // Promoted once etcd accepts it (it refuses while the learner is behind).
            let promote = RestoreStep::Promote {
                restore_id: id.clone(),
                name: m.etcdname.clone(),
                peer_urls: m.peerurls.clone(),
            };
            self.retry_on(&seed, member, promote, "catching up with the seed", PROMOTE_TIMEOUT).await?;
            self.record(member, step::JOINED)?;
        }
        Ok(())
    }

    /// Sends `step` to `on` (the seed) until it succeeds or `limit` passed; `member` is who it is about.
    async fn retry_on(
        &mut self,
        on: &str,
        member: &str,
        step: RestoreStep,
        doing: &str,
        limit: Duration,
    ) -> Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let agent = self.agent(on).await?;
            self.deps.state.still_leading()?;
            match steps::ask(&agent, step.clone(), STEP_TIMEOUT).await {
                Ok(_) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    return Err(Stop::Failed(format!(
                        "member {member} was not done {doing} within {}s: {e}; {}",
                        limit.as_secs(),
                        self.left_as()
                    )))
                }
                Err(e) => {
                    let waiting = format!("member {member} {doing}: {e}");
                    if self.st.waiting != waiting {
                        self.st.waiting = waiting;
                        self.save()?;
                    }
                }
            }
            self.pause(POLL).await?;
        }
    }

    async fn check(&self, member: &str, revision: i64) -> Result<RestoredMember, String> {
        let mut answers = self.check_all(&[member.to_string()], revision).await;
        answers.pop().map_or_else(|| Err(format!("member {member} did not answer")), |(_, r)| r)
    }

    /// [`Self::check`] of every member at once; the answers in `members`' order.
    async fn check_all(&self, members: &[String], revision: i64) -> Vec<(String, Result<RestoredMember, String>)> {
        let live = self.deps.agents.live(&self.cluster);
        let mut set = tokio::task::JoinSet::new();
        for (i, m) in members.iter().enumerate() {
            let agent = live.iter().find(|a| a.member == *m).cloned();
            let (m, step) = (m.clone(), RestoreStep::Check { restore_id: self.id.clone(), revision });
            set.spawn(async move {
                let r = match agent {
                    None => Err(format!("member {m}'s agent is not connected")),
                    Some(a) => match steps::ask(&a, step, STEP_TIMEOUT).await {
                        Ok(StepDone::Checked(c)) => Ok(c),
                        Ok(other) => Err(format!("member {m} answered {other:?}")),
                        Err(e) => Err(format!("member {m}: {e}")),
                    },
                };
                (i, m, r)
            });
        }
        // A member whose task did not end with an answer is one that did not answer: never left out.
        let mut out: Vec<(String, Result<RestoredMember, String>)> =
            members.iter().map(|m| (m.clone(), Err(format!("member {m} did not answer")))).collect();
        while let Some(joined) = set.join_next().await {
            if let Ok((i, m, r)) = joined {
                out[i] = (m, r);
            }
        }
        out
    }

    async fn wait_healthy(&mut self, member: &str) -> Result<(), Stop> {
        let deadline = tokio::time::Instant::now() + VERIFY_TIMEOUT;
        loop {
            match self.check(member, 0).await {
                Ok(c) if c.has_leader => return Ok(()),
                Ok(_) => self.st.waiting = format!("member {member} has no leader yet"),
                Err(e) => self.st.waiting = e,
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "member {member} did not become healthy: {}; {}",
                    self.st.waiting,
                    self.left_as()
                )));
            }
            self.save()?;
            self.pause(POLL).await?;
        }
    }

    /// Every member healthy, one cluster id, one revision above the highest ever seen, one `HashKV` and key
    /// count there, and the count the backup's drill read (when it was drilled).
    async fn verify(&mut self) -> Result<RestoreVerified, Stop> {
        let deadline = tokio::time::Instant::now() + VERIFY_TIMEOUT;
        loop {
            let problem = match self.verify_once().await {
                Ok(v) => return Ok(v),
                Err(Err(fatal)) => {
                    return Err(Stop::Failed(format!("verification failed: {fatal}; {}", self.left_as())))
                }
                Err(Ok(p)) => p,
            };
            if tokio::time::Instant::now() >= deadline {
                return Err(Stop::Failed(format!(
                    "the restored cluster did not verify within {}s: {problem}; {}",
                    VERIFY_TIMEOUT.as_secs(),
                    self.left_as()
                )));
            }
            if self.st.waiting != problem {
                self.st.waiting = problem;
                self.save()?;
            }
            self.pause(POLL).await?;
        }
    }

    /// `Err(Ok(..))`: not yet (try again); `Err(Err(..))`: wrong for good.
    async fn verify_once(&mut self) -> Result<RestoreVerified, Result<String, String>> {
        let members = self.planned_members().map_err(|_| Err("no plan".to_string()))?;
        let mut first = Vec::new();
        for (m, c) in self.check_all(&members, 0).await {
            let c = c.map_err(Ok)?;
            if !c.has_leader {
                return Err(Ok(format!("member {m} has no leader yet")));
            }
            if c.learner {
                return Err(Ok(format!("member {m} is still a learner")));
            }
            first.push((m, c));
        }
        let cluster_id = first[0].1.cluster_id;
        if let Some((m, c)) = first.iter().find(|(_, c)| c.cluster_id != cluster_id) {
            return Err(Err(format!("member {m} is in cluster {:x}, {} in {cluster_id:x}", c.cluster_id, first[0].0)));
        }
        let revision = first.iter().map(|(_, c)| c.revision).min().unwrap_or(0);
        let mut hashes = Vec::new();
        // Each member hashes its whole key space: all at once, each on its own node.
        for (m, c) in self.check_all(&members, revision).await {
            let c = c.map_err(Ok)?;
            hashes.push((m, c.hash.unwrap_or(0), c.keys.unwrap_or(0)));
        }
        let (hash, keys) = (hashes[0].1, hashes[0].2);
        if let Some((m, h, k)) = hashes.iter().find(|(_, h, k)| *h != hash || *k != keys) {
            return Err(Err(format!(
                "members disagree at revision {revision}: {m} has hash {h:x} and {k} keys, {} has {hash:x} and {keys}",
                hashes[0].0
            )));
        }
        let p = self.plan().map_err(|_| Err("no plan".to_string()))?;
        if revision <= p.highestrevision {
            return Err(Err(format!(
                "the restored revision {revision} is not above the highest the cluster was seen at ({}): Kubernetes \
                 watch caches would miss changes",
                p.highestrevision
            )));
        }
        if p.backupkeys > 0 && keys != p.backupkeys {
            return Err(Err(format!(
                "the restored cluster holds {keys} keys, the backup's drill read {}",
                p.backupkeys
            )));
        }
        info!(revision, hash, keys, cluster_id = %format!("{cluster_id:x}"), "restored cluster verified");
        Ok(RestoreVerified {
            etcdclusterid: format!("{cluster_id:x}"),
            revision,
            hash,
            keys,
            time: Some(Timestamp::now()),
        })
    }

    async fn release_all(&mut self) -> Result<(), Stop> {
        // As holding: the followers at once, then the leader (a release restarts etcd, and a leader restarted
        // while its peers restart too waits out a handover timeout).
        let id = self.id.clone();
        let pending: Vec<String> =
            self.planned_members()?.into_iter().filter(|m| !self.at_least(m, step::RELEASED)).collect();
        let leader = self
            .check_all(&pending, 0)
            .await
            .into_iter()
            .find(|(_, c)| c.as_ref().is_ok_and(|c| c.leader))
            .map(|(m, _)| m);
        let i = id.clone();
        let release = move || RestoreStep::Release { restore_id: i.clone() };
        for member in self.followers_first(leader, step::RELEASED, &release).await? {
            if self.at_least(&member, step::RELEASED) {
                continue;
            }
            let id = id.clone();
            self.step(&member, &move || RestoreStep::Release { restore_id: id.clone() }).await?;
            self.record(&member, step::RELEASED)?;
        }
        Ok(())
    }
}

/// The lowest step every planned member has reached.
fn step_rank_all(st: &EtcdRestoreStatusSpec) -> usize {
    st.members.iter().map(|m| step_rank(&m.step)).min().unwrap_or(0)
}
