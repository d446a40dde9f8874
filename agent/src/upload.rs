//! Multipart upload of a compressed snapshot straight to S3, with presigned requests only.
//!
//! The coordinator created the upload; the agent holds no S3 credential. Before sending each part it asks
//! the coordinator for a presigned `UploadPart` request for that part ([`JobMsg::PartUrl`]), announcing the
//! part's size and digests, which the signature binds; the request is valid for those bytes as that
//! one part of that one upload for a few minutes, and sends it through the SDK's HTTP stack. Parts are cut
//! from the compressed stream as it arrives and uploaded with at most `parts_in_flight` at once; `write`
//! waits when that many are in flight, which pushes back through the pipeline to the etcd reader. Memory is
//! bounded by `part_size × (parts_in_flight + 1)`. Every part is retried with backoff. The coordinator
//! completes (or aborts) the upload itself, after its own checks.

use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use ferry_common::presigned::PresignedClient;
use ferry_common::protocol::{
    expect_frame, write_frame, JobMsg, JobReply, PartDigest, PresignedRequest, S3Upload, UploadedPart, MAX_PARTS,
};
use ferry_common::s3::{with_retries, S3Error, S3ErrorKind};
use quinn::{RecvStream, SendStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::METRICS;

/// S3's smallest part, except the last.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// How long the coordinator may take to answer a request for a part's URL (it signs locally).
const PART_URL_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// The job stream, for asking the coordinator for part URLs.
pub struct JobLink<'a> {
    pub send: &'a mut SendStream,
    pub recv: &'a mut RecvStream,
}

impl JobLink<'_> {
    /// The presigned request for part `number`.
    async fn part_url(&mut self, number: u32, digest: PartDigest) -> Result<PresignedRequest> {
        write_frame(self.send, &JobMsg::PartUrl { number, digest }).await.context("ask for a part URL")?;
        let reply: JobReply = tokio::time::timeout(PART_URL_WAIT, expect_frame(self.recv))
            .await
            .map_err(|_| {
                anyhow!("the coordinator did not send part {number}'s URL within {}s", PART_URL_WAIT.as_secs())
            })?
            .context("read part URL")?;
        match reply {
            JobReply::PartUrl { number: n, request } if n == number => Ok(request),
            JobReply::Failed { error } => bail!("the coordinator refused part {number}: {error}"),
            other => bail!("unexpected answer to the request for part {number}'s URL: {other:?}"),
        }
    }
}

pub struct MultipartUpload {
    http: Arc<PresignedClient>,
    key: String,
    part_size: usize,
    limit: usize,
    buf: BytesMut,
    next_part: u32,
    in_flight: JoinSet<Result<UploadedPart, S3Error>>,
    done: Vec<UploadedPart>,
    cancel: CancellationToken,
}

impl MultipartUpload {
    pub fn new(target: &S3Upload, cancel: CancellationToken) -> Result<Self> {
        let http = Arc::new(PresignedClient::new(&target.cacert).context("S3 client for presigned requests")?);
        let part_size = target.part_size.max(MIN_PART_SIZE) as usize;
        Ok(Self {
            http,
            key: target.key.clone(),
            part_size,
            limit: target.parts_in_flight.max(1) as usize,
            buf: BytesMut::with_capacity(part_size),
            next_part: 1,
            in_flight: JoinSet::new(),
            done: Vec::new(),
            cancel,
        })
    }

    /// Appends compressed bytes, uploading every full part. Fails as soon as any part failed for good.
    pub async fn write(&mut self, data: &[u8], link: &mut JobLink<'_>) -> Result<()> {
        while let Some(done) = self.in_flight.try_join_next() {
            self.collect(done)?;
        }
        // Fill exactly to the part size, then hand the whole buffer over: growing past it would make BytesMut
        // double its allocation, and every part in flight would then hold twice its size.
        let mut data = data;
        while !data.is_empty() {
            let n = (self.part_size - self.buf.len()).min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.part_size {
                let part = std::mem::replace(&mut self.buf, BytesMut::with_capacity(self.part_size)).freeze();
                self.send_part(part, link).await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self, body: Bytes, link: &mut JobLink<'_>) -> Result<()> {
        while self.in_flight.len() >= self.limit {
            self.reap_one().await?;
        }
        let number = self.next_part;
        if number > MAX_PARTS {
            bail!("the snapshot needs more than {MAX_PARTS} parts; raise --upload-part-size-mib on the coordinator");
        }
        self.next_part += 1;
        // The URL is signed for exactly these bytes, so the store refuses any others sent with it.
        let hashed = body.clone();
        let digest = tokio::task::spawn_blocking(move || PartDigest::of(&hashed))
            .await
            .map_err(|e| anyhow!("hash part {number}: {e}"))?;
        let request = link.part_url(number, digest).await?;
        let (http, key, cancel) = (self.http.clone(), self.key.clone(), self.cancel.clone());
        let part_task = async move {
            let what = format!("upload part {number} of {key}");
            let etag = with_retries(&cancel, &what, || async {
                let r = http.send(&request, body.clone(), &what).await?;
                r.header("etag").map(str::to_string).ok_or_else(|| S3Error {
                    kind: S3ErrorKind::Other,
                    message: format!("{what}: the server returned no ETag"),
                    retryable: false,
                })
            })
            .await;
            METRICS.part(etag.is_ok());
            Ok(UploadedPart { number, etag: etag? })
        };
        // Part tasks log under the job's span (cluster, member, backup id).
        self.in_flight.spawn(part_task.instrument(tracing::Span::current()));
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<()> {
        match self.in_flight.join_next().await {
            Some(done) => self.collect(done),
            None => Ok(()),
        }
    }

    fn collect(&mut self, done: Result<Result<UploadedPart, S3Error>, tokio::task::JoinError>) -> Result<()> {
        match done {
            Ok(Ok(part)) => {
                self.done.push(part);
                Ok(())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(e) => Err(anyhow!("part task: {e}")),
        }
    }

    /// Uploads the last part and waits for every part; returns them in order, for the coordinator to
    /// complete the upload with.
    pub async fn finish(&mut self, link: &mut JobLink<'_>) -> Result<Vec<UploadedPart>> {
        if !self.buf.is_empty() || self.next_part == 1 {
            // The last part may be small; an empty stream still needs one (empty) part.
            let last = self.buf.split().freeze();
            self.send_part(last, link).await?;
        }
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        self.done.sort_by_key(|p| p.number);
        Ok(std::mem::take(&mut self.done))
    }

    /// Stops the parts in flight. The coordinator aborts the upload itself (it holds the credentials).
    pub async fn abort(&mut self) {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
    }
}
