//! `ferry-agent restore`: rebuild a member's data dir from a backup, as an init container before etcd starts.
//!
//! The coordinator says where the backup is (it streams a local-store backup itself, or hands over the S3
//! object and credentials for this restore only). The bytes go through every check — the stored object's
//! sha256, decompression, the snapshot's sha256 and etcd's own trailing hash — into a scratch copy (in
//! memory when it fits, else a hidden file inside the data dir: `scratch.rs`); etcd's own tool then restores
//! it into a hidden temp dir inside the data dir, and only then is the result moved into place. In a static
//! pod the data dir is usually a hostPath mount point that cannot be renamed, which is why all of this
//! happens inside it. Old contents are moved aside into `.ferry-old-<unix seconds>/`, never
//! deleted, and any failure leaves the data dir as it was.
//!
//! Guards: a data dir a running etcd holds (bbolt's lock on `member/snap/db`) is never touched, `--force` moves
//! aside only what looks like an etcd data dir (`member/`), and a `.ferry-restored` marker makes a second
//! run of the same restore (same backup, same cluster token: a static pod re-created) a no-op.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use ferry_common::client::Session;
use ferry_common::encryption::Identities;
use ferry_common::progress::{Lines, Progress};
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse, RestoreSource, RevisionSeen};
use ferry_common::resources::{EtcdBackupSpec, Spec};
use ferry_common::s3::with_retries;
use ferry_common::snapshot::{planned_bump, BackgroundWriter, RestoreAs, RevisionBump, VerifyingWriter};
use ferry_common::tls::CertifiedPem;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::scratch::{Scratch, ScratchChoice};
use crate::throttle::Throttle;

/// Entries of the data dir Ferry itself makes; they do not make it "non-empty".
const FERRY_PREFIX: &str = ".ferry-";
/// The marker of a finished restore: which backup and cluster token it was for.
const RESTORED_MARKER: &str = ".ferry-restored";

/// What the marker records; a run asking for the same is already done.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Restored {
    /// `--backup` as given (`latest` stays `latest`: the same request is the same restore).
    pub(crate) backup: String,
    pub(crate) from_cluster: Option<String>,
    pub(crate) initial_cluster_token: String,
    pub(crate) member: String,
    /// The backup actually restored.
    pub(crate) restored: String,
    pub(crate) at: u64,
    /// The orchestrated restore this was done for (absent for `ferry-agent restore` by hand).
    #[serde(default)]
    pub(crate) restore_id: Option<String>,
}

impl Restored {
    fn same_request(&self, req: &RestoreRequest) -> bool {
        self.backup == req.backup
            && self.from_cluster == req.from_cluster
            && self.initial_cluster_token == req.member.initial_cluster_token
            && self.member == req.member.name
    }
}

pub(crate) fn read_marker(dir: &Path) -> Option<Restored> {
    let text = std::fs::read(dir.join(RESTORED_MARKER)).ok()?;
    serde_json::from_slice(&text).ok()
}

/// Whether a running etcd holds `dir`: etcd's bbolt keeps an exclusive `flock` on `member/snap/db` while it
/// runs, so failing to take that lock for a moment means a live member (the gate's check, shared).
pub(crate) fn held_by_live_etcd(dir: &Path) -> Result<bool> {
    crate::gate::data_dir_in_use(dir)
}

/// Who asks, and what to restore.
pub struct RestoreRequest {
    pub coordinator: String,
    pub ca_pem: String,
    pub client: CertifiedPem,
    /// `Some` for an admin credential seeding from another cluster.
    pub from_cluster: Option<String>,
    pub backup: String,
    pub data_dir: PathBuf,
    pub member: RestoreAs,
    pub force: bool,
    pub bump: BumpChoice,
    /// Where the checked snapshot waits for etcd's tool (`--scratch`).
    pub scratch: ScratchChoice,
    /// `--identity`: opens an encrypted backup the coordinator does not open itself.
    pub identities: Option<Identities>,
}

/// How the restored revision is raised (see `docs/RESTORE.md`, "Why the revision bump").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BumpChoice {
    /// Above the highest revision the coordinator saw the cluster reach, with a margin: the default.
    Planned,
    /// Exactly this much (`--bump-revision N`).
    By(u64),
    /// Not at all (`--no-bump-revision`).
    Off,
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Entries of the data dir other than Ferry's own.
pub(crate) fn existing_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    match std::fs::read_dir(dir) {
        Ok(entries) => Ok(entries
            .filter_map(|e| e.ok())
            .filter(|e| !e.file_name().to_string_lossy().starts_with(FERRY_PREFIX))
            .map(|e| e.path())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read --data-dir {}", dir.display())),
    }
}

pub async fn run(req: RestoreRequest) -> Result<()> {
    let dir = &req.data_dir;
    // Before anything is downloaded: the tool must be able to do what was asked.
    if req.bump == BumpChoice::Off {
        warn!(
            "--no-bump-revision: the restored revision is the snapshot's own, below what the cluster reached; \
             Kubernetes watch caches and informers then wait for revisions that will come back with other data \
             and silently miss changes. Restart every kube-apiserver (and relist controllers) after this restore"
        );
    } else {
        ferry_common::snapshot::check_can_bump()?;
    }
    if let Some(done) = read_marker(dir).filter(|m| m.same_request(&req)) {
        println!(
            "already restored: backup {} into {} at {} for cluster token {:?}; nothing to do (remove {} to restore again)",
            done.restored,
            dir.display(),
            done.at,
            done.initial_cluster_token,
            dir.join(RESTORED_MARKER).display()
        );
        return Ok(());
    }
    let existing = existing_entries(dir)?;
    if held_by_live_etcd(dir)? {
        bail!(
            "--data-dir {} is in use by a running etcd (it holds member/snap/db locked); stop that member first \
             (with static pods, move its manifest out of /etc/kubernetes/manifests), then run the restore again",
            dir.display()
        );
    }
    if !existing.is_empty() && req.force && !dir.join("member").is_dir() {
        bail!(
            "--data-dir {} is neither empty nor an etcd data dir (no member/ inside); refusing to move its contents \
             aside even with --force. Check the path; give an etcd data dir or an empty or missing directory",
            dir.display()
        );
    }
    if !existing.is_empty() && !req.force {
        bail!(
            "--data-dir {} is not empty; refusing to overwrite a member's data. Pass --force to move its contents aside into {}/{FERRY_PREFIX}old-<unix seconds>/ (kept, never deleted)",
            dir.display(),
            dir.display()
        );
    }
    let created = !dir.exists();
    // etcd's data: owner only, like etcd itself wants it.
    ferry_common::config::create_private_dir(dir).with_context(|| format!("create --data-dir {}", dir.display()))?;
    crate::scratch::remove_stale(dir);
    let stamp = unix_now();
    let result = restore_into(&req, &existing, stamp).await;
    if result.is_err() && created {
        // Leave no trace of a failed restore: remove the dir we made (only if still empty).
        let _ = std::fs::remove_dir(dir);
    }
    result
}

async fn restore_into(req: &RestoreRequest, existing: &[PathBuf], stamp: u64) -> Result<()> {
    // The scratch copy goes when this returns, whatever happened.
    let (backup, highest, scratch) = fetch(req, stamp).await?;
    let bump = plan_bump(req.bump, scratch.path(), backup.revision, highest)?;
    let marker = Restored {
        backup: req.backup.clone(),
        from_cluster: req.from_cluster.clone(),
        initial_cluster_token: req.member.initial_cluster_token.clone(),
        member: req.member.name.clone(),
        restored: backup.snapshot.clone(),
        at: stamp,
        restore_id: None,
    };
    swap_in(&req.data_dir, existing, scratch.path(), &req.member, bump, &marker)
}

/// Restores the checked `snapshot` into a staging dir inside `dir`, then moves `existing` aside into
/// `.ferry-old-<stamp>/` (kept) and the restored data into place, and writes `marker`. Nothing is touched
/// before etcd's tool succeeded, and a live etcd on `dir` stops it before anything moves.
pub(crate) fn swap_in(
    dir: &Path,
    existing: &[PathBuf],
    snapshot: &Path,
    member: &RestoreAs,
    bump: Option<RevisionBump>,
    marker: &Restored,
) -> Result<()> {
    let staging = stage(dir, snapshot, member, bump, marker.at)?;
    commit(dir, existing, &staging, marker)
}

/// etcd's tool restores `snapshot` into a hidden staging dir inside `dir`: the data dir's own contents are
/// not touched (a failure removes the staging dir).
pub(crate) fn stage(
    dir: &Path,
    snapshot: &Path,
    member: &RestoreAs,
    bump: Option<RevisionBump>,
    stamp: u64,
) -> Result<PathBuf> {
    // Checked again now that the download took its time: a member started meanwhile is not swapped out.
    if held_by_live_etcd(dir)? {
        bail!("--data-dir {} was taken by a running etcd during the download; nothing changed", dir.display());
    }
    let staging = dir.join(format!("{FERRY_PREFIX}restoring-{stamp}"));
    let restored = ferry_common::snapshot::restore(snapshot, &staging, member, bump);
    if let Err(e) = restored {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.into());
    }
    info!(tool = ferry_common::snapshot::restore_tool(), "snapshot restored into a staging dir");
    Ok(staging)
}

/// Moves `existing` aside and the staged data into place, then writes `marker`: the data dir changes here.
pub(crate) fn commit(dir: &Path, existing: &[PathBuf], staging: &Path, marker: &Restored) -> Result<()> {
    if held_by_live_etcd(dir)? {
        let _ = std::fs::remove_dir_all(staging);
        bail!("--data-dir {} was taken by a running etcd during the restore; nothing changed", dir.display());
    }
    move_aside(dir, existing, marker.at)?;
    for entry in std::fs::read_dir(staging).with_context(|| format!("read {}", staging.display()))? {
        let entry = entry?;
        let to = dir.join(entry.file_name());
        std::fs::rename(entry.path(), &to).with_context(|| format!("move the restored {} into place", to.display()))?;
    }
    std::fs::remove_dir(staging).with_context(|| format!("remove {}", staging.display()))?;
    write_marker(dir, marker)?;
    info!(data_dir = %dir.display(), member = %marker.member, "restore complete; etcd can start");
    Ok(())
}

/// Moves `existing` (entries of `dir`) into `dir/.ferry-old-<stamp>/`: renamed, never copied or deleted.
pub(crate) fn move_aside(dir: &Path, existing: &[PathBuf], stamp: u64) -> Result<()> {
    if existing.is_empty() {
        return Ok(());
    }
    let aside = dir.join(format!("{FERRY_PREFIX}old-{stamp}"));
    std::fs::DirBuilder::new().mode(0o700).create(&aside).with_context(|| format!("create {}", aside.display()))?;
    for p in existing {
        let name = p.file_name().context("entry without a name")?;
        std::fs::rename(p, aside.join(name)).with_context(|| format!("move {} aside", p.display()))?;
    }
    info!(kept = %aside.display(), "moved the old data aside");
    Ok(())
}

/// Writes the marker of a finished restore (and syncs the dir, so it survives a power cut with the data).
pub(crate) fn write_marker(dir: &Path, marker: &Restored) -> Result<()> {
    let marker_path = dir.join(RESTORED_MARKER);
    let text = serde_json::to_vec_pretty(marker).context("encode the restore marker")?;
    ferry_common::config::write_private(&marker_path, &text)
        .with_context(|| format!("write {}", marker_path.display()))?;
    std::fs::File::open(dir)?.sync_all().with_context(|| format!("fsync {}", dir.display()))?;
    Ok(())
}

/// The bump for this restore, said out loud: every member of a restored cluster must get the same one.
/// `manifest_revision` is the revision etcd reported just before the snapshot stream opened: a lower bound
/// of the snapshot's own, the same for every member, and free, where `etcdutl snapshot status` reads (and
/// hashes) the whole file. Bumping from the lower bound lands at or above the planned revision.
pub(crate) fn plan_bump(
    choice: BumpChoice,
    snapshot: &Path,
    manifest_revision: i64,
    highest: Option<RevisionSeen>,
) -> Result<Option<RevisionBump>> {
    if choice == BumpChoice::Off {
        return Ok(None);
    }
    let at = match manifest_revision {
        r if r > 0 => r,
        _ => ferry_common::snapshot::status(snapshot)?.revision,
    };
    let by = match choice {
        BumpChoice::By(n) => n,
        _ => planned_bump(highest.map_or(0, |h| h.revision), at),
    };
    let to = at.saturating_add(i64::try_from(by).unwrap_or(i64::MAX));
    match highest {
        Some(h) => info!(
            snapshot_revision = at,
            bump = by,
            restored_revision = to,
            highest_seen = h.revision,
            highest_seen_at = h.at.seconds,
            "the restored revision is bumped above the highest one the cluster was seen at, and marked compacted"
        ),
        None => info!(
            snapshot_revision = at,
            bump = by,
            restored_revision = to,
            "the restored revision is bumped (the coordinator saw no revision of this cluster) and marked compacted"
        ),
    }
    if highest.is_some_and(|h| to <= h.revision) {
        warn!(
            highest_seen = highest.map_or(0, |h| h.revision),
            "--bump-revision {by} leaves the restored revision at or below one the cluster already reached"
        );
    }
    match highest {
        Some(h) => println!(
            "restored revision: {at} -> {to} (at least; bumped by {by}, marked compacted; the cluster was seen at revision {})",
            h.revision
        ),
        None => println!("restored revision: {at} -> {to} (at least; bumped by {by}, marked compacted)"),
    }
    Ok(Some(RevisionBump { by }))
}

/// Asks the coordinator for the backup and writes the verified snapshot into a scratch copy; also returns
/// the highest revision the coordinator saw the cluster at.
async fn fetch(req: &RestoreRequest, stamp: u64) -> Result<(EtcdBackupSpec, Option<RevisionSeen>, Scratch)> {
    let request = AdminRequest::Restore { cluster: req.from_cluster.clone(), backup: req.backup.clone() };
    let mut s = Session::open(&req.coordinator, &req.ca_pem, &req.client, &request).await?;
    let result = receive(&mut s.recv, &req.data_dir, req.scratch, req.identities.as_ref(), stamp, None).await;
    s.close().await;
    result
}

/// Reads the coordinator's answer to a restore (`RestoreFrom`, then the bytes on `recv` or from S3) and
/// writes the snapshot, checked against every hash, into a scratch copy. `progress` gets the bytes fetched.
pub(crate) async fn receive<R: tokio::io::AsyncRead + Unpin>(
    recv: &mut R,
    data_dir: &Path,
    scratch: ScratchChoice,
    identities: Option<&Identities>,
    stamp: u64,
    progress_to: Option<&tokio::sync::watch::Sender<u64>>,
) -> Result<(EtcdBackupSpec, Option<RevisionSeen>, Scratch)> {
    let (backup, source, limit, highest) = match expect_frame(recv).await.context("read the coordinator's answer")? {
        AdminResponse::RestoreFrom { backup, source, download_limit_bps, highest_revision } => match backup.spec {
            Spec::EtcdBackup(b) => (b, source, download_limit_bps, highest_revision),
            other => bail!("unexpected backup description {other:?}"),
        },
        AdminResponse::Error { message, .. } => bail!(message),
        other => bail!("unexpected answer {other:?}"),
    };
    info!(
        size = backup.size,
        rawsize = backup.rawsize,
        from = %backup.member,
        encrypted = backup.encryption.is_some(),
        "restoring backup"
    );
    let scratch = Scratch::open(scratch, backup.rawsize, data_dir, stamp)?;
    // The snapshot only feeds etcd's restore tool, which syncs its own copy: no fsync of it.
    let (file, label) = (scratch.writer()?, scratch.path());
    let w = match source {
        // What arrives is the zstd stream inside; it is checked against the manifest's hashes of it.
        RestoreSource::Decrypted => {
            info!("the coordinator opens the encrypted backup with its own identity");
            VerifyingWriter::decompress_into(file, label, &backup.decrypted(), None)?
        }
        _ => VerifyingWriter::decompress_into(file, label, &backup, identities)?,
    };
    // Decompressing and hashing run on their own thread, so they overlap the download.
    let mut w = BackgroundWriter::spawn(w);
    let mut throttle = Throttle::new(limit);
    // A bar when run by hand on a terminal, plain log lines every few seconds in an init container.
    let arriving = if matches!(source, RestoreSource::Decrypted) { backup.decrypted().size } else { backup.size };
    let mut progress = Progress::new("restore download", arriving, Lines::Log);
    let mut report = |n: u64| {
        progress.set(n);
        if let Some(p) = progress_to {
            p.send_replace(n);
        }
    };
    match source {
        RestoreSource::Coordinator | RestoreSource::Decrypted => loop {
            match expect_frame(recv).await.context("read backup data")? {
                AdminResponse::Data(d) => {
                    throttle.consume(d.len()).await;
                    w.write(Bytes::from(d)).await?;
                    report(w.bytes());
                }
                AdminResponse::DownloadEnd => break,
                AdminResponse::Error { message, .. } => bail!(message),
                other => bail!("unexpected answer {other:?}"),
            }
        },
        RestoreSource::S3 { head, get, cacert } => {
            // Presigned HEAD and GET of this one object: the agent holds no S3 credential.
            let http = ferry_common::presigned::PresignedClient::new(&cacert)?;
            let what = format!("download {}", backup.snapshot);
            let cancel = CancellationToken::new();
            let found = with_retries(&cancel, &what, || http.send(&head, Bytes::new(), &what)).await?;
            let size = found.header("content-length").and_then(|v| v.parse::<u64>().ok());
            if size != Some(backup.size) {
                bail!("{what}: the object is {size:?} bytes, but the backup's manifest says {}", backup.size);
            }
            let mut body = with_retries(&cancel, &what, || http.send(&get, Bytes::new(), &what)).await?.into_body();
            while let Some(chunk) = body.try_next().await.with_context(|| format!("{what}: read"))? {
                throttle.consume(chunk.len()).await;
                w.write(chunk).await?;
                report(w.bytes());
            }
        }
    }
    w.finish().await?;
    progress.finish();
    info!(backup = %backup.snapshot, revision = backup.revision, "backup downloaded; every hash matched");
    Ok((backup, highest, scratch))
}
