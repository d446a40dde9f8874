//! ferryctl's requests: dispatch ([`Api::handle`]), resources ([`resources`]: get, apply, delete, agent
//! credentials) and stored backups ([`backups`]: download, restore).
//!
//! Every failure is an [`ApiError`] whose kind travels on the wire, so ferryctl can tell "your input is wrong"
//! (exit 1) from "the server failed" (exit 2).

pub(crate) mod backups;
mod ca;
mod changes;
mod resources;
mod restores;

pub use restores::cluster_members;

use std::sync::Arc;

use anyhow::{Context, Result};
use ferry_common::protocol::{listing_pages, write_frame, AdminRequest, AdminResponse, ErrorKind};
use ferry_common::resources::InvalidName;
use ferry_common::tls::Identity;
use quinn::SendStream;
use tokio_util::sync::CancellationToken;

use crate::agents::Agents;
use crate::backup::{Jobs, StartError};
use crate::changelog::ChangeLog;
use crate::config::Settings;
use crate::credentials::Credentials;
use crate::state::{StateError, StateStore};
use crate::status::Status;
use crate::store::{BackupStore, StoreError};

/// Why a request failed, on whose side.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is wrong as given; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// What the request names does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The request clashes with what is going on (a backup already running).
    #[error("{0}")]
    Conflict(String),
    /// The server cannot serve it right now (shutting down, store unreachable or unconfigured).
    #[error("{0}")]
    Unavailable(String),
    /// The server failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// The kind ferryctl receives.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Invalid(_) => ErrorKind::Invalid,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::Conflict(_) => ErrorKind::Conflict,
            Self::Unavailable(_) => ErrorKind::Unavailable,
            Self::Internal(_) => ErrorKind::Internal,
        }
    }

    fn into_response(self) -> AdminResponse {
        AdminResponse::Error { kind: self.kind(), message: self.to_string() }
    }
}

impl From<StateError> for ApiError {
    fn from(e: StateError) -> Self {
        Self::Internal(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if matches!(e, StoreError::BadName(_)) {
            Self::Invalid(e.to_string())
        } else if matches!(e, StoreError::Foreign(_)) {
            Self::NotFound(e.to_string())
        } else if e.is_unavailable() {
            Self::Unavailable(e.to_string())
        } else {
            Self::Internal(e.to_string())
        }
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        match e {
            StartError::AlreadyRunning(_) | StartError::Restoring(_) => Self::Conflict(e.to_string()),
            StartError::ShuttingDown => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<InvalidName> for ApiError {
    fn from(e: InvalidName) -> Self {
        Self::Invalid(e.to_string())
    }
}

/// The admin API's view of the coordinator: the handles a request may use.
pub struct Api {
    state: Arc<dyn StateStore>,
    store: Arc<BackupStore>,
    status: Status,
    agents: Agents,
    jobs: Jobs,
    credentials: Credentials,
    settings: Settings,
    changelog: ChangeLog,
    /// Cancels store calls of requests at shutdown.
    cancel: CancellationToken,
}

/// What [`Api::new`] is made from.
pub struct ApiDeps {
    pub state: Arc<dyn StateStore>,
    pub store: Arc<BackupStore>,
    pub status: Status,
    pub agents: Agents,
    pub jobs: Jobs,
    pub credentials: Credentials,
    pub settings: Settings,
    pub changelog: ChangeLog,
    pub cancel: CancellationToken,
}

impl Api {
    pub fn new(d: ApiDeps) -> Self {
        let ApiDeps { state, store, status, agents, jobs, credentials, settings, changelog, cancel } = d;
        Self { state, store, status, agents, jobs, credentials, settings, changelog, cancel }
    }

    /// Answers one request on `send`. Agents may only ask where to restore their own cluster from.
    pub async fn handle(&self, identity: &Identity, request: AdminRequest, send: &mut SendStream) -> Result<()> {
        if let Identity::Agent { cluster, .. } = identity {
            let AdminRequest::Restore { cluster: wanted, backup } = request else {
                let e = ApiError::Invalid("an agent certificate may only restore its own cluster's backups".into());
                return reply_error(send, e).await;
            };
            if let Some(w) = wanted.filter(|w| w != cluster) {
                let e = ApiError::Invalid(format!(
                    "an agent of cluster {cluster} may only restore cluster {cluster}'s backups, not {w}'s; seeding a cluster from another cluster's backup takes an admin credential (--ferryconfig admin.ferryconfig --from-cluster {w})"
                ));
                return reply_error(send, e).await;
            }
            return self.restore(cluster, &backup, send).await;
        }
        if *identity == Identity::AdminReadOnly && !matches!(request, AdminRequest::Get { .. }) {
            let e = ApiError::Invalid(format!(
                "the read-only admin credential (ferry://admin-ro) may only get; {} takes the full admin.ferryconfig",
                request_name(&request)
            ));
            return reply_error(send, e).await;
        }
        let response = match request {
            AdminRequest::Download { cluster, backup_id } => return self.download(&cluster, &backup_id, send).await,
            AdminRequest::Restore { cluster: Some(cluster), backup } => {
                return self.restore(&cluster, &backup, send).await
            }
            AdminRequest::Changes { cluster, since_ms, until_ms, prefix, limit } => {
                let q = crate::changelog::changes::Query { since_ms, until_ms, prefix, limit: limit as usize };
                return self.changes(&cluster, q, send).await;
            }
            AdminRequest::Segment { cluster, name } => return self.segment(&cluster, &name, send).await,
            AdminRequest::PointInTimeSnapshot { cluster, at } => {
                return self.point_in_time_snapshot(&cluster, at, send).await
            }
            AdminRequest::PointInTime { cluster, at, through_covered } => {
                self.point_in_time(&cluster, at, through_covered).await
            }
            AdminRequest::Restore { cluster: None, .. } => Err(ApiError::Invalid(
                "restoring with an admin credential needs the cluster to restore from (--from-cluster NAME)".into(),
            )),
            AdminRequest::Get { rt, id, selector } => match self.get(rt, id.as_deref(), selector.as_ref()).await {
                Ok(all) => {
                    // A listing larger than one frame goes in pages, the last one as `Resources`.
                    let mut pages = listing_pages(all);
                    let last = pages.pop().unwrap_or_default();
                    for page in pages {
                        write_frame(send, &AdminResponse::ResourcesPage(page)).await.context("send a listing page")?;
                    }
                    Ok(AdminResponse::Resources(last))
                }
                Err(e) => Err(e),
            },
            AdminRequest::Apply { resources } => self.apply(resources).await.map(AdminResponse::Applied),
            AdminRequest::Delete { rt, id } => self.delete(rt, &id).map(|()| AdminResponse::Deleted),
            AdminRequest::AgentCredentials { cluster, member, valid_for_seconds } => {
                self.issue_credentials(&cluster, &member, valid_for_seconds)
            }
            AdminRequest::RevokeAgentCredentials(target) => self.revoke_credentials(&target),
            AdminRequest::ReadOnlyAdminCredentials { valid_for_seconds } => self.issue_admin(true, valid_for_seconds),
            AdminRequest::AdminCredentials { valid_for_seconds } => self.issue_admin(false, valid_for_seconds),
            AdminRequest::RevokeAdminCredentials { serial } => self.revoke_admin(&serial),
            AdminRequest::Ca(step) => tokio::task::block_in_place(|| self.ca(step)),
            AdminRequest::DeriveBackup { cluster, at } => self.derive_backup(&cluster, at).await,
        };
        let response = response.unwrap_or_else(ApiError::into_response);
        write_frame(send, &response).await.context("send response")
    }
}

/// What a request does, as a refusal names it.
fn request_name(request: &AdminRequest) -> &'static str {
    match request {
        AdminRequest::Get { .. } => "get",
        AdminRequest::Apply { .. } => "apply",
        AdminRequest::Delete { .. } => "delete",
        AdminRequest::Download { .. } => "backup download",
        AdminRequest::Restore { .. } => "restore",
        AdminRequest::Changes { .. } => "changes",
        AdminRequest::PointInTime { .. } => "a point-in-time plan",
        AdminRequest::Segment { .. } => "reading the change log",
        AdminRequest::PointInTimeSnapshot { .. } => "a point-in-time rebuild",
        AdminRequest::AgentCredentials { .. }
        | AdminRequest::RevokeAgentCredentials(_)
        | AdminRequest::ReadOnlyAdminCredentials { .. }
        | AdminRequest::AdminCredentials { .. }
        | AdminRequest::RevokeAdminCredentials { .. } => "issuing or revoking credentials",
        AdminRequest::Ca(_) => "the CA's status or rotation",
        AdminRequest::DeriveBackup { .. } => "a derived backup",
    }
}

/// Answers the request with an error (what is wrong and what to do).
async fn reply_error(send: &mut SendStream, e: ApiError) -> Result<()> {
    write_frame(send, &e.into_response()).await.context("send response")
}
