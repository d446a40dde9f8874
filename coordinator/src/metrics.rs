//! The coordinator's Prometheus metrics. Names follow Prometheus conventions (base units, `_total`,
//! `_seconds`, `_bytes`); labels carry cluster names and results only, never secrets.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::state::StateStore;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub cluster: String,
    /// `success` or `error`.
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MemberLabels {
    pub cluster: String,
    pub member: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SerialLabels {
    pub serial: String,
}

pub type FloatGauge = Gauge<f64, AtomicU64>;

pub struct Metrics {
    registry: Registry,
    pub last_success: Family<ClusterLabels, FloatGauge>,
    pub last_attempt: Family<ClusterLabels, FloatGauge>,
    pub backups: Family<ResultLabels, Counter>,
    pub duration: Histogram,
    pub size: Family<ClusterLabels, Gauge>,
    pub raw_size: Family<ClusterLabels, Gauge>,
    pub agents_connected: Family<ClusterLabels, Gauge>,
    pub etcd_reachable_agents: Family<ClusterLabels, Gauge>,
    pub consecutive_failures: Family<ClusterLabels, Gauge>,
    pub store_configuration_error: Gauge,
    /// 1 while this replica leads (always, for a coordinator on redb).
    pub leader: Gauge,
    /// 1 while the state store can write.
    pub state_store_writable: Gauge,
    pub retention_deleted: Family<ClusterLabels, Counter>,
    /// Bytes of uploaded objects the coordinator read back to verify them before their manifest: the whole
    /// object with `--verify-upload full`, its first bytes (≤ 1 %, a few KiB) with `parts`.
    pub store_verify_read: Counter,
    pub interval: Family<ClusterLabels, FloatGauge>,
    pub drill_last_success: Family<ClusterLabels, FloatGauge>,
    pub drill_keys: Family<ClusterLabels, Gauge>,
    pub drills: Family<ResultLabels, Counter>,
    pub drill_duration: Histogram,
    pub drill_interval: Family<ClusterLabels, FloatGauge>,
    pub drill_failing: Family<ClusterLabels, Gauge>,
    pub drill_key_drop: Family<ClusterLabels, Gauge>,
    pub member_diverged: Family<MemberLabels, Gauge>,
    pub member_check_unreachable: Family<ClusterLabels, Gauge>,
    /// 1 when the latest member check compared hashes, 0 when it could not (the status says why).
    pub member_check_compared: Family<ClusterLabels, Gauge>,
    /// Connections of a member after its first since start: a loop of them is a broken link or two holders of
    /// one certificate replacing each other.
    pub agent_reconnects: Family<MemberLabels, Counter>,
    /// 1 while the member is out of rotation after refused backups (`backup::quarantine`).
    pub member_out_of_rotation: Family<MemberLabels, Gauge>,
    /// Unix time the newest unrevoked certificate of each agent expires.
    pub agent_certificate_expiry: Family<MemberLabels, FloatGauge>,
    /// Unix time each unrevoked, unexpired full admin certificate expires.
    pub admin_certificate_expiry: Family<SerialLabels, FloatGauge>,
    /// Unix time the coordinator's CA certificate expires.
    pub ca_certificate_expiry: FloatGauge,
    /// Connections refused because they presented a certificate whose renewed successor is in use.
    pub agent_predecessor_used: Family<MemberLabels, Counter>,
    /// 1 while a restore of the cluster runs (from planning until done or failed).
    pub restore_in_progress: Family<ClusterLabels, Gauge>,
    /// Unix time the running (or last) restore started.
    pub restore_started: Family<ClusterLabels, FloatGauge>,
    /// 1 when the cluster's last restore failed (until the next one starts).
    pub restore_failed: Family<ClusterLabels, Gauge>,
    /// Seconds from the last finished restore's request to its verified end.
    pub restore_duration: Family<ClusterLabels, FloatGauge>,
    /// Backup bytes the members of a running restore fetched, summed.
    pub restore_bytes: Family<ClusterLabels, Gauge>,
    /// The change log: the revision every revision up to which is stored (or a recorded gap), when that was
    /// learnt, seconds since then while etcd moved on, and gaps recorded since start.
    pub pitr_covered_revision: Family<ClusterLabels, Gauge>,
    pub pitr_covered_time: Family<ClusterLabels, FloatGauge>,
    pub pitr_lag: Family<ClusterLabels, FloatGauge>,
    pub pitr_gaps: Family<ClusterLabels, Counter>,
    /// 1 when the latest check of the log against a full backup failed.
    pub pitr_verification_failed: Family<ClusterLabels, Gauge>,
    /// Members with a series in a per-member family other than `member_diverged` (reconnects, out of
    /// rotation, certificate expiry, predecessor use), per cluster, so deleting the cluster removes them.
    members_seen: std::sync::Mutex<std::collections::HashMap<String, std::collections::BTreeSet<String>>>,
    /// The members with a `member_diverged` series, per cluster, so they can be removed.
    checked_members: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("ferry");
        let m = Self {
            last_success: Family::default(),
            last_attempt: Family::default(),
            backups: Family::default(),
            // 1 s … ~4.5 h: small clusters take seconds, multi-GiB ones minutes to hours on thin links.
            duration: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            size: Family::default(),
            raw_size: Family::default(),
            agents_connected: Family::default(),
            etcd_reachable_agents: Family::default(),
            consecutive_failures: Family::default(),
            store_configuration_error: Gauge::default(),
            leader: Gauge::default(),
            state_store_writable: Gauge::default(),
            retention_deleted: Family::default(),
            store_verify_read: Counter::default(),
            interval: Family::default(),
            drill_last_success: Family::default(),
            drill_keys: Family::default(),
            drills: Family::default(),
            // 1 s … ~4.5 h, as backups: a drill reads and restores one.
            drill_duration: Histogram::new(exponential_buckets(1.0, 2.0, 15)),
            drill_interval: Family::default(),
            drill_failing: Family::default(),
            restore_in_progress: Family::default(),
            restore_started: Family::default(),
            restore_failed: Family::default(),
            restore_duration: Family::default(),
            restore_bytes: Family::default(),
            pitr_covered_revision: Family::default(),
            pitr_covered_time: Family::default(),
            pitr_lag: Family::default(),
            pitr_gaps: Family::default(),
            pitr_verification_failed: Family::default(),
            drill_key_drop: Family::default(),
            member_diverged: Family::default(),
            member_check_unreachable: Family::default(),
            member_out_of_rotation: Family::default(),
            agent_reconnects: Family::default(),
            member_check_compared: Family::default(),
            agent_certificate_expiry: Family::default(),
            admin_certificate_expiry: Family::default(),
            ca_certificate_expiry: FloatGauge::default(),
            agent_predecessor_used: Family::default(),
            checked_members: Default::default(),
            members_seen: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "backup_last_success_timestamp_seconds",
            "Unix time of the cluster's newest successful backup",
            m.last_success.clone(),
        );
        registry.register(
            "backup_last_attempt_timestamp_seconds",
            "Unix time of the cluster's latest backup attempt",
            m.last_attempt.clone(),
        );
        registry.register("backups", "Backups finished, by result (success or error)", m.backups.clone());
        registry.register("backup_duration_seconds", "Time from a backup's start to its commit", m.duration.clone());
        registry.register(
            "backup_size_bytes",
            "Stored (compressed) size of the cluster's latest backup",
            m.size.clone(),
        );
        registry.register(
            "backup_raw_size_bytes",
            "etcd snapshot size of the cluster's latest backup",
            m.raw_size.clone(),
        );
        registry.register("agents_connected", "Agents of the cluster connected now", m.agents_connected.clone());
        registry.register(
            "cluster_etcd_reachable_agents",
            "Connected agents of the cluster whose latest report reached etcd",
            m.etcd_reachable_agents.clone(),
        );
        registry.register(
            "backup_consecutive_failures",
            "Backups of the cluster failed in a row since its last success (0 after a success)",
            m.consecutive_failures.clone(),
        );
        registry.register(
            "point_in_time_covered_revision",
            "The change log holds every revision of the cluster up to this one (or recorded it as a gap)",
            m.pitr_covered_revision.clone(),
        );
        registry.register(
            "point_in_time_covered_timestamp_seconds",
            "Unix time the coordinator learnt the covered revision was stored",
            m.pitr_covered_time.clone(),
        );
        registry.register(
            "point_in_time_lag_seconds",
            "Seconds the cluster's newest changes have waited to be stored in the change log (0 while idle and covered)",
            m.pitr_lag.clone(),
        );
        registry.register(
            "point_in_time_verification_failed",
            "1 when the latest check of the change log against a full backup found a difference",
            m.pitr_verification_failed.clone(),
        );
        registry.register(
            "point_in_time_gaps",
            "Ranges of revisions the change log lost for good (each is closed by a full backup)",
            m.pitr_gaps.clone(),
        );
        registry.register(
            "store_configuration_error",
            "1 while the backup store is not usable",
            m.store_configuration_error.clone(),
        );
        registry.register(
            "coordinator_leader",
            "1 while this coordinator replica leads (schedules, runs backups, serves clients)",
            m.leader.clone(),
        );
        registry.register(
            "state_store_writable",
            "1 while the coordinator's state store can write (0: disk full or I/O errors; it recovers by itself)",
            m.state_store_writable.clone(),
        );
        registry.register(
            "store_verify_read_bytes",
            "Bytes of uploaded S3 objects read back to verify them before their manifest is written",
            m.store_verify_read.clone(),
        );
        registry.register(
            "retention_deleted",
            "Backups deleted by the cluster's retention policy",
            m.retention_deleted.clone(),
        );
        registry.register(
            "backup_interval_seconds",
            "The cluster's automatic backup period (absent when off)",
            m.interval.clone(),
        );
        registry.register(
            "restore_drill_last_success_timestamp_seconds",
            "Unix time of the cluster's latest restore drill that restored and read its newest backup",
            m.drill_last_success.clone(),
        );
        registry.register(
            "restore_drill_keys",
            "Keys the cluster's latest passed restore drill read from the restored etcd",
            m.drill_keys.clone(),
        );
        registry.register(
            "restore_in_progress",
            "1 while an orchestrated restore of the cluster runs",
            m.restore_in_progress.clone(),
        );
        registry.register(
            "restore_started_timestamp_seconds",
            "Unix time the running or last restore of the cluster started",
            m.restore_started.clone(),
        );
        registry.register("restore_failed", "1 when the cluster's last restore failed", m.restore_failed.clone());
        registry.register(
            "restore_duration_seconds",
            "Seconds the cluster's last finished restore took, from its request to verified",
            m.restore_duration.clone(),
        );
        registry.register(
            "restore_fetched_bytes",
            "Backup bytes the members of the running restore fetched so far",
            m.restore_bytes.clone(),
        );
        registry.register("restore_drills", "Restore drills, by result (success, warning or error)", m.drills.clone());
        registry.register(
            "restore_drill_duration_seconds",
            "Time a restore drill took (read, check, restore, read back)",
            m.drill_duration.clone(),
        );
        registry.register(
            "restore_drill_interval_seconds",
            "The cluster's restore drill period (absent when drills are off)",
            m.drill_interval.clone(),
        );
        registry.register(
            "restore_drill_failing",
            "1 while the cluster's latest restore drill failed",
            m.drill_failing.clone(),
        );
        registry.register(
            "restore_drill_key_drop",
            "1 while the cluster's latest restore drill read far fewer keys of a resource than the drill before",
            m.drill_key_drop.clone(),
        );
        registry.register(
            "etcd_member_diverged",
            "1 while the member's key space (HashKV) or etcd cluster ID differs from its cluster's majority",
            m.member_diverged.clone(),
        );
        registry.register(
            "etcd_member_check_unreachable_members",
            "Members that did not answer the latest HashKV comparison before a backup",
            m.member_check_unreachable.clone(),
        );
        registry.register(
            "etcd_member_check_compared",
            "1 when the latest check before a backup compared the members' HashKV, 0 when it could not (see membercheck in the status)",
            m.member_check_compared.clone(),
        );
        registry.register(
            "agent_reconnects",
            "Connections of an agent (cluster, member) after its first since the coordinator started",
            m.agent_reconnects.clone(),
        );
        registry.register(
            "member_out_of_rotation",
            "1 while the member is not chosen for backups because the store refused its last backups",
            m.member_out_of_rotation.clone(),
        );
        registry.register(
            "agent_certificate_expiry_timestamp_seconds",
            "Unix time the newest unrevoked certificate of the agent expires",
            m.agent_certificate_expiry.clone(),
        );
        registry.register(
            "admin_certificate_expiry_timestamp_seconds",
            "Unix time the full admin certificate expires (unrevoked ones)",
            m.admin_certificate_expiry.clone(),
        );
        registry.register(
            "ca_certificate_expiry_timestamp_seconds",
            "Unix time the coordinator's CA certificate expires",
            m.ca_certificate_expiry.clone(),
        );
        registry.register(
            "agent_predecessor_certificate_used",
            "Connections refused for presenting an agent certificate whose renewed successor is in use (an old copy: stolen?)",
            m.agent_predecessor_used.clone(),
        );
        Self { registry, ..m }
    }
}

impl Metrics {
    /// OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut s = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut s, &self.registry) {
            tracing::warn!("failed to encode metrics: {e}");
        }
        s
    }

    pub fn cluster(cluster: &str) -> ClusterLabels {
        ClusterLabels { cluster: cluster.to_string() }
    }

    pub fn result_named(cluster: &str, result: &str) -> ResultLabels {
        ResultLabels { cluster: cluster.to_string(), result: result.to_string() }
    }

    pub fn member(cluster: &str, member: &str) -> MemberLabels {
        MemberLabels { cluster: cluster.to_string(), member: member.to_string() }
    }

    pub fn result(cluster: &str, ok: bool) -> ResultLabels {
        ResultLabels { cluster: cluster.to_string(), result: if ok { "success" } else { "error" }.to_string() }
    }

    /// Automatic backups of `cluster` are off (or paused by an invalid configuration): no interval and no
    /// failure streak to show, so "overdue", "never succeeded" and "failing" alerts stop for it.
    pub fn clear_interval(&self, cluster: &str) {
        let labels = Self::cluster(cluster);
        self.interval.remove(&labels);
        self.consecutive_failures.remove(&labels);
    }

    /// `cluster` was deleted: every series labelled with it goes, so dashboards and alerts forget it.
    pub fn remove_cluster(&self, cluster: &str) {
        let l = Self::cluster(cluster);
        for family in [
            &self.last_success,
            &self.last_attempt,
            &self.interval,
            &self.drill_last_success,
            &self.drill_interval,
            &self.pitr_covered_time,
            &self.pitr_lag,
        ] {
            family.remove(&l);
        }
        for family in [
            &self.size,
            &self.raw_size,
            &self.agents_connected,
            &self.etcd_reachable_agents,
            &self.consecutive_failures,
            &self.drill_keys,
            &self.drill_failing,
            &self.drill_key_drop,
            &self.member_check_unreachable,
            &self.member_check_compared,
            &self.restore_in_progress,
            &self.restore_failed,
            &self.restore_bytes,
            &self.pitr_covered_revision,
            &self.pitr_verification_failed,
        ] {
            family.remove(&l);
        }
        self.restore_started.remove(&l);
        self.restore_duration.remove(&l);
        self.retention_deleted.remove(&l);
        self.pitr_gaps.remove(&l);
        for ok in [true, false] {
            self.backups.remove(&Self::result(cluster, ok));
        }
        for result in ["success", "warning", "error"] {
            self.drills.remove(&Self::result_named(cluster, result));
        }
        self.clear_members(cluster);
        let seen = crate::lock(&self.members_seen).remove(cluster).unwrap_or_default();
        for member in seen {
            let l = Self::member(cluster, &member);
            self.member_out_of_rotation.remove(&l);
            self.agent_certificate_expiry.remove(&l);
            self.agent_reconnects.remove(&l);
            self.agent_predecessor_used.remove(&l);
        }
    }

    /// The labels of `member` of `cluster` for a per-member family, remembered so that deleting the cluster
    /// removes its series ([`Self::remove_cluster`]).
    pub fn member_series(&self, cluster: &str, member: &str) -> MemberLabels {
        crate::lock(&self.members_seen).entry(cluster.to_string()).or_default().insert(member.to_string());
        Self::member(cluster, member)
    }

    /// Forgets every member series of `cluster`.
    pub fn clear_members(&self, cluster: &str) {
        let members = crate::lock(&self.checked_members).remove(cluster).unwrap_or_default();
        for member in members {
            self.member_diverged.remove(&Self::member(cluster, &member));
        }
    }

    /// Records a member check: `members` (every member checked) with whether each diverged; series of members
    /// no longer checked go.
    pub fn set_member_check(&self, cluster: &str, members: &[(String, bool)], unreachable: usize, compared: bool) {
        self.clear_members(cluster);
        self.member_check_compared.get_or_create(&Self::cluster(cluster)).set(i64::from(compared));
        for (member, diverged) in members {
            self.member_diverged.get_or_create(&Self::member(cluster, member)).set(i64::from(*diverged));
        }
        let names = members.iter().map(|(m, _)| m.clone()).collect();
        crate::lock(&self.checked_members).insert(cluster.to_string(), names);
        self.member_check_unreachable.get_or_create(&Self::cluster(cluster)).set(unreachable as i64);
    }
}

/// What `/metrics` and `/readyz` show: the metrics, whether the QUIC listener is up and whether the state
/// store can write.
pub struct Observer {
    pub metrics: Arc<Metrics>,
    /// Set once the QUIC listener is up.
    pub listening: AtomicBool,
    pub state: Arc<dyn StateStore>,
}

impl Observer {
    /// The state store's health, mirrored into its metric.
    fn state_health(&self) -> Result<(), String> {
        let h = self.state.health();
        self.metrics.state_store_writable.set(i64::from(h.is_ok()));
        h
    }
}

impl ferry_common::observe::Observed for Observer {
    fn metrics(&self) -> String {
        let _ = self.state_health();
        self.metrics.render()
    }

    fn leading(&self) -> Option<bool> {
        Some(self.metrics.leader.get() == 1)
    }

    fn ready(&self) -> Result<(), String> {
        self.state_health()?;
        if self.listening.load(Ordering::Relaxed) {
            Ok(())
        } else {
            Err("the QUIC listener is not up yet".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removed_cluster_leaves_no_series() {
        let m = Metrics::default();
        let l = Metrics::cluster("gone");
        m.last_success.get_or_create(&l).set(1.0);
        m.interval.get_or_create(&l).set(3600.0);
        m.size.get_or_create(&l).set(5);
        m.backups.get_or_create(&Metrics::result("gone", true)).inc();
        m.retention_deleted.get_or_create(&l).inc();
        m.interval.get_or_create(&Metrics::cluster("kept")).set(3600.0);
        assert!(m.render().contains("cluster=\"gone\""));
        m.remove_cluster("gone");
        let text = m.render();
        assert!(!text.contains("cluster=\"gone\""), "{text}");
        assert!(text.contains("cluster=\"kept\""), "{text}");
    }
}
