//! A throw-away etcd on a restored data dir, to prove a backup serves (`backup verify`, restore drills).
//!
//! The restored data holds everything the cluster held, Secrets included, so this etcd listens on unix
//! sockets only, client and peer, inside a private (0700) dir: nothing on the network reaches it and no other
//! user can connect. It lives only as long as its [`ScratchEtcd`] (killed on drop), which callers keep for
//! one query.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_common::snapshot::RestoreAs;

/// etcd wants `host:port` even for unix sockets; the socket file is named exactly that, relative to the
/// process's working directory (the private dir).
const CLIENT_URL: &str = "unix://client:1";
const PEER_URL: &str = "unix://peer:2";
const NAME: &str = "ferry-scratch";

/// Starting or asking the throw-away etcd failed.
#[derive(Debug, thiserror::Error)]
pub enum ScratchError {
    #[error("{0} is not private (mode {1:o}); the scratch etcd needs a 0700 dir")]
    NotPrivate(PathBuf, u32),
    #[error("{what}: {error}")]
    Io { what: &'static str, error: std::io::Error },
    #[error("the scratch etcd did not answer within {0}s: {1}")]
    NoAnswer(u64, String),
    #[error("etcdctl printed something unreadable: {0}")]
    BadOutput(String),
}

/// The membership a snapshot must be restored with to be served by [`ScratchEtcd`].
pub fn restore_as() -> RestoreAs {
    RestoreAs {
        name: NAME.into(),
        initial_cluster: format!("{NAME}={PEER_URL}"),
        initial_cluster_token: "ferry-scratch".into(),
        initial_advertise_peer_urls: PEER_URL.into(),
    }
}

/// A running throw-away etcd; killed when dropped.
pub struct ScratchEtcd {
    child: Child,
    dir: PathBuf,
}

impl ScratchEtcd {
    /// Starts etcd on `data_dir` (restored with [`restore_as`]); its sockets go into `<scratch>/sockets`, made
    /// private (0700) here whatever the scratch dir's mode.
    pub fn start(scratch: &Path, data_dir: &Path) -> Result<Self, ScratchError> {
        let private_dir = scratch.join("sockets");
        ferry_common::config::create_private_dir(&private_dir)
            .map_err(|error| ScratchError::Io { what: "create the scratch etcd's private socket dir", error })?;
        let mode = std::fs::metadata(&private_dir)
            .map_err(|error| ScratchError::Io { what: "stat the scratch etcd's socket dir", error })?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 {
            return Err(ScratchError::NotPrivate(private_dir, mode));
        }
        let child = Command::new("etcd")
            .current_dir(&private_dir)
            .args(["--name", NAME, "--data-dir"])
            .arg(data_dir)
            .args(["--listen-client-urls", CLIENT_URL, "--advertise-client-urls", CLIENT_URL])
            .args(["--listen-peer-urls", PEER_URL, "--initial-advertise-peer-urls", PEER_URL])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|error| ScratchError::Io {
                what: "start etcd on the restored data dir (is etcd installed?)",
                error,
            })?;
        Ok(Self { child, dir: private_dir })
    }

    /// The number of keys it serves, waiting up to `timeout` for it to answer.
    pub fn count_keys(&self, timeout: Duration) -> Result<u64, ScratchError> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = Command::new("etcdctl")
                .current_dir(&self.dir)
                .env("ETCDCTL_API", "3")
                // `count` is the whole range's size even with --limit 1 (etcd 3.4 has no --count-only).
                .args(["--endpoints", CLIENT_URL, "--dial-timeout", "1s", "get", "", "--prefix", "--limit", "1"])
                .args(["-w", "json"])
                .output()
                .map_err(|error| ScratchError::Io { what: "run etcdctl", error })?;
            if out.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                    .map_err(|e| ScratchError::BadOutput(format!("{e}: {}", String::from_utf8_lossy(&out.stdout))))?;
                return Ok(v["count"].as_u64().unwrap_or(0));
            }
            if Instant::now() > deadline {
                return Err(ScratchError::NoAnswer(
                    timeout.as_secs(),
                    String::from_utf8_lossy(&out.stderr).trim().to_string(),
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for ScratchEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
