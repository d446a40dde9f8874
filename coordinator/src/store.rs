//! The backup store, one implementation per backend behind an enum: the local filesystem (bytes travel
//! through the coordinator) or S3 (agents upload straight to the bucket).

use anyhow::Result;
use aws_sdk_s3::primitives::ByteStream;
use ferry_common::resources::EtcdBackupSpec;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::local_store::LocalStore;
use crate::s3_store::S3Store;

pub const OBJECT_SUFFIX: &str = ".snapshot.zst";
pub const MANIFEST_SUFFIX: &str = ".manifest.json";

/// The manifest written beside each object; a stable, documented format (see docs/ARCHITECTURE.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Manifest format version.
    pub format: u32,
    pub id: String,
    pub backup: EtcdBackupSpec,
}

pub(crate) fn sort_newest_first(v: &mut [Manifest]) {
    v.sort_by(|a, b| b.backup.createdat.cmp(&a.backup.createdat).then_with(|| b.id.cmp(&a.id)));
}

pub enum BackupStore {
    Local(LocalStore),
    S3(S3Store),
}

/// A stored object being read.
pub enum ObjectReader {
    Local(tokio::fs::File),
    S3(ByteStream),
}

impl ObjectReader {
    /// The next piece of the object; `None` at the end.
    pub async fn next(&mut self, buf: &mut [u8]) -> Result<Option<Vec<u8>>> {
        use tokio::io::AsyncReadExt;
        match self {
            Self::Local(f) => {
                let n = f.read(buf).await?;
                Ok((n > 0).then(|| buf[..n].to_vec()))
            }
            Self::S3(s) => Ok(s.try_next().await?.map(|b| b.to_vec())),
        }
    }
}

impl BackupStore {
    /// `local` or `s3`, as `configurationname` shows it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Local(_) => "local",
            Self::S3(_) => "s3",
        }
    }

    /// Every backup of `cluster` (or all clusters), newest first.
    pub async fn list(&self, cluster: Option<&str>, cancel: &CancellationToken) -> Result<Vec<Manifest>> {
        match self {
            Self::Local(l) => l.list(cluster),
            Self::S3(s) => s.list(cluster, cancel).await,
        }
    }

    pub async fn find(&self, cluster: &str, id: &str, cancel: &CancellationToken) -> Result<Option<Manifest>> {
        match self {
            Self::Local(l) => l.find(cluster, id),
            Self::S3(s) => s.find(cluster, id, cancel).await,
        }
    }

    /// Deletes a backup: its manifest first (so it is no longer listed), then its object.
    pub async fn delete(&self, m: &Manifest) -> Result<()> {
        match self {
            Self::Local(l) => l.delete(m).await,
            Self::S3(s) => s.delete(m).await,
        }
    }

    pub async fn open(&self, m: &Manifest) -> Result<ObjectReader> {
        Ok(match self {
            Self::Local(l) => ObjectReader::Local(l.open_object(m).await?),
            Self::S3(s) => ObjectReader::S3(s.open(m).await?),
        })
    }
}
