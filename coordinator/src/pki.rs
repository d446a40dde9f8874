//! The coordinator's certificates: a CA created on first start, a server certificate re-issued at every start
//! (so `--advertise-name` changes take effect), and `admin.ferryconfig`.
//!
//! The CA and the QUIC keys live in the state dir ([`Keys::Dir`]) or, for replicas sharing a state etcd, in
//! the state store ([`Keys::Shared`]), so every replica signs with the same CA and agents trust them all.

use std::fs;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::{Context, Result};
use ferry_common::config::{create_private_dir, read_secret, write_private, FerryConfig};
use ferry_common::tls::{pem_serial_and_expiry, CertAuthority, CertifiedPem, Identity};

use crate::credentials::Credentials;

use crate::state::{StateError, StateStore};

pub const ADMIN_CONFIG: &str = "admin.ferryconfig";

/// Life of the certificate in the coordinator's own `admin.ferryconfig` when it is re-issued: it sits in the
/// private state dir and is rotated by revoking it and restarting (see `docs/SECURITY.md`).
const OWN_ADMIN_VALIDITY: std::time::Duration = std::time::Duration::from_secs(3650 * 86_400);

/// Where the CA and the QUIC keys are kept.
pub enum Keys<'a> {
    /// Files under `<state dir>/pki` (one coordinator).
    Dir(&'a Path),
    /// Blobs of the shared state store (replicas).
    Shared(&'a dyn StateStore),
}

/// The shared CA blob.
#[derive(serde::Serialize, serde::Deserialize)]
struct CaBlob {
    cert_pem: String,
    key_pem: String,
}

fn load_ca(keys: &Keys<'_>) -> Result<CertAuthority> {
    let dir = match keys {
        Keys::Dir(dir) => *dir,
        Keys::Shared(state) => {
            let blob = state.blob_or_create("ca", &mut || {
                let ca = CertAuthority::generate().map_err(|e| StateError::Etcd(format!("create the CA: {e}")))?;
                tracing::info!("created a new certificate authority in the state store");
                serde_json::to_vec(&CaBlob { cert_pem: ca.pem().cert_pem.clone(), key_pem: ca.pem().key_pem.clone() })
                    .map_err(StateError::Encode)
            })?;
            let ca: CaBlob = serde_json::from_slice(&blob).context("the CA in the state store is unreadable")?;
            return CertAuthority::from_pem(&ca.cert_pem, &ca.key_pem).context("load the coordinator CA");
        }
    };
    let dir = dir.join("pki");
    create_private_dir(&dir).with_context(|| format!("create {} (0700)", dir.display()))?;
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    if crt.exists() && key.exists() {
        let cert_pem = fs::read_to_string(&crt).with_context(|| format!("read {}", crt.display()))?;
        CertAuthority::from_pem(&cert_pem, &read_secret(&key)?).context("load the coordinator CA")
    } else {
        let ca = CertAuthority::generate().context("create the coordinator CA")?;
        write_private(&key, ca.pem().key_pem.as_bytes())?;
        fs::write(&crt, &ca.pem().cert_pem).with_context(|| format!("write {}", crt.display()))?;
        tracing::info!(path = %crt.display(), "created a new certificate authority");
        Ok(ca)
    }
}

pub struct Pki {
    pub ca: CertAuthority,
    pub server: CertifiedPem,
}

/// Loads or creates the CA, issues the server certificate and makes sure `admin.ferryconfig` exists in
/// `state_dir`. `replicas` are the client addresses of every replica (written into `admin.ferryconfig` so
/// ferryctl reaches whichever is up); empty for a single coordinator.
pub fn init(
    keys: &Keys<'_>,
    state_dir: &Path,
    listen: SocketAddr,
    advertise: &[String],
    replicas: &[String],
) -> Result<Pki> {
    let ca = load_ca(keys)?;

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(advertise.iter().cloned());
    names.dedup();
    let server = ca.issue_server(&names).context("issue the coordinator's server certificate")?;

    // This replica first, so ferryctl on its machine dials it first; the others after it.
    let own = client_address(listen, advertise);
    let address = std::iter::once(own.clone())
        .chain(replicas.iter().filter(|r| **r != own).cloned())
        .collect::<Vec<_>>()
        .join(",");
    let path = state_dir.join(ADMIN_CONFIG);
    if path.exists() {
        let mut cfg = FerryConfig::load(&path)?;
        // Credentials of another CA (a state dir reused with a new state etcd) would not work: issue anew.
        if cfg.ca != ca.pem().cert_pem {
            let admin = ca.issue_client(&Identity::Admin).context("issue the admin certificate")?;
            (cfg.ca, cfg.cert, cfg.key) = (ca.pem().cert_pem.clone(), admin.cert_pem, admin.key_pem);
            cfg.coordinator = address.clone();
            cfg.save(&path)?;
        }
        if cfg.coordinator != address {
            cfg.coordinator = address;
            cfg.save(&path)?;
        }
    } else {
        let admin = ca.issue_client(&Identity::Admin).context("issue the admin certificate")?;
        FerryConfig { coordinator: address, ca: ca.pem().cert_pem.clone(), cert: admin.cert_pem, key: admin.key_pem }
            .save(&path)?;
        tracing::info!(path = %path.display(), "wrote admin credentials for ferryctl");
    }
    Ok(Pki { ca, server })
}

/// Makes sure the certificate in this coordinator's own `admin.ferryconfig` is recorded (it is on first start,
/// and when written by an older version), and writes a new one when it was revoked or has expired: revoking
/// it and restarting the coordinator is how the file is rotated.
pub fn ensure_own_admin(ca: &CertAuthority, state_dir: &Path, credentials: &Credentials) -> Result<()> {
    let path = state_dir.join(ADMIN_CONFIG);
    let mut cfg = FerryConfig::load(&path)?;
    let (serial, not_after) = pem_serial_and_expiry(&cfg.cert).with_context(|| format!("read {}", path.display()))?;
    let expired = not_after <= std::time::SystemTime::now();
    match credentials.admin_revoked(&serial)? {
        Some(false) if !expired => {}
        None if !expired => {
            credentials.record_admin(&serial, false, not_after)?;
            tracing::info!(path = %path.display(), %serial, "recorded the admin certificate");
        }
        _ => {
            let admin =
                ca.issue_expiring(&Identity::Admin, OWN_ADMIN_VALIDITY).context("issue the admin certificate")?;
            (cfg.cert, cfg.key) = (admin.pem.cert_pem, admin.pem.key_pem);
            cfg.save(&path)?;
            credentials.record_admin(&admin.serial, false, admin.not_after)?;
            tracing::warn!(path = %path.display(), old = %serial, new = %admin.serial, "the admin certificate was revoked or expired; wrote a new one");
        }
    }
    Ok(())
}

/// The QUIC endpoint's keys, kept across restarts: the stateless-reset key and the key that connection IDs
/// are validated with. With both, a restarted coordinator recognises its old connection IDs and resets them,
/// so agents redial at once instead of waiting out the idle timeout.
pub fn quic_endpoint_config(keys: &Keys<'_>) -> Result<quinn::EndpointConfig> {
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

fn quic_secret(keys: &Keys<'_>) -> Result<Vec<u8>> {
    let state_dir = match keys {
        Keys::Dir(dir) => *dir,
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
