//! Multipart upload of a compressed snapshot straight to S3.
//!
//! Parts are cut from the compressed stream as it arrives and uploaded with at most `parts_in_flight` at
//! once; `write` waits when that many are in flight, which pushes back through the pipeline to the etcd
//! reader. Memory is bounded by `part_size × (parts_in_flight + 1)`. Every part is retried with backoff.
//! `complete` is called only after etcd's hash matched; on any failure the caller calls `abort`, so no
//! parts are left behind and no partial object ever exists.

use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use bytes::{Bytes, BytesMut};
use ferry_common::protocol::S3Target;
use ferry_common::s3::{abort_upload, with_retries, S3Error, S3ErrorKind};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::metrics::METRICS;

/// S3's smallest part, except the last.
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;

pub struct MultipartUpload {
    client: aws_sdk_s3::Client,
    bucket: String,
    key: String,
    pub upload_id: String,
    part_size: usize,
    limit: usize,
    buf: BytesMut,
    next_part: i32,
    in_flight: JoinSet<Result<CompletedPart, S3Error>>,
    done: Vec<CompletedPart>,
    cancel: CancellationToken,
}

impl MultipartUpload {
    pub async fn create(target: &S3Target, cancel: CancellationToken) -> anyhow::Result<Self> {
        let client = ferry_common::s3::client(&target.config).await?;
        let bucket = target.config.bucket.clone();
        let key = target.key.clone();
        let what = format!("create multipart upload s3://{bucket}/{key}");
        let upload_id = with_retries(&cancel, &what, || async {
            let r = client
                .create_multipart_upload()
                .bucket(&bucket)
                .key(&key)
                .content_type("application/zstd")
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, &bucket, &e))?;
            r.upload_id().map(str::to_string).ok_or_else(|| S3Error {
                kind: S3ErrorKind::Other,
                message: format!("{what}: the server returned no upload id"),
                retryable: false,
            })
        })
        .await?;
        let part_size = target.part_size.max(MIN_PART_SIZE) as usize;
        Ok(Self {
            client,
            bucket,
            key,
            upload_id,
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
    pub async fn write(&mut self, data: &[u8]) -> Result<(), S3Error> {
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
                self.send_part(part).await?;
            }
        }
        Ok(())
    }

    async fn send_part(&mut self, body: Bytes) -> Result<(), S3Error> {
        while self.in_flight.len() >= self.limit {
            self.reap_one().await?;
        }
        let (client, bucket, key, upload_id) =
            (self.client.clone(), self.bucket.clone(), self.key.clone(), self.upload_id.clone());
        let number = self.next_part;
        self.next_part += 1;
        let cancel = self.cancel.clone();
        let part_task = async move {
            let what = format!("upload part {number} of s3://{bucket}/{key}");
            let etag = with_retries(&cancel, &what, || async {
                let r = client
                    .upload_part()
                    .bucket(&bucket)
                    .key(&key)
                    .upload_id(&upload_id)
                    .part_number(number)
                    .body(ByteStream::from(body.clone()))
                    .send()
                    .await
                    .map_err(|e| S3Error::from_sdk(&what, &bucket, &e))?;
                Ok(r.e_tag().unwrap_or_default().to_string())
            })
            .await;
            METRICS.part(etag.is_ok());
            Ok(CompletedPart::builder().part_number(number).e_tag(etag?).build())
        };
        // Part tasks log under the job's span (cluster, member, backup id).
        self.in_flight.spawn(part_task.instrument(tracing::Span::current()));
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<(), S3Error> {
        match self.in_flight.join_next().await {
            Some(done) => self.collect(done),
            None => Ok(()),
        }
    }

    fn collect(&mut self, done: Result<Result<CompletedPart, S3Error>, tokio::task::JoinError>) -> Result<(), S3Error> {
        match done {
            Ok(Ok(part)) => {
                self.done.push(part);
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(e) => Err(S3Error { kind: S3ErrorKind::Other, message: format!("part task: {e}"), retryable: false }),
        }
    }

    /// Uploads the last part, waits for every part and completes the upload: the object appears whole.
    pub async fn complete(&mut self) -> Result<(), S3Error> {
        if !self.buf.is_empty() || self.next_part == 1 {
            // The last part may be small; an empty stream still needs one (empty) part.
            let last = self.buf.split().freeze();
            self.send_part(last).await?;
        }
        while !self.in_flight.is_empty() {
            self.reap_one().await?;
        }
        self.done.sort_by_key(|p| p.part_number());
        let parts = CompletedMultipartUpload::builder().set_parts(Some(self.done.clone())).build();
        let what = format!("complete multipart upload s3://{}/{}", self.bucket, self.key);
        with_retries(&self.cancel, &what, || async {
            self.client
                .complete_multipart_upload()
                .bucket(&self.bucket)
                .key(&self.key)
                .upload_id(&self.upload_id)
                .multipart_upload(parts.clone())
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(&what, &self.bucket, &e))?;
            Ok(())
        })
        .await
    }

    /// Aborts the upload so its parts are freed. Runs even when the job was cancelled.
    pub async fn abort(&mut self) -> Result<(), S3Error> {
        self.in_flight.abort_all();
        while self.in_flight.join_next().await.is_some() {}
        abort_upload(&self.client, &self.bucket, &self.key, &self.upload_id).await
    }
}
