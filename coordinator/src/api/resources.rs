//! Resource requests: get, apply (with every document checked before any is written), delete, and agent
//! credentials (issue, revoke).

use std::time::Duration;

use ferry_common::protocol::{AdminResponse, ApplyOutcome, RevokeTarget};
use ferry_common::resources::{
    validate_name, BackupConfiguration, EtcdBackupS3ConfigSpec, EtcdManualBackupSpec, PointInTime, Resource,
    ResourceType, Selector, Spec, Timestamp, ENCRYPTION_CONFIG_ID, LABEL_CLUSTER, REDACTED, S3_CONFIG_ID,
};
use ferry_common::tls::Identity;
use tracing::{info, warn};

use super::backups::backup_resource;
use super::{Api, ApiError};
use crate::backup::{retention, Trigger};
use crate::schedule::plan;
use crate::store::S3Conn;

/// A manual backup's `backupat` must be this close to the coordinator's clock (the seed's rule), so that
/// re-applying an old file does not take a surprise backup.
const MANUAL_BACKUP_WINDOW_SECS: i64 = 60;
/// Bounds of an agent certificate's life: long enough to deploy it, short enough that a forgotten one dies.
const MIN_VALIDITY_SECS: u64 = 60;
const MAX_VALIDITY_SECS: u64 = 3650 * 86_400;
/// State operations per apply transaction: under etcd's default `--max-txn-ops` of 128.
const APPLY_BATCH_OPS: usize = 120;

type Result<T, E = ApiError> = std::result::Result<T, E>;

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(ApiError::Invalid(msg.into()))
}

/// A certificate's requested life must be within bounds.
fn check_validity(valid_for_seconds: u64) -> Result<()> {
    if !(MIN_VALIDITY_SECS..=MAX_VALIDITY_SECS).contains(&valid_for_seconds) {
        return invalid(format!(
            "--valid-for {valid_for_seconds}s is out of bounds; give between 1m and 3650d (default 90d)"
        ));
    }
    Ok(())
}

/// A cluster's `spec.backupconfiguration.pointintime`: the window within bounds (checked while the log is off
/// too, so that turning it on later cannot fail on a window applied long before).
fn check_point_in_time(cluster: &str, p: &PointInTime) -> Result<()> {
    let Some(w) = &p.window else { return Ok(()) };
    plan::point_in_time_window(w).or_else(|e| {
        invalid(format!(
            "cluster {cluster}: spec.backupconfiguration.pointintime.window {{seconds: {}, nanos: {}}} {e}; give \
             between 1h and 400d in whole seconds, e.g. window: {{seconds: {}}} (7 days, the default when absent)",
            w.seconds,
            w.nanos,
            PointInTime::DEFAULT_WINDOW_SECONDS
        ))
    })?;
    Ok(())
}

impl Api {
    pub(super) async fn get(
        &self,
        rt: ResourceType,
        id: Option<&str>,
        selector: Option<&Selector>,
    ) -> Result<Vec<Resource>> {
        let mut all = match rt {
            ResourceType::EtcdBackup => {
                // A cluster selector narrows the listing to one cluster instead of reading every manifest.
                let cluster = selector.filter(|s| s.key == LABEL_CLUSTER).map(|s| s.value.as_str());
                self.store.list(cluster, &self.cancel).await?.into_iter().map(backup_resource).collect()
            }
            ResourceType::Agent => self.agents.resources()?,
            _ => self.state.list(rt)?,
        };
        let state_health = self.state.health();
        for r in &mut all {
            match &mut r.spec {
                Spec::EtcdBackupS3Config(s) => r.spec = Spec::EtcdBackupS3Config(s.redacted()),
                // The overall status cannot record that its own store fails: it is said when read.
                Spec::EtcdBackupOverallStatus(s) => {
                    if let Err(why) = &state_health {
                        s.configurationerror = if s.configurationerror.is_empty() {
                            why.clone()
                        } else {
                            format!("{why}; {}", s.configurationerror)
                        };
                    }
                }
                _ => {}
            }
        }
        if let Some(sel) = selector {
            all.retain(|r| r.metadata.matches(sel));
        }
        if let Some(id) = id {
            all.retain(|r| r.metadata.id == id);
            if all.is_empty() {
                return Err(ApiError::NotFound(format!(
                    "{rt} {id:?} not found; list them with `ferryctl get {}`",
                    rt.plural().to_lowercase()
                )));
            }
        }
        Ok(all)
    }

    pub(super) async fn apply(&self, mut resources: Vec<Resource>) -> Result<Vec<ApplyOutcome>> {
        // Check every document before writing any, so a bad file changes nothing.
        let mut backups = Vec::new();
        let mut s3 = None;
        for r in &mut resources {
            let rt = r.resource_type();
            let id = &r.metadata.id;
            if !rt.user_writable() {
                return invalid(format!("{rt} is written by Ferry itself and cannot be applied"));
            }
            r.metadata.check_sizes().map_err(ApiError::Invalid)?;
            match &mut r.spec {
                Spec::EtcdManualBackup(spec) => {
                    if self.check_manual_backup(id, spec)? {
                        backups.push(id.clone());
                    }
                }
                Spec::Cluster(spec) => {
                    validate_name("cluster", id)?;
                    if let Some(r) = &spec.restorefrom {
                        validate_name("spec.restorefrom.cluster", &r.cluster)?;
                        if r.cluster == *id || r.members == 0 || r.members > 9 || r.backup.is_empty() {
                            return invalid(format!(
                                "cluster {id}: spec.restorefrom needs another cluster, a backup (an id or latest) and \
                                 the new cluster's member count (1 to 9)"
                            ));
                        }
                        crate::restore::plan::mode(&ferry_common::resources::EtcdRestoreSpec {
                            mode: r.mode.clone(),
                            ..Default::default()
                        })
                        .map_err(ApiError::Invalid)?;
                    }
                    if let Some(cfg) = &spec.backupconfiguration {
                        // Without an interval or schedule: manual backups only, with the other settings.
                        if cfg.is_automatic() || *cfg == BackupConfiguration::default() {
                            if let Err(e) = plan::plan(cfg, &self.settings.bounds) {
                                return invalid(format!("cluster {id}: {e}"));
                            }
                        }
                        if let Some(r) = &cfg.retention {
                            if let Err(e) = retention::check(r) {
                                return invalid(format!("cluster {id}: {e}"));
                            }
                        }
                        if let Some(e) = &cfg.encryption {
                            let what = format!("cluster {id}: spec.backupconfiguration.encryption.recipients");
                            crate::encryption::check_settings(&what, e).or_else(invalid)?;
                        }
                        if let Some(p) = &cfg.pointintime {
                            check_point_in_time(id, p)?;
                        }
                    }
                }
                Spec::EtcdBackupS3Config(spec) => {
                    if s3.is_some() {
                        return invalid("the input holds two EtcdBackupS3Configs; apply one");
                    }
                    s3 = Some(self.check_s3_config(id, spec).await?);
                }
                Spec::EtcdBackupEncryptionConfig(spec) => {
                    if id != ENCRYPTION_CONFIG_ID {
                        return invalid(format!(
                            "the encryption config's id must be {ENCRYPTION_CONFIG_ID:?}, not {id:?}"
                        ));
                    }
                    crate::encryption::check_settings("spec.recipients", spec).or_else(invalid)?;
                }
                Spec::EtcdRestore(spec) => self.check_restore(id, spec).await?,
                _ => return invalid(format!("{rt} cannot be applied")),
            }
        }
        if backups.iter().enumerate().any(|(i, c)| backups[..i].contains(c)) {
            return invalid("the input asks for two manual backups of the same cluster; apply one");
        }
        if resources.iter().any(|r| r.resource_type() == ResourceType::EtcdBackupS3Config) {
            self.status.set_configuration("", true)?;
        }
        // Written in batches, each one state transaction: one commit (one fsync) for many documents rather than
        // one per document, and within etcd's default limit of 128 operations per transaction.
        let mut out = Vec::new();
        let mut batch = Vec::new();
        let mut ops = 0;
        let mut resources = resources.into_iter().peekable();
        while let Some(r) = resources.next() {
            // The record, plus at worst every label's index entry removed and added.
            ops += 1 + 2 * r.metadata.labels.len();
            batch.push(r);
            let full = resources.peek().is_none_or(|n| ops + 1 + 2 * n.metadata.labels.len() > APPLY_BATCH_OPS);
            if full {
                out.extend(self.apply_batch(std::mem::take(&mut batch))?);
                ops = 0;
            }
        }
        if let Some(conn) = s3 {
            self.store.set_s3_config(conn);
            info!("S3 configuration applied; the next backup uses it");
            self.store.retry_pending_aborts(&self.cancel).await;
        }
        for cluster in backups {
            self.jobs.start(&cluster, Trigger::Manual)?;
        }
        Ok(out)
    }

    /// Writes checked resources in one state transaction; what each became.
    fn apply_batch(&self, batch: Vec<Resource>) -> Result<Vec<ApplyOutcome>> {
        let mut out = Vec::new();
        self.state.transact(&mut |tx| {
            out.clear();
            for r in &batch {
                let (rt, id) = (r.resource_type(), r.metadata.id.clone());
                let old = tx.get(rt, &id)?;
                let outcome = match &old {
                    Some(o) if o.spec == r.spec && o.metadata.labels == r.metadata.labels => {
                        out.push(ApplyOutcome::Unchanged { rt, id });
                        continue;
                    }
                    Some(_) => ApplyOutcome::Updated { rt, id },
                    None => ApplyOutcome::Created { rt, id },
                };
                let mut r = r.clone();
                if let Some(o) = old {
                    r.metadata.created = o.metadata.created;
                }
                tx.put(r)?;
                out.push(outcome);
            }
            Ok(())
        })?;
        for o in &out {
            if let ApplyOutcome::Created { rt, id } | ApplyOutcome::Updated { rt, id } = o {
                info!(%rt, %id, "applied");
            }
        }
        Ok(out)
    }

    /// Validates an S3 config by listing its bucket with exactly its settings. Every attempt is counted in the
    /// overall status; a failing one leaves the stored config as it was.
    async fn check_s3_config(&self, id: &str, spec: &mut EtcdBackupS3ConfigSpec) -> Result<S3Conn> {
        if !self.store.takes_s3_config() {
            return invalid(format!(
                "this coordinator runs with --backup-store {}; restart it with --backup-store s3 to use an S3 config",
                self.store.name()
            ));
        }
        if id != S3_CONFIG_ID {
            return invalid(format!("the S3 config's id must be {S3_CONFIG_ID:?}, not {id:?}"));
        }
        // `get -o yaml` shows secrets as ***: re-applying that output keeps the stored secrets.
        if spec.secretaccesskey == REDACTED || spec.sessiontoken == REDACTED {
            let Some(Resource { spec: Spec::EtcdBackupS3Config(old), .. }) =
                self.state.get(ResourceType::EtcdBackupS3Config, id)?
            else {
                return invalid("secretaccesskey is *** but no secret is stored yet; give the real secret");
            };
            // A stored secret goes only where it went before: *** with another endpoint, bucket or key id would
            // send it to whoever runs that endpoint.
            let moved: Vec<&str> = [
                ("endpoint", spec.endpoint != old.endpoint),
                ("bucket", spec.bucket != old.bucket),
                ("accesskeyid", spec.accesskeyid != old.accesskeyid),
            ]
            .into_iter()
            .filter_map(|(field, changed)| changed.then_some(field))
            .collect();
            if !moved.is_empty() {
                return invalid(format!(
                    "the stored secrets are kept only for the same endpoint, bucket and key id, and this config \
                     changes {}; give secretaccesskey (and sessiontoken, if any) in full instead of ***",
                    moved.join(", ")
                ));
            }
            if spec.secretaccesskey == REDACTED {
                spec.secretaccesskey = old.secretaccesskey;
            }
            if spec.sessiontoken == REDACTED {
                spec.sessiontoken = old.sessiontoken;
            }
        }
        if spec.endpoint.trim_start().to_ascii_lowercase().starts_with("http://") {
            // Allowed (test rigs, a store on the same host), but presigned URLs are bearer tokens on the wire.
            warn!(
                endpoint = %spec.endpoint,
                "the S3 endpoint is plain http: the presigned URLs agents send to it can be read and replayed by \
                 anyone on the path until they expire; use https"
            );
        }
        let current_error = self.status.configuration_error()?;
        match self.store.check_s3_config(spec).await {
            Ok(conn) => Ok(conn),
            Err(msg) => {
                self.status.set_configuration(&current_error, true)?;
                invalid(format!("S3 config not applied, the stored one is unchanged: {msg}"))
            }
        }
    }

    /// Validates a manual backup request; `true` if it asks for a new backup (not a re-apply of the same one).
    fn check_manual_backup(&self, cluster: &str, spec: &EtcdManualBackupSpec) -> Result<bool> {
        let at = spec.backupat;
        if at.nanos != 0 {
            return invalid(format!("spec.backupat.nanos must be 0, got {}; set backupat to whole seconds", at.nanos));
        }
        let now = Timestamp::now().seconds;
        // i128: `seconds` near i64::MIN must not wrap to a skew of zero.
        let skew = i128::from(at.seconds) - i128::from(now);
        if skew.unsigned_abs() > MANUAL_BACKUP_WINDOW_SECS as u128 {
            return invalid(format!(
                "spec.backupat.seconds {} is {}s {} the coordinator's clock; it must be within one minute of now ({now}): set it to the current time, e.g. $(date +%s)",
                at.seconds,
                skew.unsigned_abs(),
                if skew < 0 { "behind" } else { "ahead of" },
            ));
        }
        validate_name("cluster", cluster)?;
        if !self.agents.cluster_known(cluster)? {
            return Err(ApiError::NotFound(format!(
                "no agent of cluster {cluster:?} ever registered; start ferry-agent with credentials for it (`ferryctl agent-credentials --cluster {cluster} …`) and check `ferryctl get agents`"
            )));
        }
        if let Some(Resource { spec: Spec::EtcdManualBackup(old), .. }) =
            self.state.get(ResourceType::EtcdManualBackup, cluster)?
        {
            if old.backupat == at {
                return Ok(false);
            }
        }
        let store_error = self.status.configuration_error()?;
        if !store_error.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "the {} backup store is not usable ({store_error}); fix its configuration first (`ferryctl get etcdbackupoverallstatus`)",
                self.store.name()
            )));
        }
        if self.jobs.is_running(cluster) {
            return Err(ApiError::Conflict(format!(
                "a backup of cluster {cluster} is already running; wait for it (`ferryctl get etcdbackupstatus {cluster}`)"
            )));
        }
        Ok(true)
    }

    pub(super) fn delete(&self, rt: ResourceType, id: &str) -> Result<()> {
        if rt == ResourceType::Agent {
            return self.delete_agent(id);
        }
        if !rt.user_writable() {
            return invalid(format!("{rt} is written by Ferry itself and cannot be deleted"));
        }
        if rt == ResourceType::EtcdRestore {
            self.check_restore_delete(id)?;
        }
        if !self.state.delete(rt, id)? {
            return Err(ApiError::NotFound(format!("{rt} {id:?} not found")));
        }
        info!(%rt, %id, "deleted");
        Ok(())
    }

    /// Removes a gone member's `Agents` record; refused while that agent is connected.
    fn delete_agent(&self, id: &str) -> Result<()> {
        let Some((cluster, member)) = id.split_once('/') else {
            return invalid(format!("agent id {id:?} is not CLUSTER/MEMBER; list them with `ferryctl get agents`"));
        };
        validate_name("cluster", cluster)?;
        validate_name("member", member)?;
        if self.agents.live(cluster).iter().any(|a| a.member == member) {
            return Err(ApiError::Conflict(format!(
                "agent {id} is connected; stop it and revoke its credentials (`ferryctl agent-credentials revoke --cluster {cluster} --member {member}`) before deleting its record"
            )));
        }
        if !self.state.delete(ResourceType::Agent, id)? {
            return Err(ApiError::NotFound(format!("agent {id:?} not found; list them with `ferryctl get agents`")));
        }
        info!(%id, "deleted agent record");
        Ok(())
    }

    /// Issues and records an admin certificate, read-only (`ferry://admin-ro`) or full (`ferry://admin`).
    pub(super) fn issue_admin(&self, read_only: bool, valid_for_seconds: u64) -> Result<AdminResponse> {
        check_validity(valid_for_seconds)?;
        let identity = if read_only { Identity::AdminReadOnly } else { Identity::Admin };
        let issued = self
            .credentials
            .authority()
            .get()
            .signer()
            .issue_expiring(&identity, Duration::from_secs(valid_for_seconds))
            .map_err(|e| ApiError::Internal(format!("issue admin certificate: {e}")))?;
        self.credentials.record_admin(&issued.serial, read_only, issued.not_after)?;
        info!(serial = %issued.serial, read_only, "issued admin credentials");
        Ok(self.credentials_response(issued))
    }

    pub(super) fn revoke_admin(&self, serial: &str) -> Result<AdminResponse> {
        if self.credentials.admin_revoked(serial)?.is_none() {
            return Err(ApiError::NotFound(format!(
                "no admin certificate with serial {serial:?}; list them with `ferryctl get admincredentials`"
            )));
        }
        let revoked = self.credentials.revoke_admin(serial)?;
        Ok(AdminResponse::Revoked(if revoked { vec![serial.to_string()] } else { Vec::new() }))
    }

    /// The answer to a credentials request: the CA and the new certificate and key.
    fn credentials_response(&self, issued: ferry_common::tls::IssuedCert) -> AdminResponse {
        AdminResponse::Credentials {
            ca_pem: self.credentials.ca_pem(),
            cert_pem: issued.pem.cert_pem,
            key_pem: issued.pem.key_pem,
            serial: issued.serial,
            not_after: Timestamp::from(issued.not_after),
        }
    }

    pub(super) fn issue_credentials(
        &self,
        cluster: &str,
        member: &str,
        valid_for_seconds: u64,
    ) -> Result<AdminResponse> {
        validate_name("cluster", cluster)?;
        validate_name("member", member)?;
        check_validity(valid_for_seconds)?;
        let issued = self
            .credentials
            .authority()
            .get()
            .signer()
            .issue_agent(cluster, member, Duration::from_secs(valid_for_seconds))
            .map_err(|e| ApiError::Internal(format!("issue agent certificate: {e}")))?;
        let revoked = self.credentials.record(cluster, member, &issued)?;
        info!(%cluster, %member, serial = %issued.serial, ?revoked, "issued agent credentials");
        Ok(self.credentials_response(issued))
    }

    pub(super) fn revoke_credentials(&self, target: &RevokeTarget) -> Result<AdminResponse> {
        match target {
            RevokeTarget::Member { cluster, member } => {
                validate_name("cluster", cluster)?;
                validate_name("member", member)?;
            }
            RevokeTarget::Serial(serial) => {
                if !self.credentials.known(serial)? {
                    return Err(ApiError::NotFound(format!(
                        "no agent certificate with serial {serial:?}; list them with `ferryctl get agentcredentials`"
                    )));
                }
            }
        }
        Ok(AdminResponse::Revoked(self.credentials.revoke(target)?))
    }
}

#[cfg(test)]
mod tests {
    use ferry_common::resources::ProtoDuration;

    use super::*;

    fn window(seconds: i64, nanos: i32) -> PointInTime {
        PointInTime { enabled: true, window: Some(ProtoDuration { seconds, nanos }) }
    }

    fn refusal(p: &PointInTime) -> String {
        match check_point_in_time("prod", p) {
            Err(ApiError::Invalid(m)) => m,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_point_in_time_window_within_an_hour_to_400_days_is_taken() {
        assert!(check_point_in_time("prod", &PointInTime { enabled: true, window: None }).is_ok());
        assert!(check_point_in_time("prod", &window(3600, 0)).is_ok());
        assert!(check_point_in_time("prod", &window(400 * 86_400, 0)).is_ok());
        // A window kept while the log is off is fine.
        assert!(check_point_in_time("prod", &PointInTime { enabled: false, ..window(86_400, 0) }).is_ok());
    }

    #[test]
    fn a_point_in_time_window_out_of_bounds_is_refused_saying_what_to_give() {
        for (p, why) in [
            (window(1800, 0), "30m is shorter than 1h"),
            (window(401 * 86_400, 0), "longer than 400d"),
            (window(7200, 500), "nanos 500"),
            (window(-5, 0), "negative"),
            (PointInTime { enabled: false, ..window(60, 0) }, "shorter than 1h"),
        ] {
            let m = refusal(&p);
            for needle in
                ["cluster prod", "spec.backupconfiguration.pointintime.window", why, "between 1h and 400d", "604800"]
            {
                assert!(m.contains(needle), "{needle:?} not in {m:?}");
            }
        }
    }
}
