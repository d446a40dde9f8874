//! ferryctl's requests: get, apply, delete, agent credentials and backup download.

use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_common::protocol::{write_frame, AdminRequest, AdminResponse, ApplyOutcome, DATA_CHUNK};
use ferry_common::resources::{
    validate_name, EtcdManualBackupSpec, Metadata, Resource, ResourceType, Selector, Spec, Timestamp, LABEL_CLUSTER,
};
use ferry_common::tls::Identity;
use quinn::SendStream;
use tokio::io::AsyncReadExt;
use tracing::info;

use crate::coordinator::Coordinator;
use crate::local_store::Manifest;

/// A manual backup's `backupat` must be this close to the coordinator's clock (the seed's rule), so that
/// re-applying an old file does not take a surprise backup.
const MANUAL_BACKUP_WINDOW_SECS: i64 = 60;

/// Answers one admin request on `send`.
pub async fn handle(coord: &Arc<Coordinator>, request: AdminRequest, send: &mut SendStream) -> Result<()> {
    let response = match request {
        AdminRequest::Download { cluster, backup_id } => return download(coord, &cluster, &backup_id, send).await,
        AdminRequest::Get { rt, id, selector } => {
            get(coord, rt, id.as_deref(), selector.as_ref()).map(AdminResponse::Resources)
        }
        AdminRequest::Apply { resources } => apply(coord, resources).map(AdminResponse::Applied),
        AdminRequest::Delete { rt, id } => delete(coord, rt, &id).map(|()| AdminResponse::Deleted),
        AdminRequest::AgentCredentials { cluster, member } => credentials(coord, &cluster, &member),
    };
    let response = response.unwrap_or_else(|e| AdminResponse::Error { message: format!("{e:#}") });
    write_frame(send, &response).await.context("send response")
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

fn get(
    coord: &Arc<Coordinator>,
    rt: ResourceType,
    id: Option<&str>,
    selector: Option<&Selector>,
) -> Result<Vec<Resource>> {
    let mut all = match rt {
        ResourceType::EtcdBackup => {
            // A cluster selector narrows the listing to one directory instead of reading every manifest.
            let cluster = selector.filter(|s| s.key == LABEL_CLUSTER).map(|s| s.value.as_str());
            coord.store.list(cluster)?.into_iter().map(backup_resource).collect()
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

fn apply(coord: &Arc<Coordinator>, resources: Vec<Resource>) -> Result<Vec<ApplyOutcome>> {
    // Check every document before writing any, so a bad file changes nothing.
    let mut backups = Vec::new();
    for r in &resources {
        let rt = r.resource_type();
        let id = &r.metadata.id;
        if !rt.user_writable() {
            return refuse(format!("{rt} is written by Ferry itself and cannot be applied"));
        }
        match &r.spec {
            Spec::EtcdManualBackup(spec) => {
                if check_manual_backup(coord, id, spec)? {
                    backups.push(id.clone());
                }
            }
            Spec::Cluster(_) => validate_name("cluster", id)?,
            Spec::EtcdBackupS3Config(_) => {
                return refuse(format!(
                    "this coordinator uses the {} backup store; the S3 store is not available in this version",
                    coord.settings.store_name
                ))
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
    for cluster in backups {
        crate::backup::start(coord, &cluster)?;
    }
    Ok(out)
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

async fn download(coord: &Arc<Coordinator>, cluster: &str, backup_id: &str, send: &mut SendStream) -> Result<()> {
    let manifest = match coord.store.find(cluster, backup_id) {
        Ok(Some(m)) => m,
        Ok(None) => {
            let message = format!(
                "backup {backup_id:?} of cluster {cluster:?} not found; list them with `ferryctl get etcdbackup --selector {LABEL_CLUSTER}={cluster}`"
            );
            return write_frame(send, &AdminResponse::Error { message }).await.context("send response");
        }
        Err(e) => {
            return write_frame(send, &AdminResponse::Error { message: format!("{e:#}") })
                .await
                .context("send response")
        }
    };
    let mut file = coord.store.open_object(&manifest).await?;
    write_frame(send, &AdminResponse::DownloadStart(Box::new(backup_resource(manifest)))).await?;
    let mut buf = vec![0u8; DATA_CHUNK];
    loop {
        let n = file.read(&mut buf).await.context("read backup object")?;
        if n == 0 {
            break;
        }
        write_frame(send, &AdminResponse::Data(buf[..n].to_vec())).await.context("send backup data")?;
    }
    write_frame(send, &AdminResponse::DownloadEnd).await.context("send response")
}
