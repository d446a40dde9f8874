//! The coordinator's certificates: a CA created on first start, a server certificate re-issued at every start
//! (so `--advertise-name` changes take effect), and `admin.ferryconfig`.
//!
//! The CA and the QUIC keys live in the state dir ([`Keys::Dir`]) or, for replicas sharing a state etcd, in
//! the state store ([`Keys::Shared`]), so every replica signs with the same CA and agents trust them all.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use ferry_common::config::{create_private_dir, read_secret, write_private, FerryConfig};
use ferry_common::tls::{issued_by, pem_serial_and_expiry, quinn_server_config, CertAuthority, Identity};
use rustls::pki_types::pem::PemObject;

use crate::credentials::Credentials;

use crate::state::{StateError, StateStore};

pub const ADMIN_CONFIG: &str = "admin.ferryconfig";

/// Life of the certificate in the coordinator's own `admin.ferryconfig` when it is re-issued: it sits in the
/// private state dir and is rotated by revoking it and restarting (see `docs/SECURITY.md`).
const OWN_ADMIN_VALIDITY: Duration = Duration::from_secs(3650 * 86_400);

/// Where the CA and the QUIC keys are kept.
#[derive(Clone)]
pub enum Keys {
    /// Files under `<state dir>/pki` (one coordinator).
    Dir(PathBuf),
    /// Blobs of the shared state store (replicas).
    Shared(Arc<dyn StateStore>),
}

/// The CAs as stored: the shared blob `ca`, or `pki/ca-set.json` once a single coordinator has rotated
/// (before that its CA is `pki/ca.crt` and `pki/ca.key`).
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct CaBlob {
    cert_pem: String,
    key_pem: String,
    /// The CA a rotation moves to.
    #[serde(default)]
    next: Option<NextBlob>,
}

#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct NextBlob {
    cert_pem: String,
    key_pem: String,
    /// When the rotation started (unix ms).
    since_ms: u64,
}

/// The CAs in force. `current` signs the coordinator's server certificate. During a rotation `next` signs
/// every certificate issued to a client and clients are told to trust both, so agents move onto `next` by
/// renewing while those not yet renewed still connect; finishing makes `next` current and the old CA is
/// trusted no more.
pub struct CaSet {
    pub current: CertAuthority,
    pub next: Option<CertAuthority>,
    /// When the rotation started: certificates recorded since were signed by `next`.
    pub rotating_since: Option<SystemTime>,
}

impl CaSet {
    /// The CA that signs client certificates.
    pub fn signer(&self) -> &CertAuthority {
        self.next.as_ref().unwrap_or(&self.current)
    }

    /// What clients trust (PEM): both CAs during a rotation.
    pub fn trust_pem(&self) -> String {
        let mut pem = self.current.pem().cert_pem.clone();
        if let Some(next) = &self.next {
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(&next.pem().cert_pem);
        }
        pem
    }

    /// Whether the DER certificate `der` was signed by [`CaSet::signer`].
    pub fn signed_by_signer(&self, der: &[u8]) -> bool {
        issued_by(der, &self.signer().pem().cert_pem).unwrap_or(false)
    }

    fn from_blob(blob: &CaBlob) -> Result<Self> {
        let current = CertAuthority::from_pem(&blob.cert_pem, &blob.key_pem).context("load the coordinator CA")?;
        let (next, rotating_since) = match &blob.next {
            Some(n) => (
                Some(CertAuthority::from_pem(&n.cert_pem, &n.key_pem).context("load the CA a rotation moves to")?),
                Some(UNIX_EPOCH + Duration::from_millis(n.since_ms)),
            ),
            None => (None, None),
        };
        Ok(Self { current, next, rotating_since })
    }
}

/// Why a rotation step is refused.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error("a CA rotation is already under way (since {0}); finish it with `ferryctl ca rotate finish`")]
    AlreadyRotating(String),
    #[error("no CA rotation is under way; start one with `ferryctl ca rotate start`")]
    NotRotating,
    #[error("the CA changed meanwhile (another replica rotated it?); check `ferryctl ca status` and retry")]
    Raced,
    #[error("{0:#}")]
    Failed(anyhow::Error),
}

impl From<anyhow::Error> for RotationError {
    fn from(e: anyhow::Error) -> Self {
        Self::Failed(e)
    }
}

impl From<StateError> for RotationError {
    fn from(e: StateError) -> Self {
        Self::Failed(e.into())
    }
}

/// The one owner of the CAs in force: everything that issues or trusts certificates reads them here, so a
/// rotation step (or another replica's, seen by [`Authority::reload`]) reaches them all at once.
pub struct Authority {
    keys: Keys,
    /// The set, what it was read from, and those stored bytes (what a rotation step replaces).
    set: Mutex<(Arc<CaSet>, CaBlob, Vec<u8>)>,
    changed: tokio::sync::watch::Sender<u64>,
    /// The names and IPs the server certificate is for.
    server_names: Vec<String>,
}

impl Authority {
    /// Loads the CAs (making the first one on a first start).
    pub fn load(keys: Keys, listen: SocketAddr, advertise: &[String]) -> Result<Arc<Self>> {
        let (blob, raw) = read_blob(&keys)?;
        let set = CaSet::from_blob(&blob)?;
        let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        if !listen.ip().is_unspecified() {
            names.push(listen.ip().to_string());
        }
        names.extend(advertise.iter().cloned());
        names.dedup();
        let (changed, _) = tokio::sync::watch::channel(0);
        Ok(Arc::new(Self { keys, set: Mutex::new((Arc::new(set), blob, raw)), changed, server_names: names }))
    }

    /// The CAs in force now.
    pub fn get(&self) -> Arc<CaSet> {
        crate::lock(&self.set).0.clone()
    }

    /// Changes whenever the CAs in force change.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A server config: a fresh server certificate of the current CA, client certificates of every trusted CA.
    pub fn server_config(&self) -> Result<quinn::ServerConfig> {
        let set = self.get();
        let server =
            set.current.issue_server(&self.server_names).context("issue the coordinator's server certificate")?;
        Ok(quinn_server_config(&set.trust_pem(), &server)?)
    }

    /// Reads the stored CAs again (another replica may have rotated them); `true` when they changed.
    pub fn reload(&self) -> Result<bool> {
        let (blob, raw) = read_blob(&self.keys)?;
        let mut held = crate::lock(&self.set);
        if held.1 == blob {
            return Ok(false);
        }
        *held = (Arc::new(CaSet::from_blob(&blob)?), blob, raw);
        drop(held);
        self.changed.send_modify(|g| *g += 1);
        Ok(true)
    }

    /// Starts a rotation: a new CA is made, trusted beside the current one and signs every client
    /// certificate from now on.
    pub fn start_rotation(&self) -> Result<Arc<CaSet>, RotationError> {
        self.step(|blob| {
            if let Some(n) = &blob.next {
                let since = ferry_common::resources::Timestamp::from(UNIX_EPOCH + Duration::from_millis(n.since_ms));
                return Err(RotationError::AlreadyRotating(since.human()));
            }
            let ca = CertAuthority::generate().context("create the new CA")?;
            let since_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            Ok(CaBlob {
                next: Some(NextBlob {
                    cert_pem: ca.pem().cert_pem.clone(),
                    key_pem: ca.pem().key_pem.clone(),
                    since_ms,
                }),
                ..blob.clone()
            })
        })
    }

    /// Finishes a rotation: the new CA becomes the only one (the caller has checked who would be locked out).
    pub fn finish_rotation(&self) -> Result<Arc<CaSet>, RotationError> {
        self.step(|blob| {
            let next = blob.next.as_ref().ok_or(RotationError::NotRotating)?;
            Ok(CaBlob { cert_pem: next.cert_pem.clone(), key_pem: next.key_pem.clone(), next: None })
        })
    }

    fn step(&self, f: impl FnOnce(&CaBlob) -> Result<CaBlob, RotationError>) -> Result<Arc<CaSet>, RotationError> {
        // Another replica's step first, so this one starts from what is stored.
        self.reload()?;
        let mut held = crate::lock(&self.set);
        let new = f(&held.1)?;
        let set = Arc::new(CaSet::from_blob(&new)?);
        let raw = write_blob(&self.keys, &held.2, &new)?;
        *held = (set.clone(), new, raw);
        drop(held);
        self.changed.send_modify(|g| *g += 1);
        Ok(set)
    }
}

fn read_blob(keys: &Keys) -> Result<(CaBlob, Vec<u8>)> {
    let dir = match keys {
        Keys::Dir(dir) => dir.join("pki"),
        Keys::Shared(state) => {
            let blob = state.blob_or_create("ca", &mut || {
                let ca = CertAuthority::generate().map_err(|e| StateError::Etcd(format!("create the CA: {e}")))?;
                tracing::info!("created a new certificate authority in the state store");
                serde_json::to_vec(&CaBlob {
                    cert_pem: ca.pem().cert_pem.clone(),
                    key_pem: ca.pem().key_pem.clone(),
                    next: None,
                })
                .map_err(StateError::Encode)
            })?;
            let parsed = serde_json::from_slice(&blob).context("the CA in the state store is unreadable")?;
            return Ok((parsed, blob));
        }
    };
    create_private_dir(&dir).with_context(|| format!("create {} (0700)", dir.display()))?;
    let set = dir.join(CA_SET);
    if set.exists() {
        let raw = read_secret(&set)?;
        let parsed = serde_json::from_str(&raw)
            .with_context(|| format!("{} is unreadable; restore it from a copy of the state dir", set.display()))?;
        return Ok((parsed, raw.into_bytes()));
    }
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if crt.exists() && key.exists() {
        let cert_pem = fs::read_to_string(&crt).with_context(|| format!("read {}", crt.display()))?;
        Ok((CaBlob { cert_pem, key_pem: read_secret(&key)?, next: None }, Vec::new()))
    } else {
        let ca = CertAuthority::generate().context("create the coordinator CA")?;
        write_private(&key, ca.pem().key_pem.as_bytes())?;
        fs::write(&crt, &ca.pem().cert_pem).with_context(|| format!("write {}", crt.display()))?;
        tracing::info!(path = %crt.display(), "created a new certificate authority");
        Ok((CaBlob { cert_pem: ca.pem().cert_pem.clone(), key_pem: ca.pem().key_pem.clone(), next: None }, Vec::new()))
    }
}

/// A single coordinator's CAs once rotated: one file, replaced in one rename, so a crash leaves either step.
const CA_SET: &str = "ca-set.json";

/// Stores `new` in place of the stored bytes `old`; returns what was stored.
fn write_blob(keys: &Keys, old: &[u8], new: &CaBlob) -> Result<Vec<u8>, RotationError> {
    let bytes = serde_json::to_vec(new).map_err(|e| RotationError::Failed(e.into()))?;
    match keys {
        Keys::Shared(state) => {
            if !state.replace_blob("ca", old, &bytes)? {
                return Err(RotationError::Raced);
            }
        }
        Keys::Dir(dir) => {
            let dir = dir.join("pki");
            write_private(&dir.join(CA_SET), &bytes).map_err(|e| RotationError::Failed(e.into()))?;
            if new.next.is_none() {
                // `ca.crt` is what an operator looks at; `ca-set.json` is what is loaded.
                let _ = fs::rename(dir.join("ca.key"), dir.join("ca.key.retired"));
                let _ = fs::rename(dir.join("ca.crt"), dir.join("ca.crt.retired"));
                write_private(&dir.join("ca.key"), new.key_pem.as_bytes())
                    .map_err(|e| RotationError::Failed(e.into()))?;
                fs::write(dir.join("ca.crt"), &new.cert_pem)
                    .map_err(|e| RotationError::Failed(anyhow::Error::from(e).context("write ca.crt")))?;
            }
        }
    }
    Ok(bytes)
}

/// Makes sure `admin.ferryconfig` exists in `state_dir`, names every replica and trusts the CAs in force.
/// `replicas` are the client addresses of every replica (written into `admin.ferryconfig` so ferryctl reaches
/// whichever is up); empty for a single coordinator.
pub fn init(
    authority: &Authority,
    state_dir: &Path,
    listen: SocketAddr,
    advertise: &[String],
    replicas: &[String],
) -> Result<()> {
    let set = authority.get();
    // This replica first, so ferryctl on its machine dials it first; the others after it.
    let own = client_address(listen, advertise);
    let address = std::iter::once(own.clone())
        .chain(replicas.iter().filter(|r| **r != own).cloned())
        .collect::<Vec<_>>()
        .join(",");
    let path = state_dir.join(ADMIN_CONFIG);
    if path.exists() {
        let mut cfg = FerryConfig::load(&path)?;
        if cfg.coordinator != address {
            cfg.coordinator = address;
            cfg.save(&path)?;
        }
    } else {
        let admin = set.signer().issue_client(&Identity::Admin).context("issue the admin certificate")?;
        FerryConfig { coordinator: address, ca: set.trust_pem(), cert: admin.cert_pem, key: admin.key_pem }
            .save(&path)?;
        tracing::info!(path = %path.display(), "wrote admin credentials for ferryctl");
    }
    Ok(())
}

/// Makes sure the certificate in this coordinator's own `admin.ferryconfig` is recorded (it is on first start,
/// and when written by an older version), and writes a new one when it was revoked, has expired or is not of
/// the CA that signs now (a rotation, or a state dir reused with a new state etcd): revoking it and restarting
/// the coordinator is how the file is rotated.
pub fn ensure_own_admin(authority: &Authority, state_dir: &Path, credentials: &Credentials) -> Result<()> {
    let set = authority.get();
    let path = state_dir.join(ADMIN_CONFIG);
    let mut cfg = FerryConfig::load(&path)?;
    let (serial, not_after) = pem_serial_and_expiry(&cfg.cert).with_context(|| format!("read {}", path.display()))?;
    let expired = not_after <= SystemTime::now();
    let of_signer = rustls::pki_types::CertificateDer::from_pem_slice(cfg.cert.as_bytes())
        .map(|der| set.signed_by_signer(&der))
        .unwrap_or(false);
    if of_signer && cfg.ca != set.trust_pem() {
        cfg.ca = set.trust_pem();
        cfg.save(&path)?;
    }
    match credentials.admin_revoked(&serial)? {
        Some(false) if !expired && of_signer => {}
        None if !expired && of_signer => {
            credentials.record_admin(&serial, false, not_after)?;
            tracing::info!(path = %path.display(), %serial, "recorded the admin certificate");
        }
        _ => {
            let admin = set
                .signer()
                .issue_expiring(&Identity::Admin, OWN_ADMIN_VALIDITY)
                .context("issue the admin certificate")?;
            credentials.record_admin(&admin.serial, false, admin.not_after)?;
            (cfg.ca, cfg.cert, cfg.key) = (set.trust_pem(), admin.pem.cert_pem, admin.pem.key_pem);
            cfg.save(&path)?;
            tracing::warn!(path = %path.display(), old = %serial, new = %admin.serial, "the admin certificate was revoked, expired or is of another CA; wrote a new one");
        }
    }
    Ok(())
}

/// The QUIC endpoint's keys, kept across restarts: the stateless-reset key and the key that connection IDs
/// are validated with. With both, a restarted coordinator recognises its old connection IDs and resets them,
/// so agents redial at once instead of waiting out the idle timeout.
pub fn quic_endpoint_config(keys: &Keys) -> Result<quinn::EndpointConfig> {
    let secret = quic_secret(keys)?;
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
    let tag = ring::hmac::sign(&reset_key, b"ferry connection id key");
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&tag.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key);
    let mut config = quinn::EndpointConfig::new(std::sync::Arc::new(reset_key));
    config.cid_generator(move || Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key)));
    Ok(config)
}

fn quic_secret(keys: &Keys) -> Result<Vec<u8>> {
    let state_dir = match keys {
        Keys::Dir(dir) => dir,
        Keys::Shared(state) => {
            return Ok(state.blob_or_create("quic.key", &mut || Ok(rand::random::<[u8; 32]>().to_vec()))?)
        }
    };
    let path = state_dir.join("pki").join("quic.key");
    let secret = if path.exists() {
        hex::decode(read_secret(&path)?.trim())
            .with_context(|| format!("{} is not hex; delete it to make a new one", path.display()))?
    } else {
        let secret: [u8; 32] = rand::random();
        write_private(&path, hex::encode(secret).as_bytes())?;
        secret.to_vec()
    };
    Ok(secret)
}

/// The address clients should dial: the listen address, or an advertised name when listening on all.
pub fn client_address(listen: SocketAddr, advertise: &[String]) -> String {
    let port = listen.port();
    if !listen.ip().is_unspecified() {
        return listen.to_string();
    }
    match advertise.first() {
        Some(name) if name.contains(':') => format!("[{name}]:{port}"),
        Some(name) => format!("{name}:{port}"),
        None => format!("127.0.0.1:{port}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::RedbStore;

    fn listen() -> SocketAddr {
        "127.0.0.1:1".parse().unwrap()
    }

    fn der(pem: &str) -> Vec<u8> {
        rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap().to_vec()
    }

    /// Start, then finish: clients trust both CAs in between and only the new one after; a restart (a new
    /// `Authority` on the same files or blob) reads each step back.
    fn rotate(keys: Keys) {
        let a = Authority::load(keys.clone(), listen(), &[]).unwrap();
        let old = a.get().current.pem().cert_pem.clone();
        assert!(matches!(a.finish_rotation(), Err(RotationError::NotRotating)));
        let mut changed = a.subscribe();
        let set = a.start_rotation().unwrap();
        assert!(changed.has_changed().unwrap());
        changed.mark_unchanged();
        assert!(matches!(a.start_rotation(), Err(RotationError::AlreadyRotating(_))));
        let new = set.next.as_ref().unwrap().pem().cert_pem.clone();
        assert_ne!(old, new);
        assert_eq!(set.current.pem().cert_pem, old, "the server certificate stays of the old CA");
        assert_eq!(set.trust_pem().matches("BEGIN CERTIFICATE").count(), 2);
        let client = set.signer().issue_client(&Identity::Admin).unwrap();
        assert!(set.signed_by_signer(&der(&client.cert_pem)));
        let server = a.server_config();
        assert!(server.is_ok());

        let restarted = Authority::load(keys.clone(), listen(), &[]).unwrap();
        assert_eq!(restarted.get().next.as_ref().unwrap().pem().cert_pem, new);
        assert!(restarted.get().rotating_since.is_some());

        let done = a.finish_rotation().unwrap();
        assert_eq!(done.current.pem().cert_pem, new);
        assert!(done.next.is_none() && done.rotating_since.is_none());
        assert_eq!(done.trust_pem().matches("BEGIN CERTIFICATE").count(), 1);
        // The other instance (another replica) sees the step when it reads again.
        assert!(restarted.reload().unwrap());
        assert_eq!(restarted.get().current.pem().cert_pem, new);
        assert!(!restarted.reload().unwrap());
        let again = Authority::load(keys, listen(), &[]).unwrap();
        assert_eq!(again.get().current.pem().cert_pem, new);
    }

    #[test]
    fn a_single_coordinators_ca_rotates_in_its_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        rotate(Keys::Dir(dir.path().to_path_buf()));
        let pki = dir.path().join("pki");
        // ca.crt shows the CA in force; the retired key stays private.
        let set: CaBlob = serde_json::from_str(&fs::read_to_string(pki.join(CA_SET)).unwrap()).unwrap();
        assert_eq!(fs::read_to_string(pki.join("ca.crt")).unwrap(), set.cert_pem);
        use std::os::unix::fs::PermissionsExt as _;
        for f in [CA_SET, "ca.key", "ca.key.retired"] {
            assert_eq!(fs::metadata(pki.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn shared_cas_rotate_in_the_state_store_and_a_stale_step_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state: Arc<dyn StateStore> = Arc::new(RedbStore::open(&dir.path().join("state.redb")).unwrap());
        rotate(Keys::Shared(state.clone()));
        // A step from stale bytes (another replica stepped first) does not overwrite.
        let blob = state.blob_or_create("ca", &mut || unreachable!()).unwrap();
        assert!(!state.replace_blob("ca", b"stale", b"x").unwrap());
        assert_eq!(state.blob_or_create("ca", &mut || unreachable!()).unwrap(), blob);
    }
}
