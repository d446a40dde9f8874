//! `ferryctl ca`: the CAs in force and their rotation without a backup pause (docs/SECURITY.md).

use std::time::Duration;

use ferry_common::protocol::{AdminResponse, CaInfo, CaStatus, CaStep};
use ferry_common::resources::Timestamp;
use ferry_common::tls::{pem_common_name, pem_serial_and_expiry, CertAuthority};
use tracing::{info, warn};

use super::{Api, ApiError};
use crate::pki::RotationError;

/// How long after a finished rotation the old CA's certificates are revoked (their connections closed): the
/// answer reaches the ferryctl that asked first, even one holding an old admin certificate.
const RETIRE_AFTER: Duration = Duration::from_secs(1);

impl From<RotationError> for ApiError {
    fn from(e: RotationError) -> Self {
        match e {
            RotationError::Failed(e) => ApiError::Internal(format!("{e:#}")),
            e => ApiError::Conflict(e.to_string()),
        }
    }
}

fn info_of(ca: &CertAuthority) -> Result<CaInfo, ApiError> {
    let pem = &ca.pem().cert_pem;
    let (serial, notafter) = pem_serial_and_expiry(pem).map_err(|e| ApiError::Internal(format!("read a CA: {e}")))?;
    let name = pem_common_name(pem).map_err(|e| ApiError::Internal(format!("read a CA: {e}")))?;
    Ok(CaInfo { name, serial, notafter: Timestamp::from(notafter) })
}

impl Api {
    pub(super) fn ca(&self, step: CaStep) -> Result<AdminResponse, ApiError> {
        let authority = self.credentials.authority();
        let message = match step {
            CaStep::Status => String::new(),
            CaStep::Start => {
                let set = authority.start_rotation()?;
                let next = set.next.as_ref().map(info_of).transpose()?;
                info!(next = ?next.map(|n| n.name), "CA rotation started: the new CA signs every certificate from now on");
                "rotation started: a new CA signs every certificate from now on and both are trusted; connected \
                 agents renew onto it now. Once `ferryctl ca status` lists no member on the old CA, run `ferryctl ca \
                 rotate finish`; admin ferryconfigs of the old CA stop working then (issue new ones with `ferryctl \
                 admin-credentials`)"
                    .to_string()
            }
            CaStep::Finish { force } => {
                let since = authority.get().rotating_since.ok_or(RotationError::NotRotating)?;
                let members = self.credentials.members_on_old_ca(since)?;
                if !members.is_empty() && !force {
                    return Err(ApiError::Conflict(format!(
                        "finishing now would lock out {} member(s) still on the old CA: {}. Bring their agents back \
                         (they renew onto the new CA as they connect), or give them new credentials with `ferryctl \
                         agent-credentials`, or pass --force to lock them out",
                        members.len(),
                        members.join(", ")
                    )));
                }
                authority.finish_rotation()?;
                warn!(locked_out = ?members, "CA rotation finished: only the new CA is trusted");
                let credentials = self.credentials.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RETIRE_AFTER).await;
                    match tokio::task::spawn_blocking(move || credentials.retire_issued_before(since)).await {
                        Ok(Ok(n)) => info!(revoked = n, "revoked the certificates of the retired CA"),
                        Ok(Err(e)) => warn!("failed to revoke the certificates of the retired CA: {e}"),
                        Err(e) => warn!("failed to revoke the certificates of the retired CA: {e}"),
                    }
                });
                let mut m = "rotation finished: only the new CA is trusted; the old CA's certificates are revoked and \
                             their connections closed"
                    .to_string();
                if !members.is_empty() {
                    m.push_str(&format!(
                        "; locked out (give them new credentials with `ferryctl agent-credentials`): {}",
                        members.join(", ")
                    ));
                }
                m
            }
        };
        let set = authority.get();
        let (membersonoldca, adminsonoldca) = match set.rotating_since {
            Some(since) => (self.credentials.members_on_old_ca(since)?, self.credentials.admins_on_old_ca(since)?),
            None => (Vec::new(), Vec::new()),
        };
        Ok(AdminResponse::Ca(Box::new(CaStatus {
            current: info_of(&set.current)?,
            next: set.next.as_ref().map(info_of).transpose()?,
            rotatingsince: set.rotating_since.map(Timestamp::from),
            membersonoldca,
            adminsonoldca,
            message,
        })))
    }
}
