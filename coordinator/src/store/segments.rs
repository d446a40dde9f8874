//! Change-log segments in the backup store: `<cluster>/log/<lineage>/<first>-<last>-<epoch>.fseg` beside the
//! cluster's backups. An agent puts a segment to S3 through one presigned PUT that is signed for its size and
//! checksums and refuses to overwrite an existing object; for the local store its bytes come through the
//! coordinator. Either way the coordinator checks what landed before it indexes the segment.

use base64::Engine as _;
use ferry_common::protocol::{PresignedRequest, SegmentInfo, SegmentTarget};
use ferry_common::s3::{self as common_s3, S3ErrorKind};
use sha2::Digest as _;
use tokio_util::sync::CancellationToken;

use super::{s3, Backend, BackupStore, StoreError};

/// The largest segment object the coordinator takes or reads back: far above the 4 MiB a segment is cut at,
/// room for one enormous revision (a prefix delete of a million keys), and still a bound on what a hostile
/// agent can make the coordinator hold.
pub const MAX_SEGMENT_BYTES: u64 = 256 << 20;

impl BackupStore {
    /// Where a watcher's segments go.
    pub fn segment_target(&self) -> Result<SegmentTarget, StoreError> {
        match &self.backend {
            Backend::Local(_) => Ok(SegmentTarget::Coordinator),
            Backend::S3(s) => Ok(SegmentTarget::S3 { cacert: s.conn()?.spec.cacert.clone() }),
        }
    }

    /// A presigned PUT of segment `name` of `cluster`, signed for exactly `info`'s bytes and refusing to
    /// replace an object already there (S3 only).
    pub async fn segment_url(
        &self,
        cluster: &str,
        name: &str,
        info: &SegmentInfo,
    ) -> Result<PresignedRequest, StoreError> {
        check(info)?;
        let Backend::S3(s) = &self.backend else {
            return Err(StoreError::Mismatch("the local store takes segments on the watch stream".into()));
        };
        let conn = s.conn()?;
        let bucket = &conn.spec.bucket;
        let key = s3::segment_key(&conn.spec, cluster, name);
        let b64 = base64::engine::general_purpose::STANDARD;
        let p = conn
            .client
            .put_object()
            .bucket(bucket)
            .key(&key)
            .content_length(info.size as i64)
            .content_md5(b64.encode(info.md5))
            .checksum_sha256(b64.encode(info.sha256))
            .if_none_match("*")
            .presigned(s3::presigning_config()?)
            .await
            .map_err(|e| {
                ferry_common::s3::S3Error::from_sdk(&format!("presign PUT s3://{bucket}/{key}"), bucket, &e)
            })?;
        Ok(s3::presigned(&p))
    }

    /// Checks that segment `name` landed as `info` describes (S3: its size, and its SHA-256 or MD5 ETag where
    /// the store answers them).
    pub async fn check_segment(
        &self,
        cluster: &str,
        name: &str,
        info: &SegmentInfo,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(_) => compare(name, &self.read_segment(cluster, name, cancel).await?, info),
            Backend::S3(s) => {
                let conn = s.conn()?;
                let bucket = &conn.spec.bucket;
                let key = s3::segment_key(&conn.spec, cluster, name);
                let what = format!("check s3://{bucket}/{key}");
                let head = common_s3::with_quick_retries(cancel, &what, || async {
                    conn.client
                        .head_object()
                        .bucket(bucket)
                        .key(&key)
                        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
                        .send()
                        .await
                        .map_err(|e| ferry_common::s3::S3Error::from_sdk(&what, bucket, &e))
                })
                .await;
                let head = match head {
                    Err(e) if e.kind == S3ErrorKind::NotFound => {
                        return Err(StoreError::Mismatch(format!("segment {name} is not in the store")))
                    }
                    r => r?,
                };
                if head.content_length() != Some(info.size as i64) {
                    return Err(StoreError::Mismatch(format!(
                        "segment {name} holds {:?} bytes, not the {} announced",
                        head.content_length(),
                        info.size
                    )));
                }
                let b64 = base64::engine::general_purpose::STANDARD;
                if let Some(sum) = head.checksum_sha256() {
                    if sum != b64.encode(info.sha256) {
                        return Err(StoreError::Mismatch(format!("segment {name}'s SHA-256 is not the one announced")));
                    }
                } else if let Some(etag) = head.e_tag() {
                    let etag = etag.trim_matches('"');
                    if etag.len() == 32 && !etag.contains('-') && etag != hex::encode(info.md5) {
                        return Err(StoreError::Mismatch(format!("segment {name}'s ETag is not the MD5 announced")));
                    }
                }
                Ok(())
            }
        }
    }

    /// Stores segment `name` of `cluster` whole (the local store: temp file, fsync, rename; never replacing
    /// one already there).
    pub async fn put_segment(
        &self,
        cluster: &str,
        name: &str,
        bytes: Vec<u8>,
        info: &SegmentInfo,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        check(info)?;
        compare(name, &bytes, info)?;
        if cancel.is_cancelled() {
            return Err(StoreError::Cancelled);
        }
        let Backend::Local(l) = &self.backend else {
            return Err(StoreError::Mismatch("S3 segments are put by the agent".into()));
        };
        let path = l.segment_path(cluster, name)?;
        tokio::task::spawn_blocking(move || write_new(&path, &bytes))
            .await
            .map_err(|e| StoreError::Io { what: "store segment".into(), error: std::io::Error::other(e) })?
    }

    /// Reads segment `name` of `cluster` whole (at most [`MAX_SEGMENT_BYTES`]).
    pub async fn read_segment(
        &self,
        cluster: &str,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<Vec<u8>, StoreError> {
        match &self.backend {
            Backend::Local(l) => {
                let path = l.segment_path(cluster, name)?;
                let len =
                    tokio::fs::metadata(&path).await.map_err(StoreError::io(format!("read {}", path.display())))?.len();
                if len > MAX_SEGMENT_BYTES {
                    return Err(StoreError::Mismatch(format!("segment {name} is {len} bytes, over the limit")));
                }
                tokio::fs::read(&path).await.map_err(StoreError::io(format!("read {}", path.display())))
            }
            Backend::S3(s) => {
                let conn = s.conn()?;
                let key = s3::segment_key(&conn.spec, cluster, name);
                Ok(common_s3::get_bytes(&conn.client, &conn.spec.bucket, &key, MAX_SEGMENT_BYTES, cancel)
                    .await?
                    .to_vec())
            }
        }
    }
}

fn check(info: &SegmentInfo) -> Result<(), StoreError> {
    if info.size == 0 || info.size > MAX_SEGMENT_BYTES {
        return Err(StoreError::Mismatch(format!(
            "a segment of {} bytes is outside 1..={MAX_SEGMENT_BYTES}",
            info.size
        )));
    }
    Ok(())
}

fn compare(name: &str, bytes: &[u8], info: &SegmentInfo) -> Result<(), StoreError> {
    let sha: [u8; 32] = sha2::Sha256::digest(bytes).into();
    if bytes.len() as u64 != info.size || sha != info.sha256 {
        return Err(StoreError::Mismatch(format!("segment {name} is not the {} bytes announced", info.size)));
    }
    Ok(())
}

/// Writes `bytes` to `path` as a new file, durably: a temp file fsynced, linked into place without replacing
/// anything (an existing segment is an error), the directory fsynced.
fn write_new(path: &std::path::Path, bytes: &[u8]) -> Result<(), StoreError> {
    use std::io::Write as _;
    let io = |what: String| move |error| StoreError::Io { what, error };
    let dir = path.parent().ok_or_else(|| StoreError::BadName(format!("{} has no directory", path.display())))?;
    ferry_common::config::create_private_dir(dir).map_err(io(format!("create {}", dir.display())))?;
    let tmp = path.with_extension("tmp");
    let mut f =
        ferry_common::config::create_private_replacing(&tmp).map_err(io(format!("create {}", tmp.display())))?;
    f.write_all(bytes).and_then(|()| f.sync_all()).map_err(io(format!("write {}", tmp.display())))?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(StoreError::Mismatch(format!("segment {} exists already", path.display())))
        }
        r => r.map_err(io(format!("store {}", path.display())))?,
    }
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(format!("sync {}", dir.display())))
}

impl BackupStore {
    /// Deletes segment `name` of `cluster` (retention); absent is fine.
    pub async fn delete_segment(
        &self,
        cluster: &str,
        name: &str,
        cancel: &CancellationToken,
    ) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Local(l) => {
                let path = l.segment_path(cluster, name)?;
                match tokio::fs::remove_file(&path).await {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        Err(StoreError::io(format!("remove {}", path.display()))(e))
                    }
                    _ => Ok(()),
                }
            }
            Backend::S3(s) => {
                let conn = s.conn()?;
                let key = s3::segment_key(&conn.spec, cluster, name);
                Ok(common_s3::delete_object(&conn.client, &conn.spec.bucket, &key, cancel).await?)
            }
        }
    }
}
