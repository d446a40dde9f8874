//! Admission of `EtcdRestores`: what may be restored, and when a restore must be confirmed.

use ferry_common::resources::{
    restore_mode, restore_phase, EtcdRestoreSpec, Resource, ResourceType, Spec, Timestamp, LABEL_CLUSTER,
};

use super::{Api, ApiError};
use crate::restore::plan::{self, human};
use crate::state::{StateError, StateStore};
use crate::store::Manifest;

type Result<T> = std::result::Result<T, ApiError>;

/// The members that ever registered for `cluster`, sorted.
pub fn cluster_members(state: &dyn StateStore, cluster: &str) -> std::result::Result<Vec<String>, StateError> {
    let mut out: Vec<String> = state
        .list_labeled(ResourceType::Agent, LABEL_CLUSTER, cluster)?
        .into_iter()
        .filter_map(|r| match r.spec {
            Spec::Agent(a) => Some(a.member),
            _ => None,
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

impl Api {
    /// The backup a restore spec names: an id, or `latest` (before `before`, when given).
    pub(crate) async fn resolve_restore(&self, cluster: &str, spec: &EtcdRestoreSpec) -> Result<Manifest> {
        let cluster = if spec.fromcluster.is_empty() { cluster } else { spec.fromcluster.as_str() };
        if spec.backup != "latest" {
            if spec.before.is_some() {
                return Err(ApiError::Invalid(
                    "spec.before goes with spec.backup: latest (the newest backup before that time); drop one".into(),
                ));
            }
            return self.resolve(cluster, &spec.backup).await;
        }
        let Some(before) = spec.before else {
            return self.resolve(cluster, "latest").await;
        };
        let found =
            self.store.list(Some(cluster), &self.cancel).await?.into_iter().find(|m| m.backup.createdat < before);
        found.ok_or_else(|| {
            ApiError::NotFound(format!(
                "cluster {cluster} has no backup taken before {}; list them with `ferryctl get etcdbackup --selector {LABEL_CLUSTER}={cluster}`",
                before.human()
            ))
        })
    }

    /// Checks an `EtcdRestores` before it is written.
    pub(super) async fn check_restore(&self, cluster: &str, spec: &EtcdRestoreSpec) -> Result<()> {
        ferry_common::resources::validate_name("cluster", cluster)?;
        let replace = plan::mode(spec).map_err(ApiError::Invalid)? == restore_mode::REPLACE_MEMBER;
        if replace {
            if spec.member.is_empty() {
                return Err(ApiError::Invalid("replace-member needs spec.member: the member to replace".into()));
            }
            if !spec.backup.is_empty() || spec.before.is_some() || !spec.lostmembers.is_empty() {
                return Err(ApiError::Invalid(
                    "replace-member copies the member's data from the others: leave spec.backup, spec.before and \
                     spec.lostmembers empty"
                        .into(),
                ));
            }
        } else if !spec.member.is_empty() {
            return Err(ApiError::Invalid(
                "spec.member goes with mode replace-member (`ferryctl member replace`); a restore restores every member"
                    .into(),
            ));
        } else if spec.backup.is_empty() {
            return Err(ApiError::Invalid("spec.backup is empty: give a backup id or `latest`".into()));
        }
        let members = cluster_members(self.state.as_ref(), cluster)?;
        if members.is_empty() {
            return Err(ApiError::NotFound(format!(
                "cluster {cluster} has no registered members; a restore goes through the members' agents (`ferryctl get agents`)"
            )));
        }
        for lost in &spec.lostmembers {
            if !members.contains(lost) {
                return Err(ApiError::Invalid(format!(
                    "spec.lostmembers names {lost:?}, not a member of cluster {cluster} (members: {})",
                    members.join(", ")
                )));
            }
        }
        if spec.lostmembers.len() >= members.len() {
            return Err(ApiError::Invalid(format!(
                "spec.lostmembers names every member of cluster {cluster}: at least one must be left to restore"
            )));
        }
        if !spec.fromcluster.is_empty() {
            let from = match self.state.get(ResourceType::Cluster, cluster)? {
                Some(Resource { spec: Spec::Cluster(c), .. }) => c.restorefrom.map(|r| r.cluster),
                _ => None,
            };
            if from.as_deref() != Some(spec.fromcluster.as_str()) {
                return Err(ApiError::Invalid(format!(
                    "spec.fromcluster {:?}: a backup of another cluster is restored only into a new cluster whose \
                     template says `features.restoreFrom: {{cluster: {}}}`; cluster {cluster} does not",
                    spec.fromcluster, spec.fromcluster
                )));
            }
        }
        if !spec.confirm.is_empty() && spec.confirm != cluster {
            return Err(ApiError::Invalid(format!(
                "spec.confirm is {:?}, but it must be the cluster's name, {cluster:?} (or empty)",
                spec.confirm
            )));
        }
        if let Some(old) = self.state.get(ResourceType::EtcdRestore, cluster)? {
            if matches!(&old.spec, Spec::EtcdRestore(s) if s == spec) {
                return Ok(());
            }
            let phase = match crate::restore::status_of(self.state.as_ref(), cluster)? {
                Some(s) if s.restoreid == crate::restore::restore_id(&old) => s.phase,
                _ => restore_phase::PENDING.into(),
            };
            return Err(if restore_phase::is_final(&phase) {
                ApiError::Conflict(format!(
                    "cluster {cluster} has a finished restore ({phase}); a restore is immutable: delete it first \
                     (`ferryctl delete etcdrestore {cluster}`; `ferryctl restore` does this for you)"
                ))
            } else {
                ApiError::Conflict(format!(
                    "a restore of cluster {cluster} is under way ({phase}); follow it with `ferryctl get -w \
                     etcdrestorestatus {cluster}`"
                ))
            });
        }
        if replace {
            return self.check_replacement(cluster, spec, &members);
        }
        let manifest = self.resolve_restore(cluster, spec).await?;
        if spec.confirm != cluster {
            let healthy = self.agents.live(cluster).iter().filter(|a| a.reaches_etcd()).count();
            if healthy * 2 > members.len() {
                return Err(ApiError::Invalid(format!(
                    "cluster {cluster} is healthy ({healthy} of {} members answer): restoring would discard {}. \
                     To restore anyway, confirm with the cluster's name (`ferryctl restore {cluster} --yes`, or \
                     spec.confirm: {cluster})",
                    members.len(),
                    self.what_is_lost(cluster, &manifest)?
                )));
            }
        }
        Ok(())
    }

    /// `replace-member`: the member is one of the cluster's, the cluster keeps quorum without it, and a healthy
    /// member is replaced only when confirmed.
    fn check_replacement(&self, cluster: &str, spec: &EtcdRestoreSpec, members: &[String]) -> Result<()> {
        let target = &spec.member;
        if !members.contains(target) {
            return Err(ApiError::Invalid(format!(
                "spec.member {target:?} is not a member of cluster {cluster} (members: {})",
                members.join(", ")
            )));
        }
        let live = self.agents.live(cluster);
        let healthy = |m: &str| live.iter().any(|a| a.member == m && a.reaches_etcd());
        let others = members.iter().filter(|m| *m != target && healthy(m)).count();
        if others * 2 <= members.len() {
            return Err(ApiError::Conflict(format!(
                "cluster {cluster} would lose quorum without {target}: {others} of its {} members are healthy \
                 besides it. Bring another member back first, or restore the cluster (`ferryctl restore {cluster}`)",
                members.len()
            )));
        }
        if healthy(target) && spec.confirm != cluster {
            return Err(ApiError::Invalid(format!(
                "member {target} of cluster {cluster} is healthy: replacing it moves its data dir aside and copies \
                 the others' data into a fresh one. To replace it anyway, confirm (`ferryctl member replace \
                 {cluster} {target} --yes`, or spec.confirm: {cluster})"
            )));
        }
        Ok(())
    }

    /// What a restore of `m` loses, in words: writes since, the backup's age, its key count when drilled.
    fn what_is_lost(&self, cluster: &str, m: &Manifest) -> std::result::Result<String, StateError> {
        let highest = self
            .agents
            .highest_revision(cluster)
            .map_or(0, |(r, _)| r)
            .max(crate::status::highest_recorded(self.state.as_ref(), cluster)?);
        let age = Timestamp::now().seconds.saturating_sub(m.backup.createdat.seconds).max(0);
        let age = humantime::format_duration(std::time::Duration::from_secs(age as u64));
        let keys = crate::status::drilled_keys(self.state.as_ref(), cluster, &m.id)?;
        let mut out = format!(
            "every write since backup {} ({age} old, revision {}; the cluster was seen at revision {highest}: \
             {} revisions)",
            m.id,
            m.backup.revision,
            highest.saturating_sub(m.backup.revision).max(0)
        );
        if keys > 0 {
            out.push_str(&format!("; the backup holds {keys} keys"));
        }
        out.push_str(&format!(", {} of data", human(m.backup.rawsize)));
        Ok(out)
    }

    /// A restore may be deleted before it touches anything, or once it ended.
    pub(super) fn check_restore_delete(&self, cluster: &str) -> Result<()> {
        let Some(r): Option<Resource> = self.state.get(ResourceType::EtcdRestore, cluster)? else {
            return Ok(());
        };
        if let Some(s) = crate::restore::status_of(self.state.as_ref(), cluster)? {
            let current = s.restoreid == crate::restore::restore_id(&r);
            if current && !restore_phase::is_final(&s.phase) && s.phase != restore_phase::PENDING {
                return Err(ApiError::Conflict(format!(
                    "the restore of cluster {cluster} is {} and has held its members: it cannot be taken back now; \
                     wait for it to end (`ferryctl get -w etcdrestorestatus {cluster}`)",
                    s.phase
                )));
            }
        }
        Ok(())
    }
}
