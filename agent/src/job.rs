//! One backup job on the agent: etcd's snapshot stream → sha256 check → zstd → the store.
//!
//! Three stages joined by small bounded channels, so memory stays at a few MiB whatever the DB size and a
//! slow store slows the etcd reader instead of piling bytes up:
//! etcd reader (async) → compressor (blocking thread) → sender (async: QUIC stream to the coordinator for the
//! local store, or an S3 multipart upload). The trailing hash message is forwarded to the compressor only after
//! it matched; the S3 upload is completed and `Finished` sent only after both the reader and the compressor
//! succeeded: nothing unverified can be committed. Any failure aborts the multipart upload.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_common::encryption::{parse_recipients, Recipient, Sealer};
use ferry_common::protocol::{
    expect_frame, write_frame, BackupJob, BackupSummary, BackupTarget, JobMsg, JobReply, SealedObject,
    COMMIT_REPLY_WAIT, DATA_CHUNK,
};
use ferry_common::resources::Timestamp;
use quinn::{RecvStream, SendStream};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::backoff::{Pacer, PacingReport, PacingSettings};
use crate::etcd::EtcdMember;
use crate::metrics::METRICS;
use crate::pipeline::{Compressed, Compressor, SnapshotVerifier, Verified};
use crate::throttle::Throttle;
use crate::upload::{JobLink, MultipartUpload};

/// A transfer that makes no progress for this long is aborted: etcd holds a read transaction open for the
/// whole stream, which grows its database, so hanging is worse than failing.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(60);
/// Messages in flight between stages (etcd sends 32 KiB messages; compressed chunks are up to DATA_CHUNK).
const CHANNEL_DEPTH: usize = 8;
/// etcd's messages are joined to this size for the compressor while the read is limited.
const CAPPED_BATCH: usize = 128 << 10;
/// Progress is reported at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// How the node runs the compression: the node's own business (its spare cores, what else it runs), so
/// agent flags rather than the coordinator's job.
#[derive(Debug, Clone, Copy)]
pub struct PipelineSettings {
    /// zstd worker threads; 0 compresses on the pipeline's own thread.
    pub zstd_workers: u32,
    /// Nice value of the compression thread (and zstd's workers, which inherit it): 0 leaves it as is.
    pub nice: i32,
    /// How fast etcd's snapshot is read.
    pub pacing: PacingSettings,
}

/// Runs a backup job on a job stream the coordinator opened; reports failure on the stream itself.
pub async fn run(
    etcd: EtcdMember,
    job: BackupJob,
    pipeline: PipelineSettings,
    mut send: SendStream,
    mut recv: RecvStream,
    cancel: CancellationToken,
) -> Result<()> {
    // Cancellation is watched inside the pipeline, so a cancelled S3 job still aborts its upload.
    let result = stream_backup(&etcd, &job, pipeline, &mut send, &mut recv, &cancel).await;
    if let Err(e) = &result {
        // Best effort: the coordinator discards the partial object either way when the stream breaks.
        let _ = write_frame(&mut send, &JobMsg::Failed { error: format!("{e:#}") }).await;
        let _ = send.finish();
    }
    result
}

async fn stream_backup(
    etcd: &EtcdMember,
    job: &BackupJob,
    pipeline: PipelineSettings,
    send: &mut SendStream,
    recv: &mut RecvStream,
    cancel: &CancellationToken,
) -> Result<()> {
    let started_at = Timestamp::now();
    let facts = etcd.facts().await?;
    write_frame(send, &JobMsg::Started(facts)).await.context("send job start")?;
    let mut sink = match &job.target {
        BackupTarget::Coordinator => Sink::Coordinator,
        BackupTarget::S3(target) => Sink::S3(Box::new(MultipartUpload::new(target, cancel.child_token())?)),
    };
    let result = pump(etcd, job, pipeline, &mut sink, send, recv, started_at, cancel).await;
    if let Sink::S3(upload) = &mut sink {
        if result.is_err() {
            // Parts in flight stop; the coordinator aborts the upload when it hears of the failure.
            upload.abort().await;
        }
    }
    let summary = result?;
    write_frame(send, &JobMsg::Finished(summary)).await.context("send job summary")?;
    // Longer than the coordinator may take to commit (protocol::COMMIT_TIMEOUT, S3 retries included), so a
    // slow commit is not reported as failed here while the coordinator still completes it.
    let reply: JobReply = tokio::time::timeout(COMMIT_REPLY_WAIT, expect_frame(recv))
        .await
        .map_err(|_| anyhow!("the coordinator did not confirm the commit within {}s", COMMIT_REPLY_WAIT.as_secs()))?
        .context("read commit reply")?;
    let _ = send.finish();
    match reply {
        JobReply::Committed => Ok(()),
        JobReply::Failed { error } => bail!("the coordinator refused the backup: {error}"),
        JobReply::PartUrl { number, .. } => bail!("the coordinator sent part {number}'s URL instead of its verdict"),
    }
}

/// Where compressed bytes go.
enum Sink {
    /// `JobMsg::Data` frames on the job stream.
    Coordinator,
    S3(Box<MultipartUpload>),
}

/// Runs the pipeline to the end; for S3 the upload is completed only after etcd's hash matched.
#[allow(clippy::too_many_arguments)]
async fn pump(
    etcd: &EtcdMember,
    job: &BackupJob,
    pipeline: PipelineSettings,
    sink: &mut Sink,
    send: &mut SendStream,
    recv: &mut RecvStream,
    started_at: Timestamp,
    cancel: &CancellationToken,
) -> Result<BackupSummary> {
    // Checked before etcd is asked for anything: a bad recipient fails the job at once.
    let recipients = parse_recipients(&job.recipients).context("the job's encryption recipients")?;
    // Before the snapshot opens: etcd's latency without it is the baseline.
    let pacer = Pacer::prepare(etcd, pipeline.pacing, cancel.child_token()).await;
    let snapshot = etcd.snapshot().await?;
    let (raw_tx, raw_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_DEPTH);
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(CHANNEL_DEPTH);
    let (progress_tx, progress_rx) = tokio::sync::watch::channel(0u64);
    let mut reader = AbortOnDrop(tokio::spawn(read_etcd(snapshot, raw_tx, progress_tx, pacer).in_current_span()));
    let level = job.zstd_level;
    let compressor = tokio::task::spawn_blocking(move || compress(raw_rx, out_tx, level, &recipients, pipeline));

    let mut throttle = Throttle::new(job.upload_limit_bps);
    let started = std::time::Instant::now();
    // Idle again once this job ends, whichever way.
    let _idle = IdleOnDrop;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    // One deadline, moved only by data: a timeout created anew in each turn of the loop would be reset by the
    // progress tick below every second and could never fire.
    let mut stall = StallClock::new(STALL_TIMEOUT);
    loop {
        tokio::select! {
            chunk = out_rx.recv() => {
                let Some(chunk) = chunk else { break };
                stall.progressed();
                throttle.consume(chunk.len()).await;
                METRICS.stored_bytes.inc_by(chunk.len() as u64);
                match sink {
                    Sink::Coordinator => tokio::time::timeout(STALL_TIMEOUT, write_frame(send, &JobMsg::Data(chunk)))
                        .await
                        .map_err(|_| anyhow!("the coordinator accepted no data for {}s", STALL_TIMEOUT.as_secs()))?
                        .context("send snapshot data")?,
                    Sink::S3(upload) => upload.write(&chunk, &mut JobLink { send: &mut *send, recv: &mut *recv }).await?,
                }
                stall.progressed();
            }
            () = stall.expired() => {
                bail!("no snapshot data for {}s; aborting so etcd is not held", STALL_TIMEOUT.as_secs())
            }
            _ = cancel.cancelled() => bail!("the agent is shutting down; the backup is abandoned (its upload aborted)"),
            _ = progress.tick() => {
                let raw_bytes = *progress_rx.borrow();
                let secs = started.elapsed().as_secs_f64().max(0.001);
                METRICS.job_throughput.set(raw_bytes as f64 / secs);
                write_frame(send, &JobMsg::Progress { raw_bytes }).await.context("send progress")?;
            }
        }
    }
    let verified = (&mut reader.0).await.context("etcd reader task")??;
    let (compressed, sealed) = compressor.await.context("compressor task")??;
    let parts = match sink {
        // etcd's hash matched: the last part goes, and the coordinator completes the upload after its checks.
        Sink::S3(upload) => upload.finish(&mut JobLink { send, recv }).await?,
        Sink::Coordinator => Vec::new(),
    };
    Ok(BackupSummary {
        raw_size: verified.file_bytes,
        raw_sha256: verified.file_sha256,
        compressed_size: compressed.bytes,
        compressed_sha256: compressed.sha256,
        zstd_level: level,
        started_at,
        finished_at: Timestamp::now(),
        parts,
        sealed,
    })
}

/// The stall deadline of a transfer: it moves only when data moves, whatever else wakes the loop.
struct StallClock {
    limit: Duration,
    deadline: tokio::time::Instant,
}

impl StallClock {
    fn new(limit: Duration) -> Self {
        Self { limit, deadline: tokio::time::Instant::now() + limit }
    }

    /// Data moved: the deadline starts again.
    fn progressed(&mut self) {
        self.deadline = tokio::time::Instant::now() + self.limit;
    }

    /// Completes once no data moved for the limit.
    async fn expired(&self) {
        tokio::time::sleep_until(self.deadline).await
    }
}

/// Resets the throughput gauge when a job ends.
struct IdleOnDrop;

impl Drop for IdleOnDrop {
    fn drop(&mut self) {
        METRICS.job_throughput.set(0.0);
        METRICS.read_rate.set(0.0);
        METRICS.read_limit.set(0.0);
    }
}

/// Stops the etcd reader (and so etcd's snapshot stream) when the job ends early.
pub(crate) struct AbortOnDrop<T>(pub(crate) tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn read_etcd(
    mut snapshot: etcd_client::SnapshotStreaming,
    raw_tx: mpsc::Sender<Vec<u8>>,
    progress: tokio::sync::watch::Sender<u64>,
    pacer: Pacer,
) -> Result<Verified> {
    let mut verifier = SnapshotVerifier::default();
    let mut next = next_message(&mut snapshot).await?;
    // Started at the first message, which tells the snapshot's size (the floor rises for a large one).
    let pace = pacer.start(next.as_ref().map_or(0, |m| m.blob().len() as u64 + m.remaining_bytes()));
    let mut throttle = Throttle::new(0);
    let mut batch = Vec::new();
    while let Some(msg) = next {
        let n = msg.blob().len();
        METRICS.etcd_read_bytes.inc_by(n as u64);
        pace.read(n);
        throttle.set_rate(pace.limit());
        throttle.consume(n).await;
        if let Some(data) = verifier.push(msg.blob().to_vec()) {
            if throttle.rate() == 0 && batch.is_empty() {
                forward(&raw_tx, data).await?;
            } else {
                // While the read is limited the compressor waits on every message: one wake-up per 128 KiB,
                // not per 32 KiB (a quarter of a second of CPU per GB). Without a limit, what is batched goes.
                batch.extend_from_slice(&data);
                if batch.len() >= CAPPED_BATCH || throttle.rate() == 0 {
                    forward(&raw_tx, std::mem::replace(&mut batch, Vec::with_capacity(CAPPED_BATCH))).await?;
                }
            }
            progress.send_replace(verifier.db_bytes());
        }
        next = next_message(&mut snapshot).await?;
    }
    if !batch.is_empty() {
        forward(&raw_tx, batch).await?;
    }
    let verified = verifier.finish()?;
    log_pacing(&pace.finish().await);
    forward(&raw_tx, verified.trailer.clone()).await?;
    progress.send_replace(verified.file_bytes);
    Ok(verified)
}

/// etcd's next snapshot message; `None` at the end of the stream.
async fn next_message(snapshot: &mut etcd_client::SnapshotStreaming) -> Result<Option<etcd_client::SnapshotResponse>> {
    tokio::time::timeout(STALL_TIMEOUT, snapshot.message())
        .await
        .map_err(|_| anyhow!("etcd sent no snapshot data for {}s", STALL_TIMEOUT.as_secs()))?
        .context("read etcd snapshot stream")
}

/// One line per backup: how fast etcd's snapshot was read and how long etcd's latency held it back.
fn log_pacing(r: &PacingReport) {
    let mib_per_s = |bps: u64| format!("{:.1}", bps as f64 / f64::from(1 << 20));
    let secs = r.elapsed.as_secs_f64().max(0.001);
    let avg = mib_per_s((r.read as f64 / secs) as u64);
    let secs = format!("{secs:.2}");
    let Some(s) = r.summary else {
        tracing::info!(avg_mib_per_s = %avg, %secs, "read etcd's snapshot (its pacing failed)");
        return;
    };
    tracing::info!(
        avg_mib_per_s = %avg,
        %secs,
        min_limit_mib_per_s = %s.min_limit.map_or_else(|| "none".to_string(), mib_per_s),
        slowed_secs = %format!("{:.2}", s.slowed.as_secs_f64()),
        cuts = s.cuts,
        adaptive = r.adapted,
        "read etcd's snapshot"
    );
}

async fn forward(tx: &mpsc::Sender<Vec<u8>>, data: Vec<u8>) -> Result<()> {
    tx.send(data).await.map_err(|_| anyhow!("compressor stopped"))
}

/// zstd, then (with recipients) age over the zstd stream: ciphertext does not compress, and the stored
/// object stays `age -d | zstd -d`-able. Returns the zstd totals and, when encrypted, the stored object's
/// size and sha256 (an S3 upload verified by its parts is never read back, so only the agent can hash it).
fn compress(
    mut rx: mpsc::Receiver<Vec<u8>>,
    tx: mpsc::Sender<Vec<u8>>,
    level: i32,
    recipients: &[Recipient],
    pipeline: PipelineSettings,
) -> Result<(Compressed, Option<SealedObject>)> {
    // The blocking pool reuses threads: this one's priority is set for each job, and put back after.
    let _priority = pipeline_priority(pipeline.nice);
    let mut c = Compressor::new(level, DATA_CHUNK, pipeline.zstd_workers).context("start zstd")?;
    let mut sealer = match recipients {
        [] => None,
        r => Some(Sealer::new(r).context("start age encryption")?),
    };
    // Encrypted, everything sent is the stored age object (its last piece comes from the sealer's finish).
    let encrypting = sealer.is_some();
    let mut sealed_sha = Sha256::new();
    let mut send = |out: Vec<u8>, sealer: &mut Option<Sealer>| -> Result<()> {
        let out = match sealer {
            Some(s) => s.seal(&out).context("age encrypt")?,
            None => out,
        };
        if encrypting {
            sealed_sha.update(&out);
        }
        if !out.is_empty() {
            tx.blocking_send(out).map_err(|_| anyhow!("sender stopped"))?;
        }
        Ok(())
    };
    while let Some(raw) = rx.blocking_recv() {
        if let Some(out) = c.write(&raw).context("zstd compress")? {
            send(out, &mut sealer)?;
        }
    }
    let (last, totals) = c.finish().context("zstd finish")?;
    send(last, &mut sealer)?;
    let sealed = match sealer {
        Some(s) => {
            let (last, sealed) = s.finish().context("age finish")?;
            send(last, &mut None)?;
            Some(sealed.bytes)
        }
        None => None,
    };
    let sealed = sealed.map(|size| SealedObject { size, sha256: sealed_sha.finalize().into() });
    Ok((totals, sealed))
}

/// Lowers the calling thread's CPU priority to `nice` (Linux keeps nice per thread; zstd's workers,
/// started from this thread, inherit it) and restores it on drop. etcd, sharing the node's cores, then
/// wins every contended time slice while the compression takes what is left.
fn pipeline_priority(nice: i32) -> Option<RestorePriority> {
    if nice == 0 {
        return None;
    }
    let tid = rustix::thread::gettid();
    let before = rustix::process::getpriority_process(Some(tid)).ok()?;
    match rustix::process::setpriority_process(Some(tid), nice) {
        Ok(()) => Some(RestorePriority { tid, before }),
        Err(e) => {
            tracing::warn!("cannot lower the compression thread's priority to nice {nice}: {e}");
            None
        }
    }
}

struct RestorePriority {
    tid: rustix::process::Pid,
    before: i32,
}

impl Drop for RestorePriority {
    fn drop(&mut self) {
        // Raising it back may need CAP_SYS_NICE; the thread then stays nice, which only costs the blocking
        // pool's later work some priority.
        let _ = rustix::process::setpriority_process(Some(self.tid), self.before);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop shape of `pump`: a progress tick far more often than the stall limit, and no data. The stall
    /// must still fire (scaled down: 50 ms ticks, 300 ms limit).
    #[tokio::test]
    async fn the_stall_timeout_fires_although_progress_ticks_keep_the_loop_busy() {
        let limit = Duration::from_millis(300);
        let (_tx, mut rx) = mpsc::channel::<Vec<u8>>(1);
        let mut progress = tokio::time::interval(Duration::from_millis(50));
        let mut stall = StallClock::new(limit);
        let start = std::time::Instant::now();
        let mut ticks = 0u32;
        let fired = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                tokio::select! {
                    chunk = rx.recv() => {
                        let _ = chunk;
                        stall.progressed();
                    }
                    () = stall.expired() => break,
                    _ = progress.tick() => ticks += 1,
                }
            }
        })
        .await;
        assert!(fired.is_ok(), "the stall never fired");
        assert!(start.elapsed() >= limit && start.elapsed() < Duration::from_secs(2), "{:?}", start.elapsed());
        assert!(ticks >= 4, "progress ticked all along ({ticks} ticks)");
    }
}
