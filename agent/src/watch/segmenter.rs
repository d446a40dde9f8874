//! Whole revisions → sealed segments: streamed into zstd as they come (a segment's plaintext is never held),
//! cut at a revision boundary by age or compressed size, finished with the trailer, sealed with age.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferry_common::encryption::{Recipient, Sealer};
use ferry_common::protocol::{PartDigest, SegmentInfo};
use ferry_common::segment::{LeaseGrant, Revision, SegmentWriter, Trailer};

/// What every segment of one watch shares.
pub struct SegmentParams {
    pub cluster: String,
    pub lineage: u32,
    pub epoch: u64,
    pub member_id: u64,
    pub etcd_version: String,
    pub zstd_level: i32,
    pub recipients: Vec<Recipient>,
    pub cut_after: Duration,
    pub cut_bytes: u64,
}

/// A sealed segment: its bytes as stored and what announces it.
pub struct Sealed {
    pub info: SegmentInfo,
    pub bytes: Vec<u8>,
}

struct Open {
    writer: SegmentWriter<zstd::Encoder<'static, Vec<u8>>>,
    opened: Instant,
    first_time_ms: i64,
    last_time_ms: i64,
    events: u64,
}

pub struct Segmenter {
    params: std::sync::Arc<SegmentParams>,
    open: Option<Open>,
}

/// A segment taken out to be finished and sealed (CPU work, done off the async threads).
pub struct Cut {
    params: std::sync::Arc<SegmentParams>,
    open: Open,
}

impl Segmenter {
    pub fn new(params: SegmentParams) -> Self {
        Self { params: std::sync::Arc::new(params), open: None }
    }

    /// The revisions in the open segment.
    pub fn range(&self) -> Option<(i64, i64)> {
        self.open.as_ref().and_then(|o| o.writer.range())
    }

    /// Appends a whole revision (opening a segment at `now` when none is). It must follow the open
    /// segment's last revision by one: cut before a gap.
    pub fn push(&mut self, rev: &Revision, now: Instant) -> Result<()> {
        let open = match &mut self.open {
            Some(o) => o,
            None => {
                let encoder = zstd::Encoder::new(Vec::new(), self.params.zstd_level).context("start zstd")?;
                self.open.insert(Open {
                    writer: SegmentWriter::new(encoder),
                    opened: now,
                    first_time_ms: rev.time_ms,
                    last_time_ms: rev.time_ms,
                    events: 0,
                })
            }
        };
        open.writer.revision(rev)?;
        open.last_time_ms = rev.time_ms;
        open.events += rev.events.len() as u64;
        Ok(())
    }

    /// Whether the open segment is due: old enough, or its compressed bytes reached the limit.
    pub fn due(&self, now: Instant) -> bool {
        self.open.as_ref().is_some_and(|o| {
            now.saturating_duration_since(o.opened) >= self.params.cut_after
                || o.writer.get_ref().get_ref().len() as u64 >= self.params.cut_bytes
        })
    }

    /// Takes the open segment (if any) out, to be sealed with [`Cut::seal`].
    pub fn take(&mut self) -> Option<Cut> {
        Some(Cut { params: self.params.clone(), open: self.open.take()? })
    }

    /// [`Self::take`] and [`Cut::seal`] at once.
    pub fn cut(&mut self, leases: &[LeaseGrant], prev_sha256: [u8; 32]) -> Result<Option<Sealed>> {
        self.take().map(|c| c.seal(leases, prev_sha256)).transpose()
    }
}

impl Cut {
    /// Finishes the segment with `leases` and the trailer naming `prev_sha256`, and seals it.
    pub fn seal(self, leases: &[LeaseGrant], prev_sha256: [u8; 32]) -> Result<Sealed> {
        let Self { params: p, mut open } = self;
        for l in leases {
            open.writer.lease(*l)?;
        }
        let plain_bytes = open.writer.plain_bytes();
        let trailer = Trailer {
            format: 0,
            cluster: p.cluster.clone(),
            lineage: p.lineage,
            epoch: p.epoch,
            first_revision: 0,
            last_revision: 0,
            prev_sha256,
            member_id: p.member_id,
            etcd_version: p.etcd_version.clone(),
            records: 0,
            plain_sha256: [0; 32],
        };
        let (encoder, trailer) = open.writer.finish(trailer)?;
        let compressed = encoder.finish().context("finish zstd")?;
        let bytes = if p.recipients.is_empty() {
            compressed
        } else {
            let mut sealer = Sealer::new(&p.recipients)?;
            let mut out = sealer.seal(&compressed).context("seal the segment")?;
            drop(compressed);
            let (last, _) = sealer.finish().context("seal the segment")?;
            out.extend_from_slice(&last);
            out
        };
        let digest = PartDigest::of(&bytes);
        let info = SegmentInfo {
            first_revision: trailer.first_revision,
            last_revision: trailer.last_revision,
            size: digest.size,
            sha256: digest.sha256,
            md5: digest.md5,
            prev_sha256,
            events: open.events,
            plain_bytes,
            first_time_ms: open.first_time_ms,
            last_time_ms: open.last_time_ms,
        };
        Ok(Sealed { info, bytes })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use ferry_common::segment::{Event, EventKind, Record, SegmentReader};

    pub(crate) fn rev(revision: i64, events: usize, value_len: usize) -> Revision {
        // Incompressible-ish values so that sizes move.
        let mut x = (revision as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let mut value = vec![0u8; value_len];
        for b in &mut value {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        Revision {
            revision,
            time_ms: 1_000 + revision,
            events: (0..events)
                .map(|i| Event {
                    kind: EventKind::Put,
                    key: format!("/k/{revision}/{i}").into_bytes(),
                    value: value.clone(),
                    create_revision: revision,
                    version: 1,
                    lease: 0,
                })
                .collect(),
        }
    }

    pub(crate) fn params(cut_after: Duration, cut_bytes: u64) -> SegmentParams {
        SegmentParams {
            cluster: "c".into(),
            lineage: 1,
            epoch: 2,
            member_id: 3,
            etcd_version: "3.5.16".into(),
            zstd_level: 3,
            recipients: Vec::new(),
            cut_after,
            cut_bytes,
        }
    }

    /// The revisions a sealed (zstd only) segment holds, and its trailer.
    pub(crate) fn read(bytes: &[u8]) -> (Vec<Revision>, Trailer) {
        let plain = zstd::decode_all(bytes).unwrap();
        let mut revs = Vec::new();
        let t = SegmentReader::new(&plain[..])
            .for_each(|r| {
                if let Record::Revision(r) = r {
                    revs.push(r)
                }
            })
            .unwrap();
        (revs, t)
    }

    #[test]
    fn cut_by_time_at_a_revision_boundary() {
        let t0 = Instant::now();
        let mut s = Segmenter::new(params(Duration::from_secs(10), u64::MAX));
        assert!(!s.due(t0 + Duration::from_secs(60)), "nothing open: nothing due");
        s.push(&rev(5, 2, 10), t0).unwrap();
        s.push(&rev(6, 1, 10), t0 + Duration::from_secs(9)).unwrap();
        assert!(!s.due(t0 + Duration::from_secs(9)));
        assert!(s.due(t0 + Duration::from_secs(10)));
        let sealed = s.cut(&[LeaseGrant { id: 7, granted_ttl: 60, seen_at_revision: 6 }], [9; 32]).unwrap().unwrap();
        assert_eq!((sealed.info.first_revision, sealed.info.last_revision, sealed.info.events), (5, 6, 3));
        assert_eq!((sealed.info.first_time_ms, sealed.info.last_time_ms), (1005, 1006));
        assert_eq!(sealed.info.size, sealed.bytes.len() as u64);
        let (revs, t) = read(&sealed.bytes);
        assert_eq!(revs, [rev(5, 2, 10), rev(6, 1, 10)]);
        assert_eq!((t.prev_sha256, t.epoch, t.lineage, t.records), ([9; 32], 2, 1, 3));
        assert!(s.range().is_none() && s.cut(&[], [0; 32]).unwrap().is_none());
    }

    #[test]
    fn cut_by_size_never_splits_a_revision() {
        let t0 = Instant::now();
        let mut s = Segmenter::new(params(Duration::from_secs(3600), 64 * 1024));
        let mut segments = Vec::new();
        for r in 1..=200 {
            // A revision of 4 events × 1 KiB: the whole revision goes in before the size is looked at.
            s.push(&rev(r, 4, 1024), t0).unwrap();
            if s.due(t0) {
                segments.push(s.cut(&[], [0; 32]).unwrap().unwrap());
            }
        }
        segments.extend(s.cut(&[], [0; 32]).unwrap());
        assert!(segments.len() >= 3, "{} segments", segments.len());
        let mut next = 1;
        for seg in &segments {
            let (revs, _) = read(&seg.bytes);
            assert_eq!(revs.first().map(|r| r.revision), Some(next));
            assert!(revs.iter().all(|r| r.events.len() == 4), "whole revisions");
            next = revs.last().map_or(next, |r| r.revision + 1);
        }
        assert_eq!(next, 201);
    }

    #[test]
    fn a_sealed_segment_opens_with_the_identity() {
        let id = ferry_common::encryption::keygen();
        let mut p = params(Duration::from_secs(1), u64::MAX);
        p.recipients = ferry_common::encryption::parse_recipients(std::slice::from_ref(&id.recipient)).unwrap();
        let mut s = Segmenter::new(p);
        s.push(&rev(1, 1, 10), Instant::now()).unwrap();
        let sealed = s.cut(&[], [0; 32]).unwrap().unwrap();
        assert!(sealed.bytes.starts_with(ferry_common::encryption::AGE_MAGIC));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("id");
        std::fs::write(&path, &id.file_text).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let ids = ferry_common::encryption::Identities::load(&path).unwrap();
        let mut zst = Vec::new();
        ids.open(&sealed.bytes[..], &mut zst).unwrap();
        assert_eq!(read(&zst).0, [rev(1, 1, 10)]);
    }
}
