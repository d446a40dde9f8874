//! Config primitives shared by the daemons and ferryctl: the `ferryconfig` file and an agent's credentials
//! directory, both holding private keys, so both are written 0600 and refused when world-readable.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::tls::CertifiedPem;

/// Reading or writing a credentials file failed.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("write {path}: {error}")]
    Write { path: PathBuf, error: std::io::Error },
    #[error("{path} is readable by every user but holds a private key; run `chmod 600 {path}`")]
    WorldReadable { path: PathBuf },
    #[error("{path} is not a valid ferryconfig: {reason}")]
    Invalid { path: PathBuf, reason: String },
}

/// What ferryctl needs to reach a coordinator as admin (`admin.ferryconfig`).
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FerryConfig {
    /// `host:port` of the coordinator's QUIC listener, or of every replica: `host:port,host:port,…`.
    pub coordinator: String,
    /// PEM of the coordinator's CA.
    pub ca: String,
    /// PEM client certificate.
    pub cert: String,
    /// PEM private key.
    pub key: String,
}

impl std::fmt::Debug for FerryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FerryConfig")
            .field("coordinator", &self.coordinator)
            .field("key", &"***")
            .finish_non_exhaustive()
    }
}

impl FerryConfig {
    pub fn client_pem(&self) -> CertifiedPem {
        CertifiedPem { cert_pem: self.cert.clone(), key_pem: self.key.clone() }
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = read_secret(path)?;
        serde_yaml_ng::from_str(&text).map_err(|e| ConfigError::Invalid { path: path.into(), reason: e.to_string() })
    }

    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let text = serde_yaml_ng::to_string(self)
            .map_err(|e| ConfigError::Invalid { path: path.into(), reason: e.to_string() })?;
        write_private(path, text.as_bytes())
    }
}

/// File names inside an agent's `--credentials` directory.
pub const CREDENTIALS_CA: &str = "ca.crt";
pub const CREDENTIALS_CERT: &str = "agent.crt";
pub const CREDENTIALS_KEY: &str = "agent.key";

/// An agent's credentials: the coordinator's CA plus its own certificate and key.
#[derive(Clone)]
pub struct AgentCredentials {
    pub ca_pem: String,
    pub client: CertifiedPem,
}

impl AgentCredentials {
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        let read = |name: &str| {
            let path = dir.join(name);
            fs::read_to_string(&path).map_err(|error| ConfigError::Read { path, error })
        };
        Ok(Self {
            ca_pem: read(CREDENTIALS_CA)?,
            client: CertifiedPem {
                cert_pem: read(CREDENTIALS_CERT)?,
                key_pem: read_secret(&dir.join(CREDENTIALS_KEY))?,
            },
        })
    }

    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        create_private_dir(dir).map_err(|error| ConfigError::Write { path: dir.into(), error })?;
        write_private(&dir.join(CREDENTIALS_CA), self.ca_pem.as_bytes())?;
        write_private(&dir.join(CREDENTIALS_CERT), self.client.cert_pem.as_bytes())?;
        write_private(&dir.join(CREDENTIALS_KEY), self.client.key_pem.as_bytes())
    }
}

/// Reads a file holding a secret, refusing it when every user on the machine can read it.
pub fn read_secret(path: &Path) -> Result<String, ConfigError> {
    let meta = fs::metadata(path).map_err(|error| ConfigError::Read { path: path.into(), error })?;
    if meta.permissions().mode() & 0o004 != 0 {
        return Err(ConfigError::WorldReadable { path: path.into() });
    }
    fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.into(), error })
}

/// Creates a new file readable by its owner only (0600 whatever the umask), refusing to follow a symlink or
/// to open anything already there (`O_CREAT|O_EXCL|O_NOFOLLOW`): a link planted at the path cannot redirect
/// the write. For files that hold a secret or backup data.
pub fn create_private(path: &Path) -> std::io::Result<fs::File> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // The umask can only have taken bits away; set exactly 0600 anyway.
    f.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(f)
}

/// [`create_private`] at a fixed path, first removing what a crashed run left there (a file, or a link:
/// removed, never followed).
pub fn create_private_replacing(path: &Path) -> std::io::Result<fs::File> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    create_private(path)
}

/// Creates `dir` and its missing parents, and makes `dir` itself 0700 (whatever the umask, and also when it
/// existed with wider permissions): for directories that hold secrets or backups.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let meta = fs::symlink_metadata(dir)?;
    if !meta.is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory", dir.display())));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// A temp file name beside `path` that no one can guess in advance.
pub fn temp_beside(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.{:016x}.tmp", rand::random::<u64>()))
}

/// Writes a file readable by its owner only, atomically (a fresh temp file created with
/// [`create_private`], fsync, rename).
pub fn write_private(path: &Path, body: &[u8]) -> Result<(), ConfigError> {
    let err = |error| ConfigError::Write { path: path.into(), error };
    let tmp = temp_beside(path);
    let written = (|| {
        let mut f = create_private(&tmp)?;
        f.write_all(body)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn world_readable_secrets_are_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-config-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.ferryconfig");
        let cfg =
            FerryConfig { coordinator: "127.0.0.1:7443".into(), ca: "c".into(), cert: "c".into(), key: "k".into() };
        cfg.save(&p).unwrap();
        assert_eq!(FerryConfig::load(&p).unwrap().coordinator, "127.0.0.1:7443");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = FerryConfig::load(&p).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        assert!(!format!("{cfg:?}").contains("\"k\""));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn private_files_are_0600_and_never_follow_a_planted_link() {
        let dir = std::env::temp_dir().join(format!("ferry-private-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let victim = dir.join("victim");
        fs::write(&victim, "keep").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(create_private(&link).is_err(), "a symlink at the path is refused");
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        let p = dir.join("secret");
        write_private(&p, b"s").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let sub = dir.join("a/b");
        create_private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().permissions().mode() & 0o777, 0o700);
        fs::set_permissions(&sub, fs::Permissions::from_mode(0o755)).unwrap();
        create_private_dir(&sub).unwrap();
        assert_eq!(fs::metadata(&sub).unwrap().permissions().mode() & 0o777, 0o700, "tightened when it existed");
        fs::remove_dir_all(&dir).unwrap();
    }
}
