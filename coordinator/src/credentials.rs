//! The certificates the coordinator issued (`AgentCredentials` and `AdminCredentials` resources, id = serial
//! hex) and the connections open with each: a certificate is accepted only while it is recorded and not
//! revoked, and revoking one closes its open connections at once. Agents are sent a renewed certificate over their link
//! once two thirds of their current one's life has passed ([`Credentials::renewal_due`], [`Credentials::renew`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::protocol::RevokeTarget;
use ferry_common::resources::{
    AdminCredentialSpec, AgentCredentialSpec, Resource, ResourceType, Spec, Timestamp, LABEL_CLUSTER, LABEL_MEMBER,
};
use ferry_common::tls::{CertAuthority, Identity, IssuedCert};
use tracing::info;

use crate::lock;
use crate::state::{StateError, StateStore};

/// QUIC close code of a connection whose certificate was revoked or is not recorded.
const CLOSE_REVOKED: u32 = 3;

/// A certificate is renewed once this share of its life has passed (60 days into a 90-day one), leaving a
/// third of it for an agent that was away, or failed to save the new one, to be renewed later.
const RENEW_AFTER_NUMERATOR: u32 = 2;
const RENEW_AFTER_DENOMINATOR: u32 = 3;

/// Why a certificate is refused.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    /// An admin certificate the coordinator has no record of.
    #[error("admin certificate {0} was never recorded by this coordinator; use the coordinator's admin.ferryconfig or one from `ferryctl admin-credentials`")]
    AdminUnrecorded(String),
    /// An admin certificate revoked by an operator.
    #[error("admin certificate {0} is revoked; get a new one from whoever holds the coordinator's admin.ferryconfig (`ferryctl admin-credentials`)")]
    AdminRevoked(String),
    /// The coordinator has no record of this serial (issued by an older coordinator, or forged with the CA key).
    #[error("agent certificate {0} was never recorded by this coordinator; issue new credentials with `ferryctl agent-credentials`")]
    Unrecorded(String),
    /// Revoked by an operator or by re-issuing the member's credentials.
    #[error("agent certificate {0} is revoked; issue new credentials with `ferryctl agent-credentials`")]
    Revoked(String),
    /// The record names another member, or access, than the certificate (cannot happen with certificates
    /// Ferry issued).
    #[error("certificate {0} is recorded for another identity")]
    Mismatch(String),
    /// Signing the renewed certificate failed.
    #[error("issue a renewed agent certificate: {0}")]
    Issue(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// When a recorded certificate was issued and how long it lives (its successor lives as long).
fn life(s: &AgentCredentialSpec) -> (SystemTime, Duration) {
    let at = |t: &Timestamp| UNIX_EPOCH + Duration::from_secs(u64::try_from(t.seconds).unwrap_or(0));
    let (issued, not_after) = (at(&s.issuedat), at(&s.notafter));
    (issued, not_after.duration_since(issued).unwrap_or_default().max(Duration::from_secs(60)))
}

/// The registry; cheap to clone (a handle).
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<dyn StateStore>,
    /// Signs renewed certificates.
    ca: CertAuthority,
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
    pub fn new(state: Arc<dyn StateStore>, ca: CertAuthority) -> Self {
        Self { inner: Arc::new(Inner { state, ca, open: Mutex::new(HashMap::new()), next_id: AtomicU64::new(1) }) }
    }

    /// Records a certificate just issued for `cluster`/`member` and revokes the member's older ones (closing
    /// their connections); returns the serials revoked.
    pub fn record(&self, cluster: &str, member: &str, issued: &IssuedCert) -> Result<Vec<String>, StateError> {
        self.put_record(cluster, member, issued)?;
        let older = self.serials(cluster, |s| s.member == member && s.serial != issued.serial)?;
        self.revoke_serials(ResourceType::AgentCredential, &older)
    }

    /// Records an admin certificate (full or read-only) just issued, or the coordinator's own
    /// `admin.ferryconfig` found unrecorded.
    pub fn record_admin(&self, serial: &str, read_only: bool, not_after: SystemTime) -> Result<(), StateError> {
        let spec = AdminCredentialSpec {
            serial: serial.to_string(),
            readonly: read_only,
            issuedat: Timestamp::now(),
            notafter: Timestamp::from(not_after),
            revoked: false,
            revokedat: None,
        };
        self.inner.state.put(Resource::new(serial.to_string(), Spec::AdminCredential(spec))).map(drop)
    }

    /// Whether the admin certificate `serial` is recorded, and if so whether it is revoked.
    pub fn admin_revoked(&self, serial: &str) -> Result<Option<bool>, StateError> {
        Ok(match self.inner.state.get(ResourceType::AdminCredential, serial)? {
            Some(Resource { spec: Spec::AdminCredential(s), .. }) => Some(s.revoked),
            _ => None,
        })
    }

    /// Revokes the admin certificate `serial` and closes its connections; `Ok(false)` when already revoked.
    pub fn revoke_admin(&self, serial: &str) -> Result<bool, StateError> {
        Ok(!self.revoke_serials(ResourceType::AdminCredential, &[serial.to_string()])?.is_empty())
    }

    /// The CA certificate (PEM) agents verify the coordinator with.
    pub fn ca_pem(&self) -> String {
        self.inner.ca.pem().cert_pem.clone()
    }

    /// When the agent certificate `serial` is due for renewal; `None` when it is not a recorded, unrevoked
    /// agent certificate.
    pub fn renewal_due(&self, serial: &str) -> Result<Option<SystemTime>, StateError> {
        Ok(self.live_record(serial)?.map(|s| {
            let (issued, lifetime) = life(&s);
            issued + lifetime * RENEW_AFTER_NUMERATOR / RENEW_AFTER_DENOMINATOR
        }))
    }

    /// Issues and records the successor of the agent certificate `serial` (same cluster, member and lifetime).
    /// `serial` stays valid until it expires or is revoked; successors issued from it before and never taken
    /// into use (the agent still presents `serial`) are revoked, so failed renewals do not pile up.
    pub fn renew(&self, serial: &str) -> Result<IssuedCert, Refused> {
        let s = self.live_record(serial)?.ok_or_else(|| Refused::Revoked(serial.to_string()))?;
        let (_, lifetime) = life(&s);
        let issued =
            self.inner.ca.issue_agent(&s.cluster, &s.member, lifetime).map_err(|e| Refused::Issue(e.to_string()))?;
        self.put_record(&s.cluster, &s.member, &issued)?;
        let unused =
            self.serials(&s.cluster, |o| o.member == s.member && o.serial != serial && o.serial != issued.serial)?;
        self.revoke_serials(ResourceType::AgentCredential, &unused)?;
        info!(cluster = %s.cluster, member = %s.member, old = %serial, new = %issued.serial, "renewed agent certificate");
        Ok(issued)
    }

    /// The unrevoked agent record of `serial`.
    fn live_record(&self, serial: &str) -> Result<Option<AgentCredentialSpec>, StateError> {
        Ok(match self.inner.state.get(ResourceType::AgentCredential, serial)? {
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if !s.revoked => Some(s),
            _ => None,
        })
    }

    fn put_record(&self, cluster: &str, member: &str, issued: &IssuedCert) -> Result<(), StateError> {
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
        self.inner.state.put(r).map(drop)
    }

    /// Revokes what `target` names; returns the serials revoked now (already revoked ones are not repeated).
    pub fn revoke(&self, target: &RevokeTarget) -> Result<Vec<String>, StateError> {
        let serials = match target {
            RevokeTarget::Member { cluster, member } => self.serials(cluster, |s| &s.member == member)?,
            RevokeTarget::Serial(serial) => self.live_record(serial)?.map(|s| s.serial).into_iter().collect(),
        };
        self.revoke_serials(ResourceType::AgentCredential, &serials)
    }

    /// Whether a serial is recorded at all (revoked or not).
    pub fn known(&self, serial: &str) -> Result<bool, StateError> {
        Ok(self.inner.state.get(ResourceType::AgentCredential, serial)?.is_some())
    }

    /// Serials of unrevoked records of `cluster` matching `f` (through the state's label index: a cluster's
    /// few records, not every agent's).
    fn serials(&self, cluster: &str, f: impl Fn(&AgentCredentialSpec) -> bool) -> Result<Vec<String>, StateError> {
        Ok(self
            .inner
            .state
            .list_labeled(ResourceType::AgentCredential, LABEL_CLUSTER, cluster)?
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::AgentCredential(s) if !s.revoked && s.cluster == cluster && f(&s) => Some(s.serial),
                _ => None,
            })
            .collect())
    }

    fn revoke_serials(&self, rt: ResourceType, serials: &[String]) -> Result<Vec<String>, StateError> {
        let mut revoked = Vec::new();
        for serial in serials {
            let mut changed = false;
            self.inner.state.transact(&mut |txn| {
                changed = false;
                if let Some(mut r) = txn.get(rt, serial)? {
                    let (revoked, revokedat) = match &mut r.spec {
                        Spec::AgentCredential(s) => (&mut s.revoked, &mut s.revokedat),
                        Spec::AdminCredential(s) => (&mut s.revoked, &mut s.revokedat),
                        _ => return Ok(()),
                    };
                    if !*revoked {
                        (*revoked, *revokedat) = (true, Some(Timestamp::now()));
                        txn.put(r)?;
                        changed = true;
                    }
                }
                Ok(())
            })?;
            // Closed after the record says revoked, so a reconnect is refused.
            let conns = lock(&self.inner.open).remove(serial).unwrap_or_default();
            for conn in conns.values() {
                conn.close(CLOSE_REVOKED.into(), b"certificate revoked");
            }
            if changed {
                info!(%serial, %rt, closed = conns.len(), "revoked certificate");
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
        identity: &Identity,
        conn: &quinn::Connection,
    ) -> Result<OpenConnection, Refused> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.inner.open).entry(serial.to_string()).or_default().insert(id, conn.clone());
        let guard = OpenConnection { inner: self.inner.clone(), serial: serial.to_string(), id };
        let (cluster, member) = match identity {
            Identity::Agent { cluster, member } => (cluster, member),
            Identity::Admin | Identity::AdminReadOnly => {
                let read_only = *identity == Identity::AdminReadOnly;
                return match self.inner.state.get(ResourceType::AdminCredential, serial)? {
                    Some(Resource { spec: Spec::AdminCredential(s), .. }) if s.revoked => {
                        Err(Refused::AdminRevoked(serial.into()))
                    }
                    Some(Resource { spec: Spec::AdminCredential(s), .. }) if s.readonly == read_only => Ok(guard),
                    Some(_) => Err(Refused::Mismatch(serial.to_string())),
                    None => Err(Refused::AdminUnrecorded(serial.to_string())),
                };
            }
        };
        match self.inner.state.get(ResourceType::AgentCredential, serial)? {
            None => Err(Refused::Unrecorded(serial.to_string())),
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if s.revoked => Err(Refused::Revoked(serial.into())),
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if &s.cluster == cluster && &s.member == member => {
                Ok(guard)
            }
            Some(_) => Err(Refused::Mismatch(serial.to_string())),
        }
    }
}
