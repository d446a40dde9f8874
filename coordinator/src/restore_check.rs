//! Proving that a snapshot restores: etcd's own restore into a scratch dir, then a throw-away etcd on that dir,
//! read back with etcdctl and stopped at once. Shared by `ferryctl backup verify` and the coordinator's
//! restore drills, so both prove the same thing the same way.
//!
//! The throw-away etcd listens on unix sockets only, in a 0700 dir inside the scratch dir: no TCP port for
//! anyone on the host to reach a copy of the cluster's data through, and nothing to collide with. etcd insists
//! on `host:port` URLs even for unix sockets, so the sockets are named `client:1` and `peer:1`, relative to
//! the process's working directory (also keeping them short of the 108-byte socket path limit).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use ferry_common::snapshot::{self, RestoreAs};
use tokio_util::sync::CancellationToken;

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
/// `timeout` bounds the wait for the throw-away etcd to answer; `stop` ends the wait or the count early (then
/// the throw-away etcd is killed before this returns, so the caller may delete `scratch`).
pub fn restore_and_read(
    snapshot: &Path,
    scratch: &Path,
    timeout: Duration,
    stop: &CancellationToken,
) -> Result<Restored> {
    with_restored(snapshot, scratch, |sockets| read_keys(sockets, timeout, stop))
}

/// etcd's `HashKV` of a key space at one revision, and the compaction behind it: two key spaces holding the
/// same history answer the same hash only when they were compacted at the same revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HashAt {
    pub revision: i64,
    pub hash: u32,
    /// The compaction the hash starts from (-1: never compacted), as etcd answers it.
    pub compact_revision: i64,
}

/// What [`restore_read_and_hash`] hashed in the restored key space.
#[derive(Debug, Clone, Default)]
pub struct Hashes {
    /// At the restored revision.
    pub at_revision: Option<HashAt>,
    /// At the first of the compactions asked for that is after the snapshot's own compaction and not after its
    /// revision: where the members' etcd kept the hash it computed while compacting.
    pub at_compaction: Option<HashAt>,
}

/// [`restore_and_read`], then etcd's `HashKV` of the restored key space at its revision and at the first of
/// `compactions` (ascending) it can be compared at (see [`Hashes::at_compaction`]). Blocking.
pub fn restore_read_and_hash(
    snapshot: &Path,
    scratch: &Path,
    timeout: Duration,
    stop: &CancellationToken,
    compactions: &[i64],
) -> Result<(Restored, Hashes)> {
    with_restored(snapshot, scratch, |sockets| {
        let restored = read_keys(sockets, timeout, stop)?;
        let at_revision = etcdctl_hash_kv(sockets, restored.revision)?;
        let mut hashes = Hashes { at_revision: Some(at_revision), at_compaction: None };
        let comparable = |c: &&i64| **c > at_revision.compact_revision && **c <= restored.revision;
        if let Some(&c) = compactions.iter().find(comparable) {
            hashes.at_compaction = Some(etcdctl_hash_kv(sockets, c)?);
        }
        Ok((restored, hashes))
    })
}

/// `etcdctl endpoint hashkv --rev REVISION` against the throw-away etcd.
fn etcdctl_hash_kv(sockets: &Path, revision: i64) -> Result<HashAt> {
    let out = etcdctl(sockets, "2s", "600s")
        .args(["endpoint", "hashkv", "-w", "json", "--rev", &revision.to_string()])
        .output()
        .context("run etcdctl (is it on PATH?)")?;
    if !out.status.success() {
        bail!("etcdctl endpoint hashkv --rev {revision}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse etcdctl hashkv output")?;
    let h = &v[0]["HashKV"];
    let hash = h["hash"].as_u64().and_then(|h| u32::try_from(h).ok());
    let hash = hash.with_context(|| format!("etcdctl hashkv output carries no hash: {v}"))?;
    // etcd leaves the field out at 0.
    let compact_revision = h["compact_revision"].as_i64().unwrap_or(0);
    Ok(HashAt { revision, hash, compact_revision })
}

/// etcdctl against the throw-away etcd whose sockets are in `sockets` (its URLs are relative to that dir),
/// with its dial and command timeouts; stdin closed.
fn etcdctl(sockets: &Path, dial_timeout: &str, command_timeout: &str) -> Command {
    let mut c = Command::new("etcdctl");
    c.current_dir(sockets).env("ETCDCTL_API", "3").stdin(Stdio::null());
    c.args(["--endpoints", CLIENT_URL, "--dial-timeout", dial_timeout, "--command-timeout", command_timeout]);
    c
}

/// Restores `snapshot` into `scratch/restored`, starts a throw-away etcd on it, runs `read` with its socket dir
/// and kills it before returning; an error carries etcd's last log lines.
fn with_restored<T>(snapshot: &Path, scratch: &Path, read: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let etcd = start_restored(snapshot, scratch, &[])?;
    let result = read(&etcd.sockets);
    result.map_err(|e| etcd.with_log(e))
}

/// A throw-away etcd on a restored snapshot, on unix sockets only; killed and reaped when dropped.
pub struct Running {
    _etcd: ThrowAway,
    /// The dir its sockets are in (0700).
    pub sockets: PathBuf,
    log: PathBuf,
}

impl Running {
    /// The client socket's path.
    pub fn client_socket(&self) -> PathBuf {
        self.sockets.join(CLIENT_URL.trim_start_matches("unix://"))
    }

    /// `e` with etcd's last log lines added.
    pub fn with_log(&self, e: anyhow::Error) -> anyhow::Error {
        let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = tail.lines().rev().take(3).collect();
        e.context(format!("etcd's last log lines: {}", tail.into_iter().rev().collect::<Vec<_>>().join(" | ")))
    }
}

/// Restores `snapshot` into `scratch/restored` with etcd's own tool and starts a throw-away etcd on it, with
/// `extra` flags. Blocking.
pub fn start_restored(snapshot: &Path, scratch: &Path, extra: &[&str]) -> Result<Running> {
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
    let etcd = ThrowAway::start(&data_dir, &sockets, &log, extra)?;
    Ok(Running { _etcd: etcd, sockets, log })
}

/// `etcdctl snapshot save OUT` against the throw-away etcd: etcd's own tool checks the snapshot's trailing
/// hash as it saves it. Blocking.
pub fn save_snapshot(etcd: &Running, out: &Path) -> Result<()> {
    let out_abs = std::path::absolute(out).with_context(|| format!("resolve {}", out.display()))?;
    let result = etcdctl(&etcd.sockets, "5s", "3600s")
        .args(["snapshot", "save"])
        .arg(&out_abs)
        .output()
        .context("run etcdctl snapshot save (is etcdctl on PATH?)")?;
    if !result.status.success() {
        bail!("etcdctl snapshot save: {}", String::from_utf8_lossy(&result.stderr).trim());
    }
    Ok(())
}

/// Asks the throw-away etcd with `ask` until it answers, for at most `timeout` (or until `stop`).
fn first_answer<T>(timeout: Duration, stop: &CancellationToken, mut ask: impl FnMut() -> Result<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if stop.is_cancelled() {
            bail!("cancelled");
        }
        match ask() {
            Ok(answer) => return Ok(answer),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("the restored etcd did not answer within {}s", timeout.as_secs())))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One key of a restored snapshot, as the change log's check compares it (the value by its hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyState {
    pub value_sha256: [u8; 32],
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// Every key of a restored snapshot, by key.
pub type KeySpace = BTreeMap<Vec<u8>, KeyState>;

/// Keys (with their values) per etcdctl request when a key space is read whole: values weigh up to etcd's
/// request limit, so pages are small.
const PAGE_KEYS_WITH_VALUES: usize = 500;

/// Restores `snapshot` like [`restore_and_read`] and reads every key with its value's hash, create and mod
/// revision, version and lease at the restored revision. Blocking. Memory: the key names and 72 bytes a key.
pub fn restore_and_dump(
    snapshot: &Path,
    scratch: &Path,
    timeout: Duration,
    stop: &CancellationToken,
) -> Result<(i64, KeySpace)> {
    with_restored(snapshot, scratch, |sockets| dump_keys(sockets, timeout, stop))
}

/// Reads every key with its state from the throw-away etcd at `sockets`, page by page at one revision.
fn dump_keys(sockets: &Path, timeout: Duration, stop: &CancellationToken) -> Result<(i64, KeySpace)> {
    let first = first_answer(timeout, stop, || etcdctl_values(sockets, b"", 0))?;
    let revision = first.0;
    let mut space = KeySpace::new();
    let mut page = first;
    loop {
        let more = page.2;
        let last = page.1.last().map(|(k, _)| k.clone());
        space.extend(page.1);
        let Some(last) = last.filter(|_| more) else { break };
        if stop.is_cancelled() {
            bail!("cancelled");
        }
        page = etcdctl_values(sockets, from_arg(&last), revision)?;
        // A page starting before the last key read (see `from_arg`) repeats keys: the map keeps one of each.
        if page.1.iter().all(|(k, _)| space.contains_key(k)) && page.2 {
            bail!("reading the restored key space made no progress after key {:?}", String::from_utf8_lossy(&last));
        }
    }
    Ok((revision, space))
}

/// A page of keys with their states: (revision, keys, more).
type ValuesPage = (i64, Vec<(Vec<u8>, KeyState)>, bool);

/// `etcdctl get --from-key FROM -w json` with values.
fn etcdctl_values(sockets: &Path, from: &[u8], revision: i64) -> Result<ValuesPage> {
    use sha2::Digest as _;
    use std::os::unix::ffi::OsStrExt as _;
    let out = etcdctl(sockets, "2s", "60s")
        .args(["get", "--from-key", "-w", "json"])
        .args(["--limit", &PAGE_KEYS_WITH_VALUES.to_string(), "--rev", &revision.to_string()])
        .arg("--")
        .arg(std::ffi::OsStr::from_bytes(from))
        .output()
        .context("run etcdctl (is it on PATH?)")?;
    if !out.status.success() {
        bail!("etcdctl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("parse etcdctl output")?;
    let revision = v["header"]["revision"].as_i64().context("etcdctl output carries no revision")?;
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut kvs = Vec::new();
    for kv in v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let key = b64.decode(kv["key"].as_str().unwrap_or_default()).context("decode a key from etcdctl")?;
        let value = b64.decode(kv["value"].as_str().unwrap_or_default()).context("decode a value from etcdctl")?;
        let int = |f: &str| kv[f].as_i64().unwrap_or(0);
        kvs.push((
            key,
            KeyState {
                value_sha256: sha2::Sha256::digest(&value).into(),
                create_revision: int("create_revision"),
                mod_revision: int("mod_revision"),
                version: int("version"),
                lease: int("lease"),
            },
        ));
    }
    Ok((revision, kvs, v["more"].as_bool().unwrap_or(false)))
}

fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir).with_context(|| format!("create {}", dir.display()))
}

/// The throw-away etcd: killed and reaped when dropped, whatever happened.
struct ThrowAway(Child);

impl ThrowAway {
    fn start(data_dir: &Path, sockets: &Path, log: &Path, extra: &[&str]) -> Result<Self> {
        let log = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let child = Command::new("etcd")
            .current_dir(sockets)
            .args(["--name", "drill", "--data-dir"])
            .arg(data_dir)
            .args(["--listen-client-urls", CLIENT_URL, "--advertise-client-urls", CLIENT_URL])
            .args(["--listen-peer-urls", PEER_URL, "--initial-advertise-peer-urls", PEER_URL])
            .args(["--initial-cluster", &format!("drill={PEER_URL}")])
            .args(extra)
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

/// Keys per etcdctl request: key names only, so a page stays a few hundred KiB whatever the values weigh, and
/// a database of millions of keys is counted in bounded memory.
const PAGE_KEYS: usize = 5000;
/// A key longer than this is not passed whole on etcdctl's command line (Linux caps one argument at 128 KiB):
/// a page then starts from a shorter key before it and skips what was counted already.
const MAX_KEY_ARG: usize = 4096;

/// One page of `etcdctl get --keys-only`.
#[derive(Debug, Default)]
struct Page {
    revision: i64,
    keys: Vec<Vec<u8>>,
    more: bool,
}

/// Polls the throw-away etcd until it answers, then reads every key name (not the values) page by page at the
/// revision of the first page. `stop` ends the wait and the paging (the caller kills etcd).
fn read_keys(sockets: &Path, timeout: Duration, stop: &CancellationToken) -> Result<Restored> {
    let first = first_answer(timeout, stop, || etcdctl_page(sockets, b"", 0, PAGE_KEYS))?;
    let revision = first.revision;
    read_all(first, stop, |from, limit| etcdctl_page(sockets, from, revision, limit))
}

/// Counts the keys of `first` and of the pages `next(from, limit)` returns (keys from `from` on, `from`
/// included, at most `limit`), until one says there is no more.
fn read_all(
    first: Page,
    stop: &CancellationToken,
    mut next: impl FnMut(&[u8], usize) -> Result<Page>,
) -> Result<Restored> {
    let mut restored = Restored { revision: first.revision, ..Default::default() };
    let mut page = first;
    let mut last: Option<Vec<u8>> = None;
    let mut limit = PAGE_KEYS;
    loop {
        let mut fresh = 0;
        let counted = last.take();
        for key in page.keys {
            // A page starts at (or before) the last key counted: skip what was counted.
            if counted.as_ref().is_some_and(|c| key <= *c) {
                continue;
            }
            if let Some(resource) = resource_of(&key) {
                *restored.resources.entry(resource).or_insert(0) += 1;
            }
            restored.keys += 1;
            fresh += 1;
            if last.as_ref().is_none_or(|l| key > *l) {
                last = Some(key);
            }
        }
        let last = last.get_or_insert_with(|| counted.unwrap_or_default());
        if !page.more {
            return Ok(restored);
        }
        if stop.is_cancelled() {
            bail!("cancelled");
        }
        // Only a page starting well before the last key (see `from_arg`) brings nothing new: a bigger one does.
        limit = if fresh == 0 { limit.saturating_mul(2) } else { PAGE_KEYS };
        page = next(from_arg(last), limit)?;
    }
}

/// The key a page after `last` starts from on etcdctl's command line: `last` itself, or a key before it when
/// `last` cannot be an argument (a NUL byte, or too long).
fn from_arg(last: &[u8]) -> &[u8] {
    let end = last.iter().position(|b| *b == 0).unwrap_or(last.len()).min(MAX_KEY_ARG);
    &last[..end]
}

/// `etcdctl get --from-key FROM --keys-only --limit LIMIT` at `revision` (0: the newest); `FROM` empty for
/// every key.
fn etcdctl_page(sockets: &Path, from: &[u8], revision: i64, limit: usize) -> Result<Page> {
    use std::os::unix::ffi::OsStrExt as _;
    let out = etcdctl(sockets, "2s", "60s")
        .args(["get", "--from-key", "--keys-only", "-w", "json"])
        .args(["--limit", &limit.to_string(), "--rev", &revision.to_string()])
        // `--`: a key starting with `-` is not a flag.
        .arg("--")
        .arg(std::ffi::OsStr::from_bytes(from))
        .output()
        .context("run etcdctl (is it on PATH?)")?;
    if !out.status.success() {
        bail!("etcdctl: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    parse_page(&out.stdout)
}

/// Parses `etcdctl get -w json --keys-only` (keys are base64).
fn parse_page(json: &[u8]) -> Result<Page> {
    let v: serde_json::Value = serde_json::from_slice(json).context("parse etcdctl output")?;
    let revision = v["header"]["revision"].as_i64().context("etcdctl output carries no revision")?;
    let kvs = v["kvs"].as_array().map(Vec::as_slice).unwrap_or_default();
    let mut keys = Vec::with_capacity(kvs.len());
    for kv in kvs {
        let Some(key) = kv["key"].as_str() else { continue };
        keys.push(base64::engine::general_purpose::STANDARD.decode(key).context("decode a key from etcdctl")?);
    }
    Ok(Page { revision, keys, more: v["more"].as_bool().unwrap_or(false) })
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

    fn page(keys: &[&[u8]], more: bool) -> Page {
        Page { revision: 42, keys: keys.iter().map(|k| k.to_vec()).collect(), more }
    }

    #[test]
    fn keys_are_counted_per_kubernetes_resource() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let json = serde_json::json!({
            "header": {"revision": 42},
            "count": 4,
            "more": true,
            "kvs": [
                {"key": b64("/registry/pods/default/a")},
                {"key": b64("/registry/pods/default/b")},
                {"key": b64("/registry/namespaces/default")},
                {"key": b64("compact_rev_key")},
            ],
        });
        let p = parse_page(json.to_string().as_bytes()).unwrap();
        assert_eq!((p.revision, p.keys.len(), p.more), (42, 4, true));
        let r = read_all(Page { more: false, ..p }, &CancellationToken::new(), |_, _| unreachable!()).unwrap();
        assert_eq!((r.revision, r.keys), (42, 4));
        assert_eq!(r.resources, BTreeMap::from([("namespaces".into(), 1), ("pods".into(), 2)]));
        let empty = parse_page(br#"{"header": {"revision": 1}}"#).unwrap();
        assert_eq!((empty.keys.len(), empty.more), (0, false));
    }

    /// etcd's `--from-key FROM --limit N` over a sorted key space.
    fn serve(all: &[Vec<u8>], from: &[u8], limit: usize) -> Page {
        let rest: Vec<&Vec<u8>> = all.iter().filter(|k| k.as_slice() >= from).collect();
        let keys: Vec<&[u8]> = rest.iter().take(limit).map(|k| k.as_slice()).collect();
        page(&keys, rest.len() > limit)
    }

    #[test]
    fn pages_continue_from_the_last_key_and_count_each_key_once() {
        let mut all: Vec<Vec<u8>> = (0..12_345).map(|i| format!("/registry/pods/ns/p{i:05}").into_bytes()).collect();
        // Keys that cannot be a command-line argument whole, followed by many keys sharing their prefix.
        let long = [b"/registry/secrets/".as_slice(), &[b'x'; 2 * MAX_KEY_ARG]].concat();
        all.push(long.clone());
        all.extend((0..PAGE_KEYS + 10).map(|i| [long.as_slice(), format!("{i:05}").as_bytes()].concat()));
        let nul = b"/registry/secrets/a\0b".to_vec();
        all.push(nul.clone());
        all.extend((0..3 * PAGE_KEYS).map(|i| [nul.as_slice(), format!("{i:05}").as_bytes()].concat()));
        all.sort();
        let first = serve(&all, b"", PAGE_KEYS);
        let mut calls = 0;
        let r = read_all(first, &CancellationToken::new(), |from, limit| {
            calls += 1;
            assert!(from.len() <= MAX_KEY_ARG && !from.contains(&0), "an argument etcdctl can take");
            Ok(serve(&all, from, limit))
        })
        .unwrap();
        assert_eq!(r.keys, all.len() as u64);
        assert_eq!(r.resources["pods"], 12_345);
        assert_eq!(r.resources["secrets"], all.len() as u64 - 12_345);
        assert!(calls < 50, "{calls} pages");

        let stop = CancellationToken::new();
        stop.cancel();
        let first = serve(&all, b"", PAGE_KEYS);
        assert!(read_all(first, &stop, |_, _| unreachable!()).is_err(), "a cancelled read stops between pages");
    }
}
