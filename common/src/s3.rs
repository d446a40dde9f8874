//! S3 primitives shared by the agent (uploads) and the coordinator (validation, listing, manifests):
//! building a client from an `EtcdBackupS3Configs` spec, telling S3 errors apart in words a user can act on,
//! and the one retry-with-backoff helper every S3 call goes through.

use std::time::Duration;

use aws_credential_types::Credentials;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{
    BehaviorVersion, Region, RequestChecksumCalculation, ResponseChecksumValidation, SharedCredentialsProvider,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode, TlsContext, TrustStore};
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::resources::EtcdBackupS3ConfigSpec;

/// Region used when the config names none; S3-compatible servers mostly ignore it, but SigV4 needs one.
pub const DEFAULT_REGION: &str = "us-east-1";
/// A TCP/TLS connection to the endpoint that takes longer than this counts as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// One attempt of one S3 call (an 8 MiB part on a slow link included) may take this long before it is
/// abandoned as stalled and retried.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(120);
/// Calls that move little (listings, HEADs, manifests, deletes, aborts, and the answer to a download before its
/// body): a server that has not answered one within this is stalled, and the attempt is retried. Without it a
/// stalled store held `ferryctl get etcdbackup` and restores for [`ATTEMPT_TIMEOUT`] per attempt (~10 min).
pub const SMALL_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per S3 call before giving up.
pub const MAX_ATTEMPTS: u32 = 5;
/// Between attempts of one call: short, since most failures are a blip; capped so five attempts stay within
/// about half a minute of waiting.
const RETRY_BACKOFF: Backoff = Backoff { base: Duration::from_millis(400), max: Duration::from_secs(10), jitter: 0.5 };

/// The longest one call through [`with_retries`] can take: every attempt times out and every wait is the
/// longest. Callers that wait for someone else's S3 call (the agent for the coordinator's commit) size their
/// deadline from this.
pub const fn max_call_duration() -> Duration {
    // Attempts × per-attempt timeout, plus (attempts − 1) waits of at most the cap.
    Duration::from_secs(MAX_ATTEMPTS as u64 * ATTEMPT_TIMEOUT.as_secs() + (MAX_ATTEMPTS as u64 - 1) * 10)
}

/// The S3 config is not usable as written.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("spec.bucket is required")]
    NoBucket,
    #[error("spec.accesskeyid and spec.secretaccesskey go together: give both, or neither to use the standard AWS credential chain")]
    HalfCredentials,
    #[error("spec.sessiontoken needs spec.accesskeyid and spec.secretaccesskey")]
    TokenWithoutKeys,
    #[error("spec.endpoint {0:?} is not an http:// or https:// URL")]
    BadEndpoint(String),
    #[error("spec.cacert is not a usable PEM bundle: {0}")]
    BadCaCert(String),
}

/// Checks a config's shape (not whether the bucket answers: see [`S3Error`]).
pub fn check_config(c: &EtcdBackupS3ConfigSpec) -> Result<(), ConfigError> {
    if c.bucket.trim().is_empty() {
        return Err(ConfigError::NoBucket);
    }
    if c.accesskeyid.is_empty() != c.secretaccesskey.is_empty() {
        return Err(ConfigError::HalfCredentials);
    }
    if !c.sessiontoken.is_empty() && c.accesskeyid.is_empty() {
        return Err(ConfigError::TokenWithoutKeys);
    }
    if !(c.endpoint.is_empty() || c.endpoint.starts_with("http://") || c.endpoint.starts_with("https://")) {
        return Err(ConfigError::BadEndpoint(c.endpoint.clone()));
    }
    if !c.cacert.is_empty() {
        use rustls_pki_types::pem::PemObject;
        let certs: Result<Vec<_>, _> = rustls_pki_types::CertificateDer::pem_slice_iter(c.cacert.as_bytes()).collect();
        match certs {
            Ok(v) if !v.is_empty() => {}
            Ok(_) => return Err(ConfigError::BadCaCert("no certificate in it".into())),
            Err(e) => return Err(ConfigError::BadCaCert(e.to_string())),
        }
    }
    Ok(())
}

/// The TLS settings of every S3 connection: the system's roots plus `cacert` (a PEM bundle), if given.
pub(crate) fn tls_context(cacert: &str) -> Result<TlsContext, ConfigError> {
    let mut trust = TrustStore::default();
    if !cacert.is_empty() {
        trust = trust.with_pem_certificate(cacert.as_bytes().to_vec());
    }
    TlsContext::builder().with_trust_store(trust).build().map_err(|e| ConfigError::BadCaCert(e.to_string()))
}

/// A TCP/TLS connection to the endpoint that takes longer than this counts as unreachable.
pub(crate) const fn connect_timeout() -> Duration {
    CONNECT_TIMEOUT
}

/// Builds a client that speaks to exactly what the config names.
pub async fn client(c: &EtcdBackupS3ConfigSpec) -> Result<aws_sdk_s3::Client, ConfigError> {
    check_config(c)?;
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
        .tls_context(tls_context(&c.cacert)?)
        .build_https();
    let region = if c.region.is_empty() { DEFAULT_REGION.to_string() } else { c.region.clone() };
    let credentials = if c.accesskeyid.is_empty() {
        // The standard chain where this process runs: env, profile, web identity (IRSA), ECS, IMDS.
        let provider_config =
            aws_config::provider_config::ProviderConfig::without_region().with_http_client(http.clone());
        SharedCredentialsProvider::new(
            aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                .configure(provider_config)
                .region(Region::new(region.clone()))
                .build()
                .await,
        )
    } else {
        let token = (!c.sessiontoken.is_empty()).then(|| c.sessiontoken.clone());
        SharedCredentialsProvider::new(Credentials::new(
            &c.accesskeyid,
            &c.secretaccesskey,
            token,
            None,
            "ferry-config",
        ))
    };
    let mut b = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region))
        .http_client(http)
        .credentials_provider(credentials)
        // Ferry retries every call itself (with_retries below); SDK retries inside would multiply attempts.
        .retry_config(RetryConfig::disabled())
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(CONNECT_TIMEOUT)
                .operation_attempt_timeout(ATTEMPT_TIMEOUT)
                .build(),
        )
        // Many S3-compatible servers reject the checksums the SDK sends by default since 2025.
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if !c.endpoint.is_empty() {
        // Custom endpoints rarely have wildcard DNS for virtual-hosted buckets.
        b = b.endpoint_url(c.endpoint.clone()).force_path_style(true);
    }
    Ok(aws_sdk_s3::Client::from_conf(b.build()))
}

/// What went wrong with an S3 call, in the terms a user fixes it by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum S3ErrorKind {
    Unreachable,
    Timeout,
    NoSuchBucket,
    BadSignature,
    UnknownAccessKey,
    AccessDenied,
    NotFound,
    Cancelled,
    Other,
}

/// A failed S3 call.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct S3Error {
    pub kind: S3ErrorKind,
    pub message: String,
    /// Whether trying again may help (network trouble, 5xx, throttling).
    pub retryable: bool,
}

impl S3Error {
    pub fn cancelled(what: &str) -> Self {
        Self { kind: S3ErrorKind::Cancelled, message: format!("{what}: cancelled"), retryable: false }
    }

    /// An object's body broke off while it was read: the connection's fault, worth another try.
    pub fn body(what: &str, e: impl std::fmt::Display) -> Self {
        Self { kind: S3ErrorKind::Unreachable, message: format!("{what}: {e}"), retryable: true }
    }

    /// Classifies an SDK error; `what` names the call (e.g. `upload part 3 of backups/x.zst`).
    pub fn from_sdk<E>(what: &str, bucket: &str, e: &SdkError<E, HttpResponse>) -> Self
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let detail = error_chain(e);
        let (kind, message, retryable) = match e {
            SdkError::DispatchFailure(d) if d.is_timeout() => {
                (S3ErrorKind::Timeout, format!("the S3 endpoint did not answer in time ({detail})"), true)
            }
            SdkError::DispatchFailure(_) if detail.contains("invalid peer certificate") => (
                S3ErrorKind::Unreachable,
                format!(
                    "the S3 endpoint's TLS certificate is not trusted ({detail}); if it comes from a private CA, put that CA's PEM bundle in spec.cacert"
                ),
                false,
            ),
            SdkError::DispatchFailure(_) | SdkError::ConstructionFailure(_) => (
                S3ErrorKind::Unreachable,
                format!("the S3 endpoint is unreachable ({detail}); check spec.endpoint and that the server runs"),
                true,
            ),
            SdkError::TimeoutError(_) => {
                (S3ErrorKind::Timeout, format!("the S3 call timed out after {}s", ATTEMPT_TIMEOUT.as_secs()), true)
            }
            _ => {
                let status = match e {
                    SdkError::ServiceError(s) => s.raw().status().as_u16(),
                    SdkError::ResponseError(r) => r.raw().status().as_u16(),
                    _ => 0,
                };
                let code = e.code().unwrap_or_default();
                match code {
                    "NoSuchBucket" => (
                        S3ErrorKind::NoSuchBucket,
                        format!("bucket {bucket:?} does not exist; create it or fix spec.bucket"),
                        false,
                    ),
                    "SignatureDoesNotMatch" => (
                        S3ErrorKind::BadSignature,
                        "signature mismatch: the server refused the request signature — check spec.secretaccesskey"
                            .to_string(),
                        false,
                    ),
                    "InvalidAccessKeyId" => (
                        S3ErrorKind::UnknownAccessKey,
                        "the server does not know this access key — check spec.accesskeyid".to_string(),
                        false,
                    ),
                    "AccessDenied" => (
                        S3ErrorKind::AccessDenied,
                        format!("access denied to bucket {bucket:?}: the credentials lack permission for this call"),
                        false,
                    ),
                    "NoSuchKey" | "NotFound" | "NoSuchUpload" => {
                        (S3ErrorKind::NotFound, format!("not found ({code})"), false)
                    }
                    _ if status == 404 => (S3ErrorKind::NotFound, "not found (HTTP 404)".to_string(), false),
                    // A refused HEAD carries no error body, so no code: say what a 403 means all the same.
                    _ if status == 403 => (
                        S3ErrorKind::AccessDenied,
                        format!(
                            "S3 refused the request (HTTP 403{}): the credentials are wrong, revoked or lack \
                             permission on bucket {bucket:?} — check spec.accesskeyid, spec.secretaccesskey and the \
                             key's policy",
                            if code.is_empty() { String::new() } else { format!(" {code}") }
                        ),
                        false,
                    ),
                    _ => {
                        let msg = e.message().unwrap_or_default();
                        let retryable = status >= 500 || status == 429 || status == 408 || code == "SlowDown";
                        (S3ErrorKind::Other, format!("S3 error {code} (HTTP {status}): {msg} {detail}"), retryable)
                    }
                }
            }
        };
        Self { kind, message: format!("{what}: {message}"), retryable }
    }
}

/// An error and its causes, joined by ": ", without the SDK's `Debug` dump.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Runs `op` until it succeeds, fails permanently, runs out of attempts or is cancelled; waits with
/// jittered exponential backoff between attempts.
pub async fn with_retries<T, F, Fut>(cancel: &CancellationToken, what: &str, mut op: F) -> Result<T, S3Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, S3Error>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = tokio::select! {
            r = op() => r,
            _ = cancel.cancelled() => return Err(S3Error::cancelled(what)),
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) if !e.retryable || attempt >= MAX_ATTEMPTS => return Err(e),
            Err(e) => {
                let delay = RETRY_BACKOFF.delay(attempt);
                tracing::warn!(attempt, delay_ms = delay.as_millis() as u64, "{what} failed, retrying: {e}");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(S3Error::cancelled(what)),
                }
            }
        }
    }
}

/// [`with_retries`] for a call that moves little: each attempt gets [`SMALL_CALL_TIMEOUT`] (see there). For a
/// download, the timeout covers the answer up to its first byte; the body streams under the SDK's own limits.
pub async fn with_quick_retries<T, F, Fut>(cancel: &CancellationToken, what: &str, mut op: F) -> Result<T, S3Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, S3Error>>,
{
    with_retries(cancel, what, || {
        let attempt = op();
        async move {
            tokio::time::timeout(SMALL_CALL_TIMEOUT, attempt).await.unwrap_or_else(|_| {
                Err(S3Error {
                    kind: S3ErrorKind::Timeout,
                    message: format!("{what}: the S3 endpoint did not answer within {}s", SMALL_CALL_TIMEOUT.as_secs()),
                    retryable: true,
                })
            })
        }
    })
    .await
}

/// Aborts a multipart upload, with retries, so its parts are freed; an upload already gone counts as
/// aborted. Not cancellable: it is the cleanup that runs after a job was cancelled.
pub async fn abort_upload(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    upload_id: &str,
) -> Result<(), S3Error> {
    let what = format!("abort multipart upload s3://{bucket}/{key}");
    let r = with_quick_retries(&CancellationToken::new(), &what, || async {
        client
            .abort_multipart_upload()
            .bucket(bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
            .map_err(|e| S3Error::from_sdk(&what, bucket, &e))?;
        Ok(())
    })
    .await;
    match r {
        Err(e) if e.kind == S3ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// HEAD of one object, with retries.
pub async fn head_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    cancel: &CancellationToken,
) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput, S3Error> {
    let what = format!("check s3://{bucket}/{key}");
    with_quick_retries(cancel, &what, || async {
        client.head_object().bucket(bucket).key(key).send().await.map_err(|e| S3Error::from_sdk(&what, bucket, &e))
    })
    .await
}

/// GET of one object, with retries for the request; the body streams afterwards.
pub async fn get_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    what: &str,
    cancel: &CancellationToken,
) -> Result<ByteStream, S3Error> {
    let r = with_quick_retries(cancel, what, || async {
        client.get_object().bucket(bucket).key(key).send().await.map_err(|e| S3Error::from_sdk(what, bucket, &e))
    })
    .await?;
    Ok(r.body)
}

/// GET of one small object read whole (a manifest), with retries covering the body too.
pub async fn get_bytes(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    max: u64,
    cancel: &CancellationToken,
) -> Result<bytes::Bytes, S3Error> {
    let what = format!("read s3://{bucket}/{key}");
    let too_large = || S3Error {
        kind: S3ErrorKind::Other,
        message: format!("{what}: the object is larger than {max} bytes"),
        retryable: false,
    };
    with_quick_retries(cancel, &what, || async {
        // Only the first max + 1 bytes are asked for: a huge object costs no memory.
        let r = client
            .get_object()
            .bucket(bucket)
            .key(key)
            .range(format!("bytes=0-{max}"))
            .send()
            .await
            .map_err(|e| S3Error::from_sdk(&what, bucket, &e))?;
        if r.content_length().is_some_and(|n| n < 0 || n as u64 > max) {
            return Err(too_large());
        }
        let mut body = r.body;
        let mut out = Vec::new();
        loop {
            let piece = body.try_next().await.map_err(|e| S3Error::body(&what, e))?;
            let Some(piece) = piece else { break };
            if (out.len() + piece.len()) as u64 > max {
                return Err(too_large());
            }
            out.extend_from_slice(&piece);
        }
        Ok(bytes::Bytes::from(out))
    })
    .await
}

/// The first `len` bytes of one object (fewer when it is shorter) by a ranged GET, with retries covering the
/// body too, and the bytes that arrived (what a caller counts as read). A server that ignores the range is
/// read no further than `len`: the rest of its answer is dropped unread.
pub async fn get_prefix(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    len: u64,
    cancel: &CancellationToken,
) -> Result<(bytes::Bytes, u64), S3Error> {
    let what = format!("read the first {len} bytes of s3://{bucket}/{key}");
    // Counted over every attempt: a retried read was read too.
    let arrived = std::sync::atomic::AtomicU64::new(0);
    let out = with_quick_retries(cancel, &what, || {
        let (arrived, what) = (&arrived, &what);
        async move {
            let r = client
                .get_object()
                .bucket(bucket)
                .key(key)
                .range(format!("bytes=0-{}", len.saturating_sub(1)))
                .send()
                .await
                .map_err(|e| S3Error::from_sdk(what, bucket, &e))?;
            let mut body = r.body;
            let mut out = Vec::new();
            while (out.len() as u64) < len {
                let piece = body.try_next().await.map_err(|e| S3Error::body(what, e))?;
                let Some(piece) = piece else { break };
                arrived.fetch_add(piece.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let take = piece.len().min((len - out.len() as u64) as usize);
                out.extend_from_slice(&piece[..take]);
            }
            Ok(bytes::Bytes::from(out))
        }
    })
    .await?;
    Ok((out, arrived.into_inner()))
}

/// The ETag S3 gives an object completed from multipart parts with these MD5s: the hex MD5 of the parts'
/// binary MD5s one after the other, then `-` and the number of parts (not the MD5 of the object).
pub fn multipart_etag<'a>(part_md5s: impl IntoIterator<Item = &'a [u8; 16]>) -> String {
    use md5::Digest as _;
    let mut all = md5::Md5::new();
    let mut parts = 0usize;
    for m in part_md5s {
        all.update(m);
        parts += 1;
    }
    format!("{}-{parts}", hex::encode(all.finalize()))
}

/// Whether `etag` (quotes removed) has the shape of a multipart ETag: 32 hex digits, `-`, a part count.
pub fn is_multipart_etag(etag: &str) -> bool {
    match etag.split_once('-') {
        Some((md5, n)) => {
            md5.len() == 32
                && md5.bytes().all(|b| b.is_ascii_hexdigit())
                && !n.is_empty()
                && n.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// DELETE of one object, with retries; an object already gone counts as deleted (S3 says so anyway).
pub async fn delete_object(
    client: &aws_sdk_s3::Client,
    bucket: &str,
    key: &str,
    cancel: &CancellationToken,
) -> Result<(), S3Error> {
    let what = format!("delete s3://{bucket}/{key}");
    with_quick_retries(cancel, &what, || async {
        client.delete_object().bucket(bucket).key(key).send().await.map_err(|e| S3Error::from_sdk(&what, bucket, &e))
    })
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> EtcdBackupS3ConfigSpec {
        EtcdBackupS3ConfigSpec { bucket: "b".into(), ..Default::default() }
    }

    /// The rule AWS S3 documents, and what s3s-fs 0.14.1 answered when run: `"609ff2ea…a8cf-2"` for a 5 MiB
    /// part and a 1000-byte one, the MD5 of their two binary MD5s.
    #[test]
    fn the_multipart_etag_is_the_md5_of_the_part_md5s_and_their_count() {
        use md5::Digest as _;
        let (a, b) = (vec![1u8; 100], vec![2u8; 50]);
        let (ma, mb): ([u8; 16], [u8; 16]) = (md5::Md5::digest(&a).into(), md5::Md5::digest(&b).into());
        let mut both = ma.to_vec();
        both.extend_from_slice(&mb);
        assert_eq!(multipart_etag([&ma, &mb]), format!("{}-2", hex::encode(md5::Md5::digest(&both))));
        assert_eq!(multipart_etag([&ma]), format!("{}-1", hex::encode(md5::Md5::digest(ma))));
        assert!(is_multipart_etag("609ff2ea3ae9bcc2ea7b2d14576fa8cf-2"));
        for not in ["609ff2ea3ae9bcc2ea7b2d14576fa8cf", "609ff2ea3ae9bcc2ea7b2d14576fa8cf-", "abc-2", "opaque", ""] {
            assert!(!is_multipart_etag(not), "{not}");
        }
    }

    #[test]
    fn config_shape_is_checked() {
        assert!(check_config(&cfg()).is_ok());
        assert!(matches!(check_config(&EtcdBackupS3ConfigSpec::default()), Err(ConfigError::NoBucket)));
        let half = EtcdBackupS3ConfigSpec { accesskeyid: "a".into(), ..cfg() };
        assert!(matches!(check_config(&half), Err(ConfigError::HalfCredentials)));
        let ep = EtcdBackupS3ConfigSpec { endpoint: "s3.local:9000".into(), ..cfg() };
        assert!(matches!(check_config(&ep), Err(ConfigError::BadEndpoint(_))));
        let ca = EtcdBackupS3ConfigSpec { cacert: "not pem".into(), ..cfg() };
        assert!(matches!(check_config(&ca), Err(ConfigError::BadCaCert(_))));
    }

    #[tokio::test]
    async fn retries_stop_on_permanent_errors_and_cancel() {
        let cancel = CancellationToken::new();
        let mut calls = 0;
        let r: Result<(), _> = with_retries(&cancel, "op", || {
            calls += 1;
            async { Err(S3Error { kind: S3ErrorKind::NoSuchBucket, message: "x".into(), retryable: false }) }
        })
        .await;
        assert!(r.is_err());
        assert_eq!(calls, 1);

        let mut calls = 0;
        let r: Result<u32, _> = with_retries(&cancel, "op", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 3 {
                    Err(S3Error { kind: S3ErrorKind::Unreachable, message: "x".into(), retryable: true })
                } else {
                    Ok(n)
                }
            }
        })
        .await;
        assert_eq!(r.unwrap(), 3);

        cancel.cancel();
        let r: Result<(), _> = with_retries(&cancel, "op", std::future::pending).await;
        assert_eq!(r.unwrap_err().kind, S3ErrorKind::Cancelled);
    }
}
