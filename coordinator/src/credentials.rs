//! The agent certificates the coordinator issued (`AgentCredentials` resources, id = serial hex) and the
//! connections open with each: an agent certificate is accepted only while it is recorded and not revoked, and
//! revoking one closes its open connections at once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferry_common::protocol::RevokeTarget;
use ferry_common::resources::{
    AgentCredentialSpec, Resource, ResourceType, Spec, Timestamp, LABEL_CLUSTER, LABEL_MEMBER,
};
use ferry_common::tls::IssuedCert;
use tracing::info;

use crate::lock;
use crate::state::{StateError, StateStore};

/// QUIC close code of a connection whose certificate was revoked or is not recorded.
const CLOSE_REVOKED: u32 = 3;

/// Why an agent certificate is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// The coordinator has no record of this serial (issued by an older coordinator, or forged with the CA key).
    #[error("agent certificate {0} was never recorded by this coordinator; issue new credentials with `ferryctl agent-credentials`")]
    Unrecorded(String),
    /// Revoked by an operator or by re-issuing the member's credentials.
    #[error("agent certificate {0} is revoked; issue new credentials with `ferryctl agent-credentials`")]
    Revoked(String),
    /// The record names another member than the certificate (cannot happen with certificates Ferry issued).
    #[error("agent certificate {0} is recorded for another member")]
    Mismatch(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The registry; cheap to clone (a handle).
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<dyn StateStore>,
    /// Open connections by certificate serial, by a per-connection id.
    open: Mutex<HashMap<String, HashMap<u64, quinn::Connection>>>,
    next_id: AtomicU64,
}

/// An open connection registered under its certificate's serial; unregistered on drop.
pub struct OpenConnection {
    inner: Arc<Inner>,
    serial: String,
    id: u64,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        let mut open = lock(&self.inner.open);
        if let Some(conns) = open.get_mut(&self.serial) {
            conns.remove(&self.id);
            if conns.is_empty() {
                open.remove(&self.serial);
            }
        }
    }
}

impl Credentials {
    pub fn new(state: Arc<dyn StateStore>) -> Self {
        Self { inner: Arc::new(Inner { state, open: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1) }) }
    }

    /// Records a certificate just issued for `cluster`/`member` and revokes the member's older ones (closing
    /// their connections); returns the serials revoked.
    pub fn record(&self, cluster: &str, member: &str, issued: &IssuedCert) -> Result<Vec<String>, StateError> {
        let spec = AgentCredentialSpec {
            serial: issued.serial.clone(),
            cluster: cluster.to_string(),
            member: member.to_string(),
            issuedat: Timestamp::now(),
            notafter: Timestamp::from(issued.not_after),
            revoked: false,
            revokedat: None,
        };
        let mut r = Resource::new(issued.serial.clone(), Spec::AgentCredential(spec));
        r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
        r.metadata.labels.insert(LABEL_MEMBER.into(), member.into());
        self.inner.state.put(r)?;
        let older = self.serials(|s| s.cluster == cluster && s.member == member && s.serial != issued.serial)?;
        self.revoke_serials(&older)
    }

    /// Revokes what `target` names; returns the serials revoked now (already revoked ones are not repeated).
    pub fn revoke(&self, target: &RevokeTarget) -> Result<Vec<String>, StateError> {
        let serials = match target {
            RevokeTarget::Member { cluster, member } => {
                self.serials(|s| &s.cluster == cluster && &s.member == member)?
            }
            RevokeTarget::Serial(serial) => self.serials(|s| &s.serial == serial)?,
        };
        self.revoke_serials(&serials)
    }

    /// Whether a serial is recorded at all (revoked or not).
    pub fn known(&self, serial: &str) -> Result<bool, StateError> {
        Ok(self.inner.state.get(ResourceType::AgentCredential, serial)?.is_some())
    }

    /// Serials of unrevoked records matching `f`.
    fn serials(&self, f: impl Fn(&AgentCredentialSpec) -> bool) -> Result<Vec<String>, StateError> {
        Ok(self
            .inner
            .state
            .list(ResourceType::AgentCredential)?
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::AgentCredential(s) if !s.revoked && f(&s) => Some(s.serial),
                _ => None,
            })
            .collect())
    }

    fn revoke_serials(&self, serials: &[String]) -> Result<Vec<String>, StateError> {
        let mut revoked = Vec::new();
        for serial in serials {
            let mut changed = false;
            self.inner.state.transact(&mut |txn| {
                changed = false;
                if let Some(mut r) = txn.get(ResourceType::AgentCredential, serial)? {
                    if let Spec::AgentCredential(s) = &mut r.spec {
                        if !s.revoked {
                            s.revoked = true;
                            s.revokedat = Some(Timestamp::now());
                            txn.put(r)?;
                            changed = true;
                        }
                    }
                }
                Ok(())
            })?;
            // Closed after the record says revoked, so a reconnect is refused.
            let conns = lock(&self.inner.open).remove(serial).unwrap_or_default();
            for conn in conns.values() {
                conn.close(CLOSE_REVOKED.into(), b"agent certificate revoked");
            }
            if changed {
                info!(%serial, closed = conns.len(), "revoked agent certificate");
                revoked.push(serial.clone());
            }
        }
        Ok(revoked)
    }

    /// Registers an agent connection under its certificate's serial and then checks the certificate, in this
    /// order so that a revocation racing the check still closes the connection.
    pub fn admit(
        &self,
        serial: &str,
        cluster: &str,
        member: &str,
        conn: &quinn::Connection,
    ) -> Result<OpenConnection, Refused> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.open).entry(serial.to_string()).or_default().insert(id, conn.clone());
        let guard = OpenConnection { inner: self.inner.clone(), serial: serial.to_string(), id };
        match self.inner.state.get(ResourceType::AgentCredential, serial)? {
            None => Err(Refused::Unrecorded(serial.to_string())),
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if s.revoked => Err(Refused::Revoked(serial.into())),
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if s.cluster == cluster && s.member == member => {
                Ok(guard)
            }
            Some(_) => Err(Refused::Mismatch(serial.to_string())),
        }
    }
}
