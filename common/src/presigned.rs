//! Sending presigned S3 requests: what an agent holds instead of S3 credentials.
//!
//! The coordinator signs one request for one call on one object (an `UploadPart` of its multipart upload, or
//! the `HEAD` and `GET` of the backup being restored) and hands it over; the agent sends it as it is, through
//! the same HTTP stack the SDK uses (hyper, rustls with ring, the config's `cacert` trusted), so no other
//! HTTP client is linked. The signature covers the method, the key and the query, so the request is good for
//! that call only, and only until it expires.

use std::time::Duration;

use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_http_client::Connector;
use aws_smithy_runtime_api::client::http::{HttpConnector, HttpConnectorSettings};
use aws_smithy_runtime_api::client::orchestrator::HttpRequest;
use aws_smithy_types::body::SdkBody;
use aws_smithy_types::byte_stream::ByteStream;
use bytes::Bytes;

use crate::protocol::PresignedRequest;
use crate::s3::{error_chain, ConfigError, S3Error, S3ErrorKind, ATTEMPT_TIMEOUT};

/// Sends presigned requests to an S3 endpoint.
pub struct PresignedClient {
    connector: Connector,
}

impl std::fmt::Debug for PresignedClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PresignedClient").finish_non_exhaustive()
    }
}

/// The answer to a presigned request whose status was a success.
pub struct Response {
    pub status: u16,
    headers: Vec<(String, String)>,
    body: SdkBody,
}

impl Response {
    /// A header's value (names compare case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body, streamed.
    pub fn into_body(self) -> ByteStream {
        ByteStream::new(self.body)
    }
}

impl PresignedClient {
    /// A client trusting the system's roots plus `cacert` (a PEM bundle; empty for none).
    pub fn new(cacert: &str) -> Result<Self, ConfigError> {
        let settings = HttpConnectorSettings::builder()
            .connect_timeout(crate::s3::connect_timeout())
            .read_timeout(ATTEMPT_TIMEOUT)
            .build();
        let connector = Connector::builder()
            .connector_settings(settings)
            .tls_provider(tls::Provider::Rustls(CryptoMode::Ring))
            .tls_context(crate::s3::tls_context(cacert)?)
            .build();
        Ok(Self { connector })
    }

    /// Sends `req` with `body` (empty for `HEAD`/`GET`); a status other than 2xx is an error naming S3's code.
    /// `what` names the call in messages (e.g. `upload part 3 of backups/x.snapshot.zst`).
    pub async fn send(&self, req: &PresignedRequest, body: Bytes, what: &str) -> Result<Response, S3Error> {
        let other = |message: String, retryable| S3Error { kind: S3ErrorKind::Other, message, retryable };
        let mut http = HttpRequest::new(SdkBody::from(body));
        http.set_method(&req.method).map_err(|e| other(format!("{what}: bad method: {e}"), false))?;
        http.set_uri(req.url.as_str()).map_err(|e| other(format!("{what}: bad presigned URL: {e}"), false))?;
        for (k, v) in &req.headers {
            if k.eq_ignore_ascii_case("host") {
                continue; // set from the URL by the HTTP stack
            }
            http.headers_mut().insert(k.clone(), v.clone());
        }
        let sent = tokio::time::timeout(ATTEMPT_TIMEOUT, self.connector.call(http)).await.map_err(|_| S3Error {
            kind: S3ErrorKind::Timeout,
            message: format!("{what}: the S3 endpoint did not answer within {}s", ATTEMPT_TIMEOUT.as_secs()),
            retryable: true,
        })?;
        let resp = sent.map_err(|e| {
            let detail = error_chain(&e);
            let (kind, retryable) = if e.is_timeout() {
                (S3ErrorKind::Timeout, true)
            } else if detail.contains("invalid peer certificate") {
                (S3ErrorKind::Unreachable, false)
            } else {
                (S3ErrorKind::Unreachable, true)
            };
            S3Error { kind, message: format!("{what}: the S3 endpoint is unreachable ({detail})"), retryable }
        })?;
        let status = resp.status().as_u16();
        let headers: Vec<(String, String)> =
            resp.headers().iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let body = resp.into_body();
        if (200..300).contains(&status) {
            return Ok(Response { status, headers, body });
        }
        // S3 explains itself in a small XML document (none for HEAD).
        let text = tokio::time::timeout(Duration::from_secs(10), ByteStream::new(body).collect())
            .await
            .ok()
            .and_then(Result::ok)
            .map(|b| String::from_utf8_lossy(&b.into_bytes()).into_owned())
            .unwrap_or_default();
        let tag = |t: &str| {
            let open = format!("<{t}>");
            let start = text.find(&open)? + open.len();
            let end = text[start..].find("</")? + start;
            Some(text[start..end].to_string())
        };
        let code = tag("Code").unwrap_or_default();
        let message = tag("Message").unwrap_or_default();
        let kind = match (status, code.as_str()) {
            (_, "AccessDenied") | (403, _) => S3ErrorKind::AccessDenied,
            (_, "SignatureDoesNotMatch") => S3ErrorKind::BadSignature,
            (_, "NoSuchKey" | "NoSuchUpload" | "NotFound") | (404, _) => S3ErrorKind::NotFound,
            (_, "NoSuchBucket") => S3ErrorKind::NoSuchBucket,
            _ => S3ErrorKind::Other,
        };
        let retryable = status >= 500 || status == 429 || status == 408 || code == "SlowDown";
        Err(S3Error { kind, message: format!("{what}: S3 refused it: HTTP {status} {code} {message}"), retryable })
    }
}
