//! The coordinator's certificates: a CA created on first start in the state dir, a server certificate
//! re-issued at every start (so `--advertise-name` changes take effect), and `admin.ferryconfig`.

use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Context, Result};
use ferry_common::config::{read_secret, write_private, FerryConfig};
use ferry_common::tls::{CertAuthority, CertifiedPem, Identity};

pub const ADMIN_CONFIG: &str = "admin.ferryconfig";

pub struct Pki {
    pub ca: CertAuthority,
    pub server: CertifiedPem,
}

/// Loads or creates the CA, issues the server certificate and makes sure `admin.ferryconfig` exists.
pub fn init(state_dir: &Path, listen: SocketAddr, advertise: &[String]) -> Result<Pki> {
    let dir = state_dir.join("pki");
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    let ca = if crt.exists() && key.exists() {
        let cert_pem = fs::read_to_string(&crt).with_context(|| format!("read {}", crt.display()))?;
        CertAuthority::from_pem(&cert_pem, &read_secret(&key)?).context("load the coordinator CA")?
    } else {
        let ca = CertAuthority::generate().context("create the coordinator CA")?;
        write_private(&key, ca.pem().key_pem.as_bytes())?;
        fs::write(&crt, &ca.pem().cert_pem).with_context(|| format!("write {}", crt.display()))?;
        tracing::info!(path = %crt.display(), "created a new certificate authority");
        ca
    };

    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(advertise.iter().cloned());
    names.dedup();
    let server = ca.issue_server(&names).context("issue the coordinator's server certificate")?;

    let address = client_address(listen, advertise);
    let path = state_dir.join(ADMIN_CONFIG);
    if path.exists() {
        let mut cfg = FerryConfig::load(&path)?;
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

/// The address clients should dial: the listen address, or an advertised name when listening on all.
fn client_address(listen: SocketAddr, advertise: &[String]) -> String {
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
