//! `ferry-agent restore`: rebuild a member's data dir from a backup, as an init container before etcd starts.
//!
//! The coordinator says where the backup is (it streams a local-store backup itself, or hands over the S3
//! object and credentials for this restore only). The bytes go through every check — the stored object's
//! sha256, decompression, the snapshot's sha256 and etcd's own trailing hash — into a hidden file inside the
//! data dir; etcd's own tool then restores it into a hidden temp dir there, and only then is the result moved
//! into place. In a static pod the data dir is usually a hostPath mount point that cannot be renamed, which
//! is why all of this happens inside it. Old contents are moved aside into `.ferry-old-<unix seconds>/`, never
//! deleted, and any failure leaves the data dir as it was.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_common::client::Session;
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse, RestoreSource};
use ferry_common::resources::{EtcdBackupSpec, Spec};
use ferry_common::snapshot::{RestoreAs, VerifyingWriter};
use ferry_common::tls::CertifiedPem;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::throttle::Throttle;

/// Entries of the data dir Ferry itself makes; they do not make it "non-empty".
const FERRY_PREFIX: &str = ".ferry-";
/// Progress is logged this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);

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
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Entries of the data dir other than Ferry's own.
fn existing_entries(dir: &Path) -> Result<Vec<PathBuf>> {
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
    let existing = existing_entries(dir)?;
    if !existing.is_empty() && !req.force {
        bail!(
            "--data-dir {} is not empty; refusing to overwrite a member's data. Pass --force to move its contents aside into {}/{FERRY_PREFIX}old-<unix seconds>/ (kept, never deleted)",
            dir.display(),
            dir.display()
        );
    }
    let created = !dir.exists();
    std::fs::create_dir_all(dir).with_context(|| format!("create --data-dir {}", dir.display()))?;
    let stamp = unix_now();
    let snapshot = dir.join(format!("{FERRY_PREFIX}restore-{stamp}.db"));
    let result = restore_into(&req, &snapshot, &existing, stamp).await;
    let _ = std::fs::remove_file(&snapshot);
    if result.is_err() && created {
        // Leave no trace of a failed restore: remove the dir we made (only if still empty).
        let _ = std::fs::remove_dir(dir);
    }
    result
}

async fn restore_into(req: &RestoreRequest, snapshot: &Path, existing: &[PathBuf], stamp: u64) -> Result<()> {
    let backup = fetch(req, snapshot).await?;
    info!(backup = %backup.snapshot, revision = backup.revision, "backup downloaded; every hash matched");

    let dir = &req.data_dir;
    let staging = dir.join(format!("{FERRY_PREFIX}restoring-{stamp}"));
    let restored = ferry_common::snapshot::restore(snapshot, &staging, &req.member);
    if let Err(e) = restored {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.into());
    }
    info!(tool = ferry_common::snapshot::restore_tool(), "snapshot restored into a staging dir");

    // Everything checked out: now, and only now, touch what was there.
    if !existing.is_empty() {
        let aside = dir.join(format!("{FERRY_PREFIX}old-{stamp}"));
        std::fs::create_dir(&aside).with_context(|| format!("create {}", aside.display()))?;
        for p in existing {
            let name = p.file_name().context("entry without a name")?;
            std::fs::rename(p, aside.join(name)).with_context(|| format!("move {} aside", p.display()))?;
        }
        info!(kept = %aside.display(), "moved the old data aside");
    }
    for entry in std::fs::read_dir(&staging).with_context(|| format!("read {}", staging.display()))? {
        let entry = entry?;
        let to = dir.join(entry.file_name());
        std::fs::rename(entry.path(), &to).with_context(|| format!("move the restored {} into place", to.display()))?;
    }
    std::fs::remove_dir(&staging).with_context(|| format!("remove {}", staging.display()))?;
    std::fs::File::open(dir)?.sync_all().with_context(|| format!("fsync {}", dir.display()))?;
    info!(data_dir = %dir.display(), member = %req.member.name, "restore complete; etcd can start");
    Ok(())
}

/// Logs bytes and throughput as the download goes.
struct Progress {
    start: Instant,
    last: Instant,
    total: u64,
}

impl Progress {
    fn new(total: u64) -> Self {
        let now = Instant::now();
        Self { start: now, last: now, total }
    }

    fn tick(&mut self, done: u64, force: bool) {
        if !force && self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let secs = self.start.elapsed().as_secs_f64().max(0.001);
        info!(
            done_mib = format!("{:.1}", done as f64 / 1048576.0),
            total_mib = format!("{:.1}", self.total as f64 / 1048576.0),
            mb_per_s = format!("{:.1}", done as f64 / 1e6 / secs),
            "restore download progress"
        );
    }
}

/// Asks the coordinator for the backup and writes the verified snapshot file to `snapshot`.
async fn fetch(req: &RestoreRequest, snapshot: &Path) -> Result<EtcdBackupSpec> {
    let request = AdminRequest::Restore { cluster: req.from_cluster.clone(), backup: req.backup.clone() };
    let mut s = Session::open(&req.coordinator, &req.ca_pem, &req.client, &request).await?;
    let result = async {
        let (backup, source, limit) = match expect_frame(&mut s.recv).await.context("read the coordinator's answer")? {
            AdminResponse::RestoreFrom { backup, source, download_limit_bps } => match backup.spec {
                Spec::EtcdBackup(b) => (b, source, download_limit_bps),
                other => bail!("unexpected backup description {other:?}"),
            },
            AdminResponse::Error { message, .. } => bail!(message),
            other => bail!("unexpected answer {other:?}"),
        };
        info!(size = backup.size, rawsize = backup.rawsize, from = %backup.member, "restoring backup");
        let mut w = VerifyingWriter::create(snapshot, &backup, true)?;
        let mut throttle = Throttle::new(limit);
        let mut progress = Progress::new(backup.size);
        match source {
            RestoreSource::Coordinator => loop {
                match expect_frame(&mut s.recv).await.context("read backup data")? {
                    AdminResponse::Data(d) => {
                        throttle.consume(d.len()).await;
                        w.write(&d)?;
                        progress.tick(w.bytes(), false);
                    }
                    AdminResponse::DownloadEnd => break,
                    AdminResponse::Error { message, .. } => bail!(message),
                    other => bail!("unexpected answer {other:?}"),
                }
            },
            RestoreSource::S3(target) => {
                let client = ferry_common::s3::client(&target.config).await?;
                let bucket = &target.config.bucket;
                let what = format!("download s3://{bucket}/{}", target.key);
                let obj = ferry_common::s3::get_object(&client, bucket, &target.key, &what, &CancellationToken::new())
                    .await?;
                let mut body = obj;
                while let Some(chunk) = body.try_next().await.with_context(|| format!("{what}: read"))? {
                    throttle.consume(chunk.len()).await;
                    w.write(&chunk)?;
                    progress.tick(w.bytes(), false);
                }
            }
        }
        progress.tick(w.bytes(), true);
        w.finish()?;
        Ok(backup)
    }
    .await;
    s.close().await;
    result
}
