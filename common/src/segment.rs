//! The change log's segment format, shared by the agent that writes segments, the coordinator that indexes
//! them and whoever reads them back (`ferryctl changes`, a point-in-time restore).
//!
//! A segment holds every etcd revision in `first_revision..=last_revision` of one cluster, whole: the events
//! of one revision (one transaction) are never split across segments. Its plaintext is a sequence of frames
//! (a 4-byte big-endian length and a postcard [`Record`]): the revisions in order, lease grants seen while it
//! was open, and last a [`Record::End`] whose [`Trailer`] names the segment (cluster, range, epoch) and the
//! sha256 of the previous segment's stored object (the hash chain). The trailer comes last so the writer
//! streams records into zstd as they arrive and never holds a segment's plaintext. Stored: zstd, then age
//! when the cluster's backups are encrypted; [`object_name`] makes a self-describing, sortable key so the
//! chain can be rebuilt from a listing alone.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Format version in every trailer.
pub const FORMAT_VERSION: u32 = 1;

/// The suffix of every segment object.
pub const SUFFIX: &str = ".fseg";

/// The largest record a reader accepts: one etcd revision can hold a whole prefix delete (keys only) or a
/// transaction up to etcd's request limit; 256 MiB is far above both and still bounds a hostile segment.
pub const MAX_RECORD: usize = 256 * 1024 * 1024;

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    Put,
    Delete,
}

/// One key change of a revision, as etcd's watch gives it (no previous value: a delete carries the key only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub key: Vec<u8>,
    /// Empty for a delete.
    pub value: Vec<u8>,
    /// 0 for a delete.
    pub create_revision: i64,
    /// 0 for a delete.
    pub version: i64,
    /// 0: no lease.
    pub lease: i64,
}

/// Every change of one etcd revision (one transaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revision {
    pub revision: i64,
    /// When the agent received it, in Unix milliseconds on the coordinator's clock (the agent counts from the
    /// coordinator's time it was given with its monotonic clock; its own wall clock never places a change).
    pub time_ms: i64,
    pub events: Vec<Event>,
}

/// A lease etcd granted, as the agent saw it while the segment was open (leases are not in the watch stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseGrant {
    pub id: i64,
    /// The TTL it was granted with, in seconds.
    pub granted_ttl: i64,
    /// The revision the agent had seen when it found the lease.
    pub seen_at_revision: i64,
}

/// The last record of a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trailer {
    pub format: u32,
    pub cluster: String,
    pub lineage: u32,
    pub epoch: u64,
    pub first_revision: i64,
    pub last_revision: i64,
    /// The sha256 of the previous segment's stored object (after zstd and age); zeros only for the first
    /// segment of a lineage. After a gap it still names the last segment stored: the chain links stored
    /// objects, and gaps are recorded in the coordinator's index.
    pub prev_sha256: [u8; 32],
    /// The member watched.
    pub member_id: u64,
    pub etcd_version: String,
    /// Records before this one.
    pub records: u64,
    /// sha256 of every frame before this one.
    pub plain_sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    Revision(Revision),
    Lease(LeaseGrant),
    End(Trailer),
}

/// A segment could not be read or is not what it claims.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("segment i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("segment record of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("undecodable segment record: {0}")]
    Decode(postcard::Error),
    #[error("segment ends without its trailer (truncated)")]
    Truncated,
    #[error("segment is inconsistent: {0}")]
    Invalid(String),
}

/// The object key of a segment, relative to the cluster's prefix: `log/<lineage>/<first>-<last>-<epoch>.fseg`
/// with fixed-width hex, so keys sort by revision and a listing alone rebuilds the chain.
pub fn object_name(lineage: u32, first_revision: i64, last_revision: i64, epoch: u64) -> String {
    format!("log/{lineage:08x}/{first_revision:016x}-{last_revision:016x}-{epoch:016x}{SUFFIX}")
}

/// The lineage, range and epoch an [`object_name`] (or a key ending in one) names.
pub fn parse_object_name(key: &str) -> Option<(u32, i64, i64, u64)> {
    let rest = key.strip_suffix(SUFFIX)?;
    let mut parts = rest.rsplit('/');
    let name = parts.next()?;
    let lineage = u32::from_str_radix(parts.next()?, 16).ok()?;
    let mut fields = name.split('-');
    let first = i64::from_str_radix(fields.next()?, 16).ok()?;
    let last = i64::from_str_radix(fields.next()?, 16).ok()?;
    let epoch = u64::from_str_radix(fields.next()?, 16).ok()?;
    (fields.next().is_none() && first >= 1 && last >= first).then_some((lineage, first, last, epoch))
}

/// Writes one record as a frame into `w`, feeding `hash` with the frame's bytes.
pub fn write_record<W: Write>(w: &mut W, hash: &mut Sha256, record: &Record) -> Result<u64, SegmentError> {
    let body = postcard::to_stdvec(record).map_err(SegmentError::Decode)?;
    if body.len() > MAX_RECORD {
        return Err(SegmentError::TooLarge(body.len()));
    }
    let len = (body.len() as u32).to_be_bytes();
    hash.update(len);
    hash.update(&body);
    w.write_all(&len)?;
    w.write_all(&body)?;
    Ok(4 + body.len() as u64)
}

/// Reads a segment's plaintext (after zstd and age), record by record, checking what the format promises:
/// revisions rising by one inside the segment, every revision with an event, the trailer last and matching
/// what came before it.
pub struct SegmentReader<R: Read> {
    inner: R,
    hash: Sha256,
    records: u64,
    first: Option<i64>,
    last: Option<i64>,
    done: bool,
}

impl<R: Read> SegmentReader<R> {
    pub fn new(inner: R) -> Self {
        Self { inner, hash: Sha256::new(), records: 0, first: None, last: None, done: false }
    }

    /// The next revision or lease; `Ok(None)` once the trailer was read and checked (returned by
    /// [`Self::finish`]).
    #[allow(clippy::should_implement_trait)] // fallible: `Iterator` would hide the error in the item
    pub fn next(&mut self) -> Result<Option<Record>, SegmentError> {
        if self.done {
            return Ok(None);
        }
        let mut len = [0u8; 4];
        if let Err(e) = self.inner.read_exact(&mut len) {
            return Err(match e.kind() {
                std::io::ErrorKind::UnexpectedEof => SegmentError::Truncated,
                _ => SegmentError::Io(e),
            });
        }
        let n = u32::from_be_bytes(len) as usize;
        if n > MAX_RECORD {
            return Err(SegmentError::TooLarge(n));
        }
        let mut body = Vec::with_capacity(n.min(1 << 20));
        (&mut self.inner).take(n as u64).read_to_end(&mut body)?;
        if body.len() < n {
            return Err(SegmentError::Truncated);
        }
        let record: Record = postcard::from_bytes(&body).map_err(SegmentError::Decode)?;
        match &record {
            Record::Revision(r) => {
                if r.events.is_empty() {
                    return Err(SegmentError::Invalid(format!("revision {} has no event", r.revision)));
                }
                if let Some(last) = self.last {
                    if r.revision != last + 1 {
                        return Err(SegmentError::Invalid(format!(
                            "revision {} follows {last}: revisions must rise by one",
                            r.revision
                        )));
                    }
                }
                self.first.get_or_insert(r.revision);
                self.last = Some(r.revision);
            }
            Record::Lease(_) => {}
            Record::End(t) => {
                let plain: [u8; 32] = self.hash.clone().finalize().into();
                let range_ok =
                    self.first.is_none_or(|f| f == t.first_revision) && self.last.is_none_or(|l| l == t.last_revision);
                if t.records != self.records || t.plain_sha256 != plain || !range_ok || self.first.is_none() {
                    return Err(SegmentError::Invalid(format!(
                        "trailer (revisions {}..={}, {} records) does not match the {} records before it",
                        t.first_revision, t.last_revision, t.records, self.records
                    )));
                }
                self.done = true;
            }
        }
        self.hash.update(len);
        self.hash.update(&body);
        self.records += 1;
        Ok(Some(record))
    }

    /// Reads every record up to and including the trailer, passing revisions and leases to `f`; returns the
    /// trailer. Anything after the trailer is an error.
    pub fn for_each(mut self, mut f: impl FnMut(Record)) -> Result<Trailer, SegmentError> {
        loop {
            match self.next()? {
                Some(Record::End(t)) => {
                    let mut rest = [0u8; 1];
                    if self.inner.read(&mut rest)? != 0 {
                        return Err(SegmentError::Invalid("bytes after the trailer".into()));
                    }
                    return Ok(t);
                }
                Some(r) => f(r),
                None => return Err(SegmentError::Truncated),
            }
        }
    }
}

/// Writes a segment's plaintext: records as they come, the trailer at the end (the caller compresses).
pub struct SegmentWriter<W: Write> {
    inner: W,
    hash: Sha256,
    records: u64,
    first: Option<i64>,
    last: Option<i64>,
    plain_bytes: u64,
}

impl<W: Write> SegmentWriter<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, hash: Sha256::new(), records: 0, first: None, last: None, plain_bytes: 0 }
    }

    /// Appends a whole revision; it must follow the last one by exactly one.
    pub fn revision(&mut self, r: &Revision) -> Result<(), SegmentError> {
        if r.events.is_empty() {
            return Err(SegmentError::Invalid(format!("revision {} has no event", r.revision)));
        }
        if let Some(last) = self.last {
            if r.revision != last + 1 {
                return Err(SegmentError::Invalid(format!("revision {} does not follow {last}", r.revision)));
            }
        }
        self.plain_bytes += write_record(&mut self.inner, &mut self.hash, &Record::Revision(r.clone()))?;
        self.first.get_or_insert(r.revision);
        self.last = Some(r.revision);
        self.records += 1;
        Ok(())
    }

    pub fn lease(&mut self, l: LeaseGrant) -> Result<(), SegmentError> {
        self.plain_bytes += write_record(&mut self.inner, &mut self.hash, &Record::Lease(l))?;
        self.records += 1;
        Ok(())
    }

    /// The revisions written so far.
    pub fn range(&self) -> Option<(i64, i64)> {
        Some((self.first?, self.last?))
    }

    /// Plaintext bytes written so far.
    pub fn plain_bytes(&self) -> u64 {
        self.plain_bytes
    }

    pub fn get_ref(&self) -> &W {
        &self.inner
    }

    /// Writes the trailer (`trailer`'s range, record count and hash are filled in here) and returns the inner
    /// writer. A segment without a revision is an error: an idle cluster writes no segment.
    pub fn finish(mut self, mut trailer: Trailer) -> Result<(W, Trailer), SegmentError> {
        let (first, last) =
            self.range().ok_or_else(|| SegmentError::Invalid("a segment needs at least one revision".into()))?;
        trailer.format = FORMAT_VERSION;
        trailer.first_revision = first;
        trailer.last_revision = last;
        trailer.records = self.records;
        trailer.plain_sha256 = self.hash.clone().finalize().into();
        let mut ignored = Sha256::new();
        write_record(&mut self.inner, &mut ignored, &Record::End(trailer.clone()))?;
        Ok((self.inner, trailer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(revision: i64, key: &str) -> Revision {
        Revision {
            revision,
            time_ms: 1_700_000_000_000 + revision,
            events: vec![Event {
                kind: EventKind::Put,
                key: key.as_bytes().to_vec(),
                value: b"v".to_vec(),
                create_revision: revision,
                version: 1,
                lease: 0,
            }],
        }
    }

    fn trailer() -> Trailer {
        Trailer {
            format: 0,
            cluster: "c".into(),
            lineage: 0,
            epoch: 3,
            first_revision: 0,
            last_revision: 0,
            prev_sha256: [7; 32],
            member_id: 9,
            etcd_version: "3.5.16".into(),
            records: 0,
            plain_sha256: [0; 32],
        }
    }

    #[test]
    fn a_segment_round_trips_and_names_itself() {
        let mut w = SegmentWriter::new(Vec::new());
        for r in 5..9 {
            w.revision(&rev(r, &format!("/k{r}"))).unwrap();
        }
        w.lease(LeaseGrant { id: 1, granted_ttl: 60, seen_at_revision: 8 }).unwrap();
        let (bytes, t) = w.finish(trailer()).unwrap();
        assert_eq!((t.first_revision, t.last_revision, t.records), (5, 8, 5));
        let mut seen = Vec::new();
        let back = SegmentReader::new(&bytes[..]).for_each(|r| seen.push(r)).unwrap();
        assert_eq!(back, t);
        assert_eq!(seen.len(), 5);
        let name = object_name(0, 5, 8, 3);
        assert_eq!(parse_object_name(&format!("prefix/c/{name}")), Some((0, 5, 8, 3)));
        assert!(object_name(0, 9, 10, 1) > name, "names sort by revision");
    }

    #[test]
    fn a_missing_revision_a_cut_and_a_forged_trailer_are_refused() {
        let mut w = SegmentWriter::new(Vec::new());
        w.revision(&rev(5, "/a")).unwrap();
        assert!(w.revision(&rev(7, "/b")).is_err(), "the writer refuses a skipped revision");
        w.revision(&rev(6, "/b")).unwrap();
        let (bytes, _) = w.finish(trailer()).unwrap();
        for cut in [1, 10, bytes.len() - 1] {
            let r = SegmentReader::new(&bytes[..cut]).for_each(|_| {});
            assert!(r.is_err(), "cut at {cut}");
        }
        // A segment with a revision removed, its trailer left as it was: refused.
        let mut w = SegmentWriter::new(Vec::new());
        w.revision(&rev(5, "/a")).unwrap();
        w.revision(&rev(6, "/b")).unwrap();
        let (two, _) = w.finish(trailer()).unwrap();
        // Drop the second revision's frame by splicing the one-revision segment's body with the two-revision
        // segment's trailer.
        let one_body_len = {
            let mut w = SegmentWriter::new(Vec::new());
            w.revision(&rev(5, "/a")).unwrap();
            w.plain_bytes() as usize
        };
        let two_body_len = {
            let mut w = SegmentWriter::new(Vec::new());
            w.revision(&rev(5, "/a")).unwrap();
            w.revision(&rev(6, "/b")).unwrap();
            w.plain_bytes() as usize
        };
        let mut spliced = two[..one_body_len].to_vec();
        spliced.extend_from_slice(&two[two_body_len..]);
        let r = SegmentReader::new(&spliced[..]).for_each(|_| {});
        assert!(matches!(r, Err(SegmentError::Invalid(_))), "{r:?}");
        assert!(SegmentWriter::new(Vec::new()).finish(trailer()).is_err(), "no empty segment");
    }
}
