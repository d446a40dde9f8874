//! The wire protocol between ferry-agent, ferryctl and ferry-coordinator.
//!
//! Every QUIC stream carries frames: a 4-byte big-endian length, then a `postcard`-encoded message. The first
//! stream of every connection is opened by the client and starts with [`Hello`], which carries
//! [`PROTOCOL_VERSION`]; a coordinator that speaks another version answers [`HelloReply::Refused`] and closes
//! the connection, so mismatched builds fail at connect with a message, not mid-backup with a decode error.
//!
//! Streams and who opens them:
//! - agent control stream (agent → coordinator, first stream): `Hello`, then [`AgentMsg`] reports, forever.
//! - job stream (coordinator → agent): one [`JobRequest`]; the agent answers with [`JobMsg`]s; for the local
//!   store the compressed snapshot travels on this stream as [`JobMsg::Data`]; the coordinator ends it with
//!   one [`JobReply`].
//! - renewal stream (coordinator → agent): [`JobRequest::RenewCredentials`], the agent's [`RenewCsr`], the
//!   coordinator's [`RenewAnswer`], the agent's [`RenewReply`]; the coordinator then ends the stream.
//! - admin stream (ferryctl → coordinator, first stream): `Hello`, then one [`AdminRequest`] and its
//!   [`AdminResponse`]s.

use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::resources::{Resource, ResourceType, Selector, Timestamp};

/// Bumped on any incompatible change to the messages below (2: `AdminResponse::Error` carries a kind;
/// 3: `RestoreFrom` carries the highest revision seen).
/// 4: no S3 credential leaves the coordinator: S3 jobs and restores carry presigned requests for one object
///    (`JobMsg::PartUrl` / `JobReply::PartUrl`), the coordinator creates and completes the multipart upload.
/// 6: agent certificates expire and are recorded and revocable (`AgentCredentials` carries a lifetime,
///    `RevokeAgentCredentials`, `Credentials` names the serial); read-only admin credentials.
/// 7: `HelloReply::NotLeader`: a coordinator replica that does not lead sends clients to the one that does.
/// 8: `JobRequest::HashKv` → `HashKvReply`: the coordinator compares members' key spaces before a backup.
/// 9: listings larger than one frame come in pages (`ResourcesPage`… then `Resources`).
/// 10: encryption at rest: `BackupJob` carries age recipients, `BackupSummary` the sealed object's size and
///    hash, `RestoreSource::Decrypted` (the coordinator opened the backup with its own identity).
/// 11: `JobRequest::RenewCredentials` → `RenewReply`: agents are sent a renewed certificate over their link;
///    full admin certificates are recorded and revocable (`AdminCredentials`, `RevokeAdminCredentials`).
/// 12: `SealedObject` carries the age object's size only: the agent no longer hashes the ciphertext, the
///    coordinator's commit check hashes the stored object itself.
/// 13: `JobMsg::PartUrl` announces the part's size and digests ([`PartDigest`]) before its URL is signed:
///    they are bound into the signature and compared with what the store holds before the upload completes.
/// 14: renewal by signing request: `JobRequest::RenewCredentials` carries no key; the agent answers with a
///    [`RenewCsr`] (its new key stays on the node), the coordinator with a [`RenewAnswer`], the agent with a
///    [`RenewReply`].
/// 15: orchestrated restores: `JobRequest::Restore` carries one [`RestoreStep`], answered by [`StepMsg`]s.
/// 16: `EtcdFacts::hashed_compactions` and `HashKvResult::Skipped`: members are compared at the hashes etcd
///    computes while compacting, not by a `HashKV` that stalls etcd's writes; `SealedObject` carries the age
///    object's sha256 again: an S3 upload verified by its parts (`--verify-upload parts`, the default) is never
///    read back, so the coordinator cannot hash it.
/// 17: the change log: `JobRequest::Watch` makes an agent its cluster's watcher ([`WatchMsg`], [`WatchReply`]);
///    `AdminRequest::Changes` lists what changed.
/// 18: point in time: `AdminRequest::PointInTime`, `Segment`, `PointInTimeSnapshot`.
/// 19: `DrillStatus::agreement`: a drill compares the restored key space with another member's etcd hash;
///    `HashKvReply::db_size`.
/// 20: `AdminRequest::Ca`, `AdminResponse::Ca`: the CAs in force and their rotation; `AdminRequest::DeriveBackup`,
///    `AdminResponse::Derived`, `EtcdBackupSpec::derivedfrom`: a restore to a point.
pub const PROTOCOL_VERSION: u32 = 20;

/// TLS ALPN of Ferry's QUIC protocol; both sides must set it or the handshake fails (crypto error 0x78).
pub const ALPN: &[u8] = b"ferry/1";

/// Largest frame either side accepts. Resource listings are the largest messages; data is chunked far below.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Encoded bytes per page of a listing: half a frame leaves room for the largest single resource.
pub const LISTING_PAGE_BYTES: usize = MAX_FRAME / 2;

/// Splits a listing into pages of at most [`LISTING_PAGE_BYTES`] encoded (a resource larger than that alone
/// makes a page of one; the frame limit still refuses anything above [`MAX_FRAME`]). Never empty: an empty
/// listing is one empty page.
pub fn listing_pages(resources: Vec<Resource>) -> Vec<Vec<Resource>> {
    let mut pages = vec![Vec::new()];
    let mut size = 0;
    for r in resources {
        let n = postcard::experimental::serialized_size(&r).unwrap_or(LISTING_PAGE_BYTES);
        if size + n > LISTING_PAGE_BYTES && pages.last().is_some_and(|p| !p.is_empty()) {
            pages.push(Vec::new());
            size = 0;
        }
        size += n;
        if let Some(page) = pages.last_mut() {
            page.push(r);
        }
    }
    pages
}

/// The most a frame's buffer holds before its bytes arrive.
const FRAME_INITIAL_BUFFER: usize = 64 * 1024;

/// How long the coordinator may take to commit a backup after the agent's `Finished` (fsync and rename, or
/// S3 HEAD and manifest PUT with retries); past it the coordinator gives up, discards the backup and answers
/// `JobReply::Failed`.
pub const COMMIT_TIMEOUT: Duration = Duration::from_secs(300);

/// How long an agent waits for the commit reply: longer than the coordinator may take, so the agent never
/// gives up on (and reports as failed) a backup the coordinator is about to commit.
pub const COMMIT_REPLY_WAIT: Duration = Duration::from_secs(COMMIT_TIMEOUT.as_secs() + 30);

/// Size of a data chunk on the wire: big enough to amortise framing, small enough to keep memory bounded.
pub const DATA_CHUNK: usize = 256 * 1024;

/// Framing failed.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("stream i/o: {0}")]
    Io(std::io::Error),
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("undecodable message (is the peer a different Ferry version?): {0}")]
    Decode(postcard::Error),
    #[error("unencodable message: {0}")]
    Encode(postcard::Error),
    #[error("stream ended before the expected message")]
    Closed,
    #[error("stream ended inside a frame")]
    Truncated,
}

impl From<std::io::Error> for FrameError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Writes one length-prefixed postcard frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = postcard::to_stdvec(msg).map_err(FrameError::Encode)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge { len: body.len(), max: MAX_FRAME });
    }
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&(body.len() as u32).to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    Ok(())
}

/// The largest hello: a version number, a software version and an intent take a few dozen bytes.
pub const MAX_HELLO_FRAME: usize = 4 * 1024;
/// The largest message an agent certificate may send outside a job stream: a report, or a request (only
/// `Restore` is allowed). Whoever holds one node's certificate cannot make the coordinator read 16 MiB frames.
pub const MAX_AGENT_MESSAGE_FRAME: usize = 64 * 1024;

/// Reads one frame; `Ok(None)` when the stream ended cleanly at a frame boundary. An end anywhere else —
/// inside the length prefix included — is [`FrameError::Truncated`].
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(r, MAX_FRAME).await
}

/// [`read_frame`] refusing frames over `max` bytes (at most [`MAX_FRAME`]) before reading them.
pub async fn read_frame_within<R, T>(r: &mut R, max: usize) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let max = max.min(MAX_FRAME);
    let mut len = [0u8; 4];
    let mut have = 0;
    while have < len.len() {
        match r.read(&mut len[have..]).await? {
            0 if have == 0 => return Ok(None),
            0 => return Err(FrameError::Truncated),
            n => have += n,
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > max {
        // Checked before allocating: a hostile or broken peer cannot make us reserve gigabytes.
        return Err(FrameError::TooLarge { len, max });
    }
    // The buffer grows with what arrives: a peer that announces 16 MiB and sends nothing costs 64 KiB, not 16 MiB.
    let mut body = Vec::with_capacity(len.min(FRAME_INITIAL_BUFFER));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(FrameError::Truncated);
    }
    postcard::from_bytes(&body).map(Some).map_err(FrameError::Decode)
}

/// Reads one frame that must be there.
pub async fn expect_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame(r).await?.ok_or(FrameError::Closed)
}

/// [`expect_frame`] refusing frames over `max` bytes.
pub async fn expect_frame_within<R, T>(r: &mut R, max: usize) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    read_frame_within(r, max).await?.ok_or(FrameError::Closed)
}

/// First message of every connection, client to coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    /// The sender's crate version, for logs and `get agents`.
    pub software_version: String,
    pub intent: Intent,
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// An agent's long-lived link: reports, and jobs from the coordinator.
    AgentLink,
    /// One [`AdminRequest`] and its answer (ferryctl, or `ferry-agent restore`).
    Request,
}

impl Hello {
    pub fn new(intent: Intent) -> Self {
        Self { protocol_version: PROTOCOL_VERSION, software_version: env!("CARGO_PKG_VERSION").to_string(), intent }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum HelloReply {
    Ok {
        protocol_version: u32,
        software_version: String,
    },
    Refused {
        reason: String,
    },
    /// This replica does not lead: dial `leader` (its client address), or, when no leader is known yet (an
    /// election is under way), another replica or this one again shortly.
    NotLeader {
        leader: Option<String>,
    },
}

/// What an agent knows about its etcd member, reported at registration and periodically.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EtcdFacts {
    pub member_id: u64,
    pub cluster_id: u64,
    pub etcd_version: String,
    pub db_size: i64,
    pub raft_applied_index: u64,
    pub revision: i64,
    pub leader: bool,
    /// The member id this member sees as the leader (0: none). The coordinator believes a leader only when
    /// more than one member names it.
    #[serde(default)]
    pub leader_id: u64,
    /// Set when the member could not be reached; the other fields are then from the last good report.
    pub error: Option<String>,
    /// Compaction revisions whose key-space hash etcd holds (it hashed while compacting, and this agent saw the
    /// compaction happen): `HashKV` there costs etcd nothing. Oldest first, at most ten.
    #[serde(default)]
    pub hashed_compactions: Vec<i64>,
}

/// Agent → coordinator on the control stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AgentMsg {
    Report(EtcdFacts),
}

/// Where a backup's compressed bytes go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum BackupTarget {
    /// Back to the coordinator on the job stream, which writes them to its local store.
    Coordinator,
    /// Straight to S3, into a multipart upload the coordinator created; the agent asks for one presigned
    /// `UploadPart` request per part ([`JobMsg::PartUrl`]).
    S3(Box<S3Upload>),
}

/// An S3 multipart upload the agent fills. It carries no credential: the agent gets a presigned request for
/// each part as it goes, valid for that part of this upload only and for [`PRESIGNED_EXPIRY`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Upload {
    /// The object's key, for logs and messages.
    pub key: String,
    /// Bytes per part (S3: at least 5 MiB except the last).
    pub part_size: u64,
    /// Parts uploading at once; memory is bounded by `part_size × (parts_in_flight + 1)`.
    pub parts_in_flight: u32,
    /// PEM bundle of extra CAs to trust for the endpoint (the config's `cacert`; public, not a secret).
    pub cacert: String,
}

/// How long a presigned request stays valid. Long enough for one part's attempts (`s3::max_call_duration`,
/// about 11 minutes) or the start of a restore's download; short enough that a leaked one soon is worthless.
pub const PRESIGNED_EXPIRY: Duration = Duration::from_secs(15 * 60);

/// S3's highest part number.
pub const MAX_PARTS: u32 = 10_000;

/// One HTTP request the coordinator signed for exactly one S3 call on one object (method, key, and for a part
/// the upload id and part number are all under the signature). It holds no credential, but it is a bearer
/// token for that one call until it expires, so `Debug` leaves the query (the signature) out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresignedRequest {
    pub method: String,
    pub url: String,
    /// Headers that must be sent as they are (they are signed).
    pub headers: Vec<(String, String)>,
    /// When the signature stops being accepted.
    pub expires_at: Timestamp,
}

impl std::fmt::Debug for PresignedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let path = self.url.split_once('?').map_or(self.url.as_str(), |(p, _)| p);
        f.debug_struct("PresignedRequest")
            .field("method", &self.method)
            .field("url", &format_args!("{path}?***"))
            .field("expires_at", &self.expires_at.seconds)
            .finish_non_exhaustive()
    }
}

/// What an agent announces of a part before it may upload it: the URL it gets is signed for exactly these
/// bytes (`Content-MD5`, `x-amz-checksum-sha256`, `Content-Length`), and the coordinator compares them with
/// what the store holds before it completes the upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartDigest {
    pub size: u64,
    pub sha256: [u8; 32],
    pub md5: [u8; 16],
}

impl PartDigest {
    /// The digest of `part`.
    pub fn of(part: &[u8]) -> Self {
        use md5::Digest as _;
        use sha2::Digest as _;
        Self { size: part.len() as u64, sha256: sha2::Sha256::digest(part).into(), md5: md5::Md5::digest(part).into() }
    }
}

/// A part the agent uploaded: its number and the ETag S3 answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedPart {
    pub number: u32,
    pub etag: String,
}

/// A backup the coordinator asks an agent to take.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupJob {
    pub backup_id: String,
    pub zstd_level: i32,
    pub target: BackupTarget,
    /// Upload cap in bytes per second; 0 = unlimited.
    pub upload_limit_bps: u64,
    /// Age X25519 recipients (`age1…`, public keys) to encrypt the zstd stream to; empty: stored as zstd.
    /// Never an identity: an agent cannot decrypt what it stored.
    pub recipients: Vec<String>,
}

/// Coordinator → agent: first frame of a job stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobRequest {
    Backup(BackupJob),
    /// etcd's `HashKV` of the member's key space at `revision`; the agent answers with one [`HashKvReply`] and
    /// ends the stream.
    HashKv {
        revision: i64,
    },
    /// The agent's certificate nears expiry: the agent makes a new key pair, keeps the key and answers with a
    /// [`RenewCsr`]; the coordinator signs a certificate for the connection's own identity and answers one
    /// [`RenewAnswer`]; the agent saves it and answers one [`RenewReply`]. No private key is ever on the wire.
    RenewCredentials,
    /// One step of an orchestrated restore; the agent answers with [`StepMsg`]s, the last `Done` or `Failed`.
    Restore(RestoreStep),
    /// Become the cluster's change-log watcher for one epoch: the stream lives as long as the watch; the
    /// agent sends [`WatchMsg`]s, the coordinator answers [`WatchReply`]s. It ends when either side ends it.
    Watch(Box<WatchAssignment>),
}

/// What a change-log watcher is asked to do.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchAssignment {
    /// Only this epoch's segments are accepted; a new watcher gets a higher one.
    pub epoch: u64,
    pub lineage: u32,
    /// The first revision to watch (the covered revision + 1); 0: the log starts now, at the member's
    /// revision + 1 (the agent says where in [`WatchMsg::Started`]).
    pub from_revision: i64,
    /// The sha256 of the last stored segment (zeros: none), named by the first segment this watcher writes.
    pub prev_sha256: [u8; 32],
    /// Age recipients to seal segments to (empty: zstd only).
    pub recipients: Vec<String>,
    pub zstd_level: i32,
    /// A segment with at least one revision is cut at the next revision boundary this long after it opened.
    pub cut_after_ms: u64,
    /// ... or once this many compressed bytes are in it.
    pub cut_bytes: u64,
    /// Sealed bytes the agent may keep on its disk while segments cannot be stored; beyond it, a gap.
    pub spool_bytes: u64,
    /// The coordinator's clock when it sent this: the agent times revisions from it with its monotonic clock.
    pub coordinator_time: Timestamp,
    /// Where segments go.
    pub target: SegmentTarget,
}

/// Where a watcher's segments go.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum SegmentTarget {
    /// On the watch stream ([`WatchMsg::SegmentData`]), to the coordinator's local store.
    Coordinator,
    /// To S3, one presigned PUT per segment ([`WatchReply::SegmentUrl`]); `cacert`: the endpoint's extra CAs.
    S3 { cacert: String },
}

/// A sealed segment as the agent announces it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentInfo {
    pub first_revision: i64,
    pub last_revision: i64,
    /// The stored object (zstd, or age over zstd).
    pub size: u64,
    pub sha256: [u8; 32],
    pub md5: [u8; 16],
    /// The previous segment's sha256, as the trailer inside names it.
    pub prev_sha256: [u8; 32],
    /// Events and plaintext bytes in it.
    pub events: u64,
    pub plain_bytes: u64,
    /// Coordinator-clock times (Unix ms) of its first and last revision.
    pub first_time_ms: i64,
    pub last_time_ms: i64,
}

/// Agent → coordinator on a watch stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WatchMsg {
    /// The watch is open from `from_revision` on the member `member_id`.
    Started {
        from_revision: i64,
        member_id: u64,
        etcd_version: String,
    },
    /// A segment is sealed and waits to be stored: S3 answers with a [`WatchReply::SegmentUrl`]; for the
    /// coordinator its bytes follow as `SegmentData`… then `SegmentEnd`.
    Segment(SegmentInfo),
    SegmentData(Vec<u8>),
    SegmentEnd,
    /// S3: the segment starting at `first_revision` was PUT (the coordinator checks it landed).
    Uploaded {
        first_revision: i64,
    },
    /// Every revision through `revision` is in a segment the coordinator acknowledged, or there was none:
    /// sent only while no segment is open or waiting (idle time proven covered by etcd's progress notify).
    Covered {
        revision: i64,
    },
    /// Revisions lost for good (`to_revision` inclusive): etcd compacted them before they were watched, the
    /// spool was full, or the watch skipped them. The watch goes on after `to_revision`.
    Gap {
        from_revision: i64,
        to_revision: i64,
        reason: String,
    },
    /// The watch ended on the agent's side (etcd unreachable, a check failed); the stream ends after it.
    Failed {
        error: String,
    },
}

/// Coordinator → agent on a watch stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum WatchReply {
    /// Where to PUT the segment starting at `first_revision` (signed for its key, size and sha256, and
    /// refusing to overwrite an existing object).
    SegmentUrl { first_revision: i64, request: PresignedRequest },
    /// The segment is stored and indexed; `coordinator_time` re-anchors the agent's times.
    Stored { first_revision: i64, last_revision: i64, coordinator_time: Timestamp },
    /// This watcher's epoch is over or what it sent was refused (the reason says which); the stream ends.
    Stop { reason: String },
}

/// One change as `ferryctl changes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRow {
    pub revision: i64,
    /// Coordinator-clock time the revision was received, Unix ms.
    pub time_ms: i64,
    pub kind: crate::segment::EventKind,
    pub key: Vec<u8>,
    pub value_size: u64,
}

/// A point in a cluster's history, as a point-in-time request names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PointInTime {
    /// The newest revision the change log covers.
    Latest,
    /// The state at this revision (its changes included).
    Revision(i64),
    /// Everything before this revision, not its changes: the revision of a bad change, found with
    /// `ferryctl changes`.
    BeforeRevision(i64),
    /// The newest revision received at or before this time (Unix ms, the coordinator's clock).
    Time(i64),
}

/// How to rebuild a cluster's state at a point: a full backup and the change log after it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PointInTimePlan {
    pub cluster: String,
    /// The target resolved: the state after this revision.
    pub revision: i64,
    /// When that revision was received (coordinator clock, Unix ms; 0 if the log never saw it arrive, e.g. a
    /// base backup's own revision).
    pub time_ms: i64,
    /// The lineage (branch) of the log the revision is in.
    pub lineage: u32,
    /// Full backups to start from (`EtcdBackups` resources), newest first: the first whose snapshot is at or
    /// before `revision` is used (a snapshot's revision can be above the one recorded when it was taken).
    pub bases: Vec<Resource>,
    /// The segments from the oldest base's recorded revision + 1 through `revision`, in order, chained.
    pub segments: Vec<PlanSegment>,
    /// What the log covers in this lineage now: the state a restore would undo runs up to here.
    pub covered_revision: i64,
    pub covered_time_ms: i64,
}

/// One stored segment a plan reads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanSegment {
    /// Its object name under the cluster (`segment::object_name`): ask for it with `AdminRequest::Segment`.
    pub name: String,
    pub first_revision: i64,
    pub last_revision: i64,
    pub size: u64,
    /// sha256 (hex) of the stored object, and of the one before it (the chain).
    pub sha256: String,
    pub prev_sha256: String,
    pub encrypted: bool,
    pub first_time_ms: i64,
    pub last_time_ms: i64,
}

/// A step of an orchestrated restore, as the coordinator's plan orders them. Each is idempotent on the agent
/// (asked again after a coordinator failover, a step already done answers `Done` at once) and none touches
/// the data dir unless the member's gate holds etcd stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RestoreStep {
    /// Read only: the member as its gate knows it, for the plan.
    Describe,
    /// Stop etcd and keep it stopped, durably (across pod restarts and reboots).
    Hold {
        restore_id: String,
    },
    /// Rebuild the held member's data dir from the backup that follows on this stream, exactly as for a
    /// restore request (`AdminResponse::RestoreFrom`, then `Data`… `DownloadEnd` when the bytes come this way).
    Rebuild(Box<RebuildPlan>),
    /// Move the held member's data dir aside (never deleted) so that it can join as a new member.
    Wipe {
        restore_id: String,
    },
    /// Start etcd on its new data, serving clients only on the agent's loopback restore URL (unverified).
    /// `join`: the member joins a running cluster (`--initial-cluster` and `--initial-cluster-state existing`).
    Start {
        restore_id: String,
        join: Option<JoinFlags>,
    },
    /// Read the member through its restore URL: identity, revision, `HashKV` at `revision` (0: its current)
    /// and the key count at that revision.
    Check {
        restore_id: String,
        revision: i64,
    },
    /// etcd membership change, asked of a started member (the seed): add a learner, or promote one.
    AddLearner {
        restore_id: String,
        name: String,
        peer_urls: String,
    },
    Promote {
        restore_id: String,
        name: String,
        peer_urls: String,
    },
    /// Member replacement: if this member leads, hand leadership to another voting member.
    MoveLeaderAway {
        restore_id: String,
    },
    /// Member replacement, asked of another member: remove the member with these peer URLs (done when absent).
    RemoveMember {
        restore_id: String,
        peer_urls: String,
    },
    /// The cluster's members as this member sees them.
    Members {
        restore_id: String,
    },
    /// etcd's own flags again: clients are served. The restore is over for this member.
    Release {
        restore_id: String,
    },
}

/// How a member that joins a running cluster starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinFlags {
    pub initial_cluster: String,
    pub initial_cluster_token: String,
}

/// What a member is restored as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RebuildPlan {
    pub restore_id: String,
    pub name: String,
    pub initial_cluster: String,
    pub initial_cluster_token: String,
    pub initial_advertise_peer_urls: String,
    /// `etcdutl snapshot restore --bump-revision` (and `--mark-compacted`): the same for every member.
    pub bump_by: u64,
}

/// Agent → coordinator on a restore step's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StepMsg {
    /// Backup bytes fetched so far (`Rebuild`).
    Progress {
        bytes: u64,
    },
    Done(StepDone),
    /// `touched`: the data dir was changed before the failure (a rebuild failing after it moved the old
    /// data aside); otherwise it is as it was, and the member may run its old data again.
    Failed {
        error: String,
        touched: bool,
    },
}

/// A step's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepDone {
    Described(MemberLayout),
    Held,
    Rebuilt,
    Wiped,
    Started,
    Checked(RestoredMember),
    MembershipChanged,
    Released,
    Members(Vec<ClusterMember>),
}

/// One member of an etcd cluster as `MemberList` gives it (a member added but not started has no name yet).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub learner: bool,
}

/// A member as its gate and data dir show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberLayout {
    /// etcd's `--name` and `--initial-advertise-peer-urls`, from the command line the gate runs.
    pub etcd_name: String,
    pub peer_urls: String,
    pub data_dir: String,
    /// Free bytes on the data dir's file system.
    pub free_bytes: u64,
    /// The owner of the hold in force (a restore id), if etcd is held.
    pub held_by: Option<String>,
}

/// A restored member read through its restore URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoredMember {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The member's revision now.
    pub revision: i64,
    /// Whether the member sees a leader.
    pub has_leader: bool,
    /// Whether the member is a learner.
    pub learner: bool,
    /// Whether the member is its cluster's leader.
    pub leader: bool,
    /// `HashKV` at the asked revision (when asked with one).
    pub hash: Option<u32>,
    /// Keys at the asked revision (when asked with one).
    pub keys: Option<u64>,
}

/// Agent → coordinator: a PKCS#10 signing request for the agent's new key. The coordinator checks its
/// signature and takes only its public key: every name and extension in it is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RenewCsr {
    pub csr_pem: String,
}

/// Coordinator → agent: the answer to a [`RenewCsr`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenewAnswer {
    /// The certificate for the CSR's key (same cluster, member and lifetime as the one it renews). Public
    /// material only.
    Signed { cert_pem: String, ca_pem: String, serial: String, not_after: Timestamp },
    /// Not signed (an unreadable CSR, a bad signature, a certificate that may not be renewed).
    Refused { reason: String },
}

/// Agent → coordinator: the end of a renewal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RenewReply {
    /// Written to the credentials directory; the next connection uses it.
    Saved,
    /// Not written (the message says why); the coordinator revokes the unused certificate.
    Failed { error: String },
}

/// Agent → coordinator: the answer to [`JobRequest::HashKv`], with the member's identity and current
/// revision as etcd gave them at the time (a newer common revision is picked from those after a compaction).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HashKvReply {
    pub member_id: u64,
    pub cluster_id: u64,
    /// The member's revision now (0 when etcd could not be asked).
    pub current_revision: i64,
    /// etcd's database size now (0 when etcd could not be asked): fresher than the last report (10 s), for the
    /// backup's size bound after a fast growth.
    pub db_size: i64,
    pub result: HashKvResult,
}

/// What etcd said to `HashKV` at the asked revision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HashKvResult {
    /// The hash of every key version from `compact_revision` to the asked revision.
    Hash { hash: u32, compact_revision: i64 },
    /// The revision is compacted on this member: ask again at a newer one.
    Compacted,
    /// The member has not reached the revision yet.
    FutureRevision,
    /// etcd could not be asked.
    Failed { error: String },
    /// Not asked: etcd would have hashed its key space afresh, stalling its writes, on a database above the
    /// agent's scan limit.
    Skipped { why: String },
}

/// The result of a finished snapshot pipeline; the coordinator checks it against what it received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSummary {
    pub raw_size: u64,
    pub raw_sha256: [u8; 32],
    pub compressed_size: u64,
    pub compressed_sha256: [u8; 32],
    pub zstd_level: i32,
    /// The agent's clock; recorded as reported, never used for scheduling or retention.
    pub started_at: Timestamp,
    /// The agent's clock, as above.
    pub finished_at: Timestamp,
    /// S3 only: every part uploaded, in order (the coordinator completes the upload with them).
    pub parts: Vec<UploadedPart>,
    /// Encrypted jobs: the age object as stored (`compressed_*` then describe the zstd stream inside it).
    pub sealed: Option<SealedObject>,
}

/// The stored age object of an encrypted backup: what the manifest's `size` and `sha256` record. The
/// coordinator checks both against the stored object when it reads it (the local store, `--verify-upload
/// full`); an upload verified by its parts is not read, so the hash must come from the agent. What is inside
/// is authenticated by age and checked by `compressed_sha256` and `raw_sha256`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedObject {
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Agent → coordinator on a job stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobMsg {
    /// The snapshot stream is open; facts as of its start.
    Started(EtcdFacts),
    /// Stored snapshot bytes: zstd, or age over zstd (local store only).
    Data(Vec<u8>),
    /// S3 only: a presigned `UploadPart` request for part `number`, whose bytes `digest` describes, is wanted
    /// (answered by [`JobReply::PartUrl`]). Asked for just before each part is sent, so it also shows byte
    /// progress. A part asked for again (its URL expired) must be announced with the same digest.
    PartUrl { number: u32, digest: PartDigest },
    /// Raw snapshot bytes read from etcd so far.
    Progress { raw_bytes: u64 },
    /// Every byte is sent and etcd's trailing hash matched.
    Finished(BackupSummary),
    /// The job failed; nothing may be committed.
    Failed { error: String },
}

/// Coordinator → agent on a job stream: `PartUrl` answers, then one `Committed` or `Failed`, the last frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobReply {
    /// The presigned `UploadPart` request for part `number` of this job's upload.
    PartUrl {
        number: u32,
        request: PresignedRequest,
    },
    Committed,
    Failed {
        error: String,
    },
}

/// ferryctl → coordinator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    Get {
        rt: ResourceType,
        id: Option<String>,
        selector: Option<Selector>,
    },
    Apply {
        resources: Vec<Resource>,
    },
    Delete {
        rt: ResourceType,
        id: String,
    },
    /// Issue an agent certificate valid for `valid_for_seconds`; the member's older ones are revoked.
    AgentCredentials {
        cluster: String,
        member: String,
        valid_for_seconds: u64,
    },
    /// Issue a read-only admin certificate (`ferry://admin-ro`: may only `get`) valid for `valid_for_seconds`.
    ReadOnlyAdminCredentials {
        valid_for_seconds: u64,
    },
    /// Revoke agent certificates: answered by `Revoked` with the serials revoked now.
    RevokeAgentCredentials(RevokeTarget),
    /// Issue a full admin certificate (`ferry://admin`) valid for `valid_for_seconds`, recorded like an agent's.
    AdminCredentials {
        valid_for_seconds: u64,
    },
    /// Revoke the admin certificate (full or read-only) with this serial (hex): answered by `Revoked`.
    RevokeAdminCredentials {
        serial: String,
    },

    /// Stream a stored backup (`backup_id` may be `latest`): answered by `DownloadStart`, `Data`…, `DownloadEnd`.
    Download {
        cluster: String,
        backup_id: String,
    },
    /// Where to restore a backup from (`backup` may be `latest`). Agents may ask only for their own cluster
    /// (`cluster: None`); admins name the cluster. Answered by `RestoreFrom`, then for the local store
    /// `Data`…, `DownloadEnd`.
    Restore {
        cluster: Option<String>,
        backup: String,
    },
    /// What changed in a cluster's change log (admins): answered by `Changes` pages, the last with `more: false`.
    Changes {
        cluster: String,
        /// Unix ms bounds on the revision's time, inclusive; `None`: open.
        since_ms: Option<i64>,
        until_ms: Option<i64>,
        /// Only keys starting with these bytes.
        prefix: Vec<u8>,
        /// At most this many rows (the newest dropped beyond it).
        limit: u64,
    },
    /// How to rebuild a cluster's state at a point (admins): answered by `PointInTimePlan`, or an error naming
    /// the covered window or the gap that stands in the way.
    PointInTime {
        cluster: String,
        at: PointInTime,
        /// Also the segments after the point, through the covered revision (what a restore would undo).
        through_covered: bool,
    },
    /// The state at a point rebuilt by the coordinator (with its own `--identity` for an encrypted cluster),
    /// as an etcd snapshot (admins): `PointInTimePlan`, then `Data`…, `DownloadEnd`.
    PointInTimeSnapshot {
        cluster: String,
        at: PointInTime,
    },
    /// One stored segment of a cluster's change log (admins): `Data`…, `DownloadEnd`.
    Segment {
        cluster: String,
        name: String,
    },
    /// The CAs in force, or a step of their rotation (full admins): answered by `Ca`.
    Ca(CaStep),
    /// Rebuild the state at a point on the coordinator and store it as a derived backup (admins): answered by
    /// `Derived` (the new `EtcdBackups` resource), or an error naming the window or the gap.
    DeriveBackup {
        cluster: String,
        at: PointInTime,
    },
}

/// What `AdminRequest::Ca` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CaStep {
    /// Only the status.
    Status,
    /// Make a new CA, trusted beside the current one, that signs every client certificate from now on; agents
    /// renew onto it at once.
    Start,
    /// Trust only the new CA; refused while a member would be locked out, unless `force`.
    Finish { force: bool },
}

/// One CA, as shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaInfo {
    pub name: String,
    pub serial: String,
    pub notafter: crate::resources::Timestamp,
}

/// The CAs in force and how far a rotation has come.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// Signs the coordinator's server certificate (and, outside a rotation, every client certificate).
    pub current: CaInfo,
    /// During a rotation: the CA every client certificate is signed by, trusted beside `current`.
    pub next: Option<CaInfo>,
    pub rotatingsince: Option<crate::resources::Timestamp>,
    /// `cluster/member`s whose certificate is still of `current` (finishing would lock them out).
    pub membersonoldca: Vec<String>,
    /// Serials of live admin certificates of `current` (they stop working when the rotation finishes).
    pub adminsonoldca: Vec<String>,
    /// What the step did, or what to do next.
    pub message: String,
}

/// Which agent certificates to revoke.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RevokeTarget {
    /// Every certificate of this member.
    Member { cluster: String, member: String },
    /// The one certificate with this serial (hex).
    Serial(String),
}

/// The highest etcd revision a cluster's agents reported, and when the coordinator first saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevisionSeen {
    pub revision: i64,
    pub at: crate::resources::Timestamp,
}

/// Where a restore reads its backup.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RestoreSource {
    /// The bytes follow on this stream, as stored.
    Coordinator,
    /// The backup is encrypted and the coordinator opened it with its own identity: the zstd stream inside
    /// follows on this stream (checked against the manifest's `encryption.zstdsha256`). The identity itself
    /// never leaves the coordinator.
    Decrypted,
    /// Read the object from S3 with these presigned requests (`HEAD` and `GET` of that one object, for this
    /// restore only); `cacert` is the endpoint's extra CAs, if any.
    S3 { head: PresignedRequest, get: PresignedRequest, cacert: String },
}

/// What `apply` did with one resource.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ApplyOutcome {
    Created { rt: ResourceType, id: String },
    Updated { rt: ResourceType, id: String },
    Unchanged { rt: ResourceType, id: String },
}

/// Coordinator → ferryctl.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminResponse {
    /// A listing, or its last page.
    Resources(Vec<Resource>),
    /// A page of a listing too large for one frame; more pages follow, the last as `Resources`.
    ResourcesPage(Vec<Resource>),
    Applied(Vec<ApplyOutcome>),
    Deleted,
    Credentials {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
        serial: String,
        not_after: Timestamp,
    },
    /// The serials `RevokeAgentCredentials` revoked.
    Revoked(Vec<String>),
    /// The backup (an `EtcdBackups` resource) whose bytes follow.
    DownloadStart(Box<Resource>),
    Data(Vec<u8>),
    DownloadEnd,
    RestoreFrom {
        backup: Box<Resource>,
        source: RestoreSource,
        download_limit_bps: u64,
        /// The highest revision the cluster being restored was seen at, pinned for this restore so that
        /// every member computes the same revision bump; `None` when the coordinator never saw one.
        highest_revision: Option<RevisionSeen>,
    },
    /// Rows of a change listing; `more`: another page follows.
    Changes {
        rows: Vec<ChangeRow>,
        more: bool,
    },
    PointInTimePlan(Box<PointInTimePlan>),
    Ca(Box<CaStatus>),
    /// The derived backup stored, and the plan it was rebuilt by.
    Derived {
        backup: Box<Resource>,
        plan: Box<PointInTimePlan>,
    },
    /// The request failed; the message says why and what to do, the kind whose side the fault is on.
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Why a request failed: the caller's input (fix it and retry) or the server (retry later, tell the operator).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The request is wrong as given (bad field, out of bounds, not allowed for this credential).
    Invalid,
    /// What the request names does not exist.
    NotFound,
    /// The request clashes with the current state (a backup already running).
    Conflict,
    /// The server cannot do it right now (shutting down, store unreachable).
    Unavailable,
    /// The server failed (state store, I/O).
    Internal,
}

impl ErrorKind {
    /// Whether the fault is in the request, not in the server.
    pub fn is_refused_input(self) -> bool {
        matches!(self, Self::Invalid | Self::NotFound | Self::Conflict)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hellos and agents' own messages have small limits, checked from the length prefix alone.
    #[tokio::test]
    async fn a_frame_over_its_own_limit_is_refused_before_it_is_read() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &Hello::new(Intent::Request)).await.unwrap();
        let hello: Hello = expect_frame_within(&mut &buf[..], MAX_HELLO_FRAME).await.unwrap();
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        // A 1 MiB "hello": only its length prefix is there, and it is refused on that.
        let big = (1u32 << 20).to_be_bytes();
        let r: Result<Hello, _> = expect_frame_within(&mut &big[..], MAX_HELLO_FRAME).await;
        assert!(
            matches!(r, Err(FrameError::TooLarge { len, max }) if len == 1 << 20 && max == MAX_HELLO_FRAME),
            "{r:?}"
        );
        let r: Result<Option<AgentMsg>, _> = read_frame_within(&mut &big[..], MAX_AGENT_MESSAGE_FRAME).await;
        assert!(matches!(r, Err(FrameError::TooLarge { .. })), "{r:?}");
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversize_is_refused() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &JobMsg::Data(vec![7; 10])).await.unwrap();
        write_frame(&mut buf, &JobMsg::Progress { raw_bytes: 5 }).await.unwrap();
        let mut r = &buf[..];
        assert!(matches!(read_frame(&mut r).await.unwrap(), Some(JobMsg::Data(d)) if d == vec![7; 10]));
        assert!(matches!(read_frame(&mut r).await.unwrap(), Some(JobMsg::Progress { raw_bytes: 5 })));
        assert!(read_frame::<_, JobMsg>(&mut r).await.unwrap().is_none());

        let huge = ((MAX_FRAME + 1) as u32).to_be_bytes();
        let mut r = &huge[..];
        assert!(matches!(read_frame::<_, JobMsg>(&mut r).await, Err(FrameError::TooLarge { .. })));
    }

    #[tokio::test]
    async fn an_end_inside_a_frame_is_an_error_not_a_clean_end() {
        let mut buf = Vec::new();
        write_frame(&mut buf, &JobMsg::Progress { raw_bytes: 5 }).await.unwrap();
        for cut in 1..buf.len() {
            let mut r = &buf[..cut];
            let got = read_frame::<_, JobMsg>(&mut r).await;
            assert!(matches!(got, Err(FrameError::Truncated)), "cut after {cut} bytes: {got:?}");
        }
        let mut r = &buf[..0];
        assert!(read_frame::<_, JobMsg>(&mut r).await.unwrap().is_none(), "nothing at all is a clean end");
    }

    #[test]
    fn the_agent_waits_longer_for_the_commit_than_the_coordinator_may_take() {
        assert!(COMMIT_REPLY_WAIT > COMMIT_TIMEOUT);
    }

    #[tokio::test]
    async fn resources_survive_postcard() {
        use crate::resources::{EtcdBackupStatusSpec, Spec};
        let r = Resource::new("c", Spec::EtcdBackupStatus(EtcdBackupStatusSpec { status: 1, ..Default::default() }));
        let mut buf = Vec::new();
        write_frame(&mut buf, &AdminResponse::Resources(vec![r.clone()])).await.unwrap();
        let back: AdminResponse = expect_frame(&mut &buf[..]).await.unwrap();
        assert!(matches!(back, AdminResponse::Resources(v) if v == vec![r]));
    }
}
