//! The local backup store: `<dir>/<cluster>/<backup id>.snapshot.zst` with `<backup id>.manifest.json`
//! beside it.
//!
//! An object is written as a hidden `.partial` file, fsynced, renamed into place, and only then is its
//! manifest written (again temp + fsync + rename) and the directory fsynced. Listings read manifests, so a
//! backup is listed only once it is whole; a crash leaves at most a `.partial` file, removed at start-up.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_common::config::{create_private, create_private_dir, create_private_replacing};
use ferry_common::encryption::Identities;
use ferry_common::resources::{validate_backup_id, validate_name};
use ferry_common::resources::{EtcdBackupSpec, Timestamp};
use ferry_common::snapshot::StreamCheck;
use tokio::io::AsyncWriteExt;
use tokio_util::sync::CancellationToken;

use super::{
    sort_newest_first, Manifest, StoreError, Verification, MANIFEST_SUFFIX, MAX_MANIFEST_BYTES, OBJECT_SUFFIX,
};

type Result<T, E = StoreError> = std::result::Result<T, E>;

/// ENOSPC and EDQUOT: the store's filesystem (or the coordinator's quota on it) is full.
const DISK_FULL: [i32; 2] = [28, 122];

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |error| {
        // Said in words an operator acts on: the partial object is removed, the disk needs room.
        if error.raw_os_error().is_some_and(|c| DISK_FULL.contains(&c)) {
            let what = format!("{what}: the disk of the local backup store is full; free space there or give --local-store-dir a larger disk");
            return StoreError::Io { what, error };
        }
        StoreError::Io { what, error }
    }
}

fn cancelled(cancel: &CancellationToken) -> Result<()> {
    if cancel.is_cancelled() {
        return Err(StoreError::Cancelled);
    }
    Ok(())
}

const PARTIAL_SUFFIX: &str = ".partial";

pub(super) struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating) the store and removes partial objects a crash left behind.
    pub(super) fn open(root: &Path) -> Result<Self> {
        create_private_dir(root).map_err(io(format!("create local store dir {}", root.display())))?;
        for cluster in fs::read_dir(root).map_err(io(format!("read {}", root.display())))? {
            let cluster = cluster.map_err(io(format!("read {}", root.display())))?.path();
            if !cluster.is_dir() {
                continue;
            }
            for f in fs::read_dir(&cluster).map_err(io(format!("read {}", cluster.display())))? {
                let p = f.map_err(io(format!("read {}", cluster.display())))?.path();
                if p.to_string_lossy().ends_with(PARTIAL_SUFFIX) || p.extension().is_some_and(|e| e == "tmp") {
                    tracing::info!(path = %p.display(), "removing partial backup left by an earlier run");
                    fs::remove_file(&p).map_err(io(format!("remove {}", p.display())))?;
                }
            }
        }
        Ok(Self { root: root.to_path_buf() })
    }

    /// The directory of `cluster`'s backups; the name is checked first, so no input walks out of the store.
    fn cluster_dir(&self, cluster: &str) -> Result<PathBuf> {
        validate_name("cluster", cluster).map_err(|e| StoreError::BadName(e.to_string()))?;
        Ok(self.root.join(cluster))
    }

    /// The path of a change-log segment of `cluster` (`name` from `segment::object_name`, checked).
    pub(super) fn segment_path(&self, cluster: &str, name: &str) -> Result<PathBuf> {
        if ferry_common::segment::parse_object_name(name).is_none() || name.contains("..") {
            return Err(StoreError::BadName(format!("{name:?} is not a change-log segment name")));
        }
        Ok(self.cluster_dir(cluster)?.join(name))
    }

    /// Starts a new backup of `cluster`, reserving a unique id `<cluster>-<unix seconds>[-N]`.
    pub(super) async fn begin(
        &self,
        cluster: &str,
        at: Timestamp,
        deployment: &str,
        max_snapshot_size: u64,
        cancel: &CancellationToken,
    ) -> Result<PendingLocal> {
        cancelled(cancel)?;
        let dir = self.cluster_dir(cluster)?;
        create_private_dir(&dir).map_err(io(format!("create {}", dir.display())))?;
        for n in 0..1000u32 {
            let id = if n == 0 { format!("{cluster}-{}", at.seconds) } else { format!("{cluster}-{}-{n}", at.seconds) };
            let object = dir.join(format!("{id}{OBJECT_SUFFIX}"));
            let partial = dir.join(format!(".{id}{OBJECT_SUFFIX}{PARTIAL_SUFFIX}"));
            if object.exists() || dir.join(format!("{id}{MANIFEST_SUFFIX}")).exists() {
                continue;
            }
            // create_new makes the reservation atomic against a concurrent backup in the same second.
            match create_private(&partial) {
                Ok(file) => {
                    let file = tokio::fs::File::from_std(file);
                    return Ok(PendingLocal {
                        id,
                        cluster: cluster.to_string(),
                        deployment: deployment.to_string(),
                        dir: dir.clone(),
                        partial,
                        object,
                        file: Some(file),
                        check: StreamCheck::with_limit(max_snapshot_size)
                            .map_err(|e| StoreError::Mismatch(e.to_string()))?,
                        done: false,
                    });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io(format!("create {}", partial.display()))(e)),
            }
        }
        Err(StoreError::NoFreeId(cluster.to_string()))
    }

    /// Every backup of `cluster` (or of all clusters), newest first.
    pub(super) fn list(&self, cluster: Option<&str>, cancel: &CancellationToken) -> Result<Vec<Manifest>> {
        cancelled(cancel)?;
        let mut out = Vec::new();
        let dirs: Vec<PathBuf> = match cluster {
            Some(c) => vec![self.cluster_dir(c)?],
            None => fs::read_dir(&self.root)
                .map_err(io(format!("read {}", self.root.display())))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .collect(),
        };
        for dir in dirs {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(format!("read {}", dir.display()))(e)),
            };
            for e in entries {
                let p = e.map_err(io(format!("read {}", dir.display())))?.path();
                let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                if name.starts_with('.') || !name.ends_with(MANIFEST_SUFFIX) {
                    continue;
                }
                match read_manifest(&p) {
                    Ok(m) => out.push(m),
                    Err(e) => tracing::warn!(path = %p.display(), "skipping unreadable manifest: {e}"),
                }
            }
        }
        sort_newest_first(&mut out);
        Ok(out)
    }

    /// One backup's manifest.
    pub(super) fn find(&self, cluster: &str, id: &str, cancel: &CancellationToken) -> Result<Option<Manifest>> {
        cancelled(cancel)?;
        validate_backup_id(id).map_err(|e| StoreError::BadName(e.to_string()))?;
        let p = self.cluster_dir(cluster)?.join(format!("{id}{MANIFEST_SUFFIX}"));
        match read_manifest(&p) {
            Ok(m) => Ok(Some(m)),
            Err(StoreError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Opens a backup's object for reading.
    pub(super) async fn open_object(&self, m: &Manifest, cancel: &CancellationToken) -> Result<tokio::fs::File> {
        cancelled(cancel)?;
        let p = self.root.join(&m.backup.snapshot);
        tokio::fs::File::open(&p).await.map_err(io(format!("open {}", p.display())))
    }
}

impl LocalStore {
    /// Deletes a backup: manifest first, then object, each removal made durable. Both paths are derived from
    /// the cluster and id, never taken from the manifest.
    pub(super) async fn delete(&self, m: &Manifest, cancel: &CancellationToken) -> Result<()> {
        cancelled(cancel)?;
        let (cluster, id) = (&m.backup.cluster, &m.id);
        let dir = self.cluster_dir(cluster)?;
        let derived = format!("{cluster}/{id}{OBJECT_SUFFIX}");
        if m.backup.snapshot != derived {
            return Err(StoreError::Foreign(format!(
                "the manifest of {cluster}/{id} names object {:?}, not {derived:?}; it is left alone",
                m.backup.snapshot
            )));
        }
        let manifest = dir.join(format!("{id}{MANIFEST_SUFFIX}"));
        let object = dir.join(format!("{id}{OBJECT_SUFFIX}"));
        tokio::task::spawn_blocking(move || remove_durably(&dir, &[&manifest, &object]))
            .await
            .map_err(|e| StoreError::Io { what: "delete backup".into(), error: std::io::Error::other(e) })?
    }
}

/// A backup being written. Dropped without `commit`, its partial file is removed.
pub(super) struct PendingLocal {
    pub(super) id: String,
    cluster: String,
    deployment: String,
    dir: PathBuf,
    partial: PathBuf,
    object: PathBuf,
    file: Option<tokio::fs::File>,
    /// Every check of a restore, over the bytes as they arrive.
    pub(super) check: StreamCheck,
    done: bool,
}

impl PendingLocal {
    /// Opens an encrypted backup with `ids` while it arrives (they open its recipients): see [`StreamCheck`].
    pub(super) fn open_with(&mut self, ids: Identities) -> Result<()> {
        self.check.open_with(ids).map_err(|e| StoreError::Mismatch(e.to_string()))
    }

    pub(super) async fn write(&mut self, data: &[u8], cancel: &CancellationToken) -> Result<()> {
        cancelled(cancel)?;
        let f =
            self.file.as_mut().ok_or_else(|| StoreError::Mismatch(format!("backup {} is already closed", self.id)))?;
        // Checked before it is written: past the size limit, not one more byte reaches the disk.
        self.check.write(data).map_err(|e| StoreError::Mismatch(e.to_string()))?;
        f.write_all(data).await.map_err(io(format!("write {}", self.partial.display())))?;
        Ok(())
    }

    /// Makes the backup durable and visible. `spec` must describe what was written: its size and sha256
    /// are checked against the bytes actually received.
    pub(super) async fn commit(&mut self, mut spec: EtcdBackupSpec, cancel: &CancellationToken) -> Result<Manifest> {
        cancelled(cancel)?;
        if self.done {
            return Err(StoreError::Mismatch(format!("backup {} is already committed", self.id)));
        }
        self.check.record_stored_hash(&mut spec);
        let (bytes, sha) = (self.check.bytes(), self.check.sha256_hex());
        if spec.size != bytes || spec.sha256 != sha {
            return Err(StoreError::Mismatch(format!(
                "received {bytes} bytes with sha256 {sha}, but the agent sent {} bytes with sha256 {}; discarding",
                spec.size, spec.sha256
            )));
        }
        // The coordinator's own check of what it received: a whole etcd snapshot, or nothing is committed.
        let check =
            std::mem::replace(&mut self.check, StreamCheck::new().map_err(|e| StoreError::Mismatch(e.to_string()))?);
        check.finish(&spec).map_err(|e| StoreError::Mismatch(format!("the received backup failed its checks: {e}")))?;
        let closed = || StoreError::Mismatch(format!("backup {} is already closed", self.id));
        let mut f = self.file.take().ok_or_else(closed)?;
        f.flush().await.map_err(io(format!("write {}", self.partial.display())))?;
        f.sync_all().await.map_err(io(format!("fsync {}", self.partial.display())))?;
        drop(f);
        tokio::fs::rename(&self.partial, &self.object)
            .await
            .map_err(io(format!("rename into {}", self.object.display())))?;
        spec.snapshot = format!("{}/{}{OBJECT_SUFFIX}", self.cluster, self.id);
        let deployment = (!self.deployment.is_empty()).then(|| self.deployment.clone());
        // Every byte went through the check as it arrived.
        let verification = Some(Verification::Full);
        let manifest = Manifest { format: 1, id: self.id.clone(), backup: spec, deployment, verification };
        let dir = self.dir.clone();
        let id = self.id.clone();
        let object = self.object.clone();
        let m = manifest.clone();
        let written = tokio::task::spawn_blocking(move || {
            let r = write_manifest(&dir, &id, &m);
            if r.is_err() {
                // The manifest may be in place even though a later step (the directory's fsync) failed: it
                // goes first, so a listed manifest never outlives its object.
                let tmp = dir.join(format!(".{id}{MANIFEST_SUFFIX}.tmp"));
                let _ = remove_durably(&dir, &[&dir.join(format!("{id}{MANIFEST_SUFFIX}")), &tmp, &object]);
            }
            r
        })
        .await
        .map_err(|e| StoreError::Io { what: "write manifest".into(), error: std::io::Error::other(e) })
        .and_then(|r| r);
        written?;
        self.done = true;
        Ok(manifest)
    }
}

/// Removes `paths` in order (a missing one counts as removed), each removal made durable before the next.
fn remove_durably(dir: &Path, paths: &[&Path]) -> Result<()> {
    for p in paths {
        match fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io(format!("remove {}", p.display()))(e)),
        }
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Reads the manifest at `path`, at most [`MAX_MANIFEST_BYTES`] of it, and checks it describes that backup.
fn read_manifest(path: &Path) -> Result<Manifest> {
    use std::io::Read;
    let f = fs::File::open(path).map_err(io(format!("read {}", path.display())))?;
    let mut text = Vec::new();
    f.take(MAX_MANIFEST_BYTES + 1).read_to_end(&mut text).map_err(io(format!("read {}", path.display())))?;
    if text.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(StoreError::Corrupt(format!(
            "{} is larger than {MAX_MANIFEST_BYTES} bytes: not a Ferry manifest",
            path.display()
        )));
    }
    parse_manifest(path, &text)
}

/// Parses the manifest at `path` (`<root>/<cluster>/<id>.manifest.json`) and checks it describes that backup.
fn parse_manifest(path: &Path, text: &[u8]) -> Result<Manifest> {
    let m: Manifest =
        serde_json::from_slice(text).map_err(|e| StoreError::Corrupt(format!("parse {}: {e}", path.display())))?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let id = name.trim_end_matches(MANIFEST_SUFFIX);
    let cluster =
        path.parent().and_then(|d| d.file_name()).map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    m.check_location(&cluster, id, &format!("{cluster}/{id}{OBJECT_SUFFIX}"))?;
    Ok(m)
}

fn write_manifest(dir: &Path, id: &str, m: &Manifest) -> Result<()> {
    let path = dir.join(format!("{id}{MANIFEST_SUFFIX}"));
    let tmp = dir.join(format!(".{id}{MANIFEST_SUFFIX}.tmp"));
    let body = serde_json::to_vec_pretty(m).map_err(|e| StoreError::Corrupt(format!("encode manifest: {e}")))?;
    let mut f = create_private_replacing(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    f.write_all(&body).map_err(io(format!("write {}", tmp.display())))?;
    f.sync_all().map_err(io(format!("fsync {}", tmp.display())))?;
    fs::rename(&tmp, &path).map_err(io(format!("rename into {}", path.display())))?;
    // The renames are durable only once the directory itself is synced.
    fsync_dir(dir)
}

fn fsync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("fsync {}", dir.display())))
}

impl Drop for PendingLocal {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_file(&self.partial);
        }
    }
}
