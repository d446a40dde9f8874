//! The S3 backup store, coordinator side: validating configs, listing manifests, committing a backup the
//! agent uploaded (its manifest is written only after the object is checked), downloads, and aborting
//! multipart uploads that a failed job left behind.
//!
//! Layout in the bucket: `<prefix>/<cluster>/<backup id>.snapshot.zst` and `<backup id>.manifest.json` beside
//! it. Listings read manifests, so an object without one (an upload that never committed) is never listed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use aws_sdk_s3::primitives::ByteStream;
use ferry_common::resources::{EtcdBackupS3ConfigSpec, Timestamp};
use ferry_common::s3::{with_retries, S3Error, S3ErrorKind};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::coordinator::lock;
use crate::store::{Manifest, MANIFEST_SUFFIX, OBJECT_SUFFIX};

/// How long `apply` waits for a new config's test listing.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(20);

/// A working S3 configuration and its client.
pub struct S3Conn {
    pub spec: EtcdBackupS3ConfigSpec,
    pub client: aws_sdk_s3::Client,
}

/// A multipart upload that must be aborted.
#[derive(Debug, Clone)]
struct PendingAbort {
    key: String,
    upload_id: String,
}

#[derive(Default)]
pub struct S3Store {
    current: RwLock<Option<Arc<S3Conn>>>,
    /// Manifests never change once written: cache them by key.
    manifests: Mutex<HashMap<String, Manifest>>,
    /// Uploads whose abort failed (S3 down); retried before each backup and periodically.
    /// Kept in memory: a coordinator restart forgets them, so buckets should also carry a lifecycle rule
    /// that aborts incomplete multipart uploads (see docs/ARCHITECTURE.md).
    pending_aborts: Mutex<Vec<PendingAbort>>,
}

impl S3Store {
    /// The current configuration, or why there is none.
    pub fn conn(&self) -> Result<Arc<S3Conn>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or_else(|| {
            anyhow!("the S3 store is not configured: apply an EtcdBackupS3Configs.ferry.dev resource with id etcd-backup-s3-conf")
        })
    }

    pub fn set(&self, conn: S3Conn) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(conn));
        lock(&self.manifests).clear();
    }

    /// Builds a client for `spec` and proves it works by listing the bucket with exactly these settings.
    pub async fn validate(spec: &EtcdBackupS3ConfigSpec) -> Result<S3Conn, String> {
        let client = ferry_common::s3::client(spec).await.map_err(|e| e.to_string())?;
        let what = format!("list bucket {:?}", spec.bucket);
        let list = client.list_objects_v2().bucket(&spec.bucket).prefix(prefix(spec)).max_keys(1).send();
        match tokio::time::timeout(VALIDATE_TIMEOUT, list).await {
            Err(_) => Err(format!(
                "{what}: the S3 endpoint did not answer within {}s; check spec.endpoint",
                VALIDATE_TIMEOUT.as_secs()
            )),
            Ok(Err(e)) => Err(S3Error::from_sdk(&what, &spec.bucket, &e).message),
            Ok(Ok(_)) => Ok(S3Conn { spec: spec.clone(), client }),
        }
    }

    pub fn object_key(spec: &EtcdBackupS3ConfigSpec, cluster: &str, id: &str) -> String {
        format!("{}{cluster}/{id}{OBJECT_SUFFIX}", prefix(spec))
    }

    fn manifest_key(spec: &EtcdBackupS3ConfigSpec, cluster: &str, id: &str) -> String {
        format!("{}{cluster}/{id}{MANIFEST_SUFFIX}", prefix(spec))
    }

    /// A backup id `<cluster>-<unix seconds>[-N]` not used yet.
    pub async fn free_id(
        &self,
        conn: &S3Conn,
        cluster: &str,
        at: Timestamp,
        cancel: &CancellationToken,
    ) -> Result<String> {
        for n in 0..1000u32 {
            let id = if n == 0 { format!("{cluster}-{}", at.seconds) } else { format!("{cluster}-{}-{n}", at.seconds) };
            let taken = self.exists(conn, &Self::object_key(&conn.spec, cluster, &id), cancel).await?
                || self.exists(conn, &Self::manifest_key(&conn.spec, cluster, &id), cancel).await?;
            if !taken {
                return Ok(id);
            }
        }
        bail!("could not find a free backup id for cluster {cluster}")
    }

    async fn exists(&self, conn: &S3Conn, key: &str, cancel: &CancellationToken) -> Result<bool> {
        match head(conn, key, cancel).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind == S3ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Every backup of `cluster` (or of all clusters), newest first.
    pub async fn list(&self, cluster: Option<&str>, cancel: &CancellationToken) -> Result<Vec<Manifest>> {
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
            if let Some(m) = lock(&self.manifests).get(&key).cloned() {
                out.push(m);
                continue;
            }
            match self.read_manifest(&conn, &key, cancel).await {
                Ok(m) => {
                    lock(&self.manifests).insert(key, m.clone());
                    out.push(m);
                }
                Err(e) => warn!(%key, "skipping unreadable manifest: {e:#}"),
            }
        }
        crate::store::sort_newest_first(&mut out);
        Ok(out)
    }

    async fn read_manifest(&self, conn: &S3Conn, key: &str, cancel: &CancellationToken) -> Result<Manifest> {
        let bucket = &conn.spec.bucket;
        let what = format!("read s3://{bucket}/{key}");
        let body = with_retries(cancel, &what, || async {
            let r = conn
                .client
                .get_object()
                .bucket(bucket)
                .key(key)
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, bucket, &e))?;
            r.body.collect().await.map(|b| b.into_bytes()).map_err(|e| S3Error {
                kind: S3ErrorKind::Unreachable,
                message: format!("{what}: {e}"),
                retryable: true,
            })
        })
        .await?;
        serde_json::from_slice(&body).with_context(|| format!("parse {key}"))
    }

    /// One backup's manifest.
    pub async fn find(&self, cluster: &str, id: &str, cancel: &CancellationToken) -> Result<Option<Manifest>> {
        if id.contains('/') {
            return Ok(None);
        }
        let conn = self.conn()?;
        let key = Self::manifest_key(&conn.spec, cluster, id);
        if let Some(m) = lock(&self.manifests).get(&key).cloned() {
            return Ok(Some(m));
        }
        match self.read_manifest(&conn, &key, cancel).await {
            Ok(m) => Ok(Some(m)),
            Err(e) if e.downcast_ref::<S3Error>().is_some_and(|e| e.kind == S3ErrorKind::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Makes an uploaded object a listed backup: checks its size, then writes its manifest. On failure the
    /// object is deleted, so nothing unlisted lingers.
    pub async fn commit(
        &self,
        conn: &S3Conn,
        key: &str,
        manifest: &Manifest,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let r = self.try_commit(conn, key, manifest, cancel).await;
        if r.is_err() {
            self.delete_object(conn, key).await;
        }
        r
    }

    async fn try_commit(
        &self,
        conn: &S3Conn,
        key: &str,
        manifest: &Manifest,
        cancel: &CancellationToken,
    ) -> Result<()> {
        let bucket = &conn.spec.bucket;
        let head = head(conn, key, cancel).await?;
        let size = head.content_length().unwrap_or(-1);
        if size != manifest.backup.size as i64 {
            bail!("the uploaded object is {size} bytes, but the agent sent {} bytes", manifest.backup.size);
        }
        let mkey = Self::manifest_key(&conn.spec, &manifest.backup.cluster, &manifest.id);
        let body = bytes::Bytes::from(serde_json::to_vec_pretty(manifest)?);
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
        lock(&self.manifests).insert(mkey, manifest.clone());
        Ok(())
    }

    async fn delete_object(&self, conn: &S3Conn, key: &str) {
        if let Err(e) = delete(conn, key).await {
            warn!("failed to delete {key}: {e}");
        }
    }

    /// Cleans up after a failed job: aborts its multipart upload (remembering it if S3 is unreachable) and
    /// deletes an object the agent may have completed without a manifest.
    pub async fn discard(&self, conn: &S3Conn, key: &str, upload_id: Option<&str>) {
        if let Some(upload_id) = upload_id {
            if let Err(e) = abort(conn, key, upload_id).await {
                warn!(%key, "failed to abort multipart upload, will retry: {e}");
                lock(&self.pending_aborts)
                    .push(PendingAbort { key: key.to_string(), upload_id: upload_id.to_string() });
            }
        }
        self.delete_object(conn, key).await;
    }

    /// Retries the aborts that failed earlier.
    pub async fn retry_pending_aborts(&self) {
        let Ok(conn) = self.conn() else { return };
        let pending = std::mem::take(&mut *lock(&self.pending_aborts));
        for p in pending {
            match abort(&conn, &p.key, &p.upload_id).await {
                Ok(()) => info!(key = %p.key, "aborted a multipart upload left by a failed backup"),
                Err(e) => {
                    warn!(key = %p.key, "failed to abort multipart upload, will retry: {e}");
                    lock(&self.pending_aborts).push(p);
                }
            }
        }
    }

    /// Deletes a backup: manifest first, then object.
    pub async fn delete(&self, m: &Manifest) -> Result<()> {
        let conn = self.conn()?;
        // The manifest records where its object is; the prefix may have changed since.
        let okey = m.backup.snapshot.clone();
        let mkey = format!("{}{MANIFEST_SUFFIX}", okey.trim_end_matches(OBJECT_SUFFIX));
        for key in [&mkey, &okey] {
            delete(&conn, key).await?;
            lock(&self.manifests).remove(key);
        }
        Ok(())
    }

    /// Opens a backup's object for download.
    pub async fn open(&self, m: &Manifest) -> Result<ByteStream> {
        let conn = self.conn()?;
        let bucket = &conn.spec.bucket;
        let key = m.backup.snapshot.clone();
        let what = format!("download s3://{bucket}/{key}");
        let r = with_retries(&CancellationToken::new(), &what, || async {
            conn.client
                .get_object()
                .bucket(bucket)
                .key(&key)
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, bucket, &e))
        })
        .await?;
        Ok(r.body)
    }
}

/// HEAD of one object, with retries.
async fn head(
    conn: &S3Conn,
    key: &str,
    cancel: &CancellationToken,
) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput, S3Error> {
    let bucket = &conn.spec.bucket;
    let what = format!("check s3://{bucket}/{key}");
    with_retries(cancel, &what, || async {
        conn.client.head_object().bucket(bucket).key(key).send().await.map_err(|e| S3Error::from_sdk(&what, bucket, &e))
    })
    .await
}

/// DELETE of one object, with retries. Not cancellable: it is cleanup.
async fn delete(conn: &S3Conn, key: &str) -> Result<(), S3Error> {
    let bucket = &conn.spec.bucket;
    let what = format!("delete s3://{bucket}/{key}");
    with_retries(&CancellationToken::new(), &what, || async {
        conn.client
            .delete_object()
            .bucket(bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk(&what, bucket, &e))
    })
    .await
    .map(|_| ())
}

async fn abort(conn: &S3Conn, key: &str, upload_id: &str) -> Result<(), S3Error> {
    ferry_common::s3::abort_upload(&conn.client, &conn.spec.bucket, key, upload_id).await
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
