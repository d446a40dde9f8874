//! Proving that a snapshot restores: etcd's own restore into a scratch dir, then a throw-away etcd on that dir,
//! read back with etcdctl and stopped at once. Shared by `ferryctl backup verify` and the coordinator's
//! restore drills, so both prove the same thing the same way.
//!
//! The throw-away etcd listens on unix sockets only, in a 0700 dir inside the scratch dir: no TCP port for
//! anyone on the host to reach a copy of the cluster's data through, and nothing to collide with. etcd insists
//! on `host:port` URLs even for unix sockets, so the sockets are named `client:1` and `peer:1`, relative to
//! the process's working directory (also keeping them short of the 108-byte socket path limit).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ferry_common::snapshot::{self, RestoreAs};

/// The client URL of the throw-away etcd, relative to its socket dir.
const CLIENT_URL: &str = "unix://client:1";
/// Its peer URL (it has no peers, but etcd needs one to bootstrap).
const PEER_URL: &str = "unix://peer:1";
/// Kubernetes keeps its objects under `/registry/<resource>/…`.
const REGISTRY_PREFIX: &str = "/registry/";

/// What a restored snapshot holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// The revision the restored member serves.
    pub revision: i64,
    /// Every key.
    pub keys: u64,
    /// Keys per Kubernetes resource: the path segment after `/registry/` (`pods`, `namespaces`…).
    pub resources: BTreeMap<String, u64>,
}

/// Restores `snapshot` (etcd's snapshot file, checked already) into `scratch/restored`, starts a throw-away
/// etcd on it, reads the revision and the key counts, and stops it. Blocking: run it off the async runtime.
/// `timeout` bounds the wait for the throw-away etcd to answer.
pub fn restore_and_read(snapshot: &Path, scratch: &Path, timeout: Duration) -> Result<Restored> {
    let data_dir = scratch.join("restored");
    let member = RestoreAs {
        name: "drill".into(),
        initial_cluster: format!("drill={PEER_URL}"),
        initial_cluster_token: "ferry-drill".into(),
        initial_advertise_peer_urls: PEER_URL.into(),
    };
    snapshot::restore(snapshot, &data_dir, &member, None)?;
    let sockets = scratch.join("sockets");
    create_private_dir(&sockets)?;
    let log = scratch.join("etcd.log");
    let etcd = ThrowAway::start(&data_dir, &sockets, &log)?;
    let result = read_keys(&sockets, timeout);
    drop(etcd);
    result.map_err(|e| {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(3).collect();
        e.context(format!("etcd's last log lines: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
    })
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("create {}", dir.display()))
}

/// The throw-away etcd: killed and reaped when dropped, whatever happened.
struct ThrowAway(Child);

impl ThrowAway {
    fn start(data_dir: &Path, sockets: &Path, log: &Path) -> Result<Self> {
        let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new("etcd")
            .current_dir(sockets)
            .args(["--name", "drill", "--data-dir"])
            .arg(data_dir)
            .args(["--listen-client-urls", CLIENT_URL, "--advertise-client-urls", CLIENT_URL])
            .args(["--listen-peer-urls", PEER_URL, "--initial-advertise-peer-urls", PEER_URL])
            .args(["--initial-cluster", &format!("drill={PEER_URL}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start etcd on the restored data dir (is etcd on PATH?)")?;
        Ok(Self(child))
    }
}

impl Drop for ThrowAway {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls the throw-away etcd until it answers, then reads every key name (not the values) once.
fn read_keys(sockets: &Path, timeout: Duration) -> Result<Restored> {
    let deadline = Instant::now() + timeout;
    loop {
        let out = Command::new("etcdctl")
            .current_dir(sockets)
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", CLIENT_URL, "--command-timeout", "60s"])
            .args(["get", "", "--prefix", "--keys-only", "-w", "json"])
            .stdin(Stdio::null())
            .output()
            .context("run etcdctl (is it on PATH?)")?;
        if out.status.success() {
            return parse_keys(&out.stdout);
        }
        if Instant::now() > deadline {
            bail!(
                "the restored etcd did not answer within {}s: {}",
                timeout.as_secs(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Parses `etcdctl get -w json --keys-only` (keys are base64).
fn parse_keys(json: &[u8]) -> Result<Restored> {
    let v: serde_json::Value = serde_json::from_slice(json).context("parse etcdctl output")?;
    let revision = v["header"]["revision"].as_i64().context("etcdctl output carries no revision")?;
    let mut resources = BTreeMap::new();
    let kvs = v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default();
    for kv in kvs {
        let Some(key) = kv["key"].as_str() else { continue };
        let key = base64::engine::general_purpose::STANDARD.decode(key).context("decode a key from etcdctl")?;
        if let Some(resource) = resource_of(&key) {
            *resources.entry(resource).or_insert(0) += 1;
        }
    }
    // `count` is the whole range; without keys the field is absent.
    let keys = v["count"].as_u64().unwrap_or(kvs.len() as u64);
    Ok(Restored { revision, keys, resources })
}

/// `pods` for `/registry/pods/ns/name`; `None` outside `/registry/`.
fn resource_of(key: &[u8]) -> Option<String> {
    let rest = key.strip_prefix(REGISTRY_PREFIX.as_bytes())?;
    let end = rest.iter().position(|b| *b == b'/')?;
    Some(String::from_utf8_lossy(&rest[..end]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_counted_per_kubernetes_resource() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let json = serde_json::json!({
            "header": {"revision": 42},
            "count": 4,
            "kvs": [
                {"key": b64("/registry/pods/default/a")},
                {"key": b64("/registry/pods/default/b")},
                {"key": b64("/registry/namespaces/default")},
                {"key": b64("compact_rev_key")},
            ],
        });
        let r = parse_keys(json.to_string().as_bytes()).unwrap();
        assert_eq!((r.revision, r.keys), (42, 4));
        assert_eq!(r.resources, BTreeMap::from([("namespaces".into(), 1), ("pods".into(), 2)]));
        let empty = parse_keys(br#"{"header": {"revision": 1}}"#).unwrap();
        assert_eq!((empty.keys, empty.resources.len()), (0, 0));
    }
}
