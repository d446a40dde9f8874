//! The state-store contract, run against both backends: redb in a temp dir and a real single-member etcd
//! started for the test (from `FERRY_ETCD_DIR`, the checkout's `.tools/etcd-3.5/usr/bin` that
//! `tests/setup.sh` fills, or `PATH`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_common::resources::{ClusterSpec, Resource, ResourceType, Spec, LABEL_CLUSTER};

use super::{EtcdStore, EtcdStoreOptions, RedbStore, StateStore};

/// A state that can be opened again (a coordinator restart, or a second replica).
pub(crate) enum TestState {
    Redb { _dir: tempfile::TempDir, path: PathBuf },
    Etcd { etcd: TestEtcd, prefix: String },
}

impl TestState {
    pub(crate) fn redb() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.redb");
        Self::Redb { _dir: dir, path }
    }

    pub(crate) fn etcd() -> Self {
        Self::Etcd { etcd: TestEtcd::start(), prefix: "/ferry-test/".into() }
    }

    /// Both backends, named.
    pub(crate) fn both() -> [(&'static str, Self); 2] {
        [("redb", Self::redb()), ("etcd", Self::etcd())]
    }

    /// A handle on the state (redb allows one at a time: drop the last before opening again).
    pub(crate) fn open(&self) -> Arc<dyn StateStore> {
        match self {
            Self::Redb { path, .. } => Arc::new(RedbStore::open(path).unwrap()),
            Self::Etcd { etcd, prefix } => Arc::new(
                EtcdStore::connect(&EtcdStoreOptions {
                    endpoints: vec![etcd.url.clone()],
                    prefix: prefix.clone(),
                    ..Default::default()
                })
                .unwrap(),
            ),
        }
    }
}

/// A single-member etcd in a temp dir, killed on drop.
pub(crate) struct TestEtcd {
    pub(crate) url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

fn etcd_binary() -> PathBuf {
    let dirs = [
        std::env::var_os("FERRY_ETCD_DIR").map(PathBuf::from),
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(|root| root.join(".tools/etcd-3.5/usr/bin")),
    ];
    dirs.into_iter().flatten().map(|d| d.join("etcd")).find(|p| p.is_file()).unwrap_or_else(|| "etcd".into())
}

fn loopback_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestEtcd {
    pub(crate) fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (loopback_port(), loopback_port());
        let url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
        let binary = etcd_binary();
        let child = Command::new(&binary)
            .args(["--data-dir", &dir.path().join("data").display().to_string()])
            .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("default={peer_url}")])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {} (run tests/setup.sh): {e}", binary.display()));
        let etcd = Self { url, child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", client)).is_err() {
            assert!(Instant::now() < deadline, "etcd did not listen within 30s");
            std::thread::sleep(Duration::from_millis(50));
        }
        etcd
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cluster(id: &str) -> Resource {
    Resource::new(id, Spec::Cluster(ClusterSpec::default()))
}

#[test]
fn resources_persist_across_reopen_with_versions() {
    for (name, t) in TestState::both() {
        {
            let s = t.open();
            let r = s.put(cluster("a")).unwrap();
            assert_eq!(r.metadata.version, 1, "{name}");
            let created = r.metadata.created;
            let r = s.put(r).unwrap();
            assert_eq!((r.metadata.version, r.metadata.created), (2, created), "{name}");
            s.put(cluster("b")).unwrap();
        }
        let s = t.open();
        let all = s.list(ResourceType::Cluster).unwrap();
        assert_eq!(all.iter().map(|r| r.metadata.id.as_str()).collect::<Vec<_>>(), ["a", "b"], "{name}");
        assert_eq!(s.get(ResourceType::Cluster, "a").unwrap().map(|r| r.metadata.version), Some(2), "{name}");
        assert!(s.list(ResourceType::Agent).unwrap().is_empty(), "{name}");
        assert!(s.delete(ResourceType::Cluster, "a").unwrap(), "{name}");
        assert!(!s.delete(ResourceType::Cluster, "a").unwrap(), "{name}");
        assert!(s.get(ResourceType::Cluster, "a").unwrap().is_none(), "{name}");
    }
}

/// A failing transaction writes nothing; a transaction reads its own writes.
#[test]
fn transactions_commit_all_or_nothing() {
    for (name, t) in TestState::both() {
        let s = t.open();
        let err = s.transact(&mut |tx| {
            tx.put(cluster("x"))?;
            assert!(tx.get(ResourceType::Cluster, "x")?.is_some(), "{name}: reads its own write");
            Err(super::StateError::WrongType("on purpose".into()))
        });
        assert!(err.is_err(), "{name}");
        assert!(s.get(ResourceType::Cluster, "x").unwrap().is_none(), "{name}: a failed transaction wrote");
    }
}

/// Replicas racing to create the CA all end up with the one stored first.
#[test]
fn blobs_are_created_once() {
    for (name, t) in TestState::both() {
        let s = t.open();
        let first = s.blob_or_create("ca", &mut || Ok(b"one".to_vec())).unwrap();
        let second = s.blob_or_create("ca", &mut || Ok(b"two".to_vec())).unwrap();
        assert_eq!((first.as_slice(), second.as_slice()), (&b"one"[..], &b"one"[..]), "{name}");
    }
    // Two handles (two replicas) on one etcd.
    let t = TestState::etcd();
    let (a, b) = (t.open(), t.open());
    let values: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let ha = sc.spawn(|| a.blob_or_create("k", &mut || Ok(b"a".to_vec())).unwrap());
        let hb = sc.spawn(|| b.blob_or_create("k", &mut || Ok(b"b".to_vec())).unwrap());
        vec![ha.join().unwrap(), hb.join().unwrap()]
    });
    assert_eq!(values[0], values[1], "two replicas got different blobs");
}

/// Read-modify-writes from two replicas of one etcd store: compare-and-swap on mod revisions loses none.
#[test]
fn concurrent_read_modify_writes_from_two_replicas_lose_no_update() {
    let t = TestState::etcd();
    let replicas = [t.open(), t.open()];
    const EACH: usize = 40;
    std::thread::scope(|sc| {
        for s in &replicas {
            for _ in 0..2 {
                sc.spawn(move || {
                    for _ in 0..EACH {
                        s.transact(&mut |tx| {
                            let mut r = tx.get(ResourceType::Cluster, "c")?.unwrap_or_else(|| cluster("c"));
                            r.metadata.labels.insert("n".into(), String::new());
                            tx.put(r)?;
                            Ok(())
                        })
                        .unwrap();
                    }
                });
            }
        }
    });
    let r = replicas[0].get(ResourceType::Cluster, "c").unwrap().unwrap();
    assert_eq!(r.metadata.version, (4 * EACH) as u64, "an update was lost");
}

fn labeled(id: &str, cluster: &str) -> Resource {
    let mut r = Resource::new(id, Spec::Agent(Default::default()));
    r.metadata.labels.insert(LABEL_CLUSTER.into(), cluster.into());
    r
}

fn ids(rs: Vec<Resource>) -> Vec<String> {
    rs.into_iter().map(|r| r.metadata.id).collect()
}

/// The label index follows every write: put, relabel, delete, transactions; values that share a prefix or
/// other types with the same label do not leak in.
#[test]
fn the_label_index_finds_exactly_the_labelled_resources() {
    for (name, t) in TestState::both() {
        let s = t.open();
        s.put(labeled("a/m1", "a")).unwrap();
        s.put(labeled("a/m2", "a")).unwrap();
        s.put(labeled("ab/m1", "ab")).unwrap();
        let mut other_type = cluster("a");
        other_type.metadata.labels.insert(LABEL_CLUSTER.into(), "a".into());
        s.put(other_type).unwrap();
        let find = |v: &str| ids(s.list_labeled(ResourceType::Agent, LABEL_CLUSTER, v).unwrap());
        assert_eq!(find("a"), ["a/m1", "a/m2"], "{name}");
        assert_eq!(find("ab"), ["ab/m1"], "{name}");
        assert!(find("b").is_empty(), "{name}");
        // Relabelled: found under the new value only.
        s.put(labeled("a/m2", "b")).unwrap();
        assert_eq!((find("a"), find("b")), (vec!["a/m1".to_string()], vec!["a/m2".to_string()]), "{name}");
        assert!(s.delete(ResourceType::Agent, "a/m1").unwrap(), "{name}");
        assert!(find("a").is_empty(), "{name}");
        // A failed transaction leaves the index alone; a committed one updates it.
        let _ = s.transact(&mut |tx| {
            tx.put(labeled("c/m1", "c"))?;
            Err(super::StateError::WrongType("on purpose".into()))
        });
        assert!(find("c").is_empty(), "{name}");
        s.transact(&mut |tx| tx.put(labeled("c/m1", "c")).map(drop)).unwrap();
        assert_eq!(find("c"), ["c/m1"], "{name}");
        drop(s);
        // The index survives a reopen.
        let s = t.open();
        assert_eq!(ids(s.list_labeled(ResourceType::Agent, LABEL_CLUSTER, "c").unwrap()), ["c/m1"], "{name}");
    }
}

/// Once fenced on a term's election key, a store writes only while that key exists with the term's create
/// revision: after the term ends (key gone, or re-created by a newer term) every write fails `NotLeader`.
#[test]
fn a_fenced_store_writes_nothing_once_its_term_is_over() {
    let etcd = TestEtcd::start();
    let options =
        EtcdStoreOptions { endpoints: vec![etcd.url.clone()], prefix: "/ferry-test/".into(), ..Default::default() };
    let s = EtcdStore::connect(&options).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut c = s.client();
    let key = "/ferry-test/leader/694d";
    let put_key = |c: &mut etcd_client::Client| {
        rt.block_on(c.put(key, "127.0.0.1:7443", None)).unwrap().header().unwrap().revision()
    };
    let rev = put_key(&mut c);
    s.fence(key.to_string(), rev);
    s.put(cluster("a")).unwrap();
    s.transact(&mut |tx| tx.put(cluster("b")).map(drop)).unwrap();
    assert!(s.delete(ResourceType::Cluster, "b").unwrap());
    let not_leader = |r: Result<(), super::StateError>| matches!(r, Err(super::StateError::NotLeader));
    // The term ends: its key is deleted (lease expired or revoked) ...
    rt.block_on(c.delete(key, None)).unwrap();
    assert!(not_leader(s.put(cluster("c")).map(drop)));
    assert!(not_leader(s.transact(&mut |tx| tx.put(cluster("c")).map(drop))));
    assert!(not_leader(s.delete(ResourceType::Cluster, "a").map(drop)));
    assert!(not_leader(s.blob_or_create("x", &mut || Ok(b"x".to_vec())).map(drop)));
    // ... and a newer term holds the same key name: still not this term's.
    put_key(&mut c);
    assert!(not_leader(s.put(cluster("c")).map(drop)));
    let unfenced = EtcdStore::connect(&options).unwrap();
    assert!(unfenced.get(ResourceType::Cluster, "c").unwrap().is_none(), "a deposed leader wrote");
    assert!(unfenced.get(ResourceType::Cluster, "a").unwrap().is_some(), "a deposed leader deleted");
    assert!(unfenced.get_raw("/ferry-test/blobs/x".into()).unwrap().0.is_none(), "a deposed leader made a blob");
}
