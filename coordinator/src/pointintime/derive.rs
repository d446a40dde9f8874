//! Derived backups: the state at a point in time, rebuilt by the coordinator from a full backup and the
//! change log, stored as a backup of its own (listed, restorable, drilled like any, `derivedfrom` naming where
//! it came from). A restore to a point restores one of these through the orchestrated restore.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::Path;

use anyhow::{anyhow, Context, Result};
use ferry_common::encryption::{parse_recipients, Identities, Sealer};
use ferry_common::protocol::UploadedPart;
use ferry_common::resources::{BackupEncryption, DerivedFrom, EtcdBackupSpec, Timestamp};
use ferry_common::snapshot::Counted;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::store::{BackupStore, Manifest, UploadSettings};

/// What is stored, and where it came from.
pub struct Derive<'a> {
    pub cluster: &'a str,
    /// The rebuilt state as etcd's snapshot (database and trailing hash).
    pub snapshot: &'a Path,
    /// The full backup the rebuild started from.
    pub base: &'a EtcdBackupSpec,
    pub from: DerivedFrom,
    /// The cluster's age recipients: a derived backup is sealed like the cluster's own.
    pub recipients: Vec<String>,
    pub zstd_level: i32,
    pub startedat: Timestamp,
}

/// The object as encoded: sizes and hashes of each layer.
struct Encoded {
    raw_size: u64,
    raw_sha256: String,
    zstd_size: u64,
    zstd_sha256: String,
    stored_size: u64,
    stored_sha256: String,
}

/// The zstd stream: hashed, then sealed (when there are recipients) into the stored object.
struct Layers {
    zstd: Sha256,
    zstd_n: u64,
    sealer: Option<Sealer>,
    out: Counted<BufWriter<File>>,
}

impl Write for Layers {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.zstd.update(buf);
        self.zstd_n += buf.len() as u64;
        match &mut self.sealer {
            Some(s) => {
                let sealed = s.seal(buf)?;
                self.out.write_all(&sealed)?;
            }
            None => self.out.write_all(buf)?,
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Encodes `snapshot` into `out` as the agents do: zstd at `level`, sealed to `recipients` when there are any.
fn encode(snapshot: &Path, out: &Path, level: i32, recipients: &[String]) -> Result<Encoded> {
    let sealer = if recipients.is_empty() {
        None
    } else {
        Some(Sealer::new(&parse_recipients(recipients)?).context("seal the derived backup")?)
    };
    let file = File::create(out).with_context(|| format!("create {}", out.display()))?;
    let stored = Counted::new(BufWriter::new(file));
    let layers = Layers { zstd: Sha256::new(), zstd_n: 0, sealer, out: stored };
    let mut encoder = zstd::Encoder::new(layers, level).context("start zstd")?;
    let mut src = File::open(snapshot).with_context(|| format!("open {}", snapshot.display()))?;
    let (mut raw, mut raw_n) = (Sha256::new(), 0u64);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = src.read(&mut buf).with_context(|| format!("read {}", snapshot.display()))?;
        if n == 0 {
            break;
        }
        raw.update(&buf[..n]);
        raw_n += n as u64;
        encoder.write_all(&buf[..n]).context("compress the derived backup")?;
    }
    let mut layers = encoder.finish().context("finish zstd")?;
    if let Some(sealer) = layers.sealer.take() {
        let (last, _) = sealer.finish().context("finish sealing")?;
        layers.out.write_all(&last).context("write the derived backup")?;
    }
    layers.out.flush().context("write the derived backup")?;
    layers.out.inner.get_ref().sync_all().context("sync the derived backup")?;
    Ok(Encoded {
        raw_size: raw_n,
        raw_sha256: hex::encode(raw.finalize()),
        zstd_size: layers.zstd_n,
        zstd_sha256: hex::encode(layers.zstd.finalize()),
        stored_size: layers.out.bytes,
        stored_sha256: hex::encode(layers.out.sha.finalize()),
    })
}

/// Stores `d` as a new backup of its cluster through the store's own commit (every check an agent's backup
/// goes through: sizes, hashes, etcd's trailing hash, bbolt's meta page, the snapshot's own revision, and the
/// inside of a sealed one when `identities` open it). `scratch` holds the encoded object meanwhile.
pub async fn store(
    store: &BackupStore,
    identities: Option<&Identities>,
    d: Derive<'_>,
    scratch: &Path,
    cancel: &CancellationToken,
) -> Result<Manifest> {
    let encoded_path = scratch.join("derived.zst");
    let (snapshot, out, level, recipients) =
        (d.snapshot.to_path_buf(), encoded_path.clone(), d.zstd_level, d.recipients.clone());
    let e = tokio::task::spawn_blocking(move || encode(&snapshot, &out, level, &recipients))
        .await
        .map_err(|e| anyhow!("encoding the derived backup panicked: {e}"))??;
    let upload = UploadSettings { part_size: 8 << 20, parts_in_flight: 1 };
    let mut pending = store.begin(d.cluster, Timestamp::now(), upload, cancel).await?;
    if let Some(ids) = identities.filter(|ids| !d.recipients.is_empty() && ids.check_opens(&d.recipients).is_ok()) {
        pending.open_with(ids.clone())?;
    }
    let written = async {
        let mut f = tokio::fs::File::open(&encoded_path).await.context("open the derived backup")?;
        let mut parts: Vec<UploadedPart> = Vec::new();
        let size = pending.part_size().max(5 << 20);
        for number in 1u32.. {
            let mut chunk = vec![0u8; size];
            let mut filled = 0;
            while filled < size {
                use tokio::io::AsyncReadExt as _;
                let n = f.read(&mut chunk[filled..]).await.context("read the derived backup")?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            chunk.truncate(filled);
            parts.extend(pending.put(number, chunk, cancel).await?);
        }
        anyhow::Ok(parts)
    }
    .await;
    let parts = match written {
        Ok(p) => p,
        Err(e) => {
            pending.abort().await;
            return Err(e);
        }
    };
    let encryption = (!d.recipients.is_empty()).then(|| BackupEncryption {
        recipients: d.recipients.clone(),
        zstdsize: e.zstd_size,
        zstdsha256: e.zstd_sha256.clone(),
    });
    let spec = EtcdBackupSpec {
        cluster: d.cluster.to_string(),
        createdat: Timestamp::now(),
        snapshot: String::new(),
        size: e.stored_size,
        rawsize: e.raw_size,
        member: d.base.member.clone(),
        memberid: d.base.memberid.clone(),
        etcdclusterid: d.base.etcdclusterid.clone(),
        etcdversion: d.base.etcdversion.clone(),
        revision: d.from.revision,
        sha256: e.stored_sha256,
        rawsha256: e.raw_sha256,
        zstdlevel: d.zstd_level,
        startedat: d.startedat,
        finishedat: Timestamp::now(),
        encryption,
        derivedfrom: Some(d.from),
    };
    let _ = std::fs::remove_file(&encoded_path);
    Ok(pending.commit(spec, parts, cancel).await?)
}
