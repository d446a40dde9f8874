//! Backup status: one `EtcdBackupStatuses` per cluster and the `EtcdBackupOverallStatuses` singleton.
//!
//! Several writers touch them — a job's progress ticks and outcome, a configuration change of the store —
//! so every update is one state-store transaction (read, change, write), and none can overwrite another's.

use std::sync::Arc;

use ferry_common::resources::{
    status, DrillStatus, EtcdBackupOverallStatusSpec, EtcdBackupStatusSpec, Resource, ResourceType, RestorePlan, Spec,
    Timestamp, LABEL_CLUSTER, OVERALL_STATUS_ID, RESTORE_PLAN_HOLDS_SECONDS,
};

use crate::metrics::Metrics;
use crate::state::{StateError, StateStore, StateTxn};

/// The status owner; cheap to clone (a handle).
#[derive(Clone)]
pub struct Status {
    state: Arc<dyn StateStore>,
    metrics: Arc<Metrics>,
    /// `local` or `s3`, shown as `configurationname`.
    store_name: &'static str,
}

/// Creates `cluster`'s status if it has none yet.
pub(crate) fn ensure_exists(state: &dyn StateStore, cluster: &str) -> Result<(), StateError> {
    state.transact(&mut |tx| {
        if tx.get(ResourceType::EtcdBackupStatus, cluster)?.is_none() {
            tx.put(new_cluster_status(cluster))?;
        }
        Ok(())
    })
}

/// Raises `cluster`'s recorded highest revision to `revision` (first seen `at`); lower values change nothing.
pub(crate) fn raise_highest_revision(
    state: &dyn StateStore,
    cluster: &str,
    revision: i64,
    at: Timestamp,
) -> Result<(), StateError> {
    update_cluster(state, cluster, &mut |st| {
        if revision > st.highestrevision {
            st.highestrevision = revision;
            st.highestrevisionat = Some(at);
        }
    })
}

/// What the cluster's connected agents say of their etcd when a member asks to restore.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct LiveEtcd {
    /// The registry's highest revision and when (it may not be persisted yet).
    pub highest: Option<(i64, Timestamp)>,
    /// The etcd cluster id most agents report (0: none).
    pub cluster_id: u64,
    /// The highest revision agents reaching etcd now report per cluster id: see [`restore_plan`].
    pub moving: Option<(u64, i64)>,
}

/// The revision floor for a restore of `backup` of `cluster`: the plan of an earlier member restoring the
/// same backup while it holds, else a new plan from the highest revision recorded or `live.highest`.
///
/// A plan holds for a day, unless the etcd cluster it was made for is seen serving past its floor: then that
/// etcd was never down for a restore (any agent can ask, a stolen node included, and a floor pinned hours
/// before a real restore would land it below what watchers saw). A restored member's new cluster id never
/// moves it, so every member of one restore gets one floor.
pub(crate) fn restore_plan(
    state: &dyn StateStore,
    cluster: &str,
    backup: &str,
    live: LiveEtcd,
    now: Timestamp,
) -> Result<RestorePlan, StateError> {
    let mut plan = RestorePlan::default();
    update_cluster(state, cluster, &mut |st| {
        if let Some(p) = &st.restoreplan {
            let moved_on = live.moving.is_some_and(|(id, r)| id != 0 && id == p.etcdclusterid && r > p.highestrevision);
            if p.backup == backup && now.seconds - p.createdat.seconds < RESTORE_PLAN_HOLDS_SECONDS && !moved_on {
                plan = p.clone();
                return;
            }
        }
        let (mut revision, mut at) = (st.highestrevision, st.highestrevisionat);
        if let Some((r, t)) = live.highest.filter(|(r, _)| *r > revision) {
            (revision, at) = (r, Some(t));
        }
        plan = RestorePlan {
            backup: backup.to_owned(),
            highestrevision: revision,
            highestrevisionat: at,
            createdat: now,
            etcdclusterid: live.cluster_id,
        };
        st.restoreplan = Some(plan.clone());
    })?;
    Ok(plan)
}

/// The highest revision recorded for `cluster` (0: none).
pub(crate) fn highest_recorded(state: &dyn StateStore, cluster: &str) -> Result<i64, StateError> {
    Ok(match state.get(ResourceType::EtcdBackupStatus, cluster)? {
        Some(Resource { spec: Spec::EtcdBackupStatus(s), .. }) => s.highestrevision,
        _ => 0,
    })
}

/// The keys a passed drill of `backup` read (0: that backup's drill is not the latest, or it failed).
pub(crate) fn drilled_keys(state: &dyn StateStore, cluster: &str, backup: &str) -> Result<u64, StateError> {
    Ok(match state.get(ResourceType::EtcdBackupStatus, cluster)? {
        Some(Resource { spec: Spec::EtcdBackupStatus(EtcdBackupStatusSpec { drill: Some(d), .. }), .. })
            if d.backup == backup && d.result != status::ERROR =>
        {
            d.keys
        }
        _ => 0,
    })
}

/// Read-modify-write of a cluster's status in one transaction (no mirror into the overall status: for the
/// fields that are not about the last backup).
fn update_cluster(
    state: &dyn StateStore,
    cluster: &str,
    f: &mut dyn FnMut(&mut EtcdBackupStatusSpec),
) -> Result<(), StateError> {
    state.transact(&mut |tx| {
        let mut r = tx.get(ResourceType::EtcdBackupStatus, cluster)?.unwrap_or_else(|| new_cluster_status(cluster));
        let Spec::EtcdBackupStatus(spec) = &mut r.spec else {
            return Err(StateError::WrongType(format!("status of {cluster}")));
        };
        f(spec);
        tx.put(r)?;
        Ok(())
    })
}

fn new_cluster_status(cluster: &str) -> Resource {
    let mut r = Resource::new(cluster, Spec::EtcdBackupStatus(EtcdBackupStatusSpec::default()));
    r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
    r
}

fn overall(tx: &mut dyn StateTxn) -> Result<Resource, StateError> {
    Ok(tx.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)?.unwrap_or_else(|| {
        Resource::new(OVERALL_STATUS_ID, Spec::EtcdBackupOverallStatus(EtcdBackupOverallStatusSpec::default()))
    }))
}

impl Status {
    /// Opens the status resources at start: the overall status names the store and its initial error, and a
    /// backup left "running" by a coordinator that stopped mid-backup turns to an error.
    pub fn new(
        state: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
        store_name: &'static str,
        initial_configuration_error: &str,
    ) -> Result<Self, StateError> {
        let s = Self { state, metrics, store_name };
        s.set_configuration(initial_configuration_error, false)?;
        // One transaction: read again inside it, so the reset cannot overwrite an update made meanwhile.
        let ids: Vec<String> =
            s.state.list(ResourceType::EtcdBackupStatus)?.into_iter().map(|r| r.metadata.id).collect();
        s.state.transact(&mut |tx| {
            for id in &ids {
                let Some(mut r) = tx.get(ResourceType::EtcdBackupStatus, id)? else { continue };
                if let Spec::EtcdBackupStatus(st) = &mut r.spec {
                    if st.status == status::RUNNING {
                        st.status = status::ERROR;
                        st.error = "the coordinator restarted while this backup ran".into();
                        tx.put(r)?;
                    }
                }
            }
            Ok(())
        })?;
        Ok(s)
    }

    /// Records the outcome of a store configuration attempt in the overall status.
    pub fn set_configuration(&self, error: &str, count_attempt: bool) -> Result<(), StateError> {
        self.state.transact(&mut |tx| {
            let mut o = overall(tx)?;
            let Spec::EtcdBackupOverallStatus(s) = &mut o.spec else {
                return Err(StateError::WrongType(OVERALL_STATUS_ID.into()));
            };
            s.configurationname = self.store_name.to_string();
            s.configurationerror = error.to_string();
            if count_attempt {
                s.configurationattempt += 1;
            }
            tx.put(o)?;
            Ok(())
        })?;
        self.metrics.store_configuration_error.set(i64::from(!error.is_empty()));
        Ok(())
    }

    /// The overall status's configuration error ("" when the store is usable).
    pub fn configuration_error(&self) -> Result<String, StateError> {
        Ok(match self.state.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)? {
            Some(Resource { spec: Spec::EtcdBackupOverallStatus(s), .. }) => s.configurationerror,
            _ => String::new(),
        })
    }

    /// Changes fields of a cluster's status that are not about its last backup (drills, member checks), in one
    /// transaction.
    pub fn update_cluster(
        &self,
        cluster: &str,
        mut f: impl FnMut(&mut EtcdBackupStatusSpec),
    ) -> Result<(), StateError> {
        update_cluster(self.state.as_ref(), cluster, &mut f)
    }

    /// A cluster's latest drill, if any (`None` also when the status cannot be read).
    pub fn drill(&self, cluster: &str) -> Option<DrillStatus> {
        match self.state.get(ResourceType::EtcdBackupStatus, cluster) {
            Ok(Some(Resource { spec: Spec::EtcdBackupStatus(s), .. })) => s.drill,
            _ => None,
        }
    }

    /// The change log's latest check of `cluster` (absent before the first).
    pub fn log_verification(&self, cluster: &str) -> Option<ferry_common::resources::LogVerification> {
        match self.state.get(ResourceType::EtcdBackupStatus, cluster) {
            Ok(Some(Resource { spec: Spec::EtcdBackupStatus(s), .. })) => s.pointintime.and_then(|p| p.verification),
            _ => None,
        }
    }

    /// Changes a cluster's backup status and mirrors it into the overall status, in one transaction.
    pub fn update(&self, cluster: &str, f: impl Fn(&mut EtcdBackupStatusSpec)) -> Result<(), StateError> {
        self.state.transact(&mut |tx| {
            let mut r = tx.get(ResourceType::EtcdBackupStatus, cluster)?.unwrap_or_else(|| new_cluster_status(cluster));
            let Spec::EtcdBackupStatus(spec) = &mut r.spec else {
                return Err(StateError::WrongType(format!("status of {cluster}")));
            };
            f(spec);
            let latest = spec.clone();
            tx.put(r)?;
            if let Some(mut o) = tx.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID)? {
                if let Spec::EtcdBackupOverallStatus(s) = &mut o.spec {
                    s.lastbackupstatus = Some(latest);
                }
                tx.put(o)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::TestState;

    /// Members restoring one backup get one floor, although the first restored member's agent reports its
    /// new (bumped) revision before the next member asks; a day later, or for another backup, a new plan.
    #[test]
    fn restore_plans_hold_for_one_backup_and_survive_a_restart() {
        for (_, t) in TestState::both() {
            restore_plans_hold(&t);
        }
    }

    fn restore_plans_hold(t: &TestState) {
        let at = |s| Timestamp { seconds: s, nanos: 0 };
        let live =
            |highest: Option<(i64, Timestamp)>, moving: Option<(u64, i64)>| LiveEtcd { highest, cluster_id: 7, moving };
        {
            let state = t.open();
            let state = state.as_ref();
            raise_highest_revision(state, "c", 5_000, at(100)).unwrap();
            raise_highest_revision(state, "c", 4_000, at(200)).unwrap(); // lower: ignored
            let first = restore_plan(state, "c", "c-1", live(Some((5_200, at(300))), None), at(1_000)).unwrap();
            assert_eq!((first.highestrevision, first.highestrevisionat), (5_200, Some(at(300))));
            assert_eq!(first.etcdclusterid, 7);
            raise_highest_revision(state, "c", 900_000, at(1_100)).unwrap(); // a restored member reports
            let restored = live(Some((900_000, at(1_100))), Some((8, 900_000))); // under its new cluster id
            let second = restore_plan(state, "c", "c-1", restored, at(1_200)).unwrap();
            assert_eq!(second, first, "the second member gets the first member's floor");
        }
        // After a coordinator restart the plan and the highest revision are still there.
        let state = t.open();
        let state = state.as_ref();
        let third = restore_plan(state, "c", "c-1", LiveEtcd::default(), at(2_000)).unwrap();
        assert_eq!(third.highestrevision, 5_200);
        let later =
            restore_plan(state, "c", "c-1", LiveEtcd::default(), at(1_000 + RESTORE_PLAN_HOLDS_SECONDS)).unwrap();
        assert_eq!(later.highestrevision, 900_000, "a day later the same backup plans anew");
        let other =
            restore_plan(state, "c", "c-2", LiveEtcd::default(), at(1_000 + RESTORE_PLAN_HOLDS_SECONDS)).unwrap();
        assert_eq!((other.backup.as_str(), other.highestrevision), ("c-2", 900_000));
    }

    /// Finding 3 of issue 26: any agent (a stolen node's) asking to restore pinned the floor for a day. The etcd
    /// the plan was made for serving past the floor afterwards was never down for a restore: planned anew.
    #[test]
    fn a_plan_whose_etcd_serves_past_its_floor_is_made_anew() {
        let t = TestState::redb();
        let state = t.open();
        let state = state.as_ref();
        let at = |s| Timestamp { seconds: s, nanos: 0 };
        let pinned = LiveEtcd { highest: Some((5_000, at(100))), cluster_id: 7, moving: Some((7, 5_000)) };
        let first = restore_plan(state, "c", "c-1", pinned, at(200)).unwrap();
        assert_eq!(first.highestrevision, 5_000);
        let unchanged = LiveEtcd { highest: Some((5_000, at(100))), cluster_id: 7, moving: Some((7, 5_000)) };
        assert_eq!(restore_plan(state, "c", "c-1", unchanged, at(300)).unwrap(), first, "not moved: it holds");
        let moved = LiveEtcd { highest: Some((400_000, at(5_000))), cluster_id: 7, moving: Some((7, 400_000)) };
        let real = restore_plan(state, "c", "c-1", moved, at(5_100)).unwrap();
        assert_eq!((real.highestrevision, real.createdat), (400_000, at(5_100)));
    }

    /// Progress ticks (read-modify-write of the cluster status, mirrored into the overall status) racing
    /// configuration changes (read-modify-write of the overall status): every update must survive.
    #[test]
    fn concurrent_progress_ticks_and_configuration_changes_lose_no_update() {
        for (_, t) in TestState::both() {
            progress_and_configuration_race(t.open());
        }
    }

    fn progress_and_configuration_race(state: Arc<dyn StateStore>) {
        let status = Status::new(state.clone(), Arc::new(Metrics::default()), "local", "").unwrap();
        const TICKS: u64 = 200;
        const CONFIGS: u32 = 100;
        std::thread::scope(|s| {
            for _ in 0..2 {
                let status = status.clone();
                s.spawn(move || {
                    for _ in 0..TICKS / 2 {
                        status.update("c", |st| st.bytesdone += 1).unwrap();
                    }
                });
            }
            let status = status.clone();
            s.spawn(move || {
                for i in 0..CONFIGS {
                    let error = if i % 2 == 0 { "down" } else { "" };
                    status.set_configuration(error, true).unwrap();
                }
            });
        });
        let Some(Resource { spec: Spec::EtcdBackupStatus(c), .. }) =
            state.get(ResourceType::EtcdBackupStatus, "c").unwrap()
        else {
            panic!("no cluster status")
        };
        assert_eq!(c.bytesdone, TICKS, "a progress tick was lost");
        let Some(Resource { spec: Spec::EtcdBackupOverallStatus(o), .. }) =
            state.get(ResourceType::EtcdBackupOverallStatus, OVERALL_STATUS_ID).unwrap()
        else {
            panic!("no overall status")
        };
        assert_eq!(o.configurationattempt, CONFIGS, "a configuration attempt was lost");
        assert_eq!(o.lastbackupstatus.map(|l| l.bytesdone), Some(TICKS), "the mirrored status was overwritten");
    }
}
