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

/// File names inside an agent's `--credentials` directory (at its top level, or inside a version).
pub const CREDENTIALS_CA: &str = "ca.crt";
pub const CREDENTIALS_CERT: &str = "agent.crt";
pub const CREDENTIALS_KEY: &str = "agent.key";
/// The link to the version in use, `current -> v<serial>`, switched with one `rename(2)` by a renewal. When
/// it exists it wins over the top-level files.
pub const CREDENTIALS_CURRENT: &str = "current";
/// Prefix of a version directory's name (`v<serial hex>`).
const VERSION_PREFIX: &str = "v";

/// An agent's credentials: the coordinator's CA plus its own certificate and key.
#[derive(Clone)]
pub struct AgentCredentials {
    pub ca_pem: String,
    pub client: CertifiedPem,
}

impl std::fmt::Debug for AgentCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCredentials").field("client", &self.client).finish_non_exhaustive()
    }
}

impl AgentCredentials {
    /// Reads `DIR/current/` when that link exists (a renewal put it there), else the files at `DIR`'s top
    /// level (as `ferryctl agent-credentials --out DIR` writes them). Leftovers of a renewal that crashed (a
    /// temp link, a version dir `current` does not point at) are never read.
    pub fn load(dir: &Path) -> Result<Self, ConfigError> {
        Self::load_files(&Self::in_use(dir)?)
    }

    /// The directory whose files are in use: `DIR/current` (checked to name a version inside `DIR`), or `DIR`.
    fn in_use(dir: &Path) -> Result<PathBuf, ConfigError> {
        let link = dir.join(CREDENTIALS_CURRENT);
        match fs::read_link(&link) {
            Ok(target) => {
                let name = target.to_str().filter(|t| version_name(t)).ok_or_else(|| ConfigError::Invalid {
                    path: link.clone(),
                    reason: format!("points at {}, not a credentials version (v<serial>) beside it", target.display()),
                })?;
                Ok(dir.join(name))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(dir.to_path_buf()),
            Err(error) => Err(ConfigError::Read { path: link, error }),
        }
    }

    fn load_files(dir: &Path) -> Result<Self, ConfigError> {
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

    /// Writes the three files at `dir`'s top level (each 0600, temp file + rename) and removes a `current`
    /// link a renewal left, so these are the ones in use from the next load (re-issuing into a directory an
    /// agent renewed in must not leave the agent on its old, revoked version).
    pub fn save(&self, dir: &Path) -> Result<(), ConfigError> {
        create_private_dir(dir).map_err(|error| ConfigError::Write { path: dir.into(), error })?;
        write_private(&dir.join(CREDENTIALS_CA), self.ca_pem.as_bytes())?;
        write_private(&dir.join(CREDENTIALS_CERT), self.client.cert_pem.as_bytes())?;
        write_private(&dir.join(CREDENTIALS_KEY), self.client.key_pem.as_bytes())?;
        let link = dir.join(CREDENTIALS_CURRENT);
        match fs::remove_file(&link) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(ConfigError::Write { path: link, error: e });
            }
            _ => {}
        }
        sync_dir(dir).map_err(|error| ConfigError::Write { path: dir.into(), error })
    }

    /// Saves renewed credentials as a new version and switches to it atomically: the files go into a fresh
    /// `DIR/v<serial>/` (0700; files 0600, each fsynced, then the dir), a temp link to it is renamed over
    /// `DIR/current` with one `rename(2)`, and `DIR` is fsynced. A crash at any moment leaves `current` at the
    /// old version or the new one (or absent: the top-level files), each a complete, matching set. Versions
    /// other than the new one and the one in use before are removed afterwards (best effort); returns the new
    /// version's directory.
    pub fn save_version(&self, dir: &Path, serial: &str) -> Result<PathBuf, ConfigError> {
        let name = format!("{VERSION_PREFIX}{serial}");
        if !version_name(&name) {
            return Err(ConfigError::Invalid { path: dir.into(), reason: format!("serial {serial:?} is not hex") });
        }
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |error| ConfigError::Write { path, error }
        };
        create_private_dir(dir).map_err(werr(dir))?;
        let previous = fs::read_link(dir.join(CREDENTIALS_CURRENT)).ok();
        let version = dir.join(&name);
        // Whatever an interrupted save of this same version left (never the one in use: serials are unique).
        if fs::symlink_metadata(&version).is_ok() {
            fs::remove_dir_all(&version).map_err(werr(&version))?;
        }
        fs::DirBuilder::new().mode(0o700).create(&version).map_err(werr(&version))?;
        fs::set_permissions(&version, fs::Permissions::from_mode(0o700)).map_err(werr(&version))?;
        for (file, body) in [
            (CREDENTIALS_CA, &self.ca_pem),
            (CREDENTIALS_CERT, &self.client.cert_pem),
            (CREDENTIALS_KEY, &self.client.key_pem),
        ] {
            let path = version.join(file);
            let mut f = create_private(&path).map_err(werr(&path))?;
            f.write_all(body.as_bytes()).and_then(|()| f.sync_all()).map_err(werr(&path))?;
        }
        sync_dir(&version).map_err(werr(&version))?;
        let link = dir.join(CREDENTIALS_CURRENT);
        let tmp = temp_beside(&link);
        let switched = std::os::unix::fs::symlink(&name, &tmp).and_then(|()| fs::rename(&tmp, &link));
        if let Err(error) = switched {
            let _ = fs::remove_file(&tmp);
            return Err(ConfigError::Write { path: link, error });
        }
        sync_dir(dir).map_err(werr(dir))?;
        let keep = [Some(std::ffi::OsString::from(&name)), previous.map(PathBuf::into_os_string)];
        remove_stale_versions(dir, &keep);
        Ok(version)
    }
}

/// Whether `name` is a version directory's name: `v` and hex digits only (never a path).
fn version_name(name: &str) -> bool {
    name.strip_prefix(VERSION_PREFIX)
        .is_some_and(|hex| !hex.is_empty() && hex.len() <= 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Removes the version dirs of `dir` not in `keep`, and temp links a crashed switch left. Best effort: a
/// leftover costs a few bytes and is never read.
fn remove_stale_versions(dir: &Path, keep: &[Option<std::ffi::OsString>]) {
    let Ok(entries) = fs::read_dir(dir) else { return };
    let current_tmp = format!(".{CREDENTIALS_CURRENT}.");
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(text) = name.to_str() else { continue };
        let path = entry.path();
        if version_name(text) && !keep.iter().flatten().any(|k| *k == name) {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let _ = fs::remove_dir_all(&path);
            }
        } else if text.starts_with(&current_tmp) && text.ends_with(".tmp") {
            let _ = fs::remove_file(&path);
        }
    }
}

/// fsyncs a directory, so the entries created or renamed in it survive a crash.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    fs::File::open(dir)?.sync_all()
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

    fn creds(tag: &str) -> AgentCredentials {
        AgentCredentials {
            ca_pem: format!("ca {tag}"),
            client: CertifiedPem { cert_pem: format!("cert {tag}"), key_pem: format!("key {tag}") },
        }
    }

    fn loaded(dir: &Path) -> String {
        let c = AgentCredentials::load(dir).unwrap();
        assert_eq!(c.ca_pem.replace("ca ", ""), c.client.cert_pem.replace("cert ", ""), "a mixed set");
        assert_eq!(c.client.key_pem.replace("key ", ""), c.client.cert_pem.replace("cert ", ""), "a mixed set");
        c.client.cert_pem.replace("cert ", "")
    }

    #[test]
    fn renewed_credentials_switch_atomically_and_top_level_files_still_load() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("creds");
        // As `ferryctl agent-credentials --out DIR` writes them.
        creds("one").save(&dir).unwrap();
        assert_eq!(loaded(&dir), "one");

        let v = creds("two").save_version(&dir, "0a1b").unwrap();
        assert_eq!(v, dir.join("v0a1b"));
        assert_eq!(fs::read_link(dir.join(CREDENTIALS_CURRENT)).unwrap(), PathBuf::from("v0a1b"));
        assert_eq!(loaded(&dir), "two");
        assert_eq!(fs::metadata(&v).unwrap().permissions().mode() & 0o777, 0o700);
        for f in [CREDENTIALS_CA, CREDENTIALS_CERT, CREDENTIALS_KEY] {
            assert_eq!(fs::metadata(v.join(f)).unwrap().permissions().mode() & 0o777, 0o600, "{f}");
        }

        // A crash mid-renewal: a half-written version (no key) and a temp link pointing at it. Neither is read.
        let half = dir.join("vdead");
        fs::create_dir(&half).unwrap();
        fs::write(half.join(CREDENTIALS_CERT), "cert dead").unwrap();
        std::os::unix::fs::symlink("vdead", dir.join(".current.00000000deadbeef.tmp")).unwrap();
        assert_eq!(loaded(&dir), "two", "leftovers of a crash are ignored");

        // The next renewal keeps the previous version, removes the rest and the temp link.
        creds("three").save_version(&dir, "0c").unwrap();
        assert_eq!(loaded(&dir), "three");
        assert!(dir.join("v0a1b").is_dir(), "the previous version is kept");
        assert!(!half.exists(), "a stale version is removed");
        assert!(fs::symlink_metadata(dir.join(".current.00000000deadbeef.tmp")).is_err());
        creds("four").save_version(&dir, "0d").unwrap();
        assert!(!dir.join("v0a1b").exists() && dir.join("v0c").is_dir());

        // Re-issued into the same dir by an operator: the top-level files win again.
        creds("five").save(&dir).unwrap();
        assert!(fs::symlink_metadata(dir.join(CREDENTIALS_CURRENT)).is_err());
        assert_eq!(loaded(&dir), "five");

        // Never a path from the outside: a serial that is not hex, a link pointing out of the dir.
        assert!(creds("x").save_version(&dir, "../evil").is_err());
        assert!(creds("x").save_version(&dir, "").is_err());
        std::os::unix::fs::symlink("/etc", dir.join(CREDENTIALS_CURRENT)).unwrap();
        let e = AgentCredentials::load(&dir).unwrap_err().to_string();
        assert!(e.contains("not a credentials version"), "{e}");
        assert!(!format!("{:?}", creds("secret")).contains("key secret"));
    }
}
