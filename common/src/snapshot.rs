//! Reading a stored backup back: every check a restore depends on, while the bytes stream in, and etcd's own
//! restore tool. Shared by `ferryctl backup download|verify` and `ferry-agent restore`.
//!
//! A stored backup is one zstd frame whose decompressed bytes are exactly etcd's snapshot file: the bbolt
//! database followed by the 32-byte sha256 of it. [`VerifyingWriter`] checks, in this order of failure:
//! the stored object's size and sha256 against the manifest, that it decompresses, the decompressed size and
//! sha256 against the manifest, and etcd's trailing hash. The file is written beside its target and renamed
//! into place only when every check passed. An encrypted backup (an age file of that zstd frame) is opened
//! with the identities given, and the zstd stream inside is checked against the manifest too.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::bbolt::{Members, MembersReader, RevisionReader};
use crate::encryption::{AgeHeader, EncryptionError, Identities, OpeningWriter, AGE_MAGIC, MAX_AGE_HEADER};
use crate::resources::EtcdBackupSpec;

/// A check on a backup failed; the message names it.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the stored object is {got} bytes but its manifest says {want}: the backup is truncated or damaged")]
    StoredSize { got: u64, want: u64 },
    #[error("sha256 of the stored object is {got} but its manifest says {want}: the backup is corrupted")]
    StoredHash { got: String, want: String },
    #[error("the stored object does not decompress ({0}): the backup is corrupted or truncated")]
    Decompress(String),
    #[error("the decompressed snapshot is {got} bytes but the manifest says {want}")]
    RawSize { got: u64, want: u64 },
    /// Decompression stopped at the manifest's raw size: the object inflates to more (a decompression bomb,
    /// or an object that is not this backup). Nothing beyond that size was written.
    #[error(
        "the stored object decompresses to more than {want} bytes: larger than its manifest says; stopped there \
         (the object is not the backup its manifest describes)"
    )]
    RawTooLarge { want: u64 },
    /// An incoming snapshot went past the receiver's size limit while it streamed in: stopped there, before
    /// its end (where its real size would be said), so an endless or inflating stream costs neither CPU nor
    /// disk beyond the limit.
    #[error(
        "the incoming snapshot is larger than the {limit}-byte limit (decompressed, or as stored); refused while \
         it streamed in. A real database this large needs a higher --max-snapshot-size-mib on the coordinator"
    )]
    OverLimit { limit: u64 },
    #[error("sha256 of the decompressed snapshot is {got} but the manifest says {want}")]
    RawHash { got: String, want: String },
    #[error("etcd's own sha256 at the end of the snapshot does not match its contents: the snapshot is corrupted")]
    EtcdHash,
    #[error("the snapshot is shorter than etcd's 32-byte trailing hash")]
    TooShort,
    #[error("the snapshot is not an etcd (bbolt) database: {0}")]
    NotBbolt(String),
    #[error("write {path}: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    /// The snapshot's `members` bucket names etcd members that most of the cluster's agents do not report:
    /// another cluster's snapshot.
    #[error(
        "the snapshot's etcd members ({found}) are not the cluster's: most of its connected members report ids \
         not among them ({reported}); it is another etcd cluster's snapshot"
    )]
    ForeignMembers { found: String, reported: String },
    /// The backing-up member declared a revision the snapshot does not reach: a restore bumped from it would
    /// land below the revisions Kubernetes' watchers saw.
    #[error(
        "the manifest says the snapshot is at revision {declared} but it holds revision {holds}: the declared \
         revision is not the snapshot's (a restore bumped from it could land below what watchers saw)"
    )]
    RevisionAbove { declared: i64, holds: i64 },
    #[error(transparent)]
    Encryption(#[from] EncryptionError),
    #[error(
        "the decrypted zstd stream is {got} bytes, sha256 {sha}, but the manifest says {want} bytes, sha256 {want_sha}"
    )]
    ZstdStream { got: u64, sha: String, want: u64, want_sha: String },
    #[error("the stored object is {found} but its manifest says it is {expected}")]
    Sealing { found: &'static str, expected: &'static str },
    /// The coordinator's identity opens the backup's recipients but not the object: it was sealed to
    /// someone else (or is not the age file of this backup).
    #[error("the stored object is not encrypted to the backup's recipients ({}): the identity that opens them does not open it", .0.join(", "))]
    NotSealedTo(Vec<String>),
    #[error("the snapshot checking thread {0}")]
    Writer(&'static str),
    #[error("{tool} failed: {detail}")]
    Tool { tool: String, detail: String },
    #[error(
        "{found} cannot bump the restored revision, which Kubernetes needs after a restore (its watch caches would \
         miss changes): put etcdutl {MIN_BUMP_VERSION} or newer on PATH (from the etcd release your cluster runs), \
         or pass --no-bump-revision to restore without the bump"
    )]
    CannotBump { found: String },
}

/// What a failed etcd tool said: its panic when it panicked (a damaged database: the stack trace's last line
/// says nothing), else its last line.
fn tool_failure(stderr: &str) -> String {
    let panic = stderr.lines().find(|l| l.starts_with("panic:")).map(|l| format!("etcd's tool panicked: {l}"));
    panic.unwrap_or_else(|| stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").to_string())
}

/// The first etcdutl with `snapshot restore --bump-revision --mark-compacted`.
pub const MIN_BUMP_VERSION: &str = "3.5.10";
/// The restored revision lands at least this far above the highest revision the cluster is known to have
/// reached: a margin for writes made after the last report Ferry saw (agents report every 10 s).
pub const BUMP_MARGIN_MIN: i64 = 100_000;
/// ... or this fraction of that revision, when larger (a busy cluster writes more between reports).
pub const BUMP_MARGIN_PERCENT: i64 = 10;

/// How far to bump a snapshot at `snapshot_revision` so that the restored member's revision is above
/// `highest_seen` (the highest revision the cluster reached, 0 when unknown) by the margin above. Every
/// member restoring the same snapshot with the same `highest_seen` gets the same bump, as they must.
pub fn planned_bump(highest_seen: i64, snapshot_revision: i64) -> u64 {
    let floor = highest_seen.max(snapshot_revision).max(0);
    let margin = (floor / 100 * BUMP_MARGIN_PERCENT).max(BUMP_MARGIN_MIN);
    let target = floor.saturating_add(margin);
    // Never less than the margin: a declared revision near i64::MAX saturates `target` and would leave a
    // bump of 1, landing the restore far below what watchers saw.
    u64::try_from(target - snapshot_revision.max(0)).unwrap_or(0).max(margin as u64)
}

/// The etcd revision bump of a restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevisionBump {
    /// Added to the snapshot's revision (`etcdutl snapshot restore --bump-revision`).
    pub by: u64,
}

/// Bytes of the snapshot's start kept for [`check_bbolt`]: the first page's header and meta.
const BBOLT_HEAD: usize = 128;

/// Checks that `db` (the start of the database, at least [`BBOLT_HEAD`] bytes) is a bbolt file as etcd's
/// snapshot writes it (`bbolt.Tx.WriteTo`): page 0 is a meta page (flag 0x04) with bbolt's magic, format
/// version 2, a sane page size and a valid FNV-1a checksum, and the database is exactly `pgid × page size`
/// bytes long (`db_len`, without etcd's trailing hash).
pub fn check_bbolt(head: &[u8], db_len: u64) -> Result<(), SnapshotError> {
    let bad = |m: &str| Err(SnapshotError::NotBbolt(m.to_string()));
    if head.len() < 16 + 64 {
        return bad("shorter than one meta page");
    }
    let u16_at = |o: usize| u16::from_le_bytes([head[o], head[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([head[o], head[o + 1], head[o + 2], head[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[o..o + 8]);
        u64::from_le_bytes(b)
    };
    // Page header: id u64, flags u16, count u16, overflow u32; then the meta.
    const META: usize = 16;
    if u16_at(8) & 0x04 == 0 {
        return bad("its first page is not a meta page");
    }
    if u32_at(META) != 0xED0C_DAED {
        return bad("no bbolt magic number in its first page");
    }
    if u32_at(META + 4) != 2 {
        return bad(&format!("bbolt format version {} (expected 2)", u32_at(META + 4)));
    }
    let page_size = u64::from(u32_at(META + 8));
    if !(512..=65536).contains(&page_size) || !page_size.is_power_of_two() {
        return bad(&format!("page size {page_size}"));
    }
    // meta: magic, version, page size, flags (4 × u32), root bucket (16), freelist, pgid, txid (3 × u64),
    // then the checksum of those 56 bytes.
    let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
    for b in &head[META..META + 56] {
        fnv ^= u64::from(*b);
        fnv = fnv.wrapping_mul(0x0000_0100_0000_01b3);
    }
    if fnv != u64_at(META + 56) {
        return bad("the meta page's checksum does not match");
    }
    let pgid = u64_at(META + 40);
    if pgid.checked_mul(page_size) != Some(db_len) {
        return bad(&format!("{db_len} bytes, but its meta page says {pgid} pages of {page_size} bytes"));
    }
    Ok(())
}

/// Hashes the raw (decompressed) bytes once: all but the last 32 (etcd's hash) go into `db`, and the
/// sha256 of the whole file is `db` cloned at the end plus those 32 bytes, so each byte is hashed once.
/// Keeps the first bytes for [`check_bbolt`].
struct RawCheck<W: Write> {
    out: W,
    db: Sha256,
    tail: Vec<u8>,
    head: Vec<u8>,
    bytes: u64,
    /// Decompressed bytes accepted at most (the manifest's raw size, trailing hash included), when known.
    max: Option<u64>,
    /// The etcd member ids the cluster's connected agents report (empty: not compared), and the snapshot's.
    expected_members: Vec<u64>,
    members: MembersReader,
    /// The revision the snapshot holds, read as it streams.
    revision: RevisionReader,
}

impl<W: Write> RawCheck<W> {
    fn new(out: W, max: Option<u64>) -> Self {
        Self {
            out,
            db: Sha256::new(),
            tail: Vec::with_capacity(64),
            head: Vec::new(),
            bytes: 0,
            max,
            expected_members: Vec::new(),
            members: MembersReader::new(),
            revision: RevisionReader::new(),
        }
    }

    /// Also compares the snapshot's `members` bucket with `reported`: see [`StreamCheck::expect_members`].
    fn expecting(mut self, reported: Vec<u64>) -> Self {
        self.expected_members = reported;
        self
    }

    /// A strict majority of the reported member ids missing from the snapshot's members: not this cluster's.
    /// Members the snapshot's layout hides from one streaming pass are not guessed at.
    fn check_members(&mut self) -> Result<(), SnapshotError> {
        let reported: Vec<u64> = self.expected_members.iter().copied().filter(|id| *id != 0).collect();
        // A lone member is believed, as when choosing members: there is nobody to hold it against.
        if reported.len() < 2 {
            return Ok(());
        }
        match std::mem::take(&mut self.members).finish() {
            Members::Read(found) => {
                let missing = reported.iter().filter(|id| !found.contains(id)).count();
                if missing * 2 > reported.len() {
                    let hex = |ids: &[u64]| ids.iter().map(|id| format!("{id:x}")).collect::<Vec<_>>().join(", ");
                    return Err(SnapshotError::ForeignMembers { found: hex(&found), reported: hex(&reported) });
                }
                Ok(())
            }
            Members::Unread(why) => {
                tracing::warn!("the snapshot's etcd members were not compared with the cluster's: {why}");
                Ok(())
            }
        }
    }

    /// The checks on the decompressed bytes, against `spec`.
    fn finish(mut self, spec: &EtcdBackupSpec) -> Result<W, SnapshotError> {
        if self.bytes != spec.rawsize {
            return Err(SnapshotError::RawSize { got: self.bytes, want: spec.rawsize });
        }
        let mut whole = self.db.clone();
        whole.update(&self.tail);
        let got = hex::encode(whole.finalize());
        if got != spec.rawsha256 {
            return Err(SnapshotError::RawHash { got, want: spec.rawsha256.clone() });
        }
        if self.tail.len() < 32 {
            return Err(SnapshotError::TooShort);
        }
        if self.db.clone().finalize()[..] != self.tail[..] {
            return Err(SnapshotError::EtcdHash);
        }
        check_bbolt(&self.head, self.bytes - 32)?;
        self.check_members()?;
        // The declared revision is what etcd reported just before the snapshot began: never above what it holds
        // (an etcd with no key yet is at revision 1).
        match std::mem::take(&mut self.revision).finish() {
            Ok(holds) if spec.revision > holds.max(1) => {
                return Err(SnapshotError::RevisionAbove { declared: spec.revision, holds })
            }
            Ok(_) => {}
            Err(why) => tracing::warn!("the snapshot's revision was not read: {why}"),
        }
        Ok(self.out)
    }
}

impl<W: Write> Write for RawCheck<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.max.is_some_and(|max| self.bytes + buf.len() as u64 > max) {
            // Checked before writing: a small object cannot fill the disk however far it inflates.
            return Err(std::io::Error::new(std::io::ErrorKind::FileTooLarge, "larger than its manifest says"));
        }
        self.out.write_all(buf)?;
        self.bytes += buf.len() as u64;
        if !self.expected_members.is_empty() {
            self.members.write(buf);
        }
        // The trailing hash is passed to it too: it lies past the last page, where nothing is read.
        self.revision.write(buf);
        if self.head.len() < BBOLT_HEAD {
            let n = (BBOLT_HEAD - self.head.len()).min(buf.len());
            self.head.extend_from_slice(&buf[..n]);
        }
        // Keep the last 32 bytes back from the database hash until we know more follow; hash the rest of a
        // large buffer straight from it rather than copying it through `tail`.
        if buf.len() >= 32 {
            let (body, last) = buf.split_at(buf.len() - 32);
            self.db.update(&self.tail);
            self.db.update(body);
            self.tail.clear();
            self.tail.extend_from_slice(last);
        } else {
            self.tail.extend_from_slice(buf);
            if self.tail.len() > 32 {
                let n = self.tail.len() - 32;
                self.db.update(&self.tail[..n]);
                self.tail.drain(..n);
            }
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// Counts and hashes what passes through: the zstd stream inside an encrypted backup, a derived backup's
/// stored object.
pub struct Counted<W> {
    pub inner: W,
    pub sha: Sha256,
    pub bytes: u64,
}

impl<W> Counted<W> {
    pub fn new(inner: W) -> Self {
        Self { inner, sha: Sha256::new(), bytes: 0 }
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// [`RawCheck`] on a thread of its own, fed by the decompressor: hashing the raw snapshot (several GB at
/// ~1.5 GB/s) and writing it run beside decompression instead of after it, so a restore uses both cores.
struct RawThread<W: Write + Send + 'static> {
    tx: Option<std::sync::mpsc::SyncSender<Vec<u8>>>,
    /// Buffers back from the thread, reused: a fresh 128 KiB allocation per chunk is an mmap and page faults.
    /// (In a mutex only to be `Sync`: the coordinator's checks live in futures held across awaits.)
    spare: std::sync::Mutex<std::sync::mpsc::Receiver<Vec<u8>>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<RawCheck<W>>>>,
}

/// Decompressed chunks waiting for the hashing thread (zstd writes ≤ 128 KiB at a time: bounded memory).
const RAW_QUEUE: usize = 8;

impl<W: Write + Send + 'static> RawThread<W> {
    fn spawn(mut check: RawCheck<W>) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(RAW_QUEUE);
        let (spare_tx, spare) = std::sync::mpsc::sync_channel::<Vec<u8>>(RAW_QUEUE + 2);
        let thread = std::thread::Builder::new().name("ferry-raw-check".into()).spawn(move || {
            while let Ok(buf) = rx.recv() {
                check.write_all(&buf)?;
                let _ = spare_tx.try_send(buf);
            }
            Ok(check)
        })?;
        Ok(Self { tx: Some(tx), spare: std::sync::Mutex::new(spare), thread: Some(thread) })
    }

    /// The thread's outcome: its error (the first one), or the check with every byte seen.
    fn join(&mut self) -> std::io::Result<RawCheck<W>> {
        self.tx = None;
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(std::io::Error::other("the snapshot check thread panicked")),
            None => Err(std::io::Error::other("the snapshot check thread already ended")),
        }
    }

    fn finish(mut self) -> std::io::Result<RawCheck<W>> {
        self.join()
    }
}

impl<W: Write + Send + 'static> Write for RawThread<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut chunk = self.spare.get_mut().ok().and_then(|r| r.try_recv().ok()).unwrap_or_default();
        chunk.clear();
        chunk.extend_from_slice(buf);
        let sent = self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok());
        if !sent {
            // The thread stopped on an error (too large, disk full): that error is the one to report.
            return Err(self.join().err().unwrap_or_else(|| std::io::Error::other("the snapshot check thread ended")));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<W: Write + Send + 'static> Drop for RawThread<W> {
    fn drop(&mut self) {
        // Let the thread drain and close the file before the caller removes it.
        if self.thread.is_some() {
            let _ = self.join();
        }
    }
}

type RawDecoder<W> = zstd::stream::write::Decoder<'static, RawCheck<W>>;
/// age → zstd → checks → `W`; age runs on its own thread.
type Opening<W> = OpeningWriter<Counted<RawDecoder<W>>>;

enum Sink {
    Stored(File),
    Raw(Box<zstd::stream::write::Decoder<'static, RawThread<File>>>),
    Sealed(Box<Opening<File>>),
}

/// Opens an encrypted object with `ids` into zstd and the snapshot checks, writing the snapshot to `out`;
/// decompression stops at `max_raw` bytes.
fn opening<W: Write + Send + 'static>(
    ids: Identities,
    out: W,
    max_raw: Option<u64>,
    members: Vec<u64>,
) -> Result<Opening<W>, SnapshotError> {
    let want = max_raw.unwrap_or(u64::MAX);
    let raw = RawCheck::new(out, max_raw).expecting(members);
    let decoder = zstd::stream::write::Decoder::new(raw).map_err(|e| raw_error(e, want))?;
    OpeningWriter::new(ids, Counted::new(decoder)).map_err(|e| opening_error(e, want))
}

/// The checks once an encrypted object was opened whole: the zstd stream inside against the manifest's
/// `encryption` (size, sha256), then the snapshot (raw size and sha256, etcd's hash, bbolt's meta page).
fn finish_opening<W: Write + Send + 'static>(o: Opening<W>, spec: &EtcdBackupSpec) -> Result<W, SnapshotError> {
    let mut zstd = o.finish().map_err(|e| opening_error(e, spec.rawsize))?;
    let sha = hex::encode(zstd.sha.clone().finalize());
    if let Some(enc) = &spec.encryption {
        if zstd.bytes != enc.zstdsize || sha != enc.zstdsha256 {
            return Err(SnapshotError::ZstdStream {
                got: zstd.bytes,
                sha,
                want: enc.zstdsize,
                want_sha: enc.zstdsha256.clone(),
            });
        }
    }
    zstd.inner.flush().map_err(|e| raw_error(e, spec.rawsize))?;
    zstd.inner.into_inner().finish(spec)
}

/// An error of the decrypting thread: its output failing is zstd's (or the file's) failure.
fn opening_error(e: EncryptionError, want_raw: u64) -> SnapshotError {
    match e {
        EncryptionError::Output(e) => raw_error(e, want_raw),
        e => SnapshotError::Encryption(e),
    }
}

/// Writes a backup to `target` (as stored, or decompressed) while checking it against its manifest.
pub struct VerifyingWriter {
    sink: Option<Sink>,
    /// The file being written (or what names it in errors, for a caller's file).
    tmp: PathBuf,
    /// Where the file goes once checked (fsynced, renamed); `None` for a caller's file, left as it is.
    target: Option<PathBuf>,
    sha: Sha256,
    bytes: u64,
    spec: EtcdBackupSpec,
    done: bool,
    /// The first decompression failure, reported by `finish` after the stored size and hash: a damaged
    /// object is then named by its hash, whichever byte broke the decoder first.
    failed: Option<SnapshotError>,
}

impl VerifyingWriter {
    /// `decompress`: write etcd's snapshot file rather than the object as stored; an encrypted backup then
    /// needs `identities` that open it (checked against its recipients before anything is written).
    pub fn create(
        target: &Path,
        spec: &EtcdBackupSpec,
        decompress: bool,
        identities: Option<&Identities>,
    ) -> Result<Self, SnapshotError> {
        let opener = if decompress { Self::opener(spec, identities)? } else { None };
        let name = target.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "backup".into());
        let tmp = target.with_file_name(format!(".{name}.part"));
        let io = |error| SnapshotError::Io { path: tmp.clone(), error };
        // Backup data: 0600, never through a link planted at the temp path; a stale one from a crash goes.
        let file = crate::config::create_private_replacing(&tmp).map_err(io)?;
        // Once the writer exists, `Drop` below removes the temp file on failure.
        match Self::sink(file, &tmp, spec, decompress, opener) {
            Ok(sink) => Ok(Self::new(sink, tmp, Some(target.to_path_buf()), spec)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    /// Decompresses a backup into `file`, which the caller made and keeps (a restore's scratch copy, read
    /// once by etcd's restore tool and then dropped), checking it as [`create`](Self::create) does; `finish`
    /// neither syncs nor moves it. `label` names the file in errors.
    pub fn decompress_into(
        file: File,
        label: &Path,
        spec: &EtcdBackupSpec,
        identities: Option<&Identities>,
    ) -> Result<Self, SnapshotError> {
        let sink = Self::sink(file, label, spec, true, Self::opener(spec, identities)?)?;
        Ok(Self::new(sink, label.to_path_buf(), None, spec))
    }

    /// What opens an encrypted backup for decompression (checked against its recipients before anything
    /// is written); `None` for a plain one.
    fn opener(spec: &EtcdBackupSpec, identities: Option<&Identities>) -> Result<Option<Identities>, SnapshotError> {
        let Some(enc) = &spec.encryption else { return Ok(None) };
        let ids = identities.ok_or_else(|| EncryptionError::IdentityNeeded(enc.recipients.clone()))?;
        ids.check_opens(&enc.recipients)?;
        Ok(Some(ids.clone()))
    }

    fn sink(
        file: File,
        path: &Path,
        spec: &EtcdBackupSpec,
        decompress: bool,
        opener: Option<Identities>,
    ) -> Result<Sink, SnapshotError> {
        let io = |error| SnapshotError::Io { path: path.to_path_buf(), error };
        Ok(match (decompress, opener) {
            (false, _) => Sink::Stored(file),
            (true, Some(ids)) => Sink::Sealed(Box::new(opening(ids, file, Some(spec.rawsize), Vec::new())?)),
            (true, None) => {
                let raw = RawThread::spawn(RawCheck::new(file, Some(spec.rawsize))).map_err(io)?;
                Sink::Raw(Box::new(zstd::stream::write::Decoder::new(raw).map_err(io)?))
            }
        })
    }

    fn new(sink: Sink, tmp: PathBuf, target: Option<PathBuf>, spec: &EtcdBackupSpec) -> Self {
        Self {
            sink: Some(sink),
            tmp,
            target,
            sha: Sha256::new(),
            bytes: 0,
            spec: spec.clone(),
            done: false,
            failed: None,
        }
    }

    /// Stored (compressed) bytes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn write(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        self.sha.update(data);
        self.bytes += data.len() as u64;
        if self.bytes > self.spec.size {
            return Err(SnapshotError::StoredSize { got: self.bytes, want: self.spec.size });
        }
        match self.sink.as_mut() {
            Some(Sink::Stored(f)) => {
                f.write_all(data).map_err(|error| SnapshotError::Io { path: self.tmp.clone(), error })
            }
            Some(Sink::Raw(d)) => {
                if self.failed.is_none() {
                    if let Err(e) = d.write_all(data) {
                        self.failed = Some(raw_error(e, self.spec.rawsize));
                    }
                }
                Ok(())
            }
            Some(Sink::Sealed(o)) => o.write(data).map_err(|e| opening_error(e, self.spec.rawsize)),
            None => Ok(()),
        }
    }

    /// Runs the final checks; on success the file is in place at the target, fsynced (a caller's file:
    /// complete, and returned as its label).
    pub fn finish(mut self) -> Result<PathBuf, SnapshotError> {
        if self.bytes != self.spec.size {
            return Err(SnapshotError::StoredSize { got: self.bytes, want: self.spec.size });
        }
        let got = hex::encode(self.sha.clone().finalize());
        if got != self.spec.sha256 {
            return Err(SnapshotError::StoredHash { got, want: self.spec.sha256.clone() });
        }
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        let file = match self.sink.take() {
            Some(Sink::Stored(f)) => f,
            Some(Sink::Raw(mut d)) => {
                d.flush().map_err(|e| raw_error(e, self.spec.rawsize))?;
                d.into_inner().finish().map_err(|e| raw_error(e, self.spec.rawsize))?.finish(&self.spec)?
            }
            Some(Sink::Sealed(o)) => finish_opening(*o, &self.spec)?,
            None => return Err(SnapshotError::TooShort),
        };
        let Some(target) = self.target.clone() else {
            self.done = true;
            return Ok(self.tmp.clone());
        };
        let io = |error| SnapshotError::Io { path: target.clone(), error };
        file.sync_all().map_err(io)?;
        std::fs::rename(&self.tmp, &target).map_err(io)?;
        self.done = true;
        Ok(target)
    }
}

impl Drop for VerifyingWriter {
    fn drop(&mut self) {
        // Only a temp file of our own: a caller's file is the caller's to remove.
        if !self.done && self.target.is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// A [`VerifyingWriter`] on a blocking thread, fed through a short queue: the download continues while the
/// previous chunks are decompressed, hashed and written. Its first error ends the thread and is returned by
/// the next call. Used by `ferry-agent restore` and the coordinator's restore drills.
pub struct BackgroundWriter {
    tx: Option<tokio::sync::mpsc::Sender<bytes::Bytes>>,
    /// Taken when joined: a thread's outcome is read once.
    task: Option<tokio::task::JoinHandle<Result<(), SnapshotError>>>,
    bytes: u64,
}

/// Chunks waiting for the writer thread (each at most a few hundred KiB: bounded memory).
const WRITER_QUEUE: usize = 16;

impl BackgroundWriter {
    pub fn spawn(mut w: VerifyingWriter) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(WRITER_QUEUE);
        let task = tokio::task::spawn_blocking(move || {
            while let Some(chunk) = rx.blocking_recv() {
                w.write(&chunk)?;
            }
            w.finish().map(|_| ())
        });
        Self { tx: Some(tx), task: Some(task), bytes: 0 }
    }

    /// Stored bytes handed over so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub async fn write(&mut self, chunk: bytes::Bytes) -> Result<(), SnapshotError> {
        self.bytes += chunk.len() as u64;
        let sent = match &self.tx {
            Some(tx) => tx.send(chunk).await.is_ok(),
            None => false,
        };
        if !sent {
            // The thread stopped: its error says why.
            self.tx = None;
            self.join().await?;
            return Err(SnapshotError::Writer("stopped before the end of the download"));
        }
        Ok(())
    }

    /// Ends the input; the final checks run and the file lands in place.
    pub async fn finish(mut self) -> Result<(), SnapshotError> {
        self.tx = None;
        self.join().await
    }

    async fn join(&mut self) -> Result<(), SnapshotError> {
        match self.task.take() {
            Some(task) => task.await.unwrap_or(Err(SnapshotError::Writer("panicked"))),
            None => Err(SnapshotError::Writer("already ended")),
        }
    }
}

/// A write error of the decompressing sink, named: more than the `want` bytes the manifest says, or not
/// decompressing.
fn raw_error(e: std::io::Error, want: u64) -> SnapshotError {
    if e.kind() == std::io::ErrorKind::FileTooLarge {
        SnapshotError::RawTooLarge { want }
    } else {
        SnapshotError::Decompress(e.to_string())
    }
}

/// Runs every check of [`VerifyingWriter`] over a stored object as its bytes stream past, writing nothing:
/// what the coordinator runs over each backup (the bytes it received, or the object read back from S3)
/// before it commits it, so that nothing an agent sends becomes a backup unless it is a whole etcd snapshot.
/// What the bytes must match is given at the end (the agent's summary arrives after its bytes).
///
/// An encrypted object (it starts with age's magic line, where zstd's frame starts with 0x28) is opened only
/// with identities given ([`Self::open_with`], the coordinator's `--identity` when it opens the backup's
/// recipients): then everything inside is checked too — the zstd stream's size and sha256, and the snapshot
/// as for a plain backup — with memory bounded (age's chunks on a thread behind a short queue). Without
/// them only the stored size and sha256 and the age header line are checked. Either way the manifest must
/// say it is encrypted — as it must say the opposite for a plain one, so an agent that ignores its recipients
/// cannot store a plaintext backup where an encrypted one was asked for.
pub struct StreamCheck {
    kind: CheckKind,
    sha: Sha256,
    bytes: u64,
    /// The first failure, kept until `finish` (a stream that does not decompress fails there, named).
    failed: Option<SnapshotError>,
    /// Identities to open an encrypted object with.
    opener: Option<Identities>,
    /// Decompressed bytes accepted at most, when known before the bytes (the manifest's raw size).
    max_raw: Option<u64>,
    /// The receiver's own bound on any snapshot (decompressed; stored bytes are held to it too, with room
    /// for zstd's and age's framing): passing it fails at once, and every later write too.
    limit: Option<u64>,
    over_limit: bool,
    /// The etcd member ids the cluster's connected agents report: see [`Self::expect_members`].
    expected_members: Vec<u64>,
}

enum CheckKind {
    /// No byte seen yet.
    Unknown,
    /// Decompression here, the snapshot's checks on a thread of their own.
    Zstd(Box<zstd::stream::write::Decoder<'static, RawThread<std::io::Sink>>>),
    /// The first bytes, up to the length of age's magic line; and the opening, with identities.
    Sealed { head: Vec<u8>, opening: Option<Box<Opening<std::io::Sink>>> },
}

impl StreamCheck {
    pub fn new() -> Result<Self, SnapshotError> {
        Ok(Self {
            kind: CheckKind::Unknown,
            sha: Sha256::new(),
            bytes: 0,
            failed: None,
            opener: None,
            max_raw: None,
            limit: None,
            over_limit: false,
            expected_members: Vec::new(),
        })
    }

    /// Also reads the snapshot's etcd members (its bbolt `members` bucket) as it streams by and refuses it when
    /// a strict majority of `reported` (the member ids the cluster's connected agents report, the sender's
    /// included) is not among them: another etcd cluster's snapshot, whatever its hashes. One lying agent
    /// among honest ones cannot fail an honest backup this way, nor pass a foreign one; a lone reporting member
    /// is not compared (nobody to hold it against). Before the first byte.
    pub fn expect_members(&mut self, reported: Vec<u64>) -> Result<(), SnapshotError> {
        if !matches!(self.kind, CheckKind::Unknown) {
            return Err(SnapshotError::Writer("was given member ids after the first byte"));
        }
        self.expected_members = reported;
        Ok(())
    }

    /// A check that refuses, as soon as it is passed, a snapshot decompressing to more than `limit` bytes
    /// (or stored in more than `limit` plus framing): what arrives from an agent is checked as it streams,
    /// before its summary says how large it is.
    pub fn with_limit(limit: u64) -> Result<Self, SnapshotError> {
        Ok(Self { limit: Some(limit), ..Self::new()? })
    }

    /// Stored bytes allowed for a `limit`-byte snapshot: incompressible data grows a little under zstd
    /// (block headers) and age (16 bytes per 64 KiB chunk); 1/32 and 1 MiB cover both with room.
    fn stored_limit(limit: u64) -> u64 {
        limit.saturating_add(limit / 32).saturating_add(1 << 20)
    }

    /// Decompressed bytes accepted at most: the tighter of the manifest's raw size and the limit.
    fn raw_cap(&self) -> Option<u64> {
        match (self.max_raw, self.limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// A decompression that stopped at the cap: the limit's error when the limit is what stopped it.
    fn cap_error(&mut self, e: std::io::Error) -> SnapshotError {
        match self.limit {
            Some(limit) if e.kind() == std::io::ErrorKind::FileTooLarge && self.max_raw.is_none_or(|m| limit <= m) => {
                self.over_limit = true;
                SnapshotError::OverLimit { limit }
            }
            _ => raw_error(e, self.max_raw.unwrap_or(u64::MAX)),
        }
    }

    /// Also opens an encrypted object with `ids` and checks what is inside. Only for identities that open
    /// the backup's recipients: any object they do not open then fails the check. Before the first byte.
    pub fn open_with(&mut self, ids: Identities) -> Result<(), SnapshotError> {
        if !matches!(self.kind, CheckKind::Unknown) {
            return Err(SnapshotError::Writer("was given identities after the first byte"));
        }
        self.opener = Some(ids);
        Ok(())
    }

    /// Stops decompressing past `max` bytes (the manifest's raw size, when known before the bytes).
    pub fn with_raw_limit(mut self, max: u64) -> Self {
        self.max_raw = Some(max);
        self
    }

    /// Stored (compressed) bytes so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// sha256 of the stored bytes so far, in hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha.clone().finalize())
    }

    /// Where the job left an encrypted object's stored sha256 to the store (agents do not hash the
    /// ciphertext), records the one computed here over the bytes as stored.
    pub fn record_stored_hash(&self, spec: &mut EtcdBackupSpec) {
        if spec.encryption.is_some() && spec.sha256.is_empty() {
            spec.sha256 = self.sha256_hex();
        }
    }

    /// Checks the next stored bytes. Only going past the limit fails here (at once, and every later write
    /// too); any other fault is kept for [`Self::finish`], which names it.
    pub fn write(&mut self, data: &[u8]) -> Result<(), SnapshotError> {
        if let Some(limit) = self.limit {
            if self.over_limit || self.bytes + data.len() as u64 > Self::stored_limit(limit) {
                self.over_limit = true;
                return Err(SnapshotError::OverLimit { limit });
            }
        }
        self.sha.update(data);
        self.bytes += data.len() as u64;
        let cap = self.raw_cap();
        if matches!(self.kind, CheckKind::Unknown) && !data.is_empty() {
            self.kind = if data[0] == AGE_MAGIC[0] {
                let members = self.expected_members.clone();
                let opening = match self.opener.take().map(|ids| opening(ids, std::io::sink(), cap, members)) {
                    Some(Ok(o)) => Some(Box::new(o)),
                    Some(Err(e)) => {
                        self.failed = Some(e);
                        None
                    }
                    None => None,
                };
                CheckKind::Sealed { head: Vec::with_capacity(MAX_AGE_HEADER), opening }
            } else {
                let raw =
                    RawThread::spawn(RawCheck::new(std::io::sink(), cap).expecting(self.expected_members.clone()));
                match raw.and_then(zstd::stream::write::Decoder::new) {
                    Ok(d) => CheckKind::Zstd(Box::new(d)),
                    Err(e) => {
                        self.failed = Some(raw_error(e, cap.unwrap_or(u64::MAX)));
                        return Ok(());
                    }
                }
            };
        }
        let want = cap.unwrap_or(u64::MAX);
        let mut stopped = None;
        match &mut self.kind {
            CheckKind::Zstd(decoder) if self.failed.is_none() => {
                if let Err(e) = decoder.write_all(data) {
                    stopped = Some(e);
                }
            }
            CheckKind::Sealed { head, opening } => {
                if head.len() < MAX_AGE_HEADER {
                    let n = (MAX_AGE_HEADER - head.len()).min(data.len());
                    head.extend_from_slice(&data[..n]);
                }
                if let (Some(o), None) = (opening.as_mut(), &self.failed) {
                    if let Err(e) = o.write(data) {
                        self.failed = Some(opening_error(e, want));
                        *opening = None;
                    }
                }
            }
            _ => {}
        }
        if let Some(e) = stopped {
            let e = self.cap_error(e);
            if let SnapshotError::OverLimit { limit } = e {
                // Decompressing stopped at the limit: nothing more of this stream is worth a cycle.
                self.failed = Some(SnapshotError::OverLimit { limit });
                return Err(e);
            }
            self.failed = Some(e);
        }
        Ok(())
    }

    /// The final checks against `spec`: sizes, hashes, etcd's trailing hash and the bbolt meta page (of an
    /// encrypted object: those of what is inside when it was opened, else its age header).
    pub fn finish(self, spec: &EtcdBackupSpec) -> Result<(), SnapshotError> {
        match (self.checks(spec), &spec.encryption) {
            // Identities are given only when they open the backup's recipients.
            (Err(SnapshotError::Encryption(EncryptionError::WrongIdentity { .. })), Some(enc)) => {
                Err(SnapshotError::NotSealedTo(enc.recipients.clone()))
            }
            (r, _) => r,
        }
    }

    fn checks(self, spec: &EtcdBackupSpec) -> Result<(), SnapshotError> {
        if self.bytes != spec.size {
            return Err(SnapshotError::StoredSize { got: self.bytes, want: spec.size });
        }
        let got = hex::encode(self.sha.finalize());
        if got != spec.sha256 {
            return Err(SnapshotError::StoredHash { got, want: spec.sha256.clone() });
        }
        if let Some(e) = self.failed {
            return Err(e);
        }
        match (self.kind, &spec.encryption) {
            (CheckKind::Sealed { head, opening }, Some(enc)) => {
                // Read without a key: a well-formed header with one X25519 stanza per configured recipient (a
                // member cannot add its own), and exactly the size age gives the declared zstd stream (an age
                // header in front of the plain snapshot is not that size, unless the member lies about the
                // zstd size too, which only opening the object catches).
                let header = AgeHeader::parse(&head)?;
                if header.x25519_stanzas != enc.recipients.len() {
                    return Err(SnapshotError::Sealing {
                        found: "sealed to a different number of recipients",
                        expected: "sealed to exactly the cluster's recipients",
                    });
                }
                if header.sealed_size(enc.zstdsize) != self.bytes {
                    return Err(SnapshotError::Sealing {
                        found: "not the size age gives its declared zstd stream",
                        expected: "an age file of the declared zstd stream",
                    });
                }
                match opening {
                    Some(o) => finish_opening(*o, spec).map(|_| ()),
                    None => Ok(()),
                }
            }
            (CheckKind::Sealed { .. }, None) => {
                Err(SnapshotError::Sealing { found: "an age (encrypted) file", expected: "plain zstd" })
            }
            (_, Some(_)) => Err(SnapshotError::Sealing { found: "not encrypted", expected: "an age (encrypted) file" }),
            (CheckKind::Zstd(mut decoder), None) => {
                decoder.flush().map_err(|e| raw_error(e, spec.rawsize))?;
                decoder.into_inner().finish().map_err(|e| raw_error(e, spec.rawsize))?.finish(spec).map(|_| ())
            }
            (CheckKind::Unknown, None) => Err(SnapshotError::TooShort),
        }
    }
}

/// The first bytes of every zstd frame (RFC 8878), so of every plain stored backup.
pub const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The checks the first bytes of a stored object allow, for a store that proves an upload without reading
/// it (`--verify-upload parts`): `head` (the object's first bytes: zstd's magic, or age's whole header) is
/// framed as `spec` says. Plain: a zstd frame. Encrypted: a well-formed age header with one X25519 stanza
/// per recipient, and `size` exactly what age makes of the declared zstd stream — so a plaintext upload
/// where encryption was asked for, or a member adding its own recipient, is refused as by [`StreamCheck`].
pub fn check_framing(head: &[u8], size: u64, spec: &EtcdBackupSpec) -> Result<(), SnapshotError> {
    let sealed = head.starts_with(AGE_MAGIC);
    match &spec.encryption {
        Some(enc) => {
            if !sealed {
                let found = if head.starts_with(ZSTD_MAGIC) { "plain zstd (not encrypted)" } else { "not encrypted" };
                return Err(SnapshotError::Sealing { found, expected: "an age (encrypted) file" });
            }
            let header = AgeHeader::parse(head)?;
            if header.x25519_stanzas != enc.recipients.len() {
                return Err(SnapshotError::Sealing {
                    found: "sealed to a different number of recipients",
                    expected: "sealed to exactly the cluster's recipients",
                });
            }
            if header.sealed_size(enc.zstdsize) != size {
                return Err(SnapshotError::Sealing {
                    found: "not the size age gives its declared zstd stream",
                    expected: "an age file of the declared zstd stream",
                });
            }
            Ok(())
        }
        None if sealed => Err(SnapshotError::Sealing { found: "an age (encrypted) file", expected: "plain zstd" }),
        None if !head.starts_with(ZSTD_MAGIC) => {
            Err(SnapshotError::Decompress("it does not start with a zstd frame".into()))
        }
        None => Ok(()),
    }
}

/// Membership of the member a snapshot is restored as.
#[derive(Debug, Clone)]
pub struct RestoreAs {
    pub name: String,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub initial_advertise_peer_urls: String,
}

/// The version of `etcdutl` on PATH (`etcdutl version: 3.5.16` -> `(3, 5, 16)`), `None` without one.
pub fn etcdutl_version() -> Option<(u32, u32, u32)> {
    let out = Command::new("etcdutl").arg("version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().find_map(|l| l.strip_prefix("etcdutl version:"))?.trim();
    let mut parts = version.split(['.', '-', '+']).map(str::parse::<u32>);
    Some((parts.next()?.ok()?, parts.next()?.ok()?, parts.next()?.ok()?))
}

/// Fails, saying what to install, unless etcd's tool here can bump a restored revision.
pub fn check_can_bump() -> Result<(), SnapshotError> {
    match etcdutl_version() {
        Some(v) if v >= (3, 5, 10) => Ok(()),
        Some((a, b, c)) => Err(SnapshotError::CannotBump { found: format!("etcdutl {a}.{b}.{c}") }),
        None => Err(SnapshotError::CannotBump { found: "etcdctl (no etcdutl on PATH; etcd 3.4's tools)".into() }),
    }
}

/// Above this snapshot size, restore with a larger bbolt memory map than etcd's 10 GiB default, which a
/// database near that size outgrows while the restore writes it (etcd-io/etcd#13189).
const DEFAULT_MMAP_SIZE: u64 = 10 << 30;

/// etcd's restore tool: `etcdutl` where present (etcd ≥ 3.5), else `etcdctl` (3.4).
pub fn restore_tool() -> &'static str {
    let on_path = |name: &str| {
        std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
    };
    if on_path("etcdutl") {
        "etcdutl"
    } else {
        "etcdctl"
    }
}

/// Restores `snapshot` into `data_dir` (which must not exist) with etcd's own tool; with a `bump`, the
/// restored revision is raised by it and marked compacted (needs etcdutl ≥ 3.5.10: [`check_can_bump`]).
///
/// `snapshot` must have passed [`VerifyingWriter`]'s checks, etcd's trailing hash among them: the tool is
/// told not to check that hash again, which would re-read and hash the whole database after copying it
/// (a second or more per GB; the tool still cuts the hash off the copy).
pub fn restore(
    snapshot: &Path,
    data_dir: &Path,
    member: &RestoreAs,
    bump: Option<RevisionBump>,
) -> Result<(), SnapshotError> {
    let tool = restore_tool();
    let mut cmd = Command::new(tool);
    cmd.env("ETCDCTL_API", "3")
        .args(["snapshot", "restore"])
        .arg(snapshot)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["--name", &member.name])
        .args(["--initial-cluster", &member.initial_cluster])
        .args(["--initial-cluster-token", &member.initial_cluster_token])
        .args(["--initial-advertise-peer-urls", &member.initial_advertise_peer_urls])
        .arg("--skip-hash-check");
    if let Some(bump) = bump {
        check_can_bump()?;
        // etcd requires the compaction mark with a bump: watchers from before the restore are then told
        // their revision is compacted and relist, instead of waiting for revisions that now mean other data.
        cmd.args(["--bump-revision", &bump.by.to_string(), "--mark-compacted"]);
    }
    let size = std::fs::metadata(snapshot).map(|m| m.len()).unwrap_or(0);
    if tool == "etcdutl" && size > DEFAULT_MMAP_SIZE / 2 {
        cmd.args(["--initial-memory-map-size", &(size * 2).max(DEFAULT_MMAP_SIZE).to_string()]);
    }
    let out = cmd.output().map_err(|e| SnapshotError::Tool {
        tool: tool.into(),
        detail: format!("cannot run it ({e}); install etcd's client tools"),
    })?;
    if !out.status.success() {
        let detail = tool_failure(&String::from_utf8_lossy(&out.stderr));
        return Err(SnapshotError::Tool { tool: format!("{tool} snapshot restore"), detail });
    }
    Ok(())
}

/// What etcd's `snapshot status` says of a snapshot file.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct SnapshotStatus {
    pub hash: u64,
    pub revision: i64,
    #[serde(rename = "totalKey")]
    pub total_key: u64,
    #[serde(rename = "totalSize")]
    pub total_size: u64,
}

/// Runs `snapshot status -w json` with etcd's tool.
pub fn status(snapshot: &Path) -> Result<SnapshotStatus, SnapshotError> {
    let tool = restore_tool();
    let out = Command::new(tool)
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", "-w", "json"])
        .arg(snapshot)
        .output()
        .map_err(|e| SnapshotError::Tool { tool: tool.into(), detail: e.to_string() })?;
    if !out.status.success() {
        return Err(SnapshotError::Tool {
            tool: format!("{tool} snapshot status"),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| SnapshotError::Tool { tool: format!("{tool} snapshot status"), detail: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(raw: &[u8]) -> (Vec<u8>, EtcdBackupSpec) {
        let stored = zstd::encode_all(raw, 3).unwrap();
        let spec = EtcdBackupSpec {
            cluster: "c".into(),
            createdat: Default::default(),
            snapshot: String::new(),
            size: stored.len() as u64,
            rawsize: raw.len() as u64,
            member: String::new(),
            memberid: String::new(),
            etcdclusterid: String::new(),
            etcdversion: String::new(),
            revision: 0,
            sha256: hex::encode(Sha256::digest(&stored)),
            rawsha256: hex::encode(Sha256::digest(raw)),
            zstdlevel: 3,
            startedat: Default::default(),
            finishedat: Default::default(),
            encryption: None,
            derivedfrom: None,
        };
        (stored, spec)
    }

    /// A database of `pages` 4 KiB pages whose first page is a valid bbolt meta page, the rest `fill`.
    pub(crate) fn fake_bbolt(pages: u64, fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut db: Vec<u8> = (0..pages as usize * 4096).map(fill).collect();
        db[..128].fill(0);
        db[8..10].copy_from_slice(&4u16.to_le_bytes());
        db[16..20].copy_from_slice(&0xED0C_DAEDu32.to_le_bytes());
        db[20..24].copy_from_slice(&2u32.to_le_bytes());
        db[24..28].copy_from_slice(&4096u32.to_le_bytes());
        db[56..64].copy_from_slice(&pages.to_le_bytes());
        let mut fnv: u64 = 0xcbf2_9ce4_8422_2325;
        for b in &db[16..72] {
            fnv ^= u64::from(*b);
            fnv = fnv.wrapping_mul(0x0000_0100_0000_01b3);
        }
        db[72..80].copy_from_slice(&fnv.to_le_bytes());
        db
    }

    #[test]
    fn only_a_bbolt_file_of_the_size_its_meta_page_says_passes() {
        let db = fake_bbolt(5, |i| (i % 7) as u8);
        check_bbolt(&db[..128], db.len() as u64).unwrap();
        assert!(matches!(check_bbolt(&db[..128], db.len() as u64 - 4096), Err(SnapshotError::NotBbolt(_))));
        let mut bad = db.clone();
        bad[40] ^= 1; // inside the meta: the checksum no longer matches
        assert!(matches!(check_bbolt(&bad[..128], db.len() as u64), Err(SnapshotError::NotBbolt(_))));
        assert!(matches!(check_bbolt(&[7u8; 128], db.len() as u64), Err(SnapshotError::NotBbolt(_))));
        // Arbitrary bytes with a correct trailing sha256 are not a snapshot.
        let junk = snapshot_file(&[1u8; 8192]);
        let (stored, spec) = backup(&junk);
        let mut c = StreamCheck::new().unwrap();
        c.write(&stored).unwrap();
        assert!(matches!(c.finish(&spec), Err(SnapshotError::NotBbolt(_))));
        let (stored, spec) = backup(&snapshot_file(&db));
        let mut c = StreamCheck::new().unwrap();
        for piece in stored.chunks(100) {
            c.write(piece).unwrap();
        }
        c.finish(&spec).unwrap();
    }

    /// What an agent streams is checked before its summary says how large it is: a bomb (a few KiB inflating
    /// to 256 MiB) or an endless stored stream stops at the limit, at once and for good.
    #[test]
    fn an_incoming_stream_stops_at_the_size_limit() {
        let bomb = zstd::encode_all(&vec![0u8; 256 * 1024 * 1024][..], 19).unwrap();
        let mut c = StreamCheck::with_limit(4 << 20).unwrap();
        let started = std::time::Instant::now();
        let e = bomb.chunks(1024).find_map(|p| c.write(p).err()).expect("the bomb is stopped");
        assert!(matches!(e, SnapshotError::OverLimit { limit } if limit == 4 << 20), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5), "stopped early: {:?}", started.elapsed());
        assert!(c.write(b"more").is_err(), "every later write fails too");
        // Stored bytes are bounded too (an encrypted or undecodable stream is not decompressed).
        let mut c = StreamCheck::with_limit(1 << 20).unwrap();
        let junk = vec![AGE_MAGIC[0]; 64 * 1024];
        let written = (0..64).take_while(|_| c.write(&junk).is_ok()).count();
        assert!(written > 16 && written < 40, "stopped past 1 MiB + framing room: {written} × 64 KiB");
        // A real snapshot under the limit passes.
        let db = fake_bbolt(5, |i| (i % 7) as u8);
        let (stored, spec) = backup(&snapshot_file(&db));
        let mut c = StreamCheck::with_limit(spec.rawsize).unwrap();
        c.write(&stored).unwrap();
        c.finish(&spec).unwrap();
    }

    fn snapshot_file(db: &[u8]) -> Vec<u8> {
        let mut f = db.to_vec();
        f.extend_from_slice(&Sha256::digest(db));
        f
    }

    fn write_all(
        target: &Path,
        stored: &[u8],
        spec: &EtcdBackupSpec,
        decompress: bool,
    ) -> Result<PathBuf, SnapshotError> {
        let mut w = VerifyingWriter::create(target, spec, decompress, None)?;
        for c in stored.chunks(1000) {
            w.write(c)?;
        }
        w.finish()
    }

    #[test]
    fn a_declared_revision_near_the_top_of_the_range_still_gets_the_whole_margin() {
        assert!(planned_bump(1_000, i64::MAX - 1) >= BUMP_MARGIN_MIN as u64);
        assert!(planned_bump(0, i64::MAX) >= BUMP_MARGIN_MIN as u64);
        assert!(planned_bump(i64::MAX, 5) >= BUMP_MARGIN_MIN as u64);
    }

    #[test]
    fn bump_lands_above_the_highest_revision_seen_with_a_margin() {
        // Small clusters: the 100 000 floor. The snapshot (at 500) is below what the cluster reached (9 000).
        assert_eq!(planned_bump(9_000, 500), 9_000 + 100_000 - 500);
        // Nothing seen (a coordinator that never heard of the cluster): above the snapshot itself.
        assert_eq!(planned_bump(0, 500), 100_000);
        // Busy clusters: 10 % of the highest revision.
        assert_eq!(planned_bump(50_000_000, 49_000_000), 50_000_000 + 5_000_000 - 49_000_000);
        // Reports lower than the snapshot (a stale record) never lower the target.
        assert_eq!(planned_bump(100, 2_000_000), 200_000);
        // Same inputs, same bump: every member of a restored cluster agrees.
        assert_eq!(planned_bump(123_456, 1_000), planned_bump(123_456, 1_000));
    }

    /// Whatever sizes the decompressor writes in, the hashes are those of the whole file and of all but its
    /// last 32 bytes.
    #[test]
    fn raw_check_hashes_alike_for_any_write_sizes() {
        let raw = snapshot_file(&(0..5_000u32).map(|i| (i * 7 % 251) as u8).collect::<Vec<_>>());
        let (_, spec) = backup(&raw);
        for chunk in [1, 7, 31, 32, 33, 1000, raw.len()] {
            let mut check = RawCheck::new(Vec::new(), Some(raw.len() as u64));
            for c in raw.chunks(chunk) {
                check.write_all(c).unwrap();
            }
            match check.finish(&spec) {
                Ok(out) => assert_eq!(out, raw, "chunk {chunk}"),
                // Not a bbolt file: every hash matched, only the format check is left to fail.
                Err(e) => assert!(matches!(e, SnapshotError::NotBbolt(_)), "chunk {chunk}: {e}"),
            }
        }
    }

    #[test]
    fn good_backups_land_and_bad_ones_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("ferry-snap-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let raw = snapshot_file(&fake_bbolt(13, |i| (i % 97) as u8));
        let (stored, spec) = backup(&raw);
        let t = dir.join("ok.db");
        write_all(&t, &stored, &spec, true).unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), raw);
        write_all(&dir.join("ok.zst"), &stored, &spec, false).unwrap();

        let mut flipped = stored.clone();
        flipped[stored.len() / 2] ^= 1;
        let e = write_all(&dir.join("bad.db"), &flipped, &spec, true).unwrap_err();
        assert!(matches!(e, SnapshotError::StoredHash { .. } | SnapshotError::Decompress(_)), "{e}");
        assert!(!dir.join("bad.db").exists() && !dir.join(".bad.db.part").exists(), "nothing left behind");

        let e = write_all(&dir.join("short.db"), &stored[..stored.len() - 10], &spec, true).unwrap_err();
        assert!(matches!(e, SnapshotError::StoredSize { .. } | SnapshotError::Decompress(_)), "{e}");

        // A snapshot whose trailing hash is wrong, with a manifest that matches it (what a broken etcd would send).
        let mut bad_trailer = raw.clone();
        let n = bad_trailer.len();
        bad_trailer[n - 1] ^= 1;
        let (stored, spec) = backup(&bad_trailer);
        let e = write_all(&dir.join("trailer.db"), &stored, &spec, true).unwrap_err();
        assert!(matches!(e, SnapshotError::EtcdHash), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The commit check with the coordinator's identity opens an encrypted object and checks what is inside;
    /// without it only the outside is checked.
    #[test]
    fn stream_check_with_an_identity_checks_inside_an_encrypted_object() {
        use crate::encryption::{keygen, parse_recipients, Sealer};
        let dir = tempfile::tempdir().unwrap();
        let (ours, stranger) = (keygen(), keygen());
        let path = dir.path().join("key.txt");
        crate::config::create_private(&path).unwrap().write_all(ours.file_text.as_bytes()).unwrap();
        let ids = Identities::load(&path).unwrap();
        let raw = snapshot_file(&fake_bbolt(9, |i| (i % 89) as u8));
        let (zstd, mut spec) = backup(&raw);
        let seal = |to: &str, zstd: &[u8]| {
            let mut s = Sealer::new(&parse_recipients(&[to.to_owned()]).unwrap()).unwrap();
            let mut out = s.seal(zstd).unwrap();
            out.extend(s.finish().unwrap().0);
            out
        };
        spec.encryption = Some(crate::resources::BackupEncryption {
            recipients: vec![ours.recipient.clone()],
            zstdsize: zstd.len() as u64,
            zstdsha256: hex::encode(Sha256::digest(&zstd)),
        });
        let check = |object: &[u8], spec: &EtcdBackupSpec, opener: Option<&Identities>| {
            let mut c = StreamCheck::new().unwrap().with_raw_limit(spec.rawsize);
            if let Some(ids) = opener {
                c.open_with(ids.clone()).unwrap();
            }
            for piece in object.chunks(5000) {
                c.write(piece).unwrap();
            }
            let mut spec = spec.clone();
            spec.size = object.len() as u64;
            spec.sha256.clear();
            c.record_stored_hash(&mut spec);
            c.finish(&spec)
        };
        let good = seal(&ours.recipient, &zstd);
        check(&good, &spec, Some(&ids)).unwrap();
        let e = check(&seal(&stranger.recipient, &zstd), &spec, Some(&ids)).unwrap_err();
        assert!(matches!(e, SnapshotError::NotSealedTo(_)), "{e}");
        let mut lying = spec.clone();
        lying.rawsha256 = hex::encode([7u8; 32]);
        assert!(matches!(check(&good, &lying, Some(&ids)), Err(SnapshotError::RawHash { .. })));
        // Without the identity the same lie passes: only the outside can be seen.
        check(&good, &lying, None).unwrap();
    }

    /// What the first bytes of an object tell without reading the rest (`--verify-upload parts`): its
    /// framing, and for an age file its recipients' count and the size it must have.
    #[test]
    fn framing_is_checked_from_the_first_bytes() {
        use crate::encryption::{keygen, parse_recipients, Sealer};
        let raw = snapshot_file(&fake_bbolt(9, |i| (i % 89) as u8));
        let (zstd, plain) = backup(&raw);
        let (ours, own) = (keygen().recipient, keygen().recipient);
        let seal = |to: &[&String]| {
            let to: Vec<String> = to.iter().map(|r| (*r).clone()).collect();
            let mut s = Sealer::new(&parse_recipients(&to).unwrap()).unwrap();
            let mut out = s.seal(&zstd).unwrap();
            out.extend(s.finish().unwrap().0);
            out
        };
        let mut encrypted = plain.clone();
        encrypted.encryption = Some(crate::resources::BackupEncryption {
            recipients: vec![ours.clone()],
            zstdsize: zstd.len() as u64,
            zstdsha256: hex::encode(Sha256::digest(&zstd)),
        });
        let head = |object: &[u8]| object[..object.len().min(2048)].to_vec();
        let size = |object: &[u8]| object.len() as u64;

        check_framing(&zstd[..4], size(&zstd), &plain).unwrap();
        let sealed = seal(&[&ours]);
        check_framing(&head(&sealed), size(&sealed), &encrypted).unwrap();
        // A plaintext upload where encryption was asked for, and the other way round.
        let e = check_framing(&zstd[..4], size(&zstd), &encrypted).unwrap_err();
        assert!(e.to_string().contains("plain zstd (not encrypted)"), "{e}");
        let e = check_framing(&head(&sealed), size(&sealed), &plain).unwrap_err();
        assert!(e.to_string().contains("an age (encrypted) file"), "{e}");
        // Neither zstd nor age.
        assert!(check_framing(b"\0\0\0\0", 4, &plain).is_err());
        assert!(check_framing(b"", 0, &plain).is_err());
        // A member's own recipient added; the plain zstd stream behind a real age header (another size).
        let two = seal(&[&ours, &own]);
        let e = check_framing(&head(&two), size(&two), &encrypted).unwrap_err();
        assert!(e.to_string().contains("different number of recipients"), "{e}");
        let header = AgeHeader::parse(&sealed).unwrap();
        let mut behind = sealed[..header.len].to_vec();
        behind.extend_from_slice(&zstd);
        let e = check_framing(&head(&behind), size(&behind), &encrypted).unwrap_err();
        assert!(e.to_string().contains("not the size age gives"), "{e}");
        // A header cut short (the probe ends inside it) is no header.
        assert!(check_framing(&sealed[..header.len - 10], size(&sealed), &encrypted).is_err());
    }

    /// A small object that inflates far beyond its manifest's raw size (a decompression bomb whose stored
    /// size and sha256 match the manifest) stops at that size, named, with nothing beyond it written.
    #[test]
    fn decompression_stops_at_the_manifests_raw_size() {
        let dir = std::env::temp_dir().join(format!("ferry-bomb-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bomb = zstd::encode_all(&vec![0u8; 256 * 1024 * 1024][..], 19).unwrap();
        assert!(bomb.len() < 64 * 1024, "a small object: {} bytes", bomb.len());
        let (_, mut spec) = backup(&[0u8; 4096]);
        spec.size = bomb.len() as u64;
        spec.sha256 = hex::encode(Sha256::digest(&bomb));
        let e = write_all(&dir.join("bomb.db"), &bomb, &spec, true).unwrap_err();
        assert!(matches!(e, SnapshotError::RawTooLarge { want: 4096 }), "{e}");
        assert!(e.to_string().contains("larger than its manifest says"), "{e}");
        assert!(!dir.join("bomb.db").exists() && !dir.join(".bomb.db.part").exists(), "nothing left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
