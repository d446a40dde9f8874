//! The certificates the coordinator issued (`AgentCredentials` and `AdminCredentials` resources, id = serial
//! hex) and the connections open with each: a certificate is accepted only while it is recorded and not
//! revoked, and revoking one closes its open connections at once. Agents renew over their link once two thirds of
//! their current certificate's life has passed ([`Credentials::renewal_due`], [`Credentials::renew`]): the agent
//! sends a signing request, the coordinator signs the request's key for the connection's own identity.
//!
//! A renewed certificate records its predecessor (`renewedfrom`). The first connection that presents it revokes
//! the predecessor (`supersededby`), and a certificate whose successor was saved or used is never renewed again:
//! an old copy of a certificate (a stolen one) can neither renew itself nor revoke the real agent's newer one,
//! and when it connects it is refused, logged and counted (`ferry_agent_predecessor_certificate_used_total`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_common::protocol::RevokeTarget;
use ferry_common::resources::{
    AdminCredentialSpec, AgentCredentialSpec, Resource, ResourceType, Spec, Timestamp, LABEL_CLUSTER, LABEL_MEMBER,
};
use ferry_common::tls::{csr_public_key, Identity, IssuedCert, SignedCert};
use tracing::{info, warn};

use crate::lock;
use crate::metrics::{Metrics, SerialLabels};
use crate::pki::Authority;
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
    /// An old copy of a certificate whose renewed successor is in use (revoked when the successor was first
    /// used): whoever presents it is not the agent, which moved on.
    #[error("agent certificate {serial} was renewed and its successor {successor} is in use; this is an old copy of it (stolen?), refused")]
    Superseded { serial: String, successor: String },
    /// A renewal asked of a certificate whose successor was already saved or used.
    #[error("agent certificate {0} was renewed already; its successor is saved or in use, it is not renewed again")]
    AlreadyRenewed(String),
    /// The agent's signing request is unreadable or its signature does not check.
    #[error("the signing request is refused: {0}")]
    Csr(String),
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

/// When a certificate is due for renewal, and how long it lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renewal {
    pub due: SystemTime,
    pub lifetime: Duration,
}

/// Unix seconds of a timestamp, for gauges.
fn unix_seconds(t: &Timestamp) -> f64 {
    t.seconds as f64
}

/// The registry; cheap to clone (a handle).
#[derive(Clone)]
pub struct Credentials {
    inner: Arc<Inner>,
}

struct Inner {
    state: Arc<dyn StateStore>,
    /// Signs renewed certificates.
    authority: Arc<Authority>,
    metrics: Arc<Metrics>,
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
    pub fn new(state: Arc<dyn StateStore>, authority: Arc<Authority>, metrics: Arc<Metrics>) -> Self {
        let open = Mutex::new(HashMap::new());
        Self { inner: Arc::new(Inner { state, authority, metrics, open, next_id: AtomicU64::new(1) }) }
    }

    /// Members with a live certificate issued before `since` (of the CA a rotation retires) and none issued
    /// since that a connection used: finishing the rotation would lock them out (`cluster/member`, sorted).
    pub fn members_on_old_ca(&self, since: SystemTime) -> Result<Vec<String>, StateError> {
        let (since, now) = (Timestamp::from(since), Timestamp::now());
        let mut old: std::collections::BTreeMap<String, bool> = std::collections::BTreeMap::new();
        for r in self.inner.state.list(ResourceType::AgentCredential)? {
            let Spec::AgentCredential(s) = r.spec else { continue };
            if s.revoked || s.notafter <= now {
                continue;
            }
            let member = format!("{}/{}", s.cluster, s.member);
            if s.issuedat < since {
                old.entry(member).or_insert(true);
            } else if s.firstusedat.is_some() {
                old.insert(member, false);
            }
        }
        Ok(old.into_iter().filter(|(_, on_old)| *on_old).map(|(m, _)| m).collect())
    }

    /// Serials of the live admin certificates issued before `since` (of the CA a rotation retires).
    pub fn admins_on_old_ca(&self, since: SystemTime) -> Result<Vec<String>, StateError> {
        let (since, now) = (Timestamp::from(since), Timestamp::now());
        Ok(self
            .inner
            .state
            .list(ResourceType::AdminCredential)?
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::AdminCredential(s) if !s.revoked && s.notafter > now && s.issuedat < since => Some(s.serial),
                _ => None,
            })
            .collect())
    }

    /// Revokes every live certificate, agent's or admin's, issued before `since` (the CA that signed them is
    /// retired) and closes their connections; returns how many.
    pub fn retire_issued_before(&self, since: SystemTime) -> Result<usize, StateError> {
        let ts = Timestamp::from(since);
        let agents: Vec<String> = self
            .inner
            .state
            .list(ResourceType::AgentCredential)?
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::AgentCredential(s) if !s.revoked && s.issuedat < ts => Some(s.serial),
                _ => None,
            })
            .collect();
        let admins = self.admins_on_old_ca(since)?;
        let n = self.revoke_serials(ResourceType::AgentCredential, &agents)?.len();
        Ok(n + self.revoke_serials(ResourceType::AdminCredential, &admins)?.len())
    }

    /// Sets the certificate expiry gauges from the records (at the start of a term of leadership): the newest
    /// unrevoked certificate of every member, every unrevoked, unexpired full admin certificate.
    pub fn seed_metrics(&self) -> Result<(), StateError> {
        let mut newest: HashMap<(String, String), f64> = HashMap::new();
        for r in self.inner.state.list(ResourceType::AgentCredential)? {
            if let Spec::AgentCredential(s) = r.spec {
                if !s.revoked {
                    let e = newest.entry((s.cluster, s.member)).or_insert(f64::MIN);
                    *e = e.max(unix_seconds(&s.notafter));
                }
            }
        }
        for ((cluster, member), not_after) in newest {
            self.inner
                .metrics
                .agent_certificate_expiry
                .get_or_create(&self.inner.metrics.member_series(&cluster, &member))
                .set(not_after);
        }
        let now = Timestamp::now().seconds;
        for r in self.inner.state.list(ResourceType::AdminCredential)? {
            if let Spec::AdminCredential(s) = r.spec {
                if !s.revoked && !s.readonly && s.notafter.seconds > now {
                    self.admin_gauge(&s.serial, Some(unix_seconds(&s.notafter)));
                }
            }
        }
        Ok(())
    }

    fn admin_gauge(&self, serial: &str, not_after: Option<f64>) {
        let labels = SerialLabels { serial: serial.to_string() };
        match not_after {
            Some(t) => {
                self.inner.metrics.admin_certificate_expiry.get_or_create(&labels).set(t);
            }
            None => {
                self.inner.metrics.admin_certificate_expiry.remove(&labels);
            }
        }
    }

    /// Sets `ferry_agent_certificate_expiry_timestamp_seconds` of one member from its records (removed when it
    /// has no unrevoked certificate). A failure to read leaves the gauge as it was.
    fn refresh_expiry(&self, cluster: &str, member: &str) {
        let records = match self.inner.state.list_labeled(ResourceType::AgentCredential, LABEL_CLUSTER, cluster) {
            Ok(r) => r,
            Err(e) => return warn!(%cluster, %member, "failed to read agent certificates for their expiry metric: {e}"),
        };
        let newest = records
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::AgentCredential(s) if !s.revoked && s.cluster == cluster && s.member == member => {
                    Some(unix_seconds(&s.notafter))
                }
                _ => None,
            })
            .reduce(f64::max);
        let labels = self.inner.metrics.member_series(cluster, member);
        match newest {
            Some(t) => {
                self.inner.metrics.agent_certificate_expiry.get_or_create(&labels).set(t);
            }
            None => {
                self.inner.metrics.agent_certificate_expiry.remove(&labels);
            }
        }
    }

    /// Records a certificate just issued for `cluster`/`member` and revokes the member's older ones (closing
    /// their connections); returns the serials revoked.
    pub fn record(&self, cluster: &str, member: &str, issued: &IssuedCert) -> Result<Vec<String>, StateError> {
        self.put_record(cluster, member, &issued.serial, issued.not_after, None)?;
        let older = self.serials(cluster, |s| s.member == member && s.serial != issued.serial)?;
        let revoked = self.revoke_serials(ResourceType::AgentCredential, &older)?;
        self.refresh_expiry(cluster, member);
        Ok(revoked)
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
        self.inner.state.put(Resource::new(serial.to_string(), Spec::AdminCredential(spec)))?;
        if !read_only {
            self.admin_gauge(serial, Some(unix_seconds(&Timestamp::from(not_after))));
        }
        Ok(())
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

    /// The CA certificates (PEM) agents verify the coordinator with: both during a rotation.
    pub fn ca_pem(&self) -> String {
        self.inner.authority.get().trust_pem()
    }

    /// The CAs in force.
    pub fn authority(&self) -> &Arc<Authority> {
        &self.inner.authority
    }

    /// When the agent certificate `serial` is due for renewal; `None` when it is not a recorded, unrevoked
    /// agent certificate, or when it was renewed already (a successor was saved or used).
    pub fn renewal_due(&self, serial: &str) -> Result<Option<Renewal>, StateError> {
        let Some(s) = self.live_record(serial)? else { return Ok(None) };
        if self.renewed_successor(&s)?.is_some() {
            return Ok(None);
        }
        let (issued, lifetime) = life(&s);
        Ok(Some(Renewal { due: issued + lifetime * RENEW_AFTER_NUMERATOR / RENEW_AFTER_DENOMINATOR, lifetime }))
    }

    /// A successor of `s` the agent saved or a connection used, if any.
    fn renewed_successor(&self, s: &AgentCredentialSpec) -> Result<Option<String>, StateError> {
        Ok(self
            .records(&s.cluster, |o| {
                o.member == s.member
                    && o.renewedfrom.as_deref() == Some(s.serial.as_str())
                    && (o.savedat.is_some() || o.firstusedat.is_some())
            })?
            .into_iter()
            .next()
            .map(|o| o.serial))
    }

    /// Signs the key of the agent's signing request `csr_pem` as the successor of the agent certificate
    /// `serial`: the same cluster and member as `serial`'s record (nothing of the request but its key is used)
    /// and the same lifetime, recorded with `renewedfrom = serial`. `serial` stays valid until the successor
    /// is first used (then it is revoked), it expires or it is revoked. Refused for a revoked certificate and
    /// for one renewed already (a successor saved or used); successors issued from `serial` before and never
    /// saved nor used (a lost answer) are revoked, so failed renewals do not pile up.
    pub fn renew(&self, serial: &str, csr_pem: &str) -> Result<SignedCert, Refused> {
        let s = self.live_record(serial)?.ok_or_else(|| Refused::Revoked(serial.to_string()))?;
        if self.renewed_successor(&s)?.is_some() {
            return Err(Refused::AlreadyRenewed(serial.to_string()));
        }
        let key = csr_public_key(csr_pem).map_err(|e| Refused::Csr(e.to_string()))?;
        let (_, lifetime) = life(&s);
        let cas = self.inner.authority.get();
        let signed = cas
            .signer()
            .issue_agent_for_key(&s.cluster, &s.member, lifetime, &key)
            .map_err(|e| Refused::Issue(e.to_string()))?;
        self.put_record(&s.cluster, &s.member, &signed.serial, signed.not_after, Some(serial))?;
        // A rotation step between signing and recording would date an old CA's certificate as the new one's
        // (a rotation judges records by their issue time): that one is not handed out, the renewal is retried.
        if !Arc::ptr_eq(&cas, &self.inner.authority.get()) {
            self.revoke_serials(ResourceType::AgentCredential, std::slice::from_ref(&signed.serial))?;
            return Err(Refused::Issue("the CAs changed while renewing; it is retried".into()));
        }
        let unused = self.serials(&s.cluster, |o| {
            o.member == s.member && o.renewedfrom.as_deref() == Some(serial) && o.serial != signed.serial
        })?;
        self.revoke_serials(ResourceType::AgentCredential, &unused)?;
        self.refresh_expiry(&s.cluster, &s.member);
        info!(cluster = %s.cluster, member = %s.member, old = %serial, new = %signed.serial, "renewed agent certificate");
        Ok(signed)
    }

    /// The agent answered that it saved the renewed certificate `serial`: its predecessor is not renewed again.
    pub fn mark_saved(&self, serial: &str) -> Result<(), StateError> {
        self.inner.state.transact(&mut |txn| {
            if let Some(mut r) = txn.get(ResourceType::AgentCredential, serial)? {
                if let Spec::AgentCredential(s) = &mut r.spec {
                    if s.savedat.is_none() {
                        s.savedat = Some(Timestamp::now());
                        txn.put(r)?;
                    }
                }
            }
            Ok(())
        })
    }

    /// The unrevoked agent record of `serial`.
    fn live_record(&self, serial: &str) -> Result<Option<AgentCredentialSpec>, StateError> {
        Ok(match self.inner.state.get(ResourceType::AgentCredential, serial)? {
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if !s.revoked => Some(s),
            _ => None,
        })
    }

    fn put_record(
        &self,
        cluster: &str,
        member: &str,
        serial: &str,
        not_after: SystemTime,
        renewed_from: Option<&str>,
    ) -> Result<(), StateError> {
        let spec = AgentCredentialSpec {
            serial: serial.to_string(),
            cluster: cluster.to_string(),
            member: member.to_string(),
            issuedat: Timestamp::now(),
            notafter: Timestamp::from(not_after),
            renewedfrom: renewed_from.map(str::to_string),
            ..AgentCredentialSpec::default()
        };
        let mut r = Resource::new(serial.to_string(), Spec::AgentCredential(spec));
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

    /// Unrevoked records of `cluster` matching `f` (through the state's label index: a cluster's few records,
    /// not every agent's).
    fn records(
        &self,
        cluster: &str,
        f: impl Fn(&AgentCredentialSpec) -> bool,
    ) -> Result<Vec<AgentCredentialSpec>, StateError> {
        Ok(self
            .inner
            .state
            .list_labeled(ResourceType::AgentCredential, LABEL_CLUSTER, cluster)?
            .into_iter()
            .filter_map(|r| match r.spec {
                Spec::AgentCredential(s) if !s.revoked && s.cluster == cluster && f(&s) => Some(s),
                _ => None,
            })
            .collect())
    }

    /// Serials of unrevoked records of `cluster` matching `f`.
    fn serials(&self, cluster: &str, f: impl Fn(&AgentCredentialSpec) -> bool) -> Result<Vec<String>, StateError> {
        Ok(self.records(cluster, f)?.into_iter().map(|s| s.serial).collect())
    }

    fn revoke_serials(&self, rt: ResourceType, serials: &[String]) -> Result<Vec<String>, StateError> {
        self.revoke_serials_for(rt, serials, None)
    }

    /// Revokes `serials`; with `superseded_by`, records that successor as the reason (an agent record).
    fn revoke_serials_for(
        &self,
        rt: ResourceType,
        serials: &[String],
        superseded_by: Option<&str>,
    ) -> Result<Vec<String>, StateError> {
        let mut revoked = Vec::new();
        for serial in serials {
            let mut changed = false;
            let mut member = None;
            self.inner.state.transact(&mut |txn| {
                changed = false;
                if let Some(mut r) = txn.get(rt, serial)? {
                    let (revoked, revokedat) = match &mut r.spec {
                        Spec::AgentCredential(s) => {
                            member = Some((s.cluster.clone(), s.member.clone()));
                            if !s.revoked {
                                s.supersededby = superseded_by.map(str::to_string);
                            }
                            (&mut s.revoked, &mut s.revokedat)
                        }
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
                info!(%serial, %rt, closed = conns.len(), superseded_by, "revoked certificate");
                revoked.push(serial.clone());
                match &member {
                    Some((cluster, member)) => self.refresh_expiry(cluster, member),
                    None => self.admin_gauge(serial, None),
                }
            }
        }
        Ok(revoked)
    }

    /// A connection presents the agent certificate `s` (recorded, unrevoked): records its first use and, when
    /// it renewed a predecessor, revokes that one (closing its connections) as superseded by `s`.
    fn used(&self, s: &AgentCredentialSpec) -> Result<(), StateError> {
        if s.firstusedat.is_none() {
            let serial = s.serial.clone();
            self.inner.state.transact(&mut |txn| {
                if let Some(mut r) = txn.get(ResourceType::AgentCredential, &serial)? {
                    if let Spec::AgentCredential(s) = &mut r.spec {
                        if s.firstusedat.is_none() {
                            s.firstusedat = Some(Timestamp::now());
                            txn.put(r)?;
                        }
                    }
                }
                Ok(())
            })?;
        }
        if let Some(predecessor) = &s.renewedfrom {
            if self.live_record(predecessor)?.is_some() {
                let revoked = self.revoke_serials_for(
                    ResourceType::AgentCredential,
                    std::slice::from_ref(predecessor),
                    Some(&s.serial),
                )?;
                if !revoked.is_empty() {
                    info!(cluster = %s.cluster, member = %s.member, old = %predecessor, new = %s.serial,
                        "the renewed agent certificate is in use; revoked its predecessor");
                }
            }
        }
        Ok(())
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
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if &s.cluster != cluster || &s.member != member => {
                Err(Refused::Mismatch(serial.to_string()))
            }
            Some(Resource { spec: Spec::AgentCredential(s), .. }) if s.revoked => match s.supersededby {
                Some(successor) => {
                    warn!(%cluster, %member, %serial, %successor,
                        "an agent certificate whose renewed successor is in use was presented: an old copy (stolen?)");
                    self.inner
                        .metrics
                        .agent_predecessor_used
                        .get_or_create(&self.inner.metrics.member_series(cluster, member))
                        .inc();
                    Err(Refused::Superseded { serial: serial.to_string(), successor })
                }
                None => Err(Refused::Revoked(serial.into())),
            },
            Some(Resource { spec: Spec::AgentCredential(s), .. }) => {
                self.used(&s)?;
                Ok(guard)
            }
            Some(_) => Err(Refused::Mismatch(serial.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RedbStore;

    fn spec(c: &Credentials, serial: &str) -> AgentCredentialSpec {
        match c.inner.state.get(ResourceType::AgentCredential, serial).unwrap() {
            Some(Resource { spec: Spec::AgentCredential(s), .. }) => s,
            other => panic!("no agent record {serial}: {other:?}"),
        }
    }

    fn csr() -> String {
        let other = Identity::Agent { cluster: "other".into(), member: "m9".into() };
        ferry_common::tls::new_key_and_csr(&other).unwrap().csr_pem
    }

    #[test]
    fn a_used_successor_revokes_its_predecessor_which_is_never_renewed_again() {
        let dir = tempfile::tempdir().unwrap();
        let state: Arc<dyn StateStore> = Arc::new(RedbStore::open(&dir.path().join("state.redb")).unwrap());
        let authority =
            Authority::load(crate::pki::Keys::Dir(dir.path().to_path_buf()), "127.0.0.1:1".parse().unwrap(), &[])
                .unwrap();
        let set = authority.get();
        let ca = &set.current;
        let metrics = Arc::new(Metrics::default());
        let c = Credentials::new(state, authority.clone(), metrics.clone());
        let first = ca.issue_agent("prod", "m1", Duration::from_secs(120)).unwrap();
        c.record("prod", "m1", &first).unwrap();
        let due = c.renewal_due(&first.serial).unwrap().unwrap();
        assert_eq!(due.lifetime, Duration::from_secs(120));

        // A lost answer: the successor stays valid, and a second renewal from `first` revokes it.
        let lost = c.renew(&first.serial, &csr()).unwrap();
        assert_eq!(
            Identity::from_pem(&lost.cert_pem).unwrap(),
            Identity::Agent { cluster: "prod".into(), member: "m1".into() },
            "the CSR's names are ignored"
        );
        assert!(!spec(&c, &lost.serial).revoked);
        let second = c.renew(&first.serial, &csr()).unwrap();
        assert!(spec(&c, &lost.serial).revoked, "an unused successor of the same predecessor is revoked");
        assert_eq!(spec(&c, &second.serial).renewedfrom.as_deref(), Some(first.serial.as_str()));
        assert!(c.renew(&first.serial, "junk").is_err_and(|e| matches!(e, Refused::Csr(_))));

        // Saved: `first` is not renewed again, but stays valid until the successor is used.
        c.mark_saved(&second.serial).unwrap();
        assert_eq!(c.renewal_due(&first.serial).unwrap(), None);
        assert!(matches!(c.renew(&first.serial, &csr()), Err(Refused::AlreadyRenewed(_))));
        assert!(!spec(&c, &first.serial).revoked);

        // Used: `first` is revoked as superseded; the successor renews normally.
        c.used(&spec(&c, &second.serial)).unwrap();
        let old = spec(&c, &first.serial);
        assert!(old.revoked && old.supersededby.as_deref() == Some(second.serial.as_str()), "{old:?}");
        assert!(spec(&c, &second.serial).firstusedat.is_some());
        assert!(matches!(c.renew(&first.serial, &csr()), Err(Refused::Revoked(_))));
        assert!(c.renewal_due(&second.serial).unwrap().is_some());
        let text = metrics.render();
        let expiry = "ferry_agent_certificate_expiry_timestamp_seconds{cluster=\"prod\",member=\"m1\"}";
        assert!(text.contains(expiry), "{text}");
    }
}
