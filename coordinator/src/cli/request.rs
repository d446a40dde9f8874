//! ferryctl's requests to the coordinator, and which failures are whose: the input's (exit 1) or the
//! server's or the network's (exit 2).

use anyhow::{bail, Context, Result};
use ferry_common::client::{ClientError, Session};
use ferry_common::config::FerryConfig;
use ferry_common::protocol::{expect_frame, AdminRequest, AdminResponse, ErrorKind, FrameError};
use ferry_common::resources::{Resource, ResourceType, Selector};

/// Exit code when the input was refused: a bad flag or file, or the coordinator said the request is wrong.
pub const EXIT_REFUSED: i32 = 1;
/// Exit code when the coordinator failed or could not be reached, or the work it was asked to do failed.
pub const EXIT_FAILED: i32 = 2;

/// The coordinator answered with an error; its kind decides the exit code.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Answered {
    pub kind: ErrorKind,
    pub message: String,
}

/// The work ferryctl waited for failed on the server's side (a backup failed, or did not finish in time):
/// exit 2, as for a server failure.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct WorkFailed(pub String);

/// Whether an error is the server's or the transport's (exit 2), not the input's (exit 1).
pub fn is_server_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Answered>().is_some_and(|a| !a.kind.is_refused_input())
            || c.downcast_ref::<ClientError>().is_some_and(|ce| !matches!(ce, ClientError::Setup(_)))
            || c.downcast_ref::<FrameError>().is_some()
            || c.downcast_ref::<WorkFailed>().is_some()
    })
}

/// The exit code for an error.
pub fn exit_code(e: &anyhow::Error) -> i32 {
    if is_server_failure(e) {
        EXIT_FAILED
    } else {
        EXIT_REFUSED
    }
}

/// One request, one answer; an `Error` answer becomes [`Answered`].
pub async fn call(cfg: &FerryConfig, request: AdminRequest) -> Result<AdminResponse> {
    let mut s = Session::open(&cfg.coordinator, &cfg.ca, &cfg.client_pem(), &request).await?;
    let response = read_response(&mut s.recv).await;
    s.close().await;
    match response? {
        AdminResponse::Error { kind, message } => Err(Answered { kind, message }.into()),
        r => Ok(r),
    }
}

/// `get`: resources of a type, or the one with `id`.
pub async fn get(
    cfg: &FerryConfig,
    rt: ResourceType,
    id: Option<String>,
    selector: Option<Selector>,
) -> Result<Vec<Resource>> {
    match call(cfg, AdminRequest::Get { rt, id, selector }).await? {
        AdminResponse::Resources(rs) => Ok(rs),
        other => bail!("unexpected response {other:?}"),
    }
}

/// Whether an error is the coordinator's "not found".
pub fn is_not_found(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<Answered>().is_some_and(|a| a.kind == ErrorKind::NotFound))
}

/// One response; a listing sent in pages is gathered into one `Resources`.
async fn read_response(recv: &mut quinn::RecvStream) -> Result<AdminResponse> {
    let mut gathered: Vec<Resource> = Vec::new();
    loop {
        match expect_frame(recv).await.context("read response")? {
            AdminResponse::ResourcesPage(page) => gathered.extend(page),
            AdminResponse::Resources(last) if !gathered.is_empty() => {
                gathered.extend(last);
                return Ok(AdminResponse::Resources(gathered));
            }
            other => return Ok(other),
        }
    }
}
