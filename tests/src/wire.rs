//! Ferry's agent wire protocol spoken from the test crate: the hostile agent of the e2e suite and the
//! simulated agents of the scale bench both dial the coordinator with a real certificate through these.

use std::time::Duration;

use anyhow::Context as _;
use ferry_common::protocol::{
    expect_frame, write_frame, AdminRequest, AdminResponse, BackupSummary, EtcdFacts, HashKvReply, Hello, HelloReply,
    Intent, JobMsg, JobReply, DATA_CHUNK,
};
use ferry_common::resources::Timestamp;
use ferry_common::tls::resolve;
use sha2::{Digest as _, Sha256};

/// How long an admin answer may take before the caller gives up.
const ADMIN_ANSWER_WAIT: Duration = Duration::from_secs(120);

/// Dials `coordinator` from `endpoint` with `config` (which holds the certificate), opens the first stream
/// and says hello with `intent`; the connection and that stream, once the coordinator said yes.
pub async fn open_link(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    coordinator: &str,
    intent: Intent,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let (addr, name) = resolve(coordinator).await?;
    let conn = endpoint.connect_with(config, addr, &name)?.await.context("handshake")?;
    let (mut send, mut recv) = conn.open_bi().await.context("open the first stream")?;
    write_frame(&mut send, &Hello::new(intent)).await?;
    match expect_frame(&mut recv).await? {
        HelloReply::Ok { .. } => Ok((conn, send, recv)),
        HelloReply::Refused { reason } => anyhow::bail!("the coordinator refused the connection: {reason}"),
        HelloReply::NotLeader { leader } => anyhow::bail!("the coordinator does not lead (leader: {leader:?})"),
    }
}

/// One admin request on its own connection from `endpoint`, without waiting for the endpoint to go idle
/// (which `ferry_common::client::Session` does, once per call): its one answer.
pub async fn admin_call(
    endpoint: &quinn::Endpoint,
    config: quinn::ClientConfig,
    coordinator: &str,
    request: &AdminRequest,
) -> anyhow::Result<AdminResponse> {
    let (conn, mut send, mut recv) = open_link(endpoint, config, coordinator, Intent::Request).await?;
    write_frame(&mut send, request).await?;
    let _ = send.finish();
    let answer = tokio::time::timeout(ADMIN_ANSWER_WAIT, expect_frame(&mut recv)).await.context("admin answer")?;
    conn.close(0u32.into(), b"done");
    Ok(answer?)
}

/// Answers a `HashKv` job stream with `reply` and ends it.
pub async fn answer_hash_kv(send: &mut quinn::SendStream, reply: &HashKvReply) -> anyhow::Result<()> {
    write_frame(send, reply).await?;
    let _ = send.finish();
    Ok(())
}

/// A real etcd snapshot of the member at `url` (database plus etcd's trailing hash), read as an agent would.
pub async fn etcd_snapshot(url: &str) -> anyhow::Result<Vec<u8>> {
    let mut client = etcd_client::Client::connect([url], None).await?;
    let mut stream = client.snapshot().await?;
    let mut out = Vec::new();
    while let Some(msg) = stream.message().await? {
        out.extend_from_slice(msg.blob());
    }
    Ok(out)
}

/// A snapshot compressed once and sent for every backup job, as an agent's pipeline would have produced it.
#[derive(Debug, Clone)]
pub struct PreparedSnapshot {
    raw_size: u64,
    raw_sha256: [u8; 32],
    compressed: Vec<u8>,
    compressed_sha256: [u8; 32],
    zstd_level: i32,
}

impl PreparedSnapshot {
    /// Compresses `raw` (a real etcd snapshot) at `zstd_level`.
    pub fn new(raw: &[u8], zstd_level: i32) -> anyhow::Result<Self> {
        let compressed = zstd::encode_all(raw, zstd_level).context("compress the snapshot")?;
        Ok(Self {
            raw_size: raw.len() as u64,
            raw_sha256: Sha256::digest(raw).into(),
            compressed_sha256: Sha256::digest(&compressed).into(),
            compressed,
            zstd_level,
        })
    }

    /// Runs a backup job to the coordinator's local store on a job stream: `Started`, the bytes, `Finished`,
    /// then the coordinator's verdict (`Ok(true)` = committed).
    pub async fn send(
        &self,
        facts: EtcdFacts,
        send: &mut quinn::SendStream,
        recv: &mut quinn::RecvStream,
    ) -> anyhow::Result<bool> {
        let started_at = Timestamp::now();
        write_frame(send, &JobMsg::Started(facts)).await?;
        for chunk in self.compressed.chunks(DATA_CHUNK) {
            write_frame(send, &JobMsg::Data(chunk.to_vec())).await?;
        }
        let summary = BackupSummary {
            raw_size: self.raw_size,
            raw_sha256: self.raw_sha256,
            compressed_size: self.compressed.len() as u64,
            compressed_sha256: self.compressed_sha256,
            zstd_level: self.zstd_level,
            started_at,
            finished_at: Timestamp::now(),
            parts: Vec::new(),
            sealed: None,
        };
        write_frame(send, &JobMsg::Finished(summary)).await?;
        let reply: JobReply = expect_frame(recv).await?;
        let _ = send.finish();
        Ok(matches!(reply, JobReply::Committed))
    }
}
