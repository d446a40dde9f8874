//! The S3 backup store, coordinator side: validating configs, listing manifests, committing a backup the
//! agent uploaded (its manifest is written only after the object is checked), downloads, and aborting
//! multipart uploads that a failed job left behind.
//!
//! Layout in the bucket: `<prefix>/<cluster>/<backup id>.snapshot.zst` and `<backup id>.manifest.json` beside
//! it. Listings read manifests, so an object without one (an upload that never committed) is never listed.
//! A listing takes only keys of exactly that shape under the delimiter-terminated prefix: a deployment with
//! prefix `""` and a cluster named `prod` never sees (or deletes) the backups of a deployment with prefix `prod`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aws_sdk_s3::presigning::PresigningConfig;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use base64::Engine as _;
use ferry_common::encryption::Identities;
use ferry_common::protocol::{PartDigest, PresignedRequest, S3Upload, UploadedPart, MAX_PARTS, PRESIGNED_EXPIRY};
use ferry_common::resources::{EtcdBackupS3ConfigSpec, EtcdBackupSpec, Timestamp};
use ferry_common::s3::{self as common_s3, with_quick_retries, with_retries, S3Error, S3ErrorKind};
use ferry_common::snapshot::{check_framing, SnapshotError, StreamCheck, ZSTD_MAGIC};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    sort_newest_first, Manifest, ReadCounter, StoreError, UploadSettings, Verification, MANIFEST_SUFFIX,
    MAX_MANIFEST_BYTES, OBJECT_SUFFIX,
};
use crate::lock;
use crate::state::StateStore;

/// S3's smallest part but the last; agents never cut parts smaller than this, whatever the job says.
const MIN_PART_SIZE: u64 = 5 << 20;

/// How long `apply` waits for a new config's test listing.
const VALIDATE_TIMEOUT: Duration = Duration::from_secs(20);

/// Most of an object's start read to check its framing (`--verify-upload parts`): a few KiB hold age's
/// whole header for the most recipients a backup may have.
const FRAMING_PROBE_MAX: u64 = 4096;
/// Share of an object the framing check reads at most (1 %), beyond what the framing itself takes.
const FRAMING_PROBE_DIVISOR: u64 = 100;
/// What age's header takes besides its X25519 stanzas, with room: the version line (22 bytes), the MAC
/// line (48) and one random "grease" stanza (up to ~210).
const AGE_HEADER_BASE: u64 = 512;
/// What each X25519 stanza takes, with room (98 bytes).
const AGE_STANZA: u64 = 128;

/// Bytes of an object of `size` the framing check reads: 1 % of it, but at least what its framing takes
/// (zstd's magic; age's whole header for `recipients`) and at most [`FRAMING_PROBE_MAX`] or the object.
fn framing_probe_len(size: u64, recipients: usize) -> u64 {
    let framing = match recipients {
        0 => ZSTD_MAGIC.len() as u64,
        n => AGE_HEADER_BASE + AGE_STANZA * n as u64,
    };
    (size / FRAMING_PROBE_DIVISOR).max(framing).min(FRAMING_PROBE_MAX).min(size)
}

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

/// What a failed backup may have left in the bucket, removed in this order: its manifest (if a commit got
/// as far as writing it), its multipart upload, its object.
#[derive(Debug, Clone)]
struct Leftover {
    manifest: String,
    key: String,
    upload_id: Option<String>,
}

/// The state record of an open multipart upload ([`RECORD_PREFIX`]`<upload id>`), written before its id
/// goes out and removed once it is completed or aborted: whoever leads next aborts a dead coordinator's.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct OpenUpload {
    #[serde(default)]
    bucket: String,
    key: String,
    upload_id: String,
}

/// State record keys of open multipart uploads.
const RECORD_PREFIX: &str = "s3-open-upload/";

#[derive(Default)]
struct Shared {
    current: RwLock<Option<Arc<S3Conn>>>,
    /// Manifests never change once written: cache them by key.
    manifests: Mutex<HashMap<String, Manifest>>,
    /// Failed backups whose cleanup failed (S3 down); retried before each backup and periodically.
    /// Kept in memory: a coordinator restart forgets them, so buckets should also carry a lifecycle rule
    /// that aborts incomplete multipart uploads (see docs/ARCHITECTURE.md).
    leftovers: Mutex<Vec<Leftover>>,
    /// Where open uploads are recorded until they are completed or aborted (`None`: not recorded).
    state: RwLock<Option<Arc<dyn StateStore>>>,
    /// Upload ids this process has open: their records are not left over from a dead coordinator.
    open: Mutex<std::collections::HashSet<String>>,
}

#[derive(Default)]
pub(super) struct S3Store {
    shared: Arc<Shared>,
    /// How commits prove an upload (`--verify-upload`).
    pub(super) verification: Verification,
    /// Bytes commits read back to do so.
    pub(super) read: ReadCounter,
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

/// The key of a change-log segment of `cluster` (`name` from `segment::object_name`).
pub(super) fn segment_key(spec: &EtcdBackupS3ConfigSpec, cluster: &str, name: &str) -> String {
    format!("{}{cluster}/{name}", prefix(spec))
}

fn manifest_key(spec: &EtcdBackupS3ConfigSpec, cluster: &str, id: &str) -> String {
    format!("{}{cluster}/{id}{MANIFEST_SUFFIX}", prefix(spec))
}

impl Shared {
    fn conn(&self) -> Result<Arc<S3Conn>, StoreError> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone().ok_or(StoreError::NotConfigured)
    }

    fn state(&self) -> Option<Arc<dyn StateStore>> {
        self.state.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `Err(NotLeading)` once this replica's term is over (see `StateStore::still_leading`).
    fn still_leading(&self) -> Result<(), StoreError> {
        match self.state().map(|s| s.still_leading()) {
            // Not known to lead (the state etcd did not answer) is not leading: nothing is committed.
            Some(Err(e)) => {
                warn!("not committing: this replica cannot show it still leads: {e}");
                Err(StoreError::NotLeading)
            }
            None | Some(Ok(())) => Ok(()),
        }
    }

    /// Records an open upload before its id is handed out.
    fn remember(&self, u: &OpenUpload) -> Result<(), StoreError> {
        lock(&self.open).insert(u.upload_id.clone());
        let Some(state) = self.state() else { return Ok(()) };
        let value = serde_json::to_vec(u).map_err(|e| StoreError::Mismatch(format!("encode upload record: {e}")))?;
        state
            .put_record(&format!("{RECORD_PREFIX}{}", u.upload_id), &value)
            .map_err(|e| StoreError::Mismatch(format!("record the open upload: {e}")))
    }

    /// Drops the record of an upload completed or aborted.
    fn forget(&self, upload_id: &str) {
        lock(&self.open).remove(upload_id);
        if let Some(state) = self.state() {
            if let Err(e) = state.delete_record(&format!("{RECORD_PREFIX}{upload_id}")) {
                warn!("failed to remove the record of a finished upload (aborted again later, harmlessly): {e}");
            }
        }
    }

    /// Removes what a failed backup left (see [`Leftover`]), remembering it for a later retry when S3 fails.
    async fn discard(&self, conn: &S3Conn, leftover: Leftover) {
        if let Err(e) = self.try_discard(conn, &leftover).await {
            warn!(key = %leftover.key, "failed to clean up after a failed backup, will retry: {e}");
            lock(&self.leftovers).push(leftover);
        }
    }

    /// The manifest goes first and, until it is gone, nothing else does: a listed manifest never outlives its
    /// object, even when S3 fails between the two deletes. Not cancellable: it is the cleanup that runs after
    /// a job was cancelled, so a shutdown does not leave a half-committed backup behind.
    async fn try_discard(&self, conn: &S3Conn, l: &Leftover) -> Result<(), S3Error> {
        let bucket = &conn.spec.bucket;
        common_s3::delete_object(&conn.client, bucket, &l.manifest, &CancellationToken::new()).await?;
        lock(&self.manifests).remove(&l.manifest);
        // A failed abort does not keep the object: only the manifest must go first.
        let aborted = match &l.upload_id {
            Some(upload_id) => {
                let r = common_s3::abort_upload(&conn.client, bucket, &l.key, upload_id).await;
                if r.is_ok() {
                    self.forget(upload_id);
                }
                r
            }
            None => Ok(()),
        };
        common_s3::delete_object(&conn.client, bucket, &l.key, &CancellationToken::new()).await?;
        aborted
    }
}

impl S3Store {
    /// The current configuration, or why there is none.
    pub(super) fn conn(&self) -> Result<Arc<S3Conn>, StoreError> {
        self.shared.conn()
    }

    /// Records open uploads in `state` from now on.
    pub(super) fn set_state(&self, state: Arc<dyn StateStore>) {
        *self.shared.state.write().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    pub(super) fn set(&self, conn: S3Conn) {
        *self.shared.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(conn));
        lock(&self.shared.manifests).clear();
    }

    /// Starts a backup: a free id, its key, and a multipart upload the agent fills through presigned requests
    /// (it never gets the store's credentials). Retries earlier failed aborts first.
    pub(super) async fn begin(
        &self,
        cluster: &str,
        at: Timestamp,
        upload: UploadSettings,
        deployment: &str,
        cancel: &CancellationToken,
    ) -> Result<PendingUpload, StoreError> {
        self.retry_pending_aborts(cancel).await;
        let conn = self.conn()?;
        let id = self.free_id(&conn, cluster, at, cancel).await?;
        let key = object_key(&conn.spec, cluster, &id);
        let bucket = &conn.spec.bucket;
        let what = format!("create multipart upload s3://{bucket}/{key}");
        let upload_id = with_quick_retries(cancel, &what, || async {
            let r = conn
                .client
                .create_multipart_upload()
                .bucket(bucket)
                .key(&key)
                .content_type("application/zstd")
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, bucket, &e))?;
            r.upload_id().map(str::to_string).ok_or_else(|| S3Error {
                kind: S3ErrorKind::Other,
                message: format!("{what}: the server returned no upload id"),
                retryable: false,
            })
        })
        .await?;
        let record = OpenUpload { bucket: bucket.clone(), key: key.clone(), upload_id: upload_id.clone() };
        if let Err(e) = self.shared.remember(&record) {
            // Unrecorded, it could outlive a crash unnoticed: not handed out.
            lock(&self.shared.open).remove(&upload_id);
            let leftover = Leftover {
                manifest: manifest_key(&conn.spec, cluster, &id),
                key: key.clone(),
                upload_id: Some(upload_id),
            };
            self.shared.discard(&conn, leftover).await;
            return Err(e);
        }
        let target = S3Upload {
            key: key.clone(),
            part_size: upload.part_size,
            parts_in_flight: upload.parts_in_flight,
            cacert: conn.spec.cacert.clone(),
        };
        Ok(PendingUpload {
            id,
            cluster: cluster.to_string(),
            deployment: deployment.to_string(),
            shared: self.shared.clone(),
            conn,
            key,
            upload_id: Some(upload_id),
            target,
            opener: None,
            expected_members: Vec::new(),
            announced: Mutex::new(HashMap::new()),
            verification: self.verification,
            read: self.read.clone(),
        })
    }

    /// Presigned `HEAD` and `GET` of one backup's object, for a restore the coordinator approved.
    pub(super) async fn restore_requests(
        &self,
        m: &Manifest,
    ) -> Result<(PresignedRequest, PresignedRequest, String), StoreError> {
        let conn = self.conn()?;
        let bucket = &conn.spec.bucket;
        let key = &m.backup.snapshot;
        let config = presigning_config()?;
        let head = conn.client.head_object().bucket(bucket).key(key).presigned(config.clone()).await;
        let head = head.map_err(|e| S3Error::from_sdk(&format!("presign HEAD s3://{bucket}/{key}"), bucket, &e))?;
        let get = conn.client.get_object().bucket(bucket).key(key).presigned(config).await;
        let get = get.map_err(|e| S3Error::from_sdk(&format!("presign GET s3://{bucket}/{key}"), bucket, &e))?;
        Ok((presigned(&head), presigned(&get), conn.spec.cacert.clone()))
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
        let base = prefix(&conn.spec);
        let list_prefix = match cluster {
            Some(c) => format!("{base}{c}/"),
            None => base.clone(),
        };
        let what = format!("list s3://{bucket}/{list_prefix}");
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = with_quick_retries(cancel, &what, || async {
                conn.client
                    .list_objects_v2()
                    .bucket(bucket)
                    .prefix(&list_prefix)
                    // One cluster's listing stops at its own directory: deeper keys are someone else's.
                    .set_delimiter(cluster.map(|_| "/".to_string()))
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
                    .filter(|k| manifest_location(&base, k).is_some())
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

    /// Retries the cleanups of failed backups that failed earlier, and aborts the uploads recorded in the
    /// state that no backup of this process has open (left by a coordinator that was killed or lost its
    /// leadership mid-backup; their records stay until the abort succeeds).
    pub(super) async fn retry_pending_aborts(&self, _cancel: &CancellationToken) {
        let Ok(conn) = self.conn() else { return };
        if let Some(state) = self.shared.state() {
            match state.list_records(RECORD_PREFIX) {
                Ok(records) => {
                    let open = lock(&self.shared.open).clone();
                    for (k, v) in records {
                        match serde_json::from_slice::<OpenUpload>(&v) {
                            // Another bucket than the one configured now: kept until it is configured again.
                            Ok(u)
                                if open.contains(&u.upload_id)
                                    || (!u.bucket.is_empty() && u.bucket != conn.spec.bucket) => {}
                            Ok(u) => {
                                match common_s3::abort_upload(&conn.client, &conn.spec.bucket, &u.key, &u.upload_id)
                                    .await
                                {
                                    Ok(()) => {
                                        self.shared.forget(&u.upload_id);
                                        info!(key = %u.key, "aborted a multipart upload left by an interrupted backup");
                                    }
                                    Err(e) if e.kind == S3ErrorKind::NotFound => self.shared.forget(&u.upload_id),
                                    Err(e) => {
                                        warn!(key = %u.key, "failed to abort a recorded multipart upload, will retry: {e}")
                                    }
                                }
                            }
                            Err(e) => warn!(record = %k, "failed to read an open-upload record: {e}"),
                        }
                    }
                }
                Err(e) => warn!("failed to list open uploads in the state store: {e}"),
            }
        }
        let leftovers = std::mem::take(&mut *lock(&self.shared.leftovers));
        for l in leftovers {
            match self.shared.try_discard(&conn, &l).await {
                Ok(()) => info!(key = %l.key, "removed what a failed backup had left in the bucket"),
                Err(e) => {
                    warn!(key = %l.key, "failed to clean up after a failed backup, will retry: {e}");
                    lock(&self.shared.leftovers).push(l);
                }
            }
        }
    }

    /// Deletes a backup: manifest first, then object, both at the keys this configuration derives (a
    /// manifest naming another object is refused: retention never deletes a key it did not make).
    pub(super) async fn delete(&self, m: &Manifest, cancel: &CancellationToken) -> Result<(), StoreError> {
        let conn = self.conn()?;
        let okey = object_key(&conn.spec, &m.backup.cluster, &m.id);
        let mkey = manifest_key(&conn.spec, &m.backup.cluster, &m.id);
        if m.backup.snapshot != okey {
            return Err(StoreError::Foreign(format!(
                "the manifest of {}/{} names object {:?}, not {okey:?} (written under another prefix?); it is left alone",
                m.backup.cluster, m.id, m.backup.snapshot
            )));
        }
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

/// `(cluster, id)` of a key `<prefix><cluster>/<id>.manifest.json`, both valid names; `None` for any other
/// key (deeper, shallower, or not a manifest).
fn manifest_location<'k>(prefix: &str, key: &'k str) -> Option<(&'k str, &'k str)> {
    let rest = key.strip_prefix(prefix)?.strip_suffix(MANIFEST_SUFFIX)?;
    let (cluster, id) = rest.split_once('/')?;
    let valid = ferry_common::resources::validate_name("cluster", cluster).is_ok()
        && ferry_common::resources::validate_backup_id(id).is_ok();
    valid.then_some((cluster, id))
}

/// Reads the manifest at `key` (`…/<cluster>/<id>.manifest.json`), at most [`MAX_MANIFEST_BYTES`] of it, and
/// checks it describes that backup.
async fn read_manifest(conn: &S3Conn, key: &str, cancel: &CancellationToken) -> Result<Manifest, StoreError> {
    let body = common_s3::get_bytes(&conn.client, &conn.spec.bucket, key, MAX_MANIFEST_BYTES, cancel).await?;
    let m: Manifest = serde_json::from_slice(&body).map_err(|e| StoreError::Corrupt(format!("parse {key}: {e}")))?;
    let stem = key.trim_end_matches(MANIFEST_SUFFIX);
    let (dir, id) = stem.rsplit_once('/').unwrap_or(("", stem));
    let cluster = dir.rsplit('/').next().unwrap_or_default();
    m.check_location(cluster, id, &format!("{stem}{OBJECT_SUFFIX}"))?;
    Ok(m)
}

/// The presigning settings of every request handed to an agent.
pub(super) fn presigning_config() -> Result<PresigningConfig, StoreError> {
    PresigningConfig::expires_in(PRESIGNED_EXPIRY).map_err(|e| StoreError::Corrupt(format!("presigning config: {e}")))
}

/// The SDK's presigned request as it travels to an agent.
pub(super) fn presigned(p: &aws_sdk_s3::presigning::PresignedRequest) -> PresignedRequest {
    let expires_at = Timestamp::now();
    PresignedRequest {
        method: p.method().to_string(),
        url: p.uri().to_string(),
        headers: p.headers().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        expires_at: Timestamp { seconds: expires_at.seconds + PRESIGNED_EXPIRY.as_secs() as i64, nanos: 0 },
    }
}

/// One job's S3 upload: the coordinator created it, the agent fills it part by part through presigned
/// requests, and the coordinator completes it, verifies the object ([`Verification`]) and only then writes
/// the manifest — or aborts it.
pub(super) struct PendingUpload {
    pub(super) id: String,
    cluster: String,
    deployment: String,
    shared: Arc<Shared>,
    conn: Arc<S3Conn>,
    key: String,
    pub(super) upload_id: Option<String>,
    pub(super) target: S3Upload,
    /// The coordinator's identities, when they open this backup's recipients: the check opens the object.
    pub(super) opener: Option<Identities>,
    /// The etcd member ids the cluster's agents report, compared with the snapshot's at the read-back.
    pub(super) expected_members: Vec<u64>,
    /// What the agent announced of each part before its URL was signed: fixed at the first announcement.
    announced: Mutex<HashMap<u32, PartDigest>>,
    /// How the commit proves the object.
    verification: Verification,
    /// Bytes the commit reads back.
    read: ReadCounter,
}

impl PendingUpload {
    /// A presigned `UploadPart` request for part `number` of this upload, signed for exactly the bytes `digest`
    /// describes (`Content-MD5`, `x-amz-checksum-sha256` and `Content-Length` are signed headers), and
    /// nothing else. A part asked for again keeps its first digest: one part number, one content.
    pub(super) async fn part_url(
        &self,
        number: u32,
        digest: PartDigest,
        cancel: &CancellationToken,
    ) -> Result<PresignedRequest, StoreError> {
        if !(1..=MAX_PARTS).contains(&number) {
            return Err(StoreError::Mismatch(format!("part number {number} is outside 1..={MAX_PARTS}")));
        }
        let largest = self.target.part_size.max(MIN_PART_SIZE);
        if digest.size == 0 || digest.size > largest {
            return Err(StoreError::Mismatch(format!(
                "part {number} is announced as {} bytes, outside 1..={largest} (the job's part size)",
                digest.size
            )));
        }
        // A new part's URL only once the parts before those in flight are stored: asking for URLs without
        // uploading cannot keep a backup "running" (issue 26; the byte-stall deadline moves with new parts).
        let in_flight = self.target.parts_in_flight.max(1);
        let first_time = !lock(&self.announced).contains_key(&number);
        if first_time && number > in_flight + 1 {
            let stored = self.stored_parts(cancel).await?.len() as u32;
            let needed = number - 1 - in_flight;
            if stored < needed {
                return Err(StoreError::Mismatch(format!(
                    "part {number} was asked for with {stored} parts stored; the parts before the last {in_flight} \
                     in flight must be stored first"
                )));
            }
        }
        match lock(&self.announced).entry(number) {
            std::collections::hash_map::Entry::Occupied(first) if *first.get() != digest => {
                return Err(StoreError::Mismatch(format!(
                    "part {number} was announced again with other content; a part's content is fixed once announced"
                )));
            }
            std::collections::hash_map::Entry::Occupied(_) => {}
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(digest);
            }
        }
        let bucket = &self.conn.spec.bucket;
        let p = self.upload_part(number, &digest)?.presigned(presigning_config()?).await.map_err(|e| {
            S3Error::from_sdk(&format!("presign part {number} of s3://{bucket}/{}", self.key), bucket, &e)
        })?;
        Ok(presigned(&p))
    }

    /// An `UploadPart` of part `number`, for exactly the bytes `digest` describes.
    fn upload_part(
        &self,
        number: u32,
        digest: &PartDigest,
    ) -> Result<aws_sdk_s3::operation::upload_part::builders::UploadPartFluentBuilder, StoreError> {
        let upload_id = self.upload_id.as_deref().ok_or_else(|| StoreError::Mismatch("no upload".into()))?;
        let b64 = base64::engine::general_purpose::STANDARD;
        Ok(self
            .conn
            .client
            .upload_part()
            .bucket(&self.conn.spec.bucket)
            .key(&self.key)
            .upload_id(upload_id)
            .part_number(number as i32)
            .content_length(digest.size as i64)
            .content_md5(b64.encode(digest.md5))
            .checksum_sha256(b64.encode(digest.sha256)))
    }

    /// Uploads part `number` itself (a backup the coordinator derived), through the same checks as an agent's
    /// part: its digest is fixed first.
    pub(super) async fn put_part(
        &self,
        number: u32,
        part: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<UploadedPart, StoreError> {
        let digest = PartDigest::of(&part);
        self.part_url(number, digest, cancel).await?;
        let bucket = &self.conn.spec.bucket;
        let send = self.upload_part(number, &digest)?.body(ByteStream::from(part)).send();
        let out = tokio::select! {
            r = send => r.map_err(|e| {
                S3Error::from_sdk(&format!("upload part {number} of s3://{bucket}/{}", self.key), bucket, &e)
            })?,
            () = cancel.cancelled() => return Err(StoreError::Cancelled),
        };
        Ok(UploadedPart { number, etag: out.e_tag().unwrap_or_default().to_string() })
    }

    /// The parts the store holds for this upload.
    async fn stored_parts(&self, cancel: &CancellationToken) -> Result<Vec<aws_sdk_s3::types::Part>, StoreError> {
        let conn = &self.conn;
        let bucket = &conn.spec.bucket;
        let upload_id = self.upload_id.as_deref().ok_or_else(|| StoreError::Mismatch("no upload".into()))?;
        let what = format!("list the parts of s3://{bucket}/{}", self.key);
        let mut stored = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let page = with_quick_retries(cancel, &what, || async {
                conn.client
                    .list_parts()
                    .bucket(bucket)
                    .key(&self.key)
                    .upload_id(upload_id)
                    .set_part_number_marker(marker.clone())
                    .send()
                    .await
                    .map_err(|e| S3Error::from_sdk(&what, bucket, &e))
            })
            .await?;
            stored.extend(page.parts().iter().cloned());
            match page.next_part_number_marker() {
                Some(m) if page.is_truncated() == Some(true) && stored.len() <= MAX_PARTS as usize => {
                    marker = Some(m.to_string())
                }
                _ => break,
            }
        }
        Ok(stored)
    }

    /// Compares the parts the store holds with what the agent announced before each was signed: the same
    /// numbers, sizes and, where the store reports them, MD5 ETags and SHA-256 checksums. A part written by
    /// anything but the announced bytes (an `UploadPartCopy` smuggled onto a part's URL, on a server that does
    /// not refuse unsigned `x-amz-*` headers) is refused here, before the upload is completed.
    /// Returns the announced digests of the parts, in order.
    async fn check_stored_parts(
        &self,
        reported: &[UploadedPart],
        cancel: &CancellationToken,
    ) -> Result<Vec<PartDigest>, StoreError> {
        let stored = self.stored_parts(cancel).await?;
        let announced = lock(&self.announced).clone();
        compare_parts(&announced, reported, &stored)
    }

    /// Completes the upload with the agent's `parts`, verifies the object ([`Verification`]: by its parts,
    /// size, ETag and framing, or read back whole) and writes its manifest. On failure the upload and object
    /// are discarded, so nothing unchecked or unlisted lingers.
    pub(super) async fn commit(
        mut self,
        mut spec: EtcdBackupSpec,
        parts: Vec<UploadedPart>,
        cancel: &CancellationToken,
    ) -> Result<Manifest, StoreError> {
        spec.snapshot = self.key.clone();
        let mut completed = false;
        match self.try_commit(spec, parts, &mut completed, cancel).await {
            Ok(manifest) => {
                if let Some(id) = &self.upload_id {
                    self.shared.forget(id);
                }
                Ok(manifest)
            }
            Err(e) => {
                // A completed upload cannot be aborted (S3 answers NoSuchUpload, some servers AccessDenied):
                // only its object and manifest are left to delete.
                if completed {
                    if let Some(id) = self.upload_id.take() {
                        self.shared.forget(&id);
                    }
                }
                self.abort().await;
                Err(e)
            }
        }
    }

    /// Completes the upload once the stored parts are the announced ones; returns their announced digests.
    async fn complete(
        &self,
        parts: Vec<UploadedPart>,
        cancel: &CancellationToken,
    ) -> Result<Vec<PartDigest>, StoreError> {
        let conn = &self.conn;
        let bucket = &conn.spec.bucket;
        let upload_id = self.upload_id.as_deref().ok_or_else(|| StoreError::Mismatch("no upload".into()))?;
        let in_order = parts.iter().enumerate().all(|(i, p)| p.number as usize == i + 1);
        if parts.is_empty() || parts.len() > MAX_PARTS as usize || !in_order {
            return Err(StoreError::Mismatch(format!(
                "the agent reported {} parts, not numbered 1, 2, … in order",
                parts.len()
            )));
        }
        let digests = self.check_stored_parts(&parts, cancel).await?;
        let parts: Vec<CompletedPart> = parts
            .into_iter()
            .map(|p| CompletedPart::builder().part_number(p.number as i32).e_tag(p.etag).build())
            .collect();
        let parts = CompletedMultipartUpload::builder().set_parts(Some(parts)).build();
        let what = format!("complete multipart upload s3://{bucket}/{}", self.key);
        with_retries(cancel, &what, || async {
            conn.client
                .complete_multipart_upload()
                .bucket(bucket)
                .key(&self.key)
                .upload_id(upload_id)
                .multipart_upload(parts.clone())
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, bucket, &e))?;
            Ok(())
        })
        .await?;
        Ok(digests)
    }

    /// Proves the completed object is the announced parts without reading it (`--verify-upload parts`): its
    /// size is theirs and the agent's, its ETag the multipart ETag of their MD5s (where the store gives one
    /// of that shape), and its first bytes — 1 % at most, beyond what the framing takes — are framed as the
    /// job asked: zstd, or age's header with one stanza per recipient and the size age gives the declared
    /// zstd stream. Parts bound to their MD5 and SHA-256 (signed headers, compared before completing) leave
    /// no byte unaccounted for; whether they hold a snapshot that restores is the drill's to prove.
    async fn verify_parts(
        &self,
        spec: &EtcdBackupSpec,
        parts: &[PartDigest],
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        let conn = &self.conn;
        let bucket = &conn.spec.bucket;
        let head = common_s3::head_object(&conn.client, bucket, &self.key, cancel).await?;
        let announced: u64 = parts.iter().map(|p| p.size).sum();
        let size = head.content_length().and_then(|n| u64::try_from(n).ok());
        if size != Some(announced) || announced != spec.size {
            return Err(StoreError::Mismatch(format!(
                "the completed object is {} bytes, its announced parts {announced} bytes, and the agent declared \
                 {} bytes",
                size.map_or_else(|| "an unknown number of".to_string(), |n| n.to_string()),
                spec.size
            )));
        }
        let etag = head.e_tag().unwrap_or_default().trim_matches('"');
        // Compared only when it has the multipart shape (`<md5 of the part MD5s>-<parts>`: AWS S3's, and
        // s3s-fs 0.14.1's, which answers `"609ff2…a8cf-2"` for two parts): a store that gives another (the
        // object's MD5, an opaque tag) cannot be compared with the parts' MD5s. As for the parts' ETags, this
        // assumes MD5 ETags (not SSE-KMS or SSE-C, whose ETags are not MD5s; Ferry encrypts with age).
        if common_s3::is_multipart_etag(etag) {
            let want = common_s3::multipart_etag(parts.iter().map(|p| &p.md5));
            if !etag.eq_ignore_ascii_case(&want) {
                warn!(%etag, %want, "the completed object's ETag is not the one of its announced parts");
                return Err(StoreError::Mismatch(format!(
                    "the completed object's ETag {etag} is not the multipart ETag of the announced parts ({want})"
                )));
            }
        } else {
            debug!(%etag, "the store's ETag is not a multipart ETag; the object's ETag is not compared");
        }
        let recipients = spec.encryption.as_ref().map_or(0, |e| e.recipients.len());
        let len = framing_probe_len(announced, recipients);
        let (first, read) = common_s3::get_prefix(&conn.client, bucket, &self.key, len, cancel).await?;
        self.read.inc_by(read);
        check_framing(&first, announced, spec)
            .map_err(|e| StoreError::Mismatch(format!("the uploaded object failed its checks: {e}")))
    }

    /// Reads the object back through [`StreamCheck`] (`--verify-upload full`): the coordinator itself sees
    /// that it is the snapshot the manifest describes and a well-formed one (an encrypted one: opened with
    /// its identity if it holds one, and hashed as stored).
    async fn verify_full(&self, spec: &mut EtcdBackupSpec, cancel: &CancellationToken) -> Result<(), StoreError> {
        let conn = &self.conn;
        let bucket = &conn.spec.bucket;
        let head = common_s3::head_object(&conn.client, bucket, &self.key, cancel).await?;
        let size = head.content_length().unwrap_or(-1);
        if size != spec.size as i64 {
            return Err(StoreError::Mismatch(format!(
                "the uploaded object is {size} bytes, but the agent sent {} bytes",
                spec.size
            )));
        }
        let what = format!("read back s3://{bucket}/{}", self.key);
        let mut body = common_s3::get_object(&conn.client, bucket, &self.key, &what, cancel).await?;
        let mismatch = |e: SnapshotError| StoreError::Mismatch(format!("the uploaded object failed its checks: {e}"));
        let mut check = StreamCheck::new().map_err(mismatch)?.with_raw_limit(spec.rawsize);
        if let Some(ids) = &self.opener {
            check.open_with(ids.clone()).map_err(mismatch)?;
        }
        check.expect_members(self.expected_members.clone()).map_err(mismatch)?;
        loop {
            let piece = tokio::select! {
                p = body.try_next() => p,
                () = cancel.cancelled() => return Err(StoreError::Cancelled),
            };
            let piece = piece.map_err(|e| S3Error::body(&what, e))?;
            let Some(piece) = piece else { break };
            self.read.inc_by(piece.len() as u64);
            check.write(&piece).map_err(|e| StoreError::Mismatch(format!("the uploaded object: {e}")))?;
            if check.bytes() > spec.size {
                break;
            }
        }
        check.record_stored_hash(spec);
        check.finish(spec).map_err(mismatch)
    }

    async fn try_commit(
        &self,
        mut spec: EtcdBackupSpec,
        parts: Vec<UploadedPart>,
        completed: &mut bool,
        cancel: &CancellationToken,
    ) -> Result<Manifest, StoreError> {
        // A deposed leader (stopped past its lease, then resumed) completes nothing: the new leader aborts the
        // upload it recorded. Checked again before the manifest, the commit point, after the verification.
        self.shared.still_leading()?;
        let digests = self.complete(parts, cancel).await?;
        *completed = true;
        let verification = match self.verification {
            Verification::Full => {
                self.verify_full(&mut spec, cancel).await?;
                Verification::Full
            }
            Verification::Parts | Verification::Other => {
                self.verify_parts(&spec, &digests, cancel).await?;
                Verification::Parts
            }
        };
        self.shared.still_leading()?;
        let deployment = (!self.deployment.is_empty()).then(|| self.deployment.clone());
        let verification = Some(verification);
        let manifest = Manifest { format: 1, id: self.id.clone(), backup: spec, deployment, verification };
        let conn = &self.conn;
        let bucket = &conn.spec.bucket;
        let mkey = manifest_key(&conn.spec, &manifest.backup.cluster, &manifest.id);
        let body = serde_json::to_vec_pretty(&manifest)
            .map(bytes::Bytes::from)
            .map_err(|e| StoreError::Corrupt(format!("encode manifest: {e}")))?;
        let what = format!("write manifest s3://{bucket}/{mkey}");
        with_quick_retries(cancel, &what, || async {
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
        Ok(manifest)
    }

    /// Deletes a manifest the commit may have written, aborts the multipart upload and deletes any completed
    /// object (all retried later if S3 fails).
    pub(super) async fn abort(self) {
        let manifest = manifest_key(&self.conn.spec, &self.cluster, &self.id);
        let leftover = Leftover { manifest, key: self.key.clone(), upload_id: self.upload_id.clone() };
        self.shared.discard(&self.conn, leftover).await;
    }
}

/// Whether `etag` (quotes removed) is an MD5 ETag that differs from `md5`: single-part upload semantics; not
/// under SSE-KMS, where ETags are opaque. Any other shape is not compared.
fn md5_etag_differs(etag: &str, md5: &[u8; 16]) -> bool {
    etag.len() == 32 && etag.bytes().all(|b| b.is_ascii_hexdigit()) && !etag.eq_ignore_ascii_case(&hex::encode(md5))
}

/// What [`PendingUpload::check_stored_parts`] decides, apart from S3: the agent's parts `1..=n` were each
/// announced, and each stored part is one of them with the announced size, and the announced MD5 or SHA-256
/// wherever the store reports an MD5 ETag or a SHA-256 checksum; the ETag the store answered each upload
/// with (as the agent reports it) is the announced MD5 too — a part changed on its way is refused here even
/// by a store that neither checks `Content-MD5` nor lists ETags (s3s-fs). Part numbers are all the agent
/// learns of a mismatch; the stored values go to the log only. Returns the announced digests, in order.
fn compare_parts(
    announced: &HashMap<u32, PartDigest>,
    reported: &[UploadedPart],
    stored: &[aws_sdk_s3::types::Part],
) -> Result<Vec<PartDigest>, StoreError> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut digests = Vec::with_capacity(reported.len());
    for part in reported {
        let Some(want) = announced.get(&part.number) else {
            return Err(StoreError::Mismatch(format!(
                "the agent reported part {}, which was never announced",
                part.number
            )));
        };
        let etag = part.etag.trim_matches('"');
        if md5_etag_differs(etag, &want.md5) {
            warn!(number = part.number, %etag, md5 = %hex::encode(want.md5), "the store took another part than the one announced");
            return Err(StoreError::Mismatch(format!(
                "stored part {} is not the part the agent announced (the store answered its upload with another ETag)",
                part.number
            )));
        }
        digests.push(*want);
    }
    let reported = reported.len();
    let mut seen = std::collections::BTreeSet::new();
    for part in stored {
        let number = part.part_number().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
        let Some(want) = announced.get(&number) else {
            warn!(number, "the store holds a part that was never announced");
            return Err(StoreError::Mismatch(format!("the store holds part {number}, which was never announced")));
        };
        let mut differs = Vec::new();
        if part.size() != Some(want.size as i64) {
            differs.push(format!("size {:?}, announced {}", part.size(), want.size));
        }
        let etag = part.e_tag().unwrap_or_default().trim_matches('"');
        if md5_etag_differs(etag, &want.md5) {
            differs.push(format!("ETag {etag}, announced MD5 {}", hex::encode(want.md5)));
        }
        if let Some(sum) = part.checksum_sha256() {
            if sum != b64.encode(want.sha256) {
                differs.push(format!("SHA-256 {sum}, announced {}", b64.encode(want.sha256)));
            }
        }
        if !differs.is_empty() {
            warn!(number, "a stored part is not what the agent announced: {}", differs.join(", "));
            return Err(StoreError::Mismatch(format!("stored part {number} is not the part the agent announced")));
        }
        seen.insert(number);
    }
    let expected: std::collections::BTreeSet<u32> = (1..=reported as u32).collect();
    if seen != expected {
        return Err(StoreError::Mismatch(format!(
            "the store holds {} of the {reported} parts the agent reported",
            seen.intersection(&expected).count()
        )));
    }
    Ok(digests)
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

#[cfg(test)]
mod tests {
    use aws_sdk_s3::types::Part;

    use super::*;

    fn stored(number: i32, bytes: &[u8]) -> Part {
        let d = PartDigest::of(bytes);
        Part::builder()
            .part_number(number)
            .size(bytes.len() as i64)
            .e_tag(format!("\"{}\"", hex::encode(d.md5)))
            .build()
    }

    /// Parts `1..=n` as an agent reports them, without ETags (a store that answers none is not compared).
    fn reported(n: u32) -> Vec<UploadedPart> {
        (1..=n).map(|number| UploadedPart { number, etag: String::new() }).collect()
    }

    /// The comparison before completing an upload: the stored parts must be exactly the announced ones.
    #[test]
    fn only_the_announced_parts_pass_the_comparison() {
        let (one, two) = (vec![1u8; 100], vec![2u8; 50]);
        let announced: HashMap<u32, PartDigest> = [(1, PartDigest::of(&one)), (2, PartDigest::of(&two))].into();
        let digests = compare_parts(&announced, &reported(2), &[stored(2, &two), stored(1, &one)]).unwrap();
        assert_eq!(digests, vec![announced[&1], announced[&2]], "the announced digests, in order");

        // A copy of something else: another size and MD5 (s3s-fs reports sizes only: the size alone refuses it).
        let foreign = vec![9u8; 4096];
        let copy = stored(1, &foreign);
        assert!(compare_parts(&announced, &reported(2), &[copy.clone(), stored(2, &two)]).is_err());
        let size_only = Part::builder().part_number(1).size(foreign.len() as i64).build();
        assert!(compare_parts(&announced, &reported(2), &[size_only, stored(2, &two)]).is_err());
        // Same size, other bytes: the MD5 ETag refuses it.
        let same_size = vec![3u8; 100];
        assert!(compare_parts(&announced, &reported(2), &[stored(1, &same_size), stored(2, &two)]).is_err());
        // ... and where the store reports SHA-256 but an opaque ETag (SSE-KMS), the checksum does.
        let b64 = base64::engine::general_purpose::STANDARD;
        let opaque = Part::builder()
            .part_number(1)
            .size(100)
            .e_tag("\"opaque-kms-etag\"")
            .checksum_sha256(b64.encode(PartDigest::of(&same_size).sha256))
            .build();
        assert!(compare_parts(&announced, &reported(2), &[opaque, stored(2, &two)]).is_err());
        let opaque_ok = Part::builder()
            .part_number(1)
            .size(100)
            .e_tag("\"opaque\"")
            .checksum_sha256(b64.encode(announced[&1].sha256))
            .build();
        compare_parts(&announced, &reported(2), &[opaque_ok, stored(2, &two)]).unwrap();

        // A part never announced, a part missing, a reported count beyond what is stored.
        assert!(compare_parts(&announced, &reported(2), &[stored(1, &one), stored(2, &two), stored(3, &two)]).is_err());
        assert!(compare_parts(&announced, &reported(2), &[stored(1, &one)]).is_err());
        assert!(compare_parts(&announced, &reported(1), &[stored(1, &one), stored(2, &two)]).is_err());
        // The store answered a part's upload with the MD5 of other bytes (changed on their way): refused even
        // where the listing shows sizes only; the announced MD5 (any case, quoted or not) passes.
        let size_only = |n: i32, len: usize| Part::builder().part_number(n).size(len as i64).build();
        let listed = [size_only(1, one.len()), size_only(2, two.len())];
        let answered = |etag: String| vec![UploadedPart { number: 1, etag }, reported(2)[1].clone()];
        let other_md5 = format!("\"{}\"", hex::encode(PartDigest::of(&same_size).md5));
        let e = compare_parts(&announced, &answered(other_md5), &listed).unwrap_err().to_string();
        assert!(e.contains("part 1 is not the part the agent announced"), "{e}");
        let ok = compare_parts(&announced, &answered(hex::encode(announced[&1].md5).to_uppercase()), &listed);
        assert_eq!(ok.unwrap(), vec![announced[&1], announced[&2]]);
        assert!(compare_parts(&announced, &[UploadedPart { number: 3, etag: String::new() }], &listed).is_err());

        // What the agent may learn names the part, never a stored size or hash.
        let e = compare_parts(&announced, &reported(2), &[copy, stored(2, &two)]).unwrap_err().to_string();
        assert!(!e.contains("4096") && !e.contains(&hex::encode(PartDigest::of(&foreign).md5)), "{e}");
    }

    /// The framing check reads 1 % of an object, at least what its framing takes, at most a few KiB.
    #[test]
    fn the_framing_probe_is_one_percent_within_its_bounds() {
        assert_eq!(framing_probe_len(1 << 30, 0), FRAMING_PROBE_MAX);
        assert_eq!(framing_probe_len(100_000, 0), 1000);
        assert_eq!(framing_probe_len(1000, 0), 10);
        assert_eq!(framing_probe_len(100, 0), 4, "zstd's magic, whatever the size");
        assert_eq!(framing_probe_len(2, 0), 2, "never more than the object");
        assert_eq!(framing_probe_len(10_000, 1), AGE_HEADER_BASE + AGE_STANZA, "age's whole header");
        assert_eq!(framing_probe_len(200_000, 1), 2000);
        // The most recipients a backup may have still fit the cap.
        let most = ferry_common::encryption::MAX_RECIPIENTS;
        assert!(AGE_HEADER_BASE + AGE_STANZA * most as u64 <= FRAMING_PROBE_MAX);
        for size in [4u64 << 10, 1 << 20, 1 << 30, 64 << 30] {
            assert!(framing_probe_len(size, 0) * 100 <= size, "{size}");
        }
    }
}
