//! Point-in-time recovery on top of the change log: resolving a point (a time, a revision) to a full backup
//! and the segments after it ([`plan`], on the coordinator), reading those segments back with every hash
//! checked ([`open_segment`]), and rebuilding the state at the point in a throw-away etcd ([`materialize`]),
//! which `ferryctl backup download --at`, `ferryctl get-key --at` and a point-in-time restore share.

pub mod derive;
pub mod diff;
pub mod materialize;
pub mod plan;

use std::io::Read as _;

use ferry_common::encryption::Identities;
use ferry_common::protocol::PlanSegment;
use ferry_common::segment::{LeaseGrant, Record, Revision, SegmentReader, Trailer};
use sha2::Digest as _;

use crate::changelog::index::SegmentEntry;

/// A segment's plaintext is at most this large: far above what 4 MiB of zstd holds for etcd data, and a
/// bound on a hostile segment's decompression.
const MAX_PLAIN_BYTES: u64 = 1 << 30;

/// A segment could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SegmentReadError {
    #[error("segment {0} is encrypted: give the age identity that opens the cluster's backups (--identity FILE)")]
    Encrypted(String),
    #[error("segment {name} is damaged or not the one indexed: {why}")]
    Damaged { name: String, why: String },
}

/// One segment read back whole.
#[derive(Debug)]
pub struct OpenSegment {
    pub revisions: Vec<Revision>,
    pub leases: Vec<LeaseGrant>,
    pub trailer: Trailer,
}

impl From<&SegmentEntry> for PlanSegment {
    fn from(s: &SegmentEntry) -> Self {
        PlanSegment {
            name: s.name.clone(),
            first_revision: s.first_revision,
            last_revision: s.last_revision,
            size: s.size,
            sha256: s.sha256.clone(),
            prev_sha256: s.prev_sha256.clone(),
            encrypted: s.encrypted,
            first_time_ms: s.first_time_ms,
            last_time_ms: s.last_time_ms,
        }
    }
}

/// Opens a stored segment: its sha256 must be the one indexed, then age (with `identities`), zstd and the
/// format's own checks (revisions rising by one, the trailer matching every record), and the trailer must
/// name the range and the previous hash indexed. Revision times are held to the indexed range.
pub fn open_segment(
    s: &PlanSegment,
    stored: &[u8],
    identities: Option<&Identities>,
) -> Result<OpenSegment, SegmentReadError> {
    let damaged = |why: String| SegmentReadError::Damaged { name: s.name.clone(), why };
    if stored.len() as u64 != s.size || hex::encode(sha2::Sha256::digest(stored)) != s.sha256 {
        return Err(damaged("its size or sha256 is not the one indexed".into()));
    }
    let opened;
    let zstd_bytes: &[u8] = if s.encrypted {
        let ids = identities.ok_or_else(|| SegmentReadError::Encrypted(s.name.clone()))?;
        let mut out = Vec::new();
        ids.open(stored, &mut out).map_err(|e| damaged(e.to_string()))?;
        opened = out;
        &opened
    } else {
        stored
    };
    let decoder = zstd::Decoder::new(zstd_bytes).map_err(|e| damaged(e.to_string()))?;
    let mut revisions = Vec::new();
    let mut leases = Vec::new();
    let (from, to) = (s.first_time_ms, s.last_time_ms.max(s.first_time_ms));
    let trailer = SegmentReader::new(decoder.take(MAX_PLAIN_BYTES))
        .for_each(|r| match r {
            Record::Revision(mut rev) => {
                // Times inside a segment are the agent's: held to the range the coordinator indexed.
                rev.time_ms = rev.time_ms.clamp(from, to);
                revisions.push(rev);
            }
            Record::Lease(l) => leases.push(l),
            Record::End(_) => {}
        })
        .map_err(|e| damaged(e.to_string()))?;
    if trailer.first_revision != s.first_revision || trailer.last_revision != s.last_revision {
        return Err(damaged(format!(
            "it holds revisions {}..={}, not the {}..={} indexed",
            trailer.first_revision, trailer.last_revision, s.first_revision, s.last_revision
        )));
    }
    if hex::encode(trailer.prev_sha256) != s.prev_sha256 {
        return Err(damaged("its previous hash is not the one indexed".into()));
    }
    Ok(OpenSegment { revisions, leases, trailer })
}

/// [`open_segment`] off the async runtime (zstd and age over up to a few MiB).
pub async fn open_segment_blocking(
    s: &PlanSegment,
    stored: Vec<u8>,
    identities: Option<&Identities>,
) -> Result<OpenSegment, SegmentReadError> {
    let (plan, ids) = (s.clone(), identities.cloned());
    tokio::task::spawn_blocking(move || open_segment(&plan, &stored, ids.as_ref())).await.unwrap_or_else(|e| {
        Err(SegmentReadError::Damaged { name: s.name.clone(), why: format!("reading it panicked: {e}") })
    })
}

/// Checks that `segments` join: each names the one before it as its previous object and starts where it
/// ended. `Err` says where the chain breaks.
pub fn check_chain(segments: &[PlanSegment]) -> Result<(), String> {
    for w in segments.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.first_revision != a.last_revision + 1 {
            return Err(format!(
                "the log misses revisions {}..={} (between segments {} and {})",
                a.last_revision + 1,
                b.first_revision - 1,
                a.name,
                b.name
            ));
        }
        if b.prev_sha256 != a.sha256 {
            return Err(format!("segment {} does not name segment {} as the one before it", b.name, a.name));
        }
    }
    Ok(())
}
