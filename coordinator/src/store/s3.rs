//! The S3 backup store, coordinator side: validating configs, listing manifests, committing a backup the
//! agent uploaded (its manifest is written only after the object is checked), downloads, and aborting
//! multipart uploads that a failed job left behind.
//!
//! Layout in the bucket: `<prefix>/<cluster>/<backup id>.snapshot.zst` and `<backup id>.manifest.json` beside
//! it. Listings read manifests, so an object without one (an upload that never committed) is never listed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aws_sdk_s3::primitives::ByteStream;
use ferry_common::protocol::S3Target;
use ferry_common::resources::{EtcdBackupS3ConfigSpec, EtcdBackupSpec, Timestamp};
use ferry_common::s3::{self as common_s3, with_retries, S3Error, S3ErrorKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{sort_newest_first, Manifest, StoreError, UploadSettings, MANIFEST_SUFFIX, OBJECT_SUFFIX};
use crate::lock;

/// How long `apply` waits for a new config's test listing.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(20);

/// A working S3 configuration and its client.
pub struct S3Conn {
    pub spec: EtcdBackupS3ConfigSpec,
    pub client: aws_sdk_s3::Client,
}

impl S3Conn {
    /// A client for `spec`, not yet checked against the endpoint (start-up uses the stored config at once).
    pub async fn unchecked(spec: &EtcdBackupS3ConfigSpec) -> Result<Self, String> {
        let client = common_s3::client(spec).await.map_err(|e| e.to_string())?;
        Ok(Self { spec: spec.clone(), client })
    }
}

/// A multipart upload that must be aborted.
#[derive(Debug, Clone)]
struct PendingAbort {
    key: String,
    upload_id: String,
}

#[derive(Default)]
struct Shared {
    current: RwLock<Option<Arc<S3Conn>>>,
    /// Manifests never change once written: cache them by key.
    manifests: Mutex<HashMap<String, Manifest>>,
    /// Uploads whose abort failed (S3 down); retried before each backup and periodically.
    /// Kept in memory: a coordinator restart forgets them, so buckets should also carry a lifecycle rule
    /// that aborts incomplete multipart uploads (see docs/ARCHITECTURE.md).
    pending_aborts: Mutex<Vec<PendingAbort>>,
}

#[derive(Default)]
pub(super) struct S3Store {
    shared: Arc<Shared>,
}

/// Builds a client for `spec` and proves it works by listing the bucket with exactly these settings.
pub(super) async fn validate(spec: &EtcdBackupS3ConfigSpec) -> Result<S3Conn, String> {
    let conn = S3Conn::unchecked(spec).await?;
    let what = format!("list bucket {:?}", spec.bucket);
    let list = conn.client.list_objects_v2().bucket(&spec.bucket).prefix(prefix(spec)).max_keys(1).send();
    match tokio::time::timeout(VALIDATE_TIMEOUT, list).await {
        Err(_) => Err(format!(
            "{what}: the S3 endpoint did not answer within {}s; check spec.endpoint",
            VALIDATE_TIMEOUT.as_secs()
        )),
        Ok(Err(e)) => Err(S3Error::from_sdk(&what, &spec.bucket, &e).message),
        Ok(Ok(_)) => Ok(conn),
    }
}

fn object_key(spec: &EtcdBackupS3ConfigSpec, cluster: &str, id: &str) -> String {
    format!("{}{cluster}/{id}{OBJECT_SUFFIX}", prefix(spec))
}

fn manifest_key(spec: &EtcdBackupS3ConfigSpec, cluster: &str, id: &str) -> String {
    format!("{}{cluster}/{id}{MANIFEST_SUFFIX}", prefix(spec))
}

impl Shared {
    fn conn(&self) -> Result<Arc<S3Conn>, StoreError> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::NotConfigured)
    }

    /// Aborts an upload, remembering it for a later retry when S3 is unreachable; then deletes an object the
    /// agent may have completed without a manifest.
    async fn discard(&self, conn: &S3Conn, key: &str, upload_id: Option<&str>) {
        let bucket = &conn.spec.bucket;
        if let Some(upload_id) = upload_id {
            if let Err(e) = common_s3::abort_upload(&conn.client, bucket, key, upload_id).await {
                warn!(%key, "failed to abort multipart upload, will retry: {e}");
                lock(&self.pending_aborts)
                    .push(PendingAbort { key: key.to_string(), upload_id: upload_id.to_string() });
            }
        }
        // Cleanup: not cancellable, so a shutdown does not leave the object behind.
        if let Err(e) = common_s3::delete_object(&conn.client, bucket, key, &CancellationToken::new()).await {
            warn!("failed to delete {key}: {e}");
        }
    }
}

impl S3Store {
    /// The current configuration, or why there is none.
    pub(super) fn conn(&self) -> Result<Arc<S3Conn>, StoreError> {
        self.shared.conn()
    }

    pub(super) fn set(&self, conn: S3Conn) {
        *self.shared.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(conn));
        lock(&self.shared.manifests).clear();
    }

    /// Starts a backup: a free id and the key the agent uploads to. Retries earlier failed aborts first.
    pub(super) async fn begin(
        &self,
        cluster: &str,
        at: Timestamp,
        upload: UploadSettings,
        cancel: &CancellationToken,
    ) -> Result<PendingUpload, StoreError> {
        self.retry_pending_aborts(cancel).await;
        let conn = self.conn()?;
        let id = self.free_id(&conn, cluster, at, cancel).await?;
        let key = object_key(&conn.spec, cluster, &id);
        let target = S3Target {
            config: conn.spec.clone(),
            key: key.clone(),
            part_size: upload.part_size,
            parts_in_flight: upload.parts_in_flight,
        };
        Ok(PendingUpload { id, shared: self.shared.clone(), conn, key, upload_id: None, target })
    }

    /// A backup id `<cluster>-<unix seconds>[-N]` not used yet.
    async fn free_id(
        &self,
        conn: &S3Conn,
        cluster: &str,
        at: Timestamp,
        cancel: &CancellationToken,
    ) -> Result<String, StoreError> {
        for n in 0..1000u32 {
            let id = if n == 0 { format!("{cluster}-{}", at.seconds) } else { format!("{cluster}-{}-{n}", at.seconds) };
            let taken = exists(conn, &object_key(&conn.spec, cluster, &id), cancel).await?
                || exists(conn, &manifest_key(&conn.spec, cluster, &id), cancel).await?;
            if !taken {
                return Ok(id);
            }
        }
        Err(StoreError::NoFreeId(cluster.to_string()))
    }

    /// Every backup of `cluster` (or of all clusters), newest first.
    pub(super) async fn list(
        &self,
        cluster: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<Vec<Manifest>, StoreError> {
        let conn = self.conn()?;
        let bucket = &conn.spec.bucket;
        let list_prefix = match cluster {
            Some(c) => format!("{}{c}/", prefix(&conn.spec)),
            None => prefix(&conn.spec),
        };
        let what = format!("list s3://{bucket}/{list_prefix}");
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = with_retries(cancel, &what, || async {
                conn.client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&list_prefix)
                    .set_continuation_token(token.clone())
                    .send()
                    .await
                    .map_err(|e| S3Error::from_sdk(&what, bucket, &e))
            })
            .await?;
            keys.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .filter(|k| k.ends_with(MANIFEST_SUFFIX))
                    .map(str::to_string),
            );
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        let mut out = Vec::new();
        for key in keys {
            if let Some(m) = lock(&self.shared.manifests).get(&key).cloned() {
                out.push(m);
                continue;
            }
            match read_manifest(&conn, &key, cancel).await {
                Ok(m) => {
                    lock(&self.shared.manifests).insert(key, m.clone());
                    out.push(m);
                }
                Err(e) => warn!(%key, "skipping unreadable manifest: {e}"),
            }
        }
        sort_newest_first(&mut out);
        Ok(out)
    }

    /// One backup's manifest.
    pub(super) async fn find(
        &self,
        cluster: &str,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Manifest>, StoreError> {
        if id.contains('/') {
            return Ok(None);
        }
        let conn = self.conn()?;
        let key = manifest_key(&conn.spec, cluster, id);
        if let Some(m) = lock(&self.shared.manifests).get(&key).cloned() {
            return Ok(Some(m));
        }
        match read_manifest(&conn, &key, cancel).await {
            Ok(m) => Ok(Some(m)),
            Err(StoreError::S3(e)) if e.kind == S3ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Retries the aborts that failed earlier.
    pub(super) async fn retry_pending_aborts(&self, _cancel: &CancellationToken) {
        let Ok(conn) = self.conn() else { return };
        let pending = std::mem::take(&mut *lock(&self.shared.pending_aborts));
        for p in pending {
            match common_s3::abort_upload(&conn.client, &conn.spec.bucket, &p.key, &p.upload_id).await {
                Ok(()) => info!(key = %p.key, "aborted a multipart upload left by a failed backup"),
                Err(e) => {
                    warn!(key = %p.key, "failed to abort multipart upload, will retry: {e}");
                    lock(&self.shared.pending_aborts).push(p);
                }
            }
        }
    }

    /// Deletes a backup: manifest first, then object.
    pub(super) async fn delete(&self, m: &Manifest, cancel: &CancellationToken) -> Result<(), StoreError> {
        let conn = self.conn()?;
        // The manifest records where its object is; the prefix may have changed since.
        let okey = m.backup.snapshot.clone();
        let mkey = format!("{}{MANIFEST_SUFFIX}", okey.trim_end_matches(OBJECT_SUFFIX));
        for key in [&mkey, &okey] {
            common_s3::delete_object(&conn.client, &conn.spec.bucket, key, cancel).await?;
            lock(&self.shared.manifests).remove(key);
        }
        Ok(())
    }

    /// Opens a backup's object for download.
    pub(super) async fn open(&self, m: &Manifest, cancel: &CancellationToken) -> Result<ByteStream, StoreError> {
        let conn = self.conn()?;
        let bucket = &conn.spec.bucket;
        let key = &m.backup.snapshot;
        let what = format!("download s3://{bucket}/{key}");
        Ok(common_s3::get_object(&conn.client, bucket, key, &what, cancel).await?)
    }
}

async fn exists(conn: &S3Conn, key: &str, cancel: &CancellationToken) -> Result<bool, StoreError> {
    match common_s3::head_object(&conn.client, &conn.spec.bucket, key, cancel).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind == S3ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
    }
}

async fn read_manifest(conn: &S3Conn, key: &str, cancel: &CancellationToken) -> Result<Manifest, StoreError> {
    let body = common_s3::get_bytes(&conn.client, &conn.spec.bucket, key, cancel).await?;
    serde_json::from_slice(&body).map_err(|e| StoreError::Corrupt(format!("parse {key}: {e}")))
}

/// One job's S3 upload, made by the agent; the coordinator commits it (HEAD, then the manifest) or aborts it.
pub(super) struct PendingUpload {
    pub(super) id: String,
    shared: Arc<Shared>,
    conn: Arc<S3Conn>,
    key: String,
    pub(super) upload_id: Option<String>,
    pub(super) target: S3Target,
}

impl PendingUpload {
    /// Makes the uploaded object a listed backup: checks its size, then writes its manifest. On failure the
    /// upload and object are discarded, so nothing unlisted lingers.
    pub(super) async fn commit(
        self,
        mut spec: EtcdBackupSpec,
        cancel: &CancellationToken,
    ) -> Result<Manifest, StoreError> {
        spec.snapshot = self.key.clone();
        let manifest = Manifest { format: 1, id: self.id.clone(), backup: spec };
        match self.try_commit(&manifest, cancel).await {
            Ok(()) => Ok(manifest),
            Err(e) => {
                self.abort().await;
                Err(e)
            }
        }
    }

    async fn try_commit(&self, manifest: &Manifest, cancel: &CancellationToken) -> Result<(), StoreError> {
        let conn = &self.conn;
        let bucket = &conn.spec.bucket;
        let head = common_s3::head_object(&conn.client, bucket, &self.key, cancel).await?;
        let size = head.content_length().unwrap_or(-1);
        if size != manifest.backup.size as i64 {
            return Err(StoreError::Mismatch(format!(
                "the uploaded object is {size} bytes, but the agent sent {} bytes",
                manifest.backup.size
            )));
        }
        let mkey = manifest_key(&conn.spec, &manifest.backup.cluster, &manifest.id);
        let body = serde_json::to_vec_pretty(manifest)
            .map(bytes::Bytes::from)
            .map_err(|e| StoreError::Corrupt(format!("encode manifest: {e}")))?;
        let what = format!("write manifest s3://{bucket}/{mkey}");
        with_retries(cancel, &what, || async {
            conn.client
                .put_object()
                .bucket(bucket)
                .key(&mkey)
                .content_type("application/json")
                .body(ByteStream::from(body.clone()))
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, bucket, &e))
        })
        .await?;
        lock(&self.shared.manifests).insert(mkey, manifest.clone());
        Ok(())
    }

    /// Aborts the multipart upload (remembered for retry if S3 is down) and deletes any completed object.
    pub(super) async fn abort(self) {
        self.shared.discard(&self.conn, &self.key, self.upload_id.as_deref()).await;
    }
}

/// The key prefix with one trailing slash, or empty.
fn prefix(spec: &EtcdBackupS3ConfigSpec) -> String {
    let p = spec.prefix.trim_matches('/');
    if p.is_empty() {
        String::new()
    } else {
        format!("{p}/")
    }
}
