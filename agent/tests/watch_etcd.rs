//! The change-log watcher against a real etcd, with this test playing the coordinator on an in-memory stream
//! (local store: segments arrive as chunks). etcd comes from `FERRY_ETCD_DIR`, the checkout's `.tools/etcd-3.5`
//! (`tests/setup.sh etcd`) or the system's; without one the tests say so and pass.

#![allow(clippy::unwrap_used)] // test helpers outside #[test] functions

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use etcd_client::{Client, PutOptions, Txn, TxnOp};
use ferry_agent::etcd::{EtcdMember, EtcdTls};
use ferry_agent::watch::{run, WatchSettings};
use ferry_common::protocol::{expect_frame, write_frame, SegmentTarget, WatchAssignment, WatchMsg, WatchReply};
use ferry_common::resources::Timestamp;
use ferry_common::segment::{EventKind, Record, Revision, SegmentReader};
use tokio_util::sync::CancellationToken;

fn etcd_binary() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("FERRY_ETCD_DIR") {
        candidates.push(PathBuf::from(dir).join("etcd"));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(root.join(".tools/etcd-3.5/usr/bin/etcd"));
    candidates.push(PathBuf::from("/usr/bin/etcd"));
    candidates.into_iter().find(|p| p.is_file())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Etcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_etcd() -> Option<Etcd> {
    let Some(bin) = etcd_binary() else {
        eprintln!("no etcd binary (run tests/setup.sh etcd or set FERRY_ETCD_DIR): skipped");
        return None;
    };
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let endpoint = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new(bin)
        .args(["--name", "m1", "--data-dir"])
        .arg(dir.path().join("data"))
        .args(["--listen-client-urls", &endpoint, "--advertise-client-urls", &endpoint])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("m1={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let etcd = Etcd { child, endpoint, _dir: dir };
    for _ in 0..100 {
        if let Ok(mut c) = Client::connect([&etcd.endpoint], None).await {
            if c.status().await.is_ok() {
                return Some(etcd);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("etcd did not start");
}

fn assignment(from_revision: i64) -> WatchAssignment {
    WatchAssignment {
        epoch: 1,
        lineage: 0,
        from_revision,
        prev_sha256: [0; 32],
        recipients: Vec::new(),
        zstd_level: 3,
        cut_after_ms: 500,
        cut_bytes: 4 << 20,
        spool_bytes: 64 << 20,
        coordinator_time: Timestamp { seconds: 1_700_000_000, nanos: 0 },
        target: SegmentTarget::Coordinator,
    }
}

/// The coordinator's side of a watch stream.
struct Coordinator {
    send: tokio::io::WriteHalf<tokio::io::DuplexStream>,
    recv: tokio::io::ReadHalf<tokio::io::DuplexStream>,
}

impl Coordinator {
    async fn msg(&mut self) -> WatchMsg {
        tokio::time::timeout(Duration::from_secs(30), expect_frame(&mut self.recv))
            .await
            .expect("a message within 30 s")
            .expect("a message")
    }

    /// Stores segments until `until` is covered; returns their revisions and lease records.
    async fn take_until(&mut self, until: i64, revs: &mut Vec<Revision>, leases: &mut Vec<(i64, i64)>) {
        let mut prev = None;
        loop {
            match self.msg().await {
                WatchMsg::Segment(info) => {
                    let mut bytes = Vec::new();
                    loop {
                        match self.msg().await {
                            WatchMsg::SegmentData(d) => bytes.extend(d),
                            WatchMsg::SegmentEnd => break,
                            other => panic!("{other:?}"),
                        }
                    }
                    if let Some(prev) = prev {
                        assert_eq!(info.prev_sha256, prev, "the hash chain");
                    }
                    prev = Some(info.sha256);
                    let plain = zstd::decode_all(&bytes[..]).unwrap();
                    SegmentReader::new(&plain[..])
                        .for_each(|r| match r {
                            Record::Revision(r) => revs.push(r),
                            Record::Lease(l) => leases.push((l.id, l.granted_ttl)),
                            Record::End(_) => {}
                        })
                        .unwrap();
                    let reply = WatchReply::Stored {
                        first_revision: info.first_revision,
                        last_revision: info.last_revision,
                        coordinator_time: Timestamp { seconds: 1_700_000_100, nanos: 0 },
                    };
                    write_frame(&mut self.send, &reply).await.unwrap();
                }
                WatchMsg::Covered { revision } if revision >= until => return,
                WatchMsg::Covered { .. } => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn start_watch(
    endpoint: String,
    assignment: WatchAssignment,
    spool: PathBuf,
) -> (Coordinator, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let (agent, coordinator) = tokio::io::duplex(1 << 20);
    let (agent_recv, agent_send) = tokio::io::split(agent);
    let (recv, send) = tokio::io::split(coordinator);
    let task = tokio::spawn(async move {
        let etcd = EtcdMember::connect(&endpoint, &EtcdTls::default()).await?;
        let settings = WatchSettings { cluster: "c1".into(), spool_dir: spool };
        run(etcd, assignment, settings, agent_send, agent_recv, CancellationToken::new()).await
    });
    (Coordinator { send, recv }, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_revision_reaches_the_log_whole_and_in_order() {
    let Some(etcd) = start_etcd().await else { return };
    let mut c = Client::connect([&etcd.endpoint], None).await.unwrap();
    c.put("/before", "x", None).await.unwrap();
    let spool = tempfile::tempdir().unwrap();
    let (mut coord, task) = start_watch(etcd.endpoint.clone(), assignment(0), spool.path().to_owned());
    let WatchMsg::Started { from_revision, member_id, etcd_version } = coord.msg().await else { panic!("Started") };
    assert!(member_id != 0 && !etcd_version.is_empty());
    let mut last = c.status().await.unwrap().header().unwrap().revision();
    assert_eq!(from_revision, last + 1, "the log starts after the member's revision");

    // Puts, a transaction of many keys, a lease, a delete; some of them after the first cut.
    for i in 0..20 {
        c.put(format!("/k/{i}"), vec![b'v'; 100 + i], None).await.unwrap();
    }
    let ops: Vec<TxnOp> = (0..100).map(|i| TxnOp::put(format!("/txn/{i}"), "t", None)).collect();
    c.txn(Txn::new().and_then(ops)).await.unwrap();
    let lease = c.lease_grant(120, None).await.unwrap().id();
    c.put("/leased", "l", Some(PutOptions::new().with_lease(lease))).await.unwrap();
    tokio::time::sleep(Duration::from_millis(800)).await;
    c.delete("/k/3", None).await.unwrap();
    last = c.status().await.unwrap().header().unwrap().revision();

    let (mut revs, mut leases) = (Vec::new(), Vec::new());
    coord.take_until(last, &mut revs, &mut leases).await;
    let numbers: Vec<i64> = revs.iter().map(|r| r.revision).collect();
    assert_eq!(numbers, (from_revision..=last).collect::<Vec<_>>(), "every revision, once, in order");
    let txn = revs.iter().find(|r| r.events.len() > 1).expect("the transaction");
    assert_eq!(txn.events.len(), 100, "a transaction is one whole revision");
    let leased = revs.iter().flat_map(|r| &r.events).find(|e| e.key == b"/leased").unwrap();
    assert_eq!(leased.lease, lease);
    assert!(leases.contains(&(lease, 120)), "the lease grant is recorded: {leases:?}");
    let deleted = revs.last().unwrap();
    assert_eq!((deleted.events[0].kind, &deleted.events[0].key[..]), (EventKind::Delete, &b"/k/3"[..]));
    assert!(revs.iter().all(|r| r.time_ms >= 1_700_000_000_000), "coordinator-clock times");

    write_frame(&mut coord.send, &WatchReply::Stop { reason: "test over".into() }).await.unwrap();
    task.await.unwrap().unwrap();
    assert_eq!(std::fs::read_dir(spool.path()).unwrap().count(), 0, "the spool is cleaned");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_start_is_a_gap_and_the_watch_goes_on() {
    let Some(etcd) = start_etcd().await else { return };
    let mut c = Client::connect([&etcd.endpoint], None).await.unwrap();
    for i in 0..10 {
        c.put(format!("/k/{i}"), "v", None).await.unwrap();
    }
    let compacted = c.status().await.unwrap().header().unwrap().revision();
    c.compact(compacted, None).await.unwrap();
    let spool = tempfile::tempdir().unwrap();
    let (mut coord, task) = start_watch(etcd.endpoint.clone(), assignment(2), spool.path().to_owned());
    assert!(matches!(coord.msg().await, WatchMsg::Started { from_revision: 2, .. }));
    match coord.msg().await {
        WatchMsg::Gap { from_revision: 2, to_revision, .. } => assert_eq!(to_revision, compacted),
        other => panic!("{other:?}"),
    }
    c.put("/after", "v", None).await.unwrap();
    let (mut revs, mut leases) = (Vec::new(), Vec::new());
    coord.take_until(compacted + 1, &mut revs, &mut leases).await;
    assert_eq!(revs.iter().map(|r| r.revision).collect::<Vec<_>>(), [compacted + 1]);
    drop(coord);
    task.await.unwrap().unwrap();
}

/// Not a benchmark: a rough look at ingest and memory (`cargo test --release -- --ignored ingest`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a rough measurement, seconds of load"]
async fn ingest_rate_and_memory() {
    let Some(etcd) = start_etcd().await else { return };
    let spool = tempfile::tempdir().unwrap();
    let mut a = assignment(0);
    a.cut_after_ms = 10_000;
    let (mut coord, task) = start_watch(etcd.endpoint.clone(), a, spool.path().to_owned());
    let WatchMsg::Started { from_revision, .. } = coord.msg().await else { panic!("Started") };
    let seconds = 15;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let endpoint = etcd.endpoint.clone();
            tokio::spawn(async move {
                let mut c = Client::connect([&endpoint], None).await.unwrap();
                let end = std::time::Instant::now() + Duration::from_secs(seconds);
                let mut i = 0u64;
                while std::time::Instant::now() < end {
                    let ops: Vec<TxnOp> = (0..10)
                        .map(|k| {
                            TxnOp::put(format!("/registry/pods/w{w}/p{}", (i * 10 + k) % 5000), vec![b'x'; 300], None)
                        })
                        .collect();
                    c.txn(Txn::new().and_then(ops)).await.unwrap();
                    i += 1;
                }
                i * 10
            })
        })
        .collect();
    let mut events = 0;
    for w in writers {
        events += w.await.unwrap();
    }
    // Before the test reads the log back (which holds every revision): the watcher, etcd clients, runtime.
    let (rss_loaded, _) = ferry_common::observe::process_stats();
    let mut c = Client::connect([&etcd.endpoint], None).await.unwrap();
    let last = c.status().await.unwrap().header().unwrap().revision();
    let started = std::time::Instant::now();
    let (mut revs, mut leases) = (Vec::new(), Vec::new());
    coord.take_until(last, &mut revs, &mut leases).await;
    let (rss, _) = ferry_common::observe::process_stats();
    eprintln!(
        "{events} events written in {seconds}s ({} events/s); {} revisions from {from_revision}; log caught up {:.1}s after; test process RSS {} MiB under load, {} MiB holding the log read back",
        events / seconds,
        revs.len(),
        started.elapsed().as_secs_f64(),
        rss_loaded >> 20,
        rss >> 20
    );
    drop(coord);
    task.await.unwrap().unwrap();
}
