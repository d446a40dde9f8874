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
//! - admin stream (ferryctl → coordinator, first stream): `Hello`, then one [`AdminRequest`] and its
//!   [`AdminResponse`]s.

use std::time::Duration;

use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::resources::{EtcdBackupS3ConfigSpec, Resource, ResourceType, Selector, Timestamp};

/// Bumped on any incompatible change to the messages below (2: `AdminResponse::Error` carries a kind;
/// 3: `RestoreFrom` carries the highest revision seen).
pub const PROTOCOL_VERSION: u32 = 3;

/// TLS ALPN of Ferry's QUIC protocol; both sides must set it or the handshake fails (crypto error 0x78).
pub const ALPN: &[u8] = b"ferry/1";

/// Largest frame either side accepts. Resource listings are the largest messages; data is chunked far below.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;

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

/// Reads one frame; `Ok(None)` when the stream ended cleanly at a frame boundary. An end anywhere else —
/// inside the length prefix included — is [`FrameError::Truncated`].
pub async fn read_frame<R, T>(r: &mut R) -> Result<Option<T>, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
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
    if len > MAX_FRAME {
        // Checked before allocating: a hostile or broken peer cannot make us reserve gigabytes.
        return Err(FrameError::TooLarge { len, max: MAX_FRAME });
    }
    let mut body = vec![0u8; len];
    match r.read_exact(&mut body).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Truncated),
        Err(e) => return Err(e.into()),
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
    Ok { protocol_version: u32, software_version: String },
    Refused { reason: String },
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
    /// Set when the member could not be reached; the other fields are then from the last good report.
    pub error: Option<String>,
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
    /// Straight to S3 by multipart upload.
    S3(Box<S3Target>),
}

/// An S3 object to upload. Carries the store's credentials for this one job; the agent keeps them in memory
/// only (the spec's `Debug` redacts them).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Target {
    pub config: EtcdBackupS3ConfigSpec,
    pub key: String,
    /// Bytes per part (S3: at least 5 MiB except the last).
    pub part_size: u64,
    /// Parts uploading at once; memory is bounded by `part_size × (parts_in_flight + 1)`.
    pub parts_in_flight: u32,
}

/// A backup the coordinator asks an agent to take.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackupJob {
    pub backup_id: String,
    pub zstd_level: i32,
    pub target: BackupTarget,
    /// Upload cap in bytes per second; 0 = unlimited.
    pub upload_limit_bps: u64,
}

/// Coordinator → agent: first frame of a job stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobRequest {
    Backup(BackupJob),
}

/// The result of a finished snapshot pipeline; the coordinator checks it against what it received.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackupSummary {
    pub raw_size: u64,
    pub raw_sha256: [u8; 32],
    pub compressed_size: u64,
    pub compressed_sha256: [u8; 32],
    pub zstd_level: i32,
    pub started_at: Timestamp,
    pub finished_at: Timestamp,
}

/// Agent → coordinator on a job stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobMsg {
    /// The snapshot stream is open; facts as of its start.
    Started(EtcdFacts),
    /// Compressed snapshot bytes (local store only).
    Data(Vec<u8>),
    /// A multipart upload was created (S3 only): the coordinator remembers it so it can abort it even if
    /// this agent dies.
    UploadStarted { upload_id: String },
    /// Raw snapshot bytes read from etcd so far.
    Progress { raw_bytes: u64 },
    /// Every byte is sent and etcd's trailing hash matched.
    Finished(BackupSummary),
    /// The job failed; nothing may be committed.
    Failed { error: String },
}

/// Coordinator → agent: the last frame of a job stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum JobReply {
    Committed,
    Failed { error: String },
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
    AgentCredentials {
        cluster: String,
        member: String,
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
    /// The bytes follow on this stream.
    Coordinator,
    /// Read the object from S3 with these settings (for this restore only).
    S3(Box<S3Target>),
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
    Resources(Vec<Resource>),
    Applied(Vec<ApplyOutcome>),
    Deleted,
    Credentials {
        ca_pem: String,
        cert_pem: String,
        key_pem: String,
    },
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
