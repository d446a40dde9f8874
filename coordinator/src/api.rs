//! ferryctl's requests: get, apply, delete, agent credentials and backup download.

use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_common::protocol::{
    write_frame, AdminRequest, AdminResponse, ApplyOutcome, RestoreSource, S3Target, DATA_CHUNK,
};
use ferry_common::resources::{
    validate_name, EtcdBackupS3ConfigSpec, EtcdManualBackupSpec, Metadata, Resource, ResourceType, Selector, Spec,
    Timestamp, LABEL_CLUSTER, REDACTED, S3_CONFIG_ID,
};
use ferry_common::tls::Identity;
use quinn::SendStream;
use tracing::info;

use crate::backup::Trigger;
use crate::coordinator::Coordinator;
use crate::s3_store::{S3Conn, S3Store};
use crate::store::{BackupStore, Manifest};
use crate::{retention, schedule};

/// A manual backup's `backupat` must be this close to the coordinator's clock (the seed's rule), so that
/// re-applying an old file does not take a surprise backup.
const MANUAL_BACKUP_WINDOW_SECS: i64 = 60;

/// Answers one request on `send`. Agents may only ask where to restore their own cluster from.
pub async fn handle(
    coord: &Arc<Coordinator>,
    identity: &Identity,
    request: AdminRequest,
    send: &mut SendStream,
) -> Result<()> {
    if let Identity::Agent { cluster, .. } = identity {
        let AdminRequest::Restore { cluster: wanted, backup } = request else {
            let message = "an agent certificate may only restore its own cluster's backups".to_string();
            return reply_error(send, message).await;
        };
        if let Some(w) = wanted.filter(|w| w != cluster) {
            let message = format!(
                "an agent of cluster {cluster} may only restore cluster {cluster}'s backups, not {w}'s; seeding a cluster from another cluster's backup takes an admin credential (--ferryconfig admin.ferryconfig --from-cluster {w})"
            );
            return reply_error(send, message).await;
        }
        return restore(coord, cluster, &backup, send).await;
    }
    let response = match request {
        AdminRequest::Download { cluster, backup_id } => return download(coord, &cluster, &backup_id, send).await,
        AdminRequest::Restore { cluster: Some(cluster), backup } => {
            return restore(coord, &cluster, &backup, send).await
        }
        AdminRequest::Restore { cluster: None, .. } => Err(Refused(
            "restoring with an admin credential needs the cluster to restore from (--from-cluster NAME)".into(),
        )
        .into()),
        AdminRequest::Get { rt, id, selector } => {
            get(coord, rt, id.as_deref(), selector.as_ref()).await.map(AdminResponse::Resources)
        }
        AdminRequest::Apply { resources } => apply(coord, resources).await.map(AdminResponse::Applied),
        AdminRequest::Delete { rt, id } => delete(coord, rt, &id).map(|()| AdminResponse::Deleted),
        AdminRequest::AgentCredentials { cluster, member } => credentials(coord, &cluster, &member),
    };
    let response = response.unwrap_or_else(|e| AdminResponse::Error { message: format!("{e:#}") });
    write_frame(send, &response).await.context("send response")
}

/// Answers the request with an error message (what is wrong and what to do).
async fn reply_error(send: &mut SendStream, message: String) -> Result<()> {
    write_frame(send, &AdminResponse::Error { message }).await.context("send response")
}

/// A request the user must fix; its message goes back to ferryctl as is.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

fn refuse<T>(msg: impl Into<String>) -> Result<T> {
    Err(Refused(msg.into()).into())
}

fn backup_resource(m: Manifest) -> Resource {
    let mut meta = Metadata::new(ResourceType::EtcdBackup, m.id);
    meta.labels.insert(LABEL_CLUSTER.into(), m.backup.cluster.clone());
    meta.created = Some(m.backup.createdat);
    meta.updated = Some(m.backup.createdat);
    meta.version = 1;
    Resource { metadata: meta, spec: Spec::EtcdBackup(m.backup) }
}

async fn get(
    coord: &Arc<Coordinator>,
    rt: ResourceType,
    id: Option<&str>,
    selector: Option<&Selector>,
) -> Result<Vec<Resource>> {
    let mut all = match rt {
        ResourceType::EtcdBackup => {
            // A cluster selector narrows the listing to one cluster instead of reading every manifest.
            let cluster = selector.filter(|s| s.key == LABEL_CLUSTER).map(|s| s.value.as_str());
            coord.store.list(cluster, &coord.cancel).await?.into_iter().map(backup_resource).collect()
        }
        ResourceType::Agent => coord.agent_resources()?,
        _ => coord.state.list(rt)?,
    };
    for r in &mut all {
        if let Spec::EtcdBackupS3Config(s) = &r.spec {
            r.spec = Spec::EtcdBackupS3Config(s.redacted());
        }
    }
    if let Some(sel) = selector {
        all.retain(|r| r.metadata.matches(sel));
    }
    if let Some(id) = id {
        all.retain(|r| r.metadata.id == id);
        if all.is_empty() {
            return refuse(format!(
                "{rt} {id:?} not found; list them with `ferryctl get {}`",
                rt.plural().to_lowercase()
            ));
        }
    }
    Ok(all)
}

async fn apply(coord: &Arc<Coordinator>, mut resources: Vec<Resource>) -> Result<Vec<ApplyOutcome>> {
    // Check every document before writing any, so a bad file changes nothing.
    let mut backups = Vec::new();
    let mut s3 = None;
    for r in &mut resources {
        let rt = r.resource_type();
        let id = &r.metadata.id;
        if !rt.user_writable() {
            return refuse(format!("{rt} is written by Ferry itself and cannot be applied"));
        }
        match &mut r.spec {
            Spec::EtcdManualBackup(spec) => {
                if check_manual_backup(coord, id, spec)? {
                    backups.push(id.clone());
                }
            }
            Spec::Cluster(spec) => {
                validate_name("cluster", id)?;
                if let Some(cfg) = &spec.backupconfiguration {
                    if let Err(e) = schedule::plan(cfg, &coord.settings.bounds) {
                        return refuse(format!("cluster {id}: {e}"));
                    }
                    if let Some(r) = &cfg.retention {
                        if let Err(e) = retention::check(r) {
                            return refuse(format!("cluster {id}: {e}"));
                        }
                    }
                }
            }
            Spec::EtcdBackupS3Config(spec) => {
                if s3.is_some() {
                    return refuse("the input holds two EtcdBackupS3Configs; apply one");
                }
                s3 = Some(check_s3_config(coord, id, spec).await?);
            }
            _ => return refuse(format!("{rt} cannot be applied")),
        }
    }
    if backups.iter().enumerate().any(|(i, c)| backups[..i].contains(c)) {
        return refuse("the input asks for two manual backups of the same cluster; apply one");
    }
    let mut out = Vec::new();
    for r in resources {
        let rt = r.resource_type();
        let id = r.metadata.id.clone();
        let old = coord.state.get(rt, &id)?;
        if rt == ResourceType::EtcdBackupS3Config {
            coord.set_configuration_status("", true)?;
        }
        let outcome = match &old {
            Some(o) if o.spec == r.spec && o.metadata.labels == r.metadata.labels => {
                out.push(ApplyOutcome::Unchanged { rt, id });
                continue;
            }
            Some(_) => ApplyOutcome::Updated { rt, id: id.clone() },
            None => ApplyOutcome::Created { rt, id: id.clone() },
        };
        let mut r = r;
        if let Some(o) = old {
            r.metadata.created = o.metadata.created;
        }
        coord.state.put(r)?;
        info!(%rt, %id, "applied");
        out.push(outcome);
    }
    if let (Some(conn), BackupStore::S3(store)) = (s3, &coord.store) {
        store.set(conn);
        info!("S3 configuration applied; the next backup uses it");
        store.retry_pending_aborts().await;
    }
    for cluster in backups {
        crate::backup::start(coord, &cluster, Trigger::Manual)?;
    }
    Ok(out)
}

/// Validates an S3 config by listing its bucket with exactly its settings. Every attempt is counted in the
/// overall status; a failing one leaves the stored config as it was.
async fn check_s3_config(coord: &Arc<Coordinator>, id: &str, spec: &mut EtcdBackupS3ConfigSpec) -> Result<S3Conn> {
    if !matches!(coord.store, BackupStore::S3(_)) {
        return refuse(format!(
            "this coordinator runs with --backup-store {}; restart it with --backup-store s3 to use an S3 config",
            coord.store.name()
        ));
    }
    if id != S3_CONFIG_ID {
        return refuse(format!("the S3 config's id must be {S3_CONFIG_ID:?}, not {id:?}"));
    }
    // `get -o yaml` shows secrets as ***: re-applying that output keeps the stored secrets.
    if spec.secretaccesskey == REDACTED || spec.sessiontoken == REDACTED {
        let Some(Resource { spec: Spec::EtcdBackupS3Config(old), .. }) =
            coord.state.get(ResourceType::EtcdBackupS3Config, id)?
        else {
            return refuse("secretaccesskey is *** but no secret is stored yet; give the real secret");
        };
        if spec.secretaccesskey == REDACTED {
            spec.secretaccesskey = old.secretaccesskey;
        }
        if spec.sessiontoken == REDACTED {
            spec.sessiontoken = old.sessiontoken;
        }
    }
    let current_error = coord.configuration_error()?;
    match S3Store::validate(spec).await {
        Ok(conn) => Ok(conn),
        Err(msg) => {
            coord.set_configuration_status(&current_error, true)?;
            refuse(format!("S3 config not applied, the stored one is unchanged: {msg}"))
        }
    }
}

/// Validates a manual backup request; `true` if it asks for a new backup (not a re-apply of the same one).
fn check_manual_backup(coord: &Arc<Coordinator>, cluster: &str, spec: &EtcdManualBackupSpec) -> Result<bool> {
    let at = spec.backupat;
    if at.nanos != 0 {
        return refuse(format!("spec.backupat.nanos must be 0, got {}; set backupat to whole seconds", at.nanos));
    }
    let now = Timestamp::now().seconds;
    let skew = at.seconds - now;
    if skew.abs() > MANUAL_BACKUP_WINDOW_SECS {
        return refuse(format!(
            "spec.backupat.seconds {} is {}s {} the coordinator's clock; it must be within one minute of now ({now}): set it to the current time, e.g. $(date +%s)",
            at.seconds,
            skew.abs(),
            if skew < 0 { "behind" } else { "ahead of" },
        ));
    }
    validate_name("cluster", cluster)?;
    if !coord.cluster_known(cluster)? {
        return refuse(format!(
            "no agent of cluster {cluster:?} ever registered; start ferry-agent with credentials for it (`ferryctl agent-credentials --cluster {cluster} …`) and check `ferryctl get agents`"
        ));
    }
    if let Some(Resource { spec: Spec::EtcdManualBackup(old), .. }) =
        coord.state.get(ResourceType::EtcdManualBackup, cluster)?
    {
        if old.backupat == at {
            return Ok(false);
        }
    }
    let store_error = coord.configuration_error()?;
    if !store_error.is_empty() {
        return refuse(format!(
            "the {} backup store is not usable ({store_error}); fix its configuration first (`ferryctl get etcdbackupoverallstatus`)",
            coord.store.name()
        ));
    }
    if coord.is_running(cluster) {
        return refuse(format!(
            "a backup of cluster {cluster} is already running; wait for it (`ferryctl get etcdbackupstatus {cluster}`)"
        ));
    }
    Ok(true)
}

fn delete(coord: &Arc<Coordinator>, rt: ResourceType, id: &str) -> Result<()> {
    if !rt.user_writable() {
        return refuse(format!("{rt} is written by Ferry itself and cannot be deleted"));
    }
    if !coord.state.delete(rt, id)? {
        return refuse(format!("{rt} {id:?} not found"));
    }
    info!(%rt, %id, "deleted");
    Ok(())
}

fn credentials(coord: &Arc<Coordinator>, cluster: &str, member: &str) -> Result<AdminResponse> {
    let pem = coord.ca.issue_client(&Identity::Agent { cluster: cluster.into(), member: member.into() })?;
    info!(%cluster, %member, "issued agent credentials");
    Ok(AdminResponse::Credentials {
        ca_pem: coord.ca.pem().cert_pem.clone(),
        cert_pem: pem.cert_pem,
        key_pem: pem.key_pem,
    })
}

/// Finds a backup by id, or the newest with `latest`.
async fn resolve(coord: &Arc<Coordinator>, cluster: &str, backup_id: &str) -> Result<Manifest> {
    let found = if backup_id == "latest" {
        coord.store.list(Some(cluster), &coord.cancel).await?.into_iter().next()
    } else {
        coord.store.find(cluster, backup_id, &coord.cancel).await?
    };
    found.ok_or_else(|| {
        Refused(format!(
            "backup {backup_id:?} of cluster {cluster:?} not found; list them with `ferryctl get etcdbackup --selector {LABEL_CLUSTER}={cluster}`"
        ))
        .into()
    })
}

/// Streams a backup's stored bytes as `Data` frames and ends with `DownloadEnd`.
async fn stream_object(coord: &Arc<Coordinator>, manifest: &Manifest, send: &mut SendStream) -> Result<()> {
    let mut object = match coord.store.open(manifest).await {
        Ok(o) => o,
        Err(e) => return reply_error(send, format!("{e:#}")).await,
    };
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let piece = match object.next(&mut buf).await {
            Ok(Some(p)) => p,
            Ok(None) => break,
            Err(e) => {
                let message = format!("read backup: {e:#}");
                return reply_error(send, message).await;
            }
        };
        for chunk in piece.chunks(DATA_CHUNK) {
            write_frame(send, &AdminResponse::Data(chunk.to_vec())).await.context("send backup data")?;
        }
    }
    write_frame(send, &AdminResponse::DownloadEnd).await.context("send response")
}

async fn download(coord: &Arc<Coordinator>, cluster: &str, backup_id: &str, send: &mut SendStream) -> Result<()> {
    let manifest = match resolve(coord, cluster, backup_id).await {
        Ok(m) => m,
        Err(e) => return reply_error(send, format!("{e:#}")).await,
    };
    write_frame(send, &AdminResponse::DownloadStart(Box::new(backup_resource(manifest.clone())))).await?;
    stream_object(coord, &manifest, send).await
}

/// Tells a restoring agent where its backup is: the bytes on this stream (local store), or the S3 object and
/// the credentials to read it, for this restore only.
async fn restore(coord: &Arc<Coordinator>, cluster: &str, backup_id: &str, send: &mut SendStream) -> Result<()> {
    let manifest = match resolve(coord, cluster, backup_id).await {
        Ok(m) => m,
        Err(e) => return reply_error(send, format!("{e:#}")).await,
    };
    info!(%cluster, backup_id = %manifest.id, "restore requested");
    let download_limit_bps = coord.settings.download_limit_bps;
    // TODO(issue 12, after the coordinator layout): the highest revision seen, pinned per restore.
    let highest_revision = None;
    let backup = Box::new(backup_resource(manifest.clone()));
    match &coord.store {
        BackupStore::Local(_) => {
            write_frame(
                send,
                &AdminResponse::RestoreFrom {
                    backup,
                    source: RestoreSource::Coordinator,
                    download_limit_bps,
                    highest_revision,
                },
            )
            .await?;
            stream_object(coord, &manifest, send).await
        }
        BackupStore::S3(s3) => {
            let conn = match s3.conn() {
                Ok(c) => c,
                Err(e) => return reply_error(send, format!("{e:#}")).await,
            };
            let target = S3Target {
                config: conn.spec.clone(),
                key: manifest.backup.snapshot.clone(),
                part_size: coord.settings.part_size,
                parts_in_flight: coord.settings.parts_in_flight,
            };
            let source = RestoreSource::S3(Box::new(target));
            write_frame(send, &AdminResponse::RestoreFrom { backup, source, download_limit_bps, highest_revision })
                .await
                .context("send response")
        }
    }
}
