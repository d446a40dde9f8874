//! Takes spooled segments oldest first and stores them through the coordinator: S3 by one presigned PUT,
//! the local store by chunks on the watch stream. One segment in flight at a time, in revision order.

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use ferry_common::presigned::PresignedClient;
use ferry_common::protocol::{
    PresignedRequest, SegmentInfo, SegmentTarget, WatchMsg, WatchReply, COMMIT_REPLY_WAIT, DATA_CHUNK,
};
use ferry_common::s3::with_retries;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::clock::Clock;
use super::spool::{Item, Spool};

/// How long the coordinator may take to sign a segment's PUT.
const URL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

pub struct Uploader {
    pub spool: Spool,
    pub out: mpsc::Sender<WatchMsg>,
    pub replies: mpsc::Receiver<WatchReply>,
    pub target: SegmentTarget,
    pub clock: Clock,
    pub cancel: CancellationToken,
}

impl Uploader {
    /// Runs until cancelled (`Ok`) or a segment could not be stored.
    pub async fn run(mut self) -> Result<()> {
        let http = match &self.target {
            SegmentTarget::S3 { cacert } => {
                Some(PresignedClient::new(cacert).context("S3 client for presigned requests")?)
            }
            SegmentTarget::Coordinator => None,
        };
        loop {
            let item = tokio::select! {
                item = self.spool.front() => item,
                _ = self.cancel.cancelled() => return Ok(()),
            };
            match item {
                Item::Gap { from, to, reason } => {
                    self.send(WatchMsg::Gap { from_revision: from, to_revision: to, reason }).await?;
                }
                Item::Segment { info, path } => {
                    let bytes = tokio::fs::read(&path).await.with_context(|| format!("read {}", path.display()))?;
                    anyhow::ensure!(
                        bytes.len() as u64 == info.size,
                        "the spooled segment {} changed on disk",
                        path.display()
                    );
                    self.store(&info, bytes, http.as_ref()).await?;
                }
            }
            self.spool.done()?;
        }
    }

    async fn send(&self, msg: WatchMsg) -> Result<()> {
        self.out.send(msg).await.map_err(|_| anyhow!("the watch stream is closed"))
    }

    async fn store(&mut self, info: &SegmentInfo, bytes: Vec<u8>, http: Option<&PresignedClient>) -> Result<()> {
        let first = info.first_revision;
        self.send(WatchMsg::Segment(info.clone())).await?;
        match http {
            Some(http) => {
                let request = match self.reply(URL_WAIT, "its URL").await? {
                    WatchReply::SegmentUrl { first_revision, request } if first_revision == first => request,
                    other => bail!("unexpected answer to segment {first}: {other:?}"),
                };
                put(http, &request, Bytes::from(bytes), info, &self.cancel).await?;
                self.send(WatchMsg::Uploaded { first_revision: first }).await?;
            }
            None => {
                for chunk in bytes.chunks(DATA_CHUNK) {
                    self.send(WatchMsg::SegmentData(chunk.to_vec())).await?;
                }
                self.send(WatchMsg::SegmentEnd).await?;
            }
        }
        match self.reply(COMMIT_REPLY_WAIT, "its acknowledgement").await? {
            WatchReply::Stored { first_revision, last_revision, coordinator_time }
                if first_revision == first && last_revision == info.last_revision =>
            {
                self.clock.anchor(coordinator_time);
                crate::metrics::METRICS.stored_bytes.inc_by(info.size);
                Ok(())
            }
            other => bail!("unexpected answer to segment {first}: {other:?}"),
        }
    }

    async fn reply(&mut self, wait: std::time::Duration, what: &str) -> Result<WatchReply> {
        tokio::select! {
            r = tokio::time::timeout(wait, self.replies.recv()) => match r {
                Ok(Some(reply)) => Ok(reply),
                Ok(None) => bail!("the watch stream closed while waiting for a segment's {what}"),
                Err(_) => bail!("the coordinator did not send a segment's {what} within {}s", wait.as_secs()),
            },
            _ = self.cancel.cancelled() => bail!("cancelled"),
        }
    }
}

/// The PUT, retried on what may pass; an existing object (HTTP 412, the request refuses to overwrite) is an
/// error to report, not something to retry.
async fn put(
    http: &PresignedClient,
    request: &PresignedRequest,
    body: Bytes,
    info: &SegmentInfo,
    cancel: &CancellationToken,
) -> Result<()> {
    let what = format!("upload segment {}-{}", info.first_revision, info.last_revision);
    let r = with_retries(cancel, &what, || async { http.send(request, body.clone(), &what).await.map(|_| ()) }).await;
    match r {
        Ok(()) => Ok(()),
        Err(e) if e.message.contains("HTTP 412") => {
            bail!("{what}: the object already exists (HTTP 412 Precondition Failed): {e}")
        }
        Err(e) => Err(e.into()),
    }
}
