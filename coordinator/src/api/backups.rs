//! Requests about stored backups: download (the bytes on the request stream) and restore (the bytes, or where
//! in S3 to read them).

use std::time::Duration;

use anyhow::{Context, Result};
use ferry_common::encryption::Identities;
use ferry_common::protocol::{write_frame, AdminResponse, RestoreSource, RevisionSeen, DATA_CHUNK};
use ferry_common::resources::{Metadata, Resource, ResourceType, Spec, Timestamp, LABEL_CLUSTER};
use quinn::SendStream;
use tokio::time::{timeout_at, Instant};
use tracing::info;

use super::{reply_error, Api, ApiError};
use crate::store::Manifest;

/// A download must move at least one chunk this often: a client that stops reading (QUIC flow control then
/// blocks every write) is dropped, so it holds no connection slot, store reader or buffers.
const STREAM_PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);
/// A whole download may take this long plus [`STREAM_TIME_PER_MIB`] per MiB of the object: generous for any
/// client that reads (1 MiB every 2 s is far below a `--download-limit-mbps` anyone sets), bounded for one
/// that trickles a chunk just inside the progress timeout forever.
const STREAM_BASE_DEADLINE: Duration = Duration::from_secs(300);
const STREAM_TIME_PER_MIB: Duration = Duration::from_secs(2);

/// When streaming an object of `size` bytes must have ended.
fn stream_deadline(size: u64) -> Duration {
    let mib = u32::try_from(size.div_ceil(1 << 20)).unwrap_or(u32::MAX);
    STREAM_BASE_DEADLINE.saturating_add(STREAM_TIME_PER_MIB.saturating_mul(mib))
}

/// Writes one frame of a download: within the progress timeout, and before the download's `deadline`.
async fn send_within(send: &mut SendStream, msg: &AdminResponse, deadline: Instant) -> Result<()> {
    let limit = deadline.min(Instant::now() + STREAM_PROGRESS_TIMEOUT);
    match timeout_at(limit, write_frame(send, msg)).await {
        Ok(r) => r.context("send backup data"),
        Err(_) if limit == deadline => {
            anyhow::bail!("the download took longer than its deadline; the client reads too slowly")
        }
        Err(_) => {
            anyhow::bail!("the client read nothing for {}s; dropping the download", STREAM_PROGRESS_TIMEOUT.as_secs())
        }
    }
}

/// The annotation of an `EtcdBackups` resource saying how its commit proved the object (`parts` or `full`,
/// the manifest's `verification`); absent for backups whose manifest predates it.
const ANNOTATION_VERIFICATION: &str = "ferry.dev/verification";

/// A stored backup as an `EtcdBackups` resource.
pub(crate) fn backup_resource(m: Manifest) -> Resource {
    let mut meta = Metadata::new(ResourceType::EtcdBackup, m.id);
    meta.labels.insert(LABEL_CLUSTER.into(), m.backup.cluster.clone());
    if let Some(v) = m.verification {
        meta.annotations.insert(ANNOTATION_VERIFICATION.into(), v.as_str().into());
    }
    meta.created = Some(m.backup.createdat);
    meta.updated = Some(m.backup.createdat);
    meta.version = 1;
    Resource { metadata: meta, spec: Spec::EtcdBackup(m.backup) }
}

impl Api {
    /// Finds a backup by id, or the newest with `latest`.
    pub(crate) async fn resolve(&self, cluster: &str, backup_id: &str) -> Result<Manifest, ApiError> {
        let found = if backup_id == "latest" {
            self.store.list(Some(cluster), &self.cancel).await?.into_iter().next()
        } else {
            self.store.find(cluster, backup_id, &self.cancel).await?
        };
        found.ok_or_else(|| {
            ApiError::NotFound(format!(
                "backup {backup_id:?} of cluster {cluster:?} not found; list them with `ferryctl get etcdbackup --selector {LABEL_CLUSTER}={cluster}`"
            ))
        })
    }

    /// Streams a backup's stored bytes as `Data` frames and ends with `DownloadEnd`.
    async fn stream_object(&self, manifest: &Manifest, send: &mut SendStream) -> Result<()> {
        let mut object = match self.store.open(manifest, &self.cancel).await {
            Ok(o) => o,
            Err(e) => return reply_error(send, e.into()).await,
        };
        let deadline = Instant::now() + stream_deadline(manifest.backup.size);
        let mut buf = vec![0u8; DATA_CHUNK];
        loop {
            let piece = match object.next(&mut buf).await {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    let e = ApiError::from(e);
                    return reply_error(send, ApiError::Internal(format!("read backup: {e}"))).await;
                }
            };
            for chunk in piece.chunks(DATA_CHUNK) {
                send_within(send, &AdminResponse::Data(chunk.to_vec()), deadline).await?;
            }
        }
        send_within(send, &AdminResponse::DownloadEnd, deadline).await
    }

    pub(super) async fn download(&self, cluster: &str, backup_id: &str, send: &mut SendStream) -> Result<()> {
        let manifest = match self.resolve(cluster, backup_id).await {
            Ok(m) => m,
            Err(e) => return reply_error(send, e).await,
        };
        write_frame(send, &AdminResponse::DownloadStart(Box::new(backup_resource(manifest.clone())))).await?;
        self.stream_object(&manifest, send).await
    }

    /// Tells a restoring agent where its backup is: the bytes on this stream (local store), or presigned
    /// requests to read that one S3 object, valid for a few minutes (no credential leaves the coordinator).
    pub(super) async fn restore(&self, cluster: &str, backup_id: &str, send: &mut SendStream) -> Result<()> {
        let manifest = match self.resolve(cluster, backup_id).await {
            Ok(m) => m,
            Err(e) => return reply_error(send, e).await,
        };
        info!(%cluster, backup_id = %manifest.id, "restore requested");
        // One floor for every member restoring this backup: see `status::restore_plan`.
        let live = live_etcd(&self.agents, cluster);
        let plan = match crate::status::restore_plan(self.state.as_ref(), cluster, &manifest.id, live, Timestamp::now())
        {
            Ok(p) => p,
            Err(e) => return reply_error(send, ApiError::Internal(format!("plan the restore: {e}"))).await,
        };
        let highest_revision = (plan.highestrevision > 0).then(|| RevisionSeen {
            revision: plan.highestrevision,
            at: plan.highestrevisionat.unwrap_or(plan.createdat),
        });
        self.send_restore(&manifest, highest_revision, send).await
    }

    /// Sends a restoring agent its backup: `RestoreFrom`, then the bytes on this stream (local store, or the
    /// zstd stream inside when the coordinator's identity opens it), or presigned requests for the S3 object.
    pub(crate) async fn send_backup(&self, manifest: &Manifest, send: &mut SendStream) -> Result<()> {
        self.send_restore(manifest, None, send).await
    }

    async fn send_restore(
        &self,
        manifest: &Manifest,
        highest_revision: Option<RevisionSeen>,
        send: &mut SendStream,
    ) -> Result<()> {
        // An encrypted backup the coordinator's own identity opens is opened here: the agent gets the zstd
        // stream, never the identity. Otherwise the agent needs its own (`ferry-agent restore --identity`).
        let opener = match (&manifest.backup.encryption, &self.settings.identities) {
            (Some(enc), Some(ids)) if ids.check_opens(&enc.recipients).is_ok() => Some(ids.clone()),
            _ => None,
        };
        let source = match opener {
            Some(_) => RestoreSource::Decrypted,
            None => match self.store.restore_source(manifest).await {
                Ok(s) => s,
                Err(e) => return reply_error(send, e.into()).await,
            },
        };
        let bytes_follow = matches!(source, RestoreSource::Coordinator);
        let backup = Box::new(backup_resource(manifest.clone()));
        let download_limit_bps = self.settings.download_limit_bps;
        write_frame(send, &AdminResponse::RestoreFrom { backup, source, download_limit_bps, highest_revision })
            .await
            .context("send response")?;
        if let Some(ids) = opener {
            info!(backup_id = %manifest.id, "opening the encrypted backup with the coordinator's identity");
            self.stream_decrypted(manifest, ids, send).await?;
        } else if bytes_follow {
            self.stream_object(manifest, send).await?;
        }
        Ok(())
    }

    /// Streams the zstd stream inside an encrypted backup as `Data` frames, then `DownloadEnd`; a backup that
    /// does not decrypt (tampered, truncated) ends with an error instead, after what decrypted before it.
    async fn stream_decrypted(&self, manifest: &Manifest, ids: Identities, send: &mut SendStream) -> Result<()> {
        let object = match self.store.open(manifest, &self.cancel).await {
            Ok(o) => o,
            Err(e) => return reply_error(send, e.into()).await,
        };
        let (mut plain, task) = crate::encryption::open_object(ids, object, DATA_CHUNK);
        while let Some(piece) = plain.recv().await {
            for chunk in piece.chunks(DATA_CHUNK) {
                write_frame(send, &AdminResponse::Data(chunk.to_vec())).await.context("send backup data")?;
            }
        }
        match task.await {
            Ok(Ok(_)) => write_frame(send, &AdminResponse::DownloadEnd).await.context("send response"),
            Ok(Err(e)) => {
                let e = ApiError::Internal(format!("open backup {}: {e}", manifest.id));
                reply_error(send, e).await
            }
            Err(e) => reply_error(send, ApiError::Internal(format!("open backup {}: {e}", manifest.id))).await,
        }
    }
}

/// What `cluster`'s connected agents say of their etcd, for a restore's plan (`status::restore_plan`).
fn live_etcd(agents: &crate::agents::Agents, cluster: &str) -> crate::status::LiveEtcd {
    let live = agents.live(cluster);
    // A member whose etcd is down keeps its last good report: its cluster id still counts.
    let facts: Vec<&ferry_common::protocol::EtcdFacts> = live.iter().filter_map(|a| a.facts.as_ref()).collect();
    let ids = facts.iter().map(|f| f.cluster_id).filter(|id| *id != 0);
    let cluster_id = crate::backup::divergence::most_common(ids).unwrap_or(0);
    let moving = facts
        .iter()
        .filter(|f| f.error.is_none() && f.cluster_id == cluster_id && cluster_id != 0)
        .map(|f| f.revision)
        .max()
        .map(|r| (cluster_id, r));
    crate::status::LiveEtcd { highest: agents.highest_revision(cluster), cluster_id, moving }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_download_deadline_grows_with_the_size() {
        assert_eq!(stream_deadline(0), STREAM_BASE_DEADLINE);
        assert_eq!(stream_deadline(1 << 30), STREAM_BASE_DEADLINE + STREAM_TIME_PER_MIB * 1024);
        assert!(stream_deadline(u64::MAX) > Duration::from_secs(86_400), "no overflow");
    }
}
