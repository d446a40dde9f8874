//! The backup store, one implementation per backend: the local filesystem ([`local`]: bytes travel through
//! the coordinator) or S3 ([`s3`]: agents upload straight to the bucket), and a failure-injecting wrapper for
//! tests ([`failing`]).
//!
//! Callers see one interface: list, find, open, delete, and [`BackupStore::begin`], which reserves a backup id
//! and returns the job's [`Pending`] object — `write` the bytes (local) or note the agent's upload (S3), then
//! `commit` or `abort`. Every call takes a cancellation token. No caller outside this module knows which
//! backend it talks to.

mod failing;
mod local;
mod s3;
mod segments;

use std::sync::Arc;

use ferry_common::encryption::Identities;
use ferry_common::protocol::{BackupTarget, PartDigest, PresignedRequest, RestoreSource, UploadedPart};
use ferry_common::resources::{EtcdBackupS3ConfigSpec, EtcdBackupSpec, Timestamp};
use ferry_common::s3::S3Error;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use self::failing::Failures;
use self::local::{LocalStore, PendingLocal};
pub use self::s3::S3Conn;
use self::s3::{PendingUpload, S3Store};
pub use self::segments::MAX_SEGMENT_BYTES;

pub const OBJECT_SUFFIX: &str = ".snapshot.zst";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";
/// Largest manifest read: a real one is about 1 KiB; an object named like a manifest but larger is not one,
/// and must not cost the coordinator its memory.
pub const MAX_MANIFEST_BYTES: u64 = 64 * 1024;
/// Default largest snapshot (decompressed) the coordinator takes: twice etcd's largest recommended
/// `--quota-backend-bytes` (8 GiB). Incoming bytes are checked as they stream, before the agent's summary
/// says their size, so a hostile agent's endless stream or decompression bomb stops here.
pub const DEFAULT_MAX_SNAPSHOT_SIZE: u64 = 16 << 30;

/// The manifest written beside each object; a stable, documented format (see docs/ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    pub id: String,
    pub backup: EtcdBackupSpec,
    /// The deployment (coordinator set) that wrote it: retention deletes only its own deployment's backups,
    /// so two deployments sharing a bucket never delete each other's. Absent in manifests written before it
    /// existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment: Option<String>,
    /// How the commit proved the object: read whole (`full`: the local store, `--verify-upload full`) or by
    /// its parts (`parts`). Absent in manifests written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
}

/// How a commit proves the stored object before its manifest is written (`ferry-coordinator
/// --verify-upload`; the local store always reads everything it receives).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verification {
    /// Without reading the object: the parts the store holds are the announced ones (`ListParts`, and the
    /// ETags the store answered each upload with), the completed object's size and multipart ETag are
    /// theirs, and its first bytes are framed as the job asked (zstd, or age's header with the cluster's
    /// recipients). What is inside is the drill's to prove.
    #[default]
    Parts,
    /// Read back whole through every restore check (`snapshot::StreamCheck`).
    Full,
    /// A way a later version verified with; this one reads the manifest all the same.
    #[serde(other)]
    Other,
}

impl Verification {
    /// `parts`, `full`, or `other`, as manifests and `get etcdbackup` name it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Parts => "parts",
            Self::Full => "full",
            Self::Other => "other",
        }
    }
}

impl Manifest {
    /// Checks that the manifest describes the backup at the place it was found: its id, its cluster and its
    /// object beside it. A manifest planted elsewhere (pointing another cluster's `latest` at a foreign object,
    /// or retention at someone else's backup) is refused, not listed.
    pub(crate) fn check_location(&self, cluster: &str, id: &str, object: &str) -> Result<(), StoreError> {
        if self.id != id || self.backup.cluster != cluster || self.backup.snapshot != object {
            return Err(StoreError::Corrupt(format!(
                "the manifest of {cluster}/{id} describes backup {:?} of cluster {:?} at {:?}, not the object beside it; it is ignored",
                self.id, self.backup.cluster, self.backup.snapshot
            )));
        }
        Ok(())
    }

    /// Whether this backup is deployment `deployment`'s: one it wrote, or one written before manifests named
    /// their deployment. Only those are listed, restored, drilled and (retention) deleted by it.
    pub fn owned_by(&self, deployment: &str) -> bool {
        self.deployment.as_deref().is_none_or(|d| d == deployment)
    }
}

/// Refuses a cluster name or backup id that could not name a backup (`..`, `/`, empty, …).
fn check_names(cluster: &str, id: Option<&str>) -> Result<(), StoreError> {
    ferry_common::resources::validate_name("cluster", cluster).map_err(|e| StoreError::BadName(e.to_string()))?;
    if let Some(id) = id {
        ferry_common::resources::validate_backup_id(id).map_err(|e| StoreError::BadName(e.to_string()))?;
    }
    Ok(())
}

pub(crate) fn sort_newest_first(v: &mut [Manifest]) {
    v.sort_by(|a, b| b.backup.createdat.cmp(&a.backup.createdat).then_with(|| b.id.cmp(&a.id)));
}

/// A backup store call failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The S3 store has no working configuration yet.
    #[error(
        "the S3 store is not configured: apply an EtcdBackupS3Configs.ferry.dev resource with id etcd-backup-s3-conf"
    )]
    NotConfigured,
    /// An S3 call failed (after its retries).
    #[error(transparent)]
    S3(#[from] S3Error),
    /// A filesystem call of the local store failed.
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    /// What the agent sent does not match what arrived, or the object is not what its manifest says.
    #[error("{0}")]
    Mismatch(String),
    /// A stored manifest is unreadable.
    #[error("{0}")]
    Corrupt(String),
    /// The job sent something this backend does not take (data for S3, an upload id for local).
    #[error("this {store} store does not take {what}")]
    WrongPath { store: &'static str, what: &'static str },
    /// No free backup id in a second's worth of tries.
    #[error("could not find a free backup id for cluster {0}")]
    NoFreeId(String),
    /// A cluster name or backup id that cannot name a backup (it would leave the store's directory or prefix).
    #[error("{0}")]
    BadName(String),
    /// The call was cancelled (shutdown).
    #[error("cancelled")]
    Cancelled,
    /// The backup belongs to another deployment sharing the store.
    #[error("{0}")]
    Foreign(String),
    /// This replica's term as leader ended: it completes no upload and deletes no backup any more.
    #[error("this coordinator replica no longer leads; it leaves the backup to the new leader (which aborts it)")]
    NotLeading,
    /// Injected by the failing wrapper (tests).
    #[error("injected failure: {0}")]
    Injected(String),
}

impl StoreError {
    /// Whether the store could not be reached or is not set up, as opposed to a fault of the data.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, Self::NotConfigured | Self::S3(_) | Self::Cancelled | Self::NotLeading)
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let what = what.into();
        move |error| Self::Io { what, error }
    }
}

/// What a job tells agents about uploads (S3 only).
#[derive(Debug, Clone, Copy)]
pub struct UploadSettings {
    /// Bytes per multipart part.
    pub part_size: u64,
    /// Parts uploading at once.
    pub parts_in_flight: u32,
}

/// The backup store of this coordinator.
pub struct BackupStore {
    backend: Backend,
    /// This deployment's id, written into every manifest.
    deployment: String,
    /// Injected failures (tests only; `None` in the daemon).
    failures: Option<Arc<Failures>>,
    /// Largest snapshot taken, decompressed ([`DEFAULT_MAX_SNAPSHOT_SIZE`]).
    max_snapshot_size: u64,
    /// Manifests of other deployments found in this store, each warned about once.
    foreign_seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// Bytes of stored objects a commit read back to verify them (`ferry_store_verify_read_bytes_total`).
pub type ReadCounter = prometheus_client::metrics::counter::Counter;

enum Backend {
    Local(LocalStore),
    S3(S3Store),
}

impl BackupStore {
    /// The local store in `dir` (created if missing); partial objects a crash left are removed.
    pub fn local(dir: &std::path::Path) -> Result<Self, StoreError> {
        Ok(Self {
            backend: Backend::Local(LocalStore::open(dir)?),
            deployment: String::new(),
            failures: None,
            max_snapshot_size: DEFAULT_MAX_SNAPSHOT_SIZE,
            foreign_seen: Default::default(),
        })
    }

    /// An S3 store, unusable until a configuration is set ([`Self::set_s3_config`]).
    pub fn s3() -> Self {
        Self {
            backend: Backend::S3(S3Store::default()),
            deployment: String::new(),
            failures: None,
            max_snapshot_size: DEFAULT_MAX_SNAPSHOT_SIZE,
            foreign_seen: Default::default(),
        }
    }

    /// The same store, writing `deployment` into every manifest and deleting (retention) only backups of
    /// that deployment.
    pub fn with_deployment(mut self, deployment: impl Into<String>) -> Self {
        self.deployment = deployment.into();
        self
    }

    /// The same store, refusing snapshots larger than `bytes` decompressed (local: as they stream in).
    pub fn with_max_snapshot_size(mut self, bytes: u64) -> Self {
        self.max_snapshot_size = bytes;
        self
    }

    /// Largest snapshot taken, decompressed.
    pub fn max_snapshot_size(&self) -> u64 {
        self.max_snapshot_size
    }

    /// The same store, proving S3 uploads as `verification` says (the local store reads every byte anyway)
    /// and counting what it reads back to do so in `read`.
    pub fn with_verification(mut self, verification: Verification, read: ReadCounter) -> Self {
        if let Backend::S3(s) = &mut self.backend {
            s.verification = verification;
            s.read = read;
        }
        self
    }

    /// The same store, recording open S3 multipart uploads in `state` until they are completed or aborted, so
    /// the next leader (or this coordinator after a crash) aborts what a dead one left open.
    pub fn with_state(self, state: std::sync::Arc<dyn crate::state::StateStore>) -> Self {
        if let Backend::S3(s) = &self.backend {
            s.set_state(state);
        }
        self
    }

    /// This deployment's id.
    pub fn deployment(&self) -> &str {
        &self.deployment
    }

    /// The same store with failures injected (tests).
    pub fn with_failures(mut self, failures: Failures) -> Self {
        self.failures = Some(Arc::new(failures));
        self
    }

    /// `local` or `s3`, as `configurationname` shows it.
    pub fn name(&self) -> &'static str {
        match &self.backend {
            Backend::Local(_) => "local",
            Backend::S3(_) => "s3",
        }
    }

    /// The overall status's `configurationerror` at start: the local store is ready, an S3 one is not until
    /// its stored configuration was loaded.
    pub fn initial_configuration_error(&self) -> &'static str {
        match &self.backend {
            Backend::Local(_) => "",
            Backend::S3(_) => "not initialized",
        }
    }

    /// Whether this store is configured by an `EtcdBackupS3Configs` resource.
    pub fn takes_s3_config(&self) -> bool {
        matches!(self.backend, Backend::S3(_))
    }

    /// Builds a client for `spec` and proves it works by listing the bucket with exactly these settings.
    pub async fn check_s3_config(&self, spec: &EtcdBackupS3ConfigSpec) -> Result<S3Conn, String> {
        s3::validate(spec).await
    }

    /// Uses `conn` from now on (S3 only; ignored by the local store).
    pub fn set_s3_config(&self, conn: S3Conn) {
        if let Backend::S3(s) = &self.backend {
            s.set(conn);
        }
    }

    /// Retries aborting multipart uploads whose abort failed earlier (S3 only).
    pub async fn retry_pending_aborts(&self, cancel: &CancellationToken) {
        if let Backend::S3(s) = &self.backend {
            s.retry_pending_aborts(cancel).await;
        }
    }

    /// Every backup of `cluster` (or all clusters) of this deployment, newest first.
    pub async fn list(&self, cluster: Option<&str>, cancel: &CancellationToken) -> Result<Vec<Manifest>, StoreError> {
        if let Some(c) = cluster {
            check_names(c, None)?;
        }
        if let Some(f) = &self.failures {
            f.on_list(cluster, cancel).await?;
        }
        let all = match &self.backend {
            Backend::Local(l) => l.list(cluster, cancel)?,
            Backend::S3(s) => s.list(cluster, cancel).await?,
        };
        Ok(all.into_iter().filter(|m| self.is_own(m)).collect())
    }

    /// Whether `m` is this deployment's (see [`Manifest::owned_by`]); another deployment's backup is warned
    /// about once: two deployments share a bucket and prefix, which works but hides each other's backups.
    fn is_own(&self, m: &Manifest) -> bool {
        if m.owned_by(&self.deployment) {
            return true;
        }
        let key = format!("{}/{}", m.backup.cluster, m.id);
        if crate::lock(&self.foreign_seen).insert(key) {
            tracing::warn!(
                cluster = %m.backup.cluster,
                backup_id = %m.id,
                "ignoring a backup of deployment {:?} (this is {:?}): it shares this store's bucket and prefix; \
                 give each deployment its own prefix",
                m.deployment.as_deref().unwrap_or_default(),
                self.deployment
            );
        }
        false
    }

    fn foreign(&self, m: &Manifest) -> StoreError {
        StoreError::Foreign(format!(
            "backup {}/{} was written by deployment {:?}, not this one ({:?}); it is left alone",
            m.backup.cluster,
            m.id,
            m.deployment.as_deref().unwrap_or_default(),
            self.deployment
        ))
    }

    /// One backup's manifest, if it exists; another deployment's is refused ([`StoreError::Foreign`]).
    pub async fn find(
        &self,
        cluster: &str,
        id: &str,
        cancel: &CancellationToken,
    ) -> Result<Option<Manifest>, StoreError> {
        check_names(cluster, Some(id))?;
        let found = match &self.backend {
            Backend::Local(l) => l.find(cluster, id, cancel)?,
            Backend::S3(s) => s.find(cluster, id, cancel).await?,
        };
        match found {
            Some(m) if !self.is_own(&m) => Err(self.foreign(&m)),
            found => Ok(found),
        }
    }

    /// Deletes a backup (retention): its manifest first (so it is no longer listed), then its object, both at
    /// the keys this deployment derives from the cluster and id — never a key a manifest names. A backup
    /// another deployment wrote is refused.
    pub async fn delete(&self, m: &Manifest, cancel: &CancellationToken) -> Result<(), StoreError> {
        check_names(&m.backup.cluster, Some(&m.id))?;
        if !m.owned_by(&self.deployment) {
            return Err(self.foreign(m));
        }
        match &self.backend {
            Backend::Local(l) => l.delete(m, cancel).await,
            Backend::S3(s) => s.delete(m, cancel).await,
        }
    }

    /// Opens a backup's object for reading.
    pub async fn open(&self, m: &Manifest, cancel: &CancellationToken) -> Result<ObjectReader, StoreError> {
        Ok(ObjectReader(match &self.backend {
            Backend::Local(l) => Reader::Local(l.open_object(m, cancel).await?),
            Backend::S3(s) => Reader::S3(s.open(m, cancel).await?),
        }))
    }

    /// Where a restore reads `m` from: the bytes on the request stream (local), or presigned `HEAD` and `GET`
    /// requests for that one object, valid for a few minutes (S3). No credential leaves the coordinator.
    pub async fn restore_source(&self, m: &Manifest) -> Result<RestoreSource, StoreError> {
        match &self.backend {
            Backend::Local(_) => Ok(RestoreSource::Coordinator),
            Backend::S3(s) => {
                let (head, get, cacert) = s.restore_requests(m).await?;
                Ok(RestoreSource::S3 { head, get, cacert })
            }
        }
    }

    /// Starts a backup of `cluster`: reserves an id `<cluster>-<unix seconds>[-N]` and returns the job's
    /// pending object.
    pub async fn begin(
        &self,
        cluster: &str,
        at: Timestamp,
        upload: UploadSettings,
        cancel: &CancellationToken,
    ) -> Result<Pending, StoreError> {
        check_names(cluster, None)?;
        let kind = match &self.backend {
            Backend::Local(l) => PendingKind::Local(Box::new(
                l.begin(cluster, at, &self.deployment, self.max_snapshot_size, cancel).await?,
            )),
            Backend::S3(s) => PendingKind::S3(Box::new(s.begin(cluster, at, upload, &self.deployment, cancel).await?)),
        };
        Ok(Pending { kind, failures: self.failures.clone() })
    }
}

/// One job's backup, from `begin` to `commit` or `abort`. Dropped without either, a local partial file is
/// removed; an S3 upload should be aborted explicitly (`abort`), since that is a remote call.
pub struct Pending {
    kind: PendingKind,
    failures: Option<Arc<Failures>>,
}

enum PendingKind {
    Local(Box<PendingLocal>),
    S3(Box<PendingUpload>),
}

impl Pending {
    /// The reserved backup id.
    pub fn id(&self) -> &str {
        match &self.kind {
            PendingKind::Local(p) => &p.id,
            PendingKind::S3(p) => &p.id,
        }
    }

    /// Where the agent sends the compressed bytes.
    pub fn target(&self) -> BackupTarget {
        match &self.kind {
            PendingKind::Local(_) => BackupTarget::Coordinator,
            PendingKind::S3(p) => BackupTarget::S3(Box::new(p.target.clone())),
        }
    }

    /// Has the commit check open this encrypted backup with `ids` (which open its recipients) and check
    /// everything inside it: the zstd stream, the snapshot's size and hashes, etcd's hash, bbolt's meta page.
    /// Before the first byte.
    pub fn open_with(&mut self, ids: Identities) -> Result<(), StoreError> {
        match &mut self.kind {
            PendingKind::Local(p) => p.open_with(ids),
            PendingKind::S3(p) => {
                p.opener = Some(ids);
                Ok(())
            }
        }
    }

    /// Has the commit check compare the snapshot's etcd members with the ids the cluster's connected agents
    /// report (`StreamCheck::expect_members`): another cluster's snapshot is refused. Before the first byte.
    pub fn expect_members(&mut self, reported: Vec<u64>) -> Result<(), StoreError> {
        match &mut self.kind {
            PendingKind::Local(p) => p.check.expect_members(reported).map_err(|e| StoreError::Mismatch(e.to_string())),
            PendingKind::S3(p) => {
                p.expected_members = reported;
                Ok(())
            }
        }
    }

    /// Appends bytes the agent sent on the job stream (local store).
    pub async fn write(&mut self, data: &[u8], cancel: &CancellationToken) -> Result<(), StoreError> {
        if let Some(f) = &self.failures {
            f.on_write()?;
        }
        match &mut self.kind {
            PendingKind::Local(p) => p.write(data, cancel).await,
            PendingKind::S3(_) => Err(StoreError::WrongPath { store: "s3", what: "data on the job stream" }),
        }
    }

    /// Appends the next piece of a backup the coordinator writes itself (a derived one): to the file (local),
    /// or as part `number` of the upload (S3; returned for the commit).
    pub async fn put(
        &mut self,
        number: u32,
        data: Vec<u8>,
        cancel: &CancellationToken,
    ) -> Result<Option<UploadedPart>, StoreError> {
        match &mut self.kind {
            PendingKind::Local(p) => p.write(&data, cancel).await.map(|()| None),
            PendingKind::S3(p) => p.put_part(number, data, cancel).await.map(Some),
        }
    }

    /// The part size a coordinator-written backup uses (S3 parts; the local store takes any).
    pub fn part_size(&self) -> usize {
        match &self.kind {
            PendingKind::Local(_) => 8 << 20,
            PendingKind::S3(p) => p.target.part_size as usize,
        }
    }

    /// A presigned `UploadPart` request for part `number` of this job's upload (S3).
    pub async fn part_url(
        &self,
        number: u32,
        digest: PartDigest,
        cancel: &CancellationToken,
    ) -> Result<PresignedRequest, StoreError> {
        match &self.kind {
            PendingKind::S3(p) => p.part_url(number, digest, cancel).await,
            PendingKind::Local(_) => Err(StoreError::WrongPath { store: "local", what: "a request for an S3 part" }),
        }
    }

    /// Makes the backup durable and listed. `spec` must describe what was written: the coordinator checks it
    /// against the bytes it received (local) or, after completing the upload with `parts` (S3), against the
    /// object as [`Verification`] says — read back whole (sizes, hashes, etcd's trailing hash, bbolt's meta
    /// page), or by its parts, size, multipart ETag and framing. On failure nothing is left behind.
    pub async fn commit(
        self,
        spec: EtcdBackupSpec,
        parts: Vec<UploadedPart>,
        cancel: &CancellationToken,
    ) -> Result<Manifest, StoreError> {
        if let Some(f) = &self.failures {
            f.on_commit(cancel).await?;
        }
        match self.kind {
            PendingKind::Local(mut p) => {
                if !parts.is_empty() {
                    return Err(StoreError::WrongPath { store: "local", what: "S3 parts" });
                }
                p.commit(spec, cancel).await
            }
            PendingKind::S3(p) => p.commit(spec, parts, cancel).await,
        }
    }

    /// Discards the backup: the partial file (local), or the multipart upload and any object the agent
    /// completed without a manifest (S3; an abort that fails is retried later).
    pub async fn abort(self) {
        match self.kind {
            PendingKind::Local(p) => drop(p),
            PendingKind::S3(p) => p.abort().await,
        }
    }
}

/// A stored object being read.
pub struct ObjectReader(Reader);

enum Reader {
    Local(tokio::fs::File),
    S3(aws_sdk_s3::primitives::ByteStream),
}

impl ObjectReader {
    /// The next piece of the object; `None` at the end.
    pub async fn next(&mut self, buf: &mut [u8]) -> Result<Option<Vec<u8>>, StoreError> {
        use tokio::io::AsyncReadExt;
        match &mut self.0 {
            Reader::Local(f) => {
                let n = f.read(buf).await.map_err(StoreError::io("read backup object"))?;
                Ok((n > 0).then(|| buf[..n].to_vec()))
            }
            Reader::S3(s) => s.try_next().await.map(|b| b.map(|b| b.to_vec())).map_err(|e| {
                StoreError::S3(S3Error {
                    kind: ferry_common::s3::S3ErrorKind::Unreachable,
                    message: format!("read backup object: {e}"),
                    retryable: true,
                })
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest of `prod/<id>` written by `deployment`, placed straight into a local store's dir.
    fn plant(dir: &std::path::Path, id: &str, deployment: Option<&str>) {
        let now = Timestamp::now();
        let m = Manifest {
            format: 1,
            id: id.into(),
            backup: EtcdBackupSpec {
                cluster: "prod".into(),
                createdat: now,
                snapshot: format!("prod/{id}{OBJECT_SUFFIX}"),
                size: 1,
                rawsize: 1,
                member: "m1".into(),
                memberid: String::new(),
                etcdclusterid: String::new(),
                etcdversion: String::new(),
                revision: 1,
                sha256: String::new(),
                rawsha256: String::new(),
                zstdlevel: 3,
                startedat: now,
                finishedat: now,
                encryption: None,
                derivedfrom: None,
            },
            deployment: deployment.map(str::to_owned),
            verification: None,
        };
        std::fs::create_dir_all(dir.join("prod")).unwrap();
        std::fs::write(dir.join(format!("prod/{id}{MANIFEST_SUFFIX}")), serde_json::to_vec(&m).unwrap()).unwrap();
    }

    /// Manifests live in buckets that later versions read: one without `verification` (written before it
    /// existed) reads as unknown, one a later version verified another way still reads, and an old reader
    /// (no `verification` field, fields unknown to it ignored) reads a new one.
    #[test]
    fn manifests_read_with_or_without_how_they_were_verified() {
        let dir = tempfile::tempdir().unwrap();
        plant(dir.path(), "prod-1", None);
        let text = std::fs::read_to_string(dir.path().join(format!("prod/prod-1{MANIFEST_SUFFIX}"))).unwrap();
        assert!(!text.contains("verification"), "{text}");
        let old: Manifest = serde_json::from_str(&text).unwrap();
        assert_eq!(old.verification, None);
        let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
        json["verification"] = "parts".into();
        let m: Manifest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(m.verification, Some(Verification::Parts));
        assert!(serde_json::to_string(&m).unwrap().contains(r#""verification":"parts""#));
        json["verification"] = "checksums-of-the-future".into();
        let m: Manifest = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(m.verification, Some(Verification::Other));

        #[derive(serde::Deserialize)]
        #[allow(dead_code)]
        struct OldManifest {
            format: u32,
            id: String,
            backup: EtcdBackupSpec,
            #[serde(default)]
            deployment: Option<String>,
        }
        json["verification"] = "full".into();
        let older: OldManifest = serde_json::from_value(json).unwrap();
        assert_eq!(older.id, "prod-1");
    }

    #[tokio::test]
    async fn a_deployment_lists_and_finds_only_its_own_backups_and_older_unowned_ones() {
        let dir = tempfile::tempdir().unwrap();
        plant(dir.path(), "prod-1", Some("ca-a"));
        plant(dir.path(), "prod-2", Some("ca-b"));
        plant(dir.path(), "prod-3", None);
        let cancel = CancellationToken::new();
        let a = BackupStore::local(dir.path()).unwrap().with_deployment("ca-a");
        let mut ids: Vec<String> = a.list(Some("prod"), &cancel).await.unwrap().into_iter().map(|m| m.id).collect();
        ids.sort();
        assert_eq!(ids, ["prod-1", "prod-3"]);
        assert!(a.find("prod", "prod-1", &cancel).await.unwrap().is_some());
        let err = a.find("prod", "prod-2", &cancel).await.unwrap_err();
        assert!(matches!(err, StoreError::Foreign(_)) && err.to_string().contains("ca-b"), "{err}");
        let all: Vec<String> = a.list(None, &cancel).await.unwrap().into_iter().map(|m| m.id).collect();
        assert_eq!(all.len(), 2, "{all:?}");
    }
}
